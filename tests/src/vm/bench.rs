//! `cargo xtask bench` and `cargo xtask demo`, which run in the VM like
//! the scenarios but measure or narrate instead of checking.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::alternatives::{PROXY_LOCAL, PROXY_LOCAL_PORT, ProxyPair, WG_POD_B, WireGuard};
use super::node::{NodeSpec, PLAIN_PORT, PROTECTED_PORT, ProviderKind};
use super::process::{self, finish, spawn_ready};
use super::support::*;
use super::topology::POD_B;
use super::wire_check::*;

pub fn latencies(c: &Value) -> Vec<u64> {
    let mut v: Vec<u64> = c["latency_us"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// Connect-to-first-echoed-byte over `conns` sequential connections to
/// `target` (an [`App`] naming the server, port and any proxy): (samples,
/// p50, p99) in microseconds.
pub fn setup_latency(target: &App, conns: u32) -> Result<(usize, u64, u64), String> {
    let app = App {
        mode: "echo",
        connections: conns,
        size: 1,
        ..target.clone()
    };
    let (s, c) = run_pair(&app, &[], Duration::from_secs(1800))?;
    both_ok(&app, &s, &c)?;
    let l = latencies(&c);
    Ok((l.len(), percentile(&l, 0.5), percentile(&l, 0.99)))
}

/// One stream of 64 MiB to `target`, bytes per second.
pub fn throughput(target: &App) -> Result<f64, String> {
    let app = App {
        mode: "throughput",
        size: 64 << 20,
        ..target.clone()
    };
    let (s, c) = run_pair(&app, &[], Duration::from_secs(600))?;
    both_ok(&app, &s, &c)?;
    Ok(c["bytes_per_sec"].as_f64().unwrap_or(0.0))
}

/// Single bytes the byte loop copies.
const BYTE_LOOP_BYTES: u64 = 200_000;

/// The median of three runs of `dd bs=1` copying [`BYTE_LOOP_BYTES`] from
/// `/dev/zero` to `/dev/null`, in seconds: one read and one write per byte,
/// each through the `file_permission` hook that the gate attaches to every
/// file of the node (it returns at once for a file that is not a socket).
fn byte_loop_seconds() -> Result<f64, String> {
    let count = format!("count={BYTE_LOOP_BYTES}");
    let mut runs = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        process::run(
            None,
            &["dd", "if=/dev/zero", "of=/dev/null", "bs=1", &count],
        )?;
        runs.push(t.elapsed().as_secs_f64());
    }
    runs.sort_by(f64::total_cmp);
    Ok(runs[1])
}

/// Setup latency and throughput figures by label, and the report lines.
#[derive(Debug, Default)]
struct Figures {
    setup: HashMap<&'static str, (u64, u64)>,
    tput: HashMap<&'static str, f64>,
    lines: Vec<String>,
}

impl Figures {
    /// Measures setup latency (`conns` connections) and throughput to
    /// `target` under `label`.
    fn measure(&mut self, label: &'static str, target: &App, conns: u32) -> Result<(), String> {
        let (n, p50, p99) = setup_latency(target, conns)?;
        self.setup.insert(label, (p50, p99));
        self.lines
            .push(format!("setup {label}: n={n} p50={p50}us p99={p99}us"));
        let bps = throughput(target)?;
        self.tput.insert(label, bps);
        self.lines.push(format!(
            "throughput {label}: {:.1} MB/s (64 MiB, one stream)",
            bps / 1e6
        ));
        Ok(())
    }

    /// `label` against `base`: setup p50 and p99, throughput.
    fn ratios(&mut self, label: &str, base: &str) {
        let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
        let (s, b) = (self.setup[label], self.setup[base]);
        self.lines.push(format!(
            "ratios {label}/{base}: setup p50 x{:.2} p99 x{:.2}; throughput x{:.2}",
            ratio(s.0, b.0),
            ratio(s.1, b.1),
            self.tput[label] / self.tput[base].max(1.0)
        ));
    }
}

/// `cargo xtask bench`: setup latency and throughput for plain TCP, for
/// kTLS with a fixed key and no agent (the ceiling), for the alternatives
/// (WireGuard between the nodes, a stunnel pair) and for each
/// provider, and how often and how long the gate held a process, all in
/// one VM run.
pub fn bench() -> Result<String, String> {
    let conns = 1000;
    let mut f = Figures::default();
    let providers = [
        ("openssl", ProviderKind::OpenSsl),
        ("boringssl", ProviderKind::BoringSsl),
        ("tlshub", ProviderKind::TlsHub),
    ];
    let plain = App::exchange(1, PLAIN_PORT);
    // Before any core ran (nothing attached): plain TCP as it is without
    // tlshub, and the alternatives between the same pods. What the
    // programs cost the traffic they do not select is the step from "no
    // tlshub" to "plain" below, measured with both nodes' programs attached.
    f.measure("no tlshub", &plain, conns)?;
    let loop_none = byte_loop_seconds()?;
    // kTLS with a fixed key installed by the apps themselves, no agent and
    // no handshake: the data path's ceiling (tlshub adds nothing after the
    // keys are in, so its streams should match this).
    let raw_ktls = App {
        ktls_fixed_key: true,
        ..plain.clone()
    };
    f.measure("raw ktls", &raw_ktls, conns)?;
    {
        let _tunnel = WireGuard::up()?;
        let through_tunnel = App {
            server: WG_POD_B,
            ..plain.clone()
        };
        f.measure("wireguard", &through_tunnel, conns)?;
    }
    {
        let _proxies = ProxyPair::start()?;
        let through_proxies = App {
            proxy: Some((PROXY_LOCAL, PROXY_LOCAL_PORT)),
            ..plain.clone()
        };
        f.measure("stunnel", &through_proxies, conns)?;
    }
    for (label, kind) in providers {
        let (mut sa, mut sb) = (NodeSpec::new("a"), NodeSpec::new("b"));
        sa.provider = kind;
        sb.provider = kind;
        let (a, b) = nodes(sa, sb)?;
        if label == "openssl" {
            f.measure("plain", &plain, conns)?;
            let loop_loaded = byte_loop_seconds()?;
            f.lines.push(format!(
                "byte loop (dd bs=1, {BYTE_LOOP_BYTES} bytes /dev/zero -> /dev/null, median of 3): no tlshub {loop_none:.2} s, tlshub loaded {loop_loaded:.2} s, x{:.2}",
                loop_loaded / loop_none.max(0.001)
            ));
        }
        f.measure(label, &App::exchange(1, PROTECTED_PORT), conns)?;
        std::thread::sleep(Duration::from_millis(1500));
        for (name, node) in [("A (client)", &a), ("B (server)", &b)] {
            let s = node.stats()?;
            let (held, key) = (s.held_micros.sorted(), s.key_micros.sorted());
            f.lines.push(format!(
                "{label} node {name}: protected={} held_connections={} stops={} held p50={}us p99={}us; provider key time p50={}us p99={}us",
                s.protected,
                s.held_connections,
                s.gate_stops,
                percentile(&held, 0.5),
                percentile(&held, 0.99),
                percentile(&key, 0.5),
                percentile(&key, 0.99)
            ));
        }
        event_loop_setup(&mut f, label, &a, &b, conns)?;
    }
    // What the send buffer floor (`[ktls]`, on by default before Linux 6.5)
    // costs or gains: the same transfer without it.
    {
        let (mut sa, mut sb) = (NodeSpec::new("a"), NodeSpec::new("b"));
        sa.send_buffer_floor = Some(0);
        sb.send_buffer_floor = Some(0);
        let _nodes = nodes(sa, sb)?;
        let bps = throughput(&App::exchange(1, PROTECTED_PORT))?;
        f.lines.push(format!(
            "throughput openssl without the send buffer floor: {:.1} MB/s; with/without x{:.2}",
            bps / 1e6,
            f.tput["openssl"] / bps.max(1.0)
        ));
    }
    f.ratios("plain", "no tlshub");
    for label in ["raw ktls", "wireguard", "stunnel"] {
        f.ratios(label, "no tlshub");
    }
    for (label, _) in providers {
        f.ratios(label, "plain");
        f.ratios(label, "raw ktls");
    }
    for label in ["boringssl", "tlshub", "stunnel"] {
        f.ratios(label, "openssl");
    }
    for l in &f.lines {
        println!("TLSHUB-BENCH {l}");
    }
    Ok(f.lines.join(" | "))
}

/// Setup latency with both apps in an edge-triggered epoll loop
/// (non-blocking sockets: the gate answers `EAGAIN` instead of stopping),
/// against the blocking apps' figure for the same provider, and how many
/// processes the gate stopped and how many connections it answered
/// `EAGAIN` meanwhile, per node.
fn event_loop_setup(
    f: &mut Figures,
    label: &'static str,
    a: &super::node::Node,
    b: &super::node::Node,
    conns: u32,
) -> Result<(), String> {
    let counts = |n: &super::node::Node| n.stats().map(|s| (s.gate_stops, s.gate_waits));
    let before = (counts(a)?, counts(b)?);
    let app = App {
        io: "epoll-edge",
        ..App::exchange(1, PROTECTED_PORT)
    };
    let (n, p50, p99) = setup_latency(&app, conns)?;
    std::thread::sleep(Duration::from_millis(1500));
    let after = (counts(a)?, counts(b)?);
    let (blocking50, blocking99) = f.setup[label];
    f.lines.push(format!(
        "setup {label} event loop (epoll-edge both ends): n={n} p50={p50}us p99={p99}us, x{:.2} p50 and x{:.2} p99 of blocking apps; stops a {} b {}, connections answered EAGAIN a {} b {}",
        p50 as f64 / blocking50.max(1) as f64,
        p99 as f64 / blocking99.max(1) as f64,
        after.0.0.saturating_sub(before.0.0),
        after.1.0.saturating_sub(before.1.0),
        after.0.1.saturating_sub(before.0.1),
        after.1.1.saturating_sub(before.1.1),
    ));
    Ok(())
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
                k.local, k.remote, k.version, k.suite
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
