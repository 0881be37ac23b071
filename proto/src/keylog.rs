//! The core's key export (`tlshub-core --keylog-file`, for tests and
//! debugging only, like `SSLKEYLOGFILE`): one JSON line per installed
//! connection with the keys in both directions, so that a packet capture
//! can be decrypted. The core writes [`KeyLogRecord`]s and the test bed
//! reads them back as the same type.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::ConnectionKeys;

/// One connection's installed keys. Zeroized on drop; `Debug` hides the
/// key bytes.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct KeyLogRecord {
    /// The socket cookie of the connection on the writing node.
    #[zeroize(skip)]
    pub cookie: u64,
    /// This node's end.
    #[zeroize(skip)]
    pub local: SocketAddr,
    /// The peer's end.
    #[zeroize(skip)]
    pub remote: SocketAddr,
    /// The TLS version, as `Tls13` or `Tls12`.
    pub version: String,
    /// The kTLS cipher (`aes-gcm-128`, `aes-gcm-256`, `chacha20-poly1305`).
    pub suite: String,
    /// The key this node sends with.
    #[serde(with = "hex_bytes")]
    pub tx_key: Vec<u8>,
    /// The nonce base this node sends with.
    #[serde(with = "hex_bytes")]
    pub tx_iv: Vec<u8>,
    /// The key this node receives with.
    #[serde(with = "hex_bytes")]
    pub rx_key: Vec<u8>,
    /// The nonce base this node receives with.
    #[serde(with = "hex_bytes")]
    pub rx_iv: Vec<u8>,
}

impl KeyLogRecord {
    /// The record of `keys`, installed on connection `cookie` from `local`
    /// to `remote`.
    pub fn new(cookie: u64, local: SocketAddr, remote: SocketAddr, keys: &ConnectionKeys) -> Self {
        Self {
            cookie,
            local,
            remote,
            version: format!("{:?}", keys.version),
            suite: keys.cipher_suite.to_string(),
            tx_key: keys.transmit.key.clone(),
            tx_iv: keys.transmit.iv.clone(),
            rx_key: keys.receive.key.clone(),
            rx_iv: keys.receive.iv.clone(),
        }
    }
}

impl std::fmt::Debug for KeyLogRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyLogRecord")
            .field("cookie", &self.cookie)
            .field("local", &self.local)
            .field("remote", &self.remote)
            .field("version", &self.version)
            .field("suite", &self.suite)
            .finish_non_exhaustive()
    }
}

/// Bytes as a lowercase hex string.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CipherSuite, DirectionKeys, TlsVersion};

    #[test]
    fn a_record_reads_back_as_written_and_debug_hides_keys() {
        let keys = ConnectionKeys {
            version: TlsVersion::Tls13,
            cipher_suite: CipherSuite::Aes128Gcm,
            transmit: DirectionKeys {
                key: vec![0xab; 16],
                iv: vec![1; 12],
                record_sequence: 0,
            },
            receive: DirectionKeys {
                key: vec![0xcd; 16],
                iv: vec![2; 12],
                record_sequence: 0,
            },
        };
        let r = KeyLogRecord::new(
            7,
            "10.0.1.2:40000".parse().unwrap(),
            "10.0.2.2:8443".parse().unwrap(),
            &keys,
        );
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.contains("\"tx_key\":\"abababab"), "{line}");
        assert!(line.contains("\"suite\":\"aes-gcm-128\""), "{line}");
        let back: KeyLogRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back, r);
        let debug = format!("{r:?}");
        assert!(!debug.contains("ab") && !debug.contains("171"), "{debug}");
    }
}
