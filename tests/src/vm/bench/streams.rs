//! `bench` part four: established connections (request/response and
//! eight streams).

use super::*;
use crate::vm::outcome::{Failure, Outcome};

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
pub fn request_response_and_streams() -> Outcome {
    let mut lines = Vec::new();
    // Label -> (transactions/s, round trip p99, streams bytes/s).
    let mut figures: HashMap<&'static str, (f64, u64, f64)> = HashMap::new();
    let mut measure = |label: &'static str, target: &App| -> Result<(), Failure> {
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
