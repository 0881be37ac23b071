//! The SDK's TLS 1.3 exporter and node-pair key derivation against
//! OpenSSL's own `SSL_export_keying_material`, on a real handshake: the
//! node-pair mode derives every connection's keys this way on both nodes,
//! so it must be the RFC 8446 exporter exactly.
#![expect(clippy::unwrap_used, reason = "test")]

use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use openssl::asn1::Asn1Time;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::ssl::{SslAcceptor, SslConnector, SslMethod, SslVerifyMode, SslVersion};
use openssl::x509::{X509, X509NameBuilder};
use tlshub_provider_sdk::handshake::node_pair::keys::Generation;
use tlshub_provider_sdk::tls13::{Hash, TrafficSecrets, export, suite_by_name};
use tlshub_provider_sdk::{ConnectionId, Role};

fn self_signed() -> (PKey<openssl::pkey::Private>, X509) {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let key = PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", "exporter test").unwrap();
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(&name).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(1).unwrap())
        .unwrap();
    b.sign(&key, MessageDigest::sha256()).unwrap();
    (key, b.build())
}

#[test]
fn the_exporter_matches_openssl() {
    for suite_name in [
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
    ] {
        let (key, cert) = self_signed();
        let mut acceptor = SslAcceptor::mozilla_modern_v5(SslMethod::tls()).unwrap();
        acceptor.set_private_key(&key).unwrap();
        acceptor.set_certificate(&cert).unwrap();
        acceptor.set_ciphersuites(suite_name).unwrap();
        let acceptor = acceptor.build();
        let secrets = Arc::new(Mutex::new(TrafficSecrets::default()));
        let mut connector = SslConnector::builder(SslMethod::tls()).unwrap();
        connector.set_verify(SslVerifyMode::NONE);
        connector
            .set_min_proto_version(Some(SslVersion::TLS1_3))
            .unwrap();
        connector.set_ciphersuites(suite_name).unwrap();
        let log = Arc::clone(&secrets);
        connector.set_keylog_callback(move |_, line| log.lock().unwrap().record(line));
        let connector = connector.build();

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut tls = acceptor.accept(s).unwrap();
            // Keep the connection until the client is done.
            let mut buf = [0u8; 1];
            let _ = std::io::Read::read(&mut tls, &mut buf);
        });
        let stream = TcpStream::connect(addr).unwrap();
        let tls = connector
            .configure()
            .unwrap()
            .verify_hostname(false)
            .connect("localhost", stream)
            .unwrap();
        let ssl = tls.ssl();
        assert_eq!(ssl.current_cipher().unwrap().name(), suite_name);
        let suite = suite_by_name(suite_name).unwrap();

        let secrets = secrets.lock().unwrap();
        let secret = secrets
            .exporter_secret()
            .expect("EXPORTER_SECRET in the key log");
        let identity = ConnectionId {
            client: "10.0.1.2:40000".parse().unwrap(),
            server: "10.0.2.2:8443".parse().unwrap(),
            client_isn: 0x0102_0304,
            server_isn: 0xa0b0_c0d0,
        };
        // The raw exporter, with and without a context.
        for (label, context) in [
            ("EXPORTER-tlshub-test", &b""[..]),
            ("EXPORTER-tlshub-test", &identity.context()[..]),
        ] {
            let mut theirs = [0u8; 40];
            ssl.export_keying_material(&mut theirs, label, Some(context))
                .unwrap();
            let mut ours = [0u8; 40];
            export(
                Hash::of_suite(suite),
                secret,
                label.as_bytes(),
                context,
                &mut ours,
            )
            .unwrap();
            assert_eq!(hex(&ours), hex(&theirs), "{suite_name} {label}");
        }
        // What a node-pair generation derives, label by label.
        let g = Generation::new(suite, secret).unwrap();
        let mut id = [0u8; 8];
        ssl.export_keying_material(&mut id, "EXPORTER-tlshub-node-pair generation", Some(b""))
            .unwrap();
        assert_eq!(g.id(), id);
        let keys = g.connection_keys(&identity, Role::Client).unwrap();
        for (label, direction) in [
            ("EXPORTER-tlshub-node-pair client write", &keys.transmit),
            ("EXPORTER-tlshub-node-pair server write", &keys.receive),
        ] {
            let mut theirs = vec![0u8; direction.key.len() + direction.iv.len()];
            ssl.export_keying_material(&mut theirs, label, Some(&identity.context()))
                .unwrap();
            let ours: Vec<u8> = [direction.key.as_slice(), direction.iv.as_slice()].concat();
            assert_eq!(hex(&ours), hex(&theirs), "{suite_name} {label}");
        }
        drop(tls);
        server.join().unwrap();
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
