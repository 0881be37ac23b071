//! What one key request costs in transport alone: the SDK's client asks
//! a provider that answers at once (fixed keys), over a real Unix socket,
//! 3,000 times in a row, and prints the round trip's p50 and p99. The
//! provider is served as the SDK serves every provider (a multi-threaded
//! runtime, on its own thread here instead of its own process); the client
//! is timed over gRPC on a multi-threaded and on a current-thread runtime,
//! and over the keys stream on a current-thread runtime (as `tlshub-core`
//! runs it).
//!
//! ```sh
//! cargo run --release -p tlshub-provider-sdk --example round-trip
//! ```

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tlshub_provider_sdk::client::ProviderClient;
use tlshub_provider_sdk::server::serve_until;
use tlshub_provider_sdk::{
    CipherSuite, ConnectionKeys, DirectionKeys, KeyRequest, Provider, ProviderError, ProviderInfo,
    Role, ServeOptions, TlsVersion,
};

/// Answers the same keys at once.
struct Instant0;

impl Provider for Instant0 {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            name: "round-trip".into(),
            version: "1".into(),
            tls_versions: vec![TlsVersion::Tls13],
            cipher_suites: vec![CipherSuite::Aes128Gcm],
            needs_socket: false,
            keying: String::new(),
            credentials: Vec::new(),
            peer_sessions: Vec::new(),
        }
    }

    async fn keys(&self, _request: KeyRequest) -> Result<ConnectionKeys, ProviderError> {
        let direction = |b| DirectionKeys {
            key: vec![b; 16],
            iv: vec![b; 12],
            record_sequence: 0,
        };
        Ok(ConnectionKeys {
            version: TlsVersion::Tls13,
            cipher_suite: CipherSuite::Aes128Gcm,
            transmit: direction(1),
            receive: direction(2),
        })
    }
}

const ROUNDS: usize = 3000;

/// `ROUNDS` sequential requests to `socket` on `runtime`, over the keys
/// stream or gRPC; sorted microseconds.
fn time_requests(
    runtime: &tokio::runtime::Runtime,
    socket: &Path,
    keys_stream: bool,
) -> Result<Vec<u64>, Box<dyn Error>> {
    runtime.block_on(async {
        let mut client = ProviderClient::new(socket, None);
        if !keys_stream {
            client = client.grpc_only();
        }
        client.info(Duration::from_secs(2)).await?;
        if client.uses_keys_stream() != keys_stream {
            return Err("the provider did not offer its keys stream".into());
        }
        let request = KeyRequest {
            socket_cookie: 9,
            role: Role::Client,
            local: "10.0.1.2:40000".parse()?,
            remote: "10.0.2.2:8443".parse()?,
            local_isn: 1,
            remote_isn: 2,
            node_name: "a".into(),
            socket: None,
            timeout: Duration::from_secs(2),
        };
        // Warm up: the connection, the allocator, the branch predictors.
        for _ in 0..200 {
            client.keys(&request).await?;
        }
        let mut took = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            let t = Instant::now();
            client.keys(&request).await?;
            took.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
        }
        took.sort_unstable();
        Ok(took)
    })
}

fn main() -> Result<(), Box<dyn Error>> {
    let dir = std::env::temp_dir().join(format!("tlshub-round-trip-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket: PathBuf = dir.join("provider.sock");
    let options = ServeOptions {
        socket_path: socket.clone(),
        allowed_uid: None,
        metrics_listen: None,
    };
    std::thread::spawn(move || {
        let served = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map(|rt| rt.block_on(serve_until(Instant0, options, std::future::pending())));
        if let Err(e) = served {
            eprintln!("round-trip: cannot serve: {e}");
        }
    });
    let started = Instant::now();
    while !socket.exists() {
        if started.elapsed() > Duration::from_secs(5) {
            return Err("the provider did not start within 5 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for (name, runtime, keys_stream) in [
        (
            "gRPC, client on a multi-threaded runtime",
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?,
            false,
        ),
        (
            "gRPC, client on a current-thread runtime",
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            false,
        ),
        (
            "keys stream, client on a current-thread runtime",
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            true,
        ),
    ] {
        let took = time_requests(&runtime, &socket, keys_stream)?;
        println!(
            "{name}: round trip p50 {} us, p99 {} us ({ROUNDS} requests)",
            took[ROUNDS / 2],
            took[ROUNDS * 99 / 100]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
