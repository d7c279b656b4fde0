//! Publish only what the database keeps, in order: asynchronous commit and a crash, failover to
//! a synchronous standby, and what a dead event means for the later events of its topic and key.

use std::collections::HashSet;
use std::time::Duration;

use outbox_pg_harness::process::signal;
use outbox_pg_harness::*;

const TIMEOUT: Duration = Duration::from_secs(60);

/// 10 rounds: five single-event transactions committed asynchronously (the WAL writer flushes
/// only every 10 s), read back by a consumer, then `pg_ctl stop -m immediate`: whatever the
/// consumer got must be in the table after the restart. A session holds a lock on the receipts
/// table meanwhile, so the worker publishes but cannot record (and its own commit cannot flush
/// the WAL) before the stop. Without the flush before producing, most of each round's events
/// were phantoms (42 of 50 measured).
#[test]
fn asynchronous_commit_and_an_immediate_stop_publish_no_phantoms() {
    let mock = mock_cluster(&[("t", 1)]);
    let cluster = PgCluster::with_outbox(
        &mock.bootstrap_servers(),
        &[
            ("synchronous_commit", "off"),
            ("wal_writer_delay", "10s"),
            ("wal_writer_flush_after", "0"),
        ],
    );
    let reader = TopicReader::new(&mock.bootstrap_servers(), &["t"]);
    let mut received: Vec<Received> = Vec::new();
    let mut emitted = 0;
    for round in 0..10 {
        // The worker is ready (it read its position) before the receipts table is locked.
        let mut db = cluster.connect();
        let mut state = String::new();
        assert!(
            wait_until(TIMEOUT, || {
                state = db
                    .query_one("SELECT state FROM outbox.status", &[])
                    .unwrap()
                    .get(0);
                state == "idle"
            }),
            "round {round}: the worker is {state:?}, not idle, after a restart; log:\n{}",
            cluster.log()
        );
        // Five transactions, claimed together once publishing resumes.
        db.batch_execute("SELECT outbox.pause()").unwrap();
        for n in 0..5 {
            db.execute(
                "SELECT outbox.emit('t', $1::text, '{}')",
                &[&format!("r{round}-e{n}")],
            )
            .unwrap();
            emitted += 1;
        }
        let mut blocker = cluster.connect();
        blocker
            .batch_execute("BEGIN; LOCK TABLE outbox.batches IN ACCESS EXCLUSIVE MODE")
            .unwrap();
        db.batch_execute("SELECT outbox.resume()").unwrap();
        reader.read_into(&mut received, emitted, TIMEOUT);
        assert_eq!(
            received.len(),
            emitted,
            "round {round} was not published; log:\n{}",
            cluster.log()
        );
        drop(db);
        drop(blocker);
        cluster.pg_ctl_stop("immediate");
        cluster.pg_ctl_start();
    }
    let mut db = cluster.connect();
    let kept: HashSet<String> = column(&mut db, "SELECT id::text FROM outbox.events");
    let phantoms: Vec<&Received> = received
        .iter()
        .filter(|m| !kept.contains(m.header("outbox-id")))
        .collect();
    assert!(
        phantoms.is_empty(),
        "{} of {} published events are not in the table after the crashes",
        phantoms.len(),
        received.len()
    );
    assert_eq!(kept.len(), 50, "every published event survived");
}

/// A primary with a synchronous standby. The standby's WAL receiver is frozen, commits that
/// do not wait for it (synchronous_commit = local) are visible on the primary: the worker must
/// not publish them. The primary dies, the standby is promoted: nothing Kafka has is missing
/// there, and the new primary publishes what it has that was not published.
#[test]
fn failover_to_a_synchronous_standby_publishes_nothing_the_new_primary_lacks() {
    let mock = mock_cluster(&[("t", 1)]);
    let primary = PgCluster::with_outbox(
        &mock.bootstrap_servers(),
        &[("wal_level", "replica"), ("max_wal_senders", "5")],
    );
    let standby = primary.start_standby_as("standby1");
    primary.set("synchronous_standby_names", "standby1");
    let mut db = primary.connect();
    assert!(wait_until(TIMEOUT, || {
        db.query_opt(
            "SELECT 1 FROM pg_stat_replication WHERE application_name = 'standby1' AND sync_state = 'sync'",
            &[],
        )
        .unwrap()
        .is_some()
    }));
    db.batch_execute("SELECT outbox.emit('t', 'before-' || g, '{}') FROM generate_series(1, 20) g")
        .unwrap();
    assert!(wait_until_published(&mut db, TIMEOUT));
    let reader = TopicReader::new(&mock.bootstrap_servers(), &["t"]);
    let mut received = reader.read(20, TIMEOUT);
    assert_eq!(received.len(), 20);

    // The standby stops receiving; commits that do not wait for it go on.
    let walreceiver: i32 = standby
        .connect()
        .query_one("SELECT pid FROM pg_stat_wal_receiver", &[])
        .unwrap()
        .get(0);
    signal(walreceiver, "STOP");
    db.batch_execute(
        "SET synchronous_commit = local;
         SELECT outbox.emit('t', 'local-only-' || g, '{}') FROM generate_series(1, 10) g;",
    )
    .unwrap();
    reader.read_into(&mut received, 21, Duration::from_secs(3));
    assert_eq!(
        received.len(),
        20,
        "nothing the synchronous standby has not confirmed is published"
    );

    // Failover: the primary dies, and so does the frozen receiver with whatever WAL its socket
    // still held, so the standby lacks the local commits.
    drop(db);
    primary.pg_ctl_stop("immediate");
    signal(walreceiver, "KILL");
    assert!(wait_until(TIMEOUT, || std::panic::catch_unwind(
        || standby.connect()
    )
    .is_ok()));
    standby.promote();
    let mut promoted = standby.connect();
    promoted
        .batch_execute("SELECT outbox.emit('t', 'after-failover', '{}')")
        .unwrap();
    assert!(wait_until_published(&mut promoted, TIMEOUT));
    reader.read_all_into(&mut received, Duration::from_secs(1), TIMEOUT);
    let there: HashSet<String> = column(&mut promoted, "SELECT id::text FROM outbox.events");
    let phantoms = received
        .iter()
        .filter(|m| !there.contains(m.header("outbox-id")))
        .count();
    assert_eq!(phantoms, 0, "Kafka holds nothing the new primary lacks");
    let received_ids: HashSet<&str> = received.iter().map(|m| m.header("outbox-id")).collect();
    let lost = there
        .iter()
        .filter(|id| !received_ids.contains(id.as_str()))
        .count();
    assert_eq!(lost, 0, "the new primary publishes what it has");
    assert!(
        there.len() < 31,
        "the standby lacks the commits it never received"
    );
    assert!(received.iter().all(|m| !m.key.starts_with("local-only-")));
    assert_eq!(received.last().unwrap().key, "after-failover");
}

/// The poison: bigger than the producer accepts, so it fails every attempt.
const POISON: &str = "jsonb_build_object('blob', repeat('x', 30000))";

fn dead_event_cluster(
    mock: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    policy: &str,
) -> PgCluster {
    PgCluster::with_outbox(
        &mock.bootstrap_servers(),
        &[
            ("outbox.max_attempts", "2"),
            ("outbox.retry_backoff", "100ms"),
            ("outbox.kafka_config", "message.max.bytes=20000"),
            ("outbox.dead_events", policy),
        ],
    )
}

/// Keys of the messages on `topic`, in partition order.
fn keys_and_n(
    mock: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    topic: &str,
    count: usize,
) -> Vec<(String, i64)> {
    TopicReader::new(&mock.bootstrap_servers(), &[topic])
        .read(count, TIMEOUT)
        .into_iter()
        .map(|m| (m.key.clone(), m.payload_json()["n"].as_i64().unwrap_or(0)))
        .collect()
}

#[test]
fn with_dead_events_skip_the_later_events_of_its_topic_and_key_go_on() {
    let mock = mock_cluster(&[("t", 1)]);
    let cluster = dead_event_cluster(&mock, "skip");
    let mut db = cluster.connect();
    db.batch_execute(&format!(
        "SELECT outbox.emit('t', 'k', {POISON});
         SELECT outbox.emit('t', 'k', jsonb_build_object('n', g)) FROM generate_series(1, 3) g;"
    ))
    .unwrap();
    assert!(wait_until(TIMEOUT, || count_dead(&mut db, "true") == 1));
    assert!(wait_until_published(&mut db, TIMEOUT));
    assert_eq!(
        keys_and_n(&mock, "t", 3),
        [("k".into(), 1), ("k".into(), 2), ("k".into(), 3)],
        "the later events follow the dead one, in order"
    );
}

/// `died_at` is when the event died: after its retries, not when it first failed; a death after
/// `retry_dead()` or `retry(id)` is recorded anew, while `parked_at` keeps the first failure.
#[test]
fn a_dead_events_died_at_is_when_it_last_died() {
    let mock = mock_cluster(&[("t", 1)]);
    let cluster = dead_event_cluster(&mock, "skip");
    let mut db = cluster.connect();
    db.batch_execute(&format!("SELECT outbox.emit('t', 'p', {POISON})"))
        .unwrap();
    assert!(wait_until(TIMEOUT, || count_dead(&mut db, "true") == 1));
    // Two attempts 100 ms apart (outbox.retry_backoff): it died at the second.
    let times = "SELECT p.parked_at::text, d.died_at::text,
                        d.died_at - p.parked_at >= interval '100 ms'
                 FROM outbox.dead_letters d JOIN outbox.parked p ON p.event_id = d.id";
    let row = db.query_one(times, &[]).unwrap();
    let (parked_at, mut died_at): (String, String) = (row.get(0), row.get(1));
    assert!(
        row.get::<_, bool>(2),
        "died_at ({died_at}) is the last attempt's time, not parked_at ({parked_at})"
    );

    for revive in [
        "SELECT outbox.retry_dead()::int",
        "SELECT outbox.retry(id)::int FROM outbox.dead_letters",
    ] {
        let revived: i32 = db.query_one(revive, &[]).unwrap().get(0);
        assert_eq!(revived, 1, "{revive}");
        assert!(
            wait_until(TIMEOUT, || count_dead(
                &mut db,
                &format!("d.died_at - '{died_at}'::timestamptz >= interval '100 ms'")
            ) == 1),
            "after {revive}, it dies again (two attempts later) and that death is recorded"
        );
        let row = db.query_one(times, &[]).unwrap();
        assert_eq!(
            row.get::<_, String>(0),
            parked_at,
            "parked_at keeps the first failure"
        );
        died_at = row.get(1);
    }
}

/// A row that cannot become a message (headers a superuser wrote that are not strings) dies at
/// once; with `hold` it holds the later events of its key claimed with it, like any dead event.
#[test]
fn with_dead_events_hold_an_unreadable_row_holds_its_key() {
    let mock = mock_cluster(&[("t", 1)]);
    let cluster = dead_event_cluster(&mock, "hold");
    let mut db = cluster.connect();
    // One transaction (a multi-statement query): the worker claims all of it together.
    db.batch_execute(
        "INSERT INTO outbox.events (id, event_type, aggregate_id, payload, headers)
         VALUES (gen_random_uuid(), 't', 'k', '{}', '{\"h\": 1}');
         SELECT outbox.emit('t', 'k', jsonb_build_object('n', g)) FROM generate_series(1, 2) g;
         SELECT outbox.emit('t', 'other', jsonb_build_object('n', 1));",
    )
    .unwrap();
    assert!(wait_until(TIMEOUT, || count_dead(
        &mut db,
        "aggregate_id = 'k'"
    ) == 1));
    assert!(wait_until(TIMEOUT, || count_published(
        &mut db,
        "e.aggregate_id = 'other'"
    ) == 1));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        count_published(&mut db, "e.aggregate_id = 'k'"),
        0,
        "the later events of its key wait behind the dead row"
    );
    // Retried (revived: no longer in dead_letters), it cannot become a message either: it dies
    // again and its key stays held.
    let retried: i64 = db
        .query_one("SELECT outbox.retry_dead()", &[])
        .unwrap()
        .get(0);
    assert_eq!(retried, 1);
    assert!(
        wait_until(TIMEOUT, || count_dead(&mut db, "aggregate_id = 'k'") == 1),
        "a retried unreadable row dies again"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        count_published(&mut db, "e.aggregate_id = 'k'"),
        0,
        "after the retry the later events of its key still wait"
    );
    db.batch_execute("SELECT outbox.discard(id) FROM outbox.dead_letters WHERE aggregate_id = 'k'")
        .unwrap();
    assert!(wait_until_published(&mut db, TIMEOUT));
    assert_eq!(
        keys_and_n(&mock, "t", 3),
        [("other".into(), 1), ("k".into(), 1), ("k".into(), 2)],
        "once it is discarded, the key's events follow in order"
    );
}

#[test]
fn with_dead_events_hold_the_topic_and_key_waits_for_retry_or_discard() {
    let mock = mock_cluster(&[("t", 1)]);
    let cluster = dead_event_cluster(&mock, "hold");
    let mut db = cluster.connect();
    db.batch_execute(&format!(
        "SELECT outbox.emit('t', 'discarded', {POISON});
         SELECT outbox.emit('t', 'discarded', jsonb_build_object('n', g)) FROM generate_series(1, 2) g;
         SELECT outbox.emit('t', 'retried', {POISON});
         SELECT outbox.emit('t', 'retried', jsonb_build_object('n', g)) FROM generate_series(1, 2) g;
         SELECT outbox.emit('t', 'other', jsonb_build_object('n', 1));"
    ))
    .unwrap();
    assert!(wait_until(TIMEOUT, || count_dead(&mut db, "true") == 2));
    std::thread::sleep(Duration::from_secs(1));
    let waiting: Vec<String> = column(
        &mut db,
        "SELECT aggregate_id || ' ' || state FROM outbox.pending ORDER BY seq",
    );
    assert_eq!(
        waiting,
        [
            "discarded waiting",
            "discarded waiting",
            "retried waiting",
            "retried waiting"
        ],
        "the dead events hold their topic and key"
    );
    assert_eq!(
        keys_and_n(&mock, "t", 1),
        [("other".into(), 1)],
        "others flow"
    );

    // Give up on one; fix the cause of the other and retry it.
    db.batch_execute(
        "SELECT outbox.discard(id) FROM outbox.dead_letters WHERE aggregate_id = 'discarded'",
    )
    .unwrap();
    assert!(wait_until(TIMEOUT, || count_published(
        &mut db,
        "e.aggregate_id = 'discarded'"
    ) == 2));
    cluster.set("outbox.kafka_config", "");
    assert!(cluster.wait_for_log("Kafka producer reconfigured", TIMEOUT));
    db.batch_execute(
        "SELECT outbox.retry(id) FROM outbox.dead_letters WHERE aggregate_id = 'retried'",
    )
    .unwrap();
    assert!(wait_until_published(&mut db, TIMEOUT));
    let all = TopicReader::new(&mock.bootstrap_servers(), &["t"]).read(6, TIMEOUT);
    let order: Vec<(String, i64, bool)> = all
        .iter()
        .map(|m| {
            let json = m.payload_json();
            (
                m.key.clone(),
                json["n"].as_i64().unwrap_or(0),
                json.get("blob").is_some(),
            )
        })
        .collect();
    assert_eq!(
        order,
        [
            ("other".into(), 1, false),
            ("discarded".into(), 1, false),
            ("discarded".into(), 2, false),
            ("retried".into(), 0, true),
            ("retried".into(), 1, false),
            ("retried".into(), 2, false),
        ],
        "the discarded event never; the retried one first, then the ones it held"
    );
}
