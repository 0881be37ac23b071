//! What both nodes of a node-pair session derive from it, with no byte on
//! the application's connection: a generation id, each connection's kTLS
//! keys, and the keys that authenticate the session's own messages. All of
//! it is the TLS 1.3 exporter (RFC 8446 section 7.5) of the session, so the
//! OpenSSL and BoringSSL providers derive the same bytes.

use zeroize::Zeroizing;

use crate::tls13::{ExpandError, Hash, export};
use crate::{CipherSuite, ConnectionId, ConnectionKeys, DirectionKeys, Role, TlsVersion};

/// Exporter label of the generation id.
const LABEL_GENERATION: &[u8] = b"EXPORTER-tlshub-node-pair generation";
/// Exporter label of the bytes the connecting side sends.
const LABEL_CLIENT_WRITE: &[u8] = b"EXPORTER-tlshub-node-pair client write";
/// Exporter label of the bytes the accepting side sends.
const LABEL_SERVER_WRITE: &[u8] = b"EXPORTER-tlshub-node-pair server write";
/// Exporter label of the session messages the dialing node sends.
const LABEL_DIALER_MESSAGES: &[u8] = b"EXPORTER-tlshub-node-pair dialer messages";
/// Exporter label of the session messages the accepting node sends.
const LABEL_ACCEPTOR_MESSAGES: &[u8] = b"EXPORTER-tlshub-node-pair acceptor messages";

/// Bytes of a connection's identity, [`ConnectionId::context`]: what makes
/// a TCP connection unique, in the same order on both ends. Both ISNs are
/// chosen by the two kernels (the core never keys a socket in TCP repair
/// mode, whose ISNs the application sets), so within one generation two
/// connections get the same identity only if one 4-tuple is reused with
/// the same two ISNs.
pub const IDENTITY_LEN: usize = 44;

/// A generation's id: the first 8 bytes both ends export from it.
pub type GenerationId = [u8; 8];

/// One node-pair session's secret, as both nodes hold it. Zeroized on
/// drop; `Debug` shows the id and suite only.
pub struct Generation {
    id: GenerationId,
    suite: CipherSuite,
    exporter: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("id", &hex::encode(self.id))
            .field("suite", &self.suite)
            .finish_non_exhaustive()
    }
}

impl Generation {
    /// The generation of a session that negotiated `suite` and whose
    /// `exporter_master_secret` is `secret`.
    pub fn new(suite: CipherSuite, secret: &[u8]) -> Result<Self, ExpandError> {
        let mut id = [0u8; 8];
        export(
            Hash::of_suite(suite),
            secret,
            LABEL_GENERATION,
            b"",
            &mut id,
        )?;
        Ok(Self {
            id,
            suite,
            exporter: Zeroizing::new(secret.to_vec()),
        })
    }

    /// Its id, the same on both nodes.
    pub fn id(&self) -> GenerationId {
        self.id
    }

    /// The suite every connection keyed from it uses.
    pub fn suite(&self) -> CipherSuite {
        self.suite
    }

    /// The kTLS keys of the connection `identity` for the side `role`:
    /// each direction's key and IV exported with that direction's label
    /// over the identity, from record 0.
    pub fn connection_keys(
        &self,
        identity: &ConnectionId,
        role: Role,
    ) -> Result<ConnectionKeys, ExpandError> {
        let context = identity.context();
        let direction = |label: &[u8]| -> Result<DirectionKeys, ExpandError> {
            let (key_len, iv_len) = (self.suite.key_len(), self.suite.iv_len());
            let mut both = Zeroizing::new(vec![0u8; key_len + iv_len]);
            export(
                Hash::of_suite(self.suite),
                &self.exporter,
                label,
                &context,
                &mut both,
            )?;
            Ok(DirectionKeys {
                key: both[..key_len].to_vec(),
                iv: both[key_len..].to_vec(),
                record_sequence: 0,
            })
        };
        let client_write = direction(LABEL_CLIENT_WRITE)?;
        let server_write = direction(LABEL_SERVER_WRITE)?;
        let (transmit, receive) = match role {
            Role::Client => (client_write, server_write),
            Role::Server => (server_write, client_write),
        };
        Ok(ConnectionKeys {
            version: TlsVersion::Tls13,
            cipher_suite: self.suite,
            transmit,
            receive,
        })
    }

    /// The key that authenticates the session messages sent by the dialing
    /// node (`dialer`) or by the accepting one.
    pub fn message_key(&self, dialer: bool) -> Result<Zeroizing<[u8; 32]>, ExpandError> {
        let label = if dialer {
            LABEL_DIALER_MESSAGES
        } else {
            LABEL_ACCEPTOR_MESSAGES
        };
        let mut key = Zeroizing::new([0u8; 32]);
        export(
            Hash::of_suite(self.suite),
            &self.exporter,
            label,
            b"",
            &mut key[..],
        )?;
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyRequest;

    fn request(
        role: Role,
        local: &str,
        remote: &str,
        local_isn: u32,
        remote_isn: u32,
    ) -> KeyRequest {
        KeyRequest {
            socket_cookie: 9,
            role,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            local_isn,
            remote_isn,
            node_name: "n".into(),
            socket: None,
            timeout: std::time::Duration::from_secs(1),
        }
    }

    /// The two ends of one connection name it the same way.
    #[test]
    fn both_ends_see_one_identity() {
        let c = request(Role::Client, "10.0.1.2:40000", "10.0.2.2:8443", 111, 222);
        let s = request(Role::Server, "10.0.2.2:8443", "10.0.1.2:40000", 222, 111);
        assert_eq!(ConnectionId::of(&c), ConnectionId::of(&s));
        let e = ConnectionId::of(&c).context();
        assert_eq!(
            hex::encode(e),
            concat!(
                "00000000000000000000ffff0a000102",
                "9c40",
                "00000000000000000000ffff0a000202",
                "20fb",
                "0000006f",
                "000000de"
            )
        );
    }

    /// Fixed vectors: an exporter secret and what both nodes derive from
    /// it. `EXPORTER-tlshub-node-pair ...` exports of this secret were
    /// checked against OpenSSL's own `SSL_export_keying_material` (the
    /// provider-openssl test `the_exporter_matches_openssl`); these pin
    /// the labels and the identity encoding.
    #[test]
    fn fixed_vectors() {
        let secret = [0x42u8; 32];
        let g = Generation::new(CipherSuite::Aes128Gcm, &secret).unwrap();
        let identity = ConnectionId {
            client: "10.0.1.2:40000".parse().unwrap(),
            server: "10.0.2.2:8443".parse().unwrap(),
            client_isn: 111,
            server_isn: 222,
        };
        let c = g.connection_keys(&identity, Role::Client).unwrap();
        let s = g.connection_keys(&identity, Role::Server).unwrap();
        assert_eq!(c.transmit, s.receive);
        assert_eq!(c.receive, s.transmit);
        c.validate().unwrap();
        let pinned = [
            hex::encode(g.id()),
            hex::encode(&c.transmit.key),
            hex::encode(&c.transmit.iv),
            hex::encode(&c.receive.key),
            hex::encode(&c.receive.iv),
            hex::encode(&g.message_key(true).unwrap()[..]),
        ];
        assert_eq!(pinned, FIXED, "{pinned:#?}");
        // Anything else in the identity gives other keys.
        for other in [
            ConnectionId {
                client_isn: 112,
                ..identity
            },
            ConnectionId {
                server_isn: 223,
                ..identity
            },
            ConnectionId {
                client: "10.0.1.2:40001".parse().unwrap(),
                ..identity
            },
            ConnectionId {
                server: "10.0.2.3:8443".parse().unwrap(),
                ..identity
            },
        ] {
            let o = g.connection_keys(&other, Role::Client).unwrap();
            assert_ne!(o.transmit.key, c.transmit.key, "{other:?}");
            assert_ne!(o.transmit.iv, c.transmit.iv, "{other:?}");
        }
        let g384 = Generation::new(CipherSuite::Aes256Gcm, &[0x42u8; 48]).unwrap();
        let k = g384.connection_keys(&identity, Role::Server).unwrap();
        assert_eq!((k.transmit.key.len(), k.transmit.iv.len()), (32, 12));
        assert!(!format!("{g:?}").contains("4242"));
    }

    /// Generation id; client write key and IV; server write key and IV;
    /// the dialer's message key.
    const FIXED: [&str; 6] = [
        "37468c562f0e4bdf",
        "c222957e3d10d52a8bd69e544cab9c9d",
        "4c70c208704c09ea99ec2da1",
        "d87033ffc51d27ce5ee2d703c9f87053",
        "7def747d29d8ad3034caabb7",
        "01ac85cb30b346beaeca337454cf48dfe5dfd190c7d4e1a3600e0429aaf90946",
    ];
}
