//! Node-pair keying: the OpenSSL and BoringSSL providers keep one TLS 1.3
//! session per node pair, on their own connection across the link between
//! the nodes, and export every connection's keys from it. Nothing but
//! records crosses the application's connection.

use std::time::{Duration, Instant};

use super::node::{NODE_PAIR_PORT, Node, NodeSpec, PROTECTED_PORT, ProviderKind};
use super::process::finish;
use super::service::{self, LoadServer};
use super::support::*;
use super::topology::POD_A;
use super::wire_check::*;
use crate::app_report::AppReport;
use crate::failed;
use crate::vm::outcome::{Failure, Outcome};
use crate::wire;
use tlshub_admin::pb;

fn node_pair(name: &'static str, provider: ProviderKind) -> NodeSpec {
    NodeSpec {
        node_pair: true,
        ..NodeSpec::with_provider(name, provider)
    }
}

/// How many node-pair sessions a node's provider has logged as up.
fn sessions_up(node: &Node, kind: ProviderKind) -> usize {
    node.provider_log(kind)
        .matches("node-pair session: up")
        .count()
}

/// The active provider's session with `peer` as `tlshubctl status`
/// shows it, waited for up to 5 s (the status asks the provider afresh;
/// the session may still be coming up).
fn peer_session_shown(n: &Node, peer: &str) -> Result<pb::PeerSession, Failure> {
    let shown = |status: &pb::StatusResponse| {
        status
            .providers
            .iter()
            .find(|p| p.active)
            .and_then(|p| p.peer_sessions.iter().find(|s| s.peer == peer))
            .cloned()
    };
    match wait_for(
        Duration::from_secs(5),
        Duration::from_millis(200),
        || n.status(),
        |status| status.as_ref().map_or(true, |s| shown(s).is_some()),
    ) {
        Ok(status) => Ok(shown(&status?).unwrap_or_default()),
        Err(status) => Err(failed!(
            "node {}: `tlshubctl status` shows no session with {peer}: {:?}",
            n.spec.name,
            status?
        )),
    }
}

/// Waits up to 20 s for both providers to log at least `want` sessions.
fn wait_sessions(
    a: (&Node, ProviderKind),
    b: (&Node, ProviderKind),
    want: usize,
) -> Result<(), Failure> {
    wait_for(
        Duration::from_secs(20),
        Duration::from_millis(200),
        || (sessions_up(a.0, a.1), sessions_up(b.0, b.1)),
        |&(up_a, up_b)| up_a >= want && up_b >= want,
    )
    .map(drop)
    .map_err(|(up_a, up_b)| {
        failed!(
            "node-pair sessions up: a {up_a}, b {up_b} (want {want} each); node a's provider:\n{}",
            a.0.provider_log(a.1)
        )
    })
}

/// OpenSSL and BoringSSL in node-pair mode, each as the dialing node (a,
/// whose name sorts first) and as the accepting one: one session between
/// the nodes, then connections from pod-a to pod-b (client-first and
/// server-first) and from pod-b to pod-a are exact, TLS-only on the wire
/// and decrypt with the keys both cores report; every protected flow
/// starts with an application-data record (no handshake on the
/// application's connection); the session's own flow carries the
/// connections' notices; the plain control shows its marker; the
/// providers answered every request, none failed, and hold one session
/// each, which their metrics say too.
pub fn openssl_boringssl_both_ways() -> Outcome {
    let mut out = Vec::new();
    for (ka, kb) in [
        (ProviderKind::OpenSsl, ProviderKind::BoringSsl),
        (ProviderKind::BoringSsl, ProviderKind::OpenSsl),
    ] {
        out.push(
            interop(ka, kb).map_err(|e| e.context(format!("a {}, b {}", ka.name(), kb.name())))?,
        );
    }
    Ok(out.join("; "))
}

fn interop(ka: ProviderKind, kb: ProviderKind) -> Result<String, Failure> {
    let (a, b) = nodes(node_pair("a", ka), node_pair("b", kb))?;
    wait_sessions((&a, ka), (&b, kb), 1)?;
    settle_keying();
    let cap = Capture::start(&format!("node-pair-{}", ka.name()))?;
    for mode in ["client-first", "server-first"] {
        let app = App {
            mode,
            ..App::exchange(100_000, PROTECTED_PORT)
        };
        let (s, c) = run_pair(&app, &[], Duration::from_secs(60))?;
        both_ok(&app, &s, &c)?;
    }
    let (s, c, _) = exchange_between("pod-a", POD_A, "pod-b", 100_000)?;
    if !s.ok || !c.ok {
        return Err(failed!("pod-b -> pod-a: server {s}, client {c}"));
    }
    plain_control()?;
    let flows = cap.finish()?;
    let report = check_wire_with_control(&flows, &a, &b)?;
    if report.protected_flows != 6 || report.decrypted != 6 {
        return Err(failed!("3 protected connections, but {report:?}"));
    }
    let protected = |f: &&wire::Flow| {
        !f.bytes.is_empty() && (f.src.port() == PROTECTED_PORT || f.dst.port() == PROTECTED_PORT)
    };
    let not_records: Vec<String> = flows
        .iter()
        .filter(protected)
        .filter(|f| f.bytes.first() != Some(&0x17))
        .map(|f| format!("{} -> {} starts with {:#04x}", f.src, f.dst, f.bytes[0]))
        .collect();
    if !not_records.is_empty() {
        return Err(failed!(
            "a protected flow does not start with an application-data record: {not_records:?}"
        ));
    }
    let session_bytes: usize = flows
        .iter()
        .filter(|f| f.src.port() == NODE_PAIR_PORT || f.dst.port() == NODE_PAIR_PORT)
        .map(|f| f.bytes.len())
        .sum();
    if session_bytes == 0 {
        return Err("no node-pair session bytes on the wire while 3 connections were keyed: the notices did not cross the link".into());
    }
    for (n, kind) in [(&a, ka), (&b, kb)] {
        let core = n.stat_reaching(|s| s.protected, 3);
        let own = n.provider_requests(kind)?;
        if own.answered < 3.0 || own.failed > 0.0 || !n.stats()?.failed.is_empty() {
            return Err(failed!(
                "node {}: protected {core}, its provider answered {} and failed {}; failed {:?}",
                n.spec.name,
                own.answered,
                own.failed,
                n.stats()?.failed
            ));
        }
        // What an operator sees: one generation held with the other node,
        // one session set up.
        let other = if n.spec.name == "a" {
            "node-b"
        } else {
            "node-a"
        };
        let text = own.text;
        let generations = metric(
            &text,
            &format!("tlshub_keyprovider_node_pair_generations{{peer=\"{other}\"}}"),
        );
        let set_up = metric(
            &text,
            &format!("tlshub_keyprovider_node_pair_sessions_total{{peer=\"{other}\"}}"),
        );
        if (generations, set_up) != (1.0, 1.0) {
            return Err(failed!(
                "node {}: node-pair metrics say {generations} generations and {set_up} sessions with {other}, want 1 and 1:\n{text}",
                n.spec.name
            ));
        }
        if sessions_up(n, kind) != 1 {
            return Err(failed!(
                "node {}: {} node-pair sessions, want the one:\n{}",
                n.spec.name,
                sessions_up(n, kind),
                n.provider_log(kind)
            ));
        }
        // And `tlshubctl status` shows it: only the dialer (a) knows when
        // it renews the session.
        let shown = peer_session_shown(n, other)?;
        let dialer = n.spec.name == "a";
        if shown.generations != 1
            || shown.sessions_total != 1
            || shown.up_since_unix_seconds == 0
            || (shown.renew_at_unix_seconds != 0) != dialer
            || !shown.last_error.is_empty()
        {
            return Err(failed!(
                "node {}: `tlshubctl status` shows the session with {other} as {shown:?} (dialer: {dialer})",
                n.spec.name
            ));
        }
    }
    if !a.provider_log(ka).contains("dialer=true") {
        return Err("node a (its name sorts first) did not dial the session".into());
    }
    Ok(format!(
        "one session ({} dialed {}); 3 connections both ways keyed from it, {} flows decrypted, each starting with a record; {session_bytes} session bytes on the wire; the plain control seen",
        ka.name(),
        kb.name(),
        report.decrypted
    ))
}

/// Both ends' keys of every connection to pod-b's protected port, by the
/// two cores' key logs: how many matched (each side's sending key and IV
/// are the other's receiving ones), and the connections that did not.
fn keys_agree(a: &Node, b: &Node) -> (usize, Vec<String>) {
    let theirs = b.keys();
    let mut matched = 0;
    let mut wrong = Vec::new();
    for k in a
        .keys()
        .iter()
        .filter(|k| k.remote.port() == PROTECTED_PORT)
    {
        match theirs
            .iter()
            .find(|t| t.local == k.remote && t.remote == k.local)
        {
            Some(t)
                if t.rx_key == k.tx_key
                    && t.rx_iv == k.tx_iv
                    && t.tx_key == k.rx_key
                    && t.tx_iv == k.rx_iv =>
            {
                matched += 1;
            }
            Some(_) => wrong.push(format!("{} -> {}: keys differ", k.local, k.remote)),
            None => wrong.push(format!(
                "{} -> {}: node b installed no keys",
                k.local, k.remote
            )),
        }
    }
    (matched, wrong)
}

/// The session lines of a provider's log, to tell when a failure fell.
fn session_lines(node: &Node, kind: ProviderKind) -> String {
    node.provider_log(kind)
        .lines()
        .filter(|l| l.contains("node-pair session"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Sessions replaced every 3 s under load, then each provider killed and
/// started again: the load (4 long connections, 3 new ones a second, 18 s)
/// from pod-a to pod-b loses nothing across at least four replacements;
/// after node b's provider (the acceptor) and then node a's (the dialer)
/// restart, a new session is set up and a connection is keyed from it.
pub fn sessions_replaced_and_restarted() -> Outcome {
    let spec = |name, kind| NodeSpec {
        node_pair_lifetime_seconds: 3,
        ..node_pair(name, kind)
    };
    let (mut a, mut b) = nodes(
        spec("a", ProviderKind::OpenSsl),
        spec("b", ProviderKind::OpenSsl),
    )?;
    wait_sessions((&a, ProviderKind::OpenSsl), (&b, ProviderKind::OpenSsl), 1)?;
    settle_keying();
    let up_before = sessions_up(&a, ProviderKind::OpenSsl);
    let server = LoadServer::start()?;
    // Unix seconds, to place a failure among the log lines.
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let load = service::start_load_with(4, 18, 3.0)?;
    let out = finish(load, Duration::from_secs(120))?;
    drop(server);
    let report = service::report(&out)?;
    let replaced = sessions_up(&a, ProviderKind::OpenSsl) - up_before;
    let (matched, wrong) = keys_agree(&a, &b);
    if !wrong.is_empty() || matched < 30 {
        return Err(failed!(
            "{matched} connections with matching keys on both nodes, and these not: {wrong:?}; the load started at {:.3} (Unix seconds); node a's sessions:\n{}",
            started,
            session_lines(&a, ProviderKind::OpenSsl)
        ));
    }
    if !report.ok
        || report.short_failed != 0
        || report.long_broken != 0
        || report.corrupt != 0
        || report.short_ok < 30
    {
        return Err(failed!(
            "the load across session replacements: {} of {} new connections failed ({:?}), {} long ones broke ({:?}), {} corrupt; the load started at {:.3} (Unix seconds); node a's sessions:\n{}\nfailures a {:?} b {:?}; refused by the gate (map_full, map_busy) a {}/{} b {}/{}",
            report.short_failed,
            report.short_attempted,
            report.short_failures,
            report.long_broken,
            report.long_errors,
            report.corrupt,
            started,
            session_lines(&a, ProviderKind::OpenSsl),
            a.stats().map(|s| s.failed).unwrap_or_default(),
            b.stats().map(|s| s.failed).unwrap_or_default(),
            a.stat(|s| s.map_full),
            a.stat(|s| s.map_busy),
            b.stat(|s| s.map_full),
            b.stat(|s| s.map_busy)
        ));
    }
    if replaced < 4 {
        return Err(failed!(
            "{replaced} sessions set up during 18 s with a 3 s lifetime, want at least 4"
        ));
    }
    let mut restarts = Vec::new();
    for (node, which) in [(&mut b, "acceptor"), (&mut a, "dialer")] {
        node.kill_provider(ProviderKind::OpenSsl);
        node.restart_provider(ProviderKind::OpenSsl)?;
        let started = Instant::now();
        // The core finds the provider again and the dialer sets up a new
        // session; the first connection may wait for either.
        let app = App::exchange(10_000, PROTECTED_PORT);
        let keyed = |pair: &Result<(AppReport, AppReport), Failure>| {
            pair.as_ref()
                .map_or(true, |(s, c)| both_ok(&app, s, c).is_ok())
        };
        if let Err(pair) = wait_for(
            Duration::from_secs(30),
            Duration::from_millis(500),
            || run_pair(&app, &[], Duration::from_secs(60)),
            keyed,
        ) {
            let (s, c) = pair?;
            return Err(failed!(
                "no connection keyed within 30 s of restarting the {which}'s provider: server {s}, client {c}"
            ));
        }
        restarts.push(format!("{which} {:.1} s", started.elapsed().as_secs_f64()));
    }
    let flows_check = Capture::start("node-pair-after-restarts")?;
    let app = App::exchange(10_000, PROTECTED_PORT);
    let (s, c) = run_pair(&app, &[], Duration::from_secs(60))?;
    both_ok(&app, &s, &c)?;
    plain_control()?;
    let wire = check_wire_with_control(&flows_check.finish()?, &a, &b)?;
    if wire.protected_flows != 2 || wire.decrypted != 2 {
        return Err(failed!("after the restarts: {wire:?}"));
    }
    Ok(format!(
        "{} new and {} long connections, none failed, across {replaced} session replacements; keyed again after restarting the providers ({}), wire decrypted",
        report.short_ok,
        report.long_opened,
        restarts.join(", ")
    ))
}
