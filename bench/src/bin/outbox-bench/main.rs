//! `make bench`: outbox_pg side by side with the classic polling relay, on one machine, in one
//! run. Prints a results table; a full run with the default durations and no `BENCH_*`
//! investigation settings writes it to bench/RESULTS.md.
//!
//! `outbox-bench [--quick] [--minutes=4,20] [--after=4] [--report=PATH] [drain] [latency] [emit]
//! [sustained] [old-snapshot] [versions] [durability] [neighbour]`: every scenario by default; `--minutes`
//! sets how long each old-snapshot run lasts (runs over 20 minutes are held only; `make
//! bench-hour`: 60), `--after` how long it goes on once the snapshot closed;
//! `--report` writes the report to PATH instead (checked before anything runs).

mod drain;
mod durability;
mod emit_cost;
mod latency;
mod neighbour;
mod old_snapshot;
mod sustained;
mod versions;

use std::fmt::Write as _;

use outbox_pg_bench::*;
use outbox_pg_harness::PgCluster;

/// A scenario: runs and returns its section of the report.
type Scenario = fn(&Options) -> String;

const SCENARIOS: [(&str, Scenario); 8] = [
    ("drain", drain::run),
    ("latency", latency::run),
    ("emit", emit_cost::run),
    ("sustained", sustained::run),
    ("old-snapshot", old_snapshot::run),
    ("versions", versions::run),
    ("durability", durability::run),
    ("neighbour", neighbour::run),
];

/// The old-snapshot durations of a full run, and how long it goes on after the snapshot.
const DEFAULT_MINUTES: [u64; 2] = [4, 20];
const DEFAULT_AFTER: u64 = 4;

pub struct Options {
    pub quick: bool,
    /// How long each old-snapshot run lasts; a run without a snapshot beside it only up to 20.
    pub minutes: Vec<u64>,
    /// How long the old-snapshot runs go on after the snapshot closed (sizes every 2 minutes).
    pub after: u64,
}

/// What the command line asks for; every mistake is refused before anything runs, since a
/// run takes up to hours.
struct Command {
    options: Options,
    report_to: Option<std::path::PathBuf>,
    wanted: Vec<String>,
}

impl Command {
    fn parse(args: &[String]) -> Result<Command, String> {
        let mut command = Command {
            options: Options {
                quick: false,
                minutes: Vec::new(),
                after: DEFAULT_AFTER,
            },
            report_to: None,
            wanted: Vec::new(),
        };
        for arg in args {
            if arg == "--quick" {
                command.options.quick = true;
            } else if let Some(list) = arg.strip_prefix("--minutes=") {
                command.options.minutes = list
                    .split(',')
                    .map(|m| m.trim().parse::<u64>().ok().filter(|&m| m >= 1))
                    .collect::<Option<_>>()
                    .ok_or("--minutes=N[,N...]: whole minutes, at least 1")?;
            } else if let Some(after) = arg.strip_prefix("--after=") {
                command.options.after = after
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|&m| m >= 2 && m % 2 == 0)
                    .ok_or("--after=N: whole minutes, even, at least 2")?;
            } else if let Some(path) = arg.strip_prefix("--report=") {
                if path.is_empty() {
                    return Err("--report=PATH: a file to write".into());
                }
                command.report_to = Some(path.into());
            } else if SCENARIOS.iter().any(|(name, _)| name == arg) {
                command.wanted.push(arg.clone());
            } else {
                return Err(format!("unknown argument \"{arg}\""));
            }
        }
        if command.options.minutes.is_empty() {
            command.options.minutes = if command.options.quick {
                vec![1]
            } else {
                DEFAULT_MINUTES.to_vec()
            };
        }
        Ok(command)
    }

    /// Where the report goes: `--report`, or bench/RESULTS.md for a full run as documented.
    fn destination(&self, investigating: bool) -> Option<std::path::PathBuf> {
        if self.report_to.is_some() {
            return self.report_to.clone();
        }
        let full = !self.options.quick
            && self.wanted.is_empty()
            && self.options.minutes == DEFAULT_MINUTES
            && self.options.after == DEFAULT_AFTER
            && !investigating;
        full.then(|| concat!(env!("CARGO_MANIFEST_DIR"), "/RESULTS.md").into())
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = Command::parse(&args).unwrap_or_else(|error| {
        eprintln!("outbox-bench: {error}");
        std::process::exit(2);
    });
    // Settings that change the figures are named in the report, and keep it out of RESULTS.md.
    let investigation: Vec<String> = std::env::vars()
        .filter(|(name, _)| {
            name.starts_with("BENCH_")
                && !["BENCH_VERSIONS", "BENCH_COMMIT", "BENCH_ARGS"].contains(&name.as_str())
        })
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    investigation_producer_settings(); // refused now if malformed
    let destination = command.destination(!investigation.is_empty());
    if let Some(path) = &destination {
        // Fail now, not after the run.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap_or_else(|e| panic!("cannot write the report to {}: {e}", path.display()));
    }
    let options = &command.options;

    let mut report = String::new();
    writeln!(report, "# outbox_pg benchmark results\n").unwrap();
    writeln!(
        report,
        "Machine: {}. PostgreSQL {} (scenario 6: the majors it names), one run of `outbox-bench{}` at {}{}.\n",
        machine(),
        server_version(),
        args.iter().map(|a| format!(" {a}")).collect::<String>(),
        commit(),
        if investigation.is_empty() {
            String::new()
        } else {
            format!(", with {}", investigation.join(", "))
        }
    )
    .unwrap();
    for (name, scenario) in SCENARIOS {
        if command.wanted.is_empty() || command.wanted.iter().any(|w| w == name) {
            let section = scenario(options);
            println!("\n{section}");
            report.push_str(&section);
            // Written after each section: a late failure keeps what was measured.
            if let Some(path) = &destination {
                if let Err(e) = std::fs::write(path, &report) {
                    eprintln!("outbox-bench: cannot write {}: {e}", path.display());
                }
            }
        }
    }
    println!("\n{report}");
    if let Some(path) = &destination {
        println!("written to {}", path.display());
    }
}

/// The commit measured: BENCH_COMMIT (the Makefile takes `git describe --dirty` before it
/// builds and installs), else the work tree's HEAD now.
fn commit() -> String {
    if let Ok(described) = std::env::var("BENCH_COMMIT") {
        if !described.is_empty() {
            return format!("commit {described}");
        }
    }
    let described = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match described {
        Some(described) => format!("commit {described} (the work tree when the run started)"),
        None => "an unknown commit".to_string(),
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
