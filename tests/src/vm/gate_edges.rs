//! The gate's edges in the socket API: Fast Open, same-node pairs, a
//! reconnect during keying, apps as a pod runs them, as a debugging tool
//! traces them, and with a `SIGCONT` handler of their own. Half-close and
//! `shutdown()` are in `gate_shutdown`; the unusual calls (out-of-band
//! data, zero-copy, repair) in `gate_calls`.

use std::time::Duration;

use crate::app_report::{AppReport, FastOpenOutcome};
use crate::failed;
use crate::vm::outcome::{Failure, Outcome};

use super::node::{NodeSpec, PLAIN_PORT, PROTECTED_PORT, ProviderKind};
use super::support::{App, Launch, PodSetting, both_ok, nodes, nodes_with_provider, run_pair};
use super::topology::{POD_A2, POD_A2_IF, WIRE_IF};
use super::wire_check::{
    Capture, captured_exchanges_checked, captured_exchanges_on, check_wire,
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

/// Apps with a `SIGCONT` handler installed without `SA_RESTART` (terminal
/// programs install one to redraw after `fg`): the core continues a held
/// process with `SIGCONT`, which runs the handler, and a call a handler
/// interrupted is not restarted without `SA_RESTART`, so the held
/// `write()` fails with `EINTR` having sent nothing. An app that retries
/// `EINTR` (as most I/O code does) loses nothing: probe `sigcont-handler`,
/// a blocking client echoing 4 KiB through an echo server, five times to
/// the protected port (TLSHub on both ends) and once to the plain port.
/// Every echo must be exact, at least one first `write()` must have been
/// interrupted (the hold happened), the handler must have run for each,
/// and the wire must show TLS only, with the plain control's marker.
pub fn apps_with_a_sigcont_handler() -> Outcome {
    use super::service::LoadServer;
    use super::support::timed_probe;

    const RUNS: usize = 5;
    const LIMIT: Duration = Duration::from_secs(90);
    let (a, b) = nodes_with_provider(ProviderKind::TlsHub)?;
    let cap = Capture::start("sigcont-handler")?;
    let servers = (LoadServer::start()?, LoadServer::start_on(PLAIN_PORT)?);
    let handled = |steps: &[(String, i32)]| {
        steps.last().and_then(|(call, _)| {
            call.strip_prefix("SIGCONT handled ")
                .and_then(|rest| rest.strip_suffix(" times"))
                .and_then(|n| n.parse::<u64>().ok())
        })
    };
    let (plain, _) = timed_probe("sigcont-handler", PLAIN_PORT, LIMIT)?;
    if plain.len() != 5 || plain.iter().any(|(_, e)| *e != 0) || handled(&plain) != Some(0) {
        return Err(failed!(
            "sigcont-handler to the plain port: {plain:?} (want 5 steps, all 0, the handler never run)"
        ));
    }
    let (mut interrupted, mut handler_runs) = (0, 0);
    for run in 1..=RUNS {
        let (steps, _) = timed_probe("sigcont-handler", PROTECTED_PORT, LIMIT)?;
        let first = steps.get(2).map(|(_, e)| *e);
        let runs = handled(&steps);
        let fine = steps.len() == 5
            && steps[..2].iter().all(|(_, e)| *e == 0)
            && matches!(first, Some(0 | libc::EINTR))
            && steps[3].1 == 0;
        let Some(runs) = runs.filter(|_| fine) else {
            return Err(failed!(
                "sigcont-handler to the protected port, run {run}: {steps:?} (want the first write to succeed or fail with EINTR, and the echo exact)"
            ));
        };
        if first == Some(libc::EINTR) {
            interrupted += 1;
            if runs == 0 {
                return Err(failed!(
                    "run {run}: the first write failed with EINTR, but the SIGCONT handler never ran"
                ));
            }
        }
        handler_runs += runs;
    }
    if interrupted == 0 {
        return Err(failed!(
            "none of {RUNS} first writes was interrupted: the gate held none of them, so the path was not tried"
        ));
    }
    drop(servers);
    let wire = check_wire(&cap.finish()?, &a, &b)?;
    wire.expect_at_least(1, RUNS)?;
    Ok(format!(
        "{RUNS} echoes exact through the protected port, {interrupted} first write(s) failed with EINTR and were retried, the handler ran {handler_runs} times; plain control exact, handler never run; wire: {} protected flows decrypted, no plaintext",
        wire.decrypted
    ))
}
