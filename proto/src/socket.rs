//! Taking another process's socket with `pidfd_open` + `pidfd_getfd`,
//! reading its kernel identity, and doing I/O on it for a handshake
//! ([`SocketIo`]). The SDK's `unsafe` lives here (and one `umask` in the
//! server).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

/// Opens a pidfd for `pid`.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1;
    // no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    owned_from_syscall(fd)
}

/// Duplicates fd number `fd` of the process behind `pidfd` into this
/// process (needs ptrace-attach rights over it, e.g. root with
/// `CAP_SYS_PTRACE`). The duplicate shares the open file description,
/// including `O_NONBLOCK`, with the original.
pub fn pidfd_getfd(pidfd: &OwnedFd, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes two fds and flags and returns a new fd or -1.
    let new = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    owned_from_syscall(new)
}

/// `pidfd_getfd(pidfd_open(pid), fd)`.
pub fn take_fd(pid: u32, fd: i32) -> io::Result<OwnedFd> {
    pidfd_getfd(&pidfd_open(pid)?, fd)
}

fn owned_from_syscall(ret: libc::c_long) -> io::Result<OwnedFd> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let raw = i32::try_from(ret).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// The kernel's socket cookie (`SO_COOKIE`), a 64-bit id that, unlike an
/// fd number, is never reused while the machine runs.
pub fn socket_cookie(fd: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len point to live, correctly sized locals.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
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

    /// What the peer's first bytes say about the provider on its node,
    /// for the error of a failed handshake (see [`describe_peer_start`]).
    pub fn peer_start(&self) -> &'static str {
        describe_peer_start(&self.first)
    }

    fn wait(&self, events: libc::c_short) -> io::Result<()> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "handshake deadline passed",
                ));
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events,
                revents: 0,
            };
            let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
            // SAFETY: pfd is one live pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            match rc {
                0 => continue,
                n if n > 0 => return Ok(()),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }
}

impl io::Read for SocketIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: buf is a live, writable slice of buf.len() bytes.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                let n = n as usize;
                let keep = (FIRST_BYTES - self.first.len()).min(n);
                self.first.extend_from_slice(&buf[..keep]);
                return Ok(n);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => self.wait(libc::POLLIN)?,
                io::ErrorKind::Interrupted => {}
                _ => return Err(e),
            }
        }
    }
}

impl io::Write for SocketIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: buf is a live slice of buf.len() bytes.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => self.wait(libc::POLLOUT)?,
                io::ErrorKind::Interrupted => {}
                _ => return Err(e),
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

    #[test]
    fn the_peer_start_names_the_kind_of_provider() {
        assert!(describe_peer_start(&[]).contains("sent nothing"));
        assert!(describe_peer_start(&[0x16, 0x03, 0x01, 0, 200]).contains("speaks TLS"));
        assert!(describe_peer_start(&[0x17, 0x03, 0x03, 0, 40]).contains("key-only provider"));
        assert!(describe_peer_start(&[0x15, 0x03, 0x03]).contains("alert"));
        assert!(describe_peer_start(b"GET /").contains("not TLS"));
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
