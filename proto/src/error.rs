//! Errors a provider returns, and how they travel as gRPC statuses.

use tonic::Code;

/// Why a provider could not produce keys. Each variant maps to one gRPC code
/// (see [`ProviderError::code`]) so the core can tell them apart.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The request is malformed (missing field, bad address length, ...).
    #[error("invalid request: {reason}")]
    InvalidRequest {
        /// What is wrong with it.
        reason: String,
    },
    /// The provider cannot serve this kind of connection (e.g. IPv6).
    #[error("not supported: {what}")]
    Unsupported {
        /// What is not supported.
        what: String,
    },
    /// The peer did not prove its identity (certificate rejected).
    #[error("peer authentication failed: {reason}")]
    PeerAuthentication {
        /// The verification failure.
        reason: String,
    },
    /// The handshake or key agreement failed for another reason.
    #[error("handshake failed: {reason}")]
    Handshake {
        /// The failure.
        reason: String,
    },
    /// The provider gave up waiting (on the peer, a module, ...).
    #[error("timed out after {millis} ms waiting for {waiting_for}")]
    Timeout {
        /// What it waited for.
        waiting_for: String,
        /// How long it waited.
        millis: u64,
    },
    /// The provider could not take the application's socket.
    #[error("cannot take socket fd {fd} of pid {pid}: {source}")]
    Socket {
        /// The core's pid.
        pid: u32,
        /// The fd number in the core.
        fd: i32,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// A dependency of the provider (kernel module, daemon) is not available.
    #[error("unavailable: {reason}")]
    Unavailable {
        /// What is missing, for the log and the core's error message.
        reason: String,
    },
    /// A bug or unexpected state inside the provider.
    #[error("internal error: {reason}")]
    Internal {
        /// What happened.
        reason: String,
    },
}

impl ProviderError {
    /// A short name of the variant, for metric labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. } => "invalid_request",
            Self::Unsupported { .. } => "unsupported",
            Self::PeerAuthentication { .. } => "peer_authentication",
            Self::Handshake { .. } => "handshake",
            Self::Timeout { .. } => "timeout",
            Self::Socket { .. } => "socket",
            Self::Unavailable { .. } => "unavailable",
            Self::Internal { .. } => "internal",
        }
    }

    /// The gRPC code this error travels as.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidRequest { .. } => Code::InvalidArgument,
            Self::Unsupported { .. } => Code::Unimplemented,
            Self::PeerAuthentication { .. } => Code::Unauthenticated,
            Self::Handshake { .. } => Code::Aborted,
            Self::Timeout { .. } => Code::DeadlineExceeded,
            Self::Socket { .. } => Code::FailedPrecondition,
            Self::Unavailable { .. } => Code::Unavailable,
            Self::Internal { .. } => Code::Internal,
        }
    }
}

impl From<ProviderError> for tonic::Status {
    fn from(e: ProviderError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_a_distinct_code() {
        let errors = [
            ProviderError::InvalidRequest { reason: "x".into() },
            ProviderError::Unsupported { what: "x".into() },
            ProviderError::PeerAuthentication { reason: "x".into() },
            ProviderError::Handshake { reason: "x".into() },
            ProviderError::Timeout {
                waiting_for: "x".into(),
                millis: 1,
            },
            ProviderError::Socket {
                pid: 1,
                fd: 1,
                source: std::io::Error::other("x"),
            },
            ProviderError::Unavailable { reason: "x".into() },
            ProviderError::Internal { reason: "x".into() },
        ];
        let mut codes: Vec<i32> = errors.iter().map(|e| e.code() as i32).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), errors.len());
        let mut kinds: Vec<&str> = errors.iter().map(ProviderError::kind).collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), errors.len());
    }
}
