//! The SQL the worker runs against `outbox.events`: claim a batch, record outcomes, expire
//! published history. Each statement is set-based and prepared once per worker.
//!
//! Nothing here knows about Kafka: it reads [`Event`]s and writes [`Delivery`] outcomes.

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::PgOid;
use pgrx::pg_sys::{self, INT4OID};
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiHeapTupleData, SpiResult};

use crate::event::{Event, Outcome};

/// The columns every claim returns, in `Event` order. The topic here is without the prefix.
const EVENT_COLUMNS: &str = "e.seq, e.id, e.event_type, e.aggregate_id, e.payload::text, \
     e.headers::text, coalesce(e.topic, e.event_type), \
     to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
     e.publish_attempts";

/// An event is held back while an earlier event of its aggregate waits for a retry. Dead events
/// (next_attempt_at IS NULL) do not hold anything back. `OFFSET 0` keeps it a per-row probe of the
/// small `events_retrying` index: as an anti-join Postgres would compare every claimed row with
/// every retrying one.
const NOT_BEHIND_A_RETRY: &str = "NOT EXISTS (
        SELECT 1 FROM outbox.events r
        WHERE r.published_at IS NULL AND r.next_attempt_at IS NOT NULL
          AND r.aggregate_id = e.aggregate_id AND r.seq < e.seq
        OFFSET 0)";

/// The worker's prepared statements. Plans live across transactions (SPI_keepplan); Postgres
/// revalidates them after DDL on the table.
pub struct Store {
    paused: OwnedPreparedStatement,
    any_retrying: OwnedPreparedStatement,
    claim_fresh: OwnedPreparedStatement,
    claim_fresh_behind_retries: OwnedPreparedStatement,
    claim_due_retries: OwnedPreparedStatement,
    mark_published: OwnedPreparedStatement,
    record_failures: OwnedPreparedStatement,
    expire_published: OwnedPreparedStatement,
}

/// Retry policy for failed events, from the settings at the time of recording.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: i32,
    pub backoff_ms: i32,
    pub backoff_max_ms: i32,
}

impl Store {
    /// Prepares every statement. Call inside a transaction, with the extension installed.
    ///
    /// The statements are planned once and kept; JIT is off in this session because they are
    /// all small, and compiling would cost more than running them.
    pub fn prepare() -> SpiResult<Self> {
        Spi::run("SET jit = off")?;
        Spi::connect(|client| {
            Ok(Store {
                paused: prepare(client, "SELECT paused FROM outbox.control", &[], false)?,
                any_retrying: prepare(
                    client,
                    "SELECT EXISTS (SELECT 1 FROM outbox.events
                                    WHERE published_at IS NULL AND next_attempt_at IS NOT NULL)",
                    &[],
                    false,
                )?,
                // Nothing retrying (the usual case): a plain walk of events_pending.
                claim_fresh: prepare(
                    client,
                    &format!(
                        "SELECT {EVENT_COLUMNS} FROM outbox.events e
                         WHERE e.published_at IS NULL AND e.publish_attempts = 0
                         ORDER BY e.seq LIMIT $1"
                    ),
                    &[INT4OID],
                    false,
                )?,
                claim_fresh_behind_retries: prepare(
                    client,
                    &format!(
                        "SELECT {EVENT_COLUMNS} FROM outbox.events e
                         WHERE e.published_at IS NULL AND e.publish_attempts = 0
                           AND {NOT_BEHIND_A_RETRY}
                         ORDER BY e.seq LIMIT $1"
                    ),
                    &[INT4OID],
                    false,
                )?,
                // Only the first retrying event of each aggregate is due; later ones wait behind it.
                claim_due_retries: prepare(
                    client,
                    &format!(
                        "SELECT {EVENT_COLUMNS} FROM outbox.events e
                         WHERE e.published_at IS NULL AND e.next_attempt_at IS NOT NULL
                           AND e.next_attempt_at <= clock_timestamp()
                           AND {NOT_BEHIND_A_RETRY}
                         ORDER BY e.seq LIMIT $1"
                    ),
                    &[INT4OID],
                    false,
                )?,
                mark_published: prepare(
                    client,
                    "UPDATE outbox.events e
                     SET published_at = clock_timestamp(), next_attempt_at = NULL,
                         kafka_partition = d.kafka_partition, kafka_offset = d.kafka_offset
                     FROM unnest($1::uuid[], $2::int[], $3::bigint[])
                          AS d(id, kafka_partition, kafka_offset)
                     WHERE e.id = d.id AND e.published_at IS NULL",
                    &[UUID_ARRAY, INT4_ARRAY, INT8_ARRAY],
                    true,
                )?,
                // The nth failure schedules a retry after backoff * 2^(n-1), capped; the
                // max_attempts-th leaves next_attempt_at NULL: the event is dead.
                record_failures: prepare(
                    client,
                    "UPDATE outbox.events e
                     SET publish_attempts = e.publish_attempts + 1, error = d.error,
                         next_attempt_at = CASE
                             WHEN e.publish_attempts + 1 >= $3 THEN NULL
                             ELSE clock_timestamp() + least($4::float8 * 2 ^ e.publish_attempts, $5::float8)
                                  * interval '1 millisecond' END
                     FROM unnest($1::uuid[], $2::text[]) AS d(id, error)
                     WHERE e.id = d.id AND e.published_at IS NULL",
                    &[UUID_ARRAY, TEXT_ARRAY, INT4OID, INT4OID, INT4OID],
                    true,
                )?,
                // An event is published after it was emitted, so its UUIDv7 id (emit time) is
                // below the cutoff too: the primary key bounds the scan.
                expire_published: prepare(
                    client,
                    "DELETE FROM outbox.events WHERE id IN (
                         SELECT id FROM outbox.events
                         WHERE id < $1 AND published_at < clock_timestamp() - $2::float8 * interval '1 second'
                         ORDER BY id LIMIT $3)",
                    &[pg_sys::UUIDOID, INT4OID, INT4OID],
                    true,
                )?,
            })
        })
    }

    /// True while `outbox.pause()` is in effect.
    pub fn paused(&self) -> SpiResult<bool> {
        Spi::connect(|client| {
            client
                .select(&self.paused, None, &[])?
                .first()
                .get_one::<bool>()
        })
        .map(|paused| paused.unwrap_or(false))
    }

    /// Up to `limit` never-tried events in emission order, skipping those held back by a retry.
    pub fn claim_fresh(&self, limit: i32) -> SpiResult<Vec<Event>> {
        let any_retrying = Spi::connect(|client| {
            client
                .select(&self.any_retrying, None, &[])?
                .first()
                .get_one::<bool>()
        })?;
        if any_retrying == Some(true) {
            self.claim(&self.claim_fresh_behind_retries, limit)
        } else {
            self.claim(&self.claim_fresh, limit)
        }
    }

    /// Up to `limit` failed events whose retry time has come, first per aggregate only.
    pub fn claim_due_retries(&self, limit: i32) -> SpiResult<Vec<Event>> {
        self.claim(&self.claim_due_retries, limit)
    }

    fn claim(&self, statement: &OwnedPreparedStatement, limit: i32) -> SpiResult<Vec<Event>> {
        Spi::connect(|client| {
            let rows = client.select(statement, None, &[limit.into()])?;
            rows.map(|row| event_from_row(&row)).collect()
        })
    }

    /// Records broker outcomes: one UPDATE for all successes, one for all failures. Abandoned
    /// events change nothing. Returns (published, failed) row counts.
    pub fn record<'a>(
        &self,
        outcomes: impl IntoIterator<Item = (&'a Event, &'a Outcome)>,
        policy: RetryPolicy,
    ) -> SpiResult<(usize, usize)> {
        let mut published = (Vec::new(), Vec::new(), Vec::new());
        let mut failed = (Vec::new(), Vec::new());
        for (event, outcome) in outcomes {
            match outcome {
                Outcome::Published { partition, offset } => {
                    published
                        .0
                        .push(pgrx::Uuid::from_bytes(*event.id.as_bytes()));
                    published.1.push(*partition);
                    published.2.push(*offset);
                }
                Outcome::Failed { error } => {
                    failed.0.push(pgrx::Uuid::from_bytes(*event.id.as_bytes()));
                    failed.1.push(error.clone());
                }
                Outcome::Abandoned { .. } => {}
            }
        }
        Spi::connect_mut(|client| {
            // The batch UPDATEs join the ids to the table through the primary key. Their plan is
            // kept; made right after a burst on a table never analysed, the planner believes
            // the table is nearly empty and picks a sequential scan per batch, which costs more
            // with every row (the worker fell behind at 5,000 events/s). For these statements
            // only, a sequential scan is never the plan.
            client.update("SET LOCAL enable_seqscan = off", None, &[])?;
            let mut counts = (0, 0);
            if !published.0.is_empty() {
                let args: [DatumWithOid; 3] =
                    [published.0.into(), published.1.into(), published.2.into()];
                counts.0 = client.update(&self.mark_published, None, &args)?.len();
            }
            if !failed.0.is_empty() {
                let args: [DatumWithOid; 5] = [
                    failed.0.into(),
                    failed.1.into(),
                    policy.max_attempts.into(),
                    policy.backoff_ms.into(),
                    policy.backoff_max_ms.into(),
                ];
                counts.1 = client.update(&self.record_failures, None, &args)?.len();
            }
            Ok(counts)
        })
    }

    /// Deletes up to `limit` of the oldest rows published more than `retention` ago.
    pub fn expire_published(&self, retention: std::time::Duration, limit: i32) -> SpiResult<usize> {
        let cutoff = std::time::SystemTime::now() - retention;
        let since_epoch = cutoff
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        // The smallest UUIDv7 of the cutoff millisecond.
        let bound =
            uuid::Builder::from_unix_timestamp_millis(since_epoch.as_millis() as u64, &[0; 10])
                .into_uuid();
        let bound = pgrx::Uuid::from_bytes(*bound.as_bytes());
        let retention_s = i32::try_from(retention.as_secs()).unwrap_or(i32::MAX);
        Spi::connect_mut(|client| {
            Ok(client
                .update(
                    &self.expire_published,
                    None,
                    &[bound.into(), retention_s.into(), limit.into()],
                )?
                .len())
        })
    }
}

const UUID_ARRAY: pg_sys::Oid = pg_sys::UUIDARRAYOID;
const INT4_ARRAY: pg_sys::Oid = pg_sys::INT4ARRAYOID;
const INT8_ARRAY: pg_sys::Oid = pg_sys::INT8ARRAYOID;
const TEXT_ARRAY: pg_sys::Oid = pg_sys::TEXTARRAYOID;

fn prepare(
    client: &SpiClient<'_>,
    sql: &str,
    types: &[pg_sys::Oid],
    mutating: bool,
) -> SpiResult<OwnedPreparedStatement> {
    let types: Vec<PgOid> = types.iter().map(|t| PgOid::from(*t)).collect();
    let statement = if mutating {
        client.prepare_mut(sql, &types)?
    } else {
        client.prepare(sql, &types)?
    };
    Ok(statement.keep())
}

fn event_from_row(row: &SpiHeapTupleData<'_>) -> SpiResult<Event> {
    let text = |n: usize| -> SpiResult<String> { Ok(row.get::<String>(n)?.unwrap_or_default()) };
    let headers = row
        .get::<String>(6)?
        .and_then(|json| {
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&json).ok()
        })
        .map(|map| {
            map.into_iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k, s.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Ok(Event {
        seq: row.get::<i64>(1)?.unwrap_or_default(),
        id: row
            .get::<pgrx::Uuid>(2)?
            .map(|u| uuid::Uuid::from_bytes(*u.as_bytes()))
            .unwrap_or_default(),
        event_type: text(3)?,
        aggregate_id: text(4)?,
        payload: text(5)?,
        headers,
        topic: text(7)?,
        created_at: text(8)?,
        attempts: row.get::<i32>(9)?.unwrap_or_default(),
    })
}

/// Which lock keys the worker holds so that only one process publishes a database's outbox.
pub const WORKER_LOCK_KEY: (i32, i32) = (0x6f75_7462, 0x6f78); // "outb", "ox"

/// True if this session now holds the database's publishing lock (session-level, released at exit).
pub fn try_lock_publishing() -> SpiResult<bool> {
    Spi::get_one_with_args::<bool>(
        "SELECT pg_catalog.pg_try_advisory_lock($1, $2)",
        &[WORKER_LOCK_KEY.0.into(), WORKER_LOCK_KEY.1.into()],
    )
    .map(|locked| locked.unwrap_or(false))
}

/// The installed version of the extension in this database, if installed.
pub fn installed_version() -> SpiResult<Option<String>> {
    Spi::get_one::<String>(
        "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'outbox_pg'",
    )
    .or_else(|e| match e {
        pgrx::spi::Error::InvalidPosition => Ok(None),
        e => Err(e),
    })
}
