//! The launcher: a static background worker that keeps one database worker running for each
//! database in `outbox.database`, starting and stopping them as the setting is reloaded.
//!
//! It connects to no database (shared catalogs only), so it can look up database names without
//! holding any database open. Database workers are dynamic workers with no postmaster restart;
//! the launcher restarts them itself, with a growing delay if they keep failing.
//!
//! The launcher itself is restarted by the postmaster `LAUNCHER_RESTART` after it exits (a
//! `pg_terminate_backend` ends it with FATAL, exit code 1), except at server shutdown. A new
//! launcher adopts the workers the previous one started: their slots stay owned until they exit,
//! so it never starts a second worker for a database that still has one.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime, DynamicBackgroundWorker,
};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::{guc, process, shmem};

/// The launcher's own restart delay after it exits (the postmaster restarts it).
const LAUNCHER_RESTART: Duration = Duration::from_secs(5);
/// How often the launcher re-checks missing databases and stopped workers.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Restart delay for a database worker that stopped on its own: doubles per quick failure.
const WORKER_RESTART_MIN: Duration = Duration::from_secs(1);
const WORKER_RESTART_MAX: Duration = Duration::from_secs(60);
/// A worker that ran at least this long before stopping is restarted at the minimum delay.
const WORKER_HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// Minimum spacing of repeated "cannot start a worker" log lines.
const COMPLAINT_INTERVAL: Duration = Duration::from_secs(60);

/// Registers the launcher with the postmaster. From `_PG_init` while preloading only.
pub fn register() {
    BackgroundWorkerBuilder::new("outbox_pg launcher")
        .set_type("outbox_pg launcher")
        .set_library("outbox_pg")
        .set_function("outbox_launcher_main")
        // A connection to no database: shared catalogs only.
        .enable_spi_access()
        // Not on a standby: publishing starts when it is promoted.
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(LAUNCHER_RESTART))
        .load();
}

/// One database the launcher looks after.
struct Managed {
    slot: usize,
    /// The worker this launcher started; None for a worker adopted from a previous launcher,
    /// which is watched through its slot, or while none runs.
    handle: Option<DynamicBackgroundWorker>,
    /// A worker runs (started by us, or adopted).
    running: bool,
    started_at: Instant,
    restart_delay: Duration,
    restart_at: Option<Instant>,
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn outbox_launcher_main(_arg: pg_sys::Datum) {
    process::install_signal_handlers();
    // SAFETY: a background worker with shared-memory access connects once, before any
    // transaction; InvalidOid: no database, only shared catalogs.
    unsafe {
        pg_sys::BackgroundWorkerInitializeConnectionByOid(pg_sys::InvalidOid, pg_sys::InvalidOid, 0)
    };
    process::set_for_session("search_path", "pg_catalog, pg_temp");
    let mut managed = adopt_running_workers();
    log!("outbox_pg launcher started");

    let mut missing_reported: Vec<String> = Vec::new();
    let mut complaints = Complaints::default();
    while !process::stop_requested() {
        let wanted = guc::databases();
        stop_unwanted(&mut managed, &wanted);
        for name in &wanted {
            let Some(database) = database_oid(name) else {
                if !missing_reported.contains(name) {
                    log!("outbox_pg: database \"{name}\" does not exist; waiting for it");
                    missing_reported.push(name.clone());
                }
                continue;
            };
            missing_reported.retain(|n| n != name);
            keep_running(&mut managed, &mut complaints, name, database);
        }
        // Workers' start/stop notifications (bgw_notify_pid) set this latch.
        process::wait(CHECK_INTERVAL, None);
    }
    // Database workers get SIGTERM from the postmaster themselves during shutdown; otherwise
    // the next launcher adopts them.
    log!("outbox_pg launcher stopped");
    // SAFETY: a stop was requested: exit like `die` would, with 1, so that the postmaster
    // restarts the launcher unless the server is shutting down.
    unsafe { pg_sys::proc_exit(1) };
}

/// Workers still running from a previous launcher (it was terminated, not the server): keep
/// them, watched through their slots. Unowned slots are freed.
fn adopt_running_workers() -> HashMap<String, Managed> {
    let mut managed = HashMap::new();
    for (index, slot) in shmem::slots().iter().enumerate() {
        if slot.pid() == 0 {
            slot.release();
            continue;
        }
        match database_name(slot.database()) {
            Some(name) => {
                managed.insert(
                    name,
                    Managed {
                        slot: index,
                        handle: None,
                        running: true,
                        started_at: Instant::now(),
                        restart_delay: Duration::ZERO,
                        restart_at: None,
                    },
                );
            }
            None => terminate_owner(slot),
        }
    }
    managed
}

/// At most one complaint a minute about workers that cannot start.
#[derive(Default)]
struct Complaints {
    last: Option<Instant>,
}

impl Complaints {
    fn cannot_start(&mut self, name: &str) {
        if self
            .last
            .is_none_or(|at| at.elapsed() >= COMPLAINT_INTERVAL)
        {
            warning!(
                "outbox_pg: cannot start a worker for database \"{name}\": no background worker slot is free; retrying with a growing delay. Raise max_worker_processes."
            );
            self.last = Some(Instant::now());
        }
    }
}

impl Managed {
    /// True once the worker is gone (it exited, or was never started).
    fn worker_stopped(&self) -> bool {
        if !self.running {
            return true;
        }
        match &self.handle {
            Some(handle) => matches!(handle.pid(), Err(BackgroundWorkerStatus::Stopped)),
            None => shmem::slots()[self.slot].pid() == 0,
        }
    }
}

/// Starts the database's worker if it is not running and its restart delay has passed.
fn keep_running(
    managed: &mut HashMap<String, Managed>,
    complaints: &mut Complaints,
    name: &str,
    database: pg_sys::Oid,
) {
    let entry = match managed.get_mut(name) {
        Some(entry) => entry,
        None => {
            let Some(index) = shmem::slots()
                .iter()
                .position(|s| s.database() == pg_sys::InvalidOid && s.pid() == 0)
            else {
                complaints.cannot_start(name);
                return;
            };
            managed.entry(name.to_string()).or_insert(Managed {
                slot: index,
                handle: None,
                running: false,
                started_at: Instant::now(),
                restart_delay: Duration::ZERO,
                restart_at: None,
            })
        }
    };
    if !entry.worker_stopped() {
        return;
    }
    if entry.running {
        // It stopped on its own: schedule a restart, sooner if it had been running a while.
        entry.running = false;
        entry.handle = None;
        entry.restart_delay = if entry.started_at.elapsed() >= WORKER_HEALTHY_AFTER {
            WORKER_RESTART_MIN
        } else {
            (entry.restart_delay * 2).clamp(WORKER_RESTART_MIN, WORKER_RESTART_MAX)
        };
        entry.restart_at = Some(Instant::now() + entry.restart_delay);
        log!(
            "outbox_pg: worker for database \"{name}\" stopped; restarting in {}s",
            entry.restart_delay.as_secs()
        );
    }
    if entry.restart_at.is_some_and(|at| Instant::now() < at) {
        return;
    }
    let slot = &shmem::slots()[entry.slot];
    if slot.pid() != 0 {
        return; // still owned by an exiting worker
    }
    let ticket = slot.assign(entry.slot, database);
    match start_worker(name, ticket) {
        Some(handle) => {
            entry.handle = Some(handle);
            entry.running = true;
            entry.started_at = Instant::now();
            entry.restart_at = None;
        }
        None => {
            complaints.cannot_start(name);
            entry.restart_delay =
                (entry.restart_delay * 2).clamp(WORKER_RESTART_MIN, WORKER_RESTART_MAX);
            entry.restart_at = Some(Instant::now() + entry.restart_delay);
        }
    }
}

/// Stops the workers of databases no longer listed, and frees their slots once they are gone.
fn stop_unwanted(managed: &mut HashMap<String, Managed>, wanted: &[String]) {
    let unwanted: Vec<String> = managed
        .keys()
        .filter(|n| !wanted.contains(n))
        .cloned()
        .collect();
    for name in unwanted {
        let entry = managed.get_mut(&name).expect("key listed above");
        let slot = &shmem::slots()[entry.slot];
        if entry.running && !entry.worker_stopped() {
            match entry.handle.take() {
                Some(handle) => {
                    let _ = handle.terminate().wait_for_shutdown();
                }
                None => terminate_owner(slot),
            }
        }
        if slot.pid() != 0 {
            continue; // gone at a later check
        }
        slot.release();
        managed.remove(&name);
        log!("outbox_pg: stopped publishing database \"{name}\"");
    }
}

/// Sends SIGTERM to the process owning `slot`, if any.
fn terminate_owner(slot: &shmem::WorkerSlot) {
    let pid = slot.pid();
    if pid != 0 {
        // SAFETY: the pid is one of our database workers, registered in our slot table.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

fn start_worker(name: &str, ticket: shmem::Ticket) -> Option<DynamicBackgroundWorker> {
    BackgroundWorkerBuilder::new(&format!("outbox_pg worker for {name}"))
        .set_type("outbox_pg worker")
        .set_library("outbox_pg")
        .set_function("outbox_worker_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .set_argument(Some(ticket.to_datum()))
        // SAFETY: reading this process's pid.
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
        .ok()
}

/// The database's oid, or None if it does not exist (yet).
fn database_oid(name: &str) -> Option<pg_sys::Oid> {
    scan_databases(|oid, datname| (datname == name.as_bytes()).then_some(oid))
}

/// The database's name, or None if it no longer exists.
fn database_name(oid: pg_sys::Oid) -> Option<String> {
    scan_databases(|candidate, datname| {
        (candidate == oid).then(|| String::from_utf8_lossy(datname).into_owned())
    })
}

/// The first `found` answer over pg_database's rows.
///
/// A plain heap scan, as autovacuum's launcher does: with no database selected, index scans
/// would need relcache entries only a database connection provides.
fn scan_databases<T>(mut found: impl FnMut(pg_sys::Oid, &[u8]) -> Option<T>) -> Option<T> {
    let mut answer = None;
    // SAFETY: a transaction on the launcher's main thread; pg_database is a shared catalog that
    // may be scanned without a database connection; tuples are read before the scan ends.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        let relation =
            pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as i32);
        let scan = pg_sys::table_beginscan_catalog(relation, 0, std::ptr::null_mut());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let database = pg_sys::GETSTRUCT(tuple) as *const pg_sys::FormData_pg_database;
            let datname = std::ffi::CStr::from_ptr((*database).datname.data.as_ptr());
            answer = found((*database).oid, datname.to_bytes());
            if answer.is_some() {
                break;
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(relation, pg_sys::AccessShareLock as i32);
        pg_sys::CommitTransactionCommand();
    }
    answer
}
