//! The binary packages, installed as an operator would (`make test-packages`, after
//! `make package` and `make uninstall`): the previous release's .deb, a stream of events, the
//! current .deb installed over it while events are in flight, the update; then the tarball on
//! another major. Changes the server's installed files; run alone, as root.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox_pg_harness::*;

const TIMEOUT: Duration = Duration::from_secs(60);
const PACKAGE: &str = "postgresql-15-outbox-pg";

fn package_dir(variable: &str, default: &str) -> PathBuf {
    std::env::var_os(variable)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../..")
                .join(default)
        })
}

/// The one .deb for PostgreSQL 15 in `dir`, with its version.
fn deb_in(dir: &Path) -> (PathBuf, String) {
    let debs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e} (run make package)", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(&format!("{PACKAGE}_")) && name.ends_with("_amd64.deb")
        })
        .collect();
    assert_eq!(
        debs.len(),
        1,
        "one .deb for 15 in {}: {debs:?}",
        dir.display()
    );
    let version = run("dpkg-deb", &["-f", debs[0].to_str().unwrap(), "Version"]);
    (debs[0].clone(), version.trim().to_string())
}

fn run(program: &str, args: &[&str]) -> String {
    outbox_pg_harness::process::run(Command::new(program).args(args))
}

/// Every outbox_pg file in the server's library and extension directories belongs to the
/// package, and the package holds the library, the control file and `expected_scripts`.
fn assert_package_owns_every_file(expected_version: &str, expected_scripts: &[&str]) {
    let status = run(
        "dpkg-query",
        &["-W", "-f", "${Version} ${db:Status-Abbrev}", PACKAGE],
    );
    assert_eq!(status.trim(), format!("{expected_version} ii"), "installed");
    let listed: Vec<String> = run("dpkg", &["-L", PACKAGE])
        .lines()
        .map(str::to_string)
        .collect();
    let mut present = Vec::new();
    for dir in [
        "/usr/lib/postgresql/15/lib",
        "/usr/share/postgresql/15/extension",
    ] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("outbox_pg")
            {
                present.push(path.to_string_lossy().into_owned());
            }
        }
    }
    for file in &present {
        assert!(
            listed.contains(file),
            "{file} is installed but not by {PACKAGE}"
        );
    }
    let must = [
        "/usr/lib/postgresql/15/lib/outbox_pg.so".to_string(),
        "/usr/share/postgresql/15/extension/outbox_pg.control".to_string(),
    ]
    .into_iter()
    .chain(
        expected_scripts
            .iter()
            .map(|s| format!("/usr/share/postgresql/15/extension/{s}")),
    );
    for file in must {
        assert!(present.contains(&file), "{file} is missing");
    }
}

/// Emits one event every few milliseconds until stopped, over reconnects and restarts; returns
/// the ids whose transaction committed (an emit that failed, or whose commit got no answer, is
/// not counted: the audit then allows it either way) and how many emit() refused.
fn emit_until(
    cluster: &PgCluster,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(Vec<String>, usize)> {
    let port = cluster.port;
    std::thread::spawn(move || {
        let mut committed = Vec::new();
        let mut refused = 0;
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
            let Ok(mut db) = postgres::Client::connect(&url, postgres::NoTls) else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let emitted = db.query_one(
                    "SELECT outbox.emit('t', $1::text, jsonb_build_object('n', $2::int))::text",
                    &[&format!("k{}", n % 10), &n],
                );
                match emitted {
                    Ok(row) => committed.push(row.get(0)),
                    // The server going down under it (the restart): reconnect.
                    Err(error)
                        if db.is_closed()
                            || error.is_closed()
                            || error.code().is_some_and(|c| c.code().starts_with("57")) =>
                    {
                        break
                    }
                    // Between the restart and ALTER EXTENSION UPDATE the new library refuses
                    // the old SQL's emit() clearly; nothing is written.
                    Err(error) if error.code().is_some_and(|c| c.code() == "55000") => refused += 1,
                    Err(error) => panic!("emit() failed on a running server: {error:?}"),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        (committed, refused)
    })
}

#[test]
fn the_deb_installs_publishes_and_upgrades_over_the_previous_release_with_events_in_flight() {
    let (previous, previous_version) = deb_in(&package_dir(
        "OUTBOX_PREVIOUS_PACKAGES",
        "target/package-previous",
    ));
    let (current, current_version) = deb_in(&package_dir("OUTBOX_PACKAGES", "target/package"));
    assert_ne!(previous_version, current_version);

    run("dpkg", &["-i", previous.to_str().unwrap()]);
    assert_package_owns_every_file(
        &previous_version,
        &[&format!("outbox_pg--{previous_version}.sql")],
    );
    let mock = mock_cluster(&[("t", 3)]);
    let cluster = PgCluster::publishing_to(&mock.bootstrap_servers(), &[]);
    let mut admin = cluster.connect();
    admin.batch_execute("CREATE EXTENSION outbox_pg").unwrap();
    let version = |db: &mut postgres::Client| -> String {
        db.query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'outbox_pg'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(version(&mut admin), previous_version);
    let consumer = TopicReader::new(&mock.bootstrap_servers(), &["t"]);
    let mut received = Vec::new();
    let stop = Arc::new(AtomicBool::new(false));
    let emitter = emit_until(&cluster, stop.clone());
    consumer.read_into(&mut received, 100, TIMEOUT);
    assert!(received.len() >= 100, "the previous release publishes");

    // The current package over it, while events flow.
    run("dpkg", &["-i", current.to_str().unwrap()]);
    assert_package_owns_every_file(
        &current_version,
        &[
            &format!("outbox_pg--{current_version}.sql"),
            &format!("outbox_pg--{previous_version}--{current_version}.sql"),
        ],
    );
    // The server still runs the old library: Postgres resolves the new script's C functions in
    // the library it already loaded (by path), so the update is refused by Postgres itself,
    // changes nothing, and nothing stops.
    let refused = admin
        .batch_execute("ALTER EXTENSION outbox_pg UPDATE")
        .unwrap_err();
    let error = refused.as_db_error().expect("a server error");
    assert_eq!(error.code().code(), "42883", "{refused:?}");
    assert!(
        error.message().starts_with("could not find function")
            && error.message().contains("outbox_pg.so"),
        "{refused:?}"
    );
    println!(
        "ALTER EXTENSION UPDATE before the restart: {}",
        error.message()
    );
    assert_eq!(version(&mut admin), previous_version);
    let before = received.len();
    consumer.read_into(&mut received, before + 100, TIMEOUT);
    assert!(
        received.len() >= before + 100,
        "the old worker goes on publishing"
    );

    // Restart: the new library with the old SQL publishes nothing and says why; emit() is
    // refused with 55000 until the update.
    let mark = cluster.log_mark();
    cluster.pg_ctl_stop("fast");
    cluster.pg_ctl_start();
    assert!(cluster.wait_for_log_after(
        mark,
        &format!("extension version {previous_version} is installed but the library is {current_version}"),
        TIMEOUT
    ));
    let mut admin = cluster.connect();
    std::thread::sleep(Duration::from_secs(1));
    admin
        .batch_execute("ALTER EXTENSION outbox_pg UPDATE")
        .unwrap();
    assert_eq!(version(&mut admin), current_version);
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let (committed, refused) = emitter.join().unwrap();
    assert!(wait_until_every_row_published(&mut admin, TIMEOUT));
    consumer.read_into(&mut received, committed.len(), TIMEOUT);
    consumer.read_all_into(&mut received, Duration::from_secs(2), TIMEOUT);

    let mut copies: HashMap<&str, usize> = HashMap::new();
    for message in &received {
        *copies.entry(message.header("outbox-id")).or_default() += 1;
    }
    let lost = committed
        .iter()
        .filter(|id| !copies.contains_key(id.as_str()))
        .count();
    let twice = copies.values().filter(|&&n| n > 1).count();
    println!(
        "{} events committed across the package upgrade, {refused} emit() calls refused between the restart and the update, {} received: {lost} lost, {twice} published twice",
        committed.len(),
        received.len()
    );
    assert_eq!(lost, 0, "nothing committed is lost");
    assert_eq!(twice, 0, "nothing is published twice");
    assert!(copies.len() >= committed.len());
}
