//! Scenario 8, a failing neighbour: one role's bursts of events, drained alone and then while
//! another role's 100,000 events for a topic that does not exist are being retried. The stall
//! this measures against kept the other role's events behind every retry; tests/e2e's
//! security.rs shows the bursts get through, this shows at what speed.

use std::time::{Duration, SystemTime};

use outbox_pg_bench::*;
use outbox_pg_harness::{published_since, receipts_mark, wait_until, PgCluster};

use crate::{cluster, Options};

const TOPIC: &str = "bench.neighbour";

pub fn run(options: &Options) -> String {
    let (failing, burst, bursts): (i64, i64, usize) = if options.quick {
        (20_000, 10_000, 3)
    } else {
        (100_000, 50_000, 5)
    };
    let broker = Broker::mock(&[(TOPIC, 3)]);
    let cluster = cluster(
        &broker.bootstrap(),
        &[
            ("outbox.retry_backoff", "200ms"),
            ("outbox.max_attempts", "1000"),
            ("outbox.retention", "-1"),
        ],
    );
    let mut admin = cluster.connect();
    admin
        .batch_execute("CREATE ROLE app LOGIN; CREATE ROLE neighbour LOGIN;")
        .unwrap();
    // Warm up: the producer connected and the topic's metadata known.
    burst_drain(&cluster, 1_000);
    // The best of several bursts a side: single bursts of the same side differ by up to 1.5x
    // on this machine. Each side starts after a vacuum of what came before, so that
    // autovacuum's pass over it does not take a core during one side's bursts only.
    let best = || {
        cluster
            .connect()
            .batch_execute("VACUUM ANALYZE outbox.events, outbox.parked")
            .unwrap();
        (0..bursts)
            .map(|_| burst_drain(&cluster, burst))
            .min()
            .unwrap()
    };
    let alone = best();

    // A role with nothing but EXECUTE on emit(), for aggregate ids that overlap the bursts'.
    cluster
        .connect_as("neighbour")
        .batch_execute(&format!(
            "SELECT outbox.emit('x', g, '{{}}', topic => 'no-such-topic')
             FROM generate_series(1, {failing}) g"
        ))
        .unwrap();
    let parked = |admin: &mut postgres::Client, what: &str| -> i64 {
        admin
            .query_one(
                &format!("SELECT {what}::bigint FROM outbox.parked WHERE topic = 'no-such-topic'"),
                &[],
            )
            .unwrap()
            .get(0)
    };
    assert!(
        wait_until(Duration::from_secs(300), || parked(&mut admin, "count(*)")
            == failing),
        "every failing event is parked"
    );
    let attempts_before = parked(&mut admin, "sum(attempts)");
    let behind = best();
    let attempts = parked(&mut admin, "sum(attempts)") - attempts_before;
    let due = parked(
        &mut admin,
        "count(*) FILTER (WHERE next_attempt_at <= clock_timestamp())",
    );
    let ratio = alone.as_secs_f64() / behind.as_secs_f64();
    println!(
        "neighbour: {burst} events (best of {bursts}) {alone:?} alone, {behind:?} behind {failing} failing ({ratio:.2}x; {attempts} retry attempts meanwhile, {due} due at the end)"
    );
    let rate = |d: Duration| burst as f64 / d.as_secs_f64();
    format!(
        "## 8. A failing neighbour: one role's {burst}-event bursts, alone and while another role's {failing} events for a missing topic are retried (mock cluster)\n\n\
         | bursts alone (best of {bursts}) | behind the failing events (best of {bursts}) | behind over alone | retry attempts while those bursts were emitted and published | retries due and waiting at their end |\n|---|---|---|---|---|\n\
         | {:.0} events/s ({}) | {:.0} events/s ({}) | {ratio:.2}× | {attempts} | {due} of {failing} |\n\n\
         Each burst is one transaction of role `app`; its time runs from the commit to the last \
         receipt's `recorded_at`, both by the server's clock. The failing events belong to \
         another role with nothing but `EXECUTE` on emit(), for aggregate ids overlapping the \
         bursts' (`outbox.retry_backoff = 200ms`, `outbox.max_attempts = 1000`: none dies while \
         the bursts run, and retries are due throughout).\n\n",
        rate(alone),
        ms(alone),
        rate(behind),
        ms(behind),
    )
}

/// Time from the commit of `count` events (one transaction of role `app`) until the worker has
/// recorded all of them as published, by the server's clock: the transaction's last instant to
/// the last receipt's `recorded_at` (polling would round it to its step).
fn burst_drain(cluster: &PgCluster, count: i64) -> Duration {
    let mut admin = cluster.connect();
    let mark = receipts_mark(&mut admin);
    let mut db = cluster.connect_as("app");
    let mut tx = db.transaction().unwrap();
    tx.execute(
        &format!(
            "SELECT outbox.emit('burst', g, jsonb_build_object('g', g), topic => '{TOPIC}')
             FROM generate_series(1, $1::bigint) g"
        ),
        &[&count],
    )
    .unwrap();
    let committing: SystemTime = tx
        .query_one("SELECT clock_timestamp()", &[])
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    assert!(
        wait_until(Duration::from_secs(300), || published_since(
            &mut admin, mark
        ) >= count),
        "the burst is published"
    );
    let recorded: SystemTime = admin
        .query_one(
            // A window closing empty after the burst records a receipt of its own, later.
            "SELECT max(recorded_at) FROM outbox.batches WHERE id > $1 AND event_count > 0",
            &[&mark],
        )
        .unwrap()
        .get(0);
    recorded.duration_since(committing).unwrap()
}
