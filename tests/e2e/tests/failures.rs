//! Publish failures against librdkafka's mock cluster: refusals are parked and retried, a poison
//! event dies after `outbox.max_attempts`, other topics and keys keep flowing, and the poison's
//! own topic and key waits behind it.

use std::time::{Duration, Instant};

use outbox_pg_harness::*;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const TIMEOUT: Duration = Duration::from_secs(60);

struct EventState {
    attempts: i32,
    error: Option<String>,
    published: bool,
    dead: bool,
}

fn state(db: &mut postgres::Client, aggregate: &str) -> EventState {
    let row = db
        .query_one(
            "SELECT coalesce(p.attempts, 0), p.error,
                    e.id IN (SELECT d.event_id FROM outbox.deliveries d), coalesce(p.state = 'dead', false)
             FROM outbox.events e LEFT JOIN outbox.parked p ON p.event_id = e.id
             WHERE e.aggregate_id = $1 ORDER BY e.seq LIMIT 1",
            &[&aggregate],
        )
        .unwrap();
    EventState {
        attempts: row.get(0),
        error: row.get(1),
        published: row.get(2),
        dead: row.get(3),
    }
}

#[test]
fn broker_refusals_are_recorded_and_retried() {
    let mock = mock_cluster(&[("orders", 1)]);
    let cluster = PgCluster::start(&[
        ("outbox.brokers", &mock.bootstrap_servers()),
        ("outbox.poll_interval", "100ms"),
        ("outbox.retry_backoff", "1s"),
        ("outbox.max_attempts", "5"),
    ]);
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION outbox_pg").unwrap();
    // The worker's producer is up (it answered a metadata request) before errors are armed.
    db.batch_execute("SELECT outbox.emit('warmup', 'w', '{}', topic => 'orders')")
        .unwrap();
    assert!(wait_until_published(&mut db, TIMEOUT));

    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD,
        ],
    );
    db.batch_execute("SELECT outbox.emit('order.created', 'a', '{\"n\": 1}', topic => 'orders')")
        .unwrap();
    assert!(
        wait_until(TIMEOUT, || state(&mut db, "a").attempts == 1),
        "the refusal is parked"
    );
    let a = state(&mut db, "a");
    assert!(!a.published && !a.dead);
    assert!(
        a.error.as_deref().unwrap_or("").contains("InvalidRecord"),
        "error recorded: {:?}",
        a.error
    );
    assert!(
        wait_until(TIMEOUT, || state(&mut db, "a").published),
        "published on the third attempt"
    );
    let last_error: String = db
        .query_one("SELECT last_error FROM outbox.status", &[])
        .unwrap()
        .get(0);
    assert!(last_error.contains("InvalidRecord"), "{last_error}");
    let received = TopicReader::new(&mock.bootstrap_servers(), &["orders"]).read(2, TIMEOUT);
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].key, "a");
}

#[test]
fn poison_event_dies_after_max_attempts_while_other_aggregates_flow() {
    let mock = mock_cluster(&[("orders", 2)]);
    let cluster = PgCluster::start(&[
        ("outbox.brokers", &mock.bootstrap_servers()),
        ("outbox.poll_interval", "100ms"),
        ("outbox.retry_backoff", "1s"),
        ("outbox.max_attempts", "4"),
        // The producer refuses messages over 20 kB: a deterministic per-event failure.
        ("outbox.kafka_config", "message.max.bytes=20000"),
    ]);
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION outbox_pg").unwrap();
    db.batch_execute(
        "SELECT outbox.emit('order.created', 'poison', jsonb_build_object('blob', repeat('x', 30000)), topic => 'orders');
         SELECT outbox.emit('order.created', 'b' || g, jsonb_build_object('g', g), topic => 'orders')
           FROM generate_series(1, 20) g;
         SELECT outbox.emit('order.updated', 'poison', '{\"after\": true}', topic => 'orders');",
    )
    .unwrap();
    let started = Instant::now();

    // Other aggregates flow at once; the poison's later event waits behind it.
    assert!(wait_until(TIMEOUT, || count_published(
        &mut db,
        "e.aggregate_id LIKE 'b%'"
    ) == 20));
    let poison = state(&mut db, "poison");
    assert!(
        !poison.dead && poison.attempts >= 1,
        "poison still retrying"
    );
    assert!(
        poison
            .error
            .as_deref()
            .unwrap_or("")
            .contains("MessageSizeTooLarge"),
        "{:?}",
        poison.error
    );
    assert_eq!(count_published(&mut db, "e.aggregate_id = 'poison'"), 0);

    // More events while the poison is in backoff: they flow too.
    db.batch_execute("SELECT outbox.emit('order.created', 'c' || g, '{}', topic => 'orders') FROM generate_series(1, 10) g")
        .unwrap();
    assert!(wait_until(TIMEOUT, || count_published(
        &mut db,
        "e.aggregate_id LIKE 'c%'"
    ) == 10));
    assert!(
        !state(&mut db, "poison").dead,
        "others flowed while the poison was still retrying"
    );

    // Retries follow the backoff (1s, 2s, 4s), then the event is dead and skipped.
    assert!(
        wait_until(TIMEOUT, || state(&mut db, "poison").dead),
        "poison dies"
    );
    let dead_after = started.elapsed();
    assert_eq!(state(&mut db, "poison").attempts, 4);
    assert!(
        dead_after >= Duration::from_secs(6),
        "backoff was respected: dead after {dead_after:?}"
    );
    assert!(cluster.wait_for_log("is dead after 4 failed attempts", Duration::from_secs(5)));

    // The dead event no longer holds its aggregate back.
    assert!(wait_until(TIMEOUT, || count_published(
        &mut db,
        "e.aggregate_id = 'poison'"
    ) == 1));
    let received = TopicReader::new(&mock.bootstrap_servers(), &["orders"]).read(31, TIMEOUT);
    assert_eq!(received.len(), 31);
    assert!(
        received.iter().all(|m| !m.payload.contains("xxxx")),
        "the poison never arrives"
    );
    assert_eq!(received.iter().filter(|m| m.key == "poison").count(), 1);
}
