//! tlshub's BPF programs and the user-space mirrors of their data layouts.
//!
//! The programs are C (`c/tlshub.bpf.c`, CO-RE) compiled by clang in
//! `build.rs`; [`OBJECT`] is the resulting ELF, loaded by `capture-core` with
//! aya. Every struct in `c/tlshub_shared.h` has a `#[repr(C)]` mirror here,
//! and a test compares sizes and offsets with what the C compiler laid out.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The compiled BPF object.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tlshub.bpf.o"));

/// Program and map names inside [`OBJECT`].
pub mod names {
    /// sockops program (cgroup v2 root).
    pub const SOCKOPS: &str = "tlshub_sockops";
    /// fexit programs on the x86-64 syscall entry points: (program,
    /// kernel function).
    pub const FEXIT: [(&str, &str); 3] = [
        ("tlshub_exit_connect", "__x64_sys_connect"),
        ("tlshub_exit_accept4", "__x64_sys_accept4"),
        ("tlshub_exit_accept", "__x64_sys_accept"),
    ];
    /// LSM programs: (program, hook).
    pub const LSM: [(&str, &str); 8] = [
        ("tlshub_gate_connect", "socket_connect"),
        ("tlshub_gate_listen", "socket_listen"),
        ("tlshub_gate_sendmsg", "socket_sendmsg"),
        ("tlshub_gate_recvmsg", "socket_recvmsg"),
        ("tlshub_gate_file", "file_permission"),
        ("tlshub_gate_shutdown", "socket_shutdown"),
        ("tlshub_gate_setsockopt", "socket_setsockopt"),
        ("tlshub_gate_getsockopt", "socket_getsockopt"),
    ];
    /// cgroup_skb ingress program (cgroup v2 root): defers a peer's FIN
    /// that arrives before this side's keys.
    pub const DEFER_FIN: &str = "tlshub_defer_fin";
    /// Maps.
    pub const CONNS: &str = "conns";
    /// Held processes.
    pub const HELD: &str = "held";
    /// Processes never held.
    pub const EXEMPT: &str = "exempt";
    /// Pod CIDRs of this node.
    pub const LOCAL_NETS: &str = "local_nets";
    /// Selected peer CIDRs.
    pub const PEER_NETS: &str = "peer_nets";
    /// Service virtual-address CIDRs (selected at connect, judged by the
    /// core after the node's DNAT).
    pub const SERVICE_NETS: &str = "service_nets";
    /// Selected server ports per rule (the service ports under
    /// [`super::SERVICE_RULE`], every rule's under [`super::LISTEN_RULE`]).
    pub const RULE_PORTS: &str = "rule_ports";
    /// Counters.
    pub const STATS: &str = "stats";
    /// Ring buffer.
    pub const EVENTS: &str = "events";
    /// The core's heartbeat and the no-core policy.
    pub const CONTROL: &str = "control";
    /// Socket-local storage marks.
    pub const SK_MARKS: &str = "sk_marks";
    /// kTLS's receive method, learned from the first socket the core keyed.
    pub const KTLS_RECVMSG: &str = "ktls_recvmsg";
    /// How many `conns` entries are [`super::conn::UNMARKED`].
    pub const UNMARKED_CONNS: &str = "unmarked_conns";
    /// Owners of selected sockets still connecting (an LRU hash, sized
    /// like [`CONNS`]).
    pub const CONNECTING_OWNERS: &str = "connecting_owners";
    /// Threads inside a `connect()` the policy may select (task storage).
    pub const SELECTED_CONNECTS: &str = "selected_connects";
    /// When the last selected connection was established on the accepting
    /// side.
    pub const PASSIVE_SELECTED_NS: &str = "passive_selected_ns";
    /// Every map of the object (all are pinned, so a restarted core and the
    /// programs still attached share them).
    pub const MAPS: [&str; 16] = [
        CONNS,
        CONNECTING_OWNERS,
        HELD,
        EXEMPT,
        LOCAL_NETS,
        PEER_NETS,
        SERVICE_NETS,
        RULE_PORTS,
        STATS,
        EVENTS,
        CONTROL,
        SK_MARKS,
        KTLS_RECVMSG,
        UNMARKED_CONNS,
        SELECTED_CONNECTS,
        PASSIVE_SELECTED_NS,
    ];
}

/// Event kinds (`TLSHUB_EV_*`).
pub mod kind {
    /// A selected connection reached ESTABLISHED.
    pub const ESTABLISHED: u32 = 1;
    /// connect()/accept() returned the socket's fd.
    pub const OWNER: u32 = 2;
    /// The gate stopped a process.
    pub const HELD: u32 = 3;
    /// The socket reached TCP_CLOSE.
    pub const CLOSED: u32 = 4;
    /// The gate answered `EAGAIN` to a process on a non-blocking socket
    /// (nobody stopped); reported once per connection.
    pub const WAITING: u32 = 5;
    /// `shutdown()` on a keyed socket stopped a process until kTLS's
    /// unsent records are in TCP (the cookie is the socket's, no longer
    /// tracked in `conns`).
    pub const UNSENT_HELD: u32 = 6;
    /// The gate stopped a process on a selected socket still connecting:
    /// it has no `conns` entry until the peer answers, and its close (or
    /// refusal) is reported as [`CLOSED`].
    pub const HELD_CONNECTING: u32 = 7;
    /// `shutdown()` on a keyed socket stopped a process while kTLS's open
    /// record (writes with `MSG_MORE`) held bytes that no FIN sends: the
    /// core closes the record, and the restarted call looks again. The
    /// cookie is the socket's, no longer tracked in `conns`.
    pub const OPEN_RECORD_HELD: u32 = 8;
}

/// What the other end said in the TCP handshake (`TLSHUB_PEER_*`).
pub mod peer {
    /// No tlshub option: its node runs no tlshub, or does not select the
    /// connection.
    pub const SILENT: u8 = 0;
    /// The option came: its node selected the connection too.
    pub const ANNOUNCED: u8 = 1;
}

/// Roles (`TLSHUB_ROLE_*`).
pub mod role {
    /// connect() side.
    pub const CLIENT: u32 = 1;
    /// accept() side.
    pub const SERVER: u32 = 2;
}

/// Gate states (`TLSHUB_GATE_*`).
pub mod gate {
    /// Hold every non-exempt process.
    pub const CLOSED: u32 = 1;
    /// Let everyone through.
    pub const OPEN: u32 = 2;
    /// Terminal: every call fails with `ECONNRESET` and nobody is held (a
    /// connection that could be neither protected nor reset).
    pub const RESET: u32 = 3;
}

/// Flags of a `conns` entry (`TLSHUB_CONN_*`, [`Conn::flags`]).
pub mod conn {
    /// Selected, but the socket's mark could not be created (the app had
    /// filled its option memory): refused for good (gate [`super::gate::RESET`]),
    /// found by the gate through the socket's cookie.
    pub const UNMARKED: u32 = 1;
}

/// Flags of a socket's mark (`TLSHUB_MARK_*`, [`SkMark::flags`]).
pub mod mark {
    /// Put in TCP repair mode before it was selected.
    pub const REPAIR: u32 = 1;
    /// Selected but refused for good: every call fails with `ECONNRESET`.
    pub const REFUSED: u32 = 2;
    /// The gate is open for good (keyed, or let through by fail-open) and
    /// the `conns` entry removed; the socket's close is still reported.
    pub const OPEN: u32 = 4;
    /// Selected at `connect()` and not answered yet: no `conns` entry
    /// until the peer answers (BPF's).
    pub const CONNECTING: u32 = 8;
    /// A process was held on it while it was connecting (BPF's).
    pub const HELD_CONNECTING: u32 = 16;
}

/// Indexes into the `stats` array.
pub mod stat {
    /// Events lost because the ring buffer was full.
    pub const RINGBUF_DROPS: u32 = 0;
    /// Times the gate stopped a process.
    pub const GATE_STOPS: u32 = 1;
    /// Calls the gate failed (or passed, fail-open) because no core was alive.
    pub const NO_CORE_REFUSALS: u32 = 2;
    /// TCP Fast Open sends to selected destinations refused (`EOPNOTSUPP`).
    pub const FASTOPEN_REFUSED: u32 = 3;
    /// Selected sockets failed closed because `conns` was full.
    pub const MAP_FULL: u32 = 4;
    /// Peer FIN segments dropped (to be retransmitted) because they
    /// arrived before this side's keys.
    pub const FIN_DEFERRED: u32 = 5;
    /// Sockets put in TCP repair mode before they connected to a selected
    /// peer, refused (every call fails with `ECONNRESET`).
    pub const REPAIR_REFUSED: u32 = 6;
    /// `TCP_ZEROCOPY_RECEIVE` refused on a gated or kTLS socket.
    pub const ZEROCOPY_RECEIVE_REFUSED: u32 = 7;
    /// Calls on non-blocking sockets the gate answered `EAGAIN` (every
    /// retry counts: a level-triggered loop retries until the keys are in).
    pub const GATE_EAGAIN: u32 = 8;
    /// Selected sockets refused because their mark could not be created:
    /// at connect() (`ENOBUFS`), or tracked by cookie (see
    /// [`super::conn::UNMARKED`]).
    pub const UNMARKED_REFUSED: u32 = 9;
    /// `shutdown()` calls held until kTLS's unsent records were in TCP
    /// (every stop counts; the restarted call may be held again).
    pub const UNSENT_HOLDS: u32 = 10;
    /// `shutdown()` calls let through although kTLS still had unsent
    /// records, because the socket's first such hold was
    /// [`super::UNSENT_HOLD_MAX_MS`] old (the peer stopped reading).
    pub const UNSENT_EXPIRED: u32 = 11;
    /// Calls the gate failed with `EINTR` instead of holding their
    /// process, because neither the ring buffer nor the `held` map had
    /// room to record the hold (a process recorded nowhere would stay
    /// stopped).
    pub const HOLD_UNRECORDED: u32 = 12;
    /// Selected sockets failed closed because an update of `conns` found
    /// the hash map busy (`EBUSY`: another update of it on the same CPU,
    /// interrupted by the packet that established this connection).
    pub const MAP_BUSY: u32 = 13;
    /// Multipath TCP refused where the policy selects the connection
    /// (kTLS cannot be installed on an MPTCP socket): `connect()` or
    /// `listen()` (on a port a rule selects) answered `EOPNOTSUPP`, or a
    /// subflow that got there anyway (an accepted one, an extra path) whose
    /// MPTCP socket then fails every call with `ECONNRESET`.
    pub const MPTCP_REFUSED: u32 = 14;
    /// Selected sockets that `connect()`ed and completed their handshake
    /// as the passive side, because the peer's SYN reached them while they
    /// waited in `SYN_SENT` (a TCP simultaneous open): keyed in the role
    /// both ends agree on (the server when only this end answered a SYN,
    /// by endpoint when both SYNs crossed).
    pub const SIMULTANEOUS_OPEN: u32 = 15;
    /// `shutdown()` calls on protected sockets held while kTLS's open
    /// record held bytes written with `MSG_MORE`, for the core to close it.
    pub const OPEN_RECORD_HOLDS: u32 = 16;
    /// Length of the `stats` array.
    pub const COUNT: u32 = 17;
}

/// `TLSHUB_UNSENT_HOLD_MAX_MS`: how long `shutdown()`s on one socket are
/// held for kTLS's unsent records before they pass anyway.
pub const UNSENT_HOLD_MAX_MS: u32 = 5000;

/// `TLSHUB_NO_CORE_*`: what the gate does while no core is alive.
pub mod no_core {
    /// Hold anyway (a core is expected back).
    pub const HOLD: u32 = 0;
    /// Fail the call with ECONNRESET (fail-closed).
    pub const REFUSE: u32 = 1;
    /// Let it through in plaintext (fail-open).
    pub const PASS: u32 = 2;
}

/// `struct tlshub_control`: the core's heartbeat and what the gate does
/// without it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Control {
    /// `CLOCK_MONOTONIC` nanoseconds of the core's last beat; 0: no core.
    pub heartbeat_ns: u64,
    /// A beat older than this means no core.
    pub grace_ns: u64,
    /// One of [`no_core`].
    pub no_core: u32,
    /// The keying byte this node announces in the tlshub TCP option (its
    /// active provider's `keying_id`; 0: not said).
    pub keying: u32,
}

/// `struct tlshub_event`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Event {
    /// One of [`kind`].
    pub kind: u32,
    /// One of [`role`].
    pub role: u32,
    /// Socket cookie.
    pub cookie: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Thread group id.
    pub pid: u32,
    /// fd in `pid` (OWNER events).
    pub fd: i32,
    /// Local initial sequence number (ESTABLISHED events).
    pub local_isn: u32,
    /// Remote initial sequence number (ESTABLISHED events).
    pub remote_isn: u32,
    /// AF_INET or AF_INET6.
    pub family: u16,
    /// Host order.
    pub local_port: u16,
    /// Host order.
    pub remote_port: u16,
    /// ESTABLISHED: whether the other end announced, in the TCP handshake,
    /// that its node selected the connection too (one of [`peer`]).
    pub peer: u8,
    /// ESTABLISHED, announced: the keying byte the other end announced
    /// (its provider's `keying_id`; 0: not said).
    pub peer_keying: u8,
    /// IPv4 is mapped (`::ffff:a.b.c.d`).
    pub local_addr: [u8; 16],
    /// IPv4 is mapped.
    pub remote_addr: [u8; 16],
    /// OWNER, HELD, HELD_CONNECTING, WAITING: the cgroup v2 id of the
    /// process in `pid`, taken in its context (0: not known).
    pub cgroup: u64,
}

/// A ring-buffer record of the wrong size.
#[derive(Debug)]
pub struct BadEventSize(pub usize);

impl std::fmt::Display for BadEventSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ring buffer record of {} bytes, expected {}",
            self.0,
            size_of::<Event>()
        )
    }
}

impl std::error::Error for BadEventSize {}

impl Event {
    /// Reads an event from a ring-buffer record.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, BadEventSize> {
        if bytes.len() < size_of::<Self>() {
            return Err(BadEventSize(bytes.len()));
        }
        // SAFETY: the length is checked above, Event is repr(C) plain old
        // data for which every bit pattern is valid, and read_unaligned
        // does not require alignment.
        Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }

    fn addr(raw: [u8; 16], port: u16) -> SocketAddr {
        let v6 = Ipv6Addr::from(raw);
        let ip = match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        };
        SocketAddr::new(ip, port)
    }

    /// Local address and port.
    pub fn local(&self) -> SocketAddr {
        Self::addr(self.local_addr, self.local_port)
    }

    /// Remote address and port.
    pub fn remote(&self) -> SocketAddr {
        Self::addr(self.remote_addr, self.remote_port)
    }
}

/// `struct tlshub_conn`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Conn {
    /// One of [`gate`].
    pub gate: u32,
    /// One of [`role`].
    pub role: u32,
    /// The ESTABLISHED event as reported (`kind` 0 until established), so a
    /// restarted core can key a waiting connection from the map alone.
    pub est: Event,
    /// The owner's pid (0 until known).
    pub owner_pid: u32,
    /// The owner's fd at connect/accept.
    pub owner_fd: i32,
    /// The first process the gate answered `EAGAIN` (0: none yet).
    pub waiting_pid: u32,
    /// `TLSHUB_CONN_*` ([`conn`]).
    pub flags: u32,
    /// The owner's cgroup v2 id (0: not known).
    pub owner_cgroup: u64,
}

/// `struct tlshub_held`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// The socket it was held on.
    pub cookie: u64,
    /// When (`bpf_ktime_get_ns`).
    pub since_ns: u64,
}

/// `struct tlshub_owner`: the owner `connect()` recorded for a selected
/// socket still connecting (map `connecting_owners`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Owner {
    /// Its tgid (0: not known yet).
    pub pid: u32,
    /// The fd `connect()` was called on.
    pub fd: i32,
    /// Its cgroup v2 id.
    pub cgroup: u64,
}

/// `struct tlshub_sk_mark`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SkMark {
    /// The socket's cookie (0: not selected, or refused).
    pub cookie: u64,
    /// `TLSHUB_MARK_*`.
    pub flags: u32,
    /// When a `shutdown()` was first held for kTLS's unsent records
    /// (`bpf_ktime_get_ns()` in ms, wrapping, low bit set); 0: never
    /// (BPF's).
    pub unsent_since_ms: u32,
}

/// `struct tlshub_lpm_key` without the prefix length (aya's `lpm_trie::Key`
/// adds it).
pub type Addr16 = [u8; 16];

/// The rule id under which `rule_ports` lists the service ports
/// (`TLSHUB_SERVICE_RULE`); peer rules are numbered from 0.
pub const SERVICE_RULE: u32 = 0xffff_fffe;

/// The rule id under which `rule_ports` lists every port any peer rule
/// selects, 0 when some rule selects any port (`TLSHUB_LISTEN_RULE`):
/// only listeners on these ports get the header-option callbacks that
/// answer a peer's announcement.
pub const LISTEN_RULE: u32 = 0xffff_fffd;

/// `struct tlshub_port_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    /// Rule id (the value in `peer_nets`).
    pub rule: u32,
    /// Server port, 0 for any.
    pub port: u16,
    /// Padding (zero).
    pub pad: u16,
}

// SAFETY: all of these are repr(C) integers and byte arrays with explicit
// padding fields, so every bit pattern is valid and there are no implicit
// padding bytes.
unsafe impl aya::Pod for Conn {}
// SAFETY: as above.
unsafe impl aya::Pod for Held {}
// SAFETY: repr(C), integers only, no padding (checked against the C layout).
unsafe impl aya::Pod for Control {}
// SAFETY: as above.
unsafe impl aya::Pod for SkMark {}
// SAFETY: as above.
unsafe impl aya::Pod for PortKey {}
// SAFETY: as above.
unsafe impl aya::Pod for Owner {}

/// Sizes and offsets as the C compiler laid them out.
#[doc(hidden)]
#[expect(
    non_upper_case_globals,
    reason = "names generated from the C struct names"
)]
pub mod c_layout {
    include!(concat!(env!("OUT_DIR"), "/layout.rs"));
}

/// IPv4 as `::ffff:a.b.c.d`, IPv6 as is: the address form every map uses.
pub fn mapped(ip: IpAddr) -> Addr16 {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::c_layout::*;
    use super::*;

    #[test]
    fn rust_mirrors_match_the_c_layout_and_constants() {
        assert_eq!(size_of::<Event>(), SIZE_tlshub_event);
        assert_eq!(offset_of!(Event, cookie), OFF_tlshub_event_cookie);
        assert_eq!(offset_of!(Event, ts_ns), OFF_tlshub_event_ts_ns);
        assert_eq!(offset_of!(Event, pid), OFF_tlshub_event_pid);
        assert_eq!(offset_of!(Event, fd), OFF_tlshub_event_fd);
        assert_eq!(offset_of!(Event, local_isn), OFF_tlshub_event_local_isn);
        assert_eq!(offset_of!(Event, family), OFF_tlshub_event_family);
        assert_eq!(offset_of!(Event, remote_port), OFF_tlshub_event_remote_port);
        assert_eq!(offset_of!(Event, local_addr), OFF_tlshub_event_local_addr);
        assert_eq!(offset_of!(Event, remote_addr), OFF_tlshub_event_remote_addr);
        assert_eq!(size_of::<Conn>(), SIZE_tlshub_conn);
        assert_eq!(offset_of!(Conn, gate), OFF_tlshub_conn_gate);
        assert_eq!(offset_of!(Conn, role), OFF_tlshub_conn_role);
        assert_eq!(offset_of!(Conn, est), OFF_tlshub_conn_est);
        assert_eq!(offset_of!(Conn, owner_pid), OFF_tlshub_conn_owner_pid);
        assert_eq!(offset_of!(Conn, owner_fd), OFF_tlshub_conn_owner_fd);
        assert_eq!(offset_of!(Conn, waiting_pid), OFF_tlshub_conn_waiting_pid);
        assert_eq!(offset_of!(Conn, flags), OFF_tlshub_conn_flags);
        assert_eq!(size_of::<Control>(), SIZE_tlshub_control);
        assert_eq!(offset_of!(Control, no_core), OFF_tlshub_control_no_core);
        assert_eq!(offset_of!(Control, keying), OFF_tlshub_control_keying);
        assert_eq!(offset_of!(Event, peer_keying), OFF_tlshub_event_peer_keying);
        assert_eq!(size_of::<Held>(), SIZE_tlshub_held);
        assert_eq!(size_of::<Owner>(), SIZE_tlshub_owner);
        assert_eq!(offset_of!(Owner, fd), OFF_tlshub_owner_fd);
        assert_eq!(offset_of!(Owner, cgroup), OFF_tlshub_owner_cgroup);
        assert_eq!(offset_of!(Event, cgroup), OFF_tlshub_event_cgroup);
        assert_eq!(offset_of!(Conn, owner_cgroup), OFF_tlshub_conn_owner_cgroup);
        assert_eq!(offset_of!(Held, since_ns), OFF_tlshub_held_since_ns);
        assert_eq!(size_of::<SkMark>(), SIZE_tlshub_sk_mark);
        assert_eq!(offset_of!(SkMark, flags), OFF_tlshub_sk_mark_flags);
        assert_eq!(
            offset_of!(SkMark, unsent_since_ms),
            OFF_tlshub_sk_mark_unsent_since_ms
        );
        assert_eq!(size_of::<Addr16>() + 4, SIZE_tlshub_lpm_key);
        assert_eq!(OFF_tlshub_lpm_key_addr, 4);
        assert_eq!(size_of::<PortKey>(), SIZE_tlshub_port_key);
        assert_eq!(offset_of!(PortKey, port), OFF_tlshub_port_key_port);
        assert_eq!(
            [gate::CLOSED, gate::OPEN, gate::RESET],
            [TLSHUB_GATE_CLOSED, TLSHUB_GATE_OPEN, TLSHUB_GATE_RESET]
        );
        assert_eq!(
            [
                mark::REPAIR,
                mark::REFUSED,
                mark::OPEN,
                mark::CONNECTING,
                mark::HELD_CONNECTING,
                kind::HELD_CONNECTING
            ],
            [
                TLSHUB_MARK_REPAIR,
                TLSHUB_MARK_REFUSED,
                TLSHUB_MARK_OPEN,
                TLSHUB_MARK_CONNECTING,
                TLSHUB_MARK_HELD_CONNECTING,
                TLSHUB_EV_HELD_CONNECTING
            ]
        );
        assert_eq!(
            [
                kind::WAITING,
                kind::UNSENT_HELD,
                stat::GATE_EAGAIN,
                stat::UNMARKED_REFUSED,
                stat::UNSENT_HOLDS,
                stat::UNSENT_EXPIRED,
                stat::HOLD_UNRECORDED,
                stat::MAP_BUSY,
                stat::MPTCP_REFUSED,
                stat::SIMULTANEOUS_OPEN,
                stat::OPEN_RECORD_HOLDS,
                kind::OPEN_RECORD_HELD,
                UNSENT_HOLD_MAX_MS,
                stat::COUNT,
                conn::UNMARKED
            ],
            [
                TLSHUB_EV_WAITING,
                TLSHUB_EV_UNSENT_HELD,
                TLSHUB_STAT_GATE_EAGAIN,
                TLSHUB_STAT_UNMARKED_REFUSED,
                TLSHUB_STAT_UNSENT_HOLDS,
                TLSHUB_STAT_UNSENT_EXPIRED,
                TLSHUB_STAT_HOLD_UNRECORDED,
                TLSHUB_STAT_MAP_BUSY,
                TLSHUB_STAT_MPTCP_REFUSED,
                TLSHUB_STAT_SIMULTANEOUS_OPEN,
                TLSHUB_STAT_OPEN_RECORD_HOLDS,
                TLSHUB_EV_OPEN_RECORD_HELD,
                TLSHUB_UNSENT_HOLD_MAX_MS,
                TLSHUB_STAT_MAX,
                TLSHUB_CONN_UNMARKED
            ]
        );
        assert_eq!(SERVICE_RULE, TLSHUB_SERVICE_RULE);
        assert_eq!(LISTEN_RULE, TLSHUB_LISTEN_RULE);
        assert_eq!(offset_of!(Event, peer), OFF_tlshub_event_peer);
        assert_eq!(
            [u32::from(peer::SILENT), u32::from(peer::ANNOUNCED)],
            [TLSHUB_PEER_SILENT, TLSHUB_PEER_ANNOUNCED]
        );
    }

    #[test]
    fn events_parse_and_short_records_are_refused() {
        let ev = Event {
            kind: kind::ESTABLISHED,
            cookie: 42,
            local_port: 1234,
            local_addr: mapped("10.0.1.2".parse().unwrap()),
            remote_addr: mapped("fd00::2".parse().unwrap()),
            remote_port: 8443,
            ..Default::default()
        };
        let bytes =
            // SAFETY: viewing a repr(C) plain-old-data value as its bytes.
            unsafe { std::slice::from_raw_parts((&raw const ev).cast::<u8>(), size_of::<Event>()) };
        let back = Event::from_bytes(bytes).unwrap();
        assert_eq!(back, ev);
        assert_eq!(back.local().to_string(), "10.0.1.2:1234");
        assert_eq!(back.remote().to_string(), "[fd00::2]:8443");
        assert!(Event::from_bytes(&bytes[..10]).is_err());
    }

    #[test]
    fn the_object_has_every_program_and_map() {
        let text = String::from_utf8_lossy(OBJECT);
        for name in [
            names::SOCKOPS,
            names::DEFER_FIN,
            names::CONNS,
            names::HELD,
            names::EVENTS,
        ]
        .into_iter()
        .chain(names::FEXIT.iter().map(|t| t.0))
        .chain(names::LSM.iter().map(|l| l.0))
        .chain(names::MAPS.iter().copied())
        {
            assert!(text.contains(name), "{name} missing from the BPF object");
        }
    }
}
