//! `tlshub-provider-boringssl`: a tlshub key provider that runs a mutually
//! authenticated TLS 1.3 handshake with BoringSSL over the application's own
//! connection and returns its traffic keys.
#![forbid(unsafe_code)]

mod handshake;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tlshub_provider_sdk::handshake_config::HandshakeProviderConfig;
use tlshub_provider_sdk::{ServeOptions, run};

/// TLS 1.3 key provider for tlshub, built on BoringSSL.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, short, default_value = "/etc/tlshub/provider-boringssl.toml")]
    config: PathBuf,
    /// Override `socket`.
    #[arg(long)]
    socket: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tlshub_provider_sdk::runtime::init_logging();
    let config = match HandshakeProviderConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tlshub-provider-boringssl: {e}");
            return ExitCode::from(2);
        }
    };
    let socket = args
        .socket
        .or(config.socket)
        .unwrap_or_else(|| PathBuf::from("/run/tlshub/provider-boringssl.sock"));
    let provider = match handshake::BoringSslProvider::new(&config.tls) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tlshub-provider-boringssl: {}: {e}", args.config.display());
            return ExitCode::from(2);
        }
    };
    let options = ServeOptions {
        socket_path: socket,
        allowed_uid: config.allowed_uid,
    };
    run("tlshub-provider-boringssl", provider, options)
}
