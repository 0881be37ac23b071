//! Prometheus metrics: the HTTP endpoint (`GET /metrics`, OpenMetrics
//! text) that the core and every provider built on the SDK serve, and the
//! metrics the SDK keeps for a provider ([`ProviderMetrics`],
//! on when [`crate::ServeOptions::metrics_listen`] is set).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::error::ProviderError;
use crate::types::Role;

/// Why a metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {addr}: {source}")]
pub struct ListenError {
    /// The configured listen address.
    pub addr: SocketAddr,
    /// The bind's error.
    #[source]
    pub source: std::io::Error,
}

/// What a metrics endpoint serves: the OpenMetrics text of now.
pub type Encoder = Arc<dyn Fn() -> String + Send + Sync>;

/// Binds `addr` and serves `GET /metrics` with what `encode` returns until
/// the returned task is aborted. Returns the bound address (`addr` with
/// port 0 gets one) and the task.
pub async fn serve_http(
    addr: SocketAddr,
    encode: Encoder,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), ListenError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ListenError { addr, source })?;
    info!(addr = %bound, "metrics endpoint listening (GET /metrics)");
    Ok((
        bound,
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let encode = encode.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let encode = encode.clone();
                            async move {
                                Ok::<_, std::convert::Infallible>(answer(&req, encode.as_ref()))
                            }
                        });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(5))
                        .serve_connection(TokioIo::new(stream), service);
                    if let Err(e) = tokio::time::timeout(Duration::from_secs(30), conn).await {
                        debug!(%peer, error = %e, "metrics connection timed out");
                    }
                });
            }
        }),
    ))
}

fn answer(
    req: &Request<hyper::body::Incoming>,
    encode: &(dyn Fn() -> String + Send + Sync),
) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            encode(),
        ),
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "only /metrics is served here\n".to_owned(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// The OpenMetrics text of `registry`.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        warn!(error = %e, "cannot encode metrics");
    }
    out
}

/// `result` label: `ok` or the error's kind ([`ProviderError::kind`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok`, `timeout`, `peer_authentication`, ...
    pub result: &'static str,
}

/// `role` and `result` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleResultLabels {
    /// `client`, `server`, or `unknown` for a request that did not parse.
    pub role: &'static str,
    /// As [`ResultLabel`].
    pub result: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 0.5 ms .. ~16 s, as the core's key time: a TLSHub key takes about a
    // millisecond on hardware, a handshake under emulation tens of them.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// What the SDK counts for a provider (names prefixed
/// `tlshub_keyprovider_`): key requests by result, their duration (for a
/// handshake provider, the handshake's time) by role and result, the
/// requests in flight, and its file reloads ([`crate::Provider::reload`]).
#[derive(Debug)]
pub struct ProviderMetrics {
    requests: Family<ResultLabel, Counter>,
    duration: HistogramFamily<RoleResultLabels>,
    in_flight: Gauge,
    reloads: Family<ResultLabel, Counter>,
    files_refused: Gauge,
    registry: Registry,
}

impl Default for ProviderMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One request in flight; counted out when dropped.
#[derive(Debug)]
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl ProviderMetrics {
    /// Creates and registers the metrics.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tlshub_keyprovider");
        let m = Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            in_flight: Gauge::default(),
            reloads: Family::default(),
            files_refused: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Key requests answered, by result (ok or the error's kind)",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to answer a key request (a handshake provider's handshake), by role and result",
            m.duration.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Key requests being answered now",
            m.in_flight.clone(),
        );
        registry.register(
            "reloads",
            "Changed files the provider took (reloaded) or refused (the old ones stay in use)",
            m.reloads.clone(),
        );
        registry.register(
            "files_refused",
            "1 while the provider's files on disk are ones it refused (it runs on the ones it loaded before)",
            m.files_refused.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts a request in until the guard drops.
    pub fn started(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    /// Records an answered request.
    pub fn finished(&self, role: Option<Role>, result: Result<(), &ProviderError>, took: Duration) {
        let result = match result {
            Ok(()) => "ok",
            Err(e) => e.kind(),
        };
        let role = match role {
            Some(Role::Client) => "client",
            Some(Role::Server) => "server",
            None => "unknown",
        };
        self.requests.get_or_create(&ResultLabel { result }).inc();
        self.duration
            .get_or_create(&RoleResultLabels { role, result })
            .observe(took.as_secs_f64());
    }

    /// Records what a reload did.
    pub fn reloaded(&self, outcome: &crate::server::Reload) {
        use crate::server::Reload;
        match outcome {
            Reload::Unchanged => {}
            Reload::Reloaded => {
                self.reloads
                    .get_or_create(&ResultLabel { result: "reloaded" })
                    .inc();
                self.files_refused.set(0);
            }
            Reload::Refused(_) => {
                self.reloads
                    .get_or_create(&ResultLabel { result: "refused" })
                    .inc();
                self.files_refused.set(1);
            }
            Reload::StillRefused => {
                self.files_refused.set(1);
            }
        }
    }

    /// The registry, for a provider's own metrics
    /// ([`crate::Provider::register_metrics`]).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_result_and_timed_by_role() {
        let m = ProviderMetrics::new();
        let guard = m.started();
        assert!(
            m.encode()
                .contains("tlshub_keyprovider_requests_in_flight 1")
        );
        drop(guard);
        m.finished(Some(Role::Client), Ok(()), Duration::from_millis(3));
        let timeout = ProviderError::Timeout {
            waiting_for: "the peer".into(),
            millis: 1,
        };
        m.finished(Some(Role::Server), Err(&timeout), Duration::from_secs(1));
        m.reloaded(&crate::server::Reload::Refused("bad".into()));
        m.reloaded(&crate::server::Reload::StillRefused);
        assert!(m.encode().contains("tlshub_keyprovider_files_refused 1"));
        m.reloaded(&crate::server::Reload::Reloaded);
        m.reloaded(&crate::server::Reload::Unchanged);
        let text = m.encode();
        for want in [
            "tlshub_keyprovider_requests_in_flight 0",
            "tlshub_keyprovider_requests_total{result=\"ok\"} 1",
            "tlshub_keyprovider_requests_total{result=\"timeout\"} 1",
            "tlshub_keyprovider_request_duration_seconds_count{role=\"client\",result=\"ok\"} 1",
            "tlshub_keyprovider_request_duration_seconds_count{role=\"server\",result=\"timeout\"} 1",
            "tlshub_keyprovider_reloads_total{result=\"refused\"} 1",
            "tlshub_keyprovider_reloads_total{result=\"reloaded\"} 1",
            "tlshub_keyprovider_files_refused 0",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
    }
}
