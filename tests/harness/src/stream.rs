//! A realistic event stream for fault tests, and the audit that follows it.
//!
//! Several sessions emit concurrently, to aggregates of their own and to aggregates they all
//! share. Every event of an aggregate is numbered (`n` in the payload) from a counter row the
//! transaction updates, and so locks until it ends: emit order per aggregate is commit order, and
//! numbering goes on across phases and crashes (the counters are in the database). Some
//! transactions roll back. Sessions survive server crashes: they reconnect and carry on, and a
//! transaction whose COMMIT got no answer is "in doubt" until the table tells.
//!
//! The audit compares what the table says was committed with what a consumer received:
//! lost (committed, never received), phantoms (received, never committed), order violations
//! (per aggregate, a first arrival with a lower `n` than one already seen) and duplicates.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{PgCluster, Received, TopicReader};

/// Shape of a stream.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    pub topic: String,
    /// Prefix of this stream's aggregate ids.
    pub aggregate_prefix: String,
    pub sessions: usize,
    pub aggregates_per_session: usize,
    /// Aggregates every session writes to (every other transaction), besides its own.
    pub shared_aggregates: usize,
    /// Events each session emits (committed or not).
    pub events_per_session: usize,
    /// Every `rollback_every`-th transaction rolls back.
    pub rollback_every: usize,
    /// Pause between a session's transactions.
    pub pace: Duration,
}

/// What the sessions did, as far as they know.
#[derive(Debug, Default)]
pub struct StreamLog {
    /// Event ids of transactions whose COMMIT succeeded.
    pub committed: HashSet<String>,
    /// Event ids of transactions rolled back on purpose.
    pub rolled_back: HashSet<String>,
    /// Event ids of transactions whose COMMIT got no answer (the server went away).
    pub in_doubt: HashSet<String>,
    /// Transactions that failed before COMMIT because the server went away.
    pub interrupted: usize,
}

/// A stream running in the background.
pub struct Stream {
    threads: Vec<JoinHandle<()>>,
    log: Arc<Mutex<StreamLog>>,
    emitted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Stream {
    pub fn start(cluster: &PgCluster, spec: &StreamSpec) -> Stream {
        let aggregates: Vec<String> = (0..spec.sessions)
            .flat_map(|session| own_aggregates(spec, session))
            .chain(shared_aggregates(spec))
            .collect();
        let mut db = cluster.connect();
        db.batch_execute(
            "CREATE TABLE IF NOT EXISTS stream_counters (aggregate text PRIMARY KEY, n bigint NOT NULL)",
        )
        .unwrap();
        db.execute(
            "INSERT INTO stream_counters SELECT a, 0 FROM unnest($1::text[]) a ON CONFLICT DO NOTHING",
            &[&aggregates],
        )
        .unwrap();
        let log = Arc::new(Mutex::new(StreamLog::default()));
        let emitted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let url = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=5",
            cluster.port
        );
        let threads = (0..spec.sessions)
            .map(|session| {
                let (url, spec) = (url.clone(), spec.clone());
                let (log, emitted, stop) = (log.clone(), emitted.clone(), stop.clone());
                std::thread::spawn(move || run_session(session, &url, &spec, &log, &emitted, &stop))
            })
            .collect();
        Stream {
            threads,
            log,
            emitted,
            stop,
        }
    }

    /// Events emitted so far (in any outcome).
    pub fn emitted(&self) -> u64 {
        self.emitted.load(Ordering::Relaxed)
    }

    /// Waits for the sessions to finish their quota.
    pub fn finish(self) -> StreamLog {
        for thread in self.threads {
            thread.join().expect("stream session panicked");
        }
        Arc::try_unwrap(self.log)
            .expect("sessions ended")
            .into_inner()
            .unwrap()
    }

    /// Stops the sessions early.
    pub fn stop(self) -> StreamLog {
        self.stop.store(true, Ordering::Relaxed);
        self.finish()
    }
}

fn own_aggregates(spec: &StreamSpec, session: usize) -> Vec<String> {
    (0..spec.aggregates_per_session)
        .map(|a| format!("{}s{session}-a{a}", spec.aggregate_prefix))
        .collect()
}

fn shared_aggregates(spec: &StreamSpec) -> Vec<String> {
    (0..spec.shared_aggregates)
        .map(|a| format!("{}shared-{a}", spec.aggregate_prefix))
        .collect()
}

fn run_session(
    session: usize,
    url: &str,
    spec: &StreamSpec,
    log: &Mutex<StreamLog>,
    emitted: &AtomicU64,
    stop: &AtomicBool,
) {
    let own = own_aggregates(spec, session);
    let shared = shared_aggregates(spec);
    let mut client: Option<postgres::Client> = None;
    let mut sent = 0;
    let mut transaction_number = 0;
    while sent < spec.events_per_session && !stop.load(Ordering::Relaxed) {
        let db = match client.as_mut() {
            Some(db) if !db.is_closed() => db,
            _ => {
                match postgres::Client::connect(url, postgres::NoTls) {
                    Ok(db) => client = Some(db),
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
                continue;
            }
        };
        transaction_number += 1;
        let aggregate = if !shared.is_empty() && transaction_number % 2 == 0 {
            shared[(transaction_number / 2 + session) % shared.len()].as_str()
        } else {
            own[transaction_number % own.len()].as_str()
        };
        let events_in_transaction = 1 + transaction_number % 3;
        let rollback = spec.rollback_every > 0 && transaction_number % spec.rollback_every == 0;
        let mut ids = Vec::new();
        let result = (|| -> Result<(), postgres::Error> {
            let mut tx = db.transaction()?;
            for _ in 0..events_in_transaction {
                // The counter row stays locked until the transaction ends.
                let id: String = tx
                    .query_one(
                        "WITH c AS (UPDATE stream_counters SET n = n + 1 WHERE aggregate = $1 RETURNING n)
                         SELECT outbox.emit('fault.event', $1::text,
                                            jsonb_build_object('aggregate', $1::text, 'n', c.n),
                                            topic => $2)::text
                         FROM c",
                        &[&aggregate, &spec.topic],
                    )?
                    .get(0);
                ids.push(id);
            }
            if rollback {
                tx.rollback()
            } else {
                tx.commit()
            }
        })();
        sent += events_in_transaction;
        emitted.fetch_add(events_in_transaction as u64, Ordering::Relaxed);
        let mut log = log.lock().unwrap();
        match result {
            Ok(()) if rollback => log.rolled_back.extend(ids),
            Ok(()) => log.committed.extend(ids),
            // The server went away: if COMMIT was sent, the outcome is unknown.
            Err(_) if !rollback && ids.len() == events_in_transaction => log.in_doubt.extend(ids),
            Err(_) => {
                log.interrupted += 1;
                log.rolled_back.extend(ids);
            }
        }
        drop(log);
        if !spec.pace.is_zero() {
            std::thread::sleep(spec.pace);
        }
    }
}

/// A consumer reading a topic for the whole test, so nothing is missed if the broker restarts
/// empty.
pub struct LiveConsumer {
    received: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<TopicReader>>,
}

impl LiveConsumer {
    pub fn start(bootstrap: &str, topic: &str) -> LiveConsumer {
        let reader = TopicReader::new(bootstrap, &[topic]);
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (received, stop) = (received.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut batch = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    batch.clear();
                    reader.read_into(&mut batch, 500, Duration::from_millis(50));
                    received.lock().unwrap().append(&mut batch);
                }
                reader
            })
        };
        LiveConsumer {
            received,
            stop,
            thread: Some(thread),
        }
    }

    pub fn distinct_ids(&self) -> HashSet<String> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|m| m.header("outbox-id").to_string())
            .collect()
    }

    /// Waits until every id in `expected` arrived (or `timeout`), then reads on until the
    /// broker has nothing more (every partition's high watermark, then a quiet second), so that
    /// a late duplicate or phantom is seen; returns everything received.
    pub fn finish(mut self, expected: &HashSet<String>, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline && !expected.is_subset(&self.distinct_ids()) {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.stop.store(true, Ordering::Relaxed);
        let reader = self.thread.take().unwrap().join().unwrap();
        let mut received = std::mem::take(&mut *self.received.lock().unwrap());
        reader.read_all_into(&mut received, Duration::from_secs(1), timeout);
        received
    }
}

/// The figures of one fault scenario.
#[derive(Debug, Clone)]
pub struct Audit {
    pub committed: usize,
    pub rolled_back: usize,
    pub in_doubt_committed: usize,
    pub received: usize,
    pub lost: usize,
    pub phantoms: usize,
    pub order_violations: usize,
    /// The first violations, for the failure message: key, n, the highest n seen before it,
    /// ids, partition and offset.
    pub violation_examples: Vec<String>,
    pub duplicates: usize,
    /// First arrivals in the order received: key, n, id, partition, offset.
    arrivals: Vec<(String, i64, String, i32, i64)>,
}

impl Audit {
    /// `table_ids`: the event ids in outbox.events after recovery — what really committed.
    pub fn of(log: &StreamLog, table_ids: &HashSet<String>, received: &[Received]) -> Audit {
        let received_ids: HashSet<&str> = received.iter().map(|m| m.header("outbox-id")).collect();
        let lost = table_ids
            .iter()
            .filter(|id| !received_ids.contains(id.as_str()))
            .count();
        let phantoms = received_ids
            .iter()
            .filter(|id| !table_ids.contains(**id))
            .count();
        let mut seen: HashSet<&str> = HashSet::new();
        let arrivals = received
            .iter()
            .filter(|m| seen.insert(m.header("outbox-id")))
            .map(|m| {
                (
                    m.key.clone(),
                    m.payload_json()["n"].as_i64().unwrap_or(0),
                    m.header("outbox-id").to_string(),
                    m.partition,
                    m.offset,
                )
            })
            .collect();
        let mut audit = Audit {
            committed: table_ids.len(),
            rolled_back: log.rolled_back.len(),
            in_doubt_committed: log
                .in_doubt
                .iter()
                .filter(|id| table_ids.contains(*id))
                .count(),
            received: received.len(),
            lost,
            phantoms,
            order_violations: 0,
            violation_examples: Vec::new(),
            duplicates: received.len() - received_ids.len(),
            arrivals,
        };
        audit.check_order(&HashSet::new());
        audit
    }

    /// Per aggregate, first arrivals must come in emit order (n increasing), `excused` events
    /// left out of the sequence.
    fn check_order(&mut self, excused: &HashSet<String>) {
        // Per key: the highest n so far, and its event's id.
        let mut highest: HashMap<&str, (i64, &str)> = HashMap::new();
        self.order_violations = 0;
        self.violation_examples.clear();
        for (key, n, id, partition, offset) in &self.arrivals {
            if excused.contains(id) {
                continue;
            }
            let top = highest.entry(key.as_str()).or_insert((0, ""));
            if *n < top.0 {
                self.order_violations += 1;
                if self.violation_examples.len() < 10 {
                    self.violation_examples.push(format!(
                        "key {key} n {n} (id {id}, partition {partition} offset {offset}) after n {} (id {})",
                        top.0, top.1
                    ));
                }
            } else {
                *top = (*n, id.as_str());
            }
        }
    }

    /// Leaves out of the order check the events the worker itself reported as published before
    /// an earlier event of their key (`reported`): the broker stored them although that earlier
    /// one was refused. Every other event must still arrive in order. Returns how many
    /// violations that removed.
    pub fn set_aside_reported(&mut self, reported: &HashSet<String>) -> usize {
        let before = self.order_violations;
        self.check_order(reported);
        before - self.order_violations
    }

    /// Sanity: everything the sessions saw committed is in the table, nothing they rolled back is.
    pub fn check_log(log: &StreamLog, table_ids: &HashSet<String>) {
        let missing = Audit::acknowledged_but_missing(log, table_ids);
        assert_eq!(
            missing, 0,
            "{missing} committed events are not in the table"
        );
        Audit::check_rollbacks(log, table_ids);
    }

    /// Nothing the sessions rolled back is in the table.
    pub fn check_rollbacks(log: &StreamLog, table_ids: &HashSet<String>) {
        let present = log
            .rolled_back
            .iter()
            .filter(|id| table_ids.contains(*id))
            .count();
        assert_eq!(present, 0, "{present} rolled-back events are in the table");
    }

    /// Events whose COMMIT succeeded but that the table does not hold: commits a crash took back
    /// (asynchronous commit) or a failover never received.
    pub fn acknowledged_but_missing(log: &StreamLog, table_ids: &HashSet<String>) -> usize {
        log.committed
            .iter()
            .filter(|id| !table_ids.contains(*id))
            .count()
    }

    /// The scenario's row of the fault table; `bound` is the duplicates it allows.
    pub fn row(&self, scenario: &str, bound: usize, note: &str) -> String {
        format!(
            "| {scenario} | {} | {} | {} | {} | **{}** | **{}** | **{}** | {} (≤ {bound}) | {note} |",
            self.committed,
            self.rolled_back,
            self.in_doubt_committed,
            self.received,
            self.lost,
            self.phantoms,
            self.order_violations,
            self.duplicates
        )
    }
}

/// Ids of every event in outbox.events.
pub fn table_ids(db: &mut postgres::Client) -> HashSet<String> {
    crate::column(db, "SELECT id::text FROM outbox.events")
}
