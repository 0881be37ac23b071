//! How many protected connections one node holds open at once
//! (`cargo xtask vm --mode capacity --connections N`, not part of `cargo
//! xtask test`: under TCG the connections are keyed at tens per second).

use std::time::Duration;

use crate::failed;
use crate::hold::HoldReport;
use crate::vm::outcome::Outcome;

use super::node::{NodeSpec, PROTECTED_PORT, ProviderKind};
use super::process;
use super::support::{cmdline, last_report, nodes};
use super::topology::POD_B;

/// Connections when the kernel command line names none.
const DEFAULT_CONNECTIONS: u64 = 100_000;
/// The client stops opening after this long and reports what it reached
/// (the xtask gives the whole boot 3 hours).
const OPEN_DEADLINE: Duration = Duration::from_secs(150 * 60);
/// How long the client holds them all open while the figures are read.
const HOLD: Duration = Duration::from_secs(30);

/// Memory figures of the VM and of node a's core.
#[derive(Debug, Clone, Copy)]
struct Memory {
    /// `MemAvailable`, KiB.
    available_kib: u64,
    /// `Slab`, KiB.
    slab_kib: u64,
    /// Node a's core, `VmRSS`, KiB.
    core_rss_kib: u64,
}

/// A `/proc`-style "Key:   value kB" field.
fn kib(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn memory(core_pid: u32) -> Memory {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let status = std::fs::read_to_string(format!("/proc/{core_pid}/status")).unwrap_or_default();
    Memory {
        available_kib: kib(&meminfo, "MemAvailable"),
        slab_kib: kib(&meminfo, "Slab"),
        core_rss_kib: kib(&status, "VmRSS"),
    }
}

/// Runs `tlshub-hold` with room for a million fds.
fn hold_argv(args: &str) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!("ulimit -n 1048576 && exec tlshub-hold {args}"),
    ]
}

/// pod-b's second address: the client binds local ports 1024 to 65535
/// itself, 64,512 per destination, so more connections than that need a
/// second destination. Both are IPv4 because the TLSHub provider keys IPv4
/// only (it refuses IPv6 connections, which fail closed).
const POD_B_SECOND: &str = "10.0.2.3";

/// The provider timeout on both nodes. The run measures how many
/// connections stay open, not how fast each is keyed.
const KEY_TIMEOUT_MS: u64 = 30_000;
/// The stand-in's node secret lifetime: longer than the run. A connection
/// whose two ends fetch their keys on either side of a node secret
/// rotation gets mismatched keys and fails closed (ARCHITECTURE.md, "Node
/// secret rotation"); a run across rotations every 10 minutes lost one
/// connection in 100,001 that way, which is not what this run measures.
const NODE_SECRET_LIFETIME_MS: u64 = 4 * 60 * 60 * 1000;

/// Opens `tlshub.connections` (default 100,000) protected connections from
/// pod-a to pod-b, alternating between pod-b's two addresses, each from a
/// local port the client binds itself, keyed by the TLSHub provider (the
/// cheapest keying), one after another, and holds them all; then checks that not one attempt failed, that every one still
/// carries exact bytes both ways, that node a's `conns` map holds (almost)
/// nothing for them, and that a new connection is keyed. Reports the rate,
/// where the CPU time went and what memory the connections cost.
pub fn capacity() -> Outcome {
    let count = cmdline("tlshub.connections")
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_CONNECTIONS);
    let spec = |name| NodeSpec {
        key_timeout_ms: KEY_TIMEOUT_MS,
        standin_lifetime_ms: NODE_SECRET_LIFETIME_MS,
        // It reports the core's CPU and memory: measured as installed
        // (and 100,000 connections' key log and debug lines would fill
        // the VM's memory-backed /tmp).
        diagnostics: false,
        ..NodeSpec::with_provider(name, ProviderKind::TlsHub)
    };
    let (a, b) = nodes(spec("a"), spec("b"))?;
    process::run(
        Some("pod-b"),
        &[
            "ip",
            "addr",
            "add",
            &format!("{POD_B_SECOND}/24"),
            "dev",
            "pb",
        ],
    )?;
    let before = memory(a.core_pid());
    let listen = format!("server --listen [::]:{PROTECTED_PORT}");
    let server_argv = hold_argv(&listen);
    let server_argv: Vec<&str> = server_argv.iter().map(String::as_str).collect();
    let _server =
        process::spawn_ready("pod-b", &server_argv, "listening", Duration::from_secs(10))?;
    let client_args = format!(
        "client --connect {POD_B}:{PROTECTED_PORT} --connect {POD_B_SECOND}:{PROTECTED_PORT} --count {count} --own-ports --deadline-secs {} --hold-secs {}",
        OPEN_DEADLINE.as_secs(),
        HOLD.as_secs()
    );
    let client_argv = hold_argv(&client_args);
    let client_argv: Vec<&str> = client_argv.iter().map(String::as_str).collect();
    let log = std::path::PathBuf::from("/tmp/logs/hold-client.log");
    let mut client = process::Proc::spawn("hold-client", Some("pod-a"), &client_argv, &log)?;
    let give_up = std::time::Instant::now() + OPEN_DEADLINE + Duration::from_secs(600);
    // Progress on the console at each step the client logs, with where the
    // CPU time of that step went, until all are open.
    let mut last = (0u64, CpuSample::now());
    while let Err(e) = client.wait_for_log("holding", Duration::from_secs(5)) {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().any(|l| l.starts_with('{')) || std::time::Instant::now() > give_up {
            return Err(e.context("tlshub-hold client"));
        }
        let Some(line) = text.lines().rev().find(|l| l.starts_with("opened")) else {
            continue;
        };
        let opened: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if opened > last.0 {
            let now = CpuSample::now();
            println!(
                "capacity: {line}; CPU ms per connection since {}: {}",
                last.0,
                now.since(&last.1, opened - last.0)
            );
            last = (opened, now);
        }
    }
    // All open (or as many as it reached): read the figures while they are.
    std::thread::sleep(Duration::from_secs(3));
    let holding = memory(a.core_pid());
    let entries = a.stat(|s| s.bpf_maps.0 as u64);
    let one_more = hold_argv(&format!(
        "client --connect {POD_B}:{PROTECTED_PORT} --count 1"
    ));
    let one_more: Vec<&str> = one_more.iter().map(String::as_str).collect();
    let extra: HoldReport = last_report(&process::finish(
        process::spawn_app("pod-a", &one_more)?,
        Duration::from_secs(60),
    )?)?;
    client.wait(HOLD + Duration::from_secs(600))?;
    let r: HoldReport = last_report(&std::fs::read_to_string(&log).unwrap_or_default())?;
    let keyed = [a.stat(|s| s.protected), b.stat(|s| s.protected)];
    let figures = summary(&r, &before, &holding, entries, keyed);
    if !r.complete() {
        return Err(failed!("reached less than asked: {figures}; report {r:?}"));
    }
    if !extra.complete() {
        return Err(failed!(
            "with {} open, a new connection failed: {extra:?}; {figures}",
            r.opened
        ));
    }
    if keyed.iter().any(|&k| k < r.opened + 1) || entries > 100 {
        return Err(failed!(
            "keyed on a and b {keyed:?} (want {} each), conns entries {entries}: {figures}",
            r.opened + 1
        ));
    }
    drop((a, b));
    Ok(figures)
}

/// CPU time so far: the machine's (`/proc/stat`) and each command's, with
/// kernel threads' names cut at the `/` (`kworker/0:1` is `kworker`).
pub(super) struct CpuSample {
    /// user, system, softirq, idle (ticks).
    machine: [u64; 4],
    /// user + system ticks by command.
    by_command: std::collections::BTreeMap<String, u64>,
}

impl CpuSample {
    pub(super) fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let cpu: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        let at = |i: usize| cpu.get(i).copied().unwrap_or(0);
        let mut by_command = std::collections::BTreeMap::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            if let Some((name, ticks)) = command_ticks(&text) {
                *by_command.entry(name).or_default() += ticks;
            }
        }
        Self {
            machine: [at(0) + at(1), at(2), at(6), at(3)],
            by_command,
        }
    }

    /// Milliseconds per connection for `n` connections since `before`: the
    /// machine's, then the commands that used the most.
    pub(super) fn since(&self, before: &Self, n: u64) -> String {
        let per = |ticks: u64| ms_per(ticks, n);
        let d = |i: usize| per(self.machine[i].saturating_sub(before.machine[i]));
        let mut commands: Vec<(u64, &String)> = self
            .by_command
            .iter()
            .map(|(name, t)| {
                let was = before.by_command.get(name).copied().unwrap_or(0);
                (t.saturating_sub(was), name)
            })
            .filter(|(t, _)| *t > 0)
            .collect();
        commands.sort_unstable_by(|a, b| b.cmp(a));
        let top: Vec<String> = commands
            .iter()
            .take(8)
            .map(|(t, name)| format!("{name} {:.1}", per(*t)))
            .collect();
        format!(
            "user {:.1}, system {:.1}, softirq {:.1}, idle {:.1}; {}",
            d(0),
            d(1),
            d(2),
            d(3),
            top.join(", ")
        )
    }

    /// Milliseconds of CPU per unit (connection, second) for `n` of them
    /// since `before`, used by processes named `command` (all of them:
    /// both nodes' cores are one `tlshub-core`).
    pub(super) fn command_ms(&self, before: &Self, n: u64, command: &str) -> f64 {
        let now = self.by_command.get(command).copied().unwrap_or(0);
        let was = before.by_command.get(command).copied().unwrap_or(0);
        ms_per(now.saturating_sub(was), n)
    }
}

/// Milliseconds of CPU per unit for `ticks` of it over `n` units. USER_HZ
/// is 100 on x86-64: a tick is 10 ms.
pub(super) fn ms_per(ticks: u64, n: u64) -> f64 {
    ticks as f64 * 10.0 / n.max(1) as f64
}

/// A `/proc/PID/stat` line's command (cut at `/`) and user + system ticks.
pub(super) fn command_ticks(stat: &str) -> Option<(String, u64)> {
    let (head, tail) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1;
    let name = name.split('/').next().unwrap_or(name).to_string();
    // After the command: state is field 0, utime 11, stime 12.
    let fields: Vec<&str> = tail.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

fn summary(
    r: &HoldReport,
    before: &Memory,
    holding: &Memory,
    entries: u64,
    keyed: [u64; 2],
) -> String {
    let n = r.opened.max(1);
    let used = before.available_kib.saturating_sub(holding.available_kib);
    let slab = holding.slab_kib.saturating_sub(before.slab_kib);
    format!(
        "{} of {} connections open at once ({} attempts failed), opened in {:.0} s ({:.1}/s), {} still exact both ways after all were open; keyed by node a {} and node b {}; node a's conns map held {entries} entries meanwhile; VM memory in use +{} MiB ({:.1} KiB per connection, both ends of each in this VM; slab +{:.1} KiB), node a's core RSS {} -> {} MiB",
        r.opened,
        r.wanted,
        r.failed,
        r.open_seconds,
        r.opened as f64 / r.open_seconds.max(0.001),
        r.still_working,
        keyed[0],
        keyed[1],
        used / 1024,
        used as f64 / n as f64,
        slab as f64 / n as f64,
        before.core_rss_kib / 1024,
        holding.core_rss_kib / 1024,
    )
}

#[cfg(test)]
mod tests {
    use super::{command_ticks, kib};

    #[test]
    fn a_process_stat_line_gives_its_command_and_cpu_ticks() {
        let line = "81 (kworker/0:1-events) I 2 0 0 0 -1 69238880 0 0 0 0 7 9 0 0 20 0 1 0 55 0 0";
        assert_eq!(command_ticks(line), Some(("kworker".to_string(), 16)));
        let odd = "9 (a) b) S 1 9 9 0 -1 4194560 1 0 0 0 3 4 0 0 20 0 1 0 5 0 0";
        assert_eq!(command_ticks(odd), Some(("a) b".to_string(), 7)));
    }

    #[test]
    fn proc_fields_in_kib_are_read_by_exact_key() {
        let text = "MemTotal:       3000 kB\nMemAvailable:   1234 kB\nSlab: 77 kB\n";
        assert_eq!(kib(text, "MemAvailable"), 1234);
        assert_eq!(kib(text, "Slab"), 77);
        assert_eq!(kib(text, "Mem"), 0);
    }
}
