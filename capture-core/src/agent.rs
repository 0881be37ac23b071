//! The event loop: joins BPF events per connection, starts keying jobs,
//! applies their outcome (gate open, reset, resume), and releases held
//! processes.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tlshub_admin::pb;
use tlshub_ebpf::role;
use tlshub_provider_sdk::Role;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, error, info, info_span, warn};

use crate::bpf::{BpfError, Programs};
use crate::config::{Config, FailurePolicy, ProviderSet};
use crate::conntrack::Conntrack;
use crate::keying::{self, Job, KeyingError, Outcome};
use crate::metrics::{Metrics, ProviderLabel};
use crate::outcomes::OutcomeKind;
use crate::peers::PeerMemory;
use crate::providers::{Health, Registry};
use crate::state::{ConnTable, role_name};

/// How often held processes are swept (continued once their connection is
/// no longer pending) and the heartbeat written, while there is work.
const SWEEP_EVERY: Duration = Duration::from_millis(50);

/// A keying job, polled by the event loop's own task (see
/// [`Agent::start_jobs`]).
type JobFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send>>;

/// The keying jobs under way.
type Jobs = FuturesUnordered<JobFuture>;

/// The most outcomes one `ListOutcomes` answer carries (about 0.5 MB).
const OUTCOMES_PER_ANSWER: usize = 10_000;

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
    /// `ListOutcomes` after this sequence number.
    Outcomes(u64, oneshot::Sender<pb::ListOutcomesResponse>),
    /// `ListPeers` (the event loop holds the policy that gives each peer's
    /// mode).
    Peers(oneshot::Sender<pb::ListPeersResponse>),
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

/// Why the core cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Loading, attaching or adopting the BPF programs failed.
    #[error(transparent)]
    Bpf(#[from] BpfError),
    /// `[policy] service_cidrs` is set but the connection tracking table
    /// cannot be read.
    #[error("service addresses are configured, but: {0}")]
    Conntrack(#[from] crate::conntrack::ConntrackError),
    /// `[peers]`: the remembered peers cannot be read or kept.
    #[error(transparent)]
    Peers(#[from] crate::peers::PeersError),
}

/// The running core.
pub struct Agent {
    config: Config,
    config_path: PathBuf,
    programs: Programs,
    providers: Arc<Registry>,
    metrics: Arc<Metrics>,
    started: Instant,
    /// The connections and held processes, and what to do about them.
    table: ConnTable,
    stats_file: Option<PathBuf>,
    /// The table's activity count at the last stats write.
    stats_written_at: Option<u64>,
    keylog: Option<keying::KeyLog>,
    /// See [`crate::config::KtlsSection::send_buffer_floor`].
    send_buffer_floor: u32,
    /// Whether the gate was seen to know kTLS's receive method.
    gate_knows_ktls: bool,
    /// The `conns` map as keying jobs read it.
    conns: Arc<crate::bpf::ConnsReader>,
    /// Jobs started before their owner was known, by job number: where
    /// the owner is sent once the table learns it.
    owner_senders: HashMap<u64, tokio::sync::watch::Sender<Option<(u32, i32)>>>,
    /// The policy as keying jobs judge service backends with it.
    policy: Arc<crate::config::PolicySection>,
    /// The node's connection tracking table, opened once service
    /// addresses are configured.
    conntrack: Option<Arc<Conntrack>>,
    /// The peers that announced tlshub (see [`crate::peers`]).
    peers: Arc<PeerMemory>,
    /// Whether a silent peer was remembered when the connection's
    /// `ESTABLISHED` was read (by cookie; taken by its job). See
    /// [`Agent::note_announcement`].
    peer_remembered: HashMap<u64, bool>,
    /// The protected connections' processes the kTLS gauges' sources were
    /// resolved for (`None`: not yet).
    tls_stat_pids: Option<BTreeSet<u32>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("pending", &self.table.pending().len())
            .finish()
    }
}

impl Agent {
    /// Loads the programs, writes the policy and sets up the providers
    /// (nothing connects to them until the first health check or key request).
    pub fn start(
        config: Config,
        set: &ProviderSet,
        config_path: PathBuf,
        metrics: Arc<Metrics>,
        stats_file: Option<PathBuf>,
        keylog: Option<keying::KeyLog>,
    ) -> Result<Self, StartError> {
        // Before anything is attached: a core that would fail every
        // service connection does not start.
        let conntrack = open_conntrack(&config.policy, &config.conntrack, None)?;
        let peers = Arc::new(PeerMemory::open(
            &config.peers.file,
            config.peers.node_map.as_deref(),
        )?);
        let mut programs = Programs::load_and_attach(
            &config.bpf.cgroup,
            &config.bpf.pin_dir,
            crate::bpf::MapSizes {
                connections: config.bpf.max_connections,
                held_processes: config.bpf.max_held_processes,
                event_buffer_bytes: config.bpf.event_buffer_bytes,
            },
        )?;
        programs.heartbeat(
            Duration::from_millis(config.bpf.core_restart_grace_ms),
            config.failure_policy == FailurePolicy::FailOpen,
        );
        programs.write_policy(&config.policy)?;
        programs.exempt.add(std::process::id());
        let exempt = programs.exempt.clone();
        let providers = Arc::new(Registry::new(
            set,
            Arc::new(move |pid| exempt.add(pid)),
            Some(config.provider.switch_file.clone()),
        ));
        metrics.set_active_provider(
            providers.all().map(|p| p.name.as_str()),
            &providers.active_name(),
        );
        for p in providers.all() {
            let label = ProviderLabel {
                provider: p.name.clone(),
            };
            metrics.provider_up.get_or_create(&label).set(0);
            metrics.protected.get_or_create(&label).inc_by(0);
        }
        info!(
            active = %providers.active_name(),
            configured_active = %set.active,
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
        let mut table = ConnTable::new(config.failure_policy, metrics.clone());
        table.set_bounds(config.bpf.process_bound(), config.bpf.cgroup_bound());
        let conns = Arc::new(programs.conns_reader()?);
        let mut agent = Self {
            policy: Arc::new(config.policy.clone()),
            conntrack,
            peers,
            peer_remembered: HashMap::new(),
            tls_stat_pids: None,
            conns,
            owner_senders: HashMap::new(),
            send_buffer_floor,
            gate_knows_ktls: false,
            config,
            config_path,
            programs,
            providers,
            metrics,
            started: Instant::now(),
            table,
            stats_file,
            stats_written_at: None,
            keylog,
        };
        if agent.programs.adopted {
            let conns = agent.programs.all_conns();
            let connecting = agent.programs.connecting_owners();
            agent.table.adopt(&agent.programs, conns, connecting);
        }
        Ok(agent)
    }

    /// The connection tracking table, for a connecting side whose `remote`
    /// is a service address (`None` for any other).
    fn service_table(&self, role: u32, remote: std::net::SocketAddr) -> Option<Arc<Conntrack>> {
        let table = self.conntrack.clone()?;
        (role == role::CLIENT && self.policy.is_service(remote)).then_some(table)
    }

    /// The remembered peers (shared with the admin API, which lists and
    /// forgets them).
    pub fn peers(&self) -> Arc<PeerMemory> {
        self.peers.clone()
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
        let mut jobs = Jobs::new();
        let ring = self.programs.events.take().ok_or(AgentError::RingTaken)?;
        #[expect(
            deprecated,
            reason = "RingBuf owns its map fd for its whole life, which is the contract the unsafe AsyncFd::register would state"
        )]
        let mut events = AsyncFd::new(ring).map_err(AgentError::Ring)?;
        let mut report = tokio::time::interval(Duration::from_secs(1));
        tokio::pin!(shutdown);
        info!(node = %self.config.node_name, policy = ?self.config.failure_policy, adopted = self.programs.adopted, "capture-core running");
        self.start_jobs(&mut jobs);
        self.table.sweep_soon();
        let grace = Duration::from_millis(self.config.bpf.core_restart_grace_ms);
        let fail_open = self.config.failure_policy == FailurePolicy::FailOpen;
        // The held-process sweep and the heartbeat run every SWEEP_EVERY
        // while a connection waits for keys or a held process is to be
        // continued (see `has_work`); with nothing to do only the heartbeat
        // is due, so an idle core wakes twice a second instead of twenty.
        // A tenth of the grace at most: a core that dies idle leaves the
        // gate holding for at least nine tenths of the grace (a graceful
        // stop beats once more on its way out).
        let idle_every = (grace / 10).clamp(SWEEP_EVERY, Duration::from_millis(500));
        let mut next_sweep = tokio::time::Instant::now() + SWEEP_EVERY;
        loop {
            tokio::select! {
                guard = events.readable_mut() => {
                    let mut guard = guard.map_err(AgentError::Ring)?;
                    let batch = crate::bpf::drain_events(guard.get_inner_mut());
                    guard.clear_ready();
                    for ev in batch {
                        self.note_announcement(&ev);
                        self.table.on_event(&self.programs, ev);
                    }
                }
                Some(outcome) = jobs.next() => self.on_outcome(outcome),
                () = tokio::time::sleep_until(next_sweep) => {
                    self.table.sweep_soon();
                    // The keying protocol new connections announce: the
                    // provider they go to now (known after its first
                    // health check; 0, "not said", before).
                    self.programs.set_keying(self.providers.choose().keying_id());
                    self.programs.heartbeat(grace, fail_open);
                    next_sweep = tokio::time::Instant::now() + idle_every;
                }
                _ = report.tick() => {
                    self.write_stats();
                    self.update_tls_stat_sources();
                }
                Some(request) = admin.recv() => self.on_admin(request),
                () = &mut shutdown => break,
            }
            if self.table.take_sweep_due() {
                self.sweep(&mut events);
            }
            self.start_jobs(&mut jobs);
            self.close_open_records();
            if self.has_work() {
                next_sweep = next_sweep.min(tokio::time::Instant::now() + SWEEP_EVERY);
            }
            // For the events of the next round.
            let active = self.providers.choose();
            self.table
                .set_key_before_owner(active.keys_without_socket());
        }
        self.finish_keying_under_way(&mut events, &mut jobs, grace, fail_open)
            .await;
        health.abort();
        // The grace the next core (or the release) gets counts from now,
        // not from the last idle beat.
        self.programs.heartbeat(grace, fail_open);
        self.hand_over();
        self.stats_written_at = None;
        self.write_stats();
        Ok(())
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
        jobs: &mut Jobs,
        grace: Duration,
        fail_open: bool,
    ) {
        self.table.drain();
        // Jobs keyed from establishment that still wait for an owner stop
        // waiting: their connections stay gated for the next core.
        self.owner_senders.clear();
        let in_flight = self.table.keying();
        if in_flight == 0 {
            return;
        }
        info!(
            in_flight,
            "finishing the keying under way before handing over"
        );
        let deadline =
            tokio::time::Instant::now() + self.config.key_timeout() + Duration::from_millis(500);
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        while self.table.keying() > 0 {
            tokio::select! {
                Some(outcome) = jobs.next() => self.on_outcome(outcome),
                _ = sweep.tick() => {
                    self.programs.heartbeat(grace, fail_open);
                    self.sweep(events);
                    // Nothing waits for these any more; only emptied.
                    self.table.take_owner_updates();
                }
                () = tokio::time::sleep_until(deadline) => {
                    warn!(left = self.table.keying(), "keying still under way at shutdown; the next core takes it over");
                    break;
                }
            }
        }
    }

    /// Whether the periodic sweep must come soon: connections waiting for
    /// keys, or held processes still to be continued. Not what only waits
    /// to be forgotten or removed (a continued hold's record, kept for a
    /// second; the `conns` entries of opened connections, [`UNTRACK_DELAY`]):
    /// any later sweep does that (after the next outcome, or at the idle
    /// heartbeat). Ticking every [`SWEEP_EVERY`] for them cost a core that
    /// keyed one connection a second about 45 wakeups per connection.
    ///
    /// [`UNTRACK_DELAY`]: crate::bpf::UNTRACK_DELAY
    fn has_work(&self) -> bool {
        !self.table.pending().is_empty() || self.table.holds_to_continue()
    }

    /// Ordering rule (see [`ConnTable::sweep_held`]): process states
    /// first, then every event committed up to now, then decide.
    fn sweep(&mut self, events: &mut AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>) {
        let states = self.table.held_states(&mut self.programs);
        for ev in crate::bpf::drain_events(events.get_mut()) {
            self.note_announcement(&ev);
            self.table.on_event(&self.programs, ev);
        }
        self.table.sweep_held(&mut self.programs, &states);
        self.programs.untrack_opened();
        self.close_open_records();
    }

    /// Closes the open kTLS records of the `shutdown()`s the gate holds for
    /// them ([`crate::state::RecordClose`]), each on a blocking thread:
    /// the socket may have to be searched among the process's fds. Not
    /// awaited; the held process is continued by the sweep as usual,
    /// and a restarted `shutdown()` that still finds the record open is
    /// held and asks again.
    fn close_open_records(&mut self) {
        for close in self.table.take_record_closes() {
            let span = info_span!("conn", cookie = close.cookie, pid = close.pid);
            tokio::task::spawn_blocking(move || span.in_scope(|| close_open_record(close)));
        }
    }

    /// What a connection's handshake says about its peer, taken as its
    /// `ESTABLISHED` is read, in the order the node saw the handshakes, and
    /// not when its job runs (a server's job may wait for `accept()`): an
    /// announcing peer is remembered at once, and a silent one is checked
    /// against the memory as it was then. So the two nodes of one
    /// connection that teaches them about each other judge every later
    /// connection alike. A service address's backend is not known yet: its
    /// job does both once it is.
    fn note_announcement(&mut self, ev: &tlshub_ebpf::Event) {
        if ev.kind != tlshub_ebpf::kind::ESTABLISHED {
            return;
        }
        let remote = ev.remote();
        if ev.role == role::CLIENT && self.policy.is_service(remote) {
            self.peer_remembered.remove(&ev.cookie);
            return;
        }
        // Only a keying protocol this node's provider speaks makes a peer
        // one to remember (see `peers::verdict`).
        let own = self.providers.choose().keying_id();
        let heard = crate::peers::Heard::from_event(ev.peer, ev.peer_keying, own);
        let remembered = if heard == crate::peers::Heard::Announced {
            self.peers.announced(remote.ip());
            false
        } else {
            self.peers.remembers(remote.ip())
        };
        // A socket connected again replaces its entry.
        self.peer_remembered.insert(ev.cookie, remembered);
    }

    /// Adds the keying jobs the table decided on to `jobs`, which the
    /// event loop polls in its own task. Why not a task each: the hop to
    /// a new task at the start and back to the event loop with the
    /// outcome cost about a millisecond each of every connection's setup
    /// in the benchmark's VM (the `job_started` and `gate_opened` stages),
    /// and a job awaits the provider almost all of its life. What a job
    /// does between its awaits is a few system calls; its slow parts
    /// (searching a process's fds, a conntrack lookup) run on blocking
    /// threads. A job that panics fails its connection (`internal`)
    /// instead of taking the event loop with it.
    fn start_jobs(&mut self, jobs: &mut Jobs) {
        for start in self.table.take_starts() {
            // The provider is chosen now and kept for this connection: a
            // switch later affects only connections that start keying after it.
            let provider = self.providers.choose();
            self.table.keying_with(start.cookie, &provider.name);
            self.metrics
                .provider_in_flight
                .get_or_create(&ProviderLabel {
                    provider: provider.name.clone(),
                })
                .inc();
            let est = start.established;
            let (owner_tx, owner_rx) = tokio::sync::watch::channel(start.owner);
            if start.owner.is_none() {
                self.owner_senders.insert(start.job, owner_tx);
            }
            let job = Job {
                id: start.job,
                cookie: start.cookie,
                role: if est.role == role::CLIENT {
                    Role::Client
                } else {
                    Role::Server
                },
                local: est.local(),
                remote: est.remote(),
                local_isn: est.local_isn,
                remote_isn: est.remote_isn,
                owner: owner_rx,
                node_name: self.config.node_name.clone(),
                timeout: self.config.key_timeout(),
                keylog: self.keylog.clone(),
                send_buffer_floor: self.send_buffer_floor,
                conns: self.conns.clone(),
                established: est,
                service: self.service_table(est.role, est.remote()),
                policy: self.policy.clone(),
                peers: self.peers.clone(),
                // `None` for a connection whose event this core did not read
                // (adopted from a previous core, or taken up from the map
                // after lost events): its job asks the memory.
                peer_remembered: self.peer_remembered.remove(&start.cookie),
                over_bound: start.over_bound,
                show_ktls_to_gate: !self.gate_knows_ktls,
            };
            let span = info_span!("conn", cookie = job.cookie, local = %job.local, remote = %job.remote, owner = ?start.owner, role = ?job.role, provider = %provider.name);
            let (id, cookie, name) = (job.id, job.cookie, provider.name.clone());
            let run = failing_on_panic(keying::run(job, provider), id, cookie, name);
            jobs.push(Box::pin(run.instrument(span)));
        }
        self.route_owner_updates();
    }

    /// Passes owners found (or given up on) to the jobs that started
    /// before their owner was known.
    fn route_owner_updates(&mut self) {
        for update in self.table.take_owner_updates() {
            // Dropping the sender after the send is fine: the job reads the
            // last value first. Dropping it without one tells the job to
            // stop waiting.
            if let Some(tx) = self.owner_senders.remove(&update.job)
                && let Some(owner) = update.owner
            {
                let _ = tx.send(Some(owner));
            }
        }
    }

    fn on_outcome(&mut self, outcome: Outcome) {
        self.metrics
            .provider_in_flight
            .get_or_create(&ProviderLabel {
                provider: outcome.provider.clone(),
            })
            .dec();
        self.owner_senders.remove(&outcome.job);
        // The socket duplicate is dropped when the table is done with it.
        self.table.on_outcome(&mut self.programs, outcome);
        if !self.gate_knows_ktls && self.programs.knows_ktls() {
            self.gate_knows_ktls = true;
            info!("the gate learned kTLS's receive method from the first keyed socket");
        }
    }

    /// At shutdown the programs stay attached (pinned): connections still
    /// waiting for keys stay gated for the next core, which adopts them,
    /// and the gate keeps holding for `core_restart_grace_ms`, then applies
    /// the failure policy by itself. Processes it stopped stay stopped
    /// until the next core or `tlshub-core release` continues them.
    fn hand_over(&mut self) {
        info!(
            waiting = self.table.pending().len(),
            held = self.table.held_count(),
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
            AdminRequest::Peers(reply) => {
                let _ = reply.send(self.peers_pb());
            }
            AdminRequest::ReloadPolicy(reply) => {
                let _ = reply.send(self.reload_policy());
            }
            AdminRequest::Outcomes(after, reply) => {
                let _ = reply.send(self.outcomes(after));
            }
        }
    }

    /// At most [`OUTCOMES_PER_ANSWER`] outcomes after `after`.
    fn outcomes(&self, after: u64) -> pb::ListOutcomesResponse {
        let since = self.table.outcomes().since(after, OUTCOMES_PER_ANSWER);
        let outcomes = since
            .outcomes
            .into_iter()
            .map(|o| {
                let mut out = pb::Outcome {
                    seq: o.seq,
                    provider: o.provider.to_string(),
                    ..Default::default()
                };
                match o.kind {
                    OutcomeKind::Keyed { role, key } => {
                        out.set_kind(pb::OutcomeKind::Keyed);
                        out.role = role.into();
                        out.ms = key.as_secs_f64() * 1000.0;
                    }
                    OutcomeKind::Failed { reason } => {
                        out.set_kind(pb::OutcomeKind::Failed);
                        out.reason = reason.into();
                    }
                    OutcomeKind::Held { held } => {
                        out.set_kind(pb::OutcomeKind::Held);
                        out.ms = held.as_secs_f64() * 1000.0;
                    }
                }
                out
            })
            .collect();
        pb::ListOutcomesResponse {
            outcomes,
            more: since.more,
            lost: since.lost,
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
                    key_transport: if p.client().uses_keys_stream() {
                        "keys-stream"
                    } else {
                        "grpc"
                    }
                    .into(),
                    credentials: o
                        .info
                        .as_ref()
                        .map(|i| {
                            i.credentials
                                .iter()
                                .map(|c| pb::ProviderCredential {
                                    name: c.name.clone(),
                                    not_after_unix_seconds: c.not_after_unix_seconds,
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    peer_sessions: o
                        .info
                        .as_ref()
                        .map(|i| {
                            i.peer_sessions
                                .iter()
                                .map(|s| pb::PeerSession {
                                    peer: s.peer.clone(),
                                    generations: s.generations,
                                    up_since_unix_seconds: s.up_since_unix_seconds,
                                    renew_at_unix_seconds: s.renew_at_unix_seconds,
                                    sessions_total: s.sessions_total,
                                    last_error: s.last_error.clone(),
                                    last_error_unix_seconds: s.last_error_unix_seconds,
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                }
            })
            .collect();
        let s = self.table.stats();
        pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            node_name: self.config.node_name.clone(),
            uptime_seconds: self.started.elapsed().as_secs(),
            active_provider: active,
            configured_provider: self.providers.configured_name().to_owned(),
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
                pending: self.table.pending().len() as u64,
                tracked: (self.table.pending().len() + self.table.protected().len()) as u64,
                ringbuf_drops: s.ringbuf_drops,
                service_plain: s.service_plain,
                peer_silent_plain: s.peer_silent_plain,
                known_peer_silent: s.known_peer_silent,
                peer_incompatible_plain: s.peer_incompatible_plain,
                peers_announced: self.peers.announced_count() as u64,
            }),
            config_file: self.config_path.display().to_string(),
            bpf_pin_dir: self.programs.pin_dir.display().to_string(),
        }
    }

    /// Every peer known, with the mode of the rule that judges it now and
    /// its keying byte by the name of the configured provider that speaks
    /// it (in hex when none does).
    fn peers_pb(&self) -> pb::ListPeersResponse {
        let names: Vec<(u8, String)> = self
            .providers
            .all()
            .filter_map(|p| p.observed().info.map(|i| i.keying))
            .filter(|k| !k.is_empty())
            .map(|k| (tlshub_provider_sdk::keying_id(&k), k))
            .collect();
        let keying_name = |id: u8| match names.iter().find(|(i, _)| *i == id) {
            _ if id == 0 => String::new(),
            Some((_, name)) => name.clone(),
            None => format!("{id:#04x}"),
        };
        let peers = self
            .peers
            .list()
            .into_iter()
            .map(|(peer, e)| pb::Peer {
                peer,
                announced: e.first_announced_unix.is_some(),
                first_announced_unix: e.first_announced_unix.unwrap_or(0),
                last_announced_unix: e.last_announced_unix.unwrap_or(0),
                protected: e.protected,
                plain: e.plain,
                known_peer_silent: e.known_peer_silent,
                keying: e.keying.map(keying_name).unwrap_or_default(),
                mode: e
                    .address
                    .and_then(|ip| self.policy.peer_rule(ip))
                    .map(|r| r.mode.as_str().to_owned())
                    .unwrap_or_default(),
            })
            .collect();
        pb::ListPeersResponse {
            peers,
            file: self.peers.file().display().to_string(),
        }
    }

    fn connections(&self) -> pb::ListConnectionsResponse {
        let mut connections: Vec<pb::Connection> = self
            .table
            .pending()
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
            .chain(
                self.table
                    .protected()
                    .iter()
                    .map(|(cookie, c)| pb::Connection {
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
                    }),
            )
            .collect();
        connections.sort_by_key(|c| std::cmp::Reverse(c.age_ms));
        pb::ListConnectionsResponse { connections }
    }

    /// Re-reads the config file; only `[policy]` (and `[peers] node_map`)
    /// is applied. A file that does not load leaves everything as it was.
    fn reload_policy(&mut self) -> Result<pb::Policy, String> {
        let fresh = Config::load(&self.config_path).map_err(|e| e.to_string())?;
        // Service addresses need the table before the maps select them
        // (`[conntrack]` itself is read at startup only).
        let conntrack = open_conntrack(
            &fresh.policy,
            &self.config.conntrack,
            self.conntrack.clone(),
        )
        .map_err(|e| StartError::from(e).to_string())?;
        // Read before the maps change, so that a bad node map leaves
        // everything as it was.
        let nodes = crate::peers::load_node_map(fresh.peers.node_map.as_deref())
            .map_err(|e| StartError::from(e).to_string())?;
        self.programs
            .write_policy(&fresh.policy)
            .map_err(|e| e.to_string())?;
        self.peers.set_node_map(nodes);
        self.conntrack = conntrack;
        self.policy = Arc::new(fresh.policy.clone());
        self.config.policy = fresh.policy;
        info!(
            local = self.config.policy.local_cidrs.len(),
            rules = self.config.policy.rules.len(),
            "policy reloaded"
        );
        Ok(policy_pb(&self.config.policy))
    }

    /// Points the kTLS gauges at one `tls_stat` file per network namespace
    /// of the protected connections' processes (and the core's own), read
    /// at each scrape. Resolved only when the set of those processes
    /// changed: an idle core reads nothing.
    fn update_tls_stat_sources(&mut self) {
        let pids: BTreeSet<u32> = self.table.protected().values().map(|c| c.pid).collect();
        if self.tls_stat_pids.as_ref() == Some(&pids) {
            return;
        }
        let mut seen = HashSet::new();
        let mut sources = Vec::new();
        for pid in &pids {
            let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/net")) else {
                continue;
            };
            if seen.insert(ns) {
                sources.push(PathBuf::from(format!("/proc/{pid}/net/tls_stat")));
            }
        }
        if let Ok(own) = std::fs::read_link("/proc/self/ns/net")
            && !seen.contains(&own)
        {
            sources.push(PathBuf::from("/proc/self/net/tls_stat"));
        }
        self.metrics.set_tls_stat_sources(sources);
        self.tls_stat_pids = Some(pids);
    }

    fn write_stats(&mut self) {
        // Read once: the drops reconciled below are exactly the ones recorded.
        let drops = self.programs.ringbuf_drops();
        if drops > self.table.stats().ringbuf_drops {
            // A lost hold event went to the `held` map, which only a sweep
            // reads; nothing else may make one due while the core is idle.
            self.table.sweep_soon();
            // Before the drop count is taken over below: events were lost,
            // so the map is read for the connections they were about.
            let conns = self.programs.all_conns();
            self.table.reconcile(conns);
        }
        let pending = self.table.pending().len();
        let held = self.table.held_count();
        let mut moved = false;
        let stats = self.table.stats_mut();
        if drops > stats.ringbuf_drops {
            error!(
                lost = drops - stats.ringbuf_drops,
                "BPF ring buffer overflowed: events were lost; their connections are taken up from the conns map (gated meanwhile, no plaintext)"
            );
        }
        self.metrics
            .ringbuf_drops
            .inc_by(drops.saturating_sub(stats.ringbuf_drops));
        stats.ringbuf_drops = drops;
        let no_core = self.programs.no_core_refusals();
        self.metrics
            .no_core
            .inc_by(no_core.saturating_sub(stats.no_core_refusals));
        stats.no_core_refusals = no_core;
        // Counted by BPF: carried into the stats and metrics here, with an
        // error logged where growth means trouble.
        for (c, counter) in crate::metrics::BPF_COUNTERS.iter().zip(&self.metrics.bpf) {
            let now = self.programs.stat(c.index);
            let seen = (c.field)(stats);
            if now != *seen {
                if let Some(alarm) = c.alarm {
                    error!(failed = now.saturating_sub(*seen), "{alarm}");
                }
                counter.inc_by(now.saturating_sub(*seen));
                *seen = now;
                moved = true;
            }
        }
        // Counted by the keying jobs, in the peer memory.
        let refused = self.peers.known_peer_silent_total();
        if refused != stats.known_peer_silent {
            self.metrics
                .known_peer_silent
                .inc_by(refused.saturating_sub(stats.known_peer_silent));
            stats.known_peer_silent = refused;
            moved = true;
        }
        self.metrics
            .peers_announced
            .set(self.peers.announced_count() as i64);
        // Connections that closed before a job took their entry.
        let waiting = self.table.pending();
        self.peer_remembered
            .retain(|cookie, _| waiting.contains_key(cookie));
        let stats = self.table.stats_mut();
        stats.pending = pending;
        stats.held_tracked = held;
        if moved {
            self.table.touch();
        }
        self.metrics.pending.set(pending as i64);
        let Some(path) = &self.stats_file else { return };
        // Rewrite only after events or outcomes: counting map entries walks
        // the maps key by key, and the samples can be large.
        if self.stats_written_at == Some(self.table.activity()) {
            return;
        }
        self.stats_written_at = Some(self.table.activity());
        self.table.stats_mut().bpf_maps = self.programs.map_sizes();
        match serde_json::to_vec(self.table.stats()) {
            Ok(bytes) => {
                if crate::files::replace(path, &bytes).is_err() {
                    warn!(path = %path.display(), "cannot write stats file");
                }
            }
            Err(e) => warn!(error = %e, "cannot encode stats"),
        }
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
                mode: r.mode.as_str().into(),
            })
            .collect(),
        service_cidrs: p.service_cidrs.iter().map(ToString::to_string).collect(),
        service_ports: p.service_ports.iter().map(|&p| u32::from(p)).collect(),
    }
}

/// The connection tracking table for `policy`'s service addresses: `open`
/// if there is one already, a new one (checked with a lookup) if service
/// addresses are configured, else `None`.
fn open_conntrack(
    policy: &crate::config::PolicySection,
    table_at: &crate::config::ConntrackSection,
    open: Option<Arc<Conntrack>>,
) -> Result<Option<Arc<Conntrack>>, crate::conntrack::ConntrackError> {
    if policy.service_cidrs.is_empty() {
        return Ok(None);
    }
    if open.is_some() {
        return Ok(open);
    }
    let table = Conntrack::open(table_at.netns.as_deref())?;
    table.check()?;
    info!(
        netns = %table_at.netns.as_deref().map_or("(own)".into(), |p| p.display().to_string()),
        services = policy.service_cidrs.len(),
        "service translations are read from the connection tracking table"
    );
    Ok(Some(Arc::new(table)))
}

/// `run`, job `id` on `cookie` with provider `name`, whose panic becomes
/// an outcome failed with [`KeyingError::Panicked`].
fn failing_on_panic(
    run: impl std::future::Future<Output = Outcome>,
    id: u64,
    cookie: u64,
    name: String,
) -> impl std::future::Future<Output = Outcome> {
    std::panic::AssertUnwindSafe(run)
        .catch_unwind()
        .map(move |ran| {
            ran.unwrap_or_else(|_| Outcome {
                job: id,
                cookie,
                provider: name,
                socket: None,
                result: Err(KeyingError::Panicked),
            })
        })
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
            let observed = p.observed();
            metrics
                .provider_up
                .get_or_create(&ProviderLabel {
                    provider: p.name.clone(),
                })
                .set(i64::from(observed.health == Health::Serving));
            if let Some(info) = &observed.info {
                metrics.set_credentials(&p.name, &info.credentials);
            }
        }
        metrics.set_active_provider(
            providers.all().map(|p| p.name.as_str()),
            &providers.active_name(),
        );
    }
}

/// Closes kTLS's open record on the socket a `shutdown()` is held for
/// ([`tlshub_ktls::close_open_record`]). A failure is logged: the restarted
/// call is held again, until the bound lets it pass with the record unsent
/// (as without tlshub).
fn close_open_record(close: crate::state::RecordClose) {
    use std::os::fd::AsFd;
    let socket = match keying::find_socket(close.pid, close.fd, close.cookie, || true) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot find the socket whose open kTLS record a shutdown() waits for");
            return;
        }
    };
    match tlshub_ktls::close_open_record(socket.as_fd()) {
        Ok(()) => tracing::debug!("closed kTLS's open record before the held shutdown()"),
        Err(e) => warn!(error = %e, "cannot close the open kTLS record a shutdown() waits for"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_job_that_panics_fails_its_connection_and_the_others_go_on() {
        let mut jobs = Jobs::new();
        jobs.push(Box::pin(failing_on_panic(
            async { panic!("a bug in a job") },
            1,
            42,
            "openssl".into(),
        )));
        jobs.push(Box::pin(failing_on_panic(
            async {
                Outcome {
                    job: 2,
                    cookie: 43,
                    provider: "openssl".into(),
                    socket: None,
                    result: Err(KeyingError::NoOwner { cookie: 43 }),
                }
            },
            2,
            43,
            "openssl".into(),
        )));
        let mut ended = Vec::new();
        while let Some(o) = jobs.next().await {
            ended.push((
                o.job,
                o.cookie,
                o.provider,
                o.result.map_err(|e| e.reason()),
            ));
        }
        ended.sort_by_key(|e| e.0);
        assert!(
            matches!(
                &ended[..],
                [
                    (1, 42, p, Err("internal")),
                    (2, 43, _, Err("no_owner"))
                ] if p == "openssl"
            ),
            "{ended:?}"
        );
    }
}
