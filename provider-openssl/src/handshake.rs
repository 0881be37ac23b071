//! OpenSSL as a [`TlsLibrary`](tlshub_provider_sdk::handshake::TlsLibrary)
//! of the SDK's handshake driver: what OpenSSL sets differently from
//! BoringSSL. The rest is the OpenSSL API family's, written once in
//! [`openssl_family_library!`](tlshub_provider_sdk::openssl_family_library).

use openssl::ssl::{SslContextBuilder, SslRef};
use openssl::x509::X509VerifyResult;
use tlshub_provider_sdk::handshake::{SetupError, setup};
use tlshub_provider_sdk::handshake_config::TlsSection;

tlshub_provider_sdk::openssl_family_library! {
    /// OpenSSL's TLS context and the slot where each session's secrets go.
    OpenSsl over openssl {
        name: "openssl",
        selects_tls13_suites: true,
        configure: configure,
        rejected: rejected,
    }
}

/// The configured suites in preference order, the groups, and no tickets.
fn configure(b: &mut SslContextBuilder, tls: &TlsSection) -> Result<(), SetupError> {
    setup(
        "set cipher suites",
        b.set_ciphersuites(&tls.cipher_suites.join(":")),
    )?;
    setup("set groups", b.set_groups_list(&tls.groups.join(":")))?;
    setup("disable session tickets", b.set_num_tickets(0))
}

/// The verification failure of the peer's certificate, if there was one.
fn rejected(ssl: &SslRef) -> Option<String> {
    let verify = ssl.verify_result();
    (verify != X509VerifyResult::OK).then(|| verify.error_string().into())
}

#[cfg(test)]
mod tests {
    tlshub_provider_sdk::tls_library_tests!(super::OpenSsl);
}
