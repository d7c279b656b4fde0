//! The database worker: one per published database, started by the launcher.
//!
//! This module is the process shell: connect, own the database's slot, pin the session, wait
//! until the extension is ready and the producer works, then run publishing rounds
//! ([`round`]), expire history ([`retention`]) and sleep only when idle, until a commit wakes
//! the worker or `outbox.poll_interval` passes. Every wait obeys SIGTERM, SIGHUP and
//! postmaster death.
//!
//! Only this thread calls Postgres. librdkafka reports reach it as plain data ([`kafka`]).

mod kafka;
mod queue;
mod retention;
mod round;
mod spi;

use std::time::Duration;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::shmem::{self, Ticket, WorkerSlot, WorkerState};
use crate::{guc, process};
use kafka::Kafka;
use queue::Queue;
use retention::Retention;
use round::{Publishing, RoundEnd};

/// Background worker entry point; `arg` is the ticket the launcher issued.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn outbox_worker_main(arg: pg_sys::Datum) {
    let ticket = Ticket::from_datum(arg);
    process::install_signal_handlers();
    let Some(database) = shmem::slots().get(ticket.index).map(WorkerSlot::database) else {
        pgrx::error!(
            "outbox_pg worker started with an invalid slot {}",
            ticket.index
        );
    };
    // SAFETY: a background worker with shared-memory access connects once, before any
    // transaction; InvalidOid: the bootstrap superuser.
    unsafe { pg_sys::BackgroundWorkerInitializeConnectionByOid(database, pg_sys::InvalidOid, 0) };
    let Some(slot) = shmem::own(ticket) else {
        log!("outbox_pg: another worker already publishes this database; exiting");
        return;
    };
    process::pin_session_settings();
    // What ALTER DATABASE / ALTER ROLE said about read-only when this session connected: the
    // worker follows a freeze set or lifted that way by starting a fresh session.
    let connected_read_only = process::in_transaction(
        "outbox_pg: reading settings",
        process::catalog_read_only_default,
    );
    let name = database_name();
    let Some(mut publishing) = wait_until_ready(slot, &name, connected_read_only) else {
        return;
    };
    log!("outbox_pg: publishing database \"{name}\"");
    run(&mut publishing);
    publishing.land();
    log!("outbox_pg: worker for database \"{name}\" stopped");
    // Everything sent has been recorded; the process exits now. Destroying the producer could
    // wait for its broker connections, and exit frees it all.
    std::mem::forget(publishing);
}

/// How often a worker that is not ready yet looks again, at most.
const READY_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Rounds until a stop is requested.
fn run(publishing: &mut Publishing) {
    while !process::stop_requested() && !publishing.wants_fresh_session() {
        process::exit_if_postmaster_died();
        process::serve_interrupts();
        process::reload_if_requested();
        // New producer settings are taken between flights (a flight withdraws its messages
        // itself when they change).
        if !publishing.in_flight() && !publishing.kafka().refresh() {
            // Misconfigured (set by refresh) stays the state shown until the settings work.
            publishing.kafka().idle(poll_interval());
            continue;
        }
        // During the round commits only count their wake-ups (no signal to a busy worker); a
        // wake-up counted since the last claim announced work it may not have seen, and a latch
        // set meanwhile may have been consumed by a wait inside the round (ours, or Postgres's:
        // a lock, synchronous replication). Either way: go again instead of sleeping.
        process::take_latch_wakeup();
        publishing.listen(false);
        let end = publishing.round();
        let more_history = !process::stop_requested() && publishing.expire();
        publishing.listen(true);
        let woken_meanwhile = process::take_latch_wakeup() || publishing.unseen_wakeups();
        if end != RoundEnd::More && !more_history && !woken_meanwhile {
            publishing.idle(poll_interval());
        }
    }
}

/// Waits until the server is a primary, the extension is installed at this library's version
/// and the producer settings work; None if asked to stop first.
fn wait_until_ready(
    slot: &'static WorkerSlot,
    database: &str,
    connected_read_only: Option<String>,
) -> Option<Publishing> {
    let library = env!("CARGO_PKG_VERSION");
    let mut reported: Option<String> = None;
    let mut note = |state: WorkerState, why: &str| {
        slot.set_state(state);
        if reported.as_deref() != Some(why) {
            log!("outbox_pg: waiting in database \"{database}\": {why}");
            reported = Some(why.to_string());
        }
    };
    // The producer is made once the settings work, and kept while the tables are locked.
    let mut kafka: Option<Kafka> = None;
    loop {
        if process::stop_requested() {
            return None;
        }
        // SAFETY: reading a backend-global flag.
        if unsafe { pg_sys::RecoveryInProgress() } {
            note(
                WorkerState::WaitingForExtension,
                "the server is in recovery (standby)",
            );
        } else {
            let installed =
                process::in_transaction("outbox_pg: checking extension", installed_version);
            match installed.as_deref() {
                Some(v) if v == library => {
                    if let Some(kafka) = kafka.as_mut() {
                        kafka.refresh();
                    } else {
                        match Kafka::new(slot) {
                            Ok(made) => kafka = Some(made),
                            Err(error) => {
                                slot.record_error(&error);
                                note(
                                    WorkerState::Misconfigured,
                                    &format!("the Kafka producer settings do not work: {error}"),
                                );
                            }
                        }
                    }
                    if kafka.is_some() {
                        // Preparing reads the tables: DDL holding them makes it wait (bounded).
                        let prepared = process::in_transaction_unless_locked(
                            "outbox_pg: preparing",
                            || {
                                let queue = Queue::prepare();
                                let position = queue.position();
                                (queue, Retention::prepare(), position)
                            },
                        );
                        match prepared {
                            Some((queue, retention, position)) => {
                                return Some(Publishing::new(
                                    slot,
                                    database.to_string(),
                                    queue,
                                    retention,
                                    kafka.take().expect("made above"),
                                    position,
                                    connected_read_only,
                                ))
                            }
                            None => note(
                                WorkerState::WaitingForLock,
                                "another session holds a lock on the outbox tables",
                            ),
                        }
                    }
                }
                Some(v) => note(
                    WorkerState::WaitingForExtension,
                    &format!("extension version {v} is installed but the library is {library}; run ALTER EXTENSION outbox_pg UPDATE"),
                ),
                None => note(
                    WorkerState::WaitingForExtension,
                    "the extension is not installed (CREATE EXTENSION outbox_pg)",
                ),
            }
        }
        // CREATE EXTENSION, a promotion or a fixed setting announce nothing: look again soon,
        // however long outbox.poll_interval is.
        process::wait(poll_interval().min(READY_CHECK_INTERVAL), None);
    }
}

/// The installed version of the extension in this database, if installed.
fn installed_version() -> Option<String> {
    Spi::get_one::<String>(
        "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'outbox_pg'",
    )
    .ok()
    .flatten()
}

fn database_name() -> String {
    // SAFETY: MyDatabaseId is set once connected; the name is a palloc'd copy, read inside a
    // transaction (a catalog lookup).
    process::in_transaction("outbox_pg: starting", || unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if name.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned()
        }
    })
}

fn poll_interval() -> Duration {
    Duration::from_millis(guc::POLL_INTERVAL_MS.get().max(1) as u64)
}
