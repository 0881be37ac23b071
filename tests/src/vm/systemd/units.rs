//! Reading the installed units: `systemctl`, their journals, their main
//! processes' pids and privileges.

use std::time::Duration;

use crate::failed;
use crate::vm::outcome::Failure;
use crate::vm::process::run;
use crate::vm::support::wait_for;

/// `sh -c CMD`: its output, or why it failed.
pub(super) fn sh(cmd: &str) -> Result<String, Failure> {
    run(None, &["sh", "-c", cmd])
}

/// `systemctl ARGS`: its output, or why it failed.
pub(super) fn systemctl(args: &[&str]) -> Result<String, Failure> {
    let mut argv = vec!["systemctl"];
    argv.extend_from_slice(args);
    run(None, &argv)
}

/// `systemctl show -p PROP --value UNIT`.
pub(super) fn unit_prop(unit: &str, prop: &str) -> String {
    systemctl(&["show", "-p", prop, "--value", unit])
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// A unit's main pid (0 when it has none).
pub(super) fn main_pid(unit: &str) -> u32 {
    unit_prop(unit, "MainPID").parse().unwrap_or(0)
}

/// `journalctl ARGS --no-pager` after a flush: whatever it printed, even
/// on failure.
pub(super) fn journalctl(args: &[&str]) -> String {
    let _ = run(None, &["journalctl", "--flush"]);
    let mut argv = vec!["journalctl"];
    argv.extend_from_slice(args);
    argv.push("--no-pager");
    run(None, &argv).unwrap_or_else(|e| e.to_string())
}

/// The warning and error lines of a journal.
pub(super) fn warnings(journal: &str) -> String {
    journal
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A unit's journal, messages only.
pub(super) fn journal(unit: &str) -> String {
    journalctl(&["-u", unit, "-o", "cat"])
}

/// Node A's side of a failed connection, which the runner's log dump
/// cannot show (its core and provider log to the journal): their warnings
/// and lifecycle lines with precise times, at most the last 120.
pub(super) fn node_a_trouble() -> String {
    let all = journalctl(&[
        "-u",
        "tlshub-core.service",
        "-u",
        "tlshub-provider@openssl.service",
        "-o",
        "short-precise",
    ]);
    let lines: Vec<&str> = all
        .lines()
        .filter(|l| {
            [
                " WARN ", " ERROR ", "adopted", "stopping", "running", "Started", "Stopped",
            ]
            .iter()
            .any(|k| l.contains(k))
        })
        .collect();
    let from = lines.len().saturating_sub(120);
    format!(
        "node A journal (warnings and lifecycle):\n{}",
        lines[from..].join("\n")
    )
}

/// Waits until `unit` is active with a main pid other than `old`.
pub(super) fn wait_restarted(unit: &str, old: u32, timeout: Duration) -> Result<u32, Failure> {
    wait_for(
        timeout,
        Duration::from_millis(100),
        || main_pid(unit),
        |&pid| pid != 0 && pid != old && unit_prop(unit, "ActiveState") == "active",
    )
    .map_err(|pid| {
        failed!(
            "{unit} not active again after {timeout:?} (pid {pid}):\n{}",
            journal(unit)
        )
    })
}

/// The effective capabilities, no_new_privs, and whether a seccomp filter
/// (`SystemCallFilter=`) is in force for a process.
pub(super) fn caps_of(pid: u32) -> Result<(u64, bool, bool), Failure> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("")
            .to_string()
    };
    let eff = u64::from_str_radix(&field("CapEff:"), 16).map_err(|e| e.to_string())?;
    Ok((eff, field("NoNewPrivs:") == "1", field("Seccomp:") == "2"))
}
