//! Publishing only what the database keeps.
//!
//! A committed transaction is visible before its commit record is flushed when
//! `synchronous_commit` is off (or `local`, for the standbys), and a synchronous commit whose
//! wait for the standbys was cancelled is visible before they have it. Publishing such an event
//! and then crashing, or failing over, would leave Kafka with an event whose transaction never
//! happened. So before the worker hands a claimed batch to the producer, it flushes the WAL up to
//! the point where the claim's snapshot was taken (one flush per batch, not per event; free when
//! commits were flushed already) and, when `synchronous_standby_names` is set, waits until the
//! synchronous standbys have it too.
//!
//! What remains: a promoted *asynchronous* standby may lack what was published (it may lack the
//! commits themselves).

use std::time::Duration;

use pgrx::pg_sys;

use crate::process;

/// The end of the WAL inserted so far: every commit record already visible ends at or before
/// it. (GetXLogInsertRecPtr, at a page boundary, points past the next page's header, beyond
/// anything written, and XLogFlush refuses such a target.)
pub fn inserted_wal_end() -> pg_sys::XLogRecPtr {
    const fn max_aligned(size: usize) -> u64 {
        size.div_ceil(8) as u64 * 8
    }
    let short_header = max_aligned(size_of::<pg_sys::XLogPageHeaderData>());
    let long_header = max_aligned(size_of::<pg_sys::XLogLongPageHeaderData>());
    // SAFETY: reading the WAL insert position and the segment size of a running server.
    let (lsn, segment) = unsafe {
        (
            pg_sys::GetXLogInsertRecPtr(),
            pg_sys::wal_segment_size as u64,
        )
    };
    if lsn % segment == long_header {
        lsn - long_header
    } else if lsn % pg_sys::XLOG_BLCKSZ as u64 == short_header {
        lsn - short_header
    } else {
        lsn
    }
}

/// Waits until the WAL up to `lsn` is flushed here and, with synchronous replication
/// configured, flushed by the synchronous standbys. A stop request ends the standby wait early
/// (the caller then must not publish).
pub fn wait_until_durable(lsn: pg_sys::XLogRecPtr) {
    // SAFETY: XLogFlush may be called by any backend outside a critical section; `lsn` is at or
    // before the current insert position.
    unsafe { pg_sys::XLogFlush(lsn) };
    // SyncRepWaitForLSN also returns early when the wait is cancelled (pg_cancel_backend: a
    // member of pg_signal_backend may send it to the worker on 14 and 15) with only a warning:
    // wait again until the standbys really have it.
    loop {
        // SyncRepWaitForLSN expects interrupts held (it watches for a stop request itself, and
        // returns early when one arrives). It returns at once without synchronous standbys.
        process::with_interrupts_held(|| {
            // SAFETY: the worker's main thread, outside a transaction commit; the worker
            // session pins synchronous_commit = on, so the wait applies whenever standbys are
            // configured.
            unsafe { pg_sys::SyncRepWaitForLSN(lsn, false) }
        });
        if process::stop_requested() || standbys_have(lsn) {
            return;
        }
        // Cancelled: look again shortly (serving signals), not in a tight loop.
        process::wait(Duration::from_millis(10), None);
    }
}

/// True if no synchronous standby is configured, or the synchronous standbys have flushed
/// `lsn` (what SyncRepWaitForLSN waits for).
fn standbys_have(lsn: pg_sys::XLogRecPtr) -> bool {
    // SAFETY: WalSndCtl lives in shared memory for the life of the server (null only in a
    // process that has none). Both fields are written under SyncRepLock; read without it, a
    // byte and an aligned 8-byte word are never torn, and a stale value only means one more
    // wait (the flush position only grows, and "defined" is re-read by the wait itself).
    unsafe {
        let control = pg_sys::WalSndCtl;
        // Without WAL senders SyncRepWaitForLSN never waits, and no standby can confirm.
        if control.is_null() || pg_sys::max_wal_senders == 0 {
            return true;
        }
        let status = std::ptr::read_volatile(&raw const (*control).sync_standbys_status);
        if status as u32 & pg_sys::SYNC_STANDBY_DEFINED == 0 {
            return true;
        }
        let flushed = std::ptr::read_volatile(
            &raw const (*control).lsn[pg_sys::SYNC_REP_WAIT_FLUSH as usize],
        );
        flushed >= lsn
    }
}
