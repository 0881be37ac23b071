//! Pidfds of the processes whose sockets the core takes, kept for their
//! next connections: a process that opens many connections (a server, a
//! client pool) costs one `pidfd_open` instead of one per connection.

use std::collections::VecDeque;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use tlshub_provider_sdk::socket::{pidfd_getfd, pidfd_open, pidfd_open_thread};

/// How many processes' pidfds are kept (the most recently used).
const KEPT: usize = 32;

/// The kept pidfds, the most recently used last.
#[derive(Debug)]
pub struct Pidfds {
    kept: Mutex<VecDeque<(u32, OwnedFd)>>,
    opened: AtomicU64,
}

/// The core's: jobs, the fd search and the release take sockets through it.
pub static PIDFDS: Pidfds = Pidfds::new();

impl Pidfds {
    /// None kept.
    pub const fn new() -> Self {
        Self {
            kept: Mutex::new(VecDeque::new()),
            opened: AtomicU64::new(0),
        }
    }

    /// Fd number `fd` of process `pid`, duplicated into this process
    /// (`pidfd_getfd`). A kept pidfd of `pid` is tried first, and dropped
    /// if that fails for any reason; then a fresh one is opened and kept
    /// once it worked. Why a kept one can be trusted only when it works:
    /// it names the process that had `pid` when it was opened. A
    /// `pidfd_getfd` through it succeeds only while that process lives
    /// (an exited one has no files), and a living process keeps its pid,
    /// so a success is from the process that has `pid` now; a failure may
    /// be about an exited process whose pid was reused, so only a fresh
    /// pidfd's answer counts.
    pub fn take(&self, pid: u32, fd: i32) -> io::Result<OwnedFd> {
        self.take_with(pid, fd, pidfd_open)
    }

    /// Fd number `fd` of thread `tid`'s own fd table (see
    /// [`pidfd_open_thread`]; `EINVAL` before Linux 6.9), kept as
    /// [`Pidfds::take`] keeps a process's. Why one cache for both: thread
    /// and process ids are one number space, and the only number that
    /// names both, a thread-group leader's, names the same fd table
    /// either way.
    pub fn take_from_thread(&self, tid: u32, fd: i32) -> io::Result<OwnedFd> {
        self.take_with(tid, fd, pidfd_open_thread)
    }

    fn take_with(
        &self,
        pid: u32,
        fd: i32,
        open: fn(u32) -> io::Result<OwnedFd>,
    ) -> io::Result<OwnedFd> {
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = kept.iter().position(|(p, _)| *p == pid)
            && let Some((_, pidfd)) = kept.remove(at)
            && let Ok(socket) = pidfd_getfd(&pidfd, fd)
        {
            kept.push_back((pid, pidfd));
            return Ok(socket);
        }
        self.opened.fetch_add(1, Ordering::Relaxed);
        let pidfd = open(pid)?;
        let socket = pidfd_getfd(&pidfd, fd)?;
        if kept.len() >= KEPT {
            kept.pop_front();
        }
        kept.push_back((pid, pidfd));
        Ok(socket)
    }

    /// Pidfds opened so far.
    #[cfg(test)]
    fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_process_is_opened_once_and_a_failure_opens_it_again() {
        let pidfds = Pidfds::new();
        let me = std::process::id();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        for _ in 0..3 {
            let dup = pidfds.take(me, a.as_raw_fd()).unwrap();
            assert_eq!(
                tlshub_provider_sdk::socket::socket_cookie(&dup).unwrap(),
                tlshub_provider_sdk::socket::socket_cookie(&a).unwrap()
            );
        }
        assert_eq!(pidfds.opened(), 1, "kept after the first");
        // A number that names nothing: the kept pidfd fails, a fresh one
        // answers (and fails too), and nothing is kept for it.
        let e = pidfds.take(me, 1_000_000).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
        assert_eq!(pidfds.opened(), 2);
        pidfds.take(me, a.as_raw_fd()).unwrap();
        assert_eq!(pidfds.opened(), 3, "dropped after the failure");
        pidfds.take(me, a.as_raw_fd()).unwrap();
        assert_eq!(pidfds.opened(), 3);
    }

    #[test]
    fn at_most_the_most_recent_are_kept() {
        let pidfds = Pidfds::new();
        let me = std::process::id();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        pidfds.take(me, a.as_raw_fd()).unwrap();
        // Other processes (children, their fd 0) fill the rest, then push
        // it out.
        let mut children = Vec::new();
        for _ in 0..KEPT {
            let child = std::process::Command::new("sleep")
                .arg("30")
                .stdin(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let _ = pidfds.take(child.id(), 0);
            children.push(child);
        }
        let kept = pidfds.kept.lock().unwrap().len();
        for mut c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert_eq!(kept, KEPT);
        let before = pidfds.opened();
        pidfds.take(me, a.as_raw_fd()).unwrap();
        assert_eq!(pidfds.opened(), before + 1, "the oldest was dropped");
    }
}
