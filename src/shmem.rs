//! The shared-memory table of database workers: which worker serves which database, its latch
//! (so committing backends can wake it) and its state (for operators).
//!
//! Exists only when the library is in `shared_preload_libraries`; elsewhere [`slots`] is empty and
//! every caller degrades to polling.

use std::ptr;
use std::sync::atomic::{
    AtomicI32, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, Ordering,
};
use std::time::{SystemTime, UNIX_EPOCH};

use pgrx::pg_sys;
use pgrx::prelude::*;

/// Databases that can be published at once (one worker slot each).
pub const MAX_DATABASES: usize = 32;

/// What a database worker is doing, as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum WorkerState {
    Starting = 1,
    /// Connected, but `CREATE EXTENSION outbox_pg` has not run in this database (or needs UPDATE).
    WaitingForExtension = 2,
    Idle = 3,
    Publishing = 4,
    BrokerUnreachable = 5,
    /// Another worker already publishes this database.
    Standby = 6,
    /// `outbox.pause()` is in effect.
    Paused = 7,
}

impl WorkerState {
    fn from_u32(value: u32) -> Option<Self> {
        [
            Self::Starting,
            Self::WaitingForExtension,
            Self::Idle,
            Self::Publishing,
            Self::BrokerUnreachable,
            Self::Standby,
            Self::Paused,
        ]
        .into_iter()
        .find(|s| *s as u32 == value)
    }

    /// The label `outbox.status` shows.
    pub fn label(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::WaitingForExtension => "waiting for extension",
            Self::Idle => "idle",
            Self::Publishing => "publishing",
            Self::BrokerUnreachable => "broker unreachable",
            Self::Standby => "standby",
            Self::Paused => "paused",
        }
    }
}

/// Longest error text kept for `outbox.status`, in bytes.
const ERROR_BYTES: usize = 512;
/// Seconds of history behind `published_last_minute`.
const RATE_WINDOW_S: usize = 60;

/// One database worker's entry.
#[repr(C)]
pub struct WorkerSlot {
    /// The database served; `InvalidOid` (0) when the slot is free. Written by the launcher.
    database: AtomicU32,
    /// The worker's pid, 0 while it is not running. Written by the worker.
    pid: AtomicI32,
    /// The worker's process latch, null while it is not running. Written by the worker.
    latch: AtomicPtr<pg_sys::Latch>,
    state: AtomicU32,
    /// Latch sets by committing transactions that emitted events, and by outbox.wake().
    wakeups: AtomicU64,
    /// Events published per second over the last minute: `per_second[i]` counts second
    /// `second[i]` (Unix time). Written by the worker only.
    per_second: [AtomicU64; RATE_WINDOW_S],
    second: [AtomicI64; RATE_WINDOW_S],
    /// Unix time in microseconds of the last broker acknowledgement, 0 = none yet.
    last_ack_us: AtomicI64,
    /// Broker connectivity as the worker last saw it (see [`Connectivity`]).
    broker: AtomicU8,
    /// The last error, as a seqlock-protected byte buffer (odd sequence = being written).
    error_sequence: AtomicU64,
    error_len: AtomicU32,
    error_bytes: [AtomicU8; ERROR_BYTES],
    last_error_us: AtomicI64,
}

/// Whether the worker's producer reaches the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Connectivity {
    Unknown = 0,
    Connected = 1,
    Unreachable = 2,
}

/// A point-in-time copy of a worker's report, for `outbox.status`.
#[derive(Debug, Clone)]
pub struct WorkerReport {
    pub pid: i32,
    pub state: Option<WorkerState>,
    pub broker: Connectivity,
    pub wakeups: u64,
    pub published_last_minute: u64,
    pub last_ack_us: Option<i64>,
    pub last_error: Option<String>,
    pub last_error_us: Option<i64>,
}

fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

impl WorkerSlot {
    pub fn database(&self) -> pg_sys::Oid {
        pg_sys::Oid::from(self.database.load(Ordering::Acquire))
    }

    pub fn pid(&self) -> i32 {
        self.pid.load(Ordering::Acquire)
    }

    pub fn set_state(&self, state: WorkerState) {
        self.state.store(state as u32, Ordering::Release);
    }

    /// Launcher: reserve this slot for a database; its report starts empty.
    pub fn assign(&self, database: pg_sys::Oid) {
        self.set_state(WorkerState::Starting);
        self.wakeups.store(0, Ordering::Relaxed);
        for (count, second) in self.per_second.iter().zip(&self.second) {
            count.store(0, Ordering::Relaxed);
            second.store(0, Ordering::Relaxed);
        }
        self.last_ack_us.store(0, Ordering::Relaxed);
        self.broker
            .store(Connectivity::Unknown as u8, Ordering::Relaxed);
        self.last_error_us.store(0, Ordering::Relaxed);
        self.error_len.store(0, Ordering::Relaxed);
        self.database.store(database.to_u32(), Ordering::Release);
    }

    /// Launcher: the worker is gone for good; free the slot.
    pub fn release(&self) {
        self.database.store(0, Ordering::Release);
        self.pid.store(0, Ordering::Release);
        self.latch.store(ptr::null_mut(), Ordering::Release);
        self.state.store(0, Ordering::Release);
    }

    /// Worker: `count` events were acknowledged by the broker just now.
    pub fn count_published(&self, count: u64) {
        let now = unix_micros();
        let second = now / 1_000_000;
        let i = (second as usize) % RATE_WINDOW_S;
        if self.second[i].load(Ordering::Relaxed) != second {
            self.per_second[i].store(0, Ordering::Relaxed);
            self.second[i].store(second, Ordering::Relaxed);
        }
        self.per_second[i].fetch_add(count, Ordering::Relaxed);
        self.last_ack_us.store(now, Ordering::Relaxed);
    }

    /// Worker: what it last saw of the broker.
    pub fn set_broker(&self, broker: Connectivity) {
        self.broker.store(broker as u8, Ordering::Relaxed);
    }

    /// Worker: remember `error` as the last error, timestamped now. The worker is the only writer.
    pub fn record_error(&self, error: &str) {
        let mut end = error.len().min(ERROR_BYTES);
        while !error.is_char_boundary(end) {
            end -= 1;
        }
        self.error_sequence.fetch_add(1, Ordering::AcqRel); // odd: writing
        for (slot, byte) in self.error_bytes.iter().zip(&error.as_bytes()[..end]) {
            slot.store(*byte, Ordering::Relaxed);
        }
        self.error_len.store(end as u32, Ordering::Relaxed);
        self.last_error_us.store(unix_micros(), Ordering::Relaxed);
        self.error_sequence.fetch_add(1, Ordering::AcqRel); // even: done
    }

    /// A consistent copy of the report (retries while the worker is writing the error).
    pub fn report(&self) -> WorkerReport {
        let now_s = unix_micros() / 1_000_000;
        let published_last_minute = self
            .per_second
            .iter()
            .zip(&self.second)
            .filter(|(_, s)| now_s - s.load(Ordering::Relaxed) < RATE_WINDOW_S as i64)
            .map(|(c, _)| c.load(Ordering::Relaxed))
            .sum();
        let (last_error, last_error_us) = loop {
            let before = self.error_sequence.load(Ordering::Acquire);
            if before % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let len = self.error_len.load(Ordering::Relaxed) as usize;
            let bytes: Vec<u8> = self.error_bytes[..len.min(ERROR_BYTES)]
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect();
            let at = self.last_error_us.load(Ordering::Relaxed);
            if self.error_sequence.load(Ordering::Acquire) == before {
                let text = (at != 0).then(|| String::from_utf8_lossy(&bytes).into_owned());
                break (text, (at != 0).then_some(at));
            }
        };
        let last_ack_us = self.last_ack_us.load(Ordering::Relaxed);
        WorkerReport {
            pid: self.pid(),
            state: WorkerState::from_u32(self.state.load(Ordering::Acquire)),
            broker: match self.broker.load(Ordering::Relaxed) {
                1 => Connectivity::Connected,
                2 => Connectivity::Unreachable,
                _ => Connectivity::Unknown,
            },
            wakeups: self.wakeups.load(Ordering::Relaxed),
            published_last_minute,
            last_ack_us: (last_ack_us != 0).then_some(last_ack_us),
            last_error,
            last_error_us,
        }
    }

    /// Worker: announce this process as the slot's worker, so commits can wake it.
    pub fn attach_current_process(&self) {
        // SAFETY: a background worker with shared-memory access has a valid MyProc and MyProcPid.
        unsafe {
            self.latch
                .store(&raw mut (*pg_sys::MyProc).procLatch, Ordering::Release);
            self.pid.store(pg_sys::MyProcPid, Ordering::Release);
        }
    }

    /// Worker: leaving; commits must no longer touch this process's latch. Only if the slot is
    /// still ours: a restarted launcher may already have handed it to a new worker.
    pub fn detach_current_process(&self) {
        // SAFETY: reading this process's pid.
        let me = unsafe { pg_sys::MyProcPid };
        if self
            .pid
            .compare_exchange(me, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.latch.store(ptr::null_mut(), Ordering::Release);
        }
    }

    /// Wakes the worker if it is running. Never raises an error: safe inside commit callbacks.
    pub fn wake(&self) {
        let latch = self.latch.load(Ordering::Acquire);
        if !latch.is_null() {
            self.wakeups.fetch_add(1, Ordering::Relaxed);
            // SAFETY: the pointer is a PGPROC latch in shared memory, valid for the life of the
            // cluster; if the worker has just exited, setting a recycled latch is a harmless
            // spurious wakeup. SetLatch is safe to call from any backend and never errors.
            unsafe { pg_sys::SetLatch(latch) };
        }
    }
}

#[repr(C)]
struct SharedState {
    slots: [WorkerSlot; MAX_DATABASES],
}

/// Points into shared memory once the startup hook ran; null when not preloaded.
static SHARED: AtomicPtr<SharedState> = AtomicPtr::new(ptr::null_mut());
static mut PREV_SHMEM_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;
static mut PREV_SHMEM_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;

const SHMEM_NAME: &std::ffi::CStr = c"outbox_pg worker slots";

/// Installs the shared-memory hooks. Only from `_PG_init` while preloading.
pub fn init() {
    // SAFETY: _PG_init runs single-threaded in the postmaster while preloading libraries, the only
    // time hooks may be chained.
    unsafe {
        PREV_SHMEM_REQUEST_HOOK = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(request_shmem);
        PREV_SHMEM_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(startup_shmem);
    }
}

/// Postmaster, during startup: reserve room for the slot table.
#[pg_guard]
unsafe extern "C-unwind" fn request_shmem() {
    unsafe {
        if let Some(prev) = PREV_SHMEM_REQUEST_HOOK {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(size_of::<SharedState>());
    }
}

/// Postmaster (and after a crash restart): create or attach the slot table, zeroed on creation.
#[pg_guard]
unsafe extern "C-unwind" fn startup_shmem() {
    unsafe {
        if let Some(prev) = PREV_SHMEM_STARTUP_HOOK {
            prev();
        }
        // AddinShmemInitLock serialises ShmemInitStruct callers, as Postgres requires.
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let state =
            pg_sys::ShmemInitStruct(SHMEM_NAME.as_ptr(), size_of::<SharedState>(), &mut found)
                .cast::<SharedState>();
        if !found {
            // All-zero is a valid SharedState: atomics at 0, null latches, free slots.
            ptr::write_bytes(state, 0, 1);
        }
        SHARED.store(state, Ordering::Release);
        pg_sys::LWLockRelease(init_lock);
    }
}

/// The worker slots, or an empty slice when the library was not preloaded.
pub fn slots() -> &'static [WorkerSlot] {
    let state = SHARED.load(Ordering::Acquire);
    // SAFETY: once set, the pointer refers to the slot table in shared memory for the life of this
    // process; every field is atomic, so shared references are sound.
    match unsafe { state.as_ref() } {
        Some(state) => &state.slots,
        None => &[],
    }
}

/// The slot of the worker serving `database`, if one is assigned.
pub fn slot_for(database: pg_sys::Oid) -> Option<&'static WorkerSlot> {
    slots().iter().find(|s| s.database() == database)
}
