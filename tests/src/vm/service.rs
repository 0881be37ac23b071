//! Scenarios of running tlshub as a service: switching providers under
//! load, A/B runs and mismatched providers; the admin CLI and the
//! Prometheus endpoint are in `admin`, restarts under the same load in
//! `restarts`.
//!
//! The load (`tlshub-loadgen`): 200 long-lived connections carrying a
//! verified piece each second both ways, plus new short connections at
//! [`SHORT_PER_SEC`]. Every byte is checked by the receiving app, and the
//! capture of the node-to-node wire is checked for plaintext and decrypted.

use std::time::{Duration, Instant};

use tlshub_admin::ab::AbRun;

use crate::failed;
use crate::load::LoadReport;
use crate::vm::outcome::{Failure, Outcome};

use super::node::{Node, NodeSpec, PROTECTED_PORT, ProviderKind};
use super::process::{AppChild, finish, spawn_ready};
use super::support::metric;
use super::topology::POD_B;
use super::wire_check::{Capture, check_wire_allowing_unkeyed};

/// Long-lived connections of the load.
pub const LONG: u32 = 200;

/// New short connections per second. The slowest provider, OpenSSL, needs
/// about 75 ms of setup per connection under TCG (`cargo xtask bench`:
/// p50 75.6 ms), but with both nodes serving 200 long connections the
/// server-side keying is effectively serial: the gate stops the whole
/// server process for each new connection, and the next one is accepted
/// (and keyed) only after that. Measured in this scenario: at 4/s the
/// steady state holds (p99 141-323 ms) but the backlog of a 2-10 s outage
/// never drains (p99 15-18 s, connections timing out for the rest of the
/// run); at 2/s an outage's backlog drains. 2/s is the rate sustained.
pub const SHORT_PER_SEC: f64 = 2.0;

/// The load's server in pod-b, stopped when dropped.
pub(super) struct LoadServer(#[expect(dead_code, reason = "held for its Drop")] AppChild);

/// Where the load server records connections whose bytes arrived corrupt;
/// [`report`] fails the run if it has anything.
const LOAD_CORRUPTION_LOG: &str = "/tmp/logs/loadgen-corrupt.log";

impl LoadServer {
    /// On the protected port.
    pub(super) fn start() -> Result<Self, Failure> {
        Self::start_on(PROTECTED_PORT)
    }

    /// On `port`; a second one on another port shares the corruption log.
    pub(super) fn start_on(port: u16) -> Result<Self, Failure> {
        let listen = format!("0.0.0.0:{port}");
        let _ = std::fs::remove_file(LOAD_CORRUPTION_LOG);
        spawn_ready(
            "pod-b",
            &[
                "tlshub-loadgen",
                "server",
                "--listen",
                &listen,
                "--corruption-log",
                LOAD_CORRUPTION_LOG,
            ],
            "listening",
            Duration::from_secs(10),
        )
        .map(Self)
    }
}

/// Starts the load's client in pod-a ([`LONG`] long connections, short ones
/// at [`SHORT_PER_SEC`]) and waits until its long connections are up;
/// `finish` collects its report.
pub(super) fn start_load(seconds: u64) -> Result<AppChild, Failure> {
    start_load_with(LONG, seconds, SHORT_PER_SEC)
}

/// [`start_load`] with its own numbers.
pub(super) fn start_load_with(
    long: u32,
    seconds: u64,
    short_per_sec: f64,
) -> Result<AppChild, Failure> {
    spawn_load_client(
        POD_B,
        &[
            "--long",
            &long.to_string(),
            "--duration",
            &seconds.to_string(),
            "--short-per-sec",
            &short_per_sec.to_string(),
        ],
    )
}

/// Starts `tlshub-loadgen client` in pod-a against `server` (an address
/// in pod-b) on the protected port with `args`, and waits until its long
/// connections are up (at once without any); `finish` collects its
/// [`LoadReport`].
pub(super) fn spawn_load_client(server: &str, args: &[&str]) -> Result<AppChild, Failure> {
    let connect = format!("{server}:{PROTECTED_PORT}");
    let mut argv = vec!["tlshub-loadgen", "client", "--connect", &connect];
    argv.extend_from_slice(args);
    spawn_ready(
        "pod-a",
        &argv,
        "long connections up",
        Duration::from_secs(300),
    )
}

/// The load client's report; fails if the load server saw corrupt bytes
/// (it closes such a connection, which the client alone cannot tell from
/// a failure a restart scenario tolerates).
pub(super) fn report(out: &str) -> Result<LoadReport, Failure> {
    let corrupt = load_corruption();
    if !corrupt.is_empty() {
        return Err(failed!(
            "the load server received corrupt bytes: {}",
            corrupt.join("; ")
        ));
    }
    super::support::last_report(out)
}

/// The load server's corruption records so far.
fn load_corruption() -> Vec<String> {
    std::fs::read_to_string(LOAD_CORRUPTION_LOG)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

pub(super) fn two_providers(name: &'static str, timeout_ms: u64) -> NodeSpec {
    let mut s = NodeSpec::new(name);
    s.also = vec![ProviderKind::BoringSsl];
    s.key_timeout_ms = timeout_ms;
    s
}

/// Done-when 1: switching provider back and forth every 5 s under load.
pub fn hot_swap_under_load() -> Outcome {
    let a = Node::start(two_providers("a", 5000))?;
    let b = Node::start(two_providers("b", 5000))?;
    let cap = Capture::start("hot-swap")?;
    let _server = LoadServer::start()?;
    let client = start_load(60)?;
    let started = Instant::now();
    let mut switches = 0;
    let names = ["boringssl", "openssl"];
    while started.elapsed() < Duration::from_secs(58) {
        std::thread::sleep(Duration::from_secs(5));
        let name = names[switches % 2];
        for n in [&a, &b] {
            let answer = n.use_provider(name)?;
            if answer.active != name {
                return Err(failed!("tlshubctl provider use {name}: {answer:?}"));
            }
        }
        switches += 1;
    }
    let r = report(&finish(client, Duration::from_secs(180))?)?;
    super::wire_check::plain_control()?;
    let flows = cap.finish()?;
    if !r.ok || r.short_failed != 0 {
        return Err(failed!("the load saw failures: {r}"));
    }
    let wire = super::wire_check::check_wire_with_control(&flows, &a, &b)?;
    let short_ok = r.short_ok;
    let expected = 2 * (u64::from(LONG) + short_ok) as usize;
    if wire.protected_flows != expected || wire.decrypted != expected {
        return Err(failed!(
            "{expected} protected flows expected (200 long + {short_ok} short, both ways): {wire:?}"
        ));
    }
    let mut split = Vec::new();
    for n in [&a, &b] {
        let text = n.metrics()?;
        let o = metric(
            &text,
            "tlshub_connections_protected_total{provider=\"openssl\"}",
        );
        let bs = metric(
            &text,
            "tlshub_connections_protected_total{provider=\"boringssl\"}",
        );
        if o < 1.0 || bs < 1.0 {
            return Err(failed!(
                "node {}: the metrics do not show the split (openssl {o}, boringssl {bs})",
                n.spec.name
            ));
        }
        let failed: f64 = text
            .lines()
            .filter(|l| l.starts_with("tlshub_connections_failed_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if failed > 0.0 {
            return Err(failed!(
                "node {}: failed connections in the metrics:\n{text}",
                n.spec.name
            ));
        }
        // Each provider's own metrics (the SDK's, `metrics_listen`) agree
        // with the core's: as many keys answered, none failed.
        for (kind, core_count) in [(ProviderKind::OpenSsl, o), (ProviderKind::BoringSsl, bs)] {
            let super::node::ProviderRequests {
                answered,
                failed,
                text: own,
                ..
            } = n.provider_requests(kind)?;
            if answered < core_count
                || failed > 0.0
                || !own.contains("tlshub_keyprovider_request_duration_seconds_bucket")
            {
                return Err(failed!(
                    "node {} {}: the provider's metrics say {answered} answered, {failed} failed; the core keyed {core_count}:\n{own}",
                    n.spec.name,
                    kind.name()
                ));
            }
        }
        split.push(format!("node {} openssl {o} / boringssl {bs}", n.spec.name));
    }
    let status = a.status()?;
    Ok(format!(
        "{switches} switches in 60 s; {LONG} long connections ({} verified pieces) and {short_ok} short ones at {SHORT_PER_SEC}/s (p50 {:.0} ms, p99 {:.0} ms): 0 failed, 0 corrupt; wire: {} flows TLS only, all decrypted; protected per provider: {}; active now {}",
        r.long_pieces,
        r.short_p50_ms,
        r.short_p99_ms,
        wire.protected_flows,
        split.join(", "),
        status.active_provider
    ))
}

/// `tlshubctl ab` as the README says to run it: on both nodes at once,
/// under load, OpenSSL against BoringSSL (which interoperate, so the nodes
/// need not switch in step). Each run must switch 6 times in 30 s, find
/// connections keyed by both providers and none failed, count no more
/// than the core's metrics did meanwhile (and miss no more than the
/// load's rate allows between reading the metrics and the run's start),
/// and leave OpenSSL active. Then a run with BoringSSL as A is
/// interrupted with SIGINT: it must exit 130, print what it measured,
/// and restore OpenSSL. The load must see no failure.
pub fn ab_under_load() -> Outcome {
    let a = Node::start(two_providers("a", 5000))?;
    let b = Node::start(two_providers("b", 5000))?;
    let _server = LoadServer::start()?;
    let client = start_load_with(40, 50, 4.0)?;
    std::thread::sleep(Duration::from_secs(3));
    let keyed = |n: &Node| -> Result<f64, Failure> {
        let text = n.metrics()?;
        Ok(["openssl", "boringssl"]
            .iter()
            .map(|p| {
                metric(
                    &text,
                    &format!("tlshub_connections_protected_total{{provider=\"{p}\"}}"),
                )
            })
            .sum())
    };
    let before = [keyed(&a)?, keyed(&b)?];
    let args = [
        "ab",
        "openssl",
        "boringssl",
        "--duration",
        "30s",
        "--switch-every",
        "5s",
    ];
    let (run_a, run_b) = std::thread::scope(|s| {
        let on_a = s.spawn(|| a.ctl_with_exit::<AbRun>(&args));
        let on_b = s.spawn(|| b.ctl_with_exit::<AbRun>(&args));
        (on_a.join(), on_b.join())
    });
    let after = [keyed(&a)?, keyed(&b)?];
    let mut seen = Vec::new();
    for (i, (n, run)) in [(&a, run_a), (&b, run_b)].into_iter().enumerate() {
        let (code, run) = run.map_err(|_| "a tlshubctl thread panicked".to_string())??;
        let name = &n.spec.name;
        let run = run.map_err(|e| format!("node {name}: tlshubctl ab exited {code}: {e:?}"))?;
        let counts: Vec<u64> = (0..2)
            .map(|p| run.report.providers.get(p).map_or(0, |f| f.keyed))
            .collect();
        let failed: usize = run.report.providers.iter().map(|p| p.failed.len()).sum();
        let total = (counts[0] + counts[1]) as f64;
        let delta = after[i] - before[i];
        // The load's short connections between reading the metrics and
        // the run's first read (well under 2 s here), both roles.
        let slack = 2.0 * 2.0 * 4.0;
        if code != 0
            || run.switches != 6
            || run.restored != "openssl"
            || counts.contains(&0)
            || failed != 0
            || total > delta
            || delta - total > slack
            || run.report.verdicts.len() != 2
        {
            return Err(failed!(
                "node {name}: tlshubctl ab exited {code} (want 0, 6 switches, openssl restored, both providers keyed, none failed, {total} within {delta} - {slack} of the metrics, 2 verdicts): {run:?}"
            ));
        }
        let active = n.status()?.active_provider;
        if active != "openssl" {
            return Err(failed!("node {name}: active after ab: {active}"));
        }
        seen.push(format!(
            "node {name}: openssl {} / boringssl {} keyed of {delta} (metrics), {}",
            counts[0],
            counts[1],
            run.report.verdicts.first().map_or("", String::as_str)
        ));
    }
    // Interrupted: BoringSSL is active when SIGINT comes.
    let socket = a.dir.join("admin.sock");
    let socket = socket.to_string_lossy();
    let interrupted = super::process::command(
        None,
        &[
            "tlshubctl",
            "--socket",
            &socket,
            "ab",
            "boringssl",
            "openssl",
            "--duration",
            "10m",
        ],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .map_err(|e| format!("cannot run tlshubctl ab: {e}"))?;
    std::thread::sleep(Duration::from_secs(6));
    let during = a.status()?.active_provider;
    let pid = rustix::process::Pid::from_raw(i32::try_from(interrupted.id()).unwrap_or(0))
        .ok_or("tlshubctl has no pid")?;
    rustix::process::kill_process(pid, rustix::process::Signal::INT)
        .map_err(|e| format!("cannot interrupt tlshubctl ab: {e}"))?;
    let out = interrupted
        .wait_with_output()
        .map_err(|e| format!("tlshubctl ab: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let active = a.status()?.active_provider;
    if during != "boringssl"
        || out.status.code() != Some(130)
        || active != "openssl"
        || !text.contains("interrupted; openssl restored")
    {
        return Err(failed!(
            "interrupted ab: active during the run {during} (want boringssl), exit {:?} (want 130), active after {active} (want openssl); it printed: {text}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let r = report(&finish(client, Duration::from_secs(180))?)?;
    if !r.ok || r.short_failed != 0 {
        return Err(failed!("the load saw failures: {r}"));
    }
    Ok(format!(
        "{}; SIGINT: exit 130, openssl restored; the load: {} short connections, 0 failed",
        seen.join("; "),
        r.short_ok
    ))
}

/// Two nodes whose providers cannot talk to each other (the example PSK
/// provider, which keys without a handshake, against OpenSSL, which
/// handshakes over the connection): each node's provider says which keying
/// protocol it speaks, the nodes announce it in the TCP handshake, and
/// under strict rules every connection fails at once (reason
/// `keying_mismatch`, well inside the key timeout, no provider asked) in
/// both orders; no app receives a byte it was not sent, and no plaintext
/// is on the wire.
pub fn mismatched_providers_fail_closed() -> Outcome {
    let mut sa = NodeSpec::new("a");
    sa.provider = ProviderKind::ExamplePsk;
    let a = Node::start(sa)?;
    let b = Node::start(NodeSpec::new("b"))?;
    super::support::settle_keying();
    let cap = Capture::start("mismatch")?;
    let mut seen = Vec::new();
    for mode in ["client-first", "server-first"] {
        let app = super::support::App {
            mode,
            ..super::support::App::exchange(10_000, PROTECTED_PORT)
        };
        let (s, c) = super::support::run_pair(&app, &[], Duration::from_secs(60))?;
        for (side, r) in [("server", &s), ("client", &c)] {
            if r.ok {
                return Err(failed!(
                    "{mode}: the {side} app succeeded across mismatched providers: {r}"
                ));
            }
            let err = r.error.as_deref().unwrap_or("");
            if err.contains("differs") {
                return Err(failed!("{mode}: the {side} app received garbage: {r}"));
            }
            seen.push(format!("{mode} {side}: {err}"));
        }
    }
    super::wire_check::plain_control()?;
    let wire = check_wire_allowing_unkeyed(&cap.finish()?, &a, &b, true)?;
    wire.expect_at_least(1, 0)?;
    // Loud, and at once: every connection was failed for the keying
    // mismatch the handshake announced, by at least one core (the other
    // may find it reset by then: closed before keys), and nothing failed
    // for another reason.
    let mismatch = |n: &Node| n.stat(|s| s.failed.get("keying_mismatch").copied().unwrap_or(0));
    // The stats files are rewritten once a second.
    let waited = Instant::now();
    while mismatch(&a) + mismatch(&b) < 2 && waited.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ma, mb) = (mismatch(&a), mismatch(&b));
    let (fa, fb) = (a.stats()?.failed, b.stats()?.failed);
    let only_mismatch =
        |f: &std::collections::BTreeMap<String, u64>| f.keys().all(|k| k == "keying_mismatch");
    if ma + mb < 2 || !only_mismatch(&fa) || !only_mismatch(&fb) {
        return Err(failed!(
            "keying_mismatch failures: node a {ma}, node b {mb} (want 2 or more together); failed a {fa:?} b {fb:?}"
        ));
    }
    // Said by the core that failed first (the other may have found the
    // connection reset), naming its own provider.
    let logs = format!("{}\n{}", a.core_log(), b.core_log());
    let met = logs
        .lines()
        .find(|l| {
            (l.contains("provider=openssl") || l.contains("provider=psk"))
                && l.contains("another keying protocol")
        })
        .map(String::from)
        .ok_or_else(|| {
            format!(
                "neither core said that the peer's provider speaks another keying protocol:\n{logs}"
            )
        })?;
    let asked = b.provider_requests(ProviderKind::OpenSsl)?;
    if asked.any() {
        return Err(failed!(
            "node b's provider was asked for keys ({asked:?}): the mismatch was known from the handshake"
        ));
    }
    let reset_b = metric(&b.metrics()?, "tlshub_connections_reset_total");
    Ok(format!(
        "{}; wire: {} protected flows, no plaintext; keying_mismatch a {ma} b {mb}, node b reset {reset_b}, its provider never asked; logged: {}",
        seen.join("; "),
        wire.protected_flows,
        met.split("conn{").nth(1).unwrap_or(&met)
    ))
}
