//! `tlshub-provider-boringssl`: a tlshub key provider that runs a mutually
//! authenticated TLS 1.3 handshake with BoringSSL over the application's own
//! connection and returns its traffic keys (the SDK's handshake driver
//! over [`handshake`]).
#![forbid(unsafe_code)]

mod handshake;

fn main() -> std::process::ExitCode {
    tlshub_provider_sdk::handshake_config::handshake_provider_main::<handshake::BoringSsl>()
}
