//! `bench` part one: connection setup to every peer and provider, with
//! the stage breakdown, the byte loop and the event-loop apps' setup.

use super::*;
use crate::vm::outcome::{Failure, Outcome};

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
    fn measure(&mut self, label: &'static str, target: &App, conns: u32) -> Result<(), Failure> {
        let l = setup_latencies(target, conns)?;
        let (n, (p50, p99)) = (l.len(), p50_p99(&l));
        record_cdf("setup_cdf", label, &l);
        record("bench", label, "setup p50", p50 as f64, Unit::Microseconds);
        record("bench", label, "setup p99", p99 as f64, Unit::Microseconds);
        self.setup.insert(label, (p50, p99));
        self.lines
            .push(format!("setup {label}: n={n} p50={p50}us p99={p99}us"));
        let bps = throughput(target)?;
        record(
            "bench",
            label,
            "throughput, one stream",
            bps,
            Unit::BytesPerSecond,
        );
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
pub fn bench() -> Outcome {
    let conns = 1000;
    let mut f = Figures::default();
    let plain = App::exchange(1, PLAIN_PORT);
    // Before any core ran, like the baselines and the alternatives. What
    // the programs cost the traffic they do not select is the step from
    // "no tlshub" to "plain" below, measured with both nodes' programs
    // attached.
    let loop_none = byte_loop_recorded("bench", "no tlshub")?;
    baselines(&mut |label, app| f.measure(label, app, conns))?;
    alternatives(&mut |label, app| f.measure(label, app, conns))?;
    for provider in PROVIDERS {
        let label = provider.label;
        let (mut a, mut b) = nodes_with(provider)?;
        if label == "openssl" {
            f.measure("plain", &plain, conns)?;
            let loop_loaded = byte_loop_recorded("bench", "plain")?;
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
            let side = if name.starts_with('A') {
                "client"
            } else {
                "server"
            };
            // A connection whose app the gate held is one whose app's
            // first I/O found the gate closed (it never closes again).
            record(
                "bench",
                label,
                &format!("gate closed at first I/O, {side} node"),
                share(s.held_connections, s.protected),
                Unit::Percent,
            );
            for (what, sorted) in [("key time", &key), ("gate held", &held)] {
                for (p, q) in [("p50", 0.5), ("p99", 0.99)] {
                    record(
                        "bench",
                        label,
                        &format!("{what} {p}, {side} node"),
                        percentile(sorted, q) as f64,
                        Unit::Microseconds,
                    );
                }
            }
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
        // Before the event-loop run: the blocking apps' connections only.
        for (node, client) in [(&a, true), (&b, false)] {
            let line = stage_breakdown("stages", label, provider, node, client, None)?;
            f.lines.push(line);
        }
        event_loop_setup(&mut f, provider, &a, &b, conns)?;
        if label == "openssl" {
            // Unselected connections and the byte loop again with no agent
            // running: what the hooks cost, apart from the agents' wakeups.
            programs_only([&mut a, &mut b], provider.kind);
            f.measure("plain, programs only", &plain, conns)?;
            let loop_programs = byte_loop_recorded("bench", "plain, programs only")?;
            one_node_programs(&b)?;
            f.measure("plain, one node's programs", &plain, conns)?;
            let loop_one_node = byte_loop_recorded("bench", "plain, one node's programs")?;
            f.lines.push(format!(
                "byte loop with no agent running: both nodes' programs {loop_programs:.2} s, x{:.2} no tlshub; one node's {loop_one_node:.2} s, x{:.2}",
                loop_programs / loop_none.max(0.001),
                loop_one_node / loop_none.max(0.001)
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
        let bps = throughput(&App::exchange(1, PROTECTED_PORT))?;
        f.lines.push(format!(
            "throughput openssl without the send buffer floor: {:.1} MB/s; with/without x{:.2}",
            bps / 1e6,
            f.tput["openssl"] / bps.max(1.0)
        ));
    }
    f.ratios("plain", "no tlshub");
    f.ratios("plain, programs only", "no tlshub");
    f.ratios("plain, one node's programs", "no tlshub");
    for label in ["raw ktls", "wireguard", "stunnel"] {
        f.ratios(label, "no tlshub");
    }
    for Measured { label, .. } in PROVIDERS {
        f.ratios(label, "plain");
        f.ratios(label, "raw ktls");
    }
    for label in ["openssl node-pair", "boringssl", "tlshub", "stunnel"] {
        f.ratios(label, "openssl");
    }
    for l in &f.lines {
        println!("TLSHUB-BENCH {l}");
    }
    Ok(f.lines.join(" | "))
}

/// Setup latency with both apps in an edge-triggered epoll loop
/// (non-blocking sockets: the gate answers `EAGAIN` instead of stopping),
/// against the blocking apps' figure for the same provider, its stages
/// (see [`stage_breakdown`]), and how many
/// processes the gate stopped and how many connections it answered
/// `EAGAIN` meanwhile, per node.
fn event_loop_setup(
    f: &mut Figures,
    provider: Measured,
    a: &Node,
    b: &Node,
    conns: u32,
) -> Result<(), Failure> {
    let label = provider.label;
    let snapshot = (a.stats()?, b.stats()?);
    let counts = |s: &tlshub_admin::stats::Stats| (s.gate_stops, s.gate_waits);
    let before = (counts(&snapshot.0), counts(&snapshot.1));
    let app = App {
        io: "epoll-edge",
        ..App::exchange(1, PROTECTED_PORT)
    };
    let (n, p50, p99) = setup_latency(&app, conns)?;
    std::thread::sleep(Duration::from_millis(1500));
    let after = (counts(&a.stats()?), counts(&b.stats()?));
    record(
        "bench",
        label,
        "setup p50, event loop",
        p50 as f64,
        Unit::Microseconds,
    );
    record(
        "bench",
        label,
        "setup p99, event loop",
        p99 as f64,
        Unit::Microseconds,
    );
    // A connection answered EAGAIN is one whose app's first I/O found
    // the gate closed, as a hold is for a blocking app.
    for (side, waits) in [
        ("client", after.0.1.saturating_sub(before.0.1)),
        ("server", after.1.1.saturating_sub(before.1.1)),
    ] {
        record(
            "bench",
            label,
            &format!("gate closed at first I/O, event loop, {side} node"),
            share(waits, n as u64),
            Unit::Percent,
        );
    }
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
    let event_loop = format!("{label} event loop");
    for (node, client, since) in [(a, true, &snapshot.0), (b, false, &snapshot.1)] {
        let line = stage_breakdown("stages", &event_loop, provider, node, client, Some(since))?;
        f.lines.push(line);
    }
    Ok(())
}

/// `part` of `whole` in percent (0 for an empty whole).
fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    100.0 * part as f64 / whole as f64
}
