//! Scenario 3, emit cost: pgbench, business insert + emit() against business insert + classic INSERT
//! (bare, and returning its id as emit() does), and the server's own cost per call.

use std::fmt::Write as _;

use outbox_pg_bench::*;
use outbox_pg_harness::{process, wait_until, PgCluster};

use crate::{cluster, Options};

pub fn run(options: &Options) -> String {
    // Many short rounds rather than a few long ones: one pair moves by ±10–20% on this shared
    // 2-core machine, so the number of pairs is what resolves a difference of a few percent.
    let (rounds, seconds) = if options.quick { (6, 3) } else { (20, 5) };
    // BENCH_EMIT_HISTORY=N: rows already in each table (when investigating what the classic
    // table's size does to the comparison).
    let history: i64 = std::env::var("BENCH_EMIT_HISTORY")
        .ok()
        .map(|n| n.parse().expect("BENCH_EMIT_HISTORY: a number of rows"))
        .unwrap_or(if options.quick { 100_000 } else { 1_000_000 });
    let cluster = cluster(
        "127.0.0.1:9",
        &[("outbox.database", "parked"), ("fsync", "on")],
    );
    let mut db = cluster.connect();
    db.batch_execute(&format!(
        "CREATE TABLE bench_orders (id bigserial PRIMARY KEY, customer text NOT NULL, total numeric NOT NULL,
                                    created_at timestamptz NOT NULL DEFAULT now());
         SELECT outbox.emit('order.created', (g % 1000)::text, {PAYLOAD_SQL}) FROM generate_series(1, {history}) g;
         INSERT INTO classic_outbox (aggregate_id, event_type, payload, published_at)
         SELECT (g % 1000)::text, 'order.created', {PAYLOAD_SQL}, now() FROM generate_series(1, {history}) g;
         -- The RETURNING script's own copy, so that each classic table takes one script's rows.
         CREATE TABLE classic_returning (LIKE classic_outbox INCLUDING ALL);
         INSERT INTO classic_returning SELECT * FROM classic_outbox;"
    ))
    .unwrap();
    for statement in [
        "VACUUM ANALYZE outbox.events",
        "VACUUM ANALYZE classic_outbox",
        "VACUUM ANALYZE classic_returning",
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
    let classic_insert = |table: &str| {
        format!("INSERT INTO {table} (aggregate_id, event_type, payload) VALUES (:agg, 'order.created', '{PAYLOAD_LITERAL}')")
    };
    let classic_script = dir.join("classic.sql");
    std::fs::write(
        &classic_script,
        format!("{business}{};\nEND;\n", classic_insert("classic_outbox")),
    )
    .unwrap();
    // The same INSERT returning its id, as emit() returns the event's: the client then receives a
    // row, which it must also do for emit() (the client shares this machine's cores).
    let returning_script = dir.join("classic_returning.sql");
    std::fs::write(
        &returning_script,
        format!(
            "{business}{} RETURNING id;\nEND;\n",
            classic_insert("classic_returning")
        ),
    )
    .unwrap();

    let mut tps_table = format!(
        "## 3. Emit cost: pgbench, {rounds} rounds of {seconds} s per setting, {history} rows already in each table\n\n\
         | commit | clients | business insert + `outbox.emit()` TPS | business insert + classic INSERT TPS | classic `INSERT … RETURNING id` TPS | emit() over classic: pairs' median (range, below 1) | emit() over RETURNING: pairs' median (range, below 1) |\n|---|---|---|---|---|---|---|\n"
    );
    let mut cpu_table = String::from(
        "| commit | clients | server CPU per transaction: emit() / classic / RETURNING | emit() over classic: pairs' median (range, below 1) | pgbench CPU per transaction: emit() / classic / RETURNING | emit() over classic: pairs' median (range, below 1) | emit() over RETURNING: pairs' median (range, below 1) |\n|---|---|---|---|---|---|---|\n",
    );
    for (label, synchronous_commit) in [("fsync'd", "on"), ("asynchronous", "off")] {
        cluster.set("synchronous_commit", synchronous_commit);
        for clients in [1, 8] {
            // Rounds of one run per script, each after a checkpoint: emit() in the middle, the
            // two classic scripts taking turns before and after it (each in half the rounds), so
            // that both comparisons with emit() are balanced; each script's median is reported,
            // and each round's pairs as ratios, to show how far one comparison moves on this
            // machine.
            let scripts = [&classic_script, &outbox_script, &returning_script];
            let mut runs: [Vec<Run>; 3] = [Vec::new(), Vec::new(), Vec::new()];
            for round in 0..rounds {
                for turn in 0..scripts.len() {
                    let which = if round % 2 == 0 {
                        turn
                    } else {
                        scripts.len() - 1 - turn
                    };
                    db.batch_execute("CHECKPOINT").unwrap();
                    runs[which].push(pgbench(&cluster, &mut db, scripts[which], clients, seconds));
                }
            }
            let of = |which: usize, field: fn(&Run) -> f64| -> Vec<f64> {
                runs[which].iter().map(field).collect()
            };
            let (classic, outbox, returning) = (0, 1, 2);
            let tps = |which| of(which, |r| r.tps);
            let server = |which| of(which, |r| r.server_us);
            let client = |which| of(which, |r| r.client_us);
            let (paired, spread) = pairs(&tps(outbox), &tps(classic));
            let (paired_returning, spread_returning) = pairs(&tps(outbox), &tps(returning));
            let (server_paired, server_spread) = pairs(&server(outbox), &server(classic));
            let (client_paired, client_spread) = pairs(&client(outbox), &client(classic));
            let (client_returning, client_returning_spread) =
                pairs(&client(outbox), &client(returning));
            let [tps_o, tps_c, tps_r] = [outbox, classic, returning].map(|w| median(&tps(w)));
            let [server_o, server_c, server_r] =
                [outbox, classic, returning].map(|w| median(&server(w)));
            let [client_o, client_c, client_r] =
                [outbox, classic, returning].map(|w| median(&client(w)));
            println!(
                "emit cost, {label}, {clients} clients: outbox {tps_o:.0} TPS, classic {tps_c:.0} TPS, pairs {paired:.3}; \
                 returning {tps_r:.0} TPS, pairs {paired_returning:.3}; server CPU per transaction pairs {server_paired:.3}"
            );
            writeln!(
                tps_table,
                "| {label} | {clients} | {tps_o:.0} | {tps_c:.0} | {tps_r:.0} | {paired:.3}× {spread} | {paired_returning:.3}× {spread_returning} |"
            )
            .unwrap();
            writeln!(
                cpu_table,
                "| {label} | {clients} | {server_o:.1} / {server_c:.1} / {server_r:.1} µs | {server_paired:.3}× {server_spread} | {client_o:.1} / {client_c:.1} / {client_r:.1} µs | {client_paired:.3}× {client_spread} | {client_returning:.3}× {client_returning_spread} |"
            )
            .unwrap();
        }
    }
    let mut out = tps_table;
    out.push_str(
        "\nBoth scripts insert the same business row and the same ≈200-byte payload in one transaction \
         (pgbench -M prepared). The classic table has a random UUIDv4 key and a partial index for its relay \
         (its rows marked published); outbox.events, as shipped, has a time-ordered UUIDv7 key, indexes on \
         (seq, id) and (xid, seq), and its stamp trigger. Each run \
         starts after a CHECKPOINT, as every checkpoint cycle does in production; TPS: the median of \
         each script's runs; pairs: each round's emit() run \
         over its classic run (emit() running between the two classic scripts, which take turns at going first), their median, range \
         and how many were below 1. emit() returns the event's id, so its client receives a row \
         per transaction that a bare INSERT does not send; the RETURNING columns compare it with \
         the classic INSERT returning its id, since pgbench shares the machine's cores with the \
         server.\n\n\
         What each transaction cost in CPU time, in the same runs: the whole server's (every \
         process of the cluster, from /proc, counted from after the checkpoint until pgbench's \
         backends have ended, so it includes the background work the run caused or met: WAL \
         writer, autovacuum) and pgbench's, over the transactions pgbench completed; medians, \
         and pairs as above (here below 1 means emit() cost less). Unlike TPS, it leaves out the \
         time the machine gave to processes outside the cluster and pgbench.\n\n",
    );
    out.push_str(&cpu_table);
    out.push('\n');
    out.push_str(&server_side_cost(&mut db));
    out
}

/// Each round's ratio of `runs` over `against`: their median, and the range and how many were
/// below 1, as "(low–high, n of rounds)".
fn pairs(runs: &[f64], against: &[f64]) -> (f64, String) {
    let ratios: Vec<f64> = runs.iter().zip(against).map(|(r, a)| r / a).collect();
    let (lowest, highest) = range(&ratios);
    let below = ratios.iter().filter(|&&r| r < 1.0).count();
    (
        median(&ratios),
        format!("({lowest:.3}–{highest:.3}, {below} of {})", ratios.len()),
    )
}

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
    let loop_cost = range(&empty).0;
    let (outbox, classic) = (range(&outbox).0 - loop_cost, range(&classic).0 - loop_cost);
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

/// One pgbench run: its throughput, and the CPU time per transaction of the server and of
/// pgbench itself.
struct Run {
    tps: f64,
    server_us: f64,
    client_us: f64,
}

fn pgbench(
    cluster: &PgCluster,
    db: &mut postgres::Client,
    script: &std::path::Path,
    clients: u32,
    seconds: u32,
) -> Run {
    let me = std::process::id() as i32;
    let (server_before, client_before) = (cluster.cpu_time(), process::cpu_time(me).1);
    let output = std::process::Command::new(outbox_pg_harness::cluster::pg_bin().join("pgbench"))
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
    // pgbench has ended (its time is in ours); its backends end after it, and their time counts
    // once the postmaster has reaped them.
    let client = process::cpu_time(me).1.saturating_sub(client_before);
    let ended = wait_until(std::time::Duration::from_secs(10), || {
        let left: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgbench'",
                &[],
            )
            .unwrap()
            .get(0);
        left == 0
    });
    assert!(ended, "pgbench's backends end");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let server = cluster.cpu_time().saturating_sub(server_before);
    let text = String::from_utf8_lossy(&output.stdout);
    let figure = |prefix: &str, nth: usize| -> f64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(nth))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("pgbench: {text}{}", String::from_utf8_lossy(&output.stderr)))
    };
    let transactions = figure("number of transactions actually processed:", 5);
    Run {
        tps: figure("tps = ", 2),
        server_us: server.as_secs_f64() * 1e6 / transactions,
        client_us: client.as_secs_f64() * 1e6 / transactions,
    }
}
