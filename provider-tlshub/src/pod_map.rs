//! The pod-to-node mapping: which node hosts a pod address, needed for
//! request layout v2. One entry per line, `POD_IP_OR_CIDR NODE_IP`; `#`
//! starts a comment; blank lines are ignored. The most specific entry wins.
//! A malformed line is an error that names the file and line; the caller
//! keeps its previous map when a reload fails.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    net: IpAddr,
    prefix: u8,
    node: Ipv4Addr,
}

fn masked(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

/// A parsed mapping.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodMap {
    entries: Vec<Entry>,
}

impl PodMap {
    /// Parses the text of `path`.
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
            let (addr, prefix) = match pod.split_once('/') {
                Some((a, p)) => (a, Some(p)),
                None => (pod, None),
            };
            let net: IpAddr = addr
                .parse()
                .map_err(|_| err(format!("`{addr}` is not an IP address")))?;
            let max = if net.is_ipv4() { 32 } else { 128 };
            let prefix = match prefix {
                None => max,
                Some(p) => p
                    .parse()
                    .ok()
                    .filter(|p| *p <= max)
                    .ok_or_else(|| err(format!("`{p}` is not a prefix length")))?,
            };
            let node: Ipv4Addr = node
                .parse()
                .map_err(|_| err(format!("`{node}` is not a node IPv4 address")))?;
            entries.push(Entry {
                net: masked(net, prefix),
                prefix,
                node,
            });
        }
        // Most specific first.
        entries.sort_by_key(|e| std::cmp::Reverse(e.prefix));
        Ok(Self { entries })
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, PodMapError> {
        let text = std::fs::read_to_string(path).map_err(|source| PodMapError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// The node hosting `pod`.
    pub fn node_of(&self, pod: IpAddr) -> Option<Ipv4Addr> {
        self.entries
            .iter()
            .find(|e| e.net.is_ipv4() == pod.is_ipv4() && masked(pod, e.prefix) == e.net)
            .map(|e| e.node)
    }
}

/// A mapping file that is re-read when it changes.
#[derive(Debug)]
pub struct WatchedPodMap {
    path: PathBuf,
    modified: Option<SystemTime>,
    map: PodMap,
}

impl WatchedPodMap {
    /// Loads `path` (an error here is fatal to the caller's start-up).
    pub fn open(path: &Path) -> Result<Self, PodMapError> {
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        Ok(Self {
            path: path.to_owned(),
            modified,
            map: PodMap::load(path)?,
        })
    }

    /// Re-reads the file if its modification time changed. On error the
    /// previous map stays in force and the error is returned for logging.
    pub fn refresh(&mut self) -> Result<bool, PodMapError> {
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if modified == self.modified {
            return Ok(false);
        }
        let map = PodMap::load(&self.path)?;
        self.map = map;
        self.modified = modified;
        Ok(true)
    }

    /// Re-reads the file whatever its modification time (`SIGHUP`). On
    /// error the previous map stays in force.
    pub fn reload(&mut self) -> Result<(), PodMapError> {
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        self.map = PodMap::load(&self.path)?;
        self.modified = modified;
        Ok(())
    }

    /// The map in force.
    pub fn map(&self) -> &PodMap {
        &self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn reload_on_change_keeps_the_old_map_on_error() {
        let dir = std::env::temp_dir().join(format!("tlshub-podmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pods");
        std::fs::write(&path, "10.0.1.0/24 192.168.0.1\n").unwrap();
        let mut w = WatchedPodMap::open(&path).unwrap();
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
        assert_eq!(
            w.map().node_of("10.0.1.1".parse().unwrap()),
            Some("192.168.0.3".parse().unwrap())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
