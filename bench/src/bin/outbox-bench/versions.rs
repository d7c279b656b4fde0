//! Scenario 6, versions: the drain and the latency at 5,000 events/s against the mock cluster,
//! on each PostgreSQL major in BENCH_VERSIONS (default `15,17`), in this one run. The extension
//! must be installed for each (`make bench` does it).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use outbox_pg_bench::*;
use outbox_pg_harness::receipts_mark;

use crate::{cluster, latency, server_version, Options};

const TOPIC: &str = "bench.versions";
/// The rate of the majors' latency runs, events/s.
const LATENCY_RATE: u32 = 5000;

pub fn run(options: &Options) -> String {
    let majors: Vec<String> = std::env::var("BENCH_VERSIONS")
        .unwrap_or_else(|_| "15,17".into())
        .split(',')
        .map(|v| v.trim().to_string())
        .collect();
    let events: i64 = if options.quick { 50_000 } else { 200_000 };
    let duration = Duration::from_secs(if options.quick { 10 } else { 30 });
    let mut out = format!(
        "## 6. PostgreSQL majors: drain of {events} queued events and latency at 5,000 events/s for {} s (mock cluster)\n\n\
         | server | drain events/s | p50 | p95 | p99 | max |\n|---|---|---|---|---|---|\n",
        duration.as_secs()
    );
    let before = std::env::var_os("OUTBOX_PG_BIN");
    for major in &majors {
        // SAFETY of set_var: the bench is single-threaded between scenarios; no thread reads the
        // environment while it changes.
        std::env::set_var("OUTBOX_PG_BIN", server_bin(major));
        let version = server_version();
        let rate = drain(events, &[]);
        let topics = Topics::rotating(
            &format!("{TOPIC}.{major}"),
            duration,
            rotation_period(LATENCY_RATE),
            6,
        );
        let broker = Broker::mock(&topics.specs());
        let summary = latency::measure_latency(&broker, &topics, LATENCY_RATE, duration, true, &[]);
        let [p50, p95, p99, max] = summary.cells();
        println!("versions [{version}]: drain {rate:.0}/s, latency {summary:?}");
        writeln!(
            out,
            "| {version} | {rate:.0} | {p50} | {p95} | {p99} | {max} |"
        )
        .unwrap();
    }
    match before {
        Some(bin) => std::env::set_var("OUTBOX_PG_BIN", bin),
        None => std::env::remove_var("OUTBOX_PG_BIN"),
    }
    out.push_str(&format!(
        "\nSame settings as scenarios 1 and 2 (`synchronous_commit = off` for the latency run, a \
             fresh topic every {} s); the majors run one after the other on the same machine.\n\n",
        rotation_period(LATENCY_RATE).as_secs_f64()
    ));
    out
}

/// Where the tests and `make` find a major's binaries: Debian's 15, the cached server builds
/// (scripts/install-deps.sh) for the others.
fn server_bin(major: &str) -> PathBuf {
    if major == "15" {
        PathBuf::from("/usr/lib/postgresql/15/bin")
    } else {
        let servers =
            std::env::var("OUTBOX_PG_SERVERS").unwrap_or_else(|_| "/opt/outbox_pg".into());
        PathBuf::from(format!("{servers}/postgresql-{major}/bin"))
    }
}

/// Events per second from `outbox.resume()` until every receipt is recorded, on a cluster with
/// `settings`.
pub fn drain(events: i64, settings: &[(&str, &str)]) -> f64 {
    let broker = Broker::mock(&[(TOPIC, 6)]);
    let cluster = cluster(&broker.bootstrap(), settings);
    let mut db = cluster.connect();
    db.batch_execute("SELECT outbox.pause()").unwrap();
    db.batch_execute(&format!(
        "SELECT outbox.emit('order.created', (g % 1000)::text, {PAYLOAD_SQL}, topic => '{TOPIC}')
         FROM generate_series(1, {events}) g;"
    ))
    .unwrap();
    db.batch_execute("VACUUM ANALYZE outbox.events").unwrap();
    db.batch_execute("CHECKPOINT").unwrap();
    let mark = receipts_mark(&mut db);
    let started = Instant::now();
    db.batch_execute("SELECT outbox.resume()").unwrap();
    time_until_recorded(&mut db, mark, events, Duration::from_secs(900)).expect("drain finished");
    events as f64 / started.elapsed().as_secs_f64()
}
