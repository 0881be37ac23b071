//! `tlshub-standin`: plays the TLSHub kernel module's side of its netlink
//! protocol, byte for byte, over `NETLINK_USERSOCK` (the module itself is
//! not available). Node-level handshakes are real: two stand-ins on two
//! nodes run a mutually authenticated TLS 1.3 handshake with OpenSSL and
//! both export the same 32-byte node secret, from which each derives the
//! per-4-tuple master key the module would hand out.
//!
//! Behaviour (see `provider-tlshub/PROTOCOL.md`): INIT answers a log line
//! and 0x07; START answers log lines and 0x01 (first handshake with that
//! node), 0x02 (a later one), 0x05 (already connected) or 0x03 (failed);
//! FETCH answers 0x06 with status 0 and the key, -1 before any handshake
//! with the peer node, -2 once the node secret is older than its lifetime.
//! Of two nodes, the one with the lower address starts the node handshake;
//! the other waits for it, so both always hold the same node secret.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use netlink_sys::{Socket, SocketAddr as NlAddr};
use openssl::ssl::{
    Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslVerifyMode, SslVersion,
};
use provider_tlshub::codec::{self, reply_type};
use provider_tlshub::pod_map::{MapFormat, PodMap};
use tlshub_provider_sdk::tls13::{Hash, hkdf_expand_label};

#[derive(Debug, Parser)]
struct Args {
    /// Netlink protocol (2 = NETLINK_USERSOCK).
    #[arg(long, default_value_t = 2)]
    protocol: isize,
    /// The port id this stand-in binds (the provider's `module.port_id`).
    #[arg(long)]
    port_id: u32,
    /// This node's address (node-level handshakes listen here).
    #[arg(long)]
    node_ip: Ipv4Addr,
    /// Port of the node-level handshake.
    #[arg(long, default_value_t = 7443)]
    peer_port: u16,
    /// Pod-to-node map: which node hosts each pod.
    #[arg(long)]
    pod_map: PathBuf,
    #[arg(long)]
    ca: PathBuf,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// Node secrets older than this give status -2.
    #[arg(long, default_value_t = 600_000)]
    lifetime_ms: u64,
}

struct Session {
    secret: zeroize::Zeroizing<[u8; 32]>,
    at: Instant,
}

#[derive(Default)]
struct State {
    sessions: HashMap<Ipv4Addr, Session>,
    handshakes: HashMap<Ipv4Addr, u32>,
}

fn context(args: &Args) -> anyhow::Result<SslContext> {
    let mut b = SslContextBuilder::new(SslMethod::tls())?;
    b.set_min_proto_version(Some(SslVersion::TLS1_3))?;
    b.set_ca_file(&args.ca)?;
    b.set_certificate_chain_file(&args.cert)?;
    b.set_private_key_file(&args.key, SslFiletype::PEM)?;
    b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    b.set_num_tickets(0)?;
    Ok(b.build())
}

const EXPORTER_LABEL: &str = "EXPORTER-tlshub-standin-node-secret";

fn export(ssl: &openssl::ssl::SslRef) -> anyhow::Result<zeroize::Zeroizing<[u8; 32]>> {
    let mut out = zeroize::Zeroizing::new([0u8; 32]);
    ssl.export_keying_material(&mut out[..], EXPORTER_LABEL, None)?;
    Ok(out)
}

/// Per-4-tuple master key from the node secret.
fn master_key(secret: &[u8; 32], client: SocketAddr, server: SocketAddr) -> [u8; 32] {
    let mut ctx = Vec::with_capacity(12);
    for a in [client, server] {
        if let SocketAddr::V4(v4) = a {
            ctx.extend_from_slice(&v4.ip().octets());
            ctx.extend_from_slice(&v4.port().to_be_bytes());
        }
    }
    let mut key = [0u8; 32];
    // The secret is 32 bytes and the label short: this cannot fail.
    let _ = hkdf_expand_label(Hash::Sha256, secret, b"tlshub tuple", &ctx, &mut key);
    key
}

/// Accepts node-level handshakes from peers and records their secrets.
fn serve_peers(args: &Args, ctx: SslContext, state: Arc<Mutex<State>>) -> anyhow::Result<()> {
    let listener = TcpListener::bind((args.node_ip, args.peer_port))?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let Ok(SocketAddr::V4(peer)) = stream.peer_addr() else {
                continue;
            };
            let Ok(ssl) = Ssl::new(&ctx) else { continue };
            match ssl.accept(stream) {
                Ok(mut tls) => {
                    if let Ok(secret) = export(tls.ssl()) {
                        if let Ok(mut s) = state.lock() {
                            s.sessions.insert(
                                *peer.ip(),
                                Session {
                                    secret,
                                    at: Instant::now(),
                                },
                            );
                            *s.handshakes.entry(*peer.ip()).or_default() += 1;
                        }
                        eprintln!("standin: node handshake from {}", peer.ip());
                    }
                    let _ = tls.write_all(b"ok");
                    let _ = tls.shutdown();
                }
                Err(e) => eprintln!("standin: node handshake from {} failed: {e}", peer.ip()),
            }
        }
    });
    Ok(())
}

/// Runs (or, as the higher address, waits for) the node handshake with `peer`.
fn handshake(
    args: &Args,
    ctx: &SslContext,
    state: &Arc<Mutex<State>>,
    peer: Ipv4Addr,
) -> Result<(), String> {
    if args.node_ip > peer {
        // Wait for a fresh node secret: an expired one is still in the map.
        let lifetime = Duration::from_millis(args.lifetime_ms);
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            if state
                .lock()
                .map(|s| {
                    s.sessions
                        .get(&peer)
                        .is_some_and(|x| x.at.elapsed() < lifetime)
                })
                .unwrap_or(false)
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        return Err(format!("node {peer} did not start the node handshake"));
    }
    let stream = TcpStream::connect_timeout(
        &SocketAddr::from((peer, args.peer_port)),
        Duration::from_secs(2),
    )
    .map_err(|e| format!("cannot reach node {peer}: {e}"))?;
    let ssl = Ssl::new(ctx).map_err(|e| e.to_string())?;
    let mut tls = ssl
        .connect(stream)
        .map_err(|e| format!("TLS with node {peer}: {e}"))?;
    let secret = export(tls.ssl()).map_err(|e| e.to_string())?;
    // Wait for the peer's "ok": it has stored the same secret.
    let mut ok = [0u8; 2];
    tls.read_exact(&mut ok)
        .map_err(|e| format!("node {peer} did not confirm: {e}"))?;
    let mut s = state.lock().map_err(|_| "state lock".to_string())?;
    s.sessions.insert(
        peer,
        Session {
            secret,
            at: Instant::now(),
        },
    );
    *s.handshakes.entry(peer).or_default() += 1;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pods = PodMap::load(&args.pod_map, MapFormat::Lines)?;
    let ctx = context(&args)?;
    let state = Arc::new(Mutex::new(State::default()));
    serve_peers(&args, ctx.clone(), Arc::clone(&state))?;
    let mut socket = Socket::new(args.protocol)?;
    socket.bind(&NlAddr::new(args.port_id, 0))?;
    eprintln!(
        "standin: module on netlink protocol {} port {}, node {}",
        args.protocol, args.port_id, args.node_ip
    );
    let lifetime = Duration::from_millis(args.lifetime_ms);
    loop {
        let (req, from) = socket.recv_from_full()?;
        let reply = |ty: u8, msg: &[u8]| {
            let _ = socket.send_to(&codec::encode_reply(ty, msg, args.port_id), &from, 0);
        };
        let log = |text: String| {
            let mut m = text.into_bytes();
            m.truncate(124);
            m.push(0);
            reply(reply_type::LOG, &m);
        };
        let (request, _, _) = match codec::decode_request(&req) {
            Ok(r) => r,
            Err(e) => {
                log(format!("bad request: {e}"));
                continue;
            }
        };
        let (client, server) = (
            SocketAddr::V4(request.client),
            SocketAddr::V4(request.server),
        );
        let peer = if request.server_side {
            pods.node_of(client.ip())
        } else {
            request.server_node.or_else(|| pods.node_of(server.ip()))
        };
        let opcode = request.opcode as u8;
        match opcode {
            0 => {
                log(format!("TLSHub stand-in ready on node {}", args.node_ip));
                reply(reply_type::INIT_COMPLETE, &[]);
            }
            1 => {
                let Some(peer) = peer else {
                    reply(
                        reply_type::HANDSHAKE_FAILED,
                        b"peer pod not in the pod map\0",
                    );
                    continue;
                };
                let fresh = state
                    .lock()
                    .map(|s| {
                        s.sessions
                            .get(&peer)
                            .is_some_and(|x| x.at.elapsed() < lifetime)
                    })
                    .unwrap_or(false);
                if fresh {
                    reply(reply_type::ALREADY_CONNECTED, &[]);
                    continue;
                }
                log(format!("handshake with node {peer}"));
                match handshake(&args, &ctx, &state, peer) {
                    Ok(()) => {
                        let count = state
                            .lock()
                            .map(|s| s.handshakes.get(&peer).copied().unwrap_or(0))
                            .unwrap_or(0);
                        reply(
                            if count <= 1 {
                                reply_type::HANDSHAKE_FIRST
                            } else {
                                reply_type::HANDSHAKE_AGAIN
                            },
                            &[],
                        );
                    }
                    Err(e) => {
                        let mut m = e.into_bytes();
                        m.truncate(124);
                        m.push(0);
                        reply(reply_type::HANDSHAKE_FAILED, &m);
                    }
                }
            }
            2 => {
                let status_key = peer.and_then(|p| {
                    let s = state.lock().ok()?;
                    let session = s.sessions.get(&p)?;
                    Some(if session.at.elapsed() >= lifetime {
                        (-2, [0u8; 32])
                    } else {
                        (0, master_key(&session.secret, client, server))
                    })
                });
                let (status, key) = status_key.unwrap_or((-1, [0u8; 32]));
                reply(reply_type::KEY, &codec::key_message(status, &key));
            }
            other => log(format!("unknown opcode {other}")),
        }
    }
}
