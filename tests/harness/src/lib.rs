//! Harness for outbox_pg's end-to-end tests and benchmarks: real PostgreSQL clusters with the
//! extension preloaded, real Kafka-protocol brokers, real consumers. Nothing is mocked on the
//! Postgres side; the only "mock" is librdkafka's mock cluster, a real broker over TCP.

pub mod broker;
pub mod cluster;
pub mod consumer;
pub mod process;
pub mod stream;

use std::net::TcpListener;
use std::time::{Duration, Instant};

pub use broker::{mock_cluster, CountedMock, MockCluster, Tansu, TlsProxy};
pub use cluster::PgCluster;
pub use consumer::{Received, TopicReader};

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `condition` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    wait_for(timeout, || condition().then_some(())).is_some()
}

/// Polls `probe` every 50 ms until it returns a value or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first column of every row `sql` returns, collected into `C` (a Vec, a HashSet, ...).
pub fn column<T: postgres::types::FromSqlOwned, C: FromIterator<T>>(
    client: &mut postgres::Client,
    sql: &str,
) -> C {
    client
        .query(sql, &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Counts rows of outbox.events matching a SQL condition.
pub fn count_events(client: &mut postgres::Client, condition: &str) -> i64 {
    client
        .query_one(
            &format!("SELECT count(*) FROM outbox.events WHERE {condition}"),
            &[],
        )
        .unwrap()
        .get(0)
}

/// Events of outbox.events (alias `e`) matching a SQL condition that the broker stored.
pub fn count_published(client: &mut postgres::Client, condition: &str) -> i64 {
    client
        .query_one(
            &format!(
                "SELECT count(*) FROM outbox.events e
                 WHERE ({condition}) AND e.id IN (SELECT d.event_id FROM outbox.deliveries d)"
            ),
            &[],
        )
        .unwrap()
        .get(0)
}

/// Dead events (outbox.dead_letters, alias `d`) matching a SQL condition.
pub fn count_dead(client: &mut postgres::Client, condition: &str) -> i64 {
    client
        .query_one(
            &format!("SELECT count(*) FROM outbox.dead_letters d WHERE {condition}"),
            &[],
        )
        .unwrap()
        .get(0)
}

/// Parked events (outbox.parked, alias `p`: retrying, waiting or dead) matching a condition.
pub fn count_parked(client: &mut postgres::Client, condition: &str) -> i64 {
    client
        .query_one(
            &format!("SELECT count(*) FROM outbox.parked p WHERE {condition}"),
            &[],
        )
        .unwrap()
        .get(0)
}

/// Events not yet published and not dead (outbox.pending).
pub fn count_pending(client: &mut postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM outbox.pending", &[])
        .unwrap()
        .get(0)
}

/// The newest receipt row: receipts recorded after it are counted by [`published_since`].
pub fn receipts_mark(client: &mut postgres::Client) -> i64 {
    client
        .query_one("SELECT coalesce(max(id), 0) FROM outbox.batches", &[])
        .unwrap()
        .get(0)
}

/// Rows of outbox.batches (receipts, the newest being the worker's position).
pub fn count_receipts(client: &mut postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM outbox.batches", &[])
        .unwrap()
        .get(0)
}

/// Events published in receipt rows recorded after `mark` (cheap: only new rows are read).
pub fn published_since(client: &mut postgres::Client, mark: i64) -> i64 {
    client
        .query_one(
            "SELECT coalesce(sum(event_count), 0)::bigint FROM outbox.batches WHERE id > $1",
            &[&mark],
        )
        .unwrap()
        .get(0)
}

/// Waits until no committed event is left unpublished (dead events excepted).
pub fn wait_until_published(client: &mut postgres::Client, timeout: Duration) -> bool {
    wait_until(timeout, || count_pending(client) == 0)
}

/// Events in outbox.events that have no receipt and are not dead, found without the worker's
/// position (which `outbox.pending` relies on): what a bug in finding events would leave.
pub fn count_unreceipted(client: &mut postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM outbox.events e
             WHERE NOT EXISTS (SELECT 1 FROM outbox.deliveries d WHERE d.event_id = e.id)
               AND NOT EXISTS (SELECT 1 FROM outbox.parked p
                               WHERE p.event_id = e.id AND p.state = 'dead')",
            &[],
        )
        .unwrap()
        .get(0)
}

/// Waits until every row of outbox.events has a receipt (dead ones excepted), judged by the
/// receipts alone ([`count_unreceipted`]).
pub fn wait_until_every_row_published(client: &mut postgres::Client, timeout: Duration) -> bool {
    wait_until(timeout, || count_unreceipted(client) == 0)
}

/// Appends `row` to `target/<file>` of the workspace (figures that `make test` prints after
/// the suite: fault audits, lifecycle measurements).
pub fn record_figure(file: &str, row: &str) {
    use std::io::Write;
    println!("{row}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target");
    std::fs::create_dir_all(&dir).unwrap();
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(file))
        .unwrap();
    writeln!(out, "{row}").unwrap();
}
