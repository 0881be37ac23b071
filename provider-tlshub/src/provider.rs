//! The provider: a key request becomes a module request (FETCH, START,
//! FETCH), and the module's master key becomes per-direction kTLS keys.

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::Mutex;

use tlshub_provider_sdk::{
    CipherSuite, ConnectionKeys, KeyRequest, Provider, ProviderError, ProviderInfo, Role,
    TlsVersion, server::Reload,
};
use tracing::{info, warn};

use crate::codec::Layout;
use crate::module::{ModuleConfig, ModuleError, ModulePool, Target};
use crate::pod_map::{MapFormat, PodMapError, WatchedPodMap};
use crate::schedule::{ConnectionId, derive};

/// The TLSHub provider.
#[derive(Debug)]
pub struct TlsHubProvider {
    pool: ModulePool,
    layout: Layout,
    pods: Option<Mutex<WatchedPodMap>>,
    suite: CipherSuite,
}

impl TlsHubProvider {
    /// A provider for `module`; `pods` (the map file and its format) is
    /// required for layout v2.
    pub fn new(
        module: ModuleConfig,
        pods: Option<(&Path, MapFormat)>,
        suite: CipherSuite,
    ) -> Result<Self, PodMapError> {
        let pods = pods
            .map(|(path, format)| WatchedPodMap::open(path, format))
            .transpose()?
            .map(Mutex::new);
        Ok(Self {
            layout: module.layout,
            pool: ModulePool::new(module),
            pods,
            suite,
        })
    }

    fn server_node(&self, server: IpAddr) -> Result<Option<std::net::Ipv4Addr>, ProviderError> {
        if self.layout == Layout::V1 {
            return Ok(None);
        }
        let Some(pods) = &self.pods else {
            return Err(ProviderError::Internal {
                reason: "layout v2 without a pod-to-node map".into(),
            });
        };
        // Not refreshed here: the SDK checks the file every
        // RELOAD_CHECK_EVERY (see `reload`), and a stat per request was 6%
        // of this provider's CPU in `cargo xtask vm --mode profile`.
        let pods = pods.lock().map_err(|_| ProviderError::Internal {
            reason: "pod map lock poisoned".into(),
        })?;
        pods.map()
            .node_of(server)
            .map(Some)
            .ok_or_else(|| ProviderError::InvalidRequest {
                reason: format!("pod {server} is not in the pod-to-node map"),
            })
    }
}

fn v4(a: SocketAddr) -> Result<SocketAddrV4, ProviderError> {
    match a {
        SocketAddr::V4(v) => Ok(v),
        SocketAddr::V6(v) => match v.ip().to_ipv4_mapped() {
            Some(ip) => Ok(SocketAddrV4::new(ip, v.port())),
            None => Err(ProviderError::Unsupported {
                what: "IPv6 connections are not supported by TLSHub".into(),
            }),
        },
    }
}

fn module_error(e: ModuleError) -> ProviderError {
    match e {
        ModuleError::Timeout {
            waiting_for,
            millis,
        } => ProviderError::Timeout {
            waiting_for: waiting_for.into(),
            millis,
        },
        ModuleError::HandshakeFailed(reason) => ProviderError::Handshake { reason },
        other => ProviderError::Unavailable {
            reason: other.to_string(),
        },
    }
}

impl Provider for TlsHubProvider {
    /// `SIGHUP` re-reads the pod-to-node map; a changed file is also
    /// picked up by the SDK's check every
    /// [`tlshub_provider_sdk::RELOAD_CHECK_EVERY`].
    async fn reload(&self, forced: bool) -> Reload {
        let Some(pods) = &self.pods else {
            return Reload::Unchanged;
        };
        let Ok(mut pods) = pods.lock() else {
            return Reload::Refused("pod map lock poisoned".into());
        };
        let reloaded = if forced {
            pods.reload().map(|()| true)
        } else {
            pods.refresh()
        };
        match reloaded {
            Ok(false) if pods.is_refused() => Reload::StillRefused,
            Ok(false) => Reload::Unchanged,
            Ok(true) => {
                info!(forced, "pod-to-node map reloaded");
                Reload::Reloaded
            }
            Err(e) => {
                warn!(error = %e, "pod-to-node map reload failed; keeping the previous map");
                Reload::Refused(e.to_string())
            }
        }
    }

    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            name: "tlshub".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            tls_versions: vec![TlsVersion::Tls13],
            cipher_suites: vec![self.suite],
            needs_socket: false,
            // Keys from the TLSHub kernel module on both nodes.
            keying: "tlshub-module".into(),
            credentials: Vec::new(),
            peer_sessions: Vec::new(),
        }
    }

    async fn keys(&self, request: KeyRequest) -> Result<ConnectionKeys, ProviderError> {
        let id = ConnectionId::of(&request);
        let (client, server) = (v4(id.client)?, v4(id.server)?);
        let target = Target {
            client,
            server,
            server_node: self.server_node(IpAddr::V4(*server.ip()))?,
            server_side: request.role == Role::Server,
        };
        let master = self.pool.master_key(&target).await.map_err(module_error)?;
        derive(&master, &id, self.suite, request.role).map_err(|e| ProviderError::Internal {
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A provider for protocol 31, which no module serves on this machine.
    fn provider() -> TlsHubProvider {
        let module = ModuleConfig {
            protocol: 31,
            port_id: 0,
            layout: Layout::V1,
            timeout: std::time::Duration::from_millis(100),
            max_sockets: 1,
        };
        TlsHubProvider::new(module, None, CipherSuite::Aes128Gcm).unwrap()
    }

    fn request(local: &str, remote: &str) -> KeyRequest {
        KeyRequest {
            socket_cookie: 1,
            role: Role::Client,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            local_isn: 1,
            remote_isn: 2,
            node_name: "a".into(),
            socket: None,
            timeout: std::time::Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn ipv6_is_refused_before_the_module_is_asked() {
        match provider()
            .keys(request("[fd00:1::2]:40000", "[fd00:2::2]:8443"))
            .await
        {
            Err(e @ ProviderError::Unsupported { .. }) => {
                assert!(e.to_string().contains("not supported by TLSHub"))
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn no_module_is_unavailable() {
        let e = provider()
            .keys(request("10.0.1.2:40000", "10.0.2.2:8443"))
            .await
            .unwrap_err();
        assert!(matches!(e, ProviderError::Unavailable { .. }), "{e}");
        assert!(e.to_string().contains("TLSHub module"), "{e}");
    }
}
