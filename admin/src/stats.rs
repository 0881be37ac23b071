//! The core's stats file (`tlshub-core --stats-file`): counters and
//! samples, rewritten every second as one JSON object. The core writes a
//! [`Stats`] and the test bed and the benchmark read it back as the same
//! type.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// Counters and samples, written to the stats file. A field the file
/// lacks (written by an older core) reads as zero.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stats {
    /// Selected connections seen (ESTABLISHED events).
    pub selected: u64,
    /// Connections keyed and installed.
    pub protected: u64,
    /// Failed connections by reason.
    pub failed: BTreeMap<String, u64>,
    /// Of those, connections whose keys were ready before any process was
    /// known to hold the socket (the provider needs no socket, so keying
    /// started at establishment; on the accepting side, before
    /// `accept()` returned).
    pub keyed_before_owner: u64,
    /// Connections reset under fail-closed.
    pub reset: u64,
    /// Connections passed in plaintext under fail-open.
    pub passed_plaintext: u64,
    /// Connections to a service address whose real destination (read from
    /// the node's connection tracking table) no rule selects: let through
    /// as plain, by policy.
    pub service_plain: u64,
    /// Connections whose rule is opportunistic and whose other end did not
    /// announce tlshub in the TCP handshake: let through as plain, by
    /// policy.
    pub peer_silent_plain: u64,
    /// Connections whose rule is opportunistic and whose other end
    /// announced a keying protocol this node's provider does not speak
    /// (and never a compatible one before): let through as plain.
    pub peer_incompatible_plain: u64,
    /// Connections whose rule is opportunistic and whose other end was
    /// silent although it had announced tlshub before: keyed as under a
    /// strict rule (protected or failed closed), never plain.
    pub known_peer_silent: u64,
    /// Closed before they were keyed.
    pub closed_before_keys: u64,
    /// Times the gate stopped a process (HELD events).
    pub gate_stops: u64,
    /// Distinct connections that had a process held.
    pub held_connections: u64,
    /// Keying searches that took the process from a gate hold (no owner
    /// known, or the known one no longer had the socket).
    pub owner_from_hold: u64,
    /// Keying searches that found the socket gone from the process
    /// searched (the connection was then looked for elsewhere, or failed).
    pub socket_gone: u64,
    /// Connections whose gate was put in its terminal state (calls fail
    /// with `ECONNRESET`): they could be neither protected nor reset.
    pub gate_terminal: u64,
    /// Of those, the connections the kernel then aborted by their 4-tuple
    /// and cookie (sock_diag `SOCK_DESTROY`; the core had no handle on the
    /// socket): their peers got a RST and their apps' waiters were woken.
    pub unreachable_aborted: u64,
    /// Keying results that arrived for a connection the socket no longer
    /// carries (it was disconnected and connected again meanwhile).
    pub stale_outcomes: u64,
    /// Connections the core learnt of, or learnt had closed, only by
    /// reading the `conns` map after the ring buffer lost events.
    pub reconciled: u64,
    /// Microseconds from stop to continue, per stop.
    pub held_micros: Samples,
    /// Microseconds spent in the provider, per protected connection.
    pub key_micros: Samples,
    /// Where each protected connection's setup time went: microseconds
    /// from the kernel's `ESTABLISHED` to each [`Stage`], per side.
    pub stages: StageSamples,
    /// Events read from the ring buffer (all kinds).
    pub events_received: u64,
    /// Events the ring buffer dropped.
    pub ringbuf_drops: u64,
    /// Gate calls failed (or passed) because no core was alive (counted by
    /// BPF, also while this core was not running).
    pub no_core_refusals: u64,
    /// TCP Fast Open sends to selected destinations refused with
    /// `EOPNOTSUPP` (counted by BPF).
    pub fastopen_refused: u64,
    /// Multipath TCP connections refused where the policy selects them:
    /// `connect()` or `listen()` answered `EOPNOTSUPP`, or an accepted (or
    /// extra) path whose MPTCP socket fails every call (counted by BPF).
    pub mptcp_refused: u64,
    /// Selected connections that completed as the passive side after a
    /// TCP simultaneous open, keyed in the role both ends agree on
    /// (counted by BPF).
    pub simultaneous_open: u64,
    /// Selected connections failed closed because the `conns` map was full
    /// (counted by BPF).
    pub map_full: u64,
    /// Selected connections failed closed because the `conns` map was
    /// busy (`EBUSY`) when they were established (counted by BPF).
    pub map_busy: u64,
    /// Peer FIN segments dropped because they arrived before this side's
    /// keys (counted by BPF; the peer retransmits them).
    pub fin_deferred: u64,
    /// Sockets connected in TCP repair mode to selected peers, refused
    /// (counted by BPF).
    pub repair_refused: u64,
    /// `TCP_ZEROCOPY_RECEIVE` calls refused on gated or kTLS sockets
    /// (counted by BPF).
    pub zerocopy_receive_refused: u64,
    /// Selected connections refused for good because their socket had no
    /// room left for the gate's mark (the app filled its option memory;
    /// counted by BPF).
    pub unmarked_refused: u64,
    /// `shutdown()` calls on protected sockets held until kTLS's unsent
    /// records were in TCP, every stop counted (counted by BPF).
    pub unsent_holds: u64,
    /// `shutdown()` calls let through after the socket's unsent-records
    /// hold lasted 5 s (the peer stopped reading; counted by BPF).
    pub unsent_expired: u64,
    /// `shutdown()` calls on protected sockets held while kTLS's open
    /// record held bytes written with `MSG_MORE`, which the core then
    /// closed and sent (counted by BPF).
    pub open_record_holds: u64,
    /// Calls failed with `EINTR` instead of a hold, because neither the
    /// event ring buffer nor the `held` map had room to record it (counted
    /// by BPF).
    pub hold_unrecorded: u64,
    /// Connections whose app the gate answered `EAGAIN` (non-blocking
    /// socket, keys not in yet) at least once, instead of stopping it.
    pub gate_waits: u64,
    /// Calls on non-blocking sockets the gate answered `EAGAIN`, retries
    /// included (counted by BPF).
    pub gate_eagain: u64,
    /// Entries in the pending table now.
    pub pending: usize,
    /// Held processes the core is tracking now.
    pub held_tracked: usize,
    /// BPF map entries now: conns, held.
    pub bpf_maps: (usize, usize),
}

impl Stats {
    /// Counts a connection that failed for `reason`.
    pub fn record_failure(&mut self, reason: &str) {
        *self.failed.entry(reason.to_string()).or_default() += 1;
    }

    /// Connections that failed for `reason`.
    pub fn failures(&self, reason: &str) -> u64 {
        self.failed.get(reason).copied().unwrap_or(0)
    }
}

/// A point in keying one connection, in the order they normally come.
/// Each is measured from the connection's `ESTABLISHED` as the kernel
/// stamped it (`CLOCK_MONOTONIC`, the clock of BPF timestamps), so their
/// differences are where setup time goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The core read the `ESTABLISHED` event from the ring buffer.
    EventRead,
    /// The core learnt which process holds the socket (its `OWNER` event,
    /// or the gate holding that process). 0 when known before
    /// `ESTABLISHED` (a non-blocking `connect()` returns first).
    OwnerKnown,
    /// The keying job began to run (a task on the core's runtime).
    JobStarted,
    /// The core had its duplicate of the socket (`pidfd_getfd`). For a job
    /// keying from establishment whose keys came before the owner, after
    /// [`Stage::ProviderAnswered`].
    SocketTaken,
    /// The key request went to the provider.
    ProviderAsked,
    /// The provider's keys arrived.
    ProviderAnswered,
    /// kTLS was installed on the socket.
    Installed,
    /// The gate was opened (the event loop had the job's outcome).
    GateOpened,
    /// A process the gate had stopped for the keys was continued (one
    /// sample per process continued).
    AppContinued,
}

impl Stage {
    /// Every stage, in order.
    pub const ALL: [Stage; 9] = [
        Stage::EventRead,
        Stage::OwnerKnown,
        Stage::JobStarted,
        Stage::SocketTaken,
        Stage::ProviderAsked,
        Stage::ProviderAnswered,
        Stage::Installed,
        Stage::GateOpened,
        Stage::AppContinued,
    ];

    /// The metric label and stats key (`event_read`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Stage::EventRead => "event_read",
            Stage::OwnerKnown => "owner_known",
            Stage::JobStarted => "job_started",
            Stage::SocketTaken => "socket_taken",
            Stage::ProviderAsked => "provider_asked",
            Stage::ProviderAnswered => "provider_answered",
            Stage::Installed => "installed",
            Stage::GateOpened => "gate_opened",
            Stage::AppContinued => "app_continued",
        }
    }
}

/// Per side, microseconds from `ESTABLISHED` to each [`Stage`], the most
/// recent [`StageSamples::CAP`] of each. Fewer than [`Samples::CAP`]: the
/// stats file is rewritten every second, and nine stages per side at the
/// full cap would make it ten times larger.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StageSamples {
    /// The connecting side's.
    pub client: BTreeMap<Stage, Samples>,
    /// The accepting side's.
    pub server: BTreeMap<Stage, Samples>,
}

impl StageSamples {
    /// How many samples each stage keeps.
    pub const CAP: usize = 10_000;

    /// Adds `micros` for `stage` on the client (`client`) or server side.
    pub fn push(&mut self, client: bool, stage: Stage, micros: u64) {
        let side = if client {
            &mut self.client
        } else {
            &mut self.server
        };
        side.entry(stage)
            .or_default()
            .push_within(micros, Self::CAP);
    }

    /// One side's samples of `stage` (empty if none).
    pub fn of(&self, client: bool, stage: Stage) -> Samples {
        let side = if client { &self.client } else { &self.server };
        side.get(&stage).cloned().unwrap_or_default()
    }
}

/// The most recent [`Samples::CAP`] measurements, so a long-running core's
/// stats stay bounded.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Samples(VecDeque<u64>);

impl Samples {
    /// How many samples are kept.
    pub const CAP: usize = 100_000;

    /// Adds a measurement, dropping the oldest beyond [`Self::CAP`].
    pub fn push(&mut self, v: u64) {
        self.push_within(v, Self::CAP);
    }

    /// Adds a measurement, keeping at most `cap`.
    pub fn push_within(&mut self, v: u64, cap: usize) {
        while self.0.len() >= cap.max(1) {
            self.0.pop_front();
        }
        self.0.push_back(v);
    }

    /// How many measurements are kept.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The measurements, smallest first (for percentiles).
    pub fn sorted(&self) -> Vec<u64> {
        self.newest(self.0.len())
    }

    /// The `n` most recent measurements, smallest first: one run's share
    /// of a core's samples.
    pub fn newest(&self, n: usize) -> Vec<u64> {
        let mut v: Vec<u64> = self.0.iter().rev().take(n).copied().collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::Stats;

    #[test]
    fn the_newest_samples_are_the_last_pushed_smallest_first() {
        let mut s = super::Samples::default();
        for v in [5, 1, 9, 3] {
            s.push(v);
        }
        assert_eq!(s.newest(2), [3, 9]);
        assert_eq!(s.newest(10), [1, 3, 5, 9]);
        assert_eq!(s.sorted(), [1, 3, 5, 9]);
    }

    #[test]
    fn stage_samples_are_kept_per_side_and_bounded_and_read_back_by_name() {
        let mut s = Stats::default();
        for v in 0..(super::StageSamples::CAP as u64 + 5) {
            s.stages.push(true, super::Stage::GateOpened, v);
        }
        s.stages.push(false, super::Stage::EventRead, 7);
        let client = s.stages.of(true, super::Stage::GateOpened);
        assert_eq!(client.len(), super::StageSamples::CAP);
        assert_eq!(client.newest(1), [super::StageSamples::CAP as u64 + 4]);
        assert!(s.stages.of(false, super::Stage::GateOpened).is_empty());
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(r#""server":{"event_read":[7]}"#), "{json}");
        let back: Stats = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        for stage in super::Stage::ALL {
            assert_eq!(
                serde_json::to_value(stage).unwrap(),
                stage.name(),
                "the stats key and the metric label are one name"
            );
        }
    }

    #[test]
    fn a_file_from_an_older_core_reads_with_zeros_for_what_it_lacks() {
        let s: Stats = serde_json::from_str(r#"{"selected": 3, "protected": 2}"#).unwrap();
        assert_eq!((s.selected, s.protected, s.reset), (3, 2, 0));
    }
}
