//! `make bench`: outbox_pg side by side with the classic polling relay, on one machine, in one
//! run. Prints a results table and writes it to bench/RESULTS.md.
//!
//! `outbox-bench [--quick] [drain] [latency] [emit] [sustained]` (all scenarios by default).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_pg_bench::*;
use outbox_pg_harness::{count_events, wait_until, PgCluster};

struct Options {
    quick: bool,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = Options {
        quick: args.iter().any(|a| a == "--quick"),
    };
    let wanted: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .map(String::as_str)
        .collect();
    let run = |name: &str| wanted.is_empty() || wanted.contains(&name);

    let mut report = String::new();
    writeln!(report, "# outbox_pg benchmark results\n").unwrap();
    writeln!(
        report,
        "Machine: {}. PostgreSQL 15, one run of `make bench`{}.\n",
        machine(),
        if options.quick { " --quick" } else { "" }
    )
    .unwrap();
    if run("drain") {
        report.push_str(&drain(&options));
    }
    if run("latency") {
        report.push_str(&latency(&options));
    }
    if run("emit") {
        report.push_str(&emit_cost(&options));
    }
    if run("sustained") {
        report.push_str(&sustained(&options));
    }
    println!("\n{report}");
    if !options.quick && wanted.is_empty() {
        std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/RESULTS.md"), &report).unwrap();
        println!("written to bench/RESULTS.md");
    }
}

/// Settings shared by every benchmark cluster.
fn cluster(brokers: &str, extra: &[(&str, &str)]) -> PgCluster {
    let mut settings = vec![
        ("outbox.brokers", brokers),
        ("shared_buffers", "1GB"),
        ("max_wal_size", "8GB"),
        ("checkpoint_timeout", "15min"),
    ];
    settings.extend_from_slice(extra);
    // BENCH_PG_SETTINGS="name=value;name=value" adds settings to every cluster (investigations,
    // e.g. auto_explain).
    let investigation = std::env::var("BENCH_PG_SETTINGS").unwrap_or_default();
    settings.extend(
        investigation
            .split(';')
            .filter_map(|pair| pair.split_once('=')),
    );
    let cluster = PgCluster::start(&settings);
    cluster
        .connect()
        .batch_execute("CREATE EXTENSION outbox_pg")
        .unwrap();
    cluster.connect().batch_execute(CLASSIC_OUTBOX).unwrap();
    cluster
}

/// 1. Drain: a preloaded backlog, published as fast as the publisher can.
fn drain(options: &Options) -> String {
    let events: i64 = if options.quick { 50_000 } else { 500_000 };
    let baseline_window = Duration::from_secs(if options.quick { 10 } else { 30 });
    let mut out = format!(
        "## 1. Drain: {events} preloaded events (≈200-byte payloads, 1,000 aggregates)\n\n\
         | broker | outbox_pg events/s | baseline relay events/s | ratio |\n|---|---|---|---|\n"
    );
    for broker in [
        Broker::mock(&[("bench.drain", 6)]),
        Broker::tansu(&[("bench.drain", 6)]),
    ] {
        // The worker is parked on a database that does not exist while the backlog is loaded.
        let cluster = cluster(
            &broker.bootstrap(),
            &[("outbox.database", "parked"), ("outbox.batch_size", "5000")],
        );
        let mut db = cluster.connect();
        let chunk = 50_000;
        for start in (0..events).step_by(chunk as usize) {
            db.batch_execute(&format!(
                "SELECT outbox.emit('order.created', (g % 1000)::text, {PAYLOAD_SQL}, topic => 'bench.drain')
                 FROM generate_series({start}, {}) g;
                 INSERT INTO classic_outbox (aggregate_id, event_type, payload)
                 SELECT (g % 1000)::text, 'order.created', {PAYLOAD_SQL} FROM generate_series({start}, {}) g;",
                start + chunk - 1,
                start + chunk - 1
            ))
            .unwrap();
        }
        for statement in [
            "VACUUM ANALYZE outbox.events",
            "VACUUM ANALYZE classic_outbox",
            "CHECKPOINT",
        ] {
            db.batch_execute(statement).unwrap();
        }

        let started = Instant::now();
        cluster.set("outbox.database", "postgres");
        // BENCH_PERF=1: profile the worker while it drains (perf record -g), for the closing notes.
        let _profile = std::env::var_os("BENCH_PERF").map(|_| {
            let pid = outbox_pg_harness::wait_for(Duration::from_secs(10), || {
                cluster.worker_pid("postgres")
            })
            .unwrap();
            std::process::Command::new("perf")
                .args([
                    "record",
                    "-g",
                    "-F",
                    "999",
                    "-o",
                    &format!("/tmp/perf.drain.{}", broker.name().replace(' ', "_")),
                ])
                .args(["-p", &pid.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        });
        assert!(
            wait_until(Duration::from_secs(600), || count_events(
                &mut db,
                "published_at IS NULL"
            ) == 0),
            "drain did not finish"
        );
        let elapsed = started.elapsed();
        if let Some(mut perf) = _profile {
            let _ = std::process::Command::new("kill")
                .args(["-INT", &perf.id().to_string()])
                .status();
            let _ = perf.wait();
        }
        let rate = events as f64 / elapsed.as_secs_f64();
        let stored = broker.stored("bench.drain", events as usize);
        assert_eq!(stored, events, "every event is on the broker exactly once");

        let relay = BaselineRelay::start(&cluster, &broker.bootstrap(), "bench.drain");
        std::thread::sleep(baseline_window);
        drop(relay);
        let relayed: i64 = db
            .query_one(
                "SELECT count(*) FROM classic_outbox WHERE published_at IS NOT NULL",
                &[],
            )
            .unwrap()
            .get(0);
        let baseline = relayed as f64 / baseline_window.as_secs_f64();
        println!(
            "drain [{}]: outbox_pg {rate:.0}/s in {elapsed:?}; baseline {baseline:.1}/s",
            broker.name()
        );
        writeln!(
            out,
            "| {} | {rate:.0} | {baseline:.1} | {:.0}× |",
            broker.name(),
            rate / baseline
        )
        .unwrap();
    }
    out.push_str(
        "\noutbox_pg: time from enabling the worker to an empty backlog, every event read back from the broker \
         by a consumer (distinct outbox-id headers). Baseline: rows marked published during its window; it polls every 1 s, \
         takes the 100 oldest rows, sends each and waits for its acknowledgement, then updates the row.\n\n",
    );
    out
}

/// 2. Latency: commit → consumer receive at a fixed rate, poll interval 1 s.
fn latency(options: &Options) -> String {
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
    for broker in [Broker::mock(&topics), Broker::tansu(&topics)] {
        for (rate, system, topic) in &runs {
            let (rate, system) = (*rate, *system);
            {
                let summary = if system == PRODUCER_ALONE {
                    measure_broker_floor(&broker, topic, rate, duration)
                } else {
                    measure_latency(&broker, topic, rate, duration, system == OUTBOX_PG)
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
         (fetch.wait.max.ms = 5) got the message. `synchronous_commit = off` on this cluster, because the \
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
    wait_until(Duration::from_secs(30), || {
        clock.received.lock().unwrap().len() >= clock.committed.lock().unwrap().len()
    });
    let from = Instant::now();
    produce_at_rate(&producer, topic, "measured", rate, duration, clock.clone());
    let to = Instant::now();
    wait_until(Duration::from_secs(10), || {
        clock.received.lock().unwrap().len() >= clock.committed.lock().unwrap().len()
    });
    let end = Instant::now();
    stop.store(true, Ordering::Relaxed);
    consumer.join().unwrap();
    clock.summary(from, to, end)
}

fn measure_latency(
    broker: &Broker,
    topic: &str,
    rate: u32,
    duration: Duration,
    outbox: bool,
) -> Summary {
    let cluster = cluster(
        &broker.bootstrap(),
        &[
            (
                "outbox.database",
                if outbox { "postgres" } else { "parked" },
            ),
            ("synchronous_commit", "off"),
        ],
    );
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
    wait_until(Duration::from_secs(30), || {
        clock.received.lock().unwrap().len() >= clock.committed.lock().unwrap().len()
    });
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
    wait_until(Duration::from_secs(10), || {
        let received = clock.received.lock().unwrap();
        clock
            .committed
            .lock()
            .unwrap()
            .keys()
            .all(|id| received.contains_key(id))
    });
    let end = Instant::now();
    stop.store(true, Ordering::Relaxed);
    consumer.join().unwrap();
    if std::env::var_os("BENCH_DEBUG").is_some() {
        let committed = clock.committed.lock().unwrap();
        let received = clock.received.lock().unwrap();
        let missing: Vec<&String> = committed
            .keys()
            .filter(|id| !received.contains_key(*id))
            .collect();
        println!("missing {} of {}", missing.len(), committed.len());
        let mut db = cluster.connect();
        for id in missing.iter().take(5) {
            let table = if outbox {
                "outbox.events"
            } else {
                "classic_outbox"
            };
            let rows = db.query(&format!("SELECT published_at::text, aggregate_id FROM {table} WHERE id = $1::text::uuid"), &[id]).unwrap();
            println!(
                "  {id}: {:?}",
                rows.iter()
                    .map(|r| (r.get::<_, Option<String>>(0), r.get::<_, String>(1)))
                    .collect::<Vec<_>>()
            );
        }
        if outbox {
            let mut slow: Vec<(&String, Duration)> = committed
                .iter()
                .filter_map(|(id, at)| {
                    received
                        .get(id)
                        .map(|r| (id, r.saturating_duration_since(*at)))
                })
                .collect();
            slow.sort_by_key(|(_, d)| std::cmp::Reverse(*d));
            for (id, latency) in slow.iter().take(8) {
                let row = db
                    .query_one(
                        "SELECT (extract(epoch from published_at - created_at) * 1000)::int, kafka_partition, seq FROM outbox.events WHERE id = $1::text::uuid",
                        &[id],
                    )
                    .unwrap();
                println!("  slow {id}: {latency:?}; published_at - created_at = {:?} ms, partition {:?}, seq {:?}", row.get::<_, Option<i32>>(0), row.get::<_, Option<i32>>(1), row.get::<_, i64>(2));
            }
        }
        let extra = received
            .keys()
            .filter(|id| !committed.contains_key(*id))
            .count();
        println!(
            "received but not committed-recorded: {extra}; received total {}",
            received.len()
        );
        println!(
            "{}",
            cluster
                .log()
                .lines()
                .filter(|l| l.contains("outbox"))
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    clock.summary(from, to, end)
}

/// 3. Emit cost: pgbench, business insert + emit() against business insert + classic INSERT.
fn emit_cost(options: &Options) -> String {
    let seconds = if options.quick { 5 } else { 15 };
    let history: i64 = if options.quick { 100_000 } else { 1_000_000 };
    let cluster = cluster(
        "127.0.0.1:9",
        &[("outbox.database", "parked"), ("fsync", "on")],
    );
    let mut db = cluster.connect();
    db.batch_execute(&format!(
        "CREATE TABLE bench_orders (id bigserial PRIMARY KEY, customer text NOT NULL, total numeric NOT NULL,
                                    created_at timestamptz NOT NULL DEFAULT now());
         SELECT outbox.emit('order.created', (g % 1000)::text, {PAYLOAD_SQL}) FROM generate_series(1, {history}) g;
         UPDATE outbox.events SET published_at = now();
         INSERT INTO classic_outbox (aggregate_id, event_type, payload, published_at)
         SELECT (g % 1000)::text, 'order.created', {PAYLOAD_SQL}, now() FROM generate_series(1, {history}) g;"
    ))
    .unwrap();
    for statement in [
        "VACUUM ANALYZE outbox.events",
        "VACUUM ANALYZE classic_outbox",
    ] {
        db.batch_execute(statement).unwrap();
    }
    let dir = std::env::temp_dir().join(format!("outbox-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let business = "\\set agg random(1, 1000)\nBEGIN;\nINSERT INTO bench_orders (customer, total) VALUES ('customer-' || :agg, 624.35);\n";
    let outbox_script = dir.join("outbox.sql");
    std::fs::write(
        &outbox_script,
        format!(
            "{business}SELECT outbox.emit('order.created', :agg, '{PAYLOAD_LITERAL}');\nEND;\n"
        ),
    )
    .unwrap();
    let classic_script = dir.join("classic.sql");
    std::fs::write(&classic_script, format!("{business}INSERT INTO classic_outbox (aggregate_id, event_type, payload) VALUES (:agg, 'order.created', '{PAYLOAD_LITERAL}');\nEND;\n")).unwrap();

    let mut out = format!(
        "## 3. Emit cost: pgbench, {seconds} s per run, {history} published rows already in each table\n\n\
         | commit | clients | business insert + `outbox.emit()` TPS | business insert + classic INSERT TPS | ratio |\n|---|---|---|---|---|\n"
    );
    for (label, synchronous_commit) in [("fsync'd", "on"), ("asynchronous", "off")] {
        cluster.set("synchronous_commit", synchronous_commit);
        for clients in [1, 8] {
            // Three alternating runs each, each after a checkpoint; the median of each is reported.
            let (mut outbox, mut classic) = (Vec::new(), Vec::new());
            for _ in 0..PGBENCH_ROUNDS {
                db.batch_execute("CHECKPOINT").unwrap();
                classic.push(pgbench(&cluster, &classic_script, clients, seconds));
                db.batch_execute("CHECKPOINT").unwrap();
                outbox.push(pgbench(&cluster, &outbox_script, clients, seconds));
            }
            let (outbox, classic) = (median(outbox), median(classic));
            println!("emit cost, {label}, {clients} clients: outbox {outbox:.0} TPS, classic {classic:.0} TPS");
            writeln!(
                out,
                "| {label} | {clients} | {outbox:.0} | {classic:.0} | {:.2}× |",
                outbox / classic
            )
            .unwrap();
        }
    }
    out.push_str(
        "\nBoth scripts insert the same business row and the same ≈200-byte payload in one transaction \
         (pgbench -M prepared). The classic table has a random UUIDv4 key and a partial index for its relay; \
         outbox.events has a time-ordered UUIDv7 key and a partial index on the emission sequence. Each run \
         starts after a CHECKPOINT, as every checkpoint cycle does in production; median of five \
         alternating runs.\n\n",
    );
    out.push_str(&server_side_cost(&mut db));
    out
}

/// pgbench runs per script and setting; the median is reported.
const PGBENCH_ROUNDS: usize = 5;

/// The server's own work per event, without the client round trips that dominate pgbench at one
/// client: a PL/pgSQL loop of emit() calls against a loop of the classic INSERT (both prepared
/// statements), in one transaction each, alternating; the fastest of the runs is the cost with
/// the least interference from the rest of the machine.
fn server_side_cost(db: &mut postgres::Client) -> String {
    const CALLS: i32 = 50_000;
    const RUNS: usize = 7;
    db.batch_execute(&format!(
        "CREATE FUNCTION bench_per_call(kind text, n int) RETURNS float8 LANGUAGE plpgsql AS $$
         DECLARE started timestamptz := clock_timestamp(); agg int; p jsonb := '{PAYLOAD_LITERAL}';
         BEGIN
           IF kind = 'outbox' THEN
             FOR i IN 1..n LOOP agg := 1 + i % 1000; PERFORM outbox.emit('order.created', agg, p); END LOOP;
           ELSIF kind = 'classic' THEN
             FOR i IN 1..n LOOP agg := 1 + i % 1000;
               INSERT INTO classic_outbox (aggregate_id, event_type, payload) VALUES (agg, 'order.created', p);
             END LOOP;
           ELSE
             FOR i IN 1..n LOOP agg := 1 + i % 1000; PERFORM agg; END LOOP;
           END IF;
           RETURN extract(epoch FROM clock_timestamp() - started) * 1e6 / n;
         END $$"
    ))
    .unwrap();
    let mut measure = |kind: &str, runs: &mut Vec<f64>| {
        let row = db
            .query_one("SELECT bench_per_call($1, $2)", &[&kind, &CALLS])
            .unwrap();
        runs.push(row.get::<_, f64>(0));
    };
    let (mut outbox, mut classic, mut empty) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        measure("classic", &mut classic);
        measure("outbox", &mut outbox);
        measure("empty", &mut empty);
    }
    let min = |runs: &[f64]| runs.iter().cloned().fold(f64::INFINITY, f64::min);
    let loop_cost = min(&empty);
    let (outbox, classic) = (min(&outbox) - loop_cost, min(&classic) - loop_cost);
    println!(
        "emit cost, server side: emit() {outbox:.2} µs, classic INSERT {classic:.2} µs per event"
    );
    format!(
        "Server side, per event ({CALLS} calls in a PL/pgSQL loop, fastest of {RUNS} alternating runs, \
         loop overhead of {loop_cost:.2} µs subtracted):\n\n\
         | `outbox.emit()` | classic INSERT | classic / emit() |\n|---|---|---|\n\
         | {outbox:.2} µs | {classic:.2} µs | {:.2}× |\n\n",
        classic / outbox
    )
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

fn pgbench(cluster: &PgCluster, script: &std::path::Path, clients: u32, seconds: u32) -> f64 {
    let output = std::process::Command::new("/usr/lib/postgresql/15/bin/pgbench")
        .args([
            "-n",
            "-h",
            "127.0.0.1",
            "-p",
            &cluster.port.to_string(),
            "-U",
            "postgres",
        ])
        .args([
            "-M",
            "prepared",
            "-c",
            &clients.to_string(),
            "-j",
            &clients.min(2).to_string(),
            "-T",
            &seconds.to_string(),
        ])
        .arg("-f")
        .arg(script)
        .arg("postgres")
        .output()
        .expect("pgbench");
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("pgbench: {text}{}", String::from_utf8_lossy(&output.stderr)))
}

/// 4. Sustained: a steady rate with a short retention; size and p99 every minute.
fn sustained(options: &Options) -> String {
    let minutes = if options.quick { 2 } else { 10 };
    let rate = 2000;
    let broker = Broker::mock(&[("bench.sustained", 6)]);
    let cluster = cluster(
        &broker.bootstrap(),
        &[("outbox.retention", "1min"), ("synchronous_commit", "off")],
    );
    let clock = Arc::new(Clock::default());
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = start_consumer(
        &broker.bootstrap(),
        "bench.sustained",
        clock.clone(),
        stop.clone(),
    );
    let statement = format!("SELECT outbox.emit('order.created', $1::text, '{PAYLOAD_LITERAL}', topic => 'bench.sustained')::text");
    let mut out = format!(
        "## 4. Sustained: {rate} events/s for {minutes} min, `outbox.retention = 1min` (mock cluster)\n\n\
         | minute | table + indexes | indexes | p99 latency | events |\n|---|---|---|---|---|\n"
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
        );
        let to = Instant::now();
        std::thread::sleep(Duration::from_millis(500));
        let summary = clock.summary(from, to, Instant::now());
        let row = db
            .query_one(
                "SELECT pg_total_relation_size('outbox.events'), pg_indexes_size('outbox.events')",
                &[],
            )
            .unwrap();
        let (total, indexes): (i64, i64) = (row.get(0), row.get(1));
        println!(
            "sustained minute {minute}: {total} bytes, p99 {:?}",
            summary.p99
        );
        writeln!(
            out,
            "| {minute} | {:.1} MB | {:.1} MB | {} | {} |",
            total as f64 / 1e6,
            indexes as f64 / 1e6,
            ms(summary.p99),
            summary.sent
        )
        .unwrap();
        sizes.push(total);
        p99s.push(summary.p99);
    }
    stop.store(true, Ordering::Relaxed);
    consumer.join().unwrap();
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
