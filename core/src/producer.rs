//! The Kafka producer: configuration, sending events, delivery reports as plain data, and topic
//! checks.
//!
//! Nothing here calls Postgres. librdkafka's threads, the producer's polling thread and the topic
//! helper threads only push [`Report`]s or results into channels and write a byte to a pipe
//! whose read end the worker waits on next to its latch ([`Publisher::wake_fd`]).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::bindings::{rd_kafka_flush, rd_kafka_message_status, rd_kafka_msg_status_t};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};
use rdkafka::ClientContext;

use crate::envelope::{self, MessageFormat};
use crate::event::{Event, Outcome};

/// Everything that shapes the producer; a change means building a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerSettings {
    pub brokers: String,
    /// `outbox.kafka_config`, applied after our defaults so users can override them.
    pub properties: Vec<(String, String)>,
    /// `outbox.max_message_size`: the producer accepts messages this large (plus framing).
    pub max_message_bytes: i32,
}

/// Room for record framing on top of the largest accepted message.
const MESSAGE_FRAMING_BYTES: i32 = 64 * 1024;

/// Producer defaults.
/// - Idempotence: librdkafka's retries neither reorder nor duplicate.
/// - The gapless guarantee and one request in flight per broker: when the broker refuses a
///   batch, no later message of its partition is ever stored; the producer stops instead (a
///   fatal error), and the worker sends the rest again with a new producer.
/// - No message timeout: the worker decides when to give up (`outbox.delivery_timeout`), so a
///   message is never abandoned by librdkafka behind the worker's back.
/// - `linger.ms`: how long librdkafka holds a message for more to join its request. The
///   worker claims whole batches, so it releases each batch that leaves nothing waiting at once
///   ([`Publisher::send_now`]) unless `outbox.kafka_config` sets a linger of its own.
pub const DEFAULT_PROPERTIES: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("enable.gapless.guarantee", "true"),
    ("max.in.flight.requests.per.connection", "1"),
    ("acks", "all"),
    ("message.timeout.ms", "0"),
    ("linger.ms", "1"),
    ("queue.buffering.max.messages", "1000000"),
    ("reconnect.backoff.max.ms", "2000"),
    ("client.id", "outbox_pg"),
];

/// The default `linger.ms` (as in [`DEFAULT_PROPERTIES`]), also how long
/// [`Publisher::send_now`] holds librdkafka's flush.
const DEFAULT_LINGER_MS: i32 = 1;

/// The names of librdkafka's linger.
const LINGER: &[&str] = &["linger.ms", "queue.buffering.max.ms"];

/// Every name librdkafka knows a producer property by (rdkafka_conf.c, `_RK_C_ALIAS`); the
/// topic-level ones also with the `topic.` prefix the global configuration accepts.
const ALIASES: &[&[&str]] = &[
    LINGER,
    &["max.in.flight.requests.per.connection", "max.in.flight"],
    &["retries", "message.send.max.retries"],
    &["sasl.mechanism", "sasl.mechanisms"],
    &[
        "sasl.oauthbearer.client.credentials.client.id",
        "sasl.oauthbearer.client.id",
    ],
    &[
        "sasl.oauthbearer.client.credentials.client.secret",
        "sasl.oauthbearer.client.secret",
    ],
    &[
        "acks",
        "request.required.acks",
        "topic.acks",
        "topic.request.required.acks",
    ],
    &[
        "message.timeout.ms",
        "delivery.timeout.ms",
        "topic.message.timeout.ms",
        "topic.delivery.timeout.ms",
    ],
    &["compression.type", "compression.codec"],
    &["topic.compression.type", "topic.compression.codec"],
];

/// The names of the property `key` sets, `key` among them.
fn names_of(key: &str) -> &'static [&'static str] {
    ALIASES
        .iter()
        .find(|names| names.contains(&key))
        .copied()
        .unwrap_or(&[])
}

/// What the producer tells the worker.
#[derive(Debug)]
pub enum Report {
    /// The outcome for the message sent with this index (see [`Publisher::send`]).
    Delivered { index: usize, outcome: Outcome },
    /// A client-level error (broker down, authentication, fatal idempotence state).
    ClientError { fatal: bool, message: String },
    /// A librdkafka log line at warning level or above.
    Log { message: String },
}

/// Why `send` did not hand a message over.
#[derive(Debug)]
pub enum NotSent {
    /// librdkafka's queue is full: wait for reports, then send again.
    QueueFull,
    /// Refused on the spot; this is the event's outcome.
    Refused(Outcome),
}

pub struct Publisher {
    /// The configuration the producer was built from; admin clients reuse it (security settings).
    config: ClientConfig,
    producer: ThreadedProducer<Reporter>,
    reports: Receiver<Report>,
    wake: Arc<WakePipe>,
    settings: ProducerSettings,
    /// The thread that flushes for [`Publisher::send_now`]; None when `outbox.kafka_config`
    /// sets a linger (batches wait for it, as the user asked).
    flusher: Option<Flusher>,
    /// Topics the broker confirmed to exist.
    known_topics: Arc<Mutex<HashSet<String>>>,
    /// Topics the broker said are missing, when, and why: not asked about again for
    /// MISSING_TOPIC_TTL (a flood of events for a missing topic costs one request a second).
    missing_topics: Arc<Mutex<HashMap<String, (Instant, String)>>>,
}

/// How long a topic found missing is taken as missing without asking the broker again.
const MISSING_TOPIC_TTL: Duration = Duration::from_secs(1);

/// Whether [`Publisher::ensure_topics`] created a topic.
pub type Created = bool;

/// Topics to create when they are missing (`outbox.auto_create_topics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicCreation {
    pub partitions: i32,
    /// -1: the broker's default.
    pub replication: i32,
}

/// What [`Publisher::ensure_topics`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicReadiness {
    /// Per topic: ready (and whether it was created just now), or why events cannot go there.
    Known(HashMap<String, Result<Created, String>>),
    /// The broker did not answer; sending is still right (the messages wait for it).
    NoAnswer(String),
}

impl Publisher {
    /// Builds a producer. Fails with librdkafka's message for an unknown or invalid property.
    pub fn new(settings: ProducerSettings) -> Result<Self, String> {
        let mut config = ClientConfig::new();
        for (key, value) in DEFAULT_PROPERTIES {
            config.set(*key, *value);
        }
        config.set("bootstrap.servers", &settings.brokers);
        config.set(
            "message.max.bytes",
            settings
                .max_message_bytes
                .saturating_add(MESSAGE_FRAMING_BYTES)
                .to_string(),
        );
        for (key, value) in &settings.properties {
            // librdkafka applies a configuration in no set order: a default, or an earlier
            // value, must not stay beside this one under another name of the same property.
            for name in names_of(key) {
                config.remove(name);
            }
            config.set(key, value);
        }
        config.set_log_level(RDKafkaLogLevel::Warning);

        let wake = Arc::new(WakePipe::new()?);
        let (sender, reports) = crossbeam_channel::unbounded();
        let log = sender.clone();
        let reporter = Reporter {
            sender,
            wake: wake.clone(),
        };
        let producer = with_signals_blocked(|| {
            config.create_with_context::<_, ThreadedProducer<Reporter>>(reporter)
        })
        .map_err(|e| describe(&e))?;
        let lingers_by_choice = settings
            .properties
            .iter()
            .any(|(key, _)| names_of(key) == LINGER);
        let flusher = if lingers_by_choice {
            None
        } else {
            Flusher::start(&producer)
                .map_err(|e| {
                    let _ = log.send(Report::Log {
                        message: format!("{e}; batches wait for linger.ms"),
                    });
                })
                .ok()
        };
        Ok(Self {
            config,
            producer,
            reports,
            wake,
            flusher,
            settings,
            known_topics: Arc::new(Mutex::new(HashSet::new())),
            missing_topics: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    pub fn settings(&self) -> &ProducerSettings {
        &self.settings
    }

    pub fn reports(&self) -> &Receiver<Report> {
        &self.reports
    }

    /// A descriptor that becomes readable when a report or a topic answer arrives after
    /// [`Publisher::arm_wakeup`]. The worker waits on it next to its latch.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.read_fd
    }

    /// Asks for a byte on [`Publisher::wake_fd`] at the next report; call before checking the
    /// channel and waiting. Drains bytes left from earlier wake-ups.
    pub fn arm_wakeup(&self) {
        self.wake.drain();
        self.wake.armed.store(true, Ordering::SeqCst);
    }

    /// Hands one event to librdkafka for `topic` (the event's topic with the prefix applied).
    /// Its outcome arrives as a [`Report::Delivered`] carrying `index`.
    pub fn send(
        &self,
        index: usize,
        event: &Event,
        topic: &str,
        format: &MessageFormat,
    ) -> Result<(), NotSent> {
        let mut id = uuid::Uuid::encode_buffer();
        let id = event.id.hyphenated().encode_lower(&mut id);
        let created_at = event.created_at.rfc3339();
        let all = envelope::headers(event, id, &created_at, format);
        let mut headers = OwnedHeaders::new_with_capacity(all.len());
        for (key, value) in all {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let record = BaseRecord::with_opaque_to(topic, index)
            .key(event.aggregate_id.as_bytes())
            .payload(event.payload.as_bytes())
            .headers(headers);
        match self.producer.send(record) {
            Ok(()) => Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(NotSent::QueueFull)
            }
            Err((error, _)) => Err(NotSent::Refused(outcome_of_error(&error, false))),
        }
    }

    /// Sends what is queued now instead of after `linger.ms`: call once a batch is handed over
    /// and nothing more is about to join it. librdkafka counts the linger as expired while a
    /// flush runs. The flush runs on its own thread, for the default linger at most (after which
    /// the messages would go anyway), and this waits for it, up to twice that on the monotonic
    /// clock: librdkafka's timed waits follow the wall clock, which may step back. Nothing may
    /// be handed over while the flush runs, or the first message would go alone. A linger set
    /// in `outbox.kafka_config` is obeyed instead.
    pub fn send_now(&self) {
        if let Some(flusher) = &self.flusher {
            flusher.flush();
        }
    }

    /// Messages handed over and not yet reported.
    pub fn in_flight(&self) -> i32 {
        self.producer.in_flight_count()
    }

    /// Withdraws everything queued or in flight: each such message is reported `Undelivered`.
    pub fn withdraw_all(&self) {
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
    }

    /// Withdraws the messages not yet in a request (reported `Undelivered`); those already in
    /// one keep the outcome the broker gives them.
    pub fn withdraw_queued(&self) {
        self.producer.purge(PurgeConfig::default().queue());
    }

    /// The producer's fatal error, if it hit one: it cannot send any more.
    pub fn fatal_error(&self) -> Option<String> {
        self.producer
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("{code} ({code:?}): {reason}"))
    }

    /// The topics among `topics` the broker has not confirmed yet.
    pub fn unconfirmed(&self, topics: impl IntoIterator<Item = String>) -> Vec<String> {
        let known = self.known_topics.lock().expect("not poisoned");
        let mut unknown: Vec<String> = topics.into_iter().filter(|t| !known.contains(t)).collect();
        unknown.sort();
        unknown.dedup();
        unknown
    }

    /// Why `topic` cannot take events, if the broker said it is missing less than
    /// MISSING_TOPIC_TTL ago (and, with `since`, after that instant).
    pub fn recently_missing(&self, topic: &str, since: Option<Instant>) -> Option<String> {
        let mut missing = self.missing_topics.lock().expect("not poisoned");
        missing.retain(|_, (at, _)| at.elapsed() < MISSING_TOPIC_TTL);
        missing
            .get(topic)
            .filter(|(at, _)| since.is_none_or(|since| *at >= since))
            .map(|(_, reason)| reason.clone())
    }

    /// Makes sure `topics` exist, on a helper thread: one metadata request for all of them;
    /// with `creation`, missing ones are created and waited for until the broker lists them.
    /// Confirmed topics are remembered. An event for a missing topic would otherwise wait in
    /// librdkafka for `topic.metadata.propagation.max.ms` and hold up its batch.
    pub fn ensure_topics(
        &self,
        topics: Vec<String>,
        creation: Option<TopicCreation>,
        timeout: Duration,
    ) -> Pending<TopicReadiness> {
        let producer = self.producer.clone();
        let config = self.config.clone();
        let known = self.known_topics.clone();
        let missing_since = self.missing_topics.clone();
        self.on_helper_thread(move || {
            let deadline = Instant::now() + timeout;
            let mut states = match look_up(&producer, &topics, timeout) {
                Ok(states) => states,
                Err(error) => return TopicReadiness::NoAnswer(error),
            };
            let mut created_now = HashSet::new();
            if let Some(creation) = creation {
                let missing: Vec<String> = states
                    .iter()
                    .filter(|(_, state)| state.is_err())
                    .map(|(topic, _)| topic.clone())
                    .collect();
                if !missing.is_empty() {
                    let created = create(&config, &missing, creation, timeout);
                    // Created topics take a moment to appear in metadata.
                    loop {
                        if let Ok(now) = look_up(&producer, &missing, timeout) {
                            for (topic, state) in now {
                                states.insert(topic, state);
                            }
                        }
                        let waiting = missing.iter().any(|t| {
                            states[t].is_err() && created.get(t).is_some_and(|c| c.is_ok())
                        });
                        if !waiting || Instant::now() >= deadline {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    for topic in &missing {
                        if states[topic].is_ok() {
                            created_now.insert(topic.clone());
                        } else if let (Err(_), Some(Err(why))) = (&states[topic], created.get(topic)) {
                            states.insert(
                                topic.clone(),
                                Err(format!("topic \"{topic}\" does not exist and could not be created: {why}")),
                            );
                        } else if states[topic].is_err() {
                            states.insert(
                                topic.clone(),
                                Err(format!("topic \"{topic}\" was created but is not visible yet")),
                            );
                        }
                    }
                }
            }
            let mut known = known.lock().expect("not poisoned");
            let mut missing_since = missing_since.lock().expect("not poisoned");
            for (topic, state) in &states {
                match state {
                    Ok(()) => {
                        known.insert(topic.clone());
                        missing_since.remove(topic);
                    }
                    Err(reason) => {
                        missing_since.insert(topic.clone(), (Instant::now(), reason.clone()));
                    }
                }
            }
            TopicReadiness::Known(
                states
                    .into_iter()
                    .map(|(topic, state)| {
                        let created = created_now.contains(&topic);
                        (topic, state.map(|()| created))
                    })
                    .collect(),
            )
        })
    }

    /// Runs `work` on a thread with Postgres signals blocked; wakes the worker when it is done.
    fn on_helper_thread<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Pending<T> {
        let (sender, receiver) = crossbeam_channel::bounded(1);
        let wake = self.wake.clone();
        with_signals_blocked(|| {
            std::thread::Builder::new()
                .name("outbox_pg topics".into())
                .spawn(move || {
                    let _ = sender.send(work());
                    wake.notify();
                })
                .expect("spawn a helper thread")
        });
        Pending { receiver }
    }
}

/// Which of `topics` the broker lists; Err if it did not answer.
fn look_up(
    producer: &ThreadedProducer<Reporter>,
    topics: &[String],
    timeout: Duration,
) -> Result<HashMap<String, Result<(), String>>, String> {
    let metadata = producer
        .client()
        .fetch_metadata(None, timeout)
        .map_err(|e| describe(&e))?;
    let listed: HashMap<&str, _> = metadata.topics().iter().map(|t| (t.name(), t)).collect();
    Ok(topics
        .iter()
        .map(|topic| {
            let state = match listed.get(topic.as_str()) {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(()),
                Some(t) => Err(format!(
                    "topic \"{topic}\" does not exist: {}",
                    match t.error() {
                        Some(code) => RDKafkaErrorCode::from(code).to_string(),
                        None => "it has no partitions".to_string(),
                    }
                )),
                None => Err(format!(
                    "topic \"{topic}\" does not exist: the broker does not list it"
                )),
            };
            (topic.clone(), state)
        })
        .collect())
}

/// Creates `topics` (CreateTopics); an existing topic counts as created.
fn create(
    config: &ClientConfig,
    topics: &[String],
    creation: TopicCreation,
    timeout: Duration,
) -> HashMap<String, Result<(), String>> {
    let failed_all = |why: String| {
        topics
            .iter()
            .map(|t| (t.clone(), Err(why.clone())))
            .collect()
    };
    let admin: AdminClient<DefaultClientContext> = match config.create() {
        Ok(admin) => admin,
        Err(e) => return failed_all(describe(&e)),
    };
    let new_topics: Vec<NewTopic> = topics
        .iter()
        .map(|t| {
            NewTopic::new(
                t,
                creation.partitions,
                TopicReplication::Fixed(creation.replication),
            )
        })
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let created = match block_on(admin.create_topics(&new_topics, &options), timeout * 2) {
        None => return failed_all("the broker did not answer CreateTopics in time".into()),
        Some(Err(e)) => return failed_all(describe(&e)),
        Some(Ok(results)) => results,
    };
    let mut answers: HashMap<String, Result<(), String>> = created
        .into_iter()
        .map(|result| match result {
            Ok(topic) | Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => (topic, Ok(())),
            Err((topic, code)) => (topic, Err(format!("{code} ({code:?})"))),
        })
        .collect();
    for topic in topics {
        answers
            .entry(topic.clone())
            .or_insert_with(|| Err("the broker returned no result for it".into()));
    }
    answers
}

/// The answer to a request running on a helper thread.
pub struct Pending<T> {
    receiver: Receiver<T>,
}

impl<T> Pending<T> {
    /// The answer, once it is there.
    pub fn try_take(&self) -> Option<T> {
        self.receiver.try_recv().ok()
    }
}

/// Errors that do not belong to the event (our own withdrawal, a producer that stopped, a
/// timeout, a neighbour's bad record) or whose message may be stored: sent again, never counted
/// as a failed attempt. Every other refusal is the event's.
fn outcome_of_error(error: &KafkaError, possibly_persisted: bool) -> Outcome {
    let message = describe(error);
    let not_the_events_fault = matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::PurgeQueue
                | RDKafkaErrorCode::PurgeInflight
                | RDKafkaErrorCode::Fatal
                | RDKafkaErrorCode::GaplessGuarantee
                | RDKafkaErrorCode::MessageTimedOut
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::InvalidDifferentRecord
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
        )
    );
    if possibly_persisted || not_the_events_fault {
        Outcome::Undelivered { error: message }
    } else {
        Outcome::Refused { error: message }
    }
}

fn describe(error: &KafkaError) -> String {
    match error.rdkafka_error_code() {
        Some(code) => format!("{code} ({code:?})"),
        None => error.to_string(),
    }
}

/// A pipe the producer's threads write a byte to, so the worker's `WaitLatchOrSocket` returns.
struct WakePipe {
    read_fd: RawFd,
    write_fd: RawFd,
    /// Set by the worker before it waits; a writer clears it and writes one byte.
    armed: AtomicBool,
}

impl WakePipe {
    fn new() -> Result<Self, String> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(format!(
                "cannot create a pipe: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(WakePipe {
            read_fd: fds[0],
            write_fd: fds[1],
            armed: AtomicBool::new(false),
        })
    }

    /// Any thread: wake the worker if it asked to be woken.
    fn notify(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            // SAFETY: a one-byte write to our own non-blocking pipe; a full pipe already wakes.
            unsafe { libc::write(self.write_fd, [1u8].as_ptr().cast(), 1) };
        }
    }

    /// The worker's thread: empty the pipe.
    fn drain(&self) {
        let mut buffer = [0u8; 64];
        // SAFETY: reads into a local buffer from our own non-blocking pipe until it is empty.
        while unsafe { libc::read(self.read_fd, buffer.as_mut_ptr().cast(), buffer.len()) } > 0 {}
    }
}

impl Drop for WakePipe {
    fn drop(&mut self) {
        // SAFETY: closing the two descriptors this pipe owns, once.
        unsafe {
            libc::close(self.read_fd);
            libc::close(self.write_fd);
        }
    }
}

/// librdkafka's callbacks. Runs on librdkafka's threads and the polling thread: it may only
/// send plain data to the channel and wake the worker.
struct Reporter {
    sender: Sender<Report>,
    wake: Arc<WakePipe>,
}

impl Reporter {
    fn report(&self, report: Report) {
        let _ = self.sender.send(report);
        self.wake.notify();
    }
}

impl ClientContext for Reporter {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) {
            self.report(Report::Log {
                message: format!("{facility}: {message}"),
            });
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let fatal = error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal);
        self.report(Report::ClientError {
            fatal,
            message: format!("{}: {reason}", describe(&error)),
        });
    }
}

impl ProducerContext for Reporter {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, index: usize) {
        let outcome = match result {
            Ok(message) => Outcome::Published {
                partition: message.partition(),
                offset: message.offset(),
            },
            Err((error, message)) => {
                // SAFETY: the message pointer is valid for the duration of this callback.
                let status = unsafe { rd_kafka_message_status(message.ptr()) };
                let possibly_persisted =
                    status == rd_kafka_msg_status_t::RD_KAFKA_MSG_STATUS_POSSIBLY_PERSISTED;
                outcome_of_error(error, possibly_persisted)
            }
        };
        self.report(Report::Delivered { index, outcome });
    }
}

/// Polls `future` on this thread until it completes or `timeout` passes. librdkafka's admin
/// client completes its futures from its own thread, which wakes this one.
fn block_on<F: Future>(future: F, timeout: Duration) -> Option<F::Output> {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Arc::new(Unpark(std::thread::current())).into();
    let mut context = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    let deadline = Instant::now() + timeout;
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return Some(output);
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        std::thread::park_timeout(left);
    }
}

/// A thread that holds a flush of the producer for [`DEFAULT_LINGER_MS`] each time it is
/// nudged, and answers with the nudge's number when done. It ends when the nudging end is
/// dropped; the publisher then waits for it briefly, so that the producer, of which the thread
/// holds a copy, ends on the worker's thread.
struct Flusher {
    nudge: Option<Sender<u64>>,
    done: Receiver<u64>,
    asked: std::sync::atomic::AtomicU64,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long a dropped publisher waits for its flush thread to end.
const FLUSHER_STOP_WAIT: Duration = Duration::from_millis(100);

impl Flusher {
    fn start(producer: &ThreadedProducer<Reporter>) -> Result<Flusher, String> {
        let (nudge, nudged) = crossbeam_channel::bounded::<u64>(1);
        let (finished, done) = crossbeam_channel::bounded::<u64>(1);
        let producer = producer.clone();
        let thread = with_signals_blocked(|| {
            std::thread::Builder::new()
                .name("outbox_pg flush".into())
                .spawn(move || {
                    while let Ok(number) = nudged.recv() {
                        // SAFETY: a live producer handle (this thread's copy keeps it alive).
                        // With the event-based delivery reports ThreadedProducer uses,
                        // rd_kafka_flush only waits for the message count to fall and serves no
                        // queue.
                        unsafe {
                            rd_kafka_flush(producer.client().native_ptr(), DEFAULT_LINGER_MS)
                        };
                        let _ = finished.try_send(number);
                    }
                })
        })
        .map_err(|e| format!("cannot start the producer's flush thread: {e}"))?;
        Ok(Flusher {
            nudge: Some(nudge),
            done,
            asked: std::sync::atomic::AtomicU64::new(0),
            thread: Some(thread),
        })
    }

    /// Flushes and waits until this flush ends, up to twice the linger on the monotonic clock.
    /// Returns at once if the thread has not taken the last nudge yet.
    fn flush(&self) {
        let Some(nudge) = &self.nudge else {
            return;
        };
        let number = self.asked.fetch_add(1, Ordering::Relaxed) + 1;
        // Room for this one's answer: an earlier flush that ended late may have left its own.
        while self.done.try_recv().is_ok() {}
        if nudge.try_send(number).is_err() {
            return;
        }
        let deadline = Instant::now() + Duration::from_millis(2 * DEFAULT_LINGER_MS as u64);
        // Earlier flushes that ended late answer too: wait for this one's number.
        while let Ok(answered) = self
            .done
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if answered == number {
                return;
            }
        }
    }

    /// Ends the thread; true if it ended within FLUSHER_STOP_WAIT (it finishes its flush first).
    fn stop(&mut self) -> bool {
        self.nudge = None;
        let deadline = Instant::now() + FLUSHER_STOP_WAIT;
        loop {
            match self
                .done
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(_) => continue,
                // The thread dropped its end: it has ended, or is about to.
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    if let Some(thread) = self.thread.take() {
                        let _ = thread.join();
                    }
                    return true;
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => return false,
            }
        }
    }
}

impl Drop for Publisher {
    /// The flush thread ends first, so that the producer ends here rather than on that thread
    /// (a flush stuck past FLUSHER_STOP_WAIT is left to end it there).
    fn drop(&mut self) {
        if let Some(mut flusher) = self.flusher.take() {
            flusher.stop();
        }
    }
}

/// Runs `f` with every signal blocked in this thread, so threads it spawns (the producer's
/// polling thread, helper threads) inherit a full mask and Postgres' signal handlers only ever
/// run on the main thread. librdkafka masks its own threads the same way.
fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigfillset/pthread_sigmask only touch the local sets and this thread's mask, which
    // is restored before returning.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut previous);
        let result = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Timestamp;
    use rdkafka::mocking::MockCluster;

    fn event(seq: i64) -> Event {
        Event {
            id: uuid::Uuid::now_v7(),
            seq,
            event_type: "t".into(),
            aggregate_id: "a".into(),
            payload: "{}".into(),
            headers: vec![],
            topic: "t".into(),
            created_at: Timestamp(0),
            attempts: 0,
            message_bytes: 0,
        }
    }

    /// A publisher to `cluster` with `properties` on top of the defaults.
    fn publisher_on(
        cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
        properties: Vec<(String, String)>,
    ) -> Publisher {
        Publisher::new(ProducerSettings {
            brokers: cluster.bootstrap_servers(),
            properties,
            max_message_bytes: 1_000_000,
        })
        .unwrap()
    }

    fn wait_for_delivery(publisher: &Publisher) -> (usize, Outcome) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Report::Delivered { index, outcome }) =
                publisher.reports().recv_timeout(Duration::from_millis(100))
            {
                return (index, outcome);
            }
        }
        panic!("no delivery report");
    }

    #[test]
    fn messages_are_delivered_and_reported_with_their_index() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 1, 1).unwrap();
        let publisher = publisher_on(&cluster, vec![]);
        publisher
            .send(7, &event(1), "t", &MessageFormat::Raw)
            .unwrap();
        let (index, outcome) = wait_for_delivery(&publisher);
        assert_eq!(index, 7);
        assert!(outcome.is_published(), "{outcome:?}");
    }

    #[test]
    fn a_broker_refusal_stops_the_producer_and_later_messages_are_undelivered() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 1, 1).unwrap();
        let publisher = publisher_on(&cluster, vec![("linger.ms".into(), "50".into())]);
        // Deliver one so the producer is connected, then refuse the next produce request.
        publisher
            .send(0, &event(1), "t", &MessageFormat::Raw)
            .unwrap();
        assert!(wait_for_delivery(&publisher).1.is_published());
        cluster.request_errors(
            rdkafka::types::RDKafkaApiKey::Produce,
            &[rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD],
        );
        publisher
            .send(1, &event(2), "t", &MessageFormat::Raw)
            .unwrap();
        let (index, outcome) = wait_for_delivery(&publisher);
        assert_eq!(index, 1);
        assert!(matches!(outcome, Outcome::Refused { .. }), "{outcome:?}");
        // The gapless guarantee makes the refusal fatal: nothing later is sent.
        let deadline = Instant::now() + Duration::from_secs(10);
        while publisher.fatal_error().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(publisher.fatal_error().is_some());
        match publisher.send(2, &event(3), "t", &MessageFormat::Raw) {
            Err(NotSent::Refused(Outcome::Undelivered { .. })) => {}
            other => panic!("a stopped producer must not take messages: {other:?}"),
        }
    }

    #[test]
    fn the_default_linger_is_the_longest_send_now_holds() {
        let linger = DEFAULT_PROPERTIES
            .iter()
            .find(|(key, _)| *key == "linger.ms")
            .map(|(_, value)| value.parse::<i32>());
        assert_eq!(linger, Some(Ok(DEFAULT_LINGER_MS)));
    }

    #[test]
    fn the_flush_thread_ends_and_the_producer_with_its_publisher() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 1, 1).unwrap();
        // A publisher with default settings (a flush thread) that has sent one event at once.
        let sent_one = || {
            let publisher = publisher_on(&cluster, vec![]);
            publisher
                .send(0, &event(1), "t", &MessageFormat::Raw)
                .unwrap();
            publisher.send_now();
            assert!(wait_for_delivery(&publisher).1.is_published());
            publisher
        };
        let mut publisher = sent_one();
        // The thread ends when asked.
        let mut flusher = publisher
            .flusher
            .take()
            .expect("no linger set: a flush thread");
        assert!(flusher.stop(), "the flush thread did not end");
        assert!(flusher.thread.is_none());
        // Dropping a publisher ends its producer at once: the flush thread does not keep it
        // alive (the producer's reporter, the last sender of its reports, is gone).
        let publisher = sent_one();
        let reports = publisher.reports().clone();
        drop(publisher);
        loop {
            match reports.try_recv() {
                Ok(_) => continue,
                Err(crossbeam_channel::TryRecvError::Disconnected) => break,
                Err(crossbeam_channel::TryRecvError::Empty) => {
                    panic!("the producer outlived its publisher")
                }
            }
        }
    }

    #[test]
    fn send_now_obeys_a_linger_set_in_the_settings() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 1, 1).unwrap();
        for &name in LINGER {
            let publisher = publisher_on(&cluster, vec![(name.into(), "4000".into())]);
            let sent = Instant::now();
            publisher
                .send(0, &event(1), "t", &MessageFormat::Raw)
                .unwrap();
            publisher.send_now();
            // Held for the linger the user chose, not sent at once.
            let held = sent + Duration::from_millis(2000);
            while let Ok(report) = publisher
                .reports()
                .recv_timeout(held.saturating_duration_since(Instant::now()))
            {
                assert!(
                    !matches!(report, Report::Delivered { .. }),
                    "{name}: delivered before its linger"
                );
            }
            assert!(wait_for_delivery(&publisher).1.is_published());
            assert!(sent.elapsed() >= Duration::from_millis(3500), "{name}");
        }
    }

    /// The value librdkafka runs `publisher`'s producer with for property `name`.
    fn effective(publisher: &Publisher, name: &str) -> String {
        let name = std::ffi::CString::new(name).unwrap();
        let mut buffer = vec![0u8; 256];
        let mut size = buffer.len();
        // SAFETY: a live producer's configuration, read into a buffer of the size given.
        let result = unsafe {
            let conf = rdkafka::bindings::rd_kafka_conf(publisher.producer.client().native_ptr());
            rdkafka::bindings::rd_kafka_conf_get(
                conf,
                name.as_ptr(),
                buffer.as_mut_ptr().cast(),
                &mut size,
            )
        };
        assert_eq!(
            result,
            rdkafka::bindings::rd_kafka_conf_res_t::RD_KAFKA_CONF_OK
        );
        std::ffi::CStr::from_bytes_until_nul(&buffer)
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_default_set_under_another_name_takes_the_users_value() {
        let cluster = MockCluster::new(1).unwrap();
        let cases = [
            ("queue.buffering.max.ms", "25", "linger.ms"),
            ("topic.acks", "1", "acks"),
            ("topic.delivery.timeout.ms", "30000", "message.timeout.ms"),
            (
                "max.in.flight",
                "3",
                "max.in.flight.requests.per.connection",
            ),
            ("request.required.acks", "1", "acks"),
            ("delivery.timeout.ms", "30000", "message.timeout.ms"),
        ];
        // librdkafka takes the configuration in no set order: many producers, so that a
        // default left beside the user's value would win some of the time.
        for _ in 0..16 {
            for (alias, value, name) in cases {
                let mut properties = vec![(alias.to_string(), value.to_string())];
                if alias.ends_with("acks") {
                    properties.push(("enable.idempotence".into(), "false".into()));
                    properties.push(("enable.gapless.guarantee".into(), "false".into()));
                }
                let publisher = publisher_on(&cluster, properties);
                assert_eq!(effective(&publisher, name), value, "{alias}={value}");
            }
        }
    }

    #[test]
    fn of_two_names_of_one_property_the_later_given_wins() {
        let cluster = MockCluster::new(1).unwrap();
        for _ in 0..16 {
            let publisher = publisher_on(
                &cluster,
                vec![
                    ("retries".into(), "7".into()),
                    ("message.send.max.retries".into(), "9".into()),
                ],
            );
            assert_eq!(effective(&publisher, "retries"), "9");
        }
    }

    #[test]
    fn topics_are_confirmed_or_found_missing_in_one_request() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("here", 1, 1).unwrap();
        let publisher = publisher_on(
            &cluster,
            vec![("allow.auto.create.topics".into(), "false".into())],
        );
        let answer = |pending: Pending<TopicReadiness>| {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(answer) = pending.try_take() {
                    break answer;
                }
                assert!(Instant::now() < deadline, "no topic answer");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let topics = publisher.unconfirmed(["here".to_string(), "not-here".to_string()]);
        let TopicReadiness::Known(states) =
            answer(publisher.ensure_topics(topics, None, Duration::from_secs(5)))
        else {
            panic!("the mock cluster answers")
        };
        assert_eq!(states["here"], Ok(false));
        assert!(states["not-here"].is_err());
        assert_eq!(
            publisher.unconfirmed(["here".to_string()]),
            Vec::<String>::new()
        );
        // Creation is tested against Tansu (tests/e2e): the mock cluster has no CreateTopics.
    }
}
