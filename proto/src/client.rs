//! The calling side (used by `capture-core` and the conformance tests): a
//! gRPC client for a provider on a Unix socket, returning checked SDK types.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use crate::pb;
use crate::types::{ConnectionKeys, KeyRequest, ProviderInfo, WireError};

/// Called with the provider's pid (from `SO_PEERCRED`) on every new connection.
pub type PeerHook = Arc<dyn Fn(u32) + Send + Sync>;

/// Connects to a provider's socket at `path` and tells `on_connect` the
/// provider's pid (`SO_PEERCRED`): the gRPC channel's and the keys
/// stream's connections alike.
pub(crate) async fn connect(
    path: &Path,
    on_connect: Option<&PeerHook>,
) -> std::io::Result<UnixStream> {
    let stream = UnixStream::connect(path).await?;
    if let (Some(hook), Ok(cred)) = (on_connect, stream.peer_cred())
        && let Some(pid) = cred.pid().and_then(|p| u32::try_from(p).ok())
    {
        hook(pid);
    }
    Ok(stream)
}

/// Why a call to a provider did not produce usable keys.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer within the deadline.
    #[error("provider at {path} did not answer within {millis} ms")]
    Timeout {
        /// The provider's socket.
        path: PathBuf,
        /// How long the client waited.
        millis: u64,
    },
    /// The provider answered with an error status (or could not be reached).
    #[error("provider at {path} returned {code:?}: {message}")]
    Status {
        /// The provider's socket.
        path: PathBuf,
        /// The status the provider, or tonic for a transport failure,
        /// ended the call with.
        code: tonic::Code,
        /// The provider's message, or the transport's description.
        message: String,
    },
    /// No provider runs the request, so it can be sent again to the next
    /// instance: nothing listened on the socket, or the provider was
    /// closing the connection (a graceful stop finishes only the requests
    /// it received) and the request was not sent or was refused unread.
    #[error("provider at {path} is not running or stopping; the request reached no provider")]
    NotSent {
        /// The provider's socket.
        path: PathBuf,
    },
    /// The answer was malformed.
    #[error("provider at {path} answered malformed keys: {source}")]
    Malformed {
        /// The provider's socket.
        path: PathBuf,
        /// The first check the answer failed.
        #[source]
        source: WireError,
    },
}

impl ClientError {
    /// Whether the call ended with `UNAVAILABLE`: the provider's socket did
    /// not answer, or a live provider said it cannot serve now.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::NotSent { .. }
                | Self::Status {
                    code: tonic::Code::Unavailable,
                    ..
                }
        )
    }

    /// Whether the request certainly reached no provider, so that sending
    /// it again cannot start a second handshake on the same connection.
    pub fn never_sent(&self) -> bool {
        matches!(self, Self::NotSent { .. })
    }

    /// A short label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Timeout { .. } => "timeout",
            Self::NotSent { .. } => "unavailable",
            Self::Status {
                code: tonic::Code::Unavailable,
                ..
            } => "unavailable",
            Self::Status {
                code: tonic::Code::DeadlineExceeded,
                ..
            } => "timeout",
            Self::Status {
                code: tonic::Code::Cancelled,
                ..
            } => "cancelled",
            Self::Status { .. } => "error",
            Self::Malformed { .. } => "malformed",
        }
    }
}

/// A lazily connecting client; cheap to clone. Key requests go over the
/// provider's keys stream ([`crate::keys_stream`]) once its `GetInfo` said
/// it serves one, and over gRPC otherwise (and again whenever the stream
/// cannot be reached, until the next `GetInfo` says it serves one).
#[derive(Clone)]
pub struct ProviderClient {
    path: PathBuf,
    channel: Channel,
    inner: pb::key_provider_client::KeyProviderClient<Channel>,
    /// `None`: gRPC only ([`Self::grpc_only`]).
    stream: Option<Arc<crate::keys_stream::Client>>,
    use_stream: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for ProviderClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderClient")
            .field("path", &self.path)
            .finish()
    }
}

impl ProviderClient {
    /// A client for the provider at `path`. Nothing is connected until the
    /// first call; lost connections are re-established on later calls.
    pub fn new(path: &Path, on_connect: Option<PeerHook>) -> Self {
        let stream = Some(Arc::new(crate::keys_stream::Client::new(
            crate::keys_stream::socket_path(path),
            on_connect.clone(),
        )));
        let socket = path.to_owned();
        // The URI is required by tonic but unused: the connector dials the socket.
        let channel = Endpoint::from_static("http://provider.invalid")
            .connect_timeout(Duration::from_secs(1))
            .connect_with_connector_lazy(tower::service_fn(move |_| {
                let socket = socket.clone();
                let hook = on_connect.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(connect(&socket, hook.as_ref()).await?))
                }
            }));
        Self {
            path: path.to_owned(),
            inner: pb::key_provider_client::KeyProviderClient::new(channel.clone()),
            channel,
            stream,
            use_stream: Arc::default(),
        }
    }

    /// This client, sending key requests over gRPC whatever the provider
    /// serves (the conformance suite and the tests check both transports).
    pub fn grpc_only(mut self) -> Self {
        self.stream = None;
        self.use_stream = Arc::default();
        self
    }

    /// Whether key requests go over the keys stream now (the last
    /// `GetInfo` said the provider serves one, and it could be reached
    /// since).
    pub fn uses_keys_stream(&self) -> bool {
        self.use_stream.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The raw gRPC client, for sending requests the SDK types cannot
    /// express (the conformance suite's malformed requests).
    pub fn raw(&self) -> pb::key_provider_client::KeyProviderClient<Channel> {
        self.inner.clone()
    }

    /// `grpc.health.v1` status of the key service: `Ok(true)` when SERVING.
    pub async fn healthy(&self, timeout: Duration) -> Result<bool, ClientError> {
        use tonic_health::pb::health_check_response::ServingStatus;
        let mut health = tonic_health::pb::health_client::HealthClient::new(self.channel.clone());
        let request = tonic_health::pb::HealthCheckRequest {
            service: "tlshub.provider.v1.KeyProvider".into(),
        };
        let answer = tokio::time::timeout(timeout, health.check(request))
            .await
            .map_err(|_| self.timeout(timeout))?
            .map_err(|s| self.status(s))?;
        Ok(answer.into_inner().status == ServingStatus::Serving as i32)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn status(&self, s: tonic::Status) -> ClientError {
        ClientError::Status {
            path: self.path.clone(),
            code: s.code(),
            message: s.message().into(),
        }
    }

    /// `GetInfo`, checked.
    pub async fn info(&self, timeout: Duration) -> Result<ProviderInfo, ClientError> {
        let mut c = self.inner.clone();
        let answer = tokio::time::timeout(timeout, c.get_info(pb::GetInfoRequest {}))
            .await
            .map_err(|_| self.timeout(timeout))?
            .map_err(|s| self.status(s))?
            .into_inner();
        self.use_stream.store(
            answer.keys_stream && self.stream.is_some(),
            std::sync::atomic::Ordering::Relaxed,
        );
        ProviderInfo::from_pb(answer).map_err(|source| ClientError::Malformed {
            path: self.path.clone(),
            source,
        })
    }

    fn timeout(&self, timeout: Duration) -> ClientError {
        ClientError::Timeout {
            path: self.path.clone(),
            millis: timeout.as_millis() as u64,
        }
    }

    /// `GetConnectionKeys` with a deadline of `request.timeout`; the answer
    /// is validated (lengths, suite, version) before it is returned.
    pub async fn keys(&self, request: &KeyRequest) -> Result<ConnectionKeys, ClientError> {
        self.keys_waiting(request, request.timeout).await
    }

    /// [`Self::keys`], waiting up to `wait` (at least `request.timeout`,
    /// the provider's own budget) so that a provider that gives up at its
    /// deadline still gets its reason through.
    pub async fn keys_waiting(
        &self,
        request: &KeyRequest,
        wait: Duration,
    ) -> Result<ConnectionKeys, ClientError> {
        let wait = wait.max(request.timeout);
        if let Some(stream) = self.stream.as_ref().filter(|_| self.uses_keys_stream()) {
            use crate::keys_stream::StreamError;
            match stream.request(request.to_pb(), wait).await {
                Ok(answer) => return self.streamed(answer, wait),
                // The stream cannot be reached (a provider without one, or
                // none at all): gRPC, which says which, until the next
                // `GetInfo`.
                Err(StreamError::NotSent(_)) => self
                    .use_stream
                    .store(false, std::sync::atomic::Ordering::Relaxed),
                Err(StreamError::Closed) => return Err(self.dropped(String::new())),
                Err(StreamError::Timeout) => return Err(self.timeout(wait)),
            }
        }
        let mut c = self.inner.clone();
        let mut req = tonic::Request::new(request.to_pb());
        req.set_timeout(wait);
        let answer = tokio::time::timeout(wait, c.get_connection_keys(req))
            .await
            .map_err(|_| self.timeout(wait))?
            .map_err(|s| self.error_of(s, wait))?;
        checked_keys(&self.path, answer.into_inner())
    }

    /// A keys stream answer as the gRPC call's would be.
    fn streamed(
        &self,
        answer: pb::KeysStreamResponse,
        wait: Duration,
    ) -> Result<ConnectionKeys, ClientError> {
        if answer.code == tonic::Code::Ok as i32 {
            return match answer.keys {
                Some(keys) => checked_keys(&self.path, keys),
                None => Err(ClientError::Malformed {
                    path: self.path.clone(),
                    source: WireError::Missing { field: "keys" },
                }),
            };
        }
        if answer.not_run {
            return Err(ClientError::NotSent {
                path: self.path.clone(),
            });
        }
        let status = tonic::Status::new(tonic::Code::from(answer.code), answer.message);
        Err(self.error_of(status, wait))
    }

    /// The call ended early, not at the deadline: the provider dropped it
    /// (it stopped, or crashed) before answering.
    fn dropped(&self, message: String) -> ClientError {
        ClientError::Status {
            path: self.path.clone(),
            code: tonic::Code::Cancelled,
            message: format!(
                "the provider dropped the request before answering (did it stop?){}",
                if message.is_empty() {
                    String::new()
                } else {
                    format!(": {message}")
                }
            ),
        }
    }

    /// What a key request's error status means, after waiting `wait`.
    fn error_of(&self, s: tonic::Status, wait: Duration) -> ClientError {
        match s.code() {
            // The provider's own timeout, with its reason.
            tonic::Code::DeadlineExceeded if !s.message().is_empty() => self.status(s),
            tonic::Code::DeadlineExceeded => self.timeout(wait),
            // tonic's own client-side deadline (the grpc-timeout set
            // above) ends the call as CANCELLED with a `TimeoutExpired`
            // source; that is our timeout, not the provider's doing.
            tonic::Code::Cancelled if is_client_deadline(&s) => self.timeout(wait),
            // Whatever the code: a request no provider reads ends as
            // UNAVAILABLE (nothing listens), CANCELLED (hyper never sent
            // it) or INTERNAL (refused by a GOAWAY); see [`never_sent`].
            // Nobody runs it, so it is as retryable as a provider that
            // is not running.
            _ if never_sent(&s) => ClientError::NotSent {
                path: self.path.clone(),
            },
            tonic::Code::Cancelled => self.dropped(s.message().to_owned()),
            _ => self.status(s),
        }
    }
}

/// Keys from the wire, checked; the wire copy's key bytes are zeroed.
fn checked_keys(path: &Path, mut wire: pb::ConnectionKeys) -> Result<ConnectionKeys, ClientError> {
    let result = ConnectionKeys::from_pb(wire.clone());
    // The wire copy held the key bytes too.
    crate::types::zeroize_wire(&mut wire);
    result.map_err(|source| ClientError::Malformed {
        path: path.to_owned(),
        source,
    })
}

/// Whether the call certainly reached no provider code, judged by the
/// transport error tonic keeps as the status's source (a status the
/// provider sent has none):
/// - tonic's [`tonic::ConnectError`]: nothing accepted the connection;
/// - a canceled [`hyper::Error`]: hyper never sent the request (the
///   connection was closing, or closed with the request still queued);
/// - an [`h2::Error`] that is the peer's GOAWAY with `NO_ERROR` applied to
///   this stream: a graceful stop announces the last stream it will
///   process, and h2 fails only the streams above it with this error
///   (RFC 9113 §6.8: they "were not processed"). A request sent while the
///   GOAWAY was on its way ends so; tonic calls it INTERNAL;
/// - a remote `REFUSED_STREAM` reset (RFC 9113 §8.7: not processed).
///
/// A request the provider dropped after reading it (it crashed, or closed
/// the connection) ends with an I/O error, or with CANCELLED carrying no
/// such source, and is not counted here.
fn never_sent(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>()
            || e.downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_canceled)
            || e.downcast_ref::<h2::Error>().is_some_and(refused_unread)
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// An h2 stream error that says the peer never processed the stream.
fn refused_unread(e: &h2::Error) -> bool {
    let refused = e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM);
    let above_goaway = e.is_go_away() && e.reason() == Some(h2::Reason::NO_ERROR);
    e.is_remote() && (refused || above_goaway)
}

/// Whether tonic ended the call at its client-side deadline: its status is
/// CANCELLED with a [`tonic::TimeoutExpired`] in the source chain.
fn is_client_deadline(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = e.source();
    }
    false
}
