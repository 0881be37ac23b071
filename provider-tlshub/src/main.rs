//! `tlshub-provider-tlshub`: a tlshub key provider backed by the TLSHub
//! kernel module (netlink), or by its stand-in in tests.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use provider_tlshub::codec::Layout;
use provider_tlshub::module::ModuleConfig;
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
    #[serde(default)]
    module: ModuleSection,
    /// Pod-to-node map (required for layout v2).
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

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum SuiteName {
    AesGcm128,
    AesGcm256,
    Chacha20Poly1305,
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
    if layout == Layout::V2 && config.pod_map.is_none() {
        eprintln!(
            "tlshub-provider-tlshub: {}: layout v2 needs `pod_map`",
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
    let suite = match config.cipher_suite {
        SuiteName::AesGcm128 => CipherSuite::Aes128Gcm,
        SuiteName::AesGcm256 => CipherSuite::Aes256Gcm,
        SuiteName::Chacha20Poly1305 => CipherSuite::Chacha20Poly1305,
    };
    let provider = match TlsHubProvider::new(module, config.pod_map.as_deref(), suite) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tlshub-provider-tlshub: {e}");
            return ExitCode::from(2);
        }
    };
    let options = ServeOptions {
        socket_path: config.socket,
        allowed_uid: config.allowed_uid,
    };
    run("tlshub-provider-tlshub", provider, options)
}
