//! A real Kafka consumer that reads whole topics from the beginning.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// One consumed message, decoded.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub payload: String,
    pub headers: HashMap<String, String>,
    /// When this consumer received it.
    pub received_at: Instant,
    /// The message's Kafka timestamp (CreateTime: when the producer was handed it), in
    /// milliseconds since the Unix epoch.
    pub timestamp_ms: Option<i64>,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }

    pub fn payload_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.payload).expect("payload is JSON")
    }
}

pub struct TopicReader {
    consumer: BaseConsumer,
    /// Every assigned (topic, partition).
    partitions: Vec<(String, i32)>,
    /// The next offset to read, per partition, as far as this reader got.
    next: std::cell::RefCell<HashMap<(String, i32), i64>>,
}

impl TopicReader {
    /// Assigns every partition of `topics` from the beginning (no consumer group).
    pub fn new(bootstrap: &str, topics: &[&str]) -> Self {
        Self::with_config(bootstrap, topics, &[])
    }

    /// Like `new`, with extra librdkafka properties (TLS, ...), which override the defaults.
    pub fn with_config(bootstrap: &str, topics: &[&str], extra: &[(&str, &str)]) -> Self {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap)
            .set("group.id", format!("outbox-e2e-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "5")
            .set("fetch.error.backoff.ms", "50")
            // A broker that restarted empty: start over from its first message.
            .set("auto.offset.reset", "earliest");
        for (key, value) in extra {
            config.set(*key, *value);
        }
        let consumer: BaseConsumer = config.create().expect("consumer");
        let mut assignment = TopicPartitionList::new();
        let mut partition_list = Vec::new();
        for topic in topics {
            let partitions = crate::wait_for(Duration::from_secs(30), || {
                let metadata = consumer
                    .fetch_metadata(Some(topic), Duration::from_secs(5))
                    .ok()?;
                let count = metadata.topics().first()?.partitions().len();
                (count > 0).then_some(count)
            })
            .unwrap_or_else(|| panic!("topic {topic} has no partitions"));
            for partition in 0..partitions as i32 {
                assignment
                    .add_partition_offset(topic, partition, Offset::Beginning)
                    .unwrap();
                partition_list.push((topic.to_string(), partition));
            }
        }
        consumer.assign(&assignment).expect("assign");
        TopicReader {
            consumer,
            partitions: partition_list,
            next: Default::default(),
        }
    }

    /// Reads everything the broker holds on the assigned partitions: until every partition's
    /// high watermark is reached and nothing new arrived for `quiet`. A reader that stops at an
    /// expected count could let a duplicate hide a loss, or miss a late phantom.
    pub fn read_all(&self, quiet: Duration, timeout: Duration) -> Vec<Received> {
        let mut received = Vec::new();
        self.read_all_into(&mut received, quiet, timeout);
        received
    }

    pub fn read_all_into(&self, received: &mut Vec<Received>, quiet: Duration, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last_message = Instant::now();
        while Instant::now() < deadline {
            if let Some(Ok(message)) = self.consumer.poll(Duration::from_millis(50)) {
                let message = decode(&message);
                self.note(&message);
                received.push(message);
                last_message = Instant::now();
                continue;
            }
            if last_message.elapsed() >= quiet && self.caught_up() {
                return;
            }
        }
        panic!("the topics were not read to their end within {timeout:?}");
    }

    /// True when this reader got every partition's messages up to its high watermark.
    fn caught_up(&self) -> bool {
        let next = self.next.borrow();
        self.partitions.iter().all(|(topic, partition)| {
            match self
                .consumer
                .fetch_watermarks(topic, *partition, Duration::from_secs(5))
            {
                Ok((low, high)) => {
                    high <= low
                        || next
                            .get(&(topic.clone(), *partition))
                            .copied()
                            .unwrap_or(low)
                            >= high
                }
                Err(_) => false,
            }
        })
    }

    fn note(&self, message: &Received) {
        self.next.borrow_mut().insert(
            (message.topic.clone(), message.partition),
            message.offset + 1,
        );
    }

    /// Reads until `expected` messages arrived in total or `timeout` passed.
    pub fn read(&self, expected: usize, timeout: Duration) -> Vec<Received> {
        let mut received = Vec::new();
        self.read_into(&mut received, expected, timeout);
        received
    }

    /// Reads up to `max` messages within `timeout`, handing each one's `outbox-id` header to
    /// `f` without decoding the rest (a benchmark's counter must cost the machine little).
    /// Returns how many messages it read.
    pub fn read_ids(&self, max: usize, timeout: Duration, mut f: impl FnMut(&[u8])) -> usize {
        let deadline = Instant::now() + timeout;
        let mut read = 0;
        while read < max && Instant::now() < deadline {
            let Some(Ok(message)) = self.consumer.poll(Duration::from_millis(50)) else {
                continue;
            };
            self.next.borrow_mut().insert(
                (message.topic().to_string(), message.partition()),
                message.offset() + 1,
            );
            read += 1;
            if let Some(headers) = message.headers() {
                if let Some(id) = headers.iter().find(|h| h.key == "outbox-id") {
                    f(id.value.unwrap_or_default());
                }
            }
        }
        read
    }

    /// Appends to `received` until it holds `expected` messages or `timeout` passed.
    pub fn read_into(&self, received: &mut Vec<Received>, expected: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while received.len() < expected && Instant::now() < deadline {
            if let Some(Ok(message)) = self.consumer.poll(Duration::from_millis(50)) {
                let message = decode(&message);
                self.note(&message);
                received.push(message);
            }
        }
    }
}

fn decode(message: &rdkafka::message::BorrowedMessage<'_>) -> Received {
    let text =
        |bytes: Option<&[u8]>| String::from_utf8_lossy(bytes.unwrap_or_default()).into_owned();
    let mut headers = HashMap::new();
    if let Some(list) = message.headers() {
        for header in list.iter() {
            headers.insert(header.key.to_string(), text(header.value));
        }
    }
    Received {
        topic: message.topic().to_string(),
        partition: message.partition(),
        offset: message.offset(),
        key: text(message.key()),
        payload: text(message.payload()),
        headers,
        received_at: Instant::now(),
        timestamp_ms: message.timestamp().to_millis(),
    }
}
