//! The tlshub core's administration API, v1: the generated gRPC code
//! ([`pb`]) and a client that dials the core's Unix socket. The core serves
//! it (root only); `tlshubctl` is its command-line client.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod stats;
pub mod tls_stat;

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// Generated from `proto/proto/tlshub/admin/v1/admin.proto`.
#[expect(missing_docs, reason = "generated code; the .proto file documents it")]
pub mod pb {
    tonic::include_proto!("tlshub.admin.v1");
}

/// The default socket of the admin API.
pub const DEFAULT_SOCKET: &str = "/run/tlshub/admin.sock";

/// Why the admin API could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The socket does not accept connections.
    #[error(
        "cannot connect to the tlshub core at {path}: {source} (is tlshub-core running, and are you root?)"
    )]
    Connect {
        /// The core's admin socket.
        path: PathBuf,
        /// The transport's error (no socket there, permission denied, ...).
        #[source]
        source: tonic::transport::Error,
    },
}

/// Connects to the admin API at `path`.
pub async fn connect(path: &Path) -> Result<pb::admin_client::AdminClient<Channel>, ConnectError> {
    let socket = path.to_owned();
    let channel = Endpoint::from_static("http://tlshub-core.invalid")
        .connect_timeout(Duration::from_secs(2))
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(&socket).await?)) }
        }))
        .await
        .map_err(|source| ConnectError::Connect {
            path: path.to_owned(),
            source,
        })?;
    Ok(pb::admin_client::AdminClient::new(channel))
}
