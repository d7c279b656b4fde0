//! Operator functions that need the worker's shared memory: its report and its latch. The rest
//! of the operator API (status and dead-letter views, retry, pause) is SQL in `sql/admin.sql`.

use pgrx::prelude::*;

use crate::shmem::{self, Connectivity};

/// One row describing this database's worker, read from shared memory. Timestamps are Unix
/// microseconds; `outbox.status` turns them into timestamptz.
#[pg_extern(volatile, parallel_safe, requires = ["inbox"])]
#[allow(clippy::type_complexity)]
fn worker_state() -> TableIterator<
    'static,
    (
        name!(worker_pid, Option<i32>),
        name!(state, String),
        name!(broker_connected, Option<bool>),
        name!(published_last_minute, i64),
        name!(last_published_us, Option<i64>),
        name!(last_error, Option<String>),
        name!(last_error_us, Option<i64>),
        name!(wakeups, i64),
    ),
> {
    // SAFETY: MyDatabaseId is set for the whole life of a connected backend.
    let database = unsafe { pgrx::pg_sys::MyDatabaseId };
    let row = match shmem::slot_for(database) {
        None => (
            None,
            "not configured".to_string(),
            None,
            0,
            None,
            None,
            None,
            0,
        ),
        Some(slot) => {
            let report = slot.report();
            let state = match (report.pid, report.state) {
                (0, _) => "starting",
                (_, Some(state)) => state.label(),
                (_, None) => "starting",
            };
            let broker = match report.broker {
                Connectivity::Unknown => None,
                Connectivity::Connected => Some(true),
                Connectivity::Unreachable => Some(false),
            };
            (
                (report.pid != 0).then_some(report.pid),
                state.to_string(),
                broker,
                report.published_last_minute as i64,
                report.last_ack_us,
                report.last_error,
                report.last_error_us,
                report.wakeups as i64,
            )
        }
    };
    TableIterator::once(row)
}

/// Wakes this database's worker now; false if no worker is running for it.
#[pg_extern(volatile, parallel_unsafe, requires = [worker_state])]
fn wake() -> bool {
    crate::wake::wake_now()
}
