//! Finding every committed event. The worker finds work by transaction ids between two
//! snapshots (see src/worker/queue.rs), never by walking published rows; these tests try each
//! way an event could fall between two windows: late commits, subtransactions, two-phase commit
//! across a restart, rows a superuser writes past emit(), a sequence reset, retries and dead
//! letters, worker restarts, and an old snapshot held throughout. Completeness is judged by the
//! receipts and a real consumer, never by the worker's own position (`outbox.pending`).

use std::collections::HashSet;
use std::time::Duration;

use outbox_pg_harness::*;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Every event id of the table, and what the broker holds: each id once at least, and no id
/// the table does not have.
fn assert_broker_has_the_table(cluster: &PgCluster, bootstrap: &str, topics: &[&str]) -> usize {
    let mut db = cluster.connect();
    let table: HashSet<String> = column(
        &mut db,
        "SELECT id::text FROM outbox.events e
         WHERE NOT EXISTS (SELECT 1 FROM outbox.parked p WHERE p.event_id = e.id)",
    );
    let received = TopicReader::new(bootstrap, topics).read_all(Duration::from_secs(2), TIMEOUT);
    let ids: HashSet<String> = received
        .iter()
        .map(|m| m.header("outbox-id").to_string())
        .collect();
    let missing: Vec<&String> = table.difference(&ids).collect();
    let phantoms: Vec<&String> = ids.difference(&table).collect();
    assert!(missing.is_empty(), "never received: {missing:?}");
    assert!(
        phantoms.is_empty(),
        "received, not in the table: {phantoms:?}"
    );
    received.len() - ids.len()
}

#[test]
fn late_commits_and_events_of_subtransactions_are_found() {
    let mock = mock_cluster(&[("t", 3)]);
    let cluster = PgCluster::with_outbox(&mock.bootstrap_servers(), &[]);
    // Running across many windows: one emits at once, one took its xid long before it emits
    // (in a subtransaction), one emits and rolls back.
    let mut early = cluster.connect();
    early
        .batch_execute("BEGIN; SELECT outbox.emit('t', 'late-early', '{}')")
        .unwrap();
    let mut subtransaction = cluster.connect();
    subtransaction
        .batch_execute("BEGIN; SELECT txid_current()")
        .unwrap();
    let mut rolled_back = cluster.connect();
    rolled_back
        .batch_execute("BEGIN; SELECT outbox.emit('t', 'rolled-back', '{}')")
        .unwrap();
    let mut db = cluster.connect();
    for i in 0..20 {
        db.execute(
            "SELECT outbox.emit('t', 'on-time-' || $1::int, '{}')",
            &[&i],
        )
        .unwrap();
        if i == 10 {
            subtransaction
                .batch_execute(
                    "SAVEPOINT s; SELECT outbox.emit('t', 'late-subtransaction', '{}'); RELEASE s;
                     SAVEPOINT gone; SELECT outbox.emit('t', 'rolled-back-savepoint', '{}');
                     ROLLBACK TO gone;",
                )
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(wait_until(TIMEOUT, || count_published(
        &mut db,
        "e.aggregate_id LIKE 'on-time-%'"
    ) == 20));
    assert_eq!(count_published(&mut db, "e.aggregate_id LIKE 'late-%'"), 0);
    early.batch_execute("COMMIT").unwrap();
    db.batch_execute("SELECT outbox.emit('t', 'between', '{}')")
        .unwrap();
    subtransaction.batch_execute("COMMIT").unwrap();
    rolled_back.batch_execute("ROLLBACK").unwrap();
    assert!(wait_until_every_row_published(&mut db, TIMEOUT));
    assert_eq!(count_events(&mut db, "true"), 23);
    assert_eq!(count_published(&mut db, "e.aggregate_id LIKE 'late-%'"), 2);
    assert_broker_has_the_table(&cluster, &mock.bootstrap_servers(), &["t"]);
}

#[test]
fn prepared_transactions_are_found_when_committed_after_a_restart() {
    let mock = mock_cluster(&[("t", 3)]);
    let cluster = PgCluster::with_outbox(&mock.bootstrap_servers(), &[]);
    let mut db = cluster.connect();
    db.batch_execute(
        "BEGIN; SELECT outbox.emit('t', 'prepared-kept', '{}'); PREPARE TRANSACTION 'kept';
         BEGIN; SELECT outbox.emit('t', 'prepared-dropped', '{}'); PREPARE TRANSACTION 'dropped';
         SELECT outbox.emit('t', 'before-restart-' || g, '{}') FROM generate_series(1, 10) g;",
    )
    .unwrap();
    assert!(wait_until(TIMEOUT, || count_published(
        &mut db,
        "e.aggregate_id LIKE 'before-restart-%'"
    ) == 10));
    drop(db);
    cluster.pg_ctl_stop("fast");
    cluster.pg_ctl_start();
    let mut db = cluster.connect();
    db.batch_execute(
        "SELECT outbox.emit('t', 'after-restart-' || g, '{}') FROM generate_series(1, 10) g",
    )
    .unwrap();
    assert!(wait_until(TIMEOUT, || count_published(
        &mut db,
        "e.aggregate_id LIKE 'after-restart-%'"
    ) == 10));
    assert_eq!(
        count_published(&mut db, "e.aggregate_id LIKE 'prepared-%'"),
        0
    );
    db.batch_execute("COMMIT PREPARED 'kept'").unwrap();
    db.batch_execute("ROLLBACK PREPARED 'dropped'").unwrap();
    assert!(wait_until_every_row_published(&mut db, TIMEOUT));
    assert_eq!(
        count_published(&mut db, "e.aggregate_id = 'prepared-kept'"),
        1
    );
    assert_eq!(
        count_events(&mut db, "aggregate_id = 'prepared-dropped'"),
        0
    );
    assert_broker_has_the_table(&cluster, &mock.bootstrap_servers(), &["t"]);
}

/// Rows written past emit() by a superuser (INSERT, COPY, an explicit low seq), and events after
/// the sequence was reset below the published ones.
#[test]
fn rows_written_past_emit_and_after_a_sequence_reset_are_found() {
    let mock = mock_cluster(&[("t", 3)]);
    let cluster = PgCluster::with_outbox(&mock.bootstrap_servers(), &[]);
    let mut db = cluster.connect();
    db.batch_execute("SELECT outbox.emit('t', 'first-' || g, '{}') FROM generate_series(1, 100) g")
        .unwrap();
    assert!(wait_until_every_row_published(&mut db, TIMEOUT));
    db.batch_execute(
        "INSERT INTO outbox.events (id, event_type, aggregate_id, payload)
         VALUES (gen_random_uuid(), 't', 'inserted', '{\"by\": \"hand\"}');
         INSERT INTO outbox.events (id, event_type, aggregate_id, payload, seq)
         OVERRIDING SYSTEM VALUE VALUES (gen_random_uuid(), 't', 'low-seq', '{}', 1);",
    )
    .unwrap();
    {
        use std::io::Write;
        let mut copy = db
            .copy_in("COPY outbox.events (id, event_type, aggregate_id, payload) FROM STDIN")
            .unwrap();
        for i in 0..50 {
            writeln!(copy, "{}\tt\tcopied-{i}\t{{}}", uuid::Uuid::new_v4()).unwrap();
        }
        copy.finish().unwrap();
    }
    db.batch_execute(
        "ALTER SEQUENCE outbox.events_seq_seq RESTART WITH 1;
         SELECT outbox.emit('t', 'after-reset-' || g, '{}') FROM generate_series(1, 10) g;",
    )
    .unwrap();
    assert!(wait_until_every_row_published(&mut db, TIMEOUT));
    assert_eq!(count_events(&mut db, "true"), 162);
    let duplicates = assert_broker_has_the_table(&cluster, &mock.bootstrap_servers(), &["t"]);
    assert_eq!(duplicates, 0);
}

/// Failed events (an unknown topic) are retried and die; revived, they are found again, and
/// the later events of their key went on without them.
#[test]
fn retried_dead_and_revived_events_are_found() {
    let mock = mock_cluster(&[("t", 3)]);
    let cluster = PgCluster::with_outbox(
        &mock.bootstrap_servers(),
        &[
            ("outbox.max_attempts", "2"),
            ("outbox.retry_backoff", "100ms"),
        ],
    );
    let mut db = cluster.connect();
    db.batch_execute(
        "SELECT outbox.emit('t', 'k', '{\"n\": 1}');
         SELECT outbox.emit('missing', 'k', '{\"n\": 2}');
         SELECT outbox.emit('t', 'k', '{\"n\": 3}');",
    )
    .unwrap();
    assert!(wait_until(TIMEOUT, || count_dead(&mut db, "true") == 1));
    assert!(wait_until_every_row_published(&mut db, TIMEOUT));
    mock.create_topic("missing", 1, 1).unwrap();
    let revived: i64 = db
        .query_one("SELECT outbox.retry_dead()", &[])
        .unwrap()
        .get(0);
    assert_eq!(revived, 1);
    let found = wait_until(TIMEOUT, || {
        count_dead(&mut db, "true") == 0 && count_unreceipted(&mut db) == 0
    });
    let states: Vec<String> = column(
        &mut db,
        "SELECT state || ' ' || attempts || ' ' || coalesce(error, '') FROM outbox.parked
         UNION ALL SELECT 'unreceipted ' || e.payload::text FROM outbox.events e
         WHERE NOT EXISTS (SELECT 1 FROM outbox.deliveries d WHERE d.event_id = e.id)",
    );
    assert!(found, "{states:?}");
    assert_broker_has_the_table(&cluster, &mock.bootstrap_servers(), &["t", "missing"]);
}

/// A backlog drained while the worker is terminated three times and a REPEATABLE READ snapshot
/// stays open throughout (pinning every row): everything is found, once per restart at most
/// the batches in flight twice.
#[test]
fn worker_restarts_under_an_old_snapshot_lose_nothing() {
    let mock = mock_cluster(&[("t", 3)]);
    let cluster =
        PgCluster::with_outbox(&mock.bootstrap_servers(), &[("outbox.batch_size", "500")]);
    let mut old = cluster.connect();
    old.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM outbox.events")
        .unwrap();
    let mut db = cluster.connect();
    db.batch_execute("SELECT outbox.pause()").unwrap();
    for _ in 0..5 {
        db.batch_execute(
            "SELECT outbox.emit('t', g % 50, jsonb_build_object('g', g)) FROM generate_series(1, 6000) g",
        )
        .unwrap();
    }
    db.batch_execute("SELECT outbox.resume()").unwrap();
    for _ in 0..3 {
        let worker = wait_for(TIMEOUT, || cluster.worker_pid("postgres")).unwrap();
        std::thread::sleep(Duration::from_millis(150));
        db.execute("SELECT pg_terminate_backend($1)", &[&worker])
            .unwrap();
        wait_for(TIMEOUT, || {
            cluster.worker_pid("postgres").filter(|pid| *pid != worker)
        })
        .expect("restarted");
    }
    assert!(wait_until_every_row_published(
        &mut db,
        Duration::from_secs(120)
    ));
    let duplicates = assert_broker_has_the_table(&cluster, &mock.bootstrap_servers(), &["t"]);
    // Each restart may send again the batches in flight: two of 500.
    assert!(duplicates <= 3 * 2 * 500, "{duplicates} duplicates");
    old.batch_execute("COMMIT").unwrap();
}
