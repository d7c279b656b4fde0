//! The launcher: a static background worker that keeps one database worker running for each
//! database in `outbox.database`, starting and stopping them as the setting is reloaded.
//!
//! It connects to no database (shared catalogs only), so it can look up database names without
//! holding any database open. Database workers are dynamic workers with no postmaster restart;
//! the launcher restarts them itself, with a growing delay if they keep failing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime,
    DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::guc;
use crate::shared;

/// The launcher's own restart delay after a crash (the postmaster restarts it).
const LAUNCHER_RESTART: Duration = Duration::from_secs(5);
/// How often the launcher re-checks missing databases and stopped workers.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Restart delay for a database worker that stopped on its own: doubles per quick failure.
const WORKER_RESTART_MIN: Duration = Duration::from_secs(1);
const WORKER_RESTART_MAX: Duration = Duration::from_secs(60);
/// A worker that ran at least this long before stopping is restarted at the minimum delay.
const WORKER_HEALTHY_AFTER: Duration = Duration::from_secs(60);

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
    handle: Option<DynamicBackgroundWorker>,
    started_at: Instant,
    restart_delay: Duration,
    restart_at: Option<Instant>,
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn outbox_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    // A restarted launcher starts from a clean table. Workers a previous launcher started may
    // still run (it failed without a crash restart); it cannot adopt them, so it stops them.
    for slot in shared::slots() {
        let pid = slot.pid();
        if pid != 0 {
            // SAFETY: the pid is one of our database workers, registered in our slot table.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        slot.release();
    }
    log!("outbox_pg launcher started");

    let mut managed: HashMap<String, Managed> = HashMap::new();
    let mut missing_reported: Vec<String> = Vec::new();
    // SAFETY: reading a sig_atomic_t set by our SIGTERM handler.
    while unsafe { pg_sys::ShutdownRequestPending } == 0 {
        // SAFETY: main thread, outside a transaction: the place to process a reload.
        unsafe {
            if pg_sys::ConfigReloadPending != 0 {
                pg_sys::ConfigReloadPending = 0;
                pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
            }
        }
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
            keep_running(&mut managed, name, database);
        }
        // SAFETY: the launcher's own latch, on its main thread; WL_EXIT_ON_PM_DEATH ends it with
        // the postmaster. Workers' start/stop notifications (bgw_notify_pid) set this latch.
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                CHECK_INTERVAL.as_millis() as std::ffi::c_long,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
            pg_sys::check_for_interrupts!();
        }
    }
    // Database workers get SIGTERM from the postmaster themselves during shutdown.
    log!("outbox_pg launcher stopped");
}

/// Starts the database's worker if it is not running and its restart delay has passed.
fn keep_running(managed: &mut HashMap<String, Managed>, name: &str, database: pg_sys::Oid) {
    if let Some(entry) = managed.get_mut(name) {
        let stopped = match &entry.handle {
            Some(handle) => matches!(handle.pid(), Err(BackgroundWorkerStatus::Stopped)),
            None => true,
        };
        if !stopped {
            return;
        }
        if entry.handle.take().is_some() {
            // It stopped on its own: schedule a restart, sooner if it had been running a while.
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
        let slot = &shared::slots()[entry.slot];
        slot.release();
        slot.assign(database);
        entry.handle = start_worker(name, entry.slot);
        entry.started_at = Instant::now();
        entry.restart_at = None;
        return;
    }
    let Some(index) = shared::slots()
        .iter()
        .position(|s| s.database() == pg_sys::InvalidOid)
    else {
        warning!("outbox_pg: no free worker slot for database \"{name}\"");
        return;
    };
    shared::slots()[index].assign(database);
    let handle = start_worker(name, index);
    managed.insert(
        name.to_string(),
        Managed {
            slot: index,
            handle,
            started_at: Instant::now(),
            restart_delay: Duration::ZERO,
            restart_at: None,
        },
    );
}

/// Stops the workers of databases no longer listed, and frees their slots.
fn stop_unwanted(managed: &mut HashMap<String, Managed>, wanted: &[String]) {
    let unwanted: Vec<String> = managed
        .keys()
        .filter(|n| !wanted.contains(n))
        .cloned()
        .collect();
    for name in unwanted {
        let entry = managed.remove(&name).expect("key listed above");
        if let Some(handle) = entry.handle {
            let _ = handle.terminate().wait_for_shutdown();
        }
        shared::slots()[entry.slot].release();
        log!("outbox_pg: stopped publishing database \"{name}\"");
    }
}

fn start_worker(name: &str, slot: usize) -> Option<DynamicBackgroundWorker> {
    let started = BackgroundWorkerBuilder::new(&format!("outbox_pg worker for {name}"))
        .set_type("outbox_pg worker")
        .set_library("outbox_pg")
        .set_function("outbox_worker_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .set_argument(Some(pg_sys::Datum::from(slot)))
        // SAFETY: reading this process's pid.
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic();
    match started {
        Ok(handle) => Some(handle),
        Err(_) => {
            warning!(
                "outbox_pg: could not start a worker for database \"{name}\"; raise max_worker_processes"
            );
            None
        }
    }
}

/// The database's oid, or None if it does not exist (yet).
///
/// A plain heap scan of pg_database, as autovacuum's launcher does: with no database selected,
/// index scans would need relcache entries only a database connection provides.
fn database_oid(name: &str) -> Option<pg_sys::Oid> {
    let mut found = None;
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
            if datname.to_bytes() == name.as_bytes() {
                found = Some((*database).oid);
                break;
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(relation, pg_sys::AccessShareLock as i32);
        pg_sys::CommitTransactionCommand();
    }
    found
}
