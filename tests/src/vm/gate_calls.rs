//! The rest of the socket API on selected sockets: out-of-band data,
//! zero-copy send and receive, TCP repair mode, sockets with no room for
//! the gate's mark, a send racing the connect, and Multipath TCP.

use std::time::Duration;

use super::node::{NodeSpec, PLAIN_PORT, PROTECTED_PORT};
use super::process;
use super::support::{
    App, PodSetting, app_report, both_ok, finish_app_server, nodes, run_app_client, run_pair,
    start_app_server,
};
use super::wire_check::Capture;
use crate::app_report::{FastOpenOutcome, MptcpOutcome};
use crate::failed;
use crate::vm::outcome::{Failure, Outcome};

/// `tlshub-testapp probe --what WHAT` from pod-a to pod-b's `port`: the
/// errno of each step (0: it succeeded).
fn probe(what: &str, port: u16) -> Result<Vec<(String, i32)>, Failure> {
    let target = super::support::pod_b_addr(port);
    // A probe whose call hangs (held and never continued) fails the
    // scenario with where it was stuck, instead of hanging the VM.
    let probe = super::support::spawn_probe(what, &target, &[])?;
    let out = process::finish(probe, Duration::from_secs(90))
        .map_err(|e| e.context(format!("probe {what} to port {port}")))?;
    super::support::probe_steps(&out)
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
///   crosses;
/// - a socket whose option memory the app filled (`TCP_MD5SIG` keys for
///   other addresses until `ENOMEM`) before it connects to a selected peer
///   has no room for the gate's socket-local mark: its connect() fails with
///   `ENOBUFS` (`unmarked_refused` counts it); to the plain port the
///   same socket works; and an accepted socket with no room for its mark
///   is refused (see [`accepted_without_room_for_the_mark`]);
/// - a second thread that sends on a socket over and over while the first
///   connects it to a selected peer gets `EPIPE` until the socket is marked,
///   then is held until the keys (or refused with `EOPNOTSUPP` if it finds
///   the socket connecting but not marked yet): no send that passed the
///   gate unconnected may wait for the handshake and go out in clear.
pub fn unusual_socket_calls() -> Outcome {
    use libc::{ECONNRESET, EOPNOTSUPP};
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
    let errno_of = |steps: &[(String, i32)], call: &str| {
        steps
            .iter()
            .find(|(c, _)| c.starts_with(call))
            .map_or(-1, |s| s.1)
    };
    for (what, call) in [("oob", "send(MSG_OOB)"), ("zerocopy", "send(MSG_ZEROCOPY)")] {
        let protected = probe(what, PROTECTED_PORT)?;
        let plain = probe(what, PLAIN_PORT)?;
        if errno_of(&protected, call) != EOPNOTSUPP || errno_of(&plain, call) != 0 {
            return Err(failed!(
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
        return Err(failed!(
            "{zc}: protected {protected:?} (want EOPNOTSUPP before and after keys), plain {plain:?} (want no EOPNOTSUPP)"
        ));
    }
    seen.push(format!("{zc} EOPNOTSUPP before and after keys"));
    let selected_before = a.stat_reaching(|s| s.selected, 3);
    let repair = probe("repair", PROTECTED_PORT)?;
    if errno_of(&repair, "connect") != 0 || errno_of(&repair, "write") != ECONNRESET {
        return Err(failed!(
            "repair mode to the protected port: {repair:?} (want connect 0, write ECONNRESET)"
        ));
    }
    let refused = a.stat_reaching(|s| s.repair_refused, 1);
    let selected_after = a.stat(|s| s.selected);
    if refused != 1 || selected_after != selected_before {
        return Err(failed!(
            "repair mode: repair_refused {refused} (want 1), selected {selected_before} -> {selected_after} (want unchanged)"
        ));
    }
    let plain_repair = probe("repair", PLAIN_PORT)?;
    if errno_of(&plain_repair, "connect") != 0 {
        return Err(failed!("repair mode to the plain port: {plain_repair:?}"));
    }
    seen.push("repair-mode socket refused, never keyed".into());
    // Socket-local storage is charged to the socket's option memory, so a
    // socket whose app filled it first has no room for the gate's mark:
    // its connect() to a selected peer is refused before any byte moves.
    // The plain port's write is the control (the filling itself breaks
    // nothing).
    use libc::{ENOBUFS, ENOMEM};
    let fill = "setsockopt(TCP_MD5SIG)";
    let full = probe("full-option-memory", PROTECTED_PORT)?;
    if errno_of(&full, fill) != ENOMEM
        || errno_of(&full, "connect") != ENOBUFS
        || full.iter().any(|(c, _)| c == "write")
    {
        return Err(failed!(
            "full option memory to the protected port: {full:?} (want ENOMEM filling, connect ENOBUFS, no write)"
        ));
    }
    let unmarked = a.stat_reaching(|s| s.unmarked_refused, 1);
    if unmarked != 1 {
        return Err(failed!(
            "full option memory: unmarked_refused {unmarked} (want 1)"
        ));
    }
    let plain_full = probe("full-option-memory", PLAIN_PORT)?;
    if errno_of(&plain_full, fill) != ENOMEM || errno_of(&plain_full, "write") != 0 {
        return Err(failed!(
            "full option memory to the plain port: {plain_full:?} (want ENOMEM filling, then the write)"
        ));
    }
    seen.push("connect() of a socket with its option memory full refused with ENOBUFS (no room for the mark)".into());
    // Sends racing connect() from another thread: each must end sent
    // after the keys (0) or refused before the mark (EOPNOTSUPP, a send
    // that found the socket connecting and unmarked); the wire check below
    // finds any that went out in clear.
    let racing = |port| -> Result<(Vec<i32>, Vec<i32>), Failure> {
        let steps = probe("send-racing-connect", port)?;
        let of = |call: &str| {
            steps
                .iter()
                .filter(|(c, _)| c == call)
                .map(|(_, e)| *e)
                .collect::<Vec<_>>()
        };
        Ok((of("connect"), of("send racing connect")))
    };
    let (connects, sends) = racing(PROTECTED_PORT)?;
    let attempts = crate::app_io::RACE_ATTEMPTS;
    if connects.len() != attempts
        || sends.len() != attempts
        || connects.iter().any(|e| *e != 0)
        || sends.iter().any(|e| *e != 0 && *e != EOPNOTSUPP)
    {
        return Err(failed!(
            "sends racing connect() to the protected port: connect errnos {connects:?}, send errnos {sends:?} (want {attempts} each, connects 0, sends 0 or EOPNOTSUPP)"
        ));
    }
    let (plain_connects, plain_sends) = racing(PLAIN_PORT)?;
    if plain_connects.iter().chain(&plain_sends).any(|e| *e != 0) {
        return Err(failed!(
            "sends racing connect() to the plain port: connect errnos {plain_connects:?}, send errnos {plain_sends:?} (want 0)"
        ));
    }
    seen.push(format!(
        "{attempts} sends racing connect(): {} sent after the keys, {} refused before the mark",
        sends.iter().filter(|e| **e == 0).count(),
        sends.iter().filter(|e| **e == EOPNOTSUPP).count()
    ));
    drop(servers);
    seen.push(accepted_without_room_for_the_mark(&b)?);
    let report = super::wire_check::check_wire_allowing_unkeyed(&cap.finish()?, &a, &b, true)?;
    report.expect_at_least(2, 0)?;
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

/// The accepting side of a socket with no room for the gate's mark. An
/// accepted socket's option memory starts empty and its app cannot reach
/// it before the socket is established, so only a node whose
/// `net.core.optmem_max` is below a mark's size gets there: pod-b's is set
/// to 0. The socket is then found by its cookie and refused: the server
/// writes first, and its write must fail with `ECONNRESET` (without the
/// refusal its marker crosses in clear, which the caller's wire check
/// finds). `optmem_max` is per network namespace from 6.8; on 6.1 it is
/// global, so the client's own connect() would be refused first
/// (`ENOBUFS`) and the accepting side is not reached.
fn accepted_without_room_for_the_mark(b: &super::node::Node) -> Result<String, Failure> {
    if super::support::kernel_version() < (6, 8) {
        return Ok(
            "accepted socket with no room for its mark: not reachable on this kernel (net.core.optmem_max is global before 6.8)"
                .into(),
        );
    }
    let before = b.stat(|s| s.unmarked_refused);
    let no_option_memory = PodSetting::sysctl("pod-b", "net/core/optmem_max", "0")?;
    let app = App {
        mode: "server-first",
        ..App::exchange(4096, PROTECTED_PORT)
    };
    let (server, client) = run_pair(&app, &[], Duration::from_secs(60))?;
    drop(no_option_memory);
    if server.ok || server.errno != Some(libc::ECONNRESET) || client.ok {
        return Err(failed!(
            "accepted socket with no room for its mark: server {server} (want its write to fail with ECONNRESET), client {client} (want a failure)"
        ));
    }
    super::support::expect_server_failed_clean(&server)?;
    let refused = b.stat_reaching(|s| s.unmarked_refused, before + 1);
    if refused != before + 1 {
        return Err(failed!(
            "accepted socket with no room for its mark: node b's unmarked_refused {before} -> {refused} (want one more)"
        ));
    }
    Ok(
        "accepted socket with no room for its mark (pod-b's optmem_max 0) refused with ECONNRESET"
            .into(),
    )
}

/// Multipath TCP (`IPPROTO_MPTCP`), on by default in every namespace
/// (`net.mptcp.enabled=1`): the app's socket is not the TCP socket on the
/// wire (the kernel moves its bytes into one TCP subflow per path, with no
/// socket hook on the way), and kTLS cannot be installed on it. Each case
/// under one capture:
/// - an MPTCP server and client on the protected port: the server's
///   listen() and the client's connect() are refused (`EOPNOTSUPP`), both
///   fall back to TCP as Go's net package does, and that connection is
///   protected;
/// - the control, the same to the plain port: MPTCP works (the server
///   accepts an MPTCP socket) and the marker crosses in clear, so the
///   refusal above is the gate's and the capture sees plaintext;
/// - Fast Open over MPTCP (`sendto(MSG_FASTOPEN)`, which connects without
///   connect()) to the protected port: refused like TCP's, then TCP;
/// - an MPTCP listener that listened before node b selected its port, and
///   an MPTCP client on node a, which does not select that port (a peer
///   without tlshub for this connection): the accepted MPTCP socket is
///   refused before accept() returns it, so the server's first write fails
///   with `ECONNRESET` and no byte of it crosses. Without that, node b's
///   programs see only the subflow, and the server's bytes go out in
///   clear.
pub fn multipath_tcp() -> Outcome {
    const LATE_PORT: u16 = 8444;
    let (a, mut b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let mptcp = |port| App {
        mptcp: true,
        ..App::exchange(4096, port)
    };
    let cap = Capture::start("multipath-tcp")?;
    let mut seen = Vec::new();
    let refused_mptcp = Some(MptcpOutcome::FellBack(libc::EOPNOTSUPP));

    let protected = mptcp(PROTECTED_PORT);
    let (s, c) = run_pair(&protected, &[], Duration::from_secs(60))?;
    both_ok(&protected, &s, &c)?;
    let refused = (
        a.stat_reaching(|s| s.mptcp_refused, 1),
        b.stat_reaching(|s| s.mptcp_refused, 1),
    );
    if c.mptcp != refused_mptcp || s.mptcp != refused_mptcp || refused != (1, 1) {
        return Err(failed!(
            "MPTCP on the protected port: client {c} (want its MPTCP connect refused with EOPNOTSUPP, then TCP), server {s} (want its MPTCP listen refused, then TCP), mptcp_refused a {} b {} (want 1 each)",
            refused.0,
            refused.1
        ));
    }
    seen.push("MPTCP listen() and connect() on the protected port refused (EOPNOTSUPP), TCP fallback protected");

    let plain = mptcp(PLAIN_PORT);
    let (s, c) = run_pair(&plain, &[], Duration::from_secs(60))?;
    both_ok(&plain, &s, &c)?;
    if c.mptcp != Some(MptcpOutcome::Used) || s.mptcp_accepted != 1 {
        return Err(failed!(
            "MPTCP to the plain port (the control): client {c}, server {s} (want MPTCP used and accepted)"
        ));
    }
    seen.push("MPTCP to the plain port used and accepted (control)");

    let fastopen_before = a.stat(|s| s.fastopen_refused);
    let (s, c) = run_pair(
        &App::exchange(4096, PROTECTED_PORT),
        &["--mptcp", "--fastopen", "sendto"],
        Duration::from_secs(60),
    )?;
    let fastopen_refused = a.stat_reaching(|s| s.fastopen_refused, fastopen_before + 1);
    if !s.ok
        || !c.ok
        || c.fastopen != Some(FastOpenOutcome::Refused)
        || c.mptcp != refused_mptcp
        || fastopen_refused != fastopen_before + 1
    {
        return Err(failed!(
            "MPTCP Fast Open to the protected port: client {c}, server {s} (want the send refused, then TCP, exact), node a's fastopen_refused {fastopen_before} -> {fastopen_refused}"
        ));
    }
    seen.push("MPTCP sendto(MSG_FASTOPEN) to the protected port refused, TCP fallback exact");

    let late = App {
        mode: "server-first",
        ..mptcp(LATE_PORT)
    };
    let server = start_app_server(&late)?;
    b.select_port_too(LATE_PORT)?;
    let c = run_app_client(&late, "pod-a", &[], Duration::from_secs(60), server.id())?;
    let s = finish_app_server(&late, server, &c)?;
    let c = app_report(&c)?;
    let refused = b.stat_reaching(|s| s.mptcp_refused, 2);
    if s.mptcp != Some(MptcpOutcome::Used)
        || s.mptcp_accepted != 1
        || s.errno != Some(libc::ECONNRESET)
        || s.bytes_sent != 0
        || c.ok
        || c.bytes_received != 0
        || refused != 2
    {
        return Err(failed!(
            "an MPTCP listener older than its port's selection: server {s} (want an MPTCP socket accepted and its first write refused with ECONNRESET), client {c} (want nothing received), node b's mptcp_refused {refused} (want 2: the listen() above and this)"
        ));
    }
    seen.push("an MPTCP socket accepted on a port selected after listen() refused (ECONNRESET), nothing sent");

    let flows = cap.finish()?;
    let late_in_clear = super::wire_check::plain_flows_on(&flows, LATE_PORT);
    if late_in_clear != 0 {
        return Err(failed!(
            "{late_in_clear} flows on port {LATE_PORT} carried the marker in clear"
        ));
    }
    let report = super::wire_check::check_wire(&flows, &a, &b)?;
    report.expect_at_least(1, 4)?;
    Ok(format!(
        "{}; no marker in {} protected flows ({} decrypted) nor on port {LATE_PORT}, the plain control showed it",
        seen.join(", "),
        report.protected_flows,
        report.decrypted
    ))
}

/// Shared Memory Communications (`AF_SMC`, net/smc, loaded by the kernel
/// when an app first asks for it; `smc_run` makes an unmodified app use
/// it). An SMC socket runs a TCP socket of its own underneath (the "CLC
/// socket", in the app's cgroup, so the sockops program selects it) and,
/// with no SMC-capable device (none in this VM) or a peer that does not
/// offer SMC, falls back to moving the app's bytes over it. Each case
/// must be exact and protected, with no marker on a protected flow:
/// - an SMC client to a TCP server on the protected port;
/// - a TCP client to an SMC server that writes first;
/// - the control: an SMC client to the plain port, the marker in clear.
///
/// The other way into SMC, a TCP socket given the `smc` upper-layer
/// protocol before it connects or listens (`setsockopt(TCP_ULP, "smc")`;
/// the gate refuses `TCP_ULP` only on a socket it gates, which an
/// unconnected one is not), is tried too: both kernels refuse it with
/// `ENOENT` (no such upper-layer protocol, with the `smc` module loaded by
/// the cases above). A kernel that takes it must give the same two cases
/// exact and protected.
///
/// Both fallbacks reach the gate because SMC itself points the app's file
/// at the TCP socket underneath when it falls back (at `connect()`, and at
/// `accept()` for an accepted one), so every later call on the fd is a
/// call on that (selected, marked) socket. Then SMC on both ends: the two
/// kernels agree on SMC in the TCP handshake and then exchange SMC's own
/// messages (CLC) on the selected socket from inside the kernel, which
/// collide with the keying; the connection must fail closed, the client
/// with an error before it sent anything (seen: `EPROTO` from connect()),
/// or else be exact and protected. No marker may cross on a protected
/// flow in any case.
pub fn shared_memory_communications() -> Outcome {
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let cap = Capture::start("smc")?;
    let tcp = |mode| App {
        mode,
        ..App::exchange(4096, PROTECTED_PORT)
    };
    let smc = |mode| App {
        smc: true,
        ..tcp(mode)
    };
    let smc_ulp = |mode| App {
        smc_ulp: true,
        ..tcp(mode)
    };
    // One exchange of `client` with `server`, exact both ways.
    let exact = |what: &str, server: &App, client: &App| -> Result<(), Failure> {
        let srv = start_app_server(server)?;
        let c = run_app_client(client, "pod-a", &[], Duration::from_secs(60), srv.id())?;
        let s = finish_app_server(server, srv, &c)?;
        let c = app_report(&c)?;
        if !s.ok || !c.ok {
            return Err(failed!("{what}: server {s}, client {c}"));
        }
        Ok(())
    };
    let mut seen = Vec::new();
    for (what, server, client) in [
        (
            "SMC client, TCP server",
            tcp("client-first"),
            smc("client-first"),
        ),
        (
            "TCP client, SMC server writing first",
            smc("server-first"),
            tcp("server-first"),
        ),
        (
            "SMC client to the plain port (control)",
            App {
                port: PLAIN_PORT,
                ..tcp("client-first")
            },
            App {
                port: PLAIN_PORT,
                ..smc("client-first")
            },
        ),
    ] {
        exact(what, &server, &client)?;
        seen.push(format!("{what} exact"));
    }
    // The other way into SMC: TCP_ULP "smc" on the client, then (if the
    // kernel has it) on the server.
    let mut ulp_decrypted = 0;
    let (server, client) = (tcp("client-first"), smc_ulp("client-first"));
    let srv = start_app_server(&server)?;
    let out = run_app_client(&client, "pod-a", &[], Duration::from_secs(60), srv.id())?;
    let c = app_report(&out)?;
    if c.errno == Some(libc::ENOENT) && c.connections == 0 && c.bytes_sent == 0 {
        drop(srv);
        seen.push(
            "TCP_ULP smc refused by the kernel (ENOENT: no such upper-layer protocol)".into(),
        );
    } else {
        let s = finish_app_server(&server, srv, &out)?;
        if !s.ok || !c.ok {
            return Err(failed!(
                "TCP_ULP smc client, TCP server: server {s}, client {c}"
            ));
        }
        exact(
            "TCP client, TCP_ULP smc server writing first",
            &smc_ulp("server-first"),
            &tcp("server-first"),
        )?;
        seen.push("TCP_ULP smc client and server exact".into());
        ulp_decrypted = 4;
    }
    let both = smc("client-first");
    let srv = start_app_server(&both)?;
    let c = run_app_client(&both, "pod-a", &[], Duration::from_secs(60), srv.id())?;
    let c = app_report(&c)?;
    let decrypted_at_least = if c.ok {
        let s = finish_app_server(&both, srv, &c.to_string())?;
        both_ok(&both, &s, &c)?;
        seen.push("SMC on both ends exact".into());
        6
    } else if c.bytes_sent == 0 && c.bytes_received == 0 {
        // Its server's accept() never returns: this connection failed
        // before SMC handed it over.
        drop(srv);
        seen.push(format!(
            "SMC on both ends failed closed ({}), nothing sent",
            c.error.as_deref().unwrap_or("?")
        ));
        4
    } else {
        return Err(failed!(
            "SMC on both ends: client {c} (want exact, or an error before any byte)"
        ));
    };
    let report = super::wire_check::check_wire_allowing_unkeyed(&cap.finish()?, &a, &b, true)?;
    report.expect_at_least(1, decrypted_at_least + ulp_decrypted)?;
    Ok(format!(
        "{}; no marker in {} protected flows ({} decrypted), the plain control showed it",
        seen.join(", "),
        report.protected_flows,
        report.decrypted
    ))
}
