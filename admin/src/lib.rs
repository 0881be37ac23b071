//! The tlshub core's administration API, v1: the generated gRPC code
//! ([`pb`]) and a client that dials the core's Unix socket. The core serves
//! it (root only); `tlshubctl` is its command-line client.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod ab;
pub mod preflight;
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

/// What `tlshubctl --json` prints on stdout instead of an answer when a
/// command fails; its exit status says the same ([`CtlErrorKind::exit_code`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CtlFailure {
    /// Why.
    pub error: CtlError,
}

/// A failed `tlshubctl` command.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CtlError {
    /// What kind of failure.
    pub kind: CtlErrorKind,
    /// What happened, for people.
    pub message: String,
}

/// How a `tlshubctl` command failed, each with its own exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CtlErrorKind {
    /// The core answered with an error (exit 1).
    Refused,
    /// Nothing listens at the admin socket (exit 3).
    NoCore,
    /// The admin socket is root-only, or the core refused this user (exit 4).
    NotPermitted,
    /// Any other failure to reach the core (exit 6).
    Unreachable,
}

impl CtlErrorKind {
    /// `tlshubctl`'s exit status for it.
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Refused => 1,
            Self::NoCore => 3,
            Self::NotPermitted => 4,
            Self::Unreachable => 6,
        }
    }
}

/// The default socket of the admin API.
pub const DEFAULT_SOCKET: &str = "/run/tlshub/admin.sock";

/// Why the admin API could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nothing listens at the path: no socket file, or a stale one that
    /// refuses connections (the core is not running).
    #[error("no tlshub-core is listening at {path} ({reason}): is tlshub-core running?")]
    NoCore {
        /// The core's admin socket.
        path: PathBuf,
        /// "no such socket" or "connection refused".
        reason: &'static str,
    },
    /// The socket is there but this user may not use it (root only).
    #[error("not permitted to use {path}: the admin socket is root-only")]
    NotPermitted {
        /// The core's admin socket.
        path: PathBuf,
    },
    /// Any other failure to connect.
    #[error("cannot connect to the tlshub core at {path}: {source}")]
    Connect {
        /// The core's admin socket.
        path: PathBuf,
        /// The transport's error.
        #[source]
        source: tonic::transport::Error,
    },
}

/// The first I/O error in `e`'s chain of causes.
fn io_error_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cause = c.source();
    }
    None
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
        .map_err(|source| {
            let path = path.to_owned();
            match io_error_kind(&source) {
                Some(std::io::ErrorKind::NotFound) => ConnectError::NoCore {
                    path,
                    reason: "no such socket",
                },
                Some(std::io::ErrorKind::ConnectionRefused) => ConnectError::NoCore {
                    path,
                    reason: "connection refused",
                },
                Some(std::io::ErrorKind::PermissionDenied) => ConnectError::NotPermitted { path },
                _ => ConnectError::Connect { path, source },
            }
        })?;
    Ok(pb::admin_client::AdminClient::new(channel))
}
