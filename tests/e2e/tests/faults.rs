//! The fault suite (`make test-faults`): stream events from concurrent sessions, inject a fault,
//! let the backlog drain, and audit with a real consumer. Every scenario must show 0 lost, 0
//! phantoms and 0 per-aggregate order violations; duplicates are counted and reported.
//!
//! Each scenario appends its row to `target/fault-figures.md`; `make test-faults` prints the table.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use outbox_pg_harness::stream::{table_ids, Audit, LiveConsumer, Stream, StreamSpec};
use outbox_pg_harness::*;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const DRAIN: Duration = Duration::from_secs(180);

fn spec(topic: &str, sessions: usize, events_per_session: usize) -> StreamSpec {
    StreamSpec {
        topic: topic.to_string(),
        aggregate_prefix: String::new(),
        sessions,
        aggregates_per_session: 5,
        events_per_session,
        rollback_every: 7,
        pace: Duration::ZERO,
    }
}

fn fault_cluster(brokers: &str, extra: &[(&str, &str)]) -> PgCluster {
    let mut settings = vec![
        ("outbox.retention", "-1"),
        ("outbox.retry_backoff", "200ms"),
        ("outbox.retry_backoff_max", "2s"),
    ];
    settings.extend_from_slice(extra);
    PgCluster::with_outbox(brokers, &settings)
}

/// Waits for the backlog to drain, reads everything back and audits it.
fn audit(
    cluster: &PgCluster,
    consumer: LiveConsumer,
    log: &outbox_pg_harness::stream::StreamLog,
) -> Audit {
    let mut db = cluster.connect();
    assert!(
        wait_until_published(&mut db, DRAIN),
        "backlog did not drain"
    );
    let ids = table_ids(&mut db);
    Audit::check_log(log, &ids);
    let received = consumer.finish(&ids, DRAIN);
    Audit::of(log, &ids, &received)
}

fn report(audit: &Audit, scenario: &str, note: &str) {
    record_figure("fault-figures.md", &audit.row(scenario, note));
    assert_eq!(audit.lost, 0, "{scenario}: lost events");
    assert_eq!(audit.phantoms, 0, "{scenario}: phantom events");
    assert_eq!(audit.order_violations, 0, "{scenario}: order violations");
}

fn kill_9(pid: i32) {
    outbox_pg_harness::process::signal(pid, "KILL");
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

#[test]
fn kill_9_of_the_worker_ten_times_and_of_a_client_backend() {
    let tansu = Tansu::start();
    tansu.create_topic("faults.kill", 3);
    let cluster = fault_cluster(&tansu.bootstrap(), &[]);
    let consumer = LiveConsumer::start(&tansu.bootstrap(), "faults.kill");
    let stream = Stream::start(&cluster, &spec("faults.kill", 4, 12_500));
    let mut worker = wait_for_new_worker(&cluster, 0);
    for kill in 1..=10u64 {
        assert!(wait_until(Duration::from_secs(120), || stream.emitted()
            >= kill * 4_000));
        kill_9(worker);
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
    kill_9(client);
    worker = wait_for_new_worker(&cluster, worker);
    let log = stream.finish();
    let audit = audit(&cluster, consumer, &log);
    assert_eq!(cluster.worker_pid("postgres"), Some(worker));
    assert!(
        cluster
            .log()
            .matches("all server processes terminated; reinitializing")
            .count()
            >= 11
    );
    report(
        &audit,
        "kill -9 worker ×10, client backend ×1",
        "11 crash restarts during a 50,000-event stream",
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
    cluster.pg_ctl_stop("immediate");
    std::thread::sleep(Duration::from_secs(1));
    cluster.pg_ctl_start();
    let log = stream.finish();
    let audit = audit(&cluster, consumer, &log);
    report(
        &audit,
        "immediate shutdown + restart",
        "pg_ctl stop -m immediate after 8,000 events",
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
    let part = |prefix: &str, events| StreamSpec {
        aggregate_prefix: prefix.to_string(),
        ..spec("faults.broker", 4, events)
    };
    let before = Stream::start(&cluster, &part("before-", 2_000)).finish();
    // Tansu keeps messages in memory only: let the consumer read everything acknowledged so far,
    // or the restart would lose them on the broker side.
    assert!(wait_until_published(&mut db, DRAIN));
    let published = table_ids(&mut db);
    assert!(wait_until(DRAIN, || published.is_subset(&consumer.distinct_ids())));
    let mut received = consumer.finish(&published, DRAIN);
    let worker = cluster.worker_pid("postgres").unwrap();

    tansu.stop();
    let down_since = Instant::now();
    let during = Stream::start(&cluster, &part("during-", 2_000)).finish();
    assert!(wait_until(Duration::from_secs(30), || {
        db.query_one("SELECT state FROM outbox.status", &[])
            .unwrap()
            .get::<_, String>(0)
            == "broker unreachable"
    }));
    std::thread::sleep(Duration::from_secs(30).saturating_sub(down_since.elapsed()));
    assert_eq!(count_parked(&mut db, "true"), 0, "an outage fails no event");

    // The restarted broker starts empty: a new consumer reads its log from the beginning.
    let restarted = Tansu::start_on(port);
    restarted.create_topic("faults.broker", 3);
    let consumer = LiveConsumer::start(&restarted.bootstrap(), "faults.broker");
    let after = Stream::start(&cluster, &part("after-", 1_000)).finish();
    let mut log = before;
    for part in [during, after] {
        log.committed.extend(part.committed);
        log.rolled_back.extend(part.rolled_back);
        log.in_doubt.extend(part.in_doubt);
    }
    assert!(
        wait_until_published(&mut db, DRAIN),
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
    assert!(cluster.log().contains("Kafka broker problem"));
    let note = if cluster.log().contains("replacing the Kafka producer") {
        "worker stayed up, 0 failed attempts; the restarted broker had lost its producer ids, so the stalled producer was replaced"
    } else {
        "worker stayed up; 0 failed attempts during the outage"
    };
    report(&audit, "Tansu stopped 30 s mid-stream", note);
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
    mock.broker_down(1).unwrap();
    std::thread::sleep(Duration::from_secs(10));
    mock.broker_up(1).unwrap();

    assert!(wait_until(Duration::from_secs(60), || stream.emitted() >= 6_000));
    // Round trips of 3 s against request timeouts of 1 s: requests time out and are retried.
    mock.broker_round_trip_time(1, Duration::from_secs(3))
        .unwrap();
    std::thread::sleep(Duration::from_secs(10));
    mock.broker_round_trip_time(1, Duration::ZERO).unwrap();

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
    assert!(cluster.log().contains("Kafka broker problem"));
    report(
        &audit,
        "mock broker down 10 s, then 3 s round trips (timeouts 1 s) for 10 s",
        "idempotent producer retries; worker stayed up",
    );
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
        wait_until_published(&mut db, DRAIN),
        "later events flow past the open transaction"
    );
    tx.commit().unwrap();
    let committed_at = std::time::SystemTime::now();
    log.committed.extend(long_ids.iter().cloned());
    let audit = audit(&cluster, consumer, &log);
    let published_after_commit: i64 = db
        .query_one(
            "SELECT count(*) FROM outbox.events e JOIN outbox.deliveries d ON d.event_id = e.id
             WHERE e.aggregate_id = 'long' AND d.published_at >= $1::timestamptz - interval '1 second'",
            &[&committed_at],
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
    // A topic that does not exist, for aggregate "poison", then more events of that aggregate.
    db.batch_execute(
        "SELECT outbox.emit('fault.event', 'poison', '{\"n\": 1}', topic => 'faults.missing');
         SELECT outbox.emit('fault.event', 'poison', '{\"n\": 2}', topic => 'faults.poison');
         SELECT outbox.emit('fault.event', 'poison', '{\"n\": 3}', topic => 'faults.poison');
         SELECT outbox.emit('fault.event', 'big', jsonb_build_object('n', 1, 'blob', repeat('x', 30000)), topic => 'faults.poison');
         SELECT outbox.emit('fault.event', 'big', '{\"n\": 2}', topic => 'faults.poison');",
    )
    .unwrap();
    let log = stream.finish();
    assert!(wait_until(DRAIN, || count_dead(
        &mut db,
        "d.aggregate_id = 'poison' AND d.publish_attempts = 3"
    ) == 1));
    let error: String = db
        .query_one(
            "SELECT error FROM outbox.dead_letters WHERE aggregate_id = 'poison'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(error.contains("does not exist"), "{error}");
    let mut log = log;
    let dead: HashSet<String> = column(&mut db, "SELECT id::text FROM outbox.dead_letters");
    let later: HashSet<String> = column(&mut db, "SELECT id::text FROM outbox.events WHERE aggregate_id IN ('poison', 'big') AND payload->>'blob' IS NULL AND topic = 'faults.poison'");
    log.committed.extend(later);
    // Dead events are kept, not lost: the audit compares against everything else.
    assert!(wait_until_published(&mut db, DRAIN));
    let ids: HashSet<String> = table_ids(&mut db).difference(&dead).cloned().collect();
    let received = consumer.finish(&ids, DRAIN);
    let audit = Audit::of(&log, &ids, &received);
    let poison_published_after_death: i64 = db
        .query_one(
            "SELECT count(*) FROM outbox.events later JOIN outbox.deliveries d ON d.event_id = later.id,
                  outbox.dead_letters dead
             WHERE later.aggregate_id IN ('poison', 'big') AND dead.aggregate_id = later.aggregate_id
               AND d.published_at >= dead.died_at",
            &[],
        )
        .unwrap()
        .get(0);
    // Order is per topic and key: the missing topic's dead event held nothing back in
    // faults.poison; the oversized one held back the later event of its own topic and key.
    assert_eq!(
        poison_published_after_death, 1,
        "the later event of the too-large one's topic and key follows once it is dead"
    );
    report(
        &audit,
        "poison: missing topic, message too large",
        "both dead after 3 attempts; the later event of the same topic and key followed; others flowed",
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
    let conf = cluster.data().join("postgresql.conf");
    let append = |line: &str| {
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(line);
        text.push('\n');
        std::fs::write(&conf, text).unwrap();
        cluster
            .connect()
            .batch_execute("SELECT pg_reload_conf()")
            .unwrap();
    };
    append("outbox.brokers = 'not a broker list'");
    assert!(cluster.wait_for_log(
        "invalid value for parameter \"outbox.brokers\"",
        Duration::from_secs(20)
    ));
    append("outbox.kafka_config = 'no.such.property=1'");
    assert!(cluster.wait_for_log(
        "keeping the previous configuration",
        Duration::from_secs(20)
    ));
    append("outbox.kafka_config = ''");
    append(&format!("outbox.brokers = '127.0.0.1:{}'", free_port()));
    assert!(cluster.wait_for_log("Kafka producer reconfigured", Duration::from_secs(20)));
    assert!(cluster.wait_for_log("Kafka broker problem", Duration::from_secs(30)));
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
    report(
        &audit,
        "config faults: bad brokers, unknown property, unreachable broker",
        "refused/logged; recovered on the next good reload; worker never restarted",
    );
}

#[test]
fn broker_side_errors_are_retried_without_loss() {
    let mock = mock_cluster(&[("faults.errors", 3)]);
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
    while stream.emitted() < 7_000 {
        // Retriable and permanent produce errors, a few at a time.
        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            ],
        );
        injected += 3;
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = stream.finish();
    let audit = audit(&cluster, consumer, &log);
    report(
        &audit,
        "produce errors injected (mock)",
        &format!("{injected} errors: not leader, invalid record, timeout"),
    );
}
