//! The peers this node has seen announce tlshub, remembered (in `[peers]
//! file`, across restarts) so that an opportunistic rule never lets a
//! connection with one of them through as plain again: once two nodes have
//! heard each other's announcement, a silent handshake between them is a
//! listener older than its node's programs (which never answers) or a
//! downgrade (the option stripped on the way, or the peer's tlshub gone),
//! and the connection is keyed as under a strict rule, so it is protected
//! or failed closed. See ARCHITECTURE.md, "Rollouts".
//!
//! A peer is a node when `[peers] node_map` names the node that owns the
//! address, else the address itself. [`PeerTable`] is the bookkeeping,
//! free of I/O; [`PeerMemory`] shares it between keying jobs and the admin
//! API and keeps the file.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tlshub_provider_sdk::node_map::NodeMap;
use tracing::{info, warn};

/// The layout of [`PeersFile`] this core writes and reads.
const FILE_VERSION: u32 = 1;

/// How many announced peers are remembered. Only selected connections that
/// reached `ESTABLISHED` with the option both ways add one, so the bound is
/// the size of the peer CIDRs; past it a new peer is not remembered (and a
/// warning says so) rather than growing without limit.
const MAX_ANNOUNCED: usize = 65_536;

/// How many peers that never announced get counters of their own (the
/// same bound as the silent-peer metric's series).
const MAX_SILENT: usize = 1_024;

/// The `[peers] file`: the peers that announced, with when they first did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeersFile {
    /// [`FILE_VERSION`].
    pub version: u32,
    /// Sorted by name.
    pub peers: Vec<AnnouncedPeer>,
}

/// One remembered peer in [`PeersFile`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnouncedPeer {
    /// A node name (from the node map) or an address.
    pub peer: String,
    /// Seconds since the Unix epoch.
    pub first_announced_unix: u64,
}

/// What is known of one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerEntry {
    /// When it first announced tlshub (Unix seconds); `None`: never, as far
    /// as this node remembers.
    pub first_announced_unix: Option<u64>,
    /// When it last did, since this core started.
    pub last_announced_unix: Option<u64>,
    /// Connections with it keyed and installed, since this core started.
    pub protected: u64,
    /// Connections with it let through as plain because it was silent
    /// under an opportunistic rule.
    pub plain: u64,
    /// Connections on which it was silent although it had announced
    /// before, keyed as under a strict rule instead of going plain.
    pub known_peer_silent: u64,
    /// Connections failed at once because it announced another keying
    /// protocol (strict rule, or remembered as compatible before).
    pub incompatible: u64,
    /// The keying byte it last announced (0: not said), since this core
    /// started.
    pub keying: Option<u8>,
    /// The address it was last seen at (for a node: one of its pods),
    /// since this core started.
    pub address: Option<IpAddr>,
}

/// What [`PeerTable::announced`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announced {
    /// A peer not remembered before: the file must be written.
    New,
    /// Remembered already.
    Known,
    /// Not remembered: [`MAX_ANNOUNCED`] peers are.
    Full,
}

/// Per-peer counters [`PeerTable::count`] keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// [`PeerEntry::protected`].
    Protected,
    /// [`PeerEntry::plain`].
    Plain,
    /// [`PeerEntry::known_peer_silent`].
    KnownPeerSilent,
    /// [`PeerEntry::incompatible`].
    Incompatible,
}

/// The peers, by name (no I/O).
#[derive(Debug, Default)]
pub struct PeerTable {
    peers: BTreeMap<String, PeerEntry>,
    announced: usize,
}

impl PeerTable {
    /// The table a [`PeersFile`] describes.
    pub fn from_file(file: &PeersFile) -> Self {
        let mut table = Self::default();
        for p in &file.peers {
            let entry = table.peers.entry(p.peer.clone()).or_default();
            if entry.first_announced_unix.is_none() {
                table.announced += 1;
            }
            entry.first_announced_unix = Some(p.first_announced_unix);
        }
        table
    }

    /// The announced peers, as the file holds them.
    pub fn to_file(&self) -> PeersFile {
        PeersFile {
            version: FILE_VERSION,
            peers: self
                .peers
                .iter()
                .filter_map(|(peer, e)| {
                    e.first_announced_unix.map(|t| AnnouncedPeer {
                        peer: peer.clone(),
                        first_announced_unix: t,
                    })
                })
                .collect(),
        }
    }

    /// Records that `peer` announced tlshub at `now`.
    pub fn announced(&mut self, peer: &str, now: u64) -> Announced {
        if let Some(e) = self.peers.get_mut(peer) {
            e.last_announced_unix = Some(now);
            if e.first_announced_unix.is_some() {
                return Announced::Known;
            }
        }
        if self.announced >= MAX_ANNOUNCED {
            return Announced::Full;
        }
        let e = self.peers.entry(peer.to_owned()).or_default();
        e.first_announced_unix = Some(now);
        e.last_announced_unix = Some(now);
        self.announced += 1;
        Announced::New
    }

    /// Whether `peer` announced tlshub before.
    pub fn remembers(&self, peer: &str) -> bool {
        self.peers
            .get(peer)
            .is_some_and(|e| e.first_announced_unix.is_some())
    }

    /// `peer`'s entry, made if missing: a peer never announced gets one
    /// only while fewer than [`MAX_SILENT`] such peers have one.
    fn entry(&mut self, peer: &str) -> Option<&mut PeerEntry> {
        let silent = self.peers.len() - self.announced;
        if !self.peers.contains_key(peer) && silent >= MAX_SILENT {
            return None;
        }
        Some(self.peers.entry(peer.to_owned()).or_default())
    }

    /// Adds one to `peer`'s `what`.
    pub fn count(&mut self, peer: &str, what: Counted) {
        let Some(entry) = self.entry(peer) else {
            return;
        };
        *match what {
            Counted::Protected => &mut entry.protected,
            Counted::Plain => &mut entry.plain,
            Counted::KnownPeerSilent => &mut entry.known_peer_silent,
            Counted::Incompatible => &mut entry.incompatible,
        } += 1;
    }

    /// Notes the keying byte `peer` announced.
    pub fn saw_keying(&mut self, peer: &str, keying: u8) {
        if let Some(entry) = self.entry(peer) {
            entry.keying = Some(keying);
        }
    }

    /// Notes where `peer` was seen (an entry it has already).
    fn seen_at(&mut self, peer: &str, ip: IpAddr) {
        if let Some(e) = self.peers.get_mut(peer) {
            e.address = Some(ip);
        }
    }

    /// Forgets that `peer` announced (its counters stay). Whether it had.
    pub fn forget(&mut self, peer: &str) -> bool {
        let Some(e) = self.peers.get_mut(peer) else {
            return false;
        };
        let had = e.first_announced_unix.take().is_some();
        e.last_announced_unix = None;
        if had {
            self.announced -= 1;
        }
        had
    }

    /// Forgets every announcement; the peers that had announced.
    pub fn forget_all(&mut self) -> Vec<String> {
        let names: Vec<String> = self.peers.keys().cloned().collect();
        names.into_iter().filter(|p| self.forget(p)).collect()
    }

    /// Every peer with what is known of it, by name.
    pub fn list(&self) -> Vec<(String, PeerEntry)> {
        self.peers
            .iter()
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect()
    }

    /// How many peers are remembered as announced.
    pub fn announced_count(&self) -> usize {
        self.announced
    }
}

/// What the handshake's TCP option said about the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// No option.
    Silent,
    /// The option, with a keying protocol this node's provider speaks too
    /// (or one side's not said).
    Announced,
    /// The option, with another keying protocol: the two providers cannot
    /// key the connection together.
    AnnouncedIncompatible,
}

impl Heard {
    /// From an `ESTABLISHED` event's `peer` and `peer_keying`, against the
    /// keying byte of this node's provider (`own`). 0 on either side is
    /// "not said", which does not conflict.
    pub fn from_event(peer: u8, peer_keying: u8, own: u8) -> Self {
        match peer {
            tlshub_ebpf::peer::ANNOUNCED if peer_keying != 0 && own != 0 && peer_keying != own => {
                Self::AnnouncedIncompatible
            }
            tlshub_ebpf::peer::ANNOUNCED => Self::Announced,
            _ => Self::Silent,
        }
    }
}

/// What one connection's handshake means for it and for the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The peer announced, compatible: remember it, and key the connection.
    Remember,
    /// It announced another keying protocol under an opportunistic rule,
    /// and it never announced a compatible one before: plain (the two
    /// providers cannot key it).
    PlainIncompatible,
    /// It announced another keying protocol under a strict rule, or was
    /// remembered as compatible before (a rewritten option must not make
    /// anything plain): fail the connection now, without asking the
    /// provider (it could only time out).
    Incompatible,
    /// Silent under a strict rule: key it (the failure policy applies if
    /// the peer cannot key).
    Key,
    /// Silent under an opportunistic rule, but remembered (an old listener,
    /// or a downgrade): keyed as under a strict rule.
    KnownPeerSilent,
    /// Silent under an opportunistic rule and never announced: plain.
    Plain,
}

/// The judgement, given what this handshake said, whether the
/// connection's rule is opportunistic, and whether the peer announced a
/// compatible keying protocol before.
pub fn verdict(heard: Heard, opportunistic: bool, remembered: bool) -> Verdict {
    match (heard, opportunistic, remembered) {
        (Heard::Announced, _, _) => Verdict::Remember,
        (Heard::AnnouncedIncompatible, true, false) => Verdict::PlainIncompatible,
        (Heard::AnnouncedIncompatible, _, _) => Verdict::Incompatible,
        (Heard::Silent, false, _) => Verdict::Key,
        (Heard::Silent, true, true) => Verdict::KnownPeerSilent,
        (Heard::Silent, true, false) => Verdict::Plain,
    }
}

/// Why the remembered peers cannot be read or kept.
#[derive(Debug, thiserror::Error)]
pub enum PeersError {
    /// The file exists but cannot be read.
    #[error("cannot read the announced peers from {}: {source}", path.display())]
    Read {
        /// `[peers] file`.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a [`PeersFile`].
    #[error("{}: {source} (the announced peers; fix or delete the file: deleting forgets every peer)", path.display())]
    Parse {
        /// `[peers] file`.
        path: PathBuf,
        /// The JSON error, with its line and column.
        #[source]
        source: serde_json::Error,
    },
    /// The file was written by a core with another layout.
    #[error("{}: layout version {found}, this core reads version {FILE_VERSION}", path.display())]
    Version {
        /// `[peers] file`.
        path: PathBuf,
        /// The file's `version`.
        found: u32,
    },
    /// The file's directory cannot be made, or the file written.
    #[error("cannot write the announced peers to {}: {source}", path.display())]
    Write {
        /// `[peers] file`.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `[peers] node_map` does not load.
    #[error(transparent)]
    NodeMap(#[from] tlshub_provider_sdk::runtime::ConfigError),
}

/// `[peers] node_map`, read (`None` when unset).
pub fn load_node_map(path: Option<&Path>) -> Result<Option<NodeMap>, PeersError> {
    Ok(path.map(NodeMap::load).transpose()?)
}

/// The announced peers, shared by keying jobs (which record and consult
/// them), the admin API (which lists and forgets them) and the stats.
#[derive(Debug)]
pub struct PeerMemory {
    file: PathBuf,
    nodes: RwLock<Option<NodeMap>>,
    table: Mutex<PeerTable>,
    /// Held while the file is written, so that two writers leave the newer
    /// snapshot.
    writing: Mutex<()>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Locks `m`; a panic elsewhere while it was held left consistent counters
/// behind (every update is one field), so the guard is taken anyway.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PeerMemory {
    /// Reads `file` (a missing file is an empty memory) and `node_map`,
    /// and makes sure `file` can be written: a core that could not keep
    /// what it learns would forget it at its next restart, which reopens
    /// the downgrade.
    pub fn open(file: &Path, node_map: Option<&Path>) -> Result<Self, PeersError> {
        let nodes = load_node_map(node_map)?;
        let table = match std::fs::read_to_string(file) {
            Ok(text) => {
                let parsed: PeersFile =
                    serde_json::from_str(&text).map_err(|source| PeersError::Parse {
                        path: file.into(),
                        source,
                    })?;
                if parsed.version != FILE_VERSION {
                    return Err(PeersError::Version {
                        path: file.into(),
                        found: parsed.version,
                    });
                }
                PeerTable::from_file(&parsed)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => PeerTable::default(),
            Err(source) => {
                return Err(PeersError::Read {
                    path: file.into(),
                    source,
                });
            }
        };
        let memory = Self {
            file: file.into(),
            nodes: RwLock::new(nodes),
            table: Mutex::new(table),
            writing: Mutex::new(()),
        };
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(|source| PeersError::Write {
                path: file.into(),
                source,
            })?;
        }
        memory.save()?;
        info!(
            file = %file.display(),
            remembered = lock(&memory.table).announced_count(),
            by_node = memory.nodes.read().unwrap_or_else(PoisonError::into_inner).is_some(),
            "peers that announced tlshub are remembered"
        );
        Ok(memory)
    }

    /// Replaces the node map (`policy reload`; see [`load_node_map`]).
    pub fn set_node_map(&self, nodes: Option<NodeMap>) {
        *self.nodes.write().unwrap_or_else(PoisonError::into_inner) = nodes;
    }

    /// The peer `ip` belongs to: its node's name in the node map, else the
    /// address (an IPv4-mapped IPv6 address as IPv4).
    pub fn peer_of(&self, ip: IpAddr) -> String {
        let ip = ip.to_canonical();
        let nodes = self.nodes.read().unwrap_or_else(PoisonError::into_inner);
        nodes
            .as_ref()
            .and_then(|m| m.node_of(ip))
            .map_or_else(|| ip.to_string(), str::to_owned)
    }

    /// Records that the peer at `ip` announced tlshub; writes the file when
    /// the peer is new (a write error is logged, and the peer is
    /// remembered until the core stops).
    pub fn announced(&self, ip: IpAddr) {
        let peer = self.peer_of(ip);
        let done = {
            let mut table = lock(&self.table);
            let done = table.announced(&peer, now_unix());
            table.seen_at(&peer, ip.to_canonical());
            done
        };
        match done {
            Announced::Known => {}
            Announced::New => {
                info!(%peer, "peer announced tlshub: connections with it are never plain from now on");
                if let Err(e) = self.save() {
                    warn!(error = %e, %peer, "the peer is remembered until the core stops");
                }
            }
            Announced::Full => {
                warn!(%peer, limit = MAX_ANNOUNCED, "too many peers remembered: this one is not");
            }
        }
    }

    /// Whether the peer at `ip` (its node, or the address itself) announced
    /// tlshub before.
    pub fn remembers(&self, ip: IpAddr) -> bool {
        let peer = self.peer_of(ip);
        let address = ip.to_canonical().to_string();
        let table = lock(&self.table);
        table.remembers(&peer) || table.remembers(&address)
    }

    /// Adds one to the peer's `what`.
    pub fn count(&self, ip: IpAddr, what: Counted) {
        let peer = self.peer_of(ip);
        let mut table = lock(&self.table);
        table.count(&peer, what);
        table.seen_at(&peer, ip.to_canonical());
    }

    /// Notes the keying byte the peer at `ip` announced.
    pub fn saw_keying(&self, ip: IpAddr, keying: u8) {
        let peer = self.peer_of(ip);
        lock(&self.table).saw_keying(&peer, keying);
    }

    /// Forgets `peers` (names or addresses; every peer when empty). Returns
    /// the ones that were remembered.
    pub fn forget(&self, peers: &[String]) -> Result<Vec<String>, PeersError> {
        let forgotten = {
            let mut table = lock(&self.table);
            if peers.is_empty() {
                table.forget_all()
            } else {
                peers.iter().filter(|p| table.forget(p)).cloned().collect()
            }
        };
        if !forgotten.is_empty() {
            info!(peers = %forgotten.join(","), "announced peers forgotten: an opportunistic rule may let them through as plain again");
            self.save()?;
        }
        Ok(forgotten)
    }

    /// `[peers] file`.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Every peer known, by name.
    pub fn list(&self) -> Vec<(String, PeerEntry)> {
        lock(&self.table).list()
    }

    /// How many peers are remembered as announced.
    pub fn announced_count(&self) -> usize {
        lock(&self.table).announced_count()
    }

    /// Connections keyed because a remembered peer was silent, over all
    /// peers.
    pub fn known_peer_silent_total(&self) -> u64 {
        lock(&self.table)
            .list()
            .iter()
            .map(|(_, e)| e.known_peer_silent)
            .sum()
    }

    /// Writes the announced peers to the file.
    fn save(&self) -> Result<(), PeersError> {
        let _writing = lock(&self.writing);
        let snapshot = lock(&self.table).to_file();
        let bytes = serde_json::to_vec_pretty(&snapshot).map_err(|e| PeersError::Write {
            path: self.file.clone(),
            source: std::io::Error::other(e),
        })?;
        crate::files::replace(&self.file, &bytes).map_err(|source| PeersError::Write {
            path: self.file.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tlshub-peers-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_an_opportunistic_rule_with_a_peer_never_heard_goes_plain() {
        use Heard::*;
        for heard in [Silent, Announced, AnnouncedIncompatible] {
            for opportunistic in [false, true] {
                for remembered in [false, true] {
                    let v = verdict(heard, opportunistic, remembered);
                    let plain = heard != Announced && opportunistic && !remembered;
                    assert_eq!(
                        matches!(v, Verdict::Plain | Verdict::PlainIncompatible),
                        plain,
                        "{heard:?} {opportunistic} {remembered}: {v:?}"
                    );
                    assert_eq!(v == Verdict::Remember, heard == Announced);
                }
            }
        }
        assert_eq!(verdict(Silent, true, true), Verdict::KnownPeerSilent);
        assert_eq!(verdict(Silent, false, true), Verdict::Key);
        // Another keying protocol: strict fails at once, and so does a
        // remembered peer (the byte may have been rewritten on the way).
        assert_eq!(
            verdict(AnnouncedIncompatible, false, false),
            Verdict::Incompatible
        );
        assert_eq!(
            verdict(AnnouncedIncompatible, true, true),
            Verdict::Incompatible
        );
    }

    #[test]
    fn keying_bytes_conflict_only_when_both_are_said_and_differ() {
        use tlshub_ebpf::peer::{ANNOUNCED, SILENT};
        assert_eq!(Heard::from_event(ANNOUNCED, 7, 7), Heard::Announced);
        assert_eq!(Heard::from_event(ANNOUNCED, 0, 7), Heard::Announced);
        assert_eq!(Heard::from_event(ANNOUNCED, 7, 0), Heard::Announced);
        assert_eq!(
            Heard::from_event(ANNOUNCED, 7, 9),
            Heard::AnnouncedIncompatible
        );
        assert_eq!(Heard::from_event(SILENT, 7, 9), Heard::Silent);
    }

    #[test]
    fn an_announcement_is_remembered_once_and_forgetting_keeps_the_counters() {
        let mut t = PeerTable::default();
        assert!(!t.remembers("node-b"));
        assert_eq!(t.announced("node-b", 10), Announced::New);
        assert_eq!(t.announced("node-b", 20), Announced::Known);
        t.count("node-b", Counted::Protected);
        assert!(t.remembers("node-b"));
        assert_eq!(t.announced_count(), 1);
        assert!(t.forget("node-b"));
        assert!(!t.forget("node-b"));
        assert!(!t.remembers("node-b"));
        assert_eq!(t.announced_count(), 0);
        let (_, e) = &t.list()[0];
        assert_eq!((e.protected, e.first_announced_unix), (1, None));
        // Announced again after being forgotten: new again.
        assert_eq!(t.announced("node-b", 30), Announced::New);
    }

    #[test]
    fn silent_peers_get_counters_up_to_the_bound_and_announced_ones_always() {
        let mut t = PeerTable::default();
        for i in 0..MAX_SILENT + 10 {
            t.count(&format!("10.0.{}.{}", i / 256, i % 256), Counted::Plain);
        }
        assert_eq!(t.list().len(), MAX_SILENT);
        assert_eq!(t.announced("node-z", 1), Announced::New);
        t.count("node-z", Counted::KnownPeerSilent);
        assert_eq!(t.list().len(), MAX_SILENT + 1);
    }

    #[test]
    fn the_announced_peers_are_bounded() {
        let mut t = PeerTable::default();
        for i in 0..MAX_ANNOUNCED {
            assert_eq!(t.announced(&i.to_string(), 1), Announced::New);
        }
        assert_eq!(t.announced("one-more", 1), Announced::Full);
        assert!(!t.remembers("one-more"));
        assert!(t.forget("0"));
        assert_eq!(t.announced("one-more", 1), Announced::New);
    }

    #[test]
    fn the_file_round_trips_the_announced_peers_only() {
        let mut t = PeerTable::default();
        t.announced("node-b", 5);
        t.count("10.0.9.9", Counted::Plain);
        let file = t.to_file();
        assert_eq!(
            file.peers,
            vec![AnnouncedPeer {
                peer: "node-b".into(),
                first_announced_unix: 5
            }]
        );
        let back = PeerTable::from_file(&file);
        assert!(back.remembers("node-b"));
        assert_eq!(back.announced_count(), 1);
    }

    #[test]
    fn a_restarted_memory_remembers_and_forgetting_is_written_too() {
        let d = dir("restart");
        let file = d.join("state/peers.json");
        let m = PeerMemory::open(&file, None).unwrap();
        m.announced(ip("10.0.2.2"));
        m.announced(ip("::ffff:10.0.2.3"));
        drop(m);
        let m = PeerMemory::open(&file, None).unwrap();
        assert!(m.remembers(ip("10.0.2.2")));
        assert!(m.remembers(ip("10.0.2.3")));
        assert!(!m.remembers(ip("10.0.2.4")));
        assert_eq!(
            m.forget(&["10.0.2.2".into(), "nobody".into()]).unwrap(),
            vec!["10.0.2.2"]
        );
        drop(m);
        let m = PeerMemory::open(&file, None).unwrap();
        assert!(!m.remembers(ip("10.0.2.2")));
        assert_eq!(m.forget(&[]).unwrap(), vec!["10.0.2.3"]);
        assert_eq!(m.announced_count(), 0);
    }

    #[test]
    fn with_a_node_map_a_peer_is_its_node() {
        let d = dir("nodes");
        let map = d.join("nodes.toml");
        std::fs::write(
            &map,
            "[[node]]\nname = \"node-b\"\npod_cidrs = [\"10.0.2.0/24\"]\n",
        )
        .unwrap();
        let m = PeerMemory::open(&d.join("peers.json"), Some(&map)).unwrap();
        m.announced(ip("10.0.2.2"));
        // Another pod of the same node: remembered through its node.
        assert!(m.remembers(ip("10.0.2.77")));
        assert_eq!(m.peer_of(ip("10.0.3.1")), "10.0.3.1");
        assert_eq!(m.list()[0].0, "node-b");
    }

    #[test]
    fn a_damaged_file_is_refused_with_its_path_and_position_and_left_alone() {
        let d = dir("damaged");
        let file = d.join("peers.json");
        std::fs::write(&file, "{\"version\": 1, \"peers\": [{\"peer\": 7}]}").unwrap();
        let e = PeerMemory::open(&file, None).unwrap_err();
        assert!(matches!(e, PeersError::Parse { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("peers.json") && text.contains("column"),
            "{text}"
        );
        assert!(
            std::fs::read_to_string(&file)
                .unwrap()
                .contains("\"peer\": 7")
        );
        std::fs::write(&file, "{\"version\": 9, \"peers\": []}").unwrap();
        let e = PeerMemory::open(&file, None).unwrap_err();
        assert!(matches!(e, PeersError::Version { found: 9, .. }), "{e}");
    }
}
