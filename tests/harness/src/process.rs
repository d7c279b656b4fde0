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
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
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
