//! OpenSSL under the SDK's handshake driver
//! ([`tlshub_provider_sdk::handshake`]): the context built from `[tls]`
//! and one handshake.

use std::sync::{Arc, Mutex};

use openssl::ex_data::Index;
use openssl::ssl::{
    HandshakeError, Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslOptions,
    SslSessionCacheMode, SslVerifyMode, SslVersion,
};
use openssl::x509::X509VerifyResult;
use tlshub_provider_sdk::Role;
use tlshub_provider_sdk::handshake::{HandshakeFailure, Negotiated, SetupError, TlsLibrary, setup};
use tlshub_provider_sdk::handshake_config::TlsSection;
use tlshub_provider_sdk::socket::SocketIo;
use tlshub_provider_sdk::tls13::TrafficSecrets;

/// OpenSSL's context, with the slot where each session's secret sink hangs.
pub struct OpenSsl {
    context: SslContext,
    secrets_index: Index<Ssl, Arc<Mutex<TrafficSecrets>>>,
}

impl TlsLibrary for OpenSsl {
    const NAME: &'static str = "openssl";
    const SELECTS_TLS13_SUITES: bool = true;

    fn version() -> String {
        openssl::version::version().into()
    }

    fn new(tls: &TlsSection) -> Result<Self, SetupError> {
        let mut b = setup(
            "create TLS context",
            SslContextBuilder::new(SslMethod::tls()),
        )?;
        setup(
            "pin TLS 1.3",
            b.set_min_proto_version(Some(SslVersion::TLS1_3)),
        )?;
        setup(
            "pin TLS 1.3",
            b.set_max_proto_version(Some(SslVersion::TLS1_3)),
        )?;
        setup(
            "set cipher suites",
            b.set_ciphersuites(&tls.cipher_suites.join(":")),
        )?;
        setup("set groups", b.set_groups_list(&tls.groups.join(":")))?;
        setup(
            format!("load CA {}", tls.ca.display()),
            b.set_ca_file(&tls.ca),
        )?;
        setup(
            format!("load certificate {}", tls.cert.display()),
            b.set_certificate_chain_file(&tls.cert),
        )?;
        setup(
            format!("load key {}", tls.key.display()),
            b.set_private_key_file(&tls.key, SslFiletype::PEM),
        )?;
        setup("match key and certificate", b.check_private_key())?;
        b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        setup("disable session tickets", b.set_num_tickets(0))?;
        b.set_options(SslOptions::NO_TICKET);
        b.set_session_cache_mode(SslSessionCacheMode::OFF);
        let secrets_index = setup(
            "allocate ex_data index",
            Ssl::new_ex_index::<Arc<Mutex<TrafficSecrets>>>(),
        )?;
        b.set_keylog_callback(move |ssl, line| {
            if let Some(secrets) = ssl.ex_data(secrets_index)
                && let Ok(mut s) = secrets.lock()
            {
                s.record(line);
            }
        });
        Ok(Self {
            context: b.build(),
            secrets_index,
        })
    }

    fn handshake(
        &self,
        role: Role,
        io: &mut SocketIo,
        secrets: &Arc<Mutex<TrafficSecrets>>,
    ) -> Result<Negotiated, HandshakeFailure> {
        let mut ssl =
            Ssl::new(&self.context).map_err(|e| HandshakeFailure::Session(e.to_string()))?;
        ssl.set_ex_data(self.secrets_index, Arc::clone(secrets));
        let stream = match role {
            Role::Client => ssl.connect(io),
            Role::Server => ssl.accept(io),
        }
        .map_err(failure)?;
        let ssl = stream.ssl();
        Ok(Negotiated {
            suite: ssl
                .current_cipher()
                .map_or("none", |c| c.name())
                .to_string(),
            buffered: ssl.pending(),
        })
    }
}

fn failure(e: HandshakeError<&mut SocketIo>) -> HandshakeFailure {
    match e {
        HandshakeError::SetupFailure(stack) => HandshakeFailure::Session(stack.to_string()),
        HandshakeError::Failure(mid) | HandshakeError::WouldBlock(mid) => {
            let err = mid.error();
            if let Some(io) = err.io_error()
                && io.kind() == std::io::ErrorKind::TimedOut
            {
                return HandshakeFailure::TimedOut;
            }
            let verify = mid.ssl().verify_result();
            if verify != X509VerifyResult::OK {
                return HandshakeFailure::PeerRejected(verify.error_string().into());
            }
            HandshakeFailure::Failed(err.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    tlshub_provider_sdk::tls_library_tests!(super::OpenSsl);
}
