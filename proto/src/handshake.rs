//! The provider that runs a TLS 1.3 handshake over the application's own
//! connection, written once for every TLS library.
//!
//! [`HandshakeProvider`] owns what does not depend on the library: taking
//! the socket, the deadline (a little less than the core's key timeout, so
//! that the answer reaches the core with the reason), the key-log secret
//! capture, the "nothing buffered past the handshake" check, the accepted
//! cipher suites, the mapping to [`ProviderError`] and the name of the
//! peer's kind of provider when the two nodes do not match. A library
//! ([`TlsLibrary`]) only builds its context from `[tls]` and runs one
//! handshake. `tlshub-provider-openssl` and `tlshub-provider-boringssl` are
//! this driver over OpenSSL and BoringSSL; they stay separate binaries
//! because the two libraries export the same C symbols.

pub mod files;
#[cfg(feature = "test-support")]
pub mod library_tests;
pub mod node_pair;

use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tracing::{error, info, warn};

use crate::admission::{Admission, AdmissionMetrics, Finished, NoSlot};
use crate::handshake_config::TlsSection;
use crate::socket::{SocketIo, describe_peer_start, take_fd};
use crate::tls13::{TrafficSecrets, suite_by_name};
use crate::{
    CipherSuite, ConnectionKeys, Credential, KeyRequest, Provider, ProviderError, ProviderInfo,
    Role, TlsVersion,
};
use files::{FilesStamp, certificate_credential};

/// One TLS library under [`HandshakeProvider`].
pub trait TlsLibrary: Send + Sync + Sized + 'static {
    /// The provider's name in [`ProviderInfo`] (`openssl`, `boringssl`).
    const NAME: &'static str;

    /// Whether the library lets the configuration choose TLS 1.3 cipher
    /// suites. When it does not (BoringSSL), the driver refuses a
    /// handshake that ends on a suite outside `cipher_suites` after the
    /// fact.
    const SELECTS_TLS13_SUITES: bool;

    /// The library's version, for [`ProviderInfo`].
    fn version() -> String;

    /// Builds the library's context from `[tls]`: TLS 1.3 only, the
    /// configured suites (where the library can) and groups, the node's
    /// certificate and key, the peer's certificate required and verified
    /// against the cluster CA, and no session tickets (a ticket arriving
    /// after kTLS is installed would land in the application's first read).
    /// The suite names are already checked.
    fn new(tls: &TlsSection) -> Result<Self, SetupError>;

    /// Runs one handshake as `role` over `io`, handing every key-log line
    /// (NSS format) to `secrets`.
    fn handshake(
        &self,
        role: Role,
        io: &mut SocketIo,
        secrets: &Arc<Mutex<TrafficSecrets>>,
    ) -> Result<Negotiated, HandshakeFailure>;
}

/// What a finished handshake negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The cipher suite's IANA name (`TLS_AES_128_GCM_SHA256`).
    pub suite: String,
    /// Bytes the library read past the handshake and holds: they belong to
    /// the application's first records, so anything but 0 fails.
    pub buffered: usize,
    /// The DNS names (subjectAltName) of the peer's verified certificate,
    /// read from the library's own parse of it, not parsed again (why:
    /// ARCHITECTURE.md, "Where an in-band handshake's CPU goes"); `None`:
    /// the peer sent no certificate.
    pub peer_dns_names: Option<Vec<String>>,
}

/// Why a library's handshake failed, in the terms the driver maps to
/// [`ProviderError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The library could not start a session (not the peer's doing).
    Session(String),
    /// The I/O deadline passed while waiting for the peer.
    TimedOut,
    /// The peer's certificate arrived and failed verification.
    PeerRejected(String),
    /// Any other failure, in the library's words.
    Failed(String),
}

/// Why the TLS context could not be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The library refused a setting or file.
    #[error("cannot {action}: {source}")]
    Library {
        /// What was being configured.
        action: String,
        /// The library's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A configured suite that kTLS cannot install.
    #[error(
        "cipher suite {suite} cannot be used with kTLS (use TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384 or TLS_CHACHA20_POLY1305_SHA256)"
    )]
    UnsupportedSuite {
        /// The configured name.
        suite: String,
    },
    /// The node certificate's expiry could not be read.
    #[error(transparent)]
    Certificate(#[from] files::CertificateError),
    /// The node map does not load.
    #[error(transparent)]
    NodeMap(#[from] crate::runtime::ConfigError),
    /// Node-pair keying cannot start with this configuration.
    #[error("node-pair keying: {0}")]
    NodePair(String),
}

/// Maps a library call's error to [`SetupError::Library`], naming `action`.
pub fn setup<T, E>(action: impl Into<String>, r: Result<T, E>) -> Result<T, SetupError>
where
    E: std::error::Error + Send + Sync + 'static,
{
    r.map_err(|e| SetupError::Library {
        action: action.into(),
        source: Box::new(e),
    })
}

/// The library context built from one version of the files, with what
/// was read from them.
struct Loaded<L> {
    library: Arc<L>,
    credential: Credential,
    /// `[tls] node_map`, when set.
    nodes: Option<crate::node_map::NodeMap>,
    /// The files as they were just before they were read.
    files: FilesStamp,
}

impl<L: TlsLibrary> Loaded<L> {
    /// Reads the files of `tls` and builds the context.
    fn load(tls: &TlsSection) -> Result<Self, SetupError> {
        let files = FilesStamp::of(tls);
        let library = Arc::new(L::new(tls)?);
        let credential = certificate_credential(&tls.cert)?;
        let nodes = tls
            .node_map
            .as_deref()
            .map(crate::node_map::NodeMap::load)
            .transpose()?;
        Ok(Self {
            library,
            credential,
            nodes,
            files,
        })
    }
}

pub use crate::server::Reload;

/// A [`Provider`] that handshakes over the application's connection with
/// the TLS library `L`.
pub struct HandshakeProvider<L> {
    /// The context new handshakes use; one under way keeps its own `Arc`.
    loaded: Arc<RwLock<Arc<Loaded<L>>>>,
    accepted: Arc<[CipherSuite]>,
    tls: Arc<TlsSection>,
    /// The files that were refused last (not reported again).
    refused: Arc<Mutex<Option<FilesStamp>>>,
    /// When the expiry warning was last logged.
    warned: Arc<Mutex<Option<Instant>>>,
    /// Set in node-pair mode (`[tls] keying = "node-pair"`).
    node_pair: Option<node_pair::NodePair<L>>,
    /// The slots of in-band connecting sides (see [`crate::admission`]).
    admission: Admission,
}

/// The admission of in-band connecting sides: from one per CPU up to
/// `handshakes_in_flight` ([`MOST_IN_FLIGHT_PER_CPU`] per CPU when unset).
fn connecting_admission(most: Option<NonZeroUsize>) -> Admission {
    let cpus = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
    let most = most.unwrap_or_else(|| cpus.saturating_mul(MOST_IN_FLIGHT_PER_CPU));
    Admission::new(cpus, most, AdmissionMetrics::default())
}

/// The most in-band handshakes in flight per CPU when
/// `handshakes_in_flight` is unset; the limit adapts below it (see
/// [`crate::admission`]).
const MOST_IN_FLIGHT_PER_CPU: NonZeroUsize = NonZeroUsize::new(16).expect("16 is not 0");

impl<L> Clone for HandshakeProvider<L> {
    fn clone(&self) -> Self {
        Self {
            loaded: Arc::clone(&self.loaded),
            accepted: Arc::clone(&self.accepted),
            tls: Arc::clone(&self.tls),
            refused: Arc::clone(&self.refused),
            warned: Arc::clone(&self.warned),
            node_pair: self.node_pair.clone(),
            admission: self.admission.clone(),
        }
    }
}

impl<L: TlsLibrary> std::fmt::Debug for HandshakeProvider<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandshakeProvider")
            .field("library", &L::NAME)
            .field("accepted", &self.accepted)
            .finish()
    }
}

/// How often the expiry warning is repeated while it applies.
const EXPIRY_WARNING_EVERY: Duration = Duration::from_secs(3600);

impl<L: TlsLibrary> HandshakeProvider<L> {
    /// Checks `[tls]`'s suites and builds the library's context, for
    /// in-band keying.
    pub fn new(tls: &TlsSection) -> Result<Self, SetupError> {
        Self::with_keying(tls, None)
    }

    /// Like [`Self::new`], in node-pair mode when `node_pair` is given
    /// (then [`Self::start`] must run before the first request).
    pub fn with_keying(
        tls: &TlsSection,
        node_pair: Option<node_pair::NodePairSection>,
    ) -> Result<Self, SetupError> {
        let accepted = tls
            .cipher_suites
            .iter()
            .map(|s| {
                suite_by_name(s).ok_or_else(|| SetupError::UnsupportedSuite { suite: s.clone() })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let loaded = Arc::new(RwLock::new(Arc::new(Loaded::load(tls)?)));
        let accepted: Arc<[CipherSuite]> = accepted.into();
        let node_pair = node_pair
            .map(|section| {
                node_pair::NodePair::new(
                    section,
                    Arc::clone(&loaded),
                    Arc::clone(&accepted),
                    &tls.cert,
                )
            })
            .transpose()?;
        let this = Self {
            loaded,
            accepted,
            tls: Arc::new(tls.clone()),
            refused: Arc::new(Mutex::new(None)),
            warned: Arc::new(Mutex::new(None)),
            node_pair,
            admission: connecting_admission(tls.handshakes_in_flight),
        };
        this.warn_if_expiring();
        Ok(this)
    }

    /// The node-pair sessions, in node-pair mode.
    pub fn node_pair(&self) -> Option<&node_pair::NodePair<L>> {
        self.node_pair.as_ref()
    }

    /// In node-pair mode, binds the session port and starts the sessions
    /// (in the current Tokio runtime); nothing otherwise.
    pub async fn start(&self) -> std::io::Result<()> {
        match &self.node_pair {
            Some(n) => n.start().await,
            None => Ok(()),
        }
    }

    /// The context new handshakes use now.
    fn current(&self) -> Arc<Loaded<L>> {
        current_of(&self.loaded)
    }

    /// The node certificate in use now.
    pub fn credential(&self) -> Credential {
        self.current().credential.clone()
    }

    /// Re-reads the CA, certificate and key if a file changed since they
    /// were loaded, or in any case when `forced` (`SIGHUP`). New handshakes
    /// use the new files; one under way finishes with the old ones. Files
    /// that do not load leave the old ones in use. Logs what it did, and
    /// the expiry warning when it is due.
    pub fn reload(&self, forced: bool) -> Reload {
        let now = FilesStamp::of(&self.tls);
        let outcome = if !forced && now == self.current().files {
            Reload::Unchanged
        } else if !forced && self.refused.lock().is_ok_and(|r| r.as_ref() == Some(&now)) {
            Reload::StillRefused
        } else {
            match Loaded::<L>::load(&self.tls) {
                Ok(new) => {
                    info!(
                        cert = %self.tls.cert.display(),
                        not_after = new.credential.not_after_unix_seconds,
                        forced,
                        "TLS files reloaded: new handshakes use them"
                    );
                    let new = Arc::new(new);
                    match self.loaded.write() {
                        Ok(mut l) => *l = new,
                        Err(poisoned) => *poisoned.into_inner() = new,
                    }
                    if let Ok(mut r) = self.refused.lock() {
                        *r = None;
                    }
                    Reload::Reloaded
                }
                Err(e) => {
                    error!(
                        error = %e,
                        cert = %self.tls.cert.display(),
                        "new TLS files refused: handshakes keep using the ones loaded before"
                    );
                    if let Ok(mut r) = self.refused.lock() {
                        *r = Some(now);
                    }
                    Reload::Refused(e.to_string())
                }
            }
        };
        self.warn_if_expiring();
        outcome
    }

    /// Logs a warning if the certificate in use expires within
    /// `expiry_warning_days`, at most every [`EXPIRY_WARNING_EVERY`] (and
    /// after every reload).
    fn warn_if_expiring(&self) {
        let c = self.credential();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let left = c.not_after_unix_seconds.saturating_sub(now);
        if left > i64::from(self.tls.expiry_warning_days) * 86_400 {
            return;
        }
        let Ok(mut warned) = self.warned.lock() else {
            return;
        };
        if warned.is_some_and(|w| w.elapsed() < EXPIRY_WARNING_EVERY) {
            return;
        }
        *warned = Some(Instant::now());
        if left <= 0 {
            error!(credential = %c.name, not_after = c.not_after_unix_seconds, "the node certificate has EXPIRED: peers refuse this node's handshakes");
        } else {
            warn!(credential = %c.name, not_after = c.not_after_unix_seconds, days_left = left / 86_400, "the node certificate expires soon: replace the file (it is reloaded by itself)");
        }
    }

    /// Runs the handshake for `request` (blocking: it polls the socket).
    pub fn handshake(&self, request: &KeyRequest) -> Result<ConnectionKeys, ProviderError> {
        let fd = Self::socket_of(request)?;
        let budget = Self::budget_of(request);
        self.handshake_over(request, &mut SocketIo::new(fd, Instant::now() + budget))
    }

    /// The application's socket, taken from its process.
    fn socket_of(request: &KeyRequest) -> Result<OwnedFd, ProviderError> {
        let handle = request
            .socket
            .ok_or_else(|| ProviderError::InvalidRequest {
                reason: "this provider handshakes over the connection and needs `socket`".into(),
            })?;
        take_fd(handle.pid, handle.fd).map_err(|source| ProviderError::Socket {
            pid: handle.pid,
            fd: handle.fd,
            source,
        })
    }

    /// The whole request timeout: the core already kept a margin for the
    /// answer to reach it (it waits a tenth longer, at least 200 ms), so
    /// that it logs this provider's reason rather than its own deadline.
    fn budget_of(request: &KeyRequest) -> Duration {
        request.timeout.max(Duration::from_millis(10))
    }

    /// The handshake of `request` over `io`.
    fn handshake_over(
        &self,
        request: &KeyRequest,
        io: &mut SocketIo,
    ) -> Result<ConnectionKeys, ProviderError> {
        let budget = Self::budget_of(request);
        let millis = u64::try_from(budget.as_millis()).unwrap_or(u64::MAX);
        let secrets = Arc::new(Mutex::new(TrafficSecrets::default()));
        let loaded = self.current();
        let negotiated = loaded
            .library
            .handshake(request.role, io, &secrets)
            .map_err(|failure| {
                // Names the peer's kind of provider when the two do not match.
                let peer = io.peer_start();
                match failure {
                    HandshakeFailure::Session(reason) => ProviderError::Internal {
                        reason: format!("create session: {reason}"),
                    },
                    HandshakeFailure::TimedOut => ProviderError::Timeout {
                        waiting_for: format!("the peer's handshake messages ({peer})"),
                        millis,
                    },
                    HandshakeFailure::PeerRejected(reason) => {
                        ProviderError::PeerAuthentication { reason }
                    }
                    HandshakeFailure::Failed(reason) => ProviderError::Handshake {
                        reason: format!("{reason}; {peer}"),
                    },
                }
            })?;
        if let Some(nodes) = &loaded.nodes {
            peer_is_its_node(nodes, request.remote.ip(), &negotiated)?;
        }
        self.keys_of(request.role, &negotiated, &secrets)
    }

    /// The connection's keys from a finished handshake, after the checks
    /// that do not depend on the library.
    fn keys_of(
        &self,
        role: Role,
        negotiated: &Negotiated,
        secrets: &Mutex<TrafficSecrets>,
    ) -> Result<ConnectionKeys, ProviderError> {
        let suite = checked_suite(negotiated, &self.accepted)
            .map_err(|reason| ProviderError::Handshake { reason })?;
        let secrets = secrets.lock().map_err(|_| ProviderError::Internal {
            reason: "secret lock poisoned".into(),
        })?;
        secrets.connection_keys(role, suite)
    }
}

/// The context in `loaded` now (in-band handshakes and node-pair sessions
/// alike).
fn current_of<L>(loaded: &RwLock<Arc<Loaded<L>>>) -> Arc<Loaded<L>> {
    match loaded.read() {
        Ok(l) => Arc::clone(&l),
        // A panic while swapping cannot leave a half-written Arc.
        Err(poisoned) => Arc::clone(&poisoned.into_inner()),
    }
}

/// The kTLS suite a finished handshake may be installed with, or why not:
/// nothing buffered past the handshake (those bytes belong to the
/// application's records, or to the session's messages), and a suite kTLS
/// takes and `cipher_suites` accepts.
fn checked_suite(negotiated: &Negotiated, accepted: &[CipherSuite]) -> Result<CipherSuite, String> {
    if negotiated.buffered != 0 {
        return Err(format!(
            "{} bytes read past the handshake",
            negotiated.buffered
        ));
    }
    let name = &negotiated.suite;
    let suite =
        suite_by_name(name).ok_or_else(|| format!("negotiated {name}, which kTLS cannot take"))?;
    if !accepted.contains(&suite) {
        return Err(format!(
            "negotiated {name}, which `cipher_suites` does not accept"
        ));
    }
    Ok(suite)
}

/// Whether the peer's certificate names the node whose pods include
/// `remote` (`[tls] node_map`): a node with a valid certificate must not
/// stand in for another. A refusal is logged with both names.
fn peer_is_its_node(
    nodes: &crate::node_map::NodeMap,
    remote: std::net::IpAddr,
    negotiated: &Negotiated,
) -> Result<(), ProviderError> {
    let refuse = |reason: String| {
        error!(peer = %remote, %reason, "peer refused: its certificate is not its node's");
        Err(ProviderError::PeerAuthentication { reason })
    };
    let Some(expected) = nodes.node_of(remote) else {
        return refuse(format!(
            "{remote} is in no node's pod_cidrs of the node map"
        ));
    };
    let Some(names) = &negotiated.peer_dns_names else {
        return refuse("the peer sent no certificate".into());
    };
    if names.iter().any(|n| n == expected) {
        return Ok(());
    }
    refuse(format!(
        "the peer's certificate names {names:?}, but {remote} belongs to node {expected}"
    ))
}

impl<L: TlsLibrary> Provider for HandshakeProvider<L> {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            name: L::NAME.into(),
            version: format!("{} ({})", env!("CARGO_PKG_VERSION"), L::version()),
            tls_versions: vec![TlsVersion::Tls13],
            cipher_suites: self.accepted.to_vec(),
            needs_socket: self.node_pair.is_none(),
            keying: if self.node_pair.is_some() {
                crate::KEYING_TLS13_NODE_PAIR.into()
            } else {
                crate::KEYING_TLS13_HANDSHAKE.into()
            },
            credentials: vec![self.credential()],
            peer_sessions: self
                .node_pair
                .as_ref()
                .map(node_pair::NodePair::sessions)
                .unwrap_or_default(),
        }
    }

    async fn reload(&self, forced: bool) -> Reload {
        // Reading files and building a context blocks.
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.reload(forced))
            .await
            .unwrap_or_else(|e| Reload::Refused(format!("reload thread: {e}")))
    }

    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        if let Some(n) = &self.node_pair {
            n.register_metrics(registry);
            return;
        }
        let m = self.admission.metrics();
        registry.register(
            "handshake_slot_waiting",
            "In-band connecting sides waiting for a handshake slot",
            m.waiting.clone(),
        );
        registry.register(
            "handshake_slot_in_flight",
            "In-band ClientHellos sent and not yet answered",
            m.in_flight.clone(),
        );
        registry.register(
            "handshake_slot_limit",
            "In-band ClientHellos allowed in flight now: from one per CPU up to `handshakes_in_flight`, more while handshakes finish within an eighth of the key timeout",
            m.limit.clone(),
        );
        registry.register(
            "handshake_slot_stalls",
            "In-band connecting sides that gave their slot back because the peer had not answered within the stall threshold (a quarter of the time left when the slot came)",
            m.stalled.clone(),
        );
        registry.register(
            "handshake_slot_timeouts",
            "In-band connecting sides that failed waiting for a handshake slot: at their key timeout, or refused one with less time left than a peer takes to answer",
            m.timed_out.clone(),
        );
    }

    async fn keys(&self, request: KeyRequest) -> Result<ConnectionKeys, ProviderError> {
        if let Some(n) = &self.node_pair {
            return n.keys(request).await;
        }
        let budget = Self::budget_of(&request);
        let deadline = Instant::now() + budget;
        let fd = Self::socket_of(&request)?;
        let millis = u64::try_from(budget.as_millis()).unwrap_or(u64::MAX);
        // The accepting side's work starts with the peer's ClientHello:
        // until it arrives it waits here, as a future, holding neither a
        // slot nor a thread.
        let fd = match request.role {
            Role::Client => fd,
            Role::Server => first_bytes(fd, deadline).await.map_err(|e| match e {
                FirstBytes::TimedOut => ProviderError::Timeout {
                    waiting_for: format!(
                        "the peer's handshake messages ({})",
                        describe_peer_start(&[])
                    ),
                    millis,
                },
                // Not the peer's doing: the reactor refused the socket.
                FirstBytes::Io(source) => ProviderError::Internal {
                    reason: format!("watch the socket for the peer's ClientHello: {source}"),
                },
            })?,
        };
        // Only the connecting side waits for a slot, which it holds until
        // the peer answers its ClientHello: the slots bound the work this
        // node asks of its peers at once. An accepting side works as soon
        // as the ClientHello is there: it was admitted on the other node,
        // and making it wait again only spent that connection's time
        // (measured: ARCHITECTURE.md, "Admission of in-band handshakes").
        let slot = match request.role {
            Role::Client => Some(
                self.admission
                    .acquire(deadline)
                    .await
                    .map_err(|e| no_slot(e, millis))?,
            ),
            Role::Server => None,
        };
        // The handshake blocks (poll on the socket); keep it off the runtime.
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut io = SocketIo::new(fd, deadline);
            let admitted = slot.map(|slot| {
                let admitted = slot.since();
                io.hold(slot);
                admitted
            });
            let keys = this.handshake_over(&request, &mut io);
            if let Some(admitted) = admitted {
                // The limit learns from the whole handshake, this node's
                // work on the answer included, not only the peer's.
                this.admission.finished(
                    admitted.elapsed(),
                    budget,
                    match &keys {
                        Ok(_) => Finished::Succeeded,
                        Err(ProviderError::Timeout { .. }) => Finished::TimedOut,
                        Err(_) => Finished::Failed,
                    },
                );
            }
            keys
        })
        .await
        .map_err(|e| ProviderError::Internal {
            reason: format!("handshake thread: {e}"),
        })?
    }
}

/// The error of a request that found no admission slot in time.
fn no_slot(e: NoSlot, millis: u64) -> ProviderError {
    ProviderError::Timeout {
        waiting_for: format!("a handshake slot: {e}"),
        millis,
    }
}

/// Why [`first_bytes`] ended without bytes to read.
#[derive(Debug)]
enum FirstBytes {
    /// The deadline passed.
    TimedOut,
    /// The socket could not be watched.
    Io(std::io::Error),
}

/// Waits until `fd` has something to read (bytes, the peer's FIN or a
/// reset) or `deadline` passes, in the runtime's reactor; gives the socket
/// back.
async fn first_bytes(fd: OwnedFd, deadline: Instant) -> Result<OwnedFd, FirstBytes> {
    use tokio::io::Interest;
    use tokio::io::unix::AsyncFd;
    #[expect(
        deprecated,
        reason = "an OwnedFd owns its fd for its whole life, which is the contract the unsafe AsyncFd::register_with_interest would state"
    )]
    let watched = AsyncFd::with_interest(fd, Interest::READABLE).map_err(FirstBytes::Io)?;
    let ready =
        tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), watched.readable()).await;
    match ready {
        Ok(Ok(_)) => Ok(watched.into_inner()),
        Ok(Err(e)) => Err(FirstBytes::Io(e)),
        Err(_) => Err(FirstBytes::TimedOut),
    }
}

/// Defines `$library`, a [`TlsLibrary`] over a crate of the OpenSSL API
/// family (the `openssl` crate, or its fork `boring`, given as `$ssl`),
/// whose context setup and handshake are the same calls in both:
/// - the context: TLS 1.3 only, the cluster CA, the node's certificate
///   chain and key (checked to match), the peer's certificate required,
///   no session tickets and no session cache, and a key-log callback that
///   hands each line to the session's [`TrafficSecrets`](crate::tls13::TrafficSecrets);
/// - one handshake, with the negotiated suite and the bytes held past it;
/// - its failures: the I/O deadline, a refused peer certificate, or the
///   library's error text.
///
/// What differs is passed in: `configure`, a
/// `fn(&mut $ssl::ssl::SslContextBuilder, &TlsSection) -> Result<(), SetupError>`
/// that sets the suites, groups and ticket count as the library can, and
/// `rejected`, a `fn(&$ssl::ssl::SslRef) -> Option<String>` that says
/// why the peer's certificate was refused, if it was received and refused.
#[macro_export]
macro_rules! openssl_family_library {
    (
        $(#[$meta:meta])*
        $library:ident over $ssl:ident {
            name: $name:literal,
            selects_tls13_suites: $selects:literal,
            configure: $configure:path,
            rejected: $rejected:path $(,)?
        }
    ) => {
        $(#[$meta])*
        pub struct $library {
            context: $ssl::ssl::SslContext,
            secrets_index: $ssl::ex_data::Index<
                $ssl::ssl::Ssl,
                ::std::sync::Arc<::std::sync::Mutex<$crate::tls13::TrafficSecrets>>,
            >,
        }

        impl $crate::handshake::TlsLibrary for $library {
            const NAME: &'static str = $name;
            const SELECTS_TLS13_SUITES: bool = $selects;

            fn version() -> String {
                $ssl::version::version().into()
            }

            fn new(
                tls: &$crate::handshake_config::TlsSection,
            ) -> Result<Self, $crate::handshake::SetupError> {
                use $crate::handshake::setup;
                use $ssl::ssl::{
                    Ssl, SslContextBuilder, SslFiletype, SslMethod, SslOptions,
                    SslSessionCacheMode, SslVerifyMode, SslVersion,
                };
                let mut b = setup("create TLS context", SslContextBuilder::new(SslMethod::tls()))?;
                setup("pin TLS 1.3", b.set_min_proto_version(Some(SslVersion::TLS1_3)))?;
                setup("pin TLS 1.3", b.set_max_proto_version(Some(SslVersion::TLS1_3)))?;
                $configure(&mut b, tls)?;
                setup(format!("load CA {}", tls.ca.display()), b.set_ca_file(&tls.ca))?;
                setup(
                    format!("load certificate {}", tls.cert.display()),
                    b.set_certificate_chain_file(&tls.cert),
                )?;
                setup(
                    format!("load key {}", tls.key.display()),
                    b.set_private_key_file(&tls.key, SslFiletype::PEM),
                )?;
                setup("match key and certificate", b.check_private_key())?;
                b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
                // A ticket arriving after kTLS is installed would land in the
                // application's first read.
                b.set_options(SslOptions::NO_TICKET);
                b.set_session_cache_mode(SslSessionCacheMode::OFF);
                let secrets_index = setup(
                    "allocate ex_data index",
                    Ssl::new_ex_index::<
                        ::std::sync::Arc<::std::sync::Mutex<$crate::tls13::TrafficSecrets>>,
                    >(),
                )?;
                b.set_keylog_callback(move |ssl, line| {
                    if let Some(secrets) = ssl.ex_data(secrets_index)
                        && let Ok(mut s) = secrets.lock()
                    {
                        s.record(line);
                    }
                });
                Ok(Self {
                    context: b.build(),
                    secrets_index,
                })
            }

            fn handshake(
                &self,
                role: $crate::Role,
                io: &mut $crate::socket::SocketIo,
                secrets: &::std::sync::Arc<::std::sync::Mutex<$crate::tls13::TrafficSecrets>>,
            ) -> Result<$crate::handshake::Negotiated, $crate::handshake::HandshakeFailure> {
                use $crate::handshake::HandshakeFailure;
                use $ssl::ssl::{HandshakeError, Ssl};
                let mut ssl = Ssl::new(&self.context)
                    .map_err(|e| HandshakeFailure::Session(e.to_string()))?;
                ssl.set_ex_data(self.secrets_index, ::std::sync::Arc::clone(secrets));
                let result = match role {
                    $crate::Role::Client => ssl.connect(io),
                    $crate::Role::Server => ssl.accept(io),
                };
                let stream = result.map_err(|e| match e {
                    HandshakeError::SetupFailure(stack) => {
                        HandshakeFailure::Session(stack.to_string())
                    }
                    HandshakeError::Failure(mid) | HandshakeError::WouldBlock(mid) => {
                        let err = mid.error();
                        if err
                            .io_error()
                            .is_some_and(|io| io.kind() == ::std::io::ErrorKind::TimedOut)
                        {
                            HandshakeFailure::TimedOut
                        } else if let Some(reason) = $rejected(mid.ssl()) {
                            HandshakeFailure::PeerRejected(reason)
                        } else {
                            HandshakeFailure::Failed(err.to_string())
                        }
                    }
                })?;
                let ssl = stream.ssl();
                Ok($crate::handshake::Negotiated {
                    suite: ssl.current_cipher().map_or("none", |c| c.name()).to_string(),
                    buffered: ssl.pending(),
                    peer_dns_names: ssl.peer_certificate().map(|c| {
                        c.subject_alt_names()
                            .map(|names| {
                                names
                                    .iter()
                                    .filter_map(|n| n.dnsname().map(str::to_owned))
                                    .collect()
                            })
                            .unwrap_or_default()
                    }),
                })
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A library that must never be reached: for the checks the driver
    /// makes before and after the library runs.
    struct Unreachable;

    impl TlsLibrary for Unreachable {
        const NAME: &'static str = "unreachable";
        const SELECTS_TLS13_SUITES: bool = true;
        fn version() -> String {
            "0".into()
        }
        fn new(_: &TlsSection) -> Result<Self, SetupError> {
            Ok(Self)
        }
        fn handshake(
            &self,
            _: Role,
            _: &mut SocketIo,
            _: &Arc<Mutex<TrafficSecrets>>,
        ) -> Result<Negotiated, HandshakeFailure> {
            panic!("the library was reached")
        }
    }

    fn tls(suites: &[&str]) -> TlsSection {
        TlsSection {
            ca: "ca.pem".into(),
            // Read for its expiry only (the library here loads nothing).
            cert: concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/cert-until-2126.pem").into(),
            key: "c.key".into(),
            cipher_suites: suites.iter().map(|s| s.to_string()).collect(),
            groups: vec!["X25519".into()],
            expiry_warning_days: 30,
            node_map: None,
            handshakes_in_flight: None,
        }
    }

    #[test]
    fn a_suite_ktls_cannot_take_is_a_setup_error() {
        let e =
            HandshakeProvider::<Unreachable>::new(&tls(&["TLS_AES_128_CCM_SHA256"])).unwrap_err();
        assert!(
            matches!(&e, SetupError::UnsupportedSuite { suite } if suite == "TLS_AES_128_CCM_SHA256"),
            "{e}"
        );
    }

    #[test]
    fn after_the_handshake_buffered_bytes_and_unaccepted_suites_fail() {
        let p = HandshakeProvider::<Unreachable>::new(&tls(&["TLS_AES_256_GCM_SHA384"])).unwrap();
        assert_eq!(p.info().cipher_suites, vec![CipherSuite::Aes256Gcm]);
        let secrets = Mutex::new(TrafficSecrets::default());
        let cases = [
            (
                "TLS_AES_256_GCM_SHA384",
                7,
                "7 bytes read past the handshake",
            ),
            ("TLS_AES_128_GCM_SHA256", 0, "does not accept"),
            ("TLS_AES_128_CCM_SHA256", 0, "kTLS cannot take"),
        ];
        for (suite, buffered, want) in cases {
            let n = Negotiated {
                suite: suite.into(),
                buffered,
                peer_dns_names: None,
            };
            match p.keys_of(Role::Client, &n, &secrets) {
                Err(ProviderError::Handshake { reason }) => {
                    assert!(reason.contains(want), "{suite}: {reason}")
                }
                other => panic!("{suite}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_request_without_a_socket_is_invalid() {
        let p = HandshakeProvider::<Unreachable>::new(&tls(&["TLS_AES_128_GCM_SHA256"])).unwrap();
        let request = KeyRequest {
            socket_cookie: 1,
            role: Role::Client,
            local: "127.0.0.1:1".parse().unwrap(),
            remote: "127.0.0.1:2".parse().unwrap(),
            local_isn: 0,
            remote_isn: 0,
            node_name: "n".into(),
            socket: None,
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(
            p.handshake(&request),
            Err(ProviderError::InvalidRequest { .. })
        ));
    }
}
