//! `make bench`: outbox_pg side by side with the classic polling relay, on one machine, in one
//! run. Prints a results table and writes it to bench/RESULTS.md.
//!
//! `outbox-bench [--quick] [--minutes=4,20] [--report=PATH] [drain] [latency] [emit] [sustained]
//! [old-snapshot] [versions] [durability]`: every scenario by default; `--minutes` sets how long
//! the old-snapshot runs hold their snapshot (`make bench-hour`: 60). Only a full run rewrites
//! bench/RESULTS.md; `--report` writes any run's report to PATH.

mod drain;
mod durability;
mod emit_cost;
mod latency;
mod old_snapshot;
mod sustained;
mod versions;

use std::fmt::Write as _;

use outbox_pg_bench::*;
use outbox_pg_harness::PgCluster;

/// A scenario: runs and returns its section of the report.
type Scenario = fn(&Options) -> String;

pub struct Options {
    pub quick: bool,
    /// How long each old-snapshot run lasts; the runs without a snapshot only up to 20.
    pub minutes: Vec<u64>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let value = |name: &str| args.iter().find_map(|a| a.strip_prefix(name));
    let minutes = match value("--minutes=") {
        Some(list) => list
            .split(',')
            .map(|m| m.parse().expect("--minutes=N[,N...]: whole minutes"))
            .collect(),
        None if quick => vec![1],
        None => vec![4, 20],
    };
    let options = Options { quick, minutes };
    let report_to = value("--report=");
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
        "Machine: {}. PostgreSQL {} (scenario 6: the majors it names), one run of `outbox-bench{}` at {}.\n",
        machine(),
        server_version(),
        args.iter().map(|a| format!(" {a}")).collect::<String>(),
        commit()
    )
    .unwrap();
    let scenarios: [(&str, Scenario); 7] = [
        ("drain", drain::run),
        ("latency", latency::run),
        ("emit", emit_cost::run),
        ("sustained", sustained::run),
        ("old-snapshot", old_snapshot::run),
        ("versions", versions::run),
        ("durability", durability::run),
    ];
    for (name, scenario) in scenarios {
        if run(name) {
            let section = scenario(&options);
            println!("\n{section}");
            report.push_str(&section);
        }
    }
    println!("\n{report}");
    if let Some(path) = report_to {
        std::fs::write(path, &report).unwrap();
        println!("written to {path}");
    } else if !options.quick && wanted.is_empty() {
        std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/RESULTS.md"), &report).unwrap();
        println!("written to bench/RESULTS.md");
    }
}

/// The commit measured, marked when the work tree differs from it.
fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let head = git(&["rev-parse", "--short", "HEAD"]);
    if git(&["status", "--porcelain", "--untracked-files=no"]).is_empty() {
        format!("commit {head}")
    } else {
        format!("commit {head} with local changes")
    }
}

/// The version of the server the scenarios run on (OUTBOX_PG_BIN, set by `make bench PG=...`).
pub fn server_version() -> String {
    let output = std::process::Command::new(outbox_pg_harness::cluster::pg_bin().join("postgres"))
        .arg("--version")
        .output()
        .expect("postgres --version");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .trim_start_matches("postgres (PostgreSQL) ")
        .to_string()
}

/// A benchmark cluster publishing to `brokers`, with the outbox and the classic outbox table.
pub fn cluster(brokers: &str, extra: &[(&str, &str)]) -> PgCluster {
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
