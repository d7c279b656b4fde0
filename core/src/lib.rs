//! outbox_pg's core: everything about an event that does not need Postgres.
//!
//! - [`event`]: an event as the worker claims it, and what the broker said about it;
//! - [`envelope`]: how an event becomes a Kafka message (headers, reserved names, size);
//! - [`validate`]: the rules for user input and setting values;
//! - [`ordering`]: which outcomes keep per-(topic, key) order and what waits;
//! - [`producer`]: the librdkafka producer, its reports, topic checks.
//!
//! The extension (`outbox_pg`) calls into this crate; this crate never calls Postgres, so its
//! tests run with plain `cargo test -p outbox_pg_core`.

pub mod envelope;
pub mod event;
pub mod ordering;
pub mod producer;
pub mod validate;
