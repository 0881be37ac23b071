//! Keying one connection: take the application's socket, make sure it is
//! the right one, ask the provider, install kTLS. Each is a future the
//! event loop polls beside the others, so it never waits on a provider.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use std::sync::Arc;

use tlshub_provider_sdk::client::ClientError;
use tlshub_provider_sdk::socket::socket_cookie;
use tlshub_provider_sdk::{CipherSuite, KeyRequest, Role, SocketHandle, TlsVersion};

use tlshub_ebpf::{Conn, Event, kind};

use crate::bpf::ConnsReader;
use crate::config::{PolicySection, RuleMode};
use crate::conntrack::Conntrack;
use crate::peers::{Counted, Heard, PeerMemory, Verdict};
use crate::pidfds::PIDFDS;
use crate::providers::Provider;
use crate::service::{ServiceError, ServiceRoute};
use crate::state::same_connection;
use crate::sys;
use tlshub_ktls::KtlsStep;

/// Everything needed to key one connection.
#[derive(Debug, Clone)]
pub struct Job {
    /// Its number, returned in the [`Outcome`].
    pub id: u64,
    /// The socket's cookie: its key in the BPF maps.
    pub cookie: u64,
    /// Whether this side connected (client) or accepted (server).
    pub role: Role,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// This side's initial sequence number (key-only providers derive
    /// keys from both ISNs and the 4-tuple).
    pub local_isn: u32,
    pub remote_isn: u32,
    /// Where the socket is taken from (`pidfd_getfd`): the pid and the fd
    /// (as of connect/accept; -1 when the owner came from a gate hold,
    /// which names no fd). `None` while no process is known to hold it: a
    /// job for a provider that needs no socket starts at establishment,
    /// before `accept()` returns, and the event loop sends the owner here
    /// once it is known, or closes the channel when the connection ended
    /// first or the core is stopping.
    pub owner: tokio::sync::watch::Receiver<Option<(u32, i32)>>,
    /// This node's name, passed to the provider.
    pub node_name: String,
    /// The key timeout: the provider's budget plus the margin for its
    /// answer (see `provider_budget`).
    pub timeout: Duration,
    /// Where to export keys for offline decryption (tests and debugging only).
    pub keylog: Option<KeyLog>,
    /// The send buffer the socket gets at least (0: left alone); see
    /// [`crate::config::KtlsSection::send_buffer_floor`].
    pub send_buffer_floor: u32,
    /// The node's `conns` map, read before the provider is asked and again
    /// before the keys go in.
    pub conns: Arc<ConnsReader>,
    /// The connection's ESTABLISHED event, which the fields above come
    /// from; compared with the `conns` entry by [`Job::carried_by`].
    pub established: Event,
    /// Set when `remote` is a service address: the node's connection
    /// tracking table, where its real destination is read before anything
    /// else (see [`crate::service`]).
    pub service: Option<Arc<Conntrack>>,
    /// The policy as of the job's start: it judges a service's backend, and
    /// the rule's mode decides what a silent peer means.
    pub policy: Arc<PolicySection>,
    /// The peers that announced tlshub before: a silent peer found here
    /// is a downgrade.
    pub peers: Arc<PeerMemory>,
    /// Whether the peer, silent, was remembered when `established` was
    /// read (the event loop records announcements then, in the order the
    /// handshakes came). `None`: not known then (a service address, whose
    /// backend is learnt by the job; a connection adopted from a previous
    /// core): asked of `peers` now, and an announcement recorded now.
    pub peer_remembered: Option<bool>,
    /// Set when the connection's process or cgroup is over its bound: the
    /// job takes the socket (to reset it) and asks no provider.
    pub over_bound: Option<OverBound>,
    /// Whether the gate still has to learn kTLS's receive method from a
    /// keyed socket (see [`sys::install_ktls`]); false once it knows, which
    /// saves every later connection a system call.
    pub show_ktls_to_gate: bool,
}

impl Job {
    /// Reads the translation of this connection to a service address and
    /// decides (off the async runtime: the lookup is a blocking netlink
    /// round trip).
    async fn route(&self, table: Arc<Conntrack>) -> Result<ServiceRoute, ServiceError> {
        let (local, service) = (self.local, self.remote);
        let looked = tokio::task::spawn_blocking(move || table.lookup(local, service))
            .await
            .unwrap_or_else(|join| {
                Err(crate::conntrack::ConntrackError::Io(std::io::Error::other(
                    join.to_string(),
                )))
            })?;
        crate::service::route(&self.policy, local, service, looked)
    }

    /// What the handshake's announcement means for this connection (with
    /// `remote` the backend, for a service address), against `own`, the
    /// keying byte of the provider the job uses: `None` to key it, else how
    /// it ends without keys. An announcing, compatible peer is remembered;
    /// a silent one under an opportunistic rule goes plain unless it
    /// announced before (then it is keyed as under a strict rule); one that
    /// announced another keying protocol goes plain under an opportunistic
    /// rule if never heard before, and fails at once otherwise.
    fn judge_peer(&self, own: u8) -> Option<Result<Done, KeyingError>> {
        let ip = self.remote.ip();
        let est = &self.established;
        let heard = Heard::from_event(est.peer, est.peer_keying, own);
        if heard != Heard::Silent {
            self.peers.saw_keying(ip, est.peer_keying);
        }
        // Asked only when it matters: the rule lookup walks the policy.
        let opportunistic = heard != Heard::Announced
            && self
                .policy
                .rule_for(self.role == Role::Client, self.local, self.remote)
                .is_some_and(|r| r.mode == RuleMode::Opportunistic);
        let remembered = heard != Heard::Announced
            && self
                .peer_remembered
                .unwrap_or_else(|| self.peers.remembers(ip));
        let plain = |why| {
            self.peers.count(ip, Counted::Plain);
            Some(Ok(Done::Plain {
                remote: self.remote,
                why,
            }))
        };
        match crate::peers::verdict(heard, opportunistic, remembered) {
            // The event loop recorded it already when it read the event;
            // a service backend or an adopted connection it could not.
            Verdict::Remember if self.peer_remembered.is_none() => self.peers.announced(ip),
            Verdict::Remember | Verdict::Key => {}
            Verdict::KnownPeerSilent => {
                self.peers.count(ip, Counted::KnownPeerSilent);
                // Not a warning: every connection to a listener older than
                // its node's programs looks the same. A real downgrade
                // fails its keying, which is logged as a failure.
                tracing::info!(
                    peer = %self.peers.peer_of(ip),
                    "peer known to run tlshub was silent (a listener older than its node's programs, the option stripped on the way, or its tlshub gone): keyed as under a strict rule, not plain"
                );
            }
            Verdict::Plain => return plain(PlainWhy::PeerSilent),
            Verdict::PlainIncompatible => return plain(PlainWhy::PeerIncompatible),
            Verdict::Incompatible => {
                self.peers.count(ip, Counted::Incompatible);
                return Some(Err(KeyingError::IncompatiblePeer {
                    theirs: est.peer_keying,
                    ours: own,
                }));
            }
        }
        None
    }

    /// Whether `now`, the socket's `conns` entry as read by the job, is
    /// still the connection this job keys (see
    /// [`crate::state::same_connection`]). A socket disconnected meanwhile
    /// has no entry (`TCP_CLOSE` removed it), and one connected again has
    /// its new connection's ISNs.
    pub fn carried_by(&self, now: Option<&Conn>) -> bool {
        is_connection(now, &self.established)
    }
}

/// Whether the `conns` entry `now` is the established connection `est`.
fn is_connection(now: Option<&Conn>, est: &Event) -> bool {
    now.is_some_and(|c| c.est.kind == kind::ESTABLISHED && same_connection(&c.est, est))
}

/// An opt-in export of installed keys, one JSON line per connection, so a
/// packet capture can be decrypted (like `SSLKEYLOGFILE`). Off by default;
/// the core warns loudly at startup when it is on.
#[derive(Debug, Clone)]
pub struct KeyLog(pub std::sync::Arc<std::sync::Mutex<std::fs::File>>);

impl KeyLog {
    fn record(&self, job: &Job, keys: &tlshub_provider_sdk::ConnectionKeys) {
        use std::io::Write;
        let record =
            tlshub_provider_sdk::keylog::KeyLogRecord::new(job.cookie, job.local, job.remote, keys);
        let Ok(mut line) = serde_json::to_string(&record) else {
            return;
        };
        line.push('\n');
        if let Ok(mut f) = self.0.lock() {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

/// Why a connection could not be keyed.
#[derive(Debug, thiserror::Error)]
pub enum KeyingError {
    /// The socket is no longer reachable in the owner (closed, or the fd
    /// number now names something else and no other fd holds the socket).
    #[error("socket {cookie} is gone from pid {pid} (fd {fd} and all other fds checked)")]
    SocketGone {
        cookie: u64,
        /// The process searched.
        pid: u32,
        /// The fd number it had at connect/accept (-1: none known).
        fd: i32,
    },
    /// The fd number did not name the socket, and the process's fds could
    /// not be listed to look for it (`/proc/PID/fd` of a process of
    /// another user needs `CAP_DAC_READ_SEARCH`; `CAP_SYS_PTRACE` is not
    /// enough).
    #[error(
        "socket {cookie} is not at fd {fd} of pid {pid}, and its other fds cannot be listed (/proc/{pid}/fd: {source}); a process of another user needs CAP_DAC_READ_SEARCH"
    )]
    FdsUnlisted {
        cookie: u64,
        /// The process whose fds were to be searched.
        pid: u32,
        /// The fd number it had at connect/accept (-1: none known).
        fd: i32,
        /// Why the listing failed.
        #[source]
        source: std::io::Error,
    },
    /// Not in the fd table a pidfd of the process reads (its leader's),
    /// and another thread holds sockets that are not there either, which
    /// this kernel gives no way to take: a pidfd for one thread needs Linux
    /// 6.9. The thread has an fd table of its own (`unshare(CLONE_FILES)`),
    /// or the process's main thread has exited (`pthread_exit()` from
    /// `main()`), taking the leader's table with it.
    #[error(
        "socket {cookie} is not in the fd table of pid {pid}'s main thread, and thread {tid} holds sockets outside it (a thread with an fd table of its own, or a main thread that has exited), which only Linux 6.9 or later lets the core take ({source})"
    )]
    InThreadFdTable {
        cookie: u64,
        /// The process searched.
        pid: u32,
        /// A thread whose fd table holds sockets the leader's does not.
        tid: u32,
        /// `pidfd_open(PIDFD_THREAD)`'s error.
        #[source]
        source: std::io::Error,
    },
    /// pidfd_open/pidfd_getfd failed.
    #[error("cannot take fd {fd} of pid {pid}: {source}")]
    TakeSocket {
        pid: u32,
        fd: i32,
        /// The system call's error.
        #[source]
        source: std::io::Error,
    },
    /// The provider did not produce usable keys.
    #[error(transparent)]
    Provider(#[from] ClientError),
    /// The socket no longer carries the connection the job is for (it was
    /// disconnected, and maybe connected again, before the provider was
    /// asked or while it worked); nothing was installed.
    #[error("socket {cookie} no longer carries the connection this keying job is for")]
    Reconnected { cookie: u64 },
    /// Keys were ready but no process was known to hold the socket before
    /// the connection ended or the core began to stop; nothing was
    /// installed.
    #[error("no process took socket {cookie} before its connection ended or the core stopped")]
    NoOwner { cookie: u64 },
    /// A connection to a service address could not be routed.
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// Its process or cgroup already had as many connections keying as it
    /// may ([`OverBound`]): refused without asking a provider.
    #[error(transparent)]
    OverBound(#[from] OverBound),
    /// The other end announced, in the TCP handshake, a keying protocol
    /// this node's provider does not speak (strict rule, or a peer that
    /// announced a compatible one before): no provider can key it.
    #[error(
        "the peer's provider speaks another keying protocol (its announced byte {theirs:#04x}, this node's provider {ours:#04x}): both nodes must run providers of the same keying protocol (`tlshubctl provider list`)"
    )]
    IncompatiblePeer {
        /// The peer's keying byte.
        theirs: u8,
        /// This node's provider's keying byte.
        ours: u8,
    },
    /// The job panicked (a bug; the panic is printed on stderr): the
    /// connection is failed by policy rather than left gated for good.
    #[error("the keying job panicked (a bug in tlshub-core; the panic message is on its stderr)")]
    Panicked,
    /// The kernel refused a kTLS step.
    #[error("kTLS {step:?} failed: {source}")]
    Install {
        /// The step the kernel refused (the ones before it are in).
        step: KtlsStep,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
}

impl KeyingError {
    /// A short label for counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::SocketGone { .. } => "socket_gone",
            Self::FdsUnlisted { .. } => "fds_unlisted",
            Self::InThreadFdTable { .. } => "thread_fd_table",
            Self::TakeSocket { .. } => "take_socket",
            Self::Reconnected { .. } => "reconnected",
            Self::NoOwner { .. } => "no_owner",
            Self::Provider(e) => e.reason(),
            Self::Service(e) => e.reason(),
            Self::OverBound(OverBound::Process { .. }) => "process_bound",
            Self::OverBound(OverBound::Cgroup { .. }) => "cgroup_bound",
            Self::IncompatiblePeer { .. } => "keying_mismatch",
            Self::Install { .. } => "ktls_install",
            Self::Panicked => "internal",
        }
    }
}

/// A connection refused because its process, or its process's cgroup,
/// already had as many connections waiting for keys as it may (`[bpf]
/// max_connections_per_process` and `max_connections_per_cgroup`). Each
/// one holds an entry of the node's `conns` map until it is keyed, so
/// without these bounds one app whose peers answer but never let a
/// connection be keyed could fill the map and make every other app's new
/// selected connections fail. The job resets the connection whatever the
/// failure policy: capacity never means plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OverBound {
    /// The owner process is at its bound.
    #[error(
        "process {pid} already has {max} connections waiting for keys, the most one process may have ([bpf] max_connections_per_process)"
    )]
    Process {
        /// The process (its connections' owner).
        pid: u32,
        /// The bound.
        max: u32,
    },
    /// The owner's cgroup is at its bound (its other processes have the
    /// rest).
    #[error(
        "cgroup {cgroup} (of process {pid}) already has {max} connections waiting for keys, the most one cgroup may have ([bpf] max_connections_per_cgroup)"
    )]
    Cgroup {
        /// The cgroup v2 id (the inode number of its directory).
        cgroup: u64,
        /// The process whose connection was refused.
        pid: u32,
        /// The bound.
        max: u32,
    },
}

/// The result of a job, sent back to the event loop. `S` is the core's
/// handle on the socket (a fake one in the state machine's tests).
#[derive(Debug)]
pub struct Outcome<S = OwnedFd> {
    /// The job, as numbered by [`crate::state::Start`].
    pub job: u64,
    /// The job's cookie.
    pub cookie: u64,
    /// The provider the job used.
    pub provider: String,
    /// The core's duplicate of the socket, when it was found.
    pub socket: Option<S>,
    /// What happened.
    pub result: Result<Done, KeyingError>,
}

/// How a job ended well.
#[derive(Debug, Clone, Copy)]
pub enum Done {
    /// kTLS is in.
    Installed(Installed),
    /// Nothing to key, by policy: the gate is to open as plain.
    Plain {
        /// The other end (for a service address, its backend).
        remote: SocketAddr,
        /// Which policy said so.
        why: PlainWhy,
    },
}

/// Why a selected connection goes on as plain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainWhy {
    /// It went to a service address whose backend no rule selects.
    ServiceBackendUnselected,
    /// Its rule is opportunistic and the other end did not announce tlshub
    /// in the TCP handshake.
    PeerSilent,
    /// Its rule is opportunistic and the other end announced a keying
    /// protocol this node's provider does not speak.
    PeerIncompatible,
}

/// What was installed.
#[derive(Debug, Clone, Copy)]
pub struct Installed {
    /// TLS version.
    pub version: TlsVersion,
    /// Cipher.
    pub cipher: CipherSuite,
    /// Time spent in the provider.
    pub key_time: Duration,
    /// The keys were ready before any process was known to hold the socket
    /// (keyed from establishment, installed when `accept()` returned).
    pub keyed_before_owner: bool,
    /// The backend, for a connection to a service address (its remote end
    /// as keyed).
    pub backend: Option<SocketAddr>,
    /// When the job passed each of its stages.
    pub timeline: JobTimeline,
}

/// When a job passed each of its stages, in ns of `CLOCK_MONOTONIC` (the
/// clock of the BPF timestamps the state machine measures them from; see
/// [`tlshub_admin::stats::Stage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobTimeline {
    /// The job's task began to run.
    pub started: u64,
    /// The core had its duplicate of the socket.
    pub socket_taken: u64,
    /// The key request went out (the last attempt's, if the provider was
    /// waited for).
    pub asked: u64,
    /// The keys arrived.
    pub answered: u64,
    /// kTLS was installed.
    pub installed: u64,
}

/// Takes fd `fd` of `pid` and checks it is the socket with `cookie`. fd
/// numbers are reused, so when it is not, every other socket fd of the
/// process is checked (the app may have dup2()ed it elsewhere). A negative
/// `fd` (the owner came from a gate hold, which names no fd) goes straight
/// to that search.
///
/// The search costs a few syscalls per fd of the process, so it runs only
/// while `connected()` says the connection is still there. Why: the usual
/// reason for a reused fd number is that the app closed a connection that
/// failed or that its peer reset, and a server holding 100,000 sockets
/// would otherwise read all of them for each such connection (measured by
/// the capacity run: most of the core's time went into such searches).
pub fn find_socket(
    pid: u32,
    fd: i32,
    cookie: u64,
    connected: impl Fn() -> bool,
) -> Result<OwnedFd, KeyingError> {
    match take_by_number(pid, fd, cookie)? {
        Some(s) => Ok(s),
        None => search_socket(pid, fd, cookie, connected),
    }
}

/// Takes fd `fd` of `pid` if it is the socket with `cookie` (two system
/// calls, and a `pidfd_open` for a process not taken from lately);
/// `None` if the number names something else, nothing, or is negative
/// (no number known), or the leader has no fd table left.
fn take_by_number(pid: u32, fd: i32, cookie: u64) -> Result<Option<OwnedFd>, KeyingError> {
    if fd < 0 {
        return Ok(None);
    }
    match PIDFDS.take(pid, fd) {
        Ok(s) if socket_cookie(&s).ok() == Some(cookie) => Ok(Some(s)),
        Ok(_) => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(None),
        // The leader has exited and taken its fd table along: a process
        // gone, or one whose main thread exited on its own while the
        // others run on (the search finds which).
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(None),
        Err(source) => Err(KeyingError::TakeSocket { pid, fd, source }),
    }
}

/// The search half of [`find_socket`]: every socket fd of `pid` but
/// `fd`, while `connected()`; then the sockets of threads that have an fd
/// table of their own ([`search_thread_tables`]).
fn search_socket(
    pid: u32,
    fd: i32,
    cookie: u64,
    connected: impl Fn() -> bool,
) -> Result<OwnedFd, KeyingError> {
    if !connected() {
        return Err(KeyingError::Reconnected { cookie });
    }
    let dir = match std::fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(dir) => dir,
        // The process ended.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(KeyingError::SocketGone { cookie, pid, fd });
        }
        Err(source) => {
            return Err(KeyingError::FdsUnlisted {
                cookie,
                pid,
                fd,
                source,
            });
        }
    };
    // Every fd number listed here, so that the threads' tables are read
    // only for the numbers this table does not have.
    let mut listed = std::collections::HashSet::new();
    for entry in dir.flatten() {
        let Some(number) = fd_number(&entry) else {
            continue;
        };
        listed.insert(number);
        if number != fd
            && is_socket(&entry)
            && let Ok(s) = PIDFDS.take(pid, number)
            && socket_cookie(&s).ok() == Some(cookie)
        {
            return Ok(s);
        }
    }
    match search_thread_tables(pid, cookie, &listed, &connected) {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(KeyingError::SocketGone { cookie, pid, fd }),
        Err((tid, source)) => Err(KeyingError::InThreadFdTable {
            cookie,
            pid,
            tid,
            source,
        }),
    }
}

/// An fd directory entry's number.
fn fd_number(entry: &std::fs::DirEntry) -> Option<i32> {
    entry.file_name().to_str()?.parse().ok()
}

/// Whether an fd directory entry is a socket (its link reads
/// "socket:[INODE]").
fn is_socket(entry: &std::fs::DirEntry) -> bool {
    std::fs::read_link(entry.path())
        .is_ok_and(|link| link.as_os_str().as_encoded_bytes().starts_with(b"socket:"))
}

/// Looks for the socket in the fd tables of `pid`'s threads, at the fd
/// numbers the process's table has not `listed`, while `connected()`. A
/// pidfd of the process reads only the thread-group leader's table, which
/// a thread that called `unshare(CLONE_FILES)` (or was cloned without
/// `CLONE_FILES`) does not share, and which is gone once the main thread
/// exited on its own (`pthread_exit()` from `main()`: the leader stays a
/// zombie with no fd table, `/proc/PID/fd` lists nothing, and the other
/// threads run on). Why by number: a thread that shares the leader's
/// table then costs one directory listing and no system call per fd
/// (this search runs for every socket handed off to another process, and
/// a server may have hundreds of threads and thousands of fds). The price:
/// a thread with a table of its own whose socket sits at a number the
/// leader's table also uses is not found, and the connection fails by
/// policy, as it did before threads were searched at all.
/// `Err((tid, error))` when a thread holds such a socket but this kernel
/// opens no pidfd for one thread (before Linux 6.9: `EINVAL`).
fn search_thread_tables(
    pid: u32,
    cookie: u64,
    listed: &std::collections::HashSet<i32>,
    connected: impl Fn() -> bool,
) -> Result<Option<OwnedFd>, (u32, std::io::Error)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Ok(None);
    };
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if tid == pid {
            continue;
        }
        if !connected() {
            return Ok(None);
        }
        let Ok(fds) = std::fs::read_dir(task.path().join("fd")) else {
            continue;
        };
        for entry in fds.flatten() {
            let Some(number) = fd_number(&entry) else {
                continue;
            };
            if listed.contains(&number) || !is_socket(&entry) {
                continue;
            }
            match PIDFDS.take_from_thread(tid, number) {
                Ok(s) if socket_cookie(&s).ok() == Some(cookie) => return Ok(Some(s)),
                Ok(_) => {}
                // This kernel opens no thread's pidfd, so no other
                // thread's table can be searched either.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Err((tid, e)),
                // The thread ended or closed it meanwhile.
                Err(_) => {}
            }
        }
    }
    Ok(None)
}

/// Whether a process accepts connections on `path` now.
async fn listening(path: &std::path::Path) -> bool {
    tokio::net::UnixStream::connect(path).await.is_ok()
}

/// How often a job asks again while its provider is unavailable (e.g.
/// restarting), until the job's deadline.
const PROVIDER_RETRY: Duration = Duration::from_millis(100);

/// The time a provider is given out of what is `left` of the key timeout.
/// Why less than all of it: a provider that gives up at its own deadline
/// answers with the reason (a handshake provider says what the peer sent,
/// which names a provider mismatch); the core's own deadline is the hard
/// limit, and an answer arriving after it carries nothing. A tenth, at
/// least 200 ms (but at most half), is kept for the answer to travel.
fn provider_budget(left: Duration) -> Duration {
    let margin = (left / 10).max(Duration::from_millis(200)).min(left / 2);
    left - margin
}

/// [`find_socket`], searching only while the job's connection is still
/// in `conns`. The usual case, the fd number still naming the socket, is
/// two system calls and runs on the job's task; only a search of the
/// process's fds goes to a blocking thread. Why not all of it there: the
/// hop to that thread was a millisecond or two of every connection's
/// setup in the benchmark's VM (the `socket_taken` stage).
async fn take_socket(job: &Job, pid: u32, fd: i32) -> Result<OwnedFd, KeyingError> {
    let cookie = job.cookie;
    if let Some(s) = take_by_number(pid, fd, cookie)? {
        return Ok(s);
    }
    let (conns, established) = (job.conns.clone(), job.established);
    let found = tokio::task::spawn_blocking(move || {
        search_socket(pid, fd, cookie, || {
            is_connection(conns.conn(cookie).as_ref(), &established)
        })
    })
    .await;
    found.unwrap_or_else(|join| {
        let source = std::io::Error::other(join.to_string());
        Err(KeyingError::TakeSocket { pid, fd, source })
    })
}

/// Takes the socket from its owner, first waiting for the owner if it is
/// not known yet (a job keyed from establishment): with no deadline of its
/// own, until the app accepts (or its `connect()` returns). Why no deadline: an accept queue may hold a connection for
/// long, and the connection keeps its gate closed meanwhile, as it would
/// with no job. [`KeyingError::NoOwner`] once the event loop stops the
/// wait (the connection ended, or the core is stopping).
async fn socket_of_owner(
    job: &Job,
    owner: &mut tokio::sync::watch::Receiver<Option<(u32, i32)>>,
) -> Result<OwnedFd, KeyingError> {
    // Copied out at once: the channel's guard must not be held across the
    // search.
    let known = owner.wait_for(Option::is_some).await.map(|o| *o);
    let Ok(Some((pid, fd))) = known else {
        return Err(KeyingError::NoOwner { cookie: job.cookie });
    };
    tracing::debug!(pid, fd, "taking the socket from its owner");
    take_socket(job, pid, fd).await
}

/// Runs one job to its end on `provider`. A provider that is not running
/// (its socket is gone or refuses) is waited for until the key timeout: a
/// provider restart shorter than the timeout costs the connection only the
/// wait. A job started before its owner was known asks the provider first
/// and then waits for the owner (see [`Job::owner`]), with no deadline:
/// the connection stays gated meanwhile, as it would with no job.
pub async fn run(mut job: Job, provider: Arc<Provider>) -> Outcome {
    let mut timeline = JobTimeline {
        started: sys::monotonic_ns(),
        ..JobTimeline::default()
    };
    let cookie = job.cookie;
    let name = provider.name.clone();
    let id = job.id;
    let outcome = |socket, result| Outcome {
        job: id,
        cookie,
        provider: name.clone(),
        socket,
        result,
    };
    let deadline = Instant::now() + job.timeout;
    let mut owner = job.owner.clone();
    if let Some(over) = job.over_bound {
        let socket = socket_of_owner(&job, &mut owner).await.ok();
        return outcome(socket, Err(over.into()));
    }
    // A service address first: its real destination decides whether there
    // is anything to key, and is the remote end the provider keys with.
    let mut backend = None;
    let mut ended = None;
    if let Some(table) = job.service.take() {
        ended = match job.route(table).await {
            Ok(ServiceRoute::Keyed { backend: b }) => {
                tracing::debug!(service = %job.remote, backend = %b, "service address translated to a selected backend");
                job.remote = b;
                backend = Some(b);
                None
            }
            Ok(ServiceRoute::Plain { backend }) => Some(Ok(Done::Plain {
                remote: backend,
                why: PlainWhy::ServiceBackendUnselected,
            })),
            Err(e) => Some(Err(KeyingError::from(e))),
        };
    }
    if ended.is_none() {
        ended = job.judge_peer(provider.keying_id());
    }
    if let Some(result) = ended {
        // Plain, or not routable: either way the gate's next step needs the
        // socket (to wake an event loop that was told EAGAIN, or to reset
        // it under fail-closed).
        let socket = socket_of_owner(&job, &mut owner).await.ok();
        return outcome(socket, result);
    }
    // The socket is taken first when the owner is known already, and when
    // the provider needs the socket (a job started from establishment whose
    // provider changed since, or a fallback that stands in, waits for the
    // owner here): a handshake provider needs it, and a socket that is gone
    // costs no provider call.
    let mut socket = None;
    if owner.borrow_and_update().is_some() || !provider.keys_without_socket() {
        match socket_of_owner(&job, &mut owner).await {
            Ok(s) => socket = Some(s),
            Err(e) => return outcome(None, Err(e)),
        }
        timeline.socket_taken = sys::monotonic_ns();
        // An app may disconnect the socket and connect it again (same
        // cookie) before the job gets here: a handshake provider would then
        // run this connection's handshake on the new one and use up the
        // peer's, so the new connection's own job would find a peer that is
        // keyed already.
        if !job.carried_by(job.conns.conn(cookie).as_ref()) {
            return outcome(socket, Err(KeyingError::Reconnected { cookie }));
        }
    }
    let mut request = KeyRequest {
        socket_cookie: cookie,
        role: job.role,
        local: job.local,
        remote: job.remote,
        local_isn: job.local_isn,
        remote_isn: job.remote_isn,
        node_name: job.node_name.clone(),
        socket: socket.as_ref().map(|s| SocketHandle {
            pid: core_pid(),
            fd: s.as_raw_fd(),
        }),
        timeout: job.timeout,
    };
    let started = Instant::now();
    let asked = 'asking: loop {
        let left = deadline.saturating_duration_since(Instant::now());
        request.timeout = provider_budget(left);
        timeline.asked = sys::monotonic_ns();
        match provider.client().keys_waiting(&request, left).await {
            Ok(k) => break Ok(k),
            // Retry only when no provider can be running the request: no
            // provider read it (nothing listened, or a stopping provider's
            // GOAWAY refused it; see `ClientError::NotSent`), or nothing
            // listens on the provider's socket now. A live provider's
            // UNAVAILABLE is final (a second attempt could start a second
            // handshake on the same connection).
            Err(e)
                if e.is_unavailable() && (e.never_sent() || !listening(&provider.socket).await) =>
            {
                tracing::debug!(provider = %provider.name, error = %e, "provider not running; waiting for it");
                loop {
                    if deadline.saturating_duration_since(Instant::now()) <= PROVIDER_RETRY {
                        break 'asking Err(KeyingError::from(e));
                    }
                    tokio::time::sleep(PROVIDER_RETRY).await;
                    if listening(&provider.socket).await {
                        // A fresh channel: the old one saw the provider die.
                        provider.reconnect();
                        break;
                    }
                }
            }
            Err(e) => break Err(e.into()),
        }
    };
    let keys = match asked {
        Ok(keys) => keys,
        Err(e) => {
            // Failed before the owner was known: the socket is still taken
            // once a process holds it, so that fail-closed resets the
            // connection (the peer sees RST) as it does for any other.
            let socket = match socket {
                Some(s) => Some(s),
                None => socket_of_owner(&job, &mut owner).await.ok(),
            };
            return outcome(socket, Err(e));
        }
    };
    let key_time = started.elapsed();
    timeline.answered = sys::monotonic_ns();
    if let Some(log) = &job.keylog {
        log.record(&job, &keys);
    }
    // Ready before the job knew where the socket is (not merely asked
    // before: the owner may have come while the provider worked).
    let keyed_before_owner = socket.is_none() && owner.borrow().is_none();
    let socket = match socket {
        Some(s) => s,
        None => match socket_of_owner(&job, &mut owner).await {
            Ok(s) => {
                timeline.socket_taken = sys::monotonic_ns();
                s
            }
            Err(e) => return outcome(None, Err(e)),
        },
    };
    if job.send_buffer_floor > 0 {
        // Before kTLS, so that no send through kTLS finds a small buffer. Not
        // fatal: the connection works, only sendfile()/splice() may stall.
        match sys::raise_send_buffer(socket.as_fd(), job.send_buffer_floor) {
            Ok((before, after)) if after < job.send_buffer_floor => {
                tracing::warn!(
                    before,
                    after,
                    floor = job.send_buffer_floor,
                    "send buffer raised less than the floor (no CAP_NET_ADMIN, and net.core.wmem_max is lower)"
                );
            }
            Ok((before, after)) => tracing::debug!(before, after, "send buffer"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the send buffer"),
        }
    }
    // Again, since the provider took milliseconds or more: keys for the
    // old connection on the new one would open the gate (kTLS is on) and
    // send the app's bytes under a key the new peer does not have. A
    // reconnect between this check and the install remains possible
    // (microseconds); the state machine resets such a socket.
    if !job.carried_by(job.conns.conn(cookie).as_ref()) {
        return outcome(Some(socket), Err(KeyingError::Reconnected { cookie }));
    }
    let result = sys::install_ktls(socket.as_fd(), &keys, job.show_ktls_to_gate)
        .map(|()| {
            timeline.installed = sys::monotonic_ns();
            job.peers.count(job.remote.ip(), Counted::Protected);
            Done::Installed(Installed {
                version: keys.version,
                cipher: keys.cipher_suite,
                key_time,
                keyed_before_owner,
                backend,
                timeline,
            })
        })
        .map_err(|(step, source)| KeyingError::Install { step, source });
    outcome(Some(socket), result)
}

/// The core's own pid, which a handshake provider needs with the fd of the
/// core's duplicate of a socket. Read once: `std::process::id()` is a
/// `getpid` system call each time, and it was one per key request.
fn core_pid() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(std::process::id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_go_only_on_the_connection_they_were_made_for() {
        let est = |kind, local_isn, remote_isn| Event {
            kind,
            local_isn,
            remote_isn,
            ..Default::default()
        };
        let conn = |kind, local_isn, remote_isn| Conn {
            est: est(kind, local_isn, remote_isn),
            ..Default::default()
        };
        let job = est(kind::ESTABLISHED, 7, 9);
        assert!(is_connection(Some(&conn(kind::ESTABLISHED, 7, 9)), &job));
        // Disconnected: TCP_CLOSE removed the entry.
        assert!(!is_connection(None, &job));
        // Connected again: new ISNs (either one differing is enough).
        assert!(!is_connection(Some(&conn(kind::ESTABLISHED, 8, 9)), &job));
        assert!(!is_connection(Some(&conn(kind::ESTABLISHED, 7, 10)), &job));
        // Connecting again, not established yet.
        assert!(!is_connection(Some(&conn(0, 7, 9)), &job));
    }

    #[test]
    fn a_socket_behind_a_reused_fd_number_is_searched_for_only_while_connected() {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let wanted = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let other = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let cookie = socket_cookie(&wanted).unwrap();
        let (pid, wrong_fd) = (std::process::id(), other.as_raw_fd());
        // Ended: no search, and the job's answer says the connection is gone.
        let searched = std::cell::Cell::new(false);
        let ended = find_socket(pid, wrong_fd, cookie, || {
            searched.set(true);
            false
        });
        assert!(
            matches!(ended, Err(KeyingError::Reconnected { .. })),
            "{ended:?}"
        );
        assert!(searched.get());
        // Still there: the search finds it under its own number.
        let found = find_socket(pid, wrong_fd, cookie, || true).unwrap();
        assert_eq!(socket_cookie(&found).unwrap(), cookie);
        // The right number needs no search at all.
        let direct = find_socket(pid, wanted.as_raw_fd(), cookie, || unreachable!()).unwrap();
        assert_eq!(socket_cookie(&direct).unwrap(), cookie);
    }

    #[test]
    fn a_provider_gets_the_key_timeout_less_a_margin_for_its_answer() {
        let ms = Duration::from_millis;
        assert_eq!(provider_budget(ms(2000)), ms(1800));
        assert_eq!(provider_budget(ms(5000)), ms(4500));
        assert_eq!(provider_budget(ms(1000)), ms(800));
        assert_eq!(provider_budget(ms(300)), ms(150));
        assert_eq!(provider_budget(Duration::ZERO), Duration::ZERO);
    }
}
