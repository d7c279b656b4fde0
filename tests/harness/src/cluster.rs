//! A throwaway PostgreSQL cluster (15 from Debian, or the server OUTBOX_PG_BIN points at) with outbox_pg preloaded, run as the `postgres` OS user.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::{free_port, wait_until};

/// The server's binaries: OUTBOX_PG_BIN (the Makefile sets it from PG / PG_CONFIG), else
/// Debian's PostgreSQL 15.
pub fn pg_bin() -> PathBuf {
    std::env::var_os("OUTBOX_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

/// Whether the server's library directory holds `name`.so (an extension other than ours, such
/// as pgaudit, that only some server builds have).
pub fn server_has_library(name: &str) -> bool {
    let output = Command::new(pg_bin().join("pg_config"))
        .arg("--pkglibdir")
        .output()
        .expect("pg_config --pkglibdir");
    let dir = String::from_utf8_lossy(&output.stdout).trim().to_string();
    Path::new(&dir).join(format!("{name}.so")).exists()
}

static CLUSTERS: AtomicUsize = AtomicUsize::new(0);

pub struct PgCluster {
    pub port: u16,
    dir: PathBuf,
}

impl PgCluster {
    /// initdb + start, with outbox_pg preloaded and `settings` appended to postgresql.conf.
    pub fn start(settings: &[(&str, &str)]) -> Self {
        let n = CLUSTERS.fetch_add(1, Ordering::SeqCst);
        let dir = PathBuf::from(format!("/tmp/outbox_pg_e2e/{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        chown_postgres(&dir);
        let cluster = PgCluster {
            port: free_port(),
            dir,
        };
        as_postgres(&[
            pg_bin().join("initdb").to_str().unwrap(),
            "-D",
            cluster.data().to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]);
        let mut conf = format!(
            "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             shared_preload_libraries = 'outbox_pg'\nfsync = off\nlog_min_messages = info\n\
             max_worker_processes = 16\nmax_prepared_transactions = 10\n",
            cluster.port,
            cluster.dir.display()
        );
        for (name, value) in settings {
            conf.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
        }
        let conf_path = cluster.data().join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path).unwrap();
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing).unwrap();
        cluster.pg_ctl_start();
        cluster
    }

    /// A cluster publishing database `postgres` to `brokers`, polling every 200 ms (tests should
    /// not wait long for what a commit does not announce), with `extra` settings. The extension
    /// is not created yet.
    pub fn publishing_to(brokers: &str, extra: &[(&str, &str)]) -> Self {
        let mut settings = vec![
            ("outbox.brokers", brokers),
            ("outbox.poll_interval", "200ms"),
        ];
        settings.extend_from_slice(extra);
        PgCluster::start(&settings)
    }

    /// `publishing_to`, with the extension created.
    pub fn with_outbox(brokers: &str, extra: &[(&str, &str)]) -> Self {
        let cluster = PgCluster::publishing_to(brokers, extra);
        cluster
            .connect()
            .batch_execute("CREATE EXTENSION outbox_pg")
            .unwrap();
        cluster
    }

    pub fn start_standby(&self) -> PgCluster {
        self.start_standby_as("walreceiver")
    }

    /// A streaming standby (pg_basebackup) whose walreceiver connects as `application_name`,
    /// the name `synchronous_standby_names` refers to.
    pub fn start_standby_as(&self, application_name: &str) -> PgCluster {
        let n = CLUSTERS.fetch_add(1, Ordering::SeqCst);
        let dir = PathBuf::from(format!("/tmp/outbox_pg_e2e/{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        chown_postgres(&dir);
        let standby = PgCluster {
            port: free_port(),
            dir,
        };
        as_postgres(&[
            pg_bin().join("pg_basebackup").to_str().unwrap(),
            "-D",
            standby.data().to_str().unwrap(),
            "-R",
            "-d",
            &format!(
                "host=127.0.0.1 port={} user=postgres application_name={application_name}",
                self.port
            ),
            "-X",
            "stream",
        ]);
        let conf_path = standby.data().join("postgresql.conf");
        let mut conf = std::fs::read_to_string(&conf_path).unwrap();
        conf.push_str(&format!(
            "port = {}\nunix_socket_directories = '{}'\n",
            standby.port,
            standby.dir.display()
        ));
        std::fs::write(&conf_path, conf).unwrap();
        standby.pg_ctl_start();
        standby
    }

    /// `pg_ctl promote`: a standby becomes a primary.
    pub fn promote(&self) {
        as_postgres(&[
            pg_bin().join("pg_ctl").to_str().unwrap(),
            "-D",
            self.data().to_str().unwrap(),
            "-w",
            "promote",
        ]);
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    pub fn pg_ctl_start(&self) {
        as_postgres(&[
            pg_bin().join("pg_ctl").to_str().unwrap(),
            "-D",
            self.data().to_str().unwrap(),
            "-l",
            self.log_path().to_str().unwrap(),
            "-w",
            "-t",
            "60",
            "start",
        ]);
    }

    /// `pg_ctl stop` with the given mode (smart, fast, immediate).
    pub fn pg_ctl_stop(&self, mode: &str) {
        as_postgres(&[
            pg_bin().join("pg_ctl").to_str().unwrap(),
            "-D",
            self.data().to_str().unwrap(),
            "-m",
            mode,
            "-w",
            "-t",
            "60",
            "stop",
        ]);
    }

    pub fn connect(&self) -> postgres::Client {
        self.connect_to("postgres")
    }

    pub fn connect_to(&self, database: &str) -> postgres::Client {
        self.connect_as_to("postgres", database)
    }

    /// A session of `role` (a login role; trust authentication) in database `postgres`.
    pub fn connect_as(&self, role: &str) -> postgres::Client {
        self.connect_as_to(role, "postgres")
    }

    pub fn connect_as_to(&self, role: &str, database: &str) -> postgres::Client {
        let url = format!(
            "host=127.0.0.1 port={} user={role} dbname={database}",
            self.port
        );
        let mut last = None;
        for _ in 0..100 {
            match postgres::Client::connect(&url, postgres::NoTls) {
                Ok(client) => return client,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("cannot connect to {url}: {last:?}");
    }

    /// Sets a server setting with ALTER SYSTEM and reloads the configuration.
    pub fn set(&self, name: &str, value: &str) {
        let mut client = self.connect();
        client
            .batch_execute(&format!(
                "ALTER SYSTEM SET {name} = '{}'",
                value.replace('\'', "''")
            ))
            .unwrap();
        client.batch_execute("SELECT pg_reload_conf()").unwrap();
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Waits until the server log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().contains(needle))
    }

    /// Where the server log ends now: pass it to [`PgCluster::wait_for_log_after`] so that a
    /// line written before this point cannot match.
    pub fn log_mark(&self) -> usize {
        self.log().len()
    }

    /// The server log written after `mark`.
    pub fn log_after(&self, mark: usize) -> String {
        self.log().get(mark..).unwrap_or_default().to_string()
    }

    /// Waits until the log written after `mark` contains `needle`.
    pub fn wait_for_log_after(&self, mark: usize, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log_after(mark).contains(needle))
    }

    /// Like [`PgCluster::wait_for_log_after`], but panics with the log written since `mark`.
    #[track_caller]
    pub fn expect_log_after(&self, mark: usize, needle: &str, timeout: Duration) {
        if !self.wait_for_log_after(mark, needle, timeout) {
            panic!(
                "{needle:?} not logged within {timeout:?}; the log since:\n{}",
                self.log_after(mark)
            );
        }
    }

    /// `pg_ctl start` that reports a refusal instead of panicking, waiting at most `timeout`.
    pub fn try_pg_ctl_start(&self, timeout: Duration) -> Result<(), String> {
        let output = as_postgres_command()
            .arg(pg_bin().join("pg_ctl"))
            .args(["-D", self.data().to_str().unwrap(), "-l"])
            .arg(self.log_path())
            .args(["-w", "-t", &timeout.as_secs().max(1).to_string(), "start"])
            .output()
            .expect("runuser");
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// The postmaster's pid, from postmaster.pid.
    pub fn postmaster_pid(&self) -> i32 {
        let pidfile = std::fs::read_to_string(self.data().join("postmaster.pid")).unwrap();
        pidfile.lines().next().unwrap().trim().parse().unwrap()
    }

    /// CPU time the whole server has used since it started: the postmaster, the processes it
    /// runs now and those that have ended (a backend's time counts once its postmaster reaped it).
    pub fn cpu_time(&self) -> std::time::Duration {
        let postmaster = self.postmaster_pid();
        loop {
            // A child reaped while its siblings are read would be missed (or, read the other
            // way round, counted twice): read again until no child ended meanwhile.
            let (_, ended) = crate::process::cpu_time(postmaster);
            let running = crate::process::children_cpu_time(postmaster);
            let (own, ended_after) = crate::process::cpu_time(postmaster);
            if ended_after == ended {
                return own + ended + running;
            }
        }
    }

    /// Pid of the outbox_pg launcher, from pg_stat_activity.
    pub fn launcher_pid(&self) -> Option<i32> {
        self.connect()
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'outbox_pg launcher'",
                &[],
            )
            .unwrap()
            .map(|row| row.get(0))
    }

    /// Pid of the database worker for `database`, from pg_stat_activity.
    pub fn worker_pid(&self, database: &str) -> Option<i32> {
        let mut client = self.connect();
        client
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'outbox_pg worker' AND datname = $1",
                &[&database],
            )
            .unwrap()
            .map(|row| row.get(0))
    }
}

impl PgCluster {
    /// Runs a client program of this server's version (pg_dump, pg_restore, psql...) against
    /// this cluster with `args`; panics with its output if it fails.
    pub fn client(&self, program: &str, args: &[&str]) -> String {
        crate::process::run(
            Command::new(pg_bin().join(program))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                ])
                .args(args)
                .env_remove("PGDATABASE"),
        )
    }

    /// A directory for files of this cluster's test (dumps), removed with the cluster.
    pub fn scratch(&self) -> PathBuf {
        let dir = self.dir.join("scratch");
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // A failing test shows what the worker said: CI keeps nothing else of the cluster.
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("outbox_pg") || l.contains("WARNING") || l.contains("ERROR"))
                .collect();
            eprintln!(
                "--- the last {} of {} worker and warning lines of {}:",
                lines.len().min(300),
                lines.len(),
                self.log_path().display()
            );
            for line in &lines[lines.len().saturating_sub(300)..] {
                eprintln!("{line}");
            }
        }
        let _ = as_postgres_command()
            .arg(pg_bin().join("pg_ctl"))
            .args([
                "-D",
                self.data().to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
        if std::env::var_os("OUTBOX_KEEP_CLUSTERS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn chown_postgres(path: &Path) {
    let status = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "chown {path:?}");
}

/// Runs a command as the `postgres` OS user (Postgres refuses to run as root).
/// `runuser -u postgres --`, with the environment the server should inherit.
fn as_postgres_command() -> Command {
    let mut command = Command::new("runuser");
    // A Rust backtrace setting would change error DETAILs.
    command.env_remove("RUST_BACKTRACE");
    // The PyPI server builds load libpq (walreceiver, postgres_fdw) through a RUNPATH of their
    // build machine; without this they pick up Debian's older libpq, which refuses the
    // primary_conninfo their own pg_basebackup writes.
    let lib = pg_bin().join("../lib");
    if lib.join("libpq.so.5").exists() {
        command.env("LD_LIBRARY_PATH", lib);
    }
    command.args(["-u", "postgres", "--"]);
    command
}

fn as_postgres(args: &[&str]) {
    let output = as_postgres_command().args(args).output().expect("runuser");
    assert!(
        output.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
