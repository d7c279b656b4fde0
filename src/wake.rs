//! Wake-at-commit: a transaction that emitted events sets the worker's latch when it commits, so
//! publishing starts within a millisecond instead of at the next poll.
//!
//! Handled transaction events:
//! - `COMMIT`: if this transaction emitted, wake the worker of this database (once per commit).
//! - `ABORT`, `PREPARE`, `PARALLEL_ABORT`: forget the flag. Aborted events do not exist; prepared
//!   ones become visible only at `COMMIT PREPARED`, which may run in another session that never
//!   called emit(), so those rely on `outbox.poll_interval`.
//!
//! Not handled: subtransaction events. A savepoint rolled back after emit() still wakes the worker
//! at commit; it finds nothing new, which costs one empty claim.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::shared;

/// Set by emit() in this backend, consumed by the commit callback.
static EMITTED_IN_TRANSACTION: AtomicBool = AtomicBool::new(false);

/// Registers the transaction callback. From `_PG_init`, in every process that loads the library.
pub fn init() {
    // SAFETY: registering a callback only appends to a backend-local list.
    unsafe { pg_sys::RegisterXactCallback(Some(on_transaction_event), std::ptr::null_mut()) };
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
            if let Some(slot) = shared::slot_for(database) {
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
