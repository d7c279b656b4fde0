//! The producer as a round uses it: ship a batch in emission order, wait for its outcomes
//! without ever ignoring a signal, send again what was not delivered, and replace a producer
//! that stopped or whose settings changed. Also the broker's health as operators see it.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use outbox_pg_core::envelope::MessageFormat;
use outbox_pg_core::event::Outcome;
use outbox_pg_core::ordering::{settle, Breach, Disposition, Shipment};
use outbox_pg_core::producer::{
    NotSent, ProducerSettings, Publisher, Report, TopicCreation, TopicReadiness,
};
use outbox_pg_core::validate::{self, AllowedTopics};
use pgrx::prelude::*;

use crate::shmem::{Connectivity, WorkerSlot, WorkerState};
use crate::{guc, process};

/// How long one wait for reports lasts before signals and deadlines are looked at again.
const WAIT_SLICE: Duration = Duration::from_millis(100);
/// On a stop request, in-flight messages get this long to be acknowledged before they are
/// withdrawn (a stop takes effect within two seconds).
const STOP_GRACE: Duration = Duration::from_millis(700);
/// Withdrawn messages are reported at once; if some are not within this, they are given up on
/// (and the producer is replaced, so their late reports cannot be mistaken for new ones).
const WITHDRAW_GRACE: Duration = Duration::from_millis(800);
/// With messages in flight and no report at all for this long, the producer is replaced.
/// librdkafka can stay stuck where a new producer is not, e.g. retrying with a producer id that
/// a broker restarted without its state no longer knows.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a topic check may take.
const TOPIC_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between passes that delivered nothing (a broker refusing everything), growing.
const RESEND_PAUSE_MIN: Duration = Duration::from_millis(50);
const RESEND_PAUSE_MAX: Duration = Duration::from_secs(2);
/// Why a flight is withdrawn when the producer hit a fatal error: only what it has not put in a
/// request yet goes (see [`Kafka::step`]).
const PRODUCER_STOPPED: &str = "the producer stopped";
/// Minimum spacing of repeated broker-error log lines.
const BROKER_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// What shapes the messages of a batch, read from the settings when the round starts.
pub struct Shipping {
    pub prefix: String,
    pub format: MessageFormat,
    pub allowed: AllowedTopics,
    pub creation: Option<TopicCreation>,
    /// `outbox.delivery_timeout`; None waits indefinitely.
    pub delivery_timeout: Option<Duration>,
    /// Only "missing" answers the broker gave after this instant count: retries, which the
    /// operator may have fixed the topic for, must not fail on an answer older than their round
    /// (one question per topic and round, however many retries it has). None: any answer
    /// younger than the producer's MISSING_TOPIC_TTL counts.
    pub missing_answers_since: Option<Instant>,
    /// Topics already asked about in this round (retries only): not asked again, whatever the
    /// answer was (none, when the broker is away), so a round asks at most once per topic.
    asked: RefCell<HashSet<String>>,
}

impl Shipping {
    pub fn current(database: &str) -> Shipping {
        let timeout = guc::DELIVERY_TIMEOUT_MS.get();
        Shipping {
            prefix: guc::topic_prefix(),
            format: guc::message_format(database),
            allowed: guc::allowed_topics(),
            creation: guc::AUTO_CREATE_TOPICS.get().then(|| TopicCreation {
                partitions: guc::TOPIC_PARTITIONS.get(),
                replication: guc::TOPIC_REPLICATION.get(),
            }),
            delivery_timeout: (timeout > 0).then(|| Duration::from_millis(timeout as u64)),
            missing_answers_since: None,
            asked: RefCell::default(),
        }
    }

    /// The same, for retries: topics are asked about afresh, once in the round that starts now.
    pub fn for_retries(database: &str) -> Shipping {
        Shipping {
            missing_answers_since: Some(Instant::now()),
            ..Shipping::current(database)
        }
    }

    /// Why the broker said `topic` is missing, if that answer still counts for this shipping.
    fn remembered_missing(&self, publisher: &Publisher, topic: &str) -> Option<String> {
        match self.missing_answers_since {
            // Retries: this round's answers, whether or not topics are created on demand (a
            // creation the broker refused is such an answer).
            Some(since) => publisher.recently_missing(topic, Some(since)),
            None if self.creation.is_none() => publisher.recently_missing(topic, None),
            None => None,
        }
    }
}

/// The bookkeeping of shipments handed to the producer. A shipment's report carries `base` plus
/// its position in the caller's list. The shipments before `head` are the head batch; those
/// after it were sent while the head was in flight (see worker::round), and the head's outcomes
/// are known once `head_awaiting` is 0.
pub struct Flight {
    base: usize,
    head: usize,
    head_awaiting: usize,
    rest_awaiting: usize,
    /// Reports that the broker stored a message.
    delivered: usize,
    /// When the head batch, and the batch behind it, were handed over (delivery_timeout).
    head_started: Instant,
    rest_started: Instant,
    last_report: Instant,
    withdrawn: Option<(Instant, &'static str)>,
    stop_seen_at: Option<Instant>,
}

impl Flight {
    fn new(base: usize) -> Flight {
        Flight {
            base,
            head: usize::MAX,
            head_awaiting: 0,
            rest_awaiting: 0,
            delivered: 0,
            head_started: Instant::now(),
            rest_started: Instant::now(),
            last_report: Instant::now(),
            withdrawn: None,
            stop_seen_at: None,
        }
    }

    /// Everything sent so far has an outcome.
    pub fn done(&self) -> bool {
        self.head_awaiting == 0 && self.rest_awaiting == 0
    }

    /// Every message of the head batch has an outcome.
    pub fn head_done(&self) -> bool {
        self.head_awaiting == 0
    }

    /// Shipments from position `at` on belong to the batch after the head.
    pub fn close_head(&mut self, at: usize) {
        self.head = self.head.min(at);
        self.rest_started = Instant::now();
    }

    /// The head batch is recorded and leaves the caller's list: the next batch heads the
    /// flight.
    pub fn advance(&mut self) {
        let head = self.head;
        assert!(
            head != usize::MAX && self.head_awaiting == 0,
            "the head batch is done"
        );
        self.base += head;
        self.head = usize::MAX;
        self.head_awaiting = std::mem::take(&mut self.rest_awaiting);
        self.head_started = self.rest_started;
    }

    fn awaiting(&self) -> usize {
        self.head_awaiting + self.rest_awaiting
    }

    fn sent(&mut self, i: usize) {
        if i < self.head {
            self.head_awaiting += 1;
        } else {
            self.rest_awaiting += 1;
        }
    }

    fn reported(&mut self, i: usize, published: bool) {
        let awaiting = if i < self.head {
            &mut self.head_awaiting
        } else {
            &mut self.rest_awaiting
        };
        *awaiting = awaiting.saturating_sub(1);
        self.delivered += usize::from(published);
    }

    fn give_up(&mut self) {
        self.head_awaiting = 0;
        self.rest_awaiting = 0;
    }
}

pub struct Kafka {
    publisher: Publisher,
    /// The next report index no flight has used: a report is never taken for another flight's.
    next_index: usize,
    /// The producer stopped (fatal error) or messages were given up on: replace it before the
    /// next send.
    replace: bool,
    /// Settings that did not build a producer, and the reload that brought them: not tried
    /// again until the next reload (a file they name may have appeared meanwhile).
    rejected: Option<(ProducerSettings, u64)>,
    /// A producer built from settings that changed while messages were in flight, to take over
    /// once they are withdrawn.
    staged: Option<Publisher>,
    /// Why the stopped producer could not be made again (logged once per reason).
    unbuildable: Option<String>,
    health: BrokerHealth,
    slot: &'static WorkerSlot,
}

/// The producer settings in force.
pub fn current_settings() -> ProducerSettings {
    ProducerSettings {
        brokers: guc::brokers(),
        properties: guc::kafka_properties(),
        max_message_bytes: guc::MAX_MESSAGE_SIZE.get(),
    }
}

impl Kafka {
    /// A producer from the current settings, or librdkafka's complaint about them.
    pub fn new(slot: &'static WorkerSlot) -> Result<Kafka, String> {
        let publisher = Publisher::new(current_settings())?;
        Ok(Kafka {
            publisher,
            next_index: 0,
            replace: false,
            rejected: None,
            staged: None,
            unbuildable: None,
            health: BrokerHealth::default(),
            slot,
        })
    }

    /// True if the settings in force differ from the producer's, and have not been tried.
    fn settings_changed(&self) -> bool {
        let current = current_settings();
        current != *self.publisher.settings()
            && !self.rejected.as_ref().is_some_and(|(rejected, reload)| {
                *rejected == current && *reload == process::reloads()
            })
    }

    /// Applies changed settings, and replaces the producer if it stopped. New settings that do
    /// not build a producer are logged once and the previous ones stay; false only if no
    /// producer can be built at all (nothing is published until the settings are fixed).
    pub fn refresh(&mut self) -> bool {
        let settings = current_settings();
        self.drop_stale_staged(&settings);
        if self.settings_changed() {
            let built = match self.staged.take() {
                Some(staged) => Ok(staged),
                None => Publisher::new(settings.clone()),
            };
            match built {
                Ok(publisher) => {
                    self.install(publisher);
                    // A new configuration's broker problems are news, even within a minute.
                    self.health.forget_logging();
                    log!("outbox_pg: Kafka producer reconfigured");
                    return true;
                }
                Err(error) => self.reject(settings, &error),
            }
        }
        if !self.replace {
            return true;
        }
        // The producer stopped: a new one with the settings it had.
        match Publisher::new(self.publisher.settings().clone()) {
            Ok(publisher) => {
                self.install(publisher);
                log!("outbox_pg: Kafka producer replaced");
                true
            }
            Err(error) => {
                if self.unbuildable.as_deref() != Some(error.as_str()) {
                    pgrx::ereport!(
                        PgLogLevel::WARNING,
                        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                        format!("outbox_pg: the Kafka producer stopped and cannot be made again, not publishing until the settings are fixed: {error}"),
                        "Check outbox.brokers and outbox.kafka_config, then SELECT pg_reload_conf()."
                    );
                    self.unbuildable = Some(error.clone());
                }
                self.slot.record_error(&error);
                self.slot.set_state(WorkerState::Misconfigured);
                false
            }
        }
    }

    /// Forgets a staged producer built for settings that are no longer in force.
    fn drop_stale_staged(&mut self, settings: &ProducerSettings) {
        if self
            .staged
            .as_ref()
            .is_some_and(|staged| staged.settings() != settings)
        {
            self.staged = None;
        }
    }

    fn install(&mut self, publisher: Publisher) {
        if *publisher.settings() == current_settings() {
            self.rejected = None;
        }
        self.publisher = publisher;
        self.replace = false;
        self.unbuildable = None;
    }

    /// True if the settings in force changed and build a producer, which is kept for
    /// [`Kafka::refresh`]. Settings that do not are rejected here, once: a typo in a reload
    /// must not withdraw what the working producer has in flight.
    fn new_settings_work(&mut self) -> bool {
        let settings = current_settings();
        self.drop_stale_staged(&settings);
        if !self.settings_changed() {
            return false;
        }
        if self.staged.is_some() {
            return true;
        }
        match Publisher::new(settings.clone()) {
            Ok(publisher) => {
                self.staged = Some(publisher);
                true
            }
            Err(error) => {
                self.reject(settings, &error);
                false
            }
        }
    }

    /// Logs, once per settings, that they do not build a producer; the previous ones stay.
    fn reject(&mut self, settings: ProducerSettings, error: &str) {
        self.rejected = Some((settings, process::reloads()));
        pgrx::ereport!(
            PgLogLevel::LOG,
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!(
                "outbox_pg: invalid Kafka producer configuration, keeping the previous configuration: {error}"
            ),
            "Check outbox.brokers and outbox.kafka_config, then SELECT pg_reload_conf()."
        );
        // Not a broker problem: logged above, and the broker warning stays for when the
        // broker itself does not answer.
        self.slot.record_error(error);
    }

    /// Sends every shipment (in order) and waits for the outcomes; see [`Kafka::finish`].
    /// Returns the order breaches the broker caused.
    pub fn ship(&mut self, shipments: &mut [Shipment], how: &Shipping) -> Vec<Breach> {
        let mut flight = self.flight();
        if !self.send(shipments, 0, &mut flight, how) {
            return Vec::new();
        }
        self.publisher.send_now();
        self.finish(shipments, flight, how)
    }

    /// A new flight: its reports cannot be taken for any earlier flight's.
    pub fn flight(&self) -> Flight {
        Flight::new(self.next_index)
    }

    /// Hands `shipments[from..]` that have no outcome yet to the producer, in order, as part
    /// of `flight` (indexes relative to `shipments[0]`); a topic and key whose event is refused
    /// on the spot sends nothing more. False if there is no working producer (nothing sent).
    pub fn send(
        &mut self,
        shipments: &mut [Shipment],
        from: usize,
        flight: &mut Flight,
        how: &Shipping,
    ) -> bool {
        // A producer given up on earlier is replaced before anything more is sent: its late
        // reports must not be taken for these shipments'. Without a producer they stay unsent
        // (send again).
        if self.replace && !self.refresh() {
            return false;
        }
        let pending: Vec<usize> = (from..shipments.len())
            .filter(|&i| shipments[i].outcome.is_none())
            .collect();
        let topics: HashSet<String> = pending
            .iter()
            .map(|&i| shipments[i].event.topic.clone())
            .collect();
        let missing = self.missing_topics(
            topics.iter().map(String::as_str).collect(),
            how,
            Some((&mut *shipments, &mut *flight)),
        );
        self.send_in_order(shipments, &pending, flight, how, &missing);
        true
    }

    /// Sends what was handed over without waiting for `linger.ms` (see
    /// [`outbox_pg_core::producer::Publisher::send_now`]): for a batch nothing more is about to
    /// join.
    pub fn send_now(&self) {
        self.publisher.send_now();
    }

    /// Waits for everything in `flight`, then settles `shipments`. What was not delivered and
    /// has nothing failed before it in its topic and key is sent again, in order, until every
    /// shipment is settled or a stop is requested. Returns the order breaches the broker caused.
    pub fn finish(
        &mut self,
        shipments: &mut [Shipment],
        mut flight: Flight,
        how: &Shipping,
    ) -> Vec<Breach> {
        let mut pause = RESEND_PAUSE_MIN;
        loop {
            while !flight.done() {
                self.step(shipments, &mut flight, how);
            }
            let breaches = settle(shipments);
            let again: Vec<usize> = (0..shipments.len())
                .filter(|&i| shipments[i].disposition == Disposition::SendAgain)
                .collect();
            if again.is_empty() || process::stop_requested() {
                return breaches;
            }
            if self.publisher.fatal_error().is_some() {
                self.replace = true;
            }
            if !self.refresh() {
                return breaches; // no working producer: the rest waits for the settings
            }
            if flight.delivered == 0 {
                process::wait(pause, None);
                pause = (pause * 2).min(RESEND_PAUSE_MAX);
                if process::stop_requested() {
                    return breaches;
                }
            }
            for i in again {
                shipments[i].outcome = None;
            }
            flight = self.flight();
            if !self.send(shipments, 0, &mut flight, how) {
                return breaches;
            }
            self.publisher.send_now();
        }
    }

    /// Asks the broker about every topic among `topics` it has not confirmed, in one request:
    /// a round's retries, before they are shipped one at a time, so that the round asks once
    /// per topic however many retries and topics it has.
    pub fn check_topics(&mut self, topics: Vec<&str>, how: &Shipping) {
        let _ = self.missing_topics(topics, how, None);
    }

    /// Why events of some topics cannot be sent: not a valid name, not allowed, or missing
    /// (asked once per batch for the topics the broker has not confirmed yet). Delivery
    /// reports that arrive while the broker is asked go to `in_flight` (a batch flying ahead).
    fn missing_topics(
        &mut self,
        topics: Vec<&str>,
        how: &Shipping,
        mut in_flight: Option<(&mut [Shipment], &mut Flight)>,
    ) -> HashMap<String, String> {
        let mut refused = HashMap::new();
        let mut to_check = HashSet::new();
        for topic in topics {
            let topic = format!("{}{topic}", how.prefix);
            if refused.contains_key(&topic) || to_check.contains(&topic) {
                continue;
            }
            if let Err(reason) = validate::topic_name(&topic) {
                refused.insert(topic, reason);
            } else if !how.allowed.allows(&topic) {
                refused.insert(
                    topic.clone(),
                    format!("topic \"{topic}\" is not in outbox.allowed_topics"),
                );
            } else if let Some(reason) = how.remembered_missing(&self.publisher, &topic) {
                refused.insert(topic, reason);
            } else if !how.asked.borrow().contains(&topic) {
                to_check.insert(topic);
            }
        }
        if how.missing_answers_since.is_some() {
            how.asked.borrow_mut().extend(to_check.iter().cloned());
        }
        let unconfirmed = self.publisher.unconfirmed(to_check);
        if unconfirmed.is_empty() {
            return refused;
        }
        let pending = self
            .publisher
            .ensure_topics(unconfirmed, how.creation, TOPIC_TIMEOUT);
        let deadline = Instant::now() + TOPIC_TIMEOUT * 3;
        let answer = loop {
            self.publisher.arm_wakeup();
            if let Some(answer) = pending.try_take() {
                break Some(answer);
            }
            if process::stop_requested() || self.new_settings_work() || Instant::now() >= deadline {
                break None;
            }
            process::wait(WAIT_SLICE, Some(self.publisher.wake_fd()));
            let target = in_flight.as_mut().map(|(s, f)| (&mut **s, &mut **f));
            self.drain_reports(target);
        };
        match answer {
            Some(TopicReadiness::Known(states)) => {
                for (topic, state) in states {
                    match (state, how.creation) {
                        (Ok(true), Some(creation)) => log!(
                            "outbox_pg: created topic \"{topic}\" ({} partitions, replication {})",
                            creation.partitions,
                            creation.replication
                        ),
                        (Ok(_), _) => {}
                        (Err(reason), _) => {
                            refused.insert(topic, reason);
                        }
                    }
                }
            }
            // No answer: the broker is away; the messages wait for it in the producer.
            Some(TopicReadiness::NoAnswer(_)) | None => {}
        }
        refused
    }

    /// Hands the pending shipments to the producer in order, counting them into `flight`; a
    /// topic and key whose event is refused on the spot sends nothing more.
    fn send_in_order(
        &mut self,
        shipments: &mut [Shipment],
        pending: &[usize],
        flight: &mut Flight,
        how: &Shipping,
        refused: &HashMap<String, String>,
    ) {
        let mut stopped: HashSet<(String, String)> = HashSet::new();
        for &i in pending {
            let key = {
                let (topic, key) = shipments[i].event.order_key();
                (topic.to_string(), key.to_string())
            };
            if stopped.contains(&key) {
                continue;
            }
            let topic = format!("{}{}", how.prefix, shipments[i].event.topic);
            if let Some(reason) = refused.get(&topic) {
                shipments[i].outcome = Some(Outcome::Refused {
                    error: reason.clone(),
                });
                stopped.insert(key);
                continue;
            }
            loop {
                let index = flight.base + i;
                match self
                    .publisher
                    .send(index, &shipments[i].event, &topic, &how.format)
                {
                    Ok(()) => {
                        flight.sent(i);
                        self.next_index = self.next_index.max(index + 1);
                        break;
                    }
                    Err(NotSent::QueueFull) => {
                        // librdkafka's queue is full: let reports drain it, unless the worker
                        // is stopping or has new producer settings to apply (a broker that
                        // does not answer never drains it).
                        let give_up = if process::stop_requested() {
                            Some("the worker is stopping")
                        } else if self.new_settings_work() {
                            Some("the producer settings changed")
                        } else {
                            None
                        };
                        if let Some(reason) = give_up {
                            shipments[i].outcome = Some(Outcome::Undelivered {
                                error: reason.into(),
                            });
                            stopped.insert(key);
                            break;
                        }
                        self.publisher.arm_wakeup();
                        process::wait(WAIT_SLICE, Some(self.publisher.wake_fd()));
                        self.drain_reports(Some((shipments, flight)));
                    }
                    Err(NotSent::Refused(outcome)) => {
                        shipments[i].outcome = Some(outcome);
                        stopped.insert(key);
                        break;
                    }
                }
            }
        }
    }

    /// Waits a moment (WAIT_SLICE at most) for reports of what is in `flight`. Signals are
    /// obeyed at every step: a stop gives in-flight messages STOP_GRACE, then withdraws them; a
    /// settings change, `outbox.delivery_timeout` or a stall withdraw them too; a stopped
    /// producer withdraws what it has not put in a request yet. Reports still missing
    /// WITHDRAW_GRACE after a withdrawal are given up on.
    pub fn step(&mut self, shipments: &mut [Shipment], flight: &mut Flight, how: &Shipping) {
        if flight.done() {
            return;
        }
        if self.drain_reports(Some((shipments, flight))) > 0 {
            flight.last_report = Instant::now();
            return;
        }
        let now = Instant::now();
        let reason = if let Some((_, reason)) = flight.withdrawn {
            Some(reason)
        } else if process::stop_requested() {
            let seen = *flight.stop_seen_at.get_or_insert(now);
            (now >= seen + STOP_GRACE).then_some("the worker is stopping")
        } else if self.new_settings_work() {
            Some("the producer settings changed")
        } else if self.publisher.fatal_error().is_some() {
            Some(PRODUCER_STOPPED)
        } else if how
            .delivery_timeout
            .is_some_and(|t| now >= flight.head_started + t)
        {
            Some("outbox.delivery_timeout passed")
        } else if now >= flight.last_report + STALL_TIMEOUT {
            Some("the producer stalled")
        } else {
            None
        };
        if let Some(reason) = reason {
            match flight.withdrawn {
                None => {
                    if reason == "the producer stalled" {
                        warning!(
                            "outbox_pg: no delivery report for {}s with {} events in flight; replacing the Kafka producer",
                            STALL_TIMEOUT.as_secs(),
                            flight.awaiting()
                        );
                        self.replace = true;
                    }
                    if reason == PRODUCER_STOPPED {
                        // Requests it made before it stopped still go out, and the broker may
                        // store them: their real outcome is waited for (within the grace), so
                        // that a stored event is not taken for one that was not.
                        self.publisher.withdraw_queued();
                    } else {
                        self.publisher.withdraw_all();
                    }
                    flight.withdrawn = Some((now, reason));
                }
                Some((at, _)) if now >= at + WITHDRAW_GRACE => {
                    // Reports that never came: give up on them, and on this producer.
                    for shipment in shipments.iter_mut() {
                        if shipment.outcome.is_none() {
                            shipment.outcome = Some(Outcome::Undelivered {
                                error: format!("withdrawn: {reason}"),
                            });
                        }
                    }
                    flight.give_up();
                    self.replace = true;
                    return;
                }
                // Kafka refuses the requests made behind the one that stopped the producer (out
                // of order sequence) and librdkafka puts their messages back in its queue without
                // a report: withdraw them as they come back.
                Some((_, reason)) if reason == PRODUCER_STOPPED => self.publisher.withdraw_queued(),
                Some(_) => {}
            }
        }
        self.publisher.arm_wakeup();
        if !self.publisher.reports().is_empty() {
            return;
        }
        process::wait(WAIT_SLICE, Some(self.publisher.wake_fd()));
    }

    /// Handles every report waiting in the channel; delivery reports of `flight` go to its
    /// shipments. Returns how many delivery reports were taken.
    pub fn drain_reports(&mut self, mut target: Option<(&mut [Shipment], &mut Flight)>) -> usize {
        let mut delivered = 0;
        let reports: Vec<Report> = self.publisher.reports().try_iter().collect();
        for report in reports {
            match report {
                Report::Delivered { index, outcome } => {
                    if outcome.is_published() {
                        self.health.reachable(self.slot);
                    }
                    let Some((shipments, flight)) = target.as_mut() else {
                        continue;
                    };
                    let Some(i) = index.checked_sub(flight.base) else {
                        continue; // an earlier flight's
                    };
                    if let Some(shipment) = shipments.get_mut(i) {
                        if shipment.outcome.is_none() {
                            flight.reported(i, outcome.is_published());
                            shipment.outcome = Some(outcome);
                            delivered += 1;
                        }
                    }
                }
                Report::ClientError { fatal, message } => {
                    self.health.unreachable_because(self.slot, &message);
                    if fatal {
                        warning!("outbox_pg: the Kafka producer stopped, replacing it: {message}");
                        self.replace = true;
                    }
                }
                // outbox_pg relies on this property on purpose (see outbox_pg_core::producer).
                Report::Log { message }
                    if message.contains("enable.gapless.guarantee is experimental") => {}
                Report::Log { message } => log!("outbox_pg: librdkafka: {message}"),
            }
        }
        delivered
    }

    /// Waits up to `timeout` for a commit, a signal or a producer report (broker errors are
    /// logged as they come).
    pub fn idle(&mut self, timeout: Duration) {
        self.publisher.arm_wakeup();
        if self.publisher.reports().is_empty() {
            process::wait(timeout, Some(self.publisher.wake_fd()));
        }
        self.drain_reports(None);
    }

    /// True if the producer can take more behind what it has in flight: it has not stopped
    /// and is not due to be replaced (a replacement would drop the reports still to come).
    pub fn takes_more(&self) -> bool {
        !self.replace && self.publisher.fatal_error().is_none()
    }

    /// The producer stopped and no producer can be made from the settings: nothing is sent.
    pub fn misconfigured(&self) -> bool {
        self.replace && self.unbuildable.is_some()
    }

    pub fn broker_unreachable(&self) -> bool {
        self.health.unreachable()
    }
}

/// Whether the broker answers, for operators: logged on change (and at most once a minute while
/// it stays down), and shown as the worker's state.
#[derive(Default)]
struct BrokerHealth {
    down_since: Option<Instant>,
    last_logged: Option<Instant>,
}

impl BrokerHealth {
    fn unreachable(&self) -> bool {
        self.down_since.is_some()
    }

    fn unreachable_because(&mut self, slot: &WorkerSlot, error: &str) {
        slot.set_state(WorkerState::BrokerUnreachable);
        slot.set_broker(Connectivity::Unreachable);
        slot.record_error(error);
        self.down_since.get_or_insert_with(Instant::now);
        if self
            .last_logged
            .is_none_or(|t| t.elapsed() >= BROKER_LOG_INTERVAL)
        {
            pgrx::ereport!(
                PgLogLevel::WARNING,
                PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
                format!("outbox_pg: Kafka broker problem: {error}"),
                "Events stay in outbox.events and are published in order once the broker answers."
            );
            self.last_logged = Some(Instant::now());
        }
    }

    fn forget_logging(&mut self) {
        self.last_logged = None;
    }

    fn reachable(&mut self, slot: &WorkerSlot) {
        slot.set_broker(Connectivity::Connected);
        if let Some(since) = self.down_since.take() {
            log!(
                "outbox_pg: Kafka broker reachable again after {:.1}s",
                since.elapsed().as_secs_f64()
            );
            self.last_logged = None;
            slot.set_state(WorkerState::Publishing);
        }
    }
}
