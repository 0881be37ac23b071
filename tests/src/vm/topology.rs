//! Two nodes as network namespaces joined by a veth, each with a pod
//! namespace routed through it:
//!
//! ```text
//!  pod-a 10.0.1.2 --pa/ap-- node-a 10.99.0.1 --ab/ba-- 10.99.0.2 node-b --bp/pb-- 10.0.2.2 pod-b
//!                             |
//!  pod-a2 10.0.3.2 --pc/cp----+  (a second pod on node a, for same-node traffic)
//! ```
//!
//! Cores and providers run in the root namespace (they need no network);
//! the applications run in the pod namespaces. The wire between the nodes
//! is interface `ab` in `node-a`.

use super::process::run;
use crate::vm::outcome::Failure;

/// Pod A's address.
pub const POD_A: &str = "10.0.1.2";
/// Pod B's address.
pub const POD_B: &str = "10.0.2.2";
/// The second pod on node a (same-node traffic; its link is `cp` in `node-a`).
pub const POD_A2: &str = "10.0.3.2";
/// Node a's end of pod-a2's link: every byte between pod-a and pod-a2
/// crosses it, and nothing else does.
pub const POD_A2_IF: &str = "cp";
/// Pod B's IPv6 address.
pub const POD_B6: &str = "fd00:2::2";
/// The node-to-node interface, in `node-a`.
pub const WIRE_IF: &str = "ab";
/// Namespace names.
pub const NAMESPACES: [&str; 5] = ["node-a", "node-b", "pod-a", "pod-b", "pod-a2"];

/// The topology; removed when dropped.
#[derive(Debug)]
pub struct Topology;

impl Topology {
    /// Builds it.
    pub fn up() -> Result<Self, Failure> {
        let t = Topology;
        for ns in NAMESPACES {
            run(None, &["ip", "netns", "add", ns])?;
            run(Some(ns), &["ip", "link", "set", "lo", "up"])?;
        }
        for (a, a_ns, b, b_ns) in [
            ("ab", "node-a", "ba", "node-b"),
            ("pa", "pod-a", "ap", "node-a"),
            ("pb", "pod-b", "bp", "node-b"),
            ("pc", "pod-a2", "cp", "node-a"),
        ] {
            run(
                None,
                &["ip", "link", "add", a, "type", "veth", "peer", "name", b],
            )?;
            run(None, &["ip", "link", "set", a, "netns", a_ns])?;
            run(None, &["ip", "link", "set", b, "netns", b_ns])?;
        }
        for (ns, addr, dev) in [
            ("node-a", "10.99.0.1/30", "ab"),
            ("node-b", "10.99.0.2/30", "ba"),
            ("node-a", "10.0.1.1/24", "ap"),
            ("pod-a", "10.0.1.2/24", "pa"),
            ("node-b", "10.0.2.1/24", "bp"),
            ("pod-b", "10.0.2.2/24", "pb"),
            ("node-a", "10.0.3.1/24", "cp"),
            ("pod-a2", "10.0.3.2/24", "pc"),
        ] {
            run(Some(ns), &["ip", "addr", "add", addr, "dev", dev])?;
            run(Some(ns), &["ip", "link", "set", dev, "up"])?;
        }
        run(
            Some("pod-a"),
            &["ip", "route", "add", "default", "via", "10.0.1.1"],
        )?;
        run(
            Some("pod-b"),
            &["ip", "route", "add", "default", "via", "10.0.2.1"],
        )?;
        run(
            Some("pod-a2"),
            &["ip", "route", "add", "default", "via", "10.0.3.1"],
        )?;
        run(
            Some("node-a"),
            &["ip", "route", "add", "10.0.2.0/24", "via", "10.99.0.2"],
        )?;
        run(
            Some("node-b"),
            &["ip", "route", "add", "10.0.1.0/24", "via", "10.99.0.1"],
        )?;
        for ns in ["node-a", "node-b"] {
            run(
                Some(ns),
                &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"],
            )?;
        }
        // IPv6 alongside (nodad: usable at once, no duplicate detection wait).
        for (ns, addr, dev) in [
            ("node-a", "fd00:99::1/64", "ab"),
            ("node-b", "fd00:99::2/64", "ba"),
            ("node-a", "fd00:1::1/64", "ap"),
            ("pod-a", "fd00:1::2/64", "pa"),
            ("node-b", "fd00:2::1/64", "bp"),
            ("pod-b", "fd00:2::2/64", "pb"),
        ] {
            run(
                Some(ns),
                &["ip", "-6", "addr", "add", addr, "dev", dev, "nodad"],
            )?;
        }
        for (ns, dst, via) in [
            ("pod-a", "default", "fd00:1::1"),
            ("pod-b", "default", "fd00:2::1"),
            ("node-a", "fd00:2::/64", "fd00:99::2"),
            ("node-b", "fd00:1::/64", "fd00:99::1"),
        ] {
            run(Some(ns), &["ip", "-6", "route", "add", dst, "via", via])?;
        }
        for ns in ["node-a", "node-b"] {
            run(
                Some(ns),
                &[
                    "sh",
                    "-c",
                    "echo 1 > /proc/sys/net/ipv6/conf/all/forwarding",
                ],
            )?;
        }
        run(Some("pod-a"), &["ping", "-c", "1", "-W", "5", POD_B])
            .map_err(|e| e.context("pods cannot reach each other"))?;
        run(Some("pod-a"), &["ping", "-c", "1", "-W", "5", POD_A2])
            .map_err(|e| e.context("pods on one node cannot reach each other"))?;
        run(Some("pod-a"), &["ping", "-c", "1", "-W", "5", POD_B6])
            .map_err(|e| e.context("pods cannot reach each other over IPv6"))?;
        Ok(t)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in NAMESPACES {
            let _ = run(None, &["ip", "netns", "del", ns]);
        }
    }
}
