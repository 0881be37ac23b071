//! Rollouts: a rule's `mode` against a peer that does not take part. The
//! two nodes learn whether the other one selects a connection from the
//! tlshub TCP option in the handshake; an opportunistic rule lets a
//! connection with a silent peer through as plain at once, a strict one
//! keeps failing it closed.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::node::{Node, NodeSpec, PROTECTED_PORT};
use super::support::{
    App, both_ok, expect_reset, finish_app_server, json, nodes, ok, run_app_client, run_pair,
    start_app_server,
};
use super::topology::{POD_A, POD_B};
use super::wire_check::{Capture, captured_exchanges};
use crate::pattern::MARKER;
use crate::wire;

fn opportunistic(name: &'static str) -> NodeSpec {
    NodeSpec {
        rule_mode: "opportunistic",
        ..NodeSpec::new(name)
    }
}

/// One client-first exchange on the protected port with the server in
/// `server_pod` at `server` and the client in `client_pod`; both reports
/// and how long the client took.
fn exchange_between(
    server_pod: &'static str,
    server: &'static str,
    client_pod: &str,
    size: usize,
) -> Result<(Value, Value, Duration), String> {
    let app = App {
        server,
        server_pod,
        ..App::exchange(size, PROTECTED_PORT)
    };
    let srv = start_app_server(&app)?;
    let started = Instant::now();
    let c = run_app_client(&app, client_pod, &[], Duration::from_secs(60), srv.id())?;
    let took = started.elapsed();
    Ok((finish_app_server(&app, srv, &c)?, json(&c)?, took))
}

/// Flows on the protected port that carry the marker in clear.
fn plain_protected_port_flows(flows: &[wire::Flow]) -> usize {
    flows
        .iter()
        .filter(|f| f.src.port() == PROTECTED_PORT || f.dst.port() == PROTECTED_PORT)
        .filter(|f| wire::contains(&f.bytes, MARKER))
        .count()
}

/// Node b runs no tlshub. With node a's rule opportunistic, a connection
/// from pod-a to pod-b's protected port and one from pod-b to pod-a's go
/// through as plain at once (exact both ways, the marker on the wire, no
/// key timeout waited), counted per peer; with the rule strict (the
/// default), the same connection is failed closed (reset) as before.
pub fn opportunistic_peer_without_tlshub() -> Result<String, String> {
    let a = Node::start(opportunistic("a"))?;
    let cap = Capture::start("rollout-silent")?;
    let (s, c, out_took) = exchange_between("pod-b", POD_B, "pod-a", 100_000)?;
    if !ok(&s) || !ok(&c) {
        return Err(format!("pod-a -> pod-b: server {s}, client {c}"));
    }
    let (s, c, in_took) = exchange_between("pod-a", POD_A, "pod-b", 100_000)?;
    if !ok(&s) || !ok(&c) {
        return Err(format!("pod-b -> pod-a: server {s}, client {c}"));
    }
    let flows = cap.finish()?;
    let plain = plain_protected_port_flows(&flows);
    if plain < 4 {
        return Err(format!(
            "{plain} flows on the protected port showed the marker, want 4 (two connections, both directions): the connections were not plain, or the capture is blind"
        ));
    }
    // The stats file is rewritten once a second: wait for the count first.
    let silent = a.stat_reaching(|s| s.peer_silent_plain, 2);
    let stats = a.stats()?;
    let text = a.metrics()?;
    // Both connections had pod-b at the other end.
    let per_peer = text.contains(&format!(
        "tlshub_connections_plain_peer_silent_total{{peer=\"{POD_B}\"}} 2"
    ));
    if silent != 2 || !stats.failed.is_empty() || stats.protected != 0 || !per_peer {
        return Err(format!(
            "node a: peer_silent_plain {silent} (want 2), failed {:?}, protected {}; 2 for peer {POD_B} in the metrics: {per_peer}",
            stats.failed, stats.protected
        ));
    }
    let status = a.ctl(&["status"])?;
    if status["counters"]["peer_silent_plain"].as_u64() != Some(2) {
        return Err(format!("`tlshubctl status` does not count the 2: {status}"));
    }
    // No key timeout (2 s) was waited for.
    let limit = Duration::from_millis(1500);
    if out_took > limit || in_took > limit {
        return Err(format!(
            "plain exchanges took {out_took:?} and {in_took:?}: as long as a key timeout"
        ));
    }
    drop(a);
    // The same with the rule strict: failed closed, as before.
    let a = Node::start(NodeSpec::new("a"))?;
    let app = App::exchange(10_000, PROTECTED_PORT);
    let (_, c) = run_pair(&app, &[], Duration::from_secs(60))?;
    expect_reset(&c)?;
    if a.stat(|s| s.peer_silent_plain) != 0 {
        return Err("a strict rule let a silent peer through".into());
    }
    Ok(format!(
        "opportunistic: 2 connections with a peer without tlshub plain at once ({} ms out, {} ms in), counted per peer; strict: reset",
        out_took.as_millis(),
        in_took.as_millis()
    ))
}

/// Both nodes opportunistic: every connection is protected as with strict
/// rules (the option went both ways; blocking and epoll, TLS only on the
/// wire, decrypted, a plain control), none let through as plain. Then a
/// server that listened before its node's programs were attached (its
/// listener never answers the option): both ends see a silent peer and
/// agree on plain, so the connection works instead of one side waiting
/// for keys the other never makes.
pub fn opportunistic_both_nodes_protect() -> Result<String, String> {
    let (a, b) = nodes(opportunistic("a"), opportunistic("b"))?;
    let apps = [
        App {
            connections: 3,
            ..App::exchange(100_000, PROTECTED_PORT)
        },
        App {
            io: "epoll",
            mode: "server-first",
            ..App::exchange(4096, PROTECTED_PORT)
        },
        App::exchange(1000, super::node::PLAIN_PORT),
    ];
    let report = captured_exchanges("rollout-both", &a, &b, &apps)?;
    if report.plain_flows_with_marker == 0 {
        return Err("the control flow's plaintext was not seen: the capture is blind".into());
    }
    let silent = a.stat(|s| s.peer_silent_plain) + b.stat(|s| s.peer_silent_plain);
    if silent != 0 || a.stat_reaching(|s| s.protected, 4) != 4 {
        return Err(format!(
            "both opportunistic: {silent} let through as plain, node a protected {}",
            a.stat(|s| s.protected)
        ));
    }
    drop((a, b));
    // A listener from before node b's programs.
    let app = App::exchange(10_000, PROTECTED_PORT);
    let srv = start_app_server(&app)?;
    let (a, b) = nodes(opportunistic("a"), opportunistic("b"))?;
    let c = run_app_client(&app, "pod-a", &[], Duration::from_secs(60), srv.id())?;
    let s = finish_app_server(&app, srv, &c)?;
    both_ok(&app, &s, &json(&c)?)?;
    let (pa, pb) = (
        a.stat_reaching(|s| s.peer_silent_plain, 1),
        b.stat_reaching(|s| s.peer_silent_plain, 1),
    );
    if (pa, pb) != (1, 1) {
        return Err(format!(
            "old listener: both ends should agree on plain, got node a {pa}, node b {pb}; failed a {:?} b {:?}",
            a.stats().map(|s| s.failed).unwrap_or_default(),
            b.stats().map(|s| s.failed).unwrap_or_default()
        ));
    }
    Ok(format!(
        "{} flows decrypted, none plain; a listener older than its node's programs: both ends plain, exact",
        report.decrypted
    ))
}
