-- outbox_pg operator API: status, dead letters, retries, pausing.
-- Admin functions are for superusers and roles they GRANT EXECUTE to; the views are readable by
-- pg_monitor members. search_path is pinned on every SECURITY DEFINER function.

-- One row for this database: its worker as seen in shared memory, and the outbox's backlog.
-- Cheap enough to scrape every few seconds: the counts use the small partial indexes.
CREATE VIEW outbox.status AS
SELECT current_database()::text                                   AS database,
       w.worker_pid,
       w.state,
       p.pending,
       now() - p.oldest_created_at                                AS oldest_pending_age,
       (SELECT count(*) FROM outbox.events
         WHERE published_at IS NULL AND publish_attempts > 0
           AND next_attempt_at IS NULL)                           AS dead,
       w.published_last_minute,
       to_timestamp(w.last_published_us / 1e6)                    AS last_published_at,
       w.last_error,
       to_timestamp(w.last_error_us / 1e6)                        AS last_error_at,
       w.broker_connected,
       w.wakeups
FROM outbox.worker_state() w,
     LATERAL (
       SELECT (SELECT count(*) FROM outbox.events
                WHERE published_at IS NULL AND publish_attempts = 0)
            + (SELECT count(*) FROM outbox.events
                WHERE published_at IS NULL AND next_attempt_at IS NOT NULL) AS pending,
              least((SELECT created_at FROM outbox.events
                      WHERE published_at IS NULL AND publish_attempts = 0
                      ORDER BY seq LIMIT 1),
                    (SELECT min(created_at) FROM outbox.events
                      WHERE published_at IS NULL AND next_attempt_at IS NOT NULL)) AS oldest_created_at
     ) p;

COMMENT ON VIEW outbox.status IS
    'This database''s outbox worker: state, backlog, dead events, throughput, last error, broker connectivity.';

-- Events that failed outbox.max_attempts times and are no longer retried.
CREATE VIEW outbox.dead_letters AS
SELECT id, seq, event_type, aggregate_id, coalesce(topic, event_type) AS topic, payload, headers,
       created_at, publish_attempts, error
FROM outbox.events
WHERE published_at IS NULL AND publish_attempts > 0 AND next_attempt_at IS NULL;

COMMENT ON VIEW outbox.dead_letters IS 'Dead events: revive with outbox.retry(id) or outbox.retry_dead().';

-- Revive one event: a dead one starts over as a new event; a retrying one is retried now.
CREATE FUNCTION outbox.retry(event_id uuid) RETURNS boolean
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    found_event record;
BEGIN
    IF event_id IS NULL THEN
        RAISE EXCEPTION 'outbox.retry: event_id must not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT published_at, publish_attempts INTO found_event
    FROM outbox.events WHERE id = event_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'outbox.retry: no event with id %', event_id
            USING ERRCODE = 'no_data_found', HINT = 'Dead events are listed in outbox.dead_letters.';
    END IF;
    IF found_event.published_at IS NOT NULL THEN
        RAISE EXCEPTION 'outbox.retry: event % was already published at %', event_id, found_event.published_at
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF found_event.publish_attempts = 0 THEN
        RETURN false;  -- never failed: it is already on its way
    END IF;
    UPDATE outbox.events
       SET publish_attempts = CASE WHEN next_attempt_at IS NULL THEN 0 ELSE publish_attempts END,
           next_attempt_at  = CASE WHEN next_attempt_at IS NULL THEN NULL ELSE now() END
     WHERE id = event_id;
    PERFORM outbox.wake();
    RETURN true;
END
$$;

-- Revive every dead event; returns how many.
CREATE FUNCTION outbox.retry_dead() RETURNS bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    revived bigint;
BEGIN
    UPDATE outbox.events SET publish_attempts = 0
     WHERE published_at IS NULL AND publish_attempts > 0 AND next_attempt_at IS NULL;
    GET DIAGNOSTICS revived = ROW_COUNT;
    PERFORM outbox.wake();
    RETURN revived;
END
$$;

-- Stop publishing this database (emit() keeps working; events wait). Survives restarts.
CREATE FUNCTION outbox.pause() RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    UPDATE outbox.control SET paused = true, paused_at = now(), paused_by = session_user;
    SELECT outbox.wake();
END;

CREATE FUNCTION outbox.resume() RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    UPDATE outbox.control SET paused = false, paused_at = NULL, paused_by = NULL;
    SELECT outbox.wake();
END;

REVOKE ALL ON FUNCTION outbox.retry(uuid), outbox.retry_dead(), outbox.pause(), outbox.resume(),
                       outbox.wake(), outbox.worker_state() FROM PUBLIC;
REVOKE ALL ON outbox.status, outbox.dead_letters FROM PUBLIC;
GRANT SELECT ON outbox.status TO pg_monitor;
GRANT EXECUTE ON FUNCTION outbox.worker_state() TO pg_monitor;
