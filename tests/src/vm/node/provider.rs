//! A node's providers: which kinds the test bed runs, their files, and
//! how each is started (with the TLSHub stand-in playing the module).

use std::path::PathBuf;
use std::time::Duration;

use super::{Node, NodeSpec};
use crate::failed;
use crate::vm::outcome::Failure;
use crate::vm::process::Proc;

/// The test PKI in the VM (made by the xtask): `ca.pem`, `node-a.pem`
/// and `.key`, `node-b.*`; `node-a-renewed.pem` (node a's key, the cluster
/// CA, 30 days); `rogue-ca.pem`, a second CA nobody trusts unless a
/// scenario adds it, and `node-a-rogue.*` and `node-b-rogue.*` from it;
/// `node-c.*`, a third node's (cluster CA).
pub const CERTS: &str = "/etc/tlshub/certs";

/// A node's handshake providers' files (see [`Node::provider_files`]).
#[derive(Debug, Clone)]
pub struct ProviderFiles {
    /// The CAs trusted for peers' certificates.
    pub ca: PathBuf,
    /// The node's certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The node map ([`NODE_MAP`]): a peer's certificate must name the
    /// node of its address.
    pub node_map: PathBuf,
}

pub(super) fn provider_files(dir: &std::path::Path) -> ProviderFiles {
    ProviderFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("node.pem"),
        key: dir.join("node.key"),
        node_map: dir.join("nodes.toml"),
    }
}

/// The test bed's node map: node a has pod-a (and pod-a2), node b pod-b;
/// their addresses are the ones the TLSHub stand-ins play the module at.
pub(super) const NODE_MAP: &str = "[[node]]\nname = \"node-a\"\naddress = \"10.99.0.1\"\npod_cidrs = [\"10.0.1.0/24\", \"fd00:1::/64\", \"10.0.3.0/24\"]\n\n[[node]]\nname = \"node-b\"\naddress = \"10.99.0.2\"\npod_cidrs = [\"10.0.2.0/24\", \"fd00:2::/64\"]\n";

/// Which provider a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// `tlshub-provider-openssl`.
    OpenSsl,
    /// `tlshub-provider-boringssl` (same configuration file shape).
    BoringSsl,
    /// `tlshub-provider-tlshub` (layout v2) with `tlshub-standin` playing
    /// the kernel module, both in the node's network namespace.
    TlsHub,
    /// The SDK's example (`proto/examples/psk-provider.rs`), both nodes
    /// sharing `/run/tlshub/cluster.psk`.
    ExamplePsk,
    /// `tlshub-bad-provider --mode <mode>`.
    Bad(&'static str),
    /// Nothing listens on the configured socket.
    Missing,
}

impl ProviderKind {
    /// The provider's name in the core's `[provider.endpoints]`.
    pub fn name(self) -> &'static str {
        match self {
            Self::OpenSsl => "openssl",
            Self::BoringSsl => "boringssl",
            Self::TlsHub => "tlshub",
            Self::ExamplePsk => "psk",
            Self::Bad(_) => "bad",
            Self::Missing => "missing",
        }
    }
}

/// Where a node's handshake provider serves its own metrics
/// (`metrics_listen`; the providers run in the root namespace).
pub(super) fn provider_metrics_port(node: &str, kind: ProviderKind) -> u16 {
    let base = if node == "a" { 9470 } else { 9480 };
    base + match kind {
        ProviderKind::BoringSsl => 1,
        ProviderKind::TlsHub => 2,
        _ => 0,
    }
}

/// `GET /metrics` on 127.0.0.1:`port`: the text, if the answer is 200.
pub fn metrics_at(port: u16) -> Result<String, Failure> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    if !text.starts_with("HTTP/1.1 200") {
        return Err(text.into());
    }
    Ok(text)
}

/// Whether a node's provider runs in the node's network namespace rather
/// than the root one: the TLSHub provider (netlink to the module is per
/// namespace) and a handshake provider in node-pair mode (its session
/// crosses the link between the nodes).
pub(super) fn in_node_namespace(spec: &NodeSpec, kind: ProviderKind) -> bool {
    kind == ProviderKind::TlsHub
        || (spec.node_pair && matches!(kind, ProviderKind::OpenSsl | ProviderKind::BoringSsl))
}

/// The port node-pair sessions use (the providers' default).
pub const NODE_PAIR_PORT: u16 = 7446;

/// A test bed node's own address, on the link between the nodes.
fn node_ip(node: &str) -> &'static str {
    if node == "a" {
        "10.99.0.1"
    } else {
        "10.99.0.2"
    }
}

/// Starts one provider of a node (its config file, socket and log named
/// after the provider), and the TLSHub stand-in for the TLSHub provider.
pub(super) fn spawn_provider(
    spec: &NodeSpec,
    dir: &std::path::Path,
    kind: ProviderKind,
    standin: &mut Option<Proc>,
) -> Result<Option<Proc>, Failure> {
    let n = spec.name;
    let socket = dir.join(format!("provider-{}.sock", kind.name()));
    // The node's own copies, which a scenario may replace (the providers
    // reload them) without touching the other scenarios' files.
    let files = provider_files(dir);
    for (from, to) in [
        ("ca.pem".to_owned(), &files.ca),
        (format!("node-{n}.pem"), &files.cert),
        (format!("node-{n}.key"), &files.key),
    ] {
        std::fs::copy(format!("{CERTS}/{from}"), to)
            .map_err(|e| format!("{}: {e}", to.display()))?;
    }
    let node_map = if spec.node_map {
        std::fs::write(&files.node_map, NODE_MAP).map_err(|e| e.to_string())?;
        format!("node_map = \"{}\"\n", files.node_map.display())
    } else {
        String::new()
    };
    let node_pair = in_node_namespace(spec, kind) && kind != ProviderKind::TlsHub;
    let (keying, node_pair_section) = if node_pair {
        (
            "keying = \"node-pair\"\n".to_owned(),
            format!(
                "[node_pair]\nlisten = \"{}:{NODE_PAIR_PORT}\"\nlifetime_seconds = {}\ndrain_seconds = 2\n",
                node_ip(n),
                spec.node_pair_lifetime_seconds
            ),
        )
    } else {
        (String::new(), String::new())
    };
    let provider_toml = format!(
        "socket = \"{}\"\nmetrics_listen = \"127.0.0.1:{}\"\n{keying}[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n{node_map}cipher_suites = [\"{}\"]\ngroups = [\"X25519\"]\n{node_pair_section}",
        socket.display(),
        provider_metrics_port(n, kind),
        files.ca.display(),
        files.cert.display(),
        files.key.display(),
        spec.suite
    );
    std::fs::write(
        dir.join(format!("provider-{}.toml", kind.name())),
        provider_toml,
    )
    .map_err(|e| e.to_string())?;

    let plog = PathBuf::from(format!("/tmp/logs/node-{n}-provider-{}.log", kind.name()));
    // Every provider process is named, logged and awaited the same way.
    let start =
        |netns: Option<&str>, argv: &[&str], ready: &str| -> Result<Option<Proc>, Failure> {
            let argv = spec.command(argv);
            let mut p = Proc::spawn(
                &format!("provider-{n}-{}", kind.name()),
                netns,
                &argv,
                &plog,
            )?;
            p.wait_for_log(ready, Duration::from_secs(20))?;
            Ok(Some(p))
        };
    let provider = match kind {
        ProviderKind::OpenSsl | ProviderKind::BoringSsl => {
            let binary = if kind == ProviderKind::OpenSsl {
                "tlshub-provider-openssl"
            } else {
                "tlshub-provider-boringssl"
            };
            let cfg = dir.join(format!("provider-{}.toml", kind.name()));
            let netns = node_pair.then(|| format!("node-{n}"));
            let cfg = cfg.to_string_lossy();
            // Node-pair sessions log each dial at debug, for the failure
            // dumps.
            let argv: Vec<&str> = if node_pair {
                vec![
                    "env",
                    "RUST_LOG=info,tlshub_provider_sdk::handshake::node_pair=debug",
                    binary,
                    "--config",
                    &cfg,
                ]
            } else {
                vec![binary, "--config", &cfg]
            };
            start(netns.as_deref(), &argv, "provider serving")?
        }
        ProviderKind::TlsHub => {
            let (node_ip, port_id) = (node_ip(n), if n == "a" { "4001" } else { "4002" });
            let pods = dir.join("pods");
            std::fs::write(
                &pods,
                "10.0.1.0/24 10.99.0.1\n10.0.3.0/24 10.99.0.1\n10.0.2.0/24 10.99.0.2\n",
            )
            .map_err(|e| e.to_string())?;
            let certs = |f: &str| format!("/etc/tlshub/certs/node-{n}.{f}");
            let slog = PathBuf::from(format!("/tmp/logs/node-{n}-standin.log"));
            let mut s = Proc::spawn(
                &format!("standin-{n}"),
                Some(&format!("node-{n}")),
                &[
                    "tlshub-standin",
                    "--port-id",
                    port_id,
                    "--node-ip",
                    node_ip,
                    "--pod-map",
                    &pods.to_string_lossy(),
                    "--ca",
                    "/etc/tlshub/certs/ca.pem",
                    "--cert",
                    &certs("pem"),
                    "--key",
                    &certs("key"),
                    "--lifetime-ms",
                    &spec.standin_lifetime_ms.to_string(),
                ],
                &slog,
            )?;
            s.wait_for_log("standin: module", Duration::from_secs(20))?;
            *standin = Some(s);
            // The provider reads the node map the handshake providers
            // read; the stand-in, playing the module, its own pod map.
            let node_map = &files.node_map;
            let cfg = dir.join("provider-tlshub.toml");
            std::fs::write(node_map, NODE_MAP)
                .and_then(|()| {
                    std::fs::write(
                        &cfg,
                        format!(
                            "socket = \"{}\"\nmetrics_listen = \"127.0.0.1:{}\"\nnode_map = \"{}\"\n[module]\nprotocol = 2\nport_id = {port_id}\nlayout = \"v2\"\ntimeout_ms = 3000\n",
                            socket.display(),
                            provider_metrics_port(n, kind),
                            node_map.display()
                        ),
                    )
                })
                .map_err(|e| e.to_string())?;
            start(
                Some(&format!("node-{n}")),
                &["tlshub-provider-tlshub", "--config", &cfg.to_string_lossy()],
                "provider serving",
            )?
        }
        ProviderKind::ExamplePsk => {
            let psk = PathBuf::from("/run/tlshub/cluster.psk");
            if !psk.exists() {
                std::fs::write(&psk, random_32()?).map_err(|e| e.to_string())?;
            }
            start(
                None,
                &[
                    "psk-provider",
                    "--psk",
                    &psk.to_string_lossy(),
                    "--socket",
                    &socket.to_string_lossy(),
                ],
                "provider serving",
            )?
        }
        ProviderKind::Bad(mode) => start(
            None,
            &[
                "tlshub-bad-provider",
                "--socket",
                &socket.to_string_lossy(),
                "--mode",
                mode,
            ],
            "bad provider",
        )?,
        ProviderKind::Missing => None,
    };
    Ok(provider)
}

/// 32 random bytes from /dev/urandom.
fn random_32() -> Result<Vec<u8>, Failure> {
    use std::io::Read;
    let mut b = vec![0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    Ok(b)
}

/// The key requests a provider's metrics text counts as answered with an
/// error (`tlshub_keyprovider_requests_total{result}`, any result but
/// `ok`), by result.
fn failed_by_result(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("tlshub_keyprovider_requests_total{result=\""))
        .filter_map(|l| {
            let (result, rest) = l.split_once('"')?;
            let count = rest.rsplit(' ').next()?.parse::<f64>().ok()?;
            (result != "ok").then(|| (result.to_owned(), count))
        })
        .collect()
}

/// A provider's key requests by its own metrics ([`Node::provider_requests`]).
#[derive(Debug)]
pub struct ProviderRequests {
    /// Answered with keys.
    pub answered: f64,
    /// Answered otherwise (any result but `ok`).
    pub failed: f64,
    /// `failed` by result (`timeout`, `handshake`, ...).
    pub failed_by_result: std::collections::BTreeMap<String, f64>,
    /// In-band connecting sides that failed waiting for an admission slot
    /// (0 for other providers): part of the `timeout` results.
    pub slot_timeouts: f64,
    /// The whole metrics text, for a failure message.
    pub text: String,
}

impl ProviderRequests {
    /// Whether the provider was asked for keys at all.
    pub fn any(&self) -> bool {
        self.answered + self.failed > 0.0
    }
}

/// A node's providers: their files, logs, sockets, metrics and processes.
impl Node {
    /// The CA, certificate and key files its handshake providers load
    /// (the node's own copies; they reload them when they change).
    pub fn provider_files(&self) -> ProviderFiles {
        provider_files(&self.dir)
    }

    /// The log of one of this node's providers.
    pub fn provider_log(&self, kind: ProviderKind) -> String {
        std::fs::read_to_string(format!(
            "/tmp/logs/node-{}-provider-{}.log",
            self.spec.name,
            kind.name()
        ))
        .unwrap_or_default()
    }

    /// The socket of one of this node's providers.
    pub fn provider_socket(&self, kind: ProviderKind) -> PathBuf {
        self.dir.join(format!("provider-{}.sock", kind.name()))
    }

    /// The metrics a handshake provider serves itself (the SDK's key
    /// request metrics).
    pub fn provider_metrics(&self, kind: ProviderKind) -> Result<String, Failure> {
        let port = provider_metrics_port(self.spec.name, kind);
        let fetched = if in_node_namespace(&self.spec, kind) {
            // It runs in the node's namespace (netlink to the module is
            // per namespace; node-pair sessions cross the node's link),
            // and so does its metrics endpoint.
            crate::vm::process::run(
                Some(&format!("node-{}", self.spec.name)),
                &["wget", "-qO-", &format!("http://127.0.0.1:{port}/metrics")],
            )
        } else {
            metrics_at(port)
        };
        fetched.map_err(|e| {
            e.context(format!(
                "metrics of node {}'s {}",
                self.spec.name,
                kind.name()
            ))
        })
    }

    /// What a provider's own metrics say of the key requests it served:
    /// answered, failed (any other result, also by result), and the
    /// metrics text.
    pub fn provider_requests(&self, kind: ProviderKind) -> Result<ProviderRequests, Failure> {
        let text = self.provider_metrics(kind)?;
        let answered =
            crate::vm::support::metric(&text, "tlshub_keyprovider_requests_total{result=\"ok\"}");
        let failed_by_result = failed_by_result(&text);
        Ok(ProviderRequests {
            answered,
            failed: failed_by_result.values().sum(),
            failed_by_result,
            slot_timeouts: crate::vm::support::metric(
                &text,
                "tlshub_keyprovider_handshake_slot_timeouts_total",
            ),
            text,
        })
    }

    /// Kills one provider with SIGKILL (no cleanup: its socket file stays).
    pub fn kill_provider(&mut self, kind: ProviderKind) {
        for (k, p) in &mut self.providers {
            if *k == kind
                && let Some(p) = p.as_mut()
            {
                p.signal(9);
                let _ = p.wait(Duration::from_secs(10));
            }
        }
    }

    /// The pid of a provider process (0 when it is not running).
    pub fn provider_pid(&self, kind: ProviderKind) -> u32 {
        self.providers
            .iter()
            .find(|(k, _)| *k == kind)
            .and_then(|(_, p)| p.as_ref().map(Proc::pid))
            .unwrap_or(0)
    }

    /// The `/proc` state letters of a provider process, sampled every 100 ms
    /// for `span` (`T` = stopped: it would be held by the gate).
    pub fn provider_states(&self, kind: ProviderKind, span: Duration) -> String {
        let pid = self.provider_pid(kind);
        let until = std::time::Instant::now() + span;
        let mut out = String::new();
        while std::time::Instant::now() < until {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            out.push(
                stat.rsplit_once(')')
                    .and_then(|(_, r)| r.trim_start().chars().next())
                    .unwrap_or('?'),
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        out
    }

    /// Starts a provider again after [`Node::kill_provider`].
    pub fn restart_provider(&mut self, kind: ProviderKind) -> Result<(), Failure> {
        let spec = self.spec.clone();
        let dir = self.dir.clone();
        let mut standin = None;
        let p = spawn_provider(&spec, &dir, kind, &mut standin)?;
        for (k, slot) in &mut self.providers {
            if *k == kind {
                *slot = p;
                return Ok(());
            }
        }
        Err(failed!(
            "node {} has no provider {}",
            spec.name,
            kind.name()
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn failed_requests_are_counted_by_result_and_ok_is_not() {
        let text = "# TYPE tlshub_keyprovider_requests counter\n\
                    tlshub_keyprovider_requests_total{result=\"ok\"} 7\n\
                    tlshub_keyprovider_requests_total{result=\"timeout\"} 42\n\
                    tlshub_keyprovider_requests_total{result=\"handshake\"} 3\n\
                    tlshub_keyprovider_request_duration_seconds_count{role=\"client\",result=\"timeout\"} 42\n";
        let failed = super::failed_by_result(text);
        assert_eq!(
            failed.into_iter().collect::<Vec<_>>(),
            vec![("handshake".to_owned(), 3.0), ("timeout".to_owned(), 42.0)]
        );
    }
}
