//! outbox_pg's end-to-end tests live in `tests/`; the clusters, brokers and consumers they use
//! are in `outbox_pg_harness`.
