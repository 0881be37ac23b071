//! Taking another process's socket with `pidfd_open` + `pidfd_getfd`,
//! reading its kernel identity, and doing I/O on it for a handshake
//! ([`SocketIo`]), through rustix's typed system calls.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::net::{RecvFlags, SendFlags};
use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags};

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
#[derive(Debug)]
pub struct SocketIo {
    fd: OwnedFd,
    deadline: Instant,
    /// The first bytes the peer sent (up to a TLS record header), kept to
    /// say what the peer runs when a handshake fails.
    first: Vec<u8>,
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
        }
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

    fn wait(&self, events: PollFlags) -> io::Result<()> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "handshake deadline passed",
                ));
            }
            let mut fds = [PollFd::new(&self.fd, events)];
            let timeout = Timespec::try_from(left).unwrap_or(Timespec {
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

    #[test]
    fn missing_fd_is_ebadf() {
        let e = take_fd(std::process::id(), 99_999).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
    }
}
