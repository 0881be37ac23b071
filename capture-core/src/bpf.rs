//! Loading and attaching the BPF programs, and every access the core makes
//! to their maps (policy, exemptions, the gate, held processes, stats).

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, RingBuf, SkStorage};
use aya::programs::{CgroupAttachMode, Lsm, SockOps, TracePoint};
use aya::{Btf, Ebpf};
use tlshub_ebpf::{Addr16, Conn, Held, PortKey, SkMark, gate, mapped, names, stat};
use tracing::{debug, info, warn};

use crate::config::PolicySection;

/// Why the programs could not be loaded, attached or used.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The object could not be parsed or a program failed to load.
    #[error("cannot load BPF program {program}: {source}")]
    Load {
        /// The program.
        program: &'static str,
        /// Why.
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
        /// The directory.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A map operation failed.
    #[error("BPF map {map}: {source}")]
    Map {
        /// The map.
        map: &'static str,
        /// Why.
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
pub struct Exempt(Arc<Mutex<HashMap<MapData, u32, u8>>>);

impl std::fmt::Debug for Exempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Exempt")
    }
}

impl Exempt {
    /// Exempts `pid`, dropping entries of processes that no longer exist.
    pub fn add(&self, pid: u32) {
        let Ok(mut map) = self.0.lock() else { return };
        let gone: Vec<u32> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
            .collect();
        for p in gone {
            let _ = map.remove(&p);
        }
        match map.insert(pid, 1, 0) {
            Ok(()) => debug!(pid, "process exempt from the gate"),
            Err(e) => warn!(pid, error = %e, "cannot exempt process from the gate"),
        }
    }
}

/// The loaded and attached programs and the maps the core uses.
pub struct Programs {
    /// Keeps programs and links alive; dropping it detaches everything.
    _ebpf: Ebpf,
    /// Ring buffer of events (taken by the event loop).
    pub events: Option<RingBuf<MapData>>,
    conns: HashMap<MapData, u64, Conn>,
    ino_cookies: HashMap<MapData, u64, u64>,
    held: HashMap<MapData, u32, Held>,
    sk_marks: SkStorage<MapData, SkMark>,
    local_nets: LpmTrie<MapData, Addr16, u32>,
    peer_nets: LpmTrie<MapData, Addr16, u32>,
    rule_ports: HashMap<MapData, PortKey, u8>,
    stats: Array<MapData, u64>,
    /// Processes never held.
    pub exempt: Exempt,
    /// What is attached where: (program, attach point), for status.
    pub attached: Vec<(String, String)>,
}

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

impl Programs {
    /// Loads the object and attaches sockops to `cgroup`, the tracepoints
    /// and the LSM gate.
    pub fn load_and_attach(cgroup: &std::path::Path) -> Result<Self, BpfError> {
        let mut ebpf = Ebpf::load(tlshub_ebpf::OBJECT)?;
        let btf = Btf::from_sys_fs()?;

        let cg = std::fs::File::open(cgroup).map_err(|source| BpfError::Cgroup {
            path: cgroup.display().to_string(),
            source,
        })?;
        let load = |program, source| BpfError::Load { program, source };
        {
            let p: &mut SockOps = program(&mut ebpf, names::SOCKOPS)?;
            p.load().map_err(|e| load(names::SOCKOPS, e))?;
            // A bpf_link: the kernel always attaches links as multi (another
            // core's sockops may sit on the same cgroup); on 6.1 an explicit
            // BPF_F_ALLOW_MULTI flag on link_create is EINVAL.
            p.attach(cg.as_fd(), CgroupAttachMode::Single)
                .map_err(|e| load(names::SOCKOPS, e))?;
        }
        for (name, category, tp) in names::TRACEPOINTS {
            let p: &mut TracePoint = program(&mut ebpf, name)?;
            p.load().map_err(|e| load(name, e))?;
            p.attach(category, tp).map_err(|e| load(name, e))?;
        }
        for (name, hook) in names::LSM {
            let p: &mut Lsm = program(&mut ebpf, name)?;
            p.load(hook, &btf).map_err(|e| load(name, e))?;
            p.attach().map_err(|e| load(name, e))?;
        }
        info!(cgroup = %cgroup.display(), "BPF programs attached");
        let attached = std::iter::once((
            names::SOCKOPS.to_owned(),
            format!("sockops on cgroup {}", cgroup.display()),
        ))
        .chain(
            names::TRACEPOINTS
                .iter()
                .map(|(n, c, t)| ((*n).to_owned(), format!("tracepoint/{c}/{t}"))),
        )
        .chain(
            names::LSM
                .iter()
                .map(|(n, h)| ((*n).to_owned(), format!("lsm/{h}"))),
        )
        .collect();

        Ok(Self {
            events: Some(take(&mut ebpf, names::EVENTS)?),
            conns: take(&mut ebpf, names::CONNS)?,
            ino_cookies: take(&mut ebpf, names::INO_COOKIES)?,
            held: take(&mut ebpf, names::HELD)?,
            sk_marks: take(&mut ebpf, names::SK_MARKS)?,
            local_nets: take(&mut ebpf, names::LOCAL_NETS)?,
            peer_nets: take(&mut ebpf, names::PEER_NETS)?,
            rule_ports: take(&mut ebpf, names::RULE_PORTS)?,
            stats: take(&mut ebpf, names::STATS)?,
            exempt: Exempt(Arc::new(Mutex::new(take(&mut ebpf, names::EXEMPT)?))),
            attached,
            _ebpf: ebpf,
        })
    }

    /// Writes the selection policy into the maps, replacing the previous
    /// one. New entries go in before stale ones are removed, so a connection
    /// that starts meanwhile is judged by the old or the new policy (or, for
    /// a rule whose ports change, briefly their union), never by neither.
    /// Connections already selected are not affected.
    pub fn write_policy(&mut self, policy: &PolicySection) -> Result<(), BpfError> {
        let old_local: Vec<Key<Addr16>> = self.local_nets.keys().filter_map(Result::ok).collect();
        let old_peer: Vec<Key<Addr16>> = self.peer_nets.keys().filter_map(Result::ok).collect();
        let old_ports: Vec<PortKey> = self.rule_ports.keys().filter_map(Result::ok).collect();
        let mut local = Vec::new();
        let mut peer = Vec::new();
        let mut ports_written = Vec::new();
        for cidr in &policy.local_cidrs {
            let key = Key::new(cidr.mapped_prefix(), mapped(cidr.addr));
            self.local_nets
                .insert(&key, 1, 0)
                .map_err(map_err(names::LOCAL_NETS))?;
            local.push((key.prefix_len(), key.data()));
        }
        for (rule, r) in policy.rules.iter().enumerate() {
            let rule = u32::try_from(rule).unwrap_or(u32::MAX);
            for cidr in &r.peer_cidrs {
                let key = Key::new(cidr.mapped_prefix(), mapped(cidr.addr));
                self.peer_nets
                    .insert(&key, rule, 0)
                    .map_err(map_err(names::PEER_NETS))?;
                peer.push((key.prefix_len(), key.data()));
            }
            let ports: Vec<u16> = if r.ports.is_empty() {
                vec![0]
            } else {
                r.ports.clone()
            };
            for port in ports {
                let key = PortKey { rule, port, pad: 0 };
                self.rule_ports
                    .insert(key, 1, 0)
                    .map_err(map_err(names::RULE_PORTS))?;
                ports_written.push((rule, port));
            }
        }
        for k in old_local {
            if !local.contains(&(k.prefix_len(), k.data())) {
                let _ = self.local_nets.remove(&k);
            }
        }
        for k in old_peer {
            if !peer.contains(&(k.prefix_len(), k.data())) {
                let _ = self.peer_nets.remove(&k);
            }
        }
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

    /// Opens the gate of a connection and removes the per-socket lookups
    /// (socket-local mark, inode entry) so that its later sends and receives
    /// cost the gate one failed lookup. `socket` is the core's duplicate.
    pub fn open_gate(
        &mut self,
        cookie: u64,
        socket: &impl std::os::fd::AsRawFd,
    ) -> Result<(), BpfError> {
        let Some(mut conn) = self.conn(cookie) else {
            return Ok(());
        };
        conn.gate = gate::OPEN;
        // Replacing the value is atomic for readers: the BPF side either sees
        // the old element (gate closed) or the new one (open).
        const BPF_EXIST: u64 = 2;
        match self.conns.insert(cookie, conn, BPF_EXIST) {
            Ok(()) => {}
            // Closed in the meantime: nothing left to open.
            Err(_) if self.conn(cookie).is_none() => return Ok(()),
            Err(e) => return Err(map_err(names::CONNS)(e)),
        }
        let _ = self.sk_marks.remove(socket);
        if conn.ino != 0 {
            let _ = self.ino_cookies.remove(&conn.ino);
        }
        Ok(())
    }

    /// Holds recorded in the map because the ring buffer was full: (tgid, record).
    pub fn held(&self) -> Vec<(u32, Held)> {
        self.held.iter().filter_map(Result::ok).collect()
    }

    /// Forgets a held record.
    pub fn forget_held(&mut self, pid: u32) {
        let _ = self.held.remove(&pid);
    }

    /// A counter from the `stats` array.
    pub fn stat(&self, index: u32) -> u64 {
        self.stats.get(&index, 0).unwrap_or(0)
    }

    /// Events lost to a full ring buffer.
    pub fn ringbuf_drops(&self) -> u64 {
        self.stat(stat::RINGBUF_DROPS)
    }

    /// Entries in the map sizes that must return to idle: (conns, ino, held).
    pub fn map_sizes(&self) -> (usize, usize, usize) {
        (
            self.conns.keys().count(),
            self.ino_cookies.keys().count(),
            self.held.keys().count(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The object's sockops and tracepoint programs pass this machine's
    /// verifier too (CO-RE against a second kernel). The LSM programs cannot
    /// load here (the development kernel refuses BPF LSM); the VM scenarios
    /// load and exercise all of them.
    #[test]
    fn sockops_and_tracepoints_load_on_the_host_kernel() {
        let mut ebpf =
            Ebpf::load(tlshub_ebpf::OBJECT).expect("object parses and its maps are created");
        let p: &mut SockOps = program(&mut ebpf, names::SOCKOPS).unwrap();
        p.load().expect("sockops passes the verifier");
        for (name, _, _) in names::TRACEPOINTS {
            let p: &mut TracePoint = program(&mut ebpf, name).unwrap();
            p.load()
                .unwrap_or_else(|e| panic!("{name} does not pass the verifier: {e}"));
        }
    }
}
