//! `tlshub-provider-tlshub`: a tlshub key provider backed by the TLSHub
//! kernel module (netlink), or by its stand-in in tests.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use provider_tlshub::codec::Layout;
use provider_tlshub::module::ModuleConfig;
use provider_tlshub::pod_map::MapFormat;
use provider_tlshub::provider::TlsHubProvider;
use serde::Deserialize;
use tlshub_provider_sdk::runtime::{init_logging, load_toml};
use tlshub_provider_sdk::{CipherSuite, ServeOptions, run};

/// Key provider for tlshub backed by the TLSHub kernel module.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, short, default_value = "/etc/tlshub/provider-tlshub.toml")]
    config: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_socket")]
    socket: PathBuf,
    #[serde(default)]
    allowed_uid: Option<u32>,
    /// Where to serve the key request metrics (`GET /metrics`).
    #[serde(default)]
    metrics_listen: Option<std::net::SocketAddr>,
    #[serde(default)]
    module: ModuleSection,
    /// The cluster's node map (TOML, each node with its `address`), for
    /// layout v2; or `pod_map`.
    #[serde(default)]
    node_map: Option<PathBuf>,
    /// A pod-to-node map of `POD_IP[/LEN] NODE_IPV4` lines, for layout v2
    /// instead of `node_map`.
    #[serde(default)]
    pod_map: Option<PathBuf>,
    /// kTLS cipher for the derived keys.
    #[serde(default = "default_suite")]
    cipher_suite: SuiteName,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ModuleSection {
    protocol: i32,
    port_id: u32,
    layout: LayoutName,
    timeout_ms: u64,
    max_sockets: usize,
}

impl Default for ModuleSection {
    fn default() -> Self {
        Self {
            protocol: 31,
            port_id: 0,
            layout: LayoutName::V1,
            timeout_ms: 1500,
            max_sockets: 8,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum LayoutName {
    V1,
    V2,
}

/// The names the kernel prints (`CipherSuite::name`); serde's kebab-case
/// would make `aes-gcm128` of `AesGcm128`, which the shipped example did
/// not match.
#[derive(Debug, Clone, Copy, Deserialize)]
enum SuiteName {
    #[serde(rename = "aes-gcm-128")]
    AesGcm128,
    #[serde(rename = "aes-gcm-256")]
    AesGcm256,
    #[serde(rename = "chacha20-poly1305")]
    Chacha20Poly1305,
}

fn suite(name: SuiteName) -> CipherSuite {
    match name {
        SuiteName::AesGcm128 => CipherSuite::Aes128Gcm,
        SuiteName::AesGcm256 => CipherSuite::Aes256Gcm,
        SuiteName::Chacha20Poly1305 => CipherSuite::Chacha20Poly1305,
    }
}

fn default_socket() -> PathBuf {
    PathBuf::from("/run/tlshub/provider-tlshub.sock")
}

fn default_suite() -> SuiteName {
    SuiteName::AesGcm128
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging();
    let config: Config = match load_toml(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tlshub-provider-tlshub: {e}");
            return ExitCode::from(2);
        }
    };
    let layout = match config.module.layout {
        LayoutName::V1 => Layout::V1,
        LayoutName::V2 => Layout::V2,
    };
    let pods = match (&config.node_map, &config.pod_map) {
        (Some(_), Some(_)) => {
            eprintln!(
                "tlshub-provider-tlshub: {}: set `node_map` or `pod_map`, not both",
                args.config.display()
            );
            return ExitCode::from(2);
        }
        (Some(path), None) => Some((path.as_path(), MapFormat::NodeMap)),
        (None, Some(path)) => Some((path.as_path(), MapFormat::Lines)),
        (None, None) => None,
    };
    if layout == Layout::V2 && pods.is_none() {
        eprintln!(
            "tlshub-provider-tlshub: {}: layout v2 needs `node_map` (or `pod_map`)",
            args.config.display()
        );
        return ExitCode::from(2);
    }
    let module = ModuleConfig {
        protocol: config.module.protocol as isize,
        port_id: config.module.port_id,
        layout,
        timeout: Duration::from_millis(config.module.timeout_ms.max(1)),
        max_sockets: config.module.max_sockets.max(1),
    };
    let suite = suite(config.cipher_suite);
    let provider = match TlsHubProvider::new(module, pods, suite) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tlshub-provider-tlshub: {e}");
            return ExitCode::from(2);
        }
    };
    let options = ServeOptions {
        socket_path: config.socket,
        allowed_uid: config.allowed_uid,
        metrics_listen: config.metrics_listen,
    };
    run("tlshub-provider-tlshub", provider, options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_reads_the_node_map() {
        let c: Config =
            toml::from_str(include_str!("../../deploy/config/provider-tlshub.toml")).unwrap();
        assert_eq!(
            c.node_map.as_deref(),
            Some(std::path::Path::new("/etc/tlshub/nodes.toml"))
        );
        assert!(c.pod_map.is_none());
        assert!(matches!(c.cipher_suite, SuiteName::AesGcm128));
        for (name, layout) in [("aes-gcm-256", "v1"), ("chacha20-poly1305", "v2")] {
            let c: Config = toml::from_str(&format!(
                "cipher_suite = \"{name}\"\n[module]\nlayout = \"{layout}\"\n"
            ))
            .unwrap();
            assert_eq!(suite(c.cipher_suite).name(), name);
        }
    }
}
