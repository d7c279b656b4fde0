//! The shared-memory table of database workers: which worker serves which database, its latch
//! (so committing backends can wake it) and its state (for operators).
//!
//! Exists only when the library is in `shared_preload_libraries`; elsewhere [`slots`] is empty and
//! every caller degrades to polling.

use std::ptr;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, Ordering};

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
}

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

    /// Launcher: reserve this slot for a database.
    pub fn assign(&self, database: pg_sys::Oid) {
        self.set_state(WorkerState::Starting);
        self.database.store(database.to_u32(), Ordering::Release);
    }

    /// Launcher: the worker is gone for good; free the slot.
    pub fn release(&self) {
        self.database.store(0, Ordering::Release);
        self.pid.store(0, Ordering::Release);
        self.latch.store(ptr::null_mut(), Ordering::Release);
        self.state.store(0, Ordering::Release);
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
