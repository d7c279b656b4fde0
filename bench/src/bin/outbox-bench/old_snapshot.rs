//! Scenario 5, old snapshot: publishing while an idle REPEATABLE READ transaction holds back the xmin
//! horizon (as a pg_dump, an analytics query or a forgotten BEGIN does), beside the same run
//! without it. Every published row stays alive behind such a snapshot; publishing must not pay
//! for them.

use std::fmt::Write as _;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use outbox_pg_bench::*;
use outbox_pg_harness::{count_pending, receipts_mark, wait_until, PgCluster};

use crate::{cluster, Options};

const TOPIC: &str = "bench.old-snapshot";
const RATE: u32 = 1000;
const WINDOW: Duration = Duration::from_secs(30);
const BURST: i64 = 50_000;

pub fn run(options: &Options) -> String {
    let mut out = format!(
        "## 5. Old snapshot: {RATE} single-event transactions/s (mock cluster, `synchronous_commit = off`, \
         `outbox.retention = 1min`)\n\n\
         | minutes | open snapshot | burst drain before | burst drain after | p99 per 30 s window | last window p99 | `outbox.status` first / last window | sizes before / 90 s after the rate's backlog was published / after the snapshot closed, every 2 min |\n\
         |---|---|---|---|---|---|---|---|\n"
    );
    let mut verdicts = String::new();
    for &minutes in &options.minutes {
        // Runs longer than 20 minutes are held only: compared with their own bursts before the
        // snapshot opened.
        let held: &[bool] = if minutes <= 20 {
            &[false, true]
        } else {
            &[true]
        };
        let runs = side_by_side(minutes, held, options.after);
        for run in &runs {
            writeln!(out, "{}", run.row()).unwrap();
        }
        if let [fresh, held] = &runs[..] {
            let after = pair_ratios(&held.bursts_after, &fresh.bursts_after);
            let before = pair_ratios(&held.bursts_before, &fresh.bursts_before);
            writeln!(
                verdicts,
                "- {minutes} min: drain rate with the snapshot held over the run without it, burst \
                 by burst beside each other in time: {} (median {:.2}×, {} of {BURSTS} below 1; \
                 ratio of the medians {:.2}×). Before the snapshot opened, with no snapshot in \
                 either, the same two clusters: {} (median {:.2}×). Last-window p99 {} (without: \
                 {}, measured one after the other).",
                joined_ratios(&after),
                median(&after),
                after.iter().filter(|r| **r < 1.0).count(),
                median(&held.bursts_after) / median(&fresh.bursts_after),
                joined_ratios(&before),
                median(&before),
                ms(*held.steady.p99s.last().unwrap()),
                ms(*fresh.steady.p99s.last().unwrap())
            )
            .unwrap();
        } else {
            let held = &runs[0];
            writeln!(
                verdicts,
                "- {minutes} min, held only (no run without a snapshot beside it): bursts after / \
                 before the snapshot {:.2}× (medians of {BURSTS}; runs without a snapshot drift \
                 between their before and after bursts too); last-window p99 {}; highest \
                 window p99 {}; p99 over each 10 minutes {}; slowest `outbox.status` in each 10 \
                 minutes {}.",
                median(&held.bursts_after) / median(&held.bursts_before),
                ms(*held.steady.p99s.last().unwrap()),
                ms(*held.steady.p99s.iter().max().unwrap()),
                joined(&held.steady.p99_per_ten),
                joined(&slowest_per_ten(&held.steady.status))
            )
            .unwrap();
        }
    }
    out.push('\n');
    out.push_str(&verdicts);
    let after = options.after;
    out.push_str(&format!(
        "\nEach run: a fresh cluster with its own mock broker; {BURSTS} bursts of 50,000 events (one \
         transaction each) drained, each timed from its commit until the receipts cover it (single \
         bursts on this shared machine differ widely: see each range), the drain columns giving their median \
         and range; then, with or without an idle REPEATABLE READ transaction opened, the steady \
         rate for the given minutes, to a fresh topic every 30 s window (see scenario 2; every topic \
         used once before) (commit → consumer p99 per 30 s window, and the time of `SELECT * FROM \
         outbox.status`, the exporter's query, each window); once its backlog is published, {} s \
         for retention to delete what the rate left (vacuum cannot reclaim it behind the snapshot); \
         {BURSTS} more bursts with the snapshot still open; then the snapshot closes and the rate \
         runs {after} more minutes, so that vacuum can reclaim what retention deleted meanwhile and \
         new rows reuse the space. Sizes: outbox.events with its indexes, and the receipts.",
        SETTLE.as_secs()
    ));
    if options.minutes.iter().any(|&m| m <= 20) {
        out.push_str(&format!(
            " The run with the snapshot and the one without it are measured side by side, one \
             turn at a time while the other cluster has nothing left to publish (its retention, \
             autovacuum and idle worker still run): their bursts before the snapshot alternate \
             (without, held, held, without, …), their steady rates go one after the other (without \
             first; their p99s are measured minutes apart), and their bursts after alternate again \
             (held, without, without, held, …), each run going first {} times in each phase, so \
             that the machine's changing load falls on both runs' bursts. The run without the \
             snapshot meets its bursts after the held run's whole rate as well; with retention \
             caught up in both, its table is as settled as it was {} s after its own rate. The \
             rates after the snapshot closed, which only measure sizes, run together.",
            BURSTS / 2,
            SETTLE.as_secs()
        ));
    }
    out.push_str("\n\n");
    out
}

/// From the end of a steady rate to its bursts: more than `outbox.retention` and autovacuum's
/// one-minute naptime.
const SETTLE: Duration = Duration::from_secs(90);

/// Bursts in each phase of a run: even, so that in a pair each run goes first equally often.
const BURSTS: usize = 6;

/// Measures runs side by side (index 0 without the snapshot, then held), one turn at a time
/// (see `Meeting`), so that time-varying load on the machine falls on both runs' bursts.
fn side_by_side(minutes: u64, held: &[bool], after_minutes: u64) -> Vec<Run> {
    // Started one after the other: each picks free ports.
    let stands: Vec<Stand> = held.iter().map(|_| Stand::new(minutes)).collect();
    let meeting = Meeting::new(held.len());
    std::thread::scope(|scope| {
        let runs: Vec<_> = stands
            .iter()
            .zip(held)
            .enumerate()
            .map(|(index, (stand, &held))| {
                let meeting = &meeting;
                scope.spawn(move || {
                    let _release = Release(meeting);
                    Run::measure(stand, index, held, minutes, after_minutes, meeting)
                })
            })
            .collect();
        runs.into_iter().map(|run| run.join().unwrap()).collect()
    })
}

/// A run's cluster, its broker and its topics.
struct Stand {
    broker: Broker,
    cluster: PgCluster,
    topics: Topics,
}

impl Stand {
    fn new(minutes: u64) -> Stand {
        let duration = Duration::from_secs(minutes * 60);
        // The steady rate moves to a fresh topic every window (see `Topics`); the bursts and the
        // rate after the snapshot closed (not timed to a consumer) use one.
        let topics = Topics::rotating(TOPIC, duration + Duration::from_secs(10), WINDOW, 6);
        let mut specs = topics.specs();
        specs.push((TOPIC.to_string(), 6));
        let broker = Broker::mock(&specs);
        let cluster = cluster(
            &broker.bootstrap(),
            &[("synchronous_commit", "off"), ("outbox.retention", "1min")],
        );
        Stand {
            broker,
            cluster,
            topics,
        }
    }
}

/// Where side-by-side runs meet. Everything measured goes one turn at a time, while the other
/// runs wait with nothing left to publish: the bursts before the snapshot (0, 1, 1, 0, …), the
/// steady rates one after the other (the one without the snapshot first, so that the held
/// one's bursts follow its rate and `SETTLE`, as in a run of its own), the bursts after (1, 0,
/// 0, 1, …). Then the rates after the snapshot closed, which only measure sizes, run together.
struct Meeting {
    runs: usize,
    /// Whose turn it is, turn by turn.
    order: Vec<usize>,
    state: Mutex<MeetingState>,
    changed: Condvar,
}

struct MeetingState {
    turn: usize,
    arrived: usize,
    /// A run panicked: the others stop waiting for it.
    failed: bool,
}

impl Meeting {
    fn new(runs: usize) -> Meeting {
        let forward: Vec<usize> = (0..runs).collect();
        let backward: Vec<usize> = (0..runs).rev().collect();
        let bursts = |first: &Vec<usize>, second: &Vec<usize>| -> Vec<usize> {
            (0..BURSTS)
                .flat_map(|r| if r.is_multiple_of(2) { first } else { second }.clone())
                .collect()
        };
        Meeting {
            runs,
            order: [
                bursts(&forward, &backward),
                forward.clone(),
                bursts(&backward, &forward),
            ]
            .concat(),
            state: Mutex::new(MeetingState {
                turn: 0,
                arrived: 0,
                failed: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, MeetingState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for `run`'s next turn, takes it with `step`, and passes the turn on.
    fn in_turn<T>(&self, run: usize, step: impl FnOnce() -> T) -> T {
        let mut state = self.state();
        while self.order[state.turn] != run && !state.failed {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        assert!(!state.failed, "the run beside this one failed");
        drop(state);
        let value = step();
        self.state().turn += 1;
        self.changed.notify_all();
        value
    }

    /// `run`'s bursts of one phase, each in its turn: events per second.
    fn bursts(&self, run: usize, db: &mut postgres::Client) -> Vec<f64> {
        (0..BURSTS)
            .map(|_| self.in_turn(run, || one_burst(db)))
            .collect()
    }

    /// Returns once every run has taken all its turns.
    fn all_done(&self) {
        let mut state = self.state();
        state.arrived += 1;
        self.changed.notify_all();
        while state.arrived < self.runs && !state.failed {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        assert!(!state.failed, "the run beside this one failed");
    }
}

/// Tells the other runs when this one panics, so that none waits for it forever.
struct Release<'a>(&'a Meeting);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.state().failed = true;
            self.0.changed.notify_all();
        }
    }
}

struct Run {
    minutes: u64,
    held: bool,
    bursts_before: Vec<f64>,
    bursts_after: Vec<f64>,
    steady: Steady,
    before: Sizes,
    /// 90 s after the steady rate's backlog was published (the bursts after it still run with
    /// the snapshot open).
    settled: Sizes,
    /// Every 2 minutes after it closed.
    after: Vec<Sizes>,
}

impl Run {
    fn measure(
        stand: &Stand,
        index: usize,
        held: bool,
        minutes: u64,
        after_minutes: u64,
        meeting: &Meeting,
    ) -> Run {
        let cluster = &stand.cluster;
        let duration = Duration::from_secs(minutes * 60);
        let mut db = cluster.connect();
        let bursts_before = meeting.bursts(index, &mut db);
        let before = Sizes::of(&mut db);
        let statement = format!(
            "SELECT outbox.emit('order.created', $1::text, '{PAYLOAD_LITERAL}', topic => $2)::text"
        );
        let (holder, steady) = meeting.in_turn(index, || {
            let holder = held.then(|| {
                let mut holder = cluster.connect();
                holder
                    .batch_execute(
                        "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM outbox.events",
                    )
                    .unwrap();
                holder
            });
            let steady = Steady::measure(stand, &statement, duration);
            // Its backlog is drained before anyone's burst is timed, and retention has deleted
            // what the rate left (behind the snapshot, vacuum cannot reclaim it): every run's
            // bursts meet a table as settled, however long ago its rate ended.
            assert!(wait_until(Duration::from_secs(120), || count_pending(
                &mut db
            ) == 0));
            std::thread::sleep(SETTLE);
            (holder, steady)
        });
        let during = Sizes::of(&mut db);
        let bursts_after = meeting.bursts(index, &mut db);
        drop(holder);
        meeting.all_done();
        let mut after = Vec::new();
        let after_topics = Topics::single(TOPIC, 6);
        for _ in 0..after_minutes / 2 {
            emit_at_rate(
                cluster,
                &statement,
                RATE,
                Duration::from_secs(120),
                2,
                Arc::new(Clock::for_events(RATE as usize * 120)),
                Some(&after_topics),
            );
            after.push(Sizes::of(&mut db));
        }
        let run = Run {
            minutes,
            held,
            bursts_before,
            bursts_after,
            steady,
            before,
            settled: during,
            after,
        };
        println!("old snapshot: {}", run.row());
        run
    }

    fn row(&self) -> String {
        let p99s: Vec<String> = self.steady.p99s.iter().map(|d| ms(*d)).collect();
        format!(
            "| {} | {} | {} | {} | {} | {} | {} / {} | {} / {} / {} |",
            self.minutes,
            if self.held { "yes" } else { "no" },
            drains(&self.bursts_before),
            drains(&self.bursts_after),
            abridged(&p99s),
            ms(*self.steady.p99s.last().unwrap()),
            ms(self.steady.status[0]),
            ms(*self.steady.status.last().unwrap()),
            self.before.cell(),
            self.settled.cell(),
            self.after
                .iter()
                .map(Sizes::cell)
                .collect::<Vec<_>>()
                .join(" / ")
        )
    }
}

/// The steady rate with its measurements.
struct Steady {
    /// p99 of each 30 s window.
    p99s: Vec<Duration>,
    /// p99 over each 10 minutes (the last part may be shorter).
    p99_per_ten: Vec<Duration>,
    /// The time of `SELECT * FROM outbox.status` in each window.
    status: Vec<Duration>,
}

impl Steady {
    fn measure(stand: &Stand, statement: &str, duration: Duration) -> Steady {
        let Stand {
            broker,
            cluster,
            topics,
        } = stand;
        warm_up_topics(cluster, statement, topics);
        let events = (RATE as u64 * duration.as_secs()) as usize;
        let run = Measurement::start(&broker.bootstrap(), topics, events);
        let (topics, clock) = (&run.topics, &run.clock);
        let windows = (duration.as_secs() / WINDOW.as_secs()) as u32;
        // emit_at_rate's schedule starts 200 ms after the call.
        let load_start = Instant::now() + Duration::from_millis(200);
        let mut status = Vec::new();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let clock = clock.clone();
                emit_at_rate(cluster, statement, RATE, duration, 2, clock, Some(topics))
            });
            let mut monitor = cluster.connect();
            for window in 1..=windows {
                let due = load_start + WINDOW * window - Duration::from_secs(1);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let started = Instant::now();
                monitor.query("SELECT * FROM outbox.status", &[]).unwrap();
                status.push(started.elapsed());
            }
        });
        wait_until(Duration::from_secs(10), || clock.all_received());
        let end = Instant::now();
        let clock = run.stop();
        let p99s = (0..windows)
            .map(|w| {
                clock
                    .summary(load_start + WINDOW * w, load_start + WINDOW * (w + 1), end)
                    .p99
            })
            .collect();
        let p99_per_ten = (0..windows.div_ceil(WINDOWS_PER_TEN as u32))
            .map(|t| {
                let from = load_start + WINDOW * (t * WINDOWS_PER_TEN as u32);
                let to = (from + WINDOW * WINDOWS_PER_TEN as u32).min(load_start + duration);
                clock.summary(from, to, end).p99
            })
            .collect();
        Steady {
            p99s,
            p99_per_ten,
            status,
        }
    }
}

/// Windows of 30 s per 10 minutes.
const WINDOWS_PER_TEN: usize = (600 / WINDOW.as_secs()) as usize;

/// The largest value of each 10 minutes of a series of 30 s windows.
fn slowest_per_ten(values: &[Duration]) -> Vec<Duration> {
    values
        .chunks(WINDOWS_PER_TEN)
        .map(|c| *c.iter().max().unwrap())
        .collect()
}

fn joined(values: &[Duration]) -> String {
    values.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(", ")
}

/// A long series as its first four and last four values.
fn abridged(values: &[String]) -> String {
    if values.len() <= 10 {
        values.join(", ")
    } else {
        format!(
            "{}, …, {}",
            values[..4].join(", "),
            values[values.len() - 4..].join(", ")
        )
    }
}

/// Each held burst over the one beside it in time.
fn pair_ratios(held: &[f64], fresh: &[f64]) -> Vec<f64> {
    held.iter().zip(fresh).map(|(h, f)| h / f).collect()
}

fn joined_ratios(values: &[f64]) -> String {
    values
        .iter()
        .map(|r| format!("{r:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A phase's bursts as their median and range.
fn drains(values: &[f64]) -> String {
    let (low, high) = range(values);
    format!("{:.0} ev/s ({low:.0}–{high:.0})", median(values))
}

/// Commits a 50,000-event burst in one transaction and times it until its receipts are
/// recorded; events per second.
fn one_burst(db: &mut postgres::Client) -> f64 {
    assert!(wait_until(Duration::from_secs(120), || count_pending(db) == 0));
    let mark = receipts_mark(db);
    db.batch_execute(&format!(
        "SELECT outbox.emit('order.created', (g % 1000)::text, {PAYLOAD_SQL}, topic => '{TOPIC}')
         FROM generate_series(1, {BURST}) g"
    ))
    .unwrap();
    let took =
        time_until_recorded(db, mark, BURST, Duration::from_secs(600)).expect("the burst drains");
    BURST as f64 / took.as_secs_f64()
}
