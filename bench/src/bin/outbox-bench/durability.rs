//! Scenario 7, durability: what waiting for the WAL flush before producing costs. With
//! `fsync = on`, the drain and the latency at 500 events/s (what this machine can fsync) with
//! `synchronous_commit` on (the committers flushed already: the worker's wait finds nothing to do)
//! and off (the worker flushes once per batch, for the commits in it), beside a single fsync as
//! `pg_test_fsync` measures it on the same disk.

use std::fmt::Write as _;
use std::time::Duration;

use outbox_pg_bench::*;

use crate::{latency, versions, Options};

pub fn run(options: &Options) -> String {
    let events: i64 = if options.quick { 20_000 } else { 100_000 };
    let duration = Duration::from_secs(if options.quick { 10 } else { 30 });
    let mut out = format!(
        "## 7. Durability: `fsync = on`; drain of {events} queued events, latency at 500 events/s for {} s (mock cluster)\n\n\
         | `synchronous_commit` | drain events/s | p50 | p95 | p99 | max |\n|---|---|---|---|---|---|\n",
        duration.as_secs()
    );
    for sync in ["on", "off"] {
        let settings = [("fsync", "on"), ("synchronous_commit", sync)];
        let rate = versions::drain(events, &settings);
        let rate_per_s = 500;
        let topics = Topics::rotating(
            &format!("bench.durability.{sync}"),
            duration,
            rotation_period(rate_per_s),
            6,
        );
        let broker = Broker::mock(&topics.specs());
        let summary =
            latency::measure_latency(&broker, &topics, rate_per_s, duration, true, &settings);
        let [p50, p95, p99, max] = summary.cells();
        println!("durability [synchronous_commit={sync}]: drain {rate:.0}/s, latency {summary:?}");
        writeln!(
            out,
            "| {sync} | {rate:.0} | {p50} | {p95} | {p99} | {max} |"
        )
        .unwrap();
    }
    let fsync = single_fsync();
    writeln!(
        out,
        "\nOne WAL flush on this disk (`pg_test_fsync`, fdatasync, one 8 kB write): {fsync}. With \
         `synchronous_commit = off` the worker pays about one such flush per batch before producing, \
         instead of each committer paying one per commit; that is the whole cost of never publishing \
         an event a crash takes back.\n"
    )
    .unwrap();
    out
}

/// `pg_test_fsync`'s fdatasync figure for one write, as it prints it.
fn single_fsync() -> String {
    let dir = std::path::Path::new("/tmp/outbox_pg_bench_fsync");
    let _ = std::fs::create_dir_all(dir);
    let output =
        std::process::Command::new(outbox_pg_harness::cluster::pg_bin().join("pg_test_fsync"))
            .args(["-s", "2", "-f"])
            .arg(dir.join("probe"))
            .output();
    let Ok(output) = output else {
        return "pg_test_fsync not found".into();
    };
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .skip_while(|l| !l.contains("one 8kB write"))
        .find(|l| l.trim_start().starts_with("fdatasync"))
        .and_then(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            // "fdatasync  1234.567 ops/sec  810 usecs/op": the time per flush.
            words.len().checked_sub(2).map(|i| words[i..].join(" "))
        })
        .unwrap_or_else(|| "not measured".into())
}
