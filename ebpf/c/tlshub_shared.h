/* Layouts shared between the BPF programs (tlshub.bpf.c) and user space
 * (ebpf/src/lib.rs mirrors every struct with #[repr(C)]; a test compares
 * sizes and offsets, see layout.c). Change both together. */
#ifndef TLSHUB_SHARED_H
#define TLSHUB_SHARED_H

#include <linux/types.h>

/* Event kinds on the ring buffer. */
#define TLSHUB_EV_ESTABLISHED 1 /* a selected connection reached ESTABLISHED */
#define TLSHUB_EV_OWNER 2       /* connect()/accept() returned its fd in pid */
#define TLSHUB_EV_HELD 3        /* the gate stopped pid on a closed socket */
#define TLSHUB_EV_CLOSED 4      /* the selected socket reached TCP_CLOSE */
#define TLSHUB_EV_WAITING 5     /* the gate answered EAGAIN to pid (non-blocking
                                 * socket); once per connection */
#define TLSHUB_EV_UNSENT_HELD 6 /* shutdown() stopped pid until kTLS's unsent
                                 * records are in TCP */
#define TLSHUB_EV_HELD_CONNECTING 7 /* the gate stopped pid on a selected
                                     * socket still connecting (no conns
                                     * entry until the peer answers) */
#define TLSHUB_EV_OPEN_RECORD_HELD 8 /* shutdown() stopped pid while kTLS's
                                      * open record (MSG_MORE writes) holds
                                      * bytes: the core closes the record */

/* struct tlshub_event.peer at ESTABLISHED: whether the other end announced
 * in the TCP handshake that its node selected the connection too (the
 * tlshub TCP option, see announce_*() in tlshub.bpf.c). */
#define TLSHUB_PEER_SILENT 0    /* no option: no tlshub there, or not selected */
#define TLSHUB_PEER_ANNOUNCED 1 /* the option came */

/* The tlshub TCP option: experimental kind 254 with a 16-bit experiment
 * identifier (RFC 6994), then one byte: the keying protocol of the node's
 * active provider (keying_id() in the provider SDK; 0: not said). 5 bytes,
 * which the kernel pads to 8 with NOPs. */
#define TLSHUB_TCPOPT_KIND 254
#define TLSHUB_TCPOPT_LEN 5
#define TLSHUB_TCPOPT_SEARCH_LEN 4 /* kind, length and ID: what is searched for */
#define TLSHUB_TCPOPT_EXID 0x544c /* "TL" */

#define TLSHUB_ROLE_CLIENT 1
#define TLSHUB_ROLE_SERVER 2

/* Gate states in struct tlshub_conn.gate. */
#define TLSHUB_GATE_CLOSED 1 /* hold everyone but exempt processes */
#define TLSHUB_GATE_OPEN 2   /* keys installed (or policy said let it pass) */
#define TLSHUB_GATE_RESET 3  /* terminal: every call fails with ECONNRESET, nobody is held */

/* What the gate does with a connection still waiting for keys when no core
 * is alive (struct tlshub_control.no_core). */
#define TLSHUB_NO_CORE_HOLD 0   /* hold anyway (a core is expected back) */
#define TLSHUB_NO_CORE_REFUSE 1 /* fail-closed: the call fails, ECONNRESET */
#define TLSHUB_NO_CORE_PASS 2   /* fail-open: let it through in plaintext */

/* Written by the core: its heartbeat and what to do without it. */
struct tlshub_control {
	__u64 heartbeat_ns; /* bpf_ktime_get_ns() clock; 0: no core */
	__u64 grace_ns;     /* a heartbeat older than this means no core */
	__u32 no_core;      /* TLSHUB_NO_CORE_* */
	__u32 keying;       /* the byte this node announces (low 8 bits) */
};

/* Nanoseconds per clock tick of /proc/PID/stat's start time (USER_HZ is
 * 100 on x86-64); the exempt map's values are in these ticks. */
#define TLSHUB_NS_PER_USER_HZ_TICK 10000000ULL

/* How long after the last selected connection was established on the
 * accepting side the accept fexits look for their owner (see
 * passive_selected_ns in tlshub.bpf.c): 30 s. */
#define TLSHUB_ACCEPT_WALK_WINDOW_NS (30ULL * 1000000000ULL)

/* Indexes into the stats array. */
#define TLSHUB_STAT_RINGBUF_DROPS 0
#define TLSHUB_STAT_GATE_STOPS 1
#define TLSHUB_STAT_NO_CORE_REFUSALS 2
#define TLSHUB_STAT_FASTOPEN_REFUSED 3 /* TCP Fast Open sends refused (EOPNOTSUPP) */
#define TLSHUB_STAT_MAP_FULL 4 /* selected sockets failed closed: conns was full */
#define TLSHUB_STAT_FIN_DEFERRED 5 /* peer FINs dropped while the gate was closed */
#define TLSHUB_STAT_REPAIR_REFUSED 6 /* repair-mode sockets to selected peers refused */
#define TLSHUB_STAT_ZEROCOPY_RECEIVE_REFUSED 7 /* TCP_ZEROCOPY_RECEIVE on gated or kTLS sockets */
#define TLSHUB_STAT_GATE_EAGAIN 8 /* calls on non-blocking sockets answered EAGAIN */
#define TLSHUB_STAT_UNMARKED_REFUSED 9 /* selected sockets refused: no room for their mark */
#define TLSHUB_STAT_UNSENT_HOLDS 10 /* shutdown()s held for kTLS's unsent records */
#define TLSHUB_STAT_UNSENT_EXPIRED 11 /* shutdown()s let through after TLSHUB_UNSENT_HOLD_MAX_MS */
#define TLSHUB_STAT_HOLD_UNRECORDED 12 /* calls answered EINTR: no room to record their hold */
#define TLSHUB_STAT_MAP_BUSY 13 /* selected sockets failed closed: conns was busy (EBUSY) */
#define TLSHUB_STAT_MPTCP_REFUSED 14 /* Multipath TCP to or from selected peers refused */
#define TLSHUB_STAT_SIMULTANEOUS_OPEN 15 /* selected connect()ed sockets completed passively (simultaneous open) */
#define TLSHUB_STAT_OPEN_RECORD_HOLDS 16 /* shutdown()s held for kTLS's open record (MSG_MORE writes) */
#define TLSHUB_STAT_MAX 17

struct tlshub_event {
	__u32 kind;
	__u32 role;
	__u64 cookie;
	__u64 ts_ns; /* bpf_ktime_get_ns() */
	__u32 pid;   /* thread group id */
	__s32 fd;
	__u32 local_isn;
	__u32 remote_isn;
	__u16 family; /* AF_INET or AF_INET6 */
	__u16 local_port;  /* host order */
	__u16 remote_port; /* host order */
	__u8 peer;         /* ESTABLISHED: TLSHUB_PEER_* */
	__u8 peer_keying;  /* ESTABLISHED: the keying byte it announced (0: none) */
	__u8 local_addr[16]; /* IPv4 as ::ffff:a.b.c.d */
	__u8 remote_addr[16];
	/* OWNER, HELD, HELD_CONNECTING, WAITING: the cgroup (v2 id) of the
	 * process in pid, taken in its context; 0: not known. The core bounds
	 * the connections waiting for keys per cgroup with it. */
	__u64 cgroup;
};

/* Per selected connection, keyed by socket cookie. */
struct tlshub_conn {
	__u32 gate;
	__u32 role;
	/* Copies of what the ring buffer reported, so a core that starts
	 * while connections wait for keys (after a restart) can key them from
	 * the map alone: the ESTABLISHED event (kind 0 until then) and the
	 * owner (pid 0 until known). */
	struct tlshub_event est;
	__u32 owner_pid;
	__s32 owner_fd;
	/* The first process the gate answered EAGAIN (0: none yet); set by
	 * the gate so that it reports a waiting connection only once. */
	__u32 waiting_pid;
	__u32 flags; /* TLSHUB_CONN_* */
	__u64 owner_cgroup; /* the owner's cgroup (0: not known) */
};

/* Selected, but its socket-local mark could not be created (the app had
 * filled the socket's option memory, see track()): the gate state is
 * TLSHUB_GATE_RESET and the gate finds the entry by the socket's cookie. */
#define TLSHUB_CONN_UNMARKED 1

/* Per held process, keyed by tgid. */
struct tlshub_held {
	__u64 cookie;
	__u64 since_ns;
};

/* Socket-local storage: marks a selected socket from the first moment
 * (cookie), a socket that was put in TCP repair mode before it was
 * selected (flags only, cookie 0), and one whose gate the core opened for
 * good (flags only: it costs no conns entry while it stays open). */
struct tlshub_sk_mark {
	__u64 cookie;
	__u32 flags; /* TLSHUB_MARK_* */
	/* When a shutdown() was first held for kTLS's unsent records
	 * (bpf_ktime_get_ns() in ms, wrapping, the low bit set); 0: never. */
	__u32 unsent_since_ms;
};

/* How long shutdown()s on one socket are held for kTLS's unsent records
 * before they pass anyway (a peer that stops reading would otherwise keep
 * the app stopped). */
#define TLSHUB_UNSENT_HOLD_MAX_MS 5000

/* The socket was in TCP repair mode before it was selected: its sequence
 * numbers (and so the keys a key-only provider derives) are the app's. */
#define TLSHUB_MARK_REPAIR 1
/* Selected but refused for good (conns was full, or repair mode): every
 * call fails with ECONNRESET. */
#define TLSHUB_MARK_REFUSED 2
/* Open for good (keys installed, or let through by fail-open): the core
 * removed the conns entry, since the gate has nothing left to decide;
 * the socket's TCP_CLOSE is still reported (once), so the core's list of
 * protected connections stays exact. */
#define TLSHUB_MARK_OPEN 4
/* Selected at connect() and not answered yet (SYN_SENT): it has no conns
 * entry until the peer answers (ACTIVE_ESTABLISHED), so a connection that
 * no peer answers (a black-holed address) costs no shared capacity. See
 * track_connecting(). */
#define TLSHUB_MARK_CONNECTING 8
/* The gate held a process on it while it was connecting (HELD_CONNECTING):
 * its TCP_CLOSE, or its refusal at ACTIVE_ESTABLISHED, is reported as
 * CLOSED so the core continues the process. */
#define TLSHUB_MARK_HELD_CONNECTING 16

/* The owner of a selected socket that is still connecting (see
 * connecting_owners): what its conns entry gets when the peer answers. */
struct tlshub_owner {
	__u32 pid; /* 0: not known yet */
	__s32 fd;
	__u64 cgroup; /* its cgroup v2 id */
};

/* LPM key: prefix length over a 16-byte address (IPv4 mapped). */
struct tlshub_lpm_key {
	__u32 prefixlen;
	__u8 addr[16];
};

/* The rule id under which rule_ports lists the service ports (see
 * service_nets in tlshub.bpf.c); peer rules are numbered from 0. */
#define TLSHUB_SERVICE_RULE 0xfffffffeU

/* The rule id under which rule_ports lists every port any peer rule
 * selects (port 0: some rule selects any port): the listeners that get
 * the header-option callbacks (see TCP_LISTEN_CB in tlshub.bpf.c). */
#define TLSHUB_LISTEN_RULE 0xfffffffdU

/* Which server ports a peer rule selects; port 0 means any. */
struct tlshub_port_key {
	__u32 rule;
	__u16 port;
	__u16 pad;
};

#endif
