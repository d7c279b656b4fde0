//! One publishing round, with a ready queue and producer:
//!
//! 1. claim, in one transaction: due retries, events released behind a published one, and the
//!    next committed events in emission order (within `outbox.batch_size` and
//!    `outbox.batch_bytes`) — unless publishing is paused or the database refuses writes, since
//!    nothing may be sent that cannot be recorded;
//! 2. wait until the commits that made them visible are durable (flushed here, and confirmed by
//!    synchronous standbys when there are any), so nothing is published that a crash or a
//!    failover could take back;
//! 3. ship: retries one at a time (a poison event fails alone), the rest together;
//! 4. record, in one transaction: a receipt row with the new position, parked rows for what
//!    failed or waits.

use std::collections::HashSet;
use std::time::Duration;

use outbox_pg_core::event::Outcome;
use outbox_pg_core::ordering::{settle, Breach, Disposition, Shipment};
use pgrx::pg_sys::XLogRecPtr;
use pgrx::prelude::*;

use super::kafka::{Flight, Kafka, Shipping};
use super::queue::{Claim, Limits, Position, Queue, Record, Unreadable};
use super::retention::Retention;
use crate::shmem::{WorkerSlot, WorkerState};
use crate::{durability, guc, process};

/// Failed events retried per round; each is sent and confirmed on its own.
const RETRIES_PER_ROUND: usize = 16;
/// While new events fill whole batches, parked events are served at most this often, so that a
/// flood of failing events costs the flow of the others little (their retries wait at most this
/// much longer).
const RETRY_PASS_INTERVAL: Duration = Duration::from_millis(100);
/// Minimum spacing of the "cannot record" log line.
const READ_ONLY_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// How often the worker looks whether outbox.events arrives by logical replication, and
/// whether `ALTER DATABASE` / `ALTER ROLE` changed its read-only default.
const CATALOG_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// How a round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundEnd {
    /// More is known to be waiting: go again at once.
    More,
    /// Nothing left for now.
    Idle,
    Paused,
    /// The database refuses writes: nothing was claimed.
    ReadOnly,
    /// Another session holds a lock on the outbox tables (DDL): nothing was claimed.
    Locked,
}

/// A claimed batch of new events in flight, apart from its shipments: what else its claim
/// found, and where the worker stands once it is recorded.
struct Sent {
    /// Its shipments in the flight's list (set once a batch flies behind it).
    count: usize,
    held: Vec<uuid::Uuid>,
    held_keys: HashSet<(String, String)>,
    unreadable: Vec<Unreadable>,
    next: Option<Position>,
    more: bool,
}

impl Sent {
    fn of(claim: Claim) -> Sent {
        Sent {
            count: 0,
            held: claim.held,
            held_keys: claim.held_keys,
            unreadable: claim.unreadable,
            next: claim.next,
            more: claim.more,
        }
    }
}

/// Batches handed to the producer and not yet recorded: the head batch's shipments, then (sent
/// while the head was in flight) the next batch's.
struct InFlight {
    shipments: Vec<Shipment>,
    flight: Flight,
    head: Sent,
    next: Option<Sent>,
    /// A claim behind the head was refused (paused, read-only, locked): none is tried again
    /// while this head flies.
    blocked: bool,
}

/// What the worker publishes with: a ready queue, a producer, and where it stands.
pub struct Publishing {
    slot: &'static WorkerSlot,
    database: String,
    queue: Queue,
    kafka: Kafka,
    position: Position,
    retention: Retention,
    read_only_since: Option<std::time::Instant>,
    read_only_logged: Option<std::time::Instant>,
    lock_logged: Option<std::time::Instant>,
    /// The last round claimed a full batch of new events.
    busy: bool,
    retries_served_at: std::time::Instant,
    /// Whether outbox.events arrives by logical replication, and when that was looked at.
    subscribed: Option<(bool, std::time::Instant)>,
    /// The database- or role-level read-only default this session connected with.
    connected_read_only: Option<String>,
    /// That default changed since: the worker ends so that a fresh session applies it.
    wants_fresh_session: bool,
    /// Sent and not yet recorded, carried into the next round.
    in_flight: Option<InFlight>,
    /// The worker is about to exit: nothing more is sent.
    landing: bool,
    /// The last claim found a retry due in outbox.parked.
    retry_due: std::cell::Cell<bool>,
    /// The slot's wake-up count when the last claim started.
    seen_wakeups: std::cell::Cell<u64>,
}

impl Publishing {
    /// Ready to publish from `position` (None: outbox.batches was emptied by hand).
    pub fn new(
        slot: &'static WorkerSlot,
        database: String,
        queue: Queue,
        retention: Retention,
        kafka: Kafka,
        position: Option<Position>,
        connected_read_only: Option<String>,
    ) -> Self {
        let position = position.unwrap_or_else(|| {
            warning!(
                "outbox_pg: outbox.batches holds no position in database \"{database}\"; publishing every event in outbox.events"
            );
            Position {
                below: super::queue::Snapshot {
                    xmin: 1,
                    xmax: 1,
                    xip: Vec::new(),
                },
                window: None,
            }
        });
        Publishing {
            slot,
            database,
            queue,
            kafka,
            position,
            retention,
            read_only_since: None,
            read_only_logged: None,
            lock_logged: None,
            busy: false,
            retries_served_at: std::time::Instant::now(),
            subscribed: None,
            connected_read_only,
            wants_fresh_session: false,
            in_flight: None,
            landing: false,
            retry_due: std::cell::Cell::new(false),
            seen_wakeups: std::cell::Cell::new(slot.wakeups()),
        }
    }

    /// `ALTER DATABASE` or `ALTER ROLE ... SET default_transaction_read_only` changed since this
    /// session connected (a freeze set or lifted that way).
    pub fn wants_fresh_session(&self) -> bool {
        self.wants_fresh_session
    }

    /// Wake-ups asked for (commits, outbox.wake()) since the last claim started: work it may
    /// not have seen.
    pub fn unseen_wakeups(&self) -> bool {
        self.slot.wakeups() != self.seen_wakeups.get()
    }

    /// Whether commits set the worker's latch (see [`WorkerSlot::listen`]).
    pub fn listen(&self, on: bool) {
        self.slot.listen(on);
    }

    pub fn kafka(&mut self) -> &mut Kafka {
        &mut self.kafka
    }

    /// One round: claim → make durable → ship → record. A batch of new events is recorded
    /// as soon as the broker has it, and while it is in flight the next batch may be claimed
    /// and sent behind it ([`Publishing::fly`]); that one then heads the next round.
    pub fn round(&mut self) -> RoundEnd {
        if let Some(air) = self.in_flight.take() {
            return self.fly(air);
        }
        let serve_parked = !self.busy || self.retries_served_at.elapsed() >= RETRY_PASS_INTERVAL;
        if serve_parked {
            self.retries_served_at = std::time::Instant::now();
        }
        let limits = Limits {
            events: guc::BATCH_SIZE.get().max(1) as usize,
            bytes: guc::BATCH_BYTES.get().max(1) as usize,
            retries: if serve_parked { RETRIES_PER_ROUND } else { 0 },
        };
        let dead_holds = guc::dead_events_hold();
        let (mut claim, visible_up_to) = match self.claim(&self.position.clone(), limits) {
            Ok(claimed) => claimed,
            Err(end) => return self.blocked(end),
        };
        self.read_only_since = None;
        self.busy =
            claim.group.iter().filter(|c| !c.parked).count() + claim.held.len() >= limits.events;
        if claim.singles.is_empty()
            && claim.group.is_empty()
            && claim.held.is_empty()
            && claim.unreadable.is_empty()
        {
            if let Some(next) = claim.next {
                // A window whose last batch filled the budget exactly closes empty. Its close is
                // recorded, so that outbox.pending does not walk the finished window.
                if next.window.is_none() && self.position.window.is_some() {
                    process::in_transaction_unless_locked("outbox_pg: recording outcomes", || {
                        if !process::transaction_is_read_only() {
                            self.queue.record(&next, true, &[], dead_holds);
                        }
                    });
                }
                self.position = next;
            }
            return self.idle_or_more(claim.more);
        }
        durability::wait_until_durable(visible_up_to);
        if process::stop_requested() {
            return RoundEnd::Idle; // not sent: the next worker claims it again
        }
        if !self.kafka.broker_unreachable() {
            self.slot.set_state(WorkerState::Publishing);
        }
        // New events fly (recorded once the broker has them, the next batch sent behind them
        // meanwhile), after the round's retries, which are sent and recorded first. Parked
        // events released into the group go one round at a time, with it.
        if !claim.group.is_empty() && !claim.group.iter().any(|s| s.parked) {
            let records = self.ship_singles(&mut claim);
            if !records.is_empty() && !self.record(&self.position.clone(), false, &records) {
                return RoundEnd::Idle;
            }
            let how = Shipping::current(&self.database);
            let backlog = claim.more;
            let mut air = InFlight {
                shipments: std::mem::take(&mut claim.group),
                flight: self.kafka.flight(),
                head: Sent::of(claim),
                next: None,
                blocked: false,
            };
            self.kafka
                .send(&mut air.shipments, 0, &mut air.flight, &how);
            // All there is goes at once; with a backlog the next batch follows at once anyway.
            if !backlog {
                self.kafka.send_now();
            }
            return self.fly(air);
        }
        let records = self.ship(&mut claim);
        let next = claim.next.clone().unwrap_or_else(|| self.position.clone());
        if !self.record(&next, claim.next.is_some(), &records) {
            return RoundEnd::Idle;
        }
        self.idle_or_more(claim.more || !claim.singles.is_empty())
    }

    /// Claims from `from` within `limits`, in the claim transaction: the claim, and the WAL
    /// position every commit it saw ends before. Paused, read-only or locked: nothing.
    fn claim(&self, from: &Position, limits: Limits) -> Result<(Claim, XLogRecPtr), RoundEnd> {
        let dead_holds = guc::dead_events_hold();
        // Read before the claim's snapshot: every wake-up counted so far is for a commit the
        // claim sees.
        self.seen_wakeups.set(self.slot.wakeups());
        let claimed = process::in_transaction_unless_locked("outbox_pg: claiming events", || {
            if self.queue.paused() {
                return Err(RoundEnd::Paused);
            }
            if process::transaction_is_read_only() {
                return Err(RoundEnd::ReadOnly);
            }
            let claim = self.queue.claim(from, limits, dead_holds);
            // Every commit the claim saw is in the WAL before this point.
            Ok((claim, durability::inserted_wal_end()))
        });
        match claimed {
            Some(Ok(claimed)) => {
                self.retry_due.set(claimed.0.retry_due);
                Ok(claimed)
            }
            Some(Err(end)) => Err(end),
            None => Err(RoundEnd::Locked),
        }
    }

    /// Waits until the head batch of `air` has every outcome, claiming and sending the next
    /// batch behind it when commits come meanwhile; then records the head. If any of the
    /// head's events was not published, both batches are settled together, sent again as
    /// needed and recorded as one, exactly as one batch of their events would be.
    ///
    /// Order holds across the two: the next batch's events come after the head's in emission
    /// order per (topic, key), are handed to the producer after them (which keeps a
    /// partition's order, and with the gapless guarantee stores nothing after a refused
    /// message), and nothing is sent behind a head that has had a refusal.
    fn fly(&mut self, mut air: InFlight) -> RoundEnd {
        let how = Shipping::current(&self.database);
        while !air.flight.head_done() {
            // A backlog: claim the next batch while this one flies. What commits meanwhile is
            // claimed when the head lands, in one claim rather than one per commit (measured:
            // claiming at each commit cost more CPU than it saved latency; the producer sends
            // one request at a time anyway).
            if air.head.more && self.may_extend(&air) {
                air.head.more = false;
                self.extend(&mut air, &how);
                continue;
            }
            self.kafka.step(&mut air.shipments, &mut air.flight, &how);
        }
        // Before the head is recorded, what committed meanwhile takes off behind it.
        if self.unseen_wakeups() && self.may_extend(&air) {
            self.extend(&mut air, &how);
        }
        let head = air
            .next
            .as_ref()
            .map_or(air.shipments.len(), |_| air.head.count);
        let breaches = settle(&mut air.shipments[..head]);
        let clean = breaches.is_empty()
            && air.shipments[..head]
                .iter()
                .all(|s| matches!(s.disposition, Disposition::Published { .. }));
        if clean {
            let records = self.records_of(&air.shipments[..head], &air.head);
            let next = air
                .head
                .next
                .clone()
                .unwrap_or_else(|| self.position.clone());
            if !self.record(&next, air.head.next.is_some(), &records) {
                // Stopping: what flies behind is sent again by the next worker.
                return RoundEnd::Idle;
            }
            return match air.next.take() {
                Some(behind) => {
                    air.shipments.drain(..head);
                    air.flight.advance();
                    air.head = behind;
                    air.blocked = false;
                    self.in_flight = Some(air);
                    RoundEnd::More
                }
                None => self.idle_or_more(air.head.more),
            };
        }
        // Something of the head was not published: let the rest land, then settle and send
        // again both batches as one.
        let breaches = self.kafka.finish(&mut air.shipments, air.flight, &how);
        self.note(&breaches, &air.shipments);
        let last = air.next.take();
        let mut records = self.records_of(&air.shipments, &air.head);
        if let Some(behind) = &last {
            records.extend(self.records_of(&[], behind));
        }
        let moved = last.as_ref().map_or(&air.head, |b| b).next.clone();
        let next = moved.clone().or(air.head.next.clone());
        let next = next.unwrap_or_else(|| self.position.clone());
        if !self.record(&next, moved.is_some() || air.head.next.is_some(), &records) {
            return RoundEnd::Idle;
        }
        self.idle_or_more(air.head.more || last.is_some_and(|b| b.more))
    }

    /// True if a batch may be sent behind the head of `air` now: none is yet, the worker is
    /// not stopping, no retry pass is due, and the head has had no refusal.
    fn may_extend(&self, air: &InFlight) -> bool {
        let retries_due =
            self.retry_due.get() && self.retries_served_at.elapsed() >= RETRY_PASS_INTERVAL;
        air.next.is_none()
            && !air.blocked
            && !self.landing
            && !retries_due
            && !process::stop_requested()
            && self.kafka.takes_more()
            && air
                .shipments
                .iter()
                .all(|s| s.outcome.as_ref().is_none_or(Outcome::is_published))
    }

    /// Claims the events committed since the head's claim and sends them behind it (nothing
    /// when there are none, or the claim is blocked: the next round sees to it).
    fn extend(&mut self, air: &mut InFlight, how: &Shipping) {
        let Some(from) = air.head.next.clone() else {
            return;
        };
        let limits = Limits {
            events: guc::BATCH_SIZE.get().max(1) as usize,
            bytes: guc::BATCH_BYTES.get().max(1) as usize,
            retries: 0,
        };
        let (seen, more) = (self.seen_wakeups.get(), air.head.more);
        let Ok((mut claim, visible_up_to)) = self.claim(&from, limits) else {
            // Nothing claimed: what was waiting is still to do once the head lands.
            self.seen_wakeups.set(seen);
            air.head.more = more;
            air.blocked = true;
            return;
        };
        if claim.group.is_empty() && claim.held.is_empty() && claim.unreadable.is_empty() {
            // Nothing behind the head: the position the claim reached (a window closed) is
            // where the head's record leaves the worker.
            if claim.next.is_some() {
                air.head.next = claim.next;
            }
            air.head.more = claim.more;
            return;
        }
        durability::wait_until_durable(visible_up_to);
        if process::stop_requested() {
            return; // not sent: claimed again
        }
        // The head's held events are not parked yet: the next batch's events of their topics
        // and keys wait behind them too.
        if !air.head.held_keys.is_empty() {
            let held_keys = &air.head.held_keys;
            claim.group.retain(|s| {
                let (topic, key) = s.event.order_key();
                let behind = held_keys.contains(&(topic.to_string(), key.to_string()));
                if behind {
                    claim.held.push(s.event.id);
                    claim.held_keys.insert((topic.to_string(), key.to_string()));
                }
                !behind
            });
        }
        let at = air.shipments.len();
        air.flight.close_head(at);
        air.head.count = at;
        air.shipments.append(&mut claim.group);
        let backlog = claim.more;
        air.next = Some(Sent::of(claim));
        self.kafka
            .send(&mut air.shipments, at, &mut air.flight, how);
        // Behind a head still flying it waits for the head's requests on the brokers they share,
        // and for one linger at most elsewhere.
        if !backlog && air.flight.head_done() {
            self.kafka.send_now();
        }
    }

    /// Records `records` and moves the position to `next`: lock waits and a freeze that began
    /// meanwhile are waited out (serving signals); a stop waits for the record (interrupts
    /// held), but for one lock wait at most. False if the worker stops before it could record
    /// (what was sent is sent again by the next worker).
    fn record(
        &mut self,
        next: &Position,
        position_moved: bool,
        records: &[(uuid::Uuid, bool, Record)],
    ) -> bool {
        let dead_holds = guc::dead_events_hold();
        loop {
            let record = || {
                process::in_transaction_unless_locked("outbox_pg: recording outcomes", || {
                    if process::transaction_is_read_only() {
                        return Err(RoundEnd::ReadOnly);
                    }
                    self.queue.record(next, position_moved, records, dead_holds);
                    Ok(())
                })
            };
            let recorded = if process::stop_requested() {
                process::with_interrupts_held(record)
            } else {
                record()
            };
            match recorded {
                Some(Ok(())) => break,
                Some(Err(end)) => self.blocked(end),
                None => self.blocked(RoundEnd::Locked),
            };
            if process::stop_requested() {
                warning!(
                    "outbox_pg: stopping before the outcomes of {} sent events could be recorded; they will be sent again",
                    records.len()
                );
                return false;
            }
            process::wait(Duration::from_millis(100), None);
        }
        self.read_only_since = None;
        self.position = next.clone();
        let published = records
            .iter()
            .filter(|(_, _, r)| matches!(r, Record::Published { .. }))
            .count();
        if published > 0 {
            self.slot.count_published(published as u64);
        }
        true
    }

    /// True while a batch is in flight (sent, not recorded).
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Before the worker exits: waits for what is in flight and records it (a stop withdraws
    /// it after STOP_GRACE), sending nothing more.
    pub fn land(&mut self) {
        self.landing = true;
        while self.in_flight.is_some() {
            self.round();
        }
    }

    fn idle_or_more(&self, more: bool) -> RoundEnd {
        if more {
            RoundEnd::More
        } else {
            RoundEnd::Idle
        }
    }

    /// Sends the claim and turns every outcome into what is recorded.
    fn ship(&mut self, claim: &mut Claim) -> Vec<(uuid::Uuid, bool, Record)> {
        let how = Shipping::current(&self.database);
        let policy = RetryPolicy::current();
        let mut records = self.ship_singles(claim);
        let retrying = Shipping::for_retries(&self.database);
        if !claim.group.is_empty() {
            // Parked events released into the group (revived, or behind a published one) are
            // retries too.
            let how = if claim.group.iter().any(|s| s.parked) {
                &retrying
            } else {
                &how
            };
            let breaches = self.kafka.ship(&mut claim.group, how);
            self.note(&breaches, &claim.group);
            records.extend(
                claim
                    .group
                    .iter()
                    .map(|shipment| record_of(shipment, &policy, self.slot)),
            );
        }
        records.extend(self.unsent_records(&claim.held, &claim.unreadable));
        records
    }

    /// Sends the claim's failed events due for a retry, one at a time (a poison event must fail
    /// alone, not with its neighbours), and turns their outcomes into what is recorded.
    fn ship_singles(&mut self, claim: &mut Claim) -> Vec<(uuid::Uuid, bool, Record)> {
        if claim.singles.is_empty() {
            return Vec::new();
        }
        let policy = RetryPolicy::current();
        let retrying = Shipping::for_retries(&self.database);
        let topics = claim.singles.iter().map(|s| s.event.topic.as_str());
        self.kafka.check_topics(topics.collect(), &retrying);
        let mut records = Vec::new();
        for single in &mut claim.singles {
            let single = std::slice::from_mut(single);
            let breaches = self.kafka.ship(single, &retrying);
            self.note(&breaches, single);
            records.push(record_of(&single[0], &policy, self.slot));
        }
        records
    }

    /// What to record for a flown batch's shipments (`shipments`, settled) and for the rest of
    /// its claim.
    fn records_of(&self, shipments: &[Shipment], sent: &Sent) -> Vec<(uuid::Uuid, bool, Record)> {
        let policy = RetryPolicy::current();
        let mut records: Vec<_> = shipments
            .iter()
            .map(|shipment| record_of(shipment, &policy, self.slot))
            .collect();
        records.extend(self.unsent_records(&sent.held, &sent.unreadable));
        records
    }

    /// Records for a claim's events that were not sent: new events held behind a parked one
    /// of their topic and key wait; rows that cannot become messages are dead.
    fn unsent_records(
        &self,
        held: &[uuid::Uuid],
        unreadable: &[Unreadable],
    ) -> Vec<(uuid::Uuid, bool, Record)> {
        let mut records: Vec<_> = held.iter().map(|id| (*id, false, Record::Wait)).collect();
        for unreadable in unreadable {
            warning!(
                "outbox_pg: event {} cannot be published and is dead: {}",
                unreadable.id,
                unreadable.reason
            );
            self.slot
                .record_error(&format!("event {}: {}", unreadable.id, unreadable.reason));
            records.push((
                unreadable.id,
                unreadable.parked,
                Record::Dead {
                    attempts: 0,
                    error: unreadable.reason.clone(),
                },
            ));
        }
        records
    }

    /// Logs what operators must know about a settled batch.
    fn note(&self, breaches: &[Breach], shipments: &[Shipment]) {
        for breach in breaches {
            warning!(
                "outbox_pg: event {} was published although the earlier event {} of its topic and key was not; consumers will see them out of order",
                breach.published, breach.earlier
            );
        }
        for shipment in shipments {
            if let Disposition::Failed { error } = &shipment.disposition {
                self.slot.record_error(&format!(
                    "event {} ({}): {error}",
                    shipment.event.id, shipment.event.event_type
                ));
            }
        }
    }

    /// Logs at most once a minute that a lock held by another session keeps the worker waiting.
    fn note_lock_wait(&mut self) {
        self.slot.set_state(WorkerState::WaitingForLock);
        if self
            .lock_logged
            .is_none_or(|at| at.elapsed() >= READ_ONLY_LOG_INTERVAL)
        {
            log!(
                "outbox_pg: waiting in database \"{}\": another session holds a lock on the outbox tables",
                self.database
            );
            self.lock_logged = Some(std::time::Instant::now());
        }
    }

    /// A round that could not claim: paused, a database that refuses writes, or a lock held by
    /// another session (logged at most once a minute while it lasts).
    fn blocked(&mut self, end: RoundEnd) -> RoundEnd {
        match end {
            RoundEnd::Locked => self.note_lock_wait(),
            RoundEnd::Paused => self.slot.set_state(WorkerState::Paused),
            RoundEnd::ReadOnly => {
                self.slot.set_state(WorkerState::ReadOnly);
                let since = *self
                    .read_only_since
                    .get_or_insert_with(std::time::Instant::now);
                if self
                    .read_only_logged
                    .is_none_or(|at| at.elapsed() >= READ_ONLY_LOG_INTERVAL)
                {
                    log!(
                        "outbox_pg: database \"{}\" refuses writes (default_transaction_read_only) for {}s; not publishing until the worker can record what it sends",
                        self.database,
                        since.elapsed().as_secs()
                    );
                    self.read_only_logged = Some(std::time::Instant::now());
                }
            }
            _ => {}
        }
        end
    }

    /// Expires one chunk of history if it is time; true if more is waiting. Also looks at the
    /// catalog now and then (see [`Self::look_at_catalog`]).
    pub fn expire(&mut self) -> bool {
        self.look_at_catalog();
        self.retention.run()
    }

    /// Says, once, when outbox.events arrives by logical replication, and notices a read-only
    /// default set or lifted by ALTER DATABASE / ALTER ROLE.
    fn look_at_catalog(&mut self) {
        if self
            .subscribed
            .is_some_and(|(_, at)| at.elapsed() < CATALOG_CHECK_INTERVAL)
        {
            return;
        }
        let Some((now, read_only)) =
            process::in_transaction_unless_locked("outbox_pg: checking the catalog", || {
                (
                    self.queue.events_are_subscribed(),
                    process::catalog_read_only_default(),
                )
            })
        else {
            return;
        };
        if read_only != self.connected_read_only {
            log!(
                "outbox_pg: default_transaction_read_only of database \"{}\" changed to {} by ALTER DATABASE or ALTER ROLE; restarting the worker to apply it",
                self.database,
                read_only.as_deref().and_then(|c| c.split_once('=')).map_or("its postgresql.conf value", |(_, v)| v)
            );
            self.wants_fresh_session = true;
        }
        let before = self.subscribed.map(|(was, _)| was);
        self.subscribed = Some((now, std::time::Instant::now()));
        if now && before != Some(true) {
            if guc::PUBLISH_REPLICATED.get() {
                log!(
                    "outbox_pg: outbox.events of database \"{}\" arrives by logical replication; outbox.publish_replicated is on, so replicated events are published here too",
                    self.database
                );
            } else {
                log!(
                    "outbox_pg: outbox.events of database \"{}\" arrives by logical replication; replicated events are left to the publisher (outbox.publish_replicated = off)",
                    self.database
                );
            }
        }
    }

    /// Waits up to `timeout` for work, a signal, or a producer report.
    pub fn idle(&mut self, timeout: Duration) {
        if !matches!(
            self.slot.report().state,
            Some(WorkerState::Paused | WorkerState::ReadOnly | WorkerState::WaitingForLock)
        ) {
            self.slot.set_state(if self.kafka.misconfigured() {
                WorkerState::Misconfigured
            } else if self.kafka.broker_unreachable() {
                WorkerState::BrokerUnreachable
            } else {
                WorkerState::Idle
            });
        }
        self.kafka.idle(timeout);
    }
}

/// Retry policy for failed events, from the settings when the round ran.
struct RetryPolicy {
    max_attempts: i32,
    backoff: Duration,
    backoff_max: Duration,
}

impl RetryPolicy {
    fn current() -> Self {
        RetryPolicy {
            max_attempts: guc::MAX_ATTEMPTS.get(),
            backoff: Duration::from_millis(guc::RETRY_BACKOFF_MS.get().max(0) as u64),
            backoff_max: Duration::from_millis(guc::RETRY_BACKOFF_MAX_MS.get().max(0) as u64),
        }
    }

    /// The nth failure is retried after backoff * 2^(n-1), capped.
    fn delay(&self, attempts: i32) -> Duration {
        let factor = 2u32.saturating_pow(attempts.saturating_sub(1).clamp(0, 30) as u32);
        self.backoff.saturating_mul(factor).min(self.backoff_max)
    }
}

/// What to record for one claimed event.
fn record_of(
    shipment: &Shipment,
    policy: &RetryPolicy,
    slot: &WorkerSlot,
) -> (uuid::Uuid, bool, Record) {
    let event = &shipment.event;
    let record = match &shipment.disposition {
        Disposition::Published { partition, offset } => Record::Published {
            partition: *partition,
            offset: *offset,
        },
        Disposition::Failed { error } => {
            let attempts = event.attempts + 1;
            if attempts >= policy.max_attempts {
                warning!(
                    "outbox_pg: event {} ({} for aggregate {}) is dead after {attempts} failed attempts: {error}",
                    event.id, event.event_type, event.aggregate_id
                );
                slot.record_error(&format!("event {} is dead: {error}", event.id));
                Record::Dead {
                    attempts,
                    error: error.clone(),
                }
            } else {
                Record::Retry {
                    attempts,
                    delay: policy.delay(attempts),
                    error: Some(error.clone()),
                }
            }
        }
        // A parked event behind a failure stays as it was; a new one starts waiting.
        Disposition::Waiting if shipment.parked => Record::Unchanged,
        Disposition::Waiting => Record::Wait,
        // Not sent (a stop, or no working producer): sent first once the worker can.
        Disposition::SendAgain if shipment.parked => Record::Unchanged,
        Disposition::SendAgain => Record::Retry {
            attempts: event.attempts,
            delay: Duration::ZERO,
            error: None,
        },
    };
    (event.id, shipment.parked, record)
}
