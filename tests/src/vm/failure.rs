//! The failure policy and bad input: a missing, hanging or malformed
//! provider, fail-closed and fail-open, early closes and fd reuse, and a
//! malformed configuration.

use std::time::{Duration, Instant};

use super::node::{Node, NodeSpec, PLAIN_PORT, PROTECTED_PORT, ProviderKind};
use super::process::{self, finish, spawn_ready};
use super::support::*;
use super::topology::POD_B;
use super::wire_check::*;
use crate::failed;
use crate::pattern::MARKER;
use crate::vm::outcome::Outcome;
use crate::wire;

pub fn fail_closed_provider_missing() -> Outcome {
    let mut sa = NodeSpec::new("a");
    sa.provider = ProviderKind::Missing;
    let (a, b) = nodes(sa, NodeSpec::new("b"))?;
    let cap = Capture::start("failclosed")?;
    let mut results = Vec::new();
    for mode in ["client-first", "server-first"] {
        let app = App {
            mode,
            ..App::exchange(100, PROTECTED_PORT)
        };
        let (s, c) = run_pair(&app, &[], Duration::from_secs(30))?;
        expect_reset(&c)?;
        expect_server_failed_clean(&s)?;
        results.push(format!("{mode}: errno {}", c.errno.unwrap_or(0)));
    }
    plain_control()?;
    let report = check_wire_with_control(&cap.finish()?, &a, &b)?;
    std::thread::sleep(Duration::from_millis(1200));
    // Core A waits for its provider until the key timeout; core B's
    // handshake times out at the same moment. Whichever resets first, each
    // connection is reset once.
    let resets = a.stat(|s| s.reset) + b.stat(|s| s.reset);
    if resets < 2 {
        return Err(failed!("cores A and B reset {resets} connections, want 2"));
    }
    Ok(format!(
        "{}; {} protected flows, no marker on the wire; cores reset {resets}",
        results.join(", "),
        report.protected_flows
    ))
}

pub fn fail_open_provider_missing() -> Outcome {
    let mut sa = NodeSpec::new("a");
    sa.provider = ProviderKind::Missing;
    sa.failure_policy = "fail-open";
    let mut sb = NodeSpec::new("b");
    sb.provider = ProviderKind::Missing;
    sb.failure_policy = "fail-open";
    let (a, _b) = nodes(sa, sb)?;
    let cap = Capture::start("failopen")?;
    let app = App::exchange(10_000, PROTECTED_PORT);
    let (s, c) = run_pair(&app, &[], Duration::from_secs(30))?;
    both_ok(&app, &s, &c)?;
    let flows = cap.finish()?;
    let clear = flows
        .iter()
        .filter(|f| f.dst.port() == PROTECTED_PORT && wire::contains(&f.bytes, MARKER))
        .count();
    if clear == 0 {
        return Err("fail-open connection did not carry plaintext".into());
    }
    std::thread::sleep(Duration::from_millis(1200));
    let passed = a.stat(|s| s.passed_plaintext);
    if passed == 0 {
        return Err("core A did not count the plaintext connection".into());
    }
    Ok(format!(
        "exchange completed in plaintext as configured; core A counted {passed} plaintext connection(s)"
    ))
}

pub fn provider_hangs() -> Outcome {
    let mut sa = NodeSpec::new("a");
    sa.provider = ProviderKind::Bad("hang");
    sa.key_timeout_ms = 1000;
    let (a, b) = nodes(sa, NodeSpec::new("b"))?;
    let cap = Capture::start("hang")?;
    let t = Instant::now();
    let (s, c) = run_pair(
        &App::exchange(100, PROTECTED_PORT),
        &[],
        Duration::from_secs(30),
    )?;
    let took = t.elapsed();
    expect_reset(&c)?;
    expect_server_failed_clean(&s)?;
    plain_control()?;
    check_wire_with_control(&cap.finish()?, &a, &b)?;
    if took > Duration::from_secs(6) {
        return Err(failed!("reset took {took:?} with a 1 s key timeout"));
    }
    std::thread::sleep(Duration::from_millis(1200));
    let timeouts = a.stat(|s| s.failures("timeout"));
    if timeouts == 0 {
        return Err(failed!("core A did not count a timeout: {:?}", a.stats()));
    }
    Ok(format!(
        "reset after {:.2}s (timeout 1 s), no plaintext, counted as timeout",
        took.as_secs_f64()
    ))
}

pub fn provider_malformed() -> Outcome {
    let mut out = Vec::new();
    for mode in ["malformed-key", "unknown-cipher"] {
        let mut sa = NodeSpec::new("a");
        sa.provider = ProviderKind::Bad(mode);
        let (a, b) = nodes(sa, NodeSpec::new("b"))?;
        let cap = Capture::start("malformed")?;
        let (s, c) = run_pair(
            &App::exchange(100, PROTECTED_PORT),
            &[],
            Duration::from_secs(30),
        )?;
        expect_reset(&c)?;
        expect_server_failed_clean(&s)?;
        plain_control()?;
        check_wire_with_control(&cap.finish()?, &a, &b)?;
        std::thread::sleep(Duration::from_millis(1200));
        if a.stat(|s| s.failures("malformed")) == 0 {
            return Err(failed!("{mode}: not counted as malformed: {:?}", a.stats()));
        }
        let log = a.core_log();
        let line = log
            .lines()
            .find(|l| l.contains("malformed"))
            .unwrap_or("")
            .trim()
            .to_string();
        out.push(format!(
            "{mode}: reset ({})",
            line.chars()
                .rev()
                .take(90)
                .collect::<String>()
                .chars()
                .rev()
                .collect::<String>()
        ));
    }
    Ok(out.join("; "))
}

pub fn churn_and_fd_reuse() -> Outcome {
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    // 1,000 connections closed right after connect (most before keys).
    let early = App {
        mode: "close-early",
        connections: 1000,
        ..App::exchange(1, PROTECTED_PORT)
    };
    let (s, c) = run_pair(&early, &[], Duration::from_secs(600))?;
    if !c.ok {
        return Err(failed!("close-early client: {c}"));
    }
    let _ = s;
    // 900 keyed connections, opened and closed.
    let echo = App {
        mode: "echo",
        connections: 900,
        ..App::exchange(1, PROTECTED_PORT)
    };
    let (s, c) = run_pair(&echo, &[], Duration::from_secs(900))?;
    both_ok(&echo, &s, &c)?;
    // 100 x: a selected socket closed at once, its fd number reused by a
    // plain connection that must stay plain and exact.
    let plain_server = spawn_ready(
        "pod-b",
        &[
            "tlshub-testapp",
            "server",
            "--listen",
            &format!("0.0.0.0:{PLAIN_PORT}"),
            "--connections",
            "100",
            "--size",
            "4096",
        ],
        "listening",
        Duration::from_secs(10),
    )?;
    let reuse = App {
        mode: "close-early",
        connections: 100,
        ..App::exchange(4096, PROTECTED_PORT)
    };
    let other = format!("{POD_B}:{PLAIN_PORT}");
    let (_s, c) = run_pair(&reuse, &["--reuse-fd-to", &other], Duration::from_secs(300))?;
    let ps = app_report(&finish(plain_server, Duration::from_secs(30))?)?;
    if !c.ok || !ps.ok {
        return Err(failed!("fd reuse: client {c}, plain server {ps}"));
    }
    let reused = c.reused_fds;
    if reused == 0 {
        return Err("the fd number was never reused; the scenario proved nothing".into());
    }
    // Everything closed: state must return to idle (allow TIME_WAIT-free settle).
    let idle = |n: &Node| {
        n.stats()
            .is_ok_and(|s| s.pending == 0 && s.held_tracked == 0 && s.bpf_maps == (0, 0))
    };
    if wait_for(
        Duration::from_secs(20),
        Duration::from_millis(500),
        || idle(&a) && idle(&b),
        |&idle| idle,
    )
    .is_err()
    {
        return Err(failed!(
            "not idle after churn: A {:?} B {:?}",
            a.stats().map(|s| (s.pending, s.bpf_maps)),
            b.stats().map(|s| (s.pending, s.bpf_maps))
        ));
    }
    let sa = a.stats()?;
    Ok(format!(
        "2,000 selected connections (1,000 closed at once, 900 keyed, 100 closed at once in fd reuse) plus 100 plain ones that reused {reused} of their fd numbers, all exact and plain; core A: selected {} protected {} closed-before-keys {}; maps and tables back to 0 on both nodes",
        sa.selected, sa.protected, sa.closed_before_keys
    ))
}

pub fn malformed_config() -> Outcome {
    let path = "/tmp/bad-core.toml";
    std::fs::write(
        path,
        "node_name = \"a\"\n[policy]\nlocal_cidrs = [\"10.0.1.0/40\"]\n",
    )
    .map_err(|e| e.to_string())?;
    let out = process::command(None, &["tlshub-core", "--config", path])
        .output()
        .map_err(|e| e.to_string())?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(2)
        || !err.contains(path)
        || !err.contains("line 3")
        || !err.contains("local_cidrs")
    {
        return Err(failed!("exit {:?}, stderr {err}", out.status.code()));
    }
    Ok(format!(
        "exit 2: {}",
        err.lines().next().unwrap_or("").trim()
    ))
}
