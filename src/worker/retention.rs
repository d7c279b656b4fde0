//! Retention: deletes published events (and receipt rows) older than `outbox.retention`, in
//! small chunks, each from where the last one stopped, so its cost does not grow with rows an
//! old snapshot keeps alive or with old unpublished and dead rows it must keep. A full pass from
//! the beginning every `RESTART_EVERY` picks up rows it had to skip (parked rows published
//! since, events of a long prepared transaction).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::queue::{Queue, Snapshot};
use crate::{guc, process};

/// Rows scanned per chunk; one chunk per round while there is a backlog of old rows.
const CHUNK: usize = 1000;
/// How often retention runs while there is nothing to delete.
const INTERVAL: Duration = Duration::from_secs(1);
/// How often the scan starts over from the oldest row.
const RESTART_EVERY: Duration = Duration::from_secs(600);
/// How long the scan waits at an event not yet handled before it steps over it (a long
/// prepared transaction's event must not make every pass revisit what was deleted after it).
const STEP_OVER_AFTER: Duration = Duration::from_secs(60);

pub struct Retention {
    /// Events: scanned up to this id.
    events_after: uuid::Uuid,
    /// Receipt rows: deleted up to this id.
    batches_after: i64,
    last_run: Option<Instant>,
    restarted_at: Instant,
    /// The event not yet handled the scan has been waiting at, and since when.
    waiting_at: Option<(uuid::Uuid, Instant)>,
}

impl Retention {
    pub fn new() -> Self {
        Retention {
            events_after: uuid::Uuid::nil(),
            batches_after: 0,
            last_run: None,
            restarted_at: Instant::now(),
            waiting_at: None,
        }
    }

    /// Runs one chunk if it is time; true if more old rows are waiting.
    pub fn run(&mut self, queue: &Queue, below: &Snapshot) -> bool {
        let retention = guc::RETENTION_S.get();
        if retention < 0 || self.last_run.is_some_and(|at| at.elapsed() < INTERVAL) {
            return false;
        }
        if self.restarted_at.elapsed() >= RESTART_EVERY {
            self.events_after = uuid::Uuid::nil();
            self.batches_after = 0;
            self.restarted_at = Instant::now();
        }
        let retention = Duration::from_secs(retention as u64);
        let cutoff = SystemTime::now()
            .checked_sub(retention)
            .unwrap_or(UNIX_EPOCH)
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        // The smallest UUIDv7 of the cutoff millisecond: every event emitted before it is below.
        let cutoff = uuid::Builder::from_unix_timestamp_millis(cutoff.as_millis() as u64, &[0; 10])
            .into_uuid();
        let Some((scanned, deleted_batches)) =
            process::in_transaction_unless_locked("outbox_pg: expiring published events", || {
                // A database that refuses writes (a freeze) keeps its history until it thaws.
                (!process::transaction_is_read_only()).then(|| {
                    (
                        queue.expire_events(self.events_after, cutoff, below, CHUNK),
                        queue.expire_batches(self.batches_after, retention, CHUNK),
                    )
                })
            })
            .flatten()
        else {
            // Another session holds a lock on the outbox tables, or writes are refused: next time.
            self.last_run = Some(Instant::now());
            return false;
        };
        // Stop before the first event not yet handled (it is expirable soon), unless the scan
        // has waited there too long.
        let mut more = scanned.len() >= CHUNK;
        let first_unhandled = scanned
            .iter()
            .find(|(_, handled)| !handled)
            .map(|(id, _)| *id);
        let step_over = match (first_unhandled, self.waiting_at) {
            (Some(id), Some((at, since))) if id == at => since.elapsed() >= STEP_OVER_AFTER,
            (Some(id), _) => {
                self.waiting_at = Some((id, Instant::now()));
                false
            }
            (None, _) => {
                self.waiting_at = None;
                false
            }
        };
        for (id, handled) in &scanned {
            if !handled && !step_over {
                more = false;
                break;
            }
            self.events_after = *id;
        }
        if let Some(last) = deleted_batches.last() {
            self.batches_after = *last;
        }
        more |= deleted_batches.len() >= CHUNK;
        if !more {
            self.last_run = Some(Instant::now());
        }
        more
    }
}
