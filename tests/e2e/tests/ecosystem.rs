//! Messages people use directly (trace context, CloudEvents), topics created on demand, the inbox
//! for consumers, secure connections, and upgrading from the previous release.

use std::time::Duration;

use outbox_pg_harness::*;

const TIMEOUT: Duration = Duration::from_secs(60);
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn the_session_trace_context_travels_as_a_traceparent_header() {
    let tansu = Tansu::start();
    tansu.create_topic("t", 1);
    let cluster = PgCluster::with_outbox(&tansu.bootstrap(), &[]);
    let mut db = cluster.connect();
    db.batch_execute(&format!(
        "BEGIN;
         SET LOCAL outbox.traceparent = '{TRACEPARENT}';
         SELECT outbox.emit('t', 'traced', '{{}}');
         SELECT outbox.emit('t', 'traced-with-headers', '{{}}', '{{\"tenant\": \"acme\"}}');
         SELECT outbox.emit('t', 'explicit', '{{}}', '{{\"traceparent\": \"00-11111111111111111111111111111111-2222222222222222-01\"}}');
         COMMIT;
         SELECT outbox.emit('t', 'untraced', '{{}}');"
    ))
    .unwrap();
    let error = db
        .batch_execute("SET outbox.traceparent = 'not-a-trace'")
        .unwrap_err();
    assert_eq!(error.code().unwrap().code(), "22023");
    assert!(wait_until_published(&mut db, TIMEOUT));
    let received = TopicReader::new(&tansu.bootstrap(), &["t"]).read(4, TIMEOUT);
    let header = |key: &str| {
        received
            .iter()
            .find(|m| m.key == key)
            .unwrap()
            .header("traceparent")
            .to_string()
    };
    assert_eq!(header("traced"), TRACEPARENT);
    assert_eq!(header("traced-with-headers"), TRACEPARENT);
    assert_eq!(
        received
            .iter()
            .find(|m| m.key == "traced-with-headers")
            .unwrap()
            .header("tenant"),
        "acme"
    );
    assert_eq!(
        header("explicit"),
        "00-11111111111111111111111111111111-2222222222222222-01",
        "an explicit header wins"
    );
    assert_eq!(
        header("untraced"),
        "",
        "SET LOCAL ended with its transaction"
    );
    let stored: String = db
        .query_one(
            "SELECT headers->>'traceparent' FROM outbox.events WHERE aggregate_id = 'traced'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(stored, TRACEPARENT, "emit() stores it with the event");
}

#[test]
fn cloudevents_binary_mode_adds_the_ce_headers() {
    let tansu = Tansu::start();
    tansu.create_topic("orders", 1);
    let cluster = PgCluster::with_outbox(
        &tansu.bootstrap(),
        &[("outbox.message_format", "cloudevents")],
    );
    let mut db = cluster.connect();
    let id: String = db
        .query_one(
            "SELECT outbox.emit('order.created', 42, '{\"total\": 5}', topic => 'orders')::text",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(wait_until_published(&mut db, TIMEOUT));
    let created: String = db
        .query_one(
            "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM outbox.events",
            &[],
        )
        .unwrap()
        .get(0);
    let message = TopicReader::new(&tansu.bootstrap(), &["orders"])
        .read(1, TIMEOUT)
        .remove(0);
    assert_eq!(message.header("ce_specversion"), "1.0");
    assert_eq!(message.header("ce_id"), id);
    assert_eq!(message.header("ce_type"), "order.created");
    assert_eq!(message.header("ce_source"), "/outbox_pg/postgres");
    assert_eq!(message.header("ce_time"), created);
    assert_eq!(message.header("ce_subject"), "42");
    assert_eq!(message.header("content-type"), "application/json");
    assert_eq!(
        message.payload_json()["total"],
        5,
        "the value is the payload (binary mode)"
    );

    cluster.set("outbox.cloudevents_source", "https://shop.example/orders");
    cluster.set("outbox.message_format", "raw");
    // A reload reaches the worker asynchronously (the postmaster forwards SIGHUP).
    std::thread::sleep(Duration::from_secs(1));
    db.batch_execute("SELECT outbox.emit('order.created', 43, '{}', topic => 'orders')")
        .unwrap();
    assert!(wait_until_published(&mut db, TIMEOUT));
    let raw = TopicReader::new(&tansu.bootstrap(), &["orders"])
        .read(2, TIMEOUT)
        .remove(1);
    assert_eq!(
        raw.header("ce_id"),
        "",
        "raw messages carry no CloudEvents headers"
    );
    let bad = db
        .batch_execute("ALTER SYSTEM SET outbox.message_format = 'avro'")
        .unwrap_err();
    assert_eq!(bad.code().unwrap().code(), "22023");
}

#[test]
fn missing_topics_are_created_when_asked_and_failed_otherwise() {
    let tansu = Tansu::start();
    let cluster = PgCluster::with_outbox(&tansu.bootstrap(), &[("outbox.retry_backoff", "200ms")]);
    let mut db = cluster.connect();
    db.batch_execute("SELECT outbox.emit('new.topic', 1, '{}')")
        .unwrap();
    assert!(wait_until(TIMEOUT, || db
        .query_one("SELECT count(*) FROM outbox.parked WHERE attempts > 0", &[])
        .unwrap()
        .get::<_, i64>(0)
        == 1));
    let error: String = db
        .query_one("SELECT error FROM outbox.pending", &[])
        .unwrap()
        .get(0);
    assert!(
        error.contains("topic \"new.topic\" does not exist"),
        "{error}"
    );

    cluster.set("outbox.topic_partitions", "4");
    cluster.set("outbox.topic_replication", "1");
    cluster.set("outbox.auto_create_topics", "on");
    assert!(
        wait_until_published(&mut db, TIMEOUT),
        "retried and published once the topic was created"
    );
    assert!(cluster
        .log()
        .contains("created topic \"new.topic\" (4 partitions, replication 1)"));
    let received = TopicReader::new(&tansu.bootstrap(), &["new.topic"]).read(1, TIMEOUT);
    assert_eq!(received.len(), 1);
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", tansu.bootstrap())
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some("new.topic"), Duration::from_secs(10))
        .unwrap();
    assert_eq!(metadata.topics()[0].partitions().len(), 4);
}

#[test]
fn consume_once_is_true_the_first_time_and_false_for_duplicates() {
    let cluster = PgCluster::start(&[("outbox.database", "parked")]);
    let mut db = cluster.connect();
    // A consumer is a role; the consumer's login role is a member of it.
    db.batch_execute(
        "CREATE EXTENSION outbox_pg; CREATE TABLE applied (n int); CREATE ROLE consumer_app LOGIN;
         CREATE ROLE billing NOLOGIN; CREATE ROLE shipping NOLOGIN; CREATE ROLE c NOLOGIN;
         GRANT billing TO consumer_app;",
    )
    .unwrap();
    db.batch_execute("GRANT ALL ON applied TO consumer_app")
        .unwrap();
    let id = "01a21964-ced7-779c-9f2c-a8769333d98f";
    let consume = |db: &mut postgres::Client, consumer: &str| -> bool {
        db.query_one(
            "SELECT outbox.consume_once($1, $2::text::uuid)",
            &[&consumer, &id],
        )
        .unwrap()
        .get(0)
    };
    // The usual consumer transaction: apply the message only if it is new.
    let mut app = cluster.connect_as("consumer_app");
    for attempt in 0..3 {
        let mut tx = app.transaction().unwrap();
        let first: bool = tx
            .query_one(
                "SELECT outbox.consume_once('billing', $1::text::uuid)",
                &[&id],
            )
            .unwrap()
            .get(0);
        assert_eq!(first, attempt == 0);
        if first {
            tx.execute("INSERT INTO applied VALUES (1)", &[]).unwrap();
        }
        tx.commit().unwrap();
    }
    assert!(
        consume(&mut db, "shipping"),
        "each consumer has its own memory"
    );

    // A rolled-back consumption does not count; a concurrent one waits for the first.
    let other = "01a21964-ced8-7047-b72d-fc6f1eb260e7";
    let mut first = cluster.connect();
    let mut tx = first.transaction().unwrap();
    let got: bool = tx
        .query_one("SELECT outbox.consume_once('c', $1::text::uuid)", &[&other])
        .unwrap()
        .get(0);
    assert!(got);
    let url = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        cluster.port
    );
    let second = std::thread::spawn(move || {
        let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        db.query_one("SELECT outbox.consume_once('c', $1::text::uuid)", &[&other])
            .unwrap()
            .get::<_, bool>(0)
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !second.is_finished(),
        "the duplicate waits for the first transaction"
    );
    tx.rollback().unwrap();
    assert!(
        second.join().unwrap(),
        "the first rolled back, so the second is first"
    );

    let applied: i64 = db
        .query_one("SELECT count(*) FROM applied", &[])
        .unwrap()
        .get(0);
    assert_eq!(applied, 1);
    for (sql, code) in [
        (
            "SELECT outbox.consume_once(NULL, gen_random_uuid())",
            "22004",
        ),
        ("SELECT outbox.consume_once('c', NULL)", "22004"),
        ("SELECT outbox.consume_once('', gen_random_uuid())", "22023"),
        ("SELECT outbox.purge_inbox('-1 day')", "22023"),
    ] {
        assert_eq!(
            db.batch_execute(sql).unwrap_err().code().unwrap().code(),
            code,
            "{sql}"
        );
    }
    let purged: i64 = db
        .query_one("SELECT outbox.purge_inbox('0 seconds')", &[])
        .unwrap()
        .get(0);
    assert_eq!(purged, 3);
    let denied = app.batch_execute("SELECT * FROM outbox.inbox").unwrap_err();
    assert_eq!(denied.code().unwrap().code(), "42501");
    let not_a_role = db
        .batch_execute("SELECT outbox.consume_once('no-such-role', gen_random_uuid())")
        .unwrap_err();
    assert_eq!(not_a_role.code().unwrap().code(), "42704");
}

#[test]
fn publishes_over_tls_with_a_self_signed_certificate() {
    let tls_port = free_port();
    let tansu = Tansu::start_behind(tls_port);
    tansu.create_topic("secure", 1);
    let proxy = TlsProxy::start(tls_port, tansu.port);
    let ca = proxy.ca.display().to_string();
    let cluster = PgCluster::with_outbox(
        &format!("127.0.0.1:{tls_port}"),
        &[(
            "outbox.kafka_config",
            &format!("security.protocol=ssl,ssl.ca.location={ca}"),
        )],
    );
    // The server process reads the CA file as the postgres user.
    std::process::Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(proxy.ca.parent().unwrap())
        .status()
        .unwrap();
    let mut db = cluster.connect();
    db.batch_execute("SELECT outbox.emit('t', 'tls', '{\"secret\": true}', topic => 'secure')")
        .unwrap();
    assert!(
        wait_until_published(&mut db, TIMEOUT),
        "published through TLS"
    );
    let received = TopicReader::with_config(
        &format!("127.0.0.1:{tls_port}"),
        &["secure"],
        &[("security.protocol", "ssl"), ("ssl.ca.location", &ca)],
    )
    .read(1, TIMEOUT);
    assert_eq!(received[0].key, "tls");

    // Without trusting the certificate, the handshake fails and the error is reported.
    cluster.set("outbox.kafka_config", "security.protocol=ssl");
    assert!(cluster.wait_for_log("Kafka producer reconfigured", TIMEOUT));
    db.batch_execute("SELECT outbox.emit('t', 'untrusted', '{}', topic => 'secure')")
        .unwrap();
    assert!(
        cluster.wait_for_log("certificate verify failed", TIMEOUT),
        "{}",
        cluster.log()
    );
    let state: String = db
        .query_one("SELECT state FROM outbox.status", &[])
        .unwrap()
        .get(0);
    assert_eq!(state, "broker unreachable");
}

#[test]
fn sasl_is_negotiated_with_the_broker() {
    // Tansu 0.6.0 refuses every SASL mechanism unless started with --authentication, and then its
    // own CLI cannot create users; so this shows the SASL handshake reaching the broker and its
    // refusal reported, not a successful login.
    let tansu = Tansu::start();
    let cluster = PgCluster::with_outbox(
        &tansu.bootstrap(),
        &[(
            "outbox.kafka_config",
            "security.protocol=sasl_plaintext,sasl.mechanism=SCRAM-SHA-256,sasl.username=outbox,sasl.password=s3cret",
        )],
    );
    let mut db = cluster.connect();
    db.batch_execute("SELECT outbox.emit('t', 1, '{}')")
        .unwrap();
    assert!(
        cluster.wait_for_log("SASL SCRAM-SHA-256 mechanism handshake failed", TIMEOUT),
        "{}",
        cluster.log()
    );
    assert!(
        !cluster.log().contains("s3cret"),
        "the password is never logged"
    );
    let connected: Option<bool> = db
        .query_one("SELECT broker_connected FROM outbox.status", &[])
        .unwrap()
        .get(0);
    assert_eq!(connected, Some(false));
}

#[test]
fn upgrading_from_0_1_0_publishes_what_was_pending() {
    let tansu = Tansu::start();
    tansu.create_topic("t", 1);
    let cluster = PgCluster::publishing_to(&tansu.bootstrap(), &[]);
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION outbox_pg VERSION '0.1.0'")
        .unwrap();
    // The new library refuses to write into the old schema, clearly.
    let refused = db
        .batch_execute("SELECT outbox.emit('t', 1, '{}')")
        .unwrap_err();
    assert_eq!(refused.code().unwrap().code(), "55000", "{refused}");
    // Rows the 0.1.0 library wrote before the server was upgraded.
    db.batch_execute(
        "INSERT INTO outbox.events (id, event_type, aggregate_id, payload)
         SELECT gen_random_uuid(), 't', g, '{}' FROM generate_series(1, 5) g",
    )
    .unwrap();
    assert!(cluster.wait_for_log(
        "extension version 0.1.0 is installed but the library is 0.3.0",
        TIMEOUT
    ));
    assert_eq!(
        count_events(&mut db, "published_at IS NULL"),
        5,
        "the new library waits for the upgrade"
    );

    db.batch_execute("ALTER EXTENSION outbox_pg UPDATE")
        .unwrap();
    let version: String = db
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'outbox_pg'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(version, "0.3.0");
    assert!(
        wait_until_published(&mut db, TIMEOUT),
        "pending events are published after the upgrade"
    );
    db.batch_execute(
        "SELECT outbox.emit('t', 6, '{}'); SELECT outbox.consume_once('postgres', gen_random_uuid());",
    )
    .unwrap();
    assert!(wait_until_published(&mut db, TIMEOUT));
    assert_eq!(
        TopicReader::new(&tansu.bootstrap(), &["t"])
            .read(6, TIMEOUT)
            .len(),
        6
    );

    // The upgraded schema is the one a fresh install creates.
    cluster
        .connect()
        .batch_execute("CREATE DATABASE fresh")
        .unwrap();
    cluster
        .connect_to("fresh")
        .batch_execute("CREATE EXTENSION outbox_pg")
        .unwrap();
    // pg_dump leaves extension members out, so describe them from the catalogs.
    let describe = |database: &str| -> Vec<String> {
        cluster
            .connect_to(database)
            .query(
                "SELECT 'column ' || table_name || '.' || column_name || ' ' || data_type || ' '
                        || is_nullable || ' ' || coalesce(column_default, '') || ' ' || is_identity
                   FROM information_schema.columns WHERE table_schema = 'outbox'
                 UNION ALL SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = 'outbox'
                 UNION ALL SELECT 'function ' || pg_get_functiondef(p.oid) || ' acl ' || coalesce(p.proacl::text, '')
                   FROM pg_proc p WHERE p.pronamespace = 'outbox'::regnamespace
                 UNION ALL SELECT 'relation ' || c.relname || ' ' || c.relkind::text || ' acl ' || coalesce(c.relacl::text, '')
                        || ' ' || coalesce(pg_get_viewdef(c.oid), '') || ' ' || coalesce(obj_description(c.oid), '')
                   FROM pg_class c WHERE c.relnamespace = 'outbox'::regnamespace
                 UNION ALL SELECT 'constraint ' || conname || ' ' || pg_get_constraintdef(oid)
                   FROM pg_constraint WHERE connamespace = 'outbox'::regnamespace",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let (mut upgraded, mut fresh) = (describe("postgres"), describe("fresh"));
    assert!(upgraded.len() > 40, "the description covers the schema");
    upgraded.sort();
    fresh.sort();
    assert_eq!(upgraded, fresh);
}

#[test]
fn upgrading_from_0_2_0_keeps_events_in_flight_and_publishes_nothing_twice() {
    let tansu = Tansu::start();
    tansu.create_topic("t", 1);
    let cluster = PgCluster::publishing_to(
        &tansu.bootstrap(),
        &[
            ("outbox.retry_backoff", "100ms"),
            ("outbox.max_attempts", "5"),
        ],
    );
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION outbox_pg VERSION '0.2.0'")
        .unwrap();
    // The 0.2.0 library's rows in every state: published, pending, retrying, dead.
    db.batch_execute(
        "INSERT INTO outbox.events (id, event_type, aggregate_id, payload, published_at, kafka_partition, kafka_offset)
         SELECT gen_random_uuid(), 't', 'published-' || g, '{}', now(), 0, g FROM generate_series(1, 2) g;
         INSERT INTO outbox.events (id, event_type, aggregate_id, payload)
         SELECT gen_random_uuid(), 't', 'pending-' || g, '{}' FROM generate_series(1, 3) g;
         INSERT INTO outbox.events (id, event_type, aggregate_id, payload, publish_attempts, next_attempt_at, error)
         VALUES (gen_random_uuid(), 't', 'retrying', '{}', 1, now(), 'InvalidRecord (earlier)');
         INSERT INTO outbox.events (id, event_type, aggregate_id, payload, publish_attempts, error)
         VALUES (gen_random_uuid(), 't', 'dead', '{}', 5, 'MessageSizeTooLarge (earlier)');",
    )
    .unwrap();
    db.batch_execute("ALTER EXTENSION outbox_pg UPDATE")
        .unwrap();

    let history: i64 = db
        .query_one("SELECT count(*) FROM outbox.deliveries", &[])
        .unwrap()
        .get(0);
    assert_eq!(history, 2, "published history keeps its receipts");
    // 0.2.0 did not record when an event died: died_at is NULL, not the time of the upgrade.
    let dead: Vec<(String, i32, String, bool)> = db
        .query(
            "SELECT aggregate_id, publish_attempts, error, died_at IS NULL FROM outbox.dead_letters",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        dead,
        [(
            "dead".to_string(),
            5,
            "MessageSizeTooLarge (earlier)".to_string(),
            true
        )]
    );
    assert!(wait_until_published(&mut db, TIMEOUT));
    let received = TopicReader::new(&tansu.bootstrap(), &["t"]).read(10, Duration::from_secs(10));
    let mut keys: Vec<String> = received.into_iter().map(|m| m.key).collect();
    keys.sort();
    assert_eq!(
        keys,
        ["pending-1", "pending-2", "pending-3", "retrying"],
        "the unpublished events are published once; published ones are not sent again; the dead one stays"
    );
    assert_eq!(count_dead(&mut db, "true"), 1);
}
