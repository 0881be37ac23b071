//! The pod-to-node mapping: which node hosts a pod address, needed for
//! request layout v2. It comes from one of two files:
//! - the cluster's node map (`node_map`), the TOML file the handshake
//!   providers read too ([`tlshub_provider_sdk::node_map`]), in which every
//!   node needs its IPv4 `address`;
//! - a pod map (`pod_map`): one entry per line, `POD_IP_OR_CIDR NODE_IP`;
//!   `#` starts a comment; blank lines are ignored.
//!
//! The most specific entry wins. A malformed line or node is an error that
//! names the file and the line or node; the caller keeps its previous map
//! when a reload fails.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use tlshub_provider_sdk::cidr::Cidr;
use tlshub_provider_sdk::file_stamp::FileStamp;
use tlshub_provider_sdk::node_map::NodeMap;
use tlshub_provider_sdk::runtime::ConfigError;

/// A mapping file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PodMapError {
    /// Unreadable.
    #[error("cannot read pod-to-node map {path}: {source}")]
    Read {
        /// The map file.
        path: PathBuf,
        /// The read's error.
        #[source]
        source: std::io::Error,
    },
    /// A malformed line.
    #[error("{path}:{line}: {reason} (want `POD_IP[/LEN] NODE_IPV4`)")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line.
        reason: String,
    },
    /// A node map that does not parse (the error names file, line and key).
    #[error(transparent)]
    NodeMap(#[from] ConfigError),
    /// A node of the node map without an IPv4 `address`.
    #[error("{path}: node `{node}` needs an IPv4 `address` for layout v2 (it has {address})")]
    NodeAddress {
        /// The file.
        path: PathBuf,
        /// The node's name.
        node: String,
        /// What it has instead (`none` or the address).
        address: String,
    },
}

/// Which file format a map is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapFormat {
    /// `POD_IP[/LEN] NODE_IPV4` lines (`pod_map`).
    Lines,
    /// The cluster's node map (`node_map`).
    NodeMap,
}

/// A parsed mapping: pod prefixes and their node, most specific first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodMap {
    entries: Vec<(Cidr, Ipv4Addr)>,
}

impl PodMap {
    fn sorted(mut entries: Vec<(Cidr, Ipv4Addr)>) -> Self {
        entries.sort_by_key(|(c, _)| std::cmp::Reverse(c.mapped_prefix()));
        Self { entries }
    }

    /// Parses the lines of `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, PodMapError> {
        let mut entries = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let err = |reason: String| PodMapError::Line {
                path: path.to_owned(),
                line: i + 1,
                reason,
            };
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [pod, node] = fields[..] else {
                return Err(err(format!("{} fields", fields.len())));
            };
            // A bare address is the prefix of that one address.
            let pod: Cidr = match pod.parse::<IpAddr>() {
                Ok(ip) => Cidr::host(ip),
                Err(_) => pod.parse().map_err(err)?,
            };
            let node: Ipv4Addr = node
                .parse()
                .map_err(|_| err(format!("`{node}` is not a node IPv4 address")))?;
            entries.push((pod, node));
        }
        Ok(Self::sorted(entries))
    }

    /// The mapping of a node map read from `path`: every node's pod CIDRs
    /// to its `address`, which must be IPv4 (the module's request carries
    /// an IPv4 node address).
    pub fn from_node_map(path: &Path, map: &NodeMap) -> Result<Self, PodMapError> {
        let mut entries = Vec::new();
        for node in &map.nodes {
            let Some(IpAddr::V4(address)) = node.address else {
                return Err(PodMapError::NodeAddress {
                    path: path.to_owned(),
                    node: node.name.clone(),
                    address: node.address.map_or("none".into(), |a| a.to_string()),
                });
            };
            entries.extend(node.pod_cidrs.iter().map(|c| (*c, address)));
        }
        Ok(Self::sorted(entries))
    }

    /// Reads and parses `path` in `format`.
    pub fn load(path: &Path, format: MapFormat) -> Result<Self, PodMapError> {
        match format {
            MapFormat::Lines => {
                let text = std::fs::read_to_string(path).map_err(|source| PodMapError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::parse(path, &text)
            }
            MapFormat::NodeMap => Self::from_node_map(path, &NodeMap::load(path)?),
        }
    }

    /// The node hosting `pod`.
    pub fn node_of(&self, pod: IpAddr) -> Option<Ipv4Addr> {
        self.entries
            .iter()
            .find(|(c, _)| c.contains(pod))
            .map(|(_, node)| *node)
    }
}

/// A mapping file that is re-read when it changes.
#[derive(Debug)]
pub struct WatchedPodMap {
    path: PathBuf,
    format: MapFormat,
    loaded: Option<FileStamp>,
    /// The version of the file that was refused last (`Some(None)`: an
    /// unreadable file), so it is refused once.
    refused: Option<Option<FileStamp>>,
    map: PodMap,
}

impl WatchedPodMap {
    /// Loads `path` (an error here is fatal to the caller's start-up).
    pub fn open(path: &Path, format: MapFormat) -> Result<Self, PodMapError> {
        let loaded = FileStamp::of(path);
        Ok(Self {
            path: path.to_owned(),
            format,
            loaded,
            refused: None,
            map: PodMap::load(path, format)?,
        })
    }

    /// Re-reads the file if it changed (see [`FileStamp`]). On error the
    /// previous map stays in force and the error is returned for logging,
    /// once per version of the file (it then counts as unchanged, see
    /// [`Self::is_refused`]).
    pub fn refresh(&mut self) -> Result<bool, PodMapError> {
        let now = FileStamp::of(&self.path);
        if now == self.loaded || self.refused == Some(now) {
            return Ok(false);
        }
        self.load(now).map(|()| true)
    }

    /// Re-reads the file whether or not it changed (`SIGHUP`). On error
    /// the previous map stays in force.
    pub fn reload(&mut self) -> Result<(), PodMapError> {
        self.load(FileStamp::of(&self.path))
    }

    fn load(&mut self, stamp: Option<FileStamp>) -> Result<(), PodMapError> {
        match PodMap::load(&self.path, self.format) {
            Ok(map) => {
                self.map = map;
                self.loaded = stamp;
                self.refused = None;
                Ok(())
            }
            Err(e) => {
                self.refused = Some(stamp);
                Err(e)
            }
        }
    }

    /// Whether the file on disk is one that was refused (the map in force
    /// is an older one).
    pub fn is_refused(&self) -> bool {
        self.refused.is_some()
    }

    /// The map in force.
    pub fn map(&self) -> &PodMap {
        &self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    #[test]
    fn longest_prefix_wins_and_comments_are_ignored() {
        let text = "# pods\n10.0.1.0/24 192.168.0.1\n\n10.0.1.7 192.168.0.9  # moved\nfd00:2::/64 192.168.0.2\n";
        let m = PodMap::parse(Path::new("/etc/tlshub/pods"), text).unwrap();
        assert_eq!(
            m.node_of("10.0.1.3".parse().unwrap()),
            Some("192.168.0.1".parse().unwrap())
        );
        assert_eq!(
            m.node_of("10.0.1.7".parse().unwrap()),
            Some("192.168.0.9".parse().unwrap())
        );
        assert_eq!(
            m.node_of("fd00:2::5".parse().unwrap()),
            Some("192.168.0.2".parse().unwrap())
        );
        assert_eq!(m.node_of("10.0.9.1".parse().unwrap()), None);
    }

    #[test]
    fn a_malformed_line_names_file_and_line() {
        let e = PodMap::parse(
            Path::new("/etc/tlshub/pods"),
            "10.0.1.0/24 192.168.0.1\n10.0.2.0/33 192.168.0.2\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("/etc/tlshub/pods:2:") && e.contains("33"),
            "{e}"
        );
        let e = PodMap::parse(Path::new("p"), "10.0.1.1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("p:1:") && e.contains("1 fields"), "{e}");
        let e = PodMap::parse(Path::new("p"), "10.0.1.1 fd00::1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("node IPv4"), "{e}");
    }

    #[test]
    fn the_node_map_gives_each_pod_cidr_its_node_address() {
        let path = Path::new("/etc/tlshub/nodes.toml");
        let nodes = |text: &str| toml::from_str::<NodeMap>(text).unwrap();
        let m = PodMap::from_node_map(
            path,
            &nodes(
                "[[node]]\nname = \"a\"\naddress = \"192.168.0.1\"\npod_cidrs = [\"10.0.0.0/16\"]\n\
                 [[node]]\nname = \"b\"\naddress = \"192.168.0.2\"\npod_cidrs = [\"10.0.2.0/24\", \"fd00:2::/64\"]\n",
            ),
        )
        .unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            m.node_of(ip("10.0.1.9")),
            Some("192.168.0.1".parse().unwrap())
        );
        assert_eq!(
            m.node_of(ip("10.0.2.9")),
            Some("192.168.0.2".parse().unwrap())
        );
        assert_eq!(
            m.node_of(ip("fd00:2::9")),
            Some("192.168.0.2".parse().unwrap())
        );
        assert_eq!(m.node_of(ip("10.1.0.1")), None);
        let e = PodMap::from_node_map(
            path,
            &nodes("[[node]]\nname = \"c\"\npod_cidrs = [\"10.0.3.0/24\"]\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("nodes.toml") && e.contains("`c`") && e.contains("none"),
            "{e}"
        );
        let e = PodMap::from_node_map(
            path,
            &nodes("[[node]]\nname = \"c\"\naddress = \"fd00::1\"\npod_cidrs = []\n"),
        )
        .unwrap_err();
        assert!(matches!(e, PodMapError::NodeAddress { .. }), "{e}");
    }

    #[test]
    fn the_shipped_node_map_serves_layout_v2() {
        let m = PodMap::from_node_map(
            Path::new("nodes.toml"),
            &toml::from_str(include_str!("../../deploy/config/nodes.toml")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            m.node_of("10.0.2.7".parse().unwrap()),
            Some("192.168.0.2".parse().unwrap())
        );
    }

    #[test]
    fn reload_on_change_keeps_the_old_map_on_error() {
        let dir = std::env::temp_dir().join(format!("tlshub-podmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pods");
        std::fs::write(&path, "10.0.1.0/24 192.168.0.1\n").unwrap();
        let mut w = WatchedPodMap::open(&path, MapFormat::Lines).unwrap();
        assert!(!w.refresh().unwrap());
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, "10.0.1.0/24 192.168.0.3\n").unwrap();
        let t = SystemTime::now() + std::time::Duration::from_secs(2);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(t)
            .unwrap();
        assert!(w.refresh().unwrap());
        assert_eq!(
            w.map().node_of("10.0.1.1".parse().unwrap()),
            Some("192.168.0.3".parse().unwrap())
        );
        std::fs::write(&path, "garbage\n").unwrap();
        let t2 = t + std::time::Duration::from_secs(2);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(t2)
            .unwrap();
        assert!(w.refresh().is_err());
        // Refused once: the same broken version is not reported again.
        assert!(!w.refresh().unwrap());
        assert!(w.is_refused());
        assert_eq!(
            w.map().node_of("10.0.1.1".parse().unwrap()),
            Some("192.168.0.3".parse().unwrap())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
