//! The core's per-connection state machine, apart from I/O: BPF events and
//! keying outcomes go in; decisions come out, as calls on a [`Kernel`]
//! (open a gate, reset a socket, continue a process) and as keying jobs to
//! start ([`Start`]). The event loop in `agent.rs` owns the I/O (the ring
//! buffer, the provider calls, the admin API); `release.rs` shares the
//! failure policy ([`apply_failure`]). The unit tests at the bottom drive
//! the orderings the kernel can produce against a fake kernel.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tlshub_admin::stats::Stage;
use tlshub_ebpf::{Conn, Event, Held, gate, kind, role};
use tlshub_provider_sdk::Role;
use tracing::{debug, error, info, warn};

use crate::bpf::BpfError;
use crate::config::FailurePolicy;
use crate::keying::{Done, KeyingError, Outcome, OverBound, PlainWhy};
use crate::metrics::{
    Metrics, ProviderLabel, ProviderReasonLabels, ProviderRoleLabels, StageLabels, UNASSIGNED,
};
use crate::outcomes::{OutcomeKind, OutcomeLog};

/// What an app finds behind a gate the core opens, which decides the
/// readiness events the opening must make up for (ARCHITECTURE.md,
/// "Waking an event loop").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behind {
    /// kTLS both ways: installing its receive side woke a reader whose
    /// record waits, and it wakes readers of later records itself, so only
    /// writers need a wakeup.
    Ktls,
    /// The socket as it was (let through in plaintext, or reset): readers
    /// of data that waits need one too.
    Plain,
}

/// What the state machine needs from the kernel. `Programs` (with the
/// core's socket duplicates) is the real one; the tests fake it.
pub trait Kernel {
    /// The core's handle on an app's socket.
    type Socket;
    /// A connection's `conns` entry, `None` once its socket closed.
    fn conn(&self, cookie: u64) -> Option<Conn>;
    /// Opens a connection's gate for good, with `behind` on its socket,
    /// and wakes whoever waits on it for what that does not signal itself.
    fn open_gate(
        &mut self,
        cookie: u64,
        socket: &Self::Socket,
        behind: Behind,
    ) -> Result<(), BpfError>;
    /// Sets a connection's gate without its socket; `Ok(false)` if it closed.
    fn set_gate(&mut self, cookie: u64, state: u32) -> Result<bool, BpfError>;
    /// Resets the connection (the peer sees RST, the app `ECONNRESET`).
    fn reset(&mut self, socket: &Self::Socket) -> std::io::Result<()>;
    /// `shutdown(SHUT_RDWR)`: a FIN to the peer when a reset is refused.
    fn shutdown(&mut self, socket: &Self::Socket);
    /// Aborts a connection the core has no handle on, found by the
    /// 4-tuple and cookie of its `conns` entry (sock_diag `SOCK_DESTROY`)
    /// in the network namespace of one of `pids` (processes the gate held
    /// on it; the entry's owner and waiter are tried too): the peer gets a
    /// RST and the app's waiters are woken.
    fn destroy(&mut self, cookie: u64, pids: &[u32]) -> Result<(), crate::sockdiag::SockDiagError>;
    /// Holds the gate recorded in its `held` map (the ring buffer was
    /// full), removed from the map as they are taken.
    fn take_held_overflow(&mut self) -> Vec<(u32, Held)>;
    /// The `/proc` state letter of a process (`T`: stopped), `None` if gone.
    fn process_state(&self, pid: u32) -> Option<char>;
    /// Sends `SIGCONT`.
    fn continue_process(&mut self, pid: u32) -> std::io::Result<()>;
    /// `CLOCK_MONOTONIC` now, in ns (the clock of BPF timestamps).
    fn now_ns(&self) -> u64;
}

/// A keying job the state machine decided to start. The event loop picks
/// the provider, tells the table its name ([`ConnTable::keying_with`]) and
/// runs the job; its [`Outcome`] carries `job` back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    /// Identifies this job among every job of the core's life.
    pub job: u64,
    /// Socket cookie.
    pub cookie: u64,
    /// The connection's ESTABLISHED event (tuple, ISNs, role).
    pub established: Event,
    /// Where to look for the socket: a pid and the fd in it, or -1 (search
    /// every socket fd of the pid). `None`: not known yet, and the provider
    /// needs no socket, so keying starts now and the owner follows as an
    /// [`OwnerUpdate`].
    pub owner: Option<(u32, i32)>,
    /// Set when the owner, or its cgroup, already has as many connections
    /// keying as it may: the job is to reset the connection, not key it.
    pub over_bound: Option<OverBound>,
}

/// For a job started before its owner was known: the owner once known, or
/// `None` when the job should stop waiting (the connection closed or was
/// replaced). The event loop passes it to the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnerUpdate {
    /// The job, as numbered by its [`Start`].
    pub job: u64,
    /// Pid and fd (-1: search every socket fd), or `None`: stop waiting.
    pub owner: Option<(u32, i32)>,
}

/// A `shutdown()` the gate holds while kTLS's open record has bytes
/// written with `MSG_MORE` (`OPEN_RECORD_HELD`): the event loop closes
/// that record on the socket, so that the restarted call sends it before
/// its FIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordClose {
    /// The process the gate stopped in `shutdown()`.
    pub pid: u32,
    /// Where to look first: the socket's fd when it was keyed, if `pid`
    /// is the process it was keyed from, else -1 (the hold names no fd):
    /// then every socket fd of `pid` is searched by cookie.
    pub fd: i32,
    /// Socket cookie.
    pub cookie: u64,
}

/// A selected connection that is not keyed yet.
#[derive(Debug)]
pub struct Pending {
    /// Its ESTABLISHED event, once seen.
    pub established: Option<Event>,
    /// Where to look for the socket: the pid and fd connect()/accept()
    /// returned (OWNER), or a pid the gate held on it with fd -1 (every
    /// socket fd of that process is searched for the cookie).
    pub owner: Option<(u32, i32)>,
    /// The owner's cgroup v2 id, as the gate saw it in the owner's context
    /// (0: not known); what [`KeyingBounds`] counts its job against.
    pub owner_cgroup: u64,
    /// The keying job running for it, if any.
    pub job: Option<u64>,
    /// The provider asked, once keying started.
    pub provider: Option<String>,
    /// When the core read its `ESTABLISHED` event and learnt its owner
    /// (ns, `CLOCK_MONOTONIC`; 0: not yet, or not this core).
    read_ns: u64,
    owner_ns: u64,
    /// Owners tried in vain: the socket was no longer in that process (it
    /// closed its fd after fork, or passed the socket on).
    gone_from: Vec<u32>,
    /// Since when it is pending.
    pub since: Instant,
    /// When the gate last held a process on it while it was still
    /// connecting (`HELD_CONNECTING`; no `conns` entry until the peer
    /// answers). While set and younger than [`CONNECTING_HOLD_MAX`], and
    /// until ESTABLISHED, its held processes stay stopped.
    connecting_held: Option<Instant>,
}

impl Pending {
    fn new() -> Self {
        Self {
            established: None,
            owner: None,
            owner_cgroup: 0,
            job: None,
            provider: None,
            read_ns: 0,
            owner_ns: 0,
            gone_from: Vec::new(),
            since: Instant::now(),
            connecting_held: None,
        }
    }

    /// Whether its held processes must stay stopped although it has no
    /// `conns` entry: it is still connecting.
    fn held_while_connecting(&self) -> bool {
        self.established.is_none()
            && self
                .connecting_held
                .is_some_and(|t| t.elapsed() < CONNECTING_HOLD_MAX)
    }
}

/// How long a process held on a connecting socket stays stopped without
/// news of it. Its peer's answer (ESTABLISHED) or the end of the connect
/// (CLOSED) normally comes first: the kernel gives up a connect after
/// about 127 s with the default `tcp_syn_retries`. If that event was lost,
/// the process is continued after this and, still connecting, held again.
pub const CONNECTING_HOLD_MAX: std::time::Duration = std::time::Duration::from_secs(150);

/// A connection with kTLS installed, tracked until it closes (for the
/// admin API's connection list; its keys live only in the kernel).
#[derive(Debug)]
pub struct Protected {
    /// This side's address and port.
    pub local: SocketAddr,
    /// The peer's address and port.
    pub remote: SocketAddr,
    /// This side's role.
    pub role: Role,
    /// The process it was keyed from (0: unknown).
    pub pid: u32,
    /// The socket's fd in `pid` when it was keyed (-1: unknown; the
    /// number may have been reused since, so it is checked by cookie).
    pub fd: i32,
    /// The provider that keyed it.
    pub provider: String,
    /// The installed cipher suite.
    pub cipher: String,
    /// Time spent in the provider.
    pub key_time: Duration,
    /// Since when it is tracked.
    pub since: Instant,
    /// When the kernel stamped its `ESTABLISHED` (ns, `CLOCK_MONOTONIC`):
    /// what [`Stage::AppContinued`] is measured from.
    established_ns: u64,
}

/// A process the gate stopped.
#[derive(Debug, Clone, Copy)]
struct HeldProc {
    cookie: u64,
    since_ns: u64,
    continued: bool,
    reason: HoldReason,
    stop: Stop,
}

impl HeldProc {
    /// A hold reported at `since_ns`, not continued yet.
    fn new(cookie: u64, since_ns: u64, reason: HoldReason, stop: Stop) -> Self {
        Self {
            cookie,
            since_ns,
            continued: false,
            reason,
            stop,
        }
    }
}

/// What the core knows of a hold's `SIGSTOP` when it learns of the hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Queued or taken: the gate commits a hold's event only after it
    /// queued the signal, and adoption finds the process stopped. A
    /// `SIGCONT` sent now ends the stop either way (the kernel drops stop
    /// signals still pending when `SIGCONT` is sent), so the process is
    /// continued without a look at `/proc`.
    Queued,
    /// Maybe not queued yet: the `held` map's record is written before the
    /// signal (see the gate's `stop_caller`). A `SIGCONT` sent before the
    /// signal would be lost and the process would stay stopped, so it is
    /// continued only once seen stopped (`T` in `/proc/PID/stat`).
    Unconfirmed,
}

/// Why the gate stopped a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HoldReason {
    /// A call on a selected socket before its keys (HELD): continued once
    /// the connection is no longer pending; counted in the hold times.
    Keys,
    /// A `shutdown()` on a keyed socket while kTLS still had records TCP
    /// had not taken (UNSENT_HELD), or an open record to close first
    /// (OPEN_RECORD_HELD): continued by the next periodic sweep,
    /// and the restarted call looks again. Not a key wait, so not in the
    /// hold times.
    Unsent,
}

/// How many processes a connection's socket is looked for in before it is
/// given up as unreachable (each one that the gate holds on it is a fresh
/// lead; the bound keeps a misbehaving app from making the core search
/// forever).
const MAX_OWNER_SEARCHES: usize = 8;

/// How long a record is kept after its process was continued (a later
/// stop of that process is someone else's, e.g. job control).
const HELD_RECORD_GRACE: Duration = Duration::from_secs(1);

/// How long a record of an [`Stop::Unconfirmed`] stop is kept while its
/// process has not been seen stopped yet: between the gate's SIGSTOP and
/// the stop taking effect the process still looks running, and under a
/// loaded emulator that can last well over a second. Dropping the record
/// earlier would leave the process stopped with nobody to continue it.
const UNSEEN_STOP_GRACE: Duration = Duration::from_secs(10);

pub use tlshub_admin::stats::Stats;

/// What [`apply_failure`] did with a connection that could not be keyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    /// Reset: the peer got an RST, the app gets `ECONNRESET`.
    Reset,
    /// The gate's terminal state: every call fails with `ECONNRESET`
    /// (the reset was refused, or there was no socket to reset).
    Terminal,
    /// Let through in plaintext (fail-open).
    PassedPlaintext,
    /// The connection closed before anything could be done.
    Closed,
    /// No handle on the socket: the gate's terminal state, and then the
    /// kernel aborted the connection by its tuple (the peer got an RST,
    /// the app's waiters were woken and get `ECONNABORTED`).
    Destroyed,
}

/// Applies the failure policy to a connection that cannot be keyed. A
/// socket with some kTLS state (`force_reset`) is reset whatever the
/// policy: it can carry neither plaintext nor records. Without `socket`,
/// `held` (processes the gate held on it) name where to look for it to
/// abort it ([`Kernel::destroy`]). Shared by the event loop and
/// `tlshub-core release`.
pub fn apply_failure<K: Kernel>(
    k: &mut K,
    cookie: u64,
    socket: Option<&K::Socket>,
    held: &[u32],
    policy: FailurePolicy,
    force_reset: bool,
) -> Failed {
    let reset = force_reset || policy == FailurePolicy::FailClosed;
    match (socket, reset) {
        (Some(s), true) => match k.reset(s) {
            Ok(()) => {
                // The socket is closed now; let the app through to see
                // ECONNRESET.
                let _ = k.open_gate(cookie, s, Behind::Plain);
                Failed::Reset
            }
            Err(e) => {
                // E.g. EOPNOTSUPP: current kernels refuse to disconnect a
                // socket with the tls ULP. The gate's terminal state fails
                // every call of the app instead; shutdown() then sends the
                // peer a FIN so that it does not wait for data either, and
                // wakes every waiter on the socket (an event loop the gate
                // told EAGAIN) to find the terminal state. In this order:
                // a waiter woken before the state is set would be told
                // EAGAIN again and never woken. The gate lets the exempt
                // caller's shutdown() through the terminal state.
                let failed = terminal_gate(k, cookie, &e.to_string());
                k.shutdown(s);
                failed
            }
        },
        // No handle on the socket: it cannot be reset through one, so the
        // gate fails the app's calls from now on (holding it would only
        // stop and continue it in a loop). Then the kernel aborts it by
        // its tuple, which a reset through a handle would have done: the
        // peer gets a RST instead of waiting on a connection nobody will
        // key, and an event loop waiting on the socket is woken (nothing
        // else would wake it). In this order for the reason given above.
        (None, true) => {
            let failed = terminal_gate(k, cookie, "socket not reachable");
            if failed == Failed::Terminal {
                match k.destroy(cookie, held) {
                    Ok(()) => {
                        info!(cookie, "unreachable connection aborted by its tuple");
                        return Failed::Destroyed;
                    }
                    Err(e) => {
                        warn!(cookie, error = %e, "cannot abort the unreachable connection; its peer and any event loop waiting on it are not told");
                    }
                }
            }
            failed
        }
        (socket, false) => open_plain(k, cookie, socket),
    }
}

/// Opens a connection's gate with no keys: its bytes go as they are.
/// [`Failed::Closed`] if it closed first.
fn open_plain<K: Kernel>(k: &mut K, cookie: u64, socket: Option<&K::Socket>) -> Failed {
    let opened = match socket {
        Some(s) => k.open_gate(cookie, s, Behind::Plain).map(|()| true),
        None => k.set_gate(cookie, gate::OPEN),
    };
    match opened {
        Ok(true) => Failed::PassedPlaintext,
        Ok(false) => Failed::Closed,
        Err(e) => {
            error!(cookie, error = %e, "cannot open the gate");
            Failed::PassedPlaintext
        }
    }
}

/// Puts a connection's gate in its terminal state: every call of the app
/// on it fails with `ECONNRESET` and nobody is held again.
fn terminal_gate<K: Kernel>(k: &mut K, cookie: u64, why: &str) -> Failed {
    match k.set_gate(cookie, gate::RESET) {
        Ok(true) => {
            warn!(
                cookie,
                why, "connection cannot be reset; its calls now fail with ECONNRESET"
            );
            Failed::Terminal
        }
        Ok(false) => {
            debug!(cookie, why, "connection closed before it could be failed");
            Failed::Closed
        }
        Err(e) => {
            error!(cookie, why, error = %e, "cannot put the gate in its terminal state");
            Failed::Terminal
        }
    }
}

fn role_of(est: &Event) -> Role {
    if est.role == role::CLIENT {
        Role::Client
    } else {
        Role::Server
    }
}

/// Whether two ESTABLISHED events describe the same connection (a socket
/// that was disconnected and connected again keeps its cookie but gets a
/// new handshake, so new ISNs). Not by timestamp: the copy in `conns` and
/// the ring buffer's event are stamped separately.
pub fn same_connection(a: &Event, b: &Event) -> bool {
    a.local_isn == b.local_isn
        && a.remote_isn == b.remote_isn
        && a.local_port == b.local_port
        && a.remote_port == b.remote_port
        && a.remote_addr == b.remote_addr
}

/// The provider keying (or that keyed) `cookie`'s connection, for metric
/// labels; [`UNASSIGNED`] before one was chosen.
fn provider_of(
    pending: &HashMap<u64, Pending>,
    protected: &HashMap<u64, Protected>,
    cookie: u64,
) -> String {
    pending
        .get(&cookie)
        .and_then(|p| p.provider.clone())
        .or_else(|| protected.get(&cookie).map(|p| p.provider.clone()))
        .unwrap_or_else(|| UNASSIGNED.to_owned())
}

/// A count the core keeps both as a stats-file field and as an unlabelled
/// metric ([`ConnTable::tally`] bumps the pair).
#[derive(Clone, Copy, Debug)]
enum Tally {
    Selected,
    ClosedBeforeKeys,
    GateWait,
    Reset,
    PassedPlaintext,
    KeyedBeforeOwner,
    ServicePlain,
    PeerIncompatiblePlain,
}

/// How many keying jobs each process and each cgroup has running, against
/// their bounds (`[bpf] max_connections_per_process` and
/// `max_connections_per_cgroup`). A job counts from its start until its
/// outcome; a job whose owner's cgroup is not known, or is the root
/// cgroup, counts against its process only.
#[derive(Debug)]
struct KeyingBounds {
    max_per_process: u32,
    max_per_cgroup: u32,
    /// The owner's pid and cgroup of each counted job.
    jobs: HashMap<u64, (u32, u64)>,
    per_process: HashMap<u32, u32>,
    per_cgroup: HashMap<u64, u32>,
}

impl Default for KeyingBounds {
    fn default() -> Self {
        Self {
            max_per_process: u32::MAX,
            max_per_cgroup: u32::MAX,
            jobs: HashMap::new(),
            per_process: HashMap::new(),
            per_cgroup: HashMap::new(),
        }
    }
}

impl KeyingBounds {
    /// Counts `job` against `pid` and `cgroup`, or says which bound it is
    /// over (then it is not counted: it resets its connection at once).
    fn count(&mut self, job: u64, pid: u32, cgroup: u64) -> Result<(), OverBound> {
        let of_process = self.per_process.get(&pid).copied().unwrap_or(0);
        if of_process >= self.max_per_process {
            return Err(OverBound::Process {
                pid,
                max: self.max_per_process,
            });
        }
        let of_cgroup = self.per_cgroup.get(&cgroup).copied().unwrap_or(0);
        if bounded_as_group(cgroup) && of_cgroup >= self.max_per_cgroup {
            return Err(OverBound::Cgroup {
                cgroup,
                pid,
                max: self.max_per_cgroup,
            });
        }
        *self.per_process.entry(pid).or_default() += 1;
        if bounded_as_group(cgroup) {
            *self.per_cgroup.entry(cgroup).or_default() += 1;
        }
        self.jobs.insert(job, (pid, cgroup));
        Ok(())
    }

    /// A job ended: it no longer counts.
    fn uncount(&mut self, job: u64) {
        let Some((pid, cgroup)) = self.jobs.remove(&job) else {
            return;
        };
        release(&mut self.per_process, pid);
        if bounded_as_group(cgroup) {
            release(&mut self.per_cgroup, cgroup);
        }
    }
}

/// The cgroup v2 id of the root cgroup (on 64-bit kernels a cgroup's id is
/// its directory's inode number, and the root's is 1).
const ROOT_CGROUP: u64 = 1;

/// Whether jobs of processes in `cgroup` are bounded together. Not the
/// root cgroup: where processes are not put in cgroups of their own (a
/// host with the hybrid cgroup v1 layout, or without systemd), every
/// process is there, and its bound would be one for the whole node.
fn bounded_as_group(cgroup: u64) -> bool {
    cgroup > ROOT_CGROUP
}

/// One less for `key`, forgetting it at zero.
fn release<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, u32>, key: K) {
    if let std::collections::hash_map::Entry::Occupied(mut e) = counts.entry(key) {
        *e.get_mut() -= 1;
        if *e.get() == 0 {
            e.remove();
        }
    }
}

/// Every connection the core tracks and every process the gate stopped.
#[derive(Debug)]
pub struct ConnTable {
    policy: FailurePolicy,
    metrics: Arc<Metrics>,
    pending: HashMap<u64, Pending>,
    protected: HashMap<u64, Protected>,
    held_cookies: HashSet<u64>,
    /// Processes the gate stopped, by pid, from HELD events (and the BPF
    /// `held` map when the ring buffer overflowed).
    held: HashMap<u32, HeldProc>,
    /// Jobs still running for a connection the socket no longer carries
    /// (it closed, or was disconnected), by cookie. A new connection on
    /// the same socket waits for them, so that one socket never has two
    /// jobs at once.
    stale_jobs: HashMap<u64, Vec<u64>>,
    next_job: u64,
    /// Running jobs counted against their owner's bounds.
    bounds: KeyingBounds,
    starts: Vec<Start>,
    owner_updates: Vec<OwnerUpdate>,
    record_closes: Vec<RecordClose>,
    /// The active provider needs no socket: key from ESTABLISHED alone,
    /// before the owner is known (set by the event loop).
    key_before_owner: bool,
    /// Set when something may have released held processes.
    sweep_due: bool,
    /// Shutting down: keying already under way finishes, nothing new starts
    /// (those connections stay gated for the next core).
    draining: bool,
    stats: Stats,
    /// Each connection's outcome, for `ListOutcomes`.
    outcomes: OutcomeLog,
    /// Events and outcomes handled so far.
    activity: u64,
}

impl ConnTable {
    /// An empty table applying `policy` to connections that cannot be keyed.
    pub fn new(policy: FailurePolicy, metrics: Arc<Metrics>) -> Self {
        Self {
            policy,
            metrics,
            pending: HashMap::new(),
            protected: HashMap::new(),
            held_cookies: HashSet::new(),
            held: HashMap::new(),
            stale_jobs: HashMap::new(),
            next_job: 1,
            bounds: KeyingBounds::default(),
            starts: Vec::new(),
            owner_updates: Vec::new(),
            record_closes: Vec::new(),
            key_before_owner: false,
            sweep_due: false,
            draining: false,
            stats: Stats::default(),
            outcomes: OutcomeLog::default(),
            activity: 0,
        }
    }

    /// Connections waiting for keys.
    pub fn pending(&self) -> &HashMap<u64, Pending> {
        &self.pending
    }

    /// Connections keyed and still open.
    pub fn protected(&self) -> &HashMap<u64, Protected> {
        &self.protected
    }

    /// The recent outcomes of connections (keyed, failed, held).
    pub fn outcomes(&self) -> &OutcomeLog {
        &self.outcomes
    }

    /// Processes held now (as far as the core knows).
    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    /// Whether a held process is still to be continued (a record kept
    /// only for its age, [`HELD_RECORD_GRACE`], needs no sweep soon: any
    /// later one forgets it).
    pub fn holds_to_continue(&self) -> bool {
        self.held.values().any(|h| !h.continued)
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The counters, for the event loop's BPF-side figures.
    pub fn stats_mut(&mut self) -> &mut Stats {
        &mut self.stats
    }

    /// Events and outcomes handled so far (the stats file is rewritten
    /// only when this moved).
    pub fn activity(&self) -> u64 {
        self.activity
    }

    /// Counts something worth a stats rewrite that the table did not see.
    pub fn touch(&mut self) {
        self.activity += 1;
    }

    /// Keying jobs started by the last calls, to be run by the caller.
    pub fn take_starts(&mut self) -> Vec<Start> {
        std::mem::take(&mut self.starts)
    }

    /// Owners found (or given up on) since the last call, for jobs started
    /// before their owner was known. Take after [`Self::take_starts`]: an
    /// update may be for a job started by the same calls.
    pub fn take_owner_updates(&mut self) -> Vec<OwnerUpdate> {
        std::mem::take(&mut self.owner_updates)
    }

    /// Open kTLS records to close since the last call, for `shutdown()`s
    /// the gate holds ([`RecordClose`]).
    pub fn take_record_closes(&mut self) -> Vec<RecordClose> {
        std::mem::take(&mut self.record_closes)
    }

    /// Whether the active provider keys without the socket: then a job
    /// starts at ESTABLISHED, before any process is known to hold the
    /// socket (on the accepting side, before `accept()` returns).
    pub fn set_key_before_owner(&mut self, yes: bool) {
        self.key_before_owner = yes;
    }

    /// Bounds what one process, and one cgroup's processes together, can
    /// cost the node: a connection whose owner (or the owner's cgroup)
    /// already has that many jobs running (each a connection waiting for
    /// keys, so an entry of the `conns` map) gets a job that resets it
    /// instead ([`Start::over_bound`]). Jobs started before their owner was
    /// known (key-only providers, from establishment) are not counted:
    /// they wait for no peer. Unbounded until set.
    pub fn set_bounds(&mut self, per_process: u32, per_cgroup: u32) {
        self.bounds.max_per_process = per_process;
        self.bounds.max_per_cgroup = per_cgroup;
    }

    /// Records which provider runs a started job.
    pub fn keying_with(&mut self, cookie: u64, provider: &str) {
        if let Some(p) = self.pending.get_mut(&cookie) {
            p.provider = Some(provider.to_owned());
        }
    }

    /// Whether a sweep of held processes is due (and clears it).
    pub fn take_sweep_due(&mut self) -> bool {
        std::mem::take(&mut self.sweep_due)
    }

    /// Asks for a sweep at the next opportunity.
    pub fn sweep_soon(&mut self) {
        self.sweep_due = true;
    }

    /// Stops starting jobs: the ones running finish, the rest stay gated
    /// for the next core.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// Jobs running now.
    pub fn keying(&self) -> usize {
        self.pending.values().filter(|p| p.job.is_some()).count()
    }

    /// Takes over from a core that stopped: connections still waiting for
    /// keys are rebuilt from the `conns` map (which keeps a copy of their
    /// ESTABLISHED event and owner) and keyed; owners found stopped get
    /// held records so the sweep continues them once their connection is
    /// decided (their HELD events may have gone to the old core).
    /// Processes found stopped that own a socket still connecting
    /// (`connecting`, from the map `connecting_owners`) get held records
    /// too: the old core may have held them (`HELD_CONNECTING`), and no
    /// `conns` entry names them yet; the sweep continues them, and a call
    /// still connecting is held again, this time for this core.
    /// Connections the old core keyed are not in the map (an open gate
    /// needs no entry), so they are not listed as protected by this core;
    /// the kernel keeps them, and their closes are reported as usual. An
    /// entry whose gate is open is one the old core let through without
    /// its socket (fail-open) or had just keyed: left alone until it
    /// closes.
    pub fn adopt<K: Kernel>(
        &mut self,
        k: &K,
        conns: Vec<(u64, Conn)>,
        connecting: Vec<(u64, tlshub_ebpf::Owner)>,
    ) {
        let now = k.now_ns();
        let (mut waiting, mut open, mut stopped) = (0, 0, 0);
        for (cookie, conn) in conns {
            let owner = (conn.owner_pid != 0).then_some((conn.owner_pid, conn.owner_fd));
            if conn.gate == gate::RESET {
                continue;
            }
            if conn.gate == gate::CLOSED {
                let mut p = Pending::new();
                p.established = (conn.est.kind == kind::ESTABLISHED).then_some(conn.est);
                p.owner = owner;
                p.owner_cgroup = conn.owner_cgroup;
                self.pending.insert(cookie, p);
                waiting += 1;
            } else {
                open += 1;
            }
            if let Some((pid, _)) = owner
                && k.process_state(pid) == Some('T')
                && let std::collections::hash_map::Entry::Vacant(e) = self.held.entry(pid)
            {
                e.insert(HeldProc::new(cookie, now, HoldReason::Keys, Stop::Queued));
                stopped += 1;
            }
        }
        for (cookie, owner) in connecting {
            if owner.pid != 0
                && k.process_state(owner.pid) == Some('T')
                && let std::collections::hash_map::Entry::Vacant(e) = self.held.entry(owner.pid)
            {
                e.insert(HeldProc::new(cookie, now, HoldReason::Keys, Stop::Queued));
                stopped += 1;
            }
        }
        info!(
            waiting,
            open, stopped, "adopted the connections of the previous core"
        );
        let cookies: Vec<u64> = self.pending.keys().copied().collect();
        for cookie in cookies {
            self.maybe_start(cookie);
        }
        self.sweep_due = true;
    }

    /// Brings the table in line with the `conns` map after the ring buffer
    /// lost events: a connection still waiting for keys that the table
    /// does not know is taken up (its ESTABLISHED event and owner are in
    /// the map) and keyed; one the table waits for that the map no longer
    /// has closed meanwhile. Protected connections have no entry, so a
    /// lost CLOSED event of one leaves it listed until the core restarts
    /// (the ring buffer drop counter says that this happened). Without this, a
    /// connection whose events were lost would wait until its app does
    /// I/O (the hold names it), and one that never does would stay
    /// pending. `conns` must be read just before the call (events read
    /// before it are in the table, and their connections were in the map
    /// when they were emitted).
    pub fn reconcile(&mut self, conns: Vec<(u64, Conn)>) {
        let present: HashSet<u64> = conns.iter().map(|(c, _)| *c).collect();
        let gone: Vec<u64> = self
            .pending
            .keys()
            .filter(|c| !present.contains(c))
            .copied()
            .collect();
        let mut found = Vec::new();
        for (cookie, conn) in conns {
            if conn.gate != gate::CLOSED || self.pending.contains_key(&cookie) {
                continue;
            }
            let mut p = Pending::new();
            p.established = (conn.est.kind == kind::ESTABLISHED).then_some(conn.est);
            p.owner = (conn.owner_pid != 0).then_some((conn.owner_pid, conn.owner_fd));
            p.owner_cgroup = conn.owner_cgroup;
            self.pending.insert(cookie, p);
            found.push(cookie);
        }
        for cookie in &gone {
            self.held_cookies.remove(cookie);
            if self.forget_pending(*cookie).is_some() {
                self.tally(Tally::ClosedBeforeKeys);
            }
        }
        if gone.is_empty() && found.is_empty() {
            return;
        }
        self.activity += 1;
        self.stats.reconciled += (gone.len() + found.len()) as u64;
        self.sweep_due = true;
        warn!(
            waiting = found.len(),
            closed = gone.len(),
            "connections whose events were lost, found in the conns map"
        );
        if !self.draining {
            for cookie in found {
                self.maybe_start(cookie);
            }
        }
    }

    /// One event from the ring buffer.
    pub fn on_event<K: Kernel>(&mut self, k: &K, ev: Event) {
        self.activity += 1;
        self.stats.events_received += 1;
        match ev.kind {
            kind::ESTABLISHED => {
                self.tally(Tally::Selected);
                debug!(cookie = ev.cookie, local = %ev.local(), remote = %ev.remote(), "selected connection established");
                if let Some(p) = self.pending.get(&ev.cookie)
                    && p.established.is_some_and(|e| !same_connection(&e, &ev))
                {
                    // The socket carries a new connection, and the CLOSED
                    // event of its last one was lost: that one's state
                    // (and owner) no longer applies.
                    self.forget_pending(ev.cookie);
                }
                let p = self.pending.entry(ev.cookie).or_insert_with(Pending::new);
                p.established = Some(ev);
                p.read_ns = k.now_ns();
                p.connecting_held = None;
                self.maybe_start(ev.cookie);
            }
            kind::OWNER => {
                let p = self.pending.entry(ev.cookie).or_insert_with(Pending::new);
                if p.owner.is_none() {
                    p.owner_ns = k.now_ns();
                }
                match (p.job, p.owner) {
                    (None, _) => {
                        p.owner = Some((ev.pid, ev.fd));
                        p.owner_cgroup = ev.cgroup;
                    }
                    // A job keying from establishment waits for this.
                    (Some(job), None) => {
                        p.owner = Some((ev.pid, ev.fd));
                        p.owner_cgroup = ev.cgroup;
                        self.owner_updates.push(OwnerUpdate {
                            job,
                            owner: p.owner,
                        });
                    }
                    (Some(_), Some(_)) => {}
                }
                self.maybe_start(ev.cookie);
            }
            kind::HELD | kind::HELD_CONNECTING => {
                self.stats.gate_stops += 1;
                let provider = provider_of(&self.pending, &self.protected, ev.cookie);
                self.metrics
                    .gate_holds
                    .get_or_create(&ProviderLabel { provider })
                    .inc();
                if self.held_cookies.insert(ev.cookie) {
                    self.stats.held_connections += 1;
                }
                debug!(cookie = ev.cookie, pid = ev.pid, "gate holds process");
                self.held.insert(
                    ev.pid,
                    HeldProc::new(ev.cookie, ev.ts_ns, HoldReason::Keys, Stop::Queued),
                );
                if ev.kind == kind::HELD_CONNECTING {
                    self.held_while_connecting(ev.cookie, ev.pid);
                }
                self.owner_from_hold(k, ev.cookie, ev.pid, ev.cgroup);
            }
            kind::UNSENT_HELD | kind::OPEN_RECORD_HELD => {
                // No sweep_due: continuing at once would mostly find the
                // records still waiting for TCP's buffer to drain (or the
                // open record not closed yet) and stop the process again;
                // the periodic sweep paces the retries.
                if ev.kind == kind::OPEN_RECORD_HELD {
                    debug!(
                        cookie = ev.cookie,
                        pid = ev.pid,
                        "shutdown held until kTLS's open record is closed"
                    );
                    let fd = self
                        .protected
                        .get(&ev.cookie)
                        .filter(|p| p.pid == ev.pid)
                        .map_or(-1, |p| p.fd);
                    self.record_closes.push(RecordClose {
                        pid: ev.pid,
                        fd,
                        cookie: ev.cookie,
                    });
                } else {
                    debug!(
                        cookie = ev.cookie,
                        pid = ev.pid,
                        "shutdown held until kTLS's unsent records are in TCP"
                    );
                }
                self.held.insert(
                    ev.pid,
                    HeldProc::new(ev.cookie, ev.ts_ns, HoldReason::Unsent, Stop::Queued),
                );
            }
            kind::WAITING => {
                // Nobody is stopped: the app was told EAGAIN and waits for
                // readiness, which kTLS (readers) and the core's wakeup
                // after opening the gate (writers) give it.
                self.tally(Tally::GateWait);
                debug!(
                    cookie = ev.cookie,
                    pid = ev.pid,
                    "gate answered EAGAIN (non-blocking socket)"
                );
                self.owner_from_hold(k, ev.cookie, ev.pid, ev.cgroup);
            }
            kind::CLOSED => {
                self.held_cookies.remove(&ev.cookie);
                self.protected.remove(&ev.cookie);
                if let Some(p) = self.forget_pending(ev.cookie) {
                    self.tally(Tally::ClosedBeforeKeys);
                    debug!(
                        cookie = ev.cookie,
                        provider = p.provider.as_deref().unwrap_or(""),
                        "closed before keys"
                    );
                }
                // A process held on a socket that closed must run again.
                self.sweep_due = true;
            }
            other => error!(kind = other, "unknown event kind from BPF"),
        }
    }

    /// Counts `t` in the stats file and in its metric at once, so the two
    /// never disagree.
    fn tally(&mut self, t: Tally) {
        let m = &self.metrics;
        let s = &mut self.stats;
        let (field, metric) = match t {
            Tally::Selected => (&mut s.selected, &m.selected),
            Tally::ClosedBeforeKeys => (&mut s.closed_before_keys, &m.closed_before_keys),
            Tally::GateWait => (&mut s.gate_waits, &m.gate_waits),
            Tally::Reset => (&mut s.reset, &m.reset),
            Tally::PassedPlaintext => (&mut s.passed_plaintext, &m.plaintext),
            Tally::KeyedBeforeOwner => (&mut s.keyed_before_owner, &m.keyed_before_owner),
            Tally::ServicePlain => (&mut s.service_plain, &m.service_plain),
            Tally::PeerIncompatiblePlain => {
                (&mut s.peer_incompatible_plain, &m.peer_incompatible_plain)
            }
        };
        *field += 1;
        metric.inc();
    }

    /// Removes a pending connection; a job still running for it becomes
    /// stale (its outcome must not be applied to what the socket carries
    /// next).
    fn forget_pending(&mut self, cookie: u64) -> Option<Pending> {
        let p = self.pending.remove(&cookie)?;
        if let Some(job) = p.job {
            self.stale_jobs.entry(cookie).or_default().push(job);
            if p.owner.is_none() {
                // It may be waiting for an owner that will never come.
                self.owner_updates.push(OwnerUpdate { job, owner: None });
            }
        }
        Some(p)
    }

    /// The gate held `pid` on connection `cookie`, or answered it EAGAIN:
    /// the process holds the socket, so it is where keying looks for it when no owner is known
    /// (no OWNER event: connected or accepted through io_uring or the
    /// 32-bit entry points, or the OWNER event was lost) or the known one
    /// no longer has it (closed its fd after fork, passed it on). A hold on
    /// a connection the core does not track, whose gate is still closed,
    /// is taken up from the `conns` map (its events were lost). Otherwise
    /// the gate was opened between the program's check and this event,
    /// and the sweep continues the process.
    fn owner_from_hold<K: Kernel>(&mut self, k: &K, cookie: u64, pid: u32, cgroup: u64) {
        if !self.pending.contains_key(&cookie) {
            match k.conn(cookie) {
                Some(conn) if conn.gate == gate::CLOSED && !self.draining => {
                    let mut p = Pending::new();
                    p.established = (conn.est.kind == kind::ESTABLISHED).then_some(conn.est);
                    info!(
                        cookie,
                        pid,
                        established = p.established.is_some(),
                        "held on a connection the core did not know of; keying it from the held process"
                    );
                    self.pending.insert(cookie, p);
                }
                _ => {
                    self.sweep_due = true;
                    return;
                }
            }
        }
        let Some(p) = self.pending.get_mut(&cookie) else {
            return;
        };
        if p.owner.is_none() {
            debug!(cookie, pid, "owner taken from the gate's hold");
            p.owner = Some((pid, -1));
            p.owner_cgroup = cgroup;
            p.owner_ns = k.now_ns();
            self.stats.owner_from_hold += 1;
            match p.job {
                // A job keying from establishment waits for this.
                Some(job) => self.owner_updates.push(OwnerUpdate {
                    job,
                    owner: p.owner,
                }),
                None => self.maybe_start(cookie),
            }
        }
    }

    /// The gate held `pid` on connection `cookie` before its peer answered:
    /// the connection has no `conns` entry yet, so it is pending from now
    /// on, and the process stays stopped until ESTABLISHED (then keyed as
    /// usual) or CLOSED.
    fn held_while_connecting(&mut self, cookie: u64, pid: u32) {
        if self.draining {
            return;
        }
        let p = self.pending.entry(cookie).or_insert_with(|| {
            debug!(cookie, pid, "held on a connection still connecting");
            Pending::new()
        });
        if p.established.is_none() {
            p.connecting_held = Some(Instant::now());
        }
    }

    fn maybe_start(&mut self, cookie: u64) {
        if self.draining || self.stale_jobs.contains_key(&cookie) {
            return;
        }
        let Some(p) = self.pending.get_mut(&cookie) else {
            return;
        };
        let (Some(established), None) = (p.established, p.job) else {
            return;
        };
        if p.owner.is_none() && !self.key_before_owner {
            return;
        }
        let job = self.next_job;
        self.next_job += 1;
        p.job = Some(job);
        let (owner, cgroup) = (p.owner, p.owner_cgroup);
        let over_bound = owner.and_then(|(pid, _)| self.bounds.count(job, pid, cgroup).err());
        if let Some(over) = over_bound {
            debug!(cookie, %over, "refusing a connection over its bound");
        }
        self.starts.push(Start {
            job,
            cookie,
            established,
            owner,
            over_bound,
        });
    }

    /// A keying job ended.
    pub fn on_outcome<K: Kernel>(&mut self, k: &mut K, outcome: Outcome<K::Socket>) {
        self.activity += 1;
        self.sweep_due = true;
        let Outcome {
            job,
            cookie,
            provider,
            socket,
            result,
        } = outcome;
        self.bounds.uncount(job);
        let current = self
            .pending
            .get(&cookie)
            .is_some_and(|p| p.job == Some(job));
        if !current {
            self.on_stale_outcome(k, job, cookie, &provider, socket.as_ref(), &result);
            return;
        }
        // A process whose fds cannot be listed may not be the one holding
        // the socket either: another held process may be listable.
        if let Err(KeyingError::SocketGone { pid, .. } | KeyingError::FdsUnlisted { pid, .. }) =
            &result
            && self.look_elsewhere(cookie, *pid)
        {
            self.maybe_start(cookie);
            return;
        }
        if let Err(KeyingError::NoOwner { .. }) = &result {
            // Stopped waiting for an owner while the connection is still
            // pending: the core is stopping (its connections stay gated
            // for the next core).
            if let Some(p) = self.pending.get_mut(&cookie) {
                p.job = None;
                p.provider = None;
            }
            debug!(
                cookie,
                job, "the job stopped waiting for an owner: the core is stopping"
            );
            return;
        }
        if let Err(KeyingError::Reconnected { .. }) = &result {
            // The job saw the socket's connection end (or be replaced)
            // before this table read the events that say so, and installed
            // nothing. Those events decide what comes next, in order: a
            // CLOSED forgets the connection, the new connection's
            // ESTABLISHED starts its own job (the owner still holds the
            // socket).
            if let Some(p) = self.pending.get_mut(&cookie) {
                p.job = None;
                p.established = None;
            }
            debug!(
                cookie,
                job, "the socket no longer carries the connection keyed; waiting for its events"
            );
            return;
        }
        if matches!(result, Ok(Done::Plain { .. })) && !self.still_carried(k, cookie) {
            // The socket was disconnected and connected again after the job
            // decided (its new ESTABLISHED not read yet): the decision was
            // for the old connection, and opening the gate now would let
            // the new one's bytes out in plain. Its own events decide what
            // comes next, as for `Reconnected`.
            if let Some(p) = self.pending.get_mut(&cookie) {
                p.job = None;
                p.established = None;
            }
            debug!(
                cookie,
                job,
                "the socket no longer carries the connection judged plain; waiting for its events"
            );
            return;
        }
        let pending = self.pending.remove(&cookie);
        let label = ProviderLabel {
            provider: provider.clone(),
        };
        match result {
            Ok(Done::Plain { remote, why }) => {
                // Policy, not failure.
                if open_plain(k, cookie, socket.as_ref()) == Failed::PassedPlaintext {
                    match why {
                        PlainWhy::ServiceBackendUnselected => {
                            self.tally(Tally::ServicePlain);
                            info!(cookie, backend = %remote, "service connection to an unselected backend; let through as plain");
                        }
                        PlainWhy::PeerSilent => {
                            self.stats.peer_silent_plain += 1;
                            self.metrics.count_silent_peer(remote.ip());
                            info!(cookie, peer = %remote, "the peer did not announce tlshub and the rule is opportunistic; let through as plain");
                        }
                        PlainWhy::PeerIncompatible => {
                            self.tally(Tally::PeerIncompatiblePlain);
                            info!(cookie, peer = %remote, "the peer's provider speaks another keying protocol and the rule is opportunistic; let through as plain");
                        }
                    }
                }
            }
            Ok(Done::Installed(installed)) => {
                let opened = match &socket {
                    Some(s) => k.open_gate(cookie, s, Behind::Ktls),
                    None => Ok(()),
                };
                if let Err(e) = opened {
                    error!(cookie, error = %e, "cannot open the gate; resetting");
                    self.fail(k, cookie, socket.as_ref(), &provider, "gate_open", true);
                    return;
                }
                self.stats.protected += 1;
                let opened_ns = k.now_ns();
                if installed.keyed_before_owner {
                    self.tally(Tally::KeyedBeforeOwner);
                }
                self.stats
                    .key_micros
                    .push(installed.key_time.as_micros() as u64);
                self.metrics.protected.get_or_create(&label).inc();
                if let Some(p) = &pending
                    && let Some(est) = p.established
                {
                    let role = role_of(&est);
                    record_stages(
                        &mut self.stats,
                        &self.metrics,
                        &provider,
                        role,
                        est.ts_ns,
                        &[
                            (Stage::EventRead, p.read_ns),
                            (Stage::OwnerKnown, p.owner_ns),
                            (Stage::JobStarted, installed.timeline.started),
                            (Stage::SocketTaken, installed.timeline.socket_taken),
                            (Stage::ProviderAsked, installed.timeline.asked),
                            (Stage::ProviderAnswered, installed.timeline.answered),
                            (Stage::Installed, installed.timeline.installed),
                            (Stage::GateOpened, opened_ns),
                        ],
                    );
                    self.outcomes.record(
                        &provider,
                        OutcomeKind::Keyed {
                            role: role_name(role),
                            key: installed.key_time,
                        },
                    );
                    self.metrics
                        .key_seconds
                        .get_or_create(&ProviderRoleLabels {
                            provider: provider.clone(),
                            role: role_name(role),
                        })
                        .observe(installed.key_time.as_secs_f64());
                    self.protected.insert(
                        cookie,
                        Protected {
                            local: est.local(),
                            remote: installed.backend.unwrap_or_else(|| est.remote()),
                            role,
                            pid: p.owner.map_or(0, |o| o.0),
                            fd: p.owner.map_or(-1, |o| o.1),
                            provider: provider.clone(),
                            cipher: installed.cipher.to_string(),
                            key_time: installed.key_time,
                            since: p.since,
                            established_ns: est.ts_ns,
                        },
                    );
                }
                // Debug, not info: a line per connection was 4 to 5% of
                // the core's CPU per connection under `cargo xtask vm
                // --mode profile`, and floods the journal of a busy node;
                // the metrics and `tlshubctl` count keyed connections.
                debug!(
                    cookie,
                    provider = %provider,
                    version = ?installed.version,
                    cipher = %installed.cipher,
                    key_ms = installed.key_time.as_secs_f64() * 1000.0,
                    "kTLS installed"
                );
            }
            Err(e) => {
                warn!(cookie, provider = %provider, error = %e, reason = e.reason(), "connection could not be keyed");
                // A socket with some kTLS state can carry neither plaintext
                // nor records; and capacity never means plaintext.
                let force_reset =
                    matches!(e, KeyingError::Install { .. } | KeyingError::OverBound(_));
                self.fail(
                    k,
                    cookie,
                    socket.as_ref(),
                    &provider,
                    e.reason(),
                    force_reset,
                );
            }
        }
    }

    /// Whether the socket still carries the connection `cookie`'s pending
    /// job was started for (its `conns` entry has that connection's
    /// ESTABLISHED event).
    fn still_carried<K: Kernel>(&self, k: &K, cookie: u64) -> bool {
        let Some(est) = self.pending.get(&cookie).and_then(|p| p.established) else {
            return false;
        };
        k.conn(cookie)
            .is_some_and(|c| c.est.kind == kind::ESTABLISHED && same_connection(&c.est, &est))
    }

    /// The outcome of a job whose connection is gone from the table: it
    /// closed while keying, or the socket was disconnected and carries a
    /// new connection now. Keys it installed belong to the old connection,
    /// so a socket that carries a new one is reset (it cannot carry those
    /// records); the new connection's own job starts once this one is out
    /// of the way.
    fn on_stale_outcome<K: Kernel>(
        &mut self,
        k: &mut K,
        job: u64,
        cookie: u64,
        provider: &str,
        socket: Option<&K::Socket>,
        result: &Result<Done, KeyingError>,
    ) {
        if let Some(jobs) = self.stale_jobs.get_mut(&cookie) {
            jobs.retain(|j| *j != job);
            if jobs.is_empty() {
                self.stale_jobs.remove(&cookie);
            }
        }
        if !self.pending.contains_key(&cookie) {
            // Closed while keying: nothing to protect any more. A
            // provider's reason still matters (a mismatched peer provider
            // typically makes the peer app close first).
            match result {
                Err(e @ KeyingError::Provider(_)) => {
                    info!(cookie, provider = %provider, error = %e, reason = e.reason(), "keying failed; the socket had closed meanwhile");
                }
                _ => debug!(cookie, job, "keying ended after the connection closed"),
            }
            return;
        }
        self.stats.stale_outcomes += 1;
        if matches!(result, Ok(Done::Installed(_))) {
            warn!(
                cookie,
                job, "keys for a previous connection of this socket were installed; resetting"
            );
            self.pending.remove(&cookie);
            self.fail(k, cookie, socket, provider, "stale_keys", true);
        } else {
            debug!(
                cookie,
                job, "a previous connection's keying ended; keying the new one"
            );
            self.maybe_start(cookie);
        }
    }

    /// The processes the gate holds (or held, until their records are
    /// forgotten) on connection `cookie`.
    fn held_on(&self, cookie: u64) -> Vec<u32> {
        self.held
            .iter()
            .filter(|(_, h)| h.cookie == cookie)
            .map(|(&pid, _)| pid)
            .collect()
    }

    /// The socket of `cookie` was not in process `gone_pid` any more. Keeps
    /// the connection pending and looks for it in a process the gate holds
    /// on it (now, or when one is held next), up to [`MAX_OWNER_SEARCHES`]
    /// processes; false when there is nothing left to try.
    fn look_elsewhere(&mut self, cookie: u64, gone_pid: u32) -> bool {
        let held_on_it = self.held_on(cookie);
        let Some(p) = self.pending.get_mut(&cookie) else {
            return false;
        };
        p.gone_from.push(gone_pid);
        self.stats.socket_gone += 1;
        let next = held_on_it
            .iter()
            .copied()
            .find(|pid| !p.gone_from.contains(pid));
        // Every process held on it was searched in vain (a held process
        // makes no new hold to wait for), or too many were.
        if (next.is_none() && !held_on_it.is_empty()) || p.gone_from.len() >= MAX_OWNER_SEARCHES {
            return false;
        }
        p.job = None;
        p.provider = None;
        p.owner = next.map(|pid| (pid, -1));
        // Not kept per held process: the next job counts per process only.
        p.owner_cgroup = 0;
        if next.is_some() {
            self.stats.owner_from_hold += 1;
        }
        info!(cookie, gone_from = gone_pid, next = ?next, "socket no longer in its owner; looking for it where the gate holds it");
        true
    }

    /// Applies the failure policy and counts it (by `provider`, the one
    /// whose job failed).
    fn fail<K: Kernel>(
        &mut self,
        k: &mut K,
        cookie: u64,
        socket: Option<&K::Socket>,
        provider: &str,
        reason: &'static str,
        force_reset: bool,
    ) {
        self.stats.record_failure(reason);
        self.outcomes
            .record(provider, OutcomeKind::Failed { reason });
        self.metrics
            .failed
            .get_or_create(&ProviderReasonLabels {
                provider: provider.to_owned(),
                reason,
            })
            .inc();
        let held = self.held_on(cookie);
        match apply_failure(k, cookie, socket, &held, self.policy, force_reset) {
            Failed::Reset => {
                self.tally(Tally::Reset);
                info!(cookie, reason, "connection reset (fail-closed)");
            }
            Failed::Terminal => {
                self.tally(Tally::Reset);
                self.stats.gate_terminal += 1;
            }
            Failed::Destroyed => {
                self.tally(Tally::Reset);
                self.stats.gate_terminal += 1;
                self.stats.unreachable_aborted += 1;
            }
            Failed::PassedPlaintext => {
                self.tally(Tally::PassedPlaintext);
                warn!(
                    cookie,
                    reason, "connection continues in PLAINTEXT (fail-open)"
                );
            }
            Failed::Closed => {}
        }
    }

    /// The `/proc` state of the held processes whose stop is
    /// [`Stop::Unconfirmed`], read *before* the ring buffer is drained for
    /// a sweep. Overflow records from the `held` map are adopted first,
    /// and name their process as the socket's owner as a HELD event does:
    /// the hold may be all that is known of it (its OWNER event was lost
    /// with it), and a connection without an owner would stay gated, its
    /// process stopped, for good.
    pub fn held_states<K: Kernel>(&mut self, k: &mut K) -> HashMap<u32, Option<char>> {
        for (pid, h) in k.take_held_overflow() {
            self.held.insert(
                pid,
                // The map does not say why; either kind is continued once
                // its cookie is not pending.
                HeldProc::new(h.cookie, h.since_ns, HoldReason::Keys, Stop::Unconfirmed),
            );
            // An unsent-records hold is on a keyed connection: neither
            // pending nor in `conns`, so this only makes a sweep due.
            // The map does not say the cgroup: counted per process only.
            self.owner_from_hold(k, h.cookie, pid, 0);
        }
        // Only an unconfirmed stop that may be continued now needs its
        // process's state: not continued yet, connection no longer gated.
        // Why so few: a read of `/proc/PID/stat` was most of what a sweep
        // cost (a quarter of the core's CPU when every held process was
        // read at every sweep, and still a tenth when each was read once,
        // in the benchmark's VM, `cargo xtask vm --mode profile`). A
        // record that this sweep's events ungate is decided on the next
        // sweep.
        let k = &*k;
        self.held
            .iter()
            .filter(|(_, h)| {
                h.stop == Stop::Unconfirmed
                    && !h.continued
                    && !still_gated(&self.pending, k, h.cookie)
            })
            .map(|(&pid, _)| (pid, k.process_state(pid)))
            .collect()
    }

    /// Continues held processes whose connection no longer needs them held.
    ///
    /// A hold whose connection is no longer pending is continued, exactly
    /// once (a stop after that is someone else's, e.g. job control). A
    /// [`Stop::Queued`] one at once. An [`Stop::Unconfirmed`] one once
    /// `states` shows it stopped (`T`): `states` was read before the last
    /// drain of the ring buffer, so a process seen stopped there was
    /// stopped by a hold the core knows. Records are forgotten
    /// [`HELD_RECORD_GRACE`] after the hold once continued, and otherwise
    /// when the process is gone or (unconfirmed) was never seen stopped
    /// within [`UNSEEN_STOP_GRACE`]. A new hold brings a fresh record
    /// through its event.
    pub fn sweep_held<K: Kernel>(&mut self, k: &mut K, states: &HashMap<u32, Option<char>>) {
        let now = k.now_ns();
        let mut forget = Vec::new();
        for (&pid, h) in &mut self.held {
            if h.continued {
                // Its state no longer matters, only its age.
                if now.saturating_sub(h.since_ns) > HELD_RECORD_GRACE.as_nanos() as u64 {
                    forget.push(pid);
                }
                continue;
            }
            let state = match h.stop {
                Stop::Queued => Some('T'),
                // Records added or ungated by this drain (and so not read
                // by `held_states`) are decided on the next sweep.
                Stop::Unconfirmed => match states.get(&pid) {
                    Some(state) => *state,
                    None => continue,
                },
            };
            if still_gated(&self.pending, k, h.cookie) {
                continue;
            }
            match state {
                None => forget.push(pid),
                Some('T') => {
                    match k.continue_process(pid) {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                            // Gone (killed while stopped, say): nothing to
                            // continue or to time.
                            forget.push(pid);
                            continue;
                        }
                        Err(e) => warn!(pid, error = %e, "cannot continue held process"),
                    }
                    h.continued = true;
                    if h.reason == HoldReason::Keys {
                        if let Some(c) = self.protected.get(&h.cookie) {
                            record_stages(
                                &mut self.stats,
                                &self.metrics,
                                &c.provider,
                                c.role,
                                c.established_ns,
                                &[(Stage::AppContinued, now)],
                            );
                        }
                        let held_ns = now.saturating_sub(h.since_ns);
                        self.stats.held_micros.push(held_ns / 1000);
                        let provider = provider_of(&self.pending, &self.protected, h.cookie);
                        self.outcomes.record(
                            &provider,
                            OutcomeKind::Held {
                                held: Duration::from_nanos(held_ns),
                            },
                        );
                        self.metrics
                            .gate_hold_seconds
                            .get_or_create(&ProviderLabel { provider })
                            .observe(held_ns as f64 / 1e9);
                    }
                    debug!(pid, cookie = h.cookie, reason = ?h.reason, "held process continued");
                }
                Some(_) if now.saturating_sub(h.since_ns) > UNSEEN_STOP_GRACE.as_nanos() as u64 => {
                    forget.push(pid);
                }
                Some(_) => {}
            }
        }
        if !forget.is_empty() {
            self.activity += 1;
        }
        for pid in forget {
            self.held.remove(&pid);
        }
    }
}

/// Whether a held process's connection still keeps it held: keys awaited
/// behind a closed gate, or the socket still connecting.
fn still_gated<K: Kernel>(pending: &HashMap<u64, Pending>, k: &K, cookie: u64) -> bool {
    pending.get(&cookie).is_some_and(|p| {
        p.held_while_connecting() || k.conn(cookie).is_some_and(|c| c.gate == gate::CLOSED)
    })
}

/// Records when a protected connection passed each of `stages` (ns,
/// `CLOCK_MONOTONIC`; 0: not passed, or not seen by this core), as the
/// time since its `ESTABLISHED` at `established_ns`, in the stats file and
/// the metrics. A stage passed before `ESTABLISHED` (an owner known from a
/// non-blocking `connect()`) counts as 0.
fn record_stages(
    stats: &mut Stats,
    metrics: &Metrics,
    provider: &str,
    role: Role,
    established_ns: u64,
    stages: &[(Stage, u64)],
) {
    if established_ns == 0 {
        return;
    }
    for &(stage, at_ns) in stages {
        if at_ns == 0 {
            continue;
        }
        let after = at_ns.saturating_sub(established_ns);
        stats.stages.push(role == Role::Client, stage, after / 1000);
        metrics
            .stage_seconds
            .get_or_create(&StageLabels {
                provider: provider.to_string(),
                role: role_name(role),
                stage: stage.name(),
            })
            .observe(after as f64 / 1e9);
    }
}

/// The admin API's and the metrics' name of a role.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Client => "client",
        Role::Server => "server",
    }
}

#[cfg(test)]
mod tests;
