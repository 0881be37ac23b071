//! Provider API v1 for tlshub, and an SDK for writing key providers.
//!
//! A provider is a separate process that `capture-core` asks for the kTLS
//! keys of each protected TCP connection, over gRPC on a Unix socket.
//! Provider authors implement [`Provider`] over the SDK-owned types in
//! [`types`] and call [`server::serve`]; the SDK owns the socket, the peer
//! credential check, health reporting, graceful shutdown and the mapping of
//! [`ProviderError`] to gRPC status codes. `PROVIDER_GUIDE.md` (next to this
//! crate) walks through writing, testing and deploying one.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod admission;
pub mod cidr;
pub mod client;
pub mod error;
pub mod file_stamp;
pub mod handshake;
pub mod handshake_config;
pub mod keylog;
pub mod keys_stream;
pub mod metrics;
pub mod node_map;
pub mod runtime;
pub mod server;
pub mod socket;
pub mod tls13;
pub mod types;

pub use error::ProviderError;
pub use server::{Provider, RELOAD_CHECK_EVERY, Reload, ServeOptions, run, serve};
pub use types::{
    CipherSuite, ConnectionId, ConnectionKeys, Credential, DirectionKeys, Endpoint,
    KEYING_TLS13_HANDSHAKE, KEYING_TLS13_NODE_PAIR, KeyRequest, PeerSession, ProviderInfo, Role,
    SocketHandle, TlsVersion, keying_id,
};

/// The API version this SDK speaks.
pub const API_VERSION: u32 = 1;

/// Generated protobuf and gRPC code for `tlshub.provider.v1`. Provider
/// authors do not need it; the core and conformance tests use it.
#[expect(missing_docs, reason = "generated code")]
pub mod pb {
    tonic::include_proto!("tlshub.provider.v1");
}
