//! Prometheus metrics, served at `GET /metrics` by the SDK's endpoint
//! (`tlshub_provider_sdk::metrics::serve_http`, which the providers use
//! too). Labels take only bounded values: provider names from the config,
//! roles, a fixed set of failure reasons and kTLS counter names. Nothing
//! per connection, nothing secret.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tlshub_admin::stats::Stats;
use tlshub_ebpf::stat;
pub use tlshub_provider_sdk::metrics::ListenError;

/// `provider` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabel {
    /// Provider name from the config.
    pub provider: String,
}

/// `peer` label: the other end's address (IPv4 unmapped).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    /// The address.
    pub peer: String,
}

/// `provider` and `role` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderRoleLabels {
    /// Provider name from the config.
    pub provider: String,
    /// `client` or `server`.
    pub role: &'static str,
}

/// `provider`, `role` and `stage` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    /// Provider name from the config.
    pub provider: String,
    /// `client` or `server`.
    pub role: &'static str,
    /// [`tlshub_admin::stats::Stage::name`].
    pub stage: &'static str,
}

/// `provider` and `reason` labels (reasons are a fixed vocabulary from
/// the keying errors).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderReasonLabels {
    /// Provider name from the config.
    pub provider: String,
    /// [`crate::keying::KeyingError::reason`] or a state machine's reason.
    pub reason: &'static str,
}

/// The `provider` label of a hold whose connection no provider was keying
/// yet (its job starts once its owner is known).
pub const UNASSIGNED: &str = "unassigned";

/// `provider` and `credential` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredentialLabels {
    /// Provider name from the config.
    pub provider: String,
    /// What the provider calls it (`certificate /etc/tlshub/certs/node.pem`).
    pub credential: String,
}

/// `counter` label: a `/proc/net/tls_stat` line name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsStatLabel {
    /// e.g. `TlsCurrTxSw`.
    pub counter: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn key_histogram() -> Histogram {
    // 0.5 ms .. ~16 s: TLSHub keys in about a millisecond on hardware,
    // full handshakes under emulation take tens of milliseconds.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

fn stage_histogram() -> Histogram {
    // 50 us .. ~1.6 s: the first stages (the event read, the job's start)
    // take tens of microseconds on hardware.
    Histogram::new(exponential_buckets(0.00005, 2.0, 16))
}

/// A counter the BPF programs keep in their `stats` map, which the core
/// carries into its stats file and its metrics.
#[derive(Debug)]
pub struct BpfCounter {
    /// Index in the `stats` map.
    pub index: u32,
    /// Metric name (`tlshub_` before it, `_total` after).
    pub metric: &'static str,
    /// Metric help.
    pub help: &'static str,
    /// Logged as an error each time the counter grows (growth means
    /// trouble).
    pub alarm: Option<&'static str>,
    /// The [`Stats`] field that mirrors it.
    pub field: fn(&mut Stats) -> &mut u64,
}

/// Every BPF counter the core mirrors (besides the ring buffer's drops and
/// the no-core refusals, which it reads on their own): one row each.
pub const BPF_COUNTERS: [BpfCounter; 14] = [
    BpfCounter {
        index: stat::FASTOPEN_REFUSED,
        metric: "gate_fastopen_refused",
        help: "TCP Fast Open sends to selected destinations that the gate refused with EOPNOTSUPP (the app falls back to connect)",
        alarm: None,
        field: |s| &mut s.fastopen_refused,
    },
    BpfCounter {
        index: stat::MPTCP_REFUSED,
        metric: "gate_mptcp_refused",
        help: "Multipath TCP connections refused where the policy selects them (kTLS cannot be installed on an MPTCP socket): connect(), or listen() on a port a rule selects, answered EOPNOTSUPP (an app may fall back to TCP), or a path that was accepted or added anyway, whose MPTCP socket then fails every call with ECONNRESET; MPTCP Fast Open sends count under gate_fastopen_refused",
        alarm: None,
        field: |s| &mut s.mptcp_refused,
    },
    BpfCounter {
        index: stat::SIMULTANEOUS_OPEN,
        metric: "gate_simultaneous_open",
        help: "Selected connections whose socket connect()ed and then completed as the passive side, because the peer's SYN reached it first (a TCP simultaneous open); keyed in the TLS role both ends agree on (the server when only this end answered a SYN, by endpoint when both SYNs crossed)",
        alarm: None,
        field: |s| &mut s.simultaneous_open,
    },
    BpfCounter {
        index: stat::MAP_FULL,
        metric: "gate_map_full",
        help: "Selected connections failed closed (calls fail with ECONNRESET) because the conns map was full ([bpf] max_connections)",
        alarm: Some(
            "the conns map is full ([bpf] max_connections): new selected connections fail closed",
        ),
        field: |s| &mut s.map_full,
    },
    BpfCounter {
        index: stat::MAP_BUSY,
        metric: "gate_map_busy",
        help: "Selected connections failed closed (calls fail with ECONNRESET) because the conns map was busy when they were established (EBUSY: another update of it on the same CPU, which the packet's processing interrupted); not a capacity problem",
        alarm: Some(
            "a selected connection failed closed: the conns map was busy (EBUSY) when it was established",
        ),
        field: |s| &mut s.map_busy,
    },
    BpfCounter {
        index: stat::FIN_DEFERRED,
        metric: "gate_fin_deferred",
        help: "Segments with a peer's FIN dropped (the peer retransmits them) because they arrived before this side's keys were installed",
        alarm: None,
        field: |s| &mut s.fin_deferred,
    },
    BpfCounter {
        index: stat::REPAIR_REFUSED,
        metric: "gate_repair_refused",
        help: "Sockets put in TCP repair mode that then connected to a selected peer, refused for good (their ISNs are the app's, so they are never keyed)",
        alarm: None,
        field: |s| &mut s.repair_refused,
    },
    BpfCounter {
        index: stat::ZEROCOPY_RECEIVE_REFUSED,
        metric: "gate_zerocopy_receive_refused",
        help: "TCP_ZEROCOPY_RECEIVE calls refused with EOPNOTSUPP on selected sockets before keys and on kTLS sockets",
        alarm: None,
        field: |s| &mut s.zerocopy_receive_refused,
    },
    BpfCounter {
        index: stat::UNMARKED_REFUSED,
        metric: "gate_unmarked_refused",
        help: "Selected connections refused because their socket had no room for the gate's mark (net.core.optmem_max): connect() failed with ENOBUFS (the app had filled the socket's option memory), or an accepted socket's calls fail with ECONNRESET",
        alarm: Some(
            "a selected connection was refused: its socket had no room for the gate's mark (its option memory is full)",
        ),
        field: |s| &mut s.unmarked_refused,
    },
    BpfCounter {
        index: stat::GATE_EAGAIN,
        metric: "gate_eagain",
        help: "Calls on non-blocking selected sockets the gate answered EAGAIN, retries included (a level-triggered event loop retries until the keys are in)",
        alarm: None,
        field: |s| &mut s.gate_eagain,
    },
    BpfCounter {
        index: stat::UNSENT_HOLDS,
        metric: "gate_unsent_holds",
        help: "Times a shutdown() on a protected socket was held until kTLS had handed its last encrypted records to TCP (else its FIN would overtake them and the peer would read a short stream)",
        alarm: None,
        field: |s| &mut s.unsent_holds,
    },
    BpfCounter {
        index: stat::UNSENT_EXPIRED,
        metric: "gate_unsent_expired",
        help: "shutdown() calls let through although kTLS still had records TCP had not taken, because the socket's shutdown had been held for 5 s (the peer stopped reading); the peer may read a short stream, as without tlshub",
        alarm: Some(
            "a shutdown() was let through after 5 s with kTLS records still unsent (the peer stopped reading): the peer may read a short stream",
        ),
        field: |s| &mut s.unsent_expired,
    },
    BpfCounter {
        index: stat::OPEN_RECORD_HOLDS,
        metric: "gate_open_record_holds",
        help: "Times a shutdown() on a protected socket was held while kTLS's open record held bytes written with MSG_MORE, for the core to close and send that record (a FIN does not, so the peer would read a short stream)",
        alarm: None,
        field: |s| &mut s.open_record_holds,
    },
    BpfCounter {
        index: stat::HOLD_UNRECORDED,
        metric: "gate_hold_unrecorded",
        help: "Calls on selected sockets the gate failed with EINTR instead of holding their process, because neither the event ring buffer nor the held map ([bpf] max_held_processes) had room to record the hold; apps retry interrupted calls",
        alarm: Some(
            "the gate could not record a hold (event buffer and held map full): calls fail with EINTR until the core catches up ([bpf] event_buffer_bytes, max_held_processes)",
        ),
        field: |s| &mut s.hold_unrecorded,
    },
];

/// Every metric the core exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Selected connections seen.
    pub selected: Counter,
    /// Connections with kTLS installed, by provider.
    pub protected: Family<ProviderLabel, Counter>,
    /// Protected connections whose keys were ready before any process was
    /// known to hold the socket.
    pub keyed_before_owner: Counter,
    /// Connections that could not be keyed, by provider and reason.
    pub failed: Family<ProviderReasonLabels, Counter>,
    /// Connections reset under fail-closed.
    pub reset: Counter,
    /// Connections let through in plaintext under fail-open.
    pub plaintext: Counter,
    /// Connections to a service address whose backend no rule selects, let
    /// through as plain by policy.
    pub service_plain: Counter,
    /// Connections let through as plain because their rule is
    /// opportunistic and the other end did not announce tlshub, by peer
    /// address.
    pub peer_silent_plain: Family<PeerLabel, Counter>,
    /// The peers [`Metrics::peer_silent_plain`] has a series for (at most
    /// [`MAX_PEER_SERIES`]).
    silent_peers: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Connections let through as plain because their rule is
    /// opportunistic and the other end's provider speaks another keying
    /// protocol.
    pub peer_incompatible_plain: Counter,
    /// Connections whose peer was silent although it had announced tlshub
    /// before, keyed as under a strict rule instead of going plain.
    pub known_peer_silent: Counter,
    /// Peers remembered as having announced tlshub.
    pub peers_announced: Gauge,
    /// Connections closed before their keys were in.
    pub closed_before_keys: Counter,
    /// Time from asking the provider to having keys, by provider and role.
    pub key_seconds: HistogramFamily<ProviderRoleLabels>,
    /// Time from a protected connection's `ESTABLISHED` to each stage of
    /// its keying, by provider, role and stage.
    pub stage_seconds: HistogramFamily<StageLabels>,
    /// Times the gate stopped a process, by the provider keying its
    /// connection ([`UNASSIGNED`] before one was).
    pub gate_holds: Family<ProviderLabel, Counter>,
    /// How long a held process stayed stopped, by the provider that keyed
    /// its connection.
    pub gate_hold_seconds: HistogramFamily<ProviderLabel>,
    /// Provider health: 1 serving, 0 otherwise.
    pub provider_up: Family<ProviderLabel, Gauge>,
    /// 1 for the active provider.
    pub provider_active: Family<ProviderLabel, Gauge>,
    /// Key requests running now, by provider.
    pub provider_in_flight: Family<ProviderLabel, Gauge>,
    /// When each provider's credentials expire (Unix seconds).
    pub credential_expiry: Family<CredentialLabels, Gauge>,
    /// The credentials each provider named last (to drop stale gauges).
    credential_names: std::sync::Mutex<std::collections::HashMap<String, Vec<String>>>,
    /// Active-provider switches.
    pub provider_switches: Counter,
    /// Connections waiting for keys now.
    pub pending: Gauge,
    /// Events the BPF ring buffer dropped.
    pub ringbuf_drops: Counter,
    /// Gate calls failed (fail-closed) or passed (fail-open) because no
    /// core was alive.
    pub no_core: Counter,
    /// Connections whose app the gate answered EAGAIN instead of stopping.
    pub gate_waits: Counter,
    /// The counters of [`BPF_COUNTERS`], in that order.
    pub bpf: Vec<Counter>,
    /// `/proc/net/tls_stat` summed over the network namespaces of the
    /// connections this core protects.
    pub ktls: Family<TlsStatLabel, Gauge>,
    /// The `tls_stat` files [`Metrics::scrape`] sums: one per network
    /// namespace of the protected connections (see
    /// [`Metrics::set_tls_stat_sources`]).
    tls_stat_sources: std::sync::Mutex<Vec<std::path::PathBuf>>,
}

/// How many peers get a series of their own in
/// `tlshub_connections_plain_peer_silent_total`; later ones are counted
/// under `peer="other"`, so that a rollout across a large cluster cannot
/// grow the scrape without bound.
pub const MAX_PEER_SERIES: usize = 1024;

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Counts a connection let through as plain because `peer` did not
    /// announce tlshub (see [`MAX_PEER_SERIES`]).
    pub fn count_silent_peer(&self, peer: std::net::IpAddr) {
        let peer = peer.to_canonical().to_string();
        let label = match self.silent_peers.lock() {
            Ok(mut seen) if seen.contains(&peer) || seen.len() < MAX_PEER_SERIES => {
                seen.insert(peer.clone());
                peer
            }
            _ => "other".to_owned(),
        };
        self.peer_silent_plain
            .get_or_create(&PeerLabel { peer: label })
            .inc();
    }

    /// Creates and registers every metric (prefix `tlshub_`).
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tlshub");
        let m = Self {
            selected: Counter::default(),
            protected: Family::default(),
            keyed_before_owner: Counter::default(),
            failed: Family::default(),
            reset: Counter::default(),
            plaintext: Counter::default(),
            service_plain: Counter::default(),
            peer_silent_plain: Family::default(),
            silent_peers: std::sync::Mutex::default(),
            known_peer_silent: Counter::default(),
            peer_incompatible_plain: Counter::default(),
            peers_announced: Gauge::default(),
            closed_before_keys: Counter::default(),
            key_seconds: Family::new_with_constructor(key_histogram),
            stage_seconds: Family::new_with_constructor(stage_histogram),
            gate_holds: Family::default(),
            gate_hold_seconds: Family::new_with_constructor(key_histogram),
            provider_up: Family::default(),
            credential_expiry: Family::default(),
            credential_names: std::sync::Mutex::default(),
            provider_active: Family::default(),
            provider_in_flight: Family::default(),
            provider_switches: Counter::default(),
            pending: Gauge::default(),
            ringbuf_drops: Counter::default(),
            no_core: Counter::default(),
            gate_waits: Counter::default(),
            bpf: BPF_COUNTERS.iter().map(|_| Counter::default()).collect(),
            ktls: Family::default(),
            tls_stat_sources: std::sync::Mutex::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections_selected",
            "Selected TCP connections seen",
            m.selected.clone(),
        );
        registry.register(
            "connections_protected",
            "Connections with kTLS installed, by provider",
            m.protected.clone(),
        );
        registry.register(
            "connections_keyed_before_owner",
            "Protected connections whose keys were ready before any process was known to hold the socket (keyed from establishment by a provider that needs no socket)",
            m.keyed_before_owner.clone(),
        );
        registry.register(
            "connections_failed",
            "Connections that could not be keyed, by provider and reason",
            m.failed.clone(),
        );
        registry.register(
            "connections_reset",
            "Connections reset under fail-closed",
            m.reset.clone(),
        );
        registry.register(
            "connections_plaintext",
            "Connections let through in plaintext under fail-open",
            m.plaintext.clone(),
        );
        registry.register(
            "connections_service_plain",
            "Connections to a service address whose backend (read from the connection tracking table) no rule selects, let through as plain by policy",
            m.service_plain.clone(),
        );
        registry.register(
            "connections_plain_peer_silent",
            "Connections of opportunistic rules whose other end did not announce tlshub in the TCP handshake, let through as plain, by peer address",
            m.peer_silent_plain.clone(),
        );
        registry.register(
            "connections_plain_peer_incompatible",
            "Connections of opportunistic rules whose other end announced a keying protocol this node's provider does not speak, let through as plain",
            m.peer_incompatible_plain.clone(),
        );
        registry.register(
            "connections_known_peer_silent",
            "Connections of opportunistic rules whose peer had announced tlshub before but was silent in this handshake, keyed as under a strict rule instead of going plain",
            m.known_peer_silent.clone(),
        );
        registry.register(
            "peers_announced",
            "Peers (nodes, or addresses without a node map) remembered as having announced tlshub",
            m.peers_announced.clone(),
        );
        registry.register(
            "connections_closed_before_keys",
            "Connections closed before their keys were installed",
            m.closed_before_keys.clone(),
        );
        registry.register(
            "connections_pending",
            "Connections waiting for keys now",
            m.pending.clone(),
        );
        registry.register(
            "key_duration_seconds",
            "Time the provider took to produce a connection's keys",
            m.key_seconds.clone(),
        );
        registry.register(
            "connection_stage_seconds",
            "Time from a protected connection's ESTABLISHED (kernel timestamp) to each stage of its keying: event_read, owner_known, job_started, socket_taken, provider_asked, provider_answered, installed, gate_opened, app_continued",
            m.stage_seconds.clone(),
        );
        registry.register(
            "gate_holds",
            "Times the gate stopped a process before its connection had keys, by the provider keying it (unassigned: none yet)",
            m.gate_holds.clone(),
        );
        registry.register(
            "gate_hold_duration_seconds",
            "How long a held process stayed stopped, by the provider that keyed its connection",
            m.gate_hold_seconds.clone(),
        );
        registry.register(
            "provider_up",
            "1 when the provider's health check says SERVING",
            m.provider_up.clone(),
        );
        registry.register(
            "provider_credential_expiry_timestamp_seconds",
            "When the provider's credential (its node certificate) expires, in seconds since the Unix epoch, as the provider last said (it reloads changed files by itself)",
            m.credential_expiry.clone(),
        );
        registry.register(
            "provider_active",
            "1 for the provider new connections go to",
            m.provider_active.clone(),
        );
        registry.register(
            "provider_requests_in_flight",
            "Key requests running now",
            m.provider_in_flight.clone(),
        );
        registry.register(
            "provider_switches",
            "Changes of the active provider",
            m.provider_switches.clone(),
        );
        registry.register(
            "bpf_ringbuf_drops",
            "Events the BPF ring buffer dropped (their connections stay gated until the gate holds their app)",
            m.ringbuf_drops.clone(),
        );
        registry.register(
            "gate_no_core",
            "Calls on connections waiting for keys that the gate failed (fail-closed) or passed (fail-open) because no core was alive",
            m.no_core.clone(),
        );
        registry.register(
            "gate_waits",
            "Selected connections whose app (a non-blocking socket) the gate answered EAGAIN before its keys were in, instead of stopping it",
            m.gate_waits.clone(),
        );
        for (c, counter) in BPF_COUNTERS.iter().zip(&m.bpf) {
            registry.register(c.metric, c.help, counter.clone());
        }
        registry.register(
            "ktls_sockets",
            "/proc/net/tls_stat counters summed over the protected connections' network namespaces",
            m.ktls.clone(),
        );
        Self { registry, ..m }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        tlshub_provider_sdk::metrics::encode(&self.registry)
    }

    /// What `GET /metrics` answers: the kTLS gauges read from their
    /// sources now, then every metric. Why at the scrape: reading the
    /// files costs system calls per network namespace, and a scrape comes
    /// every 15 s or so where a timer would read them every second.
    pub fn scrape(&self) -> String {
        let sources = self
            .tls_stat_sources
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        let texts: Vec<String> = sources
            .iter()
            .filter_map(|path| std::fs::read_to_string(path).ok())
            .collect();
        self.set_tls_stat(texts.iter().map(String::as_str));
        self.encode()
    }

    /// The `tls_stat` files the kTLS gauges sum at each scrape.
    pub fn set_tls_stat_sources(&self, paths: Vec<std::path::PathBuf>) {
        if let Ok(mut sources) = self.tls_stat_sources.lock() {
            *sources = paths;
        }
    }

    /// Marks `active` as the active provider among `names` (1 for it, 0 for
    /// the others).
    pub fn set_active_provider<'a>(&self, names: impl IntoIterator<Item = &'a str>, active: &str) {
        for name in names {
            self.provider_active
                .get_or_create(&ProviderLabel {
                    provider: name.to_owned(),
                })
                .set(i64::from(name == active));
        }
    }

    /// Sets `provider`'s credential expiry gauges to what it said last,
    /// dropping those of credentials it no longer names.
    pub fn set_credentials(&self, provider: &str, credentials: &[tlshub_provider_sdk::Credential]) {
        let label = |credential: &str| CredentialLabels {
            provider: provider.to_owned(),
            credential: credential.to_owned(),
        };
        let mut named = self
            .credential_names
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let now: Vec<String> = credentials.iter().map(|c| c.name.clone()).collect();
        if let Some(before) = named.get(provider) {
            for gone in before.iter().filter(|b| !now.contains(b)) {
                self.credential_expiry.remove(&label(gone));
            }
        }
        for c in credentials {
            self.credential_expiry
                .get_or_create(&label(&c.name))
                .set(c.not_after_unix_seconds);
        }
        named.insert(provider.to_owned(), now);
    }

    /// Sets the kTLS gauges from `tls_stat` files' contents.
    pub fn set_tls_stat<'a>(&self, files: impl IntoIterator<Item = &'a str>) {
        for (counter, v) in tlshub_admin::tls_stat::sum(files) {
            self.ktls
                .get_or_create(&TlsStatLabel { counter })
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        }
    }
}

/// Binds `addr` and serves `GET /metrics` until the task is aborted.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> Result<tokio::task::JoinHandle<()>, ListenError> {
    let encode: tlshub_provider_sdk::metrics::Encoder = Arc::new(move || metrics.scrape());
    Ok(tlshub_provider_sdk::metrics::serve_http(addr, encode)
        .await?
        .1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn silent_peers_get_a_series_each_up_to_the_limit_then_share_one() {
        let m = Metrics::new();
        let first: std::net::IpAddr = "::ffff:10.0.2.2".parse().unwrap();
        m.count_silent_peer(first);
        m.count_silent_peer(first);
        for i in 1..MAX_PEER_SERIES + 5 {
            m.count_silent_peer(std::net::IpAddr::from([10, 1, (i >> 8) as u8, i as u8]));
        }
        // A peer seen before the limit keeps its own series.
        m.count_silent_peer(first);
        let text = m.encode();
        assert!(
            text.contains(r#"tlshub_connections_plain_peer_silent_total{peer="10.0.2.2"} 3"#),
            "{text}"
        );
        assert!(text.contains(r#"tlshub_connections_plain_peer_silent_total{peer="other"} 5"#));
        let series = text
            .lines()
            .filter(|l| l.starts_with("tlshub_connections_plain_peer_silent_total{"))
            .count();
        assert_eq!(series, MAX_PEER_SERIES + 1);
    }

    use super::*;

    #[test]
    fn every_bpf_counter_is_exported_once_and_mirrored_in_its_own_stats_field() {
        let m = Metrics::new();
        let mut stats = Stats::default();
        let mut indexes = std::collections::BTreeSet::new();
        for (i, (c, counter)) in BPF_COUNTERS.iter().zip(&m.bpf).enumerate() {
            assert!(c.index < stat::COUNT && indexes.insert(c.index), "{c:?}");
            counter.inc_by(i as u64 + 1);
            *(c.field)(&mut stats) = i as u64 + 1;
        }
        assert_eq!(m.bpf.len(), BPF_COUNTERS.len());
        let text = m.encode();
        let json = serde_json::to_value(&stats).unwrap();
        for (i, c) in BPF_COUNTERS.iter().enumerate() {
            let line = format!("tlshub_{}_total {}", c.metric, i + 1);
            assert!(text.contains(&line), "{line} not in:\n{text}");
            let in_stats = json
                .as_object()
                .unwrap()
                .values()
                .filter(|v| v.as_u64() == Some(i as u64 + 1))
                .count();
            assert_eq!(
                in_stats, 1,
                "{c:?}: its value in exactly one stats field: {json}"
            );
        }
    }

    #[test]
    fn names_follow_prometheus_conventions_and_labels_are_bounded() {
        let m = Metrics::new();
        m.selected.inc();
        m.protected
            .get_or_create(&ProviderLabel {
                provider: "openssl".into(),
            })
            .inc();
        m.key_seconds
            .get_or_create(&ProviderRoleLabels {
                provider: "openssl".into(),
                role: "client",
            })
            .observe(0.03);
        m.failed
            .get_or_create(&ProviderReasonLabels {
                provider: "openssl".into(),
                reason: "timeout",
            })
            .inc();
        m.set_tls_stat([
            "TlsCurrTxSw                     \t3\nTlsTxSw 7\nnoise\n",
            "TlsCurrTxSw 2\n",
        ]);
        let text = m.encode();
        for want in [
            "tlshub_connections_selected_total 1",
            "tlshub_connections_protected_total{provider=\"openssl\"} 1",
            "tlshub_connections_failed_total{provider=\"openssl\",reason=\"timeout\"} 1",
            "tlshub_key_duration_seconds_bucket{le=\"0.032\",provider=\"openssl\",role=\"client\"} 1",
            "tlshub_ktls_sockets{counter=\"TlsCurrTxSw\"} 5",
            "tlshub_ktls_sockets{counter=\"TlsTxSw\"} 7",
            "# EOF",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        assert!(!text.contains("cookie"), "no per-connection labels");
    }

    #[test]
    fn a_scrape_reads_the_tls_stat_sources_of_the_moment() {
        let dir = std::env::temp_dir().join(format!("tlshub-scrape-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (one, two) = (dir.join("one"), dir.join("two"));
        std::fs::write(&one, "TlsCurrTxSw 3\n").unwrap();
        std::fs::write(&two, "TlsCurrTxSw 2\n").unwrap();
        let m = Metrics::new();
        // A source that cannot be read (its process exited) is left out.
        m.set_tls_stat_sources(vec![one.clone(), two, dir.join("gone")]);
        let sockets = |text: &str| {
            text.lines()
                .find(|l| l.starts_with("tlshub_ktls_sockets{counter=\"TlsCurrTxSw\"}"))
                .map(str::to_owned)
        };
        assert_eq!(
            sockets(&m.scrape()).as_deref(),
            Some("tlshub_ktls_sockets{counter=\"TlsCurrTxSw\"} 5")
        );
        std::fs::write(&one, "TlsCurrTxSw 4\n").unwrap();
        m.set_tls_stat_sources(vec![one]);
        assert_eq!(
            sockets(&m.scrape()).as_deref(),
            Some("tlshub_ktls_sockets{counter=\"TlsCurrTxSw\"} 4")
        );
        // encode() alone reads nothing.
        std::fs::write(dir.join("one"), "TlsCurrTxSw 9\n").unwrap();
        assert_eq!(
            sockets(&m.encode()).as_deref(),
            Some("tlshub_ktls_sockets{counter=\"TlsCurrTxSw\"} 4")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Every series name the core can export: from the `# TYPE` lines,
    /// with the suffixes each type's samples carry. A labelled family is
    /// encoded only once it has a series, so each gets one here.
    fn exported_series() -> std::collections::BTreeSet<String> {
        let m = Metrics::new();
        let p = || ProviderLabel {
            provider: "openssl".into(),
        };
        m.protected.get_or_create(&p()).inc();
        m.failed
            .get_or_create(&ProviderReasonLabels {
                provider: "openssl".into(),
                reason: "timeout",
            })
            .inc();
        m.key_seconds
            .get_or_create(&ProviderRoleLabels {
                provider: "openssl".into(),
                role: "client",
            })
            .observe(0.01);
        m.gate_holds.get_or_create(&p()).inc();
        m.gate_hold_seconds.get_or_create(&p()).observe(0.01);
        m.stage_seconds
            .get_or_create(&StageLabels {
                provider: "openssl".into(),
                role: "client",
                stage: "gate_opened",
            })
            .observe(0.01);
        m.provider_up.get_or_create(&p()).set(1);
        m.provider_active.get_or_create(&p()).set(1);
        m.provider_in_flight.get_or_create(&p()).set(0);
        m.set_credentials(
            "openssl",
            &[tlshub_provider_sdk::Credential {
                name: "certificate".into(),
                not_after_unix_seconds: 1,
            }],
        );
        m.set_tls_stat(["TlsCurrTxSw 1\n"]);
        m.count_silent_peer(std::net::IpAddr::from([10, 0, 2, 2]));
        let mut names = std::collections::BTreeSet::new();
        for line in m.encode().lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        }
        names
    }

    #[test]
    fn the_grafana_dashboard_queries_only_metrics_the_core_exports() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../deploy/grafana/tlshub-dashboard.json"))
                .expect("the dashboard is JSON");
        let exported = exported_series();
        assert!(exported.contains("tlshub_gate_holds_total"), "{exported:?}");
        let mut queried = std::collections::BTreeSet::new();
        let panels = dashboard["panels"].as_array().expect("panels");
        for panel in panels {
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("expr");
                let mut rest = expr;
                while let Some(at) = rest.find("tlshub_") {
                    let name: String = rest[at..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    rest = &rest[at + name.len()..];
                    queried.insert(name);
                }
            }
        }
        let unknown: Vec<&String> = queried.iter().filter(|q| !exported.contains(*q)).collect();
        assert!(
            unknown.is_empty(),
            "the dashboard queries {unknown:?}, which the core does not export"
        );
        // The per-provider comparison is the dashboard's point.
        for want in [
            "tlshub_connections_protected_total",
            "tlshub_key_duration_seconds_bucket",
            "tlshub_connections_failed_total",
            "tlshub_gate_holds_total",
            "tlshub_gate_hold_duration_seconds_bucket",
            "tlshub_provider_credential_expiry_timestamp_seconds",
            // What is plain by policy (services, rollouts).
            "tlshub_connections_service_plain_total",
            "tlshub_connections_plain_peer_silent_total",
            "tlshub_connections_plain_peer_incompatible_total",
            "tlshub_connections_known_peer_silent_total",
        ] {
            assert!(queried.contains(want), "the dashboard does not show {want}");
        }
    }

    #[test]
    fn credential_expiry_follows_what_the_provider_says_and_drops_stale_names() {
        use tlshub_provider_sdk::Credential;
        let m = Metrics::new();
        let cert = |name: &str, t: i64| Credential {
            name: name.into(),
            not_after_unix_seconds: t,
        };
        m.set_credentials("openssl", &[cert("certificate /a.pem", 1_900_000_000)]);
        m.set_credentials("openssl", &[cert("certificate /b.pem", 1_950_000_000)]);
        let text = m.encode();
        let line = |name: &str, t: i64| {
            format!(
                "tlshub_provider_credential_expiry_timestamp_seconds{{provider=\"openssl\",credential=\"certificate {name}\"}} {t}"
            )
        };
        assert!(text.contains(&line("/b.pem", 1_950_000_000)), "{text}");
        assert!(
            !text.contains("/a.pem"),
            "a stale credential stays exported:\n{text}"
        );
    }

    #[tokio::test]
    async fn the_endpoint_serves_metrics_and_refuses_other_paths() {
        let m = Arc::new(Metrics::new());
        m.selected.inc();
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let task = serve(addr, m).await.unwrap();
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("tlshub_connections_selected_total 1"), "{ok}");
        assert!(get("/secret").await.starts_with("HTTP/1.1 404"));
        // A second bind on the same address is a clear error.
        let e = serve(addr, Arc::new(Metrics::new())).await.unwrap_err();
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
        task.abort();
    }
}
