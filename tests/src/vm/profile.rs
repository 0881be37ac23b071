//! `cargo xtask vm --mode profile`: where the core's CPU goes while it keys
//! connections. Not a test: it prints `perf report` for node a's core
//! (the connecting side) over 300 sequential connections keyed by the
//! TLSHub provider with the stand-in, and the core's CPU per connection.

use std::path::Path;
use std::time::Duration;

use super::capacity::{command_ticks, ms_per};
use super::node::{NodeSpec, PROTECTED_PORT, ProviderKind};
use super::process::{Proc, command};
use super::support::*;

/// The connections profiled.
const CONNECTIONS: u32 = 300;

/// User and system ticks of `pid` so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    command_ticks(&stat).map_or(0, |(_, ticks)| ticks)
}

/// Profiles node a's core (see the module's comment).
pub fn profile_core() -> Result<String, String> {
    // As installed: no key log.
    let spec = |name| NodeSpec {
        diagnostics: false,
        ..NodeSpec::with_provider(name, ProviderKind::TlsHub)
    };
    let (a, _b) = nodes(spec("a"), spec("b"))?;
    settle_keying();
    let pid = a.core_pid();
    let data = "/tmp/perf-core-a.data";
    let mut perf = Proc::spawn(
        "perf",
        None,
        &[
            "perf",
            "record",
            "-e",
            "cpu-clock",
            "-F",
            "999",
            "--call-graph",
            "dwarf,16384",
            "-p",
            &pid.to_string(),
            "-o",
            data,
        ],
        Path::new("/tmp/logs/perf-record.log"),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let before = cpu_ticks(pid);
    let app = super::support::App {
        connections: CONNECTIONS,
        ..App::exchange(100, PROTECTED_PORT)
    };
    let started = std::time::Instant::now();
    let (s, c) = run_pair(&app, &[], Duration::from_secs(600))?;
    let took = started.elapsed();
    both_ok(&app, &s, &c)?;
    let ticks = cpu_ticks(pid) - before;
    perf.signal(2);
    perf.wait(Duration::from_secs(60))?;
    let report = |args: &[&str]| -> String {
        let mut argv = vec!["perf", "report", "-i", data, "--stdio", "--no-inline"];
        argv.extend_from_slice(args);
        command(None, &argv)
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_else(|e| format!("perf report: {e}"))
    };
    Ok(format!(
        "{CONNECTIONS} connections in {:.1} s; core a used {:.0} ms of CPU, {:.2} ms per connection\n== by dso\n{}\n== by symbol, with what it calls\n{}\n== the core's own functions, with their callees\n{}",
        took.as_secs_f64(),
        ms_per(ticks, 1),
        ms_per(ticks, u64::from(CONNECTIONS)),
        report(&["--no-children", "-g", "none", "--sort", "dso"]),
        report(&[
            "--children",
            "-g",
            "none",
            "--sort",
            "sym",
            "--percent-limit",
            "3"
        ]),
        report(&[
            "--children",
            "-g",
            "caller,2,callee,function,percent",
            "--sort",
            "sym",
            "--symbol-filter",
            "tlshub_",
            "--percent-limit",
            "4"
        ])
    ))
}
