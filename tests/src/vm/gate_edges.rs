//! The gate's edges: sockets that reach an application some other way than
//! a connect()/accept() system call in the process that then uses them.

use std::time::Duration;

use super::node::{NodeSpec, PLAIN_PORT, PROTECTED_PORT, ProviderKind};
use super::process;
use super::support::{App, both_ok, nodes, run_pair};
use super::topology::{POD_A2, POD_A2_IF};
use super::wire_check::{
    Capture, captured_exchanges, captured_exchanges_on, check_wire, with_ktls_sockets,
};

/// Sockets whose owner no syscall hook reports, or reports wrongly, are
/// gated and then keyed from the process the gate holds:
/// - connected and accepted through io_uring (no connect/accept system
///   call: no OWNER event at all), sending with sendfile() and splice(),
///   which on 6.1 pass only the `file_permission` gate;
/// - handed to a forked child by the process that connected or accepted,
///   which closes its own copy at once (the inetd/sshd pattern; the OWNER
///   event names the parent, which may no longer have the socket when the
///   core looks);
/// - both at once.
///
/// Every protected flow must decrypt, a plain control flow must show its
/// marker, and the io_uring connections must have been keyed from a hold
/// (proving the path under test ran).
pub fn owner_from_hold() -> Result<String, String> {
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let uring = |mode, send, recv, io| App {
        mode,
        send,
        recv,
        io,
        via: "io-uring",
        ..App::exchange(1 << 20, PROTECTED_PORT)
    };
    let handed = |handoff, mode, send, recv, via| App {
        mode,
        send,
        recv,
        via,
        handoff,
        connections: 3,
        ..App::exchange(100_000, PROTECTED_PORT)
    };
    let apps = [
        uring("client-first", "sendfile", "splice", "blocking"),
        uring("server-first", "splice", "read", "epoll"),
        uring("client-first", "write", "recv", "epoll"),
        handed("fork", "client-first", "sendfile", "read", "syscall"),
        handed("fork", "server-first", "write", "splice", "syscall"),
        handed("fork", "client-first", "splice", "recvmsg", "io-uring"),
        handed("scm-rights", "client-first", "sendfile", "read", "syscall"),
        handed("scm-rights", "server-first", "write", "recv", "io-uring"),
        // The control: unselected, so its marker must be seen in clear.
        App::exchange(10_000, PLAIN_PORT),
    ];
    let uring_conns: u64 = apps
        .iter()
        .filter(|x| x.port == PROTECTED_PORT && x.via == "io-uring")
        .map(|x| u64::from(x.connections))
        .sum();
    let protected: u64 = apps
        .iter()
        .filter(|x| x.port == PROTECTED_PORT)
        .map(|x| u64::from(x.connections))
        .sum();
    let report = with_ktls_sockets(2 * protected, || {
        captured_exchanges("owner-from-hold", &a, &b, &apps)
    })?;
    if report.plain_flows_with_marker == 0 {
        return Err("the control flow's plaintext was not seen: the capture is blind".into());
    }
    // Each io_uring connection has two ends, one per node, and neither
    // had an OWNER event: both were found from a hold.
    let from_hold = [a.stat(|s| s.owner_from_hold), b.stat(|s| s.owner_from_hold)];
    if from_hold.iter().any(|&n| n < uring_conns) {
        return Err(format!(
            "keyed from a hold: node a {}, node b {}; want at least {uring_conns} each (the io_uring connections)",
            from_hold[0], from_hold[1]
        ));
    }
    let gone = [a.stat(|s| s.socket_gone), b.stat(|s| s.socket_gone)];
    let terminal = [a.stat(|s| s.gate_terminal), b.stat(|s| s.gate_terminal)];
    if terminal != [0, 0] {
        return Err(format!("gates put in the terminal state: {terminal:?}"));
    }
    Ok(format!(
        "{protected} connections (io_uring, fork handoff, SCM_RIGHTS handoff, io_uring and fork) exact both ways; {} flows TLS-only and decrypted; control flow plain; keyed from a hold: a {} b {}; socket gone from the first owner: a {} b {}",
        report.protected_flows, from_hold[0], from_hold[1], gone[0], gone[1]
    ))
}

/// `TcpExt` counter `name` of network namespace `netns` (/proc/net/netstat).
fn tcp_ext(netns: &str, name: &str) -> u64 {
    let text = process::run(Some(netns), &["cat", "/proc/net/netstat"]).unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Server-side Fast Open in pod-b (`net.ipv4.tcp_fastopen` = 0x403:
/// client, server, and no `TCP_FASTOPEN` needed on the listener), back to
/// the default (1, client only) when dropped.
struct ServerFastOpen;

impl ServerFastOpen {
    fn enable() -> Result<Self, String> {
        process::run(
            Some("pod-b"),
            &["sh", "-c", "echo 1027 > /proc/sys/net/ipv4/tcp_fastopen"],
        )?;
        Ok(Self)
    }
}

impl Drop for ServerFastOpen {
    fn drop(&mut self) {
        let _ = process::run(
            Some("pod-b"),
            &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/tcp_fastopen"],
        );
    }
}

/// TCP Fast Open (client Fast Open is on by default in every namespace)
/// would carry the app's first bytes before the gate could hold it. To a
/// selected destination the gate refuses it with EOPNOTSUPP and the client
/// falls back to connect(), which is protected; to an unselected one it
/// works and the control flows carry the marker in clear:
/// - `sendto(MSG_FASTOPEN)` (sends right after the handshake without a
///   cookie, in the SYN with one);
/// - `TCP_FASTOPEN_CONNECT` with a cookie cached for the server (pod-b's
///   server Fast Open on; the first plain connection gets the cookie, the
///   second puts its data in the SYN: `TCPFastOpenActive` must grow), so
///   connect() returns without a SYN and the first write would carry it.
pub fn fast_open() -> Result<String, String> {
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let refused_before = a.stat(|s| s.fastopen_refused);
    let cap = Capture::start("fastopen")?;
    let run = |port, how: &str, want: &str| -> Result<(), String> {
        let app = App::exchange(20_000, port);
        let (s, c) = run_pair(&app, &["--fastopen", how], Duration::from_secs(60))?;
        both_ok(&app, &s, &c)?;
        if c["fastopen"].as_str() != Some(want) {
            return Err(format!(
                "--fastopen {how} to port {port}: the client reports {}, want {want}",
                c["fastopen"]
            ));
        }
        Ok(())
    };
    run(PLAIN_PORT, "sendto", "sent")?;
    run(PROTECTED_PORT, "sendto", "refused")?;
    let in_syn = {
        let _server = ServerFastOpen::enable()?;
        let before = tcp_ext("pod-a", "TCPFastOpenActive");
        run(PLAIN_PORT, "connect", "sent")?;
        run(PLAIN_PORT, "connect", "sent")?;
        let in_syn = tcp_ext("pod-a", "TCPFastOpenActive") - before;
        if in_syn == 0 {
            return Err(
                "no Fast Open SYN carried data to the plain port: the cookie case was not exercised"
                    .into(),
            );
        }
        run(PROTECTED_PORT, "connect", "refused")?;
        in_syn
    };
    let report = check_wire(&cap.finish()?, &a, &b)?;
    if report.protected_flows != 4 || report.decrypted != 4 {
        return Err(format!(
            "2 protected connections (the fallbacks) but {report:?}"
        ));
    }
    if report.plain_flows_with_marker < 3 {
        return Err(format!(
            "{} plain flows showed the marker, want the 3 Fast Open controls: the capture is blind",
            report.plain_flows_with_marker
        ));
    }
    // The stats file is rewritten once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let refused = a.stat(|s| s.fastopen_refused) - refused_before;
    if refused != 2 {
        return Err(format!(
            "node a counted {refused} Fast Open refusals, want 2"
        ));
    }
    Ok(format!(
        "sendto(MSG_FASTOPEN) and TCP_FASTOPEN_CONNECT (cookie cached, {in_syn} plain SYN(s) carried data) to the protected port refused with EOPNOTSUPP, fell back, exact, 4 flows decrypted; the same calls to the plain port sent their data in clear (controls)"
    ))
}

/// An exemption names a process, not a pid: a process that gets the pid of
/// an exited provider is held like any other. Node A's provider is killed
/// (its pid stays in the core's exempt map until another provider
/// connects); a client started with exactly that pid (through
/// `/proc/sys/kernel/ns_last_pid`) sends the marker to the protected port.
/// It must be held (the provider is gone, so fail-closed resets it at the
/// key timeout) and the wire must not carry its bytes; a plain control
/// connection in the same capture must.
pub fn exempt_pid_reuse() -> Result<String, String> {
    use super::node::ProviderKind;
    use super::support::{json, ok, pod_b_addr};
    let (mut a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let provider_pid = a.provider_pid(ProviderKind::OpenSsl);
    if provider_pid < 2 {
        return Err(format!("node a's provider pid is {provider_pid}"));
    }
    let cap = Capture::start("pid-reuse")?;
    let server = process::spawn_ready(
        "pod-b",
        &[
            "tlshub-testapp",
            "server",
            "--listen",
            &format!("0.0.0.0:{PROTECTED_PORT}"),
            "--size",
            "10000",
        ],
        "listening",
        Duration::from_secs(10),
    )?;
    a.kill_provider(ProviderKind::OpenSsl);
    let held_before = a.stat(|s| s.gate_stops);
    // The client shell waits a second before it becomes the test app, so
    // a try that got another pid is killed before it connects.
    let client_cmd = format!(
        "sleep 1; exec tlshub-testapp client --connect {} --size 10000",
        pod_b_addr(PROTECTED_PORT)
    );
    let mut client = None;
    for _ in 0..200 {
        std::fs::write(
            "/proc/sys/kernel/ns_last_pid",
            (provider_pid - 1).to_string(),
        )
        .map_err(|e| format!("ns_last_pid: {e}"))?;
        let c = process::spawn_app("pod-a", &["sh", "-c", &client_cmd])?;
        if c.id() == provider_pid {
            client = Some(c);
            break;
        }
    }
    let client = client.ok_or(format!(
        "no client got pid {provider_pid} in 200 tries (other processes took it)"
    ))?;
    let c = json(&process::finish(client, Duration::from_secs(30))?)?;
    drop(server);
    let control = App::exchange(10_000, PLAIN_PORT);
    let (s2, c2) = run_pair(&control, &[], Duration::from_secs(30))?;
    both_ok(&control, &s2, &c2)?;
    // The protected connection was reset before keys: no keys to check it
    // against, and no marker may have crossed.
    let report = super::wire_check::check_wire_allowing_unkeyed(&cap.finish()?, &a, &b, true)?;
    if ok(&c) {
        return Err(format!(
            "the client with the dead provider's pid {provider_pid} completed an exchange with no provider: it was let through ({c})"
        ));
    }
    if report.plain_flows_with_marker == 0 {
        return Err("the control flow's plaintext was not seen: the capture is blind".into());
    }
    std::thread::sleep(Duration::from_millis(1500));
    let held = a.stat(|s| s.gate_stops) - held_before;
    if held == 0 {
        return Err("the client with the reused pid was never held".into());
    }
    Ok(format!(
        "a client with the killed provider's pid {provider_pid} was held {held} time(s) and failed closed ({}); no marker on the protected port, the plain control showed it",
        c["error"].as_str().unwrap_or("")
    ))
}

/// One app that calls connect() on its keyed socket 200,000 times (each
/// fails with EISCONN; every call reaches the connect hook) next to 100
/// ordinary connections from 4 other clients: the hook reports an owner
/// once per socket and owner, so the node's event ring buffer loses
/// nothing and every ordinary connection is keyed.
pub fn event_flood() -> Result<String, String> {
    use super::support::{json, ok};
    const FLOOD: u32 = 200_000;
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let (clients, each) = (4u32, 25u32);
    let listen = format!("0.0.0.0:{PROTECTED_PORT}");
    let total = (clients * each + 1).to_string();
    let server = process::spawn_ready(
        "pod-b",
        &[
            "tlshub-testapp",
            "server",
            "--parallel",
            "--listen",
            &listen,
            "--mode",
            "echo",
            "--connections",
            &total,
        ],
        "listening",
        Duration::from_secs(10),
    )?;
    let echo_client = |flag: &str, n: u32| {
        super::support::spawn_client(PROTECTED_PORT, &["--mode", "echo", flag, &n.to_string()])
    };
    let started = std::time::Instant::now();
    let flooder = echo_client("--connect-again", FLOOD)?;
    let mut normal = Vec::new();
    for _ in 0..clients {
        normal.push(echo_client("--connections", each)?);
    }
    for child in normal {
        let c = json(&process::finish(child, Duration::from_secs(300))?)?;
        if !ok(&c) {
            return Err(format!("an ordinary client failed next to the flood: {c}"));
        }
    }
    let f = json(&process::finish(flooder, Duration::from_secs(300))?)?;
    let elapsed = started.elapsed();
    if !ok(&f) || f["eisconn"].as_u64() != Some(u64::from(FLOOD)) {
        return Err(format!(
            "the flooding client did not make its {FLOOD} calls: {f}"
        ));
    }
    let s = json(&process::finish(server, Duration::from_secs(30))?)?;
    if !ok(&s) {
        return Err(format!("server: {s}"));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let want = u64::from(clients * each + 1);
    for (n, name) in [(&a, "a"), (&b, "b")] {
        let (drops, protected) = (n.stat(|s| s.ringbuf_drops), n.stat(|s| s.protected));
        if drops != 0 || protected < want {
            return Err(format!(
                "node {name}: {drops} ring buffer drops, {protected} protected (want 0 and {want})"
            ));
        }
    }
    // Per connection: ESTABLISHED, OWNER, a few holds, CLOSED. The flood
    // itself must not show: 200,000 calls would be 200,000 OWNER events.
    let events = a.stat(|s| s.events_received);
    if events > 20 * want {
        return Err(format!(
            "node a read {events} events for {want} connections: the connect() flood reached the ring buffer"
        ));
    }
    Ok(format!(
        "{FLOOD} connect() calls on one keyed socket next to {} ordinary connections: all {want} keyed on both nodes, 0 ring buffer drops, node a read {events} events, {:.1} s",
        clients * each,
        elapsed.as_secs_f64()
    ))
}

/// Capacity never means plaintext, and open connections cost no capacity.
/// Node A's `conns` map holds 16 entries (`[bpf] max_connections = 16`).
///
/// 1. Keyed connections keep no entry: 48 long-lived connections (three
///    times the map) are keyed and stay open while short ones are opened
///    at 2/s, and every one of them is keyed too (`map_full` stays 0).
/// 2. Connections waiting for keys do: with node A's provider hanging (20 s
///    key timeout), 16 clients fill the map, and each further one must fail
///    closed at once (its app's calls fail with `ECONNRESET`, counted as
///    `map_full`), with no marker on the wire. The 16 are reset at the key
///    timeout; then a new connection is keyed again. A plain control flow
///    shows the marker.
pub fn conns_map_full() -> Result<String, String> {
    use super::service::{LoadServer, report, start_load_with};
    use super::support::{expect_reset, json, spawn_client};
    const MAX: u32 = 16;
    const LONG: u32 = 3 * MAX;
    // 1. Keyed connections leave the map.
    let mut sa = NodeSpec::new("a");
    sa.max_connections = Some(MAX);
    let (a, b) = nodes(sa.clone(), NodeSpec::new("b"))?;
    let server = LoadServer::start()?;
    let client = start_load_with(LONG, 6, 2.0)?;
    // All long ones are keyed and open now; the map holds only what waits.
    std::thread::sleep(Duration::from_millis(1500));
    let entries_while_open = a.stat(|s| s.bpf_maps.0 as u64);
    let r = report(&process::finish(client, Duration::from_secs(120))?)?;
    drop(server);
    let attempted = r["short_attempted"].as_u64().unwrap_or(0);
    if r["long_opened"].as_u64() != Some(u64::from(LONG))
        || r["long_broken"].as_u64() != Some(0)
        || r["corrupt"].as_u64() != Some(0)
        || attempted == 0
        || r["short_ok"].as_u64() != Some(attempted)
    {
        return Err(format!(
            "{LONG} keyed connections open must leave room in a map of {MAX}: {r}"
        ));
    }
    let keyed = a.stat_reaching(|s| s.protected, u64::from(LONG) + attempted);
    let full = a.stat(|s| s.map_full);
    if keyed < u64::from(LONG) + attempted || full != 0 || entries_while_open >= u64::from(MAX) {
        return Err(format!(
            "node a: {keyed} keyed (want {}), map_full {full}, {entries_while_open} conns entries with the long ones open",
            u64::from(LONG) + attempted
        ));
    }
    drop((a, b));

    // 2. Waiting connections fill it, and the next ones fail closed.
    // Long enough for 16 client processes to start and connect under TCG
    // (on 6.12 that took more than 5 s) before the first is reset.
    sa.provider = ProviderKind::Bad("hang");
    sa.key_timeout_ms = 20_000;
    let mut sb = NodeSpec::new("b");
    // Node b must not reset the connections first (its provider waits for
    // a handshake that node a never starts).
    sb.key_timeout_ms = 40_000;
    let (a, b) = nodes(sa, sb)?;
    let cap = Capture::start("map-full")?;
    let server = LoadServer::start()?;
    let size = ["--size", "100"];
    let mut waiting = Vec::new();
    for _ in 0..MAX {
        waiting.push(spawn_client(PROTECTED_PORT, &size)?);
    }
    let filled = a.stat_reaching_in(
        |s| s.bpf_maps.0 as u64,
        u64::from(MAX),
        Duration::from_secs(15),
    );
    if filled < u64::from(MAX) {
        return Err(format!(
            "{MAX} clients waiting for keys filled {filled} of {MAX} conns entries"
        ));
    }
    const OVER: u32 = 4;
    let t = std::time::Instant::now();
    for i in 0..OVER {
        let c = json(&process::finish(
            spawn_client(PROTECTED_PORT, &size)?,
            Duration::from_secs(60),
        )?)?;
        expect_reset(&c).map_err(|e| format!("client {i} over a full map: {e}"))?;
    }
    let refused_in = t.elapsed();
    if refused_in > Duration::from_secs(8) {
        return Err(format!(
            "{OVER} clients over a full map took {refused_in:?} to fail: they waited instead of failing at once"
        ));
    }
    for (i, c) in waiting.into_iter().enumerate() {
        let c = json(&process::finish(c, Duration::from_secs(60))?)?;
        expect_reset(&c).map_err(|e| format!("waiting client {i}: {e}"))?;
    }
    drop(server);
    let full = a.stat_reaching(|s| s.map_full, u64::from(OVER));
    if full < u64::from(OVER) {
        return Err(format!(
            "node a counted {full} map-full failures for {OVER} clients over a full map"
        ));
    }
    drop((a, b));
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let control = App::exchange(10_000, PLAIN_PORT);
    let (s, c) = run_pair(&control, &[], Duration::from_secs(30))?;
    both_ok(&control, &s, &c)?;
    let after = App::exchange(10_000, PROTECTED_PORT);
    let (s, c) = run_pair(&after, &[], Duration::from_secs(30))?;
    both_ok(&after, &s, &c)?;
    let wire = super::wire_check::check_wire_allowing_unkeyed(&cap.finish()?, &a, &b, true)?;
    if wire.plain_flows_with_marker == 0 {
        return Err("the control flow's plaintext was not seen: the capture is blind".into());
    }
    Ok(format!(
        "conns of {MAX} entries: {LONG} keyed long connections open and {attempted} short ones keyed meanwhile ({entries_while_open} entries in use, map_full 0); {MAX} connections waiting for keys filled it and {OVER} more failed closed in {:.1} s (map_full {full}), the {MAX} reset at the key timeout; no marker on the wire ({} protected flows, {} decrypted); then a new connection was keyed",
        refused_in.as_secs_f64(),
        wire.protected_flows,
        wire.decrypted
    ))
}

/// A client that writes its request and half-closes at once
/// (`shutdown(SHUT_WR)`, like `nc -N` or an HTTP/1.0 client), and a server
/// that reads to EOF and then answers. Two races meet here: the client's
/// FIN must not leave before its keys (it would end the handshake), and
/// the FIN must not reach the server's socket before the server's keys are
/// in (a socket in CLOSE_WAIT cannot take the `tls` ULP: `ENOTCONN`, and
/// the connection would be reset with the answer lost). Run with a
/// handshake provider (OpenSSL: the client side is keyed first, so its
/// FIN races the server's install) and a key-only one (TLSHub).
pub fn half_close() -> Result<String, String> {
    let mut summary = Vec::new();
    for provider in [ProviderKind::OpenSsl, ProviderKind::TlsHub] {
        let spec = |name| NodeSpec {
            provider,
            ..NodeSpec::new(name)
        };
        let (a, b) = nodes(spec("a"), spec("b"))?;
        let half = |size, connections, io| App {
            mode: "half-close",
            connections,
            io,
            ..App::exchange(size, PROTECTED_PORT)
        };
        let apps = [
            half(4096, 20, "blocking"),
            half(1 << 20, 2, "epoll"),
            // The control: unselected, so its marker must be seen in clear.
            App {
                mode: "half-close",
                ..App::exchange(10_000, PLAIN_PORT)
            },
        ];
        let report = captured_exchanges(&format!("half-close-{provider:?}"), &a, &b, &apps)?;
        if report.plain_flows_with_marker == 0 {
            return Err("the control flow's plaintext was not seen: the capture is blind".into());
        }
        // shutdown() before any byte: held until keys like a send (else
        // its FIN would end the handshake a handshake provider runs on the
        // socket). No app bytes, so judged by the cores' counts. Only with
        // a handshake provider: with a key-only one nothing precedes such
        // a client's FIN, which the server side lets through (a bare FIN
        // at the start of the stream; see ARCHITECTURE.md), so it may be
        // reset.
        let empty_ones = if provider == ProviderKind::OpenSsl {
            5
        } else {
            0
        };
        let before = [
            a.stat_reaching(|s| s.protected, 22),
            b.stat_reaching(|s| s.protected, 22),
        ];
        if empty_ones > 0 {
            let empty = half(0, empty_ones, "blocking");
            let (s, c) = run_pair(&empty, &[], Duration::from_secs(60))?;
            both_ok(&empty, &s, &c)?;
        }
        let want = u64::from(empty_ones);
        let after = [
            a.stat_reaching(|s| s.protected, before[0] + want),
            b.stat_reaching(|s| s.protected, before[1] + want),
        ];
        if after[0] < before[0] + want || after[1] < before[1] + want {
            return Err(format!(
                "{provider:?}: {empty_ones} connections shut down before keys, protected a {}..{} b {}..{}",
                before[0], after[0], before[1], after[1]
            ));
        }
        let fins = [a.stat(|s| s.fin_deferred), b.stat(|s| s.fin_deferred)];
        summary.push(format!(
            "{provider:?}: 22 connections exact, {} flows decrypted, {empty_ones} shut down before keys all keyed, FINs deferred a {} b {}",
            report.decrypted, fins[0], fins[1]
        ));
    }
    Ok(summary.join("; "))
}

/// Two pods on one node (pod-a and pod-a2 on node a), both ends keyed by
/// the same core and provider, whose two keying jobs (client and server)
/// meet in one provider. Node a's policy lists its own pods among the
/// selected peers; the plain port between the same pods is the control
/// (the policy leaves it plain). Captured on pod-a2's link, which carries
/// exactly the same-node traffic; run with OpenSSL and with TLSHub.
pub fn same_node() -> Result<String, String> {
    let mut summary = Vec::new();
    for provider in [ProviderKind::OpenSsl, ProviderKind::TlsHub] {
        let a_spec = NodeSpec {
            provider,
            same_node: true,
            ..NodeSpec::new("a")
        };
        let (a, b) = nodes(
            a_spec,
            NodeSpec {
                provider,
                ..NodeSpec::new("b")
            },
        )?;
        let local = |mode, size, io, port| App {
            mode,
            io,
            server: POD_A2,
            server_pod: "pod-a2",
            connections: 3,
            ..App::exchange(size, port)
        };
        let apps = [
            local("client-first", 1 << 20, "blocking", PROTECTED_PORT),
            local("server-first", 4096, "epoll", PROTECTED_PORT),
            local("half-close", 4096, "blocking", PROTECTED_PORT),
            local("client-first", 10_000, "blocking", PLAIN_PORT),
        ];
        let report =
            captured_exchanges_on(&format!("same-node-{provider:?}"), POD_A2_IF, &a, &b, &apps)?;
        if report.plain_flows_with_marker == 0 {
            return Err("the control flow's plaintext was not seen: the capture is blind".into());
        }
        // Both ends of every protected connection were keyed by node a.
        let keyed = a.stat_reaching(|s| s.protected, 18);
        if keyed < 18 {
            return Err(format!(
                "{provider:?}: node a protected {keyed} ends of 9 same-node connections, want 18"
            ));
        }
        if b.stat(|s| s.selected) != 0 {
            return Err("node b selected same-node traffic of node a".into());
        }
        summary.push(format!(
            "{provider:?}: 9 connections exact, {} flows decrypted, both ends keyed by node a ({keyed})",
            report.decrypted
        ));
    }
    Ok(format!(
        "{}; the plain port stayed plain",
        summary.join("; ")
    ))
}

/// `tlshub-testapp probe --what WHAT` from pod-a to pod-b's `port`: the
/// errno of each step (0: it succeeded).
fn probe(what: &str, port: u16) -> Result<Vec<(String, i64)>, String> {
    let target = format!("{}:{port}", super::topology::POD_B);
    let argv = [
        "tlshub-testapp",
        "probe",
        "--connect",
        &target,
        "--what",
        what,
    ];
    let out = process::command(Some("pod-a"), &argv)
        .output()
        .map_err(|e| format!("cannot run {argv:?}: {e}"))?;
    let report = super::support::json(&String::from_utf8_lossy(&out.stdout))?;
    let steps = report["probe"]
        .as_array()
        .ok_or_else(|| format!("probe {what}: no steps in {report}"))?;
    Ok(steps
        .iter()
        .map(|s| {
            (
                s["call"].as_str().unwrap_or_default().to_owned(),
                s["errno"].as_i64().unwrap_or(-1),
            )
        })
        .collect())
}

/// The rest of the socket API on selected sockets, each made by
/// `tlshub-testapp probe` with a payload that starts with the marker:
/// - `send(MSG_OOB)` and `send(MSG_ZEROCOPY)` are held until the keys are
///   in, then kTLS refuses them (`EOPNOTSUPP`): a clean error, no byte
///   out; to the plain port they succeed and the marker is on the wire
///   (the controls);
/// - `getsockopt(TCP_ZEROCOPY_RECEIVE)`, which would map the raw receive
///   queue into the app past both the gate and kTLS, fails with
///   `EOPNOTSUPP` before the keys and after; on the plain port it does not;
/// - a socket put in TCP repair mode and connected (no handshake; its
///   sequence numbers are the app's) to a selected peer is never
///   selected for keying: its write fails with `ECONNRESET`
///   (`repair_refused` counts it, `selected` does not move), and no marker
///   crosses.
pub fn unusual_socket_calls() -> Result<String, String> {
    const EOPNOTSUPP: i64 = 95;
    const ECONNRESET: i64 = 104;
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let mut servers = Vec::new();
    for port in [PROTECTED_PORT, PLAIN_PORT] {
        let listen = format!("0.0.0.0:{port}");
        let argv = [
            "tlshub-testapp",
            "server",
            "--listen",
            &listen,
            "--mode",
            "close-early",
            "--parallel",
            "--connections",
            "100",
        ];
        servers.push(process::spawn_ready(
            "pod-b",
            &argv,
            "listening",
            Duration::from_secs(10),
        )?);
    }
    let cap = Capture::start("unusual-socket-calls")?;
    let mut seen = Vec::new();
    let errno_of = |steps: &[(String, i64)], call: &str| {
        steps
            .iter()
            .find(|(c, _)| c.starts_with(call))
            .map_or(-1, |s| s.1)
    };
    for (what, call) in [("oob", "send(MSG_OOB)"), ("zerocopy", "send(MSG_ZEROCOPY)")] {
        let protected = probe(what, PROTECTED_PORT)?;
        let plain = probe(what, PLAIN_PORT)?;
        if errno_of(&protected, call) != EOPNOTSUPP || errno_of(&plain, call) != 0 {
            return Err(format!(
                "{call}: protected {protected:?} (want EOPNOTSUPP), plain {plain:?} (want success)"
            ));
        }
        seen.push(format!("{call} EOPNOTSUPP"));
    }
    let zc = "getsockopt(TCP_ZEROCOPY_RECEIVE)";
    let protected = probe("zerocopy-receive", PROTECTED_PORT)?;
    let plain = probe("zerocopy-receive", PLAIN_PORT)?;
    let refused = protected
        .iter()
        .filter(|(c, e)| c.starts_with(zc) && *e == EOPNOTSUPP)
        .count();
    if refused != 2 || plain.iter().any(|(_, e)| *e == EOPNOTSUPP) {
        return Err(format!(
            "{zc}: protected {protected:?} (want EOPNOTSUPP before and after keys), plain {plain:?} (want no EOPNOTSUPP)"
        ));
    }
    seen.push(format!("{zc} EOPNOTSUPP before and after keys"));
    let selected_before = a.stat_reaching(|s| s.selected, 3);
    let repair = probe("repair", PROTECTED_PORT)?;
    if errno_of(&repair, "connect") != 0 || errno_of(&repair, "write") != ECONNRESET {
        return Err(format!(
            "repair mode to the protected port: {repair:?} (want connect 0, write ECONNRESET)"
        ));
    }
    let refused = a.stat_reaching(|s| s.repair_refused, 1);
    let selected_after = a.stat(|s| s.selected);
    if refused != 1 || selected_after != selected_before {
        return Err(format!(
            "repair mode: repair_refused {refused} (want 1), selected {selected_before} -> {selected_after} (want unchanged)"
        ));
    }
    let plain_repair = probe("repair", PLAIN_PORT)?;
    if errno_of(&plain_repair, "connect") != 0 {
        return Err(format!("repair mode to the plain port: {plain_repair:?}"));
    }
    seen.push("repair-mode socket refused, never keyed".into());
    drop(servers);
    let report = super::wire_check::check_wire_allowing_unkeyed(&cap.finish()?, &a, &b, true)?;
    if report.plain_flows_with_marker < 2 {
        return Err(format!(
            "the plain controls' marker was seen in {} flows, want at least 2: the capture is blind",
            report.plain_flows_with_marker
        ));
    }
    let zc_refused = [
        a.stat(|s| s.zerocopy_receive_refused),
        b.stat(|s| s.zerocopy_receive_refused),
    ];
    Ok(format!(
        "{}; no marker in {} protected flows, the plain controls showed it; zerocopy receive refused a {} b {}",
        seen.join(", "),
        report.protected_flows,
        zc_refused[0],
        zc_refused[1]
    ))
}
