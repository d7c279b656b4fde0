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
         | minutes | open snapshot | burst drain before | burst drain after | p99 per 30 s window | last window p99 | `outbox.status` first / last window | sizes before / at the end of the rate / after the snapshot closed, every 2 min |\n\
         |---|---|---|---|---|---|---|---|\n"
    );
    let mut verdicts = String::new();
    for &minutes in &options.minutes {
        // Runs longer than 20 minutes are held only: compared with their own bursts before the
        // snapshot opened.
        let held: &[bool] = if minutes <= 20 { &[false, true] } else { &[true] };
        let runs = side_by_side(minutes, held, options.after);
        for run in &runs {
            writeln!(out, "{}", run.row()).unwrap();
        }
        let held = runs.last().unwrap();
        if let [fresh, held] = &runs[..] {
            let beside: Vec<String> = held
                .bursts_after
                .iter()
                .zip(&fresh.bursts_after)
                .map(|(h, f)| format!("{:.2}", h / f))
                .collect();
            writeln!(
                verdicts,
                "- {minutes} min: burst drain with the snapshot held {:.2}× the run without it \
                 (medians of {BURSTS}; each held burst over the one beside it in time: {}); before \
                 the snapshot opened, the same two clusters measured {:.2}×. Last-window p99 {} \
                 (without: {}).",
                median(&held.bursts_after) / median(&fresh.bursts_after),
                beside.join(", "),
                median(&held.bursts_before) / median(&fresh.bursts_before),
                ms(*held.p99s.last().unwrap()),
                ms(*fresh.p99s.last().unwrap())
            )
            .unwrap();
        } else {
            writeln!(
                verdicts,
                "- {minutes} min, held only (no run without a snapshot beside it): bursts after / \
                 before the snapshot {:.2}× (medians of {BURSTS}); last-window p99 {}; highest \
                 window p99 {}; p99 over each 10 minutes {}; slowest `outbox.status` in each 10 \
                 minutes {}.",
                median(&held.bursts_after) / median(&held.bursts_before),
                ms(*held.p99s.last().unwrap()),
                ms(*held.p99s.iter().max().unwrap()),
                joined(&held.p99_per_ten),
                joined(&slowest_per_ten(&held.status))
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
         bursts on this shared machine differ by up to 1.5×); then, with or without an idle \
         REPEATABLE READ transaction opened, the steady rate for the given minutes, to a fresh topic \
         every 30 s window (see scenario 2; every topic used once before) (commit → consumer p99 \
         per 30 s window, and the time of `SELECT * FROM outbox.status`, the exporter's query, each window); \
         {BURSTS} more bursts with the snapshot still open; then the snapshot closes and the rate runs {after} more \
         minutes, so that vacuum can reclaim what retention deleted meanwhile and new rows reuse the space. \
         Sizes: outbox.events with its indexes, and the receipts. The runs with and without the snapshot \
         run side by side on the same two cores, so that the machine's changing load falls on both: \
         their steady rates at the same time (each cluster's p99 includes the other's load), their \
         bursts taking turns while the other cluster idles (without, held, held, without, …). The drain \
         columns give the median of the {BURSTS} bursts and their range.\n\n",
    ));
    out
}

/// Bursts in each phase of a run, before the snapshot and after the steady rate.
const BURSTS: usize = 5;

/// Measures runs side by side (index 0 without the snapshot, then held): their phases start
/// together and their bursts take turns, so that time-varying load on the machine falls on both.
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

/// Where side-by-side runs meet: phases start when every run is there, bursts go in turn
/// (without, held, held, without, … so that neither always goes first).
struct Meeting {
    runs: usize,
    /// The run whose burst is next, turn by turn: the before phase, then the after phase.
    order: Vec<usize>,
    state: Mutex<MeetingState>,
    changed: Condvar,
}

struct MeetingState {
    arrived: usize,
    phase: usize,
    turn: usize,
    /// A run panicked: the others stop waiting for it.
    failed: bool,
}

impl Meeting {
    fn new(runs: usize) -> Meeting {
        let round = |r: usize| -> Vec<usize> {
            if r.is_multiple_of(2) {
                (0..runs).collect()
            } else {
                (0..runs).rev().collect()
            }
        };
        let phase: Vec<usize> = (0..BURSTS).flat_map(round).collect();
        Meeting {
            runs,
            order: [phase.clone(), phase].concat(),
            state: Mutex::new(MeetingState {
                arrived: 0,
                phase: 0,
                turn: 0,
                failed: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, MeetingState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Returns once every run has arrived here.
    fn all_here(&self) {
        let mut state = self.state();
        let phase = state.phase;
        state.arrived += 1;
        if state.arrived == self.runs {
            state.arrived = 0;
            state.phase += 1;
            self.changed.notify_all();
        }
        while state.phase == phase && !state.failed {
            state = self.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        assert!(!state.failed, "the run beside this one failed");
    }

    /// Run `run`'s bursts of one phase, each in its turn: events per second.
    fn bursts(&self, run: usize, db: &mut postgres::Client) -> Vec<f64> {
        (0..BURSTS)
            .map(|_| {
                let mut state = self.state();
                while self.order[state.turn] != run && !state.failed {
                    state = self.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
                }
                assert!(!state.failed, "the run beside this one failed");
                drop(state);
                let rate = one_burst(db);
                self.state().turn += 1;
                self.changed.notify_all();
                rate
            })
            .collect()
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
    p99s: Vec<Duration>,
    /// p99 over each 10 minutes (the last part may be shorter).
    p99_per_ten: Vec<Duration>,
    status: Vec<Duration>,
    before: Sizes,
    /// At the end of the steady rate (the bursts after it still run with the snapshot open).
    end: Sizes,
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
        let Stand {
            broker,
            cluster,
            topics,
        } = stand;
        let duration = Duration::from_secs(minutes * 60);
        let mut db = cluster.connect();
        let bursts_before = meeting.bursts(index, &mut db);
        let before = Sizes::of(&mut db);
        let holder = held.then(|| {
            let mut holder = cluster.connect();
            holder
                .batch_execute(
                    "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM outbox.events",
                )
                .unwrap();
            holder
        });

        let statement = format!(
            "SELECT outbox.emit('order.created', $1::text, '{PAYLOAD_LITERAL}', topic => $2)::text"
        );
        warm_up_topics(cluster, &statement, topics);
        let events = (RATE as u64 * duration.as_secs()) as usize;
        meeting.all_here();
        let run = Measurement::start(&broker.bootstrap(), topics, events);
        let (topics, clock) = (&run.topics, &run.clock);
        let windows = (duration.as_secs() / WINDOW.as_secs()) as u32;
        // emit_at_rate's schedule starts 200 ms after the call.
        let load_start = Instant::now() + Duration::from_millis(200);
        let mut status = Vec::new();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let clock = clock.clone();
                emit_at_rate(cluster, &statement, RATE, duration, 2, clock, Some(topics))
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
        let during = Sizes::of(&mut db);
        // No run's steady rate is still going while the bursts take turns.
        meeting.all_here();
        let bursts_after = meeting.bursts(index, &mut db);
        drop(holder);
        meeting.all_here();
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
            p99s,
            p99_per_ten,
            status,
            before,
            end: during,
            after,
        };
        println!("old snapshot: {}", run.row());
        run
    }

    fn row(&self) -> String {
        let p99s: Vec<String> = self.p99s.iter().map(|d| ms(*d)).collect();
        format!(
            "| {} | {} | {} | {} | {} | {} | {} / {} | {} / {} / {} |",
            self.minutes,
            if self.held { "yes" } else { "no" },
            drains(&self.bursts_before),
            drains(&self.bursts_after),
            abridged(&p99s),
            ms(*self.p99s.last().unwrap()),
            ms(self.status[0]),
            ms(*self.status.last().unwrap()),
            self.before.cell(),
            self.end.cell(),
            self.after
                .iter()
                .map(Sizes::cell)
                .collect::<Vec<_>>()
                .join(" / ")
        )
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

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// A phase's bursts as their median and range.
fn drains(values: &[f64]) -> String {
    let (low, high) = values
        .iter()
        .fold((f64::MAX, 0.0f64), |(l, h), &v| (l.min(v), h.max(v)));
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
