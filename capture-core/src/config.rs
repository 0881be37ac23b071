//! The core's configuration: a TOML file (sections with defaults) plus
//! command-line overrides. Unknown keys and bad values are errors that name
//! the file, line and key; nothing falls back silently.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read or parsed (the message names file, line, key).
    #[error(transparent)]
    File(#[from] tlshub_provider_sdk::runtime::ConfigError),
    /// The values parse but do not make sense together.
    #[error("invalid config file {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Which keys disagree, and how.
        reason: String,
    },
}

/// What happens to a connection whose keys cannot be installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// Reset the connection; the application sees ECONNRESET and no byte
    /// leaves in plaintext.
    #[default]
    FailClosed,
    /// Let the connection continue in plaintext (counted, logged as a warning).
    FailOpen,
}

pub use tlshub_provider_sdk::cidr::Cidr;

/// `[provider]`: where keys come from. Several providers can be known by
/// name; one is active (new connections go to it), and an optional fallback
/// takes over while the active one is unhealthy.
///
/// ```toml
/// [provider]
/// active = "openssl"
/// fallback = "boringssl"
/// [provider.endpoints]
/// openssl = "/run/tlshub/providers/openssl.sock"
/// boringssl = "/run/tlshub/providers/boringssl.sock"
/// ```
///
/// `socket = "PATH"` alone is shorthand for one provider named `default`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderSection {
    /// Shorthand: the one provider's socket (named [`DEFAULT_PROVIDER`]).
    pub socket: Option<PathBuf>,
    /// Provider name to Unix socket path.
    pub endpoints: BTreeMap<String, PathBuf>,
    /// The provider new connections go to (required with several endpoints).
    pub active: Option<String>,
    /// Used while the active provider is unhealthy, if set.
    pub fallback: Option<String>,
    /// How long one connection may wait for its keys (including waiting for
    /// a provider that is restarting) before the failure policy applies.
    pub timeout_ms: u64,
    /// How often each provider's `grpc.health.v1` status is checked.
    pub health_interval_ms: u64,
    /// Where `tlshubctl provider use` records a switch, so that a restarted
    /// core keeps it (the default, under `/run`, lasts until the next boot;
    /// editing `active` here overrides an earlier switch).
    pub switch_file: PathBuf,
}

/// The name of the provider given by `provider.socket` or `--provider-socket`.
pub const DEFAULT_PROVIDER: &str = "default";

impl Default for ProviderSection {
    fn default() -> Self {
        Self {
            socket: None,
            endpoints: BTreeMap::new(),
            active: None,
            fallback: None,
            timeout_ms: 2000,
            health_interval_ms: 1000,
            switch_file: PathBuf::from("/run/tlshub/active-provider.json"),
        }
    }
}

/// The providers a configuration names, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderSet {
    /// Name to socket.
    pub endpoints: BTreeMap<String, PathBuf>,
    /// The active provider at start.
    pub active: String,
    /// The fallback provider.
    pub fallback: Option<String>,
}

impl ProviderSection {
    /// The named providers, with `active` and `fallback` checked against them.
    pub fn resolve(&self) -> Result<ProviderSet, String> {
        let mut endpoints = self.endpoints.clone();
        match (&self.socket, endpoints.is_empty()) {
            (Some(_), false) => {
                return Err(
                    "`provider.socket` and `provider.endpoints` are exclusive (socket is shorthand for one provider named `default`)".into(),
                );
            }
            (Some(s), true) => {
                endpoints.insert(DEFAULT_PROVIDER.into(), s.clone());
            }
            (None, true) => {
                endpoints.insert(
                    DEFAULT_PROVIDER.into(),
                    PathBuf::from("/run/tlshub/provider.sock"),
                );
            }
            (None, false) => {}
        }
        for name in endpoints.keys() {
            if !valid_provider_name(name) {
                return Err(format!(
                    "`provider.endpoints.{name}`: a provider name is 1 to 32 characters of a-z, 0-9, `-` and `_`"
                ));
            }
        }
        let active = match (&self.active, endpoints.len()) {
            (Some(a), _) => a.clone(),
            (None, 1) => endpoints.keys().next().cloned().unwrap_or_default(),
            (None, _) => {
                return Err(
                    "`provider.active` must name one of `provider.endpoints` when there are several".into(),
                );
            }
        };
        if !endpoints.contains_key(&active) {
            return Err(format!(
                "`provider.active` = \"{active}\" is not in `provider.endpoints` ({})",
                endpoints.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        if let Some(f) = &self.fallback {
            if !endpoints.contains_key(f) {
                return Err(format!(
                    "`provider.fallback` = \"{f}\" is not in `provider.endpoints`"
                ));
            }
            if *f == active {
                return Err("`provider.fallback` is the active provider".into());
            }
        }
        Ok(ProviderSet {
            endpoints,
            active,
            fallback: self.fallback.clone(),
        })
    }
}

/// Provider names appear in metrics labels and logs: short and plain.
pub fn valid_provider_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// One selection rule: peers in these CIDRs, on these server ports.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Peer address prefixes.
    pub peer_cidrs: Vec<Cidr>,
    /// Server ports (the destination port on the connecting side, the local
    /// port on the accepting side); empty means every port.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// What a connection this rule selects becomes when the other end did
    /// not announce in the TCP handshake that its node selects it too.
    #[serde(default)]
    pub mode: RuleMode,
}

/// A rule's answer to a peer that did not announce tlshub in the TCP
/// handshake (its node runs no tlshub, an older one, or does not select
/// the connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RuleMode {
    /// Protected or failed by the failure policy, whatever the peer said.
    #[default]
    Strict,
    /// Protected when the peer announced; plain (counted per peer) when it
    /// did not. For rollouts: nothing breaks, and nothing is protected
    /// against an on-path attacker who strips the option.
    Opportunistic,
}

impl RuleMode {
    /// Its name in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::Opportunistic => "opportunistic",
        }
    }
}

/// `[policy]`: which connections are protected.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySection {
    /// This node's pod address prefixes: only sockets whose local address is
    /// in one of them are this core's to protect.
    pub local_cidrs: Vec<Cidr>,
    /// Selection rules; a connection is selected if any rule matches.
    pub rules: Vec<Rule>,
    /// Service virtual addresses that the node translates (DNAT, as
    /// kube-proxy does) to pods elsewhere. A connect from a local pod to
    /// one of them is held from its first byte like a selected one; at
    /// establishment the core reads the real destination from the node's
    /// connection tracking table (see [`ConntrackSection`]) and keys the
    /// connection if the rules select that destination, or lets it through
    /// as plain if they do not.
    pub service_cidrs: Vec<Cidr>,
    /// The service ports held that way (the port the client connects to,
    /// before translation); empty means every port.
    pub service_ports: Vec<u16>,
}

impl PolicySection {
    /// The rule that selects a connection between `local` (this side) and
    /// `remote`, judged exactly as the sockops program judges it: the local
    /// address is one of this node's pods, the longest `peer_cidrs` prefix
    /// holding `remote` belongs to a rule (the last one, when two rules list
    /// the same prefix, as the map keeps the last write), and that rule
    /// takes the server port (`remote`'s when this side connects, `local`'s
    /// when it accepts). `None`: not selected.
    pub fn rule_for(
        &self,
        connecting: bool,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Option<&Rule> {
        if !self.local_cidrs.iter().any(|c| c.contains(local.ip())) {
            return None;
        }
        let port = if connecting {
            remote.port()
        } else {
            local.port()
        };
        self.peer_rule(remote.ip())
            .filter(|r| r.ports.is_empty() || r.ports.contains(&port))
    }

    /// The rule whose `peer_cidrs` hold `peer` with the longest prefix (the
    /// last one on equal prefixes), whatever the port: the rule that judges
    /// connections with `peer` on its ports.
    pub fn peer_rule(&self, peer: std::net::IpAddr) -> Option<&Rule> {
        let mut best: Option<(u32, &Rule)> = None;
        for rule in &self.rules {
            for cidr in rule.peer_cidrs.iter().filter(|c| c.contains(peer)) {
                let len = cidr.mapped_prefix();
                if best.is_none_or(|(b, _)| len >= b) {
                    best = Some((len, rule));
                }
            }
        }
        best.map(|(_, r)| r)
    }

    /// Whether a connection from `local` to `remote` (this side
    /// connecting) is selected ([`PolicySection::rule_for`]).
    pub fn selects_client(&self, local: SocketAddr, remote: SocketAddr) -> bool {
        self.rule_for(true, local, remote).is_some()
    }

    /// Whether `remote` is a service address this policy holds (see
    /// [`PolicySection::service_cidrs`]) and no rule names it as a peer
    /// (a peer rule comes first, in the sockops program too).
    pub fn is_service(&self, remote: SocketAddr) -> bool {
        self.service_cidrs.iter().any(|c| c.contains(remote.ip()))
            && (self.service_ports.is_empty() || self.service_ports.contains(&remote.port()))
            && !self
                .rules
                .iter()
                .any(|r| r.peer_cidrs.iter().any(|c| c.contains(remote.ip())))
    }
}

/// `[conntrack]`: where the core reads service translations (see
/// [`PolicySection::service_cidrs`]).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ConntrackSection {
    /// The network namespace whose connection tracking table holds the
    /// service translation: a file such as `/run/netns/NAME` or
    /// `/proc/PID/ns/net`. Unset: the core's own, which is the node's (where
    /// kube-proxy's rules live). Test beds whose nodes are namespaces name
    /// the node's here.
    pub netns: Option<PathBuf>,
}

/// `[peers]`: the peers that announced tlshub in a TCP handshake, which an
/// opportunistic rule never lets through as plain again (see
/// [`crate::peers`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeersSection {
    /// Where they are kept across restarts and reboots (read at startup,
    /// written when a peer first announces or is forgotten). Its directory
    /// is made if missing; a core that cannot write here does not start.
    pub file: PathBuf,
    /// The cluster's node map (the file the providers read): when set, a
    /// peer is the node that owns the address, so one announcement covers
    /// every pod of that node. Unset: each address on its own. Re-read by
    /// `policy reload`.
    pub node_map: Option<PathBuf>,
}

impl Default for PeersSection {
    fn default() -> Self {
        Self {
            file: PathBuf::from("/var/lib/tlshub/peers.json"),
            node_map: None,
        }
    }
}

/// `[bpf]`: where programs attach.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BpfSection {
    /// The cgroup v2 directory the sockops program attaches to.
    pub cgroup: PathBuf,
    /// Where the programs' links and maps are pinned (on bpffs), so they
    /// outlive a core restart.
    pub pin_dir: PathBuf,
    /// How long the gate keeps holding new connections while no core is
    /// alive (a restarting core adopts them); after that it applies the
    /// failure policy by itself instead of stopping processes.
    pub core_restart_grace_ms: u64,
    /// Entries of the `conns` map: selected connections waiting for keys
    /// at the same time on this node (a keyed one keeps no entry). A selected
    /// connection that finds it full fails closed: its app's calls fail
    /// with `ECONNRESET` (counted as `tlshub_gate_map_full_total`). Each
    /// entry is a 120-byte value plus its key and the hash table's element
    /// header (about 180 bytes, computed, not measured). Takes effect when
    /// the programs are loaded, not on an adopting restart.
    pub max_connections: u32,
    /// Of those, how many one process's connections may take at once: a
    /// connection whose process already has this many waiting for keys is
    /// reset at once (whatever the failure policy), counted as a failure
    /// with reason `process_bound`. So one app whose peers answer but never
    /// let a connection be keyed cannot make every other app's new
    /// connections fail. Unset: a quarter of `max_connections`. Takes
    /// effect when the core starts.
    pub max_connections_per_process: Option<u32>,
    /// The same bound for all the processes of one cgroup (v2) together, so
    /// that an app cannot escape the bound per process by forking: a pod's
    /// or a service's processes share one. A connection whose owner's
    /// cgroup is not known (its owner came from the `held` map), or whose
    /// owner is in the root cgroup (where every process is on a host that
    /// does not give processes cgroups of their own), counts against its
    /// process only. Reason `cgroup_bound`.
    /// Unset: a quarter of `max_connections`. Takes effect when the core
    /// starts.
    pub max_connections_per_cgroup: Option<u32>,
    /// Entries of the `held` map: processes the gate can have stopped at
    /// once whose hold the event ring buffer had no room to report (the
    /// core's sweep finds them there). When both are full, the gate fails
    /// the call with `EINTR` instead of stopping the process (counted as
    /// `tlshub_gate_hold_unrecorded_total`); apps retry interrupted calls.
    /// Each entry is about 70 bytes. Takes effect when the programs are
    /// loaded, not on an adopting restart.
    pub max_held_processes: u32,
    /// Size of the ring buffer that carries the gate's events to the core
    /// (each event takes 96 bytes with its record header): a power of two, at least 4,096 (a
    /// page). Events that find it full are recovered from the maps, holds
    /// from the `held` map. Takes effect when the programs are loaded, not
    /// on an adopting restart.
    pub event_buffer_bytes: u32,
}

impl BpfSection {
    /// `max_connections_per_process`, or its default (a quarter of
    /// `max_connections`, at least 1).
    pub fn process_bound(&self) -> u32 {
        self.max_connections_per_process
            .unwrap_or(self.default_bound())
    }

    /// `max_connections_per_cgroup`, or its default (a quarter of
    /// `max_connections`, at least 1).
    pub fn cgroup_bound(&self) -> u32 {
        self.max_connections_per_cgroup
            .unwrap_or(self.default_bound())
    }

    fn default_bound(&self) -> u32 {
        (self.max_connections / 4).max(1)
    }
}

/// The most `[bpf] max_connections` accepts (about 2.9 GiB of entries).
pub const MAX_CONNECTIONS_LIMIT: u32 = 16 << 20;
/// The most `[bpf] max_held_processes` accepts (the kernel's highest
/// `pid_max`).
pub const MAX_HELD_PROCESSES_LIMIT: u32 = 4 << 20;
/// The bounds of `[bpf] event_buffer_bytes` (a page, and 256 MiB).
pub const EVENT_BUFFER_BYTES_RANGE: std::ops::RangeInclusive<u32> = 4096..=(256 << 20);

impl Default for BpfSection {
    fn default() -> Self {
        Self {
            cgroup: PathBuf::from("/sys/fs/cgroup"),
            pin_dir: PathBuf::from("/sys/fs/bpf/tlshub"),
            core_restart_grace_ms: 5000,
            max_connections: 65_536,
            max_connections_per_process: None,
            max_connections_per_cgroup: None,
            max_held_processes: 16_384,
            event_buffer_bytes: 1 << 20,
        }
    }
}

/// `[admin]`: the administration API (`tlshubctl`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// Its Unix socket, created mode 0600 (root only).
    pub socket: PathBuf,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/tlshub/admin.sock"),
        }
    }
}

/// `[metrics]`: the Prometheus text endpoint (`GET /metrics`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Serve metrics at all.
    pub enabled: bool,
    /// Address and port to listen on; loopback unless you mean otherwise.
    pub listen: std::net::SocketAddr,
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// `[ktls]`: how protected sockets are set up besides their keys.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KtlsSection {
    /// Raise each protected socket's send buffer to at least this many
    /// bytes before kTLS is installed (0: never). Unset: 4 MiB on kernels
    /// before 6.5, untouched on later ones; see [`Self::send_buffer_floor`].
    pub send_buffer_floor_bytes: Option<u32>,
}

/// The send buffer floor on kernels that need one (the largest a send
/// buffer grows to by itself with the default `net.ipv4.tcp_wmem`).
pub const DEFAULT_SEND_BUFFER_FLOOR: u32 = 4 << 20;

/// The largest floor accepted (the kernel doubles `SO_SNDBUF` into an int).
pub const MAX_SEND_BUFFER_FLOOR: u32 = 1 << 30;

impl KtlsSection {
    /// The floor for a kernel of `release` (`uname -r`, e.g.
    /// `6.1.0-57-cloud-amd64`).
    ///
    /// Why a floor at all: before Linux 6.5, sendfile() and splice() into a
    /// kTLS socket go through `tls_sw_sendpage`, which hands each finished
    /// record to TCP with `MSG_SENDPAGE_NOTLAST` while more pages follow, so
    /// TCP queues it without sending it (up to a GSO size, 64 KiB). When
    /// the send buffer is full at that point, the kTLS code waits for space
    /// without pushing what TCP holds: with nothing in flight no ACK ever
    /// comes, and the application waits forever (measured in the VM on
    /// 6.1: three records, 49,218 bytes, unsent behind a 46,080-byte send
    /// buffer). With a send buffer well above 64 KiB the buffer can only be
    /// full while data is in flight, and each ACK pushes the queue on.
    /// Linux 6.5 replaced that path (`MSG_SPLICE_PAGES`, which always ends
    /// in a push). The floor is applied when the connection is keyed, so
    /// it overrides a buffer the application sized before connect() or on
    /// its listener; one it shrinks again after keying is its own.
    pub fn send_buffer_floor(&self, release: &str) -> u32 {
        match self.send_buffer_floor_bytes {
            Some(bytes) => bytes,
            None if kernel_before(release, (6, 5)) => DEFAULT_SEND_BUFFER_FLOOR,
            None => 0,
        }
    }
}

/// Whether kernel `release` is older than `major.minor`; an unreadable
/// release counts as old (a floor where none is needed costs only memory:
/// it is the size autotuning grows a busy sender's buffer to anyway).
fn kernel_before(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(a), Some(b)) => (a, b) < (major, minor),
        _ => true,
    }
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's name, passed to providers.
    pub node_name: String,
    /// What happens when keys cannot be installed.
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// Key provider.
    #[serde(default)]
    pub provider: ProviderSection,
    /// Selection policy.
    #[serde(default)]
    pub policy: PolicySection,
    /// BPF attachment.
    #[serde(default)]
    pub bpf: BpfSection,
    /// Administration API.
    #[serde(default)]
    pub admin: AdminSection,
    /// Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// Socket setup besides keys.
    #[serde(default)]
    pub ktls: KtlsSection,
    /// Where service translations are read.
    #[serde(default)]
    pub conntrack: ConntrackSection,
    /// Where the peers that announced tlshub are remembered.
    #[serde(default)]
    pub peers: PeersSection,
}

impl Config {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::check(path, tlshub_provider_sdk::runtime::load_toml(path)?)
    }

    /// Parses and checks `text` (read from `path`, for messages).
    #[cfg(test)]
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        Self::check(path, tlshub_provider_sdk::runtime::parse_toml(path, text)?)
    }

    /// Checks what parsed for values that do not make sense together.
    fn check(path: &Path, config: Self) -> Result<Self, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            reason,
        };
        if config.node_name.trim().is_empty() {
            return Err(invalid("`node_name` is empty".into()));
        }
        if config.provider.timeout_ms == 0 {
            return Err(invalid("`provider.timeout_ms` must be above 0".into()));
        }
        if config.provider.health_interval_ms == 0 {
            return Err(invalid(
                "`provider.health_interval_ms` must be above 0".into(),
            ));
        }
        config.provider.resolve().map_err(invalid)?;
        if config
            .ktls
            .send_buffer_floor_bytes
            .is_some_and(|b| b > MAX_SEND_BUFFER_FLOOR)
        {
            return Err(invalid(format!(
                "`ktls.send_buffer_floor_bytes` must be at most {MAX_SEND_BUFFER_FLOOR}"
            )));
        }
        if !(1..=MAX_CONNECTIONS_LIMIT).contains(&config.bpf.max_connections) {
            return Err(invalid(format!(
                "`bpf.max_connections` must be between 1 and {MAX_CONNECTIONS_LIMIT}"
            )));
        }
        for (key, bound) in [
            (
                "max_connections_per_process",
                config.bpf.max_connections_per_process,
            ),
            (
                "max_connections_per_cgroup",
                config.bpf.max_connections_per_cgroup,
            ),
        ] {
            if bound.is_some_and(|n| !(1..=config.bpf.max_connections).contains(&n)) {
                return Err(invalid(format!(
                    "`bpf.{key}` must be between 1 and `bpf.max_connections` ({})",
                    config.bpf.max_connections
                )));
            }
        }
        if !(1..=MAX_HELD_PROCESSES_LIMIT).contains(&config.bpf.max_held_processes) {
            return Err(invalid(format!(
                "`bpf.max_held_processes` must be between 1 and {MAX_HELD_PROCESSES_LIMIT}"
            )));
        }
        let events = config.bpf.event_buffer_bytes;
        if !events.is_power_of_two() || !EVENT_BUFFER_BYTES_RANGE.contains(&events) {
            return Err(invalid(format!(
                "`bpf.event_buffer_bytes` must be a power of two from {} to {}",
                EVENT_BUFFER_BYTES_RANGE.start(),
                EVENT_BUFFER_BYTES_RANGE.end()
            )));
        }
        if config.policy.local_cidrs.is_empty() != config.policy.rules.is_empty() {
            return Err(invalid(
                "`policy.local_cidrs` and `policy.rules` must both be set (or both empty: protect nothing)".into(),
            ));
        }
        if let Some(r) = config
            .policy
            .rules
            .iter()
            .position(|r| r.peer_cidrs.is_empty())
        {
            return Err(invalid(format!("`policy.rules[{r}].peer_cidrs` is empty")));
        }
        if config.policy.rules.is_empty()
            && (!config.policy.service_cidrs.is_empty() || !config.policy.service_ports.is_empty())
        {
            return Err(invalid(
                "`policy.service_cidrs` and `policy.service_ports` need `policy.rules` (they select only through a rule)".into(),
            ));
        }
        Ok(config)
    }

    /// The key timeout.
    pub fn key_timeout(&self) -> Duration {
        Duration::from_millis(self.provider.timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node_name = "node-a"

[provider]
socket = "/run/tlshub/openssl.sock"

[policy]
local_cidrs = ["10.0.1.0/24"]
[[policy.rules]]
peer_cidrs = ["10.0.2.0/24", "fd00:2::/64"]
ports = [8443]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/tlshub/core.toml"), text)
    }

    #[test]
    fn defaults_fill_missing_sections() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.failure_policy, FailurePolicy::FailClosed);
        assert_eq!(c.key_timeout(), Duration::from_secs(2));
        assert_eq!(c.policy.rules[0].peer_cidrs[1].mapped_prefix(), 64);
        assert_eq!(c.policy.local_cidrs[0].mapped_prefix(), 120);
    }

    #[test]
    fn the_send_buffer_floor_applies_before_linux_6_5_unless_set() {
        let c = parse(GOOD).unwrap();
        assert_eq!(
            c.ktls.send_buffer_floor("6.1.0-57-cloud-amd64"),
            DEFAULT_SEND_BUFFER_FLOOR
        );
        assert_eq!(
            c.ktls.send_buffer_floor("5.15.0-91-generic"),
            DEFAULT_SEND_BUFFER_FLOOR
        );
        assert_eq!(
            c.ktls.send_buffer_floor("6.4.16"),
            DEFAULT_SEND_BUFFER_FLOOR
        );
        assert_eq!(c.ktls.send_buffer_floor("6.5.0"), 0);
        assert_eq!(c.ktls.send_buffer_floor("6.12.48+deb13-amd64"), 0);
        assert_eq!(
            c.ktls.send_buffer_floor("garbage"),
            DEFAULT_SEND_BUFFER_FLOOR
        );
        let off = parse(&format!("{GOOD}\n[ktls]\nsend_buffer_floor_bytes = 0\n")).unwrap();
        assert_eq!(off.ktls.send_buffer_floor("6.1.0"), 0);
        let set = parse(&format!(
            "{GOOD}\n[ktls]\nsend_buffer_floor_bytes = 1048576\n"
        ))
        .unwrap();
        assert_eq!(set.ktls.send_buffer_floor("6.12.0"), 1 << 20);
        let e = parse(&format!(
            "{GOOD}\n[ktls]\nsend_buffer_floor_bytes = 2147483648\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("send_buffer_floor_bytes"), "{e}");
        let e = parse(&format!("{GOOD}\n[ktls]\nsend_buffer_floor = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("send_buffer_floor"), "{e}");
    }

    #[test]
    fn a_bad_cidr_names_file_line_and_key() {
        let text = GOOD.replace("10.0.2.0/24", "10.0.2.0/33");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("/etc/tlshub/core.toml"), "{e}");
        assert!(e.contains("line 10"), "{e}");
        assert!(e.contains("peer_cidrs"), "{e}");
        assert!(e.contains("prefix length"), "{e}");
    }

    #[test]
    fn max_connections_is_bounded() {
        assert_eq!(parse(GOOD).unwrap().bpf.max_connections, 65_536);
        let set = |n: &str| format!("{GOOD}\n[bpf]\nmax_connections = {n}\n");
        assert_eq!(parse(&set("16")).unwrap().bpf.max_connections, 16);
        for bad in ["0", "20000000"] {
            let e = parse(&set(bad)).unwrap_err().to_string();
            assert!(e.contains("bpf.max_connections"), "{e}");
        }
    }

    #[test]
    fn connections_per_process_and_cgroup_default_to_a_quarter_and_stay_within_the_map() {
        let good = parse(GOOD).unwrap().bpf;
        assert_eq!(
            (good.process_bound(), good.cgroup_bound()),
            (16_384, 16_384)
        );
        let set = |extra: &str| format!("{GOOD}\n[bpf]\nmax_connections = 16\n{extra}");
        let small = parse(&set("")).unwrap().bpf;
        assert_eq!((small.process_bound(), small.cgroup_bound()), (4, 4));
        let tiny = parse(&format!("{GOOD}\n[bpf]\nmax_connections = 2\n"))
            .unwrap()
            .bpf;
        assert_eq!((tiny.process_bound(), tiny.cgroup_bound()), (1, 1));
        let ok = parse(&set(
            "max_connections_per_process = 16\nmax_connections_per_cgroup = 9",
        ))
        .unwrap()
        .bpf;
        assert_eq!((ok.process_bound(), ok.cgroup_bound()), (16, 9));
        for key in ["max_connections_per_process", "max_connections_per_cgroup"] {
            for bad in ["0", "17"] {
                let e = parse(&set(&format!("{key} = {bad}")))
                    .unwrap_err()
                    .to_string();
                assert!(e.contains(&format!("bpf.{key}")), "{key} = {bad}: {e}");
            }
        }
    }

    #[test]
    fn held_processes_and_event_buffer_are_bounded() {
        let good = parse(GOOD).unwrap().bpf;
        assert_eq!(
            (good.max_held_processes, good.event_buffer_bytes),
            (16_384, 1 << 20)
        );
        let set = |k: &str, n: &str| format!("{GOOD}\n[bpf]\n{k} = {n}\n");
        let ok = parse(&set("max_held_processes", "2")).unwrap().bpf;
        assert_eq!(ok.max_held_processes, 2);
        let ok = parse(&set("event_buffer_bytes", "4096")).unwrap().bpf;
        assert_eq!(ok.event_buffer_bytes, 4096);
        for (key, bad) in [
            ("max_held_processes", "0"),
            ("max_held_processes", "5000000"),
            ("event_buffer_bytes", "2048"),
            ("event_buffer_bytes", "12288"),
            ("event_buffer_bytes", "536870912"),
        ] {
            let e = parse(&set(key, bad)).unwrap_err().to_string();
            assert!(e.contains(&format!("bpf.{key}")), "{key} = {bad}: {e}");
        }
    }

    #[test]
    fn providers_by_name_with_active_and_fallback() {
        let two = GOOD.replace(
            "socket = \"/run/tlshub/openssl.sock\"",
            "active = \"openssl\"\nfallback = \"boringssl\"\n[provider.endpoints]\nopenssl = \"/run/o.sock\"\nboringssl = \"/run/b.sock\"",
        );
        let set = parse(&two).unwrap().provider.resolve().unwrap();
        assert_eq!(set.active, "openssl");
        assert_eq!(set.fallback.as_deref(), Some("boringssl"));
        assert_eq!(set.endpoints["boringssl"], PathBuf::from("/run/b.sock"));
        let one = parse(GOOD).unwrap().provider.resolve().unwrap();
        assert_eq!(one.active, DEFAULT_PROVIDER);
        for (bad, says) in [
            ("active = \"openssl\"", "nope"),
            ("fallback = \"boringssl\"", "fallback = \"x\""),
            ("fallback = \"boringssl\"", "fallback = \"openssl\""),
            (
                "openssl = \"/run/o.sock\"",
                "\"Open SSL\" = \"/run/o.sock\"",
            ),
        ] {
            let text = if says == "nope" {
                two.replace(bad, "")
            } else {
                two.replace(bad, says)
            };
            let e = parse(&text).map(|_| ()).unwrap_err().to_string();
            assert!(
                e.contains("/etc/tlshub/core.toml") && e.contains("provider"),
                "{bad}: {e}"
            );
        }
        let both = two.replace(
            "[provider.endpoints]",
            "socket = \"/x\"\n[provider.endpoints]",
        );
        assert!(parse(&both).is_err());
    }

    #[test]
    fn the_shipped_configuration_parses_with_and_without_its_commented_keys() {
        let shipped = include_str!("../../deploy/config/core.toml");
        let c = parse(shipped).unwrap();
        assert!(c.policy.service_cidrs.is_empty() && c.conntrack.netns.is_none());
        // Every commented `key = value` line is a valid key where it stands.
        let uncommented: String = shipped
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(kv) if kv.contains(" = ") && !kv.contains(':') => kv,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let c = parse(&uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        assert_eq!(c.policy.service_cidrs.len(), 1);
        assert_eq!(c.policy.service_ports, [443]);
        assert!(c.conntrack.netns.is_some());
    }

    #[test]
    fn the_policy_judges_a_connecting_side_as_the_sockops_program_does() {
        let c = parse(&GOOD.replace(
            "local_cidrs = [\"10.0.1.0/24\"]",
            "local_cidrs = [\"10.0.1.0/24\"]\nservice_cidrs = [\"10.96.0.0/12\"]\nservice_ports = [80]",
        ))
        .unwrap();
        let p = &c.policy;
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(p.selects_client(sa("10.0.1.2:1"), sa("10.0.2.2:8443")));
        assert!(p.selects_client(sa("10.0.1.2:1"), sa("[fd00:2::2]:8443")));
        assert!(!p.selects_client(sa("10.0.1.2:1"), sa("10.0.2.2:80")));
        assert!(!p.selects_client(sa("10.0.9.2:1"), sa("10.0.2.2:8443")));
        assert!(p.is_service(sa("10.96.0.10:80")));
        assert!(!p.is_service(sa("10.96.0.10:81")));
        assert!(!p.is_service(sa("10.0.2.2:80")));
        // The longest prefix decides, as in the LPM map: a narrower rule
        // without the port unselects a wider one's.
        let narrow =
            format!("{GOOD}\n[[policy.rules]]\npeer_cidrs = [\"10.0.2.128/25\"]\nports = [9000]\n");
        let p = parse(&narrow).unwrap().policy;
        assert!(p.selects_client(sa("10.0.1.2:1"), sa("10.0.2.2:8443")));
        assert!(!p.selects_client(sa("10.0.1.2:1"), sa("10.0.2.200:8443")));
        assert!(p.selects_client(sa("10.0.1.2:1"), sa("10.0.2.200:9000")));
        // The accepting side's server port is its own; a rule's mode
        // comes with it (strict unless it says otherwise).
        assert!(
            p.rule_for(false, sa("10.0.1.2:9000"), sa("10.0.2.200:5555"))
                .is_some()
        );
        assert!(
            p.rule_for(false, sa("10.0.1.2:8443"), sa("10.0.2.200:5555"))
                .is_none()
        );
        assert_eq!(
            p.rule_for(true, sa("10.0.1.2:1"), sa("10.0.2.2:8443"))
                .map(|r| r.mode),
            Some(RuleMode::Strict)
        );
        let opportunistic =
            parse(&GOOD.replace("ports = [8443]", "ports = [8443]\nmode = \"opportunistic\""))
                .unwrap();
        assert_eq!(
            opportunistic
                .policy
                .rule_for(true, sa("10.0.1.2:1"), sa("10.0.2.2:8443"))
                .map(|r| r.mode),
            Some(RuleMode::Opportunistic)
        );
        // The names the admin API reports are the ones the file takes.
        for mode in [RuleMode::Strict, RuleMode::Opportunistic] {
            let text = GOOD.replace(
                "ports = [8443]",
                &format!("ports = [8443]\nmode = \"{}\"", mode.as_str()),
            );
            assert_eq!(parse(&text).unwrap().policy.rules[0].mode, mode);
        }
        let e = parse(&GOOD.replace("ports = [8443]", "ports = [8443]\nmode = \"maybe\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mode"), "{e}");
        // Service addresses select only through rules.
        let e = parse("node_name = \"a\"\n[policy]\nservice_cidrs = [\"10.96.0.0/12\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("service_cidrs"), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_policy_values_are_errors() {
        let e = parse(&GOOD.replace("timeout", "x")).err();
        assert!(
            e.is_none(),
            "no timeout key in GOOD; this replace is a no-op"
        );
        let e = parse(&format!("{GOOD}\n[bpf]\ncgroupp = \"/x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `cgroupp`"), "{e}");
        let e = parse(&GOOD.replace(
            "node_name = \"node-a\"",
            "node_name = \"node-a\"\nfailure_policy = \"open\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("failure_policy") && e.contains("line 3"), "{e}");
        let e = parse("node_name = \"a\"\n[provider]\ntimeout_ms = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("timeout_ms"), "{e}");
    }
}
