//! The rest of the socket API on selected sockets: out-of-band data,
//! zero-copy send and receive, TCP repair mode, sockets with no room for
//! the gate's mark, and a send racing the connect.

use std::time::Duration;

use super::node::{NodeSpec, PLAIN_PORT, PROTECTED_PORT};
use super::process;
use super::support::{App, PodSetting, nodes, run_pair};
use super::wire_check::Capture;

/// `tlshub-testapp probe --what WHAT` from pod-a to pod-b's `port`: the
/// errno of each step (0: it succeeded).
fn probe(what: &str, port: u16) -> Result<Vec<(String, i32)>, String> {
    let target = super::support::pod_b_addr(port);
    // A probe whose call hangs (held and never continued) fails the
    // scenario with where it was stuck, instead of hanging the VM.
    let probe = super::support::spawn_probe(what, &target, &[])?;
    let out = process::finish(probe, Duration::from_secs(90))
        .map_err(|e| format!("probe {what} to port {port}: {e}"))?;
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
pub fn unusual_socket_calls() -> Result<String, String> {
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
        return Err(format!(
            "full option memory to the protected port: {full:?} (want ENOMEM filling, connect ENOBUFS, no write)"
        ));
    }
    let unmarked = a.stat_reaching(|s| s.unmarked_refused, 1);
    if unmarked != 1 {
        return Err(format!(
            "full option memory: unmarked_refused {unmarked} (want 1)"
        ));
    }
    let plain_full = probe("full-option-memory", PLAIN_PORT)?;
    if errno_of(&plain_full, fill) != ENOMEM || errno_of(&plain_full, "write") != 0 {
        return Err(format!(
            "full option memory to the plain port: {plain_full:?} (want ENOMEM filling, then the write)"
        ));
    }
    seen.push("connect() of a socket with its option memory full refused with ENOBUFS (no room for the mark)".into());
    // Sends racing connect() from another thread: each must end sent
    // after the keys (0) or refused before the mark (EOPNOTSUPP, a send
    // that found the socket connecting and unmarked); the wire check below
    // finds any that went out in clear.
    let racing = |port| -> Result<(Vec<i32>, Vec<i32>), String> {
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
        return Err(format!(
            "sends racing connect() to the protected port: connect errnos {connects:?}, send errnos {sends:?} (want {attempts} each, connects 0, sends 0 or EOPNOTSUPP)"
        ));
    }
    let (plain_connects, plain_sends) = racing(PLAIN_PORT)?;
    if plain_connects.iter().chain(&plain_sends).any(|e| *e != 0) {
        return Err(format!(
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
fn accepted_without_room_for_the_mark(b: &super::node::Node) -> Result<String, String> {
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
        return Err(format!(
            "accepted socket with no room for its mark: server {server} (want its write to fail with ECONNRESET), client {client} (want a failure)"
        ));
    }
    super::support::expect_server_failed_clean(&server)?;
    let refused = b.stat_reaching(|s| s.unmarked_refused, before + 1);
    if refused != before + 1 {
        return Err(format!(
            "accepted socket with no room for its mark: node b's unmarked_refused {before} -> {refused} (want one more)"
        ));
    }
    Ok(
        "accepted socket with no room for its mark (pod-b's optmem_max 0) refused with ECONNRESET"
            .into(),
    )
}
