//! Operations that copy or freeze the database: dump and restore (pg_dump, pg_restore,
//! pg_dumpall), a read-only switchover freeze, and logical replication of outbox.events.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outbox_pg_harness::stream::LiveConsumer;
use outbox_pg_harness::*;

const TIMEOUT: Duration = Duration::from_secs(60);

/// What a dump must carry, as counted in `db`.
#[derive(Debug, PartialEq, Eq)]
struct Carried {
    unpublished: i64,
    dead: i64,
    inbox: i64,
    paused: bool,
    sequence: i64,
}

fn carried(db: &mut postgres::Client) -> Carried {
    let row = db
        .query_one(
            "SELECT (SELECT count(*) FROM outbox.pending),
                    (SELECT count(*) FROM outbox.dead_letters),
                    (SELECT count(*) FROM outbox.inbox),
                    EXISTS (SELECT 1 FROM outbox.control),
                    (SELECT last_value FROM outbox.events_seq_seq)",
            &[],
        )
        .unwrap();
    Carried {
        unpublished: row.get(0),
        dead: row.get(1),
        inbox: row.get(2),
        paused: row.get(3),
        sequence: row.get(4),
    }
}

#[test]
fn a_dump_and_restore_keeps_unsent_and_dead_events_the_inbox_the_pause_and_the_sequence() {
    let mock = mock_cluster(&[("t", 3)]);
    let source = PgCluster::with_outbox(
        &mock.bootstrap_servers(),
        &[
            ("outbox.max_attempts", "1"),
            ("outbox.kafka_config", "message.max.bytes=20000"),
        ],
    );
    let mut db = source.connect();
    // Published history, three dead letters, five consumed ids, then a paused backlog.
    db.batch_execute(
        "SELECT outbox.emit('t', 'published-' || g, '{}') FROM generate_series(1, 10) g;
         SELECT outbox.emit('t', 'dead-' || g, jsonb_build_object('blob', repeat('x', 30000)))
           FROM generate_series(1, 3) g;
         SELECT outbox.consume_once('postgres', gen_random_uuid()) FROM generate_series(1, 5);",
    )
    .unwrap();
    assert!(wait_until(TIMEOUT, || count_dead(&mut db, "true") == 3));
    assert!(wait_until_published(&mut db, TIMEOUT));
    db.batch_execute(
        "SELECT outbox.pause();
         SELECT outbox.emit('t', 'unsent-' || g, jsonb_build_object('g', g)) FROM generate_series(1, 100) g;",
    )
    .unwrap();
    let before = carried(&mut db);
    assert_eq!(
        before,
        Carried {
            unpublished: 100,
            dead: 3,
            inbox: 5,
            paused: true,
            sequence: 113
        }
    );
    let dump = source.scratch().join("shop.dump");
    source.client(
        "pg_dump",
        &["-Fc", "-d", "postgres", "-f", dump.to_str().unwrap()],
    );
    let dumpall = source.scratch().join("all.sql");
    source.client("pg_dumpall", &["-f", dumpall.to_str().unwrap()]);

    // A fresh cluster that does not publish the restored databases yet.
    let target = PgCluster::publishing_to(
        &mock.bootstrap_servers(),
        &[("outbox.database", "placeholder")],
    );
    let mut admin = target.connect();
    admin.batch_execute("CREATE DATABASE shop").unwrap();
    admin.batch_execute("CREATE DATABASE shop_single").unwrap();
    target.client("pg_restore", &["-d", "shop", dump.to_str().unwrap()]);
    target.client(
        "pg_restore",
        &[
            "--single-transaction",
            "-d",
            "shop_single",
            dump.to_str().unwrap(),
        ],
    );
    for database in ["shop", "shop_single"] {
        let mut restored = target.connect_to(database);
        assert_eq!(
            carried(&mut restored),
            before,
            "{database}: everything unsent came along"
        );
        let history: i64 = restored
            .query_one("SELECT count(*) FROM outbox.deliveries", &[])
            .unwrap()
            .get(0);
        assert_eq!(history, 0, "{database}: published history stays behind");
        let emitted: String = restored
            .query_one("SELECT outbox.emit('t', 'after-restore', '{}')::text", &[])
            .unwrap()
            .get(0);
        let next_seq: i64 = restored
            .query_one(
                "SELECT seq FROM outbox.events WHERE id::text = $1",
                &[&emitted],
            )
            .unwrap()
            .get(0);
        assert!(
            next_seq > 113,
            "{database}: the sequence goes on from the dump ({next_seq})"
        );
    }

    // Publishing the restored database: it starts paused, as the source was.
    target.set("outbox.database", "shop");
    let mut shop = target.connect_to("shop");
    assert!(wait_until(TIMEOUT, || shop
        .query_one("SELECT state FROM outbox.status", &[])
        .unwrap()
        .get::<_, String>(0)
        == "paused"));
    let reader = TopicReader::new(&mock.bootstrap_servers(), &["t"]);
    let already = reader.read_all(Duration::from_secs(1), TIMEOUT).len();
    assert_eq!(already, 10, "only the source's published events so far");
    shop.batch_execute("SELECT outbox.resume()").unwrap();
    assert!(wait_until_published(&mut shop, TIMEOUT));
    let restored = reader.read_all(Duration::from_secs(1), TIMEOUT);
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    for message in &restored {
        *per_id.entry(message.header("outbox-id")).or_default() += 1;
    }
    assert_eq!(
        restored.len(),
        101,
        "100 restored events and one emitted after the restore"
    );
    assert!(per_id.values().all(|n| *n == 1), "each once");
    assert_eq!(count_dead(&mut shop, "true"), 3, "dead events stay dead");

    // pg_dumpall into another fresh cluster carries the same.
    let whole = PgCluster::publishing_to(
        &mock.bootstrap_servers(),
        &[("outbox.database", "placeholder")],
    );
    whole.client(
        "psql",
        &[
            "-X",
            "-q",
            "-d",
            "postgres",
            "-f",
            dumpall.to_str().unwrap(),
        ],
    );
    assert_eq!(carried(&mut whole.connect()), before);
}

/// A switchover freeze: the database refuses writes (default_transaction_read_only, by
/// ALTER SYSTEM) for 60 s while applications that opted out keep emitting. The worker must
/// not send what it cannot record: it waits, says so once a minute, and publishes everything
/// once writes are allowed again, with at most one batch sent twice.
#[test]
fn a_read_only_freeze_pauses_publishing_and_sends_at_most_what_was_in_flight_twice() {
    let mock = mock_cluster(&[("t", 3)]);
    let cluster =
        PgCluster::with_outbox(&mock.bootstrap_servers(), &[("outbox.batch_size", "100")]);
    let consumer = LiveConsumer::start(&mock.bootstrap_servers(), "t");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let emitter = {
        let mut db = cluster.connect();
        let stop = stop.clone();
        std::thread::spawn(move || {
            db.batch_execute("SET default_transaction_read_only = off")
                .unwrap();
            let mut ids = HashSet::new();
            let mut n = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id: String = db
                    .query_one(
                        "SELECT outbox.emit('t', $1::text, '{}')::text",
                        &[&(n % 20).to_string()],
                    )
                    .unwrap()
                    .get(0);
                ids.insert(id);
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            ids
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let mark = cluster.log_mark();
    cluster.set("default_transaction_read_only", "on");
    let mut db = cluster.connect();
    db.batch_execute("SET default_transaction_read_only = off")
        .unwrap();
    assert!(wait_until(TIMEOUT, || db
        .query_one("SELECT state FROM outbox.status", &[])
        .unwrap()
        .get::<_, String>(0)
        == "read-only"));
    let published_at_freeze = published_since(&mut db, 0);
    std::thread::sleep(Duration::from_secs(60));
    assert_eq!(
        published_since(&mut db, 0),
        published_at_freeze,
        "nothing is recorded while the database refuses writes"
    );
    let frozen_lines = cluster.log_after(mark).matches("refuses writes").count();
    assert!(
        (1..=2).contains(&frozen_lines),
        "logged at most once a minute ({frozen_lines})"
    );
    db.batch_execute("ALTER SYSTEM RESET default_transaction_read_only")
        .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let emitted = emitter.join().unwrap();
    assert!(
        emitted.len() > 2_000,
        "events kept coming during the freeze"
    );
    assert!(wait_until_published(&mut db, TIMEOUT));
    let received = consumer.finish(&emitted, TIMEOUT);
    let distinct: HashSet<&str> = received.iter().map(|m| m.header("outbox-id")).collect();
    assert!(
        emitted.iter().all(|id| distinct.contains(id.as_str())),
        "every event is published after the freeze"
    );
    let duplicates = received.len() - distinct.len();
    eprintln!(
        "read-only freeze: {} emitted, {} received, {duplicates} duplicates",
        emitted.len(),
        received.len()
    );
    assert!(
        duplicates <= 200,
        "{duplicates} duplicates; at most the batches in flight (two of 100)"
    );

    // The same freeze set and lifted by ALTER DATABASE and by ALTER ROLE ALL (the least specific
    // level), which sessions apply when they connect: the worker notices both within seconds and
    // starts a fresh session.
    let freeze_and_thaw = |db: &mut postgres::Client, target: &str, key: &str| {
        db.batch_execute(&format!(
            "ALTER {target} SET default_transaction_read_only = on"
        ))
        .unwrap();
        assert!(wait_until(TIMEOUT, || db
            .query_one("SELECT state FROM outbox.status", &[])
            .unwrap()
            .get::<_, String>(0)
            == "read-only"));
        db.execute("SELECT outbox.emit('t', $1::text, '{}')", &[&key])
            .unwrap();
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(
            count_published(db, &format!("e.aggregate_id = '{key}'")),
            0,
            "{target}: nothing published during the freeze"
        );
        db.batch_execute(&format!(
            "ALTER {target} RESET default_transaction_read_only"
        ))
        .unwrap();
        assert!(
            wait_until_published(db, TIMEOUT),
            "{target}: a lifted freeze is followed"
        );
    };
    let mark = cluster.log_mark();
    freeze_and_thaw(&mut db, "DATABASE postgres", "during-database-freeze");
    let log = cluster.log_after(mark);
    assert_eq!(
        log.matches("changed to on by ALTER DATABASE").count(),
        1,
        "{log}"
    );
    assert_eq!(
        log.matches("changed to its postgresql.conf value").count(),
        1,
        "{log}"
    );
    freeze_and_thaw(&mut db, "ROLE ALL", "during-role-all-freeze");
    // A worker that connected frozen and was lifted while it waited to become ready (here: for
    // a lock on the outbox tables) compares with what it connected with, not with what it
    // found once ready.
    db.batch_execute("ALTER DATABASE postgres SET default_transaction_read_only = on")
        .unwrap();
    let mut locker = cluster.connect();
    locker
        .batch_execute("BEGIN; LOCK TABLE outbox.batches IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let old = cluster.worker_pid("postgres").unwrap();
    db.execute("SELECT pg_terminate_backend($1)", &[&old])
        .unwrap();
    assert!(wait_until(TIMEOUT, || cluster
        .worker_pid("postgres")
        .is_some_and(|p| p != old)));
    std::thread::sleep(Duration::from_secs(2));
    db.batch_execute("ALTER DATABASE postgres RESET default_transaction_read_only")
        .unwrap();
    db.batch_execute("SELECT outbox.emit('t', 'after-a-freeze-lifted-while-waiting', '{}')")
        .unwrap();
    locker.batch_execute("COMMIT").unwrap();
    assert!(
        wait_until_published(&mut db, TIMEOUT),
        "a freeze lifted while the worker waited to be ready is followed"
    );
}

/// A reporting replica or a blue/green target built with logical replication (here: FOR ALL
/// TABLES, the worker's own tables included): its worker does not publish the replicated events
/// a second time, says so, and does once outbox.publish_replicated is turned on (switch-over).
#[test]
fn a_logical_replica_does_not_publish_again_what_its_publisher_publishes() {
    let mock = mock_cluster(&[("t", 3)]);
    let publisher = PgCluster::with_outbox(&mock.bootstrap_servers(), &[("wal_level", "logical")]);
    let subscriber = PgCluster::with_outbox(&mock.bootstrap_servers(), &[]);
    let mut origin = publisher.connect();
    origin
        .batch_execute(
            "SELECT outbox.emit('t', 'before-' || g, '{}') FROM generate_series(1, 10) g;
                        CREATE PUBLICATION everything FOR ALL TABLES;",
        )
        .unwrap();
    let mut replica = subscriber.connect();
    replica
        .batch_execute(&format!(
            "CREATE SUBSCRIPTION everything CONNECTION 'host=127.0.0.1 port={} dbname=postgres user=postgres' PUBLICATION everything",
            publisher.port
        ))
        .unwrap();
    origin
        .batch_execute(
            "SELECT outbox.emit('t', 'during-' || g, '{}') FROM generate_series(1, 40) g;
             SELECT outbox.pause(); SELECT outbox.resume();",
        )
        .unwrap();
    assert!(wait_until(TIMEOUT, || count_events(&mut replica, "true") == 50));
    assert!(wait_until_published(&mut origin, TIMEOUT));
    let status = replica
        .query_one("SELECT replicated_here, pending FROM outbox.status", &[])
        .unwrap();
    assert!(
        status.get::<_, bool>(0),
        "outbox.status says outbox.events is replicated"
    );
    assert_eq!(
        status.get::<_, i64>(1),
        0,
        "replicated events are not pending here"
    );
    assert!(subscriber.wait_for_log("arrives by logical replication", TIMEOUT));
    let reader = TopicReader::new(&mock.bootstrap_servers(), &["t"]);
    let messages = reader.read_all(Duration::from_secs(2), TIMEOUT);
    assert_eq!(messages.len(), 50, "one message per event");
    let own_batches: i64 = replica
        .query_one("SELECT count(*) FROM outbox.batches", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        own_batches, 1,
        "the publisher's receipts are not applied on the replica"
    );

    // Switch-over: the replica takes over publishing replicated events too.
    subscriber.set("outbox.publish_replicated", "on");
    std::thread::sleep(Duration::from_secs(1));
    origin
        .batch_execute(
            "SELECT outbox.emit('t', 'switch-' || g, '{}') FROM generate_series(1, 10) g",
        )
        .unwrap();
    assert!(wait_until(TIMEOUT, || count_events(&mut replica, "true") == 60));
    let mut all = messages;
    reader.read_all_into(&mut all, Duration::from_secs(3), TIMEOUT);
    let switch = all.iter().filter(|m| m.key.starts_with("switch-")).count();
    assert_eq!(
        switch, 20,
        "both publish the events replicated after the switch-over"
    );
}
