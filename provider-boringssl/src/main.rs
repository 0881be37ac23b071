//! `tlshub-provider-boringssl`: a tlshub key provider that runs a mutually
//! authenticated TLS 1.3 handshake with BoringSSL over the application's own
//! connection and returns its traffic keys.
#![forbid(unsafe_code)]

mod handshake;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tlshub_provider_sdk::handshake_config::provider_main;

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
    provider_main(
        "tlshub-provider-boringssl",
        &args.config,
        args.socket,
        "/run/tlshub/provider-boringssl.sock",
        tlshub_provider_sdk::handshake::HandshakeProvider::<handshake::BoringSsl>::new,
    )
}
