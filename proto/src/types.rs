//! SDK-owned request and answer types, and their checked conversion from
//! and to the wire types in [`crate::pb`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::pb;

/// Which end of the TCP connection this side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// This side called `connect()`.
    Client,
    /// This side returned from `accept()`.
    Server,
}

/// TLS protocol version of the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsVersion {
    /// TLS 1.2 (AES-GCM only).
    Tls12,
    /// TLS 1.3.
    Tls13,
}

/// Record cipher of the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CipherSuite {
    /// AES-128-GCM.
    Aes128Gcm,
    /// AES-256-GCM.
    Aes256Gcm,
    /// ChaCha20-Poly1305 (TLS 1.3 only).
    Chacha20Poly1305,
}

impl CipherSuite {
    /// Key length in bytes.
    pub fn key_len(self) -> usize {
        match self {
            Self::Aes128Gcm => 16,
            Self::Aes256Gcm | Self::Chacha20Poly1305 => 32,
        }
    }

    /// IV (nonce base) length in bytes; 12 for every supported suite.
    pub fn iv_len(self) -> usize {
        12
    }

    /// Short lowercase name, as the kernel prints it (`aes-gcm-128`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Aes128Gcm => "aes-gcm-128",
            Self::Aes256Gcm => "aes-gcm-256",
            Self::Chacha20Poly1305 => "chacha20-poly1305",
        }
    }
}

impl fmt::Display for CipherSuite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a provider can take a duplicate of the application's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketHandle {
    /// The process (the core) holding the duplicate.
    pub pid: u32,
    /// The fd number in that process.
    pub fd: i32,
}

/// An address and port of one end of the connection.
pub type Endpoint = SocketAddr;

/// A request for the keys of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRequest {
    /// The socket cookie (`SO_COOKIE`) of the application's socket.
    pub socket_cookie: u64,
    /// This side's role.
    pub role: Role,
    /// This side's address.
    pub local: Endpoint,
    /// The peer's address.
    pub remote: Endpoint,
    /// This side's TCP initial sequence number.
    pub local_isn: u32,
    /// The peer's TCP initial sequence number.
    pub remote_isn: u32,
    /// This node's name.
    pub node_name: String,
    /// The socket, for providers that handshake over the connection.
    pub socket: Option<SocketHandle>,
    /// How long the core waits for the answer.
    pub timeout: std::time::Duration,
}

/// Key material for one direction. Zeroized on drop; `Debug` shows lengths only.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct DirectionKeys {
    /// The record key.
    pub key: Vec<u8>,
    /// The 12-byte nonce base (see the proto file for TLS 1.2).
    pub iv: Vec<u8>,
    /// The sequence number of the next record.
    pub record_sequence: u64,
}

impl fmt::Debug for DirectionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectionKeys")
            .field("key", &format_args!("<{} bytes redacted>", self.key.len()))
            .field("iv", &format_args!("<{} bytes redacted>", self.iv.len()))
            .field("record_sequence", &self.record_sequence)
            .finish()
    }
}

/// The keys of one connection, as the core installs them with kTLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionKeys {
    /// TLS version of the records.
    pub version: TlsVersion,
    /// Record cipher.
    pub cipher_suite: CipherSuite,
    /// Keys for bytes this side sends.
    pub transmit: DirectionKeys,
    /// Keys for bytes this side receives.
    pub receive: DirectionKeys,
}

/// One connection named the same way on both nodes (client first), for
/// providers that derive keys from it: `context()` is the 44-byte
/// big-endian encoding `client_ip(16, IPv4 as ::ffff:a.b.c.d) ||
/// client_port || server_ip(16) || server_port || client_isn || server_isn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionId {
    /// The connecting side.
    pub client: SocketAddr,
    /// The accepting side.
    pub server: SocketAddr,
    /// The client's initial sequence number.
    pub client_isn: u32,
    /// The server's initial sequence number.
    pub server_isn: u32,
}

impl ConnectionId {
    /// The identity as both nodes see it, from one node's request.
    pub fn of(request: &KeyRequest) -> Self {
        match request.role {
            Role::Client => Self {
                client: request.local,
                server: request.remote,
                client_isn: request.local_isn,
                server_isn: request.remote_isn,
            },
            Role::Server => Self {
                client: request.remote,
                server: request.local,
                client_isn: request.remote_isn,
                server_isn: request.local_isn,
            },
        }
    }

    /// The 44-byte derivation context.
    pub fn context(&self) -> [u8; 44] {
        let mut c = [0u8; 44];
        c[0..16].copy_from_slice(&mapped(self.client));
        c[16..18].copy_from_slice(&self.client.port().to_be_bytes());
        c[18..34].copy_from_slice(&mapped(self.server));
        c[34..36].copy_from_slice(&self.server.port().to_be_bytes());
        c[36..40].copy_from_slice(&self.client_isn.to_be_bytes());
        c[40..44].copy_from_slice(&self.server_isn.to_be_bytes());
        c
    }
}

fn mapped(a: SocketAddr) -> [u8; 16] {
    match a {
        SocketAddr::V4(v4) => v4.ip().to_ipv6_mapped().octets(),
        SocketAddr::V6(v6) => v6.ip().octets(),
    }
}

/// A provider's description of itself. `Default` so that a provider can
/// end its literal with `..Default::default()` and keep compiling when a
/// later SDK adds a field (as it added `peer_sessions`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProviderInfo {
    /// Short name (`openssl`, `tlshub`, ...).
    pub name: String,
    /// The provider's own version.
    pub version: String,
    /// TLS versions it can produce keys for.
    pub tls_versions: Vec<TlsVersion>,
    /// Cipher suites it can produce keys for.
    pub cipher_suites: Vec<CipherSuite>,
    /// Whether it handshakes over the application's connection.
    pub needs_socket: bool,
    /// What it holds that expires (its certificate), as loaded now.
    pub credentials: Vec<Credential>,
    /// The keying protocol it speaks (see [`keying_id`]); empty: not said.
    pub keying: String,
    /// A node-pair provider's sessions, one per peer node; empty for
    /// others. `tlshubctl status` shows them.
    pub peer_sessions: Vec<PeerSession>,
}

/// The sessions a node-pair provider keeps with one peer node (see the
/// proto's `PeerSession`). Times are seconds since the Unix epoch, 0 for
/// none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerSession {
    /// The peer node's name.
    pub peer: String,
    /// Session generations held: 0 means connections with that node fail
    /// at their key timeout; 2 while a replacement drains.
    pub generations: u32,
    /// When the newest session came up.
    pub up_since_unix_seconds: i64,
    /// When this node replaces it (it dials the peer); 0 when the peer
    /// dials and so decides.
    pub renew_at_unix_seconds: i64,
    /// Sessions set up since the provider started (replacements count).
    pub sessions_total: u64,
    /// Why the last attempt failed, if it did after the newest session
    /// came up; empty otherwise.
    pub last_error: String,
    /// When that attempt failed.
    pub last_error_unix_seconds: i64,
}

impl PeerSession {
    fn to_pb(&self) -> pb::PeerSession {
        pb::PeerSession {
            peer: self.peer.clone(),
            generations: self.generations,
            up_since_unix_seconds: self.up_since_unix_seconds,
            renew_at_unix_seconds: self.renew_at_unix_seconds,
            sessions_total: self.sessions_total,
            last_error: self.last_error.clone(),
            last_error_unix_seconds: self.last_error_unix_seconds,
        }
    }

    fn from_pb(p: pb::PeerSession) -> Self {
        Self {
            peer: p.peer,
            generations: p.generations,
            up_since_unix_seconds: p.up_since_unix_seconds,
            renew_at_unix_seconds: p.renew_at_unix_seconds,
            sessions_total: p.sessions_total,
            last_error: p.last_error,
            last_error_unix_seconds: p.last_error_unix_seconds,
        }
    }
}

/// The keying protocol of the TLS 1.3 handshake providers (OpenSSL,
/// BoringSSL): a full handshake over the application's connection.
pub const KEYING_TLS13_HANDSHAKE: &str = "tls13-handshake";

/// The keying protocol of the TLS 1.3 handshake providers in node-pair
/// mode: keys exported from one session per node pair.
pub const KEYING_TLS13_NODE_PAIR: &str = "tls13-node-pair";

/// The one-byte form of a keying protocol name, which the core announces
/// in the TCP handshake: 0 for an empty name (not said), else 1 to 255 from
/// a 32-bit FNV-1a hash of the name. Two different names can share a byte
/// (1 in 255): the check then lets them meet, and their keying fails as it
/// would without the check.
pub fn keying_id(keying: &str) -> u8 {
    if keying.is_empty() {
        return 0;
    }
    let hash = keying.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    // 1..=255: never 0, which means "not said".
    (hash % 255) as u8 + 1
}

/// A credential a provider holds, with its expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// What it is (`certificate /etc/tlshub/certs/node.pem`).
    pub name: String,
    /// Its expiry (a certificate's notAfter), seconds since the Unix epoch.
    pub not_after_unix_seconds: i64,
}

/// A wire message that does not make a valid SDK value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// A required field is absent or unspecified.
    #[error("field `{field}` is missing")]
    Missing {
        /// The field.
        field: &'static str,
    },
    /// An enum field holds a value this SDK does not know.
    #[error("field `{field}` has unknown value {value}")]
    UnknownEnum {
        /// The field.
        field: &'static str,
        /// The raw value.
        value: i32,
    },
    /// An address is neither 4 nor 16 bytes.
    #[error("field `{field}` has an address of {len} bytes (want 4 or 16)")]
    AddressLength {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// A port is above 65535.
    #[error("field `{field}` has port {port} (above 65535)")]
    Port {
        /// The field.
        field: &'static str,
        /// The value.
        port: u32,
    },
    /// Key or IV of the wrong length for the cipher suite.
    #[error("{direction} {what} is {len} bytes, {suite} needs {want}")]
    KeyLength {
        /// `transmit` or `receive`.
        direction: &'static str,
        /// `key` or `iv`.
        what: &'static str,
        /// The length received.
        len: usize,
        /// The length required.
        want: usize,
        /// The suite.
        suite: CipherSuite,
    },
    /// A suite that does not exist in the given TLS version.
    #[error("{suite} is not a TLS 1.2 cipher suite")]
    SuiteVersion {
        /// The suite.
        suite: CipherSuite,
    },
    /// Both directions carry the same key, which would reuse nonces.
    #[error("transmit and receive keys are identical")]
    SameKeys,
}

impl ConnectionKeys {
    /// Checks lengths and combinations; the core refuses keys that fail this.
    pub fn validate(&self) -> Result<(), WireError> {
        if self.version == TlsVersion::Tls12 && self.cipher_suite == CipherSuite::Chacha20Poly1305 {
            return Err(WireError::SuiteVersion {
                suite: self.cipher_suite,
            });
        }
        for (direction, keys) in [("transmit", &self.transmit), ("receive", &self.receive)] {
            let suite = self.cipher_suite;
            for (what, len, want) in [
                ("key", keys.key.len(), suite.key_len()),
                ("iv", keys.iv.len(), suite.iv_len()),
            ] {
                if len != want {
                    return Err(WireError::KeyLength {
                        direction,
                        what,
                        len,
                        want,
                        suite,
                    });
                }
            }
        }
        if self.transmit.key == self.receive.key && self.transmit.iv == self.receive.iv {
            return Err(WireError::SameKeys);
        }
        Ok(())
    }
}

impl Role {
    fn to_pb(self) -> pb::Role {
        match self {
            Self::Client => pb::Role::Client,
            Self::Server => pb::Role::Server,
        }
    }
    fn from_pb(v: i32) -> Result<Self, WireError> {
        match pb::Role::try_from(v) {
            Ok(pb::Role::Client) => Ok(Self::Client),
            Ok(pb::Role::Server) => Ok(Self::Server),
            Ok(pb::Role::Unspecified) => Err(WireError::Missing { field: "role" }),
            Err(_) => Err(WireError::UnknownEnum {
                field: "role",
                value: v,
            }),
        }
    }
}

impl TlsVersion {
    /// The wire value.
    pub fn to_pb(self) -> pb::TlsVersion {
        match self {
            Self::Tls12 => pb::TlsVersion::TlsVersion12,
            Self::Tls13 => pb::TlsVersion::TlsVersion13,
        }
    }
    fn from_pb(field: &'static str, v: i32) -> Result<Self, WireError> {
        match pb::TlsVersion::try_from(v) {
            Ok(pb::TlsVersion::TlsVersion12) => Ok(Self::Tls12),
            Ok(pb::TlsVersion::TlsVersion13) => Ok(Self::Tls13),
            Ok(pb::TlsVersion::Unspecified) => Err(WireError::Missing { field }),
            Err(_) => Err(WireError::UnknownEnum { field, value: v }),
        }
    }
}

impl CipherSuite {
    /// The wire value.
    pub fn to_pb(self) -> pb::CipherSuite {
        match self {
            Self::Aes128Gcm => pb::CipherSuite::Aes128Gcm,
            Self::Aes256Gcm => pb::CipherSuite::Aes256Gcm,
            Self::Chacha20Poly1305 => pb::CipherSuite::Chacha20Poly1305,
        }
    }
    fn from_pb(field: &'static str, v: i32) -> Result<Self, WireError> {
        match pb::CipherSuite::try_from(v) {
            Ok(pb::CipherSuite::Aes128Gcm) => Ok(Self::Aes128Gcm),
            Ok(pb::CipherSuite::Aes256Gcm) => Ok(Self::Aes256Gcm),
            Ok(pb::CipherSuite::Chacha20Poly1305) => Ok(Self::Chacha20Poly1305),
            Ok(pb::CipherSuite::Unspecified) => Err(WireError::Missing { field }),
            Err(_) => Err(WireError::UnknownEnum { field, value: v }),
        }
    }
}

fn endpoint_to_pb(e: &Endpoint) -> pb::Endpoint {
    let address = match e.ip() {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    pb::Endpoint {
        address,
        port: u32::from(e.port()),
    }
}

fn endpoint_from_pb(field: &'static str, e: Option<pb::Endpoint>) -> Result<Endpoint, WireError> {
    let e = e.ok_or(WireError::Missing { field })?;
    let ip = match e.address.len() {
        4 => IpAddr::V4(Ipv4Addr::new(
            e.address[0],
            e.address[1],
            e.address[2],
            e.address[3],
        )),
        16 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&e.address);
            IpAddr::V6(Ipv6Addr::from(o))
        }
        len => return Err(WireError::AddressLength { field, len }),
    };
    let port = u16::try_from(e.port).map_err(|_| WireError::Port {
        field,
        port: e.port,
    })?;
    Ok(SocketAddr::new(ip, port))
}

impl KeyRequest {
    /// The wire form.
    pub fn to_pb(&self) -> pb::ConnectionKeysRequest {
        pb::ConnectionKeysRequest {
            socket_cookie: self.socket_cookie,
            role: self.role.to_pb() as i32,
            local: Some(endpoint_to_pb(&self.local)),
            remote: Some(endpoint_to_pb(&self.remote)),
            local_isn: self.local_isn,
            remote_isn: self.remote_isn,
            node_name: self.node_name.clone(),
            socket: self.socket.map(|s| pb::SocketHandle {
                pid: s.pid,
                fd: s.fd,
            }),
            timeout_ms: u32::try_from(self.timeout.as_millis()).unwrap_or(u32::MAX),
        }
    }

    /// Checked conversion from the wire form.
    pub fn from_pb(r: pb::ConnectionKeysRequest) -> Result<Self, WireError> {
        Ok(Self {
            socket_cookie: r.socket_cookie,
            role: Role::from_pb(r.role)?,
            local: endpoint_from_pb("local", r.local)?,
            remote: endpoint_from_pb("remote", r.remote)?,
            local_isn: r.local_isn,
            remote_isn: r.remote_isn,
            node_name: r.node_name,
            socket: r.socket.map(|s| SocketHandle {
                pid: s.pid,
                fd: s.fd,
            }),
            timeout: std::time::Duration::from_millis(u64::from(r.timeout_ms)),
        })
    }
}

fn direction_to_pb(d: &DirectionKeys) -> pb::DirectionKeys {
    pb::DirectionKeys {
        key: d.key.clone(),
        iv: d.iv.clone(),
        record_sequence: d.record_sequence,
    }
}

fn direction_from_pb(
    field: &'static str,
    d: Option<pb::DirectionKeys>,
) -> Result<DirectionKeys, WireError> {
    let mut d = d.ok_or(WireError::Missing { field })?;
    let out = DirectionKeys {
        key: std::mem::take(&mut d.key),
        iv: std::mem::take(&mut d.iv),
        record_sequence: d.record_sequence,
    };
    Ok(out)
}

impl ConnectionKeys {
    /// The wire form. The caller should zeroize the result after sending.
    pub fn to_pb(&self) -> pb::ConnectionKeys {
        pb::ConnectionKeys {
            version: self.version.to_pb() as i32,
            cipher_suite: self.cipher_suite.to_pb() as i32,
            transmit: Some(direction_to_pb(&self.transmit)),
            receive: Some(direction_to_pb(&self.receive)),
        }
    }

    /// Checked conversion from the wire form, including [`Self::validate`].
    pub fn from_pb(k: pb::ConnectionKeys) -> Result<Self, WireError> {
        let keys = Self {
            version: TlsVersion::from_pb("version", k.version)?,
            cipher_suite: CipherSuite::from_pb("cipher_suite", k.cipher_suite)?,
            transmit: direction_from_pb("transmit", k.transmit)?,
            receive: direction_from_pb("receive", k.receive)?,
        };
        keys.validate()?;
        Ok(keys)
    }
}

/// Zeroes the key and IV bytes of a wire copy of keys (the checked
/// [`ConnectionKeys`] zeroize themselves on drop; the protobuf form does
/// not).
pub(crate) fn zeroize_wire(keys: &mut pb::ConnectionKeys) {
    for d in [keys.transmit.as_mut(), keys.receive.as_mut()]
        .into_iter()
        .flatten()
    {
        zeroize::Zeroize::zeroize(&mut d.key);
        zeroize::Zeroize::zeroize(&mut d.iv);
    }
}

impl ProviderInfo {
    /// The wire form.
    pub fn to_pb(&self) -> pb::ProviderInfo {
        pb::ProviderInfo {
            name: self.name.clone(),
            version: self.version.clone(),
            api_version: pb::ApiVersion::V1 as i32,
            tls_versions: self.tls_versions.iter().map(|v| v.to_pb() as i32).collect(),
            cipher_suites: self
                .cipher_suites
                .iter()
                .map(|c| c.to_pb() as i32)
                .collect(),
            needs_socket: self.needs_socket,
            keying: self.keying.clone(),
            // Set by the SDK's server, which serves the stream.
            keys_stream: false,
            credentials: self
                .credentials
                .iter()
                .map(|c| pb::Credential {
                    name: c.name.clone(),
                    not_after_unix_seconds: c.not_after_unix_seconds,
                })
                .collect(),
            peer_sessions: self.peer_sessions.iter().map(PeerSession::to_pb).collect(),
        }
    }

    /// Checked conversion from the wire form; refuses other API versions.
    pub fn from_pb(i: pb::ProviderInfo) -> Result<Self, WireError> {
        if i.api_version != pb::ApiVersion::V1 as i32 {
            return Err(WireError::UnknownEnum {
                field: "api_version",
                value: i.api_version,
            });
        }
        Ok(Self {
            name: i.name,
            version: i.version,
            tls_versions: i
                .tls_versions
                .into_iter()
                .map(|v| TlsVersion::from_pb("tls_versions", v))
                .collect::<Result<_, _>>()?,
            cipher_suites: i
                .cipher_suites
                .into_iter()
                .map(|c| CipherSuite::from_pb("cipher_suites", c))
                .collect::<Result<_, _>>()?,
            needs_socket: i.needs_socket,
            keying: i.keying,
            credentials: i
                .credentials
                .into_iter()
                .map(|c| Credential {
                    name: c.name,
                    not_after_unix_seconds: c.not_after_unix_seconds,
                })
                .collect(),
            peer_sessions: i
                .peer_sessions
                .into_iter()
                .map(PeerSession::from_pb)
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keying_name_is_one_byte_never_zero_and_the_providers_differ() {
        assert_eq!(keying_id(""), 0);
        let ids: Vec<u8> = [KEYING_TLS13_HANDSHAKE, "tlshub-module", "example-psk"]
            .iter()
            .map(|k| keying_id(k))
            .collect();
        assert!(ids.iter().all(|&i| i != 0), "{ids:?}");
        assert!(
            ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2],
            "{ids:?}"
        );
        assert_eq!(keying_id("tlshub-module"), ids[1], "stable");
    }

    fn keys(suite: CipherSuite, tx_len: usize) -> ConnectionKeys {
        ConnectionKeys {
            version: TlsVersion::Tls13,
            cipher_suite: suite,
            transmit: DirectionKeys {
                key: vec![1; tx_len],
                iv: vec![2; 12],
                record_sequence: 0,
            },
            receive: DirectionKeys {
                key: vec![3; suite.key_len()],
                iv: vec![4; 12],
                record_sequence: 0,
            },
        }
    }

    #[test]
    fn key_lengths_are_checked_per_suite() {
        assert!(keys(CipherSuite::Aes128Gcm, 16).validate().is_ok());
        assert!(keys(CipherSuite::Aes256Gcm, 32).validate().is_ok());
        assert!(matches!(
            keys(CipherSuite::Aes256Gcm, 16).validate(),
            Err(WireError::KeyLength {
                want: 32,
                len: 16,
                ..
            })
        ));
    }

    #[test]
    fn chacha_is_refused_under_tls12_and_identical_directions_are_refused() {
        let mut k = keys(CipherSuite::Chacha20Poly1305, 32);
        k.version = TlsVersion::Tls12;
        assert!(matches!(k.validate(), Err(WireError::SuiteVersion { .. })));
        let mut k = keys(CipherSuite::Aes128Gcm, 16);
        k.receive = k.transmit.clone();
        assert_eq!(k.validate(), Err(WireError::SameKeys));
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let k = keys(CipherSuite::Aes128Gcm, 16);
        let s = format!("{k:?}");
        assert!(s.contains("redacted"));
        assert!(!s.contains("[1, 1"));
    }

    #[test]
    fn wire_round_trip_and_malformed_answers() {
        let k = keys(CipherSuite::Aes128Gcm, 16);
        assert_eq!(ConnectionKeys::from_pb(k.to_pb()).unwrap(), k);
        let mut bad = k.to_pb();
        bad.cipher_suite = 99;
        assert!(matches!(
            ConnectionKeys::from_pb(bad),
            Err(WireError::UnknownEnum {
                field: "cipher_suite",
                value: 99
            })
        ));
        let mut bad = k.to_pb();
        bad.receive = None;
        assert_eq!(
            ConnectionKeys::from_pb(bad),
            Err(WireError::Missing { field: "receive" })
        );
    }

    #[test]
    fn request_round_trip_v4_and_v6() {
        for (l, r) in [
            ("10.0.1.2:40000", "10.0.2.2:8443"),
            ("[fd00::1]:1", "[fd00::2]:2"),
        ] {
            let req = KeyRequest {
                socket_cookie: 7,
                role: Role::Client,
                local: l.parse().unwrap(),
                remote: r.parse().unwrap(),
                local_isn: 1,
                remote_isn: 2,
                node_name: "a".into(),
                socket: Some(SocketHandle { pid: 3, fd: 4 }),
                timeout: std::time::Duration::from_millis(2000),
            };
            assert_eq!(KeyRequest::from_pb(req.to_pb()).unwrap(), req);
        }
        let mut bad = KeyRequest::from_pb(pb::ConnectionKeysRequest::default());
        assert_eq!(bad, Err(WireError::Missing { field: "role" }));
        let mut p = pb::ConnectionKeysRequest {
            role: 1,
            ..Default::default()
        };
        p.local = Some(pb::Endpoint {
            address: vec![1, 2, 3],
            port: 1,
        });
        bad = KeyRequest::from_pb(p);
        assert_eq!(
            bad,
            Err(WireError::AddressLength {
                field: "local",
                len: 3
            })
        );
    }
}
