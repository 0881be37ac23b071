//! `cargo xtask bench` and `cargo xtask demo`, which run in the VM like
//! the scenarios but measure or narrate instead of checking.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tlshub_bench_report::{Figure, Unit};

use crate::app_report::AppReport;
use crate::load::LoadReport;

use super::alternatives::{PROXY_LOCAL, PROXY_LOCAL_PORT, ProxyPair, WG_POD_B, WireGuard};
use super::capacity::CpuSample;
use super::node::{Node, NodeSpec, PLAIN_PORT, PROTECTED_PORT, ProviderKind};
use super::process::{self, finish, spawn_ready};
use super::service::spawn_load_client;
use super::support::*;
use super::topology::POD_B;
use super::wire_check::*;

/// Prints one figure for `cargo xtask bench`, which collects them from
/// the console into `target/bench/` (see `tlshub_bench_report`).
fn record(part: &str, subject: &str, measure: &str, value: f64, unit: Unit) {
    match Figure::new(part, subject, measure, value, unit).line() {
        Ok(line) => println!("{line}"),
        Err(e) => println!("TLSHUB-BENCH figure not recorded: {e}"),
    }
}

pub fn latencies(c: &AppReport) -> Vec<u64> {
    let mut v = c.latency_us.clone();
    v.sort_unstable();
    v
}

/// Runs `app` (server in pod-b, client in pod-a) within `timeout` and
/// returns the client's report; either side failing is an error.
fn client_report(app: &App, timeout: Duration) -> Result<AppReport, String> {
    let (s, c) = run_pair(app, &[], timeout)?;
    both_ok(app, &s, &c)?;
    Ok(c)
}

/// Connect-to-first-echoed-byte over `conns` sequential connections to
/// `target` (an [`App`] naming the server, port and any proxy), in
/// microseconds, sorted.
pub fn setup_latencies(target: &App, conns: u32) -> Result<Vec<u64>, String> {
    let app = App {
        mode: "echo",
        connections: conns,
        size: 1,
        ..target.clone()
    };
    Ok(latencies(&client_report(&app, Duration::from_secs(1800))?))
}

/// [`setup_latencies`] as (samples, p50, p99).
pub fn setup_latency(target: &App, conns: u32) -> Result<(usize, u64, u64), String> {
    let l = setup_latencies(target, conns)?;
    let (p50, p99) = p50_p99(&l);
    Ok((l.len(), p50, p99))
}

/// (p50, p99) of sorted latencies.
fn p50_p99(l: &[u64]) -> (u64, u64) {
    (percentile(l, 0.5), percentile(l, 0.99))
}

/// Records sorted setup latencies `l` of `subject` as the points of
/// `part`'s distribution (see `tlshub_bench_report::CDF_FRACTIONS`).
fn record_cdf(part: &str, subject: &str, l: &[u64]) {
    for fraction in tlshub_bench_report::CDF_FRACTIONS {
        record(
            part,
            subject,
            &tlshub_bench_report::cdf_measure(fraction),
            percentile(l, fraction) as f64,
            Unit::Microseconds,
        );
    }
}

/// One stream of 64 MiB to `target`, bytes per second.
pub fn throughput(target: &App) -> Result<f64, String> {
    stream_of(target, 64 << 20)
}

/// One stream of `bytes` to `target`, bytes per second.
fn stream_of(target: &App, bytes: usize) -> Result<f64, String> {
    let app = App {
        mode: "throughput",
        size: bytes,
        ..target.clone()
    };
    let c = client_report(&app, Duration::from_secs(600))?;
    Ok(c.bytes_per_sec.unwrap_or(0.0))
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

/// [`byte_loop_seconds`], recorded as the figure "byte loop" of `subject`
/// in `part`.
fn byte_loop_recorded(part: &str, subject: &str) -> Result<f64, String> {
    let seconds = byte_loop_seconds()?;
    record(
        part,
        subject,
        "byte loop",
        seconds * 1000.0,
        Unit::Milliseconds,
    );
    Ok(seconds)
}

/// One BPF program's run counters (`/proc/PID/fdinfo` of a program fd,
/// counted while `kernel.bpf_stats_enabled` is 1).
#[derive(Debug, Clone, Default)]
struct ProgramRuns {
    name: String,
    run_time_ns: u64,
    run_cnt: u64,
}

/// The run counters of the BPF programs whose fds the processes `pids`
/// hold, by program id. Names come from `/proc/kallsyms`
/// (`bpf_prog_<tag>_<name>`), since fdinfo gives only the tag.
fn program_runs(pids: &[u32]) -> HashMap<u64, ProgramRuns> {
    let names: HashMap<String, String> = std::fs::read_to_string("/proc/kallsyms")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let symbol = l.split_whitespace().nth(2)?;
            let (tag, name) = symbol.strip_prefix("bpf_prog_")?.split_once('_')?;
            Some((tag.to_owned(), name.to_owned()))
        })
        .collect();
    let mut runs = HashMap::new();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let is_program = std::fs::read_link(fd.path())
                .is_ok_and(|target| target.to_string_lossy() == "anon_inode:bpf-prog");
            if !is_program {
                continue;
            }
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            let field = |key: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                    .map(str::trim)
                    .unwrap_or_default()
                    .to_owned()
            };
            let Ok(id) = field("prog_id").parse::<u64>() else {
                continue;
            };
            let tag = field("prog_tag");
            runs.insert(
                id,
                ProgramRuns {
                    name: names.get(&tag).cloned().unwrap_or(tag),
                    run_time_ns: field("run_time_ns").parse().unwrap_or(0),
                    run_cnt: field("run_cnt").parse().unwrap_or(0),
                },
            );
        }
    }
    runs
}

/// What each of the cores' BPF programs cost `conns` connections of
/// `app` (setup and one echoed byte): runs per connection and time per
/// run, summed over both nodes' programs (both run in this VM's kernel),
/// the costliest first. The kernel counts only while
/// `kernel.bpf_stats_enabled` is 1, which adds two clock reads per run, so
/// the connections are not timed meanwhile.
fn hook_costs(cores: &[u32], app: &App, conns: u32) -> Result<Vec<String>, String> {
    const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
    std::fs::write(STATS, "1").map_err(|e| format!("{STATS}: {e}"))?;
    let before = program_runs(cores);
    let run = setup_latencies(app, conns);
    let after = program_runs(cores);
    let _ = std::fs::write(STATS, "0");
    run?;
    let mut by_name: HashMap<String, (u64, u64)> = HashMap::new();
    for (id, a) in &after {
        let b = before.get(id).cloned().unwrap_or_default();
        let sum = by_name.entry(a.name.clone()).or_default();
        sum.0 += a.run_time_ns.saturating_sub(b.run_time_ns);
        sum.1 += a.run_cnt.saturating_sub(b.run_cnt);
    }
    if by_name.is_empty() {
        return Err(format!("no BPF program fds in the cores {cores:?}"));
    }
    let mut costs: Vec<(String, u64, u64)> = by_name
        .into_iter()
        .filter(|(_, (_, runs))| *runs > 0)
        .map(|(name, (ns, runs))| (name, ns, runs))
        .collect();
    costs.sort_by_key(|c| std::cmp::Reverse(c.1));
    let n = u64::from(conns).max(1);
    Ok(costs
        .into_iter()
        .map(|(name, ns, runs)| {
            let (runs_each, us_each) = (runs as f64 / n as f64, ns as f64 / n as f64 / 1000.0);
            // As figures too: the runs are the same from run to run where
            // the times move with the host, so `--compare` sees a program
            // that runs more often.
            record(
                "quick_hooks",
                &name,
                "runs per connection",
                runs_each,
                Unit::Count,
            );
            record(
                "quick_hooks",
                &name,
                "time per connection",
                us_each,
                Unit::Microseconds,
            );
            format!(
                "{name}: {runs_each:.1} runs and {us_each:.1} us per connection, {} ns per run",
                ns / runs.max(1)
            )
        })
        .collect())
}

/// A provider set-up the benchmark measures.
#[derive(Debug, Clone, Copy)]
struct Measured {
    /// The label its lines use.
    label: &'static str,
    kind: ProviderKind,
    /// A handshake provider in node-pair mode ([`NodeSpec::node_pair`]).
    node_pair: bool,
}

/// The providers the benchmark measures.
const PROVIDERS: [Measured; 4] = [
    Measured {
        label: "openssl",
        kind: ProviderKind::OpenSsl,
        node_pair: false,
    },
    Measured {
        label: "openssl node-pair",
        kind: ProviderKind::OpenSsl,
        node_pair: true,
    },
    Measured {
        label: "boringssl",
        kind: ProviderKind::BoringSsl,
        node_pair: false,
    },
    Measured {
        label: "tlshub",
        kind: ProviderKind::TlsHub,
        node_pair: false,
    },
];

/// Both nodes, each running `provider` (stopped when dropped).
fn nodes_with(provider: Measured) -> Result<(Node, Node), String> {
    let spec = |name| NodeSpec {
        node_pair: provider.node_pair,
        // As installed: no key log (a debugging aid that costs every
        // connection a write).
        diagnostics: false,
        ..NodeSpec::with_provider(name, provider.kind)
    };
    let nodes = nodes(spec("a"), spec("b"))?;
    if provider.node_pair {
        // The first connection would wait for the session otherwise.
        std::thread::sleep(Duration::from_secs(2));
    }
    Ok(nodes)
}

/// A part's way of measuring one peer: its label and the app to aim at.
type Measure<'a> = dyn FnMut(&'static str, &App) -> Result<(), String> + 'a;

/// The baselines every part measures first, before any core ran (nothing
/// attached): plain TCP as it is without tlshub ("no tlshub") and kTLS
/// with a fixed key installed by the apps themselves, no agent and no
/// handshake ("raw ktls": the data path's ceiling; tlshub adds nothing
/// after the keys are in).
fn baselines(measure: &mut Measure<'_>) -> Result<(), String> {
    let plain = App::exchange(1, PLAIN_PORT);
    measure("no tlshub", &plain)?;
    measure("raw ktls", &raw_ktls(&plain))
}

/// Leaves both nodes' programs attached (a core that stops leaves them
/// for the next one) with no agent running: the core stopped and the
/// provider `kind` killed, so that a measurement of unselected traffic
/// then shows what the hooks cost it, apart from the agents' wakeups.
/// Both nodes share this VM's kernel, so every socket call and every
/// read and write runs both nodes' programs: twice what one node's kernel
/// runs. [`one_node_programs`] leaves one set.
fn programs_only(nodes: [&mut Node; 2], kind: ProviderKind) {
    for node in nodes {
        node.stop_core();
        node.kill_provider(kind);
    }
}

/// After [`programs_only`]: detaches `node`'s programs, so that the other
/// node's alone run, as on a real node whose kernel runs one set.
fn one_node_programs(node: &Node) -> Result<(), String> {
    node.release(true).map(drop)
}

/// `app` with kTLS installed by both apps with a fixed key.
fn raw_ktls(app: &App) -> App {
    App {
        ktls_fixed_key: true,
        ..app.clone()
    }
}

/// The alternatives between the same pods, with no tlshub: WireGuard
/// between the nodes and the stunnel pair, each up only while measured.
fn alternatives(measure: &mut Measure<'_>) -> Result<(), String> {
    let plain = App::exchange(1, PLAIN_PORT);
    {
        let _tunnel = WireGuard::up()?;
        measure(
            "wireguard",
            &App {
                server: WG_POD_B,
                ..plain.clone()
            },
        )?;
    }
    let _proxies = ProxyPair::start()?;
    measure(
        "stunnel",
        &App {
            proxy: Some((PROXY_LOCAL, PROXY_LOCAL_PORT)),
            ..plain
        },
    )
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

/// Where a provider's connections' setup time went on `node`, the
/// `client` (connecting) or accepting side: p50 and p99 of the time from
/// `ESTABLISHED` to each keying stage (see `tlshub_admin::stats::Stage`),
/// over the samples of each stage the node's core recorded since `since`
/// (a stats snapshot taken before the run; `None`: every sample, and the
/// core is fresh for each provider). `label` names the run (the
/// provider's label, or more). Then the provider's round trip as the core saw it (mean of
/// `provider_answered` less mean of `provider_asked`) against the
/// provider's own time for its answers (the mean of its
/// `tlshub_keyprovider_request_duration_seconds`): the difference is the
/// transport and the scheduling of both processes (only for every
/// connection: the provider's histogram has no window). Recorded as the
/// figures of `part`; returns the report line.
fn stage_breakdown(
    part: &str,
    label: &str,
    provider: Measured,
    node: &Node,
    client: bool,
    since: Option<&tlshub_admin::stats::Stats>,
) -> Result<String, String> {
    use tlshub_admin::stats::{Stage, StageSamples};
    let side = if client { "client" } else { "server" };
    let stats = node.stats()?;
    let mut line = format!(
        "stages {label} {side} node (p50/p99 ms after ESTABLISHED, samples; FINs deferred so far {}, gate EAGAIN answers so far {}):",
        stats.fin_deferred, stats.gate_eagain
    );
    // The samples of `stage` since the snapshot. A stage with none (no
    // process was held in an event-loop run) shows none, not older ones.
    let window = |stage| {
        let now = stats.stages.of(client, stage);
        let new = since.map_or(now.len(), |before| {
            now.len()
                .saturating_sub(before.stages.of(client, stage).len())
        });
        now.newest(new)
    };
    if since.is_some_and(|before| {
        Stage::ALL
            .iter()
            .any(|&st| before.stages.of(client, st).len() >= StageSamples::CAP)
    }) {
        return Err(format!(
            "{label}: more than {} samples of a stage before the run, so the run's own cannot be told apart",
            StageSamples::CAP
        ));
    }
    for stage in Stage::ALL {
        let sorted = window(stage);
        if sorted.is_empty() {
            line.push_str(&format!(" {} -;", stage.name()));
            continue;
        }
        let (p50, p99) = (percentile(&sorted, 0.5), percentile(&sorted, 0.99));
        for (p, v) in [("p50", p50), ("p99", p99)] {
            record(
                part,
                &format!("{label}, {side}"),
                &format!("{} {p}", stage.name()),
                v as f64,
                Unit::Microseconds,
            );
        }
        line.push_str(&format!(
            " {} {:.2}/{:.2} ({});",
            stage.name(),
            p50 as f64 / 1000.0,
            p99 as f64 / 1000.0,
            sorted.len()
        ));
    }
    // The provider's histogram covers all its answers, so only a
    // breakdown of every connection is set against it.
    if since.is_none() {
        let mean = |stage| {
            let v = window(stage);
            v.iter().sum::<u64>() as f64 / v.len().max(1) as f64
        };
        let round_trip = mean(Stage::ProviderAnswered) - mean(Stage::ProviderAsked);
        let own = node.provider_metrics(provider.kind)?;
        let series = |what| {
            metric(
                &own,
                &format!(
                    "tlshub_keyprovider_request_duration_seconds_{what}{{role=\"{side}\",result=\"ok\"}}"
                ),
            )
        };
        let own_mean = series("sum") * 1e6 / series("count").max(1.0);
        for (measure, v) in [
            ("provider round trip mean", round_trip),
            ("provider's own time mean", own_mean),
        ] {
            record(
                part,
                &format!("{label}, {side}"),
                measure,
                v,
                Unit::Microseconds,
            );
        }
        line.push_str(&format!(
            " provider round trip mean {:.2} ms, of which the provider's own time {:.2} ms;",
            round_trip / 1000.0,
            own_mean / 1000.0
        ));
    }
    println!("TLSHUB-BENCH {line}");
    Ok(line)
}

/// `cargo xtask bench`: setup latency and throughput for plain TCP, for
/// kTLS with a fixed key and no agent (the ceiling), for the alternatives
/// (WireGuard between the nodes, a stunnel pair) and for each
/// provider, and how often and how long the gate held a process, all in
/// one VM run.
pub fn bench() -> Result<String, String> {
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
) -> Result<(), String> {
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
    // Shown as it was last seen, kTLS on or not.
    let ss = wait_for(
        Duration::from_secs(30),
        Duration::from_millis(20),
        || {
            process::run(
                Some("pod-a"),
                &["ss", "-tni", "state", "established", "( dport = :8443 )"],
            )
            .unwrap_or_default()
        },
        |ss| ss.contains("tls"),
    )
    .unwrap_or_else(|last| last);
    let c = app_report(&finish(client, Duration::from_secs(120))?)?;
    let s = app_report(&finish(server, Duration::from_secs(30))?)?;
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
        c.bytes_sent, c.bytes_received
    ));
    Ok("demo exchange protected end to end".into())
}

/// The collateral stall's established connections: each sends a 64-byte
/// piece and waits for the answer, then pauses [`STALL_INTERVAL_MS`]
/// (closed loop, so a stopped server delays each connection's next piece
/// too).
const STALL_LONG: u32 = 100;
/// Why 1 s and not the 10 ms a real server might see: one-thread TCG runs
/// out of CPU first. Measured: 100 connections every 10 ms made about
/// 2,000 round trips a second with a p50 of 27 ms and no tlshub at all;
/// every 200 ms, the kTLS connections' quiet p50 was 11 to 38 ms. A
/// saturated machine measures its queue, not the gate.
const STALL_INTERVAL_MS: u64 = 1000;
/// New connections per second while busy, from another process in pod-a.
const STALL_NEW_PER_SEC: f64 = 2.0;
/// Seconds without new connections, then seconds with them.
const STALL_QUIET_S: u64 = 15;
const STALL_BUSY_S: u64 = 15;

/// How the apps use their sockets: the server in pod-b (holding the
/// established connections in the collateral stall) and, in the
/// concurrency part, the client in pod-a too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AppStyle {
    /// `tlshub-loadgen server`: a thread per connection on blocking
    /// sockets, as thread-per-connection servers are (the concurrency
    /// part's clients: threads of one process); the gate stops the whole
    /// process for a new connection's keys.
    Threads,
    /// `tlshub-hold server`: one tokio event loop on non-blocking sockets
    /// (the concurrency part's clients: tasks of one event loop,
    /// `tlshub-loadgen client --event-loop`); the gate answers `EAGAIN`.
    EventLoop,
}

impl AppStyle {
    fn name(self) -> &'static str {
        match self {
            Self::Threads => "thread-per-connection server",
            Self::EventLoop => "event-loop (tokio) server",
        }
    }

    fn start(self) -> Result<process::AppChild, String> {
        let listen = format!("0.0.0.0:{PROTECTED_PORT}");
        let tool = match self {
            Self::Threads => "tlshub-loadgen",
            Self::EventLoop => "tlshub-hold",
        };
        spawn_ready(
            "pod-b",
            &[tool, "server", "--listen", &listen],
            "listening",
            Duration::from_secs(10),
        )
    }
}

/// What one collateral-stall run saw: the established connections'
/// report, the new connections' report, and, with tlshub, how many times
/// the server's node stopped a process and answered a connection `EAGAIN`
/// while the new connections came.
type StallRun = (LoadReport, LoadReport, Option<(u64, u64)>);

/// One collateral-stall run against `server_addr`, counting the gate of
/// `server_node` (if tlshub runs).
fn stall_run(
    server_addr: &str,
    kind: AppStyle,
    server_node: Option<&Node>,
) -> Result<StallRun, String> {
    let gate = |n: &Node| n.stats().map(|s| (s.gate_stops, s.gate_waits));
    let _server = kind.start()?;
    let client = |args: &[&str]| spawn_load_client(server_addr, args);
    let long = client(&[
        "--long",
        &STALL_LONG.to_string(),
        "--interval-ms",
        &STALL_INTERVAL_MS.to_string(),
        "--chunk",
        "64",
        "--duration",
        &(STALL_QUIET_S + STALL_BUSY_S).to_string(),
        "--short-per-sec",
        "0",
        "--busy-from-s",
        &STALL_QUIET_S.to_string(),
    ])?;
    std::thread::sleep(Duration::from_secs(STALL_QUIET_S));
    let before = server_node.map(gate).transpose()?;
    let new = client(&[
        "--long",
        "0",
        "--duration",
        &STALL_BUSY_S.to_string(),
        "--short-per-sec",
        &STALL_NEW_PER_SEC.to_string(),
        "--short-size",
        "64",
    ])?;
    let long: LoadReport = last_report(&finish(long, Duration::from_secs(120))?)?;
    let new: LoadReport = last_report(&finish(new, Duration::from_secs(120))?)?;
    // The last new connection's keys may be counted a moment late (the
    // stats file is rewritten once a second).
    std::thread::sleep(Duration::from_millis(1500));
    let after = server_node.map(gate).transpose()?;
    let gate = before
        .zip(after)
        .map(|(b, a)| (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1)));
    if !long.ok || long.long_opened != STALL_LONG || long.rtt_busy.count == 0 {
        return Err(format!("the established connections failed: {long}"));
    }
    if !new.ok || new.short_attempted == 0 || new.short_failed != 0 {
        return Err(format!("new connections failed: {new}"));
    }
    Ok((long, new, gate))
}

/// `bench` part two, the collateral stall: what new connections cost a
/// server's established ones. A server in pod-b holds [`STALL_LONG`]
/// established connections, each echoing a 64-byte piece every
/// [`STALL_INTERVAL_MS`]; for [`STALL_QUIET_S`] seconds nothing else
/// happens, then another client process opens [`STALL_NEW_PER_SEC`] new
/// connections per second to the same server for [`STALL_BUSY_S`] seconds.
/// The established connections' round trips while busy against while
/// quiet, for a thread-per-connection server (blocking sockets) and an
/// event-loop server (non-blocking), with no tlshub, through WireGuard, and
/// with each provider; and how often the gate stopped the server's process
/// or answered it `EAGAIN` while busy.
pub fn collateral_stall() -> Result<String, String> {
    let mut lines = Vec::new();
    let mut report = |label: &str, kind: AppStyle, (long, new, gate): StallRun| {
        let (q, b) = (long.rtt_quiet, long.rtt_busy);
        for (what, value) in [
            ("quiet p50", q.p50_us),
            ("quiet p99", q.p99_us),
            ("busy p50", b.p50_us),
            ("busy p99", b.p99_us),
            ("busy p99.9", b.p999_us),
        ] {
            record(
                "collateral_stall",
                label,
                &format!("{}, {what}", kind.name()),
                value as f64,
                Unit::Microseconds,
            );
        }
        let mut line = format!(
            "stall {label}, {}: round trips quiet n={} p50={}us p99={}us p99.9={}us max={}us; busy n={} p50={}us p99={}us p99.9={}us max={}us; busy/quiet p50 x{:.2} p99 x{:.2} p99.9 x{:.2}; new connections {} ok, setup p50 {:.1} ms p99 {:.1} ms",
            kind.name(),
            q.count,
            q.p50_us,
            q.p99_us,
            q.p999_us,
            q.max_us,
            b.count,
            b.p50_us,
            b.p99_us,
            b.p999_us,
            b.max_us,
            b.p50_us as f64 / q.p50_us.max(1) as f64,
            b.p99_us as f64 / q.p99_us.max(1) as f64,
            b.p999_us as f64 / q.p999_us.max(1) as f64,
            new.short_ok,
            new.short_p50_ms,
            new.short_p99_ms,
        );
        if let Some((stops, waits)) = gate {
            line.push_str(&format!(
                "; server node: {stops} processes stopped, {waits} connections answered EAGAIN"
            ));
        }
        println!("TLSHUB-BENCH {line}");
        lines.push(line);
    };
    let kinds = [AppStyle::Threads, AppStyle::EventLoop];
    for kind in kinds {
        report("no tlshub", kind, stall_run(POD_B, kind, None)?);
    }
    {
        let _tunnel = WireGuard::up()?;
        for kind in kinds {
            report("wireguard", kind, stall_run(WG_POD_B, kind, None)?);
        }
    }
    for provider in PROVIDERS {
        let label = provider.label;
        let (_a, b) = nodes_with(provider)?;
        for kind in kinds {
            report(label, kind, stall_run(POD_B, kind, Some(&b))?);
        }
    }
    Ok(lines.join(" | "))
}

/// Clients at once in the concurrency part (threads).
const CONCURRENCY: [u32; 3] = [1, 8, 64];
/// Event-loop clients at once in the concurrency part (one client is the
/// sequential case, which the threads' level 1 measures).
const EVENT_LOOP_CONCURRENCY: [u32; 2] = [8, 64];
/// Seconds each concurrency level runs.
const CONCURRENCY_S: u64 = 10;

/// `bench` part three, concurrency: new connections (connect, 64 bytes
/// each way, close) opened back to back by 1, 8 and 64 clients at once
/// (threads of one blocking client process in pod-a, against a
/// thread-per-connection server in pod-b), and by 8 and 64 tasks of one
/// event-loop client against an event-loop server (no tlshub and each
/// provider), for [`CONCURRENCY_S`] seconds:
/// the rate sustained, the connections that failed, and the setup latency, with no tlshub, through
/// WireGuard and with each provider, how many times the gate stopped a
/// process on each node, and where the VM's CPU time went per connection
/// (idle near 0: the emulated CPU, not the gate, sets the rate). The
/// cores' and the providers' CPU per connection (both nodes together),
/// and per second while idle, are figures of their own.
pub fn concurrency() -> Result<String, String> {
    // Each level leaves thousands of client sockets in TIME_WAIT for 60 s,
    // all to the one server address, and connect()'s search for a free
    // port walks past them: without reuse the later levels paid for the
    // earlier ones (64 event-loop clients with no tlshub, run after four
    // levels, made 155 connections/s with a third of the CPU idle, against
    // 385/s for 8). Reusing TIME_WAIT ports (TCP timestamps keep it
    // safe) is what busy clients configure.
    let _reuse = PodSetting::sysctl("pod-a", "net/ipv4/tcp_tw_reuse", "1")?;
    let mut lines = Vec::new();
    let level = |lines: &mut Vec<String>,
                 label: &str,
                 server_addr: &str,
                 nodes: Option<(&Node, &Node)>,
                 apps: AppStyle| {
        let _server = apps.start()?;
        let levels: &[u32] = match apps {
            AppStyle::Threads => &CONCURRENCY,
            AppStyle::EventLoop => &EVENT_LOOP_CONCURRENCY,
        };
        for &clients in levels {
            let named = match apps {
                AppStyle::Threads => format!("{clients} clients"),
                AppStyle::EventLoop => format!("{clients} event-loop clients"),
            };
            let stops = |n: &Node| n.stats().map(|s| s.gate_stops);
            let before = nodes
                .map(|(a, b)| Ok::<_, String>((stops(a)?, stops(b)?)))
                .transpose()?;
            let cpu = CpuSample::now();
            let workers = clients.to_string();
            let duration = CONCURRENCY_S.to_string();
            let mut args = vec![
                "--long",
                "0",
                "--workers",
                &workers,
                "--duration",
                &duration,
                "--short-size",
                "64",
            ];
            if apps == AppStyle::EventLoop {
                args.push("--event-loop");
            }
            let load = spawn_load_client(server_addr, &args)?;
            let r: LoadReport = last_report(&finish(load, Duration::from_secs(120))?)?;
            let cpu_after = CpuSample::now();
            if nodes.is_some() {
                record_agents_cpu(label, &cpu_after, &cpu, r.short_ok, |who| {
                    format!("{named}: {who} CPU per connection")
                });
            }
            let cpu = cpu_after.since(&cpu, r.short_ok);
            // A connection that fails (its keys took longer than the key
            // timeout on the saturated emulated CPU, say) is a result, not
            // a broken run: it is reported. Corrupt bytes are not.
            if !r.ok || r.short_ok == 0 {
                return Err(format!("{label}, {named}: {r}"));
            }
            // The stats file is rewritten once a second: a shorter wait
            // left the last holds of a level to the next one's count.
            std::thread::sleep(Duration::from_millis(1500));
            let after = nodes
                .map(|(a, b)| Ok::<_, String>((stops(a)?, stops(b)?)))
                .transpose()?;
            let rate = r.short_ok as f64 / r.duration_s.max(0.001);
            record(
                "concurrency",
                label,
                &format!("{named}: connections"),
                rate,
                Unit::PerSecond,
            );
            for (p, ms) in [("p50", r.short_p50_ms), ("p99", r.short_p99_ms)] {
                record(
                    "concurrency",
                    label,
                    &format!("{named}: setup {p}"),
                    ms,
                    Unit::Milliseconds,
                );
            }
            let mut line = format!(
                "concurrency {label}, {named}: {:.1} connections/s ({} in {:.1} s, {} failed), setup p50 {:.1} ms p99 {:.1} ms",
                rate, r.short_ok, r.duration_s, r.short_failed, r.short_p50_ms, r.short_p99_ms,
            );
            if let (Some(b), Some(a)) = (before, after) {
                line.push_str(&format!(
                    "; processes stopped: client node {}, server node {}",
                    a.0.saturating_sub(b.0),
                    a.1.saturating_sub(b.1)
                ));
            }
            line.push_str(&format!("; CPU ms per connection: {cpu}"));
            println!("TLSHUB-BENCH {line}");
            lines.push(line);
        }
        Ok::<_, String>(())
    };
    for apps in [AppStyle::Threads, AppStyle::EventLoop] {
        level(&mut lines, "no tlshub", POD_B, None, apps)?;
    }
    {
        let _tunnel = WireGuard::up()?;
        level(&mut lines, "wireguard", WG_POD_B, None, AppStyle::Threads)?;
    }
    for provider in PROVIDERS {
        let label = provider.label;
        let (a, b) = nodes_with(provider)?;
        // What the agents cost with nothing to do: CPU per second over
        // 10 s with both nodes up and no connection.
        let cpu = CpuSample::now();
        std::thread::sleep(Duration::from_secs(10));
        let cpu_after = CpuSample::now();
        record_agents_cpu(label, &cpu_after, &cpu, 10, |who| {
            format!("idle: {who} CPU per second")
        });
        let idle = format!(
            "idle {label}, both nodes up, no connections: CPU ms per second: {}",
            cpu_after.since(&cpu, 10)
        );
        println!("TLSHUB-BENCH {idle}");
        lines.push(idle);
        for apps in [AppStyle::Threads, AppStyle::EventLoop] {
            level(&mut lines, label, POD_B, Some((&a, &b)), apps)?;
        }
    }
    Ok(lines.join(" | "))
}

/// Records the cores' and the providers' CPU (both nodes' processes of
/// each kind together) per unit, over `n` units since `before`, as
/// concurrency figures of `label` named by `measure("core" | "provider")`.
fn record_agents_cpu(
    label: &str,
    after: &CpuSample,
    before: &CpuSample,
    n: u64,
    measure: impl Fn(&str) -> String,
) {
    for (who, command) in [("core", "tlshub-core"), ("provider", "tlshub-provider")] {
        record(
            "concurrency",
            label,
            &measure(who),
            after.command_ms(before, n, command),
            Unit::Milliseconds,
        );
    }
}

/// `transactions` one-byte request/response transactions on one
/// connection to `target` (`tlshub-testapp --mode rr`): the rate and the
/// sorted round trips in microseconds, each recorded as `part`'s figures
/// for `label`.
fn request_response(
    part: &str,
    label: &str,
    target: &App,
    transactions: usize,
) -> Result<(f64, Vec<u64>), String> {
    let (tps, l) = rr_once(label, target, transactions)?;
    record(part, label, "rr transactions", tps, Unit::PerSecond);
    for (p, q) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)] {
        record(
            part,
            label,
            &format!("rr round trip {p}"),
            percentile(&l, q) as f64,
            Unit::Microseconds,
        );
    }
    Ok((tps, l))
}

/// [`request_response`] without recording anything.
fn rr_once(label: &str, target: &App, transactions: usize) -> Result<(f64, Vec<u64>), String> {
    let rr = App {
        mode: "rr",
        size: transactions,
        ..target.clone()
    };
    let c = client_report(&rr, Duration::from_secs(600))?;
    let l = latencies(&c);
    if l.len() != transactions {
        return Err(format!(
            "{label}: {} round trips timed, not {transactions}",
            l.len()
        ));
    }
    let tps = c.transactions_per_sec.unwrap_or(0.0);
    Ok((tps, l))
}

/// Repetitions of each measurement in [`quick`].
const QUICK_RUNS: usize = 3;

/// Prints a figure measured once per entry of `values` (the median, with
/// the range as its spread; see [`Figure::repeated`]).
fn record_repeated(part: &str, subject: &str, measure: &str, values: &[f64], unit: Unit) {
    match Figure::repeated(part, subject, measure, values, unit).map(|f| f.line()) {
        Some(Ok(line)) => println!("{line}"),
        Some(Err(e)) => println!("TLSHUB-BENCH figure not recorded: {e}"),
        None => println!("TLSHUB-BENCH figure not recorded: {subject} {measure}: no values"),
    }
}

/// `cargo xtask bench --quick`, for use while developing (a few minutes
/// in the VM), each measurement [`QUICK_RUNS`] times so that its figures
/// carry their run-to-run spread (which `--compare` judges changes
/// against): setup p50/p99 over 100 sequential connections, 2,000
/// request/response transactions and one 16 MiB stream, for plain TCP,
/// raw kTLS and each provider. Its own part: its smaller samples are not
/// comparable with the full parts' figures.
pub fn quick() -> Result<String, String> {
    const PART: &str = "quick";
    let mut lines = Vec::new();
    let mut measure = |label: &str, target: &App| -> Result<(), String> {
        let mut runs: [Vec<f64>; 6] = Default::default();
        let mut pooled = Vec::new();
        for _ in 0..QUICK_RUNS {
            let l = setup_latencies(target, 100)?;
            let (p50, p99) = p50_p99(&l);
            pooled.extend(l);
            let (tps, l) = rr_once(label, target, 2000)?;
            let bps = stream_of(target, 16 << 20)?;
            let values = [
                p50 as f64,
                p99 as f64,
                tps,
                percentile(&l, 0.5) as f64,
                percentile(&l, 0.99) as f64,
                bps,
            ];
            for (run, v) in runs.iter_mut().zip(values) {
                run.push(v);
            }
        }
        pooled.sort_unstable();
        record_cdf("quick_setup_cdf", label, &pooled);
        let names = [
            ("setup p50", Unit::Microseconds),
            ("setup p99", Unit::Microseconds),
            ("rr transactions", Unit::PerSecond),
            ("rr round trip p50", Unit::Microseconds),
            ("rr round trip p99", Unit::Microseconds),
            ("one stream", Unit::BytesPerSecond),
        ];
        let mut line = format!("quick {label} (min to max of {QUICK_RUNS} runs):");
        for ((name, unit), values) in names.iter().zip(&runs) {
            record_repeated(PART, label, name, values, *unit);
            let (lo, hi) = values
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
            line.push_str(&format!(" {name} {lo:.0} to {hi:.0};"));
        }
        println!("TLSHUB-BENCH {line}");
        lines.push(line);
        Ok(())
    };
    let loop_none = byte_loop_recorded(PART, "no tlshub")?;
    baselines(&mut measure)?;
    let mut stages = Vec::new();
    let plain = App::exchange(1, PLAIN_PORT);
    for provider in PROVIDERS {
        let label = provider.label;
        let (mut a, mut b) = nodes_with(provider)?;
        if label == "openssl" {
            // Unselected connections with the agents running, and what
            // each hook costs them.
            measure("plain", &plain)?;
            let costs = hook_costs(&[a.core_pid(), b.core_pid()], &plain, 300)?;
            let line = format!(
                "quick hooks on unselected connections (both nodes' programs, 300 connections): {}",
                costs.join("; ")
            );
            println!("TLSHUB-BENCH {line}");
            stages.push(line);
        }
        measure(label, &App::exchange(1, PROTECTED_PORT))?;
        // The stats file is rewritten once a second.
        std::thread::sleep(Duration::from_millis(1500));
        for (node, client) in [(&a, true), (&b, false)] {
            let line = stage_breakdown("quick_stages", label, provider, node, client, None)?;
            stages.push(line);
        }
        // The same with both apps in an edge-triggered epoll loop (the gate
        // answers them EAGAIN): where an event loop's setup time goes.
        let epoll = App {
            io: "epoll-edge",
            ..App::exchange(1, PROTECTED_PORT)
        };
        let before = (a.stats()?, b.stats()?);
        let (n, p50, p99) = setup_latency(&epoll, QUICK_EVENT_LOOP_CONNS)?;
        for (measure, v) in [
            ("setup p50, event loop", p50),
            ("setup p99, event loop", p99),
        ] {
            record(PART, label, measure, v as f64, Unit::Microseconds);
        }
        let line = format!(
            "quick {label} event loop (epoll-edge both ends): n={n} setup p50 {p50} p99 {p99}"
        );
        println!("TLSHUB-BENCH {line}");
        stages.push(line);
        std::thread::sleep(Duration::from_millis(1500));
        let event_loop = format!("{label} event loop");
        for (node, client, before) in [(&a, true, &before.0), (&b, false, &before.1)] {
            let line = stage_breakdown(
                "quick_stages",
                &event_loop,
                provider,
                node,
                client,
                Some(before),
            )?;
            stages.push(line);
        }
        if label == "openssl" {
            // And with no agent running: the hooks' share of "plain"'s
            // cost, with both nodes' programs and with one node's.
            programs_only([&mut a, &mut b], provider.kind);
            measure("plain, programs only", &plain)?;
            let loop_both = byte_loop_recorded(PART, "plain, programs only")?;
            one_node_programs(&b)?;
            measure("plain, one node's programs", &plain)?;
            let loop_one = byte_loop_recorded(PART, "plain, one node's programs")?;
            // And with none, at this point of the run: the first "no
            // tlshub" came before everything else (no TIME_WAIT sockets
            // of earlier measurements yet, a fresh page cache).
            one_node_programs(&a)?;
            measure("no tlshub, later", &plain)?;
            let loop_later = byte_loop_recorded(PART, "no tlshub, later")?;
            let line = format!(
                "quick byte loop (dd bs=1, {BYTE_LOOP_BYTES} bytes, median of 3): no tlshub {loop_none:.2} s (later {loop_later:.2} s), both nodes' programs x{:.2}, one node's x{:.2}",
                loop_both / loop_none.max(0.001),
                loop_one / loop_none.max(0.001)
            );
            println!("TLSHUB-BENCH {line}");
            stages.push(line);
        }
    }
    lines.extend(stages);
    Ok(lines.join(" | "))
}

/// Connections of the event-loop setup run per provider in [`quick`].
const QUICK_EVENT_LOOP_CONNS: u32 = 100;

/// Transactions per peer in [`request_response_and_streams`].
const RR_TRANSACTIONS: usize = 5000;
/// Streams at once, and bytes each, in [`request_response_and_streams`].
const STREAMS: u32 = 8;
const STREAM_BYTES: usize = 8 << 20;

/// Established connections: the request/response rate on one connection
/// ([`RR_TRANSACTIONS`] one-byte transactions, like netperf's TCP_RR: the
/// client sends a byte and waits for its echo before the next) with its
/// round trip p50/p99/p99.9, and [`STREAMS`] streams at once
/// ([`STREAM_BYTES`] each, thread-per-connection apps), for plain TCP, raw
/// kTLS, WireGuard, the stunnel pair and each provider, in one boot. What
/// tlshub adds after the keys are in: nothing but kTLS, so its figures
/// should match raw kTLS's.
pub fn request_response_and_streams() -> Result<String, String> {
    let mut lines = Vec::new();
    // Label -> (transactions/s, round trip p99, streams bytes/s).
    let mut figures: HashMap<&'static str, (f64, u64, f64)> = HashMap::new();
    let mut measure = |label: &'static str, target: &App| -> Result<(), String> {
        const PART: &str = "request_response_and_streams";
        let (tps, l) = request_response(PART, label, target, RR_TRANSACTIONS)?;
        let line = format!(
            "rr {label}: {tps:.0} transactions/s, round trip p50={}us p99={}us p99.9={}us (n={})",
            percentile(&l, 0.5),
            percentile(&l, 0.99),
            percentile(&l, 0.999),
            l.len()
        );
        println!("TLSHUB-BENCH {line}");
        lines.push(line);
        let streams = App {
            mode: "throughput",
            size: STREAM_BYTES,
            connections: STREAMS,
            parallel: true,
            ..target.clone()
        };
        let c = client_report(&streams, Duration::from_secs(900))?;
        let bps = c.bytes_per_sec.unwrap_or(0.0);
        record(
            PART,
            label,
            &format!("{STREAMS} streams in all"),
            bps,
            Unit::BytesPerSecond,
        );
        let line = format!(
            "streams {label}: {STREAMS} at once, {:.1} MB/s in all ({} MiB each)",
            bps / 1e6,
            STREAM_BYTES >> 20
        );
        println!("TLSHUB-BENCH {line}");
        lines.push(line);
        figures.insert(label, (tps, percentile(&l, 0.99), bps));
        Ok(())
    };
    baselines(&mut measure)?;
    alternatives(&mut measure)?;
    let plain = App::exchange(1, PLAIN_PORT);
    for provider in PROVIDERS {
        let (label, kind) = (provider.label, provider.kind);
        let (mut a, mut b) = nodes_with(provider)?;
        if label == "openssl" {
            // The programs attached and the agents running, the
            // connection unselected: what the hooks (and the idle agents)
            // cost traffic they do not protect; and raw kTLS under the
            // same conditions, the ceiling the providers' connections
            // should reach once keyed.
            measure("plain", &plain)?;
            measure("raw ktls loaded", &raw_ktls(&plain))?;
        }
        measure(label, &App::exchange(1, PROTECTED_PORT))?;
        if label == "openssl" {
            // The same unselected connection with no agent running: the
            // hooks' share of "plain"'s cost.
            programs_only([&mut a, &mut b], kind);
            measure("plain, programs only", &plain)?;
            one_node_programs(&b)?;
            measure("plain, one node's programs", &plain)?;
        }
    }
    let mut ratios = |label: &str, base: &str| {
        let (l, b) = (figures[label], figures[base]);
        let line = format!(
            "ratios {label}/{base}: transactions/s x{:.2}, round trip p99 x{:.2}, {STREAMS} streams x{:.2}",
            l.0 / b.0.max(1.0),
            l.1 as f64 / b.1.max(1) as f64,
            l.2 / b.2.max(1.0)
        );
        println!("TLSHUB-BENCH {line}");
        lines.push(line);
    };
    for label in [
        "raw ktls",
        "wireguard",
        "stunnel",
        "plain",
        "plain, programs only",
        "plain, one node's programs",
    ] {
        ratios(label, "no tlshub");
    }
    ratios("raw ktls loaded", "raw ktls");
    for Measured { label, .. } in PROVIDERS {
        ratios(label, "raw ktls");
        ratios(label, "raw ktls loaded");
    }
    Ok(lines.join(" | "))
}
