//! The configuration file shared by providers that run a TLS 1.3 handshake
//! over the application's connection (`tlshub-provider-openssl`,
//! `tlshub-provider-boringssl`):
//!
//! ```toml
//! socket = "/run/tlshub/provider.sock"   # optional
//! allowed_uid = 990                      # optional
//! metrics_listen = "127.0.0.1:9470"      # optional: GET /metrics
//! keying = "in-band"                     # or "node-pair" (then [node_pair])
//! [tls]
//! ca = "/etc/tlshub/certs/ca.pem"
//! cert = "/etc/tlshub/certs/node.pem"
//! key = "/etc/tlshub/certs/node.key"
//! cipher_suites = ["TLS_AES_128_GCM_SHA256"]
//! groups = ["X25519"]
//! expiry_warning_days = 30               # optional
//! node_map = "/etc/tlshub/nodes.toml"    # optional (required for node-pair)
//! handshakes_in_flight = 4               # optional: most ClientHellos sent, not yet answered (16 per CPU)
//! [node_pair]                            # optional, with keying = "node-pair"
//! listen = "0.0.0.0:7446"
//! port = 7446                            # the port every node listens on
//! lifetime_seconds = 3600
//! drain_seconds = 30
//! ```
//!
//! The provider re-reads the CA, certificate and key when one of the files
//! changes (checked every 2 s) and on `SIGHUP`: new handshakes use the new
//! files, handshakes under way finish with the old ones, and files that do
//! not load are refused with a log line while the old ones stay in use.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::handshake::node_pair::NodePairSection;
use crate::handshake::{HandshakeProvider, TlsLibrary};
use crate::runtime::{ConfigError, load_toml};

/// `[tls]`: the node's identity and the pinned handshake parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM file with the cluster CA that signs every node certificate.
    pub ca: PathBuf,
    /// PEM file with this node's certificate (chain).
    pub cert: PathBuf,
    /// PEM file with this node's private key.
    pub key: PathBuf,
    /// TLS 1.3 cipher suites (IANA names). OpenSSL uses them in this
    /// preference order; BoringSSL cannot choose TLS 1.3 suites, so it
    /// refuses a handshake that ends on a suite outside this list.
    #[serde(default = "default_suites")]
    pub cipher_suites: Vec<String>,
    /// Key-exchange groups in preference order (`X25519`, `P-256`, ...).
    #[serde(default = "default_groups")]
    pub groups: Vec<String>,
    /// From how many days before the node certificate expires the provider
    /// warns in its log (at start, at each reload and every hour).
    #[serde(default = "default_expiry_warning_days")]
    pub expiry_warning_days: u32,
    /// The cluster's nodes and their pod CIDRs (see
    /// [`crate::node_map`]). When set, the peer's certificate
    /// must name (as a subjectAltName DNS name) the node whose pods include
    /// the peer's address, or the handshake fails closed; when unset, any
    /// certificate the CA signed is accepted. Reloaded with the other files.
    #[serde(default)]
    pub node_map: Option<PathBuf>,
    /// The most in-band handshakes this node has in flight: ClientHellos
    /// sent and not yet answered, which is the work this node asks of its
    /// peers at once. Further connecting sides wait without using the CPU
    /// or a thread. The number allowed adapts, from one per CPU up to
    /// this, to how long whole handshakes take against the key timeout
    /// (see [`crate::admission`]). Unset: 16 per CPU.
    #[serde(default)]
    pub handshakes_in_flight: Option<std::num::NonZeroUsize>,
}

fn default_expiry_warning_days() -> u32 {
    30
}

fn default_suites() -> Vec<String> {
    vec![
        "TLS_AES_128_GCM_SHA256".into(),
        "TLS_AES_256_GCM_SHA384".into(),
        "TLS_CHACHA20_POLY1305_SHA256".into(),
    ]
}

fn default_groups() -> Vec<String> {
    vec!["X25519".into(), "P-256".into()]
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandshakeProviderConfig {
    /// The Unix socket to serve on (each provider has its own default).
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Besides root, the uid allowed to call.
    #[serde(default)]
    pub allowed_uid: Option<u32>,
    /// Where to serve the key request metrics (`GET /metrics`); unset:
    /// not served.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How connections are keyed.
    #[serde(default)]
    pub keying: Keying,
    /// Handshake parameters.
    pub tls: TlsSection,
    /// The node-pair sessions (with `keying = "node-pair"`).
    #[serde(default)]
    pub node_pair: Option<NodePairSection>,
}

/// How a handshake provider keys connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Keying {
    /// A full TLS 1.3 handshake over each application connection, before
    /// its first byte: each connection has its own handshake and forward
    /// secrecy, at the cost of a handshake per connection.
    #[default]
    InBand,
    /// One TLS 1.3 session per node pair on the providers' own connection;
    /// each connection's keys are exported from it with the connection's
    /// identity. Nothing crosses the application's connection, and no
    /// round trip is spent per connection; a connection's secrecy is that
    /// of the session (replaced every `lifetime_seconds`).
    NodePair,
}

impl HandshakeProviderConfig {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load_toml(path)
    }
}

/// The command line of a handshake provider.
#[derive(Debug, clap::Parser)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, short)]
    config: PathBuf,
    /// Override the file's `socket`.
    #[arg(long)]
    socket: Option<PathBuf>,
}

/// The whole `main` of the handshake provider over the TLS library `L`,
/// named `tlshub-provider-NAME` after [`TlsLibrary::NAME`]: parse the
/// command line (`--config`, default `/etc/tlshub/provider-NAME.toml`;
/// `--socket`), load the file, pick the socket (`--socket`, else the
/// file's `socket`, else `/run/tlshub/provider-NAME.sock`), build the
/// provider from `[tls]`, and [`run`](crate::run) it. Configuration errors
/// exit with code 2, naming the file.
pub fn handshake_provider_main<L: TlsLibrary>() -> std::process::ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let program = format!("tlshub-provider-{}", L::NAME);
    let command = Args::command()
        .name(program.clone())
        .version(env!("CARGO_PKG_VERSION"))
        .about(format!(
            "tlshub key provider: a mutually authenticated TLS 1.3 handshake over the application's own connection with {}, whose traffic keys the core installs in kTLS.",
            L::NAME
        ))
        .mut_arg("config", |a| {
            a.required(false)
                .default_value(format!("/etc/tlshub/provider-{}.toml", L::NAME))
        });
    let args = match Args::from_arg_matches(&command.get_matches()) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    crate::runtime::init_logging();
    let config = match HandshakeProviderConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{program}: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let socket_path = args
        .socket
        .or(config.socket)
        .unwrap_or_else(|| PathBuf::from(format!("/run/tlshub/provider-{}.sock", L::NAME)));
    if config.node_pair.is_some() && config.keying != Keying::NodePair {
        eprintln!(
            "{program}: {}: [node_pair] is set, but `keying` is not \"node-pair\"",
            args.config.display()
        );
        return std::process::ExitCode::from(2);
    }
    let node_pair =
        (config.keying == Keying::NodePair).then(|| config.node_pair.unwrap_or_default());
    let provider = match HandshakeProvider::<L>::with_keying(&config.tls, node_pair) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{program}: {}: {e}", args.config.display());
            return std::process::ExitCode::from(2);
        }
    };
    let options = crate::ServeOptions {
        socket_path,
        allowed_uid: config.allowed_uid,
        metrics_listen: config.metrics_listen,
    };
    crate::server::block_on(&program, async move {
        provider
            .start()
            .await
            .map_err(|e| format!("node-pair sessions: {e}"))?;
        crate::serve(provider, options)
            .await
            .map_err(|e| e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_configurations_parse() {
        for text in [
            include_str!("../../deploy/config/provider-openssl.toml"),
            include_str!("../../deploy/config/provider-boringssl.toml"),
        ] {
            let c: HandshakeProviderConfig = toml::from_str(text).unwrap();
            assert_eq!(c.tls.expiry_warning_days, 30);
            assert_eq!(c.keying, Keying::InBand);
        }
    }

    #[test]
    fn node_pair_settings_parse_with_defaults() {
        let c: HandshakeProviderConfig = toml::from_str(
            "keying = \"node-pair\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[node_pair]\nport = 9000\n",
        )
        .unwrap();
        assert_eq!(c.keying, Keying::NodePair);
        let n = c.node_pair.unwrap();
        assert_eq!(
            (n.port, n.lifetime_seconds, n.drain_seconds),
            (9000, 3600, 30)
        );
        assert_eq!(n.listen.port(), 7446);
        let e = toml::from_str::<HandshakeProviderConfig>(
            "keying = \"node_pair\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("keying") && e.contains("node-pair"), "{e}");
    }

    #[test]
    fn missing_tls_section_names_the_key() {
        let e = toml::from_str::<HandshakeProviderConfig>("socket = \"/x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls"), "{e}");
        let e = toml::from_str::<HandshakeProviderConfig>(
            "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\nsuites = []\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("unknown field `suites`") && e.contains("line 5"),
            "{e}"
        );
    }
}
