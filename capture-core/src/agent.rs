//! The event loop: joins BPF events per connection, starts keying jobs,
//! applies their outcome (gate open, reset, resume), and releases held
//! processes.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tlshub_admin::pb;
use tlshub_ebpf::{Event, gate, kind, role};
use tlshub_provider_sdk::Role;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::bpf::{BpfError, Programs};
use crate::config::{Config, FailurePolicy};
use crate::keying::{self, Job, KeyingError, Outcome};
use crate::metrics::{Metrics, ProviderLabel, ProviderRoleLabels, ReasonLabel};
use crate::providers::{Health, Registry};
use crate::sys;

/// A selected connection that is not keyed yet.
#[derive(Debug)]
struct Pending {
    established: Option<Event>,
    /// Where to look for the socket: the pid and fd connect()/accept()
    /// returned (OWNER), or a pid the gate held on it with fd -1 (every
    /// socket fd of that process is searched for the cookie).
    owner: Option<(u32, i32)>,
    /// The provider asked, once keying started.
    provider: Option<String>,
    /// Owners tried in vain: the socket was no longer in that process (it
    /// closed its fd after fork, or passed the socket on).
    gone_from: Vec<u32>,
    since: Instant,
}

/// How many processes a connection's socket is looked for in before it is
/// given up as unreachable (each one that the gate holds on it is a fresh
/// lead; the bound keeps a misbehaving app from making the core search
/// forever).
const MAX_OWNER_SEARCHES: usize = 8;

impl Pending {
    fn new() -> Self {
        Self {
            established: None,
            owner: None,
            provider: None,
            gone_from: Vec::new(),
            since: Instant::now(),
        }
    }
}

/// A connection with kTLS installed, tracked until it closes (for the
/// admin API's connection list; its keys live only in the kernel).
#[derive(Debug)]
struct Protected {
    local: SocketAddr,
    remote: SocketAddr,
    role: Role,
    pid: u32,
    provider: String,
    cipher: String,
    key_time: Duration,
    since: Instant,
}

/// A request from the admin API, answered by the event loop (which owns
/// the state it asks about).
#[derive(Debug)]
pub enum AdminRequest {
    /// `Status`.
    Status(oneshot::Sender<pb::StatusResponse>),
    /// `ListConnections`.
    Connections(oneshot::Sender<pb::ListConnectionsResponse>),
    /// `ReloadPolicy`: the answer is the new policy or why the file was refused.
    ReloadPolicy(oneshot::Sender<Result<pb::Policy, String>>),
}

/// Counters and samples, written to the stats file.
#[derive(Debug, Default, Serialize)]
pub struct Stats {
    /// Selected connections seen (ESTABLISHED events).
    pub selected: u64,
    /// Connections keyed and installed.
    pub protected: u64,
    /// Failed connections by reason.
    pub failed: HashMap<&'static str, u64>,
    /// Connections reset under fail-closed.
    pub reset: u64,
    /// Connections passed in plaintext under fail-open.
    pub passed_plaintext: u64,
    /// Closed before they were keyed.
    pub closed_before_keys: u64,
    /// Times the gate stopped a process (HELD events).
    pub gate_stops: u64,
    /// Distinct connections that had a process held.
    pub held_connections: u64,
    /// Keying searches that took the process from a gate hold (no owner
    /// known, or the known one no longer had the socket).
    pub owner_from_hold: u64,
    /// Keying searches that found the socket gone from the process
    /// searched (the connection was then looked for elsewhere, or failed).
    pub socket_gone: u64,
    /// Connections whose gate was put in its terminal state (calls fail
    /// with `ECONNRESET`): they could be neither protected nor reset.
    pub gate_terminal: u64,
    /// Microseconds from stop to continue, per stop.
    pub held_micros: Samples,
    /// Microseconds spent in the provider, per protected connection.
    pub key_micros: Samples,
    /// Events read from the ring buffer (all kinds).
    pub events_received: u64,
    /// Events the ring buffer dropped.
    pub ringbuf_drops: u64,
    /// Gate calls failed (or passed) because no core was alive (counted by
    /// BPF, also while this core was not running).
    pub no_core_refusals: u64,
    /// TCP Fast Open sends to selected destinations refused with
    /// `EOPNOTSUPP` (counted by BPF).
    pub fastopen_refused: u64,
    /// Selected connections failed closed because the `conns` map was full
    /// (counted by BPF).
    pub map_full: u64,
    /// Entries in the pending table now.
    pub pending: usize,
    /// Held processes the core is tracking now.
    pub held_tracked: usize,
    /// BPF map entries now: conns, held.
    pub bpf_maps: (usize, usize),
}

/// Why the event loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Polling the ring buffer failed.
    #[error("event ring buffer: {0}")]
    Ring(#[source] std::io::Error),
    /// The ring buffer was already taken (run called twice).
    #[error("event ring buffer already in use")]
    RingTaken,
}

/// The most recent [`Samples::CAP`] measurements, so a long-running core's
/// stats stay bounded.
#[derive(Debug, Default, Serialize)]
#[serde(transparent)]
pub struct Samples(std::collections::VecDeque<u64>);

impl Samples {
    /// How many samples are kept.
    pub const CAP: usize = 100_000;

    fn push(&mut self, v: u64) {
        if self.0.len() == Self::CAP {
            self.0.pop_front();
        }
        self.0.push_back(v);
    }
}

/// The running core.
pub struct Agent {
    config: Config,
    config_path: PathBuf,
    programs: Programs,
    providers: Arc<Registry>,
    metrics: Arc<Metrics>,
    started: Instant,
    pending: HashMap<u64, Pending>,
    protected: HashMap<u64, Protected>,
    held_cookies: HashSet<u64>,
    /// Processes the gate stopped, by pid, from HELD events (and the BPF
    /// `held` map when the ring buffer overflowed).
    held: HashMap<u32, HeldProc>,
    /// Set when something may have released held processes.
    sweep_due: bool,
    /// Shutting down: keying already under way finishes, nothing new starts
    /// (those connections stay gated for the next core).
    draining: bool,
    stats: Stats,
    stats_file: Option<PathBuf>,
    /// Events and outcomes handled so far, and the count at the last stats write.
    activity: u64,
    stats_written_at: Option<u64>,
    keylog: Option<keying::KeyLog>,
    /// See [`crate::config::KtlsSection::send_buffer_floor`].
    send_buffer_floor: u32,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("pending", &self.pending.len())
            .finish()
    }
}

/// A process the gate stopped.
#[derive(Debug, Clone, Copy)]
struct HeldProc {
    cookie: u64,
    since_ns: u64,
    continued: bool,
}

/// How long a record is kept after its process was continued (a later
/// stop of that process is someone else's, e.g. job control).
const HELD_RECORD_GRACE: Duration = Duration::from_secs(1);

/// How long a record is kept while its process has not been seen stopped
/// yet: between the gate's SIGSTOP and the stop taking effect the process
/// still looks running, and under a loaded emulator that can last well
/// over a second. Dropping the record earlier would leave the process
/// stopped with nobody to continue it.
const UNSEEN_STOP_GRACE: Duration = Duration::from_secs(10);

impl Agent {
    /// Loads the programs, writes the policy and sets up the providers
    /// (nothing connects to them until the first health check or key request).
    pub fn start(
        config: Config,
        config_path: PathBuf,
        metrics: Arc<Metrics>,
        stats_file: Option<PathBuf>,
        keylog: Option<keying::KeyLog>,
    ) -> Result<Self, BpfError> {
        let mut programs = Programs::load_and_attach(
            &config.bpf.cgroup,
            &config.bpf.pin_dir,
            config.bpf.max_connections,
        )?;
        programs.heartbeat(
            Duration::from_millis(config.bpf.core_restart_grace_ms),
            config.failure_policy == FailurePolicy::FailOpen,
        );
        programs.write_policy(&config.policy)?;
        programs.exempt.add(std::process::id());
        let exempt = programs.exempt.clone();
        // Checked when the config was loaded.
        let set = config
            .provider
            .resolve()
            .unwrap_or_else(|e| unreachable!("config checked at load: {e}"));
        let providers = Arc::new(Registry::new(&set, Arc::new(move |pid| exempt.add(pid))));
        metrics.set_active_provider(providers.all().map(|p| p.name.as_str()), &set.active);
        for p in providers.all() {
            let label = ProviderLabel {
                provider: p.name.clone(),
            };
            metrics.provider_up.get_or_create(&label).set(0);
            metrics.protected.get_or_create(&label).inc_by(0);
        }
        info!(
            active = %set.active,
            fallback = set.fallback.as_deref().unwrap_or(""),
            providers = %set.endpoints.keys().cloned().collect::<Vec<_>>().join(","),
            "providers configured"
        );
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let send_buffer_floor = config.ktls.send_buffer_floor(release.trim());
        info!(
            kernel = release.trim(),
            send_buffer_floor, "protected sockets get at least this send buffer (0: untouched)"
        );
        let mut agent = Self {
            send_buffer_floor,
            config,
            config_path,
            programs,
            providers,
            metrics,
            started: Instant::now(),
            pending: HashMap::new(),
            protected: HashMap::new(),
            held_cookies: HashSet::new(),
            held: HashMap::new(),
            sweep_due: false,
            draining: false,
            stats: Stats::default(),
            stats_file,
            activity: 0,
            stats_written_at: None,
            keylog,
        };
        if agent.programs.adopted {
            agent.adopt();
        }
        Ok(agent)
    }

    /// Takes over from a core that stopped: connections still waiting for
    /// keys are rebuilt from the `conns` map (which keeps a copy of their
    /// ESTABLISHED event and owner) and keyed when the loop starts; keyed
    /// ones are tracked again; owners found stopped get held records so
    /// the sweep continues them once their connection is decided (their
    /// HELD events may have gone to the old core).
    fn adopt(&mut self) {
        let now = sys::monotonic_ns();
        let (mut waiting, mut keyed, mut stopped) = (0, 0, 0);
        for (cookie, conn) in self.programs.all_conns() {
            let owner = (conn.owner_pid != 0).then_some((conn.owner_pid, conn.owner_fd));
            if conn.gate == gate::RESET {
                continue;
            }
            if conn.gate == gate::CLOSED {
                let mut p = Pending::new();
                p.established = (conn.est.kind == kind::ESTABLISHED).then_some(conn.est);
                p.owner = owner;
                self.pending.insert(cookie, p);
                waiting += 1;
            } else if conn.est.kind == kind::ESTABLISHED {
                self.protected.insert(
                    cookie,
                    Protected {
                        local: conn.est.local(),
                        remote: conn.est.remote(),
                        role: if conn.role == role::CLIENT {
                            Role::Client
                        } else {
                            Role::Server
                        },
                        pid: conn.owner_pid,
                        provider: "(before restart)".into(),
                        cipher: String::new(),
                        key_time: Duration::ZERO,
                        since: Instant::now(),
                    },
                );
                keyed += 1;
            }
            if let Some((pid, _)) = owner
                && crate::procfs::state(pid) == Some('T')
                && let std::collections::hash_map::Entry::Vacant(e) = self.held.entry(pid)
            {
                e.insert(HeldProc {
                    cookie,
                    since_ns: now,
                    continued: false,
                });
                stopped += 1;
            }
        }
        info!(
            waiting,
            keyed, stopped, "adopted the connections of the previous core"
        );
    }

    /// The provider registry (shared with the admin API for switching).
    pub fn providers(&self) -> Arc<Registry> {
        self.providers.clone()
    }

    /// Runs until `shutdown` completes, then releases what it holds.
    pub async fn run(
        mut self,
        mut admin: mpsc::Receiver<AdminRequest>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), AgentError> {
        let health = tokio::spawn(health_loop(
            self.providers.clone(),
            self.metrics.clone(),
            Duration::from_millis(self.config.provider.health_interval_ms),
        ));
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Outcome>();
        let ring = self.programs.events.take().ok_or(AgentError::RingTaken)?;
        #[expect(
            deprecated,
            reason = "RingBuf owns its map fd for its whole life, which is the contract the unsafe AsyncFd::register would state"
        )]
        let mut events = AsyncFd::new(ring).map_err(AgentError::Ring)?;
        let mut sweep = tokio::time::interval(Duration::from_millis(50));
        let mut report = tokio::time::interval(Duration::from_secs(1));
        tokio::pin!(shutdown);
        info!(node = %self.config.node_name, policy = ?self.config.failure_policy, adopted = self.programs.adopted, "capture-core running");
        let adopted: Vec<u64> = self.pending.keys().copied().collect();
        for cookie in adopted {
            self.maybe_start(cookie, &done_tx);
        }
        self.sweep_due = true;
        let grace = Duration::from_millis(self.config.bpf.core_restart_grace_ms);
        let fail_open = self.config.failure_policy == FailurePolicy::FailOpen;
        loop {
            tokio::select! {
                guard = events.readable_mut() => {
                    let mut guard = guard.map_err(AgentError::Ring)?;
                    let batch = crate::bpf::drain_events(guard.get_inner_mut());
                    guard.clear_ready();
                    for ev in batch {
                        self.on_event(ev, &done_tx);
                    }
                }
                Some(outcome) = done_rx.recv() => self.on_outcome(outcome, &done_tx),
                _ = sweep.tick() => {
                    self.sweep_due = true;
                    self.programs.heartbeat(grace, fail_open);
                }
                _ = report.tick() => {
                    self.write_stats();
                    self.update_ktls_gauges();
                }
                Some(request) = admin.recv() => self.on_admin(request),
                () = &mut shutdown => break,
            }
            if std::mem::take(&mut self.sweep_due) {
                // Ordering rule (see sweep_held): process states first, then
                // every event committed up to now, then decide.
                let states = self.held_states();
                for ev in crate::bpf::drain_events(events.get_mut()) {
                    self.on_event(ev, &done_tx);
                }
                self.sweep_held(&states);
            }
        }
        self.finish_keying_under_way(&mut events, &mut done_rx, &done_tx, grace, fail_open)
            .await;
        health.abort();
        self.hand_over();
        self.stats_written_at = None;
        self.write_stats();
        Ok(())
    }

    fn on_event(&mut self, ev: Event, done: &mpsc::UnboundedSender<Outcome>) {
        self.activity += 1;
        self.stats.events_received += 1;
        match ev.kind {
            kind::ESTABLISHED => {
                self.stats.selected += 1;
                self.metrics.selected.inc();
                debug!(cookie = ev.cookie, local = %ev.local(), remote = %ev.remote(), "selected connection established");
                let p = self.pending.entry(ev.cookie).or_insert_with(Pending::new);
                p.established = Some(ev);
                self.maybe_start(ev.cookie, done);
            }
            kind::OWNER => {
                let p = self.pending.entry(ev.cookie).or_insert_with(Pending::new);
                if p.provider.is_none() {
                    p.owner = Some((ev.pid, ev.fd));
                }
                self.maybe_start(ev.cookie, done);
            }
            kind::HELD => {
                self.stats.gate_stops += 1;
                self.metrics.gate_holds.inc();
                if self.held_cookies.insert(ev.cookie) {
                    self.stats.held_connections += 1;
                }
                debug!(cookie = ev.cookie, pid = ev.pid, "gate holds process");
                self.held.insert(
                    ev.pid,
                    HeldProc {
                        cookie: ev.cookie,
                        since_ns: ev.ts_ns,
                        continued: false,
                    },
                );
                self.owner_from_hold(ev.cookie, ev.pid, done);
            }
            kind::CLOSED => {
                self.held_cookies.remove(&ev.cookie);
                self.protected.remove(&ev.cookie);
                if let Some(p) = self.pending.remove(&ev.cookie) {
                    self.stats.closed_before_keys += 1;
                    self.metrics.closed_before_keys.inc();
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

    /// The gate held `pid` on connection `cookie`: the process holds the
    /// socket, so it is where keying looks for it when no owner is known
    /// (no OWNER event: connected or accepted through io_uring or the
    /// 32-bit entry points, or the OWNER event was lost) or the known one
    /// no longer has it (closed its fd after fork, passed it on). A hold on
    /// a connection the core does not track, whose gate is still closed,
    /// is taken up from the `conns` map (its events were lost). Otherwise
    /// the gate was opened between the program's check and this event,
    /// and the sweep continues the process.
    fn owner_from_hold(&mut self, cookie: u64, pid: u32, done: &mpsc::UnboundedSender<Outcome>) {
        if !self.pending.contains_key(&cookie) {
            match self.programs.conn(cookie) {
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
        if p.owner.is_none() && p.provider.is_none() {
            debug!(cookie, pid, "owner taken from the gate's hold");
            p.owner = Some((pid, -1));
            self.stats.owner_from_hold += 1;
            self.maybe_start(cookie, done);
        }
    }

    /// On SIGTERM, lets the keying already under way finish (up to one key
    /// timeout) before handing over. Why: a provider handshake in flight
    /// cannot be resumed by the next core, which would start a second one
    /// on the same connection and fail it; finished here, a `systemctl
    /// restart` loses nothing. The heartbeat and the held-process sweep go
    /// on meanwhile; new connections are left for the next core.
    async fn finish_keying_under_way(
        &mut self,
        events: &mut AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>,
        done_rx: &mut mpsc::UnboundedReceiver<Outcome>,
        done_tx: &mpsc::UnboundedSender<Outcome>,
        grace: Duration,
        fail_open: bool,
    ) {
        self.draining = true;
        let keying = |a: &Self| a.pending.values().filter(|p| p.provider.is_some()).count();
        let in_flight = keying(self);
        if in_flight == 0 {
            return;
        }
        info!(
            in_flight,
            "finishing the keying under way before handing over"
        );
        let deadline =
            tokio::time::Instant::now() + self.config.key_timeout() + Duration::from_millis(500);
        let mut sweep = tokio::time::interval(Duration::from_millis(50));
        while keying(self) > 0 {
            tokio::select! {
                Some(outcome) = done_rx.recv() => self.on_outcome(outcome, done_tx),
                _ = sweep.tick() => {
                    self.programs.heartbeat(grace, fail_open);
                    let states = self.held_states();
                    for ev in crate::bpf::drain_events(events.get_mut()) {
                        self.on_event(ev, done_tx);
                    }
                    self.sweep_held(&states);
                }
                () = tokio::time::sleep_until(deadline) => {
                    warn!(left = keying(self), "keying still under way at shutdown; the next core takes it over");
                    break;
                }
            }
        }
    }

    fn maybe_start(&mut self, cookie: u64, done: &mpsc::UnboundedSender<Outcome>) {
        if self.draining {
            return;
        }
        let Some(p) = self.pending.get_mut(&cookie) else {
            return;
        };
        let (Some(est), Some((pid, fd)), None) = (p.established, p.owner, &p.provider) else {
            return;
        };
        // The provider is chosen now and kept for this connection: a switch
        // later affects only connections that start keying after it.
        let provider = self.providers.choose();
        p.provider = Some(provider.name.clone());
        self.metrics
            .provider_in_flight
            .get_or_create(&ProviderLabel {
                provider: provider.name.clone(),
            })
            .inc();
        let job = Job {
            cookie,
            role: if est.role == role::CLIENT {
                Role::Client
            } else {
                Role::Server
            },
            local: est.local(),
            remote: est.remote(),
            local_isn: est.local_isn,
            remote_isn: est.remote_isn,
            pid,
            fd,
            node_name: self.config.node_name.clone(),
            timeout: self.config.key_timeout(),
            keylog: self.keylog.clone(),
            send_buffer_floor: self.send_buffer_floor,
        };
        let span = info_span!("conn", cookie, local = %job.local, remote = %job.remote, pid, fd, role = ?job.role, provider = %provider.name);
        let done = done.clone();
        tokio::spawn(
            async move {
                let outcome = keying::run(job, provider).await;
                let _ = done.send(outcome);
            }
            .instrument(span),
        );
    }

    fn on_outcome(&mut self, outcome: Outcome, done: &mpsc::UnboundedSender<Outcome>) {
        self.activity += 1;
        let Outcome {
            cookie,
            provider,
            socket,
            result,
        } = outcome;
        let label = ProviderLabel {
            provider: provider.clone(),
        };
        self.metrics.provider_in_flight.get_or_create(&label).dec();
        if let Err(KeyingError::SocketGone { pid, .. }) = &result
            && self.look_elsewhere(cookie, *pid)
        {
            self.maybe_start(cookie, done);
            return;
        }
        let pending = self.pending.remove(&cookie);
        let span = info_span!("conn", cookie, provider = %provider);
        let _enter = span.enter();
        match result {
            Ok(installed) => {
                let opened = match &socket {
                    Some(s) => self.programs.open_gate(cookie, s),
                    None => Ok(()),
                };
                if let Err(e) = opened {
                    error!(error = %e, "cannot open the gate; resetting");
                    self.fail(cookie, socket.as_ref(), "gate_open", true);
                } else {
                    self.stats.protected += 1;
                    self.stats
                        .key_micros
                        .push(installed.key_time.as_micros() as u64);
                    self.metrics.protected.get_or_create(&label).inc();
                    if let Some(est) = pending.as_ref().and_then(|p| p.established) {
                        let role = if est.role == role::CLIENT {
                            Role::Client
                        } else {
                            Role::Server
                        };
                        self.metrics
                            .key_seconds
                            .get_or_create(&ProviderRoleLabels {
                                provider: provider.clone(),
                                role: role_name(role),
                            })
                            .observe(installed.key_time.as_secs_f64());
                        let (pid, since) = pending
                            .as_ref()
                            .map(|p| (p.owner.map_or(0, |o| o.0), p.since))
                            .unwrap_or((0, Instant::now()));
                        self.protected.insert(
                            cookie,
                            Protected {
                                local: est.local(),
                                remote: est.remote(),
                                role,
                                pid,
                                provider: provider.clone(),
                                cipher: installed.cipher.to_string(),
                                key_time: installed.key_time,
                                since,
                            },
                        );
                    }
                    info!(
                        version = ?installed.version,
                        cipher = %installed.cipher,
                        key_ms = installed.key_time.as_secs_f64() * 1000.0,
                        "kTLS installed"
                    );
                }
            }
            Err(e) => {
                if pending.is_none() {
                    // Closed while keying: nothing to protect any more. A
                    // provider's reason still matters (a mismatched peer
                    // provider typically makes the peer app close first).
                    if matches!(e, KeyingError::Provider(_)) {
                        info!(error = %e, reason = e.reason(), "keying failed; the socket had closed meanwhile");
                    } else {
                        debug!(error = %e, "keying ended after the socket closed");
                    }
                } else {
                    warn!(error = %e, reason = e.reason(), "connection could not be keyed");
                    let half_installed = matches!(e, KeyingError::Install { .. });
                    self.fail(cookie, socket.as_ref(), e.reason(), half_installed);
                }
            }
        }
        drop(socket);
        self.sweep_due = true;
    }

    /// The socket of `cookie` was not in process `gone_pid` any more. Keeps
    /// the connection pending and looks for it in a process the gate holds
    /// on it (now, or when one is held next), up to [`MAX_OWNER_SEARCHES`]
    /// processes; false when there is nothing left to try.
    fn look_elsewhere(&mut self, cookie: u64, gone_pid: u32) -> bool {
        let held_on_it: Vec<u32> = self
            .held
            .iter()
            .filter(|(_, h)| h.cookie == cookie)
            .map(|(&pid, _)| pid)
            .collect();
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
        p.provider = None;
        p.owner = next.map(|pid| (pid, -1));
        if next.is_some() {
            self.stats.owner_from_hold += 1;
        }
        info!(cookie, gone_from = gone_pid, next = ?next, "socket no longer in its owner; looking for it where the gate holds it");
        true
    }

    /// Applies the failure policy. A socket with some kTLS state is reset
    /// whatever the policy: it can carry neither plaintext nor records.
    fn fail(
        &mut self,
        cookie: u64,
        socket: Option<&OwnedFd>,
        reason: &'static str,
        force_reset: bool,
    ) {
        *self.stats.failed.entry(reason).or_default() += 1;
        self.metrics
            .failed
            .get_or_create(&ReasonLabel { reason })
            .inc();
        let reset = force_reset || self.config.failure_policy == FailurePolicy::FailClosed;
        match (socket, reset) {
            (Some(s), true) => {
                self.stats.reset += 1;
                self.metrics.reset.inc();
                match sys::reset_connection(s.as_fd()) {
                    Ok(()) => {
                        info!(reason, "connection reset (fail-closed)");
                        // The socket is closed now; let the app through to
                        // see ECONNRESET.
                        let _ = self.programs.open_gate(cookie, s);
                    }
                    Err(e) => {
                        // E.g. EOPNOTSUPP: current kernels refuse to
                        // disconnect a socket with the tls ULP. The gate's
                        // terminal state fails every call of the app
                        // instead; shutdown() sends the peer a FIN so that
                        // it does not wait for data either.
                        let _ = sys::shutdown_both(s.as_fd());
                        self.terminal_gate(cookie, reason, &e.to_string());
                    }
                }
            }
            (Some(s), false) => {
                self.stats.passed_plaintext += 1;
                self.metrics.plaintext.inc();
                warn!(reason, "connection continues in PLAINTEXT (fail-open)");
                let _ = self.programs.open_gate(cookie, s);
            }
            (None, true) => {
                // No handle on the socket: it cannot be reset, so the gate
                // fails the app's calls from now on (holding it would only
                // stop and continue it in a loop).
                self.stats.reset += 1;
                self.metrics.reset.inc();
                self.terminal_gate(cookie, reason, "socket not reachable");
            }
            (None, false) => {
                self.stats.passed_plaintext += 1;
                self.metrics.plaintext.inc();
                warn!(
                    reason,
                    "socket not reachable; connection continues in PLAINTEXT (fail-open)"
                );
                if let Err(e) = self.programs.set_gate(cookie, gate::OPEN) {
                    error!(error = %e, "cannot open the gate");
                }
            }
        }
    }

    /// Puts a connection's gate in its terminal state: every call of the
    /// app on it fails with `ECONNRESET` and nobody is held again.
    fn terminal_gate(&mut self, cookie: u64, reason: &'static str, why: &str) {
        match self.programs.set_gate(cookie, gate::RESET) {
            Ok(true) => {
                self.stats.gate_terminal += 1;
                warn!(
                    reason,
                    why, "connection cannot be reset; its calls now fail with ECONNRESET"
                );
            }
            Ok(false) => debug!(reason, why, "connection closed before it could be failed"),
            Err(e) => error!(reason, why, error = %e, "cannot put the gate in its terminal state"),
        }
    }

    /// The `/proc` state of every held process, read *before* the ring
    /// buffer is drained for a sweep. Overflow records from the `held` map
    /// are adopted first.
    fn held_states(&mut self) -> HashMap<u32, Option<char>> {
        for (pid, h) in self.programs.held() {
            self.held.insert(
                pid,
                HeldProc {
                    cookie: h.cookie,
                    since_ns: h.since_ns,
                    continued: false,
                },
            );
            self.programs.forget_held(pid);
        }
        self.held
            .keys()
            .map(|&pid| (pid, crate::procfs::state(pid)))
            .collect()
    }

    /// Continues held processes whose connection no longer needs them held.
    ///
    /// The gate commits a HELD event before its SIGSTOP takes effect, and
    /// `states` was read before the last drain of the ring buffer. So a
    /// process seen stopped (`T`) here was stopped by a hold the core knows:
    /// if that hold's connection is no longer pending and the process has
    /// not been continued for it yet, it is continued, exactly once (a later
    /// `T` after that is someone else's stop, e.g. job control). Records are
    /// forgotten when the process is gone, [`HELD_RECORD_GRACE`] after it
    /// was continued, or if it was never seen stopped within
    /// [`UNSEEN_STOP_GRACE`]. A new hold brings a fresh record through its
    /// event.
    fn sweep_held(&mut self, states: &HashMap<u32, Option<char>>) {
        let now = sys::monotonic_ns();
        let mut forget = Vec::new();
        for (&pid, h) in &mut self.held {
            let still_gated = self.pending.contains_key(&h.cookie)
                && self
                    .programs
                    .conn(h.cookie)
                    .is_some_and(|c| c.gate == gate::CLOSED);
            // Records added by this drain are decided on the next sweep.
            let Some(state) = states.get(&pid) else {
                continue;
            };
            if still_gated {
                continue;
            }
            match state {
                None => forget.push(pid),
                Some('T') if !h.continued => {
                    if let Err(e) = sys::continue_process(pid) {
                        warn!(pid, error = %e, "cannot continue held process");
                    }
                    h.continued = true;
                    let held_ns = now.saturating_sub(h.since_ns);
                    self.stats.held_micros.push(held_ns / 1000);
                    self.metrics.gate_hold_seconds.observe(held_ns as f64 / 1e9);
                    debug!(pid, cookie = h.cookie, "held process continued");
                }
                Some(_)
                    if h.continued
                        && now.saturating_sub(h.since_ns) > HELD_RECORD_GRACE.as_nanos() as u64 =>
                {
                    forget.push(pid);
                }
                Some(_)
                    if !h.continued
                        && *state != Some('T')
                        && now.saturating_sub(h.since_ns) > UNSEEN_STOP_GRACE.as_nanos() as u64 =>
                {
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

    /// At shutdown the programs stay attached (pinned): connections still
    /// waiting for keys stay gated for the next core, which adopts them,
    /// and the gate keeps holding for `core_restart_grace_ms`, then applies
    /// the failure policy by itself. Processes it stopped stay stopped
    /// until the next core or `tlshub-core release` continues them.
    fn hand_over(&mut self) {
        info!(
            waiting = self.pending.len(),
            held = self.held.len(),
            pin_dir = %self.programs.pin_dir.display(),
            "stopping; the gate stays attached for the next core (`tlshub-core release` if none comes)"
        );
    }

    fn on_admin(&mut self, request: AdminRequest) {
        match request {
            AdminRequest::Status(reply) => {
                let _ = reply.send(self.status());
            }
            AdminRequest::Connections(reply) => {
                let _ = reply.send(self.connections());
            }
            AdminRequest::ReloadPolicy(reply) => {
                let _ = reply.send(self.reload_policy());
            }
        }
    }

    fn status(&self) -> pb::StatusResponse {
        let active = self.providers.active_name();
        let fallback = self.providers.fallback_name().unwrap_or("").to_owned();
        let providers = self
            .providers
            .all()
            .map(|p| {
                let o = p.observed();
                let label = ProviderLabel {
                    provider: p.name.clone(),
                };
                pb::ProviderStatus {
                    name: p.name.clone(),
                    socket: p.socket.display().to_string(),
                    active: p.name == active,
                    fallback: p.name == fallback,
                    health: o.health.as_str().into(),
                    detail: o.detail.unwrap_or_default(),
                    implementation: o.info.as_ref().map(|i| i.name.clone()).unwrap_or_default(),
                    implementation_version: o
                        .info
                        .as_ref()
                        .map(|i| i.version.clone())
                        .unwrap_or_default(),
                    health_since_seconds: o.since.elapsed().as_secs(),
                    requests_in_flight: self
                        .metrics
                        .provider_in_flight
                        .get_or_create(&label)
                        .get()
                        .max(0) as u64,
                    connections_protected: self.metrics.protected.get_or_create(&label).get(),
                }
            })
            .collect();
        let s = &self.stats;
        pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            node_name: self.config.node_name.clone(),
            uptime_seconds: self.started.elapsed().as_secs(),
            active_provider: active,
            fallback_provider: fallback,
            providers,
            bpf_programs: self
                .programs
                .attached
                .iter()
                .map(|(name, attach)| pb::BpfProgram {
                    name: name.clone(),
                    attach: attach.clone(),
                })
                .collect(),
            policy: Some(policy_pb(&self.config.policy)),
            failure_policy: match self.config.failure_policy {
                FailurePolicy::FailClosed => "fail-closed",
                FailurePolicy::FailOpen => "fail-open",
            }
            .into(),
            key_timeout_ms: self.config.provider.timeout_ms,
            counters: Some(pb::Counters {
                selected: s.selected,
                protected: s.protected,
                failed: s.failed.values().sum(),
                reset: s.reset,
                plaintext: s.passed_plaintext,
                closed_before_keys: s.closed_before_keys,
                gate_holds: s.gate_stops,
                pending: self.pending.len() as u64,
                tracked: (self.pending.len() + self.protected.len()) as u64,
                ringbuf_drops: s.ringbuf_drops,
            }),
            config_file: self.config_path.display().to_string(),
            bpf_pin_dir: self.programs.pin_dir.display().to_string(),
        }
    }

    fn connections(&self) -> pb::ListConnectionsResponse {
        let mut connections: Vec<pb::Connection> = self
            .pending
            .iter()
            .filter_map(|(cookie, p)| {
                let est = p.established?;
                Some(pb::Connection {
                    cookie: *cookie,
                    local: est.local().to_string(),
                    remote: est.remote().to_string(),
                    role: if est.role == role::CLIENT {
                        "client"
                    } else {
                        "server"
                    }
                    .into(),
                    pid: p.owner.map_or(0, |o| o.0),
                    provider: p.provider.clone().unwrap_or_default(),
                    cipher: String::new(),
                    state: if p.provider.is_some() {
                        "keying"
                    } else {
                        "waiting-owner"
                    }
                    .into(),
                    key_ms: 0.0,
                    age_ms: p.since.elapsed().as_millis() as u64,
                })
            })
            .chain(self.protected.iter().map(|(cookie, c)| pb::Connection {
                cookie: *cookie,
                local: c.local.to_string(),
                remote: c.remote.to_string(),
                role: role_name(c.role).into(),
                pid: c.pid,
                provider: c.provider.clone(),
                cipher: c.cipher.clone(),
                state: "protected".into(),
                key_ms: c.key_time.as_secs_f64() * 1000.0,
                age_ms: c.since.elapsed().as_millis() as u64,
            }))
            .collect();
        connections.sort_by_key(|c| std::cmp::Reverse(c.age_ms));
        pb::ListConnectionsResponse { connections }
    }

    /// Re-reads the config file; only `[policy]` is applied. A file that
    /// does not load leaves everything as it was.
    fn reload_policy(&mut self) -> Result<pb::Policy, String> {
        let fresh = Config::load(&self.config_path).map_err(|e| e.to_string())?;
        self.programs
            .write_policy(&fresh.policy)
            .map_err(|e| e.to_string())?;
        self.config.policy = fresh.policy;
        info!(
            local = self.config.policy.local_cidrs.len(),
            rules = self.config.policy.rules.len(),
            "policy reloaded"
        );
        Ok(policy_pb(&self.config.policy))
    }

    /// kTLS counters of every network namespace that holds a protected
    /// connection (one owner per namespace is read).
    fn update_ktls_gauges(&mut self) {
        let mut seen = HashSet::new();
        let mut texts = Vec::new();
        for c in self.protected.values() {
            let Ok(ns) = std::fs::read_link(format!("/proc/{}/ns/net", c.pid)) else {
                continue;
            };
            if seen.insert(ns)
                && let Ok(t) = std::fs::read_to_string(format!("/proc/{}/net/tls_stat", c.pid))
            {
                texts.push(t);
            }
        }
        if let Ok(own) = std::fs::read_link("/proc/self/ns/net")
            && !seen.contains(&own)
            && let Ok(t) = std::fs::read_to_string("/proc/self/net/tls_stat")
        {
            texts.push(t);
        }
        self.metrics.set_tls_stat(texts.iter().map(String::as_str));
    }

    fn write_stats(&mut self) {
        let drops = self.programs.ringbuf_drops();
        if drops > self.stats.ringbuf_drops {
            error!(
                lost = drops - self.stats.ringbuf_drops,
                "BPF ring buffer overflowed: events were lost; their connections stay gated (no plaintext) until the gate holds their app, which names it for keying"
            );
        }
        self.metrics
            .ringbuf_drops
            .inc_by(drops.saturating_sub(self.stats.ringbuf_drops));
        self.stats.ringbuf_drops = drops;
        let no_core = self.programs.no_core_refusals();
        self.metrics
            .no_core
            .inc_by(no_core.saturating_sub(self.stats.no_core_refusals));
        self.stats.no_core_refusals = no_core;
        // Counted by BPF: carried into the stats and metrics here, with an
        // error logged where growth means trouble.
        for (index, seen, counter, alarm) in [
            (
                tlshub_ebpf::stat::FASTOPEN_REFUSED,
                &mut self.stats.fastopen_refused,
                &self.metrics.fastopen_refused,
                None,
            ),
            (
                tlshub_ebpf::stat::MAP_FULL,
                &mut self.stats.map_full,
                &self.metrics.map_full,
                Some(
                    "the conns map is full ([bpf] max_connections): new selected connections fail closed",
                ),
            ),
        ] {
            let now = self.programs.stat(index);
            if now != *seen {
                if let Some(alarm) = alarm {
                    error!(failed = now.saturating_sub(*seen), "{alarm}");
                }
                counter.inc_by(now.saturating_sub(*seen));
                *seen = now;
                self.activity += 1;
            }
        }
        self.metrics.pending.set(self.pending.len() as i64);
        let Some(path) = &self.stats_file else { return };
        // Rewrite only after events or outcomes: counting map entries walks
        // the maps key by key, and the samples can be large.
        if self.stats_written_at == Some(self.activity) {
            return;
        }
        self.stats_written_at = Some(self.activity);
        self.stats.pending = self.pending.len();
        self.stats.held_tracked = self.held.len();
        self.stats.bpf_maps = self.programs.map_sizes();
        match serde_json::to_vec(&self.stats) {
            Ok(bytes) => {
                let tmp = path.with_extension("tmp");
                if std::fs::write(&tmp, bytes)
                    .and_then(|()| std::fs::rename(&tmp, path))
                    .is_err()
                {
                    warn!(path = %path.display(), "cannot write stats file");
                }
            }
            Err(e) => warn!(error = %e, "cannot encode stats"),
        }
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Client => "client",
        Role::Server => "server",
    }
}

fn policy_pb(p: &crate::config::PolicySection) -> pb::Policy {
    pb::Policy {
        local_cidrs: p.local_cidrs.iter().map(ToString::to_string).collect(),
        rules: p
            .rules
            .iter()
            .map(|r| pb::Rule {
                peer_cidrs: r.peer_cidrs.iter().map(ToString::to_string).collect(),
                ports: r.ports.iter().map(|&p| u32::from(p)).collect(),
            })
            .collect(),
    }
}

/// Checks every provider's health every `interval` and mirrors it in the
/// metrics.
async fn health_loop(providers: Arc<Registry>, metrics: Arc<Metrics>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        providers
            .check_health(interval.max(Duration::from_millis(500)))
            .await;
        for p in providers.all() {
            metrics
                .provider_up
                .get_or_create(&ProviderLabel {
                    provider: p.name.clone(),
                })
                .set(i64::from(p.observed().health == Health::Serving));
        }
        metrics.set_active_provider(
            providers.all().map(|p| p.name.as_str()),
            &providers.active_name(),
        );
    }
}
