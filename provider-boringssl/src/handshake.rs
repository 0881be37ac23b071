//! BoringSSL as a [`TlsLibrary`](tlshub_provider_sdk::handshake::TlsLibrary)
//! of the SDK's handshake driver: what BoringSSL sets differently from
//! OpenSSL. The rest is the OpenSSL API family's, written once in
//! [`openssl_family_library!`](tlshub_provider_sdk::openssl_family_library).

use boring::ssl::{SslContextBuilder, SslRef};
use tlshub_provider_sdk::handshake::{SetupError, setup};
use tlshub_provider_sdk::handshake_config::TlsSection;

tlshub_provider_sdk::openssl_family_library! {
    /// BoringSSL's TLS context and the slot where each session's secrets go.
    BoringSsl over boring {
        name: "boringssl",
        // BoringSSL has no TLS 1.3 suite selection: the driver refuses a
        // handshake that ends outside `cipher_suites`.
        selects_tls13_suites: false,
        configure: configure,
        rejected: rejected,
    }
}

/// The groups. With `SSL_OP_NO_TICKET` (set for the whole family)
/// BoringSSL sends no TLS 1.3 NewSessionTicket.
fn configure(b: &mut SslContextBuilder, tls: &TlsSection) -> Result<(), SetupError> {
    setup("set groups", b.set_curves_list(&tls.groups.join(":")))
}

/// The verification failure of the peer's certificate, if one was
/// received: BoringSSL reports a verification error even when no
/// certificate was verified.
fn rejected(ssl: &SslRef) -> Option<String> {
    ssl.peer_certificate()?;
    ssl.verify_result()
        .err()
        .map(|verify| verify.error_string().into())
}

#[cfg(test)]
mod tests {
    tlshub_provider_sdk::tls_library_tests!(super::BoringSsl);
}
