//! The bad-input catalogue as a pg_regress file: `tests/pg_regress/sql/bad_input.sql` holds every
//! refused input (emit(), the admin functions, every setting), `expected/bad_input.out` its
//! exact error and SQLSTATE, and the file ends by proving that nothing in the outbox and no
//! setting changed. This test gives it a cluster in the state it needs (published history, one
//! pending event, paused), runs pg_regress, and shows that the outbox still works afterwards.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outbox_pg_harness::cluster::pg_bin;
use outbox_pg_harness::*;

/// The event whose id the catalogue uses for "already published".
const PUBLISHED_ID: &str = "01890000-0000-7000-8000-000000000001";

/// Runs pg_regress (the server's own, from PGXS) on `tests` against `cluster`; returns its
/// output and, on failure, the differences.
pub fn pg_regress(cluster: &PgCluster, tests: &[&str]) -> Result<String, String> {
    let pkglibdir = Command::new(pg_bin().join("pg_config"))
        .arg("--pkglibdir")
        .output()
        .unwrap();
    let pkglibdir = PathBuf::from(String::from_utf8_lossy(&pkglibdir.stdout).trim());
    let regress = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pg_regress");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/pg_regress");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let output = Command::new(pkglibdir.join("pgxs/src/test/regress/pg_regress"))
        .arg(format!("--inputdir={}", regress.display()))
        .arg(format!("--outputdir={}", out.display()))
        .arg(format!("--bindir={}", pg_bin().display()))
        .args(["--host=127.0.0.1", &format!("--port={}", cluster.port)])
        .args(["--user=postgres", "--use-existing", "--dbname=postgres"])
        .args(tests)
        .env_remove("PGOPTIONS")
        .output()
        .expect("pg_regress");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        let diffs = std::fs::read_to_string(out.join("regression.diffs")).unwrap_or_default();
        Err(format!(
            "{stdout}{}\n{diffs}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

#[test]
fn every_bad_input_gets_a_clear_error_and_changes_nothing() {
    let tansu = Tansu::start();
    tansu.create_topic("t", 1);
    // Retention off: the fixed id is older than any retention period and must stay.
    let cluster = PgCluster::publishing_to(&tansu.bootstrap(), &[("outbox.retention", "-1")]);
    let mut db = cluster.connect();
    db.batch_execute(&format!(
        "CREATE EXTENSION outbox_pg;
         SELECT outbox.emit('t', g, '{{}}') FROM generate_series(1, 20) g;
         INSERT INTO outbox.events (id, event_type, aggregate_id, payload)
         VALUES ('{PUBLISHED_ID}', 't', 'fixed', '{{}}');"
    ))
    .unwrap();
    assert!(wait_until_published(&mut db, Duration::from_secs(60)));
    db.batch_execute(
        "SELECT outbox.pause(); SELECT outbox.emit('t', 'pending', '{\"keep\": true}');",
    )
    .unwrap();

    if let Err(failure) = pg_regress(&cluster, &["contract", "bad_input"]) {
        panic!("pg_regress: {failure}");
    }

    // The outbox still works.
    db.batch_execute("SELECT outbox.resume()").unwrap();
    assert!(wait_until_published(&mut db, Duration::from_secs(60)));
}
