//! The bad-input catalogue: every case gets a clear error with a SQLSTATE, and nothing already in
//! the outbox is lost or changed. The catalogue is written to `target/bad-input.md`.

use std::io::Write;

use outbox_pg_harness::*;

struct Case {
    what: &'static str,
    sql: String,
    sqlstate: &'static str,
    message: &'static str,
}

fn case(
    what: &'static str,
    sql: impl Into<String>,
    sqlstate: &'static str,
    message: &'static str,
) -> Case {
    Case {
        what,
        sql: sql.into(),
        sqlstate,
        message,
    }
}

fn catalogue(published_id: &str) -> Vec<Case> {
    let emit = |args: &str| format!("SELECT outbox.emit({args})");
    let set = |name: &str, value: &str| format!("ALTER SYSTEM SET {name} = '{value}'");
    vec![
        // emit(): NULLs
        case(
            "NULL event_type",
            emit("NULL, 'a', '{}'"),
            "22004",
            "event_type must not be NULL",
        ),
        case(
            "NULL text aggregate_id",
            emit("'t', NULL::text, '{}'"),
            "22004",
            "aggregate_id must not be NULL",
        ),
        case(
            "NULL uuid aggregate_id",
            emit("'t', NULL::uuid, '{}'"),
            "22004",
            "aggregate_id must not be NULL",
        ),
        case(
            "NULL bigint aggregate_id",
            emit("'t', NULL::bigint, '{}'"),
            "22004",
            "aggregate_id must not be NULL",
        ),
        case(
            "NULL payload",
            emit("'t', 'a', NULL"),
            "22004",
            "payload must not be NULL",
        ),
        // emit(): empty strings
        case(
            "empty event_type",
            emit("'', 'a', '{}'"),
            "22023",
            "event_type must not be empty",
        ),
        case(
            "empty aggregate_id",
            emit("'t', '', '{}'"),
            "22023",
            "aggregate_id must not be empty",
        ),
        case(
            "empty topic",
            emit("'t', 'a', '{}', topic => ''"),
            "22023",
            "topic must not be empty",
        ),
        // emit(): topic names Kafka rejects
        case(
            "event type that is no topic name",
            emit("'order created', 'a', '{}'"),
            "22023",
            "\"order created\" is not a valid Kafka topic name",
        ),
        case(
            "topic with a slash",
            emit("'t', 'a', '{}', topic => 'a/b'"),
            "22023",
            "\"a/b\" is not a valid Kafka topic name",
        ),
        case(
            "topic '.'",
            emit("'t', 'a', '{}', topic => '.'"),
            "22023",
            "is not a valid Kafka topic name",
        ),
        case(
            "topic '..'",
            emit("'t', 'a', '{}', topic => '..'"),
            "22023",
            "is not a valid Kafka topic name",
        ),
        case(
            "topic of 250 characters",
            emit(&format!("'t', 'a', '{{}}', topic => '{}'", "t".repeat(250))),
            "22023",
            "at most 249",
        ),
        case(
            "non-ASCII topic",
            emit("'t', 'a', '{}', topic => 'zürich'"),
            "22023",
            "is not a valid Kafka topic name",
        ),
        // emit(): headers
        case(
            "headers array",
            emit("'t', 'a', '{}', '[1, 2]'"),
            "22023",
            "headers must be a JSON object, not an array",
        ),
        case(
            "headers string",
            emit("'t', 'a', '{}', '\"x\"'"),
            "22023",
            "headers must be a JSON object, not a string",
        ),
        case(
            "header number value",
            emit("'t', 'a', '{}', '{\"n\": 1}'"),
            "22023",
            "header \"n\" is a number",
        ),
        case(
            "header null value",
            emit("'t', 'a', '{}', '{\"n\": null}'"),
            "22023",
            "header \"n\" is null",
        ),
        case(
            "header object value",
            emit("'t', 'a', '{}', '{\"o\": {\"x\": \"y\"}}'"),
            "22023",
            "header \"o\" is an object",
        ),
        case(
            "header boolean value",
            emit("'t', 'a', '{}', '{\"b\": true}'"),
            "22023",
            "header \"b\" is a boolean",
        ),
        case(
            "reserved header name",
            emit("'t', 'a', '{}', '{\"outbox-id\": \"x\"}'"),
            "22023",
            "header \"outbox-id\" is set by outbox_pg",
        ),
        case(
            "empty header name",
            emit("'t', 'a', '{}', '{\"\": \"x\"}'"),
            "22023",
            "header name is empty",
        ),
        // emit(): sizes
        case(
            "event_type of 256 bytes",
            emit(&format!("'{}', 'a', '{{}}', topic => 'x'", "e".repeat(256))),
            "22023",
            "event_type is 256 bytes long",
        ),
        case(
            "aggregate_id of 1025 bytes",
            emit(&format!("'t', '{}', '{{}}'", "i".repeat(1025))),
            "22023",
            "aggregate_id is 1025 bytes long",
        ),
        case(
            "payload over outbox.max_message_size",
            emit("'t', 'a', jsonb_build_object('blob', repeat('x', 2000000))"),
            "54000",
            "more than outbox.max_message_size",
        ),
        case(
            "payload just over the limit through escapes",
            emit("'t', 'a', jsonb_build_object('blob', repeat(E'\\\\u0001', 170000))"),
            "54000",
            "more than outbox.max_message_size",
        ),
        case(
            "headers over outbox.max_message_size",
            emit("'t', 'a', '{}', jsonb_build_object('h', repeat('x', 2000000))"),
            "54000",
            "more than outbox.max_message_size",
        ),
        // emit(): wrong types and malformed values
        case(
            "payload that is not JSON",
            emit("'t', 'a', 'not json'"),
            "22P02",
            "invalid input syntax for type json",
        ),
        case(
            "headers that are not JSON",
            emit("'t', 'a', '{}', 'nope'"),
            "22P02",
            "invalid input syntax for type json",
        ),
        case(
            "numeric aggregate_id",
            emit("'t', 1.5, '{}'"),
            "42883",
            "function outbox.emit(unknown, numeric, unknown) does not exist",
        ),
        case(
            "boolean aggregate_id",
            emit("'t', true, '{}'"),
            "42883",
            "does not exist",
        ),
        case(
            "integer payload",
            emit("'t', 'a', 42"),
            "42883",
            "does not exist",
        ),
        case(
            "out-of-range integer id",
            emit("'t', '99999999999999999999'::bigint, '{}'"),
            "22003",
            "out of range",
        ),
        case(
            "malformed uuid id",
            emit("'t', 'not-a-uuid'::uuid, '{}'"),
            "22P02",
            "invalid input syntax for type uuid",
        ),
        case(
            "invalid UTF-8 in event_type",
            emit("E'\\xff', 'a', '{}'"),
            "22021",
            "invalid byte sequence for encoding \"UTF8\"",
        ),
        case(
            "invalid UTF-8 in payload",
            emit("'t', 'a', convert_from('\\x7b22223a22ff227d'::bytea, 'UTF8')::jsonb"),
            "22021",
            "invalid byte sequence",
        ),
        // admin functions
        case(
            "retry(NULL)",
            "SELECT outbox.retry(NULL)",
            "22004",
            "event_id must not be NULL",
        ),
        case(
            "retry of an unknown id",
            "SELECT outbox.retry(gen_random_uuid())",
            "P0002",
            "no event with id",
        ),
        case(
            "retry of a malformed id",
            "SELECT outbox.retry('x')",
            "22P02",
            "invalid input syntax for type uuid",
        ),
        case(
            "retry of a published event",
            format!("SELECT outbox.retry('{published_id}')"),
            "55000",
            "was already published or discarded",
        ),
        case(
            "retry with a wrong type",
            "SELECT outbox.retry(42)",
            "42883",
            "does not exist",
        ),
        case(
            "topic starting with __",
            emit("'t', 'a', '{}', topic => '__consumer_offsets'"),
            "22023",
            "which Kafka reserves for its internal topics",
        ),
        case(
            "event type starting with __ (the default topic)",
            emit("'__transaction_state', 'a', '{}'"),
            "22023",
            "which Kafka reserves for its internal topics",
        ),
        case(
            "header ce_id (CloudEvents)",
            emit("'t', 'a', '{}', '{\"ce_id\": \"spoofed\"}'"),
            "22023",
            "header \"ce_id\" is set by outbox_pg",
        ),
        case(
            "header ce_source (CloudEvents)",
            emit("'t', 'a', '{}', '{\"ce_source\": \"spoofed\"}'"),
            "22023",
            "header \"ce_source\" is set by outbox_pg",
        ),
        case(
            "header Content-Type in another case",
            emit("'t', 'a', '{}', '{\"Content-Type\": \"text/plain\"}'"),
            "22023",
            "header \"Content-Type\" is set by outbox_pg",
        ),
        case(
            "header OUTBOX-ID in another case",
            emit("'t', 'a', '{}', '{\"OUTBOX-ID\": \"x\"}'"),
            "22023",
            "header \"OUTBOX-ID\" is set by outbox_pg",
        ),
        case(
            "discard(NULL)",
            "SELECT outbox.discard(NULL)",
            "22004",
            "event_id must not be NULL",
        ),
        case(
            "discard of an event that is not parked",
            format!("SELECT outbox.discard('{published_id}')"),
            "55000",
            "is not dead or retrying",
        ),
        case(
            "consume_once for a consumer that is not a role",
            "SELECT outbox.consume_once('no such role', gen_random_uuid())",
            "42704",
            "consumer \"no such role\" is not a role",
        ),
        case(
            "consume_once with a NULL consumer",
            "SELECT outbox.consume_once(NULL, gen_random_uuid())",
            "22004",
            "consumer must not be NULL",
        ),
        case(
            "consume_once with a NULL id",
            "SELECT outbox.consume_once('postgres', NULL)",
            "22004",
            "event_id must not be NULL",
        ),
        case(
            "consume_once with an empty consumer",
            "SELECT outbox.consume_once('', gen_random_uuid())",
            "22023",
            "consumer must not be empty",
        ),
        case(
            "purge_inbox with a negative interval",
            "SELECT outbox.purge_inbox('-1 day')",
            "22023",
            "must be a positive interval",
        ),
        case(
            "malformed traceparent",
            "SET outbox.traceparent = '00-abc-01'",
            "22023",
            "invalid value for parameter \"outbox.traceparent\"",
        ),
        case(
            "traceparent with an all-zero trace id",
            "SET outbox.traceparent = '00-00000000000000000000000000000000-00f067aa0ba902b7-01'",
            "22023",
            "invalid value for parameter \"outbox.traceparent\"",
        ),
        // numeric settings out of range
        case(
            "poll_interval 0",
            set("outbox.poll_interval", "0"),
            "22023",
            "outside the valid range",
        ),
        case(
            "poll_interval over 1 h",
            set("outbox.poll_interval", "2h"),
            "22023",
            "outside the valid range",
        ),
        case(
            "batch_size 0",
            set("outbox.batch_size", "0"),
            "22023",
            "outside the valid range",
        ),
        case(
            "batch_size 100001",
            set("outbox.batch_size", "100001"),
            "22023",
            "outside the valid range",
        ),
        case(
            "batch_size not a number",
            set("outbox.batch_size", "ten"),
            "22023",
            "invalid value for parameter \"outbox.batch_size\": \"ten\"",
        ),
        case(
            "max_attempts 0",
            set("outbox.max_attempts", "0"),
            "22023",
            "outside the valid range",
        ),
        case(
            "max_attempts 1001",
            set("outbox.max_attempts", "1001"),
            "22023",
            "outside the valid range",
        ),
        case(
            "retention -2",
            set("outbox.retention", "-2"),
            "22023",
            "outside the valid range",
        ),
        case(
            "retention in bytes",
            set("outbox.retention", "10MB"),
            "22023",
            "invalid value",
        ),
        case(
            "delivery_timeout -1",
            set("outbox.delivery_timeout", "-1"),
            "22023",
            "outside the valid range",
        ),
        case(
            "retry_backoff -1",
            set("outbox.retry_backoff", "-1"),
            "22023",
            "outside the valid range",
        ),
        case(
            "retry_backoff over 1 h",
            set("outbox.retry_backoff", "2h"),
            "22023",
            "outside the valid range",
        ),
        case(
            "retry_backoff_max -1",
            set("outbox.retry_backoff_max", "-1"),
            "22023",
            "outside the valid range",
        ),
        case(
            "max_message_size 100 bytes",
            set("outbox.max_message_size", "100"),
            "22023",
            "outside the valid range",
        ),
        case(
            "max_message_size 1 GB",
            set("outbox.max_message_size", "1GB"),
            "22023",
            "outside the valid range",
        ),
        case(
            "topic_partitions 0",
            set("outbox.topic_partitions", "0"),
            "22023",
            "outside the valid range",
        ),
        case(
            "topic_replication -2",
            set("outbox.topic_replication", "-2"),
            "22023",
            "outside the valid range",
        ),
        case(
            "auto_create_topics not a boolean",
            set("outbox.auto_create_topics", "maybe"),
            "22023",
            "requires a Boolean value",
        ),
        // string settings that do not parse
        case(
            "unknown message_format",
            set("outbox.message_format", "avro"),
            "22023",
            "invalid value for parameter \"outbox.message_format\"",
        ),
        case(
            "empty brokers",
            set("outbox.brokers", ""),
            "22023",
            "invalid value for parameter \"outbox.brokers\"",
        ),
        case(
            "broker port 99999",
            set("outbox.brokers", "kafka:99999"),
            "22023",
            "invalid value for parameter \"outbox.brokers\"",
        ),
        case(
            "empty database list",
            set("outbox.database", ""),
            "22023",
            "invalid value for parameter \"outbox.database\"",
        ),
        case(
            "database listed twice",
            set("outbox.database", "a,a"),
            "22023",
            "invalid value for parameter \"outbox.database\"",
        ),
        case(
            "topic_prefix with a space",
            set("outbox.topic_prefix", "a b"),
            "22023",
            "invalid value for parameter \"outbox.topic_prefix\"",
        ),
        case(
            "kafka_config item without '='",
            set("outbox.kafka_config", "linger.ms"),
            "22023",
            "invalid value for parameter \"outbox.kafka_config\"",
        ),
        case(
            "kafka_config setting the brokers",
            set("outbox.kafka_config", "bootstrap.servers=x:1"),
            "22023",
            "invalid value for parameter \"outbox.kafka_config\"",
        ),
        case(
            "kafka_config loading a plugin",
            set("outbox.kafka_config", "plugin.library.paths=/tmp/evil.so"),
            "22023",
            "property \"plugin.library.paths\" loads code or runs a command",
        ),
        case(
            "kafka_config loading an OpenSSL engine",
            set("outbox.kafka_config", "ssl.engine.location=/tmp/evil.so"),
            "22023",
            "property \"ssl.engine.location\" loads code",
        ),
        case(
            "kafka_config loading OpenSSL providers",
            set("outbox.kafka_config", "ssl.providers=evil"),
            "22023",
            "property \"ssl.providers\" loads code",
        ),
        case(
            "kafka_config running a kinit command",
            set(
                "outbox.kafka_config",
                "sasl.kerberos.kinit.cmd=touch /tmp/x",
            ),
            "22023",
            "property \"sasl.kerberos.kinit.cmd\" loads code or runs a command",
        ),
        case(
            "allowed_topics with a * inside a name",
            set("outbox.allowed_topics", "a*b"),
            "22023",
            "a * is allowed only at the end of a name",
        ),
        case(
            "allowed_topics with an empty entry",
            set("outbox.allowed_topics", "orders,,billing"),
            "22023",
            "the list contains an empty entry",
        ),
        case(
            "dead_events not skip or hold",
            set("outbox.dead_events", "drop"),
            "22023",
            "is not a dead-event policy: use skip or hold",
        ),
        case(
            "direct_insert not auto, on or off",
            set("outbox.direct_insert", "sometimes"),
            "22023",
            "is not valid: use auto, on or off",
        ),
        case(
            "batch_bytes under 64 kB",
            set("outbox.batch_bytes", "1kB"),
            "22023",
            "is outside the valid range",
        ),
        case(
            "topic_prefix starting with __",
            set("outbox.topic_prefix", "__internal."),
            "22023",
            "which Kafka reserves for its internal topics",
        ),
        case(
            "kafka_config bad escape",
            set("outbox.kafka_config", "a=b\\q"),
            "22023",
            "invalid value for parameter \"outbox.kafka_config\"",
        ),
    ]
}

/// Everything in the outbox, as text, to prove a refused call changed nothing.
fn fingerprint(db: &mut postgres::Client) -> String {
    db.query_one(
        "SELECT md5(string_agg(e::text, ',' ORDER BY seq))
                || coalesce((SELECT string_agg(c::text, ',') FROM outbox.control c), 'running')
                || (SELECT count(*) FROM outbox.parked) || (SELECT count(*) FROM outbox.batches)
                || (SELECT count(*) FROM outbox.inbox)
         FROM outbox.events e",
        &[],
    )
    .unwrap()
    .get(0)
}

#[test]
fn every_bad_input_gets_a_clear_error_and_changes_nothing() {
    let tansu = Tansu::start();
    tansu.create_topic("t", 1);
    let cluster = PgCluster::publishing_to(&tansu.bootstrap(), &[]);
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION outbox_pg; SELECT outbox.emit('t', g, '{}') FROM generate_series(1, 20) g;")
        .unwrap();
    assert!(wait_until_published(
        &mut db,
        std::time::Duration::from_secs(60)
    ));
    db.batch_execute(
        "SELECT outbox.pause(); SELECT outbox.emit('t', 'pending', '{\"keep\": true}');",
    )
    .unwrap();
    let published_id: String = db
        .query_one("SELECT event_id::text FROM outbox.deliveries LIMIT 1", &[])
        .unwrap()
        .get(0);
    let before = fingerprint(&mut db);
    let settings_before: String = db
        .query_one("SELECT string_agg(name || '=' || setting, ',' ORDER BY name) FROM pg_settings WHERE name LIKE 'outbox.%'", &[])
        .unwrap()
        .get(0);

    let cases = catalogue(&published_id);
    assert!(cases.len() >= 40, "the catalogue has {} cases", cases.len());
    let mut failures = Vec::new();
    let mut table = String::from("| input | SQLSTATE | error |\n|---|---|---|\n");
    for case in &cases {
        match db.simple_query(&case.sql) {
            Ok(_) => failures.push(format!("{}: accepted", case.what)),
            Err(error) => {
                let db_error = error.as_db_error().expect("a server error");
                let text = format!(
                    "{} {}",
                    db_error.message(),
                    db_error.detail().unwrap_or_default()
                );
                if db_error.code().code() != case.sqlstate || !text.contains(case.message) {
                    failures.push(format!(
                        "{}: expected {} …{}…, got {} {text}",
                        case.what,
                        case.sqlstate,
                        case.message,
                        db_error.code().code()
                    ));
                }
                table.push_str(&format!(
                    "| {} | {} | {} |\n",
                    case.what,
                    db_error.code().code(),
                    db_error
                        .message()
                        .replace('|', "\\|")
                        .chars()
                        .take(140)
                        .collect::<String>()
                ));
            }
        }
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bad-input.md");
    std::fs::File::create(path)
        .unwrap()
        .write_all(table.as_bytes())
        .unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    assert_eq!(
        fingerprint(&mut db),
        before,
        "nothing in the outbox changed"
    );
    let settings_after: String = db
        .query_one("SELECT string_agg(name || '=' || setting, ',' ORDER BY name) FROM pg_settings WHERE name LIKE 'outbox.%'", &[])
        .unwrap()
        .get(0);
    assert_eq!(settings_after, settings_before, "no setting changed");
    // The outbox still works.
    db.batch_execute("SELECT outbox.resume()").unwrap();
    assert!(wait_until_published(
        &mut db,
        std::time::Duration::from_secs(60)
    ));
}
