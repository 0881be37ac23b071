//! `tlshub-bad-provider`: speaks the provider API but misbehaves on purpose,
//! bypassing the SDK's own answer checks, so the core's handling of bad
//! providers can be tested.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use tlshub_provider_sdk::pb;
use tonic::{Request, Response, Status};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Misbehaviour {
    /// Keys of the wrong length for the suite.
    MalformedKey,
    /// A cipher suite value that does not exist.
    UnknownCipher,
    /// Never answers.
    Hang,
}

#[derive(Debug, Parser)]
struct Args {
    #[arg(long)]
    socket: PathBuf,
    #[arg(long, value_enum)]
    mode: Misbehaviour,
}

struct Bad(Misbehaviour);

#[tonic::async_trait]
impl pb::key_provider_server::KeyProvider for Bad {
    async fn get_info(
        &self,
        _: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::ProviderInfo>, Status> {
        Ok(Response::new(pb::ProviderInfo {
            name: format!("bad-{:?}", self.0),
            version: "0".into(),
            api_version: pb::ApiVersion::V1 as i32,
            tls_versions: vec![pb::TlsVersion::TlsVersion13 as i32],
            cipher_suites: vec![pb::CipherSuite::Aes128Gcm as i32],
            needs_socket: false,
            keying: String::new(),
            credentials: Vec::new(),
            peer_sessions: Vec::new(),
            keys_stream: false,
        }))
    }

    async fn get_connection_keys(
        &self,
        _: Request<pb::ConnectionKeysRequest>,
    ) -> Result<Response<pb::ConnectionKeys>, Status> {
        let dir = |k: u8| pb::DirectionKeys {
            key: vec![k; 16],
            iv: vec![k; 12],
            record_sequence: 0,
        };
        let mut keys = pb::ConnectionKeys {
            version: pb::TlsVersion::TlsVersion13 as i32,
            cipher_suite: pb::CipherSuite::Aes128Gcm as i32,
            transmit: Some(dir(1)),
            receive: Some(dir(2)),
        };
        match self.0 {
            Misbehaviour::MalformedKey => {
                if let Some(t) = keys.transmit.as_mut() {
                    t.key.truncate(5);
                }
            }
            Misbehaviour::UnknownCipher => keys.cipher_suite = 99,
            Misbehaviour::Hang => std::future::pending::<()>().await,
        }
        Ok(Response::new(keys))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tlshub_provider_sdk::server::bind_private(&args.socket, None)?;
    eprintln!(
        "bad provider ({:?}) on {}",
        args.mode,
        args.socket.display()
    );
    tonic::transport::Server::builder()
        .add_service(pb::key_provider_server::KeyProviderServer::new(Bad(
            args.mode
        )))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await?;
    Ok(())
}
