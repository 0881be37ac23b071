//! Loading and attaching the BPF programs, and every access the core makes
//! to their maps (policy, exemptions, the gate, held processes, stats).

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, RingBuf, SkStorage};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, FExit, Lsm, SockOps};
use aya::{Btf, Ebpf, EbpfLoader};
use tlshub_ebpf::{
    Addr16, Conn, Control, Held, Owner, PortKey, SkMark, gate, mapped, mark, names, no_core, stat,
};
use tracing::{debug, info, warn};

use crate::config::{Cidr, PolicySection};

/// Why the programs could not be loaded, attached or used.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The object could not be parsed or a program failed to load.
    #[error("cannot load BPF program {program}: {source}")]
    Load {
        /// The program's name in the object.
        program: &'static str,
        /// aya's error, with the verifier's log when it refused.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// The object itself could not be loaded.
    #[error("cannot load the BPF object: {0}")]
    Object(#[from] aya::EbpfError),
    /// A program or map is missing from the object (a build problem).
    #[error("BPF object has no {what} named {name}")]
    Missing {
        /// `program` or `map`.
        what: &'static str,
        /// The name.
        name: &'static str,
    },
    /// Kernel BTF is unavailable (needed by the LSM programs).
    #[error("cannot read kernel BTF (/sys/kernel/btf/vmlinux): {0}")]
    Btf(#[from] aya::BtfError),
    /// The cgroup directory could not be opened.
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        /// The cgroup directory (`[bpf] cgroup`).
        path: String,
        /// The open's error.
        #[source]
        source: std::io::Error,
    },
    /// Pinning programs or maps under the pin directory failed.
    #[error("cannot pin {what} under {dir}: {reason}")]
    Pin {
        /// The program or map being pinned.
        what: String,
        /// The pin directory.
        dir: String,
        /// What went wrong, as text (from several error types: aya's pin
        /// errors, link conversions, a missing pin).
        reason: String,
    },
    /// Programs of a different build are pinned there.
    #[error(
        "{dir} holds the BPF programs of another tlshub build ({found}; this one is {ours}); run that build's `tlshub-core release` (or this one's `release --detach`, which only removes them) first"
    )]
    ForeignPins {
        /// The pin directory.
        dir: String,
        /// The digest found.
        found: String,
        /// Ours.
        ours: String,
    },
    /// A map operation failed.
    #[error("BPF map {map}: {source}")]
    Map {
        /// The map's name.
        map: &'static str,
        /// aya's error.
        #[source]
        source: aya::maps::MapError,
    },
}

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> BpfError {
    move |source| BpfError::Map { map, source }
}

/// The set of processes the gate never holds (the core and its providers).
/// Shared with the provider client's connect hook, which adds the provider's
/// pid before its first request can reach the gate.
#[derive(Clone)]
pub struct Exempt(Arc<Mutex<HashMap<MapData, u32, u64>>>);

impl std::fmt::Debug for Exempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Exempt")
    }
}

impl Exempt {
    /// Exempts process `pid`, dropping entries of processes that exited
    /// (gone, or their pid now names a later process).
    pub fn add(&self, pid: u32) {
        let Ok(mut map) = self.0.lock() else { return };
        let gone: Vec<u32> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|(p, start)| crate::procfs::start_ticks(*p) != Some(*start))
            .map(|(p, _)| p)
            .collect();
        for p in gone {
            let _ = map.remove(&p);
        }
        // The entry names the process, not only its pid: the gate checks
        // the caller's start time too, so a process that gets this pid
        // after the provider exited is not let through.
        let Some(start) = crate::procfs::start_ticks(pid) else {
            warn!(pid, "cannot exempt process from the gate: it is gone");
            return;
        };
        match map.insert(pid, start, 0) {
            Ok(()) => debug!(pid, start, "process exempt from the gate"),
            Err(e) => warn!(pid, error = %e, "cannot exempt process from the gate"),
        }
    }
}

/// A handle of its own on the pinned `conns` map, for keying jobs: before
/// asking the provider and before installing keys a job checks that the
/// socket still carries its connection (see
/// [`crate::keying::Job::carried_by`]).
pub struct ConnsReader(HashMap<MapData, u64, Conn>);

impl std::fmt::Debug for ConnsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnsReader")
    }
}

impl ConnsReader {
    /// The connection `cookie` is waiting for keys on, as the map holds it
    /// now (none: the socket's connection ended, or it was keyed).
    pub fn conn(&self, cookie: u64) -> Option<Conn> {
        self.0.get(&cookie, 0).ok()
    }
}

/// The loaded and attached programs and the maps the core uses.
pub struct Programs {
    /// Keeps programs and links alive; dropping it detaches everything.
    _ebpf: Ebpf,
    /// Ring buffer of events (taken by the event loop).
    pub events: Option<RingBuf<MapData>>,
    conns: HashMap<MapData, u64, Conn>,
    held: HashMap<MapData, u32, Held>,
    connecting_owners: HashMap<MapData, u64, Owner>,
    sk_marks: SkStorage<MapData, SkMark>,
    local_nets: LpmTrie<MapData, Addr16, u32>,
    peer_nets: LpmTrie<MapData, Addr16, u32>,
    service_nets: LpmTrie<MapData, Addr16, u32>,
    rule_ports: HashMap<MapData, PortKey, u8>,
    stats: Array<MapData, u64>,
    control: Array<MapData, Control>,
    ktls_recvmsg: Array<MapData, u64>,
    /// Processes never held.
    pub exempt: Exempt,
    /// Where programs and maps are pinned.
    pub pin_dir: std::path::PathBuf,
    /// True when this core found the programs attached by an earlier core
    /// (restart) and took them over instead of attaching its own.
    pub adopted: bool,
    /// What is attached where: (program, attach point), for status.
    pub attached: Vec<(String, String)>,
    /// Connections whose gate was opened for good, oldest first, until
    /// their `conns` entries are removed.
    opened: std::collections::VecDeque<(std::time::Instant, u64)>,
    /// The keying byte the TCP option announces (written with every
    /// heartbeat; see [`Programs::set_keying`]).
    keying: u8,
    /// When the `held` map is next worth reading.
    held_map: HeldMapCheck,
}

/// How often the `held` map is read whatever the drop counter says.
const HELD_MAP_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// When the `held` map is worth reading. A hold goes there only when the
/// ring buffer was full, which BPF counts as a drop just before it writes
/// the map. Why not read it at every sweep: reading a hash map walks all
/// its buckets (16,384 by default) even when it is empty, and with a sweep
/// after every keying outcome that was a twentieth of the core's CPU in
/// the benchmark's VM (`cargo xtask vm --mode profile`).
#[derive(Debug, Default)]
pub struct HeldMapCheck {
    drops_at_last_read: Option<u64>,
    last_read: Option<std::time::Instant>,
}

impl HeldMapCheck {
    /// Whether to read the map now, given the drop counter: when it moved
    /// since the last read, and once a second whatever it says (a read
    /// between BPF's count and its write sees the count but not the
    /// record, which the next read a second later finds).
    pub fn due(&mut self, drops: u64, now: std::time::Instant) -> bool {
        let due = self.drops_at_last_read != Some(drops)
            || self
                .last_read
                .is_none_or(|t| now.duration_since(t) >= HELD_MAP_RECHECK);
        if due {
            self.drops_at_last_read = Some(drops);
            self.last_read = Some(now);
        }
        due
    }
}

/// The policy's rules with the id the maps know each by (its index; the
/// values of `peer_nets` and the `rule` of `rule_ports` keys).
fn rules_by_id(policy: &PolicySection) -> impl Iterator<Item = (u32, &crate::config::Rule)> {
    policy
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| (u32::try_from(i).unwrap_or(u32::MAX), r))
}

/// What `rule_ports` holds for `policy`, as (rule id, port): each peer
/// rule's server ports under its number, the service ports under
/// [`tlshub_ebpf::SERVICE_RULE`] when there are service CIDRs, and every
/// peer rule's ports together under [`tlshub_ebpf::LISTEN_RULE`] (the
/// listeners that answer the announcement). Port 0 is "any port".
fn rule_port_keys(policy: &PolicySection) -> Vec<(u32, u16)> {
    let any = |ports: &[u16]| {
        if ports.is_empty() {
            vec![0]
        } else {
            ports.to_vec()
        }
    };
    let mut keys = Vec::new();
    let mut listen = Vec::new();
    for (rule, r) in rules_by_id(policy) {
        for port in any(&r.ports) {
            keys.push((rule, port));
            if !listen.contains(&port) {
                listen.push(port);
            }
        }
    }
    if !policy.service_cidrs.is_empty() {
        keys.extend(
            any(&policy.service_ports)
                .into_iter()
                .map(|p| (tlshub_ebpf::SERVICE_RULE, p)),
        );
    }
    // Any port covers the others: one entry.
    if listen.contains(&0) {
        listen = vec![0];
    }
    keys.extend(listen.into_iter().map(|p| (tlshub_ebpf::LISTEN_RULE, p)));
    keys
}

/// Makes `map` hold exactly `wanted` (prefix and value): the new entries
/// go in first, then the stale ones are removed (see
/// [`Programs::write_policy`]).
fn replace_prefixes(
    map: &mut LpmTrie<MapData, Addr16, u32>,
    name: &'static str,
    wanted: &[(&Cidr, u32)],
) -> Result<(), BpfError> {
    let old: Vec<Key<Addr16>> = map.keys().filter_map(Result::ok).collect();
    let mut written = Vec::new();
    for (cidr, value) in wanted {
        let key = Key::new(cidr.mapped_prefix(), mapped(cidr.addr));
        map.insert(&key, value, 0).map_err(map_err(name))?;
        written.push((key.prefix_len(), key.data()));
    }
    for k in old {
        if !written.contains(&(k.prefix_len(), k.data())) {
            let _ = map.remove(&k);
        }
    }
    Ok(())
}

/// How long after its gate opened a connection's `conns` entry is removed
/// (see [`Programs::untrack_opened`]).
pub const UNTRACK_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

impl std::fmt::Debug for Programs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Programs")
    }
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, BpfError> {
    let map = ebpf
        .take_map(name)
        .ok_or(BpfError::Missing { what: "map", name })?;
    T::try_from(map).map_err(map_err(name))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, BpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(BpfError::Missing {
        what: "program",
        name,
    })?;
    p.try_into().map_err(|source| BpfError::Load {
        program: name,
        source,
    })
}

/// SHA-256 of the BPF object this binary carries (hex): which build's
/// programs are pinned.
pub fn object_digest() -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(tlshub_ebpf::OBJECT))
}

/// This build's directory under `pin_dir` (bpffs holds no regular files,
/// so the build is named by the directory: the first 16 hex digits of the
/// object's SHA-256). Another build's directory there is an error: its
/// programs would keep running beside ours.
fn build_dir(pin_dir: &Path) -> Result<std::path::PathBuf, BpfError> {
    let ours = object_digest()[..16].to_owned();
    if let Ok(dir) = std::fs::read_dir(pin_dir) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name != ours {
                return Err(BpfError::ForeignPins {
                    dir: pin_dir.display().to_string(),
                    found: name,
                    ours,
                });
            }
        }
    }
    Ok(pin_dir.join(ours))
}

/// Whether every program's link is pinned in `links_dir`.
fn links_complete(links_dir: &Path) -> bool {
    [names::SOCKOPS, names::DEFER_FIN]
        .into_iter()
        .chain(names::FEXIT.iter().map(|t| t.0))
        .chain(names::LSM.iter().map(|l| l.0))
        .all(|p| links_dir.join(p).exists())
}

/// The sizes of the maps the configuration sets (`[bpf]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSizes {
    /// `conns` entries (`max_connections`).
    pub connections: u32,
    /// `held` entries (`max_held_processes`).
    pub held_processes: u32,
    /// The `events` ring buffer's bytes (`event_buffer_bytes`).
    pub event_buffer_bytes: u32,
}

/// A loader for this build's object. aya has no type for task storage
/// (`selected_connects`), which only the programs use: it is allowed as an
/// unsupported map, created and pinned like the rest.
fn object_loader() -> EbpfLoader<'static> {
    let mut loader = EbpfLoader::new();
    loader.allow_unsupported_maps();
    loader
}

/// Loads the object's maps, each pinned as `maps_dir/<name>` (an existing
/// pin is reused), without loading any program.
/// `sizes` applies to the maps created here (a pinned one keeps its size).
fn load_pinned_maps(maps_dir: &Path, sizes: Option<MapSizes>) -> Result<Ebpf, BpfError> {
    let paths: Vec<(&str, std::path::PathBuf)> =
        names::MAPS.iter().map(|m| (*m, maps_dir.join(m))).collect();
    let mut loader = object_loader();
    if let Some(n) = sizes {
        loader.map_max_entries(names::CONNS, n.connections);
        loader.map_max_entries(names::CONNECTING_OWNERS, n.connections);
        loader.map_max_entries(names::HELD, n.held_processes);
        loader.map_max_entries(names::EVENTS, n.event_buffer_bytes);
    }
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
        // A pinned map is reused with the size it was created with. The
        // loader must be told that size: it maps a ring buffer with the
        // size it was given, and the kernel refuses (EINVAL) a mapping of
        // another size than the map's.
        if let Ok(pinned) = aya::maps::MapInfo::from_pin(path) {
            let configured = match *name {
                names::CONNS | names::CONNECTING_OWNERS => sizes.map(|n| n.connections),
                names::HELD => sizes.map(|n| n.held_processes),
                names::EVENTS => sizes.map(|n| n.event_buffer_bytes),
                _ => None,
            };
            if configured.is_some_and(|c| c != pinned.max_entries()) {
                tracing::info!(
                    map = *name,
                    pinned = pinned.max_entries(),
                    configured = configured.unwrap_or(0),
                    "a pinned map keeps its size until the programs are detached (`tlshub-core release --detach`)"
                );
            }
            loader.map_max_entries(name, pinned.max_entries());
        }
    }
    Ok(loader.load(tlshub_ebpf::OBJECT)?)
}

/// (program, attach point) of every program, for status.
fn attach_points(cgroup: &Path) -> Vec<(String, String)> {
    [
        (
            names::SOCKOPS.to_owned(),
            format!("sockops on cgroup {}", cgroup.display()),
        ),
        (
            names::DEFER_FIN.to_owned(),
            format!("cgroup_skb/ingress on cgroup {}", cgroup.display()),
        ),
    ]
    .into_iter()
    .chain(
        names::FEXIT
            .iter()
            .map(|(n, f)| ((*n).to_owned(), format!("fexit/{f}"))),
    )
    .chain(
        names::LSM
            .iter()
            .map(|(n, h)| ((*n).to_owned(), format!("lsm/{h}"))),
    )
    .collect()
}

/// A program's name and whether the kernel loaded it.
pub type ProgramLoad = (&'static str, Result<(), BpfError>);

/// Loads every program of this build's object into the kernel without
/// attaching or pinning anything (all of it is freed on return): whether
/// this kernel accepts them, for `tlshub-core check`. One result per
/// program, or the object's own load error.
pub fn try_load_programs() -> Result<Vec<ProgramLoad>, BpfError> {
    let mut ebpf = object_loader().load(tlshub_ebpf::OBJECT)?;
    let btf = Btf::from_sys_fs()?;
    Ok(load_each(&mut ebpf, &btf))
}

/// Loads every program of `ebpf` into the kernel, in the order they are
/// attached, each whatever became of the ones before.
fn load_each(ebpf: &mut Ebpf, btf: &Btf) -> Vec<ProgramLoad> {
    let load = |program| move |source| BpfError::Load { program, source };
    let mut results = Vec::new();
    results.push((
        names::SOCKOPS,
        program::<SockOps>(ebpf, names::SOCKOPS)
            .and_then(|p| p.load().map_err(load(names::SOCKOPS))),
    ));
    results.push((
        names::DEFER_FIN,
        program::<CgroupSkb>(ebpf, names::DEFER_FIN)
            .and_then(|p| p.load().map_err(load(names::DEFER_FIN))),
    ));
    for (name, function) in names::FEXIT {
        results.push((
            name,
            program::<FExit>(ebpf, name).and_then(|p| p.load(function, btf).map_err(load(name))),
        ));
    }
    for (name, hook) in names::LSM {
        results.push((
            name,
            program::<Lsm>(ebpf, name).and_then(|p| p.load(hook, btf).map_err(load(name))),
        ));
    }
    results
}

/// Loads every program, then attaches each, pinning each link as
/// `links_dir/<program>` (a program the kernel refuses stops it before
/// anything is attached).
fn attach_all(ebpf: &mut Ebpf, cgroup: &Path, links_dir: &Path) -> Result<(), BpfError> {
    let btf = Btf::from_sys_fs()?;
    for (_, loaded) in load_each(ebpf, &btf) {
        loaded?;
    }
    let cg = std::fs::File::open(cgroup).map_err(|source| BpfError::Cgroup {
        path: cgroup.display().to_string(),
        source,
    })?;
    let load = |program, source| BpfError::Load { program, source };
    let pin = |program: &str, link: FdLink| {
        link.pin(links_dir.join(program))
            .map(drop)
            .map_err(|e| BpfError::Pin {
                what: format!("the link of {program}"),
                dir: links_dir.display().to_string(),
                reason: e.to_string(),
            })
    };
    let not_pinnable = |program: &str, e: &dyn std::fmt::Display| BpfError::Pin {
        what: format!("the link of {program} (not a bpf_link)"),
        dir: links_dir.display().to_string(),
        reason: e.to_string(),
    };
    let not_fd = |program: &'static str| {
        move |e: aya::programs::ProgramError| BpfError::Load { program, source: e }
    };
    {
        let p: &mut SockOps = program(ebpf, names::SOCKOPS)?;
        // A bpf_link: the kernel always attaches links as multi (another
        // core's sockops may sit on the same cgroup); on 6.1 an explicit
        // BPF_F_ALLOW_MULTI flag on link_create is EINVAL.
        let id = p
            .attach(cg.as_fd(), CgroupAttachMode::Single)
            .map_err(|e| load(names::SOCKOPS, e))?;
        let link = p.take_link(id).map_err(not_fd(names::SOCKOPS))?;
        pin(
            names::SOCKOPS,
            FdLink::try_from(link).map_err(|e| not_pinnable(names::SOCKOPS, &e))?,
        )?;
    }
    {
        let p: &mut CgroupSkb = program(ebpf, names::DEFER_FIN)?;
        let id = p
            .attach(
                cg.as_fd(),
                CgroupSkbAttachType::Ingress,
                CgroupAttachMode::Single,
            )
            .map_err(|e| load(names::DEFER_FIN, e))?;
        let link = p.take_link(id).map_err(not_fd(names::DEFER_FIN))?;
        pin(
            names::DEFER_FIN,
            FdLink::try_from(link).map_err(|e| not_pinnable(names::DEFER_FIN, &e))?,
        )?;
    }
    for (name, _) in names::FEXIT {
        let p: &mut FExit = program(ebpf, name)?;
        let id = p.attach().map_err(|e| load(name, e))?;
        let link = p.take_link(id).map_err(not_fd(name))?;
        pin(name, FdLink::from(link))?;
    }
    for (name, _) in names::LSM {
        let p: &mut Lsm = program(ebpf, name)?;
        let id = p.attach().map_err(|e| load(name, e))?;
        let link = p.take_link(id).map_err(not_fd(name))?;
        pin(name, FdLink::from(link))?;
    }
    Ok(())
}

/// Removes everything pinned under `pin_dir`, of any build: the links
/// (which detaches the programs once no process holds them) and the maps.
pub fn unpin_all(pin_dir: &Path) -> std::io::Result<()> {
    let Ok(builds) = std::fs::read_dir(pin_dir) else {
        return Ok(());
    };
    for build in builds.flatten() {
        for sub in ["links", "maps"] {
            if let Ok(dir) = std::fs::read_dir(build.path().join(sub)) {
                for e in dir.flatten() {
                    std::fs::remove_file(e.path())?;
                }
            }
            let _ = std::fs::remove_dir(build.path().join(sub));
        }
        let _ = std::fs::remove_dir(build.path());
    }
    let _ = std::fs::remove_dir(pin_dir);
    Ok(())
}

impl Programs {
    /// Loads the object with every map pinned under `pin_dir/maps` and
    /// attaches sockops to `cgroup`, the fexit owner programs and the LSM gate, each
    /// link pinned under `pin_dir/links`, so that the programs and maps
    /// outlive this process: while no core runs, the gate keeps holding
    /// (then, after the grace, refusing) and the next core adopts them.
    ///
    /// If `pin_dir` already holds this build's programs, they are adopted
    /// as they are (nothing is detached, not for a moment); another build's
    /// programs are an error (see [`BpfError::ForeignPins`]).
    pub fn load_and_attach(
        cgroup: &Path,
        pin_dir: &Path,
        sizes: MapSizes,
    ) -> Result<Self, BpfError> {
        let pin_err = |what: &str, reason: String| BpfError::Pin {
            what: what.to_owned(),
            dir: pin_dir.display().to_string(),
            reason,
        };
        let root = build_dir(pin_dir)?;
        let (maps_dir, links_dir) = (root.join("maps"), root.join("links"));
        let adopted = links_complete(&links_dir);
        for d in [&maps_dir, &links_dir] {
            std::fs::create_dir_all(d).map_err(|e| pin_err("directories", e.to_string()))?;
        }
        let mut ebpf = load_pinned_maps(&maps_dir, Some(sizes))?;
        let attached = attach_points(cgroup);
        if adopted {
            info!(dir = %root.display(), "adopting the BPF programs an earlier core left attached");
        } else {
            // A core that died half-way through a fresh start may have
            // left some links: drop them and attach a complete set.
            if let Ok(dir) = std::fs::read_dir(&links_dir) {
                for e in dir.flatten() {
                    if let Ok(l) = PinnedLink::from_pin(e.path()) {
                        let _ = l.unpin();
                    }
                }
            }
            attach_all(&mut ebpf, cgroup, &links_dir)?;
            info!(cgroup = %cgroup.display(), dir = %root.display(), "BPF programs attached and pinned");
        }
        Self::from_loaded(ebpf, &root, adopted, attached)
    }

    /// The maps pinned under `pin_dir` by a core of this build, without
    /// loading or attaching any program (for `tlshub-core release`).
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, BpfError> {
        let root = build_dir(pin_dir)?;
        if !root.join("maps").join(names::CONNS).exists() {
            return Err(BpfError::Pin {
                what: "nothing (no pinned maps of this build)".into(),
                dir: root.display().to_string(),
                reason: "not found".into(),
            });
        }
        let ebpf = load_pinned_maps(&root.join("maps"), None)?;
        Self::from_loaded(ebpf, &root, true, Vec::new())
    }

    fn from_loaded(
        mut ebpf: Ebpf,
        pin_dir: &Path,
        adopted: bool,
        attached: Vec<(String, String)>,
    ) -> Result<Self, BpfError> {
        Ok(Self {
            control: take(&mut ebpf, names::CONTROL)?,
            pin_dir: pin_dir.to_owned(),
            adopted,
            events: Some(take(&mut ebpf, names::EVENTS)?),
            conns: take(&mut ebpf, names::CONNS)?,
            held: take(&mut ebpf, names::HELD)?,
            connecting_owners: take(&mut ebpf, names::CONNECTING_OWNERS)?,
            sk_marks: take(&mut ebpf, names::SK_MARKS)?,
            local_nets: take(&mut ebpf, names::LOCAL_NETS)?,
            peer_nets: take(&mut ebpf, names::PEER_NETS)?,
            service_nets: take(&mut ebpf, names::SERVICE_NETS)?,
            rule_ports: take(&mut ebpf, names::RULE_PORTS)?,
            stats: take(&mut ebpf, names::STATS)?,
            ktls_recvmsg: take(&mut ebpf, names::KTLS_RECVMSG)?,
            exempt: Exempt(Arc::new(Mutex::new(take(&mut ebpf, names::EXEMPT)?))),
            attached,
            opened: std::collections::VecDeque::new(),
            keying: 0,
            held_map: HeldMapCheck::default(),
            _ebpf: ebpf,
        })
    }

    /// Writes the selection policy into the maps, replacing the previous
    /// one. New entries go in before stale ones are removed, so a connection
    /// that starts meanwhile is judged by the old or the new policy (or, for
    /// a rule whose ports change, briefly their union), never by neither.
    /// Connections already selected are not affected.
    pub fn write_policy(&mut self, policy: &PolicySection) -> Result<(), BpfError> {
        let old_ports: Vec<PortKey> = self.rule_ports.keys().filter_map(Result::ok).collect();
        let mut ports_written = Vec::new();
        let local: Vec<(&Cidr, u32)> = policy.local_cidrs.iter().map(|c| (c, 1)).collect();
        let mut peer = Vec::new();
        for (rule, r) in rules_by_id(policy) {
            peer.extend(r.peer_cidrs.iter().map(|c| (c, rule)));
        }
        let service: Vec<(&Cidr, u32)> = policy
            .service_cidrs
            .iter()
            .map(|c| (c, tlshub_ebpf::SERVICE_RULE))
            .collect();
        // Ports first, so that a prefix never points at a rule without them.
        for (rule, port) in rule_port_keys(policy) {
            let key = PortKey { rule, port, pad: 0 };
            self.rule_ports
                .insert(key, 1, 0)
                .map_err(map_err(names::RULE_PORTS))?;
            ports_written.push((rule, port));
        }
        replace_prefixes(&mut self.local_nets, names::LOCAL_NETS, &local)?;
        replace_prefixes(&mut self.peer_nets, names::PEER_NETS, &peer)?;
        replace_prefixes(&mut self.service_nets, names::SERVICE_NETS, &service)?;
        for k in old_ports {
            if !ports_written.contains(&(k.rule, k.port)) {
                let _ = self.rule_ports.remove(&k);
            }
        }
        Ok(())
    }

    /// The gate state of a connection, `None` once the socket closed.
    pub fn conn(&self, cookie: u64) -> Option<Conn> {
        self.conns.get(&cookie, 0).ok()
    }

    /// A second handle on `conns` (opened from its pin), for keying jobs.
    pub fn conns_reader(&self) -> Result<ConnsReader, BpfError> {
        let path = self.pin_dir.join("maps").join(names::CONNS);
        let data = MapData::from_pin(&path).map_err(map_err(names::CONNS))?;
        let map =
            HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(map_err(names::CONNS))?;
        Ok(ConnsReader(map))
    }

    /// Opens the gate of a connection for good (keyed, or let through by
    /// fail-open) and stops tracking it: its mark becomes "open" (no
    /// cookie, so the gate passes it after one lookup; its close is still
    /// reported) and its `conns` entry goes, a little later
    /// ([`Programs::untrack_opened`]), so that an open connection costs
    /// no entry however long it stays open. `socket` is the core's
    /// duplicate.
    pub fn open_gate(
        &mut self,
        cookie: u64,
        socket: &impl std::os::fd::AsRawFd,
    ) -> Result<(), BpfError> {
        if !self.set_gate(cookie, gate::OPEN)? {
            return Ok(());
        }
        let open = SkMark {
            cookie: 0,
            flags: mark::OPEN,
            unsent_since_ms: 0,
        };
        self.sk_marks
            .insert(socket, open, 0)
            .map_err(map_err(names::SK_MARKS))?;
        self.opened.push_back((std::time::Instant::now(), cookie));
        Ok(())
    }

    /// Removes the `conns` entries of connections whose gate was opened at
    /// least [`UNTRACK_DELAY`] ago. Why not at once: a gate check that
    /// read the socket's old mark (with the cookie) just before it was
    /// replaced looks the cookie up next, and without the entry it would
    /// fail the call with `ECONNRESET`. BPF programs run to completion in
    /// microseconds (these are not sleepable), so after the delay no check
    /// can still hold the old mark. An entry that is gone already (the
    /// socket closed meanwhile, and the close was reported from it) is
    /// skipped.
    pub fn untrack_opened(&mut self) {
        while let Some(&(at, cookie)) = self.opened.front() {
            if at.elapsed() < UNTRACK_DELAY {
                break;
            }
            self.opened.pop_front();
            if self.conn(cookie).is_some_and(|c| c.gate == gate::OPEN) {
                let _ = self.conns.remove(&cookie);
            }
        }
    }

    /// Sets the gate of a tracked connection (without its socket: also for
    /// a connection the core has no handle on). `Ok(false)` when the
    /// connection is no longer tracked (it closed).
    pub fn set_gate(&mut self, cookie: u64, state: u32) -> Result<bool, BpfError> {
        let Some(mut conn) = self.conn(cookie) else {
            return Ok(false);
        };
        conn.gate = state;
        // Replacing the value is atomic for readers: the BPF side either sees
        // the old element or the new one.
        const BPF_EXIST: u64 = 2;
        match self.conns.insert(cookie, conn, BPF_EXIST) {
            Ok(()) => Ok(true),
            // Closed in the meantime: nothing left to set.
            Err(_) if self.conn(cookie).is_none() => Ok(false),
            Err(e) => Err(map_err(names::CONNS)(e)),
        }
    }

    /// Every tracked connection (for adopting them after a restart).
    pub fn all_conns(&self) -> Vec<(u64, Conn)> {
        self.conns.iter().filter_map(Result::ok).collect()
    }

    /// Tells the gate a core is alive now, and what to do once none has
    /// beaten for `grace`: fail the calls of connections still waiting for
    /// keys (fail-closed) or let them through (fail-open).
    pub fn heartbeat(&mut self, grace: std::time::Duration, fail_open: bool) {
        let grace_ns = u64::try_from(grace.as_nanos()).unwrap_or(u64::MAX);
        self.write_control(crate::sys::monotonic_ns(), grace_ns, fail_open);
    }

    /// Announces `keying` (the active provider's `keying_id`) in the TCP
    /// option of new selected connections from the next heartbeat on.
    pub fn set_keying(&mut self, keying: u8) {
        self.keying = keying;
    }

    /// The last heartbeat a core wrote (`CLOCK_MONOTONIC` ns; 0 after a
    /// release) and the grace it set.
    pub fn heartbeat_read(&self) -> (u64, std::time::Duration) {
        self.control
            .get(&0, 0)
            .map_or((0, std::time::Duration::ZERO), |c| {
                (c.heartbeat_ns, std::time::Duration::from_nanos(c.grace_ns))
            })
    }

    /// Tells the gate no core is alive: from now on it applies the failure
    /// policy itself instead of holding.
    pub fn no_core(&mut self, fail_open: bool) {
        self.write_control(0, 0, fail_open);
    }

    fn write_control(&mut self, heartbeat_ns: u64, grace_ns: u64, fail_open: bool) {
        let c = Control {
            heartbeat_ns,
            grace_ns,
            no_core: if fail_open {
                no_core::PASS
            } else {
                no_core::REFUSE
            },
            keying: u32::from(self.keying),
        };
        if let Err(e) = self.control.set(0, c, 0) {
            warn!(error = %e, "cannot write the gate's control map");
        }
    }

    /// Gate refusals (or passes) for lack of a core.
    pub fn no_core_refusals(&self) -> u64 {
        self.stat(stat::NO_CORE_REFUSALS)
    }

    /// Holds recorded in the map because the ring buffer was full: (tgid, record).
    pub fn held(&self) -> Vec<(u32, Held)> {
        self.held.iter().filter_map(Result::ok).collect()
    }

    /// Owners `connect()` recorded for selected sockets still connecting
    /// (cookie, owner); pid 0 where none was recorded yet.
    pub fn connecting_owners(&self) -> Vec<(u64, Owner)> {
        self.connecting_owners
            .iter()
            .filter_map(Result::ok)
            .collect()
    }

    /// Forgets a held record.
    pub fn forget_held(&mut self, pid: u32) {
        let _ = self.held.remove(&pid);
    }

    /// A counter from the `stats` array.
    pub fn stat(&self, index: u32) -> u64 {
        self.stats.get(&index, 0).unwrap_or(0)
    }

    /// Whether the gate learned kTLS's receive method (from the first
    /// socket keyed), so that it counts a socket as open once its receive
    /// keys are in (see `ktls_on()` in the BPF source).
    pub fn knows_ktls(&self) -> bool {
        self.ktls_recvmsg.get(&0, 0).is_ok_and(|m| m != 0)
    }

    /// Events lost to a full ring buffer.
    pub fn ringbuf_drops(&self) -> u64 {
        self.stat(stat::RINGBUF_DROPS)
    }

    /// Entries in the maps that must return to idle: (conns, held).
    pub fn map_sizes(&self) -> (usize, usize) {
        (self.conns.keys().count(), self.held.keys().count())
    }
}

/// Reads every record the ring buffer holds now.
pub fn drain_events(ring: &mut RingBuf<MapData>) -> Vec<tlshub_ebpf::Event> {
    let mut batch = Vec::new();
    while let Some(item) = ring.next() {
        match tlshub_ebpf::Event::from_bytes(&item) {
            Ok(ev) => batch.push(ev),
            Err(e) => tracing::error!(error = %e, "bad event from BPF"),
        }
    }
    batch
}

/// The state machine's kernel: these maps, and the syscalls on the core's
/// socket duplicates and on held processes.
impl crate::state::Kernel for Programs {
    type Socket = std::os::fd::OwnedFd;

    fn conn(&self, cookie: u64) -> Option<Conn> {
        Programs::conn(self, cookie)
    }

    fn open_gate(
        &mut self,
        cookie: u64,
        socket: &Self::Socket,
        behind: crate::state::Behind,
    ) -> Result<(), BpfError> {
        Programs::open_gate(self, cookie, socket)?;
        // An event loop the gate told EAGAIN waits for readiness that
        // opening the gate does not signal.
        let readers = behind == crate::state::Behind::Plain;
        if let Err(e) = crate::sys::wake_waiters(std::os::fd::AsFd::as_fd(socket), readers) {
            tracing::debug!(cookie, error = %e, "cannot wake the socket's waiters");
        }
        Ok(())
    }

    fn set_gate(&mut self, cookie: u64, state: u32) -> Result<bool, BpfError> {
        Programs::set_gate(self, cookie, state)
    }

    fn reset(&mut self, socket: &Self::Socket) -> std::io::Result<()> {
        crate::sys::reset_connection(std::os::fd::AsFd::as_fd(socket))
    }

    fn shutdown(&mut self, socket: &Self::Socket) {
        let _ = crate::sys::shutdown_both(std::os::fd::AsFd::as_fd(socket));
    }

    fn destroy(&mut self, cookie: u64, pids: &[u32]) -> Result<(), crate::sockdiag::SockDiagError> {
        let conn = Programs::conn(self, cookie)
            .filter(|c| c.est.kind == tlshub_ebpf::kind::ESTABLISHED)
            .ok_or(crate::sockdiag::SockDiagError::NoTuple { cookie })?;
        let target = crate::sockdiag::Target {
            local: conn.est.local(),
            remote: conn.est.remote(),
            cookie,
        };
        crate::sockdiag::destroy_seen_by(
            pids.iter()
                .copied()
                .chain([conn.owner_pid, conn.waiting_pid]),
            target,
        )
    }

    fn take_held_overflow(&mut self) -> Vec<(u32, Held)> {
        let drops = self.ringbuf_drops();
        if !self.held_map.due(drops, std::time::Instant::now()) {
            return Vec::new();
        }
        let held = self.held();
        for (pid, _) in &held {
            self.forget_held(*pid);
        }
        held
    }

    fn process_state(&self, pid: u32) -> Option<char> {
        crate::procfs::state(pid)
    }

    fn continue_process(&mut self, pid: u32) -> std::io::Result<()> {
        crate::sys::continue_process(pid)
    }

    fn now_ns(&self) -> u64 {
        crate::sys::monotonic_ns()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_held_map_is_read_when_drops_moved_and_once_a_second() {
        let mut check = HeldMapCheck::default();
        let t0 = std::time::Instant::now();
        let ms = std::time::Duration::from_millis;
        assert!(
            check.due(0, t0),
            "the first sweep reads it (an earlier core's holds)"
        );
        assert!(!check.due(0, t0 + ms(50)), "no drop: not read");
        assert!(check.due(1, t0 + ms(100)), "a drop: read");
        assert!(!check.due(1, t0 + ms(150)));
        assert!(
            check.due(1, t0 + ms(1100)),
            "a second after the last read, whatever the counter says"
        );
        assert!(!check.due(1, t0 + ms(1150)));
    }

    fn policy(text: &str) -> PolicySection {
        toml::from_str(text).unwrap()
    }

    /// Listeners answer the announcement only on ports some peer rule
    /// selects; "any port" in one rule makes it every listener. Service
    /// ports are a connecting side's only and open no listener.
    #[test]
    fn listeners_answer_on_every_peer_rules_ports_and_no_others() {
        use tlshub_ebpf::{LISTEN_RULE, SERVICE_RULE};
        let two_rules = policy(
            r#"
service_cidrs = ["10.96.0.0/12"]
service_ports = [80]
[[rules]]
peer_cidrs = ["10.0.2.0/24"]
ports = [8443, 9000]
[[rules]]
peer_cidrs = ["10.0.3.0/24"]
ports = [9000, 7000]
"#,
        );
        assert_eq!(
            rule_port_keys(&two_rules),
            [
                (0, 8443),
                (0, 9000),
                (1, 9000),
                (1, 7000),
                (SERVICE_RULE, 80),
                (LISTEN_RULE, 8443),
                (LISTEN_RULE, 9000),
                (LISTEN_RULE, 7000),
            ]
        );
        let any_port = policy(
            r#"
[[rules]]
peer_cidrs = ["10.0.2.0/24"]
ports = [8443]
[[rules]]
peer_cidrs = ["10.0.3.0/24"]
"#,
        );
        assert_eq!(
            rule_port_keys(&any_port),
            [(0, 8443), (1, 0), (LISTEN_RULE, 0)]
        );
        assert!(
            rule_port_keys(&policy("")).is_empty(),
            "no rule, no listener"
        );
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("tlshub-pins-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A pin directory holding another build's programs is refused with a
    /// message that says what to do; this build's own directory is used.
    #[test]
    fn another_builds_pins_are_refused_and_ours_are_used() {
        let d = scratch("foreign");
        let ours = build_dir(&d).unwrap();
        assert_eq!(ours.file_name().unwrap().len(), 16);
        std::fs::create_dir_all(ours.join("links")).unwrap();
        assert_eq!(build_dir(&d).unwrap(), ours);
        assert!(!links_complete(&ours.join("links")));
        std::fs::create_dir_all(d.join("0123456789abcdef")).unwrap();
        let e = build_dir(&d).unwrap_err().to_string();
        assert!(
            e.contains("another tlshub build") && e.contains("release"),
            "{e}"
        );
        unpin_all(&d).unwrap();
        assert!(!d.exists(), "unpin_all removes every build's pins");
    }

    /// The object's sockops program passes this machine's verifier too
    /// (CO-RE against a second kernel). The fexit and LSM programs cannot
    /// load here (the development kernel refuses fentry/fexit and BPF LSM);
    /// the VM scenarios load and exercise all of them.
    #[test]
    fn sockops_loads_on_the_host_kernel() {
        let mut ebpf = object_loader()
            .load(tlshub_ebpf::OBJECT)
            .expect("object parses and its maps are created");
        let p: &mut SockOps = program(&mut ebpf, names::SOCKOPS).unwrap();
        p.load().expect("sockops passes the verifier");
    }
}
