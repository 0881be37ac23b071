//! The provider: a TLS 1.3 handshake with BoringSSL over the application's
//! own connection, mutual authentication by node certificates, and the
//! application traffic secrets turned into kTLS keys.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boring::ex_data::Index;
use boring::ssl::{
    HandshakeError, Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslOptions,
    SslSessionCacheMode, SslVerifyMode, SslVersion,
};
use tlshub_provider_sdk::socket::SocketIo;
use tlshub_provider_sdk::socket::take_fd;
use tlshub_provider_sdk::tls13::{TrafficSecrets, suite_by_name};
use tlshub_provider_sdk::{
    CipherSuite, ConnectionKeys, KeyRequest, Provider, ProviderError, ProviderInfo, Role,
    TlsVersion,
};

use tlshub_provider_sdk::handshake_config::TlsSection;

/// The BoringSSL provider.
pub struct BoringSslProvider {
    context: SslContext,
    secrets_index: Index<Ssl, Arc<Mutex<TrafficSecrets>>>,
    accepted: Arc<Vec<CipherSuite>>,
}

impl std::fmt::Debug for BoringSslProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoringSslProvider")
    }
}

/// Why the TLS context could not be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// BoringSSL refused a setting or file.
    #[error("cannot {action}: {source}")]
    BoringSsl {
        /// What was being configured.
        action: String,
        /// BoringSSL's error stack.
        #[source]
        source: boring::error::ErrorStack,
    },
    /// A configured suite that kTLS cannot install.
    #[error(
        "cipher suite {suite} cannot be used with kTLS (use TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384 or TLS_CHACHA20_POLY1305_SHA256)"
    )]
    UnsupportedSuite {
        /// The configured name.
        suite: String,
    },
}

fn setup<T>(
    action: impl Into<String>,
    r: Result<T, boring::error::ErrorStack>,
) -> Result<T, SetupError> {
    r.map_err(|source| SetupError::BoringSsl {
        action: action.into(),
        source,
    })
}

impl BoringSslProvider {
    /// Builds the TLS context: TLS 1.3 only, the configured suites and
    /// groups, node certificate and key, peer certificate required and
    /// verified against the cluster CA, no session tickets (a ticket
    /// arriving after kTLS is installed would break the application's read).
    pub fn new(tls: &TlsSection) -> Result<Self, SetupError> {
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
        for s in &tls.cipher_suites {
            if suite_by_name(s).is_none() {
                return Err(SetupError::UnsupportedSuite { suite: s.clone() });
            }
        }
        // BoringSSL has no TLS 1.3 suite selection; the accepted set is
        // enforced after the handshake (see `handshake`).
        setup("set groups", b.set_curves_list(&tls.groups.join(":")))?;
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
        // SSL_OP_NO_TICKET: BoringSSL then sends no TLS 1.3 NewSessionTicket.
        b.set_options(SslOptions::NO_TICKET);
        b.set_session_cache_mode(SslSessionCacheMode::OFF);
        let secrets_index = setup(
            "allocate ex_data index",
            Ssl::new_ex_index::<Arc<Mutex<TrafficSecrets>>>(),
        )?;
        let idx = secrets_index;
        b.set_keylog_callback(move |ssl, line| {
            if let Some(secrets) = ssl.ex_data(idx)
                && let Ok(mut s) = secrets.lock()
            {
                s.record(line);
            }
        });
        let accepted = tls
            .cipher_suites
            .iter()
            .filter_map(|s| suite_by_name(s))
            .collect();
        Ok(Self {
            context: b.build(),
            secrets_index,
            accepted: Arc::new(accepted),
        })
    }

    /// Runs the handshake on the socket (blocking; call from a blocking thread).
    fn handshake(&self, request: &KeyRequest) -> Result<ConnectionKeys, ProviderError> {
        let handle = request
            .socket
            .ok_or_else(|| ProviderError::InvalidRequest {
                reason: "this provider handshakes over the connection and needs `socket`".into(),
            })?;
        let fd = take_fd(handle.pid, handle.fd).map_err(|source| ProviderError::Socket {
            pid: handle.pid,
            fd: handle.fd,
            source,
        })?;
        // Leave a margin so the answer reaches the core before its deadline.
        let budget = request.timeout.mul_f64(0.9).max(Duration::from_millis(10));
        let io = SocketIo::new(fd, Instant::now() + budget);
        let internal = |what: &str, e: boring::error::ErrorStack| ProviderError::Internal {
            reason: format!("{what}: {e}"),
        };
        let mut ssl = Ssl::new(&self.context).map_err(|e| internal("create session", e))?;
        let secrets = Arc::new(Mutex::new(TrafficSecrets::default()));
        ssl.set_ex_data(self.secrets_index, Arc::clone(&secrets));
        let result = match request.role {
            Role::Client => ssl.connect(io),
            Role::Server => ssl.accept(io),
        };
        let stream = result.map_err(|e| handshake_error(e, budget))?;
        let ssl = stream.ssl();
        // Nothing past the last handshake message may sit in BoringSSL's
        // buffers: those bytes belong to the application's first records.
        if ssl.pending() != 0 {
            return Err(ProviderError::Handshake {
                reason: format!("{} bytes read past the handshake", ssl.pending()),
            });
        }
        let name = ssl.current_cipher().map(|c| c.name()).unwrap_or("none");
        let suite = suite_by_name(name).ok_or_else(|| ProviderError::Handshake {
            reason: format!("negotiated {name}, which kTLS cannot take"),
        })?;
        if !self.accepted.contains(&suite) {
            return Err(ProviderError::Handshake {
                reason: format!("negotiated {name}, which `cipher_suites` does not accept"),
            });
        }
        let secrets = secrets.lock().map_err(|_| ProviderError::Internal {
            reason: "secret lock poisoned".into(),
        })?;
        secrets.connection_keys(request.role, suite)
    }
}

fn handshake_error(e: HandshakeError<SocketIo>, budget: Duration) -> ProviderError {
    match e {
        HandshakeError::SetupFailure(stack) => ProviderError::Internal {
            reason: stack.to_string(),
        },
        HandshakeError::Failure(mid) | HandshakeError::WouldBlock(mid) => {
            let err = mid.error();
            // Names the peer's kind of provider when the two do not match.
            let peer = mid.get_ref().peer_start();
            if let Some(io) = err.io_error()
                && io.kind() == std::io::ErrorKind::TimedOut
            {
                return ProviderError::Timeout {
                    waiting_for: format!("the peer's handshake messages ({peer})"),
                    millis: budget.as_millis() as u64,
                };
            }
            // BoringSSL reports a verification error even when no
            // certificate was verified; only a received, rejected
            // certificate is an authentication failure.
            if mid.ssl().peer_certificate().is_some()
                && let Err(verify) = mid.ssl().verify_result()
            {
                return ProviderError::PeerAuthentication {
                    reason: verify.error_string().into(),
                };
            }
            ProviderError::Handshake {
                reason: format!("{err}; {peer}"),
            }
        }
    }
}

impl Provider for BoringSslProvider {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            name: "boringssl".into(),
            version: format!(
                "{} ({})",
                env!("CARGO_PKG_VERSION"),
                boring::version::version()
            ),
            tls_versions: vec![TlsVersion::Tls13],
            cipher_suites: self.accepted.to_vec(),
            needs_socket: true,
        }
    }

    async fn keys(&self, request: KeyRequest) -> Result<ConnectionKeys, ProviderError> {
        // The handshake blocks (poll on the socket); keep it off the runtime.
        let this = self.shallow();
        tokio::task::spawn_blocking(move || this.handshake(&request))
            .await
            .map_err(|e| ProviderError::Internal {
                reason: format!("handshake thread: {e}"),
            })?
    }
}

impl BoringSslProvider {
    /// A cheap copy sharing the same context (SslContext is reference counted).
    fn shallow(&self) -> Self {
        Self {
            context: self.context.clone(),
            secrets_index: self.secrets_index,
            accepted: Arc::clone(&self.accepted),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use tlshub_provider_sdk::SocketHandle;

    use boring::asn1::Asn1Time;
    use boring::hash::MessageDigest;
    use boring::pkey::{PKey, Private};
    use boring::x509::extension::{BasicConstraints, SubjectAlternativeName};
    use boring::x509::{X509, X509NameBuilder};

    fn cert(cn: &str, issuer: Option<(&X509, &PKey<Private>)>) -> (X509, PKey<Private>) {
        let group =
            boring::ec::EcGroup::from_curve_name(boring::nid::Nid::X9_62_PRIME256V1).unwrap();
        let key = PKey::from_ec_key(boring::ec::EcKey::generate(&group).unwrap()).unwrap();
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", cn).unwrap();
        let name = name.build();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        let serial = boring::bn::BigNum::from_u32(rand_u32())
            .unwrap()
            .to_asn1_integer()
            .unwrap();
        b.set_serial_number(&serial).unwrap();
        match issuer {
            None => {
                b.set_issuer_name(&name).unwrap();
                b.append_extension(&BasicConstraints::new().critical().ca().build().unwrap())
                    .unwrap();
                b.sign(&key, MessageDigest::sha256()).unwrap();
            }
            Some((ca, ca_key)) => {
                b.set_issuer_name(ca.subject_name()).unwrap();
                let san = SubjectAlternativeName::new()
                    .dns(cn)
                    .build(&b.x509v3_context(Some(ca), None))
                    .unwrap();
                b.append_extension(&san).unwrap();
                b.sign(ca_key, MessageDigest::sha256()).unwrap();
            }
        }
        (b.build(), key)
    }

    fn rand_u32() -> u32 {
        let mut b = [0u8; 4];
        boring::rand::rand_bytes(&mut b).unwrap();
        u32::from_le_bytes(b) >> 1
    }

    fn node(
        dir: &std::path::Path,
        name: &str,
        ca: &X509,
        ca_key: &PKey<Private>,
        suites: &[&str],
    ) -> BoringSslProvider {
        let (c, k) = cert(name, Some((ca, ca_key)));
        let (cp, kp, cap) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
            dir.join("ca.pem"),
        );
        std::fs::write(&cp, c.to_pem().unwrap()).unwrap();
        std::fs::write(&kp, k.private_key_to_pem_pkcs8().unwrap()).unwrap();
        std::fs::write(&cap, ca.to_pem().unwrap()).unwrap();
        BoringSslProvider::new(&TlsSection {
            ca: cap,
            cert: cp,
            key: kp,
            cipher_suites: suites.iter().map(|s| s.to_string()).collect(),
            groups: vec!["X25519".into()],
        })
        .unwrap()
    }

    fn request(role: Role, fd: i32) -> KeyRequest {
        KeyRequest {
            socket_cookie: 1,
            role,
            local: "127.0.0.1:1".parse().unwrap(),
            remote: "127.0.0.1:2".parse().unwrap(),
            local_isn: 0,
            remote_isn: 0,
            node_name: "n".into(),
            socket: Some(SocketHandle {
                pid: std::process::id(),
                fd,
            }),
            timeout: Duration::from_secs(5),
        }
    }

    fn run_pair(
        client: &BoringSslProvider,
        server: &BoringSslProvider,
    ) -> (
        Result<ConnectionKeys, ProviderError>,
        Result<ConnectionKeys, ProviderError>,
    ) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        // The client side is non-blocking, like an epoll application's socket.
        c.set_nonblocking(true).unwrap();
        std::thread::scope(|scope| {
            let cr = scope.spawn(|| client.handshake(&request(Role::Client, c.as_raw_fd())));
            let sr = server.handshake(&request(Role::Server, s.as_raw_fd()));
            (cr.join().unwrap(), sr)
        })
    }

    #[test]
    fn two_nodes_derive_matching_keys() {
        let dir =
            std::env::temp_dir().join(format!("tlshub-boringssl-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, ca_key) = cert("tlshub test CA", None);
        let all = [
            "TLS_AES_128_GCM_SHA256",
            "TLS_AES_256_GCM_SHA384",
            "TLS_CHACHA20_POLY1305_SHA256",
        ];
        let a = node(&dir, "node-a", &ca, &ca_key, &all);
        let b = node(&dir, "node-b", &ca, &ca_key, &all);
        let (c, s) = run_pair(&a, &b);
        let (c, s) = (c.unwrap(), s.unwrap());
        // BoringSSL's client preference with AES instructions.
        assert_eq!(c.cipher_suite, CipherSuite::Aes128Gcm);
        assert_eq!(c.transmit, s.receive);
        assert_eq!(c.receive, s.transmit);
        assert_ne!(c.transmit, c.receive);
        c.validate().unwrap();
        let (c2, _) = run_pair(&a, &b);
        assert_ne!(c2.unwrap().transmit, c.transmit);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_suite_outside_cipher_suites_is_refused_not_installed() {
        let dir =
            std::env::temp_dir().join(format!("tlshub-boringssl-test4-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, ca_key) = cert("tlshub test CA", None);
        let a = node(&dir, "node-a", &ca, &ca_key, &["TLS_AES_256_GCM_SHA384"]);
        let b = node(&dir, "node-b", &ca, &ca_key, &["TLS_AES_256_GCM_SHA384"]);
        let (c, _) = run_pair(&a, &b);
        match c {
            Err(ProviderError::Handshake { reason }) => {
                assert!(reason.contains("does not accept"), "{reason}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_node_from_another_ca_is_refused() {
        let dir = std::env::temp_dir().join(format!("tlshub-openssl-test2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, ca_key) = cert("tlshub test CA", None);
        let a = node(&dir, "node-a", &ca, &ca_key, &["TLS_AES_128_GCM_SHA256"]);
        let dir2 = dir.join("other");
        std::fs::create_dir_all(&dir2).unwrap();
        let (ca2, ca2_key) = cert("rogue CA", None);
        let rogue = node(&dir2, "rogue", &ca2, &ca2_key, &["TLS_AES_128_GCM_SHA256"]);
        let (c, s) = run_pair(&rogue, &a);
        assert!(c.is_err() && s.is_err());
        let codes = [c.unwrap_err().code(), s.unwrap_err().code()];
        assert!(codes.contains(&tonic_code_unauthenticated()), "{codes:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tonic_code_unauthenticated() -> tonic::Code {
        tonic::Code::Unauthenticated
    }

    #[test]
    fn a_silent_peer_times_out() {
        let dir = std::env::temp_dir().join(format!("tlshub-openssl-test3-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, ca_key) = cert("tlshub test CA", None);
        let a = node(&dir, "node-a", &ca, &ca_key, &["TLS_AES_128_GCM_SHA256"]);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _s = l.accept().unwrap();
        let mut req = request(Role::Client, c.as_raw_fd());
        req.timeout = Duration::from_millis(300);
        let e = a.handshake(&req).unwrap_err();
        assert!(matches!(e, ProviderError::Timeout { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
