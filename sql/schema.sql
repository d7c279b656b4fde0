-- outbox_pg schema: the outbox table, its indexes and privileges.
-- CREATE EXTENSION outbox_pg creates the schema `outbox` (control file) and runs this first.

-- One row per emitted event. The classic outbox columns come first; the rest is what the worker
-- needs to publish in order, retry, and report where the broker stored the message.
CREATE TABLE outbox.events (
    id               uuid        PRIMARY KEY,             -- UUIDv7 from emit(): time-ordered
    event_type       text        NOT NULL,
    aggregate_id     text        NOT NULL,                -- the Kafka message key
    payload          jsonb       NOT NULL,                -- the Kafka message value
    created_at       timestamptz NOT NULL DEFAULT now(),  -- the emitting transaction's start
    published_at     timestamptz,                         -- NULL = not yet published
    publish_attempts int         NOT NULL DEFAULT 0,      -- failed attempts so far
    error            text,                                -- the last failure
    seq              bigint      NOT NULL GENERATED ALWAYS AS IDENTITY (CACHE 1),
                                                          -- emission order (CACHE 1 keeps it so)
    topic            text,                                -- NULL = the event type
    headers          jsonb,                               -- extra message headers (strings)
    next_attempt_at  timestamptz,                         -- when a failed event is retried;
                                                          -- NULL after a failure = dead
    kafka_partition  int,                                 -- where the broker stored it
    kafka_offset     bigint
);

COMMENT ON TABLE outbox.events IS
    'Transactional outbox: rows written by outbox.emit(), published to Kafka by the outbox_pg worker.';
COMMENT ON COLUMN outbox.events.seq IS 'Emission order; the worker publishes in this order.';
COMMENT ON COLUMN outbox.events.next_attempt_at IS
    'When a failed event is retried; NULL with publish_attempts > 0 means dead (outbox.max_attempts reached).';

-- The worker's queue: events never tried, in emission order. Holds only unpublished rows, so
-- claiming never scans published history.
CREATE INDEX events_pending ON outbox.events (seq)
    WHERE published_at IS NULL AND publish_attempts = 0;

-- Events waiting for a retry, by aggregate: such an event holds back its aggregate's later events.
CREATE INDEX events_retrying ON outbox.events (aggregate_id, seq)
    WHERE published_at IS NULL AND next_attempt_at IS NOT NULL;

-- Dead events (outbox.max_attempts failures), for operators.
CREATE INDEX events_dead ON outbox.events (seq)
    WHERE published_at IS NULL AND publish_attempts > 0 AND next_attempt_at IS NULL;

-- These partial indexes hold only unpublished or failed rows, so they stay small; a new row
-- enters events_pending only.

-- Retention needs no index of its own: ids are time-ordered (UUIDv7), so the primary key finds
-- old rows; every index here is one more thing each emit() must maintain.

-- Nobody writes the table directly: emit() inserts, the worker updates and deletes.
REVOKE ALL ON outbox.events FROM PUBLIC;
GRANT USAGE ON SCHEMA outbox TO PUBLIC;

-- Worker control: one row. outbox.pause() / outbox.resume() set it; it survives restarts.
CREATE TABLE outbox.control (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    paused     boolean     NOT NULL DEFAULT false,
    paused_at  timestamptz,
    paused_by  text
);
INSERT INTO outbox.control DEFAULT VALUES;
REVOKE ALL ON outbox.control FROM PUBLIC;
