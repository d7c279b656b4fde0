//! Settings: topic prefix, librdkafka properties, reloads that rebuild the producer, and bad
//! values that are refused without stopping publishing.

use std::time::Duration;

use outbox_pg_harness::*;

const TIMEOUT: Duration = Duration::from_secs(60);

fn show(db: &mut postgres::Client, name: &str) -> String {
    db.query_one(&format!("SHOW {name}"), &[]).unwrap().get(0)
}

#[test]
fn topic_prefix_and_kafka_properties_apply_to_every_message() {
    let tansu = Tansu::start();
    tansu.create_topic("staging.order.created", 1);
    let cluster = PgCluster::start(&[
        ("outbox.brokers", &tansu.bootstrap()),
        ("outbox.topic_prefix", "staging."),
        ("outbox.kafka_config", "linger.ms=0, client.id=outbox-e2e"),
    ]);
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION outbox_pg; SELECT outbox.emit('order.created', 1, '{}');")
        .unwrap();
    assert!(wait_until_published(&mut db, TIMEOUT));
    let received =
        TopicReader::new(&tansu.bootstrap(), &["staging.order.created"]).read(1, TIMEOUT);
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].header("event-type"), "order.created");

    // emit() checks the full name, prefix included.
    let error = db
        .batch_execute(&format!(
            "SELECT outbox.emit('t', 1, '{{}}', topic => '{}')",
            "x".repeat(245)
        ))
        .unwrap_err();
    let message = error.as_db_error().unwrap().message();
    assert!(
        message.contains("is not a valid Kafka topic name"),
        "{message}"
    );
}

#[test]
fn reloads_rebuild_the_producer_and_bad_properties_keep_the_previous_one() {
    let first = Tansu::start();
    first.create_topic("t", 1);
    let cluster = PgCluster::publishing_to(&first.bootstrap(), &[]);
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION outbox_pg; SELECT outbox.emit('t', 1, '{}');")
        .unwrap();
    assert!(wait_until_published(&mut db, TIMEOUT));
    let worker = cluster.worker_pid("postgres").unwrap();

    // An unknown librdkafka property: logged, previous producer kept, publishing goes on.
    cluster.set("outbox.kafka_config", "no.such.property=1");
    assert!(cluster.wait_for_log(
        "invalid Kafka producer configuration, keeping the previous configuration",
        TIMEOUT
    ));
    assert!(cluster
        .log()
        .contains("No such configuration property: \"no.such.property\""));
    db.batch_execute("SELECT outbox.emit('t', 2, '{}')")
        .unwrap();
    assert!(wait_until_published(&mut db, TIMEOUT));
    assert_eq!(
        TopicReader::new(&first.bootstrap(), &["t"])
            .read(2, TIMEOUT)
            .len(),
        2
    );

    // New brokers: the producer is rebuilt and the next events go there.
    let second = Tansu::start();
    second.create_topic("t", 1);
    cluster.set("outbox.kafka_config", "");
    cluster.set("outbox.brokers", &second.bootstrap());
    assert!(cluster.wait_for_log("Kafka producer reconfigured", TIMEOUT));
    db.batch_execute("SELECT outbox.emit('t', 3, '{}')")
        .unwrap();
    assert!(wait_until_published(&mut db, TIMEOUT));
    let on_second = TopicReader::new(&second.bootstrap(), &["t"]).read(1, TIMEOUT);
    assert_eq!(on_second.len(), 1);
    assert_eq!(on_second[0].key, "3");
    assert_eq!(
        cluster.worker_pid("postgres"),
        Some(worker),
        "reloads do not restart the worker"
    );
}

#[test]
fn unparseable_settings_are_refused_at_reload() {
    let tansu = Tansu::start();
    tansu.create_topic("t", 1);
    let cluster = PgCluster::publishing_to(&tansu.bootstrap(), &[]);
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION outbox_pg").unwrap();
    let cases = [
        ("outbox.brokers", "host:notaport", "has an invalid port"),
        (
            "outbox.kafka_config",
            "linger.ms",
            "item 1 is not of the form key=value",
        ),
        (
            "outbox.kafka_config",
            "bootstrap.servers=x:1",
            "set the brokers with outbox.brokers",
        ),
        ("outbox.database", "a,,b", "empty database name"),
        (
            "outbox.topic_prefix",
            "bad prefix",
            "Kafka allows only [a-zA-Z0-9._-]",
        ),
    ];
    for (name, value, detail) in cases {
        let before = show(&mut db, name);
        let error = db
            .batch_execute(&format!("ALTER SYSTEM SET {name} = '{value}'"))
            .unwrap_err();
        let error = error.as_db_error().expect("a server error");
        assert_eq!(error.code().code(), "22023", "{name}");
        assert!(
            error.detail().unwrap_or("").contains(detail),
            "{name}: {:?}",
            error.detail()
        );
        assert_eq!(show(&mut db, name), before, "{name} unchanged");
    }
    // A bad value written straight into postgresql.conf is refused at reload with a log line.
    let conf = cluster.data().join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("outbox.brokers = 'nohost:0'\n");
    std::fs::write(&conf, text).unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    assert!(cluster.wait_for_log("invalid value for parameter \"outbox.brokers\"", TIMEOUT));
    db.batch_execute("SELECT outbox.emit('t', 1, '{}')")
        .unwrap();
    assert!(
        wait_until_published(&mut db, TIMEOUT),
        "publishing continues with the previous value"
    );
}

#[test]
fn kafka_config_is_hidden_from_non_superusers() {
    let cluster = PgCluster::start(&[("outbox.kafka_config", "sasl.password=hunter2")]);
    let mut db = cluster.connect();
    db.batch_execute("CREATE ROLE app LOGIN").unwrap();
    assert_eq!(
        show(&mut db, "outbox.kafka_config"),
        "sasl.password=hunter2"
    );
    db.batch_execute("SET ROLE app").unwrap();
    for sql in [
        "SHOW outbox.kafka_config",
        "SELECT current_setting('outbox.kafka_config')",
        "SELECT setting FROM pg_settings WHERE name = 'outbox.kafka_config'",
        "SELECT string_agg(setting, ',') FROM pg_settings",
        "SELECT pg_catalog.current_setting('outbox.kafka_config', true)",
    ] {
        match db.simple_query(sql) {
            Ok(messages) => {
                for message in messages {
                    if let postgres::SimpleQueryMessage::Row(row) = message {
                        for i in 0..row.len() {
                            assert!(
                                !row.get(i).unwrap_or("").contains("hunter2"),
                                "{sql} revealed the secret"
                            );
                        }
                    }
                }
            }
            Err(error) => assert!(!error.to_string().contains("hunter2"), "{sql}: {error}"),
        }
    }
    // Other settings stay readable.
    assert_eq!(show(&mut db, "outbox.brokers"), "localhost:9092");
}
