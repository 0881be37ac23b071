//! `cargo xtask bench` and `cargo xtask demo`, which run in the VM like
//! the scenarios but measure or narrate instead of checking. One module
//! per part of the benchmark: `setup` (connection setup against the
//! alternatives, with the stage breakdown and the byte loop), `stall`
//! (what new connections cost a server's established ones),
//! `concurrency` (1, 8 and 64 clients at once, with the agents' CPU),
//! `streams` (request/response and eight streams), `quick` (`cargo xtask
//! bench --quick`, with the hooks' costs); and `demo`. What the parts
//! share is here.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tlshub_bench_report::{Figure, Unit};

use crate::app_report::AppReport;
use crate::failed;
use crate::load::LoadReport;
use crate::vm::outcome::Failure;

use super::alternatives::{PROXY_LOCAL, PROXY_LOCAL_PORT, ProxyPair, WG_POD_B, WireGuard};
use super::capacity::CpuSample;
use super::node::{Node, NodeSpec, PLAIN_PORT, PROTECTED_PORT, ProviderKind};
use super::process::{self, finish, spawn_ready};
use super::service::spawn_load_client;
use super::support::*;
use super::topology::POD_B;
use super::wire_check::*;

mod concurrency;
mod demo;
mod quick;
mod setup;
mod stall;
mod streams;

pub use concurrency::concurrency;
pub use demo::demo;
pub use quick::quick;
pub use setup::bench;
pub use stall::collateral_stall;
pub use streams::request_response_and_streams;

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
fn client_report(app: &App, timeout: Duration) -> Result<AppReport, Failure> {
    let (s, c) = run_pair(app, &[], timeout)?;
    both_ok(app, &s, &c)?;
    Ok(c)
}

/// Connect-to-first-echoed-byte over `conns` sequential connections to
/// `target` (an [`App`] naming the server, port and any proxy), in
/// microseconds, sorted.
pub fn setup_latencies(target: &App, conns: u32) -> Result<Vec<u64>, Failure> {
    let app = App {
        mode: "echo",
        connections: conns,
        size: 1,
        ..target.clone()
    };
    Ok(latencies(&client_report(&app, Duration::from_secs(1800))?))
}

/// [`setup_latencies`] as (samples, p50, p99).
pub fn setup_latency(target: &App, conns: u32) -> Result<(usize, u64, u64), Failure> {
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
pub fn throughput(target: &App) -> Result<f64, Failure> {
    stream_of(target, 64 << 20)
}

/// One stream of `bytes` to `target`, bytes per second.
fn stream_of(target: &App, bytes: usize) -> Result<f64, Failure> {
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
fn byte_loop_seconds() -> Result<f64, Failure> {
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
fn byte_loop_recorded(part: &str, subject: &str) -> Result<f64, Failure> {
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
fn nodes_with(provider: Measured) -> Result<(Node, Node), Failure> {
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
type Measure<'a> = dyn FnMut(&'static str, &App) -> Result<(), Failure> + 'a;

/// The baselines every part measures first, before any core ran (nothing
/// attached): plain TCP as it is without tlshub ("no tlshub") and kTLS
/// with a fixed key installed by the apps themselves, no agent and no
/// handshake ("raw ktls": the data path's ceiling; tlshub adds nothing
/// after the keys are in).
fn baselines(measure: &mut Measure<'_>) -> Result<(), Failure> {
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
fn one_node_programs(node: &Node) -> Result<(), Failure> {
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
fn alternatives(measure: &mut Measure<'_>) -> Result<(), Failure> {
    {
        let _tunnel = WireGuard::up()?;
        measure(
            "wireguard",
            &App {
                server: WG_POD_B,
                ..App::exchange(1, PLAIN_PORT)
            },
        )?;
    }
    proxy_pair(measure)
}

/// The stunnel pair alone ("stunnel"), up only while measured: the
/// in-band providers' setup is judged against it, in the full run and in
/// `--quick`.
fn proxy_pair(measure: &mut Measure<'_>) -> Result<(), Failure> {
    let _proxies = ProxyPair::start()?;
    measure(
        "stunnel",
        &App {
            proxy: Some((PROXY_LOCAL, PROXY_LOCAL_PORT)),
            ..App::exchange(1, PLAIN_PORT)
        },
    )
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
) -> Result<String, Failure> {
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
        return Err(failed!(
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

/// `transactions` one-byte request/response transactions on one
/// connection to `target` (`tlshub-testapp --mode rr`): the rate and the
/// sorted round trips in microseconds, each recorded as `part`'s figures
/// for `label`.
fn request_response(
    part: &str,
    label: &str,
    target: &App,
    transactions: usize,
) -> Result<(f64, Vec<u64>), Failure> {
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
fn rr_once(label: &str, target: &App, transactions: usize) -> Result<(f64, Vec<u64>), Failure> {
    let rr = App {
        mode: "rr",
        size: transactions,
        ..target.clone()
    };
    let c = client_report(&rr, Duration::from_secs(600))?;
    let l = latencies(&c);
    if l.len() != transactions {
        return Err(failed!(
            "{label}: {} round trips timed, not {transactions}",
            l.len()
        ));
    }
    let tps = c.transactions_per_sec.unwrap_or(0.0);
    Ok((tps, l))
}

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

    fn start(self) -> Result<process::AppChild, Failure> {
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
