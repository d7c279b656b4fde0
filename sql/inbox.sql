-- outbox_pg inbox: consumer-side de-duplication for consumers that also use Postgres.
-- Call outbox.consume_once(consumer, event_id) in the transaction that applies a message: it is
-- true the first time that consumer sees the event id, false for every duplicate.
--
-- A consumer is a role: only members of role `consumer` (and superusers) may record what it
-- consumed, so no other role can make it skip an event. Create one role per consumer and grant
-- it to the login role the consumer connects as:
--   CREATE ROLE billing NOLOGIN; GRANT billing TO billing_service;

CREATE TABLE outbox.inbox (
    consumer     text        NOT NULL,   -- the consumer's role
    event_id     uuid        NOT NULL,   -- the message's outbox-id header
    consumed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
REVOKE ALL ON outbox.inbox FROM PUBLIC;

COMMENT ON TABLE outbox.inbox IS 'Event ids each consumer has applied: outbox.consume_once() records them.';

-- True the first time `consumer` consumes `event_id` (committed with the caller's transaction);
-- false for a duplicate. A concurrent transaction consuming the same id waits for this one.
-- The session's login role (session_user) must be a member of role `consumer`.
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
                  HINT = 'Name the consumer''s role.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = consumer) THEN
        RAISE EXCEPTION 'outbox.consume_once: consumer "%" is not a role', consumer
            USING ERRCODE = 'undefined_object',
                  HINT = 'A consumer is a role: CREATE ROLE ... NOLOGIN, then GRANT it to the role the consumer logs in as.';
    END IF;
    IF NOT pg_has_role(session_user, consumer, 'MEMBER') THEN
        RAISE EXCEPTION 'outbox.consume_once: role "%" may not record what consumer "%" consumed',
                        session_user, consumer
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('GRANT %I TO %I;', consumer, session_user);
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

SELECT pg_catalog.pg_extension_config_dump('outbox.inbox', '');
