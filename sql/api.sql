-- outbox_pg SQL API: the functions applications call.

-- emit(): write an event in the caller's transaction. It commits or rolls back with it.
-- One overload per aggregate id type, so text, uuid and integer ids need no cast.
-- SECURITY DEFINER: callers need EXECUTE on emit(), not INSERT on the table. emit() resolves names
-- with search_path pinned to pg_catalog alone (never the caller's schemas or pg_temp), in C: a
-- SET clause here would cost a configuration save and restore on every call.
CREATE FUNCTION outbox.emit(
    event_type   text,
    aggregate_id text,
    payload      jsonb,
    headers      jsonb DEFAULT NULL,
    topic        text  DEFAULT NULL
) RETURNS uuid
    LANGUAGE c VOLATILE PARALLEL UNSAFE SECURITY DEFINER
    AS 'MODULE_PATHNAME', 'outbox_emit_text';

CREATE FUNCTION outbox.emit(
    event_type   text,
    aggregate_id uuid,
    payload      jsonb,
    headers      jsonb DEFAULT NULL,
    topic        text  DEFAULT NULL
) RETURNS uuid
    LANGUAGE c VOLATILE PARALLEL UNSAFE SECURITY DEFINER
    AS 'MODULE_PATHNAME', 'outbox_emit_uuid';

CREATE FUNCTION outbox.emit(
    event_type   text,
    aggregate_id bigint,
    payload      jsonb,
    headers      jsonb DEFAULT NULL,
    topic        text  DEFAULT NULL
) RETURNS uuid
    LANGUAGE c VOLATILE PARALLEL UNSAFE SECURITY DEFINER
    AS 'MODULE_PATHNAME', 'outbox_emit_int8';

COMMENT ON FUNCTION outbox.emit(text, text, jsonb, jsonb, text) IS
    'Emit an event in the current transaction; returns its id (the outbox-id header).';
COMMENT ON FUNCTION outbox.emit(text, uuid, jsonb, jsonb, text) IS
    'Emit an event in the current transaction; returns its id (the outbox-id header).';
COMMENT ON FUNCTION outbox.emit(text, bigint, jsonb, jsonb, text) IS
    'Emit an event in the current transaction; returns its id (the outbox-id header).';
