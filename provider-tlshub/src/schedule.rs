//! kTLS keys from the TLSHub master key.
//!
//! The module hands out one 32-byte master key per 4-tuple, the same on
//! both nodes. It is never used as a record key: for every connection and
//! direction we derive a distinct key and IV with TLS 1.3's
//! `HKDF-Expand-Label` (RFC 8446 7.1, SHA-256, the master key as the PRK):
//!
//! ```text
//! context    = client_ip(16) || client_port(2) || server_ip(16) || server_port(2)
//!              || client_isn(4) || server_isn(4)          (44 bytes, big-endian;
//!                                                          IPv4 as ::ffff:a.b.c.d)
//! client key = HKDF-Expand-Label(master, "tlshub c key", context, key_len)
//! client iv  = HKDF-Expand-Label(master, "tlshub c iv",  context, 12)
//! server key = HKDF-Expand-Label(master, "tlshub s key", context, key_len)
//! server iv  = HKDF-Expand-Label(master, "tlshub s iv",  context, 12)
//! ```
//!
//! "client" is the side that called `connect()`. The client transmits with
//! the client key and receives with the server key; the server the reverse.
//! Both TCP initial sequence numbers are in the context, so a new connection
//! on the same 4-tuple (port reuse, same master key) still gets new keys;
//! the two directions use different labels, so they never share a key and
//! nonce sequence. Records are TLS 1.3, starting at sequence 0.
//!
//! The test vectors below were computed independently with
//! `openssl kdf ... HKDF` (mode `EXPAND_ONLY`) over the same info bytes.

pub use tlshub_provider_sdk::ConnectionId;
use tlshub_provider_sdk::tls13::{ExpandError, Hash, hkdf_expand_label};
use tlshub_provider_sdk::{CipherSuite, ConnectionKeys, DirectionKeys, Role, TlsVersion};

fn direction(
    master: &[u8; 32],
    label: &str,
    ctx: &[u8],
    suite: CipherSuite,
) -> Result<DirectionKeys, ExpandError> {
    let mut keys = DirectionKeys {
        key: vec![0; suite.key_len()],
        iv: vec![0; suite.iv_len()],
        record_sequence: 0,
    };
    hkdf_expand_label(
        Hash::Sha256,
        master,
        format!("tlshub {label} key").as_bytes(),
        ctx,
        &mut keys.key,
    )?;
    hkdf_expand_label(
        Hash::Sha256,
        master,
        format!("tlshub {label} iv").as_bytes(),
        ctx,
        &mut keys.iv,
    )?;
    Ok(keys)
}

/// The kTLS keys of one side of the connection.
pub fn derive(
    master: &[u8; 32],
    id: &ConnectionId,
    suite: CipherSuite,
    role: Role,
) -> Result<ConnectionKeys, ExpandError> {
    let ctx = id.context();
    let client = direction(master, "c", &ctx, suite)?;
    let server = direction(master, "s", &ctx, suite)?;
    let (transmit, receive) = match role {
        Role::Client => (client, server),
        Role::Server => (server, client),
    };
    Ok(ConnectionKeys {
        version: TlsVersion::Tls13,
        cipher_suite: suite,
        transmit,
        receive,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tlshub_provider_sdk::KeyRequest;

    fn master() -> [u8; 32] {
        let mut m = [0u8; 32];
        for (i, b) in m.iter_mut().enumerate() {
            *b = i as u8;
        }
        m
    }

    fn id() -> ConnectionId {
        ConnectionId {
            client: "10.0.1.2:40000".parse().unwrap(),
            server: "10.0.2.2:8443".parse().unwrap(),
            client_isn: 0x1111_1111,
            server_isn: 0x2222_2222,
        }
    }

    #[test]
    fn vectors_match_an_independent_hkdf() {
        assert_eq!(
            hex::encode(id().context()),
            "00000000000000000000ffff0a0001029c4000000000000000000000ffff0a00020220fb1111111122222222"
        );
        let k = derive(&master(), &id(), CipherSuite::Aes128Gcm, Role::Client).unwrap();
        assert_eq!(
            hex::encode(&k.transmit.key),
            "79e3c5427888b8570d11afcda6e5fbc3"
        );
        assert_eq!(hex::encode(&k.transmit.iv), "388c9f76627954e2a313419b");
        assert_eq!(
            hex::encode(&k.receive.key),
            "d4652afe242925e171ccdbcb05e51f34"
        );
        assert_eq!(hex::encode(&k.receive.iv), "a61fb4a9084c9bd9aa1003a2");
        let k = derive(&master(), &id(), CipherSuite::Aes256Gcm, Role::Client).unwrap();
        assert_eq!(
            hex::encode(&k.transmit.key),
            "b31b57d2e62aff81e68e09875491042c59ca7d6128727158e4833073ce441d75"
        );
    }

    #[test]
    fn both_nodes_derive_mirrored_keys_from_their_own_requests() {
        let client_req = KeyRequest {
            socket_cookie: 1,
            role: Role::Client,
            local: id().client,
            remote: id().server,
            local_isn: id().client_isn,
            remote_isn: id().server_isn,
            node_name: "a".into(),
            socket: None,
            timeout: std::time::Duration::from_secs(1),
        };
        let server_req = KeyRequest {
            role: Role::Server,
            local: id().server,
            remote: id().client,
            local_isn: id().server_isn,
            remote_isn: id().client_isn,
            node_name: "b".into(),
            ..client_req.clone()
        };
        assert_eq!(ConnectionId::of(&client_req), ConnectionId::of(&server_req));
        let a = derive(
            &master(),
            &ConnectionId::of(&client_req),
            CipherSuite::Aes128Gcm,
            Role::Client,
        )
        .unwrap();
        let b = derive(
            &master(),
            &ConnectionId::of(&server_req),
            CipherSuite::Aes128Gcm,
            Role::Server,
        )
        .unwrap();
        assert_eq!(a.transmit, b.receive);
        assert_eq!(a.receive, b.transmit);
        a.validate().unwrap();
    }

    #[test]
    fn port_reuse_and_directions_never_share_keys() {
        let first = derive(&master(), &id(), CipherSuite::Aes128Gcm, Role::Client).unwrap();
        let reused = ConnectionId {
            client_isn: 0x3333_3333,
            server_isn: 0x4444_4444,
            ..id()
        };
        let second = derive(&master(), &reused, CipherSuite::Aes128Gcm, Role::Client).unwrap();
        assert_ne!(first.transmit.key, second.transmit.key);
        assert_ne!(first.transmit.iv, second.transmit.iv);
        assert_ne!(first.transmit.key, first.receive.key);
        assert_ne!(first.transmit.iv, first.receive.iv);
    }
}
