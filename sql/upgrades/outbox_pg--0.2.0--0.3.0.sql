-- outbox_pg 0.2.0 -> 0.3.0: event rows are no longer updated when published.
--   * Receipts move to outbox.batches (outbox.deliveries lists them per event); failures and
--     dead events to outbox.parked. The columns published_at, publish_attempts, error,
--     next_attempt_at, kafka_partition and kafka_offset leave outbox.events.
--   * The worker finds committed events by their writing transaction (outbox.events.xid).
--   * Order is kept per topic and key; outbox.pending, outbox.deliveries, outbox.discard().
--   * A consumer of outbox.consume_once is a role (only its members may record for it).
--   * pg_dump carries unsent events, parked events, the inbox, the pause flag and the sequence.
-- Events in flight are kept: unpublished ones are published after the update (by the 0.3.0
-- library), failed ones keep their attempts and retry time, dead ones stay dead.

-- The new columns.
ALTER TABLE outbox.events ADD COLUMN xid xid8, ADD COLUMN message_bytes int;
COMMENT ON COLUMN outbox.events.seq IS 'Emission order; the worker publishes each topic and key in this order.';
COMMENT ON COLUMN outbox.events.xid IS
    'The transaction that wrote the event: the worker publishes a transaction''s events once it has committed.';

-- Receipts and the worker's position.
CREATE TABLE outbox.batches (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    recorded_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    below            pg_snapshot NOT NULL,
    upto             pg_snapshot,
    range_last_seq   bigint,
    range_after_seq  bigint,
    range_after_id   uuid,
    late_after_seq   bigint,
    late_after_id    uuid,
    event_ids        uuid[]      NOT NULL,
    partitions       int[]       NOT NULL,
    offsets          bigint[]    NOT NULL,
    event_count      int         NOT NULL GENERATED ALWAYS AS (cardinality(event_ids)) STORED
);
COMMENT ON TABLE outbox.batches IS
    'Receipts of published batches (outbox.deliveries lists them per event) and the worker''s position.';
-- Out of line and uncompressed: a batch's ids do not compress, and trying costs the worker more
-- than storing them.
ALTER TABLE outbox.batches ALTER COLUMN event_ids SET STORAGE EXTERNAL,
                           ALTER COLUMN partitions SET STORAGE EXTERNAL,
                           ALTER COLUMN offsets SET STORAGE EXTERNAL;

CREATE TABLE outbox.parked (
    event_id         uuid        PRIMARY KEY,
    seq              bigint      NOT NULL,
    topic            text        NOT NULL,
    aggregate_id     text        NOT NULL,
    state            text        NOT NULL CHECK (state IN ('retrying', 'waiting', 'dead')),
    attempts         int         NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    error            text,
    parked_at        timestamptz NOT NULL DEFAULT clock_timestamp(),  -- first parked
    died_at          timestamptz,  -- when it last died; NULL if it died under 0.2.0 (not recorded)
    CHECK ((state = 'retrying') = (next_attempt_at IS NOT NULL)),
    CHECK (state = 'dead' OR died_at IS NULL)
);
COMMENT ON TABLE outbox.parked IS
    'Events waiting for a retry, waiting behind an earlier event of their topic and key, or dead.';
CREATE INDEX parked_due ON outbox.parked (next_attempt_at) WHERE state = 'retrying';
CREATE INDEX parked_key ON outbox.parked (topic, aggregate_id, seq);

-- What was published keeps its receipt (in chunks of 10,000 events).
INSERT INTO outbox.batches (recorded_at, below, event_ids, partitions, offsets)
SELECT max(published_at), '1:1:'::pg_snapshot,
       array_agg(id ORDER BY seq), array_agg(coalesce(kafka_partition, -1) ORDER BY seq),
       array_agg(coalesce(kafka_offset, -1) ORDER BY seq)
FROM outbox.events WHERE published_at IS NOT NULL
GROUP BY seq / 10000 ORDER BY seq / 10000;

-- Failed and dead events are parked as they were.
INSERT INTO outbox.parked (event_id, seq, topic, aggregate_id, state, attempts, next_attempt_at, error)
SELECT id, seq, coalesce(topic, event_type), aggregate_id,
       CASE WHEN next_attempt_at IS NULL THEN 'dead' ELSE 'retrying' END,
       publish_attempts, next_attempt_at, error
FROM outbox.events WHERE published_at IS NULL AND publish_attempts > 0;

-- Unpublished events belong to this transaction's window: the 0.3.0 worker publishes them.
UPDATE outbox.events
   SET xid = pg_catalog.pg_current_xact_id(),
       message_bytes = octet_length(payload::text) + 2 * octet_length(aggregate_id)
                       + 2 * octet_length(event_type) + coalesce(octet_length(headers::text), 0) + 160
 WHERE published_at IS NULL AND publish_attempts = 0;

-- Where the 0.3.0 worker starts: after everything but this transaction.
INSERT INTO outbox.batches (below, event_ids, partitions, offsets)
VALUES ((pg_catalog.pg_current_xact_id()::text || ':' || pg_catalog.pg_current_xact_id()::text || ':')::pg_snapshot,
        '{}', '{}', '{}');

-- The old worker state leaves the event rows.
DROP VIEW outbox.status;
DROP VIEW outbox.dead_letters;
DROP INDEX outbox.events_pending, outbox.events_retrying, outbox.events_dead;
ALTER TABLE outbox.events
    DROP COLUMN published_at, DROP COLUMN publish_attempts, DROP COLUMN error,
    DROP COLUMN next_attempt_at, DROP COLUMN kafka_partition, DROP COLUMN kafka_offset;
CREATE INDEX events_seq ON outbox.events (seq, id);
CREATE INDEX events_xid ON outbox.events (xid, seq);

-- The pause flag becomes the presence of a row.
-- pause() and resume() first, so the column they read can go (their grants stay).
CREATE OR REPLACE FUNCTION outbox.pause() RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    INSERT INTO outbox.control (singleton) VALUES (true) ON CONFLICT (singleton) DO NOTHING;
    SELECT outbox.wake();
END;

CREATE OR REPLACE FUNCTION outbox.resume() RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    DELETE FROM outbox.control;
    SELECT outbox.wake();
END;

DELETE FROM outbox.control WHERE NOT paused;
ALTER TABLE outbox.control DROP COLUMN paused;
ALTER TABLE outbox.control ALTER COLUMN paused_at SET NOT NULL, ALTER COLUMN paused_at SET DEFAULT now();
UPDATE outbox.control SET paused_by = coalesce(paused_by, session_user);
ALTER TABLE outbox.control ALTER COLUMN paused_by SET NOT NULL, ALTER COLUMN paused_by SET DEFAULT session_user;
COMMENT ON TABLE outbox.control IS 'A row here: publishing is paused (outbox.pause(), outbox.resume()).';

-- Rows that do not come from emit(), and replicated ones.
CREATE FUNCTION outbox.stamp_event() RETURNS trigger
    LANGUAGE c AS 'MODULE_PATHNAME', 'outbox_stamp_event';
CREATE TRIGGER stamp BEFORE INSERT ON outbox.events
    FOR EACH ROW EXECUTE FUNCTION outbox.stamp_event();
ALTER TABLE outbox.events ENABLE ALWAYS TRIGGER stamp;

CREATE FUNCTION outbox.skip_replicated() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF current_setting('session_replication_role') = 'replica' THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER skip_replicated BEFORE INSERT OR UPDATE ON outbox.batches
    FOR EACH ROW WHEN (pg_catalog.current_setting('session_replication_role') = 'replica')
    EXECUTE FUNCTION outbox.skip_replicated();
CREATE TRIGGER skip_replicated BEFORE INSERT OR UPDATE ON outbox.parked
    FOR EACH ROW WHEN (pg_catalog.current_setting('session_replication_role') = 'replica')
    EXECUTE FUNCTION outbox.skip_replicated();
CREATE TRIGGER skip_replicated BEFORE INSERT OR UPDATE ON outbox.control
    FOR EACH ROW WHEN (pg_catalog.current_setting('session_replication_role') = 'replica')
    EXECUTE FUNCTION outbox.skip_replicated();
ALTER TABLE outbox.batches ENABLE ALWAYS TRIGGER skip_replicated;
ALTER TABLE outbox.parked ENABLE ALWAYS TRIGGER skip_replicated;
ALTER TABLE outbox.control ENABLE ALWAYS TRIGGER skip_replicated;

REVOKE ALL ON outbox.batches, outbox.parked FROM PUBLIC;

-- The operator API (as in sql/admin.sql of 0.3.0).
CREATE FUNCTION outbox.position()
    RETURNS TABLE (below pg_snapshot, upto pg_snapshot, range_last_seq bigint,
                   range_after_seq bigint, range_after_id uuid,
                   late_after_seq bigint, late_after_id uuid)
    LANGUAGE sql STABLE SECURITY DEFINER ROWS 1 SET search_path = pg_catalog, pg_temp
AS $$
    SELECT below, upto, range_last_seq, range_after_seq, range_after_id, late_after_seq, late_after_id
    FROM outbox.batches ORDER BY id DESC LIMIT 1
$$;

CREATE FUNCTION outbox.queued()
    RETURNS TABLE (id uuid, seq bigint, event_type text, aggregate_id text, topic text,
                   created_at timestamptz)
    LANGUAGE sql STABLE SECURITY DEFINER ROWS 1000 SET search_path = pg_catalog, pg_temp
    -- Index walks only: the position comes from a function, so the planner cannot see how
    -- narrow each range is, and a scan of the table would cost its whole history.
    SET enable_seqscan = off SET enable_bitmapscan = off
BEGIN ATOMIC
    WITH position AS (SELECT * FROM outbox.position())
    SELECT e.id, e.seq, e.event_type, e.aggregate_id, e.topic, e.created_at
    FROM position g, outbox.events e
    WHERE g.upto IS NOT NULL
      AND e.xid >= pg_snapshot_xmax(g.below) AND e.xid < pg_snapshot_xmax(g.upto)
      AND pg_visible_in_snapshot(e.xid, g.upto)
      AND (g.range_after_seq IS NULL OR (e.seq, e.id) > (g.range_after_seq, g.range_after_id))
    UNION ALL
    SELECT e.*
    FROM position g, pg_snapshot_xip(g.below) x(xid),
         LATERAL (SELECT e.id, e.seq, e.event_type, e.aggregate_id, e.topic, e.created_at
                  FROM outbox.events e WHERE e.xid = x.xid OFFSET 0) e
    WHERE g.upto IS NOT NULL AND pg_visible_in_snapshot(x.xid, g.upto)
      AND (g.late_after_seq IS NULL OR (e.seq, e.id) > (g.late_after_seq, g.late_after_id))
    UNION ALL
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

CREATE VIEW outbox.dead_letters AS
SELECT e.id, e.seq, e.event_type, e.aggregate_id, p.topic, e.payload, e.headers,
       e.created_at, p.attempts AS publish_attempts, p.error, p.died_at
FROM outbox.parked p JOIN outbox.events e ON e.id = p.event_id
WHERE p.state = 'dead';
COMMENT ON VIEW outbox.dead_letters IS
    'Dead events: revive with outbox.retry(id) or outbox.retry_dead(), or give up with outbox.discard(id).';

CREATE VIEW outbox.deliveries AS
SELECT d.event_id, b.recorded_at AS published_at, d.kafka_partition, d.kafka_offset, b.id AS batch
FROM outbox.batches b,
     unnest(b.event_ids, b.partitions, b.offsets) AS d(event_id, kafka_partition, kafka_offset);
COMMENT ON VIEW outbox.deliveries IS 'One row per published event: when, and at which partition and offset.';

CREATE FUNCTION outbox.backlog() RETURNS TABLE (pending bigint, oldest_created_at timestamptz)
    LANGUAGE sql STABLE SECURITY DEFINER ROWS 1 SET search_path = pg_catalog, pg_temp SET jit = off
BEGIN ATOMIC
    SELECT count(*), min(q.created_at) FROM outbox.pending q;
END;

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

CREATE OR REPLACE FUNCTION outbox.retry(event_id uuid) RETURNS boolean
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

CREATE OR REPLACE FUNCTION outbox.retry_dead() RETURNS bigint
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

REVOKE ALL ON FUNCTION outbox.retry(uuid), outbox.retry_dead(), outbox.discard(uuid),
                       outbox.pause(), outbox.resume(), outbox.wake(), outbox.worker_state(),
                       outbox.position(), outbox.queued(), outbox.backlog(),
                       outbox.advance_keys(uuid[]) FROM PUBLIC;
REVOKE ALL ON outbox.status, outbox.pending, outbox.dead_letters, outbox.deliveries FROM PUBLIC;
GRANT SELECT ON outbox.status TO pg_monitor;
GRANT EXECUTE ON FUNCTION outbox.worker_state(), outbox.position(), outbox.backlog() TO pg_monitor;

-- A consumer is a role.
CREATE OR REPLACE FUNCTION outbox.consume_once(consumer text, event_id uuid) RETURNS boolean
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

-- What pg_dump carries.
SELECT pg_catalog.pg_extension_config_dump('outbox.events', 'WHERE id IN (SELECT q.id FROM outbox.queued() q UNION ALL SELECT p.event_id FROM outbox.parked p)');
SELECT pg_catalog.pg_extension_config_dump('outbox.parked', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.control', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.events_seq_seq', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.inbox', '');
