//! `cargo xtask bench` and `cargo xtask demo`, which run in the VM like
//! the scenarios but measure or narrate instead of checking.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;

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

/// Connect-to-first-echoed-byte over `conns` sequential connections:
/// (samples, p50, p99) in microseconds.
pub fn setup_latency(port: u16, conns: u32) -> Result<(usize, u64, u64), String> {
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
pub fn throughput(port: u16) -> Result<f64, String> {
    let app = App {
        mode: "throughput",
        size: 64 << 20,
        ..App::exchange(1, port)
    };
    let (s, c) = run_pair(&app, &[], Duration::from_secs(600))?;
    both_ok(&app, &s, &c)?;
    Ok(c["bytes_per_sec"].as_f64().unwrap_or(0.0))
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
            let (held, key) = (s.held_micros.sorted(), s.key_micros.sorted());
            lines.push(format!(
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
