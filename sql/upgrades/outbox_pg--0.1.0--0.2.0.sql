-- outbox_pg 0.1.0 -> 0.2.0: the inbox for consumer-side de-duplication (outbox.consume_once).
-- New settings in 0.2.0 need no SQL: outbox.traceparent, outbox.message_format,
-- outbox.cloudevents_source, outbox.auto_create_topics, outbox.topic_partitions, outbox.topic_replication.


CREATE TABLE outbox.inbox (
    consumer     text        NOT NULL,
    event_id     uuid        NOT NULL,   -- the message's outbox-id header
    consumed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
REVOKE ALL ON outbox.inbox FROM PUBLIC;

COMMENT ON TABLE outbox.inbox IS 'Event ids each consumer has applied: outbox.consume_once() records them.';

-- True the first time `consumer` consumes `event_id` (committed with the caller's transaction);
-- false for a duplicate. A concurrent transaction consuming the same id waits for this one.
CREATE FUNCTION outbox.consume_once(consumer text, event_id uuid) RETURNS boolean
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF consumer IS NULL OR event_id IS NULL THEN
        RAISE EXCEPTION 'outbox.consume_once: % must not be NULL',
                        CASE WHEN consumer IS NULL THEN 'consumer' ELSE 'event_id' END
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF consumer = '' THEN
        RAISE EXCEPTION 'outbox.consume_once: consumer must not be empty'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Name the consumer, e.g. its Kafka consumer group.';
    END IF;
    INSERT INTO outbox.inbox (consumer, event_id) VALUES (consumer, event_id)
        ON CONFLICT DO NOTHING;
    RETURN FOUND;
END
$$;

-- Forget what consumers saw before `older_than` ago; returns rows deleted. Keep ids for longer
-- than any duplicate can arrive (your topics' retention). Schedule it, e.g. with pg_cron.
CREATE FUNCTION outbox.purge_inbox(older_than interval) RETURNS bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    purged bigint;
BEGIN
    IF older_than IS NULL OR older_than < interval '0' THEN
        RAISE EXCEPTION 'outbox.purge_inbox: older_than must be a positive interval, not %', older_than
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM outbox.inbox WHERE consumed_at < now() - older_than;
    GET DIAGNOSTICS purged = ROW_COUNT;
    RETURN purged;
END
$$;

REVOKE ALL ON FUNCTION outbox.purge_inbox(interval) FROM PUBLIC;
