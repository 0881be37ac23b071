//! A minimal tlshub key provider, as a starting point for your own: keys
//! come from a pre-shared key that every node holds, expanded per
//! connection and per direction with TLS 1.3's HKDF-Expand-Label over the
//! 4-tuple and both TCP initial sequence numbers. It needs no socket and no
//! peer round trip.
//!
//! It is an example of the SDK, not a recommendation: anyone with the file
//! can decrypt every connection, and there is no forward secrecy. Use the
//! OpenSSL, BoringSSL or TLSHub providers for real traffic.
//!
//! ```sh
//! head -c 32 /dev/urandom > /etc/tlshub/cluster.psk      # same file on every node
//! cargo run -p tlshub-provider-sdk --example psk-provider -- \
//!     --psk /etc/tlshub/cluster.psk --socket /run/tlshub/provider.sock
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use tlshub_provider_sdk::tls13::{Hash, hkdf_expand_label};
use tlshub_provider_sdk::{
    CipherSuite, ConnectionId, ConnectionKeys, DirectionKeys, KeyRequest, Provider, ProviderError,
    ProviderInfo, Role, ServeOptions, TlsVersion, run,
};
use zeroize::Zeroizing;

struct PskProvider {
    psk: Zeroizing<[u8; 32]>,
}

impl PskProvider {
    /// One direction's key and IV.
    fn direction(&self, label: &str, context: &[u8]) -> Result<DirectionKeys, ProviderError> {
        let suite = CipherSuite::Aes128Gcm;
        let mut keys = DirectionKeys {
            key: vec![0; suite.key_len()],
            iv: vec![0; suite.iv_len()],
            record_sequence: 0,
        };
        let internal = |e: tlshub_provider_sdk::tls13::ExpandError| ProviderError::Internal {
            reason: e.to_string(),
        };
        hkdf_expand_label(
            Hash::Sha256,
            &self.psk[..],
            format!("psk {label} key").as_bytes(),
            context,
            &mut keys.key,
        )
        .map_err(internal)?;
        hkdf_expand_label(
            Hash::Sha256,
            &self.psk[..],
            format!("psk {label} iv").as_bytes(),
            context,
            &mut keys.iv,
        )
        .map_err(internal)?;
        Ok(keys)
    }
}

impl Provider for PskProvider {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            name: "example-psk".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            tls_versions: vec![TlsVersion::Tls13],
            cipher_suites: vec![CipherSuite::Aes128Gcm],
            needs_socket: false,
            // Only another node running this example can key with it.
            keying: "example-psk".into(),
            credentials: Vec::new(),
            peer_sessions: Vec::new(),
        }
    }

    async fn keys(&self, request: KeyRequest) -> Result<ConnectionKeys, ProviderError> {
        // The connection named the same way on both nodes: client first.
        let context = ConnectionId::of(&request).context();
        let (c, s) = (
            self.direction("c", &context)?,
            self.direction("s", &context)?,
        );
        let (transmit, receive) = match request.role {
            Role::Client => (c, s),
            Role::Server => (s, c),
        };
        Ok(ConnectionKeys {
            version: TlsVersion::Tls13,
            cipher_suite: CipherSuite::Aes128Gcm,
            transmit,
            receive,
        })
    }
}

fn main() -> ExitCode {
    tlshub_provider_sdk::runtime::init_logging();
    let mut args = std::env::args().skip(1);
    let (mut psk_path, mut socket) = (None::<PathBuf>, PathBuf::from("/run/tlshub/provider.sock"));
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--psk", Some(v)) => psk_path = Some(v.into()),
            ("--socket", Some(v)) => socket = v.into(),
            _ => {
                eprintln!("usage: psk-provider --psk FILE [--socket PATH]");
                return ExitCode::from(2);
            }
        }
    }
    let Some(psk_path) = psk_path else {
        eprintln!("usage: psk-provider --psk FILE [--socket PATH]");
        return ExitCode::from(2);
    };
    let bytes = match std::fs::read(&psk_path) {
        Ok(b) => Zeroizing::new(b),
        Err(e) => {
            eprintln!("psk-provider: cannot read {}: {e}", psk_path.display());
            return ExitCode::from(2);
        }
    };
    let Ok(psk) = <[u8; 32]>::try_from(&bytes[..]) else {
        eprintln!(
            "psk-provider: {} holds {} bytes; it must hold exactly 32",
            psk_path.display(),
            bytes.len()
        );
        return ExitCode::from(2);
    };
    run(
        "psk-provider",
        PskProvider {
            psk: Zeroizing::new(psk),
        },
        ServeOptions {
            socket_path: socket,
            allowed_uid: None,
            metrics_listen: None,
        },
    )
}
