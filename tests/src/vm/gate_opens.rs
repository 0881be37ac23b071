//! Connections opened other than by one `connect()` meeting one
//! `accept()` right away:
//! - TCP simultaneous open: two sockets that each `connect()` to the
//!   other, with no listener at either end. A socket whose `SYN_SENT`
//!   meets the peer's SYN answers it and completes its handshake as a
//!   server would: the kernel runs `PASSIVE_ESTABLISHED` for a socket the
//!   gate selected at its `connect()`.
//! - A deferred accept (`TCP_DEFER_ACCEPT`): the server's kernel completes
//!   a connection only when its first data arrives.
//! - SYN cookies: the server's kernel keeps no state for a SYN and makes
//!   the connection from the cookie in the client's ACK.
//! - A listener that closes with connections in its accept queue, which
//!   the kernel moves to another listener of the same `SO_REUSEPORT`
//!   group.
//! - A socket that connects to itself.
//!
//! ARCHITECTURE.md, "The gate", says how each is held and keyed.

use std::time::{Duration, Instant};

use crate::failed;
use crate::vm::outcome::Outcome;

use super::node::{Node, NodeSpec, PLAIN_PORT, PROTECTED_PORT, ProviderKind};
use super::process;
use super::support::{
    App, GoFile, PodSetting, app_report, nodes, nodes_with_provider, probe_steps, spawn_probe,
    trouble,
};
use super::topology::{POD_A, POD_B};
use super::wire_check::{
    Capture, captured_exchanges, check_wire_allowing_unkeyed, plain_control, tcp_ext,
};
use crate::app_report::AppReport;
use crate::vm::outcome::Failure;

/// More ports both nodes' rule selects: pod-a's end binds one when both
/// ends are selected (pod-b's `connect()` to it is then selected too), the
/// first when the first SYN is lost, the second when the SYNs cross (two
/// connections on one 4-tuple would be one flow to the wire check). Not
/// the protected port itself, so that the wire check tells the two
/// directions apart by their destination port.
const ALSO_SELECTED: [u16; 2] = [8444, 8445];

/// pod-b drops pod-a's SYNs (SYN without ACK) to the protected port, so
/// pod-a's `connect()` waits in `SYN_SENT` (its SYN is retransmitted after
/// 1 s) until pod-b's own SYN reaches it: pod-a's socket then answers
/// with a SYN-ACK and completes as the passive side, pod-b's as the active
/// one. This is the simultaneous open that hole punching through NAT
/// meets (the first SYN dropped by the far side), and the one that can be
/// made deterministic here.
fn drop_pod_a_syns() -> Result<PodSetting, Failure> {
    let rules = format!(
        "add table inet tlshub_simopen; \
         add chain inet tlshub_simopen input {{ type filter hook input priority 0; }}; \
         add rule inet tlshub_simopen input ip saddr {POD_A} tcp dport {PROTECTED_PORT} \
         tcp flags & (syn | ack) == syn drop"
    );
    PodSetting::command(
        "pod-b",
        &["nft", &rules],
        &["nft", "delete", "table", "inet", "tlshub_simopen"],
    )
}

/// How the two SYNs of [`open_simultaneously`] meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Syns {
    /// pod-a connects 300 ms before pod-b, and [`drop_pod_a_syns`] must be
    /// in place: only pod-b's SYN arrives, and pod-a's end answers it.
    FirstLost,
    /// Both connect at once (a go file), and [`delay_both_links`] must be
    /// in place: each SYN reaches a socket still in `SYN_SENT`.
    Crossed,
}

/// 100 ms of delay on both pods' links (netem on `pa` and `pb`, each
/// way), so that two SYNs sent within that time cross on the wire.
fn delay_both_links() -> Result<[PodSetting; 2], Failure> {
    let delay = |pod, dev| {
        PodSetting::command(
            pod,
            &[
                "tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", "100ms",
            ],
            &["tc", "qdisc", "del", "dev", dev, "root"],
        )
    };
    Ok([delay("pod-a", "pa")?, delay("pod-b", "pb")?])
}

/// pod-a binds `a_port` and connects to pod-b's protected port, as the
/// exchange's client; pod-b binds the protected port and connects to
/// pod-a's `a_port`, answering; `syns` says when. Both apps' reports
/// (pod-a's first) and how long the two took.
fn open_simultaneously(
    a_port: u16,
    syns: Syns,
) -> Result<(AppReport, AppReport, Duration), Failure> {
    let a_bind = format!("0.0.0.0:{a_port}");
    let b_addr = format!("{POD_B}:{PROTECTED_PORT}");
    let b_bind = format!("0.0.0.0:{PROTECTED_PORT}");
    let a_addr = format!("{POD_A}:{a_port}");
    let app = |bind: &str, connect: &str, answer: bool| {
        let mut argv: Vec<String> = [
            "tlshub-testapp",
            "simultaneous",
            "--bind",
            bind,
            "--connect",
            connect,
            "--mode",
            "client-first",
            "--size",
            "10000",
        ]
        .map(String::from)
        .to_vec();
        if answer {
            argv.push("--answer".into());
        }
        argv
    };
    let mut argv_a = app(&a_bind, &b_addr, false);
    let mut argv_b = app(&b_bind, &a_addr, true);
    let go = GoFile::new("/tmp/tlshub-simultaneous-go");
    if syns == Syns::Crossed {
        for argv in [&mut argv_a, &mut argv_b] {
            argv.extend(["--go-file".to_string(), go.path().to_string()]);
        }
    }
    let started = Instant::now();
    let first = process::spawn_app("pod-a", &as_strs(&argv_a))?;
    if syns == Syns::FirstLost {
        std::thread::sleep(Duration::from_millis(300));
    }
    let second = process::spawn_app("pod-b", &as_strs(&argv_b))?;
    if syns == Syns::Crossed {
        // Both bound and waiting (each checks every millisecond).
        std::thread::sleep(Duration::from_millis(500));
        go.go()?;
    }
    let b_pid = second.id();
    let a = process::finish_reporting(first, Duration::from_secs(30), &[b_pid])
        .map_err(|e| e.context("pod-a, connecting first"))?;
    let b = process::finish(second, Duration::from_secs(10))
        .map_err(|e| e.context("pod-b, answering"))?;
    Ok((app_report(&a)?, app_report(&b)?, started.elapsed()))
}

/// One simultaneous open between ends both nodes select, the SYNs meeting
/// as `syns` says (pod-a binds its own port of [`ALSO_SELECTED`] for each,
/// so the two opens are different flows): both apps exact, and the passive
/// completions counted where they happen (pod-a's end when the first SYN
/// is lost; both ends, which agree on the roles by their endpoints, when
/// the SYNs cross). How long the open and exchange took.
fn exact_when_both_selected(a: &Node, b: &Node, syns: Syns) -> Result<Duration, Failure> {
    let count = |n: &Node| n.stat(|s| s.simultaneous_open);
    let before = [count(a), count(b)];
    let (ra, rb, took) = match syns {
        Syns::FirstLost => {
            let _drop = drop_pod_a_syns()?;
            open_simultaneously(ALSO_SELECTED[0], syns)?
        }
        Syns::Crossed => {
            let _delay = delay_both_links()?;
            open_simultaneously(ALSO_SELECTED[1], syns)?
        }
    };
    if !(ra.ok && rb.ok) {
        return Err(failed!(
            "pod-a {ra}, pod-b {rb}; node a: {}; node b: {}",
            trouble(a),
            trouble(b)
        ));
    }
    let want = match syns {
        Syns::FirstLost => [1, 0],
        Syns::Crossed => [1, 1],
    };
    let counted = [
        a.stat_reaching(|s| s.simultaneous_open, before[0] + want[0]) - before[0],
        b.stat_reaching(|s| s.simultaneous_open, before[1] + want[1]) - before[1],
    ];
    if counted != want {
        return Err(failed!(
            "passive completions counted a {} b {}, want {want:?} (did the SYNs meet as planned?)",
            counted[0],
            counted[1]
        ));
    }
    Ok(took)
}

/// Simultaneous opens between selected sockets, made deterministic. With
/// OpenSSL and TLSHub, both ends selected (pod-a binds a second selected
/// port, which pod-b connects to):
/// - the first SYN lost ([`drop_pod_a_syns`]): pod-a's socket completes
///   passively, pod-b's actively; exact bytes both ways, both flows
///   TLS-only and decrypted, node a counts the passive completion
///   (`simultaneous_open`);
/// - both SYNs crossed ([`delay_both_links`], both apps connecting at
///   once): both sockets complete passively and both nodes count it; the
///   same exact bytes and decrypted flows;
/// - with OpenSSL, only pod-a's end selected (pod-b's connect() goes to
///   an unselected port of pod-a, so its node leaves it plain): pod-a's
///   end fails closed within the key timeout and both apps end with a
///   clean error, no hang (before, pod-a's app stayed held until the
///   connection ended, and pod-b's waited for its bytes: both hung).
///
/// A plain control under the same capture shows its marker.
pub fn simultaneous_open() -> Outcome {
    let mut summary = Vec::new();
    for provider in [ProviderKind::OpenSsl, ProviderKind::TlsHub] {
        let spec = |name| NodeSpec {
            also_ports: ALSO_SELECTED.to_vec(),
            ..NodeSpec::with_provider(name, provider)
        };
        let (a, b) = nodes(spec("a"), spec("b"))?;
        let cap = Capture::start(&format!("simultaneous-open-{provider:?}"))?;
        let mut mixed = String::new();
        if provider == ProviderKind::OpenSsl {
            let _drop = drop_pod_a_syns()?;
            let (ra, rb, took) = open_simultaneously(40_001, Syns::FirstLost)?;
            let clean = |r: &AppReport| !r.ok && r.errno.is_some();
            if !clean(&ra) || !clean(&rb) || took > Duration::from_secs(15) {
                return Err(failed!(
                    "only pod-a's end selected: pod-a {ra}, pod-b {rb} after {took:?} (want both failed with an errno, within 15 s)"
                ));
            }
            mixed = format!(
                "; only pod-a's end selected: both failed cleanly in {:.1} s (pod-a errno {}, pod-b errno {})",
                took.as_secs_f64(),
                ra.errno.unwrap_or(0),
                rb.errno.unwrap_or(0)
            );
        }
        let took = exact_when_both_selected(&a, &b, Syns::FirstLost)
            .map_err(|e| e.context(format!("{provider:?}, the first SYN lost")))?;
        let crossed_took = exact_when_both_selected(&a, &b, Syns::Crossed)
            .map_err(|e| e.context(format!("{provider:?}, both SYNs crossed")))?;
        plain_control()?;
        let report = check_wire_allowing_unkeyed(&cap.finish()?, &a, &b, true)?;
        report.expect_at_least(1, 2)?;
        if report.protected_flows > 4 || report.decrypted != 4 {
            return Err(failed!(
                "{provider:?}: want the two selected pairs' four flows decrypted and no other protected payload: {report:?}"
            ));
        }
        summary.push(format!(
            "{provider:?}: first SYN lost, exact in {:.1} s, pod-a's end passive (server); both SYNs crossed, exact in {:.1} s, both ends passive (roles by endpoint); 4 flows decrypted{mixed}",
            took.as_secs_f64(),
            crossed_took.as_secs_f64()
        ));
    }
    Ok(summary.join("; "))
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A server that sets `TCP_DEFER_ACCEPT` (5 s) on its listener, as nginx's
/// `listen ... deferred` does: its kernel drops the client's bare final
/// ACK and completes the connection only when data arrives, so the
/// server's `PASSIVE_ESTABLISHED` comes with the client's first bytes
/// already queued. Those are the ClientHello of an in-band handshake
/// (OpenSSL) or the first record of a client keyed from establishment
/// (TLSHub). Client-first exchanges (blocking 10,000 bytes, edge-triggered
/// epoll 1 MiB) and, with OpenSSL, a server-first one must be exact and
/// decrypt on the wire; the plain control defers too. Node b's namespace
/// must count at least one dropped bare ACK per connection
/// (`TCPDeferAcceptDrop`), or the listener did not defer.
pub fn deferred_accept() -> Outcome {
    const DEFER_S: u32 = 5;
    let mut summary = Vec::new();
    for provider in [ProviderKind::OpenSsl, ProviderKind::TlsHub] {
        let (a, b) = nodes_with_provider(provider)?;
        let deferred = |mode, size, io, port| App {
            mode,
            io,
            defer_accept_s: DEFER_S,
            ..App::exchange(size, port)
        };
        let mut apps = vec![
            deferred("client-first", 10_000, "blocking", PROTECTED_PORT),
            deferred("client-first", 1 << 20, "epoll-edge", PROTECTED_PORT),
            deferred("client-first", 10_000, "blocking", PLAIN_PORT),
        ];
        if provider == ProviderKind::OpenSsl {
            apps.push(deferred("server-first", 10_000, "blocking", PROTECTED_PORT));
        }
        let dropped_before = tcp_ext("pod-b", "TCPDeferAcceptDrop");
        let started = Instant::now();
        let report = captured_exchanges(&format!("deferred-accept-{provider:?}"), &a, &b, &apps)?;
        let took = started.elapsed();
        let dropped = tcp_ext("pod-b", "TCPDeferAcceptDrop") - dropped_before;
        if dropped < apps.len() as u64 {
            return Err(failed!(
                "{provider:?}: pod-b dropped {dropped} bare ACKs for {} deferred connections: the listeners did not defer",
                apps.len()
            ));
        }
        summary.push(format!(
            "{provider:?}: {} deferred connections (the plain control among them) exact in {:.1} s, {} flows decrypted, {dropped} bare ACKs held back",
            apps.len(),
            took.as_secs_f64(),
            report.decrypted
        ));
    }
    Ok(format!(
        "{}; the deferred plain control stayed plain",
        summary.join("; ")
    ))
}

/// A server whose kernel answers every SYN with a SYN cookie
/// (`net.ipv4.tcp_syncookies = 2` in pod-b, as a listener under a SYN
/// flood does): it keeps no state for the SYN, so its SYN-ACK and the
/// connection it makes at the client's ACK come from the cookie alone,
/// and the tlshub option must still be answered and seen (ARCHITECTURE.md,
/// "The handshake announcement"). Client-first blocking and server-first
/// edge-triggered epoll exchanges with OpenSSL, TLSHub, and TLSHub under
/// opportunistic rules (which leave a connection plain when either end
/// saw no announcement, so a lost one would show as an unprotected flow):
/// exact, TLS-only and decrypted, and pod-b must count a cookie sent and
/// one accepted per connection (`SyncookiesSent`, `SyncookiesRecv`).
pub fn syn_cookies() -> Outcome {
    let mut summary = Vec::new();
    for (provider, mode) in [
        (ProviderKind::OpenSsl, "strict"),
        (ProviderKind::TlsHub, "strict"),
        (ProviderKind::TlsHub, "opportunistic"),
    ] {
        let spec = |name| NodeSpec {
            rule_mode: mode,
            ..NodeSpec::with_provider(name, provider)
        };
        let (a, b) = nodes(spec("a"), spec("b"))?;
        let _cookies = PodSetting::sysctl("pod-b", "net/ipv4/tcp_syncookies", "2")?;
        let apps = [
            App::exchange(10_000, PROTECTED_PORT),
            App {
                mode: "server-first",
                io: "epoll-edge",
                ..App::exchange(1 << 20, PROTECTED_PORT)
            },
            App::exchange(10_000, PLAIN_PORT),
        ];
        let counters = || {
            [
                tcp_ext("pod-b", "SyncookiesSent"),
                tcp_ext("pod-b", "SyncookiesRecv"),
            ]
        };
        let before = counters();
        let report =
            captured_exchanges(&format!("syn-cookies-{provider:?}-{mode}"), &a, &b, &apps)?;
        let after = counters();
        let (sent, accepted) = (after[0] - before[0], after[1] - before[1]);
        let connections = apps.len() as u64;
        if sent < connections || accepted < connections {
            return Err(failed!(
                "{provider:?} {mode}: pod-b sent {sent} SYN cookies and accepted {accepted} for {connections} connections: the server did not answer with cookies"
            ));
        }
        summary.push(format!(
            "{provider:?} ({mode}): {} flows decrypted, {sent} cookies sent and {accepted} accepted",
            report.decrypted
        ));
    }
    Ok(format!(
        "every SYN answered with a cookie: {}; the plain control stayed plain",
        summary.join("; ")
    ))
}

/// Servers sharing the protected port (`SO_REUSEPORT`), one of which
/// closes its listener with connections still in its accept queue, as
/// nginx's workers do on a reload and Envoy on a hot restart. With
/// `net.ipv4.tcp_migrate_req = 1` the kernel moves those connections to
/// the listener that stays; they were selected and their keying started
/// at establishment, and they must be keyed once the other server accepts
/// them. 16 parallel clients spread over both servers by the port's hash;
/// the server that leaves never accepts (its accept delay outlasts the
/// run) and is killed after 1 s. With OpenSSL (the server's half of the
/// handshake waits for the accepting process; key timeout 10 s) and
/// TLSHub (keys made before accept): every exchange exact, every flow
/// TLS-only and decrypted, a plain control shows its marker, and pod-b
/// must count migrated connections (`TCPMigrateReqSuccess`), or the hash
/// put every connection on the server that stays.
pub fn reuseport_accept_queue_migrates() -> Outcome {
    use super::support::{spawn_client, spawn_server};
    use super::wire_check::check_wire_with_control;
    const CLIENTS: u32 = 16;
    let mut summary = Vec::new();
    for provider in [ProviderKind::OpenSsl, ProviderKind::TlsHub] {
        let spec = |name| NodeSpec {
            key_timeout_ms: 10_000,
            ..NodeSpec::with_provider(name, provider)
        };
        let (a, b) = nodes(spec("a"), spec("b"))?;
        let _migrate = PodSetting::sysctl("pod-b", "net/ipv4/tcp_migrate_req", "1")?;
        let cap = Capture::start(&format!("reuseport-{provider:?}"))?;
        let count = CLIENTS.to_string();
        let common = ["--reuseport", "--size", "10000"];
        let mut keeper_args = vec!["--parallel", "--connections", &count];
        keeper_args.extend(common);
        let keeper = spawn_server(PROTECTED_PORT, &keeper_args)?;
        let mut leaver_args = vec!["--accept-delay-ms", "600000"];
        leaver_args.extend(common);
        let leaver = spawn_server(PROTECTED_PORT, &leaver_args)?;
        let migrated_before = tcp_ext("pod-b", "TCPMigrateReqSuccess");
        let clients = spawn_client(
            PROTECTED_PORT,
            &["--parallel", "--connections", &count, "--size", "10000"],
        )?;
        std::thread::sleep(Duration::from_secs(1));
        drop(leaver);
        let c = app_report(&process::finish(clients, Duration::from_secs(60))?)?;
        let s = app_report(&process::finish(keeper, Duration::from_secs(10))?)?;
        if !(c.ok && s.ok && s.connections == CLIENTS) {
            return Err(failed!(
                "{provider:?}: clients {c}, the server that stayed {s}; node b: {}",
                trouble(&b)
            ));
        }
        let migrated = tcp_ext("pod-b", "TCPMigrateReqSuccess") - migrated_before;
        if migrated == 0 {
            return Err(failed!(
                "{provider:?}: no connection migrated: every one hashed to the server that stayed"
            ));
        }
        plain_control()?;
        let report = check_wire_with_control(&cap.finish()?, &a, &b)?;
        let want = 2 * CLIENTS as usize;
        if report.protected_flows != want || report.decrypted != want {
            return Err(failed!(
                "{provider:?}: want {want} flows decrypted: {report:?}"
            ));
        }
        summary.push(format!(
            "{provider:?}: {CLIENTS} connections exact, {migrated} of them migrated from the closed listener, {} flows decrypted",
            report.decrypted
        ));
    }
    Ok(summary.join("; "))
}

/// A socket bound to its pod's address that connects to that same address
/// and port (`tlshub-testapp probe --what self-connect` in pod-a): TCP
/// completes it with itself through the pod's loopback, a simultaneous
/// open with one socket as both ends, so none of its bytes reaches a
/// wire. Node a lists its own pods among the selected peers (as for
/// same-node pairs), so to the protected port the socket is selected at
/// `connect()` and keyed as a simultaneous open whose endpoints tie: the
/// server role. Under those keys it cannot read what it writes (a
/// handshake provider waits for a `ClientHello` nobody sends; a key-only
/// provider's records come back under the other direction's key), so it
/// must fail closed with a clean error: `ECONNRESET` or `EPIPE` from the
/// reset, or `EBADMSG` from kTLS, and never other bytes or a hang. To a
/// plain port it echoes to itself. With OpenSSL and TLSHub, each on
/// ports of its own that no other scenario binds in pod-a: a closed
/// connection's `TIME_WAIT` keeps its local port from being bound again
/// (the probe closes abortively, so its own leave none).
pub fn self_connect() -> Outcome {
    use libc::{EBADMSG, ECONNRESET, EPIPE};
    let mut summary = Vec::new();
    for (provider, protected_port, plain_port) in [
        (ProviderKind::OpenSsl, 8446, 9002),
        (ProviderKind::TlsHub, 8447, 9003),
    ] {
        let a_spec = NodeSpec {
            same_node: true,
            also_ports: vec![protected_port],
            ..NodeSpec::with_provider("a", provider)
        };
        let (a, _b) = nodes(a_spec, NodeSpec::with_provider("b", provider))?;
        let run = |port: u16| -> Result<Vec<(String, i32)>, Failure> {
            let target = format!("{POD_A}:{port}");
            let probe = spawn_probe("self-connect", &target, &[])?;
            let out = process::finish(probe, Duration::from_secs(60))
                .map_err(|e| e.context(format!("self-connect to port {port}")))?;
            probe_steps(&out)
        };
        let plain = run(plain_port)?;
        if plain.len() != 5 || plain.iter().any(|(_, e)| *e != 0) {
            return Err(failed!(
                "{provider:?}: self-connect to the plain port: {plain:?} (want bind, connect, write, read back, compare all 0)"
            ));
        }
        let before = a.stat(|s| s.simultaneous_open);
        let t = Instant::now();
        let protected = run(protected_port)?;
        let took = t.elapsed();
        let clean = matches!(
            protected.as_slice(),
            [(_, 0), (_, 0), (call, e)] | [(_, 0), (_, 0), (_, 0), (call, e)]
                if (call == "write" || call == "read back") && [ECONNRESET, EPIPE, EBADMSG].contains(e)
        );
        if !clean {
            return Err(failed!(
                "{provider:?}: self-connect to the protected port: {protected:?} (want bind and connect, then write or read back failing with ECONNRESET, EPIPE or EBADMSG); node a selected {} and counted {} simultaneous opens",
                a.stat(|s| s.selected),
                a.stat(|s| s.simultaneous_open) - before
            ));
        }
        let keyed = a.stat_reaching(|s| s.simultaneous_open, before + 1) - before;
        if keyed != 1 {
            return Err(failed!(
                "{provider:?}: node a counted {keyed} simultaneous opens for the self-connect, want 1"
            ));
        }
        let (call, errno) = &protected[protected.len() - 1];
        summary.push(format!(
            "{provider:?}: plain port echoed to itself; protected port failed closed at {call} (errno {errno}) after {:.1} s",
            took.as_secs_f64()
        ));
    }
    Ok(summary.join("; "))
}
