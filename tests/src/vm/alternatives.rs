//! What the benchmark compares tlshub with, set up between the same two
//! pods and measured by the same apps: WireGuard between the nodes (as
//! Cilium and Calico encrypt node-to-node traffic) and a TLS-terminating
//! proxy pair (stunnel, as sidecar meshes do), with the suite, group and
//! certificates of tlshub's handshake providers.

use std::path::PathBuf;
use std::time::Duration;

use super::node::PLAIN_PORT;
use super::process::{Proc, run};
use super::support::wait_for;
use super::topology::POD_B;
use crate::failed;
use crate::vm::outcome::Failure;

/// Pod a's address on the WireGuard path.
pub const WG_POD_A: &str = "10.0.21.2";
/// Pod b's address on the WireGuard path: traffic to it crosses the nodes'
/// tunnel (no tlshub policy selects these prefixes).
pub const WG_POD_B: &str = "10.0.22.2";
/// Where the app connects in pod-a for the proxy path: the local stunnel.
pub const PROXY_LOCAL: &str = "127.0.0.1";
/// The local stunnel's port in pod-a (it forwards to pod-b's stunnel).
pub const PROXY_LOCAL_PORT: u16 = 19100;
/// Pod-b's stunnel (TLS on the wire), which forwards to the app's
/// [`PLAIN_PORT`] on pod-b's loopback.
const PROXY_REMOTE_PORT: u16 = 9443;
const WG_PORT: &str = "51820";
/// (namespace, address, interface) of the pods' and nodes' tunnel-path
/// addresses, added on the existing pod links.
const WG_ADDRESSES: [(&str, &str, &str); 4] = [
    ("node-a", "10.0.21.1/24", "ap"),
    ("pod-a", "10.0.21.2/24", "pa"),
    ("node-b", "10.0.22.1/24", "bp"),
    ("pod-b", "10.0.22.2/24", "pb"),
];

/// WireGuard between node-a and node-b for pod addresses of their own
/// ([`WG_POD_A`], [`WG_POD_B`]); removed when dropped.
#[derive(Debug)]
pub struct WireGuard;

impl WireGuard {
    /// Loads the module, makes both nodes' keys and tunnel, routes the
    /// pods' extra prefixes through it and checks they reach each other.
    pub fn up() -> Result<Self, Failure> {
        run(None, &["modprobe", "wireguard"])?;
        let guard = WireGuard;
        for (ns, addr, dev) in WG_ADDRESSES {
            run(Some(ns), &["ip", "addr", "add", addr, "dev", dev])?;
        }
        // The pods use their tunnel address as the source towards the other.
        for (ns, dst, via, src) in [
            ("pod-a", "10.0.22.0/24", "10.0.21.1", WG_POD_A),
            ("pod-b", "10.0.21.0/24", "10.0.22.1", WG_POD_B),
        ] {
            run(
                Some(ns),
                &["ip", "route", "add", dst, "via", via, "src", src],
            )?;
        }
        let mut public = Vec::new();
        for n in ["a", "b"] {
            let key = format!("/tmp/wg-{n}.key");
            run(
                None,
                &["sh", "-c", &format!("umask 077; wg genkey > {key}")],
            )?;
            let pubkey = run(None, &["sh", "-c", &format!("wg pubkey < {key}")])?;
            public.push(pubkey.trim().to_owned());
        }
        for (ns, me, peer_pub, allowed, endpoint) in [
            ("node-a", "a", &public[1], "10.0.22.0/24", "10.99.0.2"),
            ("node-b", "b", &public[0], "10.0.21.0/24", "10.99.0.1"),
        ] {
            let ns = Some(ns);
            run(ns, &["ip", "link", "add", "wg0", "type", "wireguard"])?;
            let key = format!("/tmp/wg-{me}.key");
            let endpoint = format!("{endpoint}:{WG_PORT}");
            run(
                ns,
                &[
                    "wg",
                    "set",
                    "wg0",
                    "listen-port",
                    WG_PORT,
                    "private-key",
                    &key,
                    "peer",
                    peer_pub,
                    "allowed-ips",
                    allowed,
                    "endpoint",
                    &endpoint,
                ],
            )?;
            run(ns, &["ip", "link", "set", "wg0", "up"])?;
            run(ns, &["ip", "route", "add", allowed, "dev", "wg0"])?;
        }
        run(Some("pod-a"), &["ping", "-c", "1", "-W", "5", WG_POD_B])
            .map_err(|e| e.context("the pods cannot reach each other through WireGuard"))?;
        // The ping's handshake made the tunnel; check it carried it.
        let shown = run(Some("node-a"), &["wg", "show", "wg0", "transfer"])?;
        if shown.split_whitespace().nth(1).is_none_or(|rx| rx == "0") {
            return Err(failed!("WireGuard carried nothing: {shown}"));
        }
        Ok(guard)
    }
}

impl Drop for WireGuard {
    fn drop(&mut self) {
        for ns in ["node-a", "node-b"] {
            let _ = run(Some(ns), &["ip", "link", "del", "wg0"]);
        }
        for (ns, addr, dev) in WG_ADDRESSES {
            let _ = run(Some(ns), &["ip", "addr", "del", addr, "dev", dev]);
        }
    }
}

/// A stunnel pair: client mode in pod-a (listening on [`PROXY_LOCAL`]:
/// [`PROXY_LOCAL_PORT`]), server mode in pod-b (forwarding to the app on
/// pod-b's loopback, port [`PLAIN_PORT`]). TLS 1.3, AES-128-GCM, X25519,
/// both sides present and verify the nodes' certificates, and no session
/// resumption (tlshub's providers make a full handshake every time too).
/// Stopped when dropped.
#[derive(Debug)]
pub struct ProxyPair {
    _server: Proc,
    _client: Proc,
}

impl ProxyPair {
    /// Writes both configs, starts both and waits until both listen.
    pub fn start() -> Result<Self, Failure> {
        let dir = PathBuf::from("/run/tlshub/stunnel");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let common = |node: &str| {
            format!(
                "foreground = yes\npid =\ndebug = 3\n[tls]\ncert = /etc/tlshub/certs/node-{node}.pem\nkey = /etc/tlshub/certs/node-{node}.key\nCAfile = /etc/tlshub/certs/ca.pem\nverifyChain = yes\nsslVersionMin = TLSv1.3\nciphersuites = TLS_AES_128_GCM_SHA256\ncurves = X25519\n"
            )
        };
        let server = format!(
            "{}requireCert = yes\noptions = NO_TICKET\naccept = {POD_B}:{PROXY_REMOTE_PORT}\nconnect = 127.0.0.1:{PLAIN_PORT}\n",
            common("b")
        );
        let client = format!(
            "{}client = yes\nsessionResume = no\naccept = {PROXY_LOCAL}:{PROXY_LOCAL_PORT}\nconnect = {POD_B}:{PROXY_REMOTE_PORT}\n",
            common("a")
        );
        let start = |name: &str, ns: &str, text: String, port: u16| -> Result<Proc, Failure> {
            let conf = dir.join(format!("{name}.conf"));
            std::fs::write(&conf, text).map_err(|e| e.to_string())?;
            let conf = conf.to_string_lossy().into_owned();
            let log = PathBuf::from(format!("/tmp/logs/{name}.log"));
            let p = Proc::spawn(name, Some(ns), &["stunnel4", &conf], &log)?;
            wait_listening(ns, port, &log)?;
            Ok(p)
        };
        std::fs::create_dir_all("/tmp/logs").map_err(|e| e.to_string())?;
        let server = start("stunnel-server", "pod-b", server, PROXY_REMOTE_PORT)?;
        let client = start("stunnel-client", "pod-a", client, PROXY_LOCAL_PORT)?;
        Ok(Self {
            _server: server,
            _client: client,
        })
    }
}

/// Waits until something listens on `port` in `ns`.
fn wait_listening(ns: &str, port: u16, log: &std::path::Path) -> Result<(), Failure> {
    let filter = format!("sport = :{port}");
    wait_for(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || run(Some(ns), &["ss", "-Hltn", &filter]).unwrap_or_default(),
        |out| !out.trim().is_empty(),
    )
    .map(drop)
    .map_err(|_| {
        failed!(
            "nothing listens on port {port} in {ns}: {}",
            super::process::tail(log)
        )
    })
}
