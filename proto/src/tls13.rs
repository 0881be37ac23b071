//! The TLS 1.3 key schedule step that turns a traffic secret into record
//! keys (RFC 8446 section 7.3), for providers that run a TLS 1.3 handshake
//! and export its traffic secrets.

use hkdf::Hkdf;
use sha2::{Sha256, Sha384};

use crate::types::{CipherSuite, DirectionKeys};

/// A secret of the wrong length for the suite's hash.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("traffic secret is {len} bytes, {suite} needs {want}")]
pub struct SecretLengthError {
    /// Its length.
    pub len: usize,
    /// The hash length of the suite.
    pub want: usize,
    /// The suite.
    pub suite: CipherSuite,
}

/// `HKDF-Expand-Label(secret, label, context, len)` with the suite's hash
/// (SHA-384 for AES-256-GCM, SHA-256 otherwise).
pub fn hkdf_expand_label(
    suite: CipherSuite,
    secret: &[u8],
    label: &[u8],
    context: &[u8],
    out: &mut [u8],
) -> Result<(), SecretLengthError> {
    let want = hash_len(suite);
    if secret.len() != want {
        return Err(SecretLengthError {
            len: secret.len(),
            want,
            suite,
        });
    }
    // struct { uint16 length; opaque label<7..255> = "tls13 " + label; opaque context<0..255>; }
    let mut info = Vec::with_capacity(4 + 6 + label.len() + context.len());
    info.extend_from_slice(&u16::try_from(out.len()).unwrap_or(u16::MAX).to_be_bytes());
    info.push(u8::try_from(6 + label.len()).unwrap_or(u8::MAX));
    info.extend_from_slice(b"tls13 ");
    info.extend_from_slice(label);
    info.push(u8::try_from(context.len()).unwrap_or(u8::MAX));
    info.extend_from_slice(context);
    // The secret length was checked above and the outputs are short, so
    // from_prk and expand cannot fail; map defensively anyway.
    let fail = || SecretLengthError {
        len: secret.len(),
        want,
        suite,
    };
    match suite {
        CipherSuite::Aes256Gcm => Hkdf::<Sha384>::from_prk(secret)
            .map_err(|_| fail())?
            .expand(&info, out)
            .map_err(|_| fail()),
        _ => Hkdf::<Sha256>::from_prk(secret)
            .map_err(|_| fail())?
            .expand(&info, out)
            .map_err(|_| fail()),
    }
}

/// Hash length of the suite's TLS 1.3 hash.
pub fn hash_len(suite: CipherSuite) -> usize {
    match suite {
        CipherSuite::Aes256Gcm => 48,
        _ => 32,
    }
}

/// Record key and IV for one direction from its application traffic secret,
/// starting at record sequence 0.
pub fn traffic_keys(suite: CipherSuite, secret: &[u8]) -> Result<DirectionKeys, SecretLengthError> {
    let mut keys = DirectionKeys {
        key: vec![0; suite.key_len()],
        iv: vec![0; suite.iv_len()],
        record_sequence: 0,
    };
    hkdf_expand_label(suite, secret, b"key", b"", &mut keys.key)?;
    hkdf_expand_label(suite, secret, b"iv", b"", &mut keys.iv)?;
    Ok(keys)
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
    fn wrong_secret_length_is_an_error() {
        assert_eq!(
            traffic_keys(CipherSuite::Aes256Gcm, &[0; 32]).unwrap_err(),
            SecretLengthError {
                len: 32,
                want: 48,
                suite: CipherSuite::Aes256Gcm
            }
        );
    }
}
