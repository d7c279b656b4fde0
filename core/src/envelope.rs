//! The message envelope: how an event becomes a Kafka message, which header names are outbox_pg's,
//! and how large the message is. emit() measures with the same rules the worker sends with.

use crate::event::Event;

/// The event id; consumers de-duplicate on it.
pub const OUTBOX_ID: &str = "outbox-id";
pub const EVENT_TYPE: &str = "event-type";
pub const AGGREGATE_ID: &str = "aggregate-id";
pub const CREATED_AT: &str = "created-at";
/// The W3C trace context emit() adds from `outbox.traceparent` (a user header may set it too).
pub const TRACEPARENT: &str = "traceparent";

/// CloudEvents 1.0 Kafka binary-mode attributes outbox_pg sets in the `cloudevents` format.
const CLOUDEVENTS_HEADERS: [&str; 7] = [
    "ce_specversion",
    "ce_id",
    "ce_type",
    "ce_source",
    "ce_time",
    "ce_subject",
    "content-type",
];

/// The headers outbox_pg sets on every message, in every format.
const OUTBOX_HEADERS: [&str; 4] = [OUTBOX_ID, EVENT_TYPE, AGGREGATE_ID, CREATED_AT];

/// True for a header name outbox_pg may set itself, in any message format. Compared without
/// regard to case: consumers that read headers case-insensitively must not see two of them.
pub fn is_reserved(name: &str) -> bool {
    OUTBOX_HEADERS
        .iter()
        .chain(CLOUDEVENTS_HEADERS.iter())
        .any(|reserved| reserved.eq_ignore_ascii_case(name))
}

/// How an event becomes a Kafka message; the key is always the aggregate id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageFormat {
    /// The payload is the value; outbox headers only.
    Raw,
    /// CloudEvents 1.0, Kafka protocol binding, binary mode: attributes as `ce_` headers.
    CloudEvents { source: String },
}

/// Every header of the message for `event`, in order: outbox_pg's, then the caller's.
pub fn headers<'a>(
    event: &'a Event,
    id: &'a str,
    created_at: &'a str,
    format: &'a MessageFormat,
) -> Vec<(&'a str, &'a str)> {
    let mut headers = Vec::with_capacity(11 + event.headers.len());
    headers.extend([
        (OUTBOX_ID, id),
        (EVENT_TYPE, event.event_type.as_str()),
        (AGGREGATE_ID, event.aggregate_id.as_str()),
        (CREATED_AT, created_at),
    ]);
    if let MessageFormat::CloudEvents { source } = format {
        headers.extend([
            ("ce_specversion", "1.0"),
            ("ce_id", id),
            ("ce_type", event.event_type.as_str()),
            ("ce_source", source.as_str()),
            ("ce_time", created_at),
            ("ce_subject", event.aggregate_id.as_str()),
            ("content-type", "application/json"),
        ]);
    }
    headers.extend(
        event
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str())),
    );
    headers
}

/// The parts of a message whose size emit() knows, in bytes of UTF-8.
#[derive(Debug, Clone, Copy, Default)]
pub struct MessageParts {
    pub key: usize,
    pub event_type: usize,
    /// The payload as JSON text.
    pub payload: usize,
    /// `created-at` as written (27 bytes for years 1000 to 9999).
    pub created_at: usize,
    /// The caller's headers (and a session traceparent): names plus values.
    pub user_headers: usize,
}

/// Length of an event id in canonical hyphenated form.
const UUID_TEXT_BYTES: usize = 36;

/// The size of the Kafka message: key, value, and every header's name and value. It is what
/// `outbox.max_message_size` limits and `outbox.batch_bytes` counts.
pub fn message_bytes(parts: MessageParts, format: &MessageFormat) -> usize {
    let outbox_headers = OUTBOX_ID.len()
        + UUID_TEXT_BYTES
        + EVENT_TYPE.len()
        + parts.event_type
        + AGGREGATE_ID.len()
        + parts.key
        + CREATED_AT.len()
        + parts.created_at;
    let cloudevents = match format {
        MessageFormat::Raw => 0,
        MessageFormat::CloudEvents { source } => {
            CLOUDEVENTS_HEADERS.iter().map(|h| h.len()).sum::<usize>()
                + "1.0".len()
                + UUID_TEXT_BYTES
                + parts.event_type
                + source.len()
                + parts.created_at
                + parts.key
                + "application/json".len()
        }
    };
    parts.key + parts.payload + outbox_headers + cloudevents + parts.user_headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Timestamp;

    fn event() -> Event {
        Event {
            id: uuid::Uuid::now_v7(),
            seq: 1,
            event_type: "order.created".into(),
            aggregate_id: "order-1".into(),
            payload: r#"{"total": 12.5}"#.into(),
            headers: vec![("tenant".into(), "acme".into())],
            topic: "orders".into(),
            created_at: Timestamp(1_795_722_367_188_408),
            attempts: 0,
            message_bytes: 0,
        }
    }

    #[test]
    fn reserved_names_cover_every_format_and_ignore_case() {
        for name in [
            "outbox-id",
            "Outbox-Id",
            "event-type",
            "aggregate-id",
            "created-at",
            "ce_id",
            "CE_SOURCE",
            "ce_specversion",
            "content-type",
            "Content-Type",
        ] {
            assert!(is_reserved(name), "{name}");
        }
        for name in ["traceparent", "tenant", "ce_tenant", "content-length"] {
            assert!(!is_reserved(name), "{name}");
        }
    }

    #[test]
    fn message_bytes_are_exactly_what_is_sent() {
        let event = event();
        let id = event.id.hyphenated().to_string();
        let created_at = event.created_at.rfc3339();
        for format in [
            MessageFormat::Raw,
            MessageFormat::CloudEvents {
                source: "/outbox_pg/shop".into(),
            },
        ] {
            let sent: usize = headers(&event, &id, &created_at, &format)
                .iter()
                .map(|(name, value)| name.len() + value.len())
                .sum::<usize>()
                + event.aggregate_id.len()
                + event.payload.len();
            let parts = MessageParts {
                key: event.aggregate_id.len(),
                event_type: event.event_type.len(),
                payload: event.payload.len(),
                created_at: created_at.len(),
                user_headers: "tenant".len() + "acme".len(),
            };
            assert_eq!(message_bytes(parts, &format), sent, "{format:?}");
        }
    }
}
