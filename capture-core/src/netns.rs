//! The netlink sockets the core asks the kernel through (ctnetlink,
//! sock_diag), made in its own network namespace or in another. A socket
//! stays in the namespace it was made in, so only a short-lived thread
//! enters the namespace (`setns`, which takes `CAP_SYS_ADMIN`), makes the
//! socket and hands it back; the core's own threads never leave theirs.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why the namespace could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file cannot be opened.
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        /// E.g. `/run/netns/NAME` or `/proc/PID/ns/net`.
        path: PathBuf,
        /// The open's error.
        #[source]
        source: std::io::Error,
    },
    /// `setns()` into it was refused (not a network namespace, or no
    /// `CAP_SYS_ADMIN`).
    #[error("cannot enter network namespace {path}: {source}")]
    Enter {
        /// The namespace file.
        path: PathBuf,
        /// The system call's error.
        #[source]
        source: std::io::Error,
    },
    /// The thread that entered it panicked.
    #[error("the thread that entered network namespace {path} panicked")]
    Panicked {
        /// The namespace file.
        path: PathBuf,
    },
}

/// A netlink socket of `protocol` (`netlink_sys::protocols`), bound and
/// connected to the kernel, whose reads give up after `answer_timeout`:
/// the kernel answers a request at once, so the timeout only bounds one
/// that never does.
pub fn kernel_socket(
    protocol: isize,
    answer_timeout: std::time::Duration,
) -> std::io::Result<netlink_sys::Socket> {
    let mut socket = netlink_sys::Socket::new(protocol)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    rustix::net::sockopt::set_socket_timeout(
        &socket,
        rustix::net::sockopt::Timeout::Recv,
        Some(answer_timeout),
    )?;
    Ok(socket)
}

/// Whether the namespace file at `path` names the namespace this process
/// is in (same device and inode as `/proc/self/ns/net`): then no thread
/// needs to enter it.
pub fn is_own(path: &Path) -> Result<bool, NetnsError> {
    let meta = |p: &Path| {
        std::fs::metadata(p).map_err(|source| NetnsError::Open {
            path: p.to_owned(),
            source,
        })
    };
    let (theirs, ours) = (meta(path)?, meta(Path::new("/proc/self/ns/net"))?);
    Ok(theirs.dev() == ours.dev() && theirs.ino() == ours.ino())
}

/// Whether this process may enter another network namespace at all:
/// `setns` takes `CAP_SYS_ADMIN`. Asked first so that a core without it
/// (the shipped systemd unit, whose `RestrictNamespaces` would refuse the
/// call anyway) says why in words instead of logging a refused call.
pub fn may_enter() -> bool {
    rustix::thread::capabilities(None).is_ok_and(|c| {
        c.effective
            .contains(rustix::thread::CapabilitySet::SYS_ADMIN)
    })
}

/// Runs `make` on a thread that first enters the network namespace at
/// `path`, and returns what it made (a socket made there stays there).
pub fn make_in<T: Send + 'static>(
    path: &Path,
    make: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_owned(),
        source,
    })?;
    let owned = path.to_owned();
    std::thread::spawn(move || {
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .map_err(|e| NetnsError::Enter {
            path: owned,
            source: e.into(),
        })
        .map(|()| make())
    })
    .join()
    .map_err(|_| NetnsError::Panicked {
        path: path.to_owned(),
    })?
}
