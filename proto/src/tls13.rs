//! The TLS 1.3 key schedule step that turns a traffic secret into record
//! keys (RFC 8446 section 7.3), for providers that run a TLS 1.3 handshake
//! and export its traffic secrets.

use hkdf::Hkdf;
use sha2::{Sha256, Sha384};

use zeroize::Zeroizing;

use crate::error::ProviderError;
use crate::types::{CipherSuite, ConnectionKeys, DirectionKeys, Role, TlsVersion};

/// The hash of an HKDF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    /// SHA-256 (32-byte secrets).
    Sha256,
    /// SHA-384 (48-byte secrets).
    Sha384,
}

impl Hash {
    /// The TLS 1.3 hash of a cipher suite (SHA-384 for AES-256-GCM).
    pub fn of_suite(suite: CipherSuite) -> Self {
        match suite {
            CipherSuite::Aes256Gcm => Self::Sha384,
            _ => Self::Sha256,
        }
    }

    /// Output (and secret) length in bytes.
    pub fn output_len(self) -> usize {
        match self {
            Self::Sha256 => 32,
            Self::Sha384 => 48,
        }
    }
}

/// Inputs `HKDF-Expand-Label` cannot take.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExpandError {
    /// The secret is not one hash long.
    #[error("secret is {len} bytes, {hash:?} needs {want}")]
    SecretLength {
        /// Its length.
        len: usize,
        /// The hash length.
        want: usize,
        /// The hash.
        hash: Hash,
    },
    /// Label, context or output longer than the encoding allows.
    #[error("{what} is {len} bytes, above the limit of {max}")]
    TooLong {
        /// `label`, `context` or `output`.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// `HKDF-Expand-Label(secret, label, context, out.len())` (RFC 8446 7.1).
pub fn hkdf_expand_label(
    hash: Hash,
    secret: &[u8],
    label: &[u8],
    context: &[u8],
    out: &mut [u8],
) -> Result<(), ExpandError> {
    let want = hash.output_len();
    if secret.len() != want {
        return Err(ExpandError::SecretLength {
            len: secret.len(),
            want,
            hash,
        });
    }
    let too_long = |what, len, max| ExpandError::TooLong { what, len, max };
    // struct { uint16 length; opaque label<7..255> = "tls13 " + label; opaque context<0..255>; }
    let out_len = u16::try_from(out.len()).map_err(|_| too_long("output", out.len(), 65535))?;
    let label_len =
        u8::try_from(6 + label.len()).map_err(|_| too_long("label", label.len(), 249))?;
    let context_len =
        u8::try_from(context.len()).map_err(|_| too_long("context", context.len(), 255))?;
    let mut info = Vec::with_capacity(4 + 6 + label.len() + context.len());
    info.extend_from_slice(&out_len.to_be_bytes());
    info.push(label_len);
    info.extend_from_slice(b"tls13 ");
    info.extend_from_slice(label);
    info.push(context_len);
    info.extend_from_slice(context);
    // from_prk fails only on a short PRK and expand only on an output above
    // 255 hash lengths; both are excluded above.
    let max = 255 * want;
    let expanded = match hash {
        Hash::Sha256 => Hkdf::<Sha256>::from_prk(secret)
            .ok()
            .and_then(|h| h.expand(&info, out).ok()),
        Hash::Sha384 => Hkdf::<Sha384>::from_prk(secret)
            .ok()
            .and_then(|h| h.expand(&info, out).ok()),
    };
    expanded.ok_or_else(|| too_long("output", out.len(), max))
}

/// Record key and IV for one direction from its application traffic secret,
/// starting at record sequence 0.
pub fn traffic_keys(suite: CipherSuite, secret: &[u8]) -> Result<DirectionKeys, ExpandError> {
    let mut keys = DirectionKeys {
        key: vec![0; suite.key_len()],
        iv: vec![0; suite.iv_len()],
        record_sequence: 0,
    };
    let hash = Hash::of_suite(suite);
    hkdf_expand_label(hash, secret, b"key", b"", &mut keys.key)?;
    hkdf_expand_label(hash, secret, b"iv", b"", &mut keys.iv)?;
    Ok(keys)
}

/// The TLS 1.3 exporter (RFC 8446 section 7.5) from a session's
/// `exporter_master_secret`:
/// `HKDF-Expand-Label(Derive-Secret(secret, label, ""), "exporter", Hash(context), out.len())`.
/// This is what `SSL_export_keying_material` computes for TLS 1.3 (an
/// absent context is the empty one), so two libraries that hold the same
/// session export the same bytes.
pub fn export(
    hash: Hash,
    exporter_master_secret: &[u8],
    label: &[u8],
    context: &[u8],
    out: &mut [u8],
) -> Result<(), ExpandError> {
    use sha2::Digest;
    let (empty_hash, context_hash) = match hash {
        Hash::Sha256 => (
            Sha256::digest(b"").to_vec(),
            Sha256::digest(context).to_vec(),
        ),
        Hash::Sha384 => (
            Sha384::digest(b"").to_vec(),
            Sha384::digest(context).to_vec(),
        ),
    };
    let mut derived = Zeroizing::new(vec![0; hash.output_len()]);
    hkdf_expand_label(
        hash,
        exporter_master_secret,
        label,
        &empty_hash,
        &mut derived,
    )?;
    hkdf_expand_label(hash, &derived, b"exporter", &context_hash, out)
}

/// The kTLS suite of a TLS 1.3 cipher suite by its IANA name
/// (`TLS_AES_128_GCM_SHA256`, ...); `None` for suites kTLS cannot take.
pub fn suite_by_name(name: &str) -> Option<CipherSuite> {
    match name {
        "TLS_AES_128_GCM_SHA256" => Some(CipherSuite::Aes128Gcm),
        "TLS_AES_256_GCM_SHA384" => Some(CipherSuite::Aes256Gcm),
        "TLS_CHACHA20_POLY1305_SHA256" => Some(CipherSuite::Chacha20Poly1305),
        _ => None,
    }
}

/// The two application traffic secrets of one TLS 1.3 handshake, collected
/// from a TLS library's key-log callback (the `SSLKEYLOGFILE` line format
/// that OpenSSL and BoringSSL both emit). Zeroized on drop.
#[derive(Default)]
pub struct TrafficSecrets {
    client: Option<Zeroizing<Vec<u8>>>,
    server: Option<Zeroizing<Vec<u8>>>,
    exporter: Option<Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for TrafficSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrafficSecrets")
            .field("client", &self.client.is_some())
            .field("server", &self.server.is_some())
            .field("exporter", &self.exporter.is_some())
            .finish()
    }
}

impl TrafficSecrets {
    /// Takes one key-log line; keeps `CLIENT_TRAFFIC_SECRET_0`,
    /// `SERVER_TRAFFIC_SECRET_0` and `EXPORTER_SECRET`, ignores everything
    /// else.
    pub fn record(&mut self, line: &str) {
        let mut parts = line.split(' ');
        let (Some(label), Some(_random), Some(hex)) = (parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        let Some(secret) = decode_hex(hex) else {
            return;
        };
        match label {
            "CLIENT_TRAFFIC_SECRET_0" => self.client = Some(secret),
            "SERVER_TRAFFIC_SECRET_0" => self.server = Some(secret),
            "EXPORTER_SECRET" => self.exporter = Some(secret),
            _ => {}
        }
    }

    /// The session's `exporter_master_secret`, for [`export`].
    pub fn exporter_secret(&self) -> Option<&[u8]> {
        self.exporter.as_deref().map(Vec::as_slice)
    }

    /// The connection's kTLS keys for `role`, starting at record 0.
    pub fn connection_keys(
        &self,
        role: Role,
        suite: CipherSuite,
    ) -> Result<ConnectionKeys, ProviderError> {
        let (Some(client), Some(server)) = (&self.client, &self.server) else {
            return Err(ProviderError::Internal {
                reason: "the TLS library did not export both traffic secrets".into(),
            });
        };
        let derive = |secret: &[u8]| {
            traffic_keys(suite, secret).map_err(|e| ProviderError::Internal {
                reason: e.to_string(),
            })
        };
        let (transmit, receive) = match role {
            Role::Client => (derive(client)?, derive(server)?),
            Role::Server => (derive(server)?, derive(client)?),
        };
        Ok(ConnectionKeys {
            version: TlsVersion::Tls13,
            cipher_suite: suite,
            transmit,
            receive,
        })
    }
}

fn decode_hex(hex: &str) -> Option<Zeroizing<Vec<u8>>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let mut out = Zeroizing::new(Vec::with_capacity(hex.len() / 2));
    for pair in hex.as_bytes().chunks(2) {
        let s = std::str::from_utf8(pair).ok()?;
        out.push(u8::from_str_radix(s, 16).ok()?);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8448 section 3 ("Simple 1-RTT Handshake"): the server's
    /// application traffic secret and its derived write key and IV.
    #[test]
    fn rfc8448_server_application_keys() {
        let secret =
            hex::decode("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643")
                .unwrap();
        let k = traffic_keys(CipherSuite::Aes128Gcm, &secret).unwrap();
        assert_eq!(hex::encode(&k.key), "9f02283b6c9c07efc26bb9f2ac92e356");
        assert_eq!(hex::encode(&k.iv), "cf782b88dd83549aadf1e984");
    }

    #[test]
    fn keylog_lines_give_mirrored_connection_keys() {
        let mut t = TrafficSecrets::default();
        t.record(&format!("CLIENT_TRAFFIC_SECRET_0 00ff {}", "11".repeat(32)));
        t.record("CLIENT_HANDSHAKE_TRAFFIC_SECRET 00ff 22");
        assert!(
            t.connection_keys(Role::Client, CipherSuite::Aes128Gcm)
                .is_err(),
            "server secret missing"
        );
        t.record(&format!("SERVER_TRAFFIC_SECRET_0 00ff {}", "33".repeat(32)));
        t.record("SERVER_TRAFFIC_SECRET_0 00ff zz");
        let c = t
            .connection_keys(Role::Client, CipherSuite::Aes128Gcm)
            .unwrap();
        let s = t
            .connection_keys(Role::Server, CipherSuite::Aes128Gcm)
            .unwrap();
        assert_eq!(c.transmit, s.receive);
        assert_eq!(c.receive, s.transmit);
        assert!(!format!("{t:?}").contains("11"));
        assert_eq!(suite_by_name("TLS_AES_128_CCM_SHA256"), None);
    }

    #[test]
    fn wrong_secret_length_is_an_error() {
        assert_eq!(
            traffic_keys(CipherSuite::Aes256Gcm, &[0; 32]).unwrap_err(),
            ExpandError::SecretLength {
                len: 32,
                want: 48,
                hash: Hash::Sha384
            }
        );
    }

    #[test]
    fn overlong_labels_are_errors_not_truncated() {
        let mut out = [0u8; 16];
        let e = hkdf_expand_label(Hash::Sha256, &[0; 32], &[b'x'; 250], b"", &mut out).unwrap_err();
        assert!(matches!(e, ExpandError::TooLong { what: "label", .. }));
        let e = hkdf_expand_label(Hash::Sha256, &[0; 32], b"k", &[0; 256], &mut out).unwrap_err();
        assert!(matches!(
            e,
            ExpandError::TooLong {
                what: "context",
                ..
            }
        ));
    }
}
