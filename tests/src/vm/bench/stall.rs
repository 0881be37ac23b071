//! `bench` part two: the collateral stall.

use super::*;
use crate::failed;
use crate::vm::outcome::{Failure, Outcome};

/// The collateral stall's established connections: each sends a 64-byte
/// piece and waits for the answer, then pauses [`STALL_INTERVAL_MS`]
/// (closed loop, so a stopped server delays each connection's next piece
/// too).
const STALL_LONG: u32 = 100;
/// Why 1 s and not the 10 ms a real server might see: one-thread TCG runs
/// out of CPU first. Measured: 100 connections every 10 ms made about
/// 2,000 round trips a second with a p50 of 27 ms and no tlshub at all;
/// every 200 ms, the kTLS connections' quiet p50 was 11 to 38 ms. A
/// saturated machine measures its queue, not the gate.
const STALL_INTERVAL_MS: u64 = 1000;
/// New connections per second while busy, from another process in pod-a.
const STALL_NEW_PER_SEC: f64 = 2.0;
/// Seconds without new connections, then seconds with them.
const STALL_QUIET_S: u64 = 15;
const STALL_BUSY_S: u64 = 15;

/// What one collateral-stall run saw: the established connections'
/// report, the new connections' report, and, with tlshub, how many times
/// the server's node stopped a process and answered a connection `EAGAIN`
/// while the new connections came.
type StallRun = (LoadReport, LoadReport, Option<(u64, u64)>);

/// One collateral-stall run against `server_addr`, counting the gate of
/// `server_node` (if tlshub runs).
fn stall_run(
    server_addr: &str,
    kind: AppStyle,
    server_node: Option<&Node>,
) -> Result<StallRun, Failure> {
    let gate = |n: &Node| n.stats().map(|s| (s.gate_stops, s.gate_waits));
    let _server = kind.start()?;
    let client = |args: &[&str]| spawn_load_client(server_addr, args);
    let long = client(&[
        "--long",
        &STALL_LONG.to_string(),
        "--interval-ms",
        &STALL_INTERVAL_MS.to_string(),
        "--chunk",
        "64",
        "--duration",
        &(STALL_QUIET_S + STALL_BUSY_S).to_string(),
        "--short-per-sec",
        "0",
        "--busy-from-s",
        &STALL_QUIET_S.to_string(),
    ])?;
    std::thread::sleep(Duration::from_secs(STALL_QUIET_S));
    let before = server_node.map(gate).transpose()?;
    let new = client(&[
        "--long",
        "0",
        "--duration",
        &STALL_BUSY_S.to_string(),
        "--short-per-sec",
        &STALL_NEW_PER_SEC.to_string(),
        "--short-size",
        "64",
    ])?;
    let long: LoadReport = last_report(&finish(long, Duration::from_secs(120))?)?;
    let new: LoadReport = last_report(&finish(new, Duration::from_secs(120))?)?;
    // The last new connection's keys may be counted a moment late (the
    // stats file is rewritten once a second).
    std::thread::sleep(Duration::from_millis(1500));
    let after = server_node.map(gate).transpose()?;
    let gate = before
        .zip(after)
        .map(|(b, a)| (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1)));
    if !long.ok || long.long_opened != STALL_LONG || long.rtt_busy.count == 0 {
        return Err(failed!("the established connections failed: {long}"));
    }
    if !new.ok || new.short_attempted == 0 || new.short_failed != 0 {
        return Err(failed!("new connections failed: {new}"));
    }
    Ok((long, new, gate))
}

/// `bench` part two, the collateral stall: what new connections cost a
/// server's established ones. A server in pod-b holds [`STALL_LONG`]
/// established connections, each echoing a 64-byte piece every
/// [`STALL_INTERVAL_MS`]; for [`STALL_QUIET_S`] seconds nothing else
/// happens, then another client process opens [`STALL_NEW_PER_SEC`] new
/// connections per second to the same server for [`STALL_BUSY_S`] seconds.
/// The established connections' round trips while busy against while
/// quiet, for a thread-per-connection server (blocking sockets) and an
/// event-loop server (non-blocking), with no tlshub, through WireGuard, and
/// with each provider; and how often the gate stopped the server's process
/// or answered it `EAGAIN` while busy.
pub fn collateral_stall() -> Outcome {
    let mut lines = Vec::new();
    let mut report = |label: &str, kind: AppStyle, (long, new, gate): StallRun| {
        let (q, b) = (long.rtt_quiet, long.rtt_busy);
        for (what, value) in [
            ("quiet p50", q.p50_us),
            ("quiet p99", q.p99_us),
            ("busy p50", b.p50_us),
            ("busy p99", b.p99_us),
            ("busy p99.9", b.p999_us),
        ] {
            record(
                "collateral_stall",
                label,
                &format!("{}, {what}", kind.name()),
                value as f64,
                Unit::Microseconds,
            );
        }
        let mut line = format!(
            "stall {label}, {}: round trips quiet n={} p50={}us p99={}us p99.9={}us max={}us; busy n={} p50={}us p99={}us p99.9={}us max={}us; busy/quiet p50 x{:.2} p99 x{:.2} p99.9 x{:.2}; new connections {} ok, setup p50 {:.1} ms p99 {:.1} ms",
            kind.name(),
            q.count,
            q.p50_us,
            q.p99_us,
            q.p999_us,
            q.max_us,
            b.count,
            b.p50_us,
            b.p99_us,
            b.p999_us,
            b.max_us,
            b.p50_us as f64 / q.p50_us.max(1) as f64,
            b.p99_us as f64 / q.p99_us.max(1) as f64,
            b.p999_us as f64 / q.p999_us.max(1) as f64,
            new.short_ok,
            new.short_p50_ms,
            new.short_p99_ms,
        );
        if let Some((stops, waits)) = gate {
            line.push_str(&format!(
                "; server node: {stops} processes stopped, {waits} connections answered EAGAIN"
            ));
        }
        println!("TLSHUB-BENCH {line}");
        lines.push(line);
    };
    let kinds = [AppStyle::Threads, AppStyle::EventLoop];
    for kind in kinds {
        report("no tlshub", kind, stall_run(POD_B, kind, None)?);
    }
    {
        let _tunnel = WireGuard::up()?;
        for kind in kinds {
            report("wireguard", kind, stall_run(WG_POD_B, kind, None)?);
        }
    }
    for provider in PROVIDERS {
        let label = provider.label;
        let (_a, b) = nodes_with(provider)?;
        for kind in kinds {
            report(label, kind, stall_run(POD_B, kind, Some(&b))?);
        }
    }
    Ok(lines.join(" | "))
}
