-- The SQL contract users rely on: the objects the extension ships, who may use them, and what
-- emit() accepts and stores. Run by tests/e2e/tests/bad_input.rs with bad_input.sql.
\set SHOW_CONTEXT never

-- Tables, views and their columns.
SELECT c.relname, c.relkind, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull
FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
WHERE c.relnamespace = 'outbox'::regnamespace AND c.relkind IN ('r', 'v') AND a.attnum > 0
  AND NOT a.attisdropped
ORDER BY c.relname, a.attnum;

-- Functions: arguments, result, rights they run with, pinned settings.
SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS arguments,
       pg_get_function_result(p.oid) AS result, p.prosecdef AS security_definer,
       p.provolatile AS volatility, p.proconfig AS settings
FROM pg_proc p
WHERE p.pronamespace = 'outbox'::regnamespace
ORDER BY 1, 2;

-- Every function with elevated rights pins its search path (emit() does it in C, for the whole
-- call, without the cost of a SET clause: src/api.rs).
SELECT p.proname
FROM pg_proc p
WHERE p.pronamespace = 'outbox'::regnamespace AND p.prosecdef AND p.proname <> 'emit'
  AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pg_temp'], false)
ORDER BY 1;

-- Who may do what: PUBLIC and pg_monitor.
SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS arguments,
       has_function_privilege('public', p.oid, 'EXECUTE') AS public_may,
       has_function_privilege('pg_monitor', p.oid, 'EXECUTE') AS pg_monitor_may
FROM pg_proc p
WHERE p.pronamespace = 'outbox'::regnamespace
ORDER BY 1, 2;
SELECT c.relname,
       has_table_privilege('public', c.oid, 'SELECT') AS public_select,
       has_table_privilege('public', c.oid, 'INSERT') AS public_insert,
       has_table_privilege('pg_monitor', c.oid, 'SELECT') AS pg_monitor_select
FROM pg_class c
WHERE c.relnamespace = 'outbox'::regnamespace AND c.relkind IN ('r', 'v')
ORDER BY 1;

-- What pg_dump carries.
SELECT c.relname, x.condition
FROM pg_extension e, unnest(e.extconfig, e.extcondition) x(oid, condition)
JOIN pg_class c ON c.oid = x.oid
WHERE e.extname = 'outbox_pg'
ORDER BY 1;

-- emit() accepts every id type without a cast, headers and a topic, and stores what it was given.
BEGIN;
SELECT outbox.emit('contract.text', 'order-1', '{"n": 1}') IS NOT NULL AS emitted;
SELECT outbox.emit('contract.uuid', '6f1c1b0e-2a4b-4c4e-9a8e-2f1d3c4b5a69'::uuid, '{"n": 2}') IS NOT NULL AS emitted;
SELECT outbox.emit('contract.int', 42, '{"n": 3}') IS NOT NULL AS emitted;
SELECT outbox.emit('contract.bigint', 9007199254740993::bigint, '"text payload"') IS NOT NULL AS emitted;
SELECT outbox.emit('contract.smallint', 7::smallint, 'null') IS NOT NULL AS emitted;
SELECT outbox.emit('contract.headers', 'order-1', '{"n": 4}',
                   headers => '{"tenant": "acme", "trace": "x"}', topic => 'orders') IS NOT NULL AS emitted;
SELECT event_type, aggregate_id, payload, topic, headers,
       xid = pg_current_xact_id() AS this_transaction, message_bytes > 0 AS measured,
       created_at = now() AS transaction_time
FROM outbox.events WHERE event_type LIKE 'contract.%' ORDER BY seq;
ROLLBACK;
SELECT count(*) AS after_rollback FROM outbox.events WHERE event_type LIKE 'contract.%';
