//! The providers: TLSHub with the stand-in module, OpenSSL and BoringSSL
//! together, and the conformance suite against every provider. Their
//! credentials (reloads, rotation, the peer's node) are in `credentials`.

use std::time::{Duration, Instant};

use super::node::{NodeSpec, PROTECTED_PORT, ProviderKind};
use super::process::{self};
use super::support::*;
use super::wire_check::*;
use crate::failed;
use crate::vm::outcome::Outcome;

/// Both nodes keyed by the TLSHub provider (layout v2), with the stand-in
/// module doing a real node-level mutual TLS handshake between the nodes.
pub fn tlshub_provider() -> Outcome {
    let mut sa = NodeSpec::new("a");
    sa.provider = ProviderKind::TlsHub;
    let mut sb = NodeSpec::new("b");
    sb.provider = ProviderKind::TlsHub;
    let (a, b) = nodes(sa, sb)?;
    let apps = ["client-first", "server-first"].map(|mode| App {
        mode,
        ..App::exchange(100_000, PROTECTED_PORT)
    });
    let report = captured_exchanges("tlshub", &a, &b, &apps)?;
    let standin = std::fs::read_to_string("/tmp/logs/node-b-standin.log").unwrap_or_default();
    if !standin.contains("node handshake from 10.99.0.1") {
        return Err(failed!(
            "no node-level handshake seen by node B's stand-in: {standin}"
        ));
    }
    // The provider's own metrics (the SDK's, `metrics_listen`) agree with
    // the core's: every key it was asked for answered, none failed.
    for n in [&a, &b] {
        let core = metric(
            &n.metrics()?,
            "tlshub_connections_protected_total{provider=\"tlshub\"}",
        );
        let own = n.provider_requests(ProviderKind::TlsHub)?;
        if core < 2.0 || own.answered < core || own.failed > 0.0 {
            return Err(failed!(
                "node {}: the TLSHub provider's metrics say {} answered, {} failed; the core keyed {core}:\n{}",
                n.spec.name,
                own.answered,
                own.failed,
                own.text
            ));
        }
    }
    Ok(format!(
        "2 connections keyed from the stand-in module's per-4-tuple master key (node handshake 10.99.0.1 -> 10.99.0.2); {} flows TLS-only and decrypted; the provider's own metrics agree with the core's",
        report.decrypted
    ))
}

/// Key-only providers key from establishment: a blocking server accepts
/// each of its connections 1.5 s after it arrived, and its node's keys
/// are ready before `accept()` returns (every server-side connection
/// counted `keyed_before_owner`), for the TLSHub provider and the SDK's
/// example; exact bytes, TLS-only wire that decrypts. One connection
/// first, not counted: TLSHub's first one waits for the node handshake.
/// Reports, for the server side, how long its app was held (only the
/// install was left) against the provider's key time.
pub fn keys_before_accept() -> Outcome {
    const CONNECTIONS: u64 = 5;
    let mut out = Vec::new();
    for kind in [ProviderKind::TlsHub, ProviderKind::ExamplePsk] {
        let (a, b) = nodes_with_provider(kind)?;
        let first = App::exchange(100, PROTECTED_PORT);
        let late = App {
            connections: CONNECTIONS as u32,
            accept_delay_ms: 1500,
            ..App::exchange(10_000, PROTECTED_PORT)
        };
        captured_exchanges(&format!("first-{}", kind.name()), &a, &b, &[first])?;
        // The stats file is rewritten once a second: wait for the first.
        b.stat_reaching(|s| s.protected, 1);
        let before = b.stats()?;
        let wire = captured_exchanges(&format!("early-{}", kind.name()), &a, &b, &[late])?;
        let want = before.keyed_before_owner + CONNECTIONS;
        b.stat_reaching(|s| s.keyed_before_owner, want);
        let after = b.stats()?;
        let early = after.keyed_before_owner - before.keyed_before_owner;
        let protected = after.protected - before.protected;
        // This run's samples: the newest ones.
        let held = after
            .held_micros
            .newest((after.gate_stops - before.gate_stops) as usize);
        let keyed = after.key_micros.newest(protected as usize);
        let figures = format!(
            "{}: server side {early} of {protected} keyed before accept() returned; its app held {} times, p50 {} us, against a key time p50 of {} us; {} flows decrypted",
            kind.name(),
            held.len(),
            percentile(&held, 0.5),
            percentile(&keyed, 0.5),
            wire.decrypted
        );
        if early != CONNECTIONS || protected != CONNECTIONS {
            return Err(failed!(
                "want all {CONNECTIONS} server-side connections keyed before accept(): {figures}"
            ));
        }
        out.push(figures);
    }
    Ok(out.join("; "))
}

/// The stand-in's node secret expires (status -2); the provider starts a
/// new node handshake and the next connection is keyed from the new secret.
pub fn tlshub_expiry() -> Outcome {
    let (mut sa, mut sb) = (NodeSpec::new("a"), NodeSpec::new("b"));
    for s in [&mut sa, &mut sb] {
        s.provider = ProviderKind::TlsHub;
        s.standin_lifetime_ms = 1500;
    }
    let (a, b) = nodes(sa, sb)?;
    let app = App::exchange(10_000, PROTECTED_PORT);
    captured_exchanges("expiry1", &a, &b, std::slice::from_ref(&app))?;
    std::thread::sleep(Duration::from_millis(2000));
    captured_exchanges("expiry2", &a, &b, std::slice::from_ref(&app))?;
    let standin = std::fs::read_to_string("/tmp/logs/node-b-standin.log").unwrap_or_default();
    let handshakes = standin.matches("node handshake from 10.99.0.1").count();
    if handshakes != 2 {
        return Err(failed!(
            "node B saw {handshakes} node handshakes, want 2 (one per secret): {standin}"
        ));
    }
    let (ka, kb) = (a.keys(), b.keys());
    if ka.len() != 2 || kb.len() != 2 || ka[0].tx_key == ka[1].tx_key {
        return Err(failed!(
            "expected two keyed connections with different keys, got {} and {}",
            ka.len(),
            kb.len()
        ));
    }
    Ok("after expiry (-2) the provider re-handshook and keyed the next connection; both exchanges exact and decrypted".into())
}

/// OpenSSL and BoringSSL nodes in both client and server roles: each
/// pairing keys the connection and the capture decrypts (BoringSSL on both
/// nodes is in `conformance_suite_all_providers`).
pub fn boringssl_interop() -> Outcome {
    let mut out = Vec::new();
    for (pa, pb, label) in [
        (
            ProviderKind::OpenSsl,
            ProviderKind::BoringSsl,
            "openssl client->boringssl server",
        ),
        (
            ProviderKind::BoringSsl,
            ProviderKind::OpenSsl,
            "boringssl client->openssl server",
        ),
    ] {
        let (mut sa, mut sb) = (NodeSpec::new("a"), NodeSpec::new("b"));
        sa.provider = pa;
        sb.provider = pb;
        let (a, b) = nodes(sa, sb)?;
        let apps = ["client-first", "server-first"].map(|mode| App {
            mode,
            ..App::exchange(100_000, PROTECTED_PORT)
        });
        captured_exchanges("interop", &a, &b, &apps).map_err(|e| e.context(label))?;
        out.push(format!("{label} ({})", a.first_key_suite()));
    }
    Ok(format!(
        "exact both ways, TLS-only and decrypted: {}",
        out.join(", ")
    ))
}

/// The conformance suite against each provider, the SDK's example
/// included: `tlshub-conformance` on two node instances (1,000 concurrent
/// requests), then the two-node kernel exchange (client writes first, server
/// writes first) with the capture decrypted.
pub fn conformance_all() -> Outcome {
    let mut out = Vec::new();
    for (label, kind) in [
        ("openssl", ProviderKind::OpenSsl),
        ("boringssl", ProviderKind::BoringSsl),
        ("tlshub", ProviderKind::TlsHub),
        ("example-psk", ProviderKind::ExamplePsk),
    ] {
        let (mut sa, mut sb) = (NodeSpec::new("a"), NodeSpec::new("b"));
        sa.provider = kind;
        sb.provider = kind;
        // The suite handshakes the two providers over loopback, an address
        // that cannot be both nodes' (the node check has its own scenario).
        sa.node_map = false;
        sb.node_map = false;
        let (a, b) = nodes(sa, sb)?;
        let (pa, pb) = (a.provider_socket(kind), b.provider_socket(kind));
        let started = Instant::now();
        let run = process::command(
            None,
            &[
                "tlshub-conformance",
                "--node-a",
                &pa.to_string_lossy(),
                "--node-b",
                &pb.to_string_lossy(),
                "--concurrency",
                "1000",
            ],
        )
        .output()
        .map_err(|e| format!("cannot run tlshub-conformance: {e}"))?;
        let text = String::from_utf8_lossy(&run.stdout).into_owned();
        if !run.status.success() {
            return Err(failed!(
                "{label}:\n{text}{}",
                String::from_utf8_lossy(&run.stderr)
            ));
        }
        let summary = text.lines().last().unwrap_or("").to_string();
        let apps = ["client-first", "server-first"].map(|mode| App {
            mode,
            ..App::exchange(100_000, PROTECTED_PORT)
        });
        let report = captured_exchanges("conformance", &a, &b, &apps)
            .map_err(|e| e.context(format!("{label} two-node exchange")))?;
        out.push(format!(
            "{label}: {summary}, two-node exchange {} flows decrypted ({:.0}s)",
            report.decrypted,
            started.elapsed().as_secs_f64()
        ));
        for l in text.lines() {
            println!("  [{label}] {l}");
        }
    }
    Ok(out.join("; "))
}
