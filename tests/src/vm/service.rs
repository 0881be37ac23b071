//! Scenarios of running tlshub as a service: switching providers under
//! load and provider restarts, with the admin CLI (`tlshubctl`) and the
//! Prometheus endpoint as the operator would use them.
//!
//! The load (`tlshub-loadgen`): 200 long-lived connections carrying a
//! verified piece each second both ways, plus new short connections at
//! [`SHORT_PER_SEC`]. Every byte is checked by the receiving app, and the
//! capture of the node-to-node wire is checked for plaintext and decrypted.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::node::{Node, NodeSpec, PROTECTED_PORT, ProviderKind};
use super::process::{AppChild, finish, spawn_ready};
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
    pub(super) fn start() -> Result<Self, String> {
        let listen = format!("0.0.0.0:{PROTECTED_PORT}");
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
fn start_load(seconds: u64) -> Result<AppChild, String> {
    start_load_with(LONG, seconds, SHORT_PER_SEC)
}

/// [`start_load`] with its own numbers.
pub(super) fn start_load_with(
    long: u32,
    seconds: u64,
    short_per_sec: f64,
) -> Result<AppChild, String> {
    let connect = format!("{POD_B}:{PROTECTED_PORT}");
    spawn_ready(
        "pod-a",
        &[
            "tlshub-loadgen",
            "client",
            "--connect",
            &connect,
            "--long",
            &long.to_string(),
            "--duration",
            &seconds.to_string(),
            "--short-per-sec",
            &short_per_sec.to_string(),
        ],
        "long connections up",
        Duration::from_secs(300),
    )
}

/// An app's JSON report; fails if the load server saw corrupt bytes (it
/// closes such a connection, which the client alone cannot tell from a
/// failure a restart scenario tolerates).
pub(super) fn report(out: &str) -> Result<Value, String> {
    let corrupt = load_corruption();
    if !corrupt.is_empty() {
        return Err(format!(
            "the load server received corrupt bytes: {}",
            corrupt.join("; ")
        ));
    }
    serde_json::from_str(out.trim()).map_err(|e| format!("load report is not JSON ({e}): {out}"))
}

/// The load server's corruption records so far.
fn load_corruption() -> Vec<String> {
    std::fs::read_to_string(LOAD_CORRUPTION_LOG)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// A counter's value for one label set in Prometheus text (0 if absent).
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

fn two_providers(name: &'static str, timeout_ms: u64) -> NodeSpec {
    let mut s = NodeSpec::new(name);
    s.also = vec![ProviderKind::BoringSsl];
    s.key_timeout_ms = timeout_ms;
    s
}

/// Done-when 1: switching provider back and forth every 5 s under load.
pub fn hot_swap_under_load() -> Result<String, String> {
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
            let answer = n.ctl(&["provider", "use", name])?;
            if answer["active"].as_str() != Some(name) {
                return Err(format!("tlshubctl provider use {name}: {answer}"));
            }
        }
        switches += 1;
    }
    let r = report(&finish(client, Duration::from_secs(180))?)?;
    let flows = cap.finish()?;
    if r["ok"].as_bool() != Some(true) || r["short_failed"].as_u64() != Some(0) {
        return Err(format!("the load saw failures: {r}"));
    }
    let wire = check_wire_allowing_unkeyed(&flows, &a, &b, false)?;
    let short_ok = r["short_ok"].as_u64().unwrap_or(0);
    let expected = 2 * (u64::from(LONG) + short_ok) as usize;
    if wire.protected_flows != expected || wire.decrypted != expected {
        return Err(format!(
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
            return Err(format!(
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
            return Err(format!(
                "node {}: failed connections in the metrics:\n{text}",
                n.spec.name
            ));
        }
        split.push(format!("node {} openssl {o} / boringssl {bs}", n.spec.name));
    }
    let status = a.ctl(&["status"])?;
    Ok(format!(
        "{switches} switches in 60 s; {LONG} long connections ({} verified pieces) and {short_ok} short ones at {SHORT_PER_SEC}/s (p50 {:.0} ms, p99 {:.0} ms): 0 failed, 0 corrupt; wire: {} flows TLS only, all decrypted; protected per provider: {}; active now {}",
        r["long_pieces"],
        r["short_p50_ms"].as_f64().unwrap_or(0.0),
        r["short_p99_ms"].as_f64().unwrap_or(0.0),
        wire.protected_flows,
        split.join(", "),
        status["active_provider"]
    ))
}

/// The key timeout of the restart scenarios. Under TCG a server process
/// held for one connection accepts nothing else meanwhile, so setups
/// queue; 5 s keeps the unaffected parts of a run free of timeouts on a
/// loaded host.
const TIMEOUT_MS: u64 = 5000;

/// Two OpenSSL nodes with the restart scenarios' key timeout.
fn restart_nodes() -> Result<(Node, Node), String> {
    let mut sa = NodeSpec::new("a");
    sa.key_timeout_ms = TIMEOUT_MS;
    let mut sb = NodeSpec::new("b");
    sb.key_timeout_ms = TIMEOUT_MS;
    Ok((Node::start(sa)?, Node::start(sb)?))
}

/// Done-when 2: `kill -9` of a provider under load. A short outage (1 s,
/// shorter than the key timeout) costs new connections only a wait; a long one
/// resets the new connections (fail-closed) and nothing else; afterwards
/// new connections are keyed again without touching the core.
pub fn provider_kill9_under_load() -> Result<String, String> {
    let (a, mut b) = restart_nodes()?;
    let core_pid_before = b.core_pid();
    let cap = Capture::start("provider-kill")?;
    let _server = LoadServer::start()?;
    let client = start_load(45)?;
    let t0 = Instant::now();
    // Outage 1: 1 s, well inside the key timeout.
    sleep_until(t0, 8);
    let short_down = t0.elapsed();
    b.kill_provider(ProviderKind::OpenSsl);
    std::thread::sleep(Duration::from_secs(1));
    b.restart_provider(ProviderKind::OpenSsl)?;
    let short_back = t0.elapsed();
    let states = b.provider_states(ProviderKind::OpenSsl, Duration::from_secs(4));
    // Outage 2: 10 s, longer than the key timeout.
    sleep_until(t0, 20);
    let long_down = t0.elapsed();
    b.kill_provider(ProviderKind::OpenSsl);
    std::thread::sleep(Duration::from_secs(10));
    b.restart_provider(ProviderKind::OpenSsl)?;
    let long_up = t0.elapsed();
    let out = finish(client, Duration::from_secs(180))?;
    let r = report(&out)?;
    // The capture sees the plain port too: its marker proves it saw the wire.
    super::wire_check::plain_control()?;
    let flows = cap.finish()?;
    if r["long_broken"].as_u64() != Some(0) || r["corrupt"].as_u64() != Some(0) {
        return Err(format!("established connections were affected: {r}"));
    }
    // Where short connections may fail: around each outage, from just
    // before the kill (handshakes running in the killed provider die with
    // it) to one key timeout plus 2 s after the restart. Connections that
    // start in that span wait for the provider, and under TCG the backlog
    // an outage leaves drains slowly: a server process held for one
    // connection accepts nothing else meanwhile (the gate stops the whole
    // process; accept-side keying starts at accept()), so some of them
    // still time out after the restart (measured and reported below; see
    // the issue notes). Outside those spans nothing may fail before the
    // second outage; after it, see below.
    let failures = r["short_failures"].as_array().cloned().unwrap_or_default();
    let slack = TIMEOUT_MS + 2000;
    let around_short = (short_down.as_millis() as u64).saturating_sub(2000)
        ..=short_back.as_millis() as u64 + slack;
    let outage =
        (long_down.as_millis() as u64).saturating_sub(1000)..=long_up.as_millis() as u64 + slack;
    let mut at_short = 0;
    let mut in_outage = 0;
    for f in &failures {
        let at = f[0].as_u64().unwrap_or(0);
        let what = f[1].as_str().unwrap_or("");
        if what.contains("CORRUPT") {
            return Err(format!("garbage delivered: {what}"));
        }
        if around_short.contains(&at) {
            at_short += 1;
        } else if outage.contains(&at) {
            in_outage += 1;
        } else if at < *outage.start() {
            return Err(format!(
                "a short connection failed at {at} ms, outside the 1 s outage's span ({around_short:?} ms) and the long one's ({outage:?} ms): {what}\nrestarted provider's states (100 ms apart): {states}\n{r}"
            ));
        }
    }
    if in_outage == 0 {
        return Err(format!(
            "a 10 s provider outage with a {TIMEOUT_MS} ms key timeout reset nothing: {r}"
        ));
    }
    let (keyed_after, after_total) = recovered(&r, *outage.end(), (3, 4), 5)
        .map_err(|e| format!("after the provider was back, {e}"))?;
    let wire = check_wire_allowing_unkeyed(&flows, &a, &b, true)?;
    if wire.plain_flows_with_marker == 0 {
        return Err("the plain control's marker was not seen: the capture is blind".into());
    }
    let text = b.metrics()?;
    if b.core_pid() != core_pid_before {
        return Err("the core was restarted".into());
    }
    if metric(&text, "tlshub_provider_up{provider=\"openssl\"}") != 1.0 {
        return Err(format!("provider not back up in the metrics:\n{text}"));
    }
    Ok(format!(
        "1 s outage: {at_short} connection(s) failed (in flight at the kill, or started within one key timeout + 2 s of the restart); 10 s outage with a {TIMEOUT_MS} ms key timeout: {in_outage} connections reset (fail-closed) in the same span; afterwards {keyed_after} of {} new connections keyed; {LONG} long connections unbroken, {} short ok, 0 corrupt; wire: {} protected flows, no plaintext, {} decrypted, {} never keyed (handshake bytes only); same core pid throughout",
        after_total, r["short_ok"], wire.protected_flows, wire.decrypted, wire.unkeyed_flows
    ))
}

/// The recovery check of the restart scenarios: of the short connections
/// started after `ms`, at least `share` (numerator, denominator) and the
/// last `last` were keyed. Returns (keyed, started).
pub(super) fn recovered(
    r: &Value,
    ms: u64,
    share: (usize, usize),
    last: usize,
) -> Result<(usize, usize), String> {
    let after: Vec<bool> = r["short_log"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter(|e| e[0].as_u64().unwrap_or(0) > ms)
                .map(|e| e[1].as_bool() == Some(true))
                .collect()
        })
        .unwrap_or_default();
    let keyed = after.iter().filter(|ok| **ok).count();
    if after.is_empty()
        || keyed * share.1 < after.len() * share.0
        || !after.iter().rev().take(last).all(|ok| *ok)
    {
        return Err(format!(
            "{keyed} of {} new connections were keyed: {r}",
            after.len()
        ));
    }
    Ok((keyed, after.len()))
}

pub(super) fn sleep_until(t0: Instant, secs: u64) {
    let at = t0 + Duration::from_secs(secs);
    std::thread::sleep(at.saturating_duration_since(Instant::now()));
}

/// `tlshubctl` as a person uses it: text output of every command, JSON of
/// every command, a refused switch to an unknown provider, a policy reload
/// (and a refused bad one), and the root-only socket.
pub fn admin_cli_and_metrics() -> Result<String, String> {
    let a = Node::start(two_providers("a", 2000))?;
    let socket = a.dir.join("admin.sock");
    let s = socket.to_string_lossy().into_owned();
    let text = |args: &[&str]| -> Result<String, String> {
        let mut argv = vec!["tlshubctl", "--socket", &s];
        argv.extend_from_slice(args);
        let out = super::process::command(None, &argv)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "{args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // Wait for the first health checks.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let st = a.ctl(&["status"])?;
        let serving = st["providers"]
            .as_array()
            .is_some_and(|p| p.iter().all(|p| p["health"] == "serving"));
        if serving {
            break;
        }
        if Instant::now() > until {
            return Err(format!("providers not serving after 10 s: {st}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = text(&["status"])?;
    for want in [
        "active provider openssl",
        "boringssl",
        "serving",
        "lsm/file_permission",
        "sockops on cgroup",
        "10.0.1.0/24",
        "ports 8443",
    ] {
        if !status.contains(want) {
            return Err(format!("`tlshubctl status` lacks {want:?}:\n{status}"));
        }
    }
    // Protected connections show in the list with provider and cipher.
    let b = Node::start(NodeSpec::new("b"))?;
    let _server = LoadServer::start()?;
    let connect = format!("{POD_B}:{PROTECTED_PORT}");
    let client = start_load_with(3, 4, 0.01)?;
    let conns = a.ctl(&["connections"])?;
    let protected: Vec<&Value> = conns["connections"]
        .as_array()
        .map(|c| c.iter().filter(|c| c["state"] == "protected").collect())
        .unwrap_or_default();
    if protected.len() < 3
        || !protected.iter().all(|c| {
            c["provider"] == "openssl" && c["cipher"] == "aes-gcm-128" && c["role"] == "client"
        })
    {
        return Err(format!("connections: {conns}"));
    }
    let listing = text(&["connections"])?;
    if !listing.contains("protected") || !listing.contains(&connect) {
        return Err(format!("`tlshubctl connections`:\n{listing}"));
    }
    let _ = finish(client, Duration::from_secs(60))?;
    drop(b);
    let Err(refused) = a.ctl(&["provider", "use", "nosuch"]) else {
        return Err("switching to an unknown provider was accepted".into());
    };
    if !refused.contains("NotFound") || !refused.contains("nosuch") {
        return Err(format!("unknown provider: {refused}"));
    }
    let used = a.ctl(&["provider", "use", "boringssl"])?;
    if used["previous"] != "openssl" || used["active"] != "boringssl" {
        return Err(format!("provider use: {used}"));
    }
    // Policy reload: a new port is applied; a broken file is refused and
    // the old policy stays.
    let cfg = a.dir.join("core.toml");
    let original = std::fs::read_to_string(&cfg).map_err(|e| e.to_string())?;
    std::fs::write(
        &cfg,
        original.replace("ports = [8443]", "ports = [8443, 8444]"),
    )
    .map_err(|e| e.to_string())?;
    let reloaded = a.ctl(&["policy", "reload"])?;
    if reloaded["policy"]["rules"][0]["ports"] != serde_json::json!([8443, 8444]) {
        return Err(format!("policy reload: {reloaded}"));
    }
    std::fs::write(&cfg, original.replace("ports = [8443]", "ports = [\"x\"]"))
        .map_err(|e| e.to_string())?;
    let bad = a.ctl(&["policy", "reload"]);
    // Put the file back before anything can fail: the node's cleanup
    // (`tlshub-core release --detach`) reads it.
    std::fs::write(&cfg, &original).map_err(|e| e.to_string())?;
    let Err(bad) = bad else {
        return Err("a broken policy file was accepted".into());
    };
    if !bad.contains("FailedPrecondition") || !bad.contains("core.toml") || !bad.contains("ports") {
        return Err(format!("a broken policy file: {bad}"));
    }
    let still = a.ctl(&["status"])?;
    if still["policy"]["rules"][0]["ports"] != serde_json::json!([8443, 8444]) {
        return Err(format!("the old policy did not stay: {still}"));
    }
    // Root only: a uid-65534 caller is turned away.
    let nobody = {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("tlshubctl")
            .args(["--socket", &s, "status"])
            .uid(65534)
            .gid(65534)
            .output()
            .map_err(|e| e.to_string())?
    };
    if nobody.status.success() {
        return Err("a non-root caller got an answer from the admin API".into());
    }
    let metrics = a.metrics()?;
    for want in [
        "tlshub_provider_up{provider=\"openssl\"} 1",
        "tlshub_provider_active{provider=\"boringssl\"} 1",
        "tlshub_provider_switches_total 1",
        "# TYPE tlshub_key_duration_seconds histogram",
        "# TYPE tlshub_gate_hold_duration_seconds histogram",
        "tlshub_gate_no_core_total 0",
    ] {
        if !metrics.contains(want) {
            return Err(format!("metrics lack {want:?}:\n{metrics}"));
        }
    }
    let help = text(&["--help"])?;
    if !help.contains("Examples:") || !help.contains("provider use") {
        return Err(format!("--help: {help}"));
    }
    Ok(format!(
        "status (text and JSON), connections, provider use (and a refused unknown name), policy reload (and a refused broken file, old policy kept), non-root refused, metrics: {} lines",
        metrics.lines().count()
    ))
}

/// Two nodes whose providers cannot talk to each other (the example PSK
/// provider, which keys without a handshake, against OpenSSL, which
/// handshakes over the connection): every connection fails closed in both
/// orders, no app receives a byte it was not sent, and no plaintext is on
/// the wire.
pub fn mismatched_providers_fail_closed() -> Result<String, String> {
    let mut sa = NodeSpec::new("a");
    sa.provider = ProviderKind::ExamplePsk;
    let a = Node::start(sa)?;
    let b = Node::start(NodeSpec::new("b"))?;
    let cap = Capture::start("mismatch")?;
    let mut seen = Vec::new();
    for mode in ["client-first", "server-first"] {
        let app = super::support::App {
            mode,
            ..super::support::App::exchange(10_000, PROTECTED_PORT)
        };
        let (s, c) = super::support::run_pair(&app, &[], Duration::from_secs(60))?;
        for (side, r) in [("server", &s), ("client", &c)] {
            if r["ok"].as_bool() == Some(true) {
                return Err(format!(
                    "{mode}: the {side} app succeeded across mismatched providers: {r}"
                ));
            }
            let err = r["error"].as_str().unwrap_or("");
            if err.contains("differs") {
                return Err(format!("{mode}: the {side} app received garbage: {r}"));
            }
            seen.push(format!("{mode} {side}: {err}"));
        }
    }
    super::wire_check::plain_control()?;
    let wire = check_wire_allowing_unkeyed(&cap.finish()?, &a, &b, true)?;
    if wire.plain_flows_with_marker == 0 {
        return Err("the plain control's marker was not seen: the capture is blind".into());
    }
    // Loud: node b's provider or core says why each connection failed.
    let provider_log =
        std::fs::read_to_string("/tmp/logs/node-b-provider-openssl.log").unwrap_or_default();
    let reasons: Vec<String> = provider_log
        .lines()
        .chain(b.core_log().lines().collect::<Vec<_>>())
        .filter(|l| {
            l.contains("key request failed")
                || l.contains("could not be keyed")
                || l.contains("keying failed")
        })
        .map(|l| {
            l.split("error=")
                .nth(1)
                .unwrap_or(l)
                .chars()
                .take(120)
                .collect()
        })
        .collect();
    if reasons.len() < 2 {
        return Err(format!(
            "node b did not log why the connections failed: {reasons:?}"
        ));
    }
    // The core's line names both providers that met: its own (the
    // connection's span) and the peer's kind (from the provider's error).
    let met = b
        .core_log()
        .lines()
        .find(|l| {
            (l.contains("could not be keyed") || l.contains("keying failed"))
                && l.contains("provider=openssl")
                && l.contains("key-only provider")
        })
        .map(String::from)
        .ok_or_else(|| {
            format!(
                "node b's core never said which providers met:\n{}",
                b.core_log()
            )
        })?;
    let reset_b = metric(&b.metrics()?, "tlshub_connections_reset_total");
    let why = reasons.join(" | ");
    Ok(format!(
        "{}; wire: {} protected flows, no plaintext; node b reset {reset_b}; logged: {why}; node b's core: {}",
        seen.join("; "),
        wire.protected_flows,
        met.split("conn{").nth(1).unwrap_or(&met)
    ))
}

/// Done-when 3: `kill -9` of the core under load. The programs and maps are
/// pinned, so the gate keeps holding while no core runs; the restarted core
/// adopts the connections opened meanwhile from the pinned maps and keys
/// them. Established connections are untouched, nothing leaves in clear.
pub fn core_kill9_under_load() -> Result<String, String> {
    let (a, mut b) = restart_nodes()?;
    let cap = Capture::start("core-kill")?;
    let _server = LoadServer::start()?;
    let client = start_load(35)?;
    let t0 = Instant::now();
    sleep_until(t0, 8);
    let down = t0.elapsed();
    b.kill_core();
    // Connections opened while the core is down, each by its own client
    // process: the load's client cannot be relied on for these, because
    // the gate stops the whole process while any of its connections waits
    // for keys, and one that was being keyed at the kill waits for the
    // core's return, so its scheduler may open nothing in the gap.
    let mut while_down = Vec::new();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(500));
        while_down.push(start_load_with(0, 1, 1.0)?);
    }
    std::thread::sleep(Duration::from_millis(500));
    b.restart_core("restarted")?;
    let up = t0.elapsed();
    let r = report(&finish(client, Duration::from_secs(180))?)?;
    let opened_down = while_down.len();
    for (i, c) in while_down.into_iter().enumerate() {
        let one = report(&finish(c, Duration::from_secs(60))?)?;
        if one["short_ok"].as_u64() != Some(1) || one["corrupt"].as_u64() != Some(0) {
            return Err(format!(
                "connection {i} opened while the core was down was not keyed after it returned at {up:?}: {one}"
            ));
        }
    }
    // The capture sees the plain port too: its marker proves it saw the wire.
    super::wire_check::plain_control()?;
    let flows = cap.finish()?;
    if r["long_broken"].as_u64() != Some(0) || r["corrupt"].as_u64() != Some(0) {
        return Err(format!("established connections were affected: {r}"));
    }
    let log = std::fs::read_to_string("/tmp/logs/node-b-core-restarted.log").unwrap_or_default();
    let adopted = log
        .lines()
        .find(|l| l.contains("adopted the connections of the previous core"))
        .ok_or_else(|| format!("the restarted core did not adopt anything:\n{log}"))?;
    // Connections started while the core was down (and up to one key
    // timeout + 2 s after, as in the provider case) may fail; outside that
    // span nothing may, and those started while it was down must mostly be
    // keyed after it returned.
    let span =
        (down.as_millis() as u64).saturating_sub(2000)..=up.as_millis() as u64 + TIMEOUT_MS + 2000;
    let mut in_span = 0;
    let mut span_failures = Vec::new();
    for f in r["short_failures"].as_array().cloned().unwrap_or_default() {
        let at = f[0].as_u64().unwrap_or(0);
        let what = f[1].as_str().unwrap_or("");
        if what.contains("CORRUPT") || at < *span.start() {
            return Err(format!(
                "a short connection failed at {at} ms, before the core was killed at {down:?}: {what}\n{r}"
            ));
        }
        if span.contains(&at) {
            in_span += 1;
            span_failures.push(format!("{at} ms: {what}"));
        }
    }
    let (keyed_later, after_total) =
        recovered(&r, *span.end(), (9, 10), 3).map_err(|e| format!("after the restart, {e}"))?;
    let wire = check_wire_allowing_unkeyed(&flows, &a, &b, true)?;
    if wire.plain_flows_with_marker == 0 {
        return Err("the plain control's marker was not seen: the capture is blind".into());
    }
    Ok(format!(
        "core B killed at {:.1} s, restarted at {:.1} s ({}); {LONG} long connections unbroken, 0 corrupt; all {opened_down} connections opened while it was down (one client process each) keyed after it returned; {in_span} short failures in the restart span [{}], afterwards {keyed_later} of {} keyed; wire: {} protected flows, no plaintext, {} decrypted",
        down.as_secs_f64(),
        up.as_secs_f64(),
        adopted.split("INFO").nth(1).unwrap_or(adopted).trim(),
        span_failures.join("; "),
        after_total,
        wire.protected_flows,
        wire.decrypted
    ))
}

/// A `tlshub-testapp` server in pod-b for one client-first exchange of
/// 1,000 bytes on the protected port, listening.
pub(super) fn exchange_server() -> Result<AppChild, String> {
    let listen = format!("0.0.0.0:{PROTECTED_PORT}");
    spawn_ready(
        "pod-b",
        &[
            "tlshub-testapp",
            "server",
            "--listen",
            &listen,
            "--mode",
            "client-first",
            "--size",
            "1000",
        ],
        "listening",
        Duration::from_secs(10),
    )
}

/// The client of [`exchange_server`], in pod-a (started, not waited for).
pub(super) fn exchange_client() -> Result<AppChild, String> {
    super::support::spawn_client(
        PROTECTED_PORT,
        &["--mode", "client-first", "--size", "1000"],
    )
}

/// If the core does not come back: `tlshub-core release` resets the
/// connections waiting for keys and continues the processes the gate
/// stopped; afterwards the gate, still attached, fails new selected
/// connections' calls at once (fail-closed) instead of stopping anyone.
pub fn core_gone_release() -> Result<String, String> {
    let a = Node::start(NodeSpec::new("a"))?;
    let mut b = Node::start(NodeSpec::new("b"))?;
    let cap = Capture::start("core-gone")?;
    b.kill_core();
    let server = exchange_server()?;
    let server_pid = server.id();
    let client = exchange_client()?;
    // With no core, the server's first read is held (within the grace).
    let until = Instant::now() + Duration::from_secs(10);
    while crate::vm::process::state(server_pid) != Some('T') {
        if Instant::now() > until {
            return Err("the server app was never held while the core was down".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let released = b.release(false)?;
    let s = report(&finish(server, Duration::from_secs(20))?)?;
    let c = report(&finish(client, Duration::from_secs(20))?)?;
    // ECONNRESET, or EPIPE for a client that writes after the reset.
    for (side, v) in [("server", &s), ("client", &c)] {
        if v["ok"].as_bool() == Some(true) || !matches!(v["errno"].as_i64(), Some(104 | 32)) {
            return Err(format!(
                "{side} after release: {v} (release said: {released})"
            ));
        }
    }
    // A new connection after the release: refused at once, nobody stopped.
    let server = exchange_server()?;
    let started = Instant::now();
    let client = exchange_client()?;
    let s2 = report(&finish(server, Duration::from_secs(20))?)?;
    let took = started.elapsed();
    let c2 = report(&finish(client, Duration::from_secs(20))?)?;
    if s2["ok"].as_bool() == Some(true) || s2["errno"].as_i64() != Some(104) {
        return Err(format!("server after release: {s2}"));
    }
    super::wire_check::plain_control()?;
    let wire = check_wire_allowing_unkeyed(&cap.finish()?, &a, &b, true)?;
    if wire.plain_flows_with_marker == 0 {
        return Err("the plain control's marker was not seen: the capture is blind".into());
    }
    Ok(format!(
        "held server continued by release ({}); both apps got ECONNRESET/EPIPE; a new connection afterwards failed in {:.1} s without a stop (server errno 104, client {}); wire: {} protected flows, no plaintext",
        released.trim(),
        took.as_secs_f64(),
        c2["errno"],
        wire.protected_flows
    ))
}
