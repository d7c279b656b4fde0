//! The Kafka producer: configuration, sending events, and delivery reports as plain data.
//!
//! Nothing here calls Postgres. librdkafka's threads and the producer's polling thread only push
//! [`Report`]s into a crossbeam channel; the worker drains it on the Postgres main thread.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};
use rdkafka::ClientContext;

use crate::event::{Delivery, Event, Outcome, Seq};

/// Everything that shapes the producer; a change means building a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerSettings {
    pub brokers: String,
    /// `outbox.kafka_config`, applied after our defaults so users can override them.
    pub properties: Vec<(String, String)>,
    /// `message.timeout.ms`; 0 = never give up on a message.
    pub delivery_timeout_ms: i32,
    /// `outbox.max_message_size`: the producer accepts messages this large (plus framing).
    pub max_message_bytes: i32,
}

/// Room for record framing and headers on top of the largest accepted message.
const MESSAGE_FRAMING_BYTES: i32 = 64 * 1024;

/// What the producer tells the worker.
#[derive(Debug)]
pub enum Report {
    Delivered(Delivery),
    /// A client-level error (broker down, authentication, fatal idempotence state).
    ClientError {
        fatal: bool,
        message: String,
    },
    /// A librdkafka log line at warning level or above.
    Log {
        message: String,
    },
}

/// How an event becomes a Kafka message; the key is always the aggregate id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageFormat {
    /// The payload is the value; outbox headers only.
    Raw,
    /// CloudEvents 1.0, Kafka protocol binding, binary mode: attributes as `ce_` headers.
    CloudEvents { source: String },
}

/// Producer defaults. Idempotence gives per-partition order without duplicates from internal
/// retries; `linger.ms` trades a few milliseconds of latency for batching under load.
const DEFAULT_PROPERTIES: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("linger.ms", "1"),
    ("queue.buffering.max.messages", "1000000"),
    ("reconnect.backoff.max.ms", "2000"),
    ("client.id", "outbox_pg"),
];

pub struct Publisher {
    /// The configuration the producer was built from; an admin client reuses it (security).
    config: ClientConfig,
    producer: ThreadedProducer<Reporter>,
    reports: Receiver<Report>,
    settings: ProducerSettings,
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
        config.set(
            "message.timeout.ms",
            settings.delivery_timeout_ms.to_string(),
        );
        for (key, value) in &settings.properties {
            config.set(key, value);
        }
        config.set_log_level(RDKafkaLogLevel::Warning);

        let (sender, reports) = crossbeam_channel::unbounded();
        let producer = with_signals_blocked(|| {
            config.create_with_context::<_, ThreadedProducer<Reporter>>(Reporter { sender })
        })
        .map_err(|e| describe(&e))?;
        Ok(Self {
            config,
            producer,
            reports,
            settings,
        })
    }

    pub fn settings(&self) -> &ProducerSettings {
        &self.settings
    }

    pub fn reports(&self) -> &Receiver<Report> {
        &self.reports
    }

    /// Hands one event to librdkafka, for `topic` (the event's topic with the prefix applied). A refusal that happens right away (message too large, bad
    /// topic) comes back as the event's outcome; otherwise the outcome arrives as a report.
    pub fn send(&self, event: &Event, topic: &str, format: &MessageFormat) -> Result<(), Outcome> {
        let mut id = uuid::Uuid::encode_buffer();
        let id = event.id.hyphenated().encode_lower(&mut id);
        let mut headers = OwnedHeaders::new_with_capacity(11 + event.headers.len())
            .insert(header("outbox-id", id))
            .insert(header("event-type", &event.event_type))
            .insert(header("aggregate-id", &event.aggregate_id))
            .insert(header("created-at", &event.created_at));
        if let MessageFormat::CloudEvents { source } = format {
            headers = headers
                .insert(header("ce_specversion", "1.0"))
                .insert(header("ce_id", id))
                .insert(header("ce_type", &event.event_type))
                .insert(header("ce_source", source))
                .insert(header("ce_time", &event.created_at))
                .insert(header("ce_subject", &event.aggregate_id))
                .insert(header("content-type", "application/json"));
        }
        for (name, value) in &event.headers {
            headers = headers.insert(header(name, value));
        }
        let mut record = BaseRecord::with_opaque_to(topic, opaque(event.seq))
            .key(event.aggregate_id.as_bytes())
            .payload(event.payload.as_bytes())
            .headers(headers);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The local queue is full: let the polling thread drain reports, then retry.
                    record = back;
                    std::thread::sleep(QUEUE_FULL_PAUSE);
                }
                Err((error, _)) => return Err(outcome_of_error(&error)),
            }
        }
    }

    /// Asks the broker whether `topic` exists. Events for a missing topic would otherwise wait
    /// in librdkafka for `topic.metadata.propagation.max.ms` and hold up their whole batch.
    pub fn check_topic(&self, topic: &str, timeout: Duration) -> TopicCheck {
        match self.producer.client().fetch_metadata(Some(topic), timeout) {
            Ok(metadata) => match metadata.topics().first() {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => TopicCheck::Exists,
                Some(t) => TopicCheck::Missing(match t.error() {
                    Some(code) => RDKafkaErrorCode::from(code).to_string(),
                    None => "the topic has no partitions".to_string(),
                }),
                None => TopicCheck::Missing("the broker returned no metadata for it".to_string()),
            },
            Err(error) => TopicCheck::Unknown(describe(&error)),
        }
    }

    /// Creates `topic` (CreateTopics); an existing topic is fine. `replication` -1 asks for the
    /// broker's default.
    pub fn create_topic(
        &self,
        topic: &str,
        partitions: i32,
        replication: i32,
        timeout: Duration,
    ) -> Result<(), String> {
        let admin: AdminClient<DefaultClientContext> =
            with_signals_blocked(|| self.config.create()).map_err(|e| describe(&e))?;
        let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
        let options = AdminOptions::new()
            .operation_timeout(Some(timeout))
            .request_timeout(Some(timeout));
        let created = block_on(
            admin.create_topics([&new_topic], &options),
            timeout + timeout,
        )
        .ok_or_else(|| "the broker did not answer CreateTopics in time".to_string())?
        .map_err(|e| describe(&e))?;
        match created.into_iter().next() {
            Some(Ok(_)) | Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(()),
            Some(Err((_, code))) => Err(format!("{code} ({code:?})")),
            None => Err("the broker returned no result for CreateTopics".into()),
        }
    }

    /// Gives up on everything queued or in flight: each such event is reported `Abandoned`.
    pub fn abandon_all(&self) {
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
    }

    /// Waits up to `timeout` for queued messages to be delivered.
    pub fn flush(&self, timeout: Duration) -> bool {
        self.producer.flush(timeout).is_ok()
    }
}

/// What the broker's metadata says about a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicCheck {
    Exists,
    /// The broker says it does not exist (or has no partitions); the reason as text.
    Missing(String),
    /// The broker did not answer; sending is still right (the message waits for it).
    Unknown(String),
}

/// Pause before retrying a send refused because librdkafka's queue was full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(1);

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a [u8]> {
    Header {
        key,
        value: Some(value.as_bytes()),
    }
}

/// The sequence number travels as the message opaque; sequence numbers are positive.
fn opaque(seq: Seq) -> usize {
    usize::try_from(seq).expect("sequence numbers are positive")
}

/// librdkafka errors that do not belong to the event (our own purge, a producer in fatal state)
/// leave it pending untouched; every other refusal counts as a failed attempt.
fn outcome_of_error(error: &KafkaError) -> Outcome {
    let message = describe(error);
    match error.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::PurgeQueue
            | RDKafkaErrorCode::PurgeInflight
            | RDKafkaErrorCode::Fatal,
        ) => Outcome::Abandoned { error: message },
        _ => Outcome::Failed { error: message },
    }
}

fn describe(error: &KafkaError) -> String {
    match error.rdkafka_error_code() {
        Some(code) => format!("{code} ({code:?})"),
        None => error.to_string(),
    }
}

/// librdkafka's callbacks. Runs on librdkafka's threads and the polling thread: it may only
/// send plain data to the channel.
struct Reporter {
    sender: Sender<Report>,
}

impl ClientContext for Reporter {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) {
            let _ = self.sender.send(Report::Log {
                message: format!("{facility}: {message}"),
            });
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let fatal = error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal);
        let _ = self.sender.send(Report::ClientError {
            fatal,
            message: format!("{}: {reason}", describe(&error)),
        });
    }
}

impl ProducerContext for Reporter {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let outcome = match result {
            Ok(message) => Outcome::Published {
                partition: message.partition(),
                offset: message.offset(),
            },
            Err((error, _)) => outcome_of_error(error),
        };
        let seq = Seq::try_from(seq).expect("opaques are sequence numbers");
        let _ = self
            .sender
            .send(Report::Delivered(Delivery { seq, outcome }));
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

/// Runs `f` with every signal blocked in this thread, so threads it spawns (the producer's
/// polling thread) inherit a full mask and Postgres' signal handlers only ever run on the main
/// thread. librdkafka masks its own threads the same way.
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
