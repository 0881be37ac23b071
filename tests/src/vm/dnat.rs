//! Services: a client connects to a virtual address that node a translates
//! (DNAT in its prerouting, as kube-proxy does) to a pod on node b. The
//! client's socket names the virtual address, so only the core's lookup in
//! node a's connection tracking table tells where it goes.

use std::time::Duration;

use super::node::{Node, NodeSpec, PLAIN_PORT, PROTECTED_PORT, ProviderKind};
use super::process;
use super::support::{App, both_ok, expect_reset, expect_server_failed_clean, nodes, run_pair};
use super::topology::{POD_B, POD_B6};
use super::wire_check::{Capture, captured_exchanges, check_wire};
use crate::failed;
use crate::vm::outcome::{Failure, Outcome};

/// The service range node a's policy holds.
const SERVICE_CIDR: &str = "10.96.0.0/12";
/// Translated to pod b's protected port.
const TO_PROTECTED: &str = "10.96.0.10";
/// Translated to pod b's plain port (no rule selects it).
const TO_PLAIN: &str = "10.96.0.11";
/// Translated to pod b's protected port, and masqueraded on the way out
/// (node b sees node a's address, which it does not select).
const TO_PROTECTED_MASQUERADED: &str = "10.96.0.12";
/// The port every service address listens on.
const SERVICE_PORT: u16 = 80;
/// The IPv6 service range node a's policy holds.
const SERVICE_CIDR6: &str = "fd00:96::/64";
/// Translated to pod b's IPv6 address, protected port.
const TO_PROTECTED6: &str = "fd00:96::10";
/// The same as a host in an address with a port.
const TO_PROTECTED6_HOST: &str = "[fd00:96::10]";

/// node a's nftables NAT table for the three service addresses; deleted
/// when dropped.
struct ServiceNat;

impl ServiceNat {
    fn install() -> Result<Self, Failure> {
        let rules = format!(
            "table ip tlshub_test_nat {{
  chain prerouting {{
    type nat hook prerouting priority dstnat;
    ip daddr {TO_PROTECTED} tcp dport {SERVICE_PORT} dnat to {POD_B}:{PROTECTED_PORT}
    ip daddr {TO_PLAIN} tcp dport {SERVICE_PORT} dnat to {POD_B}:{PLAIN_PORT}
    ip daddr {TO_PROTECTED_MASQUERADED} tcp dport {SERVICE_PORT} dnat to {POD_B}:{PROTECTED_PORT}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat;
    ct original ip daddr {TO_PROTECTED_MASQUERADED} masquerade
  }}
}}
table ip6 tlshub_test_nat6 {{
  chain prerouting {{
    type nat hook prerouting priority dstnat;
    ip6 daddr {TO_PROTECTED6} tcp dport {SERVICE_PORT} dnat to [{POD_B6}]:{PROTECTED_PORT}
  }}
}}
"
        );
        let path = "/tmp/tlshub-test-nat.nft";
        std::fs::write(path, rules).map_err(|e| format!("{path}: {e}"))?;
        let guard = ServiceNat;
        process::run(Some("node-a"), &["nft", "-f", path])
            .map_err(|e| e.context("cannot install node a's service NAT"))?;
        Ok(guard)
    }
}

impl Drop for ServiceNat {
    fn drop(&mut self) {
        for (family, table) in [("ip", "tlshub_test_nat"), ("ip6", "tlshub_test_nat6")] {
            let _ = process::run(Some("node-a"), &["nft", "delete", "table", family, table]);
        }
    }
}

/// Node a holds the service range; node b is as usual (it sees the
/// backend's own address as its local end).
fn service_nodes(provider: ProviderKind) -> Result<(Node, Node), Failure> {
    nodes(
        NodeSpec {
            service_cidrs: vec![SERVICE_CIDR, SERVICE_CIDR6],
            ..NodeSpec::with_provider("a", provider)
        },
        NodeSpec::with_provider("b", provider),
    )
}

/// A client-first exchange to `service` (port 80) that node a translates
/// to pod b's `port`.
fn via_service(service: &'static str, port: u16, size: usize, io: &'static str) -> App {
    App {
        proxy: Some((service, SERVICE_PORT)),
        io,
        connections: 2,
        ..App::exchange(size, port)
    }
}

/// The reproduction, with every provider: a client in pod a
/// connects to a service address translated to pod b's protected port and
/// writes first (blocking, an epoll loop, and over IPv6 but with TLSHub,
/// whose provider keys IPv4 only). Before this, the client side
/// did not select it, its first bytes crossed in clear, and node b's core
/// reset the connection. Now every exchange is exact, the wire between the
/// nodes carries only TLS that decrypts with the keys both cores exported
/// for the translated tuple (so a key-only provider keyed both ends from
/// the same tuple), node a lists the backend as the remote end (in its key log), and a plain
/// control (directly to the plain port) shows its marker.
pub fn to_a_selected_backend() -> Outcome {
    load_nat_modules()?;
    let _nat = ServiceNat::install()?;
    let mut summary = Vec::new();
    for provider in [
        ProviderKind::OpenSsl,
        ProviderKind::BoringSsl,
        ProviderKind::TlsHub,
    ] {
        let (a, b) = service_nodes(provider)?;
        let mut apps = vec![
            via_service(TO_PROTECTED, PROTECTED_PORT, 100_000, "blocking"),
            via_service(TO_PROTECTED, PROTECTED_PORT, 4096, "epoll"),
            App::exchange(1000, PLAIN_PORT),
        ];
        // The TLSHub provider keys IPv4 only (its module's protocol).
        let over_ipv6 = usize::from(provider != ProviderKind::TlsHub);
        if over_ipv6 == 1 {
            apps.push(App {
                server: POD_B6,
                proxy: Some((TO_PROTECTED6_HOST, SERVICE_PORT)),
                ..App::exchange(10_000, PROTECTED_PORT)
            });
        }
        let want = 4 + over_ipv6;
        let report =
            captured_exchanges(&format!("dnat-{provider:?}"), &a, &b, &apps).map_err(|e| {
                e.map_message(|m| {
                    format!("{provider:?}: {m}; node a's core said: {}", warnings(&a))
                })
            })?;
        report.expect_at_least(1, 0)?;
        let keyed = a.stat_reaching(|s| s.protected, want as u64);
        if keyed != want as u64 {
            return Err(failed!(
                "{provider:?}: node a protected {keyed} of {want} service connections"
            ));
        }
        // Keyed with the backend as the remote end (the wire check found
        // each flow's keys by the translated tuple already).
        let backends: [std::net::SocketAddr; 2] = [
            (
                POD_B
                    .parse::<std::net::IpAddr>()
                    .map_err(|e| e.to_string())?,
                PROTECTED_PORT,
            )
                .into(),
            (
                POD_B6
                    .parse::<std::net::IpAddr>()
                    .map_err(|e| e.to_string())?,
                PROTECTED_PORT,
            )
                .into(),
        ];
        let keys = a.keys();
        let count = |b: &std::net::SocketAddr| keys.iter().filter(|k| k.remote == *b).count();
        if keys.len() != want || count(&backends[0]) != 4 || count(&backends[1]) != over_ipv6 {
            let remotes: Vec<String> = keys.iter().map(|k| k.remote.to_string()).collect();
            return Err(failed!(
                "{provider:?}: node a keyed remote ends {remotes:?}, want {} four times and {} {over_ipv6} time(s)",
                backends[0],
                backends[1]
            ));
        }
        summary.push(format!(
            "{provider:?}: {want} exact ({over_ipv6} over IPv6), {} flows decrypted",
            report.decrypted
        ));
    }
    Ok(format!(
        "{}; every service connection keyed with its backend, the control stayed plain",
        summary.join("; ")
    ))
}

/// The two other outcomes of a service connection, under one capture:
/// - translated to a port no rule selects: held until node a's core read
///   the translation, then let through as plain (exact both ways, its
///   marker on the wire, counted as `service_plain`, nothing keyed);
/// - translated to the protected port but masqueraded on the way (node b
///   sees node a's address, so the two ends cannot agree on the
///   connection): refused before any byte left (the client is reset, the
///   server receives nothing, no marker on the wire, counted as failed with
///   `service_source_nat`).
pub fn unselected_backend_plain_and_source_nat_refused() -> Outcome {
    load_nat_modules()?;
    let _nat = ServiceNat::install()?;
    let (a, b) = service_nodes(ProviderKind::OpenSsl)?;
    let cap = Capture::start("dnat-plain-snat")?;
    let plain = via_service(TO_PLAIN, PLAIN_PORT, 10_000, "blocking");
    let (s, c) = run_pair(&plain, &[], Duration::from_secs(60))?;
    both_ok(&plain, &s, &c)?;
    let epoll_plain = via_service(TO_PLAIN, PLAIN_PORT, 4096, "epoll");
    let (s, c) = run_pair(&epoll_plain, &[], Duration::from_secs(60))?;
    both_ok(&epoll_plain, &s, &c)?;
    let masqueraded = App {
        connections: 1,
        ..via_service(TO_PROTECTED_MASQUERADED, PROTECTED_PORT, 4096, "blocking")
    };
    let (s, c) = run_pair(&masqueraded, &[], Duration::from_secs(60))?;
    expect_reset(&c)?;
    expect_server_failed_clean(&s)?;
    let report = check_wire(&cap.finish()?, &a, &b)?;
    report.expect_at_least(4, 0)?;
    // The stats file is rewritten once a second: wait for both counts.
    let plain_count = a.stat_reaching(|s| s.service_plain, 4);
    let refused = a.stat_reaching(
        |s| s.failed.get("service_source_nat").copied().unwrap_or(0),
        1,
    );
    let stats = a.stats()?;
    if plain_count != 4 || refused != 1 || stats.protected != 0 {
        return Err(failed!(
            "node a: service_plain {plain_count} (want 4), source NAT refusals {refused} (want 1), protected {} (want 0); failed {:?}",
            stats.protected,
            stats.failed
        ));
    }
    let metrics = a.metrics()?;
    if !metrics.contains("tlshub_connections_service_plain_total 4") {
        return Err(failed!(
            "metrics lack the 4 plain service connections:\n{metrics}"
        ));
    }
    let status = a.status()?;
    if status.counters.as_ref().map(|c| c.service_plain) != Some(4) {
        return Err(failed!(
            "`tlshubctl status` does not count the 4: {status:?}"
        ));
    }
    Ok(format!(
        "4 connections to an unselected backend exact and plain (marker in {} flows); the masqueraded one reset before a byte left",
        report.plain_flows_with_marker
    ))
}

/// The warnings and errors in a node's core log (why a service connection
/// failed).
fn warnings(node: &Node) -> String {
    node.core_log()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect::<Vec<_>>()
        .join(" | ")
}

/// The NAT and conntrack modules (nft would load most on demand; the
/// core's ctnetlink lookups need `nf_conntrack_netlink` before it starts).
fn load_nat_modules() -> Result<(), Failure> {
    for m in [
        "nf_conntrack_netlink",
        "nft_chain_nat",
        "nft_nat",
        "nft_masq",
        "nft_ct",
    ] {
        process::run(None, &["modprobe", m]).map_err(|e| e.context(format!("modprobe {m}")))?;
    }
    Ok(())
}
