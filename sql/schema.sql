-- outbox_pg schema: the outbox table, the worker's receipts and parked events, and privileges.
-- CREATE EXTENSION outbox_pg creates the schema `outbox` (control file) and runs this first.
--
-- An event row is written once, by emit(), and never updated. What happened to it afterwards
-- lives elsewhere: a receipt in outbox.batches when the broker stored it, a row in outbox.parked
-- while it waits for a retry or is dead. So publishing leaves no dead tuples in outbox.events,
-- and nothing the worker does walks published history, however long a snapshot stays open.

-- One row per emitted event.
CREATE TABLE outbox.events (
    id            uuid        PRIMARY KEY,            -- UUIDv7 from emit(): time-ordered
    event_type    text        NOT NULL,
    aggregate_id  text        NOT NULL,               -- the Kafka message key
    payload       jsonb       NOT NULL,               -- the Kafka message value
    created_at    timestamptz NOT NULL DEFAULT now(), -- the emitting transaction's start
    seq           bigint      NOT NULL GENERATED ALWAYS AS IDENTITY (CACHE 1),
                                                      -- emission order (CACHE 1 keeps it so)
    topic         text,                               -- NULL = the event type
    headers       jsonb,                              -- extra message headers (strings)
    xid           xid8,                               -- the writing transaction; NULL = arrived
                                                      -- by logical replication, not published here
    message_bytes int                                 -- the Kafka message's size (key, value, headers)
);

COMMENT ON TABLE outbox.events IS
    'Transactional outbox: rows written by outbox.emit(), published to Kafka by the outbox_pg worker.';
COMMENT ON COLUMN outbox.events.seq IS 'Emission order; the worker publishes each topic and key in this order.';
COMMENT ON COLUMN outbox.events.xid IS
    'The transaction that wrote the event: the worker publishes a transaction''s events once it has committed.';

-- The worker walks a batch of newly committed events in emission order...
CREATE INDEX events_seq ON outbox.events (seq, id);
-- ...found by the transactions that committed since its last look (in emission order within
-- each, for a transaction that commits late with many events).
CREATE INDEX events_xid ON outbox.events (xid, seq);

-- Sets xid and message_bytes on rows that do not come from emit() (which sets them itself): a
-- superuser's INSERT or COPY, a restore. Under logical replication (session_replication_role =
-- replica) xid is left NULL unless outbox.publish_replicated is on, so a subscriber does not
-- publish what its publisher publishes. ENABLE ALWAYS: it fires for replicated rows too.
CREATE FUNCTION outbox.stamp_event() RETURNS trigger
    LANGUAGE c AS 'MODULE_PATHNAME', 'outbox_stamp_event';
CREATE TRIGGER stamp BEFORE INSERT ON outbox.events
    FOR EACH ROW EXECUTE FUNCTION outbox.stamp_event();
ALTER TABLE outbox.events ENABLE ALWAYS TRIGGER stamp;

-- One row per batch the broker acknowledged: the receipts (which events, where), and how far the
-- worker got. Rows are only ever inserted (and expired by outbox.retention); the newest row is
-- the worker's position. Positions are snapshots: every event of a transaction visible in
-- `below` was published before this batch; the batch belongs to the transactions visible in
-- `upto` and not in `below`, walked in (seq, id) order up to the `*_after` positions.
CREATE TABLE outbox.batches (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    recorded_at      timestamptz NOT NULL DEFAULT clock_timestamp(),  -- published_at of its events
    below            pg_snapshot NOT NULL,
    upto             pg_snapshot,              -- NULL: between windows
    range_last_seq   bigint,                   -- the window's highest seq of new transactions
    range_after_seq  bigint,                   -- walked up to here: new transactions
    range_after_id   uuid,
    late_after_seq   bigint,                   -- walked up to here: transactions that were running at `below`
    late_after_id    uuid,
    event_ids        uuid[]      NOT NULL,     -- published events, with...
    partitions       int[]       NOT NULL,     -- ...their partitions...
    offsets          bigint[]    NOT NULL,     -- ...and offsets
    event_count      int         NOT NULL GENERATED ALWAYS AS (cardinality(event_ids)) STORED
                                               -- (read without detoasting the arrays)
);
COMMENT ON TABLE outbox.batches IS
    'Receipts of published batches (outbox.deliveries lists them per event) and the worker''s position.';
-- Out of line and uncompressed: a batch's ids do not compress, and trying costs the worker more
-- than storing them.
ALTER TABLE outbox.batches ALTER COLUMN event_ids SET STORAGE EXTERNAL,
                           ALTER COLUMN partitions SET STORAGE EXTERNAL,
                           ALTER COLUMN offsets SET STORAGE EXTERNAL;

-- Where the worker starts: everything written before the extension existed counts as published,
-- the creating transaction's own events (a restore in one transaction) do not.
INSERT INTO outbox.batches (below, event_ids, partitions, offsets)
VALUES ((pg_catalog.pg_current_xact_id()::text || ':' || pg_catalog.pg_current_xact_id()::text || ':')::pg_snapshot,
        '{}', '{}', '{}');

-- Events set aside from the flow, per topic and key (what Kafka orders):
--   retrying  failed (attempts > 0) or sent again after a restart (attempts = 0); due at next_attempt_at
--   waiting   behind an earlier parked event of the same topic and key
--   dead      failed outbox.max_attempts times; see outbox.dead_events for what it holds back
CREATE TABLE outbox.parked (
    event_id         uuid        PRIMARY KEY,
    seq              bigint      NOT NULL,
    topic            text        NOT NULL,     -- coalesce(topic, event_type), without the prefix
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

-- Worker control: a row here means outbox.pause() is in effect. It survives restarts, dumps and
-- restores.
CREATE TABLE outbox.control (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    paused_at  timestamptz NOT NULL DEFAULT now(),
    paused_by  text        NOT NULL DEFAULT session_user
);
COMMENT ON TABLE outbox.control IS 'A row here: publishing is paused (outbox.pause(), outbox.resume()).';

-- A logical-replication subscriber keeps its own worker state: rows of these tables arriving from
-- a publisher (session_replication_role = replica) are not applied. (The WHEN clause spares the
-- worker's own writes a function call.)
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

-- Nobody writes these tables directly: emit() inserts events, the worker and the admin
-- functions do the rest.
REVOKE ALL ON outbox.events, outbox.batches, outbox.parked, outbox.control FROM PUBLIC;
GRANT USAGE ON SCHEMA outbox TO PUBLIC;
