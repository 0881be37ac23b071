//! Paths to the socket other than connect()/accept() and read()/write() in
//! the process that made it: sockets connected or accepted through
//! io_uring or handed to another process, and bytes moved by io_uring's own
//! SEND and RECV. The gate holds each (the mark is on the socket), and the
//! core keys each from the process the gate holds.

use super::node::{NodeSpec, PLAIN_PORT, PROTECTED_PORT};
use super::support::{App, nodes};
use super::topology::WIRE_IF;
use super::wire_check::{captured_exchanges, captured_exchanges_checked, with_ktls_sockets};
use crate::app_report::AppReport;
use crate::failed;
use crate::vm::outcome::Outcome;

/// Sockets whose owner no syscall hook reports, or reports wrongly, are
/// gated and then keyed from the process the gate holds:
/// - connected and accepted through io_uring or through the 32-bit entry
///   (`int $0x80`; no 64-bit connect/accept system call: no OWNER event at
///   all), sending with sendfile() and splice(), which on 6.1 pass only the
///   `file_permission` gate;
/// - handed to a forked child by the process that connected or accepted,
///   which closes its own copy at once (the inetd/sshd pattern; the OWNER
///   event names the parent, which may no longer have the socket when the
///   core looks); or passed to the child with `SCM_RIGHTS`, or taken by
///   the child from the parent's fd table with `pidfd_getfd()`, each at
///   another fd number;
/// - both at once.
///
/// Every protected flow must decrypt, a plain control flow must show its
/// marker, and the io_uring and 32-bit connections must have been keyed from a hold
/// (proving the path under test ran).
pub fn owner_from_hold() -> Outcome {
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let unwatched = |via, mode, send, recv, io| App {
        mode,
        send,
        recv,
        io,
        via,
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
        unwatched("io-uring", "client-first", "sendfile", "splice", "blocking"),
        unwatched("io-uring", "server-first", "splice", "read", "epoll"),
        unwatched("io-uring", "client-first", "write", "recv", "epoll"),
        unwatched("int80", "client-first", "sendfile", "read", "blocking"),
        unwatched("int80", "server-first", "splice", "recv", "epoll"),
        handed("fork", "client-first", "sendfile", "read", "syscall"),
        handed("fork", "server-first", "write", "splice", "syscall"),
        handed("fork", "client-first", "splice", "recvmsg", "io-uring"),
        handed("scm-rights", "client-first", "sendfile", "read", "syscall"),
        handed("scm-rights", "server-first", "write", "recv", "io-uring"),
        handed("pidfd-getfd", "client-first", "write", "read", "syscall"),
        handed("pidfd-getfd", "server-first", "sendfile", "recv", "syscall"),
        // The control: unselected, so its marker must be seen in clear.
        App::exchange(10_000, PLAIN_PORT),
    ];
    // Connections whose connect/accept no owner hook sees.
    let unwatched_conns: u64 = apps
        .iter()
        .filter(|x| x.port == PROTECTED_PORT && x.via != "syscall")
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
    report.expect_at_least(1, 0)?;
    // Each such connection has two ends, one per node, and neither had an
    // OWNER event: both were found from a hold.
    let from_hold = [a.stat(|s| s.owner_from_hold), b.stat(|s| s.owner_from_hold)];
    if from_hold.iter().any(|&n| n < unwatched_conns) {
        return Err(failed!(
            "keyed from a hold: node a {}, node b {}; want at least {unwatched_conns} each (the io_uring and 32-bit connections)",
            from_hold[0],
            from_hold[1]
        ));
    }
    let gone = [a.stat(|s| s.socket_gone), b.stat(|s| s.socket_gone)];
    let terminal = [a.stat(|s| s.gate_terminal), b.stat(|s| s.gate_terminal)];
    if terminal != [0, 0] {
        return Err(failed!("gates put in the terminal state: {terminal:?}"));
    }
    Ok(format!(
        "{protected} connections (io_uring, int $0x80, fork handoff, SCM_RIGHTS handoff, pidfd_getfd handoff, io_uring and fork) exact both ways; {} flows TLS-only and decrypted; control flow plain; keyed from a hold: a {} b {}; socket gone from the first owner: a {} b {}",
        report.protected_flows, from_hold[0], from_hold[1], gone[0], gone[1]
    ))
}

/// Apps that move every byte with io_uring SEND and RECV (and two with
/// WRITE and READ, which reach the gate through `file_permission`), on
/// blocking sockets (the common io_uring use) and on non-blocking ones, connected
/// with connect()/accept() and through io_uring, both orders, 1 B and
/// 1 MiB: exact bytes both ways. Three issue their SEND and RECV from
/// io_uring's own threads (kernel-created threads of the app's process,
/// not the thread that submitted): an io-wq
/// worker (`IOSQE_ASYNC`) and a ring's SQPOLL thread, on blocking and
/// non-blocking sockets. A blocking app's request that meets the
/// closed gate completes with `EINTR` once the app is continued (io_uring
/// does not restart a request a signal interrupted), and the test app
/// submits it again as Rust's `write_all` would; any other error
/// completion fails. Both nodes must have held an io_uring app (the path
/// under test ran), each blocking app whose requests io_uring's threads
/// issue must have had a request interrupted on both ends, every protected
/// flow must decrypt, and a plain control flow must show its marker.
pub fn uring_send_recv() -> Outcome {
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let uring = |mode, size, io, via| App {
        mode,
        size,
        send: "io-uring",
        recv: "io-uring",
        io,
        via,
        ..App::exchange(size, PROTECTED_PORT)
    };
    let apps = [
        uring("client-first", 1, "blocking", "syscall"),
        uring("server-first", 1 << 20, "blocking", "syscall"),
        uring("client-first", 1 << 20, "blocking", "io-uring"),
        uring("server-first", 1, "blocking", "io-uring"),
        uring("client-first", 100_000, "epoll", "syscall"),
        uring("server-first", 100_000, "epoll-edge", "io-uring"),
        App {
            send: "io-uring-write",
            recv: "io-uring-read",
            ..uring("client-first", 1 << 20, "blocking", "syscall")
        },
        App {
            send: "io-uring-write",
            recv: "io-uring-read",
            ..uring("server-first", 100_000, "epoll-edge", "io-uring")
        },
        App {
            send: "io-uring-async",
            recv: "io-uring-async",
            ..uring("client-first", 1 << 20, "blocking", "syscall")
        },
        App {
            send: "io-uring-sqpoll",
            recv: "io-uring-sqpoll",
            ..uring("server-first", 1, "blocking", "syscall")
        },
        App {
            send: "io-uring-async",
            recv: "io-uring-sqpoll",
            ..uring("client-first", 100_000, "epoll-edge", "syscall")
        },
        // The control: unselected, so its marker must be seen in clear.
        App::exchange(10_000, PLAIN_PORT),
    ];
    let protected = apps.iter().filter(|x| x.port == PROTECTED_PORT).count() as u64;
    // A blocking app whose requests io_uring's own threads issue must have
    // met the closed gate on both ends (the in-band handshake keeps each
    // end's first request waiting), or that path did not run. The check
    // sees the apps' reports in the order of `apps`.
    let next = std::cell::Cell::new(0);
    let threads_held = |server: &AppReport, client: &AppReport| {
        let app = &apps[next.replace(next.get() + 1)];
        let by_threads = [app.send, app.recv]
            .iter()
            .any(|m| ["io-uring-async", "io-uring-sqpoll"].contains(m));
        if by_threads
            && app.io == "blocking"
            && (server.uring_interrupted == 0 || client.uring_interrupted == 0)
        {
            return Err(failed!(
                "requests issued by io_uring's threads interrupted: server {}, client {}; want at least 1 each (the hold met on that path)",
                server.uring_interrupted,
                client.uring_interrupted
            ));
        }
        Ok(())
    };
    let report = with_ktls_sockets(2 * protected, || {
        captured_exchanges_checked("io-uring-send-recv", WIRE_IF, &a, &b, &apps, threads_held)
    })?;
    report.expect_at_least(1, 0)?;
    let stops = [a.stat(|s| s.gate_stops), b.stat(|s| s.gate_stops)];
    let eagain = [a.stat(|s| s.gate_eagain), b.stat(|s| s.gate_eagain)];
    let terminal = [a.stat(|s| s.gate_terminal), b.stat(|s| s.gate_terminal)];
    if terminal != [0, 0] {
        return Err(failed!("gates put in the terminal state: {terminal:?}"));
    }
    // The provider's in-band handshake keeps every app's first request
    // waiting, so each node held its blocking io_uring apps, and each hold
    // interrupted a request.
    if stops.contains(&0) || report.uring_interrupted == 0 {
        return Err(failed!(
            "processes stopped: a {} b {}; io_uring requests interrupted: {}; want some of each (the blocking io_uring apps' first requests)",
            stops[0],
            stops[1],
            report.uring_interrupted
        ));
    }
    Ok(format!(
        "{protected} connections moving every byte with io_uring SEND/RECV or WRITE/READ (blocking and non-blocking sockets; connect/accept and io_uring; both orders; issued by the submitter, an io-wq worker or the SQPOLL thread) exact both ways (interrupted requests submitted again); {} flows TLS-only and decrypted; control plain; processes stopped a {} b {}; io_uring requests interrupted {}; calls answered EAGAIN a {} b {}",
        report.protected_flows, stops[0], stops[1], report.uring_interrupted, eagain[0], eagain[1]
    ))
}

/// Sockets that live only in a fd table that a pidfd of the process does
/// not read (`pidfd_getfd` reads the thread-group leader's), so the core
/// must find them in a thread's table (`/proc/PID/task/TID/fd`), each
/// made by a blocking client that echoes 4 KiB through an echo server:
/// - `own-fd-table`: a thread that first gives itself an fd table of its
///   own (`unshare(CLONE_FILES)`);
/// - `main-thread-exits`: a process whose main thread exited on its own
///   (`pthread_exit()` from `main()`, as some daemons do), leaving a zombie
///   leader with no fd table; another thread connects.
///
/// From Linux 6.9 a pidfd of one thread (`PIDFD_THREAD`) takes the socket,
/// and it is keyed: the echo exact, its flows TLS-only and decrypted.
/// Before, no system call reaches it: the connection fails closed (reason
/// `thread_fd_table`) and is aborted by its tuple, so the held call ends
/// with `ECONNABORTED` (`ECONNRESET` if the abort came after it) and the
/// server's end is reset; no byte in clear. Either way the app is answered well before its 60 s wait. Plain
/// controls (the same probes to an unselected port) must echo and show
/// their marker.
pub fn socket_in_a_thread_fd_table() -> Outcome {
    use std::time::Duration;

    use super::service::LoadServer;
    use super::support::{kernel_version, pod_b_connections_gone, timed_probe};
    use super::wire_check::{Capture, check_wire_allowing_unkeyed};

    const PROBES: [&str; 2] = ["own-fd-table", "main-thread-exits"];
    const LIMIT: Duration = Duration::from_secs(150);
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let cap = Capture::start("thread-fd-table")?;
    let servers = (LoadServer::start()?, LoadServer::start_on(PLAIN_PORT)?);
    let threads_reachable = kernel_version() >= (6, 9);
    let mut summary = Vec::new();
    for (i, what) in PROBES.into_iter().enumerate() {
        let (plain, _) = timed_probe(what, PLAIN_PORT, LIMIT)?;
        if plain.len() != 4 || plain.iter().any(|(_, e)| *e != 0) {
            return Err(failed!(
                "{what} to the plain port: {plain:?} (want 4 steps, all 0)"
            ));
        }
        let (protected, took) = timed_probe(what, PROTECTED_PORT, LIMIT)?;
        let last = protected.last().cloned().unwrap_or_default();
        let earlier_ok = protected.len() == 4 && protected[..3].iter().all(|(_, e)| *e == 0);
        if threads_reachable {
            let keyed = a.stat_reaching(|s| s.protected, i as u64 + 1);
            if !earlier_ok || last.1 != 0 || keyed != i as u64 + 1 {
                return Err(failed!(
                    "{what} to the protected port: {protected:?} (want every step 0: this kernel opens a pidfd for one thread); node a: {keyed} protected (want {}), {} thread_fd_table, {} socket_gone",
                    i + 1,
                    a.stat(|s| s.failures("thread_fd_table")),
                    a.stat(|s| s.socket_gone)
                ));
            }
            summary.push(format!(
                "{what}: keyed through a pidfd of the thread, echo exact"
            ));
        } else {
            let counted = a.stat_reaching(|s| s.failures("thread_fd_table"), i as u64 + 1);
            let aborted = a.stat_reaching(|s| s.unreachable_aborted, i as u64 + 1);
            let left = pod_b_connections_gone(PROTECTED_PORT)?;
            if !earlier_ok
                || last.0 != "exchange"
                || ![libc::ECONNABORTED, libc::ECONNRESET].contains(&last.1)
                || counted != i as u64 + 1
                || aborted != i as u64 + 1
                || left != 0
            {
                return Err(failed!(
                    "{what} to the protected port: {protected:?} (want its exchange to fail with ECONNABORTED or ECONNRESET: no pidfd of one thread before Linux 6.9); node a counted {counted} thread_fd_table failures and aborted {aborted} unreachable connections, want {} each; pod-b still holds {left} connections on the protected port",
                    i + 1
                ));
            }
            summary.push(format!(
                "{what}: failed closed (thread_fd_table) and aborted by its tuple, the app answered errno {} after {:.1} s",
                last.1,
                took.as_secs_f64()
            ));
        }
        if took > Duration::from_secs(45) {
            return Err(failed!(
                "{what} to the protected port took {took:?}: the app waited instead of being answered"
            ));
        }
    }
    drop(servers);
    let wire = check_wire_allowing_unkeyed(&cap.finish()?, &a, &b, !threads_reachable)?;
    wire.expect_at_least(
        PROBES.len(),
        if threads_reachable { PROBES.len() } else { 0 },
    )?;
    Ok(format!(
        "{}; plain controls echoed; wire: {} protected flows decrypted, {} unkeyed, no plaintext",
        summary.join("; "),
        wire.decrypted,
        wire.unkeyed_flows
    ))
}

/// A socket that never has an fd: io_uring makes it straight into the
/// ring's registered file table (a "direct descriptor",
/// `IORING_OP_SOCKET` with a file index) and connects, sends and receives
/// through that slot. No system call gives another process a ring's
/// registered file, so the core cannot take the socket: the connection
/// must fail closed with a clean error (the core counting `socket_gone`
/// and aborting it by its tuple: the send answered `ECONNABORTED`, or
/// `ECONNRESET` from the gate's terminal state, and the server's end
/// reset), and not a byte of it may cross in clear. The same probe to an unselected port must
/// echo exactly and show its marker (the probe works, and the capture
/// sees plaintext when there is some).
pub fn io_uring_direct_socket() -> Outcome {
    use std::time::Duration;

    use super::service::LoadServer;
    use super::support::{pod_b_connections_gone, timed_probe};
    use super::wire_check::{Capture, check_wire_allowing_unkeyed};

    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    const LIMIT: Duration = Duration::from_secs(150);
    let cap = Capture::start("io-uring-direct")?;
    let servers = (LoadServer::start()?, LoadServer::start_on(PLAIN_PORT)?);
    let (plain, _) = timed_probe("io-uring-direct", PLAIN_PORT, LIMIT)?;
    if plain.len() != 6 || plain.iter().any(|(_, e)| *e != 0) {
        return Err(failed!(
            "io-uring-direct to the plain port: {plain:?} (want 6 steps, all 0)"
        ));
    }
    let gone_before = a.stat(|s| s.failures("socket_gone"));
    let (protected, took) = timed_probe("io-uring-direct", PROTECTED_PORT, LIMIT)?;
    let clean = matches!(
        protected.as_slice(),
        [(_, 0), (_, 0), (_, 0), (call, e)] if call == "send" && [libc::ECONNABORTED, libc::ECONNRESET].contains(e)
    );
    let gone = a.stat_reaching(|s| s.failures("socket_gone"), gone_before + 1) - gone_before;
    if !clean || gone != 1 || took > Duration::from_secs(45) {
        return Err(failed!(
            "io-uring-direct to the protected port after {took:?}: {protected:?} (want the send to fail with ECONNABORTED, the abort, or ECONNRESET, the gate's terminal state, within 45 s); node a counted {gone} socket_gone failures, want 1"
        ));
    }
    // Aborted by its tuple: the server's end got a RST, long before its
    // own key timeout would have ended it.
    let aborted = a.stat_reaching(|s| s.unreachable_aborted, 1);
    let left = pod_b_connections_gone(PROTECTED_PORT)?;
    if aborted != 1 || left != 0 {
        return Err(failed!(
            "node a aborted {aborted} unreachable connections (want 1); pod-b still holds {left} connections on the protected port 10 s after the probe ended"
        ));
    }
    drop(servers);
    let wire = check_wire_allowing_unkeyed(&cap.finish()?, &a, &b, true)?;
    wire.expect_at_least(1, 0)?;
    Ok(format!(
        "a direct descriptor failed closed (socket_gone) and was aborted by its tuple (the server's end reset at once), its send answered errno {} after {:.1} s; plain control echoed; no plaintext on the wire",
        protected[3].1,
        took.as_secs_f64()
    ))
}

/// The server end of a direct descriptor: io_uring accepts the connection
/// straight into the ring's registered file table (`IORING_OP_ACCEPT` with
/// a file index), and the server receives and answers through that slot
/// (probe `io-uring-direct-accept` in pod-b, a blocking `echo` client in
/// pod-a). As for a connected one, no system call gives the core that
/// socket: node b must fail it closed (`socket_gone`) and abort it by its
/// tuple, so the server's receive ends with `ECONNABORTED` (or
/// `ECONNRESET`, the gate's terminal state) and the client's exchange
/// with a reset, both well before their 60 s waits, and no byte crosses
/// in clear. The same pair on an unselected port must echo exactly and
/// show its marker.
pub fn io_uring_direct_accepted_socket() -> Outcome {
    use std::time::Duration;

    use super::process;
    use super::support::{probe_steps, timed_probe};
    use super::wire_check::{Capture, check_wire_allowing_unkeyed};

    const LIMIT: Duration = Duration::from_secs(150);
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let cap = Capture::start("io-uring-direct-accept")?;
    let mut outcome = String::new();
    for port in [PLAIN_PORT, PROTECTED_PORT] {
        let gone_before = b.stat(|s| s.failures("socket_gone"));
        let aborted_before = b.stat(|s| s.unreachable_aborted);
        let listen = format!("0.0.0.0:{port}");
        let argv = [
            "tlshub-testapp",
            "probe",
            "--what",
            "io-uring-direct-accept",
            "--connect",
            &listen,
        ];
        let server = process::spawn_ready("pod-b", &argv, "listening", Duration::from_secs(10))?;
        let (client, took) = timed_probe("echo", port, LIMIT)?;
        let server = probe_steps(&process::finish(server, LIMIT)?)?;
        if port == PLAIN_PORT {
            if client.iter().any(|(_, e)| *e != 0) || server.iter().any(|(_, e)| *e != 0) {
                return Err(failed!(
                    "the plain port: client {client:?}, server {server:?} (want every step 0)"
                ));
            }
            continue;
        }
        let server_clean = matches!(
            server.as_slice(),
            [(_, 0), (_, 0), (_, 0), (call, e)] if call == "receive" && [libc::ECONNABORTED, libc::ECONNRESET].contains(e)
        );
        let client_clean = matches!(
            client.as_slice(),
            [(_, 0), (_, 0), (call, e)] if call == "exchange" && [libc::ECONNRESET, libc::ECONNABORTED, libc::EPIPE].contains(e)
        );
        let gone = b.stat_reaching(|s| s.failures("socket_gone"), gone_before + 1) - gone_before;
        let aborted =
            b.stat_reaching(|s| s.unreachable_aborted, aborted_before + 1) - aborted_before;
        if !server_clean
            || !client_clean
            || gone != 1
            || aborted != 1
            || took > Duration::from_secs(45)
        {
            return Err(failed!(
                "the protected port after {took:?}: server {server:?} (want its receive to fail with ECONNABORTED or ECONNRESET), client {client:?} (want its exchange reset), both within 45 s; node b counted {gone} socket_gone failures and {aborted} aborts, want 1 each"
            ));
        }
        outcome = format!(
            "an accepted direct descriptor failed closed (socket_gone) and was aborted by its tuple: the server's receive answered errno {}, the client's exchange errno {}, after {:.1} s",
            server[3].1,
            client[2].1,
            took.as_secs_f64()
        );
    }
    let wire = check_wire_allowing_unkeyed(&cap.finish()?, &a, &b, true)?;
    wire.expect_at_least(1, 0)?;
    Ok(format!(
        "{outcome}; plain control echoed; no plaintext on the wire"
    ))
}

/// An event loop waiting on a socket the core cannot take must be woken
/// when the connection fails. A thread with an fd table of its own
/// (`unshare(CLONE_FILES)`) connects, makes the socket non-blocking under
/// edge-triggered epoll and echoes 4 KiB, with TLSHub (a key-only
/// provider) on both nodes, so that the server's end is keyed and waits
/// in silence. On 6.12 the core takes the socket through a pidfd of the
/// thread: the echo exact. On 6.1 nothing reaches it, so the core puts
/// its gate in the terminal state and aborts it by its tuple: the app's
/// wait ends with `ECONNABORTED` and the server's end is reset. Without
/// the abort nothing wakes the app (its write had been told `EAGAIN`, and
/// no readiness edge comes from a closed gate), and the server's end waits
/// forever: the probe gives up after 120 s, which fails here. A plain
/// control echoes and shows the marker.
pub fn event_loop_on_an_unreachable_socket() -> Outcome {
    use std::time::Duration;

    use super::node::ProviderKind;
    use super::service::LoadServer;
    use super::support::{kernel_version, pod_b_connections_gone, timed_probe};
    use super::wire_check::{Capture, check_wire_allowing_unkeyed};

    const WHAT: &str = "own-fd-table-event-loop";
    const LIMIT: Duration = Duration::from_secs(150);
    let (a, b) = nodes(
        NodeSpec::with_provider("a", ProviderKind::TlsHub),
        NodeSpec::with_provider("b", ProviderKind::TlsHub),
    )?;
    let cap = Capture::start("event-loop-unreachable")?;
    let servers = (LoadServer::start()?, LoadServer::start_on(PLAIN_PORT)?);
    let (plain, _) = timed_probe(WHAT, PLAIN_PORT, LIMIT)?;
    if plain.len() != 3 || plain.iter().any(|(_, e)| *e != 0) {
        return Err(failed!(
            "{WHAT} to the plain port: {plain:?} (want 3 steps, all 0)"
        ));
    }
    let (protected, took) = timed_probe(WHAT, PROTECTED_PORT, LIMIT)?;
    let reachable = kernel_version() >= (6, 9);
    let summary = if reachable {
        if protected.len() != 3 || protected.iter().any(|(_, e)| *e != 0) {
            return Err(failed!(
                "{WHAT} to the protected port: {protected:?} (want every step 0: this kernel opens a pidfd for one thread)"
            ));
        }
        "keyed through a pidfd of the thread, the event loop's echo exact".to_string()
    } else {
        let aborted = a.stat_reaching(|s| s.unreachable_aborted, 1);
        let left = pod_b_connections_gone(PROTECTED_PORT)?;
        let woken = matches!(
            protected.as_slice(),
            [(_, 0), (_, 0), (call, libc::ECONNABORTED)] if call == "exchange"
        );
        if !woken || aborted != 1 || left != 0 {
            return Err(failed!(
                "{WHAT} to the protected port after {took:?}: {protected:?} (want the exchange woken with ECONNABORTED); node a aborted {aborted} unreachable connections (want 1), pod-b still holds {left} connections on the protected port"
            ));
        }
        format!(
            "unreachable before Linux 6.9: aborted by its tuple, the event loop woken with ECONNABORTED after {:.1} s, the server's end reset",
            took.as_secs_f64()
        )
    };
    if took > Duration::from_secs(45) {
        return Err(failed!(
            "{WHAT} to the protected port took {took:?}: the event loop waited instead of being answered"
        ));
    }
    drop(servers);
    let wire = check_wire_allowing_unkeyed(&cap.finish()?, &a, &b, !reachable)?;
    wire.expect_at_least(1, usize::from(reachable))?;
    Ok(format!(
        "{summary}; plain control echoed; wire: {} protected flows decrypted, no plaintext",
        wire.decrypted
    ))
}
