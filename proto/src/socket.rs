//! Taking another process's socket with `pidfd_open` + `pidfd_getfd`,
//! reading its kernel identity, and doing I/O on it for a handshake
//! ([`SocketIo`]), through rustix's typed system calls.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::net::{RecvFlags, SendFlags};
use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags};

use crate::admission::{Admission, Slot};

/// A process id as the kernel reports it (BPF events, `SO_PEERCRED`,
/// requests): 0 or one past `i32::MAX` names no process (`ESRCH`).
pub fn pid(pid: u32) -> io::Result<Pid> {
    i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))
}

/// Opens a pidfd for `pid`.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    Ok(rustix::process::pidfd_open(
        self::pid(pid)?,
        PidfdFlags::empty(),
    )?)
}

/// `PIDFD_THREAD` (Linux 6.9, `O_EXCL`'s value), which rustix does not
/// name yet.
const PIDFD_THREAD: u32 = 0o200;

/// Opens a pidfd for one thread, `tid` (`PIDFD_THREAD`). `pidfd_getfd`
/// through it reads that thread's fd table, which differs from the
/// process's when the thread called `unshare(CLONE_FILES)` or was made
/// by `clone()` without `CLONE_FILES`; a pidfd from [`pidfd_open`]
/// always reads the thread-group leader's. `EINVAL` before Linux 6.9.
pub fn pidfd_open_thread(tid: u32) -> io::Result<OwnedFd> {
    Ok(rustix::process::pidfd_open(
        self::pid(tid)?,
        PidfdFlags::from_bits_retain(PIDFD_THREAD),
    )?)
}

/// Duplicates fd number `fd` of the process behind `pidfd` into this
/// process (needs ptrace-attach rights over it, e.g. root with
/// `CAP_SYS_PTRACE`). The duplicate shares the open file description,
/// including `O_NONBLOCK`, with the original.
pub fn pidfd_getfd(pidfd: &OwnedFd, fd: i32) -> io::Result<OwnedFd> {
    Ok(rustix::process::pidfd_getfd(
        pidfd,
        fd,
        PidfdGetfdFlags::empty(),
    )?)
}

/// `pidfd_getfd(pidfd_open(pid), fd)`.
pub fn take_fd(pid: u32, fd: i32) -> io::Result<OwnedFd> {
    pidfd_getfd(&pidfd_open(pid)?, fd)
}

/// The kernel's socket cookie (`SO_COOKIE`), a 64-bit id that, unlike an
/// fd number, is never reused while the machine runs.
pub fn socket_cookie(fd: &impl AsFd) -> io::Result<u64> {
    Ok(rustix::net::sockopt::socket_cookie(fd)?)
}

/// What the first bytes a handshake provider received on the connection
/// say about the peer node's provider. Two nodes must run compatible
/// providers; when they do not, this is what names the mismatch in the
/// error (and so in both the provider's and the core's log line).
pub fn describe_peer_start(first: &[u8]) -> &'static str {
    match first {
        [] => {
            "the peer sent nothing: its node runs a key-only provider (such as tlshub or a PSK provider) or no tlshub"
        }
        [0x16, 0x03, ..] => "the peer speaks TLS (a handshake provider)",
        [0x15, 0x03, ..] => "the peer sent a TLS alert (a handshake provider that refused)",
        [0x17, 0x03, 0x03, ..] => {
            "the peer sent an encrypted record instead of a handshake: its node runs a key-only provider (such as tlshub or a PSK provider)"
        }
        _ => {
            "the peer sent bytes that are not TLS: its node did not protect this connection (no tlshub there, or fail-open)"
        }
    }
}

/// `Read`/`Write` over a duplicate of the application's socket that never
/// changes its file status flags: the duplicate shares `O_NONBLOCK` with the
/// application, so instead of toggling it, every call uses `MSG_DONTWAIT`
/// and waits with `poll()` up to a deadline. Hand it to a TLS library for a
/// handshake over the application's connection.
///
/// Given an admission slot ([`SocketIo::hold`]), it gives the slot back
/// when the peer's first bytes arrive, or once the peer has not answered
/// within the stall threshold (see [`crate::admission`]).
#[derive(Debug)]
pub struct SocketIo {
    fd: OwnedFd,
    deadline: Instant,
    /// The first bytes the peer sent (up to a TLS record header), kept to
    /// say what the peer runs when a handshake fails.
    first: Vec<u8>,
    /// The admission slot held until the peer answers, and when holding
    /// it becomes a stall.
    in_flight: Option<(Slot, Instant)>,
}

/// Bytes of the peer's first record header that [`SocketIo`] keeps.
const FIRST_BYTES: usize = 5;

impl SocketIo {
    /// Wraps `fd`; every read and write fails with `TimedOut` after `deadline`.
    pub fn new(fd: OwnedFd, deadline: Instant) -> Self {
        Self {
            fd,
            deadline,
            first: Vec::new(),
            in_flight: None,
        }
    }

    /// Holds `slot` until the peer's first bytes arrive, or until the peer
    /// has been silent for the stall threshold, a share of the time left
    /// (see [`Admission::stall_after`]). Call it before the handshake sends
    /// its first message.
    pub fn hold(&mut self, slot: Slot) {
        let now = Instant::now();
        let budget = self.deadline.saturating_duration_since(now);
        self.in_flight = Some((slot, now + Admission::stall_after(budget)));
    }

    /// The socket back, for what follows the handshake.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// What the peer's first bytes say about the provider on its node,
    /// for the error of a failed handshake (see [`describe_peer_start`]).
    pub fn peer_start(&self) -> &'static str {
        describe_peer_start(&self.first)
    }

    /// Waits for `events` on the socket up to the deadline, giving the
    /// slot back once the stall threshold passes.
    fn wait(&mut self, events: PollFlags) -> io::Result<()> {
        loop {
            let now = Instant::now();
            let left = self.deadline.saturating_duration_since(now);
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "handshake deadline passed",
                ));
            }
            if let Some((slot, _)) = self.in_flight.take_if(|(_, stall_at)| now >= *stall_at) {
                slot.stalled();
            }
            let poll_for = match &self.in_flight {
                Some((_, stall_at)) => left.min(stall_at.saturating_duration_since(now)),
                None => left,
            };
            let mut fds = [PollFd::new(&self.fd, events)];
            let timeout = Timespec::try_from(poll_for).unwrap_or(Timespec {
                tv_sec: i64::MAX,
                tv_nsec: 0,
            });
            match rustix::event::poll(&mut fds, Some(&timeout)) {
                Ok(0) => continue,
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl io::Read for SocketIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match rustix::net::recv(&self.fd, &mut *buf, RecvFlags::DONTWAIT) {
                Ok((n, _)) => {
                    let keep = (FIRST_BYTES - self.first.len()).min(n);
                    self.first.extend_from_slice(&buf[..keep]);
                    if n > 0
                        && let Some((slot, _)) = self.in_flight.take()
                    {
                        slot.answered();
                    }
                    return Ok(n);
                }
                Err(rustix::io::Errno::AGAIN) => self.wait(PollFlags::IN)?,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl io::Write for SocketIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match rustix::net::send(&self.fd, buf, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
                Ok(n) => return Ok(n),
                Err(rustix::io::Errno::AGAIN) => self.wait(PollFlags::OUT)?,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn the_peer_start_names_the_kind_of_provider() {
        assert!(describe_peer_start(&[]).contains("sent nothing"));
        assert!(describe_peer_start(&[0x16, 0x03, 0x01, 0, 200]).contains("speaks TLS"));
        assert!(describe_peer_start(&[0x17, 0x03, 0x03, 0, 40]).contains("key-only provider"));
        assert!(describe_peer_start(&[0x15, 0x03, 0x03]).contains("alert"));
        assert!(describe_peer_start(b"GET /").contains("not TLS"));
    }

    #[test]
    fn pids_that_name_no_process_are_esrch() {
        for bad in [0, u32::MAX, 1 << 31] {
            assert_eq!(pid(bad).unwrap_err().raw_os_error(), Some(libc::ESRCH));
        }
        assert_eq!(pid(1).unwrap().as_raw_nonzero().get(), 1);
    }

    #[test]
    fn take_own_socket_and_compare_cookies() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dup = take_fd(std::process::id(), l.as_raw_fd()).unwrap();
        assert_eq!(socket_cookie(&dup).unwrap(), socket_cookie(&l).unwrap());
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_ne!(socket_cookie(&other).unwrap(), socket_cookie(&l).unwrap());
    }

    #[test]
    fn socket_io_keeps_the_peers_first_bytes() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (ours, _) = l.accept().unwrap();
        let mut io = SocketIo::new(
            OwnedFd::from(ours),
            Instant::now() + std::time::Duration::from_secs(5),
        );
        assert!(io.peer_start().contains("sent nothing"));
        peer.write_all(&[0x17, 0x03]).unwrap();
        let mut buf = [0u8; 2];
        io.read_exact(&mut buf).unwrap();
        peer.write_all(&[0x03, 0, 9, 1, 2, 3]).unwrap();
        let mut rest = [0u8; 6];
        io.read_exact(&mut rest).unwrap();
        assert!(
            io.peer_start().contains("key-only provider"),
            "{}",
            io.peer_start()
        );
    }

    /// A connected pair of TCP sockets: ours as an `OwnedFd`, and the peer.
    fn tcp_pair() -> (OwnedFd, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (ours, _) = l.accept().unwrap();
        (OwnedFd::from(ours), peer)
    }

    /// An admission with one slot, and that slot, taken.
    async fn one_slot_taken() -> (Admission, Slot) {
        let admission = Admission::new(
            std::num::NonZeroUsize::MIN,
            std::num::NonZeroUsize::MIN,
            crate::admission::AdmissionMetrics::default(),
        );
        let slot = admission.acquire(Instant::now() + SECOND).await.unwrap();
        (admission, slot)
    }

    const SECOND: std::time::Duration = std::time::Duration::from_secs(1);

    /// Waits until `admission` has `n` slots in use; panics after 5 s.
    async fn until_in_flight(admission: &Admission, n: i64) {
        let give_up = Instant::now() + 5 * SECOND;
        while admission.metrics().in_flight.get() != n {
            assert!(Instant::now() < give_up, "never {n} in flight");
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// Holds a slot over `ours`, writes a greeting and reads the peer's
    /// answer, on a blocking thread; then keeps the socket wrapper until
    /// `done` says so (a handshake that goes on after the answer), and
    /// gives the socket back.
    fn greet_and_read(
        ours: OwnedFd,
        slot: Slot,
        budget: std::time::Duration,
        done: std::sync::mpsc::Receiver<()>,
    ) -> tokio::task::JoinHandle<OwnedFd> {
        use std::io::{Read, Write};
        tokio::task::spawn_blocking(move || {
            let mut io = SocketIo::new(ours, Instant::now() + budget);
            io.hold(slot);
            io.write_all(b"hello").unwrap();
            let mut answer = [0u8; 2];
            io.read_exact(&mut answer).unwrap();
            assert_eq!(&answer, b"hi");
            done.recv().unwrap();
            io.into_fd()
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slot_is_held_until_the_peer_answers() {
        use std::io::{Read, Write};
        let (admission, slot) = one_slot_taken().await;
        let (ours, mut peer) = tcp_pair();
        let (done, until_done) = std::sync::mpsc::channel();
        let greeting = greet_and_read(ours, slot, 20 * SECOND, until_done);
        let mut hello = [0u8; 5];
        peer.read_exact(&mut hello).unwrap();
        // Written, not answered: still in flight.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(admission.metrics().in_flight.get(), 1);
        peer.write_all(b"hi").unwrap();
        // Answered: free while the handshake goes on.
        until_in_flight(&admission, 0).await;
        assert!(!greeting.is_finished());
        done.send(()).unwrap();
        greeting.await.unwrap();
        assert_eq!(admission.metrics().stalled.get(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_peer_past_the_stall_threshold_frees_the_slot_for_good() {
        use std::io::{Read, Write};
        // The stall threshold: a quarter of 400 ms.
        let (admission, slot) = one_slot_taken().await;
        let (ours, mut peer) = tcp_pair();
        let (done, until_done) = std::sync::mpsc::channel();
        let greeting = greet_and_read(ours, slot, 4 * SECOND / 10, until_done);
        until_in_flight(&admission, 0).await;
        assert_eq!(admission.metrics().stalled.get(), 1);
        let mut hello = [0u8; 5];
        peer.read_exact(&mut hello).unwrap();
        peer.write_all(b"hi").unwrap();
        // Read by now; the answer after the stall takes no slot again.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(admission.metrics().in_flight.get(), 0);
        done.send(()).unwrap();
        greeting.await.unwrap();
        assert_eq!(admission.metrics().stalled.get(), 1);
    }

    #[test]
    fn missing_fd_is_ebadf() {
        let e = take_fd(std::process::id(), 99_999).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
    }
}
