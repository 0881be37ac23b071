//! The kernel scenarios. Each returns `Ok(summary)` or `Err(why)`; the
//! runner prints one result line per scenario. See tests/README.md.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::node::{Node, NodeSpec, PLAIN_PORT, PROTECTED_PORT, ProviderKind};
use super::process::{self, Proc, finish, spawn_ready};
use super::topology::{POD_B, POD_B6, WIRE_IF};
use crate::pattern::{CLIENT_SEED, MARKER, SERVER_SEED};
use crate::wire;

/// A scenario: name and body.
pub type Scenario = (&'static str, ScenarioFn);

/// A scenario's body: a one-line summary, or why it failed.
pub type ScenarioFn = fn() -> Result<String, String>;

/// Every scenario of `cargo xtask test`, in order.
pub const TESTS: &[Scenario] = &[
    ("kernel_has_ktls_and_bpf_lsm", kernel_has_ktls_and_bpf_lsm),
    (
        "attach_detach_under_hook_traffic",
        super::stress::attach_detach_under_hook_traffic_short,
    ),
    ("exchange_matrix_wire_is_tls_and_decrypts", exchange_matrix),
    ("cipher_suites_aes256_chacha20", cipher_suites),
    ("large_transfers_64mib", large_transfers),
    (
        "sendfile_splice_small_send_buffer_no_stall",
        small_send_buffer_sendpage,
    ),
    ("ipv6_exchange_wire_is_tls_and_decrypts", ipv6_exchange),
    ("concurrent_keying_200_connections", concurrent_keying),
    ("tlshub_provider_with_standin_module", tlshub_provider),
    ("tlshub_expired_node_secret_rehandshakes", tlshub_expiry),
    ("boringssl_and_openssl_interoperate", boringssl_interop),
    ("conformance_suite_all_providers", conformance_all),
    ("fail_closed_provider_missing", fail_closed_provider_missing),
    ("fail_open_provider_missing", fail_open_provider_missing),
    ("provider_hangs_fail_closed_in_time", provider_hangs),
    ("provider_malformed_answers_reset", provider_malformed),
    ("close_early_fd_reuse_and_idle_maps", churn_and_fd_reuse),
    (
        "admin_cli_and_metrics",
        super::service::admin_cli_and_metrics,
    ),
    (
        "hot_swap_providers_under_load_60s",
        super::service::hot_swap_under_load,
    ),
    (
        "provider_kill9_under_load",
        super::service::provider_kill9_under_load,
    ),
    (
        "mismatched_providers_fail_closed",
        super::service::mismatched_providers_fail_closed,
    ),
    (
        "core_kill9_under_load",
        super::service::core_kill9_under_load,
    ),
    ("core_gone_release", super::service::core_gone_release),
    ("malformed_config_is_refused", malformed_config),
    (
        "gate_owner_from_hold_io_uring_and_fork",
        super::gate_edges::owner_from_hold,
    ),
    (
        "gate_tcp_fast_open_refused_and_falls_back",
        super::gate_edges::fast_open,
    ),
    (
        "gate_exempt_pid_reused_is_held",
        super::gate_edges::exempt_pid_reuse,
    ),
    (
        "gate_event_flood_from_one_app",
        super::gate_edges::event_flood,
    ),
    (
        "gate_conns_map_full_fails_closed",
        super::gate_edges::conns_map_full,
    ),
    ("gate_half_close_before_keys", super::gate_edges::half_close),
    ("gate_same_node_pods", super::gate_edges::same_node),
    (
        "gate_oob_zerocopy_repair",
        super::gate_edges::unusual_socket_calls,
    ),
];

/// Options of one application pair.
#[derive(Debug, Clone)]
pub struct App {
    /// testapp --mode
    pub mode: &'static str,
    /// --size
    pub size: usize,
    /// --send
    pub send: &'static str,
    /// --recv
    pub recv: &'static str,
    /// --io
    pub io: &'static str,
    /// --connections
    pub connections: u32,
    /// Server port.
    pub port: u16,
    /// Server address (pod B, IPv4 or IPv6, or pod-a2).
    pub server: &'static str,
    /// The server's network namespace (`pod-b`, or `pod-a2` on node a).
    pub server_pod: &'static str,
    /// --via: how both ends get their socket (syscall or io-uring).
    pub via: &'static str,
    /// --handoff: how both ends hand each connection to another process
    /// (`none`, `fork`, `scm-rights`).
    pub handoff: &'static str,
}

impl App {
    /// One client-first exchange of `size` bytes with write/read, blocking.
    pub fn exchange(size: usize, port: u16) -> Self {
        Self {
            mode: "client-first",
            size,
            send: "write",
            recv: "read",
            io: "blocking",
            connections: 1,
            port,
            server: POD_B,
            server_pod: "pod-b",
            via: "syscall",
            handoff: "none",
        }
    }

    /// The server's listen address (any, in the server's family) and the
    /// client's connect address.
    fn addresses(&self) -> (String, String) {
        match self.server.parse::<std::net::IpAddr>() {
            Ok(ip) if ip.is_ipv6() => (
                format!("[::]:{}", self.port),
                format!("[{ip}]:{}", self.port),
            ),
            _ => (
                format!("0.0.0.0:{}", self.port),
                format!("{}:{}", self.server, self.port),
            ),
        }
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--mode".into(),
            self.mode.into(),
            "--size".into(),
            self.size.to_string(),
            "--send".into(),
            self.send.into(),
            "--recv".into(),
            self.recv.into(),
            "--io".into(),
            self.io.into(),
            "--connections".into(),
            self.connections.to_string(),
            "--via".into(),
            self.via.into(),
            "--handoff".into(),
            self.handoff.into(),
        ]
    }
}

/// The JSON report an app printed last.
pub(super) fn json(s: &str) -> Result<Value, String> {
    let line = s
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| format!("no report in {s:?}"))?;
    serde_json::from_str(line).map_err(|e| format!("bad report {line:?}: {e}"))
}

/// Server address and port of pod B for `port` (IPv4).
pub(super) fn pod_b_addr(port: u16) -> String {
    format!("{POD_B}:{port}")
}

/// Starts `tlshub-testapp client` in pod-a against pod B's `port` (IPv4),
/// `args` following (started, not waited for).
pub(super) fn spawn_client(port: u16, args: &[&str]) -> Result<process::AppChild, String> {
    let connect = pod_b_addr(port);
    let mut argv = vec!["tlshub-testapp", "client", "--connect", &connect];
    argv.extend_from_slice(args);
    process::spawn_app("pod-a", &argv)
}

/// Runs server in `app.server_pod` and client in pod-a; returns both reports.
pub fn run_pair(
    app: &App,
    extra_client: &[&str],
    timeout: Duration,
) -> Result<(Value, Value), String> {
    let (listen, connect) = app.addresses();
    let args = app.args();
    let mut sargv = vec!["tlshub-testapp", "server", "--listen", &listen];
    sargv.extend(args.iter().map(String::as_str));
    let server = spawn_ready(app.server_pod, &sargv, "listening", Duration::from_secs(10))?;
    let mut cargv = vec!["tlshub-testapp", "client", "--connect", &connect];
    cargv.extend(args.iter().map(String::as_str));
    cargv.extend_from_slice(extra_client);
    let client = process::spawn_app("pod-a", &cargv)?;
    let server_pid = server.id();
    // A client that times out is reported with where the server was too
    // (the server is killed when this returns).
    let c = process::finish_reporting(client, timeout, &[server_pid])
        .map_err(|e| format!("{app:?}: client: {e}"))?;
    let s = finish(server, Duration::from_secs(10))
        .map_err(|e| format!("{app:?}: server: {e}; the client said: {}", c.trim()));
    Ok((json(&s?)?, json(&c)?))
}

pub(super) fn ok(v: &Value) -> bool {
    v["ok"].as_bool() == Some(true)
}

pub(super) fn both_ok(app: &App, s: &Value, c: &Value) -> Result<(), String> {
    if ok(s) && ok(c) {
        Ok(())
    } else {
        Err(format!("{app:?}: server {s}, client {c}"))
    }
}

/// `/proc/net/tls_stat` of network namespace `netns` (the counters are per
/// namespace), summed over the given namespaces.
pub fn tls_stat(namespaces: &[&str]) -> HashMap<String, u64> {
    let mut sum = HashMap::new();
    for ns in namespaces {
        let text = process::run(Some(ns), &["cat", "/proc/net/tls_stat"]).unwrap_or_default();
        for (k, v) in parse_tls_stat(&text) {
            *sum.entry(k).or_insert(0) += v;
        }
    }
    sum
}

fn parse_tls_stat(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// Runs `body` and checks that exactly `sockets` kTLS sockets got TX and RX
/// meanwhile (`tls_stat` of both pods; both ends of a connection are in
/// this one kernel, so a protected connection counts twice).
pub fn with_ktls_sockets<T>(
    sockets: u64,
    body: impl FnOnce() -> Result<T, String>,
) -> Result<T, String> {
    let before = tls_stat(&["pod-a", "pod-b"]);
    let out = body()?;
    let after = tls_stat(&["pod-a", "pod-b"]);
    let delta = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    if delta("TlsTxSw") != sockets || delta("TlsRxSw") != sockets {
        return Err(format!(
            "tls_stat: TlsTxSw +{} TlsRxSw +{}, want +{sockets} each",
            delta("TlsTxSw"),
            delta("TlsRxSw"),
        ));
    }
    Ok(out)
}

/// tcpdump on the wire between the nodes; stopped and read by [`Capture::finish`].
#[derive(Debug)]
pub struct Capture {
    proc: Proc,
    path: String,
}

impl Capture {
    /// Starts capturing TCP on the node-to-node veth.
    pub fn start(name: &str) -> Result<Self, String> {
        Self::start_on(name, WIRE_IF)
    }

    /// Starts capturing TCP on interface `iface` of `node-a`.
    pub fn start_on(name: &str, iface: &str) -> Result<Self, String> {
        let path = format!("/tmp/{name}.pcap");
        let _ = std::fs::remove_file(&path);
        let log = std::path::PathBuf::from(format!("/tmp/logs/tcpdump-{name}.log"));
        let mut proc = Proc::spawn(
            "tcpdump",
            Some("node-a"),
            // --immediate-mode: with TPACKET_V3 blocks, packets still in the
            // current block at SIGINT would otherwise never reach the file.
            &[
                "tcpdump",
                "--immediate-mode",
                "-i",
                iface,
                "-s",
                "0",
                "-B",
                "65536",
                "-U",
                "-Z",
                "root",
                "-w",
                &path,
                "tcp",
            ],
            &log,
        )?;
        proc.wait_for_log("listening on", Duration::from_secs(20))?;
        Ok(Self { proc, path })
    }

    /// Stops it and returns the flows.
    pub fn finish(mut self) -> Result<Vec<wire::Flow>, String> {
        std::thread::sleep(Duration::from_millis(300));
        self.proc.signal(2);
        let _ = self.proc.wait(Duration::from_secs(10));
        let log = process::tail(&self.proc.log);
        match wire::capture_drops(&log) {
            Ok(0) => {}
            Ok(n) => return Err(format!("tcpdump dropped {n} packets: {log}")),
            Err(e) => return Err(format!("{e} (the capture may be incomplete)")),
        }
        let data = std::fs::read(&self.path).map_err(|e| format!("{}: {e}", self.path))?;
        let _ = std::fs::remove_file(&self.path);
        let mut flows = wire::read_pcap(&data).map_err(|e| format!("{e} (tcpdump: {log})"))?;
        for f in &mut flows {
            f.capture_log = log.clone();
        }
        Ok(flows)
    }
}

/// What the wire check found.
#[derive(Debug, Default)]
pub struct WireReport {
    /// Protected flows with payload.
    pub protected_flows: usize,
    /// Of those, decrypted and matched to the apps' bytes.
    pub decrypted: usize,
    /// Application bytes recovered by decryption.
    pub plaintext_bytes: usize,
    /// Unselected flows that carried the marker in clear (the capture sees plaintext when there is some).
    pub plain_flows_with_marker: usize,
    /// Protected flows that were never keyed (reset under fail-closed):
    /// no marker, and nothing but TLS handshake bytes from a provider.
    pub unkeyed_flows: usize,
}

fn hexv(v: &Value) -> Vec<u8> {
    v.as_str()
        .and_then(|s| hex::decode(s).ok())
        .unwrap_or_default()
}

/// Checks every flow: protected ones carry only TLS records, no marker,
/// and decrypt (with the keys the sender's core exported, which must equal
/// the receiver core's) into the apps' pattern; unselected ones are plain.
pub fn check_wire(flows: &[wire::Flow], a: &Node, b: &Node) -> Result<WireReport, String> {
    check_wire_allowing_unkeyed(flows, a, b, false)
}

/// [`check_wire`], where protected flows without exported keys (connections
/// a failure policy reset before keys) are allowed if they carry no marker
/// and start like TLS (a provider's handshake) or carry nothing at all.
pub fn check_wire_allowing_unkeyed(
    flows: &[wire::Flow],
    a: &Node,
    b: &Node,
    unkeyed_ok: bool,
) -> Result<WireReport, String> {
    let keys: Vec<Value> = a.keys().into_iter().chain(b.keys()).collect();
    check_wire_with_keys(flows, &keys, unkeyed_ok)
}

/// [`check_wire_allowing_unkeyed`] with the key records of both cores
/// given directly (for a core the test bed did not start).
pub fn check_wire_with_keys(
    flows: &[wire::Flow],
    keys: &[Value],
    unkeyed_ok: bool,
) -> Result<WireReport, String> {
    let find = |local: &std::net::SocketAddr, remote: &std::net::SocketAddr| {
        keys.iter().find(|k| {
            k["local"].as_str() == Some(&local.to_string())
                && k["remote"].as_str() == Some(&remote.to_string())
        })
    };
    let find_all = |local: &std::net::SocketAddr, remote: &std::net::SocketAddr| {
        keys.iter()
            .filter(|k| {
                k["local"].as_str() == Some(&local.to_string())
                    && k["remote"].as_str() == Some(&remote.to_string())
            })
            .collect::<Vec<_>>()
    };
    let mut r = WireReport::default();
    for f in flows.iter().filter(|f| !f.bytes.is_empty()) {
        let protected = f.src.port() == PROTECTED_PORT || f.dst.port() == PROTECTED_PORT;
        if !protected {
            if wire::contains(&f.bytes, MARKER) {
                r.plain_flows_with_marker += 1;
            }
            continue;
        }
        r.protected_flows += 1;
        if wire::contains(&f.bytes, MARKER) {
            return Err(format!(
                "PLAINTEXT on the wire: {} -> {} carries the marker",
                f.src, f.dst
            ));
        }
        if unkeyed_ok && (find(&f.src, &f.dst).is_none() || find(&f.dst, &f.src).is_none()) {
            match find(&f.src, &f.dst) {
                // Keyed on the sending side only: what it sent must be
                // records under its keys, decrypting to the app's bytes.
                Some(sender) if f.bytes.first() == Some(&0x17) => {
                    let plain = wire::decrypt_application_data(
                        &f.bytes,
                        sender["suite"].as_str().unwrap_or(""),
                        &hexv(&sender["tx_key"]),
                        &hexv(&sender["tx_iv"]),
                    )
                    .map_err(|e| format!("{} -> {} (sender keyed only): {e}", f.src, f.dst))?;
                    let seed = if f.dst.port() == PROTECTED_PORT {
                        CLIENT_SEED
                    } else {
                        SERVER_SEED
                    };
                    crate::pattern::check(seed, 0, &plain).map_err(|at| {
                        format!("{} -> {}: decrypted byte {at} differs", f.src, f.dst)
                    })?;
                }
                // Otherwise a provider's TLS handshake record (0x16) or
                // alert (0x15) starts it.
                _ if matches!(f.bytes.first(), Some(0x15 | 0x16)) => {}
                _ => {
                    return Err(format!(
                        "{} -> {}: never keyed on both ends, yet carries {} bytes that are neither records under the sender's keys nor a TLS handshake",
                        f.src,
                        f.dst,
                        f.bytes.len()
                    ));
                }
            }
            r.unkeyed_flows += 1;
            continue;
        }
        wire::tls_records(&f.bytes).map_err(|e| {
            format!(
                "{} -> {}: not TLS: {e} ({} bytes captured; tcpdump: {})",
                f.src,
                f.dst,
                f.bytes.len(),
                f.capture_log
            )
        })?;
        // A 4-tuple can carry several connections in one capture (a reset
        // one leaves no TIME_WAIT): the sender's key is the one of its
        // records under which this flow decrypts.
        let senders = find_all(&f.src, &f.dst);
        if senders.is_empty() {
            return Err(format!(
                "{} -> {}: no exported key for the sender",
                f.src, f.dst
            ));
        }
        let mut decrypted = Err(String::new());
        for sender in &senders {
            decrypted = wire::decrypt_application_data(
                &f.bytes,
                sender["suite"].as_str().unwrap_or(""),
                &hexv(&sender["tx_key"]),
                &hexv(&sender["tx_iv"]),
            )
            .map(|plain| (plain, *sender))
            .map_err(|e| format!("{} -> {}: {e}", f.src, f.dst));
            if decrypted.is_ok() {
                break;
            }
        }
        let (plain, sender) = match decrypted {
            Ok(d) => d,
            // A reset connection's handshake on a reused 4-tuple whose
            // keys belong to another connection.
            Err(_)
                if unkeyed_ok
                    && senders.len() > 1
                    && matches!(f.bytes.first(), Some(0x15 | 0x16)) =>
            {
                r.unkeyed_flows += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        let receiver_agrees = find_all(&f.dst, &f.src).iter().any(|receiver| {
            hexv(&sender["tx_key"]) == hexv(&receiver["rx_key"])
                && hexv(&sender["tx_iv"]) == hexv(&receiver["rx_iv"])
        });
        if !receiver_agrees {
            return Err(format!(
                "{} -> {}: no key of the receiver matches the sender's (the two nodes' providers reported different keys)",
                f.src, f.dst
            ));
        }
        let seed = if f.dst.port() == PROTECTED_PORT {
            CLIENT_SEED
        } else {
            SERVER_SEED
        };
        if plain.is_empty() {
            continue;
        }
        crate::pattern::check(seed, 0, &plain).map_err(|at| {
            format!(
                "{} -> {}: decrypted byte {at} is not what the app sent",
                f.src, f.dst
            )
        })?;
        r.decrypted += 1;
        r.plaintext_bytes += plain.len();
    }
    Ok(r)
}

/// Runs `apps` one after another under a capture of the wire, each exact
/// both ways, then checks the wire: every flow of a protected app is TLS
/// only and decrypts to the apps' bytes (two flows per protected app).
pub(super) fn captured_exchanges(
    name: &str,
    a: &Node,
    b: &Node,
    apps: &[App],
) -> Result<WireReport, String> {
    captured_exchanges_on(name, WIRE_IF, a, b, apps)
}

/// [`captured_exchanges`] with the capture on interface `iface` of
/// `node-a`.
pub(super) fn captured_exchanges_on(
    name: &str,
    iface: &str,
    a: &Node,
    b: &Node,
    apps: &[App],
) -> Result<WireReport, String> {
    let cap = Capture::start_on(name, iface)?;
    for app in apps {
        let (s, c) = run_pair(app, &[], Duration::from_secs(60))?;
        both_ok(app, &s, &c)?;
    }
    let report = check_wire(&cap.finish()?, a, b)?;
    let protected: usize = apps
        .iter()
        .filter(|app| app.port == PROTECTED_PORT)
        .map(|app| app.connections as usize)
        .sum();
    if report.protected_flows != 2 * protected || report.decrypted != 2 * protected {
        return Err(format!("{protected} protected connections but {report:?}"));
    }
    Ok(report)
}

pub(super) fn nodes(a: NodeSpec, b: NodeSpec) -> Result<(Node, Node), String> {
    Ok((Node::start(a)?, Node::start(b)?))
}

fn kernel_has_ktls_and_bpf_lsm() -> Result<String, String> {
    let lsm = std::fs::read_to_string("/sys/kernel/security/lsm").map_err(|e| e.to_string())?;
    if !lsm.split(',').any(|l| l.trim() == "bpf") {
        return Err(format!("bpf not in the LSM list: {lsm}"));
    }
    if tls_stat(&["pod-a"]).is_empty() {
        return Err("/proc/net/tls_stat missing: tls module not loaded".into());
    }
    let uname = process::run(None, &["uname", "-r"])?;
    Ok(format!("kernel {} lsm={}", uname.trim(), lsm.trim()))
}

/// Every send method with every receive method in rotation, blocking and
/// epoll, client-first and server-first, 1 byte and 1 MiB, all captured.
fn exchange_matrix() -> Result<String, String> {
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let sends = ["write", "writev", "send", "sendmsg", "sendfile", "splice"];
    let recvs = ["read", "recv", "recvmsg", "splice"];
    let mut apps = Vec::new();
    for (i, send) in sends.iter().enumerate() {
        for (j, io) in ["blocking", "epoll"].iter().enumerate() {
            for (k, size) in [1usize, 1 << 20].iter().enumerate() {
                apps.push(App {
                    mode: if (i + j + k) % 2 == 0 {
                        "client-first"
                    } else {
                        "server-first"
                    },
                    size: *size,
                    send,
                    recv: recvs[(i * 2 + j + k) % recvs.len()],
                    io,
                    ..App::exchange(1, PROTECTED_PORT)
                });
            }
        }
    }
    let runs = apps.len();
    // One unselected connection in the same capture: it must stay plain.
    apps.push(App::exchange(10_000, PLAIN_PORT));
    let report = with_ktls_sockets(2 * runs as u64, || {
        captured_exchanges("matrix", &a, &b, &apps)
    })?;
    if report.plain_flows_with_marker == 0 {
        return Err(
            "the unselected connection's plaintext was not seen: the capture is blind".into(),
        );
    }
    Ok(format!(
        "{runs} connections (6 send x 4 recv methods, blocking+epoll, both orders, 1 B + 1 MiB) exact both ways; {} flows TLS-only and decrypted to {} app bytes; tls_stat TlsTxSw/TlsRxSw +{}; unselected stayed plain",
        report.protected_flows,
        report.plaintext_bytes,
        2 * runs
    ))
}

fn cipher_suites() -> Result<String, String> {
    let mut out = Vec::new();
    for (suite, ktls) in [
        ("TLS_AES_256_GCM_SHA384", "aes-gcm-256"),
        ("TLS_CHACHA20_POLY1305_SHA256", "chacha20-poly1305"),
    ] {
        let mut sa = NodeSpec::new("a");
        sa.suite = suite;
        let mut sb = NodeSpec::new("b");
        sb.suite = suite;
        let (a, b) = nodes(sa, sb)?;
        let app = App {
            mode: "server-first",
            ..App::exchange(200_000, PROTECTED_PORT)
        };
        captured_exchanges("suites", &a, &b, &[app])?;
        let name = a.first_key_field("suite");
        if name != ktls {
            return Err(format!("{suite} installed as {name:?}, want {ktls}"));
        }
        out.push(format!("{suite} -> kTLS {name}, decrypted"));
    }
    Ok(out.join("; "))
}

fn large_transfers() -> Result<String, String> {
    let (_a, _b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    // Both ends of all 6 connections must have kTLS in both directions.
    // (Not captured: 768 MiB of packets would not fit the VM's memory;
    // the exchange matrix captures every method with 1 MiB.)
    with_ktls_sockets(12, large_transfers_exact)
}

fn large_transfers_exact() -> Result<String, String> {
    let mut out = Vec::new();
    // Every send call and every receive call at least once, both I/O modes
    // and both orders.
    for (mode, send, recv, io) in [
        ("client-first", "write", "read", "blocking"),
        ("server-first", "writev", "recv", "epoll"),
        ("client-first", "send", "recvmsg", "blocking"),
        ("server-first", "sendmsg", "splice", "epoll"),
        ("client-first", "sendfile", "read", "epoll"),
        ("server-first", "splice", "splice", "blocking"),
    ] {
        let app = App {
            mode,
            send,
            recv,
            io,
            ..App::exchange(64 << 20, PROTECTED_PORT)
        };
        let t = Instant::now();
        let (s, c) = run_pair(&app, &[], Duration::from_secs(300))?;
        both_ok(&app, &s, &c)?;
        out.push(format!(
            "{send}/{recv}/{io} {:.1}s",
            t.elapsed().as_secs_f64()
        ));
    }
    Ok(format!(
        "64 MiB each way, exact, kTLS on all 12 sockets: {}",
        out.join(", ")
    ))
}

/// sendfile() and splice() by a client that set a small send buffer
/// itself (8 KiB): before Linux 6.5 kTLS can stall such a sender for good
/// (why in `KtlsSection::send_buffer_floor` of the core's config), and the
/// core's send buffer floor must prevent it. A control run without the
/// floor reports whether this kernel stalls there (not required: a fixed
/// kernel would not).
/// (major, minor) of the running kernel.
pub fn kernel_version() -> (u32, u32) {
    let release = process::run(None, &["uname", "-r"]).unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

fn small_send_buffer_sendpage() -> Result<String, String> {
    let small = ["--sndbuf", "4096"];
    // From 6.5 on, sendfile()/splice() into kTLS end in a push (the
    // MSG_SPLICE_PAGES rework), so the core applies no floor there and
    // the transfers must complete from the app's own small buffer.
    let floored = kernel_version() < (6, 5);
    let app = |send, io| App {
        size: 4 << 20,
        send,
        io,
        ..App::exchange(1, PROTECTED_PORT)
    };
    let mut out = Vec::new();
    {
        let (_a, _b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
        for (send, io) in [
            ("sendfile", "blocking"),
            ("splice", "epoll"),
            ("sendfile", "epoll"),
            ("splice", "blocking"),
        ] {
            let app = app(send, io);
            let (s, c) = run_pair(&app, &small, Duration::from_secs(60))?;
            both_ok(&app, &s, &c)?;
            let buf = c["send_buffer"].as_u64().unwrap_or(0);
            if floored && buf < 4 << 20 {
                return Err(format!(
                    "{send}/{io}: the client's send buffer is {buf} B after keying, want at least the 4 MiB floor"
                ));
            }
            if !floored && buf >= 4 << 20 {
                return Err(format!(
                    "{send}/{io}: the client's send buffer is {buf} B after keying; this kernel needs no floor and the core must leave it alone"
                ));
            }
            out.push(format!("{send}/{io}"));
        }
    }
    if !floored {
        return Ok(format!(
            "4 MiB each way from an 8 KiB send buffer, exact: {} (kernel >= 6.5: no floor applied, none needed)",
            out.join(", ")
        ));
    }
    let mut sa = NodeSpec::new("a");
    sa.send_buffer_floor = Some(0);
    let mut sb = NodeSpec::new("b");
    sb.send_buffer_floor = Some(0);
    let (_a, _b) = nodes(sa, sb)?;
    let control = match run_pair(
        &app("sendfile", "blocking"),
        &small,
        Duration::from_secs(15),
    ) {
        Ok((s, c)) if ok(&s) && ok(&c) => {
            "completed (this kernel does not stall there)".to_string()
        }
        Ok((s, c)) => {
            return Err(format!(
                "control without the floor failed: server {s}, client {c}"
            ));
        }
        Err(e) if e.contains("timed out") => {
            "stalled for 15 s (the kernel's sendpage stall the floor prevents)".to_string()
        }
        Err(e) => return Err(format!("control without the floor failed: {e}")),
    };
    Ok(format!(
        "4 MiB each way from an 8 KiB send buffer, exact: {} (the core raised it to 4 MiB); without the floor, sendfile/blocking {control}",
        out.join(", ")
    ))
}

fn ipv6_exchange() -> Result<String, String> {
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let apps = ["client-first", "server-first"].map(|mode| App {
        mode,
        server: POD_B6,
        ..App::exchange(100_000, PROTECTED_PORT)
    });
    captured_exchanges("ipv6", &a, &b, &apps)?;
    let local = a.first_key_field("local");
    if !local.starts_with("[fd00:1::2]") {
        return Err(format!(
            "key export names {local}, not the IPv6 pod address"
        ));
    }
    Ok(format!(
        "2 IPv6 connections ({local} -> [{POD_B6}]:{PROTECTED_PORT}), both orders, exact; 4 flows TLS-only and decrypted"
    ))
}

/// Many connections keyed at the same time: 8 client processes with 25
/// connections each against a server that serves every connection on its
/// own thread.
fn concurrent_keying() -> Result<String, String> {
    // Why a longer key timeout than the default 2 s: the server's keying
    // starts only when it accepts, and every hold stops the whole server
    // process (its accept loop too) for one handshake, so under TCG the
    // eighth of eight simultaneous connections was accepted after the
    // client's handshake had waited 1.6 s and was reset (ARCHITECTURE.md,
    // "Data flow", step 4). This scenario is about correctness under
    // concurrency; the latency is the benchmark's.
    let spec = |name| NodeSpec {
        key_timeout_ms: 10_000,
        ..NodeSpec::new(name)
    };
    let (a, b) = nodes(spec("a"), spec("b"))?;
    let (clients, each) = (8u32, 25u32);
    let total = clients * each;
    let app = App {
        mode: "echo",
        connections: each,
        ..App::exchange(1, PROTECTED_PORT)
    };
    let (listen, connect) = app.addresses();
    let mut sargv: Vec<String> = [
        "tlshub-testapp",
        "server",
        "--parallel",
        "--listen",
        &listen,
    ]
    .map(String::from)
    .to_vec();
    sargv.extend(
        App {
            connections: total,
            ..app.clone()
        }
        .args(),
    );
    let sargv: Vec<&str> = sargv.iter().map(String::as_str).collect();
    let server = spawn_ready("pod-b", &sargv, "listening", Duration::from_secs(10))?;
    let started = Instant::now();
    let mut children = Vec::new();
    for _ in 0..clients {
        let mut cargv: Vec<String> = ["tlshub-testapp", "client", "--connect", &connect]
            .map(String::from)
            .to_vec();
        cargv.extend(app.args());
        let cargv: Vec<&str> = cargv.iter().map(String::as_str).collect();
        children.push(process::spawn_app("pod-a", &cargv)?);
    }
    for child in children {
        let c = json(&finish(child, Duration::from_secs(300))?)?;
        if !ok(&c) {
            return Err(format!("a concurrent client failed: {c}"));
        }
    }
    let s = json(&finish(server, Duration::from_secs(60))?)?;
    if !ok(&s) || s["connections"].as_u64() != Some(u64::from(total)) {
        return Err(format!("server: {s}"));
    }
    let took = started.elapsed().as_secs_f64();
    let want = u64::from(total);
    let (pa, pb) = (
        a.stat_reaching(&["protected"], want),
        b.stat_reaching(&["protected"], want),
    );
    if pa != u64::from(total) || pb != u64::from(total) {
        return Err(format!("protected A {pa} B {pb}, want {total} each"));
    }
    Ok(format!(
        "{total} connections from {clients} concurrent clients, all exact, all keyed on both nodes in {took:.1}s"
    ))
}

/// Both nodes keyed by the TLSHub provider (layout v2), with the stand-in
/// module doing a real node-level mutual TLS handshake between the nodes.
fn tlshub_provider() -> Result<String, String> {
    let mut sa = NodeSpec::new("a");
    sa.provider = ProviderKind::TlsHub;
    let mut sb = NodeSpec::new("b");
    sb.provider = ProviderKind::TlsHub;
    let (a, b) = nodes(sa, sb)?;
    let apps = ["client-first", "server-first"].map(|mode| App {
        mode,
        ..App::exchange(100_000, PROTECTED_PORT)
    });
    let report = captured_exchanges("tlshub", &a, &b, &apps)?;
    let standin = std::fs::read_to_string("/tmp/logs/node-b-standin.log").unwrap_or_default();
    if !standin.contains("node handshake from 10.99.0.1") {
        return Err(format!(
            "no node-level handshake seen by node B's stand-in: {standin}"
        ));
    }
    Ok(format!(
        "2 connections keyed from the stand-in module's per-4-tuple master key (node handshake 10.99.0.1 -> 10.99.0.2); {} flows TLS-only and decrypted",
        report.decrypted
    ))
}

/// The stand-in's node secret expires (status -2); the provider starts a
/// new node handshake and the next connection is keyed from the new secret.
fn tlshub_expiry() -> Result<String, String> {
    let (mut sa, mut sb) = (NodeSpec::new("a"), NodeSpec::new("b"));
    for s in [&mut sa, &mut sb] {
        s.provider = ProviderKind::TlsHub;
        s.standin_lifetime_ms = 1500;
    }
    let (a, b) = nodes(sa, sb)?;
    let app = App::exchange(10_000, PROTECTED_PORT);
    captured_exchanges("expiry1", &a, &b, std::slice::from_ref(&app))?;
    std::thread::sleep(Duration::from_millis(2000));
    captured_exchanges("expiry2", &a, &b, std::slice::from_ref(&app))?;
    let standin = std::fs::read_to_string("/tmp/logs/node-b-standin.log").unwrap_or_default();
    let handshakes = standin.matches("node handshake from 10.99.0.1").count();
    if handshakes != 2 {
        return Err(format!(
            "node B saw {handshakes} node handshakes, want 2 (one per secret): {standin}"
        ));
    }
    let (ka, kb) = (a.keys(), b.keys());
    if ka.len() != 2 || kb.len() != 2 || ka[0]["tx_key"] == ka[1]["tx_key"] {
        return Err(format!(
            "expected two keyed connections with different keys, got {} and {}",
            ka.len(),
            kb.len()
        ));
    }
    Ok("after expiry (-2) the provider re-handshook and keyed the next connection; both exchanges exact and decrypted".into())
}

/// OpenSSL and BoringSSL nodes in both client and server roles: each
/// pairing keys the connection and the capture decrypts (BoringSSL on both
/// nodes is in `conformance_suite_all_providers`).
fn boringssl_interop() -> Result<String, String> {
    let mut out = Vec::new();
    for (pa, pb, label) in [
        (
            ProviderKind::OpenSsl,
            ProviderKind::BoringSsl,
            "openssl client->boringssl server",
        ),
        (
            ProviderKind::BoringSsl,
            ProviderKind::OpenSsl,
            "boringssl client->openssl server",
        ),
    ] {
        let (mut sa, mut sb) = (NodeSpec::new("a"), NodeSpec::new("b"));
        sa.provider = pa;
        sb.provider = pb;
        let (a, b) = nodes(sa, sb)?;
        let apps = ["client-first", "server-first"].map(|mode| App {
            mode,
            ..App::exchange(100_000, PROTECTED_PORT)
        });
        captured_exchanges("interop", &a, &b, &apps).map_err(|e| format!("{label}: {e}"))?;
        out.push(format!("{label} ({})", a.first_key_field("suite")));
    }
    Ok(format!(
        "exact both ways, TLS-only and decrypted: {}",
        out.join(", ")
    ))
}

/// The conformance suite against each provider, the SDK's example
/// included: `tlshub-conformance` on two node instances (1,000 concurrent
/// requests), then the two-node kernel exchange (client writes first, server
/// writes first) with the capture decrypted.
fn conformance_all() -> Result<String, String> {
    let mut out = Vec::new();
    for (label, kind) in [
        ("openssl", ProviderKind::OpenSsl),
        ("boringssl", ProviderKind::BoringSsl),
        ("tlshub", ProviderKind::TlsHub),
        ("example-psk", ProviderKind::ExamplePsk),
    ] {
        let (mut sa, mut sb) = (NodeSpec::new("a"), NodeSpec::new("b"));
        sa.provider = kind;
        sb.provider = kind;
        let (a, b) = nodes(sa, sb)?;
        let (pa, pb) = (a.provider_socket(kind), b.provider_socket(kind));
        let started = Instant::now();
        let run = process::command(
            None,
            &[
                "tlshub-conformance",
                "--node-a",
                &pa.to_string_lossy(),
                "--node-b",
                &pb.to_string_lossy(),
                "--concurrency",
                "1000",
            ],
        )
        .output()
        .map_err(|e| format!("cannot run tlshub-conformance: {e}"))?;
        let text = String::from_utf8_lossy(&run.stdout).into_owned();
        if !run.status.success() {
            return Err(format!(
                "{label}:\n{text}{}",
                String::from_utf8_lossy(&run.stderr)
            ));
        }
        let summary = text.lines().last().unwrap_or("").to_string();
        let apps = ["client-first", "server-first"].map(|mode| App {
            mode,
            ..App::exchange(100_000, PROTECTED_PORT)
        });
        let report = captured_exchanges("conformance", &a, &b, &apps)
            .map_err(|e| format!("{label} two-node exchange: {e}"))?;
        out.push(format!(
            "{label}: {summary}, two-node exchange {} flows decrypted ({:.0}s)",
            report.decrypted,
            started.elapsed().as_secs_f64()
        ));
        for l in text.lines() {
            println!("  [{label}] {l}");
        }
    }
    Ok(out.join("; "))
}

fn expect_reset(c: &Value) -> Result<(), String> {
    let errno = c["errno"].as_i64();
    // ECONNRESET (104) or EPIPE (32), both from the reset; never success.
    if ok(c) || !matches!(errno, Some(104) | Some(32)) {
        return Err(format!("client should have been reset, got {c}"));
    }
    Ok(())
}

/// The server of a connection that was failed closed: it must have failed
/// too, with no byte received (garbage followed by a reset would show as
/// a byte that "differs").
fn expect_server_failed_clean(s: &Value) -> Result<(), String> {
    let error = s["error"].as_str().unwrap_or_default();
    if ok(s) || s["bytes_received"].as_u64() != Some(0) || error.contains("differs") {
        return Err(format!(
            "server should have failed with nothing received, got {s}"
        ));
    }
    Ok(())
}

/// A plain exchange under the same capture: its marker must be seen, or
/// the capture proves nothing about the protected flows.
pub(super) fn plain_control() -> Result<(), String> {
    let app = App::exchange(1000, PLAIN_PORT);
    let (s, c) = run_pair(&app, &[], Duration::from_secs(30))?;
    both_ok(&app, &s, &c)
}

/// [`check_wire`] plus the control's marker.
fn check_wire_with_control(flows: &[wire::Flow], a: &Node, b: &Node) -> Result<WireReport, String> {
    let report = check_wire(flows, a, b)?;
    if report.plain_flows_with_marker == 0 {
        return Err("the plain control's marker was not seen: the capture is blind".into());
    }
    Ok(report)
}

fn fail_closed_provider_missing() -> Result<String, String> {
    let mut sa = NodeSpec::new("a");
    sa.provider = ProviderKind::Missing;
    let (a, b) = nodes(sa, NodeSpec::new("b"))?;
    let cap = Capture::start("failclosed")?;
    let mut results = Vec::new();
    for mode in ["client-first", "server-first"] {
        let app = App {
            mode,
            ..App::exchange(100, PROTECTED_PORT)
        };
        let (s, c) = run_pair(&app, &[], Duration::from_secs(30))?;
        expect_reset(&c)?;
        expect_server_failed_clean(&s)?;
        results.push(format!("{mode}: errno {}", c["errno"]));
    }
    plain_control()?;
    let report = check_wire_with_control(&cap.finish()?, &a, &b)?;
    std::thread::sleep(Duration::from_millis(1200));
    // Core A waits for its provider until the key timeout; core B's
    // handshake times out at the same moment. Whichever resets first, each
    // connection is reset once.
    let resets = a.stat(&["reset"]) + b.stat(&["reset"]);
    if resets < 2 {
        return Err(format!("cores A and B reset {resets} connections, want 2"));
    }
    Ok(format!(
        "{}; {} protected flows, no marker on the wire; cores reset {resets}",
        results.join(", "),
        report.protected_flows
    ))
}

fn fail_open_provider_missing() -> Result<String, String> {
    let mut sa = NodeSpec::new("a");
    sa.provider = ProviderKind::Missing;
    sa.failure_policy = "fail-open";
    let mut sb = NodeSpec::new("b");
    sb.provider = ProviderKind::Missing;
    sb.failure_policy = "fail-open";
    let (a, _b) = nodes(sa, sb)?;
    let cap = Capture::start("failopen")?;
    let app = App::exchange(10_000, PROTECTED_PORT);
    let (s, c) = run_pair(&app, &[], Duration::from_secs(30))?;
    both_ok(&app, &s, &c)?;
    let flows = cap.finish()?;
    let clear = flows
        .iter()
        .filter(|f| f.dst.port() == PROTECTED_PORT && wire::contains(&f.bytes, MARKER))
        .count();
    if clear == 0 {
        return Err("fail-open connection did not carry plaintext".into());
    }
    std::thread::sleep(Duration::from_millis(1200));
    let passed = a.stat(&["passed_plaintext"]);
    if passed == 0 {
        return Err("core A did not count the plaintext connection".into());
    }
    Ok(format!(
        "exchange completed in plaintext as configured; core A counted {passed} plaintext connection(s)"
    ))
}

fn provider_hangs() -> Result<String, String> {
    let mut sa = NodeSpec::new("a");
    sa.provider = ProviderKind::Bad("hang");
    sa.key_timeout_ms = 1000;
    let (a, b) = nodes(sa, NodeSpec::new("b"))?;
    let cap = Capture::start("hang")?;
    let t = Instant::now();
    let (s, c) = run_pair(
        &App::exchange(100, PROTECTED_PORT),
        &[],
        Duration::from_secs(30),
    )?;
    let took = t.elapsed();
    expect_reset(&c)?;
    expect_server_failed_clean(&s)?;
    plain_control()?;
    check_wire_with_control(&cap.finish()?, &a, &b)?;
    if took > Duration::from_secs(6) {
        return Err(format!("reset took {took:?} with a 1 s key timeout"));
    }
    std::thread::sleep(Duration::from_millis(1200));
    let timeouts = a.stat(&["failed", "timeout"]);
    if timeouts == 0 {
        return Err(format!("core A did not count a timeout: {:?}", a.stats()));
    }
    Ok(format!(
        "reset after {:.2}s (timeout 1 s), no plaintext, counted as timeout",
        took.as_secs_f64()
    ))
}

fn provider_malformed() -> Result<String, String> {
    let mut out = Vec::new();
    for mode in ["malformed-key", "unknown-cipher"] {
        let mut sa = NodeSpec::new("a");
        sa.provider = ProviderKind::Bad(mode);
        let (a, b) = nodes(sa, NodeSpec::new("b"))?;
        let cap = Capture::start("malformed")?;
        let (s, c) = run_pair(
            &App::exchange(100, PROTECTED_PORT),
            &[],
            Duration::from_secs(30),
        )?;
        expect_reset(&c)?;
        expect_server_failed_clean(&s)?;
        plain_control()?;
        check_wire_with_control(&cap.finish()?, &a, &b)?;
        std::thread::sleep(Duration::from_millis(1200));
        if a.stat(&["failed", "malformed"]) == 0 {
            return Err(format!("{mode}: not counted as malformed: {:?}", a.stats()));
        }
        let log = a.core_log();
        let line = log
            .lines()
            .find(|l| l.contains("malformed"))
            .unwrap_or("")
            .trim()
            .to_string();
        out.push(format!(
            "{mode}: reset ({})",
            line.chars()
                .rev()
                .take(90)
                .collect::<String>()
                .chars()
                .rev()
                .collect::<String>()
        ));
    }
    Ok(out.join("; "))
}

fn churn_and_fd_reuse() -> Result<String, String> {
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    // 1,000 connections closed right after connect (most before keys).
    let early = App {
        mode: "close-early",
        connections: 1000,
        ..App::exchange(1, PROTECTED_PORT)
    };
    let (s, c) = run_pair(&early, &[], Duration::from_secs(600))?;
    if !ok(&c) {
        return Err(format!("close-early client: {c}"));
    }
    let _ = s;
    // 900 keyed connections, opened and closed.
    let echo = App {
        mode: "echo",
        connections: 900,
        ..App::exchange(1, PROTECTED_PORT)
    };
    let (s, c) = run_pair(&echo, &[], Duration::from_secs(900))?;
    both_ok(&echo, &s, &c)?;
    // 100 x: a selected socket closed at once, its fd number reused by a
    // plain connection that must stay plain and exact.
    let plain_server = spawn_ready(
        "pod-b",
        &[
            "tlshub-testapp",
            "server",
            "--listen",
            &format!("0.0.0.0:{PLAIN_PORT}"),
            "--connections",
            "100",
            "--size",
            "4096",
        ],
        "listening",
        Duration::from_secs(10),
    )?;
    let reuse = App {
        mode: "close-early",
        connections: 100,
        ..App::exchange(4096, PROTECTED_PORT)
    };
    let other = format!("{POD_B}:{PLAIN_PORT}");
    let (_s, c) = run_pair(&reuse, &["--reuse-fd-to", &other], Duration::from_secs(300))?;
    let ps = json(&finish(plain_server, Duration::from_secs(30))?)?;
    if !ok(&c) || !ok(&ps) {
        return Err(format!("fd reuse: client {c}, plain server {ps}"));
    }
    let reused = c["reused_fds"].as_u64().unwrap_or(0);
    if reused == 0 {
        return Err("the fd number was never reused; the scenario proved nothing".into());
    }
    // Everything closed: state must return to idle (allow TIME_WAIT-free settle).
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        std::thread::sleep(Duration::from_millis(1500));
        let idle = |n: &Node| {
            let s = n.stats().unwrap_or(Value::Null);
            s["pending"].as_u64() == Some(0)
                && s["held_tracked"].as_u64() == Some(0)
                && s["bpf_maps"] == serde_json::json!([0, 0])
        };
        if idle(&a) && idle(&b) {
            break;
        }
        if Instant::now() > until {
            return Err(format!(
                "not idle after churn: A {:?} B {:?}",
                a.stats()
                    .map(|s| (s["pending"].clone(), s["bpf_maps"].clone())),
                b.stats()
                    .map(|s| (s["pending"].clone(), s["bpf_maps"].clone()))
            ));
        }
    }
    let sa = a.stats()?;
    Ok(format!(
        "2,000 selected connections (1,000 closed at once, 900 keyed, 100 closed at once in fd reuse) plus 100 plain ones that reused {reused} of their fd numbers, all exact and plain; core A: selected {} protected {} closed-before-keys {}; maps and tables back to 0 on both nodes",
        sa["selected"], sa["protected"], sa["closed_before_keys"]
    ))
}

fn malformed_config() -> Result<String, String> {
    let path = "/tmp/bad-core.toml";
    std::fs::write(
        path,
        "node_name = \"a\"\n[policy]\nlocal_cidrs = [\"10.0.1.0/40\"]\n",
    )
    .map_err(|e| e.to_string())?;
    let out = process::command(None, &["tlshub-core", "--config", path])
        .output()
        .map_err(|e| e.to_string())?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(2)
        || !err.contains(path)
        || !err.contains("line 3")
        || !err.contains("local_cidrs")
    {
        return Err(format!("exit {:?}, stderr {err}", out.status.code()));
    }
    Ok(format!(
        "exit 2: {}",
        err.lines().next().unwrap_or("").trim()
    ))
}

/// Percentile of a sorted slice.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn latencies(c: &Value) -> Vec<u64> {
    let mut v: Vec<u64> = c["latency_us"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// Connect-to-first-echoed-byte over `conns` sequential connections:
/// (samples, p50, p99) in microseconds.
fn setup_latency(port: u16, conns: u32) -> Result<(usize, u64, u64), String> {
    let app = App {
        mode: "echo",
        connections: conns,
        ..App::exchange(1, port)
    };
    let (s, c) = run_pair(&app, &[], Duration::from_secs(1800))?;
    both_ok(&app, &s, &c)?;
    let l = latencies(&c);
    Ok((l.len(), percentile(&l, 0.5), percentile(&l, 0.99)))
}

/// One stream of 64 MiB, bytes per second.
fn throughput(port: u16) -> Result<f64, String> {
    let app = App {
        mode: "throughput",
        size: 64 << 20,
        ..App::exchange(1, port)
    };
    let (s, c) = run_pair(&app, &[], Duration::from_secs(600))?;
    both_ok(&app, &s, &c)?;
    Ok(c["bytes_per_sec"].as_f64().unwrap_or(0.0))
}

fn sorted_samples(stats: &Value, field: &str) -> Vec<u64> {
    let mut v: Vec<u64> = stats[field]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// `cargo xtask bench`: setup latency and throughput for plain TCP and for
/// each provider, and how often and how long the gate held a process, all
/// in one VM run.
pub fn bench() -> Result<String, String> {
    let conns = 1000;
    let mut lines = Vec::new();
    let mut setup = HashMap::new();
    let mut tput = HashMap::new();
    let providers = [
        ("openssl", ProviderKind::OpenSsl),
        ("boringssl", ProviderKind::BoringSsl),
        ("tlshub", ProviderKind::TlsHub),
    ];
    // Before any core ran (nothing attached): what the programs cost the
    // traffic they do not select is the step from this to "plain" below,
    // measured with both nodes' programs attached.
    {
        let (n, p50, p99) = setup_latency(PLAIN_PORT, conns)?;
        setup.insert("no tlshub", (p50, p99));
        lines.push(format!(
            "setup plain, no tlshub loaded: n={n} p50={p50}us p99={p99}us"
        ));
        let bps = throughput(PLAIN_PORT)?;
        tput.insert("no tlshub", bps);
        lines.push(format!(
            "throughput plain, no tlshub loaded: {:.1} MB/s (64 MiB, one stream)",
            bps / 1e6
        ));
    }
    for (label, kind) in providers {
        let (mut sa, mut sb) = (NodeSpec::new("a"), NodeSpec::new("b"));
        sa.provider = kind;
        sb.provider = kind;
        let (a, b) = nodes(sa, sb)?;
        if label == "openssl" {
            let (n, p50, p99) = setup_latency(PLAIN_PORT, conns)?;
            setup.insert("plain", (p50, p99));
            lines.push(format!("setup plain: n={n} p50={p50}us p99={p99}us"));
            let bps = throughput(PLAIN_PORT)?;
            tput.insert("plain", bps);
            lines.push(format!(
                "throughput plain: {:.1} MB/s (64 MiB, one stream)",
                bps / 1e6
            ));
        }
        let (n, p50, p99) = setup_latency(PROTECTED_PORT, conns)?;
        setup.insert(label, (p50, p99));
        lines.push(format!("setup {label}: n={n} p50={p50}us p99={p99}us"));
        let bps = throughput(PROTECTED_PORT)?;
        tput.insert(label, bps);
        lines.push(format!(
            "throughput {label}: {:.1} MB/s (64 MiB, one stream)",
            bps / 1e6
        ));
        std::thread::sleep(Duration::from_millis(1500));
        for (name, node) in [("A (client)", &a), ("B (server)", &b)] {
            let s = node.stats()?;
            let (held, key) = (
                sorted_samples(&s, "held_micros"),
                sorted_samples(&s, "key_micros"),
            );
            lines.push(format!(
                "{label} node {name}: protected={} held_connections={} stops={} held p50={}us p99={}us; provider key time p50={}us p99={}us",
                s["protected"],
                s["held_connections"],
                s["gate_stops"],
                percentile(&held, 0.5),
                percentile(&held, 0.99),
                percentile(&key, 0.5),
                percentile(&key, 0.99)
            ));
        }
    }
    // What the send buffer floor (`[ktls]`, on by default before Linux 6.5)
    // costs or gains: the same transfer without it.
    {
        let (mut sa, mut sb) = (NodeSpec::new("a"), NodeSpec::new("b"));
        sa.send_buffer_floor = Some(0);
        sb.send_buffer_floor = Some(0);
        let _nodes = nodes(sa, sb)?;
        let bps = throughput(PROTECTED_PORT)?;
        lines.push(format!(
            "throughput openssl without the send buffer floor: {:.1} MB/s; with/without x{:.2}",
            bps / 1e6,
            tput["openssl"] / bps.max(1.0)
        ));
    }
    let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
    lines.push(format!(
        "ratios plain (unselected, tlshub loaded)/no tlshub: setup p50 x{:.2} p99 x{:.2}; throughput x{:.2}",
        ratio(setup["plain"].0, setup["no tlshub"].0),
        ratio(setup["plain"].1, setup["no tlshub"].1),
        tput["plain"] / tput["no tlshub"].max(1.0)
    ));
    for (label, _) in providers {
        lines.push(format!(
            "ratios {label}/plain: setup p50 x{:.1} p99 x{:.1}; throughput x{:.2}",
            ratio(setup[label].0, setup["plain"].0),
            ratio(setup[label].1, setup["plain"].1),
            tput[label] / tput["plain"].max(1.0)
        ));
    }
    for label in ["boringssl", "tlshub"] {
        lines.push(format!(
            "ratios {label}/openssl: setup p50 x{:.2} p99 x{:.2}",
            ratio(setup[label].0, setup["openssl"].0),
            ratio(setup[label].1, setup["openssl"].1)
        ));
    }
    for l in &lines {
        println!("TLSHUB-BENCH {l}");
    }
    Ok(lines.join(" | "))
}

/// `cargo xtask demo`: one protected exchange, narrated.
pub fn demo() -> Result<String, String> {
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let say = |s: &str| println!("TLSHUB-DEMO {s}");
    say(
        "two nodes up: pod-a 10.0.1.2 (node-a) <-> pod-b 10.0.2.2 (node-b); each node runs tlshub-core + tlshub-provider-openssl",
    );
    say(&format!(
        "policy: node-a protects 10.0.1.0/24 -> 10.0.2.0/24 port {PROTECTED_PORT}; node-b the reverse"
    ));
    let cap = Capture::start("demo")?;
    let app = App {
        mode: "client-first",
        ..App::exchange(16 << 20, PROTECTED_PORT)
    };
    let listen = format!("0.0.0.0:{PROTECTED_PORT}");
    let connect = format!("{POD_B}:{PROTECTED_PORT}");
    let args = app.args();
    let mut sargv = vec!["tlshub-testapp", "server", "--listen", &listen];
    sargv.extend(args.iter().map(String::as_str));
    let server = spawn_ready("pod-b", &sargv, "listening", Duration::from_secs(10))?;
    let mut cargv = vec!["tlshub-testapp", "client", "--connect", &connect];
    cargv.extend(args.iter().map(String::as_str));
    say(
        "app: an unmodified client in pod-a connects and writes 16 MiB at once; the server in pod-b answers with 16 MiB",
    );
    let client = process::spawn_app("pod-a", &cargv)?;
    let until = Instant::now() + Duration::from_secs(30);
    let mut ss = String::new();
    while Instant::now() < until {
        ss = process::run(
            Some("pod-a"),
            &["ss", "-tni", "state", "established", "( dport = :8443 )"],
        )
        .unwrap_or_default();
        if ss.contains("tls") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let c = json(&finish(client, Duration::from_secs(120))?)?;
    let s = json(&finish(server, Duration::from_secs(30))?)?;
    both_ok(&app, &s, &c)?;
    say("the kernel's own view of the client socket during the transfer (ss -tni):");
    for l in ss.lines() {
        say(&format!("  {l}"));
    }
    let Some(ulp) = ss
        .find("tcp-ulp-tls")
        .map(|i| ss[i..].lines().next().unwrap_or("").trim())
    else {
        return Err(format!("ss did not show kTLS on the socket: {ss}"));
    };
    say(&format!("=> the kernel says: {ulp}"));
    for (name, n) in [("node-a", &a), ("node-b", &b)] {
        for k in n.keys() {
            say(&format!(
                "{name}: selected connection {} -> {} keyed by provider openssl: {} {} (keys installed with kTLS, not shown)",
                k["local"].as_str().unwrap_or(""),
                k["remote"].as_str().unwrap_or(""),
                k["version"].as_str().unwrap_or(""),
                k["suite"].as_str().unwrap_or("")
            ));
        }
        if let Some(line) = n.core_log().lines().find(|l| l.contains("kTLS installed")) {
            say(&format!("{name} core log: {}", line.trim()));
        }
    }
    let report = check_wire(&cap.finish()?, &a, &b)?;
    say(&format!(
        "wire check on the node-to-node veth: {} flows, TLS records only, no plaintext marker; decrypted with the reported keys to {} bytes = exactly what the apps sent",
        report.protected_flows, report.plaintext_bytes
    ));
    say(&format!(
        "apps: client sent {} and received {} bytes, all verified",
        c["bytes_sent"], c["bytes_received"]
    ));
    Ok("demo exchange protected end to end".into())
}
