//! `tlshub-conformance`: runs the provider conformance suite against two
//! running provider instances (node A and node B) and prints one line per
//! check; exits non-zero if any check fails. See `proto/PROVIDER_GUIDE.md`.
//! The suite runs once over gRPC and, if the provider offers its keys
//! stream (every provider built on the SDK does), once more over it: the
//! same checks, the same answers expected.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tlshub_provider_sdk::client::ProviderClient;
use tlshub_vm_tests::conformance::{Target, run};

/// Checks a tlshub key provider against the provider API v1 contract.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Node A's provider socket (the connecting side).
    #[arg(long)]
    node_a: PathBuf,
    /// Node B's provider socket (the accepting side).
    #[arg(long)]
    node_b: PathBuf,
    /// Client pod address named in requests to providers that do not take
    /// the socket.
    #[arg(long, default_value = "10.0.1.2")]
    client_ip: IpAddr,
    /// Server pod address, likewise.
    #[arg(long, default_value = "10.0.2.2")]
    server_ip: IpAddr,
    /// Requests in flight at once in the concurrency check.
    #[arg(long, default_value_t = 1000)]
    concurrency: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let (mut failed, mut total) = (0, 0);
    for transport in ["grpc", "keys-stream"] {
        let client = |path| {
            let c = ProviderClient::new(path, None);
            if transport == "grpc" {
                c.grpc_only()
            } else {
                c
            }
        };
        let target = Target {
            a: client(&args.node_a),
            b: client(&args.node_b),
            client_ip: args.client_ip,
            server_ip: args.server_ip,
            concurrency: args.concurrency,
        };
        let stream = transport == "keys-stream";
        if stream {
            let offered = target
                .a
                .info(std::time::Duration::from_secs(5))
                .await
                .is_ok()
                && target.a.uses_keys_stream();
            if !offered {
                println!("CONFORMANCE the provider offers no keys stream: gRPC only");
                break;
            }
        }
        let checks = run(&target).await;
        total += checks.len();
        if stream && !(target.a.uses_keys_stream() && target.b.uses_keys_stream()) {
            failed += 1;
            total += 1;
            println!(
                "CONFORMANCE FAIL [{transport}] keys_stream_reachable a request could not reach the keys stream the provider offers (the client fell back to gRPC)"
            );
        }
        for c in &checks {
            match &c.result {
                Ok(what) => println!("CONFORMANCE PASS [{transport}] {} {what}", c.name),
                Err(why) => {
                    failed += 1;
                    println!("CONFORMANCE FAIL [{transport}] {} {why}", c.name);
                }
            }
        }
    }
    println!("CONFORMANCE {total} checks, {failed} failed");
    if failed == 0 && total > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
