//! What our background processes (the launcher and the database workers) need from Postgres:
//! signals, waiting, transactions and a session nobody else can reconfigure.
//!
//! Signals: SIGTERM is Postgres' `die` (a stop request: a running statement or lock wait ends
//! with FATAL at its next interrupt check; our own waits notice it and stop in order), SIGHUP
//! re-reads the configuration. Every wait watches the latch, postmaster death and, optionally,
//! one descriptor; none lasts longer than it is told.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::time::Duration;

use pgrx::pg_sys;
use pgrx::prelude::*;

// Postgres' own signal handlers, by their C symbols (pgrx's wrappers are Rust functions, not
// signal handlers).
unsafe extern "C-unwind" {
    #[link_name = "die"]
    fn postgres_die(signal: std::ffi::c_int);
    #[link_name = "SignalHandlerForConfigReload"]
    fn postgres_reload_handler(signal: std::ffi::c_int);
}

/// Installs the process's signal handlers and unblocks signals. First thing in a worker's main.
pub fn install_signal_handlers() {
    // SAFETY: the main function of a background worker, before anything else runs; these are
    // Postgres' own handlers, which only set flags and the latch.
    unsafe {
        set_handler(libc::SIGTERM, Some(postgres_die));
        set_handler(libc::SIGHUP, Some(postgres_reload_handler));
        pg_sys::BackgroundWorkerUnblockSignals();
    }
}

#[cfg(not(feature = "pg18"))]
unsafe fn set_handler(signal: i32, handler: pg_sys::pqsigfunc) {
    // SAFETY: see install_signal_handlers.
    unsafe { pg_sys::pqsignal(signal, handler) };
}

#[cfg(feature = "pg18")]
unsafe fn set_handler(signal: i32, handler: pg_sys::pqsigfunc) {
    // SAFETY: see install_signal_handlers.
    unsafe { pg_sys::pqsignal_be(signal, handler) };
}

/// True once SIGTERM arrived (`die` sets ProcDiePending; it is never cleared).
pub fn stop_requested() -> bool {
    // SAFETY: reading a sig_atomic_t written by the signal handler.
    unsafe { pg_sys::ProcDiePending != 0 }
}

/// How many times this process re-read its configuration.
static RELOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The number of configuration reloads so far: a change tells that a SIGHUP was served.
pub fn reloads() -> u64 {
    RELOADS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Re-reads postgresql.conf if a SIGHUP arrived; true if it did.
pub fn reload_if_requested() -> bool {
    // SAFETY: ConfigReloadPending is a sig_atomic_t set by the SIGHUP handler; this is the main
    // thread, outside any transaction, where reloads are processed.
    unsafe {
        if pg_sys::ConfigReloadPending == 0 {
            return false;
        }
        pg_sys::ConfigReloadPending = 0;
        pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
    }
    RELOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    true
}

/// Serves pending interrupts (barriers, catch-up, cancel) except a stop, which the caller
/// handles in order. Main thread, outside any critical section.
pub fn serve_interrupts() {
    if !stop_requested() {
        pg_sys::check_for_interrupts!();
    }
}

/// Exits at once if the postmaster is gone: its shared memory is no longer ours to use, and a
/// new postmaster cannot start while we hold it.
pub fn exit_if_postmaster_died() {
    let mut byte = 0u8;
    // SAFETY: the postmaster-alive pipe's read end, non-blocking: EOF (0) means the postmaster
    // closed its end by dying; nothing is ever written to it, so nothing is consumed.
    let read = unsafe { libc::read(pg_sys::postmaster_alive_fds[0], (&raw mut byte).cast(), 1) };
    if read == 0 {
        // SAFETY: proc_exit runs the exit callbacks and ends the process.
        unsafe { pg_sys::proc_exit(1) };
    }
}

/// Why a [`wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// The latch was set: a commit announced events, a signal arrived, or outbox.wake().
    Latch,
    /// The descriptor became readable.
    Descriptor,
    Timeout,
}

/// Set when a [`wait`] consumed a latch wake-up; see [`take_latch_wakeup`].
static LATCH_WOKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// True if a wait consumed a latch wake-up since the last call. A commit's wake-up that
/// arrives while the worker waits for something else (a delivery report, a lock) resets the
/// latch there; the worker must then look for work again instead of sleeping.
pub fn take_latch_wakeup() -> bool {
    LATCH_WOKEN.swap(false, std::sync::atomic::Ordering::Relaxed)
}

/// Waits until the latch is set, `descriptor` is readable, or `timeout` passes. Exits the
/// process if the postmaster dies. Serves interrupts (not a stop) and applies a reload before
/// returning.
pub fn wait(timeout: Duration, descriptor: Option<RawFd>) -> Woken {
    let mut events = pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH;
    if descriptor.is_some() {
        events |= pg_sys::WL_SOCKET_READABLE;
    }
    // SAFETY: the standard latch wait of a background worker, on its own latch, from the main
    // thread; the descriptor (if any) stays open for the duration of the call.
    let fired = unsafe {
        let fired = pg_sys::WaitLatchOrSocket(
            pg_sys::MyLatch,
            events as i32,
            descriptor.unwrap_or(pg_sys::PGINVALID_SOCKET),
            timeout.as_millis().min(i32::MAX as u128) as std::ffi::c_long,
            pg_sys::PG_WAIT_EXTENSION,
        ) as u32;
        if fired & pg_sys::WL_LATCH_SET != 0 {
            pg_sys::ResetLatch(pg_sys::MyLatch);
            LATCH_WOKEN.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        fired
    };
    serve_interrupts();
    reload_if_requested();
    if fired & pg_sys::WL_LATCH_SET != 0 {
        Woken::Latch
    } else if fired & pg_sys::WL_SOCKET_READABLE != 0 {
        Woken::Descriptor
    } else {
        Woken::Timeout
    }
}

/// Runs `f` in its own transaction, shown in pg_stat_activity as `activity`, and reports the
/// transaction's table statistics afterwards (so autovacuum sees the worker's writes).
pub fn in_transaction<R>(activity: &str, f: impl FnOnce() -> R) -> R {
    let activity = CString::new(activity).expect("activity labels have no NUL");
    // SAFETY: the main thread of a connected background worker, outside any transaction, may
    // start one; an error inside `f` aborts it and ends the process (the launcher restarts it).
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, activity.as_ptr());
    }
    let result = f();
    // SAFETY: closes the transaction opened above, on the same thread.
    unsafe {
        pg_sys::PopActiveSnapshot();
        pg_sys::CommitTransactionCommand();
        pg_sys::pgstat_report_stat(false);
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, std::ptr::null());
    }
    result
}

/// How long a statement of ours waits for a lock another session holds (DDL on the outbox
/// tables) before the transaction gives up, so that signals are served meanwhile.
const LOCK_WAIT: &str = "500ms";

/// Runs `f` in its own transaction like [`in_transaction`], but a lock wait longer than
/// LOCK_WAIT rolls the transaction back and returns None: the caller serves signals and tries
/// again, and is never stuck behind another session's lock.
pub fn in_transaction_unless_locked<R>(activity: &str, f: impl FnOnce() -> R) -> Option<R> {
    pgrx::PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
        Some(in_transaction(activity, || {
            set_locally("lock_timeout", LOCK_WAIT);
            f()
        }))
    }))
    .catch_when(PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE, |_| {
        // SAFETY: the transaction failed with a lock timeout; aborting it releases its
        // resources (snapshots, SPI, locks), as a backend's error recovery would.
        unsafe {
            pg_sys::AbortCurrentTransaction();
            pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, std::ptr::null());
        }
        None
    })
    .execute()
}

/// Sets a setting for the rest of the current transaction.
fn set_locally(name: &str, value: &str) {
    let (name, value) = (
        CString::new(name).expect("setting names have no NUL"),
        CString::new(value).expect("setting values have no NUL"),
    );
    // SAFETY: inside a transaction; GUC_ACTION_LOCAL ends with it.
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            pg_sys::PGERROR as i32,
            false,
        );
    }
}

/// Runs `f` with interrupts held: a stop request waits until it returns. For the short record
/// a stopping worker still makes; `f` must not wait on anything unbounded.
pub fn with_interrupts_held<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: HOLD_INTERRUPTS / RESUME_INTERRUPTS, balanced; an error in `f` resets the count
    // when the transaction aborts (the process then exits).
    unsafe { pg_sys::InterruptHoldoffCount += 1 };
    let result = f();
    // SAFETY: balances the increment above.
    unsafe { pg_sys::InterruptHoldoffCount -= 1 };
    result
}

/// True if the current transaction may not write (default_transaction_read_only, a standby).
pub fn transaction_is_read_only() -> bool {
    // SAFETY: reading a backend-global flag inside a transaction.
    unsafe { pg_sys::XactReadOnly || pg_sys::RecoveryInProgress() }
}

/// Sets a setting for the rest of this session, above anything the database or a role says.
/// Settings this server does not have are skipped.
pub fn set_for_session(name: &str, value: &str) {
    let (name, value) = (
        CString::new(name).expect("setting names have no NUL"),
        CString::new(value).expect("setting values have no NUL"),
    );
    // SAFETY: set_config_option with a superuser context and session source; DEBUG1 turns an
    // unknown name (a setting of another major version) into a debug message.
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SET,
            true,
            pg_sys::DEBUG1 as i32,
            false,
        );
    }
}

/// What our sessions depend on, whatever postgresql.conf, the database or a role says. The
/// search path first: nothing may be planned before it is pinned.
const PINNED: &[(&str, &str)] = &[
    ("search_path", "pg_catalog, pg_temp"),
    ("statement_timeout", "0"),
    ("lock_timeout", "0"),
    ("idle_in_transaction_session_timeout", "0"),
    ("idle_session_timeout", "0"),
    ("transaction_timeout", "0"),
    ("session_replication_role", "origin"),
    ("default_transaction_isolation", "read committed"),
    ("default_transaction_deferrable", "off"),
    // The worker's own records are durable, and it can wait for synchronous standbys.
    ("synchronous_commit", "on"),
    // The worker's statements are small; compiling them costs more than running them.
    ("jit", "off"),
    // Every statement of ours is an ordered index walk with a LIMIT; a plan made from stale
    // statistics (a never-analyzed table, a burst beyond the histogram) would otherwise scan,
    // bitmap-scan or walk another index over a whole window's or table's rows and sort them,
    // every round: O(window) per batch, and O(history) behind an old snapshot (see
    // worker::queue). With these off, the only plans left are the walks.
    ("enable_seqscan", "off"),
    ("enable_bitmapscan", "off"),
    ("enable_sort", "off"),
    // The plans are the walks whatever the arguments: plan once, not at every execution.
    ("plan_cache_mode", "force_generic_plan"),
    ("max_parallel_workers_per_gather", "0"),
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "1"),
    ("bytea_output", "hex"),
    ("standard_conforming_strings", "on"),
    ("transform_null_equals", "off"),
    ("row_security", "on"),
    ("client_min_messages", "warning"),
];

/// Pins this session's settings against whoever controls the database: every setting that came
/// from `ALTER DATABASE ... SET` or `ALTER ROLE [ALL] ... SET` goes back to what postgresql.conf (or
/// the built-in default) says, except `default_transaction_read_only` (a read-only freeze is an
/// operator's signal the worker obeys), then [`PINNED`] applies. Call once, right after
/// connecting, before anything else runs SQL.
pub fn pin_session_settings() {
    set_for_session("search_path", "pg_catalog, pg_temp");
    let overridden: Vec<(String, String)> = in_transaction("outbox_pg: pinning settings", || {
        Spi::connect(|client| {
            let rows = client.select(
                "SELECT s.name, coalesce(f.setting, s.boot_val)
                 FROM pg_catalog.pg_settings s
                 LEFT JOIN LATERAL (SELECT fs.setting FROM pg_catalog.pg_file_settings fs
                                    WHERE fs.name = s.name AND fs.applied
                                    ORDER BY fs.seqno DESC LIMIT 1) f ON true
                 WHERE s.source IN ('database', 'user', 'database user', 'global')
                   AND s.name <> 'default_transaction_read_only'",
                None,
                &[],
            )?;
            rows.map(|row| {
                Ok((
                    row.get::<String>(1)?.unwrap_or_default(),
                    row.get::<String>(2)?.unwrap_or_default(),
                ))
            })
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
        })
        .unwrap_or_else(|e| pgrx::error!("outbox_pg: reading the session's settings: {e}"))
    });
    for (name, value) in &overridden {
        set_for_session(name, value);
    }
    for (name, value) in PINNED {
        set_for_session(name, value);
    }
}

/// The `default_transaction_read_only` that `ALTER DATABASE` / `ALTER ROLE [ALL] ... SET` give this
/// session, as the catalog says now (the most specific one), if any. A session applies these
/// only when it connects: the worker compares this with what it connected with to follow a
/// freeze set or lifted that way. Inside a transaction.
pub fn catalog_read_only_default() -> Option<String> {
    Spi::get_one::<String>(
        "SELECT c FROM pg_catalog.pg_db_role_setting s, unnest(s.setconfig) c
         WHERE s.setdatabase IN (0, (SELECT oid FROM pg_catalog.pg_database
                                     WHERE datname = pg_catalog.current_database()))
           AND s.setrole IN (0, (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = session_user))
           AND lower(split_part(c, '=', 1)) = 'default_transaction_read_only'
         -- Postgres's precedence: database and role, role, database, ALTER ROLE ALL.
         ORDER BY s.setdatabase <> 0 AND s.setrole <> 0 DESC, s.setrole <> 0 DESC,
                  s.setdatabase <> 0 DESC
         LIMIT 1",
    )
    .or_else(|e| match e {
        pgrx::spi::Error::InvalidPosition => Ok(None), // no such setting
        e => Err(e),
    })
    .unwrap_or_else(|e| pgrx::error!("outbox_pg: reading database settings: {e}"))
}
