//! Committed events reach Kafka with the documented key, headers and payload; rolled-back ones
//! never do; one aggregate's events keep their emit order; the worker copes with missing
//! brokers, databases and extensions without crash-looping.

use std::collections::HashMap;
use std::time::Duration;

use outbox_pg_harness::*;

const PUBLISH_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn committed_events_arrive_with_key_headers_and_payload() {
    let tansu = Tansu::start();
    tansu.create_topic("order.created", 3);
    tansu.create_topic("orders.custom", 2);
    let cluster = PgCluster::with_outbox(&tansu.bootstrap(), &[]);
    let mut db = cluster.connect();

    db.batch_execute(
        "CREATE TABLE orders (id bigint PRIMARY KEY, ref uuid NOT NULL, total numeric);
         BEGIN;
         INSERT INTO orders SELECT g, gen_random_uuid(), g * 1.5 FROM generate_series(1, 10) g;
         SELECT outbox.emit('order.created', o.id, to_jsonb(o)) FROM orders o;
         SELECT outbox.emit('order.created', o.ref, jsonb_build_object('ref', o.ref),
                            jsonb_build_object('traceparent', '00-abc-01', 'tenant', 't' || o.id))
           FROM orders o WHERE o.id <= 5;
         SELECT outbox.emit('order.created', 'text-' || o.id, '{\"nested\": {\"a\": [1, 2]}}',
                            topic => 'orders.custom')
           FROM orders o WHERE o.id <= 4;
         SELECT outbox.emit('order.created', 7::smallint, 'null');
         SELECT outbox.emit('order.created', 8::integer, '\"just a string\"');
         COMMIT;",
    )
    .unwrap();
    assert!(
        wait_until_published(&mut db, PUBLISH_TIMEOUT),
        "events not published"
    );

    let reader = TopicReader::new(&tansu.bootstrap(), &["order.created", "orders.custom"]);
    let received = reader.read(21, PUBLISH_TIMEOUT);
    assert_eq!(received.len(), 21, "every committed event arrives once");

    let rows = db
        .query(
            "SELECT e.id::text, e.event_type, e.aggregate_id, e.payload::text,
                    coalesce(e.headers, '{}')::text, coalesce(e.topic, e.event_type),
                    to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                    d.published_at IS NOT NULL, d.kafka_partition, d.kafka_offset
             FROM outbox.events e LEFT JOIN outbox.deliveries d ON d.event_id = e.id",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 21);
    let by_id: HashMap<String, &Received> = received
        .iter()
        .map(|m| (m.header("outbox-id").to_string(), m))
        .collect();
    for row in &rows {
        let id: String = row.get(0);
        let message = by_id
            .get(&id)
            .unwrap_or_else(|| panic!("event {id} never arrived"));
        assert_eq!(message.header("event-type"), row.get::<_, String>(1));
        assert_eq!(message.key, row.get::<_, String>(2), "key = aggregate id");
        assert_eq!(message.header("aggregate-id"), row.get::<_, String>(2));
        let payload: serde_json::Value = serde_json::from_str(&row.get::<_, String>(3)).unwrap();
        assert_eq!(message.payload_json(), payload, "value = payload");
        let headers: serde_json::Value = serde_json::from_str(&row.get::<_, String>(4)).unwrap();
        for (name, value) in headers.as_object().unwrap() {
            assert_eq!(
                message.header(name),
                value.as_str().unwrap(),
                "user header {name}"
            );
        }
        assert_eq!(message.topic, row.get::<_, String>(5));
        assert_eq!(
            message.header("created-at"),
            row.get::<_, String>(6),
            "RFC 3339 created-at"
        );
        assert!(row.get::<_, bool>(7), "the receipt is recorded");
        assert_eq!(Some(message.partition), row.get::<_, Option<i32>>(8));
        assert_eq!(Some(message.offset), row.get::<_, Option<i64>>(9));
    }
    // Integer and uuid ids are keyed by their canonical text.
    assert!(received.iter().any(|m| m.key == "7"));
    assert!(received
        .iter()
        .any(|m| m.key.len() == 36 && m.key.contains('-')));
}

#[test]
fn rolled_back_transactions_publish_nothing() {
    let tansu = Tansu::start();
    tansu.create_topic("t", 1);
    let cluster = PgCluster::with_outbox(&tansu.bootstrap(), &[]);
    let mut db = cluster.connect();
    let emit = "SELECT outbox.emit('t', $1::text, '{}')::text";

    let mut tx = db.transaction().unwrap();
    let aborted: String = tx.query_one(emit, &[&"rolled-back"]).unwrap().get(0);
    tx.rollback().unwrap();

    let mut tx = db.transaction().unwrap();
    let kept_before: String = tx.query_one(emit, &[&"kept-1"]).unwrap().get(0);
    tx.batch_execute("SAVEPOINT s").unwrap();
    let in_savepoint: String = tx.query_one(emit, &[&"savepoint"]).unwrap().get(0);
    tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    let kept_after: String = tx.query_one(emit, &[&"kept-2"]).unwrap().get(0);
    tx.commit().unwrap();

    // A failed statement inside a PL/pgSQL exception block rolls its emit back too.
    db.batch_execute(
        "DO $$ BEGIN
           BEGIN PERFORM outbox.emit('t', 'in-exception-block', '{}'); PERFORM 1 / 0;
           EXCEPTION WHEN division_by_zero THEN NULL; END;
         END $$;",
    )
    .unwrap();
    let last: String = db.query_one(emit, &[&"last"]).unwrap().get(0);

    assert!(wait_until_published(&mut db, PUBLISH_TIMEOUT));
    let reader = TopicReader::new(&tansu.bootstrap(), &["t"]);
    let received = reader.read(3, PUBLISH_TIMEOUT);
    // Read a little longer: anything extra would be a phantom.
    let mut received = received;
    reader.read_into(&mut received, 4, Duration::from_secs(2));
    let ids: Vec<&str> = received.iter().map(|m| m.header("outbox-id")).collect();
    assert_eq!(
        ids,
        vec![kept_before.as_str(), kept_after.as_str(), last.as_str()]
    );
    assert!(!ids.contains(&aborted.as_str()) && !ids.contains(&in_savepoint.as_str()));
    assert_eq!(
        count_events(&mut db, "true"),
        3,
        "rolled-back rows do not exist"
    );
    assert!(received.iter().all(|m| m.key != "in-exception-block"));
}

#[test]
fn same_aggregate_events_arrive_in_emit_order_across_sessions() {
    const SESSIONS: usize = 4;
    const AGGREGATES: i64 = 12;
    const ROUNDS: i64 = 60;
    let tansu = Tansu::start();
    tansu.create_topic("counter.bumped", 3);
    let cluster = PgCluster::with_outbox(&tansu.bootstrap(), &[("outbox.batch_size", "7")]);
    cluster
        .connect()
        .batch_execute(&format!(
            "CREATE TABLE counters (id bigint PRIMARY KEY, n int NOT NULL);
             INSERT INTO counters SELECT g, 0 FROM generate_series(1, {AGGREGATES}) g;"
        ))
        .unwrap();

    // Each session bumps random counters; the row lock orders writers of one aggregate, so
    // n is that aggregate's emit order. Some transactions bump twice, some roll back.
    let sessions: Vec<_> = (0..SESSIONS)
        .map(|s| {
            let mut db = cluster.connect();
            std::thread::spawn(move || {
                let mut committed = 0;
                for round in 0..ROUNDS {
                    let aggregate = (round * 7 + s as i64 * 5) % AGGREGATES + 1;
                    let mut tx = db.transaction().unwrap();
                    for _ in 0..(1 + round % 2) {
                        tx.execute(
                            "WITH bumped AS (UPDATE counters SET n = n + 1 WHERE id = $1 RETURNING id, n)
                             SELECT outbox.emit('counter.bumped', id, jsonb_build_object('n', n)) FROM bumped",
                            &[&aggregate],
                        )
                        .unwrap();
                    }
                    if round % 9 == 4 {
                        tx.rollback().unwrap();
                    } else {
                        tx.commit().unwrap();
                        committed += 1 + round % 2;
                    }
                }
                committed
            })
        })
        .collect();
    let committed: i64 = sessions.into_iter().map(|s| s.join().unwrap()).sum();

    let mut db = cluster.connect();
    assert!(wait_until_published(&mut db, PUBLISH_TIMEOUT));
    let reader = TopicReader::new(&tansu.bootstrap(), &["counter.bumped"]);
    let received = reader.read(committed as usize, PUBLISH_TIMEOUT);
    assert_eq!(received.len() as i64, committed);

    let mut last_n: HashMap<String, i64> = HashMap::new();
    for message in &received {
        let n = message.payload_json()["n"].as_i64().unwrap();
        let previous = last_n.insert(message.key.clone(), n).unwrap_or(0);
        assert_eq!(
            n,
            previous + 1,
            "aggregate {} jumped from {previous} to {n}",
            message.key
        );
    }
    let final_counts: Vec<(i64, i32)> = db
        .query("SELECT id, n FROM counters", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (id, n) in final_counts {
        assert_eq!(
            last_n.get(&id.to_string()).copied().unwrap_or(0),
            n as i64,
            "aggregate {id}"
        );
    }
}

#[test]
fn worker_waits_for_broker_down_at_start_and_publishes_once_it_is_up() {
    let port = free_port();
    let cluster = PgCluster::with_outbox(&format!("127.0.0.1:{port}"), &[]);
    let mut db = cluster.connect();
    db.batch_execute(
        "SELECT outbox.emit('late', g, jsonb_build_object('g', g)) FROM generate_series(1, 10) g",
    )
    .unwrap();
    assert!(
        cluster.wait_for_log("Kafka broker problem", Duration::from_secs(30)),
        "the broker error is logged"
    );
    let worker = cluster.worker_pid("postgres").expect("worker running");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count_published(&mut db, "true"), 0);
    assert_eq!(
        db.query_one("SELECT count(*) FROM outbox.parked", &[])
            .unwrap()
            .get::<_, i64>(0),
        0,
        "an outage is not the events' fault"
    );
    assert_eq!(
        cluster.worker_pid("postgres"),
        Some(worker),
        "the worker did not restart"
    );

    let tansu = Tansu::start_on(port);
    tansu.create_topic("late", 2);
    assert!(
        wait_until_published(&mut db, PUBLISH_TIMEOUT),
        "published once the broker is up"
    );
    let received = TopicReader::new(&tansu.bootstrap(), &["late"]).read(10, PUBLISH_TIMEOUT);
    assert_eq!(received.len(), 10);
    assert!(cluster.wait_for_log("reachable again", Duration::from_secs(10)));
}

#[test]
fn worker_waits_for_its_database_and_extension_without_crash_looping() {
    let tansu = Tansu::start();
    tansu.create_topic("app.event", 1);
    let cluster = PgCluster::start(&[
        ("outbox.brokers", &tansu.bootstrap()),
        ("outbox.database", "appdb"),
        ("outbox.poll_interval", "200ms"),
    ]);
    assert!(cluster.wait_for_log(
        "database \"appdb\" does not exist; waiting",
        Duration::from_secs(20)
    ));
    cluster
        .connect()
        .batch_execute("CREATE DATABASE appdb")
        .unwrap();
    assert!(cluster.wait_for_log("the extension is not installed", Duration::from_secs(20)));
    let worker = cluster
        .worker_pid("appdb")
        .expect("worker connected to appdb");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        cluster.worker_pid("appdb"),
        Some(worker),
        "no restart while waiting"
    );

    let mut app = cluster.connect_to("appdb");
    app.batch_execute("CREATE EXTENSION outbox_pg; SELECT outbox.emit('app.event', 1, '{}');")
        .unwrap();
    assert!(wait_until_published(&mut app, PUBLISH_TIMEOUT));
    assert_eq!(cluster.worker_pid("appdb"), Some(worker));
    assert!(
        !cluster.log().contains("exited with exit code"),
        "{}",
        cluster.log()
    );
}

/// The same session emits before and after the extension is dropped and created again: the
/// emit path's cached view of the table is forgotten, and the worker, which lives on, publishes
/// what the new extension holds. (The same within one transaction is a #[pg_test] in append.rs.)
#[test]
fn emit_works_and_publishes_after_the_extension_is_dropped_and_created_again() {
    let tansu = Tansu::start();
    tansu.create_topic("order.created", 1);
    let cluster = PgCluster::with_outbox(&tansu.bootstrap(), &[]);
    let mut db = cluster.connect();
    db.batch_execute("SELECT outbox.emit('order.created', 'before', '{}')")
        .unwrap();
    assert!(wait_until_published(&mut db, PUBLISH_TIMEOUT));
    let worker = cluster.worker_pid("postgres").expect("a worker");
    db.batch_execute(
        "DROP EXTENSION outbox_pg CASCADE;
         CREATE EXTENSION outbox_pg;",
    )
    .unwrap();
    let id: String = db
        .query_one(
            "SELECT outbox.emit('order.created', 'after', '{}')::text",
            &[],
        )
        .unwrap()
        .get(0);
    let stored: i64 = db
        .query_one(
            "SELECT count(*) FROM outbox.events WHERE id::text = $1",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert_eq!(stored, 1, "the new table holds the event");
    assert!(wait_until_published(&mut db, PUBLISH_TIMEOUT));
    let received = TopicReader::new(&tansu.bootstrap(), &["order.created"])
        .read_all(Duration::from_secs(3), PUBLISH_TIMEOUT);
    assert_eq!(
        received.iter().map(|m| m.key.as_str()).collect::<Vec<_>>(),
        ["before", "after"],
        "each event once, in order"
    );
    assert_eq!(
        received[1].header("outbox-id"),
        id,
        "the event of the new extension"
    );
    assert_eq!(
        cluster.worker_pid("postgres"),
        Some(worker),
        "the worker lived on"
    );
}

#[test]
fn worker_is_visible_to_operators_and_restarted_after_termination() {
    let tansu = Tansu::start();
    tansu.create_topic("t", 1);
    let cluster = PgCluster::with_outbox(&tansu.bootstrap(), &[]);
    let mut db = cluster.connect();
    let types: Vec<String> = column(
        &mut db,
        "SELECT backend_type FROM pg_stat_activity WHERE backend_type LIKE 'outbox_pg%' ORDER BY 1",
    );
    assert_eq!(types, vec!["outbox_pg launcher", "outbox_pg worker"]);

    let first = cluster.worker_pid("postgres").unwrap();
    db.execute("SELECT pg_terminate_backend($1)", &[&first])
        .unwrap();
    assert!(cluster.wait_for_log(
        "worker for database \"postgres\" stopped",
        Duration::from_secs(10)
    ));
    let second = wait_for(Duration::from_secs(30), || {
        cluster.worker_pid("postgres").filter(|pid| *pid != first)
    })
    .expect("the launcher restarts the worker");
    assert_ne!(first, second);
    db.batch_execute("SELECT outbox.emit('t', 1, '{}')")
        .unwrap();
    assert!(wait_until_published(&mut db, PUBLISH_TIMEOUT));
}

#[test]
fn retention_deletes_old_published_events_only() {
    let tansu = Tansu::start();
    tansu.create_topic("t", 1);
    let cluster = PgCluster::with_outbox(&tansu.bootstrap(), &[]);
    let mut db = cluster.connect();
    db.batch_execute("SELECT outbox.emit('t', g, '{}') FROM generate_series(1, 2500) g")
        .unwrap();
    // Not publishable (no such topic on this broker) so it stays: retention never touches it.
    db.batch_execute("SELECT outbox.emit('t', 'x', '{}', topic => 'absent.topic')")
        .unwrap();
    assert!(wait_until(PUBLISH_TIMEOUT, || count_published(
        &mut db, "true"
    ) == 2500));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        count_events(&mut db, "true"),
        2501,
        "the default retention keeps a week"
    );
    cluster.set("outbox.retention", "2s");
    assert!(
        wait_until(Duration::from_secs(30), || count_events(&mut db, "true")
            == 1),
        "published rows older than outbox.retention are deleted"
    );
    assert_eq!(
        count_events(&mut db, "aggregate_id = 'x'"),
        1,
        "the unpublishable event stays"
    );
    assert!(
        wait_until(Duration::from_secs(30), || count_receipts(&mut db) == 1),
        "old receipts go too, all but the newest (the worker's position)"
    );
}

/// Retention follows the receipts: an event published late (after failures) goes `retention`
/// after it was published, a receipt larger than one chunk goes whole, rows that arrived by
/// logical replication (never published here) go once old, dead events stay, and a discarded
/// event goes at once. All under a snapshot held open throughout, which keeps every deleted row
/// alive for it.
#[test]
fn retention_follows_receipts_keeps_dead_events_and_expires_replicated_rows() {
    let tansu = Tansu::start();
    tansu.create_topic("t", 3);
    let cluster = PgCluster::with_outbox(
        &tansu.bootstrap(),
        &[
            ("outbox.retention", "-1"),
            ("outbox.max_attempts", "1"),
            ("outbox.retry_backoff", "100ms"),
            ("outbox.retry_backoff_max", "200ms"),
        ],
    );
    let mut old = cluster.connect();
    old.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM outbox.events")
        .unwrap();
    let mut db = cluster.connect();

    // Two events die (their topic does not exist); one is discarded: its row goes at once.
    db.batch_execute(
        "SELECT outbox.emit('dead', 'kept', '{}', topic => 'never');
         SELECT outbox.emit('dead', 'discarded', '{}', topic => 'never')",
    )
    .unwrap();
    assert!(wait_until(PUBLISH_TIMEOUT, || count_dead(&mut db, "true") == 2));
    db.batch_execute(
        "SELECT outbox.discard(id) FROM outbox.dead_letters WHERE aggregate_id = 'discarded'",
    )
    .unwrap();
    assert_eq!(count_events(&mut db, "aggregate_id = 'discarded'"), 0);

    // One event fails until its topic exists, then is published, long after the events beside it.
    cluster.set("outbox.max_attempts", "1000");
    db.batch_execute(
        "SELECT outbox.emit('late', 'late', '{}', topic => 'late');
         SELECT outbox.emit('t', g, '{}') FROM generate_series(1, 600) g",
    )
    .unwrap();
    assert!(wait_until(PUBLISH_TIMEOUT, || count_published(
        &mut db,
        "e.event_type = 't'"
    ) == 600));
    assert!(wait_until(PUBLISH_TIMEOUT, || count_parked(
        &mut db,
        "p.attempts >= 2"
    ) == 1));
    tansu.create_topic("late", 1);
    assert!(wait_until(PUBLISH_TIMEOUT, || count_published(
        &mut db,
        "e.event_type = 'late'"
    ) == 1));
    assert!(
        db.query_one(
            "SELECT max(cardinality(event_ids)) FROM outbox.batches",
            &[]
        )
        .unwrap()
        .get::<_, Option<i32>>(0)
        .unwrap_or(0)
            > 256,
        "a receipt lists more events than retention deletes in one chunk"
    );

    // A row that arrived by logical replication: not published here (no xid), emitted in 2023.
    db.batch_execute(
        "SET session_replication_role = replica;
         INSERT INTO outbox.events (id, event_type, aggregate_id, payload)
         VALUES ('0188e5e0-0000-7000-8000-000000000001', 'replicated', 'r', '{}');
         RESET session_replication_role",
    )
    .unwrap();
    assert_eq!(count_events(&mut db, "xid IS NULL"), 1);

    cluster.set("outbox.retention", "2s");
    assert!(
        wait_until(Duration::from_secs(30), || count_events(&mut db, "true")
            == 1),
        "published and replicated rows expire: {:?}",
        column::<String, Vec<_>>(
            &mut db,
            "SELECT event_type || '/' || aggregate_id FROM outbox.events"
        )
    );
    assert_eq!(
        count_dead(&mut db, "d.aggregate_id = 'kept'"),
        1,
        "the dead event stays"
    );
    assert!(
        wait_until(Duration::from_secs(30), || count_receipts(&mut db) == 1),
        "receipts go too, all but the newest (the worker's position)"
    );
    old.batch_execute("COMMIT").unwrap();
}

/// Retention keeps pace with a trickle of small commits, each with a receipt of its own: a
/// chunk deletes up to 256 whole receipts with their events in one statement, and the worker
/// comes back for the next chunk after its next round. (It once looked at 64 receipts a
/// second: these took it half a minute and more, and under 1,000 commits a second the tables
/// grew without end.) A chunk whose transaction gives up on a lock wait deletes nothing, and
/// nothing is skipped for it; the dead event stays.
#[test]
fn retention_keeps_pace_with_small_receipts_and_loses_none_to_a_lock_wait() {
    let mock = mock_cluster(&[("t", 3)]);
    let cluster = PgCluster::with_outbox(
        &mock.bootstrap_servers(),
        &[("outbox.retention", "-1"), ("outbox.max_attempts", "1")],
    );
    let mut db = cluster.connect();
    db.batch_execute("SELECT outbox.emit('dead', 'kept', '{}', topic => 'never')")
        .unwrap();
    assert!(wait_until(PUBLISH_TIMEOUT, || count_dead(&mut db, "true") == 1));
    db.batch_execute(
        "DO $$ BEGIN
             FOR i IN 1..3000 LOOP
                 PERFORM outbox.emit('t', i, '{}');
                 COMMIT;
                 PERFORM pg_sleep(0.001);
             END LOOP;
         END $$",
    )
    .unwrap();
    assert!(wait_until(PUBLISH_TIMEOUT, || count_published(
        &mut db,
        "e.event_type = 't'"
    ) == 3000));
    let receipts = count_receipts(&mut db);
    assert!(
        receipts >= 1_000,
        "the commits were published in small batches: {receipts} receipts"
    );

    // Retention starts while another session holds a lock the chunks need (outbox.parked, read
    // by the walk over unstamped rows): chunks that deleted receipts roll back at lock_timeout.
    let mut locker = cluster.connect();
    locker
        .batch_execute("BEGIN; LOCK TABLE outbox.parked IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    cluster.set("outbox.retention", "1s");
    std::thread::sleep(Duration::from_secs(10));
    locker.batch_execute("COMMIT").unwrap();

    // A second, and a second more per 512 receipts: a chunk a second would need twice that.
    let deadline = Duration::from_secs_f64(1.0 + receipts as f64 / 512.0);
    let started = std::time::Instant::now();
    assert!(
        wait_until(deadline, || count_events(&mut db, "true") == 1
            && count_receipts(&mut db)
                == 1),
        "{receipts} receipts and their events expire within {deadline:?}: {} events, {} receipts left",
        count_events(&mut db, "true"),
        count_receipts(&mut db)
    );
    println!(
        "{receipts} receipts and 3,000 events expired {:?} after the lock was released",
        started.elapsed()
    );
    assert_eq!(
        count_dead(&mut db, "d.aggregate_id = 'kept'"),
        1,
        "the dead event stays"
    );
}

#[test]
fn standby_publishes_only_after_promotion() {
    let tansu = Tansu::start();
    tansu.create_topic("t", 1);
    let primary = PgCluster::with_outbox(&tansu.bootstrap(), &[("wal_level", "replica")]);
    let standby = primary.start_standby();
    let mut db = primary.connect();
    db.batch_execute("SELECT outbox.emit('t', g, '{}') FROM generate_series(1, 5) g")
        .unwrap();
    assert!(wait_until_published(&mut db, PUBLISH_TIMEOUT));
    let mut replica = standby.connect();
    assert!(wait_until(Duration::from_secs(30), || count_published(
        &mut replica,
        "true"
    ) == 5));
    let refused = replica
        .batch_execute("SELECT outbox.emit('t', 'on-standby', '{}')")
        .unwrap_err();
    assert_eq!(
        refused.code().map(|c| c.code()),
        Some("25006"),
        "emit() on a standby: {refused}"
    );
    let outbox_processes: i64 = replica
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'outbox_pg%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        outbox_processes, 0,
        "nothing of outbox_pg runs on a standby"
    );

    // Failover: the primary goes away, the standby is promoted and takes over publishing.
    drop(db);
    primary.pg_ctl_stop("fast");
    standby.promote();
    let mut promoted = standby.connect();
    promoted
        .batch_execute("SELECT outbox.emit('t', 'after-failover', '{}')")
        .unwrap();
    assert!(
        wait_until_published(&mut promoted, PUBLISH_TIMEOUT),
        "the promoted standby publishes"
    );
    let received = TopicReader::new(&tansu.bootstrap(), &["t"]).read(6, PUBLISH_TIMEOUT);
    assert_eq!(received.len(), 6);
    assert_eq!(received[5].key, "after-failover");
}

#[test]
fn shutdown_does_not_wait_for_an_absent_broker_and_loses_nothing() {
    let port = free_port();
    let cluster = PgCluster::with_outbox(&format!("127.0.0.1:{port}"), &[]);
    let mut db = cluster.connect();
    db.batch_execute("SELECT outbox.emit('t', g, '{}') FROM generate_series(1, 20) g")
        .unwrap();
    assert!(cluster.wait_for_log("Kafka broker problem", Duration::from_secs(30)));
    drop(db);
    // pg_ctl gives up (and the harness fails) if the worker held shutdown for 60 s.
    cluster.pg_ctl_stop("fast");

    let tansu = Tansu::start_on(port);
    tansu.create_topic("t", 1);
    cluster.pg_ctl_start();
    let mut db = cluster.connect();
    assert_eq!(
        db.query_one("SELECT count(*) FROM outbox.parked WHERE attempts > 0", &[])
            .unwrap()
            .get::<_, i64>(0),
        0
    );
    assert!(wait_until_published(&mut db, PUBLISH_TIMEOUT));
    assert_eq!(
        TopicReader::new(&tansu.bootstrap(), &["t"])
            .read(20, PUBLISH_TIMEOUT)
            .len(),
        20
    );
}

#[test]
fn worker_killed_with_sigkill_comes_back_and_publishes() {
    let tansu = Tansu::start();
    tansu.create_topic("t", 1);
    let cluster = PgCluster::with_outbox(&tansu.bootstrap(), &[]);
    let worker = cluster.worker_pid("postgres").expect("worker running");
    // SIGKILL of a process with shared memory makes the postmaster restart every backend.
    outbox_pg_harness::process::signal(worker, "KILL");
    assert!(cluster.wait_for_log(
        "all server processes terminated; reinitializing",
        Duration::from_secs(30)
    ));
    let restarted = wait_for(Duration::from_secs(60), || {
        std::panic::catch_unwind(|| cluster.worker_pid("postgres"))
            .ok()
            .flatten()
            .filter(|p| *p != worker)
    })
    .expect("worker back after the crash restart");
    assert_ne!(restarted, worker);
    let mut db = cluster.connect();
    db.batch_execute("SELECT outbox.emit('t', g, '{}') FROM generate_series(1, 5) g")
        .unwrap();
    assert!(wait_until_published(&mut db, PUBLISH_TIMEOUT));
    assert_eq!(
        TopicReader::new(&tansu.bootstrap(), &["t"])
            .read(5, PUBLISH_TIMEOUT)
            .len(),
        5
    );
}

/// The worker's batch statements are index walks, however stale the table's statistics: a
/// burst published right after CREATE EXTENSION (never analysed: the planner thinks the table is
/// empty) must not be recorded by scanning the whole table once per batch, which made the worker
/// fall further behind with every row. Scans are counted by Postgres itself.
#[test]
fn publishing_a_burst_on_a_fresh_table_never_scans_the_whole_table() {
    let mock = mock_cluster(&[("t", 3)]);
    let cluster = PgCluster::with_outbox(
        &mock.bootstrap_servers(),
        &[("autovacuum", "off"), ("outbox.batch_size", "100")],
    );
    let mut db = cluster.connect();
    // This session looks rows up by primary key only, so every sequential scan counted below
    // is the worker's.
    db.batch_execute("SET enable_seqscan = off").unwrap();
    let mut published = |id: &str| {
        wait_until(PUBLISH_TIMEOUT, || {
            count_published(&mut db, &format!("e.id = '{id}'")) == 1
        })
    };
    let first: String = cluster
        .connect()
        .query_one("SELECT outbox.emit('t', 1, '{}')::text", &[])
        .unwrap()
        .get(0);
    assert!(published(&first));
    // CREATE EXTENSION's index builds read the table; count from here. (The worker reports its
    // counts when it exits, so they include its first batch.)
    cluster
        .connect()
        .batch_execute("SELECT pg_stat_reset_single_table_counters('outbox.events'::regclass)")
        .unwrap();
    // The worker claims in emission order, one batch after another: once the last event is
    // published, so are the 5,000 before it.
    let mut emitter = cluster.connect();
    let mut burst = emitter.transaction().unwrap();
    burst
        .batch_execute("SELECT outbox.emit('t', g % 50, '{}') FROM generate_series(1, 5000) g")
        .unwrap();
    let last: String = burst
        .query_one("SELECT outbox.emit('t', 7, '{}')::text", &[])
        .unwrap()
        .get(0);
    burst.commit().unwrap();
    assert!(published(&last));

    // The worker reports its table statistics after every transaction; this session's own
    // lookups went by index only.
    std::thread::sleep(Duration::from_millis(1500));
    let (sequential, by_index): (i64, i64) = {
        let row = db
            .query_one(
                "SELECT seq_scan, idx_scan FROM pg_stat_user_tables
                 WHERE relid = 'outbox.events'::regclass",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(
        by_index >= 50,
        "the worker's batches went through indexes ({by_index} scans)"
    );
    // Without the fix every batch scanned the table (54 scans here); a few scans of the still
    // tiny table while the worker starts are fine.
    assert!(
        sequential < 5,
        "the worker scanned the whole outbox table {sequential} times for about 50 batches"
    );
}
