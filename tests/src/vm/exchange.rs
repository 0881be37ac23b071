//! Exchanges through kTLS: every send and receive call, cipher suites,
//! large transfers, small send buffers, IPv6 and concurrent keying.

use std::time::{Duration, Instant};

use super::node::{NodeSpec, PLAIN_PORT, PROTECTED_PORT, ProviderKind};
use super::process::{self, finish, spawn_ready};
use super::support::*;
use super::topology::{POD_B, POD_B6};
use super::wire_check::*;
use crate::failed;
use crate::vm::outcome::{Failure, Outcome};

pub fn kernel_has_ktls_and_bpf_lsm() -> Outcome {
    let lsm = std::fs::read_to_string("/sys/kernel/security/lsm").map_err(|e| e.to_string())?;
    if !lsm.split(',').any(|l| l.trim() == "bpf") {
        return Err(failed!("bpf not in the LSM list: {lsm}"));
    }
    if tls_stat(&["pod-a"]).is_empty() {
        return Err("/proc/net/tls_stat missing: tls module not loaded".into());
    }
    let uname = process::run(None, &["uname", "-r"])?;
    let check = core_check()?;
    let fixed = fixed_key_ktls()?;
    // What every clock read costs in this VM (see the VM notes in
    // tests/README.md): `tsc` is read in user space, others trap.
    let clock =
        std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .unwrap_or_default();
    Ok(format!(
        "kernel {} lsm={} clocksource={}; tlshub-core check: {check}; {fixed}",
        uname.trim(),
        lsm.trim(),
        clock.trim()
    ))
}

/// `tlshub-core check` (with the defaults, as on a fresh host) must find
/// every requirement met on this kernel, and exit 0.
fn core_check() -> Result<String, Failure> {
    use tlshub_admin::preflight::{NAMES, Report};
    let text = process::run(
        None,
        &[
            "tlshub-core",
            "check",
            "--json",
            "--config",
            "/nonexistent.toml",
        ],
    )
    .map_err(|e| e.context("tlshub-core check"))?;
    let json = text.find('{').map_or("", |at| &text[at..]);
    let report: Report =
        serde_json::from_str(json).map_err(|e| format!("tlshub-core check: {e}: {text}"))?;
    let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
    if names != NAMES || !report.ok() {
        return Err(failed!("tlshub-core check: {text}"));
    }
    Ok(format!(
        "all {} met ({})",
        NAMES.len(),
        report.get("BPF programs").map_or("", |c| c.found.as_str())
    ))
}

/// kTLS with a fixed key on both ends and no agent (`tlshub-testapp
/// --ktls-fixed-key`, the benchmark's data-path ceiling) on the plain
/// port: exact bytes both ways, and each direction on the wire is records
/// that decrypt under the sender's fixed key to what its app sent.
fn fixed_key_ktls() -> Result<String, Failure> {
    use crate::app_io::fixed_ktls_keys;
    use crate::pattern::{CLIENT_SEED, MARKER, SERVER_SEED};
    let app = App {
        ktls_fixed_key: true,
        ..App::exchange(100_000, PLAIN_PORT)
    };
    let cap = Capture::start("fixed-key-ktls")?;
    let (server, client) = run_pair(&app, &[], Duration::from_secs(60))?;
    if !server.ok || !client.ok {
        return Err(failed!(
            "fixed-key kTLS exchange: server {server}, client {client}"
        ));
    }
    let flows = cap.finish()?;
    let mut checked = 0;
    for f in flows.iter().filter(|f| !f.bytes.is_empty()) {
        if crate::wire::contains(&f.bytes, MARKER) {
            return Err(failed!(
                "fixed-key kTLS: {} -> {} carries the marker",
                f.src,
                f.dst
            ));
        }
        let from_client = f.dst.port() == PLAIN_PORT;
        let keys = fixed_ktls_keys(from_client).transmit;
        let plain =
            crate::wire::decrypt_application_data(&f.bytes, "aes-gcm-128", &keys.key, &keys.iv)
                .map_err(|e| format!("fixed-key kTLS: {} -> {}: {e}", f.src, f.dst))?;
        let seed = if from_client {
            CLIENT_SEED
        } else {
            SERVER_SEED
        };
        crate::pattern::check(seed, 0, &plain).map_err(|at| {
            format!(
                "fixed-key kTLS: {} -> {}: decrypted byte {at} is not what the app sent",
                f.src, f.dst
            )
        })?;
        if plain.len() < app.size {
            return Err(failed!(
                "fixed-key kTLS: {} -> {}: {} bytes decrypted, want {}",
                f.src,
                f.dst,
                plain.len(),
                app.size
            ));
        }
        checked += 1;
    }
    if checked != 2 {
        return Err(failed!(
            "fixed-key kTLS: {checked} flows with bytes captured, want 2"
        ));
    }
    Ok(format!(
        "fixed-key kTLS without an agent: {} bytes each way exact, both flows decrypt under the fixed keys",
        app.size
    ))
}

/// Every send method with every receive method in rotation, blocking and
/// epoll, client-first and server-first, 1 byte and 1 MiB, all captured.
pub fn exchange_matrix() -> Outcome {
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let sends = ["write", "writev", "send", "sendmsg", "sendfile", "splice"];
    let recvs = ["read", "recv", "recvmsg", "splice"];
    let mut apps = Vec::new();
    for (i, send) in sends.iter().enumerate() {
        for (j, io) in ["blocking", "epoll"].iter().enumerate() {
            for (k, size) in [1usize, 1 << 20].iter().enumerate() {
                apps.push(App {
                    mode: if (i + j + k) % 2 == 0 {
                        "client-first"
                    } else {
                        "server-first"
                    },
                    size: *size,
                    send,
                    recv: recvs[(i * 2 + j + k) % recvs.len()],
                    io,
                    ..App::exchange(1, PROTECTED_PORT)
                });
            }
        }
    }
    let runs = apps.len();
    // One unselected connection in the same capture: it must stay plain.
    apps.push(App::exchange(10_000, PLAIN_PORT));
    let report = with_ktls_sockets(2 * runs as u64, || {
        captured_exchanges("matrix", &a, &b, &apps)
    })?;
    report.expect_at_least(1, 0)?;
    Ok(format!(
        "{runs} connections (6 send x 4 recv methods, blocking+epoll, both orders, 1 B + 1 MiB) exact both ways; {} flows TLS-only and decrypted to {} app bytes; tls_stat TlsTxSw/TlsRxSw +{}; unselected stayed plain",
        report.protected_flows,
        report.plaintext_bytes,
        2 * runs
    ))
}

pub fn cipher_suites() -> Outcome {
    let mut out = Vec::new();
    for (suite, ktls) in [
        ("TLS_AES_256_GCM_SHA384", "aes-gcm-256"),
        ("TLS_CHACHA20_POLY1305_SHA256", "chacha20-poly1305"),
    ] {
        let mut sa = NodeSpec::new("a");
        sa.suite = suite;
        let mut sb = NodeSpec::new("b");
        sb.suite = suite;
        let (a, b) = nodes(sa, sb)?;
        let app = App {
            mode: "server-first",
            ..App::exchange(200_000, PROTECTED_PORT)
        };
        captured_exchanges("suites", &a, &b, &[app])?;
        let name = a.first_key_suite();
        if name != ktls {
            return Err(failed!("{suite} installed as {name:?}, want {ktls}"));
        }
        out.push(format!("{suite} -> kTLS {name}, decrypted"));
    }
    Ok(out.join("; "))
}

pub fn large_transfers() -> Outcome {
    let (_a, _b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    // Both ends of all 6 connections must have kTLS in both directions.
    // (Not captured: 768 MiB of packets would not fit the VM's memory;
    // the exchange matrix captures every method with 1 MiB.)
    with_ktls_sockets(12, large_transfers_exact)
}

pub fn large_transfers_exact() -> Outcome {
    let mut out = Vec::new();
    // Every send call and every receive call at least once, both I/O modes
    // and both orders.
    for (mode, send, recv, io) in [
        ("client-first", "write", "read", "blocking"),
        ("server-first", "writev", "recv", "epoll"),
        ("client-first", "send", "recvmsg", "blocking"),
        ("server-first", "sendmsg", "splice", "epoll"),
        ("client-first", "sendfile", "read", "epoll"),
        ("server-first", "splice", "splice", "blocking"),
    ] {
        let app = App {
            mode,
            send,
            recv,
            io,
            ..App::exchange(64 << 20, PROTECTED_PORT)
        };
        let t = Instant::now();
        let (s, c) = run_pair(&app, &[], Duration::from_secs(300))?;
        both_ok(&app, &s, &c)?;
        out.push(format!(
            "{send}/{recv}/{io} {:.1}s",
            t.elapsed().as_secs_f64()
        ));
    }
    Ok(format!(
        "64 MiB each way, exact, kTLS on all 12 sockets: {}",
        out.join(", ")
    ))
}

/// sendfile() and splice() by a client that set a small send buffer
/// itself (8 KiB): before Linux 6.5 kTLS can stall such a sender for good
/// (why in `KtlsSection::send_buffer_floor` of the core's config), and the
/// core's send buffer floor must prevent it. A control run without the
/// floor reports whether this kernel stalls there (not required: a fixed
/// kernel would not).
pub fn small_send_buffer_sendpage() -> Outcome {
    let small = ["--sndbuf", "4096"];
    // From 6.5 on, sendfile()/splice() into kTLS end in a push (the
    // MSG_SPLICE_PAGES rework), so the core applies no floor there and
    // the transfers must complete from the app's own small buffer.
    let floored = kernel_version() < (6, 5);
    let app = |send, io| App {
        size: 4 << 20,
        send,
        io,
        ..App::exchange(1, PROTECTED_PORT)
    };
    let mut out = Vec::new();
    {
        let (_a, _b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
        for (send, io) in [
            ("sendfile", "blocking"),
            ("splice", "epoll"),
            ("sendfile", "epoll"),
            ("splice", "blocking"),
        ] {
            let app = app(send, io);
            let (s, c) = run_pair(&app, &small, Duration::from_secs(60))?;
            both_ok(&app, &s, &c)?;
            let buf = c.send_buffer.unwrap_or(0);
            if floored && buf < 4 << 20 {
                return Err(failed!(
                    "{send}/{io}: the client's send buffer is {buf} B after keying, want at least the 4 MiB floor"
                ));
            }
            if !floored && buf >= 4 << 20 {
                return Err(failed!(
                    "{send}/{io}: the client's send buffer is {buf} B after keying; this kernel needs no floor and the core must leave it alone"
                ));
            }
            out.push(format!("{send}/{io}"));
        }
    }
    if !floored {
        return Ok(format!(
            "4 MiB each way from an 8 KiB send buffer, exact: {} (kernel >= 6.5: no floor applied, none needed)",
            out.join(", ")
        ));
    }
    let mut sa = NodeSpec::new("a");
    sa.send_buffer_floor = Some(0);
    let mut sb = NodeSpec::new("b");
    sb.send_buffer_floor = Some(0);
    let (_a, _b) = nodes(sa, sb)?;
    let control = match run_pair(
        &app("sendfile", "blocking"),
        &small,
        Duration::from_secs(15),
    ) {
        Ok((s, c)) if s.ok && c.ok => "completed (this kernel does not stall there)".to_string(),
        Ok((s, c)) => {
            return Err(failed!(
                "control without the floor failed: server {s}, client {c}"
            ));
        }
        Err(Failure::Hang(_)) => {
            "stalled for 15 s (the kernel's sendpage stall the floor prevents)".to_string()
        }
        Err(e) => return Err(e.context("control without the floor failed")),
    };
    Ok(format!(
        "4 MiB each way from an 8 KiB send buffer, exact: {} (the core raised it to 4 MiB); without the floor, sendfile/blocking {control}",
        out.join(", ")
    ))
}

pub fn ipv6_exchange() -> Outcome {
    let (a, b) = nodes(NodeSpec::new("a"), NodeSpec::new("b"))?;
    let apps = ["client-first", "server-first"].map(|mode| App {
        mode,
        server: POD_B6,
        ..App::exchange(100_000, PROTECTED_PORT)
    });
    captured_exchanges("ipv6", &a, &b, &apps)?;
    let local = a
        .keys()
        .first()
        .map(|k| k.local.to_string())
        .unwrap_or_default();
    if !local.starts_with("[fd00:1::2]") {
        return Err(failed!(
            "key export names {local}, not the IPv6 pod address"
        ));
    }
    Ok(format!(
        "2 IPv6 connections ({local} -> [{POD_B6}]:{PROTECTED_PORT}), both orders, exact; 4 flows TLS-only and decrypted"
    ))
}

/// Dual-stack sockets: `AF_INET6` sockets that talk IPv4 through v4-mapped
/// addresses (`::ffff:10.0.2.2`), which servers listening on `[::]`
/// (Node.js, Java) and clients that open IPv6 sockets for every address
/// (Java) use by default. The kernel reports such a connection's
/// addresses v4-mapped (the sockops program, the connect hook, the
/// socket's own fields); the policy is kept v4-mapped too, and the core
/// reads them back as IPv4, so both ends agree with an IPv4 peer on
/// selection and on the connection's identity (which key-only providers
/// derive keys from). Each combination, both orders, exact and decrypted,
/// and the same to the plain port as the control; with an in-band
/// handshake provider (OpenSSL) and a key-only one (TLSHub, keys from the
/// connection's identity).
pub fn dual_stack_exchange() -> Outcome {
    let mut apps = Vec::new();
    for (listen_dual_stack, connect_v4_mapped) in [(true, false), (false, true), (true, true)] {
        for mode in ["client-first", "server-first"] {
            apps.push(App {
                mode,
                listen_dual_stack,
                connect_v4_mapped,
                ..App::exchange(10_000, PROTECTED_PORT)
            });
        }
    }
    apps.push(App {
        listen_dual_stack: true,
        connect_v4_mapped: true,
        ..App::exchange(10_000, PLAIN_PORT)
    });
    let mut decrypted = Vec::new();
    for kind in [ProviderKind::OpenSsl, ProviderKind::TlsHub] {
        let (a, b) = nodes_with_provider(kind)?;
        let report = captured_exchanges(&format!("dual-stack-{}", kind.name()), &a, &b, &apps)?;
        report.expect_at_least(1, 12)?;
        let keyed: Vec<_> = a.keys().into_iter().chain(b.keys()).collect();
        if let Some(k) = keyed
            .iter()
            .find(|k| !k.local.is_ipv4() || !k.remote.is_ipv4())
        {
            return Err(failed!(
                "{}: keys exported for {} -> {}: want the IPv4 addresses, not v4-mapped ones",
                kind.name(),
                k.local,
                k.remote
            ));
        }
        decrypted.push(format!("{} {}", kind.name(), report.decrypted));
    }
    Ok(format!(
        "6 connections over dual-stack sockets ([::] listener, [::ffff:{POD_B}] client, both), both orders, exact, per provider; flows TLS-only and decrypted: {}; the plain control in clear; keys named by IPv4 addresses",
        decrypted.join(", ")
    ))
}

/// Many connections keyed at the same time: 8 client processes with 25
/// connections each against a server that serves every connection on its
/// own thread.
pub fn concurrent_keying() -> Outcome {
    // Why a longer key timeout than the default 2 s: the server's keying
    // starts only when it accepts, and every hold stops the whole server
    // process (its accept loop too) for one handshake, so under TCG the
    // eighth of eight simultaneous connections was accepted after the
    // client's handshake had waited 1.6 s and was reset (ARCHITECTURE.md,
    // "Data flow", step 4). This scenario is about correctness under
    // concurrency; the latency is the benchmark's.
    let spec = |name| NodeSpec {
        key_timeout_ms: 10_000,
        ..NodeSpec::new(name)
    };
    let (a, b) = nodes(spec("a"), spec("b"))?;
    let (clients, each) = (8u32, 25u32);
    let total = clients * each;
    let app = App {
        mode: "echo",
        connections: each,
        ..App::exchange(1, PROTECTED_PORT)
    };
    let (listen, connect) = app.addresses();
    let mut sargv: Vec<String> = [
        "tlshub-testapp",
        "server",
        "--parallel",
        "--listen",
        &listen,
    ]
    .map(String::from)
    .to_vec();
    sargv.extend(
        App {
            connections: total,
            ..app.clone()
        }
        .args(),
    );
    let sargv: Vec<&str> = sargv.iter().map(String::as_str).collect();
    let server = spawn_ready("pod-b", &sargv, "listening", Duration::from_secs(10))?;
    let started = Instant::now();
    let mut children = Vec::new();
    for _ in 0..clients {
        let mut cargv: Vec<String> = ["tlshub-testapp", "client", "--connect", &connect]
            .map(String::from)
            .to_vec();
        cargv.extend(app.args());
        let cargv: Vec<&str> = cargv.iter().map(String::as_str).collect();
        children.push(process::spawn_app("pod-a", &cargv)?);
    }
    for child in children {
        let c = app_report(&finish(child, Duration::from_secs(300))?)?;
        if !c.ok {
            return Err(failed!("a concurrent client failed: {c}"));
        }
    }
    let s = app_report(&finish(server, Duration::from_secs(60))?)?;
    if !s.ok || s.connections != total {
        return Err(failed!("server: {s}"));
    }
    let took = started.elapsed().as_secs_f64();
    let want = u64::from(total);
    let (pa, pb) = (
        a.stat_reaching(|s| s.protected, want),
        b.stat_reaching(|s| s.protected, want),
    );
    if pa != u64::from(total) || pb != u64::from(total) {
        return Err(failed!("protected A {pa} B {pb}, want {total} each"));
    }
    Ok(format!(
        "{total} connections from {clients} concurrent clients, all exact, all keyed on both nodes in {took:.1}s"
    ))
}
