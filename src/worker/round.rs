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

use std::time::Duration;

use outbox_pg_core::ordering::{Breach, Disposition, Shipment};
use pgrx::prelude::*;

use super::kafka::{Kafka, Shipping};
use super::queue::{Claim, Limits, Position, Queue, Record};
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
}

impl Publishing {
    /// Ready to publish from `position` (None: outbox.batches was emptied by hand).
    pub fn new(
        slot: &'static WorkerSlot,
        database: String,
        queue: Queue,
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
            retention: Retention::new(),
            read_only_since: None,
            read_only_logged: None,
            lock_logged: None,
            busy: false,
            retries_served_at: std::time::Instant::now(),
            subscribed: None,
            connected_read_only,
            wants_fresh_session: false,
        }
    }

    /// `ALTER DATABASE` or `ALTER ROLE ... SET default_transaction_read_only` changed since this
    /// session connected (a freeze set or lifted that way).
    pub fn wants_fresh_session(&self) -> bool {
        self.wants_fresh_session
    }

    /// The slot's count of wake-ups asked for (commits, outbox.wake()).
    pub fn wakeups(&self) -> u64 {
        self.slot.wakeups()
    }

    pub fn kafka(&mut self) -> &mut Kafka {
        &mut self.kafka
    }

    /// One round: claim → make durable → ship → record.
    pub fn round(&mut self) -> RoundEnd {
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
        let claimed = process::in_transaction_unless_locked("outbox_pg: claiming events", || {
            if self.queue.paused() {
                return Err(RoundEnd::Paused);
            }
            if process::transaction_is_read_only() {
                return Err(RoundEnd::ReadOnly);
            }
            let claim = self.queue.claim(&self.position, limits, dead_holds);
            // Every commit the claim saw is in the WAL before this point.
            Ok((claim, durability::inserted_wal_end()))
        });
        let (mut claim, visible_up_to) = match claimed {
            Some(Ok(claimed)) => claimed,
            Some(Err(end)) => return self.blocked(end),
            None => return self.blocked(RoundEnd::Locked),
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
        let records = self.ship(&mut claim);
        let next = claim.next.clone().unwrap_or_else(|| self.position.clone());
        let published = records
            .iter()
            .filter(|(_, _, r)| matches!(r, Record::Published { .. }))
            .count();
        // What was sent must be recorded: lock waits and a freeze that began meanwhile are
        // waited out (serving signals); a stop waits for the record (interrupts held), but for
        // one lock wait at most.
        loop {
            let record = || {
                process::in_transaction_unless_locked("outbox_pg: recording outcomes", || {
                    if process::transaction_is_read_only() {
                        return Err(RoundEnd::ReadOnly);
                    }
                    self.queue
                        .record(&next, claim.next.is_some(), &records, dead_holds);
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
                return RoundEnd::Idle;
            }
            process::wait(Duration::from_millis(100), None);
        }
        self.read_only_since = None;
        self.position = next;
        if published > 0 {
            self.slot.count_published(published as u64);
        }
        self.idle_or_more(claim.more || !claim.singles.is_empty())
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
        let mut records = Vec::new();
        // Retries one at a time: a poison event must fail alone, not with its neighbours.
        let retrying = Shipping::for_retries(&self.database);
        if !claim.singles.is_empty() {
            let topics = claim.singles.iter().map(|s| s.event.topic.as_str());
            self.kafka.check_topics(topics.collect(), &retrying);
        }
        for single in &mut claim.singles {
            let single = std::slice::from_mut(single);
            let breaches = self.kafka.ship(single, &retrying);
            self.note(&breaches, single);
            records.push(record_of(&single[0], &policy, self.slot));
        }
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
        records.extend(claim.held.iter().map(|id| (*id, false, Record::Wait)));
        for unreadable in &claim.unreadable {
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
        self.retention.run(&self.queue, &self.position.below)
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
