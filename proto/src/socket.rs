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

/// `Read`/`Write` over a duplicate of the application's socket that never
/// changes its file status flags: the duplicate shares `O_NONBLOCK` with the
/// application, so instead of toggling it, every call uses `MSG_DONTWAIT`
/// and waits with `poll()` up to a deadline. Hand it to a TLS library for a
/// handshake over the application's connection.
#[derive(Debug)]
pub struct SocketIo {
    fd: OwnedFd,
    deadline: Instant,
}

impl SocketIo {
    /// Wraps `fd`; every read and write fails with `TimedOut` after `deadline`.
    pub fn new(fd: OwnedFd, deadline: Instant) -> Self {
        Self { fd, deadline }
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
                return Ok(n as usize);
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
    fn take_own_socket_and_compare_cookies() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dup = take_fd(std::process::id(), l.as_raw_fd()).unwrap();
        assert_eq!(socket_cookie(&dup).unwrap(), socket_cookie(&l).unwrap());
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_ne!(socket_cookie(&other).unwrap(), socket_cookie(&l).unwrap());
    }

    #[test]
    fn missing_fd_is_ebadf() {
        let e = take_fd(std::process::id(), 99_999).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
    }
}
