//! Scenario 4, sustained: a steady rate with a short retention; size and p99 every minute.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use outbox_pg_bench::*;

use crate::{cluster, Options};

pub fn run(options: &Options) -> String {
    let minutes = if options.quick { 2 } else { 10 };
    let rate = 2000;
    // A fresh topic every 10 s (see `Topics`), created and used once before the run.
    let span = Duration::from_secs(minutes * 60 + 60);
    let topics = Topics::rotating("bench.sustained", span, Duration::from_secs(10), 6);
    let broker = Broker::mock(&topics.specs());
    let cluster = cluster(
        &broker.bootstrap(),
        &[("outbox.retention", "1min"), ("synchronous_commit", "off")],
    );
    let statement = format!(
        "SELECT outbox.emit('order.created', $1::text, '{PAYLOAD_LITERAL}', topic => $2)::text"
    );
    warm_up_topics(&cluster, &statement, &topics);
    let run = Measurement::start(
        &broker.bootstrap(),
        &topics,
        rate as usize * minutes as usize * 60,
    );
    let (topics, clock) = (&run.topics, &run.clock);
    let mut out = format!(
        "## 4. Sustained: {rate} events/s for {minutes} min, `outbox.retention = 1min` (mock cluster, a fresh topic every 10 s)\n\n\
         | minute | outbox.events (indexes) + receipts | receipts kept (events per receipt) | p99 latency | events |\n|---|---|---|---|---|\n"
    );
    let mut sizes = Vec::new();
    let mut p99s = Vec::new();
    let mut db = cluster.connect();
    for minute in 1..=minutes {
        let from = Instant::now();
        emit_at_rate(
            &cluster,
            &statement,
            rate,
            Duration::from_secs(60),
            4,
            clock.clone(),
            Some(topics),
        );
        let to = Instant::now();
        std::thread::sleep(Duration::from_millis(500));
        let summary = clock.summary(from, to, Instant::now());
        let size = Sizes::of(&mut db);
        // One receipt per batch: how many the retention window holds, and how full they were.
        let receipts = db
            .query_one(
                "SELECT count(*), coalesce(sum(event_count), 0)::int8 FROM outbox.batches",
                &[],
            )
            .unwrap();
        let (receipts, receipted): (i64, i64) = (receipts.get(0), receipts.get(1));
        let total = size.events + size.batches;
        println!(
            "sustained minute {minute}: {total} bytes, p99 {:?}",
            summary.p99
        );
        writeln!(
            out,
            "| {minute} | {} | {receipts} ({:.1}) | {} | {} |",
            size.cell(),
            receipted as f64 / receipts.max(1) as f64,
            ms(summary.p99),
            summary.sent
        )
        .unwrap();
        sizes.push(total);
        p99s.push(summary.p99);
    }
    run.stop();
    let half = sizes.len() / 2;
    writeln!(
        out,
        "\nSize at minute {} / size at minute {}: {:.2}×. Largest p99: {}.\n",
        sizes.len(),
        half,
        *sizes.last().unwrap() as f64 / sizes[half - 1] as f64,
        ms(p99s.iter().copied().max().unwrap())
    )
    .unwrap();
    out
}
