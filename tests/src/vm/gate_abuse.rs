//! No app can get around the gate or wedge the node with numbers: a pid
//! reused after an exempt provider, a flood of events from one socket, a
//! core too far behind to record a hold. What one app can cost the
//! node's shared capacity is in `gate_capacity`.

use std::time::Duration;

use super::node::{NodeSpec, PLAIN_PORT, PROTECTED_PORT, ProviderKind};
use super::process;
use super::support::{App, both_ok, nodes, run_pair};
use super::wire_check::Capture;
use crate::failed;
use crate::vm::outcome::Outcome;

/// An exemption names a process, not a pid: a process that gets the pid of
/// an exited provider is held like any other. Node A's provider is killed
/// (its pid stays in the core's exempt map until another provider
/// connects); a client started with exactly that pid (through
/// `/proc/sys/kernel/ns_last_pid`) sends the marker to the protected port.
/// It must be held (the provider is gone, so fail-closed resets it at the
/// key timeout) and the wire must not carry its bytes; a plain control
/// connection in the same capture must.
pub fn exempt_pid_reuse() -> Outcome {
    use super::support::{app_report, pod_b_addr};
    let (mut a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let provider_pid = a.provider_pid(ProviderKind::OpenSsl);
    if provider_pid < 2 {
        return Err(failed!("node a's provider pid is {provider_pid}"));
    }
    let cap = Capture::start("pid-reuse")?;
    let server = super::support::spawn_server(PROTECTED_PORT, &["--size", "10000"])?;
    a.kill_provider(ProviderKind::OpenSsl);
    let held_before = a.stat(|s| s.gate_stops);
    // The client shell waits a second before it becomes the test app, so
    // a try that got another pid is killed before it connects.
    let client_cmd = format!(
        "sleep 1; exec tlshub-testapp client --connect {} --size 10000",
        pod_b_addr(PROTECTED_PORT)
    );
    let mut client = None;
    for _ in 0..200 {
        std::fs::write(
            "/proc/sys/kernel/ns_last_pid",
            (provider_pid - 1).to_string(),
        )
        .map_err(|e| format!("ns_last_pid: {e}"))?;
        let c = process::spawn_app("pod-a", &["sh", "-c", &client_cmd])?;
        if c.id() == provider_pid {
            client = Some(c);
            break;
        }
    }
    let client = client.ok_or(format!(
        "no client got pid {provider_pid} in 200 tries (other processes took it)"
    ))?;
    let c = app_report(&process::finish(client, Duration::from_secs(30))?)?;
    drop(server);
    let control = App::exchange(10_000, PLAIN_PORT);
    let (s2, c2) = run_pair(&control, &[], Duration::from_secs(30))?;
    both_ok(&control, &s2, &c2)?;
    // The protected connection was reset before keys: no keys to check it
    // against, and no marker may have crossed.
    let report = super::wire_check::check_wire_allowing_unkeyed(&cap.finish()?, &a, &b, true)?;
    if c.ok {
        return Err(failed!(
            "the client with the dead provider's pid {provider_pid} completed an exchange with no provider: it was let through ({c})"
        ));
    }
    report.expect_at_least(1, 0)?;
    std::thread::sleep(Duration::from_millis(1500));
    let held = a.stat(|s| s.gate_stops) - held_before;
    if held == 0 {
        return Err("the client with the reused pid was never held".into());
    }
    Ok(format!(
        "a client with the killed provider's pid {provider_pid} was held {held} time(s) and failed closed ({}); no marker on the protected port, the plain control showed it",
        c.error.as_deref().unwrap_or("")
    ))
}

/// One app that calls connect() on its keyed socket 200,000 times (each
/// fails with EISCONN; every call reaches the connect hook) next to 100
/// ordinary connections from 4 other clients: the hook reports an owner
/// once per socket and owner, so the node's event ring buffer loses
/// nothing and every ordinary connection is keyed.
pub fn event_flood() -> Outcome {
    use super::support::app_report;
    const FLOOD: u32 = 200_000;
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let (clients, each) = (4u32, 25u32);
    let total = (clients * each + 1).to_string();
    let server = super::support::spawn_server(
        PROTECTED_PORT,
        &["--parallel", "--mode", "echo", "--connections", &total],
    )?;
    let echo_client = |flag: &str, n: u32| {
        super::support::spawn_client(PROTECTED_PORT, &["--mode", "echo", flag, &n.to_string()])
    };
    let started = std::time::Instant::now();
    let flooder = echo_client("--connect-again", FLOOD)?;
    let mut normal = Vec::new();
    for _ in 0..clients {
        normal.push(echo_client("--connections", each)?);
    }
    for child in normal {
        let c = app_report(&process::finish(child, Duration::from_secs(300))?)?;
        if !c.ok {
            return Err(failed!("an ordinary client failed next to the flood: {c}"));
        }
    }
    let f = app_report(&process::finish(flooder, Duration::from_secs(300))?)?;
    let elapsed = started.elapsed();
    if !f.ok || f.eisconn != u64::from(FLOOD) {
        return Err(failed!(
            "the flooding client did not make its {FLOOD} calls: {f}"
        ));
    }
    let s = app_report(&process::finish(server, Duration::from_secs(30))?)?;
    if !s.ok {
        return Err(failed!("server: {s}"));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let want = u64::from(clients * each + 1);
    for (n, name) in [(&a, "a"), (&b, "b")] {
        let (drops, protected) = (n.stat(|s| s.ringbuf_drops), n.stat(|s| s.protected));
        if drops != 0 || protected < want {
            return Err(failed!(
                "node {name}: {drops} ring buffer drops, {protected} protected (want 0 and {want})"
            ));
        }
    }
    // Per connection: ESTABLISHED, OWNER, a few holds, CLOSED. The flood
    // itself must not show: 200,000 calls would be 200,000 OWNER events.
    let events = a.stat(|s| s.events_received);
    if events > 20 * want {
        return Err(failed!(
            "node a read {events} events for {want} connections: the connect() flood reached the ring buffer"
        ));
    }
    Ok(format!(
        "{FLOOD} connect() calls on one keyed socket next to {} ordinary connections: all {want} keyed on both nodes, 0 ring buffer drops, node a read {events} events, {:.1} s",
        clients * each,
        elapsed.as_secs_f64()
    ))
}

/// A hold is never lost, not even when nothing has room to record it.
/// Node A's core is paused (SIGSTOP) with a ring buffer of one page (about
/// 40 events), a `held` map of 2 entries and a restart grace long enough
/// that its gate keeps holding. 40 clients then connect and send 10,000
/// bytes each: their events fill the buffer, the next 2 holds go to the
/// map, and every later blocking send must fail with `EINTR` (the test app
/// retries it, as Rust's I/O does) instead of stopping a process that
/// nobody would continue. Once the core runs again, every exchange must end
/// exact and keyed on both nodes, with no marker on the wire (a plain
/// control flow shows it) and two decrypted flows per client.
pub fn hold_unrecorded() -> Outcome {
    use super::support::{app_report, spawn_client};
    use super::wire_check::check_wire_with_control;
    const CLIENTS: u32 = 40;
    const HELD_MAP: u64 = 2;
    let mut sa = NodeSpec::new("a");
    sa.provider = ProviderKind::ExamplePsk;
    sa.bpf = vec![
        ("event_buffer_bytes", 4096),
        ("max_held_processes", HELD_MAP),
        ("core_restart_grace_ms", 300_000),
    ];
    // The example provider derives keys from a shared secret and talks to
    // no peer: node b keys its side on its own while node a's core is
    // paused. Its key timeout is long: up to 40 processes spin on EINTR
    // meanwhile, and the emulated CPU is slow to answer.
    let mut sb = NodeSpec::new("b");
    sb.provider = ProviderKind::ExamplePsk;
    sb.key_timeout_ms = 60_000;
    let (mut a, b) = nodes(sa, sb)?;
    let cap = Capture::start("hold-unrecorded")?;
    let server = super::support::spawn_server(
        PROTECTED_PORT,
        &[
            "--parallel",
            "--connections",
            &CLIENTS.to_string(),
            "--size",
            "10000",
        ],
    )?;
    let paused_for = {
        let paused = a.pause_core();
        let t = std::time::Instant::now();
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            clients.push(spawn_client(PROTECTED_PORT, &["--size", "10000"])?);
        }
        // Long enough for every client to connect and send under TCG
        // (three events or more each: the buffer takes about 40).
        std::thread::sleep(Duration::from_secs(8));
        drop(paused);
        let paused_for = t.elapsed();
        for (i, c) in clients.into_iter().enumerate() {
            let c = app_report(&process::finish(c, Duration::from_secs(120))?)?;
            if !c.ok {
                return Err(failed!("client {i} after the paused core: {c}"));
            }
        }
        paused_for
    };
    let s = app_report(&process::finish(server, Duration::from_secs(60))?)?;
    if !s.ok {
        return Err(failed!("server: {s}"));
    }
    let want = u64::from(CLIENTS);
    let keyed = [
        a.stat_reaching(|s| s.protected, want),
        b.stat_reaching(|s| s.protected, want),
    ];
    let (drops, unrecorded) = (a.stat(|s| s.ringbuf_drops), a.stat(|s| s.hold_unrecorded));
    if keyed.iter().any(|k| *k < want) || drops == 0 || unrecorded == 0 {
        return Err(failed!(
            "keyed {keyed:?} (want {want} on both nodes), node a: {drops} ring buffer drops, {unrecorded} calls answered EINTR (want both above 0: the buffers did not fill)"
        ));
    }
    let control = App::exchange(10_000, PLAIN_PORT);
    let (s2, c2) = run_pair(&control, &[], Duration::from_secs(30))?;
    both_ok(&control, &s2, &c2)?;
    let wire = check_wire_with_control(&cap.finish()?, &a, &b)?;
    // One flow each way per connection, every one decrypted.
    let flows = 2 * CLIENTS as usize;
    if wire.protected_flows != flows || wire.decrypted != flows {
        return Err(failed!(
            "{} protected flows ({} decrypted) on the wire for {CLIENTS} connections (want {flows})",
            wire.protected_flows,
            wire.decrypted
        ));
    }
    // The pinned maps keep their small sizes: a core adopting them and a
    // release (which loads them with the object's sizes) must open them
    // as they are (the kernel refuses to map a ring buffer at another
    // size), or the next core cannot start and the pins cannot be removed.
    a.kill_core();
    a.restart_core("adopting")?;
    a.kill_core();
    a.release(true)
        .map_err(|e| e.context("release with a 4 KiB pinned event buffer"))?;
    Ok(format!(
        "core paused {:.1} s with a 4 KiB event buffer and {HELD_MAP} held entries: {CLIENTS} clients all exact and keyed on both nodes after it resumed; {drops} events dropped, {unrecorded} calls answered EINTR instead of an unrecorded stop; no marker on the wire ({} protected flows, {} decrypted); the small pinned maps adopted by a new core and released",
        paused_for.as_secs_f64(),
        wire.protected_flows,
        wire.decrypted
    ))
}

/// A held process that someone else keeps continuing: any process of the
/// app's user may send it `SIGCONT`, and the call it was held in then
/// restarts. A blocking client waits for keys that cannot come before
/// pod-b's server accepts (4 s; an in-band handshake needs the accepting
/// process), while a shell in pod-a sends it `SIGCONT` 20,000 times. Each
/// restarted call must find the gate closed again and be held again (its
/// bytes must not leave early, in clear): the client's flow must be
/// TLS-only and decrypt, with a plain control under the same capture.
/// Each hold is one `HELD` event (so node a reads no more events than it
/// counts holds, plus the connection's own few) and none is dropped. The
/// exchange must be exact once the server accepts, and an ordinary one
/// right after too.
pub fn hold_continued_by_another_process() -> Outcome {
    use super::support::{app_report, spawn_client, spawn_server, stopped_within_10s};
    use super::wire_check::{check_wire_with_control, plain_control};
    const SIGNALS: u32 = 20_000;
    let spec = |name| NodeSpec {
        key_timeout_ms: 10_000,
        ..NodeSpec::new(name)
    };
    let (a, b) = nodes(spec("a"), spec("b"))?;
    let cap = Capture::start("hold-continued")?;
    let server = spawn_server(
        PROTECTED_PORT,
        &["--accept-delay-ms", "4000", "--size", "10000"],
    )?;
    let client = spawn_client(PROTECTED_PORT, &["--size", "10000"])?;
    let pid = client.id();
    if !stopped_within_10s(pid) {
        return Err(failed!("the client (pid {pid}) was never held"));
    }
    let before = a.stats()?;
    let started = std::time::Instant::now();
    let spam = format!(
        "i=0; while [ $i -lt {SIGNALS} ]; do kill -CONT {pid} 2>/dev/null; i=$((i+1)); done"
    );
    process::run(Some("pod-a"), &["sh", "-c", &spam])?;
    let spam_took = started.elapsed();
    let c = app_report(&process::finish(client, Duration::from_secs(30))?)?;
    let s = app_report(&process::finish(server, Duration::from_secs(10))?)?;
    if !(c.ok && s.ok) {
        return Err(failed!("client {c}, server {s}"));
    }
    plain_control()?;
    let report = check_wire_with_control(&cap.finish()?, &a, &b)?;
    if report.decrypted != 2 {
        return Err(failed!(
            "want the held client's two flows decrypted: {report:?}"
        ));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let after = a.stats()?;
    let holds = after.gate_stops - before.gate_stops;
    let events = after.events_received - before.events_received;
    let drops = after.ringbuf_drops - before.ringbuf_drops;
    // Besides the holds: the connection's OWNER, CLOSED and the control's
    // few; 20 is generous.
    if holds == 0 || events > holds + 20 || drops != 0 {
        return Err(failed!(
            "{holds} holds while it was continued, node a read {events} events, {drops} dropped (want holds, one event each, none dropped)"
        ));
    }
    let plain = App::exchange(10_000, PROTECTED_PORT);
    let (ps, pc) = run_pair(&plain, &[], Duration::from_secs(30))?;
    both_ok(&plain, &ps, &pc)?;
    Ok(format!(
        "{SIGNALS} SIGCONTs in {:.1} s to a held client: held again {holds} times, node a read {events} events (0 dropped); its flows TLS-only and decrypted, exact, and an ordinary exchange after it exact",
        spam_took.as_secs_f64()
    ))
}
