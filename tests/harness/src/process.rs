//! Server processes seen from outside: signals, liveness and memory, through /proc.

use std::time::{Duration, Instant};

/// Sends `signal` (`TERM`, `KILL`, `STOP`, ...) to `pid`.
pub fn signal(pid: i32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// True while `pid` runs (a zombie waiting to be reaped has ended).
pub fn alive(pid: i32) -> bool {
    stat_fields(pid).is_some_and(|fields| fields.first().is_some_and(|state| state != "Z"))
}

/// The fields of /proc/<pid>/stat after the command name (which may itself hold spaces and
/// parentheses): field n of stat(5) is `[n - 3]`, the state (field 3) first. None once `pid`
/// is gone.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// How long `pid` takes to end, measured from now; None if it still runs after `timeout`.
pub fn time_to_exit(pid: i32, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if !alive(pid) {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// A field of /proc/<pid>/status in kB (`VmHWM`: peak resident set, `VmRSS`: now).
pub fn memory_kb(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Runs `command` to the end; panics with its output unless it succeeded. Returns its stdout.
pub fn run(command: &mut std::process::Command) -> String {
    let output = command.output().expect("the command ran");
    assert!(
        output.status.success(),
        "{command:?}\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// CPU time (user + system) used by `pid` itself, all its threads, and by those of its children
/// that ended and were reaped by it. Its own is to the nanosecond (each thread's
/// /proc/<pid>/task/<tid>/schedstat: threads that ended are left out); the reaped children's is
/// in clock ticks (cutime and cstime, fields 16–17 of /proc/<pid>/stat), which accumulate
/// unrounded, so that the sum is off by less than one tick.
pub fn cpu_time(pid: i32) -> (Duration, Duration) {
    let own = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .filter_map(|task| {
            let schedstat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
            schedstat.split_whitespace().next()?.parse().ok()
        })
        .map(Duration::from_nanos)
        .sum();
    let reaped = stat_fields(pid)
        .and_then(|fields| {
            let ticks = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
            Some(ticks(16)? + ticks(17)?)
        })
        .unwrap_or(0);
    (own, from_ticks(reaped))
}

/// CPU time of the processes whose parent is `parent`, while they run.
pub fn children_cpu_time(parent: i32) -> Duration {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| parent_of(pid) == Some(parent))
        .map(|pid| cpu_time(pid).0)
        .sum()
}

/// The parent's pid: field 4 of /proc/<pid>/stat.
fn parent_of(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(4 - 3)?.parse().ok()
}

fn from_ticks(ticks: u64) -> Duration {
    static PER_SECOND: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let per_second = *PER_SECOND.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    });
    Duration::from_secs_f64(ticks as f64 / per_second as f64)
}
