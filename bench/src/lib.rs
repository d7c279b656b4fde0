//! Building blocks of `make bench`: broker processes, the baseline relay, load generators and
//! latency statistics. Every figure is measured in the same run on the same machine.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_pg_harness::{PgCluster, Tansu, TopicReader};

/// A sibling binary of this one (mock-broker, baseline-relay).
fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join(name)
}

/// Whether `name` is among the comma-separated prefixes of environment `variable` (all when it
/// is unset): BENCH_BROKERS=mock, BENCH_SYSTEMS=outbox_pg narrow a run when investigating.
pub fn wanted(variable: &str, name: &str) -> bool {
    std::env::var(variable).map_or(true, |v| v.split(',').any(|w| name.starts_with(w.trim())))
}

/// The broker a scenario runs against.
pub enum Broker {
    /// librdkafka's mock cluster in its own process: measures outbox_pg's own ceiling.
    Mock {
        child: Child,
        _stdin: ChildStdin,
        bootstrap: String,
    },
    Tansu(Tansu),
}

impl Broker {
    pub fn mock(topics: &[(impl AsRef<str>, i32)]) -> Self {
        let mut child = Command::new(sibling("mock-broker"))
            .args(topics.iter().map(|(t, p)| format!("{}:{p}", t.as_ref())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("mock-broker");
        let stdin = child.stdin.take().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        Broker::Mock {
            child,
            _stdin: stdin,
            bootstrap: line.trim().to_string(),
        }
    }

    pub fn tansu(topics: &[(impl AsRef<str>, i32)]) -> Self {
        let tansu = Tansu::start();
        for (topic, partitions) in topics {
            tansu.create_topic(topic.as_ref(), *partitions);
        }
        Broker::Tansu(tansu)
    }

    pub fn bootstrap(&self) -> String {
        match self {
            Broker::Mock { bootstrap, .. } => bootstrap.clone(),
            Broker::Tansu(t) => t.bootstrap(),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Broker::Mock { .. } => "mock cluster",
            Broker::Tansu(_) => "Tansu",
        }
    }

    /// Events stored on `topic`. The mock cluster keeps only its last 100,000 messages per
    /// partition, so it is asked for its high watermarks; Tansu's watermarks lag, so its topic is
    /// read back by a consumer, counting distinct `outbox-id`s.
    pub fn stored(&self, topic: &str, expected: usize) -> i64 {
        match self {
            Broker::Mock { .. } => self.high_watermarks(topic),
            Broker::Tansu(_) => self.distinct_ids(topic, expected),
        }
    }

    fn high_watermarks(&self, topic: &str) -> i64 {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("group.id", "bench-watermarks")
            .create()
            .unwrap();
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        metadata.topics()[0]
            .partitions()
            .iter()
            .map(|p| {
                consumer
                    .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                    .unwrap()
                    .1
            })
            .sum()
    }

    fn distinct_ids(&self, topic: &str, expected: usize) -> i64 {
        let reader = TopicReader::new(&self.bootstrap(), &[topic]);
        let mut messages = Vec::new();
        reader.read_into(&mut messages, expected, Duration::from_secs(120));
        // Anything beyond `expected` would be a duplicate: read a moment longer to see it.
        reader.read_into(&mut messages, expected + 1, Duration::from_secs(1));
        let ids: std::collections::HashSet<&str> =
            messages.iter().map(|m| m.header("outbox-id")).collect();
        ids.len() as i64
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Broker::Mock { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The classic polling relay in its own process, against `classic_outbox`.
pub struct BaselineRelay(Child);

impl BaselineRelay {
    pub fn start(cluster: &PgCluster, brokers: &str, topic: &str) -> Self {
        let url = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            cluster.port
        );
        BaselineRelay(
            Command::new(sibling("baseline-relay"))
                .args([&url, brokers, topic, "1000", "100"])
                .spawn()
                .expect("baseline-relay"),
        )
    }
}

impl Drop for BaselineRelay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The classic outbox table people write by hand: random UUIDv4 key, partial index for the relay.
pub const CLASSIC_OUTBOX: &str = "
    CREATE TABLE classic_outbox (
        id           uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
        aggregate_id text        NOT NULL,
        event_type   text        NOT NULL,
        payload      jsonb       NOT NULL,
        created_at   timestamptz NOT NULL DEFAULT now(),
        published_at timestamptz
    );
    CREATE INDEX classic_outbox_unpublished ON classic_outbox (created_at) WHERE published_at IS NULL;";

/// A ~200-byte order payload as a SQL expression of `g` (the event number).
pub const PAYLOAD_SQL: &str =
    "jsonb_build_object('order_id', g, 'customer', 'customer-' || (g % 1000),
        'amount', round((g % 997) * 1.37, 2), 'currency', 'EUR',
        'items', jsonb_build_array(jsonb_build_object('sku', 'SKU-' || (g % 89), 'qty', 1 + g % 3)),
        'note', repeat('n', 40))";

/// The same payload as a literal, for pgbench scripts and rate emitters.
pub const PAYLOAD_LITERAL: &str = r#"{"order_id": 123456, "customer": "customer-456", "amount": 624.35, "currency": "EUR", "items": [{"sku": "SKU-42", "qty": 2}], "note": "nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn"}"#;

/// Latency percentiles of one run.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub sent: usize,
    pub received: usize,
    pub p50: Duration,
    pub p95: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// Some events were not received within the window: figures are lower bounds.
    pub censored: bool,
    /// Where the time went, for received events whose message carries a timestamp: commit →
    /// handed to the producer, and handed to the producer → received (p50, p99; the Kafka
    /// timestamp has millisecond resolution).
    pub split: Option<Split>,
}

/// p50 and p99 of the two parts of commit → receive.
#[derive(Debug, Clone, Copy, Default)]
pub struct Split {
    pub to_producer: (Duration, Duration),
    pub producer_to_consumer: (Duration, Duration),
}

impl Split {
    fn of(mut to_producer: Vec<Duration>, mut after: Vec<Duration>) -> Option<Split> {
        if to_producer.is_empty() {
            return None;
        }
        let quantiles = |v: &mut Vec<Duration>| {
            v.sort();
            let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
            (at(0.50), at(0.99))
        };
        Some(Split {
            to_producer: quantiles(&mut to_producer),
            producer_to_consumer: quantiles(&mut after),
        })
    }

    /// "commit → producer p50 / p99, producer → consumer p50 / p99".
    pub fn cell(&self) -> String {
        format!(
            "{} / {} + {} / {}",
            ms(self.to_producer.0),
            ms(self.to_producer.1),
            ms(self.producer_to_consumer.0),
            ms(self.producer_to_consumer.1)
        )
    }
}

impl Summary {
    /// From per-event latencies; events never received count as `window_left` (censored).
    pub fn of(mut latencies: Vec<Duration>, sent: usize, censored_at: &[Duration]) -> Summary {
        let received = latencies.len();
        latencies.extend_from_slice(censored_at);
        latencies.sort();
        let at = |q: f64| {
            if latencies.is_empty() {
                Duration::ZERO
            } else {
                latencies
                    [((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1]
            }
        };
        Summary {
            sent,
            received,
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            max: latencies.last().copied().unwrap_or_default(),
            censored: !censored_at.is_empty(),
            split: None,
        }
    }

    pub fn cells(&self) -> [String; 4] {
        let mark = if self.censored { "≥" } else { "" };
        [self.p50, self.p95, self.p99, self.max].map(|d| format!("{mark}{}", ms(d)))
    }
}

/// The median of a non-empty sample (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    }
}

/// The lowest and highest of a non-empty sample.
pub fn range(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(low, high), &v| {
            (low.min(v), high.max(v))
        })
}

pub fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

/// Commit instants (by event id) and receive instants, filled by emitters and a consumer; and
/// when each received message was handed to its producer (its Kafka timestamp).
/// Built by [`Clock::for_events`] only (no `Default`): a map that grows mid-run stalls the run.
pub struct Clock {
    pub committed: Mutex<HashMap<String, Instant>>,
    pub received: Mutex<HashMap<String, Instant>>,
    pub produced: Mutex<HashMap<String, Instant>>,
}

/// The monotonic instant of a wall-clock time in milliseconds since the Unix epoch. Both clocks
/// are read now, not once per process: during a `make bench` here the wall clock stepped 7.8 s
/// between two scenarios, which made the later scenarios' splits read seconds.
fn instant_of_epoch_ms(ms: i64) -> Instant {
    let (wall, mono) = (std::time::SystemTime::now(), Instant::now());
    let at = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    match at.duration_since(wall) {
        Ok(after) => mono + after,
        Err(before) => mono.checked_sub(before.duration()).unwrap_or(mono),
    }
}

impl Clock {
    /// A clock with room for `events` events. A map that grows doubles under its lock: at
    /// 917,504 ids one such move took half a second here, stalling the emitters and the consumer
    /// in the middle of a measurement (the sustained scenario's minute 8 had p99 266 and 401 ms
    /// in two runs).
    pub fn for_events(events: usize) -> Clock {
        let map = || Mutex::new(HashMap::with_capacity(events + events / 8 + 1024));
        Clock {
            committed: map(),
            received: map(),
            produced: map(),
        }
    }

    /// Every committed event was received.
    pub fn all_received(&self) -> bool {
        // Locks in the order summary() takes them.
        let committed = self.committed.lock().unwrap();
        let received = self.received.lock().unwrap();
        committed.keys().all(|id| received.contains_key(id))
    }

    /// Latencies of events committed in `[from, to)`; events not received are censored at `end`.
    pub fn summary(&self, from: Instant, to: Instant, end: Instant) -> Summary {
        let committed = self.committed.lock().unwrap();
        let received = self.received.lock().unwrap();
        let produced = self.produced.lock().unwrap();
        let mut latencies = Vec::new();
        let mut censored = Vec::new();
        let (mut to_producer, mut after) = (Vec::new(), Vec::new());
        let mut sent = 0;
        for (id, at) in committed.iter().filter(|(_, at)| **at >= from && **at < to) {
            sent += 1;
            match received.get(id) {
                Some(r) => {
                    latencies.push(r.saturating_duration_since(*at));
                    if let Some(p) = produced.get(id) {
                        to_producer.push(p.saturating_duration_since(*at));
                        after.push(r.saturating_duration_since(*p));
                    }
                }
                None => censored.push(end.saturating_duration_since(*at)),
            }
        }
        drop((committed, received, produced));
        if let Some(debug) = std::env::var_os("BENCH_DEBUG") {
            // BENCH_DEBUG=N: the N slowest (30 for any other value).
            let n = debug.to_str().and_then(|n| n.parse().ok()).unwrap_or(30);
            self.print_slowest(from, to, n);
        }
        Summary {
            split: Split::of(to_producer, after),
            ..Summary::of(latencies, sent, &censored)
        }
    }

    /// BENCH_DEBUG=N: the `n` slowest events committed in `[from, to)`, in commit order, with when
    /// they committed (ms after `from`) and how long they took to the producer and beyond.
    fn print_slowest(&self, from: Instant, to: Instant, n: usize) {
        let committed = self.committed.lock().unwrap();
        let received = self.received.lock().unwrap();
        let produced = self.produced.lock().unwrap();
        let mut slow: Vec<(Instant, Duration, Option<Duration>)> = committed
            .iter()
            .filter(|(_, at)| **at >= from && **at < to)
            .filter_map(|(id, at)| {
                let r = received.get(id)?;
                let p = produced.get(id).map(|p| p.saturating_duration_since(*at));
                Some((*at, r.saturating_duration_since(*at), p))
            })
            .collect();
        slow.sort_by_key(|(_, latency, _)| std::cmp::Reverse(*latency));
        slow.truncate(n);
        slow.sort_by_key(|(at, _, _)| *at);
        for (at, latency, to_producer) in slow {
            println!(
                "  slow: committed at {:>8.1} ms, latency {}, to producer {}",
                at.duration_since(from).as_secs_f64() * 1000.0,
                ms(latency),
                to_producer.map_or("?".into(), ms)
            );
        }
    }
}

/// How long the latency consumer's fetch waits at the broker for data. librdkafka's mock
/// cluster answers a fetch that found nothing only when this wait is over, even if messages
/// arrive meanwhile (a Kafka broker answers as soon as they do), so it adds up to this much to
/// every measured latency: 1 ms, instead of the harness's 5.
pub const LATENCY_FETCH_WAIT_MS: &str = "1";

/// The topics a steady run publishes to, a fresh one every period, so that the broker's own
/// latency stays flat for the whole run.
///
/// librdkafka's mock cluster finds a fetch's offset by walking the partition's log from its
/// oldest message set (rdkafka_mock.c, `rd_kafka_mock_msgset_find`: "FIXME: Maintain an
/// index"), and it keeps up to 5 MB per partition: on one long-lived topic every fetch costs more
/// as the log grows, until the mock's thread is saturated. Measured here with a bare producer
/// and no database, on one topic: p99 10.5, 21.7, 37.1 ms in three 10 s windows at 5,000/s; 16,
/// 26, 36, 48, 49, 67 ms in six 30 s windows at 1,000/s. With a fresh topic every 5 s at
/// 5,000/s: 6.3, 7.3, 7.5 ms; every 30 s at 1,000/s: 5.5, 6.7, 5.0, 11.6, 6.0, 5.8 ms. A Kafka
/// broker finds an offset through its offset index; a relay's latency is not a property of how
/// long a topic has existed. The walk is per message set; that it costs outbox_pg's small
/// requests more than a lingering producer's is a hypothesis (message sets were not counted)
/// that these fit: outbox_pg at 5,000/s, alternated, p99 13.1–15.1 ms in four runs with a fresh
/// topic every 5 s, 7.1–9.1 ms every 1 s (a bare producer, one run each: 4.1 and 3.7 ms). The
/// latency scenarios use [`rotation_period`]; the sustained (10 s at 2,000/s) and old-snapshot
/// (30 s windows at 1,000/s) scenarios keep longer topics, and their p99s may carry some of
/// this cost. Every topic a producer knows costs its broker thread a look at each partition
/// whenever it wakes. Emitters and the consumer agree on the topic by the clock: topic `k` is
/// the one for instants `start + k * period`.
#[derive(Clone)]
pub struct Topics {
    prefix: String,
    count: u32,
    period: Duration,
    partitions: i32,
    start: Instant,
}

/// How long a steady latency run at `rate` events/s stays on one topic: about 5,000 events a
/// topic, held between 1 s and 5 s (5,000/s: 1 s; 1,000/s and below: 5 s).
/// BENCH_TOPIC_PERIOD_MS overrides it (the probes that compared 1 s with 5 s).
/// Under 1 s the bench's own setup breaks down (p99 about 500 ms at 500 ms topics at 5,000/s,
/// not investigated), so the override is for comparisons at 1 s and above.
pub fn rotation_period(rate: u32) -> Duration {
    if let Some(ms) = std::env::var("BENCH_TOPIC_PERIOD_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        return Duration::from_millis(ms.max(1));
    }
    Duration::from_secs_f64(5000.0 / rate.max(1) as f64)
        .clamp(Duration::from_secs(1), Duration::from_secs(5))
}

/// How long after its period a topic is still read (stragglers later than that count as not
/// received).
const TOPIC_READ_AFTER: Duration = Duration::from_secs(30);

impl Topics {
    /// Enough topics named `prefix.N`, one per `period`, for a run that lasts up to `span` from
    /// now, each with `partitions` partitions. An instant past the span stays on the last topic.
    pub fn rotating(prefix: &str, span: Duration, period: Duration, partitions: i32) -> Topics {
        Topics {
            prefix: prefix.to_string(),
            count: (span.as_secs_f64() / period.as_secs_f64()).ceil() as u32 + 1,
            period,
            partitions,
            start: Instant::now(),
        }
    }

    /// One topic for the whole run (the baseline relay publishes to the one it was given).
    pub fn single(topic: &str, partitions: i32) -> Topics {
        Topics {
            prefix: topic.to_string(),
            count: 1,
            period: Duration::MAX,
            partitions,
            start: Instant::now(),
        }
    }

    /// The topic for an event emitted at `at`.
    pub fn at(&self, at: Instant) -> String {
        self.name(self.index_at(at))
    }

    fn index_at(&self, at: Instant) -> u32 {
        let k = (at.saturating_duration_since(self.start).as_secs_f64() / self.period.as_secs_f64())
            as u32;
        k.min(self.count - 1)
    }

    fn name(&self, k: u32) -> String {
        if self.count == 1 {
            self.prefix.clone()
        } else {
            format!("{}.{k}", self.prefix)
        }
    }

    /// Every topic with its partition count, to create them on the broker.
    pub fn specs(&self) -> Vec<(String, i32)> {
        (0..self.count)
            .map(|k| (self.name(k), self.partitions))
            .collect()
    }

    /// The same topics, the first one for instants up to `start`.
    pub fn starting_at(&self, start: Instant) -> Topics {
        Topics {
            start,
            ..self.clone()
        }
    }

    /// Every partition of topics `ks`, from the beginning.
    fn partitions_of(&self, ks: std::ops::Range<u32>) -> rdkafka::TopicPartitionList {
        let mut list = rdkafka::TopicPartitionList::new();
        for k in ks {
            for p in 0..self.partitions {
                list.add_partition_offset(&self.name(k), p, rdkafka::Offset::Beginning)
                    .unwrap();
            }
        }
        list
    }

    /// The first topic (the only one of [`Topics::single`]).
    pub fn first(&self) -> String {
        self.name(0)
    }
}

/// A run's consumer and clock: reads the run's topics from a second before its schedule starts.
pub struct Measurement {
    /// The run's topics, rotating from the schedule's start.
    pub topics: Topics,
    pub clock: Arc<Clock>,
    stop: Arc<AtomicBool>,
    consumer: std::thread::JoinHandle<()>,
}

impl Measurement {
    /// Starts a consumer on `topics`, rotating from a second from now, with a clock for
    /// `events` events, and returns when the measured schedule can start (emitters begin 200 ms
    /// after they are called): the consumer has had the time to connect and fetch.
    pub fn start(bootstrap: &str, topics: &Topics, events: usize) -> Measurement {
        let topics = topics.starting_at(Instant::now() + Duration::from_secs(1));
        let clock = Arc::new(Clock::for_events(events));
        let stop = Arc::new(AtomicBool::new(false));
        let consumer = start_consumer(bootstrap, &topics, clock.clone(), stop.clone());
        if let Some(wait) =
            (topics.start - Duration::from_millis(200)).checked_duration_since(Instant::now())
        {
            std::thread::sleep(wait);
        }
        Measurement {
            topics,
            clock,
            stop,
            consumer,
        }
    }

    /// Stops the consumer; the clock, for the figures.
    pub fn stop(self) -> Arc<Clock> {
        self.stop.store(true, Ordering::Relaxed);
        self.consumer.join().unwrap();
        self.clock
    }
}

/// Reads `topics` in a thread, stamping the receive instant of each `outbox-id`. It follows
/// the rotation: the current topic and the next are assigned ahead of time (from their first
/// message), and a topic is let go 30 s after its period (anything later than that counts as
/// not received).
fn start_consumer(
    bootstrap: &str,
    topics: &Topics,
    clock: Arc<Clock>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("bench-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", LATENCY_FETCH_WAIT_MS)
        .set("fetch.error.backoff.ms", "50")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    let topics = topics.clone();
    // Topics [low, high) are assigned.
    let (mut low, mut high) = (0, (topics.index_at(Instant::now()) + 2).min(topics.count));
    consumer
        .incremental_assign(&topics.partitions_of(low..high))
        .unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let now = topics.index_at(Instant::now());
            let wanted_high = (now + 2).min(topics.count);
            if wanted_high > high {
                consumer
                    .incremental_assign(&topics.partitions_of(high..wanted_high))
                    .unwrap();
                high = wanted_high;
            }
            let wanted_low = Instant::now()
                .checked_sub(TOPIC_READ_AFTER)
                .map_or(0, |then| topics.index_at(then));
            if wanted_low > low {
                consumer
                    .incremental_unassign(&topics.partitions_of(low..wanted_low))
                    .unwrap();
                low = wanted_low;
            }
            let Some(Ok(message)) = consumer.poll(Duration::from_millis(20)) else {
                continue;
            };
            let received_at = Instant::now();
            let Some(id) = message.headers().and_then(|headers| {
                headers
                    .iter()
                    .find(|h| h.key == "outbox-id")
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            }) else {
                continue;
            };
            if let Some(ms) = message.timestamp().to_millis() {
                clock
                    .produced
                    .lock()
                    .unwrap()
                    .entry(id.clone())
                    .or_insert_with(|| instant_of_epoch_ms(ms));
            }
            clock
                .received
                .lock()
                .unwrap()
                .entry(id)
                .or_insert(received_at);
        }
    })
}

/// Emits single-event transactions at `rate` per second for `duration` from `connections`
/// sessions (open loop: a late session catches up, it does not slow the schedule down).
/// `statement` takes the aggregate id ($1, text) and, if `topics` is given, the topic ($2,
/// text: the one for the instant the event is due), and returns the event id as text.
pub fn emit_at_rate(
    cluster: &PgCluster,
    statement: &str,
    rate: u32,
    duration: Duration,
    connections: u32,
    clock: Arc<Clock>,
    topics: Option<&Topics>,
) {
    let start = Instant::now() + Duration::from_millis(200);
    let per_session = rate as f64 / connections as f64;
    let threads: Vec<_> = (0..connections)
        .map(|session| {
            let mut db = cluster.connect();
            let statement = db.prepare(statement).unwrap();
            let clock = clock.clone();
            let topics = topics.cloned();
            std::thread::spawn(move || {
                let interval = Duration::from_secs_f64(1.0 / per_session);
                let offset = interval.mul_f64(session as f64 / connections as f64);
                on_schedule(start + offset, interval, start + duration, |n, due| {
                    let aggregate = ((n * connections as u64 + session as u64) % 1000).to_string();
                    let row = match &topics {
                        Some(topics) => db.query_one(&statement, &[&aggregate, &topics.at(due)]),
                        None => db.query_one(&statement, &[&aggregate]),
                    };
                    let id: String = row.unwrap().get(0);
                    let committed = Instant::now();
                    clock.committed.lock().unwrap().insert(id, committed);
                });
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Emits one event to each of `topics` through `statement` (as for [`emit_at_rate`]) and waits
/// until the worker published them all: its producer then knows every topic's partitions, as
/// it would know a long-lived topic's, and no measured event waits for a metadata request.
pub fn warm_up_topics(cluster: &PgCluster, statement: &str, topics: &Topics) {
    let mut db = cluster.connect();
    let statement = db.prepare(statement).unwrap();
    for (topic, _) in topics.specs() {
        db.query_one(&statement, &[&"warm-up", &topic]).unwrap();
    }
    assert!(
        outbox_pg_harness::wait_until(Duration::from_secs(60), || {
            outbox_pg_harness::count_pending(&mut db) == 0
        }),
        "the warm-up events are published"
    );
}

/// Calls `step(n, due)` at `due = first + n * interval` until `end` (open loop: a late step is
/// followed at once by the ones that are due, the schedule does not slow down).
fn on_schedule(
    first: Instant,
    interval: Duration,
    end: Instant,
    mut step: impl FnMut(u64, Instant),
) {
    let mut n: u64 = 0;
    loop {
        let due = first + interval.mul_f64(n as f64);
        if due >= end {
            break;
        }
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        step(n, due);
        n += 1;
    }
}

/// A one-line description of this machine for the results file.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown CPU")
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    format!("{cores} cores ({cpu}), {} GiB RAM", mem_kb / 1024 / 1024)
}

/// BENCH_PRODUCER_SETTINGS="name=value,name=value" (the syntax of `outbox.kafka_config`):
/// librdkafka properties the bare producer takes on top of outbox_pg's defaults, when
/// investigating. Give the worker the same with
/// BENCH_PG_SETTINGS="outbox.kafka_config=name=value,name=value" to compare like with like.
pub fn investigation_producer_settings() -> Vec<(String, String)> {
    let text = std::env::var("BENCH_PRODUCER_SETTINGS").unwrap_or_default();
    outbox_pg_core::validate::kafka_properties(&text)
        .unwrap_or_else(|e| panic!("BENCH_PRODUCER_SETTINGS: {e}"))
}

/// A librdkafka producer with the settings outbox_pg uses by default (and
/// [`investigation_producer_settings`]).
pub fn bare_producer(
    bootstrap: &str,
) -> rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext> {
    let mut config = rdkafka::ClientConfig::new();
    for (key, value) in outbox_pg_core::producer::DEFAULT_PROPERTIES {
        config.set(*key, *value);
    }
    for (key, value) in investigation_producer_settings() {
        config.set(key, value);
    }
    config
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("producer")
}

/// Sends `rate` messages per second for `duration` straight to the broker, stamping each send
/// instant: the broker and client's own latency floor, the best any relay could reach on this
/// broker. Sends to the topic of each message's due instant; waits until every message is
/// acknowledged.
pub fn produce_at_rate(
    producer: &rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
    topics: &Topics,
    id_prefix: &str,
    rate: u32,
    duration: Duration,
    clock: Arc<Clock>,
) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseRecord, Producer};
    let start = Instant::now() + Duration::from_millis(200);
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    on_schedule(start, interval, start + duration, |n, due| {
        let id = format!("{id_prefix}-{n}");
        let key = (n % 1000).to_string();
        let headers = OwnedHeaders::new().insert(Header {
            key: "outbox-id",
            value: Some(&id),
        });
        clock
            .committed
            .lock()
            .unwrap()
            .insert(id.clone(), Instant::now());
        producer
            .send(
                BaseRecord::to(&topics.at(due))
                    .key(&key)
                    .payload(PAYLOAD_LITERAL)
                    .headers(headers),
            )
            .map_err(|(e, _)| e)
            .expect("enqueue");
    });
    producer.flush(Duration::from_secs(30)).expect("flush");
}

/// Sends one message to each of `topics` and waits until they are acknowledged: the producer
/// then knows every topic's partitions (as [`warm_up_topics`] does for the worker).
pub fn warm_up_producer(
    producer: &rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
    topics: &Topics,
) {
    use rdkafka::producer::{BaseRecord, Producer};
    for (topic, _) in topics.specs() {
        producer
            .send(
                BaseRecord::to(&topic)
                    .key("warm-up")
                    .payload(PAYLOAD_LITERAL),
            )
            .map_err(|(e, _)| e)
            .expect("enqueue");
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}

/// Waits (polling every 20 ms) until `count` more events are recorded as published after
/// receipt row `mark`; how long that took, or None after `timeout`.
pub fn time_until_recorded(
    db: &mut postgres::Client,
    mark: i64,
    count: i64,
    timeout: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if outbox_pg_harness::published_since(db, mark) >= count {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A consumer reading `topic` from the beginning in a thread, counting distinct `outbox-id`s;
/// it notes when it has seen `expected` of them.
pub struct DistinctCounter {
    seen: Arc<Mutex<(usize, Option<Instant>)>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DistinctCounter {
    pub fn start(bootstrap: &str, topic: &str, expected: usize) -> Self {
        let reader = TopicReader::new(bootstrap, &[topic]);
        let seen = Arc::new(Mutex::new((0, None)));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut ids = std::collections::HashSet::with_capacity(expected);
                while !stop.load(Ordering::Relaxed) {
                    reader.read_ids(1000, Duration::from_millis(20), |id| {
                        ids.insert(id.to_vec());
                    });
                    let mut seen = seen.lock().unwrap();
                    seen.0 = ids.len();
                    if seen.1.is_none() && ids.len() >= expected {
                        seen.1 = Some(Instant::now());
                    }
                }
            })
        };
        DistinctCounter {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// Waits up to `timeout` for the expected count; returns how many were seen and when the
    /// expected count was reached.
    pub fn finish(mut self, timeout: Duration) -> (usize, Option<Instant>) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline && self.seen.lock().unwrap().1.is_none() {
            std::thread::sleep(Duration::from_millis(20));
        }
        // A moment more, to count anything beyond (there should be nothing).
        std::thread::sleep(Duration::from_millis(500));
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        *self.seen.lock().unwrap()
    }
}

/// Sizes of the outbox's tables with their indexes and TOAST, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub events: i64,
    pub events_indexes: i64,
    pub batches: i64,
}

impl Sizes {
    pub fn of(db: &mut postgres::Client) -> Sizes {
        let row = db
            .query_one(
                "SELECT pg_total_relation_size('outbox.events'), pg_indexes_size('outbox.events'),
                        pg_total_relation_size('outbox.batches')",
                &[],
            )
            .unwrap();
        Sizes {
            events: row.get(0),
            events_indexes: row.get(1),
            batches: row.get(2),
        }
    }

    pub fn cell(&self) -> String {
        format!(
            "{:.1} MB ({:.1} MB indexes) + {:.1} MB receipts",
            self.events as f64 / 1e6,
            self.events_indexes as f64 / 1e6,
            self.batches as f64 / 1e6
        )
    }
}
