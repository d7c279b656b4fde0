//! Scenario 2, latency: commit → consumer receive at a fixed rate, beside the classic relay and a bare
//! producer (the broker's own floor).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_pg_bench::*;
use outbox_pg_harness::wait_until;

use crate::{cluster, Options};

pub fn run(options: &Options) -> String {
    let duration = Duration::from_secs(if options.quick { 10 } else { 30 });
    let mut out = format!(
        "## 2. Latency: commit → receive, single-event transactions for {}s, `outbox.poll_interval = 1s`\n\n\
         | broker | rate | system | received | p50 | p95 | p99 | max |\n|---|---|---|---|---|---|---|---|\n",
        duration.as_secs()
    );
    // A fresh topic per run, so a consumer only ever sees its own run's messages.
    // BENCH_LATENCY_RATES=5000 measures one rate only (when investigating).
    let rates: Vec<u32> = std::env::var("BENCH_LATENCY_RATES")
        .unwrap_or_else(|_| "500,5000".into())
        .split(',')
        .map(|r| {
            r.trim()
                .parse()
                .expect("BENCH_LATENCY_RATES: comma-separated rates")
        })
        .collect();
    let runs: Vec<(u32, &str, String)> = rates
        .into_iter()
        .flat_map(|rate| {
            [OUTBOX_PG, BASELINE, PRODUCER_ALONE].map(|system| {
                (
                    rate,
                    system,
                    format!("bench.latency.{rate}.{}", system.replace(' ', "-")),
                )
            })
        })
        .collect();
    let topics: Vec<(&str, i32)> = runs
        .iter()
        .map(|(_, _, topic)| (topic.as_str(), 6))
        .collect();
    let brokers = [
        wanted("BENCH_BROKERS", "mock").then(|| Broker::mock(&topics)),
        wanted("BENCH_BROKERS", "tansu").then(|| Broker::tansu(&topics)),
    ];
    for broker in brokers.iter().flatten() {
        for (rate, system, topic) in &runs {
            let (rate, system) = (*rate, *system);
            if !wanted("BENCH_SYSTEMS", system) {
                continue;
            }
            {
                let summary = if system == PRODUCER_ALONE {
                    measure_broker_floor(broker, topic, rate, duration)
                } else {
                    measure_latency(broker, topic, rate, duration, system == OUTBOX_PG, &[])
                };
                let [p50, p95, p99, max] = summary.cells();
                writeln!(
                    out,
                    "| {} | {rate}/s | {system} | {}/{} | {p50} | {p95} | {p99} | {max} |",
                    broker.name(),
                    summary.received,
                    summary.sent
                )
                .unwrap();
                println!("latency [{}] {rate}/s {system}: {summary:?}", broker.name());
            }
        }
    }
    out.push_str(
        "\nCommit instant: when COMMIT returned to the emitting client; receive instant: when the consumer \
         (fetch.wait.max.ms = 1: the mock cluster answers an empty fetch only at the end of that wait, \
         a Kafka broker as soon as data arrives) got the message. `synchronous_commit = off` on this cluster, because the \
         machine cannot fsync 5,000 transactions a second; publishing does not depend on it. \
         \"≥\": some events had not arrived when the window closed (10 s after the last emit), \
         counted at that bound. \"producer alone\": no database, a librdkafka producer with outbox_pg's \
         settings sends at the same rate, timed from the send call: the broker's own floor.\n\n",
    );
    out
}

const OUTBOX_PG: &str = "outbox_pg";
const BASELINE: &str = "baseline relay";
const PRODUCER_ALONE: &str = "producer alone";

/// Send → receive latency of a bare producer at `rate`: what the broker and client cost by
/// themselves, for comparison with commit → receive through outbox_pg.
fn measure_broker_floor(broker: &Broker, topic: &str, rate: u32, duration: Duration) -> Summary {
    let clock = Arc::new(Clock::default());
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = start_consumer(&broker.bootstrap(), topic, clock.clone(), stop.clone());
    // Warm up the producer's connections, as for outbox_pg, whose producer lives as long as the
    // worker.
    let producer = bare_producer(&broker.bootstrap());
    produce_at_rate(
        &producer,
        topic,
        "warm-up",
        100,
        Duration::from_secs(1),
        clock.clone(),
    );
    wait_until(Duration::from_secs(30), || clock.caught_up());
    let from = Instant::now();
    produce_at_rate(&producer, topic, "measured", rate, duration, clock.clone());
    let to = Instant::now();
    wait_until(Duration::from_secs(10), || clock.caught_up());
    let end = Instant::now();
    stop.store(true, Ordering::Relaxed);
    consumer.join().unwrap();
    clock.summary(from, to, end)
}

/// Commit → receive at `rate` for `duration`, through outbox_pg (or the baseline relay), on a
/// cluster with `synchronous_commit = off` and then `extra`.
pub fn measure_latency(
    broker: &Broker,
    topic: &str,
    rate: u32,
    duration: Duration,
    outbox: bool,
    extra: &[(&str, &str)],
) -> Summary {
    let mut settings = vec![
        (
            "outbox.database",
            if outbox { "postgres" } else { "parked" },
        ),
        ("synchronous_commit", "off"),
    ];
    settings.extend_from_slice(extra);
    let cluster = cluster(&broker.bootstrap(), &settings);
    let clock = Arc::new(Clock::default());
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = start_consumer(&broker.bootstrap(), topic, clock.clone(), stop.clone());
    let _relay = (!outbox).then(|| BaselineRelay::start(&cluster, &broker.bootstrap(), topic));
    let statement = if outbox {
        format!("SELECT outbox.emit('order.created', $1::text, '{PAYLOAD_LITERAL}', topic => '{topic}')::text")
    } else {
        format!("INSERT INTO classic_outbox (aggregate_id, event_type, payload) VALUES ($1, 'order.created', '{PAYLOAD_LITERAL}') RETURNING id::text")
    };
    let connections = if rate > 1000 { 4 } else { 1 };
    // Warm up: the first events pay for connecting the producer; measure steady state.
    emit_at_rate(
        &cluster,
        &statement,
        100,
        Duration::from_secs(1),
        1,
        clock.clone(),
    );
    wait_until(Duration::from_secs(30), || clock.caught_up());
    let from = Instant::now();
    emit_at_rate(
        &cluster,
        &statement,
        rate,
        duration,
        connections,
        clock.clone(),
    );
    let to = Instant::now();
    // Give stragglers up to 10 s.
    wait_until(Duration::from_secs(10), || clock.all_received());
    let end = Instant::now();
    stop.store(true, Ordering::Relaxed);
    consumer.join().unwrap();
    clock.summary(from, to, end)
}
