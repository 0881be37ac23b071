//! The gate's edges: sockets that reach an application some other way than
//! a connect()/accept() system call in the process that then uses them.

use super::node::{NodeSpec, PLAIN_PORT, PROTECTED_PORT};
use super::scenarios::{App, captured_exchanges, nodes, tls_stat};

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
    let forked = |mode, send, recv, via| App {
        mode,
        send,
        recv,
        via,
        fork: true,
        connections: 3,
        ..App::exchange(100_000, PROTECTED_PORT)
    };
    let apps = [
        uring("client-first", "sendfile", "splice", "blocking"),
        uring("server-first", "splice", "read", "epoll"),
        uring("client-first", "write", "recv", "epoll"),
        forked("client-first", "sendfile", "read", "syscall"),
        forked("server-first", "write", "splice", "syscall"),
        forked("client-first", "splice", "recvmsg", "io-uring"),
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
    let before = tls_stat(&["pod-a", "pod-b"]);
    let report = captured_exchanges("owner-from-hold", &a, &b, &apps)?;
    let after = tls_stat(&["pod-a", "pod-b"]);
    let delta = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    if delta("TlsTxSw") != 2 * protected || delta("TlsRxSw") != 2 * protected {
        return Err(format!(
            "tls_stat: TlsTxSw +{} TlsRxSw +{}, want +{} each",
            delta("TlsTxSw"),
            delta("TlsRxSw"),
            2 * protected
        ));
    }
    if report.plain_flows_with_marker == 0 {
        return Err("the control flow's plaintext was not seen: the capture is blind".into());
    }
    let stat = |n: &super::node::Node, k: &str| {
        n.stats()
            .ok()
            .and_then(|s| s[k].as_u64())
            .unwrap_or_default()
    };
    // Each io_uring connection has two ends, one per node, and neither
    // had an OWNER event: both were found from a hold.
    let from_hold = [stat(&a, "owner_from_hold"), stat(&b, "owner_from_hold")];
    if from_hold.iter().any(|&n| n < uring_conns) {
        return Err(format!(
            "keyed from a hold: node a {}, node b {}; want at least {uring_conns} each (the io_uring connections)",
            from_hold[0], from_hold[1]
        ));
    }
    let gone = [stat(&a, "socket_gone"), stat(&b, "socket_gone")];
    let terminal = [stat(&a, "gate_terminal"), stat(&b, "gate_terminal")];
    if terminal != [0, 0] {
        return Err(format!("gates put in the terminal state: {terminal:?}"));
    }
    Ok(format!(
        "{protected} connections (io_uring, fork handoff, both) exact both ways; {} flows TLS-only and decrypted; control flow plain; keyed from a hold: a {} b {}; socket gone from the first owner: a {} b {}",
        report.protected_flows, from_hold[0], from_hold[1], gone[0], gone[1]
    ))
}
