//! Retention: deletes published events `outbox.retention` after they were published, with their
//! receipts, in small chunks between rounds.
//!
//! A receipt (a row of outbox.batches) lists the events one batch published. Receipts are
//! walked in id order from where the last chunk stopped, and a receipt old enough takes its
//! events with it: they are deleted by id, through the primary key. So retention never scans
//! the events table: its cost is the rows it deletes, whatever an old snapshot keeps alive
//! behind it and however many dead or unpublished rows there are (those have no receipt). The
//! newest receipt is the worker's position: its events expire, its row stays.
//!
//! Rows that are never published here have no receipt: rows that arrived by logical
//! replication while `outbox.publish_replicated` is off (their xid is NULL). A second walk, of
//! the xid index's NULL end in seq order, deletes those once they are older than the retention.
//! A dead event stays until it is retried (then published, with a receipt) or discarded
//! (outbox.discard deletes it).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pgrx::pg_sys;

use super::spi::{self, Arg, Plan};
use crate::{guc, process};

/// Events deleted per chunk at most: a chunk holds up publishing for a few milliseconds.
const CHUNK: usize = 256;
/// Receipts looked at per chunk (whole ones go in one statement, however many).
const RECEIPTS_PER_CHUNK: i64 = 256;
/// How often retention looks for old rows while it found none.
const INTERVAL: Duration = Duration::from_secs(1);
/// How often the walk over unstamped rows starts over (a replicated row can arrive with an
/// older seq than one the walk passed).
const UNSTAMPED_RESTART_EVERY: Duration = Duration::from_secs(600);

/// Retention's statements, and how far it got.
pub struct Retention {
    old_receipts: Plan,
    delete_receipt_events: Plan,
    delete_receipt: Plan,
    delete_receipts: Plan,
    expire_unstamped: Plan,
    /// The receipt being expired, and how many of its events are deleted already.
    receipt: Option<(i64, usize)>,
    /// Receipts up to this id are gone.
    receipts_after: i64,
    /// Unstamped rows: walked up to this seq.
    unstamped_after: i64,
    unstamped_restarted_at: Instant,
    last_run: Option<Instant>,
}

impl Retention {
    /// Prepares the statements. Inside a transaction, with the extension installed.
    pub fn prepare() -> Retention {
        use pg_sys::{INT4OID, INT8ARRAYOID, INT8OID, UUIDOID};
        spi::connected(|| Retention {
            // The receipts after the cursor, each with its event count, whether it is old
            // enough, and whether it is the newest (the position: its row stays).
            old_receipts: Plan::prepare(
                "SELECT b.id, b.event_count,
                        b.recorded_at < clock_timestamp() - $2 * interval '1 second',
                        b.id = (SELECT max(n.id) FROM outbox.batches n)
                 FROM outbox.batches b
                 WHERE b.id > $1
                 ORDER BY b.id LIMIT $3",
                &[INT8OID, INT8OID, INT8OID],
            ),
            // Events $2..$3 (1-based) of receipt $1, by primary key.
            delete_receipt_events: Plan::prepare(
                "DELETE FROM outbox.events e
                 WHERE e.id = ANY ((SELECT b.event_ids[$2:$3] FROM outbox.batches b
                                    WHERE b.id = $1)::uuid[])",
                &[INT8OID, INT4OID, INT4OID],
            ),
            delete_receipt: Plan::prepare("DELETE FROM outbox.batches WHERE id = $1", &[INT8OID]),
            // Whole receipts (the ids listed, each looked at), and their events by primary key.
            delete_receipts: Plan::prepare(
                "WITH gone AS (
                     DELETE FROM outbox.batches b WHERE b.id = ANY ($1) RETURNING b.event_ids)
                 DELETE FROM outbox.events e
                 WHERE e.id = ANY (ARRAY(SELECT unnest(g.event_ids) FROM gone g))",
                &[INT8ARRAYOID],
            ),
            // Unstamped rows after the cursor in seq order (the NULL end of events_xid):
            // those emitted before the cutoff id are deleted, unless parked (a dead event from
            // before 0.3.0). Returns each row's seq and whether it was old enough.
            expire_unstamped: Plan::prepare(
                "WITH scanned AS (
                     SELECT e.id, e.seq, e.id < $2 AS old,
                            EXISTS (SELECT 1 FROM outbox.parked p WHERE p.event_id = e.id) AS parked
                     FROM outbox.events e
                     WHERE e.xid IS NULL AND e.seq > $1
                     ORDER BY e.xid, e.seq LIMIT $3),
                 expired AS (
                     DELETE FROM outbox.events e USING scanned s
                     WHERE e.id = s.id AND s.old AND NOT s.parked RETURNING e.id)
                 SELECT s.seq, s.old FROM scanned s ORDER BY s.seq",
                &[INT8OID, UUIDOID, INT8OID],
            ),
            receipt: None,
            receipts_after: 0,
            unstamped_after: i64::MIN,
            unstamped_restarted_at: Instant::now(),
            last_run: None,
        })
    }

    /// Deletes one chunk of old rows if it is time; true if it stopped for the chunk's limits
    /// (more may be waiting).
    pub fn run(&mut self) -> bool {
        let retention = guc::RETENTION_S.get();
        if retention < 0 || self.last_run.is_some_and(|at| at.elapsed() < INTERVAL) {
            return false;
        }
        if self.unstamped_restarted_at.elapsed() >= UNSTAMPED_RESTART_EVERY {
            self.unstamped_after = i64::MIN;
            self.unstamped_restarted_at = Instant::now();
        }
        let retention = Duration::from_secs(retention as u64);
        // Where the walks stand: put back if the chunk's transaction does not commit (a lock
        // wait that timed out), or rows it deleted would be skipped for good.
        let cursors = (self.receipt, self.receipts_after, self.unstamped_after);
        let more =
            process::in_transaction_unless_locked("outbox_pg: expiring published events", || {
                // A database that refuses writes (a freeze) keeps its history until it thaws.
                if process::transaction_is_read_only() {
                    return false;
                }
                spi::connected(|| {
                    let (receipted, cut) = self.expire_receipts(retention, CHUNK);
                    cut || receipted + self.expire_unstamped(retention, CHUNK - receipted) >= CHUNK
                })
            })
            .unwrap_or_else(|| {
                (self.receipt, self.receipts_after, self.unstamped_after) = cursors;
                false
            });
        // Stopped by the chunk's limits: more may be waiting, and the worker comes back after
        // its next round. Otherwise (or locked, or read-only) look again in a second.
        if !more {
            self.last_run = Some(Instant::now());
        }
        more
    }

    /// Deletes up to `budget` events of old receipts, and the receipts whose events are all
    /// gone: consecutive whole receipts in one statement with their events,
    /// a receipt larger than what is left of the budget in slices. Returns how many events it
    /// deleted, and whether it stopped for the chunk's limits rather than at a young receipt.
    fn expire_receipts(&mut self, retention: Duration, budget: usize) -> (usize, bool) {
        let rows = self.old_receipts.run(
            &[
                Arg::int8(self.receipts_after),
                Arg::int8(retention.as_secs() as i64),
                Arg::int8(RECEIPTS_PER_CHUNK),
            ],
            false,
        );
        let receipts: Vec<(i64, usize, bool, bool)> = (0..rows.len())
            .filter_map(|i| {
                Some((
                    rows.int8(i, 1)?,
                    rows.int4(i, 2).unwrap_or(0).max(0) as usize,
                    rows.boolean(i, 3)?,
                    rows.boolean(i, 4)?,
                ))
            })
            .collect();
        drop(rows);
        let listed = receipts.len() as i64;
        let mut left = budget;
        // Whole receipts listed and not deleted yet.
        let mut whole = Vec::new();
        for (id, events, old, newest) in receipts {
            if !old {
                self.delete_whole(&mut whole);
                return (budget - left, false); // recorded in id order: the rest is younger
            }
            let done = match self.receipt {
                Some((at, done)) if at == id => done,
                _ => 0,
            };
            if done == 0 && !newest && events <= left {
                whole.push(id);
                left -= events;
                continue;
            }
            self.delete_whole(&mut whole);
            let take = (events - done.min(events)).min(left);
            if take > 0 {
                self.delete_receipt_events.run(
                    &[
                        Arg::int8(id),
                        Arg::from_into(done as i32 + 1),
                        Arg::from_into((done + take) as i32),
                    ],
                    false,
                );
                left -= take;
            }
            if done + take < events || newest {
                // The budget ran out inside this receipt, or it is the position: its row stays
                // (its events are gone once done reaches events).
                self.receipt = Some((id, done + take));
                return (budget - left, done + take < events);
            }
            self.delete_receipt.run(&[Arg::int8(id)], false);
            self.receipt = None;
            self.receipts_after = id;
        }
        self.delete_whole(&mut whole);
        (budget - left, left == 0 || listed == RECEIPTS_PER_CHUNK)
    }

    /// Deletes the receipts `ids` (consecutive after the cursor, all looked at), with their
    /// events.
    fn delete_whole(&mut self, ids: &mut Vec<i64>) {
        let Some(&last) = ids.last() else {
            return;
        };
        self.delete_receipts
            .run(&[Arg::from_into(std::mem::take(ids))], false);
        self.receipts_after = last;
    }

    /// Deletes up to `budget` unstamped rows emitted more than `retention` ago; returns how many
    /// rows it walked past.
    fn expire_unstamped(&mut self, retention: Duration, budget: usize) -> usize {
        if budget == 0 {
            return 0;
        }
        let cutoff = SystemTime::now()
            .checked_sub(retention)
            .unwrap_or(UNIX_EPOCH)
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        // The smallest UUIDv7 of the cutoff millisecond: every event emitted before it is below.
        let cutoff = uuid::Builder::from_unix_timestamp_millis(cutoff.as_millis() as u64, &[0; 10])
            .into_uuid();
        let rows = self.expire_unstamped.run(
            &[
                Arg::int8(self.unstamped_after),
                Arg::uuid(cutoff),
                Arg::int8(budget as i64),
            ],
            false,
        );
        let mut walked = 0;
        for i in 0..rows.len() {
            let (Some(seq), Some(old)) = (rows.int8(i, 1), rows.boolean(i, 2)) else {
                continue;
            };
            if !old {
                break; // the walk goes on from here once this row is old enough
            }
            self.unstamped_after = seq;
            walked += 1;
        }
        walked
    }
}
