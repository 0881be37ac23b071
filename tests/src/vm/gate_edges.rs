//! The gate's edges in the socket API: Fast Open, half-close and
//! shutdown, same-node pairs, a reconnect during keying, apps as a pod
//! runs them and as a debugging tool traces them. The unusual
//! calls (out-of-band data, zero-copy, repair) are in `gate_calls`.

use std::time::Duration;

use crate::app_report::{AppReport, FastOpenOutcome};
use crate::failed;
use crate::vm::outcome::{Failure, Outcome};

use super::node::{NodeSpec, PLAIN_PORT, PROTECTED_PORT, ProviderKind};
use super::support::{App, Launch, PodSetting, both_ok, nodes, nodes_with_provider, run_pair};
use super::topology::{POD_A2, POD_A2_IF, WIRE_IF};
use super::wire_check::{
    Capture, captured_exchanges, captured_exchanges_checked, captured_exchanges_on, check_wire,
    check_wire_allowing_unkeyed, tcp_ext,
};

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
pub fn fast_open() -> Outcome {
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let refused_before = a.stat(|s| s.fastopen_refused);
    let cap = Capture::start("fastopen")?;
    let run = |port, how: &str, want: FastOpenOutcome| -> Result<(), Failure> {
        let app = App::exchange(20_000, port);
        let (s, c) = run_pair(&app, &["--fastopen", how], Duration::from_secs(60))?;
        both_ok(&app, &s, &c)?;
        if c.fastopen != Some(want) {
            return Err(failed!(
                "--fastopen {how} to port {port}: the client reports {:?}, want {want:?}",
                c.fastopen
            ));
        }
        Ok(())
    };
    run(PLAIN_PORT, "sendto", FastOpenOutcome::Sent)?;
    run(PROTECTED_PORT, "sendto", FastOpenOutcome::Refused)?;
    let in_syn = {
        // Server-side Fast Open in pod-b (0x403: client, server, and no
        // `TCP_FASTOPEN` needed on the listener); the default is 1.
        let _server = PodSetting::sysctl("pod-b", "net/ipv4/tcp_fastopen", "1027")?;
        let before = tcp_ext("pod-a", "TCPFastOpenActive");
        run(PLAIN_PORT, "connect", FastOpenOutcome::Sent)?;
        run(PLAIN_PORT, "connect", FastOpenOutcome::Sent)?;
        let in_syn = tcp_ext("pod-a", "TCPFastOpenActive") - before;
        if in_syn == 0 {
            return Err(
                "no Fast Open SYN carried data to the plain port: the cookie case was not exercised"
                    .into(),
            );
        }
        run(PROTECTED_PORT, "connect", FastOpenOutcome::Refused)?;
        in_syn
    };
    let report = check_wire(&cap.finish()?, &a, &b)?;
    if report.protected_flows != 4 || report.decrypted != 4 {
        return Err(failed!(
            "2 protected connections (the fallbacks) but {report:?}"
        ));
    }
    report.expect_at_least(3, 0)?;
    // The stats file is rewritten once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let refused = a.stat(|s| s.fastopen_refused) - refused_before;
    if refused != 2 {
        return Err(failed!(
            "node a counted {refused} Fast Open refusals, want 2"
        ));
    }
    Ok(format!(
        "sendto(MSG_FASTOPEN) and TCP_FASTOPEN_CONNECT (cookie cached, {in_syn} plain SYN(s) carried data) to the protected port refused with EOPNOTSUPP, fell back, exact, 4 flows decrypted; the same calls to the plain port sent their data in clear (controls)"
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
pub fn half_close() -> Outcome {
    let mut summary = Vec::new();
    for provider in [ProviderKind::OpenSsl, ProviderKind::TlsHub] {
        let (a, b) = nodes_with_provider(provider)?;
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
        report.expect_at_least(1, 0)?;
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
            return Err(failed!(
                "{provider:?}: {empty_ones} connections shut down before keys, protected a {}..{} b {}..{}",
                before[0],
                after[0],
                before[1],
                after[1]
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

/// pod-a's link sends segments of at most 4 KiB (`gso_max_size`; the
/// default is 64 KiB) until dropped, so a kTLS record spans several and
/// TCP checks for room in the middle of one.
fn small_segments_from_pod_a() -> Result<PodSetting, Failure> {
    PodSetting::command(
        "pod-a",
        &["ip", "link", "set", "pa", "gso_max_size", "4096"],
        &["ip", "link", "set", "pa", "gso_max_size", "65536"],
    )
}

/// Runs `control` (an exchange with kTLS installed by the apps
/// themselves, `--ktls-fixed-key`, no agent) and says how kTLS alone
/// fared: the shutdown scenarios report it, they do not require it.
fn ktls_alone(control: &App, limit: Duration) -> Result<String, Failure> {
    let (s, c) = run_pair(control, &[], limit)?;
    Ok(if s.ok && c.ok {
        format!(
            "kTLS alone (fixed key, no agent) lost nothing in {} connections",
            control.connections
        )
    } else {
        format!(
            "kTLS alone (fixed key, no agent) failed after {} exact connections: the server got \"{}\", the client \"{}\"",
            s.connections,
            s.error.as_deref().unwrap_or(""),
            c.error.as_deref().unwrap_or("")
        )
    })
}

/// Non-blocking clients that write 4 MiB each and half-close at once,
/// after their keys are in. kTLS takes a write as soon as it has
/// encrypted the record; a record TCP has no room for waits in kTLS's own
/// queue until TCP's buffer drains, and Linux's `shutdown()` queues the
/// FIN behind what TCP holds, not behind kTLS's queue: the FIN overtakes
/// the record, kTLS fails the connection with `EPIPE` when it pushes it,
/// and the peer reads a short stream. The gate holds such a `shutdown()`
/// until the records are in TCP (ARCHITECTURE.md, "The gate").
///
/// TCP checks for room only when it starts a new segment, so a record is
/// left partly unsent when it spans segments while TCP is full. Here:
/// pod-a's link sends small segments (`gso_max_size` 4 KiB),
/// `tcp_notsent_lowat` = 16 KiB in pod-a (a common tuning, also set per
/// socket by HTTP/2 servers) counts TCP full once a record's worth waits,
/// and pod-b's small receive buffer keeps data waiting. The same exchange
/// with kTLS installed by the apps themselves (fixed key, no agent) is
/// the control: it shows whether this kernel loses the record without
/// the gate (reported, not required).
pub fn shutdown_after_full_send_buffer() -> Outcome {
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let _lowat = PodSetting::sysctl("pod-a", "net/ipv4/tcp_notsent_lowat", "16384")?;
    let _small_segments = small_segments_from_pod_a()?;
    let _slow_reader = PodSetting::sysctl("pod-b", "net/ipv4/tcp_rmem", "4096 32768 32768")?;
    let app = |port, ktls_fixed_key| App {
        mode: "half-close",
        io: "epoll",
        connections: 10,
        ktls_fixed_key,
        ..App::exchange(4 << 20, port)
    };
    let control = ktls_alone(&app(PLAIN_PORT, true), Duration::from_secs(120))?;
    // About one connection in five leaves a record behind here, so the
    // rounds go on (up to 4 of 10 connections each) until a shutdown() was
    // held. Captured on the node link, with a plain exchange as the
    // capture's control: every protected flow must carry only TLS records
    // that decrypt to the apps' bytes.
    let protected = app(PROTECTED_PORT, false);
    let before = a.stat(|s| s.unsent_holds);
    let cap = Capture::start("shutdown-after-full-send-buffer")?;
    let plain = App::exchange(10_000, PLAIN_PORT);
    let (s, c) = run_pair(&plain, &[], Duration::from_secs(60))?;
    both_ok(&plain, &s, &c)?;
    let mut rounds = 0;
    let mut holds = 0;
    while rounds < 4 && holds == 0 {
        rounds += 1;
        let (s, c) = run_pair(&protected, &[], Duration::from_secs(120))?;
        both_ok(&protected, &s, &c)?;
        holds = a.stat_reaching(|s| s.unsent_holds, before + 1) - before;
    }
    let report = check_wire(&cap.finish()?, &a, &b)?;
    let expired = a.stat(|s| s.unsent_expired);
    if expired > 0 {
        return Err(failed!(
            "{expired} shutdown() hold(s) expired although pod-b reads everything"
        ));
    }
    if holds == 0 {
        return Err(failed!(
            "40 connections exact but no shutdown() was held for unsent records: the scenario no longer makes kTLS leave records behind ({control})"
        ));
    }
    let connections = rounds * 10;
    report.expect_at_least(1, 0)?;
    if report.protected_flows != 2 * connections || report.decrypted != 2 * connections {
        return Err(failed!(
            "{connections} protected connections but {report:?}"
        ));
    }
    Ok(format!(
        "{connections} protected connections of 4 MiB each way exact, {holds} shutdown() hold(s) for kTLS's unsent records, {} flows TLS-only and decrypted; {control}",
        report.decrypted
    ))
}

/// Apps that cork every write with `MSG_MORE` and leave the flush to
/// their `shutdown()` (`--send send-more`, half-close both ways): TCP
/// sends what waits when the FIN goes. kTLS keeps such bytes in its open
/// record, which only a write without `MSG_MORE` closes; a FIN does not,
/// so the peer would read a short stream. The gate holds such a
/// `shutdown()` and the core closes the open record first
/// (ARCHITECTURE.md, "The gate"). Sizes: 4 KiB (all of it in the open
/// record), 100,000 bytes (six full records and an open one), and
/// exactly 16 KiB (one full record, which kTLS sends by itself: nothing
/// to hold). The same exchange with kTLS installed by the apps themselves
/// is the control (reported, not required).
pub fn shutdown_after_more_writes() -> Outcome {
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let app = |size, io, port, ktls_fixed_key| App {
        mode: "half-close",
        send: "send-more",
        io,
        connections: 4,
        ktls_fixed_key,
        ..App::exchange(size, port)
    };
    let control = ktls_alone(
        &app(10_000, "blocking", PLAIN_PORT, true),
        Duration::from_secs(60),
    )?;
    let apps = [
        app(4096, "blocking", PROTECTED_PORT, false),
        app(100_000, "epoll", PROTECTED_PORT, false),
        app(16_384, "blocking", PROTECTED_PORT, false),
        // The control: unselected, so its marker must be seen in clear.
        app(10_000, "blocking", PLAIN_PORT, false),
    ];
    let before = [
        a.stat(|s| s.open_record_holds),
        b.stat(|s| s.open_record_holds),
    ];
    let report = captured_exchanges("shutdown-after-more-writes", &a, &b, &apps)?;
    report.expect_at_least(1, 0)?;
    // Each end of the 8 connections whose last record was open at its
    // shutdown() was held at least once (again if the restarted call came
    // before the core had closed the record).
    let holds = [
        a.stat_reaching(|s| s.open_record_holds, before[0] + 8) - before[0],
        b.stat_reaching(|s| s.open_record_holds, before[1] + 8) - before[1],
    ];
    if holds.iter().any(|&h| h < 8) {
        return Err(failed!(
            "shutdown() holds for an open record: a {} b {}, want at least 8 on each (control: {control})",
            holds[0],
            holds[1]
        ));
    }
    let expired = [a.stat(|s| s.unsent_expired), b.stat(|s| s.unsent_expired)];
    if expired != [0, 0] {
        return Err(failed!(
            "shutdown() holds expired (a {}, b {}) although both ends read everything",
            expired[0],
            expired[1]
        ));
    }
    Ok(format!(
        "12 protected connections corked with MSG_MORE and half-closed both ways exact, {} flows decrypted; shutdown() holds for an open record a {} b {}; {control}",
        report.decrypted, holds[0], holds[1]
    ))
}

/// The bound on that hold: a client fills its socket towards a server
/// that reads nothing for 12 s until no write succeeds for a second, and
/// half-closes (`tlshub-testapp --mode fill-half-close`). kTLS's last
/// record cannot reach TCP while the peer's window is closed, so the
/// `shutdown()` is held, and after 5 s (`TLSHUB_UNSENT_HOLD_MAX_MS`) it
/// must pass: a peer that stops reading must not keep the app stopped.
/// Small segments,
/// `tcp_notsent_lowat` = 4 KiB in pod-a and an 8 KiB receive buffer in
/// pod-b make the last record span TCP's limit.
pub fn shutdown_hold_is_bounded() -> Outcome {
    let (a, _b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let _lowat = PodSetting::sysctl("pod-a", "net/ipv4/tcp_notsent_lowat", "4096")?;
    let _small_segments = small_segments_from_pod_a()?;
    let _small_window = PodSetting::sysctl("pod-b", "net/ipv4/tcp_rmem", "4096 8192 8192")?;
    let app = App {
        mode: "fill-half-close",
        ..App::exchange(1, PROTECTED_PORT)
    };
    let before = [a.stat(|s| s.unsent_holds), a.stat(|s| s.unsent_expired)];
    let (_s, c) = run_pair(&app, &[], Duration::from_secs(120))?;
    if !c.ok {
        return Err(failed!("the client failed: {c}"));
    }
    let ms = c.shutdown_ms.unwrap_or(0);
    let expired = a.stat_reaching(|s| s.unsent_expired, before[1] + 1) - before[1];
    let holds = a.stat(|s| s.unsent_holds) - before[0];
    if expired != 1 || !(5_000..11_000).contains(&ms) {
        return Err(failed!(
            "shutdown() took {ms} ms with {holds} hold(s) and {expired} expired; want one expiry after 5 to 11 s (client {c})"
        ));
    }
    Ok(format!(
        "{} bytes written to a peer that reads nothing; shutdown() held {ms} ms ({holds} stops), then let through and counted expired",
        c.bytes_sent
    ))
}

/// Two pods on one node (pod-a and pod-a2 on node a), both ends keyed by
/// the same core and provider, whose two keying jobs (client and server)
/// meet in one provider. Node a's policy lists its own pods among the
/// selected peers; the plain port between the same pods is the control
/// (the policy leaves it plain). Captured on pod-a2's link, which carries
/// exactly the same-node traffic; run with OpenSSL and with TLSHub.
pub fn same_node() -> Outcome {
    let mut summary = Vec::new();
    for provider in [ProviderKind::OpenSsl, ProviderKind::TlsHub] {
        let a_spec = NodeSpec {
            same_node: true,
            ..NodeSpec::with_provider("a", provider)
        };
        let (a, b) = nodes(a_spec, NodeSpec::with_provider("b", provider))?;
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
        report.expect_at_least(1, 0)?;
        // Both ends of every protected connection were keyed by node a.
        let keyed = a.stat_reaching(|s| s.protected, 18);
        if keyed < 18 {
            return Err(failed!(
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

/// One socket, several connections: each client connects, disconnects at
/// once with `connect(AF_UNSPEC)` while the first connection's keys are
/// being made, connects the same socket (same cookie) again and runs its
/// exchange there (`tlshub-testapp --reconnect`). Keys made for the first
/// connection must never protect the second: every exchange that completes
/// is exact, an attempt may only fail cleanly (an I/O error; the test app
/// then tries a fresh socket, three times at most), no marker crosses on a
/// protected flow, every keyed flow decrypts with the keys of its own
/// connection, and a plain control shows its marker. Node a must have
/// selected at least two connections per client socket (so the reconnects
/// happened on selected sockets). Run with OpenSSL (the first connection's
/// handshake is on the wire when it is cut) and TLSHub (keys from the
/// first connection's ISNs are ready within milliseconds).
pub fn reconnect_during_keying() -> Outcome {
    const CLIENTS: u32 = 6;
    let mut summary = Vec::new();
    for provider in [ProviderKind::OpenSsl, ProviderKind::TlsHub] {
        let (a, b) = nodes_with_provider(provider)?;
        let cap = Capture::start(&format!("reconnect-{provider:?}"))?;
        let app = App {
            reconnect: true,
            connections: CLIENTS,
            ..App::exchange(100_000, PROTECTED_PORT)
        };
        let (server, client) = run_pair(&app, &[], Duration::from_secs(120))?;
        both_ok(&app, &server, &client)?;
        let control = App::exchange(10_000, PLAIN_PORT);
        let (s, c) = run_pair(&control, &[], Duration::from_secs(60))?;
        both_ok(&control, &s, &c)?;
        let wire = check_wire_allowing_unkeyed(&cap.finish()?, &a, &b, true)?;
        wire.expect_at_least(1, 0)?;
        let selected = a.stat(|s| s.selected);
        let refused = client.disconnect_refused;
        if selected < 2 * u64::from(CLIENTS) - refused {
            return Err(failed!(
                "{provider:?}: node a selected {selected} connections for {CLIENTS} reconnecting clients ({refused} disconnects refused); want two per client"
            ));
        }
        summary.push(format!(
            "{provider:?}: {CLIENTS} exchanges exact after reconnecting ({} attempts failed cleanly, {refused} disconnects refused as already keyed); server connections failed cleanly {}; {} flows decrypted, {} unkeyed; stale keying results a {} b {}; failures a {:?}",
            client.failed_cleanly,
            server.failed_cleanly,
            wire.decrypted,
            wire.unkeyed_flows,
            a.stat(|s| s.stale_outcomes),
            b.stat(|s| s.stale_outcomes),
            a.stats().map(|s| s.failed).unwrap_or_default(),
        ));
    }
    Ok(format!("{}; the control stayed plain", summary.join("; ")))
}

/// Apps as a pod runs them: each end is PID 1 of a pid namespace of its
/// own, as uid 65534 with no capabilities ([`Launch::Contained`]). A
/// namespace's PID 1 ignores every signal it has no handler for when the
/// signal comes from inside the namespace, so this shows that the gate's
/// stop reaches it (the kernel sends it, which the rule does not cover)
/// and that the core finds, takes from and continues a process by its pid
/// outside the namespace. Blocking apps in both orders (stopped by the
/// gate) and an edge-triggered epoll app (answered `EAGAIN`), with OpenSSL
/// (every app's first call waits for the in-band handshake, so both nodes
/// must stop someone) and TLSHub; the plain control runs contained too.
/// Every report must say pid 1 and uid 65534.
pub fn contained_apps() -> Outcome {
    let mut summary = Vec::new();
    for provider in [ProviderKind::OpenSsl, ProviderKind::TlsHub] {
        let (a, b) = nodes_with_provider(provider)?;
        let contained = |mode, size, io, port| App {
            mode,
            io,
            launch: Launch::Contained,
            ..App::exchange(size, port)
        };
        let apps = [
            contained("client-first", 10_000, "blocking", PROTECTED_PORT),
            contained("server-first", 1 << 20, "blocking", PROTECTED_PORT),
            contained("client-first", 1 << 20, "epoll-edge", PROTECTED_PORT),
            contained("client-first", 10_000, "blocking", PLAIN_PORT),
        ];
        let as_a_pod = |s: &AppReport, c: &AppReport| {
            if [s.pid, c.pid] == [1, 1] && [s.uid, c.uid] == [65534, 65534] {
                Ok(())
            } else {
                Err(failed!(
                    "server pid {} uid {}, client pid {} uid {} (want pid 1, uid 65534)",
                    s.pid,
                    s.uid,
                    c.pid,
                    c.uid
                ))
            }
        };
        let report = captured_exchanges_checked(
            &format!("contained-{provider:?}"),
            WIRE_IF,
            &a,
            &b,
            &apps,
            as_a_pod,
        )?;
        let stops = [a.stat(|s| s.gate_stops), b.stat(|s| s.gate_stops)];
        let waits = [a.stat(|s| s.gate_waits), b.stat(|s| s.gate_waits)];
        if provider == ProviderKind::OpenSsl && (stops.contains(&0) || waits.contains(&0)) {
            return Err(failed!(
                "{provider:?}: processes stopped a {} b {}, connections answered EAGAIN a {} b {} (want some of each on both nodes)",
                stops[0],
                stops[1],
                waits[0],
                waits[1]
            ));
        }
        summary.push(format!(
            "{provider:?}: 3 connections exact, {} flows decrypted, stops a {} b {}, EAGAIN waits a {} b {}",
            report.decrypted, stops[0], stops[1], waits[0], waits[1]
        ));
    }
    Ok(format!(
        "apps as PID 1 of their own pid namespaces, uid 65534: {}; the contained plain control stayed plain",
        summary.join("; ")
    ))
}

/// What the strace trace of an app of `role` shows ([`Launch::trace_file`]).
#[derive(Debug, Default)]
struct TracedHolds {
    /// `--- SIGSTOP ...` lines: stops the tracer saw.
    stops: u64,
    /// System calls answered `ERESTARTSYS`.
    restarts: u64,
    /// The first `SIGSTOP` line, as an example for the report.
    first_stop: Option<String>,
}

impl TracedHolds {
    fn read(role: &str) -> Result<Self, Failure> {
        let path = Launch::trace_file(role);
        let text = std::fs::read_to_string(path).map_err(|e| failed!("no trace at {path}: {e}"))?;
        let lines = |what: &str| {
            let n = text.lines().filter(|l| l.contains(what)).count();
            u64::try_from(n).unwrap_or(u64::MAX)
        };
        Ok(Self {
            stops: lines("--- SIGSTOP "),
            restarts: lines("ERESTARTSYS"),
            first_stop: text
                .lines()
                .find(|l| l.contains("--- SIGSTOP "))
                .map(str::to_owned),
        })
    }

    fn add(&mut self, other: Self) {
        self.stops += other.stops;
        self.restarts += other.restarts;
        self.first_stop = self.first_stop.take().or(other.first_stop);
    }
}

/// Apps as an operator looks into them on a protected node: both ends run
/// under a ptrace-based tool, which sees every signal the app gets before
/// the app does and decides what becomes of it.
/// - `strace -f` ([`Launch::Strace`]) hands the gate's `SIGSTOP` on, so the
///   app stops as it would untraced; its trace must show the held calls
///   (answered `ERESTARTSYS`, restarted after `SIGCONT`) and no more stops
///   than the gate counted.
/// - gdb passing `SIGSTOP` and `SIGCONT` on ([`Launch::Gdb`], as an operator
///   must set it or stop at every hold): gdb keeps `SIGSTOP` for itself, so
///   the app is not stopped; the call restarts and meets the gate again
///   until the keys are in.
///
/// Blocking apps in both orders and an edge-triggered epoll app, with
/// OpenSSL (each end's first call waits for the in-band handshake, so both
/// nodes hold someone) and TLSHub; the plain control runs traced too. Each
/// exchange must be exact, and the wire TLS only, decrypted.
pub fn traced_apps() -> Outcome {
    let mut summary = Vec::new();
    for provider in [ProviderKind::OpenSsl, ProviderKind::TlsHub] {
        let (a, b) = nodes_with_provider(provider)?;
        for launch in [Launch::Strace, Launch::Gdb] {
            let traced = |mode, size, io, port| App {
                mode,
                io,
                launch,
                ..App::exchange(size, port)
            };
            let apps = [
                traced("client-first", 10_000, "blocking", PROTECTED_PORT),
                traced("server-first", 1 << 20, "blocking", PROTECTED_PORT),
                traced("client-first", 100_000, "epoll-edge", PROTECTED_PORT),
                traced("client-first", 10_000, "blocking", PLAIN_PORT),
            ];
            let stops_before = a.stat(|s| s.gate_stops) + b.stat(|s| s.gate_stops);
            let seen = std::cell::RefCell::new(TracedHolds::default());
            let count = |_: &AppReport, _: &AppReport| {
                if launch == Launch::Strace {
                    for role in ["server", "client"] {
                        seen.borrow_mut().add(TracedHolds::read(role)?);
                    }
                }
                Ok(())
            };
            let name = format!("traced-{provider:?}-{launch:?}");
            let report = captured_exchanges_checked(&name, WIRE_IF, &a, &b, &apps, count)?;
            let stops = a.stat(|s| s.gate_stops) + b.stat(|s| s.gate_stops) - stops_before;
            let seen = seen.into_inner();
            if provider == ProviderKind::OpenSsl && stops == 0 {
                return Err(failed!(
                    "{launch:?} with {provider:?}: the gate stopped nobody (want holds on both ends of the in-band handshakes)"
                ));
            }
            if launch == Launch::Strace
                && (stops > 0 && (seen.stops == 0 || seen.restarts == 0) || seen.stops > stops)
            {
                return Err(failed!(
                    "{launch:?} with {provider:?}: the gate stopped {stops} times, the traces show {} SIGSTOPs and {} calls answered ERESTARTSYS (want some of each when the gate stopped anyone, and no more stops than it counted)",
                    seen.stops,
                    seen.restarts
                ));
            }
            summary.push(format!(
                "{provider:?} under {launch:?}: 3 exchanges exact, {} flows decrypted, {stops} gate stops{}",
                report.decrypted,
                if launch == Launch::Strace {
                    format!(
                        ", {} SIGSTOPs and {} ERESTARTSYS in the traces (the first: {:?})",
                        seen.stops,
                        seen.restarts,
                        seen.first_stop.unwrap_or_default()
                    )
                } else {
                    String::new()
                }
            ));
        }
    }
    Ok(format!(
        "{}; the traced plain controls stayed plain",
        summary.join("; ")
    ))
}
