-- outbox_pg operator API: status, pending and dead events, receipts, retries, pausing.
-- Admin functions are for superusers and roles they GRANT EXECUTE to; outbox.status is readable
-- by pg_monitor members. search_path is pinned on every function.

-- The worker's position: the newest receipt row (see outbox.batches).
CREATE FUNCTION outbox.position()
    RETURNS TABLE (below pg_snapshot, upto pg_snapshot, range_last_seq bigint,
                   range_after_seq bigint, range_after_id uuid,
                   late_after_seq bigint, late_after_id uuid)
    LANGUAGE sql STABLE SECURITY DEFINER ROWS 1 SET search_path = pg_catalog, pg_temp
AS $$
    SELECT below, upto, range_last_seq, range_after_seq, range_after_id, late_after_seq, late_after_id
    FROM outbox.batches ORDER BY id DESC LIMIT 1
$$;

-- Committed events the worker has not reached yet (parked ones among them). Every part is an
-- index range over what is still to come, never over published history. Tables only (no
-- views), so that pg_dump can use it under restrict_nonsystem_relation_kind. SECURITY DEFINER:
-- a role granted outbox.pending (and EXECUTE on this) sees the backlog's metadata without
-- being granted the event rows themselves.
CREATE FUNCTION outbox.queued()
    RETURNS TABLE (id uuid, seq bigint, event_type text, aggregate_id text, topic text,
                   created_at timestamptz)
    LANGUAGE sql STABLE SECURITY DEFINER ROWS 1000 SET search_path = pg_catalog, pg_temp
    -- Index walks only: the position comes from a function, so the planner cannot see how
    -- narrow each range is, and a scan of the table would cost its whole history.
    SET enable_seqscan = off SET enable_bitmapscan = off
BEGIN ATOMIC
    WITH position AS (SELECT * FROM outbox.position())
    -- The current window: new transactions, not walked yet (an xid range)...
    SELECT e.id, e.seq, e.event_type, e.aggregate_id, e.topic, e.created_at
    FROM position g, outbox.events e
    WHERE g.upto IS NOT NULL
      AND e.xid >= pg_snapshot_xmax(g.below) AND e.xid < pg_snapshot_xmax(g.upto)
      AND pg_visible_in_snapshot(e.xid, g.upto)
      AND (g.range_after_seq IS NULL OR (e.seq, e.id) > (g.range_after_seq, g.range_after_id))
    UNION ALL
    -- ...transactions that were running at its start, not walked yet (an index probe per xid;
    -- OFFSET 0 keeps the planner from hashing the whole table instead)...
    SELECT e.*
    FROM position g, pg_snapshot_xip(g.below) x(xid),
         LATERAL (SELECT e.id, e.seq, e.event_type, e.aggregate_id, e.topic, e.created_at
                  FROM outbox.events e WHERE e.xid = x.xid OFFSET 0) e
    WHERE g.upto IS NOT NULL AND pg_visible_in_snapshot(x.xid, g.upto)
      AND (g.late_after_seq IS NULL OR (e.seq, e.id) > (g.late_after_seq, g.late_after_id))
    UNION ALL
    -- ...and everything committed after it: an xid range, and the transactions running then.
    SELECT e.id, e.seq, e.event_type, e.aggregate_id, e.topic, e.created_at
    FROM position g, outbox.events e
    WHERE e.xid >= pg_snapshot_xmax(coalesce(g.upto, g.below))
    UNION ALL
    SELECT e.*
    FROM position g, pg_snapshot_xip(coalesce(g.upto, g.below)) x(xid),
         LATERAL (SELECT e.id, e.seq, e.event_type, e.aggregate_id, e.topic, e.created_at
                  FROM outbox.events e WHERE e.xid = x.xid OFFSET 0) e;
END;

CREATE VIEW outbox.pending AS
SELECT q.id, q.seq, q.event_type, q.aggregate_id, coalesce(q.topic, q.event_type) AS topic,
       q.created_at, 'queued'::text AS state, 0 AS attempts,
       NULL::timestamptz AS next_attempt_at, NULL::text AS error
FROM outbox.queued() q
WHERE NOT EXISTS (SELECT 1 FROM outbox.parked p WHERE p.event_id = q.id)
UNION ALL
SELECT e.id, e.seq, e.event_type, e.aggregate_id, p.topic, e.created_at, p.state, p.attempts,
       p.next_attempt_at, p.error
FROM outbox.parked p JOIN outbox.events e ON e.id = p.event_id
WHERE p.state <> 'dead';

COMMENT ON VIEW outbox.pending IS
    'Events not yet published: queued, retrying, or waiting behind an earlier event of their topic and key.';

-- Events that failed outbox.max_attempts times and are no longer retried.
CREATE VIEW outbox.dead_letters AS
SELECT e.id, e.seq, e.event_type, e.aggregate_id, p.topic, e.payload, e.headers,
       e.created_at, p.attempts AS publish_attempts, p.error, p.died_at
FROM outbox.parked p JOIN outbox.events e ON e.id = p.event_id
WHERE p.state = 'dead';

COMMENT ON VIEW outbox.dead_letters IS
    'Dead events: revive with outbox.retry(id) or outbox.retry_dead(), or give up with outbox.discard(id).';

-- Where the broker stored each published event (as long as outbox.retention keeps it).
CREATE VIEW outbox.deliveries AS
SELECT d.event_id, b.recorded_at AS published_at, d.kafka_partition, d.kafka_offset, b.id AS batch
FROM outbox.batches b,
     unnest(b.event_ids, b.partitions, b.offsets) AS d(event_id, kafka_partition, kafka_offset);

COMMENT ON VIEW outbox.deliveries IS 'One row per published event: when, and at which partition and offset.';

-- How many events are pending and since when, for readers of outbox.status.
CREATE FUNCTION outbox.backlog() RETURNS TABLE (pending bigint, oldest_created_at timestamptz)
    LANGUAGE sql STABLE SECURITY DEFINER ROWS 1 SET search_path = pg_catalog, pg_temp SET jit = off
BEGIN ATOMIC
    SELECT count(*), min(q.created_at) FROM outbox.pending q;
END;

-- One row for this database: its worker as seen in shared memory, and the outbox's backlog.
CREATE VIEW outbox.status AS
SELECT current_database()::text                                   AS database,
       w.worker_pid,
       w.state,
       p.pending,
       now() - p.oldest_created_at                                AS oldest_pending_age,
       (SELECT count(*) FROM outbox.parked WHERE state = 'dead')  AS dead,
       w.published_last_minute,
       to_timestamp(w.last_published_us / 1e6)                    AS last_published_at,
       w.last_error,
       to_timestamp(w.last_error_us / 1e6)                        AS last_error_at,
       w.broker_connected,
       w.wakeups,
       EXISTS (SELECT 1 FROM pg_subscription_rel r
               WHERE r.srrelid = 'outbox.events'::regclass)       AS replicated_here
FROM outbox.worker_state() w, outbox.backlog() p;

COMMENT ON VIEW outbox.status IS
    'This database''s outbox worker: state, backlog, dead events, throughput, last error, broker connectivity, and whether outbox.events arrives by logical replication.';

-- Makes sure the first event of each topic and key of `event_ids` that holds the key back is
-- the one being retried (after the one before it was published, discarded or died).
CREATE FUNCTION outbox.advance_keys(event_ids uuid[]) RETURNS void
    LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    UPDATE outbox.parked p SET state = 'retrying', next_attempt_at = clock_timestamp()
    FROM (SELECT DISTINCT ON (q.topic, q.aggregate_id) q.event_id, q.state
          FROM (SELECT DISTINCT coalesce(e.topic, e.event_type) AS topic, e.aggregate_id
                FROM outbox.events e WHERE e.id = ANY (advance_keys.event_ids)) k
          JOIN outbox.parked q ON q.topic = k.topic AND q.aggregate_id = k.aggregate_id
          WHERE q.state <> 'dead' OR current_setting('outbox.dead_events') = 'hold'
          ORDER BY q.topic, q.aggregate_id, q.seq) head
    WHERE p.event_id = head.event_id AND head.state = 'waiting';
END;

-- Retry one event now. A dead event starts over (after any earlier event of its topic and key
-- still held); a retrying one is retried at once. False for an event that is on its way.
CREATE FUNCTION outbox.retry(event_id uuid) RETURNS boolean
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    found_state text;
BEGIN
    IF event_id IS NULL THEN
        RAISE EXCEPTION 'outbox.retry: event_id must not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT p.state INTO found_state FROM outbox.parked p WHERE p.event_id = retry.event_id FOR UPDATE;
    IF NOT FOUND THEN
        IF NOT EXISTS (SELECT 1 FROM outbox.events e WHERE e.id = retry.event_id) THEN
            RAISE EXCEPTION 'outbox.retry: no event with id %', event_id
                USING ERRCODE = 'no_data_found', HINT = 'Dead events are listed in outbox.dead_letters.';
        END IF;
        IF EXISTS (SELECT 1 FROM outbox.pending q WHERE q.id = retry.event_id) THEN
            RETURN false;  -- queued: it is on its way
        END IF;
        RAISE EXCEPTION 'outbox.retry: event % was already published or discarded', event_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'outbox.deliveries shows where the broker stored it.';
    END IF;
    IF found_state = 'waiting' THEN
        RETURN false;      -- it goes right after the event ahead of it
    ELSIF found_state = 'retrying' THEN
        UPDATE outbox.parked p SET next_attempt_at = clock_timestamp() WHERE p.event_id = retry.event_id;
    ELSE
        UPDATE outbox.parked p SET state = 'waiting', attempts = 0, next_attempt_at = NULL,
                                   died_at = NULL
         WHERE p.event_id = retry.event_id;
        PERFORM outbox.advance_keys(ARRAY[event_id]);
    END IF;
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
    revived uuid[];
BEGIN
    WITH dead AS (
        UPDATE outbox.parked SET state = 'waiting', attempts = 0, next_attempt_at = NULL,
                                 died_at = NULL
         WHERE state = 'dead' RETURNING event_id)
    SELECT coalesce(array_agg(event_id), '{}') INTO revived FROM dead;
    PERFORM outbox.advance_keys(revived);
    PERFORM outbox.wake();
    RETURN cardinality(revived);
END
$$;

-- Give up on a dead or retrying event: it is never published, its row is deleted, and the
-- events of its topic and key that waited behind it go on.
CREATE FUNCTION outbox.discard(event_id uuid) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF event_id IS NULL THEN
        RAISE EXCEPTION 'outbox.discard: event_id must not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    DELETE FROM outbox.parked p WHERE p.event_id = discard.event_id AND p.state IN ('dead', 'retrying');
    IF NOT FOUND THEN
        RAISE EXCEPTION 'outbox.discard: event % is not dead or retrying', event_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'outbox.dead_letters and outbox.pending list the events that can be discarded.';
    END IF;
    RAISE LOG 'outbox_pg: event % discarded by %', event_id, session_user;
    PERFORM outbox.advance_keys(ARRAY[event_id]);
    DELETE FROM outbox.events e WHERE e.id = discard.event_id;
    PERFORM outbox.wake();
END
$$;

-- Stop publishing this database (emit() keeps working; events wait). Survives restarts.
CREATE FUNCTION outbox.pause() RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    INSERT INTO outbox.control (singleton) VALUES (true) ON CONFLICT (singleton) DO NOTHING;
    SELECT outbox.wake();
END;

CREATE FUNCTION outbox.resume() RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    DELETE FROM outbox.control;
    SELECT outbox.wake();
END;

REVOKE ALL ON FUNCTION outbox.retry(uuid), outbox.retry_dead(), outbox.discard(uuid),
                       outbox.pause(), outbox.resume(), outbox.wake(), outbox.worker_state(),
                       outbox.position(), outbox.queued(), outbox.backlog(),
                       outbox.advance_keys(uuid[]) FROM PUBLIC;
REVOKE ALL ON outbox.status, outbox.pending, outbox.dead_letters, outbox.deliveries FROM PUBLIC;
GRANT SELECT ON outbox.status TO pg_monitor;
GRANT EXECUTE ON FUNCTION outbox.worker_state(), outbox.position(), outbox.backlog() TO pg_monitor;

-- What pg_dump carries: the events not yet published (dead ones included), parked state, the
-- inbox, the pause flag and the sequence position. Published history and receipts are not
-- dumped; a restored database publishes what was unsent.
SELECT pg_catalog.pg_extension_config_dump('outbox.events', 'WHERE id IN (SELECT q.id FROM outbox.queued() q UNION ALL SELECT p.event_id FROM outbox.parked p)');
SELECT pg_catalog.pg_extension_config_dump('outbox.parked', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.control', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.events_seq_seq', '');
