//! Event loops under the gate: a non-blocking socket whose keys are not in
//! is answered `EAGAIN` (nobody is stopped), and the app must be woken
//! once they are, with every kind of readiness wait.

use std::time::{Duration, Instant};

use super::node::{Node, NodeSpec, PLAIN_PORT, PROTECTED_PORT, ProviderKind};
use super::process;
use super::support::*;
use super::wire_check::*;
use crate::failed;
use crate::vm::outcome::Outcome;

/// Level-triggered epoll, edge-triggered epoll and poll(2), both orders,
/// 1 byte and 1 MiB, with the OpenSSL provider (its in-band handshake
/// keeps every app's first call waiting): every connection's app on both
/// nodes is answered EAGAIN and woken, and no process is stopped.
pub fn never_stopped() -> Outcome {
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let mut apps = Vec::new();
    for io in ["epoll-edge", "epoll", "poll"] {
        for (mode, size, send, recv) in [
            ("client-first", 1, "write", "read"),
            ("server-first", 1 << 20, "sendmsg", "recv"),
            ("client-first", 1 << 20, "writev", "recvmsg"),
            ("server-first", 1, "send", "read"),
        ] {
            apps.push(App {
                mode,
                size,
                send,
                recv,
                io,
                ..App::exchange(1, PROTECTED_PORT)
            });
        }
    }
    let conns = apps.len() as u64;
    apps.push(App::exchange(10_000, PLAIN_PORT));
    let report = with_ktls_sockets(2 * conns, || {
        captured_exchanges("event-loops", &a, &b, &apps)
    })
    .map_err(|e| {
        e.map_message(|m| format!("{m}; node a: {}; node b: {}", trouble(&a), trouble(&b)))
    })?;
    report.expect_at_least(1, 0)?;
    let waits = [
        a.stat_reaching(|s| s.gate_waits, conns),
        b.stat_reaching(|s| s.gate_waits, conns),
    ];
    let stops = [a.stat(|s| s.gate_stops), b.stat(|s| s.gate_stops)];
    let eagain = [a.stat(|s| s.gate_eagain), b.stat(|s| s.gate_eagain)];
    if stops != [0, 0] || waits != [conns, conns] {
        return Err(failed!(
            "{conns} connections: processes stopped a {} b {}, connections answered EAGAIN a {} b {} (want 0 stopped, all answered)",
            stops[0],
            stops[1],
            waits[0],
            waits[1]
        ));
    }
    Ok(format!(
        "{conns} connections (epoll level and edge, poll; both orders; 1 B and 1 MiB) exact both ways; {} flows TLS-only and decrypted; control plain; 0 processes stopped; every app answered EAGAIN and woken (calls answered EAGAIN: a {} b {})",
        report.protected_flows, eagain[0], eagain[1]
    ))
}

/// A real event-loop runtime: `tlshub-hold server` is a tokio
/// current-thread runtime serving every connection from one thread (as
/// `epoll` with `EPOLLET`); 20 blocking clients open a connection each,
/// exchange exact bytes, and keep it open while the next ones come. The
/// server's node must stop nobody, and its runtime must have been told
/// `EAGAIN` and woken; the clients' node stops its blocking clients.
pub fn tokio_server_never_stopped() -> Outcome {
    const COUNT: u64 = 20;
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let listen = format!("0.0.0.0:{PROTECTED_PORT}");
    let _server = process::spawn_ready(
        "pod-b",
        &["tlshub-hold", "server", "--listen", &listen],
        "listening",
        Duration::from_secs(10),
    )?;
    let connect = format!("{}:{PROTECTED_PORT}", super::topology::POD_B);
    let count = COUNT.to_string();
    let out = process::finish(
        process::spawn_app(
            "pod-a",
            &[
                "tlshub-hold",
                "client",
                "--connect",
                &connect,
                "--count",
                &count,
            ],
        )?,
        Duration::from_secs(120),
    )?;
    let r: crate::hold::HoldReport = last_report(&out)?;
    if !r.complete() {
        return Err(failed!("tlshub-hold client: {r:?}"));
    }
    let keyed = b.stat_reaching(|s| s.protected, COUNT);
    let stops = b.stat(|s| s.gate_stops);
    let waits = b.stat(|s| s.gate_waits);
    if keyed != COUNT || stops != 0 || waits == 0 {
        return Err(failed!(
            "node b (the tokio server's): {keyed} of {COUNT} keyed, {stops} processes stopped, {waits} connections answered EAGAIN (want all keyed, 0 stopped, some answered)"
        ));
    }
    Ok(format!(
        "{COUNT} connections to a tokio server exact both ways and still working after all were open; server node: 0 processes stopped, {waits} connections answered EAGAIN and woken; client node (blocking clients): {} stops",
        a.stat(|s| s.gate_stops)
    ))
}

/// The race in which an edge-triggered reader loses its only wakeup: the
/// peer's records are already queued when this side's receive key goes
/// in, so kTLS signals them once, from inside the installation, before
/// the core opens the gate. The reader's node has its provider stopped for
/// 1.5 s so that the records are surely queued first; then the other way
/// round. Both must read every byte, and nobody is stopped.
pub fn edge_reader_with_records_queued() -> Outcome {
    let spec = |name| {
        let mut s = NodeSpec::new(name);
        s.provider = ProviderKind::ExamplePsk;
        s.key_timeout_ms = 5000;
        s
    };
    let (a, b) = nodes(spec("a"), spec("b"))?;
    let mut out = Vec::new();
    for (mode, reader_node, reader) in [
        ("server-first", &a, "client"),
        ("client-first", &b, "server"),
    ] {
        let app = App {
            mode,
            io: "epoll-edge",
            ..App::exchange(200_000, PROTECTED_PORT)
        };
        let (took, result) =
            with_provider_stopped(reader_node, Duration::from_millis(1500), || {
                let t = Instant::now();
                let r = run_pair(&app, &[], Duration::from_secs(60));
                (t.elapsed(), r)
            });
        let (s, c) = result?;
        both_ok(&app, &s, &c)?;
        if took < Duration::from_millis(1400) {
            return Err(failed!(
                "{mode}: done in {took:?}, before the reader's provider was continued: the records were not queued first"
            ));
        }
        out.push(format!(
            "{mode}: the {reader} read 200,000 bytes queued before its keys ({:.1}s)",
            took.as_secs_f64()
        ));
    }
    let stops = [a.stat(|s| s.gate_stops), b.stat(|s| s.gate_stops)];
    // Each reader was told EAGAIN (its keys were 1.5 s late); a writer may
    // find its keys in already.
    let waits = [
        a.stat_reaching(|s| s.gate_waits, 1),
        b.stat_reaching(|s| s.gate_waits, 1),
    ];
    if stops != [0, 0] || waits.contains(&0) {
        return Err(failed!(
            "processes stopped a {} b {}, connections answered EAGAIN a {} b {} (want 0 stopped, at least 1 answered each)",
            stops[0],
            stops[1],
            waits[0],
            waits[1]
        ));
    }
    // What closes the race: the gate counts a socket as open once kTLS's
    // receive method is on it, which it learns from the first keyed socket.
    for (name, node) in [("a", &a), ("b", &b)] {
        if !node
            .core_log()
            .contains("the gate learned kTLS's receive method")
        {
            return Err(failed!(
                "node {name}'s gate did not learn kTLS's receive method"
            ));
        }
    }
    Ok(format!(
        "{}; 0 processes stopped; both gates learned kTLS's receive method",
        out.join("; ")
    ))
}

/// An event-loop server keyed from establishment (TLSHub: its keys are
/// ready when `accept()` returns, so the install follows at once) answers
/// each client as soon as kTLS is on, which the gate allows before the
/// core opens it; the client reads the answer and closes. Its FIN reaches
/// the server while the gate is still formally closed, and was dropped
/// there as if it came before the keys: the client retransmitted it one
/// timeout (200 ms) later, and the server, waiting for that end, accepted
/// its next connection late (about one connection in five). None may be
/// deferred now, over 60 sequential echo connections after a first one
/// (which teaches the gate kTLS's receive method).
pub fn close_after_answer_not_deferred() -> Outcome {
    const CONNS: u32 = 60;
    let spec = |name| NodeSpec::with_provider(name, ProviderKind::TlsHub);
    let (a, b) = nodes(spec("a"), spec("b"))?;
    let app = |connections| App {
        mode: "echo",
        io: "epoll-edge",
        connections,
        ..App::exchange(1, PROTECTED_PORT)
    };
    let (s, c) = run_pair(&app(1), &[], Duration::from_secs(60))?;
    both_ok(&app(1), &s, &c)?;
    b.stat_reaching(|s| s.protected, 1);
    let deferred_before = b.stat(|s| s.fin_deferred);
    let t = Instant::now();
    let (s, c) = run_pair(&app(CONNS), &[], Duration::from_secs(120))?;
    both_ok(&app(CONNS), &s, &c)?;
    let took = t.elapsed();
    let protected = b.stat_reaching(|s| s.protected, u64::from(CONNS) + 1);
    // The BPF counters reach the stats file about once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let deferred = b.stat(|s| s.fin_deferred) - deferred_before;
    let stops = [a.stat(|s| s.gate_stops), b.stat(|s| s.gate_stops)];
    if deferred != 0 || stops != [0, 0] || protected < u64::from(CONNS) + 1 {
        return Err(failed!(
            "{CONNS} echo connections in {took:?}: server node protected {protected}, deferred {deferred} client FINs (want 0), processes stopped a {} b {} (want 0); node b: {}",
            stops[0],
            stops[1],
            trouble(&b)
        ));
    }
    Ok(format!(
        "{CONNS} sequential echo connections between edge-triggered epoll apps with TLSHub (keyed from establishment) exact in {:.1}s; 0 client FINs deferred on the server node, 0 processes stopped",
        took.as_secs_f64()
    ))
}

/// Runs `f` while `node`'s provider is stopped (SIGSTOP), continuing it
/// after `stopped_for` whatever `f` does.
fn with_provider_stopped<T>(node: &Node, stopped_for: Duration, f: impl FnOnce() -> T) -> T {
    let pid = node.provider_pid(ProviderKind::ExamplePsk).to_string();
    let _ = process::run(None, &["kill", "-STOP", &pid]);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(stopped_for);
            let _ = process::run(None, &["kill", "-CONT", &pid]);
        });
        f()
    })
}

/// The Go runtime (`tlshub-goapp`, built from `tests/go/goapp` with
/// Debian's Go): every socket non-blocking in its netpoller (edge-triggered
/// epoll), goroutines on several threads, and bytes moved as Go moves
/// them. With OpenSSL (every first call waits for the in-band handshake)
/// and TLSHub:
/// - a Go client and a Go server, 8 connections at once, sending with
///   `Write`;
/// - the same, both sending from a file with `io.Copy`, which is
///   `sendfile(2)`: the client's right after connecting, so before its keys
///   (on 6.1 it reaches the socket only through the file hook);
/// - a Go proxy in each pod, so the protected connection between them is
///   written and read with `splice(2)` in both directions (`io.Copy`
///   between two TCP connections): the test apps at either end talk to
///   their pod's proxy over loopback, 4 connections at once.
///
/// Every exchange exact both ways, every protected flow TLS only and
/// decrypted, the plain control showing its marker, and no process
/// stopped on either node: Go's sockets are answered `EAGAIN` and woken.
pub fn go_runtime_never_stopped() -> Outcome {
    const DIRECT: u32 = 8;
    const PROXIED: u32 = 4;
    const SIZE: usize = 300_000;
    let mut summary = Vec::new();
    for provider in [ProviderKind::OpenSsl, ProviderKind::TlsHub] {
        let (a, b) = nodes_with_provider(provider)?;
        let cap = Capture::start(&format!("go-{provider:?}"))?;
        let listen = format!("0.0.0.0:{PROTECTED_PORT}");
        let connect = format!("{}:{PROTECTED_PORT}", super::topology::POD_B);
        for send in ["write", "sendfile"] {
            run_go_pair(&listen, &connect, DIRECT, SIZE, send)
                .map_err(|e| e.context(format!("sending with {send}")))?;
        }
        // The proxies: pod-a's forwards its loopback port to pod-b's, which
        // forwards to the test app's server on pod-b's loopback.
        let app = App {
            proxy: Some(("127.0.0.1", GO_PROXY_PORT)),
            connections: PROXIED,
            parallel: true,
            ..App::exchange(SIZE, GO_BACKEND_PORT)
        };
        let (proxied, proxies) = (PROXIED.to_string(), format!("127.0.0.1:{GO_PROXY_PORT}"));
        let backend = format!("127.0.0.1:{GO_BACKEND_PORT}");
        let _far = process::spawn_ready(
            "pod-b",
            &[
                "tlshub-goapp",
                "proxy",
                "-listen",
                &listen,
                "-connect",
                &backend,
                "-conns",
                &proxied,
            ],
            "listening",
            Duration::from_secs(10),
        )?;
        let _near = process::spawn_ready(
            "pod-a",
            &[
                "tlshub-goapp",
                "proxy",
                "-listen",
                &proxies,
                "-connect",
                &connect,
                "-conns",
                &proxied,
            ],
            "listening",
            Duration::from_secs(10),
        )?;
        let (s, c) = run_pair(&app, &[], Duration::from_secs(90))?;
        both_ok(&app, &s, &c)?;
        plain_control()?;
        let protected = 2 * DIRECT + PROXIED;
        let report = check_wire_with_control(&cap.finish()?, &a, &b)?;
        if report.protected_flows != 2 * protected as usize
            || report.decrypted != 2 * protected as usize
        {
            return Err(failed!(
                "{provider:?}: {protected} protected connections but {report:?}"
            ));
        }
        let stops = [a.stat(|s| s.gate_stops), b.stat(|s| s.gate_stops)];
        let waits = [a.stat(|s| s.gate_waits), b.stat(|s| s.gate_waits)];
        let keyed = [
            a.stat_reaching(|s| s.protected, u64::from(protected)),
            b.stat_reaching(|s| s.protected, u64::from(protected)),
        ];
        if stops != [0, 0] || keyed != [u64::from(protected); 2] {
            return Err(failed!(
                "{provider:?}: processes stopped a {} b {}, keyed a {} b {} of {protected} (want none stopped, all keyed)",
                stops[0],
                stops[1],
                keyed[0],
                keyed[1]
            ));
        }
        if provider == ProviderKind::OpenSsl && waits.contains(&0) {
            return Err(failed!(
                "{provider:?}: connections answered EAGAIN a {} b {} (want some on both nodes: every first call waits for the in-band handshake)",
                waits[0],
                waits[1]
            ));
        }
        summary.push(format!(
            "{provider:?}: {protected} connections exact ({DIRECT} with Write, {DIRECT} with sendfile both ways, {PROXIED} spliced through two proxies), {} flows decrypted, 0 stopped, EAGAIN waits a {} b {}",
            report.decrypted, waits[0], waits[1]
        ));
    }
    Ok(format!("{}; the control stayed plain", summary.join("; ")))
}

/// Pod-a's Go proxy listens on its loopback here.
const GO_PROXY_PORT: u16 = 9200;
/// The test app's server behind pod-b's Go proxy, on pod-b's loopback.
const GO_BACKEND_PORT: u16 = 9100;
