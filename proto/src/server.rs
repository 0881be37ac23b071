//! The provider side: the [`Provider`] trait and the Unix-socket gRPC
//! server that hosts it.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::error::ProviderError;
use crate::metrics::ProviderMetrics;
use crate::pb;
use crate::types::{ConnectionKeys, KeyRequest, ProviderInfo};

/// What a provider implements. The SDK calls [`Provider::keys`] once per
/// connection, concurrently for many connections.
pub trait Provider: Send + Sync + 'static {
    /// Name, version and capabilities. Called often; keep it cheap.
    fn info(&self) -> ProviderInfo;

    /// The keys of one connection, or why not.
    fn keys(
        &self,
        request: KeyRequest,
    ) -> impl Future<Output = Result<ConnectionKeys, ProviderError>> + Send;

    /// Whether the provider can serve requests now (reported through
    /// `grpc.health.v1`, polled every few seconds).
    fn healthy(&self) -> impl Future<Output = bool> + Send {
        async { true }
    }

    /// Re-reads the provider's files (certificates, maps) if they changed
    /// since they were loaded, or in any case when `forced`. The SDK calls
    /// it every [`RELOAD_CHECK_EVERY`] and, `forced`, on `SIGHUP`
    /// (`systemctl reload`), and counts what it says in the provider's
    /// metrics. The provider logs what it did; files that do not load must
    /// leave the old ones in use. The default has nothing to reload.
    fn reload(&self, forced: bool) -> impl Future<Output = Reload> + Send {
        let _ = forced;
        async { Reload::Unchanged }
    }

    /// Registers the provider's own metrics next to the SDK's (served on
    /// `metrics_listen`, prefixed `tlshub_keyprovider_`), once, before
    /// serving. The provider keeps the handles and updates them. The
    /// default has none.
    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        let _ = registry;
    }
}

/// What [`Provider::reload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// The files are as they were loaded (and no reload was forced).
    Unchanged,
    /// New files are in use for new requests.
    Reloaded,
    /// The new files do not load: the old ones stay in use. Given once per
    /// version of the files.
    Refused(String),
    /// The same refused files are still there.
    StillRefused,
}

/// How often the SDK asks a provider to look for changed files
/// ([`Provider::reload`]).
pub const RELOAD_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Where and for whom the server listens.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The Unix socket path. A stale socket there is replaced; a live one
    /// (another provider answering) is an error.
    pub socket_path: PathBuf,
    /// Besides root, the one uid allowed to call (checked with
    /// `SO_PEERCRED` on every connection).
    pub allowed_uid: Option<u32>,
    /// Where to serve the key request metrics (`GET /metrics`,
    /// [`crate::metrics::ProviderMetrics`]); `None`: not served.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another process answers on the socket path.
    #[error("another process is already serving on {path}")]
    AlreadyServing {
        /// The path.
        path: PathBuf,
    },
    /// Something that is not a socket is at the path.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// Creating, binding or securing the socket failed.
    #[error("cannot {action} {path}: {source}")]
    Socket {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The metrics endpoint could not listen.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::ListenError),
}

/// Binds the socket so that nobody but the owner can connect before it is
/// secured: bind under a private temporary name with umask 077, set the mode
/// (and owner, for `allowed_uid`), then rename over the final path.
pub fn bind_private(path: &Path, allowed_uid: Option<u32>) -> Result<UnixListener, ServeError> {
    let err = |action, source| ServeError::Socket {
        action,
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ServeError::NotASocket {
                path: path.to_owned(),
            });
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServeError::AlreadyServing {
                    path: path.to_owned(),
                });
            }
            info!(path = %path.display(), "replacing stale socket");
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("inspect", e)),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| err("create the directory of", e))?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    // Created owner-only: the mask is swapped for the bind and restored.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let bound = std::os::unix::net::UnixListener::bind(&tmp);
    rustix::process::umask(old);
    let listener = bound.map_err(|e| err("bind", e))?;
    if let Some(uid) = allowed_uid {
        std::os::unix::fs::chown(&tmp, Some(uid), None).map_err(|e| err("chown", e))?;
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err("chmod", e))?;
    std::fs::rename(&tmp, path).map_err(|e| err("rename onto", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| err("configure", e))?;
    UnixListener::from_std(listener).map_err(|e| err("register", e))
}

/// Whether a connected peer may call, by its credentials.
fn peer_allowed(stream: &UnixStream, allowed_uid: Option<u32>) -> bool {
    match stream.peer_cred() {
        Ok(cred) => cred.uid() == 0 || Some(cred.uid()) == allowed_uid,
        Err(_) => false,
    }
}

/// How long the SDK lets a provider's `keys` run: the request's timeout
/// and a twentieth of it (at most 100 ms). Why the extra: a provider that
/// keeps to `request.timeout` itself answers first, with its own reason;
/// the core waits longer still (at least 200 ms, or as long again for a
/// timeout under 400 ms), so this answer also reaches it.
pub(crate) fn answer_deadline(timeout: Duration) -> Duration {
    timeout + (timeout / 20).min(Duration::from_millis(100))
}

/// The provider behind both transports: gRPC and the keys stream.
pub(crate) struct Service<P> {
    provider: Arc<P>,
    metrics: Arc<ProviderMetrics>,
}

impl<P: Provider> Service<P> {
    /// One key request, whichever transport brought it: checked, timed,
    /// counted and logged alike.
    pub(crate) async fn answer(
        &self,
        request: pb::ConnectionKeysRequest,
    ) -> Result<pb::ConnectionKeys, Status> {
        let started = std::time::Instant::now();
        let _in_flight = self.metrics.started();
        let request = match KeyRequest::from_pb(request) {
            Ok(r) => r,
            Err(e) => {
                let e = ProviderError::InvalidRequest {
                    reason: e.to_string(),
                };
                self.metrics.finished(None, Err(&e), started.elapsed());
                return Err(e.into());
            }
        };
        let role = request.role;
        let span = info_span!(
            "keys",
            cookie = request.socket_cookie,
            role = ?request.role,
            local = %request.local,
            remote = %request.remote,
        );
        let deadline = answer_deadline(request.timeout);
        async {
            let result = match tokio::time::timeout(deadline, self.provider.keys(request)).await {
                Ok(result) => result,
                // Dropping the provider's future cancels its work (and
                // closes a socket it took), as gRPC does when the core
                // gives up; the keys stream would otherwise let it run on.
                Err(_) => Err(ProviderError::Timeout {
                    waiting_for: "the provider's answer (cancelled by the SDK)".into(),
                    millis: u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
                }),
            };
            let result = result.and_then(|keys| match keys.validate() {
                Ok(()) => Ok(keys),
                Err(e) => {
                    warn!(error = %e, "provider produced invalid keys");
                    Err(ProviderError::Internal {
                        reason: e.to_string(),
                    })
                }
            });
            self.metrics
                .finished(Some(role), result.as_ref().map(drop), started.elapsed());
            match result {
                Ok(keys) => {
                    // Debug, not info: a line per connection was the
                    // largest single cost in the TLSHub provider's profile
                    // (8% of its CPU); the metrics count every request.
                    debug!(
                        cipher = %keys.cipher_suite,
                        micros = started.elapsed().as_micros() as u64,
                        "keys issued"
                    );
                    Ok(keys.to_pb())
                }
                Err(e) => {
                    warn!(error = %e, code = ?e.code(), "key request failed");
                    Err(e.into())
                }
            }
        }
        .instrument(span)
        .await
    }
}

#[tonic::async_trait]
impl<P: Provider> pb::key_provider_server::KeyProvider for Service<P> {
    async fn get_info(
        &self,
        _: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::ProviderInfo>, Status> {
        let mut info = self.provider.info().to_pb();
        info.keys_stream = true;
        Ok(Response::new(info))
    }

    async fn get_connection_keys(
        &self,
        request: Request<pb::ConnectionKeysRequest>,
    ) -> Result<Response<pb::ConnectionKeys>, Status> {
        self.answer(request.into_inner()).await.map(Response::new)
    }
}

/// Serves `provider` on `options.socket_path` until SIGTERM or SIGINT,
/// then finishes in-flight requests and removes the socket.
pub async fn serve<P: Provider>(provider: P, options: ServeOptions) -> Result<(), ServeError> {
    serve_until(provider, options, shutdown_signal()).await
}

/// For a provider's `main`: runs [`serve`] on a new runtime of one thread
/// ([`block_on`]) until SIGTERM or SIGINT. Errors are printed as
/// `program: error`; the exit code is success after a clean shutdown and
/// failure otherwise.
pub fn run<P: Provider>(
    program: &str,
    provider: P,
    options: ServeOptions,
) -> std::process::ExitCode {
    block_on(program, async move {
        serve(provider, options).await.map_err(|e| e.to_string())
    })
}

/// Runs `main` on a new Tokio runtime of one thread (blocking work goes to
/// `spawn_blocking`'s threads): a provider's whole `main` after its
/// configuration is read (see [`run`]). An error is printed after
/// `program` and exits 1.
pub fn block_on(
    program: &str,
    main: impl Future<Output = Result<(), String>>,
) -> std::process::ExitCode {
    crate::runtime::raise_open_files_limit();
    let runtime = match provider_runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{program}: cannot start runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The runtime a provider serves on: one thread (a current-thread Tokio
/// runtime) for the requests, both transports, the metrics and the
/// provider's own tasks, as the core runs; blocking work goes to Tokio's
/// blocking threads (`spawn_blocking`), as the in-band handshakes and the
/// node-pair sessions' handshakes do. A key request is a few system calls,
/// and a worker per CPU only handed them between threads (measured:
/// ARCHITECTURE.md, "Where setup time goes").
pub(crate) fn provider_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Like [`serve`], stopping when `shutdown` completes.
pub async fn serve_until<P: Provider>(
    provider: P,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let provider = Arc::new(provider);
    // The metrics endpoint first: if its address is taken, nothing is left
    // behind (no socket file).
    let mut metrics = ProviderMetrics::new();
    provider.register_metrics(metrics.registry_mut());
    let metrics = Arc::new(metrics);
    let metrics_task = match options.metrics_listen {
        Some(addr) => {
            let encode = Arc::clone(&metrics);
            let (_, task) =
                crate::metrics::serve_http(addr, Arc::new(move || encode.encode())).await?;
            Some(task)
        }
        None => None,
    };
    let keys_path = crate::keys_stream::socket_path(&options.socket_path);
    let listeners = bind_private(&options.socket_path, options.allowed_uid)
        .and_then(|l| bind_private(&keys_path, options.allowed_uid).map(|k| (l, k)));
    let (listener, keys_listener) = match listeners {
        Ok(l) => l,
        Err(e) => {
            if let Some(t) = metrics_task {
                t.abort();
            }
            return Err(e);
        }
    };
    let (reporter, health) = tonic_health::server::health_reporter();
    type Server<P> = pb::key_provider_server::KeyProviderServer<Service<P>>;
    reporter.set_serving::<Server<P>>().await;
    let health_provider = Arc::clone(&provider);
    let health_task = tokio::spawn(async move {
        let mut last = true;
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let now = health_provider.healthy().await;
            if now != last {
                if now {
                    reporter.set_serving::<Server<P>>().await;
                } else {
                    reporter.set_not_serving::<Server<P>>().await;
                }
                warn!(healthy = now, "provider health changed");
                last = now;
            }
        }
    });

    let reload_provider = Arc::clone(&provider);
    let reload_metrics = Arc::clone(&metrics);
    let reload_task = tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        // Without a handler SIGHUP would end the process (`systemctl
        // reload` sends it).
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot handle SIGHUP: files are reloaded on change only");
                None
            }
        };
        let mut every = tokio::time::interval(RELOAD_CHECK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            let forced = tokio::select! {
                _ = every.tick() => false,
                Some(()) = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => true,
            };
            if forced {
                info!("SIGHUP: reloading");
            }
            let outcome = reload_provider.reload(forced).await;
            reload_metrics.reloaded(&outcome);
        }
    });

    let allowed_uid = options.allowed_uid;
    let service = Arc::new(Service { provider, metrics });
    let keys_stream = crate::keys_stream::Server::start(
        allowed_connections(keys_listener, allowed_uid),
        Arc::clone(&service),
    );
    let incoming = allowed_connections(listener, allowed_uid);
    let info = service.provider.info();
    info!(
        name = %info.name,
        version = %info.version,
        socket = %options.socket_path.display(),
        "provider serving"
    );
    // Under a `Type=notify` unit, started means listening: the core's
    // first request after `systemctl start` finds the socket.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    // On shutdown the socket's name goes first, so new connections fail at
    // once (the core then waits for the next instance) while requests
    // already received finish. Removing it only at exit could also delete
    // a successor's socket bound in the meantime.
    let socket_path = options.socket_path.clone();
    let stopping = keys_stream.stopping();
    let shutdown = async move {
        shutdown.await;
        let _ = std::fs::remove_file(&socket_path);
        let _ = std::fs::remove_file(crate::keys_stream::socket_path(&socket_path));
        stopping.stop();
        info!("provider stopping: finishing the requests under way");
    };
    let result = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(pb::key_provider_server::KeyProviderServer::from_arc(
            service,
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    // The keys stream's requests under way finish too (each is bounded by
    // its own deadline).
    keys_stream.finished().await;
    health_task.abort();
    reload_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    info!("provider stopped");
    Ok(result?)
}

/// Accepted connections from root or `allowed_uid` (by `SO_PEERCRED`);
/// others are dropped with a warning. For any Unix-socket gRPC server that
/// must answer only privileged callers.
pub fn allowed_connections(
    listener: UnixListener,
    allowed_uid: Option<u32>,
) -> impl tokio_stream::Stream<Item = io::Result<UnixStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = listener.accept().await;
            let item = match accepted {
                Ok((stream, _)) => {
                    if !peer_allowed(&stream, allowed_uid) {
                        let cred = stream.peer_cred().ok();
                        warn!(
                            uid = cred.map(|c| c.uid()),
                            pid = cred.and_then(|c| c.pid()),
                            "refused a caller that is neither root nor the allowed uid"
                        );
                        continue;
                    }
                    Ok(stream)
                }
                Err(e) => Err(e),
            };
            if tx.send(item).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM: shutting down"),
                _ = int.recv() => info!("SIGINT: shutting down"),
            }
        }
        _ => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    /// `block_on` (and so `run`) serves on one thread, as the provider
    /// binaries are measured and tested.
    #[test]
    fn a_provider_main_runs_on_one_thread() {
        let code = super::block_on("test", async {
            let flavor = tokio::runtime::Handle::current().runtime_flavor();
            assert_eq!(flavor, tokio::runtime::RuntimeFlavor::CurrentThread);
            // Blocking work still has threads of its own.
            let elsewhere = tokio::task::spawn_blocking(|| std::thread::current().id())
                .await
                .unwrap();
            assert_ne!(elsewhere, std::thread::current().id());
            Ok(())
        });
        assert_eq!(code, std::process::ExitCode::SUCCESS);
    }
}
