//! Node-pair keying: the providers of two nodes keep one mutually
//! authenticated TLS 1.3 session between them, on their own TCP
//! connection, and derive every application connection's keys from it
//! with the TLS exporter over the connection's identity (both addresses,
//! ports and ISNs). No byte crosses the application's connection before
//! its keys, and no connection waits for a round trip between the nodes.
//!
//! Who dials: of two nodes, the one whose name sorts first; the other only
//! accepts. The dialer replaces the session every `lifetime_seconds` (the
//! old one keys no new connection from then and is closed `drain_seconds`
//! later) and at once when it ends. How the two nodes agree on the session
//! of each connection across a replacement is in [`state`].
//!
//! The parts: [`keys`] (what is derived), [`wire`] (the session's
//! messages), [`state`] (the decisions) and this file (sockets and tasks).

pub mod keys;
pub mod state;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::{HandshakeFailure, Loaded, TlsLibrary, files};
use crate::socket::SocketIo;
use crate::tls13::TrafficSecrets;
use crate::{
    CipherSuite, ConnectionId, ConnectionKeys, KeyRequest, PeerSession, ProviderError, Role,
};
use keys::Generation;
use state::{PeerState, ServerChoice, SessionId};
use wire::{Message, Opener, Sealer};

/// `[node_pair]`: the sessions between this node's provider and its peers'.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodePairSection {
    /// Where this node accepts its peers' sessions.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The port every node accepts sessions on (dialed at the node map's
    /// `address`).
    #[serde(default = "default_port")]
    pub port: u16,
    /// How long one session keys new connections before the dialer
    /// replaces it (a new handshake, so a new secret).
    #[serde(default = "default_lifetime")]
    pub lifetime_seconds: u64,
    /// How long a replaced session is kept for the connections keyed just
    /// before the replacement.
    #[serde(default = "default_drain")]
    pub drain_seconds: u64,
}

/// The default session port.
pub const DEFAULT_PORT: u16 = 7446;

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT))
}
fn default_port() -> u16 {
    DEFAULT_PORT
}
fn default_lifetime() -> u64 {
    3600
}
fn default_drain() -> u64 {
    30
}

impl Default for NodePairSection {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            port: default_port(),
            lifetime_seconds: default_lifetime(),
            drain_seconds: default_drain(),
        }
    }
}

/// How long a session's TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one dial (connect, handshake, first message) may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest wait between two dials of an unreachable peer.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long a notice may take to be written.
const NOTICE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a session could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A socket call failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The TLS handshake failed.
    #[error("handshake: {0}")]
    Handshake(String),
    /// The peer is not a node this node keeps a session with.
    #[error("peer refused: {0}")]
    Peer(String),
    /// The session's messages broke the protocol.
    #[error(transparent)]
    Wire(#[from] wire::WireError),
}

/// One peer node's sessions and the writing halves that carry notices.
#[derive(Default)]
struct Peer {
    state: PeerState,
    writers: HashMap<SessionId, Arc<tokio::sync::Mutex<Writer>>>,
    /// What [`NodePair::sessions`] reports besides the generations.
    seen: PeerSeen,
}

/// The history of one peer's sessions that an operator is shown.
#[derive(Default)]
struct PeerSeen {
    /// When the newest session came up.
    up_since: Option<SystemTime>,
    /// When this node replaces the newest session (it dials the peer).
    renew_at: Option<SystemTime>,
    /// Sessions set up since start.
    total: u64,
    /// The last failed attempt since the newest session came up.
    last_error: Option<(String, SystemTime)>,
}

struct Writer {
    half: OwnedWriteHalf,
    sealer: Sealer,
}

impl Writer {
    async fn send(&mut self, message: &Message) -> std::io::Result<()> {
        let frame = self.sealer.seal(message);
        self.half.write_all(&frame).await
    }
}

/// The `peer` label of the node-pair metrics: the peer node's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

/// What an operator sees of the sessions (`tlshub_keyprovider_node_pair_*`).
#[derive(Clone, Default)]
struct SessionMetrics {
    /// Generations held per peer: 0 means no session, so connections
    /// to that node wait and fail at their key timeout.
    generations: Family<PeerLabel, Gauge>,
    /// Sessions set up per peer (each replacement counts).
    sessions: Family<PeerLabel, Counter>,
}

struct Shared<L> {
    section: NodePairSection,
    metrics: SessionMetrics,
    loaded: Arc<RwLock<Arc<Loaded<L>>>>,
    accepted: Arc<[CipherSuite]>,
    /// This node's name: the node map's node that its certificate names.
    own: String,
    peers: Mutex<HashMap<String, Peer>>,
    /// Peers a dialer task runs for.
    dialing: Mutex<HashSet<String>>,
    /// Woken whenever a session or notice arrives or a session ends.
    changed: Notify,
    next_session: AtomicU64,
    /// Keys connections between two pods of this node (both ends ask this
    /// process); a new one each start.
    local: Arc<Generation>,
}

/// The node-pair sessions of one provider.
pub struct NodePair<L> {
    shared: Arc<Shared<L>>,
}

impl<L> Clone for NodePair<L> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<L> std::fmt::Debug for NodePair<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodePair")
            .field("own", &self.shared.own)
            .field("listen", &self.shared.section.listen)
            .finish_non_exhaustive()
    }
}

/// Locks `m`; a panic elsewhere cannot leave these maps half-changed in a
/// way that matters more than stopping would.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<L: TlsLibrary> NodePair<L> {
    /// Finds this node in the node map by its certificate. Starts nothing
    /// (see [`Self::start`]).
    pub(super) fn new(
        section: NodePairSection,
        loaded: Arc<RwLock<Arc<Loaded<L>>>>,
        accepted: Arc<[CipherSuite]>,
        cert: &std::path::Path,
    ) -> Result<Self, super::SetupError> {
        let current = super::current_of(&loaded);
        let Some(nodes) = &current.nodes else {
            return Err(super::SetupError::NodePair(
                "`keying = \"node-pair\"` needs `[tls] node_map`: it says which node owns a peer's address and where that node is".into(),
            ));
        };
        let names = files::certificate_dns_names(cert)?;
        let own = nodes
            .nodes
            .iter()
            .find(|n| names.contains(&n.name))
            .map(|n| n.name.clone())
            .ok_or_else(|| {
                super::SetupError::NodePair(format!(
                    "the node certificate {} names {names:?}, none of which is a node of the node map",
                    cert.display()
                ))
            })?;
        let suite = *accepted
            .first()
            .ok_or_else(|| super::SetupError::NodePair("no cipher suite is accepted".into()))?;
        let local = Generation::new(suite, &random_secret(suite)?)
            .map_err(|e| super::SetupError::NodePair(e.to_string()))?;
        Ok(Self {
            shared: Arc::new(Shared {
                section,
                metrics: SessionMetrics::default(),
                loaded,
                accepted,
                own,
                peers: Mutex::new(HashMap::new()),
                dialing: Mutex::new(HashSet::new()),
                changed: Notify::new(),
                next_session: AtomicU64::new(1),
                local: Arc::new(local),
            }),
        })
    }

    /// This node's name in the node map.
    pub fn own(&self) -> &str {
        &self.shared.own
    }

    /// Registers `node_pair_generations{peer}` and
    /// `node_pair_sessions_total{peer}`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        let m = &self.shared.metrics;
        registry.register(
            "node_pair_generations",
            "Node-pair session generations held with each peer node (0: no session, so connections with that node fail at their key timeout; 2 while a replacement drains)",
            m.generations.clone(),
        );
        registry.register(
            "node_pair_sessions",
            "Node-pair sessions set up with each peer node (every replacement counts)",
            m.sessions.clone(),
        );
    }

    /// Mirrors what is held with `peer` into the gauge.
    fn count_generations(&self, peer: &str, held: usize) {
        self.shared
            .metrics
            .generations
            .get_or_create(&PeerLabel {
                peer: peer.to_owned(),
            })
            .set(i64::try_from(held).unwrap_or(i64::MAX));
    }

    /// Every peer node this provider has held a session with or tried to
    /// dial, by name: what `tlshubctl status` shows.
    pub fn sessions(&self) -> Vec<PeerSession> {
        let unix = |t: Option<SystemTime>| {
            t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        };
        let peers = lock(&self.shared.peers);
        let mut out: Vec<PeerSession> = peers
            .iter()
            .map(|(name, p)| {
                let (last_error, failed_at) = p.seen.last_error.clone().unzip();
                PeerSession {
                    peer: name.clone(),
                    generations: u32::try_from(p.state.generations()).unwrap_or(u32::MAX),
                    up_since_unix_seconds: unix(p.seen.up_since),
                    renew_at_unix_seconds: unix(p.seen.renew_at),
                    sessions_total: p.seen.total,
                    last_error: last_error.unwrap_or_default(),
                    last_error_unix_seconds: unix(failed_at),
                }
            })
            .collect();
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        out
    }

    /// The ids of the generations held with `peer`, oldest first.
    pub fn generations(&self, peer: &str) -> Vec<keys::GenerationId> {
        lock(&self.shared.peers)
            .get(peer)
            .map(|p| p.state.held())
            .unwrap_or_default()
    }

    /// Binds `listen` and starts accepting sessions, and dials every peer
    /// of the node map this node dials. Must run in a Tokio runtime.
    pub async fn start(&self) -> std::io::Result<()> {
        let listener = TcpListener::bind(self.shared.section.listen).await?;
        info!(
            listen = %listener.local_addr()?,
            node = %self.shared.own,
            "node-pair sessions: listening"
        );
        let this = self.clone();
        tokio::spawn(async move { this.accept_loop(listener).await });
        let peers: Vec<String> = self
            .current()
            .nodes
            .iter()
            .flat_map(|m| m.nodes.iter())
            .map(|n| n.name.clone())
            .collect();
        for peer in peers.iter().filter(|p| **p != self.shared.own) {
            // Known and not connected yet: 0, not absent.
            self.count_generations(peer, 0);
            self.ensure_dialer(peer);
        }
        Ok(())
    }

    fn current(&self) -> Arc<Loaded<L>> {
        super::current_of(&self.shared.loaded)
    }

    /// Whether this node dials `peer` (its name sorts first).
    fn dials(&self, peer: &str) -> bool {
        self.shared.own.as_str() < peer
    }

    fn ensure_dialer(&self, peer: &str) {
        if !self.dials(peer) || !lock(&self.shared.dialing).insert(peer.to_owned()) {
            return;
        }
        let this = self.clone();
        let peer = peer.to_owned();
        tokio::spawn(async move { this.dial_loop(peer).await });
    }

    /// Keeps a session with `peer` up, replacing it every lifetime.
    async fn dial_loop(self, peer: String) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let address = self
                .current()
                .nodes
                .as_ref()
                .and_then(|m| m.nodes.iter().find(|n| n.name == peer))
                .map(|n| n.address);
            let Some(address) = address else {
                info!(%peer, "node-pair sessions: the node left the node map; not dialed any more");
                break;
            };
            let Some(address) = address else {
                warn!(%peer, "node-pair sessions: the node map gives this node no `address`; cannot dial it");
                tokio::time::sleep(MAX_BACKOFF).await;
                continue;
            };
            let target = SocketAddr::new(address, self.shared.section.port);
            debug!(%peer, %target, "node-pair session: dialing");
            let dialed = async {
                let stream = TcpStream::connect(target).await?;
                debug!(%peer, %target, "node-pair session: connected; handshaking");
                self.establish(stream, Some(&peer)).await
            };
            // One bound on the whole attempt, whatever step it hangs in.
            let dialed = tokio::time::timeout(ATTEMPT_TIMEOUT, dialed)
                .await
                .unwrap_or_else(|_| {
                    Err(SessionError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no session within the attempt's time",
                    )))
                });
            match dialed {
                Ok((session, ended)) => {
                    backoff = Duration::from_millis(200);
                    let lifetime = Duration::from_secs(self.shared.section.lifetime_seconds);
                    tokio::select! {
                        () = tokio::time::sleep(lifetime) => {
                            info!(%peer, session, "node-pair session: lifetime over, replacing it");
                            let this = self.clone();
                            let peer = peer.clone();
                            tokio::spawn(async move { this.retire(peer, session).await });
                        }
                        () = ended.notified() => {}
                    }
                }
                Err(e) => {
                    warn!(%peer, %target, error = %e, "node-pair session: cannot set up; retrying");
                    lock(&self.shared.peers)
                        .entry(peer.clone())
                        .or_default()
                        .seen
                        .last_error = Some((e.to_string(), SystemTime::now()));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        lock(&self.shared.dialing).remove(&peer);
    }

    /// Ends a replaced session once its replacement is usable and the
    /// drain time has passed. Until a replacement is usable (the dialer
    /// keeps trying), the old session keeps keying: a failed replacement
    /// must not leave the pair with no session at all.
    async fn retire(self, peer: String, session: SessionId) {
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (newer, still_held) = {
                let peers = lock(&self.shared.peers);
                let p = peers.get(&peer);
                (
                    p.and_then(|p| p.state.for_client())
                        .is_some_and(|(s, _)| s != session),
                    p.is_some_and(|p| p.state.is_usable(session)),
                )
            };
            if !still_held {
                // It ended by itself meanwhile.
                return;
            }
            if newer {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
        }
        tokio::time::sleep(Duration::from_secs(self.shared.section.drain_seconds)).await;
        self.end_session(&peer, session).await;
        info!(%peer, session, "node-pair session: replaced one closed");
    }

    async fn end_session(&self, peer: &str, session: SessionId) {
        let writer = {
            let mut peers = lock(&self.shared.peers);
            let p = peers.entry(peer.to_owned()).or_default();
            p.state.remove(session);
            self.count_generations(peer, p.state.generations());
            p.writers.remove(&session)
        };
        self.shared.changed.notify_waiters();
        if let Some(w) = writer {
            let _ = w.lock().await.half.shutdown().await;
        }
    }

    async fn accept_loop(self, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, from)) => {
                    let this = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = this.establish(stream, None).await {
                            warn!(%from, error = %e, "node-pair session: refused");
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "node-pair sessions: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Runs the TLS handshake on `stream` (as its client when dialing
    /// `dialed`), checks the peer's certificate against the node map,
    /// registers the session and starts reading its messages. Returns the
    /// session and what is notified when it ends.
    async fn establish(
        &self,
        stream: TcpStream,
        dialed: Option<&str>,
    ) -> Result<(SessionId, Arc<Notify>), SessionError> {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(5))
            .with_interval(Duration::from_secs(2))
            .with_retries(3);
        socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
        stream.set_nodelay(true)?;
        let fd = OwnedFd::from(stream.into_std()?);
        let loaded = self.current();
        let library = Arc::clone(&loaded.library);
        let role = if dialed.is_some() {
            Role::Client
        } else {
            Role::Server
        };
        let (fd, negotiated, secrets) = tokio::task::spawn_blocking(move || {
            let secrets = Arc::new(Mutex::new(TrafficSecrets::default()));
            let mut io = SocketIo::new(fd, Instant::now() + HANDSHAKE_TIMEOUT);
            let result = library.handshake(role, &mut io, &secrets);
            (io.into_fd(), result, secrets)
        })
        .await
        .map_err(|e| SessionError::Handshake(format!("handshake thread: {e}")))?;
        let negotiated = negotiated.map_err(|f| {
            SessionError::Handshake(match f {
                HandshakeFailure::Session(r) | HandshakeFailure::Failed(r) => r,
                HandshakeFailure::TimedOut => "timed out".into(),
                HandshakeFailure::PeerRejected(r) => format!("peer certificate refused: {r}"),
            })
        })?;
        let suite = super::checked_suite(&negotiated, &self.shared.accepted)
            .map_err(SessionError::Handshake)?;
        let names = negotiated.peer_dns_names.as_deref().unwrap_or_default();
        let peer = match dialed {
            Some(expected) => {
                if !names.iter().any(|n| n == expected) {
                    return Err(SessionError::Peer(format!(
                        "dialed node {expected}, but its certificate names {names:?}"
                    )));
                }
                expected.to_owned()
            }
            None => {
                let known = loaded
                    .nodes
                    .as_ref()
                    .and_then(|m| m.nodes.iter().find(|n| names.contains(&n.name)))
                    .map(|n| n.name.clone())
                    .ok_or_else(|| {
                        SessionError::Peer(format!(
                            "its certificate names {names:?}, no node of the node map"
                        ))
                    })?;
                if known == self.shared.own || self.dials(&known) {
                    return Err(SessionError::Peer(format!(
                        "node {known} dialed, but this node ({}) is the one that dials it",
                        self.shared.own
                    )));
                }
                known
            }
        };
        let generation = {
            let s = lock(&secrets);
            let secret = s.exporter_secret().ok_or_else(|| {
                SessionError::Handshake("the TLS library did not export the exporter secret".into())
            })?;
            Arc::new(
                Generation::new(suite, secret)
                    .map_err(|e| SessionError::Handshake(e.to_string()))?,
            )
        };
        let dialer = dialed.is_some();
        let send_key = generation
            .message_key(dialer)
            .map_err(|e| SessionError::Handshake(e.to_string()))?;
        let receive_key = generation
            .message_key(!dialer)
            .map_err(|e| SessionError::Handshake(e.to_string()))?;
        let stream = TcpStream::from_std(std::net::TcpStream::from(fd))?;
        let (read, write) = stream.into_split();
        let writer = Arc::new(tokio::sync::Mutex::new(Writer {
            half: write,
            sealer: Sealer::new(send_key),
        }));
        let session = self.shared.next_session.fetch_add(1, Ordering::Relaxed);
        {
            let mut peers = lock(&self.shared.peers);
            let p = peers.entry(peer.clone()).or_default();
            p.state.add(session, Arc::clone(&generation));
            p.writers.insert(session, Arc::clone(&writer));
            let now = SystemTime::now();
            p.seen = PeerSeen {
                up_since: Some(now),
                renew_at: dialer
                    .then(|| now + Duration::from_secs(self.shared.section.lifetime_seconds)),
                total: p.seen.total + 1,
                last_error: None,
            };
            self.count_generations(&peer, p.state.generations());
        }
        self.shared
            .metrics
            .sessions
            .get_or_create(&PeerLabel { peer: peer.clone() })
            .inc();
        self.shared.changed.notify_waiters();
        // The dialer's Ready, only now that it holds the generation: the
        // acceptor then keys connecting sides from it, and answers with its
        // own Ready (see `state`).
        if dialer {
            let ready = Message::Ready {
                generation: generation.id(),
            };
            if let Err(e) = writer.lock().await.send(&ready).await {
                self.end_session(&peer, session).await;
                return Err(e.into());
            }
        }
        info!(
            %peer,
            session,
            generation = %hex::encode(generation.id()),
            suite = %negotiated.suite,
            dialer,
            "node-pair session: up"
        );
        let ended = Arc::new(Notify::new());
        let this = self.clone();
        let notify_end = Arc::clone(&ended);
        tokio::spawn(async move {
            let answer = (!dialer).then_some(writer);
            let why = this
                .read_loop(read, &peer, session, Opener::new(receive_key), answer)
                .await;
            info!(%peer, session, reason = %why, "node-pair session: ended");
            this.end_session(&peer, session).await;
            notify_end.notify_one();
        });
        Ok((session, ended))
    }

    /// Reads the session's messages until it ends; returns why it ended.
    /// An acceptor answers the dialer's `Ready` with its own on `answer`.
    async fn read_loop(
        &self,
        mut read: tokio::net::tcp::OwnedReadHalf,
        peer: &str,
        session: SessionId,
        mut opener: Opener,
        answer: Option<Arc<tokio::sync::Mutex<Writer>>>,
    ) -> String {
        let mut body = [0u8; wire::MAX_BODY];
        loop {
            let mut len = [0u8; 2];
            if let Err(e) = read.read_exact(&mut len).await {
                return format!("read: {e}");
            }
            let len = usize::from(u16::from_be_bytes(len));
            if let Err(e) = Opener::acceptable_length(len) {
                return e.to_string();
            }
            if let Err(e) = read.read_exact(&mut body[..len]).await {
                return format!("read: {e}");
            }
            let message = match opener.open(&body[..len]) {
                Ok(m) => m,
                Err(e) => return e.to_string(),
            };
            let ready = {
                let mut peers = lock(&self.shared.peers);
                let p = peers.entry(peer.to_owned()).or_default();
                match message {
                    Message::Ready { generation } => {
                        if !p.state.ready(session, generation) {
                            return "a Ready that is not this session's".into();
                        }
                        Some(generation)
                    }
                    Message::Notice {
                        generation,
                        identity,
                    } => {
                        if !p.state.note(identity, generation, Instant::now()) {
                            debug!(%peer, "node-pair notice dropped: too many waiting");
                        }
                        None
                    }
                }
            };
            self.shared.changed.notify_waiters();
            if let (Some(generation), Some(writer)) = (ready, &answer)
                && let Err(e) = writer
                    .lock()
                    .await
                    .send(&Message::Ready { generation })
                    .await
            {
                return format!("write: {e}");
            }
        }
    }

    /// The keys of `request`'s connection, from the session with the node
    /// that owns the remote address.
    pub async fn keys(&self, request: KeyRequest) -> Result<ConnectionKeys, ProviderError> {
        let deadline = tokio::time::Instant::now() + request.timeout.max(Duration::from_millis(10));
        let identity = ConnectionId::of(&request);
        let encoded = identity.context();
        let remote = request.remote.ip();
        let peer = self
            .current()
            .nodes
            .as_ref()
            .and_then(|m| m.node_of(remote))
            .map(str::to_owned)
            .ok_or_else(|| ProviderError::PeerAuthentication {
                reason: format!("{remote} is in no node's pod_cidrs of the node map"),
            })?;
        let derive = |g: &Generation| {
            g.connection_keys(&identity, request.role)
                .map_err(|e| ProviderError::Internal {
                    reason: e.to_string(),
                })
        };
        if peer == self.shared.own {
            return derive(&self.shared.local);
        }
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let decided = {
                let mut peers = lock(&self.shared.peers);
                let p = peers.entry(peer.clone()).or_default();
                match request.role {
                    Role::Client => p.state.for_client().map(|(session, g)| {
                        let writer = p.writers.get(&session).map(Arc::clone);
                        (g, writer)
                    }),
                    Role::Server => match p.state.for_server(&encoded) {
                        ServerChoice::Use(g) => Some((g, None)),
                        ServerChoice::Wait => None,
                        ServerChoice::Unknown(id) => {
                            return Err(ProviderError::Handshake {
                                reason: format!(
                                    "node {peer} keyed this connection from node-pair generation {}, which this node does not hold (it holds {:?})",
                                    hex::encode(id),
                                    p.state.held().iter().map(hex::encode).collect::<Vec<_>>()
                                ),
                            });
                        }
                    },
                }
            };
            if let Some((generation, writer)) = decided {
                let keys = derive(&generation)?;
                if let Some(writer) = writer {
                    let notice = Message::Notice {
                        generation: generation.id(),
                        identity: encoded,
                    };
                    let sent = tokio::time::timeout(NOTICE_WRITE_TIMEOUT, async {
                        writer.lock().await.send(&notice).await
                    })
                    .await;
                    // The accepting side keys only from the notice: without
                    // it, this connection cannot be keyed there, so it
                    // fails here now rather than at the peer's timeout.
                    match sent {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            return Err(ProviderError::Unavailable {
                                reason: format!(
                                    "cannot tell node {peer} which node-pair session keyed this connection: {e}"
                                ),
                            });
                        }
                        Err(_) => {
                            return Err(ProviderError::Unavailable {
                                reason: format!(
                                    "cannot tell node {peer} which node-pair session keyed this connection: the session did not take the notice within {} ms",
                                    NOTICE_WRITE_TIMEOUT.as_millis()
                                ),
                            });
                        }
                    }
                }
                return Ok(keys);
            }
            // A peer with no session yet may be one added to the node map
            // since start: its dialer starts now (a no-op once it runs).
            self.ensure_dialer(&peer);
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let held = lock(&self.shared.peers)
                    .get(&peer)
                    .map_or(0, |p| p.state.generations());
                return Err(ProviderError::Timeout {
                    waiting_for: if held == 0 {
                        format!("a node-pair session with node {peer}")
                    } else {
                        format!(
                            "node {peer}'s notice of which node-pair session keyed this connection"
                        )
                    },
                    millis: u64::try_from(request.timeout.as_millis()).unwrap_or(u64::MAX),
                });
            }
        }
    }
}

/// A fresh secret one hash long, from the kernel's random source.
fn random_secret(suite: CipherSuite) -> Result<zeroize::Zeroizing<Vec<u8>>, super::SetupError> {
    use std::io::Read;
    let mut secret =
        zeroize::Zeroizing::new(vec![0u8; crate::tls13::Hash::of_suite(suite).output_len()]);
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut secret))
        .map_err(|e| super::SetupError::NodePair(format!("read /dev/urandom: {e}")))?;
    Ok(secret)
}
