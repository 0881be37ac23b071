//! `tlshub-conformance`: runs the provider conformance suite against two
//! running provider instances (node A and node B) and prints one line per
//! check; exits non-zero if any check fails. See `proto/PROVIDER_GUIDE.md`.

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
    let target = Target {
        a: ProviderClient::new(&args.node_a, None),
        b: ProviderClient::new(&args.node_b, None),
        client_ip: args.client_ip,
        server_ip: args.server_ip,
        concurrency: args.concurrency,
    };
    let checks = run(&target).await;
    let mut failed = 0;
    for c in &checks {
        match &c.result {
            Ok(what) => println!("CONFORMANCE PASS {} {what}", c.name),
            Err(why) => {
                failed += 1;
                println!("CONFORMANCE FAIL {} {why}", c.name);
            }
        }
    }
    println!("CONFORMANCE {} checks, {failed} failed", checks.len());
    if failed == 0 && !checks.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
