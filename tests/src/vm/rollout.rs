//! Rollouts: a rule's `mode` against a peer that does not take part. The
//! two nodes learn whether the other one selects a connection from the
//! tlshub TCP option in the handshake; an opportunistic rule lets a
//! connection with a silent peer through as plain at once, a strict one
//! keeps failing it closed.

use std::time::Duration;

use tlshub_admin::pb;
use tlshub_admin::stats::Stats;

use super::node::{Node, NodeSpec, PROTECTED_PORT, ProviderKind};
use super::process::finish;
use super::service::{self, LoadServer, spawn_load_client};
use super::support::{
    App, app_report, both_ok, exchange_between, expect_reset, expect_server_failed_clean,
    finish_app_server, nodes, run_app_client, run_pair, settle_keying, start_app_server,
};
use super::topology::{POD_A, POD_B};
use super::wire_check::{Capture, captured_exchanges, plain_flows_on};
use crate::failed;
use crate::pattern::MARKER;
use crate::vm::outcome::{Failure, Outcome};
use crate::wire;

fn opportunistic(name: &'static str) -> NodeSpec {
    NodeSpec {
        rule_mode: "opportunistic",
        ..NodeSpec::new(name)
    }
}

/// `name`'s row in `tlshubctl peers` on `node` (all defaults when
/// absent), and the whole answer.
fn peer_row(node: &Node, name: &str) -> Result<(pb::Peer, pb::ListPeersResponse), Failure> {
    let peers: pb::ListPeersResponse = node.ctl(&["peers"])?;
    let row = peers
        .peers
        .iter()
        .find(|p| p.peer == name)
        .cloned()
        .unwrap_or_default();
    Ok((row, peers))
}

/// One exchange of `size` bytes from pod-a to pod-b's protected port and
/// one back, both exact, under a capture named `label`: the flows and how
/// long each exchange took.
fn exact_both_ways(
    label: &str,
    size: usize,
) -> Result<(Vec<wire::Flow>, Duration, Duration), Failure> {
    let cap = Capture::start(label)?;
    let (s, c, out_took) = exchange_between("pod-b", POD_B, "pod-a", size)?;
    if !s.ok || !c.ok {
        return Err(failed!("pod-a -> pod-b: server {s}, client {c}"));
    }
    let (s, c, in_took) = exchange_between("pod-a", POD_A, "pod-b", size)?;
    if !s.ok || !c.ok {
        return Err(failed!("pod-b -> pod-a: server {s}, client {c}"));
    }
    Ok((cap.finish()?, out_took, in_took))
}

/// Plain decided at once: neither exchange waited anything like the test
/// bed's key timeout (2 s).
fn no_key_timeout_waited(out_took: Duration, in_took: Duration) -> Result<(), Failure> {
    let limit = Duration::from_millis(1500);
    if out_took > limit || in_took > limit {
        return Err(failed!(
            "plain exchanges took {out_took:?} and {in_took:?}: as long as a key timeout"
        ));
    }
    Ok(())
}

/// A figure of both nodes' stats, each waited for until it reaches `want`
/// (see [`Node::stat_reaching`]).
fn both_reaching(a: &Node, b: &Node, figure: impl Fn(&Stats) -> u64, want: u64) -> (u64, u64) {
    (
        a.stat_reaching(&figure, want),
        b.stat_reaching(&figure, want),
    )
}

/// Node b runs no tlshub. With node a's rule opportunistic, a connection
/// from pod-a to pod-b's protected port and one from pod-b to pod-a's go
/// through as plain at once (exact both ways, the marker on the wire, no
/// key timeout waited), counted per peer; with the rule strict (the
/// default), the same connection is failed closed (reset) as before.
pub fn opportunistic_peer_without_tlshub() -> Outcome {
    let a = Node::start(opportunistic("a"))?;
    let (flows, out_took, in_took) = exact_both_ways("rollout-silent", 100_000)?;
    let plain = plain_flows_on(&flows, PROTECTED_PORT);
    if plain < 4 {
        return Err(failed!(
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
        return Err(failed!(
            "node a: peer_silent_plain {silent} (want 2), failed {:?}, protected {}; 2 for peer {POD_B} in the metrics: {per_peer}",
            stats.failed,
            stats.protected
        ));
    }
    let status = a.status()?;
    if status.counters.as_ref().map(|c| c.peer_silent_plain) != Some(2) {
        return Err(failed!(
            "`tlshubctl status` does not count the 2: {status:?}"
        ));
    }
    no_key_timeout_waited(out_took, in_took)?;
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
pub fn opportunistic_both_nodes_protect() -> Outcome {
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
    report.expect_at_least(1, 0)?;
    let silent = a.stat(|s| s.peer_silent_plain) + b.stat(|s| s.peer_silent_plain);
    if silent != 0 || a.stat_reaching(|s| s.protected, 4) != 4 {
        return Err(failed!(
            "both opportunistic: {silent} let through as plain, node a protected {}",
            a.stat(|s| s.protected)
        ));
    }
    drop((a, b));
    // A listener from before node b's programs, taking two connections.
    let old = App {
        connections: 2,
        ..App::exchange(10_000, PROTECTED_PORT)
    };
    let one = App::exchange(10_000, PROTECTED_PORT);
    let srv = start_app_server(&old)?;
    let (a, b) = nodes(opportunistic("a"), opportunistic("b"))?;
    let cap = Capture::start("rollout-old-listener")?;
    // Neither node has heard the other yet: both ends see a silent peer.
    let c = run_app_client(&one, "pod-a", &[], Duration::from_secs(60), srv.id())?;
    let c = app_report(&c)?;
    if !c.ok {
        return Err(failed!("old listener, first connection: client {c}"));
    }
    let (pa, pb) = both_reaching(&a, &b, |s| s.peer_silent_plain, 1);
    if (pa, pb) != (1, 1) {
        return Err(failed!(
            "old listener: both ends should agree on plain, got node a {pa}, node b {pb}; failed a {:?} b {:?}",
            a.stats().map(|s| s.failed).unwrap_or_default(),
            b.stats().map(|s| s.failed).unwrap_or_default()
        ));
    }
    // The nodes hear each other on a new listener (pod-b to pod-a) ...
    let (s2, c2, _) = exchange_between("pod-a", POD_A, "pod-b", 10_000)?;
    if !s2.ok || !c2.ok {
        return Err(failed!("pod-b -> pod-a: server {s2}, client {c2}"));
    }
    // ... so the old listener's second connection is a silence between two
    // nodes that announced: both key it (by node: pod-b's address itself
    // never announced, its node did), and it is protected, not plain.
    let c = run_app_client(&one, "pod-a", &[], Duration::from_secs(60), srv.id())?;
    let s = finish_app_server(&old, srv, &c)?;
    both_ok(&old, &s, &app_report(&c)?)?;
    let flows = cap.finish()?;
    let plain = plain_flows_on(&flows, PROTECTED_PORT);
    let refused = both_reaching(&a, &b, |s| s.known_peer_silent, 1);
    // The first connection, both directions; nothing after it.
    if plain != 2 || refused != (1, 1) || a.stat(|s| s.peer_silent_plain) != 1 {
        return Err(failed!(
            "old listener after both nodes announced: {plain} flows with the marker in clear (want 2, the first connection's), silent though known {refused:?} (want 1 each), plain a {}; failed a {:?} b {:?}",
            a.stat(|s| s.peer_silent_plain),
            a.stats().map(|s| s.failed).unwrap_or_default(),
            b.stats().map(|s| s.failed).unwrap_or_default()
        ));
    }
    Ok(format!(
        "{} flows decrypted, none plain; a listener older than its node's programs: both ends plain while neither node had heard the other, protected (both keyed) once they had",
        report.decrypted
    ))
}

/// Only listeners on ports the rules select answer the option (they alone
/// get the header callback, at `listen()`), so a server that listened
/// before a policy edit selected its port is silent like one older than
/// the programs: both ends agree on plain while the nodes have not heard
/// each other, exact both ways. The same server listening again answers,
/// and its connection is protected (TLS only on the wire).
pub fn listener_older_than_its_port_selection() -> Outcome {
    const LATE_PORT: u16 = 8444;
    let (mut a, mut b) = nodes(opportunistic("a"), opportunistic("b"))?;
    let app = App::exchange(10_000, LATE_PORT);
    let srv = start_app_server(&app)?;
    a.select_port_too(LATE_PORT)?;
    b.select_port_too(LATE_PORT)?;
    let cap = Capture::start("rollout-late-port")?;
    let c = run_app_client(&app, "pod-a", &[], Duration::from_secs(60), srv.id())?;
    let s = finish_app_server(&app, srv, &c)?;
    both_ok(&app, &s, &app_report(&c)?)?;
    let plain = both_reaching(&a, &b, |s| s.peer_silent_plain, 1);
    if plain != (1, 1) {
        return Err(failed!(
            "a listener from before its port was selected: both ends should agree on plain, got node a {}, node b {}; failed a {:?} b {:?}",
            plain.0,
            plain.1,
            a.stats().map(|s| s.failed).unwrap_or_default(),
            b.stats().map(|s| s.failed).unwrap_or_default()
        ));
    }
    // Listening again, after the edit: the listener answers.
    let (s, c) = run_pair(&app, &[], Duration::from_secs(60))?;
    both_ok(&app, &s, &c)?;
    let flows = cap.finish()?;
    let in_clear = plain_flows_on(&flows, LATE_PORT);
    let protected = both_reaching(&a, &b, |s| s.protected, 1);
    if in_clear != 2 || protected != (1, 1) || a.stat(|s| s.peer_silent_plain) != 1 {
        return Err(failed!(
            "the server listening again: {in_clear} flows with the marker in clear (want 2, the first connection's), protected {protected:?} (want 1 each), plain on node a {}",
            a.stat(|s| s.peer_silent_plain)
        ));
    }
    Ok(
        "a listener older than its port's selection: silent, plain on both ends; listening again: announced and protected"
            .into(),
    )
}

/// Flows sent from `addr` (any port) that carry the marker in clear.
fn plain_flows_from(flows: &[wire::Flow], addr: &str) -> usize {
    flows
        .iter()
        .filter(|f| f.src.ip().to_string() == addr)
        .filter(|f| wire::contains(&f.bytes, MARKER))
        .count()
}

/// A downgrade: both nodes opportunistic, and they have heard each other.
/// Then node b's tlshub goes away (its core stops and its programs are
/// detached: it stops answering the option). Node a remembers that b
/// announced, also across a restart of its own core, so the silence does
/// not make anything plain: a connection from pod-a is reset and one to
/// pod-a fails with nothing read, and no byte of pod-a's crosses in clear
/// (pod-b's client, with no tlshub, sends in clear: the control that the
/// capture sees). `tlshubctl peers` shows b and the refusals; once the
/// operator forgets b, the connection goes plain again.
pub fn downgrade_refused() -> Outcome {
    let (mut a, mut b) = nodes(opportunistic("a"), opportunistic("b"))?;
    let (s, c, _) = exchange_between("pod-b", POD_B, "pod-a", 10_000)?;
    if !s.ok || !c.ok || a.stat_reaching(|s| s.protected, 1) != 1 {
        return Err(failed!("first exchange: server {s}, client {c}"));
    }
    // What a remembers survives its own restart.
    a.kill_core();
    a.restart_core("after-kill")?;
    b.stop_core();
    b.release(true)?;
    let cap = Capture::start("rollout-downgrade")?;
    let (s_out, c_out, _) = exchange_between("pod-b", POD_B, "pod-a", 10_000)?;
    let (s_in, c_in, _) = exchange_between("pod-a", POD_A, "pod-b", 10_000)?;
    let flows = cap.finish()?;
    expect_reset(&c_out).map_err(|e| {
        e.map_message(|m| format!("pod-a -> pod-b after b's tlshub left: {m}; server {s_out}"))
    })?;
    expect_server_failed_clean(&s_in).map_err(|e| {
        e.map_message(|m| format!("pod-b -> pod-a after b's tlshub left: {m}; client {c_in}"))
    })?;
    let from_a = plain_flows_from(&flows, POD_A);
    let from_b = plain_flows_from(&flows, POD_B);
    if from_a != 0 || from_b == 0 {
        return Err(failed!(
            "flows with the marker in clear: {from_a} from pod-a (want 0), {from_b} from pod-b (want at least 1: its client has no tlshub; 0 means the capture is blind)"
        ));
    }
    let refused = a.stat_reaching(|s| s.known_peer_silent, 2);
    if refused != 2 || a.stat(|s| s.peer_silent_plain) != 0 {
        return Err(failed!(
            "node a: silent though known {refused} (want 2), plain {} (want 0)",
            a.stat(|s| s.peer_silent_plain)
        ));
    }
    let (node_b, peers) = peer_row(&a, "node-b")?;
    if !node_b.announced || node_b.known_peer_silent != 2 || node_b.mode != "opportunistic" {
        return Err(failed!("`tlshubctl peers` on node a: {peers:?}"));
    }
    // The operator says b left for good: plain again, at once.
    let forgot: pb::ForgetPeersResponse = a.ctl(&["peers", "forget", "node-b"])?;
    if forgot.forgotten != ["node-b"] {
        return Err(failed!("`tlshubctl peers forget node-b`: {forgot:?}"));
    }
    let (s, c, took) = exchange_between("pod-b", POD_B, "pod-a", 10_000)?;
    if !s.ok || !c.ok || a.stat_reaching(|s| s.peer_silent_plain, 1) != 1 {
        return Err(failed!("after forgetting node-b: server {s}, client {c}"));
    }
    Ok(format!(
        "after node b's tlshub left: pod-a's connections reset / failed clean, none of pod-a's bytes in clear, 2 silent known-peer connections keyed, not plain (remembered across a core restart); forgotten by the operator: plain in {} ms",
        took.as_millis()
    ))
}

/// A rollout as an operator does it, under load: a load client in pod-a
/// (10 long-lived connections and 2 new ones a second, every byte checked
/// both ways) against a server in pod-b that was listening before either
/// node ran tlshub. Node a gets tlshub with opportunistic rules, then node
/// b; the two nodes hear each other on a new listener; then node a's
/// rules become strict, then node b's (`policy reload`). No connection of
/// the load may fail or carry a wrong byte at any step. Before the lesson
/// the new connections are plain (a silent old listener, both ends agree);
/// after it both nodes key them (each remembers the other), so the
/// capture from then on shows no new connection in clear, while the long
/// connections from before tlshub still carry their marker (the control).
pub fn upgrade_in_turn_under_load() -> Outcome {
    /// The new listener's port, which the rules select too.
    const LESSON_PORT: u16 = 8444;
    let spec = |name| NodeSpec {
        also_ports: vec![LESSON_PORT],
        ..opportunistic(name)
    };
    let _server = LoadServer::start()?;
    let load = spawn_load_client(
        POD_B,
        &["--long", "10", "--duration", "45", "--short-per-sec", "2"],
    )?;
    let pause = || std::thread::sleep(Duration::from_secs(3));
    pause();
    let mut a = Node::start(spec("a"))?;
    pause();
    let mut b = Node::start(spec("b"))?;
    pause();
    let plain_before = a.stat_reaching(|s| s.peer_silent_plain, 1);
    if plain_before == 0 {
        return Err(failed!(
            "no new connection went plain while the nodes had not heard each other (node a: {:?})",
            a.stats()?
        ));
    }
    let lesson = App::exchange(10_000, LESSON_PORT);
    let (s, c) = run_pair(&lesson, &[], Duration::from_secs(60))?;
    both_ok(&lesson, &s, &c)?;
    let cap = Capture::start("rollout-upgrade")?;
    pause();
    a.set_rule_mode("strict")?;
    pause();
    b.set_rule_mode("strict")?;
    let out = finish(load, Duration::from_secs(180))?;
    let flows = cap.finish()?;
    let report = service::report(&out)?;
    if !report.ok || report.short_failed != 0 || report.long_broken != 0 || report.corrupt != 0 {
        return Err(failed!(
            "the load failed during the rollout: {} of {} new connections failed ({:?}), {} long ones broke ({:?}), {} corrupt",
            report.short_failed,
            report.short_attempted,
            report.short_failures,
            report.long_broken,
            report.long_errors,
            report.corrupt
        ));
    }
    let (fa, fb) = (a.stats()?.failed, b.stats()?.failed);
    let keyed = (
        a.stat(|s| s.known_peer_silent),
        b.stat(|s| s.known_peer_silent),
    );
    if !fa.is_empty() || !fb.is_empty() || keyed.0 < 5 || keyed.1 < 5 {
        return Err(failed!(
            "failed a {fa:?} b {fb:?}; old-listener connections keyed after the lesson: a {}, b {} (want at least 5 each)",
            keyed.0,
            keyed.1
        ));
    }
    // New connections (their SYN captured) after the lesson: none in clear.
    let new_plain = flows
        .iter()
        .filter(|f| f.saw_syn && (f.src.port() == PROTECTED_PORT || f.dst.port() == PROTECTED_PORT))
        .filter(|f| wire::contains(&f.bytes, MARKER))
        .count();
    let old_plain = flows
        .iter()
        .filter(|f| !f.saw_syn && wire::contains(&f.bytes, MARKER))
        .count();
    if new_plain != 0 || old_plain == 0 {
        return Err(failed!(
            "after the lesson: {new_plain} new flows on the protected port carried the marker (want 0); {old_plain} flows of connections from before tlshub did (want some: the capture is blind otherwise)"
        ));
    }
    Ok(format!(
        "{} new connections and {} long ones, none failed; {plain_before}+ plain while the nodes had not heard each other, then keyed by both ({} on a, {} on b), through both strict switches",
        report.short_ok, report.long_opened, keyed.0, keyed.1
    ))
}

/// Both nodes opportunistic, but their providers speak different keying
/// protocols (the example PSK provider on node a, OpenSSL on node b): the
/// option tells each node the other's, so a connection goes through as
/// plain at once in both directions (exact, the marker on the wire, no key
/// timeout, no provider asked), counted on both nodes, and `tlshubctl
/// peers` shows the peer's keying protocol. Nothing is remembered: an
/// incompatible peer is not one that could protect the connection.
pub fn opportunistic_incompatible_providers_plain() -> Outcome {
    let mut sa = opportunistic("a");
    sa.provider = ProviderKind::ExamplePsk;
    let (a, b) = nodes(sa, opportunistic("b"))?;
    settle_keying();
    let (flows, out_took, in_took) = exact_both_ways("rollout-incompatible", 10_000)?;
    let plain = plain_flows_on(&flows, PROTECTED_PORT);
    let counted = (
        a.stat_reaching(|s| s.peer_incompatible_plain, 2),
        b.stat_reaching(|s| s.peer_incompatible_plain, 2),
    );
    if plain < 4 || counted != (2, 2) {
        return Err(failed!(
            "{plain} flows with the marker (want 4), plain for another keying protocol a/b {counted:?} (want 2 each); failed a {:?} b {:?}",
            a.stats().map(|s| s.failed).unwrap_or_default(),
            b.stats().map(|s| s.failed).unwrap_or_default()
        ));
    }
    no_key_timeout_waited(out_took, in_took)?;
    let asked = b.provider_requests(ProviderKind::OpenSsl)?;
    if asked.any() {
        return Err(failed!("node b's provider was asked for keys: {asked:?}"));
    }
    let (node_a, peers) = peer_row(&b, "node-a")?;
    if node_a.announced
        || node_a.plain != 2
        || node_a.mode != "opportunistic"
        || node_a.keying.is_empty()
    {
        return Err(failed!("`tlshubctl peers` on node b: {peers:?}"));
    }
    Ok(format!(
        "2 connections between nodes of different keying protocols plain at once ({} ms out, {} ms in), counted on both nodes; node b's peers: node-a keying {}",
        out_took.as_millis(),
        in_took.as_millis(),
        node_a.keying
    ))
}
