//! What one app can cost the node's shared capacity: a full connection map
//! fails closed, connects nobody answers take no entry, and one process's
//! connections waiting for keys are bounded.

use std::time::Duration;

use super::node::{NodeSpec, PLAIN_PORT, PROTECTED_PORT, ProviderKind};
use super::process;
use super::support::{App, both_ok, nodes, run_go_pair, run_pair};
use super::wire_check::Capture;
use crate::failed;
use crate::vm::outcome::{Failure, Outcome};

/// Capacity never means plaintext, and open connections cost no capacity.
/// Node A's `conns` map holds 16 entries (`[bpf] max_connections = 16`).
///
/// 1. Keyed connections keep no entry: 48 long-lived connections (three
///    times the map) are keyed and stay open while short ones are opened
///    at 2/s, and every one of them is keyed too (`map_full` stays 0).
/// 2. Connections waiting for keys do: with node A's provider hanging (20 s
///    key timeout), 16 clients fill the map, and each further one must fail
///    closed at once (its app's calls fail with `ECONNRESET`, counted as
///    `map_full`), with no marker on the wire. The 16 are reset at the key
///    timeout; then a new connection is keyed again. A plain control flow
///    shows the marker.
/// 3. A refused socket is not refused for good once it moves on: two of
///    the sockets refused over the full map are disconnected
///    (`connect(AF_UNSPEC)`) and connected again. One goes to the plain
///    port at once: its exchange is exact and in clear. The other waits
///    until the map has room again and node A's provider is switched to a
///    working one, then goes back to the protected port: it is keyed,
///    exact bytes, a flow that decrypts.
pub fn conns_map_full() -> Outcome {
    use super::service::{LoadServer, report, start_load_with};
    use super::support::{
        self, GoFile, app_report, expect_reset, pod_b_addr, spawn_client, spawn_probe,
    };
    use libc::ECONNRESET;
    const MAX: u32 = 16;
    const LONG: u32 = 3 * MAX;
    // 1. Keyed connections leave the map.
    let mut sa = NodeSpec::new("a");
    sa.bpf.push(("max_connections", u64::from(MAX)));
    // One process (the load client) may use the whole map: this scenario
    // is about the map, `process_and_cgroup_bound` about the bounds.
    sa.bpf.push(("max_connections_per_process", u64::from(MAX)));
    sa.bpf.push(("max_connections_per_cgroup", u64::from(MAX)));
    let (a, b) = nodes(sa.clone(), NodeSpec::new("b"))?;
    let server = LoadServer::start()?;
    let client = start_load_with(LONG, 6, 2.0)?;
    // All long ones are keyed and open now; the map holds only what waits.
    std::thread::sleep(Duration::from_millis(1500));
    let entries_while_open = a.stat(|s| s.bpf_maps.0 as u64);
    let r = report(&process::finish(client, Duration::from_secs(120))?)?;
    drop(server);
    let attempted = r.short_attempted;
    if r.long_opened != LONG
        || r.long_broken != 0
        || r.corrupt != 0
        || attempted == 0
        || r.short_ok != attempted
    {
        return Err(failed!(
            "{LONG} keyed connections open must leave room in a map of {MAX}: {r}"
        ));
    }
    let keyed = a.stat_reaching(|s| s.protected, u64::from(LONG) + attempted);
    let full = a.stat(|s| s.map_full);
    if keyed < u64::from(LONG) + attempted || full != 0 || entries_while_open >= u64::from(MAX) {
        return Err(failed!(
            "node a: {keyed} keyed (want {}), map_full {full}, {entries_while_open} conns entries with the long ones open",
            u64::from(LONG) + attempted
        ));
    }
    drop((a, b));

    // 2. Waiting connections fill it, and the next ones fail closed.
    // Long enough for 16 client processes to start and connect under TCG
    // (on 6.12 that took more than 5 s) before the first is reset.
    sa.provider = ProviderKind::Bad("hang");
    sa.also = vec![ProviderKind::OpenSsl];
    sa.key_timeout_ms = 20_000;
    let mut sb = NodeSpec::new("b");
    // Node b must not reset the connections first (its provider waits for
    // a handshake that node a never starts).
    sb.key_timeout_ms = 40_000;
    let (a, b) = nodes(sa, sb)?;
    let cap = Capture::start("map-full")?;
    let server = LoadServer::start()?;
    let size = ["--size", "100"];
    let mut waiting = Vec::new();
    for _ in 0..MAX {
        waiting.push(spawn_client(PROTECTED_PORT, &size)?);
    }
    let filled = a.stat_reaching_in(
        |s| s.bpf_maps.0 as u64,
        u64::from(MAX),
        Duration::from_secs(15),
    );
    if filled < u64::from(MAX) {
        return Err(failed!(
            "{MAX} clients waiting for keys filled {filled} of {MAX} conns entries"
        ));
    }
    // 3. Their first connections are two more over the full map.
    let plain_server = LoadServer::start_on(PLAIN_PORT)?;
    let go_file = GoFile::new("/tmp/refused-then-reconnect.go");
    let reconnecting = |port: u16, wait: bool| {
        let (target, then) = (pod_b_addr(PROTECTED_PORT), pod_b_addr(port));
        let mut args = vec!["--then", &then];
        if wait {
            args.extend(["--go-file", go_file.path()]);
        }
        spawn_probe("refused-then-reconnect", &target, &args)
    };
    let to_plain = reconnecting(PLAIN_PORT, false)?;
    let to_protected = reconnecting(PROTECTED_PORT, true)?;
    const OVER: u32 = 4;
    let t = std::time::Instant::now();
    for i in 0..OVER {
        let c = app_report(&process::finish(
            spawn_client(PROTECTED_PORT, &size)?,
            Duration::from_secs(60),
        )?)?;
        expect_reset(&c).map_err(|e| e.context(format!("client {i} over a full map")))?;
    }
    let refused_in = t.elapsed();
    if refused_in > Duration::from_secs(8) {
        return Err(failed!(
            "{OVER} clients over a full map took {refused_in:?} to fail: they waited instead of failing at once"
        ));
    }
    for (i, c) in waiting.into_iter().enumerate() {
        let c = app_report(&process::finish(c, Duration::from_secs(60))?)?;
        expect_reset(&c).map_err(|e| e.context(format!("waiting client {i}")))?;
    }
    const PROBES: u64 = 2;
    let full = a.stat_reaching(|s| s.map_full, u64::from(OVER) + PROBES);
    if full < u64::from(OVER) + PROBES {
        return Err(failed!(
            "node a counted {full} map-full failures for {OVER} clients and {PROBES} probes over a full map"
        ));
    }
    let probe_as_wanted = |child, what: &str| -> Result<(), Failure> {
        let steps = support::probe_steps(&process::finish(child, Duration::from_secs(90))?)?;
        let want = [
            ("connect", 0),
            ("write", ECONNRESET),
            ("disconnect", 0),
            ("wait for the go file", 0),
            ("connect again", 0),
            ("exchange", 0),
        ];
        if steps.len() != want.len()
            || steps
                .iter()
                .zip(want)
                .any(|((c, e), (wc, we))| c != wc || *e != we)
        {
            return Err(failed!(
                "a socket refused over the full map, then connected to {what}: {steps:?}, want {want:?}"
            ));
        }
        Ok(())
    };
    probe_as_wanted(to_plain, "the plain port")?;
    // 3, continued: room again, and a provider that keys.
    let free = a.stat_reaching_in(
        |s| u64::from(MAX).saturating_sub(s.bpf_maps.0 as u64),
        u64::from(MAX),
        Duration::from_secs(15),
    );
    if free < u64::from(MAX) {
        return Err(failed!(
            "{} conns entries still in use after every waiting client was reset",
            u64::from(MAX) - free
        ));
    }
    a.use_provider("openssl")?;
    let keyed_before = a.stat(|s| s.protected);
    go_file.go()?;
    probe_as_wanted(to_protected, "the protected port again")?;
    let keyed_again = a.stat_reaching(|s| s.protected, keyed_before + 1) - keyed_before;
    if keyed_again != 1 {
        return Err(failed!(
            "the refused socket connected to the protected port again: node a keyed {keyed_again} connections, want 1"
        ));
    }
    drop((server, plain_server));
    // Read before the nodes go: the next ones start with empty key logs.
    let mut keys: Vec<_> = a.keys().into_iter().chain(b.keys()).collect();
    drop((a, b));
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let control = App::exchange(10_000, PLAIN_PORT);
    let (s, c) = run_pair(&control, &[], Duration::from_secs(30))?;
    both_ok(&control, &s, &c)?;
    let after = App::exchange(10_000, PROTECTED_PORT);
    let (s, c) = run_pair(&after, &[], Duration::from_secs(30))?;
    both_ok(&after, &s, &c)?;
    keys.extend(a.keys().into_iter().chain(b.keys()));
    let wire = super::wire_check::check_wire_with_keys(&cap.finish()?, &keys, true)?;
    // Plain: the probe's exchange and the control; decrypted: the refused
    // socket's keyed reconnect and the last exchange.
    wire.expect_at_least(2, 2)?;
    Ok(format!(
        "conns of {MAX} entries: {LONG} keyed long connections open and {attempted} short ones keyed meanwhile ({entries_while_open} entries in use, map_full 0); {MAX} connections waiting for keys filled it and {OVER} more failed closed in {:.1} s (map_full {full}, with the probes'), the {MAX} reset at the key timeout; refused sockets connected again worked in clear to the plain port and were keyed on the protected one; no marker on the wire ({} protected flows, {} decrypted); then a new connection was keyed",
        refused_in.as_secs_f64(),
        wire.protected_flows,
        wire.decrypted
    ))
}

/// Connecting costs no shared capacity: a connection that no peer answers
/// has no `conns` entry, so one app cannot fill the map by connecting to
/// selected addresses where nobody answers (each such socket sits in
/// `SYN_SENT` for about two minutes) and make every other selected
/// connection on the node fail closed. Node A's map holds 16 entries; an
/// app in pod-a leaves 64 non-blocking sockets connecting to a selected
/// address that node B black-holes, and one send on each gets TCP's own
/// `EAGAIN`. Meanwhile node A's `conns` map stays empty, three protected
/// exchanges are keyed (`map_full` stays 0) and a plain control shows its
/// marker on the wire, where no protected flow may.
pub fn connect_flood() -> Outcome {
    use super::support::{self, PodSetting};
    use crate::app_io::CONNECT_FLOOD;
    const MAX: u32 = 16;
    const BLACK_HOLE: &str = "10.0.2.77";
    let mut sa = NodeSpec::new("a");
    sa.bpf.push(("max_connections", u64::from(MAX)));
    let (a, b) = nodes(sa, NodeSpec::new("b"))?;
    let host = format!("{BLACK_HOLE}/32");
    let _black_hole = PodSetting::command(
        "node-b",
        &["ip", "route", "add", "blackhole", &host],
        &["ip", "route", "del", "blackhole", &host],
    )?;
    let cap = Capture::start("connect-flood")?;
    let go_file = support::GoFile::new("/tmp/connect-flood.go");
    let target = format!("{BLACK_HOLE}:{PROTECTED_PORT}");
    let flood = support::spawn_probe("connect-flood", &target, &["--go-file", go_file.path()])?;
    let connecting = || {
        process::run(Some("pod-a"), &["ss", "-Htn", "state", "syn-sent"])
            .map(|out| out.lines().filter(|l| l.contains(BLACK_HOLE)).count())
    };
    let seen = support::wait_for(
        Duration::from_secs(20),
        Duration::from_millis(200),
        connecting,
        |n| n.as_ref().map_or(true, |&n| n >= CONNECT_FLOOD),
    )
    .unwrap_or_else(|last| last)?;
    let entries = a.stat(|s| s.bpf_maps.0 as u64);
    for port in [PROTECTED_PORT, PROTECTED_PORT, PROTECTED_PORT, PLAIN_PORT] {
        let app = App::exchange(10_000, port);
        let (s, c) = run_pair(&app, &[], Duration::from_secs(30))?;
        both_ok(&app, &s, &c)?;
    }
    let still = connecting()?;
    go_file.go()?;
    let steps = support::probe_steps(&process::finish(flood, Duration::from_secs(30))?)?;
    if seen < CONNECT_FLOOD || still < CONNECT_FLOOD {
        return Err(failed!(
            "{seen} then {still} sockets connecting to {BLACK_HOLE}, want {CONNECT_FLOOD}: the black hole did not hold them"
        ));
    }
    if steps.iter().any(|(_, e)| *e != 0) {
        return Err(failed!(
            "the flood's connects and sends: {steps:?} (want EINPROGRESS and EAGAIN throughout)"
        ));
    }
    let full = a.stat(|s| s.map_full);
    if entries != 0 || full != 0 {
        return Err(failed!(
            "with {CONNECT_FLOOD} sockets connecting: {entries} conns entries (want 0), map_full {full} (want 0)"
        ));
    }
    let wire = super::wire_check::check_wire_allowing_unkeyed(&cap.finish()?, &a, &b, true)?;
    wire.expect_at_least(1, 3)?;
    Ok(format!(
        "{CONNECT_FLOOD} sockets connecting to a black hole next to a map of {MAX}: 0 conns entries, their sends EAGAIN; 3 protected exchanges keyed meanwhile (map_full 0, {} flows decrypted), the plain control showed its marker",
        wire.decrypted
    ))
}

/// What one process, and one cgroup's processes together, can cost the
/// node is bounded: their connections waiting for keys at once (each an
/// entry of the `conns` map) are at most `[bpf]
/// max_connections_per_process` and `max_connections_per_cgroup`, and the
/// next ones are reset at once, so one app whose peers answer but never
/// let a connection be keyed cannot make every other app's connections
/// fail, not even by forking. Node A allows 8 per process and 12 per
/// cgroup. Two processes in one cgroup of their own each open 24
/// connections to a selected port whose server never accepts (node B's
/// provider waits for the socket, so node A's handshakes wait for the key
/// timeout, 45 s): the first has 8 waiting and 16 refused at once
/// (`process_bound`), the second, started after, 4 waiting and 20 refused
/// (`cgroup_bound`), although node A fails open (their sends `ECONNRESET`
/// or `EPIPE`; the waiting ones `EAGAIN`). Meanwhile a process outside
/// that cgroup has an exchange keyed, exact both ways. No marker on the
/// wire; a plain control flow shows it.
pub fn process_and_cgroup_bound() -> Outcome {
    use super::support::{self, TestCgroup, spawn_server};
    use crate::app_io::MANY_WAITING;
    const PER_PROCESS: u64 = 8;
    const PER_CGROUP: u64 = 12;
    const NEVER_ACCEPTED_PORT: u16 = 8450;
    use libc::{EAGAIN, ECONNRESET, EPIPE};
    let mut sa = NodeSpec::new("a");
    sa.bpf.push(("max_connections_per_process", PER_PROCESS));
    sa.bpf.push(("max_connections_per_cgroup", PER_CGROUP));
    // Long enough for both apps' connections to still wait at their sends.
    sa.key_timeout_ms = 45_000;
    // Capacity never means plaintext, whatever the policy.
    sa.failure_policy = "fail-open";
    sa.also_ports = vec![NEVER_ACCEPTED_PORT];
    let mut sb = NodeSpec::new("b");
    sb.key_timeout_ms = 60_000;
    sb.also_ports = vec![NEVER_ACCEPTED_PORT];
    let (a, b) = nodes(sa, sb)?;
    let cap = Capture::start("process-bound")?;
    let _never_accepting = spawn_server(
        NEVER_ACCEPTED_PORT,
        &["--accept-delay-ms", "300000", "--connections", "1"],
    )?;
    let cgroup = TestCgroup::new("/tmp/tlshub-cgroup2", "bounded-app")?;
    // The core leaves the root cgroup unbounded as a group by this id.
    let root = cgroup.root_id()?;
    if root != 1 {
        return Err(failed!(
            "the root cgroup's id is {root}, the core takes it to be 1"
        ));
    }
    let go_file = support::GoFile::new("/tmp/process-bound.go");
    let target = support::pod_b_addr(NEVER_ACCEPTED_PORT);
    let probe_args = ["--go-file", go_file.path(), "--cgroup", cgroup.dir()];
    let all = MANY_WAITING as u64;
    // The first process: its own bound.
    let first = support::spawn_probe("many-waiting", &target, &probe_args)?;
    let over_process = all - PER_PROCESS;
    let refused_first = a.stat_reaching_in(
        |s| s.failures("process_bound"),
        over_process,
        Duration::from_secs(20),
    );
    // The second, in the same cgroup: what the cgroup has left.
    let second = support::spawn_probe("many-waiting", &target, &probe_args)?;
    let second_waits = PER_CGROUP - PER_PROCESS;
    let over_cgroup = all - second_waits;
    let refused_second = a.stat_reaching_in(
        |s| s.failures("cgroup_bound"),
        over_cgroup,
        Duration::from_secs(20),
    );
    // A process in another cgroup is not bounded by their connections.
    let keyed_before = a.stat(|s| s.protected);
    let app = App::exchange(10_000, PROTECTED_PORT);
    let (s, c) = run_pair(&app, &[], Duration::from_secs(30))?;
    both_ok(&app, &s, &c)?;
    let keyed = a.stat_reaching(|s| s.protected, keyed_before + 1) - keyed_before;
    let control = App::exchange(10_000, PLAIN_PORT);
    let (s, c) = run_pair(&control, &[], Duration::from_secs(30))?;
    both_ok(&control, &s, &c)?;
    let refused_after = (
        a.stat(|s| s.failures("process_bound")),
        a.stat(|s| s.failures("cgroup_bound")),
    );
    go_file.go()?;
    let mut sends_of = Vec::new();
    for (which, probe) in [("first", first), ("second", second)] {
        let steps = support::probe_steps(&process::finish(probe, Duration::from_secs(30))?)?;
        let connects = steps
            .iter()
            .filter(|(c, e)| c == "connect" && *e == 0)
            .count();
        let sends: Vec<i32> = steps
            .iter()
            .filter(|(c, _)| c == "send")
            .map(|(_, e)| *e)
            .collect();
        if connects != MANY_WAITING || sends.len() != MANY_WAITING {
            return Err(failed!(
                "the {which} app's {MANY_WAITING} connections: {steps:?} (want every connect and send reported)"
            ));
        }
        let waiting = sends.iter().filter(|e| **e == EAGAIN).count() as u64;
        let reset = sends
            .iter()
            .filter(|e| matches!(**e, ECONNRESET | EPIPE))
            .count() as u64;
        sends_of.push((waiting, reset, sends));
    }
    let want = [(PER_PROCESS, over_process), (second_waits, over_cgroup)];
    let got: Vec<(u64, u64)> = sends_of.iter().map(|(w, r, _)| (*w, *r)).collect();
    if refused_first != over_process
        || refused_second != over_cgroup
        || refused_after != (over_process, over_cgroup)
        || got != want
    {
        return Err(failed!(
            "two processes of one cgroup with {MANY_WAITING} connections waiting each, {PER_PROCESS} allowed per process and {PER_CGROUP} per cgroup: node a refused {refused_first} (process) then {refused_second} (cgroup), {refused_after:?} after (want {over_process} and {over_cgroup}); their sends (EAGAIN, reset): {got:?} (want {want:?}); all: {:?}",
            sends_of.iter().map(|(_, _, s)| s).collect::<Vec<_>>()
        ));
    }
    if keyed != 1 {
        return Err(failed!(
            "another process's exchange next to the bounded ones: node a keyed {keyed}, want 1"
        ));
    }
    let wire = super::wire_check::check_wire_allowing_unkeyed(&cap.finish()?, &a, &b, true)?;
    wire.expect_at_least(1, 1)?;
    drop(cgroup);
    Ok(format!(
        "two processes of one cgroup with {MANY_WAITING} connections waiting for keys each, bounds {PER_PROCESS} per process and {PER_CGROUP} per cgroup: the first had {over_process} refused at once (process_bound), the second {over_cgroup} (cgroup_bound), under fail-open (sends reset), {PER_PROCESS} and {second_waits} waited (EAGAIN); another process's exchange was keyed meanwhile; no marker on the wire ({} protected flows, {} decrypted), the plain control showed it",
        wire.protected_flows, wire.decrypted
    ))
}

/// Each connection being keyed holds a duplicate of its socket in the core
/// (and, with an in-band handshake, another in the provider) until its
/// keys are in, so a burst of new connections needs as many open files at
/// once. Both nodes' core and provider start with a soft limit of 40 open
/// files (hard 4,096; systemd starts services with 1,024 and 524,288),
/// and a Go client opens 40 connections at once to a Go server with
/// OpenSSL (Go's sockets are non-blocking, so nobody is stopped and every
/// connection is keyed at the same time): every exchange must be exact,
/// every flow decrypted, and no connection fail. The cores' limits are
/// read from `/proc/PID/limits` for the report. The burst also keys
/// connections faster than the core gets to open their gates, so some end
/// (both FINs) before it does: the gate must leave those to kTLS.
pub fn burst_beyond_the_open_files_soft_limit() -> Outcome {
    const BURST: u32 = 40;
    let spec = |name| NodeSpec {
        open_files: Some("--nofile=40:4096"),
        key_timeout_ms: 20_000,
        ..NodeSpec::new(name)
    };
    let (a, b) = nodes(spec("a"), spec("b"))?;
    let cap = Capture::start("open-files")?;
    let (listen, connect) = (
        format!("0.0.0.0:{PROTECTED_PORT}"),
        super::support::pod_b_addr(PROTECTED_PORT),
    );
    run_go_pair(&listen, &connect, BURST, 10_000, "write").map_err(|e| {
        e.context(format!(
            "failed a {:?} b {:?}; no-core refusals a {} b {}, terminal a {} b {}, stale a {} b {}, map full a {} b {}",
            a.stats().map(|s| s.failed),
            b.stats().map(|s| s.failed),
            a.stat(|s| s.no_core_refusals),
            b.stat(|s| s.no_core_refusals),
            a.stat(|s| s.gate_terminal),
            b.stat(|s| s.gate_terminal),
            a.stat(|s| s.stale_outcomes),
            b.stat(|s| s.stale_outcomes),
            a.stat(|s| s.map_full),
            b.stat(|s| s.map_full),
        ))
    })?;
    super::wire_check::plain_control()?;
    let report = super::wire_check::check_wire_with_control(&cap.finish()?, &a, &b)?;
    if report.decrypted != 2 * BURST as usize {
        return Err(failed!("{BURST} protected connections but {report:?}"));
    }
    let failed = [a.stats(), b.stats()].map(|s| s.map(|s| s.failed).unwrap_or_default());
    if failed.iter().any(|by_reason| !by_reason.is_empty()) {
        return Err(failed!(
            "connections failed, by reason: a {:?} b {:?} (want none)",
            failed[0],
            failed[1]
        ));
    }
    let limits = [&a, &b].map(|n| {
        std::fs::read_to_string(format!("/proc/{}/limits", n.core_pid()))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .map(|l| {
                l.split_whitespace()
                    .skip(3)
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(":")
            })
            .unwrap_or_default()
    });
    Ok(format!(
        "{BURST} connections at once from a Go client, core and provider started with a soft limit of 40 open files: all exact, {} flows decrypted, none failed; the cores' open-files limits now a {} b {}",
        report.decrypted, limits[0], limits[1]
    ))
}
