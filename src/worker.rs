//! The database worker: one per published database, started by the launcher.
//!
//! The loop: claim a batch of committed events → produce them → wait for the broker's reports →
//! record each outcome; expire old published rows in small chunks; sleep only when idle, until a
//! commit wakes us or `outbox.poll_interval` passes.
//!
//! Only this thread calls Postgres. librdkafka reports reach it as plain data (see `kafka`).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::event::{Event, Outcome, Seq};
use crate::guc;
use crate::kafka::{MessageFormat, ProducerSettings, Publisher, Report, TopicCheck};
use crate::ordering::{plan_round, RoundPlan};
use crate::shared::{self, Connectivity, WorkerSlot, WorkerState};
use crate::store::{self, RetryPolicy, Store};

/// Retries sent per round; each waits for its own report, so they are kept few per round to let
/// fresh events flow.
const RETRIES_PER_ROUND: i32 = 16;
/// Published rows deleted per retention chunk, one chunk per round.
const EXPIRE_CHUNK: i32 = 1000;
/// How often retention runs while there is nothing to delete.
const EXPIRE_INTERVAL: Duration = Duration::from_secs(1);
/// How long the worker waits on the report channel before checking signals again.
const REPORT_WAIT_SLICE: Duration = Duration::from_millis(100);
/// How long a shutdown or producer rebuild waits for in-flight messages before abandoning them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the broker's answer when checking that a topic exists.
const TOPIC_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// With events in flight and no delivery report for this long, the producer is replaced.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Minimum spacing of repeated broker-error log lines.
const BROKER_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Background worker entry point; `arg` is the index of the slot the launcher assigned.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn outbox_worker_main(arg: pg_sys::Datum) {
    let Some(slot) = shared::slots().get(arg.value()) else {
        pgrx::error!(
            "outbox_pg worker started with an invalid slot {}",
            arg.value()
        );
    };
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(slot.database()), None);
    slot.attach_current_process();
    // SAFETY: registering an exit callback is allowed any time in a backend; the callback only
    // stores atomics in shared memory.
    unsafe { pg_sys::before_shmem_exit(Some(detach_on_exit), pg_sys::Datum::from(arg.value())) };

    let database = in_transaction("outbox_pg: starting", || {
        Spi::get_one::<String>("SELECT current_database()::text")
            .ok()
            .flatten()
            .unwrap_or_default()
    });
    Worker {
        slot,
        database,
        store: None,
        publisher: None,
        rebuild_requested: false,
        known_topics: HashSet::new(),
        broker: BrokerHealth::default(),
    }
    .run();
}

/// `before_shmem_exit` callback: runs in the exiting worker, before shared memory detaches.
#[pg_guard]
unsafe extern "C-unwind" fn detach_on_exit(_code: i32, arg: pg_sys::Datum) {
    if let Some(slot) = shared::slots().get(arg.value()) {
        slot.detach_current_process();
    }
}

struct Worker {
    slot: &'static WorkerSlot,
    /// This database's name, for log lines.
    database: String,
    /// Prepared statements, once the extension is ready in this database.
    store: Option<Store>,
    /// The producer, once the settings produced a working one.
    publisher: Option<Publisher>,
    /// Set when the producer must be replaced: librdkafka reported a fatal error, or it stalled.
    rebuild_requested: bool,
    /// Topics the broker confirmed to exist (with the prefix applied).
    known_topics: HashSet<String>,
    broker: BrokerHealth,
}

/// What a round found.
struct RoundResult {
    /// Events known to be waiting right now (a full claim, or events deferred for order).
    more_waiting: bool,
    /// `outbox.pause()` is in effect: nothing was claimed.
    paused: bool,
}

impl Worker {
    fn run(mut self) {
        if !self.wait_until_ready() {
            return;
        }
        let mut last_expiry = Instant::now() - EXPIRE_INTERVAL;
        while !shutdown_requested() {
            self.reload_if_signalled();
            if self.publisher.is_none() && !self.build_publisher() {
                self.sleep(poll_interval());
                continue;
            }
            let round = self.publish_round();
            // Expire a chunk per round while a backlog of old rows lasts, else once per interval.
            if last_expiry.elapsed() >= EXPIRE_INTERVAL
                && !shutdown_requested()
                && self.expire_published_chunk() < EXPIRE_CHUNK as usize
            {
                last_expiry = Instant::now();
            }
            if !round.more_waiting {
                if !round.paused {
                    self.set_state(if self.broker.unreachable() {
                        WorkerState::BrokerUnreachable
                    } else {
                        WorkerState::Idle
                    });
                }
                self.sleep(poll_interval());
            }
        }
        self.shut_down();
    }

    /// Waits until the extension is installed at this library's version and this process holds
    /// the database's publishing lock. False if asked to shut down first.
    fn wait_until_ready(&mut self) -> bool {
        let expected = env!("CARGO_PKG_VERSION");
        let mut reported: Option<String> = None;
        loop {
            if shutdown_requested() {
                return false;
            }
            self.reload_if_signalled();
            // SAFETY: reading a backend-global flag.
            if unsafe { pg_sys::RecoveryInProgress() } {
                self.note_waiting(&mut reported, "the server is in recovery (standby)");
            } else {
                let (version, locked) = in_transaction("outbox_pg: checking extension", || {
                    let version =
                        store::installed_version().unwrap_or_else(|e| pgrx::error!("{e}"));
                    let locked = version.as_deref() == Some(expected)
                        && store::try_lock_publishing().unwrap_or_else(|e| pgrx::error!("{e}"));
                    (version, locked)
                });
                match version.as_deref() {
                    Some(v) if v == expected && locked => {
                        self.store = Some(in_transaction("outbox_pg: preparing", || {
                            Store::prepare().unwrap_or_else(|e| pgrx::error!("{e}"))
                        }));
                        if reported.is_some() {
                            log!(
                                "outbox_pg: database \"{}\" is ready; publishing",
                                self.database
                            );
                        }
                        return true;
                    }
                    Some(v) if v == expected => {
                        self.set_state(WorkerState::Standby);
                        self.note_waiting(
                            &mut reported,
                            "another process holds its publishing lock",
                        );
                    }
                    Some(v) => {
                        self.set_state(WorkerState::WaitingForExtension);
                        self.note_waiting(
                            &mut reported,
                            &format!("extension version {v} is installed but the library is {expected}; run ALTER EXTENSION outbox_pg UPDATE"),
                        );
                    }
                    None => {
                        self.set_state(WorkerState::WaitingForExtension);
                        self.note_waiting(
                            &mut reported,
                            "the extension is not installed (CREATE EXTENSION outbox_pg)",
                        );
                    }
                }
            }
            self.sleep(poll_interval());
        }
    }

    fn note_waiting(&self, reported: &mut Option<String>, why: &str) {
        if reported.as_deref() != Some(why) {
            log!(
                "outbox_pg: waiting in database \"{}\": {why}",
                self.database
            );
            *reported = Some(why.to_string());
        }
    }

    /// One round: claim → produce → record.
    fn publish_round(&mut self) -> RoundResult {
        let batch_size = guc::BATCH_SIZE.get();
        let store = self.store.as_ref().expect("ready");
        let claimed = in_transaction("outbox_pg: claiming events", || {
            if store.paused().unwrap_or_else(|e| pgrx::error!("{e}")) {
                return None;
            }
            let retries = store
                .claim_due_retries(RETRIES_PER_ROUND)
                .unwrap_or_else(|e| pgrx::error!("{e}"));
            let fresh = store
                .claim_fresh(batch_size)
                .unwrap_or_else(|e| pgrx::error!("{e}"));
            Some((retries, fresh))
        });
        let Some((retries, fresh)) = claimed else {
            self.set_state(WorkerState::Paused);
            return RoundResult {
                more_waiting: false,
                paused: true,
            };
        };
        let claimed_full = fresh.len() >= batch_size as usize;
        let RoundPlan {
            retries,
            batch,
            deferred,
        } = plan_round(retries, fresh, batch_size as usize);
        if retries.is_empty() && batch.is_empty() {
            return RoundResult {
                more_waiting: deferred > 0,
                paused: false,
            };
        }
        // A broker that does not answer stays the state until it acknowledges something.
        if !self.broker.unreachable() {
            self.set_state(WorkerState::Publishing);
        }

        // Retries one at a time: a poison event must fail alone, not with its neighbours.
        for retry in &retries {
            let outcomes = self.produce(std::slice::from_ref(retry));
            self.record(std::slice::from_ref(retry), &outcomes);
        }
        let outcomes = self.produce(&batch);
        self.record(&batch, &outcomes);
        RoundResult {
            more_waiting: claimed_full || deferred > 0 || !retries.is_empty(),
            paused: false,
        }
    }

    /// Hands the events to the producer in order and waits for every report. An aggregate whose
    /// event is refused on the spot sends nothing more in this batch (its later events stay
    /// pending). Returns one outcome per event; `None` = not sent this time.
    fn produce(&mut self, events: &[Event]) -> Vec<Option<Outcome>> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; events.len()];
        let mut waiting: HashMap<Seq, usize> = HashMap::with_capacity(events.len());
        let mut stopped: Vec<&str> = Vec::new();
        let prefix = guc::topic_prefix();
        let format = self.message_format();
        let mut missing_topics: HashMap<String, Option<String>> = HashMap::new();
        for (i, event) in events.iter().enumerate() {
            if stopped.contains(&event.aggregate_id.as_str()) {
                continue;
            }
            let topic = format!("{prefix}{}", event.topic);
            if !missing_topics.contains_key(&topic) {
                let missing = self.missing_topic(&topic);
                missing_topics.insert(topic.clone(), missing);
            }
            let sent = match &missing_topics[&topic] {
                Some(missing) => Err(Outcome::Failed {
                    error: missing.clone(),
                }),
                None => self
                    .publisher
                    .as_ref()
                    .expect("publisher built before producing")
                    .send(event, &topic, &format),
            };
            match sent {
                Ok(()) => {
                    waiting.insert(event.seq, i);
                }
                Err(outcome) => {
                    stopped.push(event.aggregate_id.as_str());
                    outcomes[i] = Some(outcome);
                }
            }
        }
        self.await_reports(&mut waiting, &mut outcomes);
        warn_about_order_gaps(events, &outcomes);
        outcomes
    }

    /// Creates a missing topic (`outbox.auto_create_topics`) and waits until the broker lists it;
    /// the reason it cannot take events otherwise.
    fn create_topic(&mut self, topic: &str) -> Option<String> {
        let publisher = self
            .publisher
            .as_ref()
            .expect("publisher built before producing");
        let (partitions, replication) = (guc::TOPIC_PARTITIONS.get(), guc::TOPIC_REPLICATION.get());
        if let Err(error) =
            publisher.create_topic(topic, partitions, replication, TOPIC_CHECK_TIMEOUT)
        {
            return Some(format!(
                "topic \"{topic}\" does not exist and could not be created: {error}"
            ));
        }
        log!("outbox_pg: created topic \"{topic}\" ({partitions} partitions, replication {replication})");
        let deadline = Instant::now() + TOPIC_CHECK_TIMEOUT;
        while Instant::now() < deadline {
            if publisher.check_topic(topic, TOPIC_CHECK_TIMEOUT) == TopicCheck::Exists {
                self.known_topics.insert(topic.to_string());
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(format!(
            "topic \"{topic}\" was created but is not visible yet"
        ))
    }

    fn message_format(&self) -> MessageFormat {
        if !guc::cloudevents() {
            return MessageFormat::Raw;
        }
        let source = guc::cloudevents_source();
        MessageFormat::CloudEvents {
            source: if source.is_empty() {
                format!("/outbox_pg/{}", self.database)
            } else {
                source
            },
        }
    }

    /// The reason a topic cannot take events, if the broker says it does not exist. Confirmed
    /// topics are remembered; others are asked about once per batch.
    fn missing_topic(&mut self, topic: &str) -> Option<String> {
        if self.known_topics.contains(topic) {
            return None;
        }
        let publisher = self
            .publisher
            .as_ref()
            .expect("publisher built before producing");
        match publisher.check_topic(topic, TOPIC_CHECK_TIMEOUT) {
            TopicCheck::Exists => {
                self.known_topics.insert(topic.to_string());
                None
            }
            TopicCheck::Missing(_) if guc::AUTO_CREATE_TOPICS.get() => self.create_topic(topic),
            TopicCheck::Missing(reason) => {
                Some(format!("topic \"{topic}\" does not exist: {reason}"))
            }
            TopicCheck::Unknown(_) => None,
        }
    }

    /// Drains reports until every sent event has an outcome. Signals are honoured between waits:
    /// shutdown and producer rebuilds give in-flight messages `DRAIN_TIMEOUT`, then abandon them.
    fn await_reports(
        &mut self,
        waiting: &mut HashMap<Seq, usize>,
        outcomes: &mut [Option<Outcome>],
    ) {
        let mut abandon_at: Option<Instant> = None;
        let mut last_report = Instant::now();
        while !waiting.is_empty() {
            let publisher = self
                .publisher
                .as_ref()
                .expect("publisher built before producing");
            match publisher.reports().recv_timeout(REPORT_WAIT_SLICE) {
                Ok(Report::Delivered(delivery)) => {
                    if let Some(i) = waiting.remove(&delivery.seq) {
                        last_report = Instant::now();
                        if matches!(delivery.outcome, Outcome::Published { .. }) {
                            self.broker.reachable(self.slot);
                        }
                        outcomes[i] = Some(delivery.outcome);
                    }
                }
                Ok(report) => self.handle_report(report),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => unreachable!("the producer owns the sender"),
            }
            pg_sys::check_for_interrupts!();
            process_reload_signal();
            if last_report.elapsed() >= STALL_TIMEOUT && !self.rebuild_requested {
                // librdkafka can stay stuck where a new producer is not, e.g. retrying with a
                // producer id that a broker restarted without its state no longer knows.
                warning!(
                    "outbox_pg: no delivery report for {}s with {} events in flight; replacing the Kafka producer",
                    STALL_TIMEOUT.as_secs(),
                    waiting.len()
                );
                self.rebuild_requested = true;
                self.publisher.as_ref().expect("publisher").abandon_all();
                abandon_at = Some(Instant::now() + DRAIN_TIMEOUT);
            }
            let leaving = shutdown_requested() || self.producer_settings_changed();
            match abandon_at {
                None if leaving => abandon_at = Some(Instant::now() + DRAIN_TIMEOUT),
                Some(at) if Instant::now() >= at => {
                    // Abandoned events get `Abandoned` reports, which end this loop.
                    self.publisher.as_ref().expect("publisher").abandon_all();
                    abandon_at = Some(Instant::now() + DRAIN_TIMEOUT);
                }
                _ => {}
            }
        }
    }

    fn handle_report(&mut self, report: Report) {
        match report {
            Report::Delivered(_) => {}
            Report::ClientError { fatal, message } => {
                self.broker.unreachable_because(self.slot, &message);
                if fatal {
                    warning!(
                        "outbox_pg: the Kafka producer hit a fatal error, rebuilding it: {message}"
                    );
                    self.publisher.as_ref().expect("publisher").abandon_all();
                    self.rebuild_requested = true;
                }
            }
            Report::Log { message } => log!("outbox_pg: librdkafka: {message}"),
        }
    }

    /// Records outcomes in one transaction: one UPDATE for successes, one for failures.
    fn record(&self, events: &[Event], outcomes: &[Option<Outcome>]) {
        let policy = RetryPolicy {
            max_attempts: guc::MAX_ATTEMPTS.get(),
            backoff_ms: guc::RETRY_BACKOFF_MS.get(),
            backoff_max_ms: guc::RETRY_BACKOFF_MAX_MS.get(),
        };
        let store = self.store.as_ref().expect("ready");
        let recorded = events
            .iter()
            .zip(outcomes)
            .filter_map(|(event, outcome)| outcome.as_ref().map(|o| (event, o)));
        let (published, _) = in_transaction("outbox_pg: recording outcomes", || {
            store
                .record(recorded, policy)
                .unwrap_or_else(|e| pgrx::error!("{e}"))
        });
        if published > 0 {
            self.slot.count_published(published as u64);
        }
        for (event, outcome) in events.iter().zip(outcomes) {
            if let Some(Outcome::Failed { error }) = outcome {
                self.slot.record_error(&format!(
                    "event {} ({}): {error}",
                    event.id, event.event_type
                ));
                if event.attempts + 1 >= policy.max_attempts {
                    warning!(
                        "outbox_pg: event {} ({} for aggregate {}) is dead after {} failed attempts: {error}",
                        event.id, event.event_type, event.aggregate_id, event.attempts + 1
                    );
                }
            }
        }
    }

    /// Deletes one chunk of published rows older than `outbox.retention`; returns rows deleted.
    fn expire_published_chunk(&self) -> usize {
        let retention = guc::RETENTION_S.get();
        if retention < 0 {
            return 0;
        }
        let store = self.store.as_ref().expect("ready");
        in_transaction("outbox_pg: expiring published events", || {
            store
                .expire_published(Duration::from_secs(retention as u64), EXPIRE_CHUNK)
                .unwrap_or_else(|e| pgrx::error!("{e}"))
        })
    }

    /// Applies a configuration reload. A producer whose settings changed is rebuilt; if the new
    /// settings do not work, the error is logged and the previous producer stays in use.
    fn reload_if_signalled(&mut self) {
        process_reload_signal();
        if self.producer_settings_changed() {
            self.build_publisher();
        }
    }

    fn producer_settings_changed(&self) -> bool {
        self.rebuild_requested
            || self
                .publisher
                .as_ref()
                .is_some_and(|p| *p.settings() != current_producer_settings())
    }

    /// Builds a producer from the current settings. On failure keeps the previous one (if any).
    fn build_publisher(&mut self) -> bool {
        let settings = current_producer_settings();
        match Publisher::new(settings) {
            Ok(publisher) => {
                if let Some(old) = self.publisher.replace(publisher) {
                    old.flush(DRAIN_TIMEOUT);
                    log!("outbox_pg: Kafka producer reconfigured");
                }
                self.rebuild_requested = false;
                true
            }
            Err(error) => {
                let keeping = if self.publisher.is_some() {
                    "keeping the previous configuration"
                } else {
                    "not publishing until it is fixed"
                };
                pgrx::ereport!(
                    PgLogLevel::LOG,
                    PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                    format!("outbox_pg: invalid Kafka producer configuration, {keeping}: {error}"),
                    "Check outbox.brokers and outbox.kafka_config, then SELECT pg_reload_conf()."
                );
                self.broker.unreachable_because(self.slot, &error);
                self.publisher.is_some()
            }
        }
    }

    /// Sleeps until a commit sets our latch, the timeout passes, or a signal arrives. Reports
    /// the producer sent meanwhile (broker errors) are handled on wakeup.
    fn sleep(&mut self, timeout: Duration) {
        // SAFETY: the standard latch wait of a background worker, on its own latch, from the main
        // thread; WL_EXIT_ON_PM_DEATH ends the process if the postmaster dies.
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                timeout.as_millis().min(i64::MAX as u128) as std::ffi::c_long,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
            pg_sys::check_for_interrupts!();
        }
        let reports: Vec<Report> = self
            .publisher
            .as_ref()
            .map(|p| p.reports().try_iter().collect())
            .unwrap_or_default();
        for report in reports {
            self.handle_report(report);
        }
    }

    fn shut_down(&mut self) {
        if let Some(publisher) = self.publisher.take() {
            publisher.flush(DRAIN_TIMEOUT);
        }
        log!(
            "outbox_pg: worker for database \"{}\" stopped",
            self.database
        );
    }

    fn set_state(&self, state: WorkerState) {
        self.slot.set_state(state);
    }
}

/// Re-reads postgresql.conf if a SIGHUP arrived.
fn process_reload_signal() {
    // SAFETY: ConfigReloadPending is a sig_atomic_t set by the SIGHUP handler; this is the main
    // thread, outside any transaction, the only place that processes it.
    unsafe {
        if pg_sys::ConfigReloadPending != 0 {
            pg_sys::ConfigReloadPending = 0;
            pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
        }
    }
}

/// True once SIGTERM arrived (the handler sets ShutdownRequestPending; it is never cleared).
fn shutdown_requested() -> bool {
    // SAFETY: reading a sig_atomic_t written only by the signal handler.
    unsafe { pg_sys::ShutdownRequestPending != 0 }
}

fn poll_interval() -> Duration {
    Duration::from_millis(guc::POLL_INTERVAL_MS.get().max(1) as u64)
}

fn current_producer_settings() -> ProducerSettings {
    ProducerSettings {
        brokers: guc::brokers(),
        properties: guc::kafka_properties(),
        delivery_timeout_ms: guc::DELIVERY_TIMEOUT_MS.get(),
        max_message_bytes: guc::MAX_MESSAGE_SIZE.get(),
    }
}

/// Runs `f` in its own transaction, shown in pg_stat_activity as `activity`.
fn in_transaction<R>(activity: &str, f: impl FnOnce() -> R) -> R {
    let activity = std::ffi::CString::new(activity).expect("activity labels have no NUL");
    // SAFETY: the main thread of a connected background worker, outside any transaction, may
    // start one; errors inside `f` abort it and end the worker (the launcher restarts it).
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, activity.as_ptr());
    }
    let result = f();
    // SAFETY: closes the transaction opened above, on the same thread.
    unsafe {
        pg_sys::PopActiveSnapshot();
        pg_sys::CommitTransactionCommand();
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, std::ptr::null());
    }
    result
}
/// Logs the case the ordering rules cannot prevent: the broker refused an event (after it was
/// handed over) while a later event of the same aggregate in the same batch was accepted.
fn warn_about_order_gaps(events: &[Event], outcomes: &[Option<Outcome>]) {
    let mut failed: HashMap<&str, &Event> = HashMap::new();
    for (event, outcome) in events.iter().zip(outcomes) {
        match outcome {
            Some(Outcome::Failed { .. }) => {
                failed.entry(event.aggregate_id.as_str()).or_insert(event);
            }
            Some(Outcome::Published { .. }) => {
                if let Some(earlier) = failed.get(event.aggregate_id.as_str()) {
                    warning!(
                        "outbox_pg: event {} of aggregate {} was published while the earlier event {} failed; consumers will see them out of order",
                        event.id, event.aggregate_id, earlier.id
                    );
                }
            }
            _ => {}
        }
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
