//! The fault suite (`make test-faults`): stream events from concurrent sessions (to aggregates of
//! their own and to aggregates they share, in commit order), inject a fault, let the backlog
//! drain, and audit with a real consumer that reads until the broker has nothing more. Every
//! scenario proves its fault happened, and asserts each figure it reports: 0 lost, 0 phantoms,
//! 0 per-aggregate order violations, and duplicates within the bound it states.
//!
//! Each scenario appends its row to `target/fault-figures.md`; `make test-faults` prints the table.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use outbox_pg_harness::process::signal;
use outbox_pg_harness::stream::{table_ids, Audit, LiveConsumer, Stream, StreamLog, StreamSpec};
use outbox_pg_harness::*;
use rdkafka::types::RDKafkaRespErr;

const DRAIN: Duration = Duration::from_secs(180);
/// outbox.batch_size in every scenario.
const BATCH: usize = 1000;
/// What one resend after a fault can repeat at most: the batches in flight, a batch and the
/// one sent behind it while it flew.
const IN_FLIGHT: usize = 2 * BATCH;

fn spec(topic: &str, sessions: usize, events_per_session: usize) -> StreamSpec {
    StreamSpec {
        topic: topic.to_string(),
        aggregate_prefix: String::new(),
        sessions,
        aggregates_per_session: 5,
        shared_aggregates: 3,
        events_per_session,
        rollback_every: 7,
        pace: Duration::ZERO,
    }
}

fn fault_cluster(brokers: &str, extra: &[(&str, &str)]) -> PgCluster {
    let batch = BATCH.to_string();
    let mut settings = vec![
        ("outbox.retention", "-1"),
        ("outbox.retry_backoff", "200ms"),
        ("outbox.retry_backoff_max", "2s"),
        ("outbox.batch_size", batch.as_str()),
    ];
    settings.extend_from_slice(extra);
    PgCluster::with_outbox(brokers, &settings)
}

/// Waits for every row to have a receipt, reads everything back and audits it against the
/// table (`ignoring`: dead events, which stay in the table unpublished).
fn audit_table(
    cluster: &PgCluster,
    consumer: LiveConsumer,
    log: &StreamLog,
    ignoring: &HashSet<String>,
) -> Audit {
    let mut db = cluster.connect();
    assert!(
        wait_until_every_row_published(&mut db, DRAIN),
        "backlog did not drain"
    );
    let ids: HashSet<String> = table_ids(&mut db).difference(ignoring).cloned().collect();
    Audit::check_rollbacks(log, &ids);
    let received = consumer.finish(&ids, DRAIN);
    Audit::of(log, &ids, &received)
}

/// `audit_table`, after checking that every commit the sessions saw is in the table.
fn audit(cluster: &PgCluster, consumer: LiveConsumer, log: &StreamLog) -> Audit {
    let ids = table_ids(&mut cluster.connect());
    Audit::check_log(log, &ids);
    audit_table(cluster, consumer, log, &HashSet::new())
}

fn report(audit: &Audit, scenario: &str, bound: usize, note: &str) {
    record_figure("fault-figures.md", &audit.row(scenario, bound, note));
    assert_eq!(audit.lost, 0, "{scenario}: lost events");
    assert_eq!(audit.phantoms, 0, "{scenario}: phantom events");
    assert_eq!(
        audit.order_violations, 0,
        "{scenario}: order violations, the first: {:#?}",
        audit.violation_examples
    );
    assert!(
        audit.duplicates <= bound,
        "{scenario}: {} duplicates, more than {bound}",
        audit.duplicates
    );
}

/// Waits until the server accepts connections and a worker (other than `old`) runs.
fn wait_for_new_worker(cluster: &PgCluster, old: i32) -> i32 {
    wait_for(Duration::from_secs(120), || {
        std::panic::catch_unwind(|| cluster.worker_pid("postgres"))
            .ok()
            .flatten()
            .filter(|p| *p != old)
    })
    .expect("worker back after the crash")
}

/// How often the worker replaced its producer after `mark` (each may resend a batch).
fn producer_replacements(cluster: &PgCluster, mark: usize) -> usize {
    let log = cluster.log_after(mark);
    log.matches("Kafka producer replaced").count()
        + log.matches("Kafka producer reconfigured").count()
}

#[test]
fn kill_9_of_the_worker_ten_times_and_of_a_client_backend() {
    let tansu = Tansu::start();
    tansu.create_topic("faults.kill", 3);
    let cluster = fault_cluster(&tansu.bootstrap(), &[]);
    let mark = cluster.log_mark();
    let consumer = LiveConsumer::start(&tansu.bootstrap(), "faults.kill");
    let stream = Stream::start(&cluster, &spec("faults.kill", 4, 12_500));
    let mut worker = wait_for_new_worker(&cluster, 0);
    for kill in 1..=10u64 {
        assert!(wait_until(Duration::from_secs(120), || stream.emitted()
            >= kill * 4_000));
        signal(worker, "KILL");
        worker = wait_for_new_worker(&cluster, worker);
    }
    // A client backend killed with SIGKILL makes the postmaster restart every process too.
    let client = wait_for(Duration::from_secs(30), || {
        cluster
            .connect()
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() LIMIT 1",
                &[],
            )
            .unwrap()
            .map(|r| r.get::<_, i32>(0))
    })
    .unwrap();
    signal(client, "KILL");
    worker = wait_for_new_worker(&cluster, worker);
    let log = stream.finish();
    let audit = audit(&cluster, consumer, &log);
    assert_eq!(cluster.worker_pid("postgres"), Some(worker));
    let restarts = cluster
        .log_after(mark)
        .matches("all server processes terminated; reinitializing")
        .count();
    assert_eq!(restarts, 11, "every kill was a crash restart");
    report(
        &audit,
        "kill -9 worker ×10, client backend ×1",
        restarts * IN_FLIGHT,
        "11 crash restarts during a 50,000-event stream; each may resend the batches in flight",
    );
}

#[test]
fn immediate_shutdown_mid_stream_then_restart() {
    let tansu = Tansu::start();
    tansu.create_topic("faults.shutdown", 3);
    let cluster = fault_cluster(&tansu.bootstrap(), &[]);
    let consumer = LiveConsumer::start(&tansu.bootstrap(), "faults.shutdown");
    let stream = Stream::start(&cluster, &spec("faults.shutdown", 4, 5_000));
    assert!(wait_until(Duration::from_secs(120), || stream.emitted() >= 8_000));
    let mark = cluster.log_mark();
    cluster.pg_ctl_stop("immediate");
    std::thread::sleep(Duration::from_secs(1));
    cluster.pg_ctl_start();
    assert!(
        cluster
            .log_after(mark)
            .contains("automatic recovery in progress"),
        "the restart recovered from a crash"
    );
    let log = stream.finish();
    let audit = audit(&cluster, consumer, &log);
    report(
        &audit,
        "immediate shutdown + restart",
        IN_FLIGHT,
        "pg_ctl stop -m immediate after 8,000 events; crash recovery",
    );
}

/// Asynchronous commit: COMMIT returns before its WAL is flushed, and an immediate stop takes
/// back the commits still in WAL buffers. The worker flushes before it produces, so Kafka never
/// holds an event of a commit the crash took back.
#[test]
fn asynchronous_commit_and_an_immediate_stop_mid_stream() {
    let tansu = Tansu::start();
    tansu.create_topic("faults.async", 3);
    let cluster = fault_cluster(
        &tansu.bootstrap(),
        &[
            ("synchronous_commit", "off"),
            ("wal_writer_delay", "10s"),
            ("wal_writer_flush_after", "1GB"),
            ("wal_buffers", "64MB"),
        ],
    );
    let consumer = LiveConsumer::start(&tansu.bootstrap(), "faults.async");
    let stream = Stream::start(&cluster, &spec("faults.async", 4, 5_000));
    assert!(wait_until(Duration::from_secs(120), || stream.emitted() >= 8_000));
    cluster.pg_ctl_stop("immediate");
    std::thread::sleep(Duration::from_secs(1));
    cluster.pg_ctl_start();
    let log = stream.finish();
    let ids = table_ids(&mut cluster.connect());
    let taken_back = Audit::acknowledged_but_missing(&log, &ids);
    let audit = audit_table(&cluster, consumer, &log, &HashSet::new());
    report(
        &audit,
        "asynchronous commit, immediate shutdown + restart",
        IN_FLIGHT,
        &format!("synchronous_commit = off; the crash took back {taken_back} acknowledged events, none of them published"),
    );
}

/// A primary with a synchronous standby whose sessions commit with `synchronous_commit = local`
/// (not waiting for it); the standby's WAL receiver freezes mid-stream, the primary dies, the
/// standby is promoted. Audited against the new primary: Kafka holds nothing it lacks, and it
/// publishes what it has.
#[test]
fn failover_to_a_synchronous_standby_mid_stream() {
    let tansu = Tansu::start();
    tansu.create_topic("faults.failover", 3);
    let primary = fault_cluster(
        &tansu.bootstrap(),
        &[
            ("wal_level", "replica"),
            ("max_wal_senders", "5"),
            ("synchronous_commit", "local"),
        ],
    );
    let standby = primary.start_standby_as("standby1");
    primary.set("synchronous_standby_names", "standby1");
    let consumer = LiveConsumer::start(&tansu.bootstrap(), "faults.failover");
    let stream = Stream::start(&primary, &spec("faults.failover", 4, 5_000));
    assert!(wait_until(Duration::from_secs(120), || stream.emitted() >= 6_000));
    let walreceiver: i32 = standby
        .connect()
        .query_one("SELECT pid FROM pg_stat_wal_receiver", &[])
        .unwrap()
        .get(0);
    signal(walreceiver, "STOP");
    let frozen_at = stream.emitted();
    assert!(wait_until(Duration::from_secs(120), || stream.emitted()
        >= frozen_at + 2_000));
    primary.pg_ctl_stop("immediate");
    signal(walreceiver, "KILL");
    let log = stream.stop();
    assert!(wait_until(Duration::from_secs(60), || {
        std::panic::catch_unwind(|| standby.connect()).is_ok()
    }));
    standby.promote();
    let ids = table_ids(&mut standby.connect());
    let never_received = Audit::acknowledged_but_missing(&log, &ids);
    assert!(
        never_received > 0,
        "the standby lacks commits it never received"
    );
    let audit = audit_table(&standby, consumer, &log, &HashSet::new());
    report(
        &audit,
        "failover to a synchronous standby (commits with synchronous_commit = local)",
        IN_FLIGHT,
        &format!("walreceiver frozen for 2,000 events, primary stopped immediately, standby promoted; {never_received} acknowledged events it never received, none of them published"),
    );
}

#[test]
fn tansu_broker_stopped_for_30_seconds_mid_stream() {
    let mut tansu = Tansu::start();
    let port = tansu.port;
    tansu.create_topic("faults.broker", 3);
    let cluster = fault_cluster(&tansu.bootstrap(), &[]);
    let mut db = cluster.connect();
    let consumer = LiveConsumer::start(&tansu.bootstrap(), "faults.broker");
    // The same aggregates before, during and after the outage.
    let part = |events| spec("faults.broker", 4, events);
    let before = Stream::start(&cluster, &part(2_000)).finish();
    // Tansu keeps messages in memory only: let the consumer read everything acknowledged so far,
    // or the restart would lose them on the broker side.
    assert!(wait_until_every_row_published(&mut db, DRAIN));
    let published = table_ids(&mut db);
    let mut received = consumer.finish(&published, DRAIN);
    let worker = cluster.worker_pid("postgres").unwrap();

    let mark = cluster.log_mark();
    tansu.stop();
    let down_since = Instant::now();
    let during = Stream::start(&cluster, &part(2_000)).finish();
    assert!(wait_until(Duration::from_secs(30), || {
        db.query_one("SELECT state FROM outbox.status", &[])
            .unwrap()
            .get::<_, String>(0)
            == "broker unreachable"
    }));
    std::thread::sleep(Duration::from_secs(30).saturating_sub(down_since.elapsed()));
    assert_eq!(count_parked(&mut db, "true"), 0, "an outage fails no event");
    assert!(cluster.log_after(mark).contains("Kafka broker problem"));

    // The restarted broker starts empty: a new consumer reads its log from the beginning.
    let restarted = Tansu::start_on(port);
    restarted.create_topic("faults.broker", 3);
    let consumer = LiveConsumer::start(&restarted.bootstrap(), "faults.broker");
    let after = Stream::start(&cluster, &part(1_000)).finish();
    let mut log = before;
    for part in [during, after] {
        log.committed.extend(part.committed);
        log.rolled_back.extend(part.rolled_back);
        log.in_doubt.extend(part.in_doubt);
    }
    assert!(
        wait_until_every_row_published(&mut db, DRAIN),
        "backlog did not drain"
    );
    let ids = table_ids(&mut db);
    Audit::check_log(&log, &ids);
    let rest: HashSet<String> = ids.difference(&published).cloned().collect();
    received.extend(consumer.finish(&rest, DRAIN));
    let audit = Audit::of(&log, &ids, &received);
    assert_eq!(
        cluster.worker_pid("postgres"),
        Some(worker),
        "the worker stayed up"
    );
    let replaced = producer_replacements(&cluster, mark);
    report(
        &audit,
        "Tansu stopped 30 s mid-stream",
        (replaced + 1) * IN_FLIGHT,
        &format!("worker stayed up, 0 failed attempts; the producer was replaced {replaced} time(s) (the restarted broker had lost its producer ids)"),
    );
}

#[test]
fn mock_broker_down_and_round_trips_beyond_the_timeouts() {
    let mock = mock_cluster(&[("faults.mock", 3)]);
    let cluster = fault_cluster(
        &mock.bootstrap_servers(),
        &[(
            "outbox.kafka_config",
            "request.timeout.ms=1000,socket.timeout.ms=1000",
        )],
    );
    let mut db = cluster.connect();
    let consumer = LiveConsumer::start(&mock.bootstrap_servers(), "faults.mock");
    let worker = wait_for_new_worker(&cluster, 0);
    let stream = Stream::start(
        &cluster,
        &StreamSpec {
            pace: Duration::from_millis(5),
            ..spec("faults.mock", 4, 3_000)
        },
    );

    assert!(wait_until(Duration::from_secs(60), || stream.emitted() >= 2_000));
    let mark = cluster.log_mark();
    mock.broker_down(1).unwrap();
    std::thread::sleep(Duration::from_secs(10));
    mock.broker_up(1).unwrap();
    assert!(
        cluster.log_after(mark).contains("Kafka broker problem"),
        "the outage was seen"
    );

    assert!(wait_until(Duration::from_secs(60), || stream.emitted() >= 6_000));
    // Round trips of 3 s against request timeouts of 1 s: requests time out and are retried.
    let slow = cluster.log_mark();
    mock.broker_round_trip_time(1, Duration::from_secs(3))
        .unwrap();
    std::thread::sleep(Duration::from_secs(10));
    mock.broker_round_trip_time(1, Duration::ZERO).unwrap();
    assert!(
        cluster.log_after(slow).to_lowercase().contains("timed out"),
        "requests timed out"
    );

    let log = stream.finish();
    let audit = audit(&cluster, consumer, &log);
    assert_eq!(
        cluster.worker_pid("postgres"),
        Some(worker),
        "the worker stayed up"
    );
    assert_eq!(
        count_parked(&mut db, "true"),
        0,
        "slow or absent brokers fail no event"
    );
    let replaced = producer_replacements(&cluster, mark);
    report(
        &audit,
        "mock broker down 10 s, then 3 s round trips (timeouts 1 s) for 10 s",
        (replaced + 1) * IN_FLIGHT,
        &format!(
            "idempotent producer retries; worker stayed up; producer replaced {replaced} time(s)"
        ),
    );
}

/// A worker stopped while the broker is away records what it had in flight as sends to repeat,
/// each event its own row in outbox.parked; events of the same key that commit afterwards wait
/// behind them. Once the broker is back, the key must still come out in emission order: a
/// released event travels with the events behind it only up to the first one that must be sent
/// on its own.
#[test]
fn a_worker_stopped_while_the_broker_is_away_keeps_each_keys_order() {
    let mock = mock_cluster(&[("faults.stopped", 1)]);
    let cluster = fault_cluster(&mock.bootstrap_servers(), &[]);
    let mut db = cluster.connect();
    fn emit(db: &mut impl postgres::GenericClient, n: i64) -> String {
        db.query_one(
            "SELECT outbox.emit('fault.event', 'k', jsonb_build_object('n', $1::bigint), topic => 'faults.stopped')::text",
            &[&n],
        )
        .unwrap()
        .get(0)
    }
    let mut ids = HashSet::new();
    ids.insert(emit(&mut db, 1));
    assert!(
        wait_until_every_row_published(&mut db, DRAIN),
        "the broker works"
    );
    let worker = wait_for_new_worker(&cluster, 0);
    mock.broker_down(1).unwrap();
    // One transaction: the worker claims its events together and waits for the broker; then
    // it is stopped.
    let mut tx = db.transaction().unwrap();
    for n in 2..=6 {
        ids.insert(emit(&mut tx, n));
    }
    tx.commit().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    db.execute("SELECT pg_terminate_backend($1)", &[&worker])
        .unwrap();
    wait_for_new_worker(&cluster, worker);
    let to_repeat = count_parked(
        &mut db,
        "aggregate_id = 'k' AND attempts = 0 AND state = 'retrying'",
    );
    assert!(
        to_repeat >= 2,
        "the stop left the key's events as sends to repeat ({to_repeat})"
    );
    // More of the key while the broker is still away: they wait behind the parked ones.
    for n in 7..=11 {
        ids.insert(emit(&mut db, n));
    }
    std::thread::sleep(Duration::from_secs(1));
    mock.broker_up(1).unwrap();
    assert!(
        wait_until_every_row_published(&mut db, DRAIN),
        "backlog did not drain"
    );
    let reader = TopicReader::new(&mock.bootstrap_servers(), &["faults.stopped"]);
    let received = reader.read_all(Duration::from_secs(1), DRAIN);
    let first_arrivals: Vec<i64> = {
        let mut seen = HashSet::new();
        received
            .iter()
            .filter(|m| seen.insert(m.header("outbox-id").to_string()))
            .map(|m| m.payload_json()["n"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(
        first_arrivals,
        (1..=11).collect::<Vec<i64>>(),
        "the key's events in emission order, each once at least"
    );
    let received_ids: HashSet<String> = received
        .iter()
        .map(|m| m.header("outbox-id").to_string())
        .collect();
    assert_eq!(received_ids, ids);
}

#[test]
fn long_transaction_that_emitted_early_and_commits_last() {
    let tansu = Tansu::start();
    tansu.create_topic("faults.long", 3);
    let cluster = fault_cluster(&tansu.bootstrap(), &[]);
    let consumer = LiveConsumer::start(&tansu.bootstrap(), "faults.long");
    let mut long = cluster.connect();
    let mut tx = long.transaction().unwrap();
    let mut long_ids = HashSet::new();
    for n in 1..=5i64 {
        let id: String = tx
            .query_one(
                "SELECT outbox.emit('fault.event', 'long', jsonb_build_object('n', $1::bigint), topic => 'faults.long')::text",
                &[&n],
            )
            .unwrap()
            .get(0);
        long_ids.insert(id);
    }
    let mut log = Stream::start(&cluster, &spec("faults.long", 4, 2_000)).finish();
    let mut db = cluster.connect();
    assert!(
        wait_until(DRAIN, || count_unreceipted(&mut db) == 0),
        "later events flow past the open transaction"
    );
    let before_commit = receipts_mark(&mut db);
    tx.commit().unwrap();
    log.committed.extend(long_ids.iter().cloned());
    let audit = audit(&cluster, consumer, &log);
    let published_after_commit: i64 = db
        .query_one(
            "SELECT count(*) FROM outbox.deliveries d JOIN outbox.events e ON e.id = d.event_id
             WHERE e.aggregate_id = 'long' AND d.batch > $1",
            &[&before_commit],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        published_after_commit, 5,
        "the long transaction's events were published after its commit"
    );
    report(
        &audit,
        "long transaction commits last",
        0,
        "5 events emitted first, committed after 8,000 others",
    );
}

#[test]
fn two_phase_commit_publishes_commit_prepared_only() {
    let tansu = Tansu::start();
    tansu.create_topic("faults.2pc", 3);
    let cluster = fault_cluster(&tansu.bootstrap(), &[]);
    let consumer = LiveConsumer::start(&tansu.bootstrap(), "faults.2pc");
    let stream = Stream::start(&cluster, &spec("faults.2pc", 3, 2_000));
    let mut prepared = cluster.connect();
    let mut committed = HashSet::new();
    let mut rolled_back = HashSet::new();
    for i in 0..10i64 {
        let aggregate = format!("2pc-{i}");
        prepared.batch_execute("BEGIN").unwrap();
        let id: String = prepared
            .query_one(
                "SELECT outbox.emit('fault.event', $1::text, jsonb_build_object('n', 1), topic => 'faults.2pc')::text",
                &[&aggregate],
            )
            .unwrap()
            .get(0);
        prepared
            .batch_execute(&format!("PREPARE TRANSACTION 'tx{i}'"))
            .unwrap();
        if i % 2 == 0 {
            committed.insert(id);
        } else {
            rolled_back.insert(id);
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let mut other = cluster.connect();
    for i in 0..10 {
        let verb = if i % 2 == 0 { "COMMIT" } else { "ROLLBACK" };
        other
            .batch_execute(&format!("{verb} PREPARED 'tx{i}'"))
            .unwrap();
    }
    let mut log = stream.finish();
    log.committed.extend(committed.iter().cloned());
    log.rolled_back.extend(rolled_back.iter().cloned());
    let audit = audit(&cluster, consumer, &log);
    report(
        &audit,
        "two-phase commit",
        0,
        "5 COMMIT PREPARED published, 5 ROLLBACK PREPARED never",
    );
}

#[test]
fn poison_events_die_while_other_aggregates_flow() {
    let tansu = Tansu::start();
    tansu.create_topic("faults.poison", 3);
    // Tansu and the mock cluster do not enforce a topic's max.message.bytes, so the size refusal
    // comes from the producer's message.max.bytes, with the same MSG_SIZE_TOO_LARGE a broker sends.
    let cluster = fault_cluster(
        &tansu.bootstrap(),
        &[
            ("outbox.max_attempts", "3"),
            ("outbox.kafka_config", "message.max.bytes=20000"),
        ],
    );
    let mut db = cluster.connect();
    let consumer = LiveConsumer::start(&tansu.bootstrap(), "faults.poison");
    let stream = Stream::start(&cluster, &spec("faults.poison", 4, 2_000));
    // For aggregate "poison": one event to a topic that does not exist, then two to the real
    // one; for "big": one too large, then one that fits, same topic and key.
    let emit = |db: &mut postgres::Client, key: &str, n: i64, topic: &str, blob: usize| -> String {
        db.query_one(
            "SELECT outbox.emit('fault.event', $1::text,
                                jsonb_build_object('n', $2::bigint, 'blob', repeat('x', $4::int)),
                                topic => $3)::text",
            &[&key, &n, &topic, &(blob as i32)],
        )
        .unwrap()
        .get(0)
    };
    let missing_topic = emit(&mut db, "poison", 1, "faults.missing", 0);
    let poison_later = [
        emit(&mut db, "poison", 2, "faults.poison", 0),
        emit(&mut db, "poison", 3, "faults.poison", 0),
    ];
    let too_large = emit(&mut db, "big", 1, "faults.poison", 30_000);
    let big_later = emit(&mut db, "big", 2, "faults.poison", 0);
    let mut log = stream.finish();
    log.committed.extend(poison_later.iter().cloned());
    log.committed.insert(big_later.clone());

    assert!(wait_until(DRAIN, || count_dead(&mut db, "true") == 2));
    let dead: HashSet<String> = column(
        &mut db,
        "SELECT id::text FROM outbox.dead_letters WHERE publish_attempts = 3",
    );
    assert_eq!(
        dead,
        HashSet::from([missing_topic.clone(), too_large.clone()]),
        "exactly the two poison events died, after 3 attempts each"
    );
    let errors: Vec<String> = column(
        &mut db,
        "SELECT error FROM outbox.dead_letters ORDER BY aggregate_id",
    );
    assert!(errors[0].to_lowercase().contains("too large"), "{errors:?}");
    assert!(errors[1].contains("does not exist"), "{errors:?}");
    let audit = audit_table(&cluster, consumer, &log, &dead);
    // The later events of each poison key arrived, in order, and the dead ones never did
    // (the audit's order check covers n = 2 before n = 3).
    assert_eq!(audit.lost, 0);
    report(
        &audit,
        "poison: missing topic, message too large",
        0,
        "exactly those 2 dead after 3 attempts each, never on the broker; their keys' later events followed in order; others flowed",
    );
}

#[test]
fn config_faults_are_logged_and_recovered_without_restarts() {
    let tansu = Tansu::start();
    tansu.create_topic("faults.config", 3);
    let cluster = fault_cluster(&tansu.bootstrap(), &[]);
    let consumer = LiveConsumer::start(&tansu.bootstrap(), "faults.config");
    let worker = wait_for_new_worker(&cluster, 0);
    let stream = Stream::start(
        &cluster,
        &StreamSpec {
            pace: Duration::from_millis(10),
            ..spec("faults.config", 3, 2_000)
        },
    );

    assert!(wait_until(Duration::from_secs(60), || stream.emitted() >= 1_000));
    let start = cluster.log_mark();
    let conf = cluster.data().join("postgresql.conf");
    let append = |line: &str| {
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(line);
        text.push('\n');
        // Whole or not at all: the worker may read the file while the next change is written.
        let staged = conf.with_extension("conf.new");
        std::fs::write(&staged, text).unwrap();
        std::fs::rename(&staged, &conf).unwrap();
        cluster
            .connect()
            .batch_execute("SELECT pg_reload_conf()")
            .unwrap();
    };
    let mark = cluster.log_mark();
    append("outbox.brokers = 'not a broker list'");
    cluster.expect_log_after(
        mark,
        "invalid value for parameter \"outbox.brokers\"",
        Duration::from_secs(20),
    );
    let mark = cluster.log_mark();
    append("outbox.kafka_config = 'no.such.property=1'");
    cluster.expect_log_after(
        mark,
        "keeping the previous configuration",
        Duration::from_secs(20),
    );
    assert!(
        !cluster.log_after(mark).contains("Purged in flight"),
        "a reload the producer refused withdrew the working producer's messages in flight"
    );
    let mark = cluster.log_mark();
    append("outbox.kafka_config = ''");
    append(&format!("outbox.brokers = '127.0.0.1:{}'", free_port()));
    cluster.expect_log_after(mark, "Kafka producer reconfigured", Duration::from_secs(20));
    cluster.expect_log_after(mark, "Kafka broker problem", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(5));
    append(&format!("outbox.brokers = '{}'", tansu.bootstrap()));

    let log = stream.finish();
    let audit = audit(&cluster, consumer, &log);
    assert_eq!(
        cluster.worker_pid("postgres"),
        Some(worker),
        "no restart, no crash loop"
    );
    assert!(!cluster.log().contains("exited with exit code"));
    let rebuilt = producer_replacements(&cluster, start);
    report(
        &audit,
        "config faults: bad brokers, unknown property, unreachable broker",
        rebuilt * IN_FLIGHT,
        &format!("refused/logged; recovered on the next good reload; worker never restarted; producer rebuilt {rebuilt} times"),
    );
}

/// Produce errors the broker returns, retriable and permanent, injected through the mock's own
/// error stack (each consumed by a real produce request: the test checks the stack emptied).
#[test]
fn broker_side_errors_are_retried_without_loss() {
    let mock = CountedMock::new(&[("faults.errors", 3)]);
    let cluster = fault_cluster(&mock.bootstrap_servers(), &[("outbox.max_attempts", "50")]);
    let consumer = LiveConsumer::start(&mock.bootstrap_servers(), "faults.errors");
    let stream = Stream::start(
        &cluster,
        &StreamSpec {
            pace: Duration::from_millis(2),
            ..spec("faults.errors", 4, 2_000)
        },
    );
    let mut injected = 0;
    let mut timeouts = 0;
    while stream.emitted() < 7_000 {
        mock.push_produce_errors(&[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        ]);
        injected += 3;
        timeouts += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = stream.finish();
    let audit = audit(&cluster, consumer, &log);
    assert!(wait_until(Duration::from_secs(30), || mock
        .produce_errors_left()
        == 0));
    report(
        &audit,
        "produce errors injected (mock)",
        timeouts * IN_FLIGHT,
        &format!("{injected} errors hit (not leader, invalid record, timeout); a timed-out request may have been stored, so it may be resent"),
    );
}

/// Permanent errors on produce requests that carry a hot aggregate, mid-batch, repeated: the
/// aggregate's later events must never overtake a failed one, and an event that died must not
/// be on the broker.
#[test]
fn permanent_failures_inside_batches_of_a_hot_aggregate() {
    permanent_failures_inside_batches(0);
}

/// The same with every answer 5 ms late: librdkafka then has requests queued behind the one
/// that is refused (measured: those of the same partition are sent after the refusal, and the
/// mock stores them).
#[test]
fn permanent_failures_inside_batches_with_5_ms_round_trips() {
    permanent_failures_inside_batches(5);
}

fn permanent_failures_inside_batches(round_trip_ms: i32) {
    let mock = CountedMock::new(&[("faults.batch", 3)]);
    mock.set_round_trip_ms(round_trip_ms);
    let cluster = fault_cluster(
        &mock.bootstrap_servers(),
        &[
            ("outbox.max_attempts", "3"),
            ("outbox.retry_backoff", "50ms"),
        ],
    );
    let mut db = cluster.connect();
    let mark = cluster.log_mark();
    let consumer = LiveConsumer::start(&mock.bootstrap_servers(), "faults.batch");
    // One shared aggregate takes half of all transactions: every request carries it.
    let stream = Stream::start(
        &cluster,
        &StreamSpec {
            shared_aggregates: 1,
            pace: Duration::from_millis(1),
            ..spec("faults.batch", 4, 2_500)
        },
    );
    let mut injected = 0;
    while stream.emitted() < 8_000 {
        mock.push_produce_errors(&[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_RECORD_LIST_TOO_LARGE,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
        ]);
        injected += 3;
        std::thread::sleep(Duration::from_millis(300));
    }
    let log = stream.finish();
    assert!(wait_until(Duration::from_secs(30), || mock
        .produce_errors_left()
        == 0));
    assert!(wait_until(DRAIN, || count_unreceipted(&mut db) == 0));
    let dead: HashSet<String> = column(&mut db, "SELECT id::text FROM outbox.dead_letters");
    // Every failed attempt parks its event (the row goes once the event is published).
    std::thread::sleep(Duration::from_secs(2));
    let parked: i64 = db
        .query_one(
            "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relid = 'outbox.parked'::regclass",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(parked > 0, "the broker's refusals failed events");
    let mut audit = audit_table(&cluster, consumer, &log, &dead);
    // The mock checks an idempotent producer's sequence numbers only for transactional
    // producers, so a request librdkafka had queued behind a refused one of the same partition
    // is stored (Kafka refuses it: out of order sequence). The worker sees each such event
    // published before an earlier one of its key and says so; those are set aside here and
    // counted in the note, and any other violation fails the scenario.
    let reported = published_early(&cluster.log_after(mark));
    let stored_out_of_sequence = audit.set_aside_reported(&reported);
    // Dead events are excluded from the audit's table; the broker must not hold them either.
    let mut reader_ids: HashSet<String> = HashSet::new();
    let reader = TopicReader::new(&mock.bootstrap_servers(), &["faults.batch"]);
    for message in reader.read_all(Duration::from_secs(1), DRAIN) {
        reader_ids.insert(message.header("outbox-id").to_string());
    }
    let dead_on_broker = dead.intersection(&reader_ids).count();
    assert_eq!(dead_on_broker, 0, "an event that died is not on the broker");
    // Each refusal stops the producer (gap-less guarantee): what was in flight with it may have
    // been stored and is sent again.
    let replaced = producer_replacements(&cluster, mark);
    report(
        &audit,
        &format!("permanent produce errors inside batches of a hot aggregate (mock{})", if round_trip_ms > 0 { format!(", {round_trip_ms} ms round trips") } else { String::new() }),
        replaced * IN_FLIGHT,
        &format!("{injected} errors hit (invalid record, record list too large, message too large); {parked} events parked, {} died, none of them on the broker; producer replaced {replaced} times; {} events the mock stored out of sequence, reported by the worker and left out of the order check ({stored_out_of_sequence} violations)", dead.len(), reported.len()),
    );
}

/// The events the worker reported as published before an earlier event of their topic and key.
fn published_early(log: &str) -> HashSet<String> {
    let marker = "was published although the earlier event";
    log.lines()
        .filter(|line| line.contains(marker))
        .filter_map(|line| {
            let (_, after) = line.split_once("outbox_pg: event ")?;
            Some(after.split_whitespace().next()?.to_string())
        })
        .collect()
}
