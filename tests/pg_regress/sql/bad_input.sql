-- The bad-input catalogue: every refused input with its SQLSTATE and exact message, and proof
-- that nothing in the outbox changed. Run by tests/e2e/tests/bad_input.rs against a cluster
-- that has published events (one of them with the fixed id below) and one pending, paused.
\set SHOW_CONTEXT never
\set published_id '01890000-0000-7000-8000-000000000001'
SELECT md5(string_agg(e::text, ',' ORDER BY seq))
       || coalesce((SELECT string_agg(c::text, ',') FROM outbox.control c), 'running')
       || (SELECT count(*) FROM outbox.parked) || (SELECT count(*) FROM outbox.batches)
       || (SELECT count(*) FROM outbox.inbox) AS outbox_before
FROM outbox.events e \gset
SELECT string_agg(name || '=' || setting, ',' ORDER BY name) AS settings_before
FROM pg_settings WHERE name LIKE 'outbox.%' \gset
-- NULL event_type
SELECT outbox.emit(NULL, 'a', '{}');
\echo :SQLSTATE
-- NULL text aggregate_id
SELECT outbox.emit('t', NULL::text, '{}');
\echo :SQLSTATE
-- NULL uuid aggregate_id
SELECT outbox.emit('t', NULL::uuid, '{}');
\echo :SQLSTATE
-- NULL bigint aggregate_id
SELECT outbox.emit('t', NULL::bigint, '{}');
\echo :SQLSTATE
-- NULL payload
SELECT outbox.emit('t', 'a', NULL);
\echo :SQLSTATE
-- empty event_type
SELECT outbox.emit('', 'a', '{}');
\echo :SQLSTATE
-- empty aggregate_id
SELECT outbox.emit('t', '', '{}');
\echo :SQLSTATE
-- empty topic
SELECT outbox.emit('t', 'a', '{}', topic => '');
\echo :SQLSTATE
-- event type that is no topic name
SELECT outbox.emit('order created', 'a', '{}');
\echo :SQLSTATE
-- topic with a slash
SELECT outbox.emit('t', 'a', '{}', topic => 'a/b');
\echo :SQLSTATE
-- topic '.'
SELECT outbox.emit('t', 'a', '{}', topic => '.');
\echo :SQLSTATE
-- topic '..'
SELECT outbox.emit('t', 'a', '{}', topic => '..');
\echo :SQLSTATE
-- topic of 250 characters
SELECT outbox.emit('t', 'a', '{}', topic => 'tttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttt');
\echo :SQLSTATE
-- non-ASCII topic
SELECT outbox.emit('t', 'a', '{}', topic => 'zürich');
\echo :SQLSTATE
-- headers array
SELECT outbox.emit('t', 'a', '{}', '[1, 2]');
\echo :SQLSTATE
-- headers string
SELECT outbox.emit('t', 'a', '{}', '"x"');
\echo :SQLSTATE
-- header number value
SELECT outbox.emit('t', 'a', '{}', '{"n": 1}');
\echo :SQLSTATE
-- header null value
SELECT outbox.emit('t', 'a', '{}', '{"n": null}');
\echo :SQLSTATE
-- header object value
SELECT outbox.emit('t', 'a', '{}', '{"o": {"x": "y"}}');
\echo :SQLSTATE
-- header boolean value
SELECT outbox.emit('t', 'a', '{}', '{"b": true}');
\echo :SQLSTATE
-- reserved header name
SELECT outbox.emit('t', 'a', '{}', '{"outbox-id": "x"}');
\echo :SQLSTATE
-- empty header name
SELECT outbox.emit('t', 'a', '{}', '{"": "x"}');
\echo :SQLSTATE
-- event_type of 256 bytes
SELECT outbox.emit('eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee', 'a', '{}', topic => 'x');
\echo :SQLSTATE
-- aggregate_id of 1025 bytes
SELECT outbox.emit('t', 'iiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiii', '{}');
\echo :SQLSTATE
-- payload over outbox.max_message_size
SELECT outbox.emit('t', 'a', jsonb_build_object('blob', repeat('x', 2000000)));
\echo :SQLSTATE
-- payload just over the limit through escapes
SELECT outbox.emit('t', 'a', jsonb_build_object('blob', repeat(E'\\u0001', 170000)));
\echo :SQLSTATE
-- headers over outbox.max_message_size
SELECT outbox.emit('t', 'a', '{}', jsonb_build_object('h', repeat('x', 2000000)));
\echo :SQLSTATE
-- payload that is not JSON
SELECT outbox.emit('t', 'a', 'not json');
\echo :SQLSTATE
-- headers that are not JSON
SELECT outbox.emit('t', 'a', '{}', 'nope');
\echo :SQLSTATE
-- numeric aggregate_id
SELECT outbox.emit('t', 1.5, '{}');
\echo :SQLSTATE
-- boolean aggregate_id
SELECT outbox.emit('t', true, '{}');
\echo :SQLSTATE
-- integer payload
SELECT outbox.emit('t', 'a', 42);
\echo :SQLSTATE
-- out-of-range integer id
SELECT outbox.emit('t', '99999999999999999999'::bigint, '{}');
\echo :SQLSTATE
-- malformed uuid id
SELECT outbox.emit('t', 'not-a-uuid'::uuid, '{}');
\echo :SQLSTATE
-- invalid UTF-8 in event_type
SELECT outbox.emit(E'\xff', 'a', '{}');
\echo :SQLSTATE
-- invalid UTF-8 in payload
SELECT outbox.emit('t', 'a', convert_from('\x7b22223a22ff227d'::bytea, 'UTF8')::jsonb);
\echo :SQLSTATE
-- retry(NULL)
SELECT outbox.retry(NULL);
\echo :SQLSTATE
-- retry of an unknown id
SELECT outbox.retry('00000000-0000-4000-8000-00000000dead'::uuid);
\echo :SQLSTATE
-- retry of a malformed id
SELECT outbox.retry('x');
\echo :SQLSTATE
-- retry of a published event
SELECT outbox.retry(:'published_id');
\echo :SQLSTATE
-- retry with a wrong type
SELECT outbox.retry(42);
\echo :SQLSTATE
-- topic starting with __
SELECT outbox.emit('t', 'a', '{}', topic => '__consumer_offsets');
\echo :SQLSTATE
-- event type starting with __ (the default topic)
SELECT outbox.emit('__transaction_state', 'a', '{}');
\echo :SQLSTATE
-- header ce_id (CloudEvents)
SELECT outbox.emit('t', 'a', '{}', '{"ce_id": "spoofed"}');
\echo :SQLSTATE
-- header ce_source (CloudEvents)
SELECT outbox.emit('t', 'a', '{}', '{"ce_source": "spoofed"}');
\echo :SQLSTATE
-- header Content-Type in another case
SELECT outbox.emit('t', 'a', '{}', '{"Content-Type": "text/plain"}');
\echo :SQLSTATE
-- header OUTBOX-ID in another case
SELECT outbox.emit('t', 'a', '{}', '{"OUTBOX-ID": "x"}');
\echo :SQLSTATE
-- discard(NULL)
SELECT outbox.discard(NULL);
\echo :SQLSTATE
-- discard of an event that is not parked
SELECT outbox.discard(:'published_id');
\echo :SQLSTATE
-- consume_once for a consumer that is not a role
SELECT outbox.consume_once('no such role', '00000000-0000-4000-8000-00000000dead'::uuid);
\echo :SQLSTATE
-- consume_once with a NULL consumer
SELECT outbox.consume_once(NULL, '00000000-0000-4000-8000-00000000dead'::uuid);
\echo :SQLSTATE
-- consume_once with a NULL id
SELECT outbox.consume_once('postgres', NULL);
\echo :SQLSTATE
-- consume_once with an empty consumer
SELECT outbox.consume_once('', '00000000-0000-4000-8000-00000000dead'::uuid);
\echo :SQLSTATE
-- purge_inbox with a negative interval
SELECT outbox.purge_inbox('-1 day');
\echo :SQLSTATE
-- malformed traceparent
SET outbox.traceparent = '00-abc-01';
\echo :SQLSTATE
-- traceparent with an all-zero trace id
SET outbox.traceparent = '00-00000000000000000000000000000000-00f067aa0ba902b7-01';
\echo :SQLSTATE
-- poll_interval 0
ALTER SYSTEM SET outbox.poll_interval = '0';
\echo :SQLSTATE
-- poll_interval over 1 h
ALTER SYSTEM SET outbox.poll_interval = '2h';
\echo :SQLSTATE
-- batch_size 0
ALTER SYSTEM SET outbox.batch_size = '0';
\echo :SQLSTATE
-- batch_size 100001
ALTER SYSTEM SET outbox.batch_size = '100001';
\echo :SQLSTATE
-- batch_size not a number
ALTER SYSTEM SET outbox.batch_size = 'ten';
\echo :SQLSTATE
-- max_attempts 0
ALTER SYSTEM SET outbox.max_attempts = '0';
\echo :SQLSTATE
-- max_attempts 1001
ALTER SYSTEM SET outbox.max_attempts = '1001';
\echo :SQLSTATE
-- retention -2
ALTER SYSTEM SET outbox.retention = '-2';
\echo :SQLSTATE
-- retention in bytes
ALTER SYSTEM SET outbox.retention = '10MB';
\echo :SQLSTATE
-- delivery_timeout -1
ALTER SYSTEM SET outbox.delivery_timeout = '-1';
\echo :SQLSTATE
-- retry_backoff -1
ALTER SYSTEM SET outbox.retry_backoff = '-1';
\echo :SQLSTATE
-- retry_backoff over 1 h
ALTER SYSTEM SET outbox.retry_backoff = '2h';
\echo :SQLSTATE
-- retry_backoff_max -1
ALTER SYSTEM SET outbox.retry_backoff_max = '-1';
\echo :SQLSTATE
-- max_message_size 100 bytes
ALTER SYSTEM SET outbox.max_message_size = '100';
\echo :SQLSTATE
-- max_message_size 1 GB
ALTER SYSTEM SET outbox.max_message_size = '1GB';
\echo :SQLSTATE
-- topic_partitions 0
ALTER SYSTEM SET outbox.topic_partitions = '0';
\echo :SQLSTATE
-- topic_replication -2
ALTER SYSTEM SET outbox.topic_replication = '-2';
\echo :SQLSTATE
-- auto_create_topics not a boolean
ALTER SYSTEM SET outbox.auto_create_topics = 'maybe';
\echo :SQLSTATE
-- unknown message_format
ALTER SYSTEM SET outbox.message_format = 'avro';
\echo :SQLSTATE
-- empty brokers
ALTER SYSTEM SET outbox.brokers = '';
\echo :SQLSTATE
-- broker port 99999
ALTER SYSTEM SET outbox.brokers = 'kafka:99999';
\echo :SQLSTATE
-- empty database list
ALTER SYSTEM SET outbox.database = '';
\echo :SQLSTATE
-- database listed twice
ALTER SYSTEM SET outbox.database = 'a,a';
\echo :SQLSTATE
-- topic_prefix with a space
ALTER SYSTEM SET outbox.topic_prefix = 'a b';
\echo :SQLSTATE
-- kafka_config item without '='
ALTER SYSTEM SET outbox.kafka_config = 'linger.ms';
\echo :SQLSTATE
-- kafka_config setting the brokers
ALTER SYSTEM SET outbox.kafka_config = 'bootstrap.servers=x:1';
\echo :SQLSTATE
-- kafka_config loading a plugin
ALTER SYSTEM SET outbox.kafka_config = 'plugin.library.paths=/tmp/evil.so';
\echo :SQLSTATE
-- kafka_config loading an OpenSSL engine
ALTER SYSTEM SET outbox.kafka_config = 'ssl.engine.location=/tmp/evil.so';
\echo :SQLSTATE
-- kafka_config loading OpenSSL providers
ALTER SYSTEM SET outbox.kafka_config = 'ssl.providers=evil';
\echo :SQLSTATE
-- kafka_config running a kinit command
ALTER SYSTEM SET outbox.kafka_config = 'sasl.kerberos.kinit.cmd=touch /tmp/x';
\echo :SQLSTATE
-- allowed_topics with a * inside a name
ALTER SYSTEM SET outbox.allowed_topics = 'a*b';
\echo :SQLSTATE
-- allowed_topics with an empty entry
ALTER SYSTEM SET outbox.allowed_topics = 'orders,,billing';
\echo :SQLSTATE
-- dead_events not skip or hold
ALTER SYSTEM SET outbox.dead_events = 'drop';
\echo :SQLSTATE
-- direct_insert not auto, on or off
ALTER SYSTEM SET outbox.direct_insert = 'sometimes';
\echo :SQLSTATE
-- batch_bytes under 64 kB
ALTER SYSTEM SET outbox.batch_bytes = '1kB';
\echo :SQLSTATE
-- topic_prefix starting with __
ALTER SYSTEM SET outbox.topic_prefix = '__internal.';
\echo :SQLSTATE
-- kafka_config bad escape
ALTER SYSTEM SET outbox.kafka_config = 'a=b\q';
\echo :SQLSTATE
-- Nothing changed.
SELECT md5(string_agg(e::text, ',' ORDER BY seq))
       || coalesce((SELECT string_agg(c::text, ',') FROM outbox.control c), 'running')
       || (SELECT count(*) FROM outbox.parked) || (SELECT count(*) FROM outbox.batches)
       || (SELECT count(*) FROM outbox.inbox) = :'outbox_before' AS outbox_unchanged
FROM outbox.events e;
SELECT string_agg(name || '=' || setting, ',' ORDER BY name) = :'settings_before' AS settings_unchanged
FROM pg_settings WHERE name LIKE 'outbox.%';
