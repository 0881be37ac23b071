//! The admin API server (`tlshub.admin.v1.Admin`) on a root-only Unix
//! socket. Switching the provider is answered here directly (the registry
//! is shared); everything about connections and policy is asked of the
//! event loop, which owns that state.

use std::path::PathBuf;
use std::sync::Arc;

use tlshub_admin::pb;
use tlshub_provider_sdk::server::{ServeError, allowed_connections, bind_private};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};
use tracing::info;

use crate::agent::AdminRequest;
use crate::metrics::Metrics;
use crate::peers::PeerMemory;
use crate::providers::{Registry, SwitchError};

/// How long `provider use` waits for the new provider's health answer.
const SWITCH_HEALTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long `Status` waits for each provider's current `GetInfo` before
/// it shows what the provider said last.
const STATUS_INFO_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// The service state.
#[derive(Debug)]
pub struct AdminService {
    agent: mpsc::Sender<AdminRequest>,
    providers: Arc<Registry>,
    metrics: Arc<Metrics>,
    peers: Arc<PeerMemory>,
}

impl AdminService {
    /// A service that forwards to the event loop through `agent`.
    pub fn new(
        agent: mpsc::Sender<AdminRequest>,
        providers: Arc<Registry>,
        metrics: Arc<Metrics>,
        peers: Arc<PeerMemory>,
    ) -> Self {
        Self {
            agent,
            providers,
            metrics,
            peers,
        }
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> AdminRequest,
    ) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.agent
            .send(make(tx))
            .await
            .map_err(|_| Status::unavailable("the core is shutting down"))?;
        rx.await
            .map_err(|_| Status::unavailable("the core is shutting down"))
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        // The health checks ask `GetInfo` only now and then; a person or a
        // script asking for the status gets what the providers say now
        // (their certificates, their node-pair sessions).
        self.providers.refresh_info(STATUS_INFO_TIMEOUT).await;
        self.ask(AdminRequest::Status).await.map(Response::new)
    }

    async fn list_connections(
        &self,
        _: Request<pb::ListConnectionsRequest>,
    ) -> Result<Response<pb::ListConnectionsResponse>, Status> {
        self.ask(AdminRequest::Connections).await.map(Response::new)
    }

    async fn list_outcomes(
        &self,
        request: Request<pb::ListOutcomesRequest>,
    ) -> Result<Response<pb::ListOutcomesResponse>, Status> {
        let after = request.into_inner().after;
        self.ask(|reply| AdminRequest::Outcomes(after, reply))
            .await
            .map(Response::new)
    }

    async fn use_provider(
        &self,
        request: Request<pb::UseProviderRequest>,
    ) -> Result<Response<pb::UseProviderResponse>, Status> {
        let pb::UseProviderRequest { name, force } = request.into_inner();
        let previous = self
            .providers
            .use_provider(&name, force, SWITCH_HEALTH_TIMEOUT)
            .await
            .map_err(|e| match e {
                SwitchError::Unknown { .. } => Status::not_found(e.to_string()),
                SwitchError::NotServing { .. } => Status::failed_precondition(e.to_string()),
            })?;
        self.metrics.provider_switches.inc();
        self.metrics
            .set_active_provider(self.providers.all().map(|p| p.name.as_str()), &name);
        Ok(Response::new(pb::UseProviderResponse {
            previous,
            active: name,
        }))
    }

    async fn list_peers(
        &self,
        _: Request<pb::ListPeersRequest>,
    ) -> Result<Response<pb::ListPeersResponse>, Status> {
        self.ask(AdminRequest::Peers).await.map(Response::new)
    }

    async fn forget_peers(
        &self,
        request: Request<pb::ForgetPeersRequest>,
    ) -> Result<Response<pb::ForgetPeersResponse>, Status> {
        let pb::ForgetPeersRequest { peers, all } = request.into_inner();
        if all != peers.is_empty() {
            return Err(Status::invalid_argument(
                "name the peers to forget, or ask for all of them, not both",
            ));
        }
        let forgotten = self.peers.forget(&peers).map_err(|e| {
            Status::internal(format!(
                "forgotten until the core restarts, but not written: {e}"
            ))
        })?;
        // The gauge follows with the next stats tick (once a second).
        Ok(Response::new(pb::ForgetPeersResponse { forgotten }))
    }

    async fn reload_policy(
        &self,
        _: Request<pb::ReloadPolicyRequest>,
    ) -> Result<Response<pb::ReloadPolicyResponse>, Status> {
        match self.ask(AdminRequest::ReloadPolicy).await? {
            Ok(policy) => Ok(Response::new(pb::ReloadPolicyResponse {
                policy: Some(policy),
            })),
            Err(reason) => Err(Status::failed_precondition(format!(
                "policy not reloaded (the old one stays): {reason}"
            ))),
        }
    }
}

/// Binds `socket` (mode 0600, root only) and serves until the task is dropped.
pub fn serve(
    socket: PathBuf,
    service: AdminService,
) -> Result<tokio::task::JoinHandle<()>, ServeError> {
    let listener = bind_private(&socket, None)?;
    info!(socket = %socket.display(), "admin API listening");
    Ok(tokio::spawn(async move {
        let incoming = allowed_connections(listener, None);
        let result = tonic::transport::Server::builder()
            .add_service(pb::admin_server::AdminServer::new(service))
            .serve_with_incoming(incoming)
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "admin API stopped");
        }
        let _ = std::fs::remove_file(&socket);
    }))
}
