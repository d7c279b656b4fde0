//! The domain types that cross between the outbox table and Kafka, as plain data.
//!
//! `store` produces [`Event`]s from rows and consumes [`Delivery`]s; `kafka` consumes events and
//! produces deliveries. Neither side sees the other's types.

/// Position of an event in emission order (`outbox.events.seq`). Unique, and the producer's opaque.
pub type Seq = i64;

/// One committed, unpublished event, ready to be produced.
#[derive(Debug, Clone)]
pub struct Event {
    pub seq: Seq,
    /// The event id; also the `outbox-id` header.
    pub id: uuid::Uuid,
    pub event_type: String,
    pub aggregate_id: String,
    /// The payload as JSON text: the Kafka message value.
    pub payload: String,
    /// The caller's headers, already checked to be string-valued at emit time.
    pub headers: Vec<(String, String)>,
    /// The topic argument, else the event type; `outbox.topic_prefix` is applied when sending.
    pub topic: String,
    /// `created_at` in RFC 3339, UTC.
    pub created_at: String,
    /// Failed attempts so far; non-zero means this is a retry.
    pub attempts: i32,
}

/// What the broker said about one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged by the broker at this partition and offset.
    Published { partition: i32, offset: i64 },
    /// Refused for a reason that belongs to the event (too large, unknown topic, not authorised,
    /// or delivery timed out): it counts as a failed attempt.
    Failed { error: String },
    /// Not delivered for a reason that does not belong to the event (producer purged while
    /// reconfiguring or shutting down, fatal producer state): the event stays pending as it was.
    Abandoned { error: String },
}

/// The outcome for one event, identified by its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub seq: Seq,
    pub outcome: Outcome,
}
