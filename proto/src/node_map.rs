//! Which node owns which pod addresses: one file for every provider of a
//! node. A handshake provider checks that the peer's certificate names the
//! node that owns the peer's address (`[tls] node_map`); the TLSHub
//! provider finds the address of the node that hosts the server pod
//! (`node_map`, layout v2):
//!
//! ```toml
//! [[node]]
//! name = "node-a"                           # the DNS name in its certificate
//! address = "192.168.0.1"                   # the node's own address
//! pod_cidrs = ["10.0.1.0/24", "fd00:1::/64"]
//! ```

use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;

use crate::cidr::Cidr;
use crate::runtime::{ConfigError, load_toml};

/// One node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Its name: a DNS name (subjectAltName) of its certificate.
    pub name: String,
    /// The node's own address, as the TLSHub kernel module addresses the
    /// node (needed only by the TLSHub provider's layout v2).
    #[serde(default)]
    pub address: Option<IpAddr>,
    /// The addresses of its pods.
    pub pod_cidrs: Vec<Cidr>,
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeMap {
    /// Every node of the cluster.
    #[serde(default, rename = "node")]
    pub nodes: Vec<Node>,
}

impl NodeMap {
    /// Reads and parses `path`; errors name the file, line and key.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load_toml(path)
    }

    /// The node whose pods include `ip` (the longest prefix wins).
    pub fn node_for(&self, ip: IpAddr) -> Option<&Node> {
        self.nodes
            .iter()
            .flat_map(|n| n.pod_cidrs.iter().map(move |c| (c, n)))
            .filter(|(c, _)| c.contains(ip))
            .max_by_key(|(c, _)| c.mapped_prefix())
            .map(|(_, n)| n)
    }

    /// The name of [`Self::node_for`].
    pub fn node_of(&self, ip: IpAddr) -> Option<&str> {
        self.node_for(ip).map(|n| n.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_prefix_names_the_node() {
        let map: NodeMap = toml::from_str(
            "[[node]]\nname = \"node-a\"\npod_cidrs = [\"10.0.0.0/16\", \"fd00:1::/64\"]\n[[node]]\nname = \"node-b\"\npod_cidrs = [\"10.0.2.0/24\"]\n",
        )
        .unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(map.node_of(ip("10.0.1.2")), Some("node-a"));
        assert_eq!(map.node_of(ip("10.0.2.2")), Some("node-b"));
        assert_eq!(map.node_of(ip("::ffff:10.0.2.2")), Some("node-b"));
        assert_eq!(map.node_of(ip("fd00:1::2")), Some("node-a"));
        assert_eq!(map.node_of(ip("192.0.2.1")), None);
    }

    #[test]
    fn the_shipped_example_parses() {
        let map: NodeMap = toml::from_str(include_str!("../../deploy/config/nodes.toml")).unwrap();
        assert_eq!(map.node_of("10.0.2.7".parse().unwrap()), Some("node-b"));
        let b = map.node_for("10.0.2.7".parse().unwrap()).unwrap();
        assert!(
            b.address.is_some(),
            "the example gives every node its address"
        );
    }

    #[test]
    fn a_bad_cidr_is_an_error_naming_the_key() {
        let e =
            toml::from_str::<NodeMap>("[[node]]\nname = \"a\"\npod_cidrs = [\"10.0.0.0/40\"]\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("pod_cidrs") || e.contains("prefix"), "{e}");
    }
}
