//! What the wire and the kernel show: `tls_stat` counters, the capture
//! between the nodes, and the checks that protected flows are TLS only and
//! decrypt while unselected ones stay plain.

use crate::app_report::AppReport;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tlshub_bench_report::console::WireTally;
use tlshub_provider_sdk::keylog::KeyLogRecord;

use super::node::{Node, PLAIN_PORT, PROTECTED_PORT};
use super::process::{self, Proc};
use super::support::*;
use super::topology::{POD_B, WIRE_IF};
use crate::failed;
use crate::pattern::{CLIENT_SEED, MARKER, SERVER_SEED};
use crate::vm::outcome::Failure;
use crate::wire;

/// `TcpExt` counter `name` of network namespace `netns` (/proc/net/netstat;
/// 0 if it cannot be read).
pub fn tcp_ext(netns: &str, name: &str) -> u64 {
    let text = process::run(Some(netns), &["cat", "/proc/net/netstat"]).unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// `/proc/net/tls_stat` of the given network namespaces (the counters are
/// per namespace), summed.
pub fn tls_stat(namespaces: &[&str]) -> HashMap<String, u64> {
    let texts: Vec<String> = namespaces
        .iter()
        .map(|ns| process::run(Some(ns), &["cat", "/proc/net/tls_stat"]).unwrap_or_default())
        .collect();
    tlshub_admin::tls_stat::sum(texts.iter().map(String::as_str))
        .into_iter()
        .collect()
}

/// Runs `body` and checks that exactly `sockets` kTLS sockets got TX and RX
/// meanwhile (`tls_stat` of both pods; both ends of a connection are in
/// this one kernel, so a protected connection counts twice).
pub fn with_ktls_sockets<T>(
    sockets: u64,
    body: impl FnOnce() -> Result<T, Failure>,
) -> Result<T, Failure> {
    let before = tls_stat(&["pod-a", "pod-b"]);
    let out = body()?;
    let after = tls_stat(&["pod-a", "pod-b"]);
    let delta = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    if delta("TlsTxSw") != sockets || delta("TlsRxSw") != sockets {
        return Err(failed!(
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
    pub fn start(name: &str) -> Result<Self, Failure> {
        Self::start_on(name, WIRE_IF)
    }

    /// Starts capturing TCP on interface `iface` of `node-a`.
    pub fn start_on(name: &str, iface: &str) -> Result<Self, Failure> {
        let path = format!("/tmp/{name}.pcap");
        let _ = std::fs::remove_file(&path);
        std::fs::create_dir_all("/tmp/logs").map_err(|e| e.to_string())?;
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
    pub fn finish(mut self) -> Result<Vec<wire::Flow>, Failure> {
        std::thread::sleep(Duration::from_millis(300));
        self.proc.signal(2);
        let _ = self.proc.wait(Duration::from_secs(10));
        let log = process::tail(&self.proc.log);
        match wire::capture_drops(&log) {
            Ok(0) => {}
            Ok(n) => return Err(Failure::Wire(format!("tcpdump dropped {n} packets: {log}"))),
            Err(e) => {
                return Err(Failure::Wire(format!(
                    "{e} (the capture may be incomplete)"
                )));
            }
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

/// What the wire checks found since the runner last took it (a scenario's
/// worker threads may check captures of their own, so it is shared).
static TALLY: Mutex<Option<WireTally>> = Mutex::new(None);

/// What every wire check that passed found since the last call, for the
/// scenario's result line; `None` if nothing was checked.
pub fn take_tally() -> Option<WireTally> {
    TALLY.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// Why a scenario's wire checks, taken together, prove nothing: protected
/// flows were checked but no plain control in any of its captures showed
/// the marker, so a blind capture (a wrong interface, a filter, a capture
/// stopped early) would have passed them all.
pub fn blind(tally: &WireTally) -> Option<Failure> {
    (tally.protected > 0 && tally.controls == 0).then(|| {
        Failure::Wire(format!(
            "{} protected flows checked, but no plain control showed the marker in any capture: the checks may have been blind",
            tally.protected
        ))
    })
}

/// Adds a passed check's findings to [`TALLY`].
fn record(r: &WireReport) {
    let count = |n: usize| n as u64;
    TALLY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(WireTally::default)
        .add(WireTally {
            protected: count(r.protected_flows),
            decrypted: count(r.decrypted),
            unkeyed: count(r.unkeyed_flows),
            handshake_only: count(r.handshake_only),
            controls: count(r.plain_flows_with_marker),
        });
}

/// Flows on `port` (either end) that carry the marker in clear.
pub fn plain_flows_on(flows: &[wire::Flow], port: u16) -> usize {
    flows
        .iter()
        .filter(|f| f.src.port() == port || f.dst.port() == port)
        .filter(|f| wire::contains(&f.bytes, MARKER))
        .count()
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
    /// Protected flows keyed on both ends whose records decrypted to no
    /// application bytes: a provider's handshake, and the app sent nothing
    /// that way.
    pub handshake_only: usize,
    /// io_uring requests that completed with `EINTR` (the gate's hold)
    /// and were submitted again, summed over the apps' reports
    /// (`captured_exchanges` only).
    pub uring_interrupted: u64,
}

impl WireReport {
    /// Fails unless at least `controls` unselected flows showed the marker
    /// in clear and at least `decrypted` protected flows decrypted. With
    /// fewer markers the capture was blind (it saw no plaintext where there
    /// was some), so that it saw none on the protected flows proves
    /// nothing.
    pub fn expect_at_least(&self, controls: usize, decrypted: usize) -> Result<(), Failure> {
        if self.plain_flows_with_marker < controls || self.decrypted < decrypted {
            return Err(Failure::Wire(format!(
                "{} unselected flows showed the marker and {} protected flows decrypted, want at least {controls} and {decrypted} (fewer markers: the capture is blind): {self:?}",
                self.plain_flows_with_marker, self.decrypted
            )));
        }
        Ok(())
    }
}

/// Checks every flow: protected ones carry only TLS records, no marker,
/// and decrypt (with the keys the sender's core exported, which must equal
/// the receiver core's) into the apps' pattern; unselected ones are plain.
pub fn check_wire(flows: &[wire::Flow], a: &Node, b: &Node) -> Result<WireReport, Failure> {
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
) -> Result<WireReport, Failure> {
    let keys: Vec<KeyLogRecord> = a.keys().into_iter().chain(b.keys()).collect();
    check_wire_with_keys(flows, &keys, unkeyed_ok)
}

/// [`check_wire_allowing_unkeyed`] with the key records of both cores
/// given directly (for a core the test bed did not start).
pub fn check_wire_with_keys(
    flows: &[wire::Flow],
    keys: &[KeyLogRecord],
    unkeyed_ok: bool,
) -> Result<WireReport, Failure> {
    let find = |local: &std::net::SocketAddr, remote: &std::net::SocketAddr| {
        keys.iter()
            .find(|k| k.local == *local && k.remote == *remote)
    };
    let find_all = |local: &std::net::SocketAddr, remote: &std::net::SocketAddr| {
        keys.iter()
            .filter(|k| k.local == *local && k.remote == *remote)
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
            return Err(Failure::Plaintext(format!(
                "{} -> {} carries the marker",
                f.src, f.dst
            )));
        }
        if unkeyed_ok && (find(&f.src, &f.dst).is_none() || find(&f.dst, &f.src).is_none()) {
            match find(&f.src, &f.dst) {
                // Keyed on the sending side only: what it sent must be
                // records under its keys, decrypting to the app's bytes.
                Some(sender) if f.bytes.first() == Some(&0x17) => {
                    let plain = wire::decrypt_application_data(
                        &f.bytes,
                        &sender.suite,
                        &sender.tx_key,
                        &sender.tx_iv,
                    )
                    .map_err(|e| {
                        Failure::Wire(format!("{} -> {} (sender keyed only): {e}", f.src, f.dst))
                    })?;
                    check_app_bytes(f, &plain, " (sender keyed only)")?;
                }
                // Otherwise a provider's TLS handshake record (0x16) or
                // alert (0x15) starts it.
                _ if matches!(f.bytes.first(), Some(0x15 | 0x16)) => {}
                _ => {
                    return Err(Failure::Wire(format!(
                        "{} -> {}: never keyed on both ends, yet carries {} bytes that are neither records under the sender's keys nor a TLS handshake",
                        f.src,
                        f.dst,
                        f.bytes.len()
                    )));
                }
            }
            r.unkeyed_flows += 1;
            continue;
        }
        wire::tls_records(&f.bytes).map_err(|e| {
            Failure::Wire(format!(
                "{} -> {}: not TLS: {e} ({} bytes captured; tcpdump: {})",
                f.src,
                f.dst,
                f.bytes.len(),
                f.capture_log
            ))
        })?;
        // A 4-tuple can carry several connections in one capture (a reset
        // one leaves no TIME_WAIT): the sender's key is the one of its
        // records under which this flow decrypts.
        let senders = find_all(&f.src, &f.dst);
        if senders.is_empty() {
            return Err(Failure::Wire(format!(
                "{} -> {}: no exported key for the sender",
                f.src, f.dst
            )));
        }
        let mut decrypted = Err(Failure::Wire(String::new()));
        for sender in &senders {
            decrypted = wire::decrypt_application_data(
                &f.bytes,
                &sender.suite,
                &sender.tx_key,
                &sender.tx_iv,
            )
            .map(|plain| (plain, *sender))
            .map_err(|e| Failure::Wire(format!("{} -> {}: {e}", f.src, f.dst)));
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
        let receiver_agrees = find_all(&f.dst, &f.src)
            .iter()
            .any(|receiver| sender.tx_key == receiver.rx_key && sender.tx_iv == receiver.rx_iv);
        if !receiver_agrees {
            if !unkeyed_ok {
                return Err(Failure::Wire(format!(
                    "{} -> {}: no key of the receiver matches the sender's (the two nodes' providers reported different keys)",
                    f.src, f.dst
                )));
            }
            // Keyed on the sending side only, as above, on a 4-tuple whose
            // receiver keys belong to an earlier connection (ports are
            // reused): a core killed while its provider finished the
            // handshake never installed this side, and its successor
            // reset the connection. The sender's records must still
            // decrypt to the app's bytes.
            check_app_bytes(f, &plain, " (sender keyed only)")?;
            r.unkeyed_flows += 1;
            continue;
        }
        if plain.is_empty() {
            r.handshake_only += 1;
            continue;
        }
        check_app_bytes(f, &plain, "")?;
        r.decrypted += 1;
        r.plaintext_bytes += plain.len();
    }
    record(&r);
    Ok(r)
}

/// Checks that `plain`, decrypted from flow `f`, is what its app sends from
/// offset 0: the client's pattern toward the protected port, the server's
/// back. `how` tags the error with how the flow was keyed.
fn check_app_bytes(f: &wire::Flow, plain: &[u8], how: &str) -> Result<(), Failure> {
    let seed = if f.dst.port() == PROTECTED_PORT {
        CLIENT_SEED
    } else {
        SERVER_SEED
    };
    crate::pattern::check(seed, 0, plain).map_err(|at| {
        Failure::Wire(format!(
            "{} -> {}{how}: decrypted byte {at} is not what the app sent",
            f.src, f.dst
        ))
    })
}

/// Runs `apps` one after another under a capture of the wire, each exact
/// both ways, then checks the wire: every flow of a protected app is TLS
/// only and decrypts to the apps' bytes (two flows per protected app), and
/// an unselected one showed the marker. Without an app on the plain port in
/// `apps`, a plain exchange in the same address family as the first app is
/// added as that control.
pub fn captured_exchanges(
    name: &str,
    a: &Node,
    b: &Node,
    apps: &[App],
) -> Result<WireReport, Failure> {
    captured_exchanges_on(name, WIRE_IF, a, b, apps)
}

/// [`captured_exchanges`] with the capture on interface `iface` of
/// `node-a`.
pub fn captured_exchanges_on(
    name: &str,
    iface: &str,
    a: &Node,
    b: &Node,
    apps: &[App],
) -> Result<WireReport, Failure> {
    captured_exchanges_checked(name, iface, a, b, apps, |_, _| Ok(()))
}

/// [`captured_exchanges_on`], with `check` judging each app's server and
/// client reports besides their bytes.
pub fn captured_exchanges_checked(
    name: &str,
    iface: &str,
    a: &Node,
    b: &Node,
    apps: &[App],
    check: impl Fn(&AppReport, &AppReport) -> Result<(), Failure>,
) -> Result<WireReport, Failure> {
    let cap = Capture::start_on(name, iface)?;
    let mut uring_interrupted = 0;
    for app in apps {
        let (s, c) = run_pair(app, &[], Duration::from_secs(60))?;
        both_ok(app, &s, &c)?;
        check(&s, &c).map_err(|e| e.context(format!("{app:?}")))?;
        uring_interrupted += [&s, &c].iter().map(|r| r.uring_interrupted).sum::<u64>();
    }
    if !apps.iter().any(|app| app.port == PLAIN_PORT) {
        plain_control_to(apps.first().map_or(POD_B, |app| app.server))?;
    }
    let mut report = check_wire_with_control(&cap.finish()?, a, b)?;
    report.uring_interrupted = uring_interrupted;
    let protected: usize = apps
        .iter()
        .filter(|app| app.port == PROTECTED_PORT)
        .map(|app| app.connections as usize)
        .sum();
    if report.protected_flows != 2 * protected || report.decrypted != 2 * protected {
        return Err(Failure::Wire(format!(
            "{protected} protected connections but {report:?}"
        )));
    }
    Ok(report)
}

/// A plain exchange under the same capture: its marker must be seen, or
/// the capture proves nothing about the protected flows.
pub fn plain_control() -> Result<(), Failure> {
    plain_control_to(POD_B)
}

/// [`plain_control`] to the server address `server` (in pod-b; an IPv6
/// one makes an IPv6 control).
pub fn plain_control_to(server: &'static str) -> Result<(), Failure> {
    let app = App {
        server,
        ..App::exchange(1000, PLAIN_PORT)
    };
    let (s, c) = run_pair(&app, &[], Duration::from_secs(30))?;
    both_ok(&app, &s, &c).map_err(|e| e.context("the plain control"))
}

/// [`check_wire`] plus the control's marker.
pub fn check_wire_with_control(
    flows: &[wire::Flow],
    a: &Node,
    b: &Node,
) -> Result<WireReport, Failure> {
    let report = check_wire(flows, a, b)?;
    report.expect_at_least(1, 0)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::{WireReport, WireTally, blind};

    #[test]
    fn protected_flows_checked_without_any_control_are_blind() {
        let tally = |protected, controls| WireTally {
            protected,
            decrypted: protected,
            controls,
            ..WireTally::default()
        };
        assert!(blind(&tally(4, 0)).is_some());
        assert!(blind(&tally(4, 1)).is_none());
        // Nothing protected checked (a fail-closed case's empty capture is
        // judged by its own expectations): nothing to call blind.
        assert!(blind(&tally(0, 0)).is_none());
    }

    #[test]
    fn a_blind_capture_or_too_few_decrypted_flows_fail_the_wire_expectation() {
        let seen = |markers, decrypted| WireReport {
            plain_flows_with_marker: markers,
            decrypted,
            ..WireReport::default()
        };
        assert!(seen(2, 3).expect_at_least(2, 3).is_ok());
        assert!(seen(1, 0).expect_at_least(1, 0).is_ok());
        // No plaintext seen where a control sent some: blind.
        assert!(seen(0, 3).expect_at_least(1, 3).is_err());
        assert!(seen(2, 3).expect_at_least(3, 0).is_err());
        assert!(seen(1, 2).expect_at_least(1, 3).is_err());
    }
}
