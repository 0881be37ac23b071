//! `cargo xtask vm --mode profile`: where the core's CPU goes while it keys
//! connections, and while it is idle, and where a handshake provider's
//! goes. Not a test: it prints `perf report` for node a's core (the
//! connecting side) over 300 sequential connections keyed by the TLSHub
//! provider with the stand-in, with the core's CPU per connection, then
//! over 20 s without connections, with the core's and the provider's CPU
//! per second, and its system calls over 100 more connections and over 10
//! connections one a second (against as long idle); then node
//! a's OpenSSL provider (in-band handshakes) over 60 connections and its
//! TLSHub provider over 300, each with its CPU per connection.

use std::path::Path;
use std::time::Duration;

use super::capacity::{command_ticks, ms_per};
use super::node::{Node, NodeSpec, PROTECTED_PORT, ProviderKind};
use super::process::{Proc, command};
use super::support::*;
use crate::vm::outcome::{Failure, Outcome};

/// The connections profiled.
const CONNECTIONS: u32 = 300;

/// User and system ticks of `pid` so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    command_ticks(&stat).map_or(0, |(_, ticks)| ticks)
}

/// `perf ARGS -p PID` (log at `log`) while `work` runs, after 2 s to
/// settle, then stopped with SIGINT; the process's CPU ticks during
/// `work` and what `work` returned.
fn under_perf<T>(
    args: &[&str],
    pid: u32,
    log: &str,
    work: impl FnOnce() -> Result<T, Failure>,
) -> Result<(u64, T), Failure> {
    let pid_arg = pid.to_string();
    let mut argv = vec!["perf"];
    argv.extend_from_slice(args);
    argv.extend(["-p", pid_arg.as_str()]);
    let mut perf = Proc::spawn("perf", None, &argv, Path::new(log))?;
    std::thread::sleep(Duration::from_secs(2));
    let before = cpu_ticks(pid);
    let out = work()?;
    let ticks = cpu_ticks(pid) - before;
    perf.signal(2);
    perf.wait(Duration::from_secs(60))?;
    Ok((ticks, out))
}

/// `perf record` on `pid` into `data` while `work` runs ([`under_perf`]).
fn recorded<T>(
    pid: u32,
    data: &str,
    work: impl FnOnce() -> Result<T, Failure>,
) -> Result<(u64, T), Failure> {
    let args = [
        "record",
        "-e",
        "cpu-clock",
        "-F",
        "999",
        "--call-graph",
        "dwarf,16384",
        "-o",
        data,
    ];
    under_perf(&args, pid, &format!("{data}.log"), work)
}

/// The connections the system-call census counts over.
const CENSUS: u32 = 100;

/// `perf trace --summary` of `pid` while [`CENSUS`] sequential exchanges
/// run: its system calls by name, with counts (divide by [`CENSUS`] for
/// calls per connection). Why count them: under TCG a system call's
/// return to user space is where the sampling timer's ticks land, so the
/// profile spreads their cost over whatever made them; the census says
/// which calls a connection costs.
fn syscall_census(pid: u32) -> Result<String, Failure> {
    trace_summary(pid, "dense", || exchanges(CENSUS).map(drop))
}

/// `perf trace --summary` of `pid` while `work` runs ([`under_perf`];
/// its files are `/tmp/trace-core-a-NAME.*`).
fn trace_summary(
    pid: u32,
    name: &str,
    work: impl FnOnce() -> Result<(), Failure>,
) -> Result<String, Failure> {
    let out = format!("/tmp/trace-core-a-{name}.txt");
    under_perf(
        &["trace", "--summary", "-o", &out],
        pid,
        &format!("/tmp/trace-core-a-{name}.log"),
        work,
    )?;
    Ok(std::fs::read_to_string(&out).unwrap_or_else(|e| format!("{out}: {e}")))
}

/// `perf report --stdio` of `data` with `args`.
fn report(data: &str, args: &[&str]) -> String {
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
}

/// Symbols by inclusive share, down to `limit` percent.
fn by_symbol(data: &str, limit: &str) -> String {
    report(
        data,
        &[
            "--children",
            "-g",
            "none",
            "--sort",
            "sym",
            "--percent-limit",
            limit,
        ],
    )
}

/// How long the idle core is profiled.
const IDLE: Duration = Duration::from_secs(20);

/// The connections a handshake provider is profiled over.
const HANDSHAKES: u32 = 60;

/// Both nodes with `provider`, as installed (no key log), keying settled.
fn profiled_nodes(provider: ProviderKind) -> Result<(Node, Node), Failure> {
    let spec = |name| NodeSpec {
        diagnostics: false,
        ..NodeSpec::with_provider(name, provider)
    };
    let nodes = nodes(spec("a"), spec("b"))?;
    settle_keying();
    Ok(nodes)
}

/// Connections of the sparse census, one a second.
const SPARSE: u32 = 10;

/// [`syscall_census`] of `pid` at one connection a second, [`SPARSE`]
/// times, and over as long with no connection: what a connection costs a
/// core that is otherwise idle (its wakeups and their system calls, the
/// idle run's subtracted), where the dense census measures a core that
/// always has work. Timers matter here: anything that ticks for a while
/// after each connection shows up once per connection.
fn sparse_census(pid: u32) -> Result<String, Failure> {
    let span = Duration::from_secs(u64::from(SPARSE));
    let sparse = trace_summary(pid, "sparse", || {
        for _ in 0..SPARSE {
            let took = exchanges(1)?;
            std::thread::sleep(Duration::from_secs(1).saturating_sub(took));
        }
        Ok(())
    })?;
    let idle = trace_summary(pid, "sparse-idle", || {
        std::thread::sleep(span);
        Ok(())
    })?;
    Ok(format!(
        "{SPARSE} connections, one a second:\n{sparse}\nthe same {} s with no connection:\n{idle}",
        span.as_secs()
    ))
}

/// `connections` sequential exchanges of 100 bytes between the pods, timed.
fn exchanges(connections: u32) -> Result<Duration, Failure> {
    let app = App {
        connections,
        ..App::exchange(100, PROTECTED_PORT)
    };
    let started = std::time::Instant::now();
    let (s, c) = run_pair(&app, &[], Duration::from_secs(600))?;
    both_ok(&app, &s, &c)?;
    Ok(started.elapsed())
}

/// Profiles node a's `kind` provider (`label` in the summary) while it
/// keys `connections` sequential connections.
fn profile_provider(kind: ProviderKind, label: &str, connections: u32) -> Result<String, Failure> {
    let (a, _b) = profiled_nodes(kind)?;
    let pid = a.provider_pid(kind);
    let data = format!("/tmp/perf-{label}-a.data");
    let (ticks, took) = recorded(pid, &data, || exchanges(connections))?;
    Ok(format!(
        "{connections} connections in {:.1} s; node a's {label} provider used {:.0} ms of CPU, {:.2} ms per connection\n== by dso\n{}\n== by symbol, with what it calls\n{}",
        took.as_secs_f64(),
        ms_per(ticks, 1),
        ms_per(ticks, u64::from(connections)),
        report(&data, &["--no-children", "-g", "none", "--sort", "dso"]),
        by_symbol(&data, "2"),
    ))
}

/// Profiles node a's OpenSSL provider (in-band: a full handshake per
/// connection over the app's own connection) while it keys
/// [`HANDSHAKES`] sequential connections.
pub fn profile_openssl_provider() -> Outcome {
    profile_provider(ProviderKind::OpenSsl, "OpenSSL", HANDSHAKES)
}

/// Profiles node a's TLSHub provider (keys from the module, here the
/// stand-in, over netlink) while it keys [`CONNECTIONS`] sequential
/// connections.
pub fn profile_tlshub_provider() -> Outcome {
    profile_provider(ProviderKind::TlsHub, "TLSHub", CONNECTIONS)
}

/// Profiles node a's core (see the module's comment): keying, then idle.
pub fn profile_core() -> Outcome {
    let (a, _b) = profiled_nodes(ProviderKind::TlsHub)?;
    let pid = a.core_pid();
    let busy = "/tmp/perf-core-a.data";
    let (ticks, took) = recorded(pid, busy, || exchanges(CONNECTIONS))?;
    // Idle: what the core does when no connection comes (its timers, the
    // providers' health checks), per second.
    let idle = "/tmp/perf-core-a-idle.data";
    let provider = a.provider_pid(ProviderKind::TlsHub);
    let (idle_ticks, provider_ticks) = recorded(pid, idle, || {
        let before = cpu_ticks(provider);
        std::thread::sleep(IDLE);
        Ok(cpu_ticks(provider) - before)
    })?;
    let census = syscall_census(pid)?;
    let sparse = sparse_census(pid)?;
    Ok(format!(
        "{CONNECTIONS} connections in {:.1} s; core a used {:.0} ms of CPU, {:.2} ms per connection; idle for {} s: core a {:.1} ms of CPU per second (its provider {:.1})\n== system calls over {CENSUS} connections\n{census}\n== system calls at one connection a second\n{sparse}\n== by dso\n{}\n== by symbol, with what it calls\n{}\n== the core's own functions, with their callees\n{}\n== idle, by symbol\n{}",
        took.as_secs_f64(),
        ms_per(ticks, 1),
        ms_per(ticks, u64::from(CONNECTIONS)),
        IDLE.as_secs(),
        ms_per(idle_ticks, IDLE.as_secs()),
        ms_per(provider_ticks, IDLE.as_secs()),
        report(busy, &["--no-children", "-g", "none", "--sort", "dso"]),
        by_symbol(busy, "3"),
        report(
            busy,
            &[
                "--children",
                "-g",
                "caller,2,callee,function,percent",
                "--sort",
                "sym",
                "--symbol-filter",
                "tlshub_",
                "--percent-limit",
                "4"
            ]
        ),
        by_symbol(idle, "2"),
    ))
}
