//! Scenario 1, drain: a preloaded backlog, published as fast as the publisher can.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use outbox_pg_bench::*;
use outbox_pg_harness::receipts_mark;

use crate::{cluster, Options};

pub fn run(options: &Options) -> String {
    let events: i64 = if options.quick { 50_000 } else { 500_000 };
    let baseline_window = Duration::from_secs(if options.quick { 10 } else { 30 });
    let mut out = format!(
        "## 1. Drain: {events} queued events (≈200-byte payloads, 1,000 aggregates)\n\n\
         | broker | outbox_pg events/s, recorded | consumer has read all | baseline relay events/s | ratio |\n\
         |---|---|---|---|---|\n"
    );
    let brokers = [
        wanted("BENCH_BROKERS", "mock").then(|| Broker::mock(&[("bench.drain", 6)])),
        wanted("BENCH_BROKERS", "tansu").then(|| Broker::tansu(&[("bench.drain", 6)])),
    ];
    for broker in brokers.into_iter().flatten() {
        let cluster = cluster(&broker.bootstrap(), &[]);
        let mut db = cluster.connect();
        db.batch_execute("SELECT outbox.pause()").unwrap();
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
        let counter = DistinctCounter::start(&broker.bootstrap(), "bench.drain", events as usize);
        let mark = receipts_mark(&mut db);
        let _profile = profile_worker(&cluster, broker.name());
        let started = Instant::now();
        db.batch_execute("SELECT outbox.resume()").unwrap();
        let recorded = time_until_recorded(&mut db, mark, events, Duration::from_secs(900))
            .expect("drain did not finish");
        let (read, read_at) = counter.finish(Duration::from_secs(600));
        assert_eq!(read, events as usize, "every event reached the broker once");
        let read_after = read_at.unwrap().duration_since(started);
        drop(_profile);
        let rate = events as f64 / recorded.as_secs_f64();

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
            "drain [{}]: outbox_pg {rate:.0}/s recorded in {recorded:?}, read after {read_after:?}; baseline {baseline:.1}/s",
            broker.name()
        );
        writeln!(
            out,
            "| {} | {rate:.0} ({:.2} s) | {:.2} s | {baseline:.1} | {:.0}× |",
            broker.name(),
            recorded.as_secs_f64(),
            read_after.as_secs_f64(),
            rate / baseline
        )
        .unwrap();
    }
    out.push_str(
        "\nThe backlog is committed while publishing is paused; the clock starts at `outbox.resume()` and stops \
         when the receipts (`outbox.batches`) cover every event. Beside it, when a consumer reading the topic \
         from the start had seen every `outbox-id` (each exactly once). Baseline: rows its relay marked \
         published during its window; it polls every 1 s, takes the 100 oldest rows, sends each and waits \
         for its acknowledgement, then updates the row.\n\n",
    );
    out
}

/// BENCH_PERF=1: records the worker's profile while it drains (perf record -g), stopped on
/// drop; BENCH_PERF=all records every process on the machine instead (who takes the CPU).
fn profile_worker(cluster: &outbox_pg_harness::PgCluster, broker: &str) -> Option<Profile> {
    let what = std::env::var("BENCH_PERF").ok()?;
    let pid = cluster.worker_pid("postgres")?;
    let target = if what == "all" {
        vec!["-a".to_string()]
    } else {
        vec!["-p".to_string(), pid.to_string()]
    };
    let child = std::process::Command::new("perf")
        .args(["record", "-e", "cpu-clock", "-g", "-F", "999", "-o"])
        .arg(format!("/tmp/perf.drain.{}", broker.replace(' ', "_")))
        .args(&target)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    Some(Profile(child))
}

struct Profile(std::process::Child);

impl Drop for Profile {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}
