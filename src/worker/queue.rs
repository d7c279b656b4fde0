//! The worker's SQL: where it stands, which committed events come next, what it records.
//!
//! Nothing here walks or rewrites published history. The worker's position is a pair of
//! snapshots (see `outbox.batches`): the events of transactions that committed between them
//! form a *window*, walked in (seq, id) order. A window's events are found through the xid index
//! (transactions that began after the lower snapshot: a range; those that were running then: a
//! short list) and the (seq, id) index, never through rows published before. Outcomes are
//! inserted (a receipt row per batch, parked rows for failures), never updated into event rows,
//! so publishing leaves no dead tuples an old snapshot could pin.
//!
//! Nothing here knows about Kafka: it hands out [`Shipment`]s and records what became of them.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outbox_pg_core::event::{Event, Seq, Timestamp};
use outbox_pg_core::ordering::Shipment;
use pgrx::pg_sys;

use super::spi::{self, Arg, Plan, Rows};
use crate::encoding;

/// A snapshot as `pg_snapshot` writes it: `xmin:xmax:xip1,xip2,...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub xmin: u64,
    pub xmax: u64,
    pub xip: Vec<u64>,
}

impl Snapshot {
    pub fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u64>>>()?,
        };
        Some(Snapshot { xmin, xmax, xip })
    }

    /// The snapshot in which exactly the transactions before `xmax` are visible.
    pub fn floor(xmax: u64) -> Snapshot {
        Snapshot {
            xmin: xmax,
            xmax,
            xip: Vec::new(),
        }
    }

    pub fn text(&self) -> String {
        let xip: Vec<String> = self.xip.iter().map(u64::to_string).collect();
        format!("{}:{}:{}", self.xmin, self.xmax, xip.join(","))
    }
}

/// A position in (seq, id) order.
pub type Key = (Seq, uuid::Uuid);

/// Where the worker stands: every event of a transaction visible in `below` has been handled;
/// `window` is the batch of transactions being walked, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub below: Snapshot,
    pub window: Option<Window>,
}

/// The events of the transactions visible in `upto` but not in `below`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub upto: Snapshot,
    /// Transactions running at `below` that finished by `upto`: their events are walked by xid.
    pub late: Vec<u64>,
    /// The highest seq of the other transactions' events; None if they wrote none.
    pub range_last: Option<Seq>,
    /// Walked up to here (exclusive of what follows).
    pub range_after: Key,
    pub late_after: Key,
}

/// Before every (seq, id) key; after every key is `(last, MAX)`.
const BEFORE_ALL: Key = (i64::MIN, uuid::Uuid::nil());
const UUID_MAX: uuid::Uuid = uuid::Uuid::max();

/// How much one round claims.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub events: usize,
    pub bytes: usize,
    /// Failed events retried (each sent alone) per round.
    pub retries: usize,
}

/// A row the worker cannot turn into a message (not UTF-8, headers that are not strings...): it
/// is dead-lettered with the reason instead of stopping the worker.
#[derive(Debug)]
pub struct Unreadable {
    pub id: uuid::Uuid,
    pub parked: bool,
    pub reason: String,
}

/// What one claim found.
#[derive(Debug, Default)]
pub struct Claim {
    /// Failed events due for a retry, each to be sent alone.
    pub singles: Vec<Shipment>,
    /// Events sent together, in emission order per topic and key: parked events released
    /// behind a published one, then new events.
    pub group: Vec<Shipment>,
    /// New events of a topic and key that has parked events: they wait behind those, unsent.
    pub held: Vec<uuid::Uuid>,
    /// The topics and keys of `held`, and those a dead row holds (`outbox.dead_events = hold`).
    pub held_keys: HashSet<(String, String)>,
    pub unreadable: Vec<Unreadable>,
    /// The position once this claim is recorded (None: unchanged).
    pub next: Option<Position>,
    /// More work is known to be waiting.
    pub more: bool,
    /// outbox.parked held a retry that was due at the claim.
    pub retry_due: bool,
}

/// An event's fate, as the worker records it.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// Published at this partition and offset.
    Published {
        partition: i32,
        offset: i64,
    },
    /// Retry after `delay` (a failure, or a send interrupted by shutdown), with this many
    /// failed attempts.
    Retry {
        attempts: i32,
        delay: Duration,
        error: Option<String>,
    },
    /// Waits behind an earlier parked event of its topic and key.
    Wait,
    Dead {
        attempts: i32,
        error: String,
    },
    /// Nothing changes (a parked event left as it was).
    Unchanged,
}

/// The worker's prepared statements. Plans live across transactions.
pub struct Queue {
    paused: Plan,
    position: Plan,
    current_snapshot: Plan,
    window_range: Plan,
    range_events: Plan,
    late_events: Plan,
    events_at: Plan,
    anything_parked: Plan,
    parked_topics: Plan,
    held_back: Plan,
    due_heads: Plan,
    released_behind: Plan,
    keys_of: Plan,
    insert_batch: Plan,
    park: Plan,
    unpark: Plan,
    advance_keys: Plan,
    subscribed: Plan,
}

/// Columns of an event row as [`event_at`] reads them, after a leading ctid.
const EVENT_COLUMNS: &str = "e.ctid::text, e.id, e.seq, e.event_type, e.aggregate_id, \
     e.payload::text, e.headers::text, coalesce(e.topic, e.event_type), e.created_at, \
     coalesce(e.message_bytes, 0)";

/// The columns [`event_at`] reads (2 to 10), of a window row `c` that carries `fits` and
/// `bytes`: the text columns only for rows that fit the byte budget.
const WINDOW_COLUMNS: &str = "c.id, c.seq, c.event_type, c.aggregate_id, \
     CASE WHEN c.fits THEN c.payload::text END, CASE WHEN c.fits THEN c.headers::text END, \
     coalesce(c.topic, c.event_type), c.created_at, c.bytes";

/// A window row: its order key, its size, and the event (None when it lies beyond the byte
/// budget of its part, so it was not read).
struct WindowRow {
    key: Key,
    bytes: usize,
    event: Option<Result<Event, String>>,
}

/// A candidate: where the row is, its order key and its size.
#[derive(Debug, Clone)]
struct Candidate {
    ctid: String,
    key: Key,
    bytes: usize,
    /// For parked events: failed attempts so far.
    attempts: Option<i32>,
}

impl Queue {
    /// Prepares every statement. Inside a transaction, with the extension installed.
    pub fn prepare() -> Queue {
        use pg_sys::{BOOLOID, INT8OID, PG_SNAPSHOTOID, TEXTARRAYOID, UUIDOID};
        use pg_sys::{FLOAT8ARRAYOID, INT4ARRAYOID, INT8ARRAYOID, TEXTOID, UUIDARRAYOID, XID8OID};
        spi::connected(|| {
            Queue {
            paused: Plan::prepare("SELECT EXISTS (SELECT 1 FROM outbox.control)", &[]),
            position: Plan::prepare(
                "SELECT below::text, upto::text, range_last_seq, range_after_seq, range_after_id,
                        late_after_seq, late_after_id
                 FROM outbox.batches ORDER BY id DESC LIMIT 1",
                &[],
            ),
            current_snapshot: Plan::prepare("SELECT pg_current_snapshot()::text", &[]),
            // The new transactions' events of a window, found by an xid range bounded on both
            // sides (OFFSET 0: not the min/max shortcut, which would walk events_seq whole).
            window_range: Plan::prepare(
                "SELECT min(w.seq), max(w.seq) FROM (
                     SELECT e.seq FROM outbox.events e
                     WHERE e.xid >= $1 AND e.xid < $2 AND pg_visible_in_snapshot(e.xid, $3)
                     OFFSET 0) w",
                &[XID8OID, XID8OID, PG_SNAPSHOTOID],
            ),
            // The next of them in (seq, id) order: a walk of events_seq from where the last batch
            // stopped; the window test is a filter no index could serve (visible in the upper
            // snapshot, not in the floor snapshot `below.xmax:below.xmax:`). Rows are read whole,
            // but only those within the byte budget $7 (counted from the first, which always
            // fits) are turned into text.
            range_events: Plan::prepare(
                &format!(
                    "SELECT c.fits, {WINDOW_COLUMNS}
                     FROM (SELECT e.*, coalesce(e.message_bytes, 0) AS bytes,
                                  sum(coalesce(e.message_bytes, 0)) OVER w <= $7
                                  OR row_number() OVER w = 1 AS fits
                           FROM outbox.events e
                           WHERE (e.seq, e.id) > ($1, $2) AND e.seq <= $3
                             AND pg_visible_in_snapshot(e.xid, $4)
                             AND NOT pg_visible_in_snapshot(e.xid, $5)
                           WINDOW w AS (ORDER BY e.seq, e.id ROWS UNBOUNDED PRECEDING)
                           ORDER BY e.seq, e.id LIMIT $6) c"
                ),
                &[INT8OID, UUIDOID, INT8OID, PG_SNAPSHOTOID, PG_SNAPSHOTOID, INT8OID, INT8OID],
            ),
            // The next events of the transactions that were running at `below`: each one's
            // (xid, seq) range from the cursor on, merged; read whole like the range's.
            late_events: Plan::prepare(
                &format!(
                    "SELECT c.fits, {WINDOW_COLUMNS}
                     FROM (SELECT d.*, sum(d.bytes) OVER w <= $5 OR row_number() OVER w = 1 AS fits
                           FROM (SELECT e.*, coalesce(e.message_bytes, 0) AS bytes
                                 FROM unnest($1::text[]::xid8[]) AS x(xid) CROSS JOIN LATERAL (
                                     SELECT e.* FROM outbox.events e
                                     WHERE e.xid = x.xid AND e.seq >= $2 AND (e.seq, e.id) > ($2, $3)
                                     ORDER BY e.seq, e.id LIMIT $4) e
                                 ORDER BY e.seq, e.id LIMIT $4) d
                           WINDOW w AS (ORDER BY d.seq, d.id ROWS UNBOUNDED PRECEDING)) c"
                ),
                &[TEXTARRAYOID, INT8OID, UUIDOID, INT8OID, INT8OID],
            ),
            events_at: Plan::prepare(
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM outbox.events e WHERE e.ctid = ANY ($1::text[]::tid[])"
                ),
                &[TEXTARRAYOID],
            ),
            // Whether anything is parked that a claim must look at, and whether a retry is
            // due (one statement: it runs at every claim).
            anything_parked: Plan::prepare(
                "SELECT EXISTS (SELECT 1 FROM outbox.parked WHERE state <> 'dead' OR $1),
                        EXISTS (SELECT 1 FROM outbox.parked
                                WHERE state = 'retrying' AND next_attempt_at <= clock_timestamp())",
                &[BOOLOID],
            ),
            // The distinct topics of parked events: a loose index scan over parked_key, one
            // probe per topic however many events are parked.
            parked_topics: Plan::prepare(
                "WITH RECURSIVE t(topic) AS (
                     SELECT min(topic) FROM outbox.parked
                     UNION ALL
                     SELECT (SELECT min(p.topic) FROM outbox.parked p WHERE p.topic > t.topic)
                     FROM t WHERE t.topic IS NOT NULL)
                 SELECT topic FROM t WHERE topic IS NOT NULL",
                &[],
            ),
            // New events behind a parked one of their topic and key, and events that are
            // parked themselves (restored by pg_restore, which stamps them anew): the parked
            // path serves those.
            held_back: Plan::prepare(
                "SELECT e.id, EXISTS (SELECT 1 FROM outbox.parked s WHERE s.event_id = e.id)
                 FROM outbox.events e
                 WHERE e.id = ANY ($1) AND EXISTS (
                     SELECT 1 FROM outbox.parked p
                     WHERE p.topic = coalesce(e.topic, e.event_type) AND p.aggregate_id = e.aggregate_id
                       AND (p.state <> 'dead' OR $2 OR p.event_id = e.id))",
                &[UUIDARRAYOID, BOOLOID],
            ),
            // The first parked event of each topic and key is the only one served.
            due_heads: Plan::prepare(
                "SELECT e.ctid::text, e.seq, e.id, coalesce(e.message_bytes, 0), p.attempts
                 FROM outbox.parked p JOIN outbox.events e ON e.id = p.event_id
                 WHERE p.state = 'retrying' AND p.next_attempt_at <= clock_timestamp()
                   AND NOT EXISTS (
                       SELECT 1 FROM outbox.parked q
                       WHERE q.topic = p.topic AND q.aggregate_id = p.aggregate_id AND q.seq < p.seq
                         AND (q.state <> 'dead' OR $2))
                 ORDER BY p.next_attempt_at, p.seq LIMIT $1",
                &[INT8OID, BOOLOID],
            ),
            // The parked events behind a released head, in order, each with whether it may
            // travel with it: never failed itself (waiting, or a send a stop interrupted). The
            // chain ends at the first that may not (a failed event goes alone; a dead one that
            // holds its key stops it); dead events that do not hold are skipped.
            released_behind: Plan::prepare(
                "SELECT e.ctid::text, e.seq, e.id, coalesce(e.message_bytes, 0), p.attempts,
                        p.state <> 'dead' AND p.attempts = 0
                 FROM outbox.parked h
                 JOIN outbox.parked p ON p.topic = h.topic AND p.aggregate_id = h.aggregate_id
                                     AND p.seq > h.seq AND (p.state <> 'dead' OR $3)
                 JOIN outbox.events e ON e.id = p.event_id
                 WHERE h.event_id = $1
                 ORDER BY p.seq, p.event_id LIMIT $2",
                &[UUIDOID, INT8OID, BOOLOID],
            ),
            // The topic, key and (seq, id) of rows that cannot become messages.
            keys_of: Plan::prepare(
                "SELECT coalesce(e.topic, e.event_type), e.aggregate_id, e.seq, e.id
                 FROM outbox.events e WHERE e.id = ANY ($1)",
                &[UUIDARRAYOID],
            ),
            insert_batch: Plan::prepare(
                "INSERT INTO outbox.batches (below, upto, range_last_seq, range_after_seq,
                                             range_after_id, late_after_seq, late_after_id,
                                             event_ids, partitions, offsets)
                 VALUES ($1::pg_snapshot, $2::pg_snapshot, $3, $4, $5, $6, $7, $8, $9, $10)",
                &[
                    TEXTOID,
                    TEXTOID,
                    INT8OID,
                    INT8OID,
                    UUIDOID,
                    INT8OID,
                    UUIDOID,
                    UUIDARRAYOID,
                    INT4ARRAYOID,
                    INT8ARRAYOID,
                ],
            ),
            park: Plan::prepare(
                "INSERT INTO outbox.parked (event_id, seq, topic, aggregate_id, state, attempts,
                                            next_attempt_at, error, died_at)
                 SELECT e.id, e.seq, coalesce(e.topic, e.event_type), e.aggregate_id, d.state,
                        d.attempts,
                        clock_timestamp() + d.delay_ms * interval '1 millisecond', d.error,
                        CASE WHEN d.state = 'dead' THEN clock_timestamp() END
                 FROM unnest($1::uuid[], $2::text[], $3::int[], $4::float8[], $5::text[])
                      AS d(id, state, attempts, delay_ms, error)
                 JOIN outbox.events e ON e.id = d.id
                 ON CONFLICT (event_id) DO UPDATE
                    SET state = excluded.state, attempts = excluded.attempts,
                        next_attempt_at = excluded.next_attempt_at,
                        error = coalesce(excluded.error, parked.error),
                        -- a death keeps its time; a new one (after a retry) is recorded
                        died_at = CASE WHEN excluded.state = 'dead'
                                       THEN coalesce(parked.died_at, excluded.died_at) END",
                &[UUIDARRAYOID, TEXTARRAYOID, INT4ARRAYOID, FLOAT8ARRAYOID, TEXTARRAYOID],
            ),
            unpark: Plan::prepare(
                "DELETE FROM outbox.parked WHERE event_id = ANY ($1)",
                &[UUIDARRAYOID],
            ),
            // outbox.advance_keys() with a plan the worker keeps (an SQL function is planned
            // again on every call).
            advance_keys: Plan::prepare(
                "UPDATE outbox.parked p SET state = 'retrying', next_attempt_at = clock_timestamp()
                 FROM (SELECT DISTINCT ON (q.topic, q.aggregate_id) q.event_id, q.state
                       FROM (SELECT DISTINCT coalesce(e.topic, e.event_type) AS topic, e.aggregate_id
                             FROM outbox.events e WHERE e.id = ANY ($1)) k
                       JOIN outbox.parked q ON q.topic = k.topic AND q.aggregate_id = k.aggregate_id
                       WHERE q.state <> 'dead' OR $2
                       ORDER BY q.topic, q.aggregate_id, q.seq) head
                 WHERE p.event_id = head.event_id AND head.state = 'waiting'",
                &[UUIDARRAYOID, BOOLOID],
            ),
            subscribed: Plan::prepare(
                "SELECT EXISTS (SELECT 1 FROM pg_subscription_rel r
                                WHERE r.srrelid = 'outbox.events'::regclass)",
                &[],
            ),
        }
        })
    }

    /// True if this database receives outbox.events through a logical-replication subscription.
    pub fn events_are_subscribed(&self) -> bool {
        spi::connected(|| {
            self.subscribed
                .run(&[], true)
                .boolean(0, 1)
                .unwrap_or(false)
        })
    }

    /// True while `outbox.pause()` is in effect.
    pub fn paused(&self) -> bool {
        spi::connected(|| self.paused.run(&[], true).boolean(0, 1).unwrap_or(false))
    }

    /// Where the worker stands, from the newest receipt row; None if there is none (the table
    /// was emptied by hand).
    pub fn position(&self) -> Option<Position> {
        spi::connected(|| {
            let rows = self.position.run(&[], true);
            if rows.len() == 0 {
                return None;
            }
            let below = Snapshot::parse(&rows.ascii(0, 1)?)?;
            let window = match rows.ascii(0, 2) {
                None => None,
                Some(upto) => {
                    let upto = Snapshot::parse(&upto)?;
                    let late = finished_since(&below, &upto);
                    let key = |seq: i32, id: i32| -> Option<Key> {
                        Some((rows.int8(0, seq)?, rows.uuid(0, id)?))
                    };
                    Some(Window {
                        upto,
                        late,
                        range_last: rows.int8(0, 3),
                        range_after: key(4, 5).unwrap_or(BEFORE_ALL),
                        late_after: key(6, 7).unwrap_or(BEFORE_ALL),
                    })
                }
            };
            Some(Position { below, window })
        })
    }

    /// Claims what one round sends: due retries and released events from outbox.parked, then
    /// the window's next events, within `limits`. Inside the claim transaction (whose snapshot
    /// every statement here shares: read-only statements).
    pub fn claim(&self, position: &Position, limits: Limits, dead_holds: bool) -> Claim {
        spi::connected(|| {
            let mut claim = Claim::default();
            let parked = self.anything_parked.run(&[Arg::boolean(true)], true);
            let anything_parked = parked.boolean(0, 1).unwrap_or(false);
            claim.retry_due = parked.boolean(0, 2).unwrap_or(false);
            drop(parked);
            let mut budget = Budget::new(limits);
            if anything_parked && limits.retries > 0 {
                self.claim_parked(&mut claim, &mut budget, limits, dead_holds);
            }
            self.claim_window(&mut claim, position, &mut budget);
            if anything_parked && !claim.group.is_empty() {
                self.hold_back_parked_keys(&mut claim, dead_holds);
            }
            if dead_holds && !claim.unreadable.is_empty() {
                self.hold_behind_unreadable(&mut claim);
            }
            claim
        })
    }

    /// Due heads of parked keys: failed ones alone, released ones with the events behind them.
    fn claim_parked(
        &self,
        claim: &mut Claim,
        budget: &mut Budget,
        limits: Limits,
        dead_holds: bool,
    ) {
        let rows = self.due_heads.run(
            &[Arg::int8(limits.retries as i64), Arg::boolean(dead_holds)],
            true,
        );
        let heads: Vec<Candidate> = (0..rows.len())
            .filter_map(|i| candidate(&rows, i, true))
            .collect();
        drop(rows);
        claim.more |= heads.len() >= limits.retries;
        for head in heads {
            if head.attempts.unwrap_or(0) > 0 {
                for event in self.read(vec![head], true, claim) {
                    claim.singles.push(event);
                }
                continue;
            }
            // Never failed itself (released, or interrupted by a shutdown): it travels with the
            // parked events behind it, up to the first that may not travel (that one heads its
            // key next; skipping it would publish what follows before it).
            if !budget.admits(head.bytes) {
                claim.more = true;
                break;
            }
            let rows = self.released_behind.run(
                &[
                    Arg::uuid(head.key.1),
                    Arg::int8(budget.events_left() as i64),
                    Arg::boolean(dead_holds),
                ],
                true,
            );
            let mut chain = vec![head];
            for i in 0..rows.len() {
                if !rows.boolean(i, 6).unwrap_or(false) {
                    break;
                }
                match candidate(&rows, i, true) {
                    Some(next) if budget.admits(next.bytes) => chain.push(next),
                    Some(_) => {
                        claim.more = true;
                        break;
                    }
                    None => break,
                }
            }
            drop(rows);
            let events = self.read(chain, true, claim);
            claim.group.extend(events);
        }
    }

    /// The window's next events in (seq, id) order, opening a new window when the last one is
    /// done.
    fn claim_window(&self, claim: &mut Claim, position: &Position, budget: &mut Budget) {
        let window = match &position.window {
            Some(window) => window.clone(),
            None => match self.open_window(&position.below) {
                Some(window) => window,
                None => {
                    return;
                }
            },
        };
        let want = budget.events_left() as i64;
        let bytes = budget.bytes_left() as i64;
        let range = match window.range_last {
            Some(last) if want > 0 && window.range_after.0 <= last => self.window_rows(
                &self.range_events,
                vec![
                    Arg::int8(window.range_after.0),
                    Arg::uuid(window.range_after.1),
                    Arg::int8(last),
                    Arg::snapshot(&window.upto.text()),
                    Arg::snapshot(&Snapshot::floor(position.below.xmax).text()),
                    Arg::int8(want),
                    Arg::int8(bytes),
                ],
            ),
            _ => Vec::new(),
        };
        let late = if window.late.is_empty() || want == 0 {
            Vec::new()
        } else {
            let xids: Vec<String> = window.late.iter().map(u64::to_string).collect();
            self.window_rows(
                &self.late_events,
                vec![
                    Arg::from_into(xids),
                    Arg::int8(window.late_after.0),
                    Arg::uuid(window.late_after.1),
                    Arg::int8(want),
                    Arg::int8(bytes),
                ],
            )
        };
        let (range_exhausted, late_exhausted) =
            (range.len() < want as usize, late.len() < want as usize);

        // Merge the two parts in (seq, id) order, as far as the budget goes. A row admitted by
        // the merged budget fits its own part's budget too, so it was read.
        let (mut r, mut l) = (range.into_iter().peekable(), late.into_iter().peekable());
        let mut next = window.clone();
        let mut cut = false;
        loop {
            let from_late = match (r.peek(), l.peek()) {
                (None, None) => break,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some(a), Some(b)) => b.key < a.key,
            };
            let peeked = if from_late { l.peek() } else { r.peek() }.expect("checked above");
            if peeked.event.is_none() || !budget.admits(peeked.bytes) {
                cut = true;
                break;
            }
            let row = if from_late { l.next() } else { r.next() }.expect("checked above");
            if from_late {
                next.late_after = row.key;
            } else {
                next.range_after = row.key;
            }
            match row.event.expect("checked above") {
                Ok(event) => claim.group.push(Shipment::new(event, false)),
                Err(reason) => claim.unreadable.push(Unreadable {
                    id: row.key.1,
                    parked: false,
                    reason,
                }),
            }
        }
        let range_done = !cut && range_exhausted && r.peek().is_none();
        let late_done = !cut && late_exhausted && l.peek().is_none();
        claim.more |= !(range_done && late_done);
        claim.next = Some(if range_done && late_done {
            Position {
                below: window.upto.clone(),
                window: None,
            }
        } else {
            Position {
                below: position.below.clone(),
                window: Some(next),
            }
        });
    }

    /// The rows a window statement returned, read as events where they fit.
    fn window_rows(&self, plan: &Plan, arguments: Vec<Arg>) -> Vec<WindowRow> {
        let rows = plan.run(&arguments, true);
        (0..rows.len())
            .filter_map(|i| {
                Some(WindowRow {
                    key: (rows.int8(i, 3)?, rows.uuid(i, 2)?),
                    bytes: rows.int4(i, 10).unwrap_or(0).max(0) as usize,
                    event: rows
                        .boolean(i, 1)
                        .unwrap_or(false)
                        .then(|| event_at(&rows, i, 0)),
                })
            })
            .collect()
    }

    /// A new window over what committed since `below`; None if nothing did.
    fn open_window(&self, below: &Snapshot) -> Option<Window> {
        let upto = self.current_snapshot.run(&[], true).ascii(0, 1)?;
        let upto = Snapshot::parse(&upto)?;
        let late = finished_since(below, &upto);
        let rows = self.window_range.run(
            &[
                Arg::xid8(below.xmax),
                Arg::xid8(upto.xmax),
                Arg::snapshot(&upto.text()),
            ],
            true,
        );
        let (first, last) = (rows.int8(0, 1), rows.int8(0, 2));
        drop(rows);
        if first.is_none() && late.is_empty() && upto == *below {
            return None;
        }
        Some(Window {
            range_after: first.map_or(BEFORE_ALL, |first| (first - 1, UUID_MAX)),
            range_last: last,
            late_after: BEFORE_ALL,
            late,
            upto,
        })
    }

    /// The full rows of `candidates`, in the candidates' order. Rows that cannot be turned
    /// into messages go to `claim.unreadable`.
    fn read(&self, candidates: Vec<Candidate>, parked: bool, claim: &mut Claim) -> Vec<Shipment> {
        if candidates.is_empty() {
            return Vec::new();
        }
        let ctids: Vec<String> = candidates.iter().map(|c| c.ctid.clone()).collect();
        let rows = self.events_at.run(&[Arg::from_into(ctids)], true);
        let mut by_ctid: HashMap<String, usize> = HashMap::with_capacity(rows.len());
        for i in 0..rows.len() {
            if let Some(ctid) = rows.ascii(i, 1) {
                by_ctid.insert(ctid, i);
            }
        }
        let mut events = Vec::with_capacity(candidates.len());
        for candidate in candidates {
            let Some(&i) = by_ctid.get(&candidate.ctid) else {
                continue; // gone since (a superuser deleted it)
            };
            match event_at(&rows, i, candidate.attempts.unwrap_or(0)) {
                Ok(event) => events.push(Shipment::new(event, parked)),
                Err(reason) => claim.unreadable.push(Unreadable {
                    id: candidate.key.1,
                    parked,
                    reason,
                }),
            }
        }
        events
    }

    /// Moves new events of parked topics and keys from the group to `held`, and drops events
    /// that are parked themselves.
    fn hold_back_parked_keys(&self, claim: &mut Claim, dead_holds: bool) {
        let rows = self.parked_topics.run(&[], true);
        let topics: std::collections::HashSet<String> = (0..rows.len())
            .filter_map(|i| rows.bytes(i, 1))
            .filter_map(|bytes| encoding::to_utf8(bytes).ok().map(|t| t.into_owned()))
            .collect();
        drop(rows);
        let fresh: Vec<pgrx::Uuid> = claim
            .group
            .iter()
            .filter(|c| !c.parked && topics.contains(&c.event.topic))
            .map(|c| pgrx::Uuid::from_bytes(*c.event.id.as_bytes()))
            .collect();
        if fresh.is_empty() {
            return;
        }
        let rows = self
            .held_back
            .run(&[Arg::from_into(fresh), Arg::boolean(dead_holds)], true);
        // Each id, and whether it is parked itself (then it is left to the parked path).
        let held: HashMap<uuid::Uuid, bool> = (0..rows.len())
            .filter_map(|i| Some((rows.uuid(i, 1)?, rows.boolean(i, 2)?)))
            .collect();
        drop(rows);
        if held.is_empty() {
            return;
        }
        claim.group.retain(|c| match held.get(&c.event.id) {
            Some(_) if c.parked => true,
            Some(parked_itself) => {
                if !parked_itself {
                    claim.held.push(c.event.id);
                    let (topic, key) = c.event.order_key();
                    claim.held_keys.insert((topic.to_string(), key.to_string()));
                }
                false
            }
            None => true,
        });
    }

    /// With `outbox.dead_events = hold`: the claim's rows that cannot become messages die, and
    /// hold their topic and key like any dead event. Later events of those keys leave the group
    /// (new ones wait, parked ones stay as they are), and the keys join `held_keys` so that a
    /// batch sent behind this one holds them too.
    fn hold_behind_unreadable(&self, claim: &mut Claim) {
        let ids: Vec<pgrx::Uuid> = claim
            .unreadable
            .iter()
            .map(|u| pgrx::Uuid::from_bytes(*u.id.as_bytes()))
            .collect();
        let rows = self.keys_of.run(&[Arg::from_into(ids)], true);
        // A topic or key that is not text in UTF-8 cannot be any sendable event's.
        let text = |i: usize, column: i32| {
            rows.bytes(i, column)
                .and_then(|bytes| encoding::to_utf8(bytes).ok().map(|t| t.into_owned()))
        };
        let dead: Vec<((String, String), Key)> = (0..rows.len())
            .filter_map(|i| {
                Some((
                    (text(i, 1)?, text(i, 2)?),
                    (rows.int8(i, 3)?, rows.uuid(i, 4)?),
                ))
            })
            .collect();
        drop(rows);
        for (key, _) in &dead {
            claim.held_keys.insert(key.clone());
        }
        let held = &mut claim.held;
        claim.group.retain(|s| {
            let (topic, key) = s.event.order_key();
            let behind = dead
                .iter()
                .any(|((t, k), at)| t == topic && k == key && (s.event.seq, s.event.id) > *at);
            if behind && !s.parked {
                held.push(s.event.id);
            }
            !behind
        });
    }

    /// Records a round: a receipt row for what was published and the new position (when either
    /// changed), and the parked rows for everything else. Inside the record transaction.
    pub fn record(
        &self,
        position: &Position,
        position_moved: bool,
        outcomes: &[(uuid::Uuid, bool, Record)],
        dead_holds: bool,
    ) {
        spi::connected(|| {
            let mut published = (Vec::new(), Vec::new(), Vec::new());
            let mut parked = ParkedRows::default();
            let mut unparked = Vec::new();
            // Events whose topic and key may need a new head: a parked event left (published)
            // or died.
            let mut touched = Vec::new();
            for (id, was_parked, record) in outcomes {
                let pg_id = pgrx::Uuid::from_bytes(*id.as_bytes());
                match record {
                    Record::Published { partition, offset } => {
                        published.0.push(pg_id);
                        published.1.push(*partition);
                        published.2.push(*offset);
                        if *was_parked {
                            unparked.push(pg_id);
                            touched.push(pg_id);
                        }
                    }
                    Record::Retry {
                        attempts,
                        delay,
                        error,
                    } => parked.push(pg_id, "retrying", *attempts, Some(*delay), error.as_deref()),
                    // Whatever it waits behind may have gone since the claim (discarded,
                    // published): its key gets a new head if so, or it would wait for good.
                    Record::Wait => {
                        parked.push(pg_id, "waiting", 0, None, None);
                        touched.push(pg_id);
                    }
                    Record::Dead { attempts, error } => {
                        parked.push(pg_id, "dead", *attempts, None, Some(error));
                        touched.push(pg_id);
                    }
                    Record::Unchanged => {}
                }
            }
            let window = position.window.as_ref();
            let key_args = |key: Option<Key>| match key {
                Some((seq, id)) => [Arg::int8(seq), Arg::uuid(id)],
                None => [Arg::Null, Arg::Null],
            };
            let [range_seq, range_id] = key_args(window.map(|w| w.range_after));
            let [late_seq, late_id] = key_args(window.map(|w| w.late_after));
            if position_moved || !published.0.is_empty() {
                self.insert_batch.run(
                    &[
                        Arg::from_into(position.below.text()),
                        window.map_or(Arg::Null, |w| Arg::from_into(w.upto.text())),
                        window
                            .and_then(|w| w.range_last)
                            .map_or(Arg::Null, Arg::int8),
                        range_seq,
                        range_id,
                        late_seq,
                        late_id,
                        Arg::from_into(published.0),
                        Arg::from_into(published.1),
                        Arg::from_into(published.2),
                    ],
                    false,
                );
            }
            if !unparked.is_empty() {
                self.unpark.run(&[Arg::from_into(unparked)], false);
            }
            if !parked.ids.is_empty() {
                self.park.run(
                    &[
                        Arg::from_into(parked.ids),
                        Arg::from_into(parked.states),
                        Arg::from_into(parked.attempts),
                        Arg::from_into(parked.delays_ms),
                        Arg::from_into(parked.errors),
                    ],
                    false,
                );
            }
            if !touched.is_empty() {
                self.advance_keys
                    .run(&[Arg::from_into(touched), Arg::boolean(dead_holds)], false);
            }
        })
    }
}

/// Rows for outbox.parked, as the arrays the park statement takes.
#[derive(Default)]
struct ParkedRows {
    ids: Vec<pgrx::Uuid>,
    states: Vec<String>,
    attempts: Vec<i32>,
    delays_ms: Vec<Option<f64>>,
    errors: Vec<Option<String>>,
}

impl ParkedRows {
    fn push(
        &mut self,
        id: pgrx::Uuid,
        state: &str,
        attempts: i32,
        delay: Option<Duration>,
        error: Option<&str>,
    ) {
        self.ids.push(id);
        self.states.push(state.to_string());
        self.attempts.push(attempts);
        self.delays_ms.push(delay.map(|d| d.as_secs_f64() * 1000.0));
        self.errors
            .push(error.map(|e| encoding::for_database(e).into_owned()));
    }
}

/// Transactions in `below`'s running list that finished by `upto`.
fn finished_since(below: &Snapshot, upto: &Snapshot) -> Vec<u64> {
    below
        .xip
        .iter()
        .copied()
        .filter(|x| !upto.xip.contains(x) && *x < upto.xmax)
        .collect()
}

/// What is left of a round's limits.
struct Budget {
    events: usize,
    bytes: usize,
    /// Nothing admitted yet: the first event is admitted whatever its size.
    empty: bool,
}

impl Budget {
    fn new(limits: Limits) -> Budget {
        Budget {
            events: limits.events,
            bytes: limits.bytes,
            empty: true,
        }
    }

    fn events_left(&self) -> usize {
        self.events
    }

    /// The bytes events may still bring (the first one goes whatever its size).
    fn bytes_left(&self) -> usize {
        self.bytes
    }

    /// Takes an event of `bytes` if it fits (an event larger than the byte budget goes alone).
    fn admits(&mut self, bytes: usize) -> bool {
        if self.events == 0 || (!self.empty && bytes > self.bytes) {
            return false;
        }
        self.events -= 1;
        self.bytes = self.bytes.saturating_sub(bytes);
        self.empty = false;
        true
    }
}

/// A candidate row: ctid, seq, id, message bytes, and for parked rows the attempts.
fn candidate(rows: &Rows, i: usize, parked: bool) -> Option<Candidate> {
    Some(Candidate {
        ctid: rows.ascii(i, 1)?,
        key: (rows.int8(i, 2)?, rows.uuid(i, 3)?),
        bytes: rows.int4(i, 4).unwrap_or(0).max(0) as usize,
        attempts: if parked { rows.int4(i, 5) } else { None },
    })
}

/// An event row (EVENT_COLUMNS) as an [`Event`], or why it cannot be sent.
fn event_at(rows: &Rows, i: usize, attempts: i32) -> Result<Event, String> {
    let text = |column: i32, name: &str| -> Result<String, String> {
        let bytes = rows.bytes(i, column).unwrap_or_default();
        encoding::to_utf8(bytes)
            .map(|t| t.into_owned())
            .map_err(|reason| format!("its {name} cannot be sent: {reason}"))
    };
    let headers = match rows.bytes(i, 7) {
        None => Vec::new(),
        Some(_) => header_list(&text(7, "headers")?)?,
    };
    Ok(Event {
        id: rows.uuid(i, 2).ok_or("it has no id")?,
        seq: rows.int8(i, 3).ok_or("it has no seq")?,
        event_type: text(4, "event_type")?,
        aggregate_id: text(5, "aggregate_id")?,
        payload: text(6, "payload")?,
        headers,
        topic: text(8, "topic")?,
        created_at: Timestamp::from_postgres(rows.int8(i, 9).unwrap_or(0)),
        attempts,
        message_bytes: rows.int4(i, 10).unwrap_or(0).max(0) as usize,
    })
}

/// Headers as name/value pairs; they must be a JSON object of strings.
fn header_list(json: &str) -> Result<Vec<(String, String)>, String> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("its headers are not JSON: {e}"))?;
    let serde_json::Value::Object(map) = value else {
        return Err("its headers are not a JSON object".into());
    };
    map.into_iter()
        .map(|(name, value)| match value {
            serde_json::Value::String(value) => {
                outbox_pg_core::validate::header_name(&name)
                    .map_err(|reason| format!("its headers are not sendable: {reason}"))?;
                Ok((name, value))
            }
            _ => Err(format!(
                "its header \"{}\" is not a string",
                name.escape_default()
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_round_trip_through_text() {
        for text in ["10:10:", "5:20:7,9,11", "1:1:"] {
            assert_eq!(Snapshot::parse(text).unwrap().text(), text);
        }
        assert!(Snapshot::parse("x:1:").is_none());
    }
}
