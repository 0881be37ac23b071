//! The gate at the end of a connection: a half-close before the keys,
//! and `shutdown()` after them while kTLS still holds records (unsent
//! ones, or an open record filled with `MSG_MORE`).

use std::time::Duration;

use crate::failed;
use crate::vm::outcome::{Failure, Outcome};

use super::node::{NodeSpec, PLAIN_PORT, PROTECTED_PORT, ProviderKind};
use super::support::{App, PodSetting, both_ok, nodes, nodes_with_provider, run_pair};
use super::wire_check::{Capture, captured_exchanges, check_wire};

/// A client that writes its request and half-closes at once
/// (`shutdown(SHUT_WR)`, like `nc -N` or an HTTP/1.0 client), and a server
/// that reads to EOF and then answers. Two races meet here: the client's
/// FIN must not leave before its keys (it would end the handshake), and
/// the FIN must not reach the server's socket before the server's keys are
/// in (a socket in CLOSE_WAIT cannot take the `tls` ULP: `ENOTCONN`, and
/// the connection would be reset with the answer lost). Run with a
/// handshake provider (OpenSSL: the client side is keyed first, so its
/// FIN races the server's install) and a key-only one (TLSHub).
pub fn half_close() -> Outcome {
    let mut summary = Vec::new();
    for provider in [ProviderKind::OpenSsl, ProviderKind::TlsHub] {
        let (a, b) = nodes_with_provider(provider)?;
        let half = |size, connections, io| App {
            mode: "half-close",
            connections,
            io,
            ..App::exchange(size, PROTECTED_PORT)
        };
        let apps = [
            half(4096, 20, "blocking"),
            half(1 << 20, 2, "epoll"),
            // The control: unselected, so its marker must be seen in clear.
            App {
                mode: "half-close",
                ..App::exchange(10_000, PLAIN_PORT)
            },
        ];
        let report = captured_exchanges(&format!("half-close-{provider:?}"), &a, &b, &apps)?;
        report.expect_at_least(1, 0)?;
        // shutdown() before any byte: held until keys like a send (else
        // its FIN would end the handshake a handshake provider runs on the
        // socket). No app bytes, so judged by the cores' counts. Only with
        // a handshake provider: with a key-only one nothing precedes such
        // a client's FIN, which the server side lets through (a bare FIN
        // at the start of the stream; see ARCHITECTURE.md), so it may be
        // reset.
        let empty_ones = if provider == ProviderKind::OpenSsl {
            5
        } else {
            0
        };
        let before = [
            a.stat_reaching(|s| s.protected, 22),
            b.stat_reaching(|s| s.protected, 22),
        ];
        if empty_ones > 0 {
            let empty = half(0, empty_ones, "blocking");
            let (s, c) = run_pair(&empty, &[], Duration::from_secs(60))?;
            both_ok(&empty, &s, &c)?;
        }
        let want = u64::from(empty_ones);
        let after = [
            a.stat_reaching(|s| s.protected, before[0] + want),
            b.stat_reaching(|s| s.protected, before[1] + want),
        ];
        if after[0] < before[0] + want || after[1] < before[1] + want {
            return Err(failed!(
                "{provider:?}: {empty_ones} connections shut down before keys, protected a {}..{} b {}..{}",
                before[0],
                after[0],
                before[1],
                after[1]
            ));
        }
        let fins = [a.stat(|s| s.fin_deferred), b.stat(|s| s.fin_deferred)];
        summary.push(format!(
            "{provider:?}: 22 connections exact, {} flows decrypted, {empty_ones} shut down before keys all keyed, FINs deferred a {} b {}",
            report.decrypted, fins[0], fins[1]
        ));
    }
    Ok(summary.join("; "))
}

/// pod-a's link sends segments of at most 4 KiB (`gso_max_size`; the
/// default is 64 KiB) until dropped, so a kTLS record spans several and
/// TCP checks for room in the middle of one.
fn small_segments_from_pod_a() -> Result<PodSetting, Failure> {
    PodSetting::command(
        "pod-a",
        &["ip", "link", "set", "pa", "gso_max_size", "4096"],
        &["ip", "link", "set", "pa", "gso_max_size", "65536"],
    )
}

/// Runs `control` (an exchange with kTLS installed by the apps
/// themselves, `--ktls-fixed-key`, no agent) and says how kTLS alone
/// fared: the shutdown scenarios report it, they do not require it.
fn ktls_alone(control: &App, limit: Duration) -> Result<String, Failure> {
    let (s, c) = run_pair(control, &[], limit)?;
    Ok(if s.ok && c.ok {
        format!(
            "kTLS alone (fixed key, no agent) lost nothing in {} connections",
            control.connections
        )
    } else {
        format!(
            "kTLS alone (fixed key, no agent) failed after {} exact connections: the server got \"{}\", the client \"{}\"",
            s.connections,
            s.error.as_deref().unwrap_or(""),
            c.error.as_deref().unwrap_or("")
        )
    })
}

/// Non-blocking clients that write 4 MiB each and half-close at once,
/// after their keys are in. kTLS takes a write as soon as it has
/// encrypted the record; a record TCP has no room for waits in kTLS's own
/// queue until TCP's buffer drains, and Linux's `shutdown()` queues the
/// FIN behind what TCP holds, not behind kTLS's queue: the FIN overtakes
/// the record, kTLS fails the connection with `EPIPE` when it pushes it,
/// and the peer reads a short stream. The gate holds such a `shutdown()`
/// until the records are in TCP (ARCHITECTURE.md, "The gate").
///
/// TCP checks for room only when it starts a new segment, so a record is
/// left partly unsent when it spans segments while TCP is full. Here:
/// pod-a's link sends small segments (`gso_max_size` 4 KiB),
/// `tcp_notsent_lowat` = 16 KiB in pod-a (a common tuning, also set per
/// socket by HTTP/2 servers) counts TCP full once a record's worth waits,
/// and pod-b's small receive buffer keeps data waiting. The same exchange
/// with kTLS installed by the apps themselves (fixed key, no agent) is
/// the control: it shows whether this kernel loses the record without
/// the gate (reported, not required).
pub fn shutdown_after_full_send_buffer() -> Outcome {
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let _lowat = PodSetting::sysctl("pod-a", "net/ipv4/tcp_notsent_lowat", "16384")?;
    let _small_segments = small_segments_from_pod_a()?;
    let _slow_reader = PodSetting::sysctl("pod-b", "net/ipv4/tcp_rmem", "4096 32768 32768")?;
    let app = |port, ktls_fixed_key| App {
        mode: "half-close",
        io: "epoll",
        connections: 10,
        ktls_fixed_key,
        ..App::exchange(4 << 20, port)
    };
    let control = ktls_alone(&app(PLAIN_PORT, true), Duration::from_secs(120))?;
    // About one connection in five leaves a record behind here, so the
    // rounds go on (up to 4 of 10 connections each) until a shutdown() was
    // held. Captured on the node link, with a plain exchange as the
    // capture's control: every protected flow must carry only TLS records
    // that decrypt to the apps' bytes.
    let protected = app(PROTECTED_PORT, false);
    let before = a.stat(|s| s.unsent_holds);
    let cap = Capture::start("shutdown-after-full-send-buffer")?;
    let plain = App::exchange(10_000, PLAIN_PORT);
    let (s, c) = run_pair(&plain, &[], Duration::from_secs(60))?;
    both_ok(&plain, &s, &c)?;
    let mut rounds = 0;
    let mut holds = 0;
    while rounds < 4 && holds == 0 {
        rounds += 1;
        let (s, c) = run_pair(&protected, &[], Duration::from_secs(120))?;
        both_ok(&protected, &s, &c)?;
        holds = a.stat_reaching(|s| s.unsent_holds, before + 1) - before;
    }
    let report = check_wire(&cap.finish()?, &a, &b)?;
    let expired = a.stat(|s| s.unsent_expired);
    if expired > 0 {
        return Err(failed!(
            "{expired} shutdown() hold(s) expired although pod-b reads everything"
        ));
    }
    if holds == 0 {
        return Err(failed!(
            "40 connections exact but no shutdown() was held for unsent records: the scenario no longer makes kTLS leave records behind ({control})"
        ));
    }
    let connections = rounds * 10;
    report.expect_at_least(1, 0)?;
    if report.protected_flows != 2 * connections || report.decrypted != 2 * connections {
        return Err(failed!(
            "{connections} protected connections but {report:?}"
        ));
    }
    Ok(format!(
        "{connections} protected connections of 4 MiB each way exact, {holds} shutdown() hold(s) for kTLS's unsent records, {} flows TLS-only and decrypted; {control}",
        report.decrypted
    ))
}

/// Apps that cork every write with `MSG_MORE` and leave the flush to
/// their `shutdown()` (`--send send-more`, half-close both ways): TCP
/// sends what waits when the FIN goes. kTLS keeps such bytes in its open
/// record, which only a write without `MSG_MORE` closes; a FIN does not,
/// so the peer would read a short stream. The gate holds such a
/// `shutdown()` and the core closes the open record first
/// (ARCHITECTURE.md, "The gate"). Sizes: 4 KiB (all of it in the open
/// record), 100,000 bytes (six full records and an open one), and
/// exactly 16 KiB (one full record, which kTLS sends by itself: nothing
/// to hold). The same exchange with kTLS installed by the apps themselves
/// is the control (reported, not required).
pub fn shutdown_after_more_writes() -> Outcome {
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let app = |size, io, port, ktls_fixed_key| App {
        mode: "half-close",
        send: "send-more",
        io,
        connections: 4,
        ktls_fixed_key,
        ..App::exchange(size, port)
    };
    let control = ktls_alone(
        &app(10_000, "blocking", PLAIN_PORT, true),
        Duration::from_secs(60),
    )?;
    let apps = [
        app(4096, "blocking", PROTECTED_PORT, false),
        app(100_000, "epoll", PROTECTED_PORT, false),
        app(16_384, "blocking", PROTECTED_PORT, false),
        // The control: unselected, so its marker must be seen in clear.
        app(10_000, "blocking", PLAIN_PORT, false),
    ];
    let before = [
        a.stat(|s| s.open_record_holds),
        b.stat(|s| s.open_record_holds),
    ];
    let report = captured_exchanges("shutdown-after-more-writes", &a, &b, &apps)?;
    report.expect_at_least(1, 0)?;
    // Each end of the 8 connections whose last record was open at its
    // shutdown() was held at least once (again if the restarted call came
    // before the core had closed the record).
    let holds = [
        a.stat_reaching(|s| s.open_record_holds, before[0] + 8) - before[0],
        b.stat_reaching(|s| s.open_record_holds, before[1] + 8) - before[1],
    ];
    if holds.iter().any(|&h| h < 8) {
        return Err(failed!(
            "shutdown() holds for an open record: a {} b {}, want at least 8 on each (control: {control})",
            holds[0],
            holds[1]
        ));
    }
    let expired = [a.stat(|s| s.unsent_expired), b.stat(|s| s.unsent_expired)];
    if expired != [0, 0] {
        return Err(failed!(
            "shutdown() holds expired (a {}, b {}) although both ends read everything",
            expired[0],
            expired[1]
        ));
    }
    Ok(format!(
        "12 protected connections corked with MSG_MORE and half-closed both ways exact, {} flows decrypted; shutdown() holds for an open record a {} b {}; {control}",
        report.decrypted, holds[0], holds[1]
    ))
}

/// The bound on that hold: a client fills its socket towards a server
/// that reads nothing for 12 s until no write succeeds for a second, and
/// half-closes (`tlshub-testapp --mode fill-half-close`). kTLS's last
/// record cannot reach TCP while the peer's window is closed, so the
/// `shutdown()` is held, and after 5 s (`TLSHUB_UNSENT_HOLD_MAX_MS`) it
/// must pass: a peer that stops reading must not keep the app stopped.
/// Small segments,
/// `tcp_notsent_lowat` = 4 KiB in pod-a and an 8 KiB receive buffer in
/// pod-b make the last record span TCP's limit.
pub fn shutdown_hold_is_bounded() -> Outcome {
    let (a, _b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let _lowat = PodSetting::sysctl("pod-a", "net/ipv4/tcp_notsent_lowat", "4096")?;
    let _small_segments = small_segments_from_pod_a()?;
    let _small_window = PodSetting::sysctl("pod-b", "net/ipv4/tcp_rmem", "4096 8192 8192")?;
    let app = App {
        mode: "fill-half-close",
        ..App::exchange(1, PROTECTED_PORT)
    };
    let before = [a.stat(|s| s.unsent_holds), a.stat(|s| s.unsent_expired)];
    let (_s, c) = run_pair(&app, &[], Duration::from_secs(120))?;
    if !c.ok {
        return Err(failed!("the client failed: {c}"));
    }
    let ms = c.shutdown_ms.unwrap_or(0);
    let expired = a.stat_reaching(|s| s.unsent_expired, before[1] + 1) - before[1];
    let holds = a.stat(|s| s.unsent_holds) - before[0];
    if expired != 1 || !(5_000..11_000).contains(&ms) {
        return Err(failed!(
            "shutdown() took {ms} ms with {holds} hold(s) and {expired} expired; want one expiry after 5 to 11 s (client {c})"
        ));
    }
    Ok(format!(
        "{} bytes written to a peer that reads nothing; shutdown() held {ms} ms ({holds} stops), then let through and counted expired",
        c.bytes_sent
    ))
}
