//! Scenario 2, latency: commit → consumer receive at a fixed rate, beside the classic relay and a bare
//! producer (the broker's own floor).

use std::fmt::Write as _;
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
    // Fresh topics per run (see `Topics`), so a consumer only ever sees its own run's messages.
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
    let runs: Vec<(u32, &str, Topics)> = rates
        .into_iter()
        .flat_map(|rate| {
            [OUTBOX_PG, BASELINE, PRODUCER_ALONE].map(|system| {
                let prefix = format!("bench.latency.{rate}.{}", system.replace(' ', "-"));
                // The baseline relay publishes to the one topic it was started with.
                let topics = if system == BASELINE {
                    Topics::single(&prefix, 6)
                } else {
                    Topics::rotating(&prefix, duration, rotation_period(rate), 6)
                };
                (rate, system, topics)
            })
        })
        .collect();
    let topics: Vec<(String, i32)> = runs
        .iter()
        .flat_map(|(_, _, topics)| topics.specs())
        .collect();
    // One broker at a time: the other does not idle on the machine meanwhile.
    for name in ["mock", "tansu"] {
        if !wanted("BENCH_BROKERS", name) {
            continue;
        }
        let broker = &if name == "mock" {
            Broker::mock(&topics)
        } else {
            Broker::tansu(&topics)
        };
        for (rate, system, topics) in &runs {
            let (rate, system) = (*rate, *system);
            if !wanted("BENCH_SYSTEMS", system) {
                continue;
            }
            {
                let summary = if system == PRODUCER_ALONE {
                    measure_broker_floor(broker, topics, rate, duration)
                } else {
                    measure_latency(broker, topics, rate, duration, system == OUTBOX_PG, &[])
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
         settings sends at the same rate, timed from the send call: the broker's own floor. Each run \
         moves to a fresh topic every 1–5 s, about 5,000 events a topic at most (every 5 s at \
         500/s, every 1 s at 5,000/s, on both brokers; the baseline relay excepted: it has one \
         topic), because the mock cluster walks a partition's whole log, message set by message \
         set, on every fetch, so that on one topic its own \
         latency grows by the second (a bare producer at 5,000/s: p99 10.5, 21.7, 37.1 ms in three \
         10 s windows); every topic is used once before the run, so that no measured event waits \
         for its metadata.\n\n",
    );
    out
}

const OUTBOX_PG: &str = "outbox_pg";
const BASELINE: &str = "baseline relay";
const PRODUCER_ALONE: &str = "producer alone";

/// Send → receive latency of a bare producer at `rate`: what the broker and client cost by
/// themselves, for comparison with commit → receive through outbox_pg.
fn measure_broker_floor(
    broker: &Broker,
    topics: &Topics,
    rate: u32,
    duration: Duration,
) -> Summary {
    // Warm up the producer's connections and metadata, as for outbox_pg, whose producer lives as
    // long as the worker.
    let producer = bare_producer(&broker.bootstrap());
    warm_up_producer(&producer, topics);
    let events = rate as usize * duration.as_secs() as usize;
    let run = Measurement::start(&broker.bootstrap(), topics, events);
    let from = Instant::now();
    produce_at_rate(
        &producer,
        &run.topics,
        "measured",
        rate,
        duration,
        run.clock.clone(),
    );
    let to = Instant::now();
    wait_until(Duration::from_secs(10), || run.clock.all_received());
    let end = Instant::now();
    run.stop().summary(from, to, end)
}

/// Commit → receive at `rate` for `duration`, through outbox_pg (or the baseline relay), on a
/// cluster with `synchronous_commit = off` and then `extra`.
pub fn measure_latency(
    broker: &Broker,
    topics: &Topics,
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
    let _relay =
        (!outbox).then(|| BaselineRelay::start(&cluster, &broker.bootstrap(), &topics.first()));
    let statement = if outbox {
        format!(
            "SELECT outbox.emit('order.created', $1::text, '{PAYLOAD_LITERAL}', topic => $2)::text"
        )
    } else {
        format!("INSERT INTO classic_outbox (aggregate_id, event_type, payload) VALUES ($1, 'order.created', '{PAYLOAD_LITERAL}') RETURNING id::text")
    };
    let connections = if rate > 1000 { 4 } else { 1 };
    // Warm up: the first events pay for connecting the producer and learning each topic's
    // partitions; measure steady state.
    if outbox {
        warm_up_topics(&cluster, &statement, topics);
    } else {
        let warm_up = Measurement::start(&broker.bootstrap(), topics, 100);
        emit_at_rate(
            &cluster,
            &statement,
            100,
            Duration::from_secs(1),
            1,
            warm_up.clock.clone(),
            None,
        );
        wait_until(Duration::from_secs(30), || warm_up.clock.all_received());
        warm_up.stop();
    }
    let events = rate as usize * duration.as_secs() as usize;
    let run = Measurement::start(&broker.bootstrap(), topics, events);
    let from = Instant::now();
    emit_at_rate(
        &cluster,
        &statement,
        rate,
        duration,
        connections,
        run.clock.clone(),
        outbox.then_some(&run.topics),
    );
    let to = Instant::now();
    // Give stragglers up to 10 s.
    wait_until(Duration::from_secs(10), || run.clock.all_received());
    let end = Instant::now();
    run.stop().summary(from, to, end)
}
