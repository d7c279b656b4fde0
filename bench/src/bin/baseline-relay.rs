//! The classic polling outbox relay, as most services run it, for comparison: a separate process
//! that every poll interval selects the 100 oldest unpublished rows of a plain outbox table, sends
//! each and waits for its acknowledgement, then marks that row published.
//!
//! `baseline-relay PG_URL BROKERS TOPIC [POLL_MS] [BATCH]`

use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};

/// Signals each acknowledgement, like `producer.send(record).get()` in a JVM relay.
struct Acks(Mutex<Sender<bool>>);

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let _ = self.0.lock().unwrap().send(result.is_ok());
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (url, brokers, topic) = (&args[1], &args[2], &args[3]);
    let poll = Duration::from_millis(args.get(4).map_or(1000, |v| v.parse().unwrap()));
    let batch: i64 = args.get(5).map_or(100, |v| v.parse().unwrap());

    let mut db = postgres::Client::connect(url, postgres::NoTls).expect("connect");
    let (acked, acks) = channel();
    let producer: ThreadedProducer<Acks> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .create_with_context(Acks(Mutex::new(acked)))
        .expect("producer");
    let select = db
        .prepare(
            "SELECT id::text, aggregate_id, event_type, payload::text FROM classic_outbox
             WHERE published_at IS NULL ORDER BY created_at LIMIT $1",
        )
        .unwrap();
    let mark = db
        .prepare("UPDATE classic_outbox SET published_at = now() WHERE id = $1::text::uuid")
        .unwrap();
    loop {
        let rows = db.query(&select, &[&batch]).unwrap();
        for row in rows {
            let id: String = row.get(0);
            let key: String = row.get(1);
            let event_type: String = row.get(2);
            let payload: String = row.get(3);
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "outbox-id",
                    value: Some(id.as_bytes()),
                })
                .insert(Header {
                    key: "event-type",
                    value: Some(event_type.as_bytes()),
                });
            let record = BaseRecord::to(topic)
                .key(key.as_bytes())
                .payload(payload.as_bytes())
                .headers(headers);
            if producer.send(record).is_err() {
                continue;
            }
            // Wait for this message's acknowledgement before marking the row.
            if acks.recv().unwrap() {
                db.execute(&mark, &[&id]).unwrap();
            }
        }
        std::thread::sleep(poll);
    }
}
