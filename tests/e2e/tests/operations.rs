//! What operators see and do from SQL: wake-at-commit, outbox.status, pause/resume, dead letters
//! and retries, and databases added or removed with a reload.

use std::time::Duration;

use outbox_pg_harness::*;

const TIMEOUT: Duration = Duration::from_secs(60);

fn status(db: &mut postgres::Client) -> postgres::Row {
    db.query_one("SELECT * FROM outbox.status", &[]).unwrap()
}

fn state(db: &mut postgres::Client) -> String {
    status(db).get("state")
}

fn wakeups(db: &mut postgres::Client) -> i64 {
    status(db).get("wakeups")
}

#[test]
fn commits_wake_the_worker_and_rollbacks_do_not() {
    let tansu = Tansu::start();
    tansu.create_topic("t", 1);
    let cluster = PgCluster::publishing_to(&tansu.bootstrap(), &[]);
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION outbox_pg").unwrap();
    assert!(wait_until(TIMEOUT, || state(&mut db) == "idle"));
    // From now on only a wakeup can start a round quickly: polling happens once an hour.
    cluster.set("outbox.poll_interval", "1h");
    std::thread::sleep(Duration::from_millis(500));
    let before = wakeups(&mut db);

    db.batch_execute("BEGIN; SELECT outbox.emit('t', 'a', '{}'); ROLLBACK;")
        .unwrap();
    db.batch_execute("BEGIN; SELECT outbox.emit('t', 'b', '{}'); PREPARE TRANSACTION 'p1';")
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        wakeups(&mut db),
        before,
        "neither a rollback nor a PREPARE wakes the worker"
    );

    db.batch_execute("SELECT outbox.emit('t', 'c', '{}')")
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || count_published(
        &mut db, "true"
    ) == 1));
    assert_eq!(
        wakeups(&mut db),
        before + 1,
        "one wakeup per committing transaction"
    );

    // A burst of commits: all published without any poll.
    let mut sessions: Vec<_> = (0..4).map(|_| cluster.connect()).collect();
    for round in 0..25 {
        for (s, session) in sessions.iter_mut().enumerate() {
            session
                .execute(
                    "SELECT outbox.emit('t', $1::text, '{}')",
                    &[&format!("burst-{s}-{round}")],
                )
                .unwrap();
        }
    }
    assert!(wait_until(Duration::from_secs(10), || count_published(
        &mut db, "true"
    ) == 101));

    // COMMIT PREPARED in another session wakes it too.
    cluster
        .connect()
        .batch_execute("COMMIT PREPARED 'p1'")
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || count_published(
        &mut db, "true"
    ) == 102));
    assert_eq!(count_events(&mut db, "aggregate_id = 'a'"), 0);
}

/// Commits that land while the worker waits for the broker's acknowledgement of a batch: their
/// wake-up must not be lost in that wait (which resets the latch), or the last of them sit until
/// the next poll. Polling is off; the broker takes 200 ms per round trip.
#[test]
fn commits_during_a_batch_in_flight_are_not_left_for_the_poll() {
    let mock = mock_cluster(&[("t", 3)]);
    let cluster = PgCluster::with_outbox(&mock.bootstrap_servers(), &[]);
    let mut db = cluster.connect();
    assert!(wait_until(TIMEOUT, || state(&mut db) == "idle"));
    cluster.set("outbox.poll_interval", "1h");
    std::thread::sleep(Duration::from_millis(500));
    mock.broker_round_trip_time(1, Duration::from_millis(200))
        .unwrap();
    for stream in 0..3 {
        for i in 0..20 {
            db.execute(
                "SELECT outbox.emit('t', $1::text, '{}')",
                &[&format!("{stream}-{i}")],
            )
            .unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        // The last commits came while a batch was in flight; nothing else will come.
        assert!(
            wait_until(Duration::from_secs(5), || count_unreceipted(&mut db) == 0),
            "stream {stream}: {} events left waiting for a poll",
            count_unreceipted(&mut db)
        );
    }
}

/// outbox.status (and the exporter's query, which reads only it) counts the backlog through the
/// worker's position: its cost must not grow with published history, nor with an old snapshot
/// keeping every published row alive. Counted in buffers, by Postgres.
#[test]
fn status_reads_the_backlog_not_the_published_history() {
    let mock = mock_cluster(&[("t", 3)]);
    let cluster = PgCluster::with_outbox(&mock.bootstrap_servers(), &[]);
    let mut db = cluster.connect();
    let mut old = cluster.connect();
    old.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1 FROM outbox.events")
        .unwrap();
    // 100 full batches: the window's last batch fills the budget exactly.
    db.batch_execute("SELECT outbox.emit('t', g % 100, '{}') FROM generate_series(1, 100000) g")
        .unwrap();
    assert!(wait_until_every_row_published(&mut db, TIMEOUT));
    assert!(wait_until(TIMEOUT, || count_pending(&mut db) == 0));
    // The top node's "Buffers: shared hit=H read=R" (what the whole query touched).
    let buffers = |db: &mut postgres::Client| -> i64 {
        let lines: Vec<String> = column(
            db,
            "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) SELECT * FROM outbox.status",
        );
        let top = lines
            .iter()
            .find(|l| l.trim_start().starts_with("Buffers:"))
            .cloned()
            .unwrap_or_default();
        top.split_whitespace()
            .filter_map(|part| {
                let (key, value) = part.split_once('=')?;
                ["hit", "read"]
                    .contains(&key)
                    .then(|| value.parse::<i64>().ok())?
            })
            .sum()
    };
    let read = buffers(&mut db);
    assert!(
        read < 200,
        "outbox.status read {read} buffers over 100,000 published rows"
    );
    old.batch_execute("COMMIT").unwrap();
}

#[test]
fn status_shows_state_backlog_throughput_and_broker_errors() {
    let tansu = Tansu::start();
    tansu.create_topic("t", 1);
    let cluster = PgCluster::publishing_to(&tansu.bootstrap(), &[]);
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION outbox_pg").unwrap();
    assert!(wait_until(TIMEOUT, || state(&mut db) == "idle"));
    let row = status(&mut db);
    assert_eq!(row.get::<_, String>("database"), "postgres");
    assert_eq!(
        row.get::<_, Option<i32>>("worker_pid"),
        cluster.worker_pid("postgres")
    );
    assert_eq!(row.get::<_, i64>("pending"), 0);
    assert_eq!(row.get::<_, i64>("dead"), 0);

    db.batch_execute("SELECT outbox.emit('t', g, '{}') FROM generate_series(1, 300) g")
        .unwrap();
    assert!(wait_until_published(&mut db, TIMEOUT));
    let row = status(&mut db);
    assert_eq!(row.get::<_, i64>("published_last_minute"), 300);
    assert_eq!(row.get::<_, Option<bool>>("broker_connected"), Some(true));
    assert!(row
        .get::<_, Option<std::time::SystemTime>>("last_published_at")
        .is_some());

    // The broker goes away: state, connectivity and the error show it; the backlog grows.
    drop(tansu);
    db.batch_execute("SELECT outbox.emit('t', g, '{}') FROM generate_series(1, 5) g")
        .unwrap();
    assert!(
        wait_until(TIMEOUT, || state(&mut db) == "broker unreachable"),
        "state: {}",
        state(&mut db)
    );
    let row = status(&mut db);
    assert_eq!(row.get::<_, Option<bool>>("broker_connected"), Some(false));
    assert_eq!(row.get::<_, i64>("pending"), 5);
    let last_error = row.get::<_, Option<String>>("last_error").unwrap();
    assert!(
        last_error.contains("Connection refused") || last_error.contains("brokers are down"),
        "{last_error}"
    );
    assert!(row
        .get::<_, Option<std::time::SystemTime>>("last_error_at")
        .is_some());
    let age: String = db
        .query_one("SELECT oldest_pending_age::text FROM outbox.status", &[])
        .unwrap()
        .get(0);
    assert!(age.starts_with("00:00:"), "oldest pending age {age}");

    // Monitoring roles can read it; ordinary roles cannot.
    db.batch_execute("CREATE ROLE monitor LOGIN IN ROLE pg_monitor; CREATE ROLE app LOGIN")
        .unwrap();
    db.batch_execute("SET ROLE monitor; SELECT * FROM outbox.status; RESET ROLE")
        .unwrap();
    let denied = db
        .batch_execute("SET ROLE app; SELECT * FROM outbox.status")
        .unwrap_err();
    assert_eq!(denied.code().unwrap().code(), "42501");
}

#[test]
fn pause_holds_events_across_restarts_until_resume() {
    let tansu = Tansu::start();
    tansu.create_topic("t", 1);
    let cluster = PgCluster::publishing_to(&tansu.bootstrap(), &[]);
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION outbox_pg; SELECT outbox.pause();")
        .unwrap();
    db.batch_execute("SELECT outbox.emit('t', g, '{}') FROM generate_series(1, 10) g")
        .unwrap();
    assert!(wait_until(TIMEOUT, || state(&mut db) == "paused"));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        count_published(&mut db, "true"),
        0,
        "nothing published while paused"
    );

    drop(db);
    cluster.pg_ctl_stop("fast");
    cluster.pg_ctl_start();
    let mut db = cluster.connect();
    assert!(
        wait_until(TIMEOUT, || state(&mut db) == "paused"),
        "still paused after a restart"
    );
    assert_eq!(count_published(&mut db, "true"), 0);

    db.batch_execute("SELECT outbox.resume()").unwrap();
    assert!(wait_until_published(&mut db, TIMEOUT));
    assert_eq!(
        TopicReader::new(&tansu.bootstrap(), &["t"])
            .read(10, TIMEOUT)
            .len(),
        10
    );
}

#[test]
fn dead_events_are_listed_and_can_be_revived() {
    let mock = mock_cluster(&[("t", 1)]);
    let cluster = PgCluster::start(&[
        ("outbox.brokers", &mock.bootstrap_servers()),
        ("outbox.poll_interval", "100ms"),
        ("outbox.retry_backoff", "50ms"),
        ("outbox.max_attempts", "2"),
        ("outbox.kafka_config", "message.max.bytes=20000"),
    ]);
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION outbox_pg").unwrap();
    db.batch_execute(
        "SELECT outbox.emit('big', 'a' || g, jsonb_build_object('blob', repeat('x', 30000)), topic => 't')
         FROM generate_series(1, 3) g",
    )
    .unwrap();
    assert!(wait_until(TIMEOUT, || count_dead(
        &mut db,
        "d.publish_attempts = 2"
    ) == 3));
    let dead: Vec<(String, i32, String)> = db
        .query(
            "SELECT id::text, publish_attempts, error FROM outbox.dead_letters ORDER BY seq",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(dead.len(), 3);
    assert!(dead
        .iter()
        .all(|(_, attempts, error)| *attempts == 2 && error.contains("MessageSizeTooLarge")));
    assert_eq!(status(&mut db).get::<_, i64>("dead"), 3);

    // Fix the cause, then revive one, then the rest.
    cluster.set("outbox.kafka_config", "");
    assert!(cluster.wait_for_log("Kafka producer reconfigured", TIMEOUT));
    let revived: bool = db
        .query_one("SELECT outbox.retry($1::text::uuid)", &[&dead[0].0])
        .unwrap()
        .get(0);
    assert!(revived);
    assert!(wait_until(TIMEOUT, || count_published(&mut db, "true") == 1));
    let revived: i64 = db
        .query_one("SELECT outbox.retry_dead()", &[])
        .unwrap()
        .get(0);
    assert_eq!(revived, 2);
    assert!(wait_until(TIMEOUT, || count_published(&mut db, "true") == 3));
    assert_eq!(
        db.query_one("SELECT count(*) FROM outbox.dead_letters", &[])
            .unwrap()
            .get::<_, i64>(0),
        0
    );

    let missing = db
        .batch_execute("SELECT outbox.retry(gen_random_uuid())")
        .unwrap_err();
    assert_eq!(missing.code().unwrap().code(), "P0002");
    let published = db
        .execute("SELECT outbox.retry($1::text::uuid)", &[&dead[0].0])
        .unwrap_err();
    assert_eq!(published.code().unwrap().code(), "55000");
}

#[test]
fn databases_are_added_and_removed_with_a_reload() {
    let tansu = Tansu::start();
    tansu.create_topic("t", 1);
    let cluster = PgCluster::publishing_to(&tansu.bootstrap(), &[]);
    let mut admin = cluster.connect();
    admin.batch_execute("CREATE DATABASE shop").unwrap();
    admin.batch_execute("CREATE DATABASE billing").unwrap();
    for name in ["shop", "billing"] {
        cluster
            .connect_to(name)
            .batch_execute("CREATE EXTENSION outbox_pg")
            .unwrap();
    }
    let mut shop = cluster.connect_to("shop");
    let mut billing = cluster.connect_to("billing");
    assert_eq!(state(&mut shop), "not configured");

    cluster.set("outbox.database", "postgres, shop, billing");
    assert!(wait_until(TIMEOUT, || cluster.worker_pid("shop").is_some()
        && cluster.worker_pid("billing").is_some()));
    shop.batch_execute("SELECT outbox.emit('t', 'shop', '{}')")
        .unwrap();
    billing
        .batch_execute("SELECT outbox.emit('t', 'billing', '{}')")
        .unwrap();
    assert!(
        wait_until_published(&mut shop, TIMEOUT) && wait_until_published(&mut billing, TIMEOUT)
    );

    cluster.set("outbox.database", "postgres, shop");
    assert!(
        wait_until(TIMEOUT, || cluster.worker_pid("billing").is_none()),
        "billing's worker stops"
    );
    assert!(cluster.wait_for_log("stopped publishing database \"billing\"", TIMEOUT));
    billing
        .batch_execute("SELECT outbox.emit('t', 'billing-2', '{}')")
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        count_pending(&mut billing),
        1,
        "billing is no longer published"
    );
    assert_eq!(state(&mut billing), "not configured");
    shop.batch_execute("SELECT outbox.emit('t', 'shop-2', '{}')")
        .unwrap();
    assert!(wait_until_published(&mut shop, TIMEOUT));
    let keys: Vec<String> = TopicReader::new(&tansu.bootstrap(), &["t"])
        .read(3, TIMEOUT)
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(keys.len(), 3);
    assert!(!keys.contains(&"billing-2".to_string()));
}

#[test]
fn the_postgres_exporter_query_runs_as_a_monitoring_role() {
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../monitoring/postgres_exporter.yaml"
    ))
    .unwrap();
    let query: String = yaml
        .split("query: |")
        .nth(1)
        .and_then(|rest| rest.split("  metrics:").next())
        .expect("a query block")
        .to_string();
    let metrics: Vec<&str> = yaml
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("- ")
                .and_then(|m| m.strip_suffix(':'))
        })
        .collect();
    let cluster = PgCluster::start(&[("outbox.database", "postgres")]);
    let mut db = cluster.connect();
    db.batch_execute("CREATE EXTENSION outbox_pg; CREATE ROLE exporter LOGIN IN ROLE pg_monitor; SET ROLE exporter;")
        .unwrap();
    let row = db.query_one(query.as_str(), &[]).unwrap();
    let columns: Vec<&str> = row.columns().iter().map(|c| c.name()).collect();
    assert_eq!(columns, metrics, "every column is described as a metric");
}

/// emit() writes index entries itself (src/append.rs) and learns the table's indexes once per
/// session; an index built, rebuilt or dropped concurrently while long-lived sessions emit must
/// still end up holding every row (amcheck's heapallindexed verification).
#[test]
fn indexes_built_concurrently_while_sessions_emit_hold_every_row() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let cluster = PgCluster::with_outbox("127.0.0.1:9", &[("outbox.database", "parked")]);
    let stop = Arc::new(AtomicBool::new(false));
    let emitters: Vec<_> = (0..2)
        .map(|session| {
            let mut db = cluster.connect();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let emit = db
                    .prepare("SELECT outbox.emit('t', $1::text, '{}')")
                    .unwrap();
                let mut emitted = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let aggregate = format!("{}{}", ["a", "b"][session], emitted % 7);
                    db.execute(&emit, &[&aggregate]).unwrap();
                    emitted += 1;
                }
                emitted
            })
        })
        .collect();
    let mut db = cluster.connect();
    std::thread::sleep(Duration::from_millis(300));
    for ddl in [
        "CREATE INDEX CONCURRENTLY by_aggregate ON outbox.events (aggregate_id)",
        "CREATE INDEX CONCURRENTLY fresh_a ON outbox.events (seq) WHERE aggregate_id LIKE 'a%'",
        "CREATE UNIQUE INDEX CONCURRENTLY by_id ON outbox.events (id) WHERE xid IS NOT NULL",
        "REINDEX INDEX CONCURRENTLY outbox.events_seq",
        "DROP INDEX CONCURRENTLY outbox.fresh_a",
    ] {
        db.batch_execute(ddl).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let emitted: u64 = emitters.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(emitted > 100, "the sessions emitted while the DDL ran");

    db.batch_execute("CREATE EXTENSION amcheck").unwrap();
    let checked: Vec<String> = column(
        &mut db,
        "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE i.indrelid = 'outbox.events'::regclass AND bt_index_check(c.oid, true) IS NOT NULL
         ORDER BY 1",
    );
    assert_eq!(
        checked,
        [
            "by_aggregate",
            "by_id",
            "events_pkey",
            "events_seq",
            "events_xid"
        ]
    );
    let rows = count_events(&mut db, "true");
    assert_eq!(rows as u64, emitted);
    db.batch_execute("SET enable_seqscan = off; SET enable_bitmapscan = off")
        .unwrap();
    let through_index = count_events(&mut db, "xid IS NOT NULL");
    assert_eq!(through_index, rows);
}
