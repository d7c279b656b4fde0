//! The shared-memory table of database workers: which worker serves which database, its latch
//! (so committing backends can wake it) and its state (for operators).
//!
//! Ownership of a slot is what makes a process the one publisher of a database; SQL roles cannot
//! take it (unlike an advisory lock). The launcher assigns a free slot with a new generation and
//! starts a worker with that ticket; the worker owns the slot only if the generation still
//! matches and nobody owns it, and gives it up when it exits. The launcher never reassigns a slot
//! that has an owner, so two processes never write one slot's counters.
//!
//! Exists only when the library is in `shared_preload_libraries`; elsewhere [`slots`] is empty and
//! every caller degrades to polling.

use std::ptr;
use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, Ordering,
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
    /// `outbox.pause()` is in effect.
    Paused = 7,
    /// The database refuses writes (default_transaction_read_only): nothing is sent until it
    /// can record what it sent.
    ReadOnly = 8,
    /// The producer settings do not work; nothing is sent until they are fixed.
    Misconfigured = 9,
    /// Another session holds a lock on the outbox tables (DDL).
    WaitingForLock = 10,
}

impl WorkerState {
    fn from_u32(value: u32) -> Option<Self> {
        [
            Self::Starting,
            Self::WaitingForExtension,
            Self::Idle,
            Self::Publishing,
            Self::BrokerUnreachable,
            Self::Paused,
            Self::ReadOnly,
            Self::Misconfigured,
            Self::WaitingForLock,
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
            Self::Paused => "paused",
            Self::ReadOnly => "read-only",
            Self::Misconfigured => "misconfigured",
            Self::WaitingForLock => "waiting for a lock",
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
    /// Bumped by the launcher at every assignment; a worker's ticket carries the one it was
    /// started for.
    generation: AtomicU64,
    /// The owning worker's pid, 0 while none owns it. Taken by a worker (compare-and-swap from
    /// 0), cleared by it at exit.
    pid: AtomicI32,
    /// The worker's process latch, null while it is not running. Written by the worker.
    latch: AtomicPtr<pg_sys::Latch>,
    state: AtomicU32,
    /// Wake-ups asked for by committing transactions that emitted events, and by outbox.wake().
    wakeups: AtomicU64,
    /// The worker is about to wait for work: a wake-up sets its latch. Otherwise it is busy, a
    /// wake-up is only counted, and the worker compares the count before it waits (so a commit
    /// during a round costs neither side a signal). Written by the worker.
    listening: AtomicBool,
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

    /// Launcher: reserve this (unowned) slot for a database; its report starts empty. Returns
    /// the ticket a worker needs to own it.
    pub fn assign(&self, index: usize, database: pg_sys::Oid) -> Ticket {
        debug_assert_eq!(self.pid(), 0, "the launcher assigns only unowned slots");
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
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
        Ticket { index, generation }
    }

    /// Launcher: no worker will serve this slot any more; free it. Only for unowned slots.
    pub fn release(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.database.store(0, Ordering::Release);
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

    /// Worker: takes the slot `ticket` names, if the ticket is still current and no process
    /// owns it, and announces this process's latch so commits can wake it.
    fn own(&self, ticket: Ticket) -> bool {
        // SAFETY: reading this process's pid.
        let me = unsafe { pg_sys::MyProcPid };
        if self.generation.load(Ordering::Acquire) != ticket.generation
            || self
                .pid
                .compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return false;
        }
        // The launcher may have moved on between the two checks: give the slot back then.
        if self.generation.load(Ordering::Acquire) != ticket.generation {
            self.pid.store(0, Ordering::Release);
            return false;
        }
        // SAFETY: a background worker with shared-memory access has a valid MyProc.
        let latch = unsafe { &raw mut (*pg_sys::MyProc).procLatch };
        self.listening.store(true, Ordering::SeqCst);
        self.latch.store(latch, Ordering::Release);
        true
    }

    /// Worker: leaving; commits must no longer touch this process's latch. Only if the slot is
    /// ours.
    pub fn disown(&self) {
        // SAFETY: reading this process's pid.
        let me = unsafe { pg_sys::MyProcPid };
        if self.pid.load(Ordering::Acquire) == me {
            self.latch.store(ptr::null_mut(), Ordering::Release);
            self.pid.store(0, Ordering::Release);
        }
    }

    /// How many wake-ups were asked for so far. The worker compares it across a round: a wait
    /// inside Postgres (a lock, synchronous replication) may reset the latch a commit set.
    pub fn wakeups(&self) -> u64 {
        self.wakeups.load(Ordering::Acquire)
    }

    /// Worker: whether a wake-up should set its latch (`true`, before it waits for work) or
    /// only be counted (`false`, while it is busy). After turning it on, the worker compares
    /// [`WorkerSlot::wakeups`] with the count it started from before it waits: a wake-up that
    /// came before the switch is counted, one after it sets the latch (both sides SeqCst).
    pub fn listen(&self, on: bool) {
        self.listening.store(on, Ordering::SeqCst);
    }

    /// Wakes the worker if it is running and listening; counts the wake-up either way. Never
    /// raises an error: safe inside commit callbacks.
    pub fn wake(&self) {
        let latch = self.latch.load(Ordering::Acquire);
        if !latch.is_null() {
            self.wakeups.fetch_add(1, Ordering::SeqCst);
            if self.listening.load(Ordering::SeqCst) {
                // SAFETY: the pointer is a PGPROC latch in shared memory, valid for the life of
                // the cluster; if the worker has just exited, setting a recycled latch is a
                // harmless spurious wakeup. SetLatch is safe to call from any backend and never
                // errors.
                unsafe { pg_sys::SetLatch(latch) };
            }
        }
    }
}

#[repr(C)]
struct SharedState {
    slots: [WorkerSlot; MAX_DATABASES],
}

/// Points into shared memory once the startup hook ran; null when not preloaded.
static SHARED: AtomicPtr<SharedState> = AtomicPtr::new(ptr::null_mut());
#[cfg(not(feature = "pg14"))]
static mut PREV_SHMEM_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;
static mut PREV_SHMEM_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;

const SHMEM_NAME: &std::ffi::CStr = c"outbox_pg worker slots";

/// Installs the shared-memory hooks. Only from `_PG_init` while preloading.
pub fn init() {
    // SAFETY: _PG_init runs single-threaded in the postmaster while preloading libraries, the only
    // time hooks may be chained.
    unsafe {
        // 14 has no request hook: space is requested right here, while preloading.
        #[cfg(feature = "pg14")]
        pg_sys::RequestAddinShmemSpace(size_of::<SharedState>());
        #[cfg(not(feature = "pg14"))]
        {
            PREV_SHMEM_REQUEST_HOOK = pg_sys::shmem_request_hook;
            pg_sys::shmem_request_hook = Some(request_shmem);
        }
        PREV_SHMEM_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(startup_shmem);
    }
}

/// Postmaster, during startup: reserve room for the slot table.
#[cfg(not(feature = "pg14"))]
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

/// What the launcher hands a worker it starts: a slot and the generation it was assigned with.
/// Travels as the worker's `Datum` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub index: usize,
    generation: u64,
}

/// Slot indexes fit in the low byte of a ticket (MAX_DATABASES <= 256).
const INDEX_BITS: u32 = 8;

impl Ticket {
    pub fn to_datum(self) -> pg_sys::Datum {
        pg_sys::Datum::from((self.generation << INDEX_BITS) | self.index as u64)
    }

    pub fn from_datum(datum: pg_sys::Datum) -> Self {
        let value = datum.value() as u64;
        Ticket {
            index: (value & ((1 << INDEX_BITS) - 1)) as usize,
            generation: value >> INDEX_BITS,
        }
    }
}

/// Worker: owns the slot of `ticket` for this process, unless the ticket is stale, another
/// process owns the slot, or another owned slot already serves the same database. The slot is
/// given back when the process exits.
pub fn own(ticket: Ticket) -> Option<&'static WorkerSlot> {
    let slot = slots().get(ticket.index)?;
    let database = slot.database();
    let rival = slots()
        .iter()
        .enumerate()
        .any(|(i, other)| i != ticket.index && other.database() == database && other.pid() != 0);
    if rival || !slot.own(ticket) {
        return None;
    }
    // SAFETY: registering an exit callback is allowed any time in a backend; it only stores
    // atomics in shared memory.
    unsafe { pg_sys::before_shmem_exit(Some(disown_at_exit), pg_sys::Datum::from(ticket.index)) };
    Some(slot)
}

/// `before_shmem_exit` callback: runs in the exiting worker, before shared memory detaches.
#[pg_guard]
unsafe extern "C-unwind" fn disown_at_exit(_code: i32, index: pg_sys::Datum) {
    if let Some(slot) = slots().get(index.value()) {
        slot.disown();
    }
}
