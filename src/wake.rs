//! Wake-at-commit: a transaction that emitted events sets the worker's latch when it commits, so
//! publishing starts within a millisecond instead of at the next poll.
//!
//! Handled transaction events:
//! - `COMMIT`: if this transaction emitted, wake the worker of this database (once per commit).
//! - `ABORT`, `PREPARE`, `PARALLEL_ABORT`: forget the flag. Aborted events do not exist; prepared
//!   ones become visible only at `COMMIT PREPARED`.
//! - `COMMIT PREPARED`, in whatever session runs it, raises the flag too (a utility hook sees the
//!   statement): its prepared transaction may have emitted, and a spare wakeup costs one claim.
//!
//! Events that appear without a commit hook in this server — rows restored or copied into
//! outbox.events by a superuser, retries coming due, anything committed while the worker was not
//! running — are found by the worker at its start or within `outbox.poll_interval`.
//!
//! Not handled: subtransaction events. A savepoint rolled back after emit() still wakes the worker
//! at commit; it finds nothing new, which costs one empty claim.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::shmem;

/// Set by emit() in this backend, consumed by the commit callback.
static EMITTED_IN_TRANSACTION: AtomicBool = AtomicBool::new(false);

static mut PREV_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;

/// Registers the transaction callback and the utility hook. From `_PG_init`, in every process
/// that loads the library.
pub fn init() {
    // SAFETY: _PG_init runs once per process, single-threaded: registering a callback appends
    // to a backend-local list, and hooks may only be chained here.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_transaction_event), std::ptr::null_mut());
        PREV_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(on_utility);
    }
}

/// Utility hook: `COMMIT PREPARED` makes a prepared transaction's events visible, so the
/// transaction running it wakes the worker when it commits. Everything else passes through.
#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn on_utility(
    statement: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    environment: *mut pg_sys::QueryEnvironment,
    destination: *mut pg_sys::DestReceiver,
    completion: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: Postgres passes a valid planned utility statement; we only read its node tag.
    unsafe {
        let node = (*statement).utilityStmt;
        if !node.is_null() && (*node).type_ == pg_sys::NodeTag::T_TransactionStmt {
            let transaction = node.cast::<pg_sys::TransactionStmt>();
            if (*transaction).kind == pg_sys::TransactionStmtKind::TRANS_STMT_COMMIT_PREPARED {
                note_emitted();
            }
        }
        match PREV_PROCESS_UTILITY {
            Some(previous) => previous(
                statement,
                query,
                read_only_tree,
                context,
                params,
                environment,
                destination,
                completion,
            ),
            None => pg_sys::standard_ProcessUtility(
                statement,
                query,
                read_only_tree,
                context,
                params,
                environment,
                destination,
                completion,
            ),
        }
    }
}

/// Called by emit(): this transaction now has events to announce at commit.
pub fn note_emitted() {
    EMITTED_IN_TRANSACTION.store(true, Ordering::Relaxed);
}

/// Postgres transaction callback: runs in the committing backend after the commit is durable and
/// visible to other snapshots. It must not raise an error (an ERROR here is a PANIC), so it only
/// reads atomics and sets a latch.
#[pg_guard]
unsafe extern "C-unwind" fn on_transaction_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut c_void,
) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT
            if EMITTED_IN_TRANSACTION.swap(false, Ordering::Relaxed) =>
        {
            // SAFETY: MyDatabaseId is set for the whole life of a connected backend.
            let database = unsafe { pg_sys::MyDatabaseId };
            if let Some(slot) = shmem::slot_for(database) {
                slot.wake();
            }
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            EMITTED_IN_TRANSACTION.store(false, Ordering::Relaxed);
        }
        _ => {}
    }
}

/// Wakes this database's worker now and again when this transaction commits (so it sees what
/// the transaction changed), for `outbox.wake()`; false when no worker is attached.
pub fn wake_now() -> bool {
    note_emitted();
    // SAFETY: MyDatabaseId is set for the whole life of a connected backend.
    let database = unsafe { pg_sys::MyDatabaseId };
    match shmem::slot_for(database) {
        Some(slot) if slot.pid() != 0 => {
            slot.wake();
            true
        }
        _ => false,
    }
}
