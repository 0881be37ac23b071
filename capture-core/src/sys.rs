//! The system calls the core makes on application sockets: kTLS
//! installation, wakeups, reset, and signals. rustix makes most of them;
//! the kTLS structs and the options rustix does not cover (`TCP_ULP`, the
//! two low-water marks) are `tlshub_ktls`'s, so the core has no `unsafe`.

use std::io;
use std::os::fd::BorrowedFd;

use tlshub_ktls::{KtlsStep, SOL_TLS, TLS_RX, get_int_option, set_option};
use tlshub_provider_sdk::ConnectionKeys;

/// Installs kTLS on the socket ([`tlshub_ktls::install`]), then, if
/// `show_gate`, shows the gate what kTLS's receive method is: its
/// getsockopt hook records it from the first socket asked (the answer
/// itself, and an `EINVAL` for the short buffer, do not matter). The gate
/// then counts a socket as open from the moment its receive keys are in.
/// On error the socket may be half-installed; the caller must reset it.
///
/// Last, it acknowledges at once whatever the socket has received and not
/// yet acknowledged ([`ack_now`]).
pub fn install_ktls(
    fd: BorrowedFd<'_>,
    keys: &ConnectionKeys,
    show_gate: bool,
) -> Result<(), (KtlsStep, io::Error)> {
    tlshub_ktls::install(fd, keys)?;
    if show_gate {
        let _ = get_int_option(fd, SOL_TLS, TLS_RX);
    }
    ack_now(fd);
    Ok(())
}

/// Sends the ACK that TCP holds back, if it holds one (`TCP_QUICKACK`,
/// which also leaves delayed-ACK "pingpong" mode until TCP's own heuristic
/// enters it again; nothing else about the socket changes).
///
/// Why: a provider that handshakes over the connection leaves the peer's
/// last flight (the client's `Finished`) unacknowledged here, and TCP
/// delays that ACK (40 ms, `TCP_ATO_MIN`, on a new connection) because
/// this side had just sent its own flight and expects to answer with data. Meanwhile the peer's app,
/// keyed first, sends its first record, and Nagle holds that small
/// segment until the outstanding `Finished` is acknowledged: every
/// in-band connection's first exchange waited for the delayed-ACK timer
/// (ARCHITECTURE.md, "Where setup time goes"). With key-only providers no
/// byte crossed the connection, so nothing is pending and this changes
/// nothing. A failure costs only that delay, so it is not an error.
fn ack_now(fd: BorrowedFd<'_>) {
    if let Err(e) = rustix::net::sockopt::set_tcp_quickack(fd, true) {
        tracing::debug!(error = %e, "cannot acknowledge the handshake's last flight at once");
    }
}

/// Wakes whoever waits for readiness on the socket, after its gate opened:
/// an event loop that the gate answered `EAGAIN` waits for an event that
/// kTLS installation does not give by itself. Each option is written back
/// with the value it has, which changes nothing but calls the socket's
/// callback:
/// - `TCP_NOTSENT_LOWAT` calls `sk_write_space`: writers (`EPOLLOUT`);
/// - with `readers`, `SO_RCVLOWAT` calls `sk_data_ready` if data is
///   waiting: readers of a connection let through in plaintext. Not for
///   kTLS: installing the receive key already woke a reader for a queued
///   record, and while a parsed record waits `SO_RCVLOWAT` wakes nobody
///   anyway (two system calls saved on every keyed connection).
pub fn wake_waiters(fd: BorrowedFd<'_>, readers: bool) -> io::Result<()> {
    let notsent = get_int_option(fd, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT)?;
    set_option(fd, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, &notsent)?;
    if !readers {
        return Ok(());
    }
    let rcvlowat = get_int_option(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT)?;
    set_option(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, &rcvlowat)
}

/// Raises the socket's send buffer to at least `floor` bytes (what
/// `getsockopt(SO_SNDBUF)` reports; the kernel doubles what is set). Uses
/// `SO_SNDBUFFORCE` (CAP_NET_ADMIN, past `net.core.wmem_max`), else
/// `SO_SNDBUF` (capped at twice `wmem_max`). Returns the size before and
/// after; a buffer already at the floor is left alone.
pub fn raise_send_buffer(fd: BorrowedFd<'_>, floor: u32) -> io::Result<(u32, u32)> {
    use rustix::net::sockopt;
    let size =
        |fd| sockopt::socket_send_buffer_size(fd).map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    let before = size(fd)?;
    if before >= floor {
        return Ok((before, before));
    }
    // rustix sets what it is given; the kernel doubles it.
    let half = (floor / 2).max(1) as usize;
    match sockopt::set_socket_send_buffer_size_force(fd, half) {
        // Forced, the size is exactly the doubled value (no cap to read
        // back; this runs for every connection on kernels before 6.5).
        Ok(()) => Ok((before, (floor / 2).max(1).saturating_mul(2))),
        Err(rustix::io::Errno::PERM) => {
            sockopt::set_socket_send_buffer_size(fd, half)?;
            Ok((before, size(fd)?))
        }
        Err(e) => Err(e.into()),
    }
}

/// Resets the connection: `connect(AF_UNSPEC)` makes TCP disconnect, which
/// sends RST for an established connection and sets `ECONNRESET` as the
/// socket error the application sees next.
pub fn reset_connection(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::net::connect_unspec(fd)?)
}

/// Shuts both directions of a connection down (FIN to the peer): what is
/// left when [`reset_connection`] is refused.
pub fn shutdown_both(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::net::shutdown(fd, rustix::net::Shutdown::Both)?)
}

/// Sends SIGCONT to a process.
pub fn continue_process(pid: u32) -> io::Result<()> {
    Ok(rustix::process::kill_process(
        tlshub_provider_sdk::socket::pid(pid)?,
        rustix::process::Signal::CONT,
    )?)
}

/// The monotonic clock in nanoseconds (the clock of `bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn waking_waiters_changes_no_option() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let fd = c.as_fd();
        let get = |level, name| get_int_option(fd, level, name).unwrap();
        let before = [
            get(libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT),
            get(libc::SOL_SOCKET, libc::SO_RCVLOWAT),
            get(libc::SOL_SOCKET, libc::SO_RCVBUF),
            get(libc::SOL_SOCKET, libc::SO_SNDBUF),
        ];
        for readers in [false, true] {
            wake_waiters(fd, readers).unwrap();
        }
        let after = [
            get(libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT),
            get(libc::SOL_SOCKET, libc::SO_RCVLOWAT),
            get(libc::SOL_SOCKET, libc::SO_RCVBUF),
            get(libc::SOL_SOCKET, libc::SO_SNDBUF),
        ];
        assert_eq!(before, after);
    }

    #[test]
    fn reset_sends_rst_and_the_peer_sees_connreset() {
        use std::io::Read;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        reset_connection(c.as_fd()).unwrap();
        let mut buf = [0u8; 4];
        let e = s.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }

    /// The in-band handshake's end, on loopback: the server owes the ACK
    /// of the client's last small segment and delays it (pingpong mode,
    /// set here directly), so Nagle holds the client's next small write.
    /// `ack_now` on the server releases it at once; without it the write
    /// waits for the delayed-ACK timer (at least 20 ms: TCP_ATO_MIN / 2).
    #[test]
    fn ack_now_releases_the_peers_write_that_nagle_held() {
        use std::io::{Read, Write};
        let readable = |s: &std::net::TcpStream, ms: i64| {
            let mut fds = [rustix::event::PollFd::new(s, rustix::event::PollFlags::IN)];
            let timeout = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: ms * 1_000_000,
            };
            rustix::event::poll(&mut fds, Some(&timeout)).unwrap() == 1
        };
        // A scheduling stall of the test thread can hide the hold (the
        // timer fires first) or delay the release past the wait; a few
        // tries make either vanishingly unlikely, and without `ack_now`
        // every try fails.
        let mut shown = false;
        for _ in 0..5 {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (mut s, _) = l.accept().unwrap();
            rustix::net::sockopt::set_tcp_quickack(&s, false).unwrap();
            let mut buf = [0u8; 16];
            c.write_all(b"finished").unwrap();
            s.read_exact(&mut buf[..8]).unwrap();
            c.write_all(b"app").unwrap();
            if readable(&s, 2) {
                continue;
            }
            ack_now(s.as_fd());
            if !readable(&s, 10) {
                continue;
            }
            s.read_exact(&mut buf[..3]).unwrap();
            assert_eq!(&buf[..3], b"app");
            shown = true;
            break;
        }
        assert!(
            shown,
            "in 5 tries the held write never arrived within 10 ms of ack_now (or was never held)"
        );
    }
}
