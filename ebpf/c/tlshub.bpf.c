// SPDX-License-Identifier: GPL-2.0
/* tlshub kernel side: selects TCP connections by policy, reports who owns
 * them, and holds ("gates") any process that moves bytes through a selected
 * socket before capture-core has installed its kTLS keys.
 *
 * Programs (all attached by capture-core, see ARCHITECTURE.md):
 *   sockops (cgroup v2 root)      select + mark at TCP_CONNECT / PASSIVE_ESTABLISHED,
 *                                 report ESTABLISHED with ISNs, clean up at TCP_CLOSE
 *   fexit connect/accept          report the owning pid and fd (on the
 *                                 x86-64 syscall entry points)
 *   lsm socket_sendmsg/recvmsg    the gate for send*()/recv*() (and read/write)
 *   lsm socket_shutdown           the gate for shutdown() (a FIN before keys)
 *   cgroup_skb ingress            defers a peer's FIN that arrives before
 *                                 this side's keys (CLOSE_WAIT refuses kTLS)
 *   lsm file_permission           the gate for read/write/sendfile/splice on
 *                                 socket files (sendfile and splice bypass
 *                                 socket_sendmsg on 6.1); finds the socket
 *                                 with bpf_sock_from_file(), so it needs no
 *                                 OWNER event
 *
 * Kernel structs are declared locally with preserve_access_index (CO-RE):
 * only the fields used here, relocated against the running kernel's BTF. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "tlshub_shared.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define AF_INET6 10
#define ERESTARTSYS 512
#define EINTR 4
#define ECONNRESET 104
#define SIGSTOP 19
#define SIGPIPE 13
#define EPIPE 32
#define SHUT_RD 0
#define ENETUNREACH 101
#define ECONNABORTED 103
#define ETIMEDOUT 110
#define ECONNREFUSED 111
#define EHOSTUNREACH 113
#define MSG_NOSIGNAL 0x4000
#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define MAY_WRITE 0x2
#define MAY_READ 0x4
#define EOPNOTSUPP 95
#define EEXIST 17
#define EBUSY 16
#define ENOBUFS 105
#define IPPROTO_TCP 6
#define IPPROTO_MPTCP 262
#define MSG_FASTOPEN 0x20000000
#define TCP_SYN_SENT 2
#define TCP_CLOSE 7
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define TCPHDR_FIN 0x01
#define TCPHDR_SYN 0x02
#define TCPHDR_ACK 0x10
/* A connecting side's sockops flags while it announces (announce()): a
 * listener's, and so an accepted socket's, have the first only. */
#define ANNOUNCE_FLAGS (BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG | BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG)
#define EPERM 1
#define SOL_TCP 6
#define TCP_REPAIR 19
#define TCP_ZEROCOPY_RECEIVE 35
#define TCP_ULP 31
#define SOL_TLS 282
#define TLS_RX 2
#define EAGAIN 11
#define O_NONBLOCK 04000

#define __pai __attribute__((preserve_access_index))

typedef struct {
	long long counter;
} tlshub_atomic64_t;

struct inode {
	unsigned short i_mode;
} __pai;

struct file {
	struct inode *f_inode;
	void *private_data;
	unsigned int f_flags;
} __pai;

struct in6_addr {
	__u8 s6_addr[16];
} __pai;

/* Only the method kTLS replaces when receive keys go in; see ktls_on(). */
struct proto {
	void *recvmsg;
} __pai;

struct sock_common {
	__be32 skc_daddr;
	__be32 skc_rcv_saddr;
	__be16 skc_dport;
	__u16 skc_num;
	unsigned short skc_family;
	volatile unsigned char skc_state;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
	tlshub_atomic64_t skc_cookie;
	struct proto *skc_prot;
} __pai;

struct sock {
	struct sock_common __sk_common;
	__u16 sk_protocol;
	int sk_err;
} __pai;

struct msghdr {
	void *msg_name;
	int msg_namelen;
	unsigned int msg_flags;
} __pai;

struct sockaddr_in {
	unsigned short sin_family;
	__be16 sin_port;
	__be32 sin_addr;
} __attribute__((packed));

struct sockaddr_in6 {
	unsigned short sin6_family;
	__be16 sin6_port;
	__be32 sin6_flowinfo;
	__u8 sin6_addr[16];
} __attribute__((packed));

struct socket {
	struct sock *sk;
	struct file *file;
} __pai;

struct tcp_ulp_ops {
	char name[16];
} __pai;

struct inet_connection_sock {
	const struct tcp_ulp_ops *icsk_ulp_ops;
	void *icsk_ulp_data;
} __pai;

/* kTLS's per-socket state (include/net/tls.h; in vmlinux BTF although
 * tls is a module, through the inline helpers built-in code uses, on 6.1
 * and 6.12 alike): only what says whether records wait, see
 * ktls_unsent() and ktls_open_record(), and whether both directions are
 * installed, see ktls_keyed(). */
struct tls_context {
	__u8 tx_conf : 3; /* TLS_BASE, TLS_SW, TLS_HW, ... */
	__u8 rx_conf : 3;
	void *priv_ctx_tx;
	void *partially_sent_record;
	__u8 pending_open_record_frags; /* bool */
} __pai;

struct list_head {
	struct list_head *next;
} __pai;

/* The software kTLS transmit state (priv_ctx_tx when tx_conf is TLS_SW):
 * its list of records encrypted and not yet wholly in TCP. */
struct tls_sw_context_tx {
	struct list_head tx_list;
} __pai;

#define TLS_SW 1

/* A Multipath TCP connection (what the app's IPPROTO_MPTCP socket is);
 * only its address is used, see mptcp_subflow_refused(). */
struct mptcp_sock;

struct fdtable {
	unsigned int max_fds;
	struct file **fd;
} __pai;

struct files_struct {
	struct fdtable *fdt;
} __pai;

struct task_struct {
	struct files_struct *files;
	struct task_struct *group_leader;
	__u64 start_boottime;
} __pai;

/* ---- maps ---- */

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct tlshub_sk_mark);
} sk_marks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64); /* socket cookie */
	__type(value, struct tlshub_conn);
} conns SEC(".maps");

/* Selected sockets still connecting (SYN_SENT), by cookie: their owner
 * (pid and fd, from the connect() fexit) until the peer answers and the
 * conns entry is made. Least recently used entries give way, so a flood of
 * connects to black-holed addresses can only cost other connecting sockets
 * this head start (the core then finds the socket from the gate's hold or
 * EAGAIN), never their protection. Sized by the core like conns. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64); /* socket cookie */
	__type(value, struct tlshub_owner);
} connecting_owners SEC(".maps");

/* Threads inside a connect() whose destination the policy may select
 * (set by tlshub_gate_connect, taken by the connect fexit), so that the
 * fexit walks the caller's fd table only for them: for every other
 * connect() the walk was most of what the programs cost an unselected
 * connection. A flag left behind (a connect the fexit never sees, from
 * io_uring) costs the thread's next connect() one walk. */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u32);
} selected_connects SEC(".maps");

/* When the last selected connection was established on the accepting side
 * (bpf_ktime_get_ns(); one entry): the accept fexits walk the fd table only
 * within TLSHUB_ACCEPT_WALK_WINDOW_NS of it, so a node without selected
 * incoming connections pays no walk per accept(). Which connection an
 * accept() dequeues is known only after the walk; a selected one accepted
 * later than that after its establishment has no OWNER event and is keyed
 * from the process the gate holds at its first call, as one accepted
 * through io_uring is. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} passive_selected_ns SEC(".maps");

/* Holds the core could not learn of through the ring buffer (it was full).
 * Sized by the core from `[bpf] max_held_processes`. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32); /* tgid */
	__type(value, struct tlshub_held);
} held SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);   /* tgid never held: the core and its providers */
	__type(value, __u64); /* its start, in USER_HZ ticks since boot */
} exempt SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1024);
	__type(key, struct tlshub_lpm_key);
	__type(value, __u32);
} local_nets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1024);
	__type(key, struct tlshub_lpm_key);
	__type(value, __u32); /* rule id */
} peer_nets SEC(".maps");

/* Service virtual addresses (DNAT by the node, as kube-proxy does): a
 * connect to one is selected like a peer, under TLSHUB_SERVICE_RULE's
 * ports, and the core decides at ESTABLISHED from the node's connection
 * tracking table whether the real destination is selected (keyed) or not
 * (let through as plain). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1024);
	__type(key, struct tlshub_lpm_key);
	__type(value, __u32); /* TLSHUB_SERVICE_RULE */
} service_nets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct tlshub_port_key);
	__type(value, __u8);
} rule_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TLSHUB_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tlshub_control);
} control SEC(".maps");

/* Sized by the core from `[bpf] event_buffer_bytes`. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} events SEC(".maps");

/* kTLS's receive method (`tls_sw_recvmsg`), learned from a socket the core
 * installed kTLS on; 0 until then. See ktls_on(). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} ktls_recvmsg SEC(".maps");

/* How many conns entries are TLSHUB_CONN_UNMARKED (see track()): while
 * there are none, the gate never looks a socket up by its cookie. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} unmarked_conns SEC(".maps");

/* ---- helpers ---- */

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);
	if (v)
		__sync_fetch_and_add(v, 1);
}

/* Every event wakes the core (FORCE_WAKEUP), except the close of a
 * connection whose gate is open for good, which emit_quietly() leaves for
 * the core's next wakeup or sweep (within its heartbeat, 500 ms at most):
 * nothing waits for it, and it could cost the core a wakeup per connection.
 * Why every other event must force: the ring buffer's default wakes the
 * reader only when it has read everything before the new record, so after
 * a quiet record nothing would wake it. */
static __always_inline void emit_flags(struct tlshub_event *ev, __u64 flags)
{
	ev->ts_ns = bpf_ktime_get_ns();
	if (bpf_ringbuf_output(&events, ev, sizeof(*ev), flags))
		stat_inc(TLSHUB_STAT_RINGBUF_DROPS);
}

static __always_inline void emit(struct tlshub_event *ev)
{
	emit_flags(ev, BPF_RB_FORCE_WAKEUP);
}

static __always_inline void emit_quietly(struct tlshub_event *ev)
{
	emit_flags(ev, BPF_RB_NO_WAKEUP);
}

static __always_inline void v4_mapped(__u8 *out, __u32 addr_be)
{
	__builtin_memset(out, 0, 10);
	out[10] = 0xff;
	out[11] = 0xff;
	__builtin_memcpy(out + 12, &addr_be, 4);
}

/* Fills family, addresses and ports of ev from the sockops context. */
static __always_inline void fill_tuple(struct bpf_sock_ops *skops, struct tlshub_event *ev)
{
	ev->family = skops->family;
	ev->local_port = (__u16)skops->local_port;
	ev->remote_port = (__u16)bpf_ntohl(skops->remote_port);
	if (skops->family == AF_INET) {
		v4_mapped(ev->local_addr, skops->local_ip4);
		v4_mapped(ev->remote_addr, skops->remote_ip4);
	} else {
		/* One 32-bit load per word: the verifier refuses the 64-bit
		 * loads clang would otherwise merge these into. */
		__u32 l[4], r[4];
#pragma unroll
		for (int i = 0; i < 4; i++) {
			l[i] = *(volatile __u32 *)&skops->local_ip6[i];
			r[i] = *(volatile __u32 *)&skops->remote_ip6[i];
		}
		__builtin_memcpy(ev->local_addr, l, 16);
		__builtin_memcpy(ev->remote_addr, r, 16);
	}
}

static __always_inline int addr_unspecified(const __u8 *a)
{
	__u64 hi, lo;
	__builtin_memcpy(&hi, a, 8);
	__builtin_memcpy(&lo, a + 8, 8);
	/* :: and ::ffff:0.0.0.0 */
	return hi == 0 && (lo == 0 || lo == bpf_htonl(0xffff) + 0ULL);
}

/* Whether `rule_ports` lists `port` under `rule`, or any port (port 0).
 * TLSHUB_LISTEN_RULE's ports are every peer rule's: the listeners that may
 * accept a connection the policy selects. */
static __always_inline int rule_selects_port(__u32 rule, __u16 port)
{
	struct tlshub_port_key pk = { .rule = rule, .port = 0 };
	if (bpf_map_lookup_elem(&rule_ports, &pk))
		return 1;
	pk.port = port;
	return bpf_map_lookup_elem(&rule_ports, &pk) != 0;
}

/* Whether a local address is one of this node's pods, or unspecified (a
 * socket not bound yet, or bound to every address): the safe answer. */
static __always_inline int local_selectable(const __u8 *addr)
{
	struct tlshub_lpm_key key = { .prefixlen = 128 };
	if (addr_unspecified(addr))
		return 1;
	__builtin_memcpy(key.addr, addr, 16);
	return bpf_map_lookup_elem(&local_nets, &key) != 0;
}

/* The policy: the local address is one of this node's pods, the peer is in
 * a selected CIDR, and the server port is one that rule selects (or any).
 * An unspecified local address (a socket not bound yet, see fastopen())
 * counts as one of this node's pods: the safe answer. A connecting side
 * whose peer no rule names but that is a service address (service_nets)
 * is selected too, under the service ports: its real destination is known
 * only after the node's DNAT, so the core judges it at ESTABLISHED. */
static __always_inline int selected(struct tlshub_event *ev, __u32 role)
{
	struct tlshub_lpm_key key = { .prefixlen = 128 };

	if (ev->family != AF_INET && ev->family != AF_INET6)
		return 0;
	/* The peer first: most connections a node makes or takes are
	 * between its own pods and peers no rule names, and this way they
	 * cost one lookup fewer. */
	__builtin_memcpy(key.addr, ev->remote_addr, 16);
	__u32 *rule = bpf_map_lookup_elem(&peer_nets, &key);
	if (!rule && role == TLSHUB_ROLE_CLIENT)
		rule = bpf_map_lookup_elem(&service_nets, &key);
	if (!rule)
		return 0;
	if (!local_selectable(ev->local_addr))
		return 0;
	return rule_selects_port(*rule,
				 role == TLSHUB_ROLE_CLIENT ? ev->remote_port : ev->local_port);
}

/* Whether a socket's mark puts it under the gate: selected (a cookie) or
 * refused for good. A mark with neither is a repair-mode socket that was
 * never selected. */
static __always_inline int mark_gates(const struct tlshub_sk_mark *mark)
{
	return mark && (mark->cookie || (mark->flags & TLSHUB_MARK_REFUSED));
}

/* Refuses a selected socket for good: its mark says so, and the gate
 * fails every call on it with ECONNRESET (no hold, nothing for the core). */
/* Which counter a failed conns update is refused under: the map was full
 * (E2BIG), or busy (EBUSY: the hash map's per-CPU guard against re-entry,
 * when this program runs in a softirq that interrupted another update of
 * conns on the same CPU between the guard and the bucket lock; the window
 * is open on kernels that take the guard before disabling interrupts).
 * Either way the connection fails closed; the two are told apart so that
 * an operator is not told to raise max_connections for the second. */
static __always_inline __u32 map_refusal(long err)
{
	return err == -EBUSY ? TLSHUB_STAT_MAP_BUSY : TLSHUB_STAT_MAP_FULL;
}

static __always_inline void refuse(struct tlshub_sk_mark *mark, __u32 stat)
{
	mark->cookie = 0;
	mark->flags = (mark->flags & ~TLSHUB_MARK_CONNECTING) | TLSHUB_MARK_REFUSED;
	stat_inc(stat);
}

/* A selected socket with no room for its mark (socket-local storage is
 * charged to the socket's option memory, net.core.optmem_max). An app's
 * connect() never gets here: tlshub_gate_connect() makes the mark first or
 * refuses the connect. What is left: an accepted socket on a node whose
 * optmem_max is set below a mark's size (its option memory starts empty,
 * and the app cannot reach it before it is established), and connects
 * from inside the kernel, which skip the LSM hook. Without a mark the gate
 * would not know the socket, so its new conns entry (`conn`) is refused
 * for good, and the gate finds it by its cookie. */
static __always_inline void track_unmarked(struct bpf_sock_ops *skops, __u64 cookie,
					   struct tlshub_conn *conn)
{
	conn->gate = TLSHUB_GATE_RESET;
	conn->flags = TLSHUB_CONN_UNMARKED;
	bpf_map_update_elem(&conns, &cookie, conn, BPF_EXIST);
	__u32 zero = 0;
	__u64 *unmarked = bpf_map_lookup_elem(&unmarked_conns, &zero);
	if (unmarked)
		__sync_fetch_and_add(unmarked, 1);
	stat_inc(TLSHUB_STAT_UNMARKED_REFUSED);
	/* Its TCP_CLOSE removes the entry and the count. */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* Marks a newly accepted selected socket: socket-local storage (read by
 * the socket LSM hooks) and the conns entry holding the gate state, gate
 * closed. When conns is full the socket is still marked, as refused, and
 * the gate fails it for good (ECONNRESET): capacity never means plaintext. */
static __always_inline int track_passive(struct bpf_sock_ops *skops, __u64 cookie)
{
	struct tlshub_conn conn = { .gate = TLSHUB_GATE_CLOSED, .role = TLSHUB_ROLE_SERVER };
	long err = bpf_map_update_elem(&conns, &cookie, &conn, BPF_NOEXIST);
	if (err == -EEXIST)
		return 0;
	struct bpf_sock *sk = skops->sk;
	if (!sk) {
		if (!err)
			bpf_map_delete_elem(&conns, &cookie);
		return 0;
	}
	struct tlshub_sk_mark *mark =
		bpf_sk_storage_get(&sk_marks, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!mark) {
		if (!err)
			track_unmarked(skops, cookie, &conn);
		return 0;
	}
	if (err) {
		refuse(mark, map_refusal(err));
		return 0;
	}
	mark->cookie = cookie;
	mark->flags &= ~TLSHUB_MARK_REFUSED;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	return 1;
}

/* Marks a socket selected at connect() as connecting: a mark with its
 * cookie and TLSHUB_MARK_CONNECTING, gate closed, but no conns entry yet
 * (track() makes it when the peer answers). Why: an app can connect()
 * as fast as it likes to selected addresses where nobody answers, and each
 * such socket sits in SYN_SENT for about two minutes; with an entry each,
 * one unprivileged process could fill conns and make every other selected
 * connection on the node fail closed. The socket-local mark is charged to
 * the socket itself, so connecting costs nothing shared. */
static __always_inline void track_connecting(struct bpf_sock_ops *skops, __u64 cookie)
{
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return;
	struct tlshub_sk_mark *mark =
		bpf_sk_storage_get(&sk_marks, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!mark) {
		/* No mark (a connect from inside the kernel, see
		 * track_unmarked()), so the gate can find it only by its
		 * cookie. */
		struct tlshub_conn conn = { .gate = TLSHUB_GATE_CLOSED, .role = TLSHUB_ROLE_CLIENT };
		if (!bpf_map_update_elem(&conns, &cookie, &conn, BPF_NOEXIST))
			track_unmarked(skops, cookie, &conn);
		return;
	}
	if (mark->flags & TLSHUB_MARK_REPAIR) {
		/* Connected in repair mode: no SYN was exchanged, and the ISNs
		 * are whatever the app set, so a key-only provider could be made
		 * to derive another connection's keys. Never keyed: refused. */
		refuse(mark, TLSHUB_STAT_REPAIR_REFUSED);
		return;
	}
	mark->cookie = cookie;
	/* Refused on an earlier connect: this one is judged afresh. */
	mark->flags = (mark->flags & ~TLSHUB_MARK_REFUSED) | TLSHUB_MARK_CONNECTING;
	struct tlshub_owner unknown = {};
	bpf_map_update_elem(&connecting_owners, &cookie, &unknown, BPF_ANY);
	/* ... and announce it (see announce()). */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG |
						 ANNOUNCE_FLAGS);
}

/* At ACTIVE_ESTABLISHED (role client), or at PASSIVE_ESTABLISHED after a
 * simultaneous open (role server, see the sockops program): the conns
 * entry of a connecting socket (see track_connecting()) whose peer
 * answered, the end of its connecting state, and in *owner the owner
 * connect() recorded (pid 0: none). Returns 0 if conns is full: then it
 * is refused for good. */
static __always_inline int track(struct tlshub_sk_mark *mark, __u64 cookie,
				 struct tlshub_owner *owner, __u32 role)
{
	struct tlshub_conn conn = { .gate = TLSHUB_GATE_CLOSED, .role = role };
	long err = bpf_map_update_elem(&conns, &cookie, &conn, BPF_NOEXIST);
	struct tlshub_owner *known = bpf_map_lookup_elem(&connecting_owners, &cookie);
	if (known) {
		*owner = *known;
		bpf_map_delete_elem(&connecting_owners, &cookie);
	}
	if (err && err != -EEXIST) {
		refuse(mark, map_refusal(err));
		return 0;
	}
	mark->flags &= ~(TLSHUB_MARK_CONNECTING | TLSHUB_MARK_HELD_CONNECTING);
	return 1;
}

/* ---- the handshake announcement: the tlshub TCP option ----
 *
 * Each side learns during the TCP handshake whether the other side's node
 * selected the connection too, before any app byte can move and with no
 * timeout. A connecting side that selects a connection puts the option in
 * its SYN and in everything it sends until it receives a packet after the
 * handshake (so a lost final ACK, or a server answering with SYN cookies,
 * still finds it in whatever ACK completes the handshake). A listening
 * side answers in its SYN-ACK a SYN that carried it, if it selects the
 * connection too. ESTABLISHED reports what came (struct tlshub_event.peer);
 * the core decides what a silent peer means (opportunistic rules: plain).
 *
 * Flags: a connecting side gets ANNOUNCE_FLAGS at TCP_CONNECT_CB (the
 * parse callback never runs before ESTABLISHED, and its first run ends the
 * announcement). Every listener gets the write flag at TCP_LISTEN_CB, to
 * answer; its accepted sockets inherit it, and it tells at
 * PASSIVE_ESTABLISHED_CB whether the listener could have answered (one
 * that listened before the programs were attached could not, so its
 * client saw a silent peer and this side reports the same). An accepted
 * socket drops it at its first packet out, not at PASSIVE_ESTABLISHED_CB:
 * where two cores' programs share a kernel (the test bed), the first one's
 * drop would hide it from the second. Only the program that marked a
 * socket writes on it, so two programs never write twice. */

struct tlshub_tcpopt {
	__u8 kind;
	__u8 len;
	__u16 exid; /* network order */
	__u8 keying;
	__u8 room[3]; /* the search buffer is 8 bytes: an option up to 8 fits */
};

/* The option to search for: kind and experiment ID, with the length byte
 * saying how long the ID is (bpf_load_hdr_opt()'s convention for
 * experimental kinds). */
static __always_inline struct tlshub_tcpopt tlshub_tcpopt_search(void)
{
	struct tlshub_tcpopt opt = {
		.kind = TLSHUB_TCPOPT_KIND,
		.len = TLSHUB_TCPOPT_SEARCH_LEN,
		.exid = bpf_htons(TLSHUB_TCPOPT_EXID),
	};
	return opt;
}

/* What the packet the program runs for (flags 0), or the SYN it answers
 * (BPF_LOAD_HDR_OPT_TCP_SYN, at a SYN-ACK), announced: TLSHUB_PEER_* in
 * the low byte and the peer's keying byte in the high one (0 when its
 * option has none). */
static __always_inline __u16 announced_in(struct bpf_sock_ops *skops, __u64 flags)
{
	struct tlshub_tcpopt opt = tlshub_tcpopt_search();
	long len = bpf_load_hdr_opt(skops, &opt, sizeof(opt), flags);
	if (len <= 0)
		return TLSHUB_PEER_SILENT;
	__u16 keying = len >= TLSHUB_TCPOPT_LEN ? opt.keying : 0;
	return TLSHUB_PEER_ANNOUNCED | (keying << 8);
}

/* Fills the event's peer fields from announced_in(). */
static __always_inline void set_peer(struct tlshub_event *ev, __u16 announced)
{
	ev->peer = announced & 0xff;
	ev->peer_keying = announced >> 8;
}

/* HDR_OPT_LEN_CB and WRITE_HDR_OPT_CB: room for the option, then the
 * option, on a listener's SYN-ACK that answers an announcing SYN it
 * selects, and on the packets of a connecting side this program selected
 * (marked) until its keys are in; an accepted socket's inherited flag is
 * dropped here. */
static __always_inline void announce(struct bpf_sock_ops *skops)
{
	if ((skops->skb_tcp_flags & (TCPHDR_SYN | TCPHDR_ACK)) == (TCPHDR_SYN | TCPHDR_ACK)) {
		if (!announced_in(skops, BPF_LOAD_HDR_OPT_TCP_SYN))
			return;
		struct tlshub_event ev = {};
		fill_tuple(skops, &ev);
		if (!selected(&ev, TLSHUB_ROLE_SERVER))
			return;
	} else if (!(skops->bpf_sock_ops_cb_flags & BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG)) {
		/* An accepted socket: nothing to write. */
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags &
							 ~BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
		return;
	} else {
		struct bpf_sock *sk = skops->sk;
		if (!sk)
			return;
		struct tlshub_sk_mark *mark = bpf_sk_storage_get(&sk_marks, sk, 0, 0);
		if (!mark || !mark->cookie)
			return;
	}
	if (skops->op == BPF_SOCK_OPS_HDR_OPT_LEN_CB) {
		bpf_reserve_hdr_opt(skops, TLSHUB_TCPOPT_LEN, 0);
		return;
	}
	__u32 zero = 0;
	struct tlshub_control *ctl = bpf_map_lookup_elem(&control, &zero);
	struct tlshub_tcpopt opt = tlshub_tcpopt_search();
	opt.len = TLSHUB_TCPOPT_LEN;
	opt.keying = ctl ? ctl->keying & 0xff : 0;
	bpf_store_hdr_opt(skops, &opt, TLSHUB_TCPOPT_LEN, 0);
}

/* Multipath TCP: an app's IPPROTO_MPTCP socket is not the TCP socket on
 * the wire. The kernel makes one TCP socket per path (a subflow, attached
 * to the app's cgroup, so this program sees it) and moves the app's bytes
 * into it from the MPTCP socket, with no socket hook on the way; and kTLS
 * cannot be installed on an MPTCP socket (its setsockopt refuses TCP_ULP).
 * So such a connection can never be protected, and the gate must refuse it
 * wherever the policy selects it: connect() is refused (see
 * tlshub_gate_connect(), and fastopen_refused() for sendto()), and this
 * catches every subflow that still gets here, whichever side: one a
 * listener accepted (a listener older than its port's selection, or
 * reached by a peer without tlshub), or an extra path the kernel opens to
 * an address the peer announced. Its MPTCP socket, the one the app holds,
 * is marked refused, so every call on it fails with ECONNRESET (at
 * PASSIVE_ESTABLISHED_CB, before accept() can return it), and the subflow
 * is not tracked: there is nothing to key. Returns whether sk was a
 * subflow. */
static __always_inline int mptcp_subflow_refused(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return 0;
	struct mptcp_sock *msk = bpf_skc_to_mptcp_sock(sk);
	if (!msk)
		return 0;
	/* No room for the mark only where net.core.optmem_max is below its
	 * size: a new MPTCP socket's option memory is empty, and an app's
	 * connect() to a selected peer never gets here. */
	struct tlshub_sk_mark *mark =
		bpf_sk_storage_get(&sk_marks, msk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (mark)
		refuse(mark, TLSHUB_STAT_MPTCP_REFUSED);
	else
		stat_inc(TLSHUB_STAT_MPTCP_REFUSED);
	return 1;
}

/* Whether this end's address and port sort before the peer's (addresses
 * as on the wire, then ports). After a simultaneous open in which both
 * SYNs crossed, both ends complete as the passive side; each compares the
 * same two endpoints from its own side, so exactly one of them is first
 * and takes the client's role. */
static __always_inline int endpoint_first(const struct tlshub_event *ev)
{
#pragma unroll
	for (int i = 0; i < 16; i++) {
		if (ev->local_addr[i] != ev->remote_addr[i])
			return ev->local_addr[i] < ev->remote_addr[i];
	}
	return ev->local_port < ev->remote_port;
}

/* Whether this socket is one connect() selected and is still connecting
 * (see track_connecting()). */
static __always_inline int connecting_here(struct bpf_sock_ops *skops, __u64 cookie)
{
	if (!skops->sk)
		return 0;
	struct tlshub_sk_mark *mark = bpf_sk_storage_get(&sk_marks, skops->sk, 0, 0);
	return mark && (mark->flags & TLSHUB_MARK_CONNECTING) && mark->cookie == cookie;
}

/* The handshake of a socket that connect()ed has completed (actively, or
 * passively after a simultaneous open): reads the peer's announcement
 * into ev and, for a selected connecting socket, makes its conns entry in
 * `role` (track()) with the owner connect() recorded in *owner. Returns
 * whether there is a connection for the core to key (not refused, not
 * conns full, not unselected). */
static __always_inline int connected_answered(struct bpf_sock_ops *skops, __u64 cookie,
					      struct tlshub_event *ev, struct tlshub_owner *owner,
					      __u32 role)
{
	/* Announced (announce()): did the peer's answer carry it? */
	if (skops->bpf_sock_ops_cb_flags & BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG)
		set_peer(ev, announced_in(skops, 0));
	/* The peer answered: a connecting socket gets its entry now
	 * (track_connecting()), and its owner if connect() knew it. */
	if (skops->sk) {
		struct tlshub_sk_mark *mark = bpf_sk_storage_get(&sk_marks, skops->sk, 0, 0);
		if (mark && (mark->flags & TLSHUB_MARK_CONNECTING) && mark->cookie == cookie) {
			int held = mark->flags & TLSHUB_MARK_HELD_CONNECTING;
			if (!track(mark, cookie, owner, role)) {
				/* Refused: a process held while it connected
				 * has nothing to wait for. */
				if (held) {
					ev->kind = TLSHUB_EV_CLOSED;
					ev->cookie = cookie;
					emit(ev);
				}
				return 0;
			}
		}
	}
	/* Refused (gate RESET, or conns full): nothing for the core to key. */
	struct tlshub_conn *c = bpf_map_lookup_elem(&conns, &cookie);
	return c && c->gate == TLSHUB_GATE_CLOSED;
}

SEC("sockops")
int tlshub_sockops(struct bpf_sock_ops *skops)
{
	struct tlshub_event ev = {};
	struct tlshub_owner owner = {};
	__u64 cookie;

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		/* Listeners answer announcing SYNs (announce()); accepted
		 * sockets inherit the flag and drop it at their first packet
		 * out. Only listeners on a port some rule selects: the flag
		 * costs a callback per SYN-ACK and one per accepted socket,
		 * and a listener whose port is selected later answers nothing,
		 * as one older than the programs. */
		if (rule_selects_port(TLSHUB_LISTEN_RULE, (__u16)skops->local_port))
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
								 BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
		break;
	case BPF_SOCK_OPS_HDR_OPT_LEN_CB:
	case BPF_SOCK_OPS_WRITE_HDR_OPT_CB:
		announce(skops);
		break;
	case BPF_SOCK_OPS_PARSE_HDR_OPT_CB:
		/* A connecting side got a packet after the handshake (never
		 * called before ESTABLISHED): the peer has completed it, so the
		 * announcement has done its work. */
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~ANNOUNCE_FLAGS);
		break;
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		/* Runs inside connect(), before the SYN: select and close the
		 * gate now. Asking for the cookie here also makes the kernel
		 * assign it, so the connect fexit can read it from the sock. */
		cookie = bpf_get_socket_cookie(skops);
		fill_tuple(skops, &ev);
		if (selected(&ev, TLSHUB_ROLE_CLIENT)) {
			if (!mptcp_subflow_refused(skops))
				track_connecting(skops, cookie);
		} else if (skops->sk) {
			/* A socket that was selected (or refused), disconnected
			 * before its keys and now connects somewhere unselected:
			 * its old mark would refuse it (see gate()); a repair mark
			 * stays. */
			struct tlshub_sk_mark *old = bpf_sk_storage_get(&sk_marks, skops->sk, 0, 0);
			if (mark_gates(old)) {
				bpf_map_delete_elem(&connecting_owners, &cookie);
				old->cookie = 0;
				old->flags &= TLSHUB_MARK_REPAIR;
			}
		}
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		cookie = bpf_get_socket_cookie(skops);
		if (!connected_answered(skops, cookie, &ev, &owner, TLSHUB_ROLE_CLIENT))
			break;
		ev.kind = TLSHUB_EV_ESTABLISHED;
		ev.role = TLSHUB_ROLE_CLIENT;
		goto established;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		/* Runs in softirq when the 3-way handshake completes, before
		 * accept() can return this socket: the gate is closed first. */
		cookie = bpf_get_socket_cookie(skops);
		/* A simultaneous open: this socket connect()ed (and was
		 * selected then), and the peer's SYN reached it in SYN_SENT,
		 * so it answered with a SYN-ACK and the kernel completes it as
		 * the passive side. It keeps its selection. Completed by a
		 * bare ACK, only this end answered a SYN (the first SYN was
		 * lost, as hole punching meets it) and the peer completed
		 * actively, as the client: this end is the server, as TCP
		 * says. Completed by the peer's SYN-ACK, both SYNs crossed and
		 * both ends complete passively: the ends agree on the roles by
		 * their endpoints (endpoint_first()). */
		if (connecting_here(skops, cookie)) {
			__u32 role = TLSHUB_ROLE_SERVER;
			if (skops->skb_tcp_flags & TCPHDR_SYN) {
				fill_tuple(skops, &ev);
				if (endpoint_first(&ev))
					role = TLSHUB_ROLE_CLIENT;
			}
			if (!connected_answered(skops, cookie, &ev, &owner, role))
				break;
			stat_inc(TLSHUB_STAT_SIMULTANEOUS_OPEN);
			ev.kind = TLSHUB_EV_ESTABLISHED;
			ev.role = role;
			goto established;
		}
		/* Inherited from the listener: whether it could answer (see
		 * announce()). */
		int answering = skops->bpf_sock_ops_cb_flags & BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
		fill_tuple(skops, &ev);
		if (!selected(&ev, TLSHUB_ROLE_SERVER) || mptcp_subflow_refused(skops) ||
		    !track_passive(skops, cookie))
			break;
		__u32 zero = 0;
		__u64 *passive = bpf_map_lookup_elem(&passive_selected_ns, &zero);
		if (passive)
			*passive = bpf_ktime_get_ns();
		/* The ACK that completed the handshake: did the client announce? */
		if (answering)
			set_peer(&ev, announced_in(skops, 0));
		ev.kind = TLSHUB_EV_ESTABLISHED;
		ev.role = TLSHUB_ROLE_SERVER;
		goto established;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] != BPF_TCP_CLOSE)
			break;
		cookie = bpf_get_socket_cookie(skops);
		struct tlshub_conn *closed = bpf_map_lookup_elem(&conns, &cookie);
		/* Whether the core may hear of this close late (see emit()). */
		int quiet = 0;
		if (closed) {
			int unmarked = closed->flags & TLSHUB_CONN_UNMARKED;
			quiet = closed->gate == TLSHUB_GATE_OPEN;
			if (!bpf_map_delete_elem(&conns, &cookie) && unmarked) {
				__u32 zero = 0;
				__u64 *n = bpf_map_lookup_elem(&unmarked_conns, &zero);
				if (n)
					__sync_fetch_and_add(n, -1);
			}
		} else {
			/* Closed while connecting (nobody answered): only its
			 * owner was recorded. */
			bpf_map_delete_elem(&connecting_owners, &cookie);
			/* Opened for good: the core removed its entry (see
			 * TLSHUB_MARK_OPEN). */
			struct tlshub_sk_mark *m =
				skops->sk ? bpf_sk_storage_get(&sk_marks, skops->sk, 0, 0) : 0;
			if (!m || !(m->flags & (TLSHUB_MARK_OPEN | TLSHUB_MARK_HELD_CONNECTING)))
				break;
			/* ... or a process was held while it connected (the
			 * core waits for this to continue it). */
			quiet = !(m->flags & TLSHUB_MARK_HELD_CONNECTING);
			m->flags &= ~(TLSHUB_MARK_OPEN | TLSHUB_MARK_HELD_CONNECTING);
		}
		ev.kind = TLSHUB_EV_CLOSED;
		ev.cookie = cookie;
		if (quiet)
			emit_quietly(&ev);
		else
			emit(&ev);
		break;
	}
	return 1;

established:
	/* At *_ESTABLISHED the SYNs are the only sequence space consumed. */
	fill_tuple(skops, &ev);
	ev.cookie = cookie;
	ev.local_isn = skops->snd_nxt - 1;
	ev.remote_isn = skops->rcv_nxt - 1;
	ev.ts_ns = bpf_ktime_get_ns();
	struct tlshub_conn *tracked = bpf_map_lookup_elem(&conns, &cookie);
	if (tracked)
		tracked->est = ev;
	emit(&ev);
	/* After ESTABLISHED, as the core expects: the owner a connect() that
	 * returned before the peer answered (EINPROGRESS) left behind. */
	if (tracked && owner.pid) {
		tracked->owner_pid = owner.pid;
		tracked->owner_fd = owner.fd;
		tracked->owner_cgroup = owner.cgroup;
		struct tlshub_event own = {
			.kind = TLSHUB_EV_OWNER,
			.role = TLSHUB_ROLE_CLIENT,
			.cookie = cookie,
			.pid = owner.pid,
			.fd = owner.fd,
			.cgroup = owner.cgroup,
		};
		emit(&own);
	}
	return 1;
}

/* ---- owner: which pid and fd hold the socket ---- */

/* The syscall entry points take the caller's registers (x86-64 syscall
 * wrappers, CONFIG_ARCH_HAS_SYSCALL_WRAPPER): the first argument is in di. */
struct pt_regs {
	unsigned long di;
} __pai;

/* Looks fd up in the current task's fd table; if it is a selected socket,
 * reports the owner. Only a head start for keying: the gate itself needs
 * no owner, and a socket that never gets one here (io_uring, the 32-bit
 * entry points, a socket passed to another process) is keyed from the pid
 * the gate holds (HELD). */
static __always_inline void report_owner(int fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	unsigned int max = BPF_CORE_READ(fdt, max_fds);
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *file = 0;

	if (fd < 0 || (unsigned int)fd >= max)
		return;
	if (bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]) || !file)
		return;
	struct inode *inode = BPF_CORE_READ(file, f_inode);
	if ((BPF_CORE_READ(inode, i_mode) & S_IFMT) != S_IFSOCK)
		return;
	struct socket *sock = BPF_CORE_READ(file, private_data);
	__u64 cookie = BPF_CORE_READ(sock, sk, __sk_common.skc_cookie.counter);
	if (!cookie)
		return;
	struct tlshub_conn *c = bpf_map_lookup_elem(&conns, &cookie);
	if (!c) {
		/* Still connecting (EINPROGRESS, or interrupted): kept for
		 * when the peer answers (see connecting_owners). No event. */
		struct tlshub_owner *connecting = bpf_map_lookup_elem(&connecting_owners, &cookie);
		if (connecting) {
			connecting->pid = bpf_get_current_pid_tgid() >> 32;
			connecting->fd = fd;
			connecting->cgroup = bpf_get_current_cgroup_id();
		}
		return;
	}
	/* Once per owner, and only while keys are awaited: an app calling
	 * connect() in a loop on its socket (EISCONN, EALREADY) would
	 * otherwise fill the node-wide ring buffer, and other connections'
	 * events would be lost. */
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (c->gate != TLSHUB_GATE_CLOSED || (c->owner_pid == tgid && c->owner_fd == fd))
		return;
	__u64 cgroup = bpf_get_current_cgroup_id();
	c->owner_pid = tgid;
	c->owner_fd = fd;
	c->owner_cgroup = cgroup;

	struct tlshub_event ev = {
		.kind = TLSHUB_EV_OWNER,
		.role = c->role,
		.cookie = cookie,
		.pid = tgid,
		.fd = fd,
		.cgroup = cgroup,
	};
	emit(&ev);
}

/* Why fexit on the syscall entry points rather than the syscall
 * tracepoints: a tracepoint attaches through perf_event_open, which Debian's
 * kernel.perf_event_paranoid=3 allows only with CAP_SYS_ADMIN; an fexit
 * program attaches as a bpf_link with CAP_BPF and CAP_PERFMON alone. It sees
 * the arguments and the return value together, so connect() needs no map
 * carrying its fd from entry to exit. Why the entry points and not
 * __sys_connect/__sys_accept4: those may be inlined into their callers in
 * net/socket.c (an fexit on the out-of-line copy would then never fire);
 * the entry points are called by the syscall dispatcher, which lives in
 * another compilation unit. Like the syscall tracepoints, they do not see
 * io_uring's connect and accept. */
/* Why connect() reports its owner whatever it returns: a blocking
 * connect() that a stop signal interrupts returns -ERESTARTSYS here, and
 * the gate sends exactly such a signal (SIGSTOP stops every thread of the
 * process) when another connection of the same process waits for keys. The
 * socket keeps connecting meanwhile, but its owner would otherwise be known
 * only when the restarted call returns, after the process is continued: its
 * client handshake could not start, the peer's provider waited for it in
 * vain, and the next connections of the process met the same fate (a chain
 * of timeouts, one key timeout apart, seen after restarts under load).
 * report_owner acts only on sockets the connect callback selected, so a
 * connect() that failed for good reports nothing: its socket left conns. */
SEC("fexit/__x64_sys_connect")
int BPF_PROG(tlshub_exit_connect, const struct pt_regs *regs, long ret)
{
	__u32 *may_select =
		bpf_task_storage_get(&selected_connects, bpf_get_current_task_btf(), 0, 0);
	if (!may_select || !*may_select)
		return 0;
	*may_select = 0;
	report_owner((int)BPF_CORE_READ(regs, di));
	return 0;
}

/* Whether an accept() may have dequeued a selected connection (see
 * passive_selected_ns). */
static __always_inline int accept_may_select(void)
{
	__u32 zero = 0;
	__u64 *passive = bpf_map_lookup_elem(&passive_selected_ns, &zero);
	return passive && *passive &&
	       bpf_ktime_get_ns() - *passive < TLSHUB_ACCEPT_WALK_WINDOW_NS;
}

SEC("fexit/__x64_sys_accept4")
int BPF_PROG(tlshub_exit_accept4, const struct pt_regs *regs, long ret)
{
	if (ret >= 0 && accept_may_select())
		report_owner((int)ret);
	return 0;
}

SEC("fexit/__x64_sys_accept")
int BPF_PROG(tlshub_exit_accept, const struct pt_regs *regs, long ret)
{
	if (ret >= 0 && accept_may_select())
		report_owner((int)ret);
	return 0;
}

/* ---- the gate ---- */

/* Whether the socket has the tls ULP (kTLS installed or being installed). */
static __always_inline int has_tls_ulp(struct sock *sk)
{
	const struct tcp_ulp_ops *ops =
		BPF_CORE_READ((struct inet_connection_sock *)sk, icsk_ulp_ops);
	char name[4] = {};
	if (!ops || bpf_probe_read_kernel(name, sizeof(name), &ops->name))
		return 0;
	return name[0] == 't' && name[1] == 'l' && name[2] == 's' && name[3] == 0;
}

static __always_inline int exempt_process(__u32 tgid);

/* Whether the core's kTLS installation is complete: the socket's receive
 * method is kTLS's. kTLS swaps sk_prot when each direction's keys go in;
 * the core installs TX first and RX last, and nobody else may install
 * kTLS on a gated socket (see the setsockopt hook), so kTLS's recvmsg
 * means both directions are on.
 *
 * Why the gate needs it: installing RX wakes a reader that waits for a
 * full record already queued, from inside the TLS_RX setsockopt, before
 * the core can open the gate. A non-blocking reader that wakes then and is
 * told EAGAIN again gets no second wakeup (kTLS signals a parsed record
 * once). So a closed gate counts as open from the moment kTLS is on.
 *
 * Why the exact method and not "other than TCP's": a socket in a sockmap
 * (another BPF user, such as a sidecar accelerator) has TCP's methods
 * replaced already, and the tls ULP alone, before any key, would then
 * look like kTLS and open the gate to plaintext sends. The address of
 * tls_sw_recvmsg is learned from the first socket the core installed
 * (learn_ktls_recvmsg()); until then this says no, which only leaves that
 * reader's race open. */
static __always_inline int ktls_on(struct sock *sk)
{
	__u32 zero = 0;
	__u64 *known = bpf_map_lookup_elem(&ktls_recvmsg, &zero);
	if (!known || !*known)
		return 0;
	struct proto *prot = BPF_CORE_READ(sk, __sk_common.skc_prot);
	return prot && (__u64)BPF_CORE_READ(prot, recvmsg) == *known;
}

/* The upper-layer protocol's state of a socket (icsk_ulp_data): kTLS's
 * struct tls_context once the tls ULP is on it. Callers check the ULP
 * first (has_tls_ulp() or ktls_on()). */
static __always_inline struct tls_context *ulp_context(struct sock *sk)
{
	return BPF_CORE_READ((struct inet_connection_sock *)sk, icsk_ulp_data);
}

/* Whether both directions of kTLS are installed on sk (software kTLS each
 * way), read from kTLS's own state rather than its receive method, so that
 * it needs nothing learned first. Only the core can have put them there:
 * kTLS takes only connected sockets, which are marked by then, and the
 * setsockopt hook refuses TCP_ULP and SOL_TLS on a marked socket to
 * everyone but exempt processes. A socket whose RX key failed after TX
 * (the terminal state) does not count. */
static __always_inline int ktls_keyed(struct sock *sk)
{
	if (!has_tls_ulp(sk))
		return 0;
	struct tls_context *ctx = ulp_context(sk);
	if (!ctx)
		return 0;
	return BPF_CORE_READ_BITFIELD_PROBED(ctx, tx_conf) == TLS_SW &&
	       BPF_CORE_READ_BITFIELD_PROBED(ctx, rx_conf) == TLS_SW;
}

/* The core asks `getsockopt(SOL_TLS, TLS_RX)` on each socket right after
 * it installed kTLS on it: the first time, the socket's receive method
 * (kTLS's) is recorded for ktls_on(). Only exempt callers (the core, the
 * providers) and sockets with the tls ULP count. */
static __always_inline void learn_ktls_recvmsg(struct sock *sk)
{
	__u32 zero = 0;
	__u64 *known = bpf_map_lookup_elem(&ktls_recvmsg, &zero);
	if (!known || *known || !has_tls_ulp(sk))
		return;
	if (!exempt_process(bpf_get_current_pid_tgid() >> 32))
		return;
	struct proto *prot = BPF_CORE_READ(sk, __sk_common.skc_prot);
	if (prot)
		*known = (__u64)BPF_CORE_READ(prot, recvmsg);
}

/* Whether the calling process is the one the core exempted under this
 * pid: the entry holds the process's start time (/proc/PID/stat field 22,
 * USER_HZ ticks since boot, from the group leader's start_boottime), so a
 * later process that gets the pid of an exited provider is held like any
 * other. */
static __always_inline int exempt_process(__u32 tgid)
{
	__u64 *start = bpf_map_lookup_elem(&exempt, &tgid);
	if (!start)
		return 0;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u64 boot_ns = BPF_CORE_READ(task, group_leader, start_boottime);
	return boot_ns / TLSHUB_NS_PER_USER_HZ_TICK == *start;
}

/* Whether no core is alive: it never beat, or its last heartbeat is older
 * than the grace. The heartbeat is read once, before the clock: the core
 * writes it concurrently, and a heartbeat written after the clock was read
 * is newer than "now"; subtracting it would wrap around to a huge age and
 * fail a live core's connections (a level-triggered event loop retrying
 * on EAGAIN calls the gate often enough to hit that window). */
static __always_inline int core_gone(struct tlshub_control *ctl)
{
	__u64 beat = *(volatile __u64 *)&ctl->heartbeat_ns;
	if (beat == 0)
		return 1;
	__u64 now = bpf_ktime_get_ns();
	return now > beat && now - beat > ctl->grace_ns;
}

/* Stops the calling process (a hold) and reports it as `ev` (its pid is
 * the caller's tgid); if the ring buffer is full, the hold goes into the
 * `held` map instead, where the core's sweep finds it. Counted in `stat`.
 * The call restarts once the core continues the process.
 *
 * The order is the contract with the core. A HELD event is committed only
 * after the SIGSTOP is queued: the slot is reserved first, the signal is
 * sent (in process context, as every hook that holds runs, the helper
 * queues it before it returns), and the slot is submitted last. So any
 * SIGCONT the core sends for the event comes after the stop is queued and
 * either cancels it (the kernel removes pending stop signals when SIGCONT
 * is sent) or wakes the stopped process; the core needs no look at
 * /proc to know the stop was taken. The `held` map fallback is written
 * before the signal (an update can fail, and a stop recorded nowhere
 * would never end), so the core continues such a hold only once it sees
 * the process stopped.
 *
 * If the `held` map is full too, a stopped process would be recorded
 * nowhere and nobody would continue it: the call fails with EINTR instead
 * and nobody is stopped (counted). No byte moved, and an app retries an
 * interrupted call (Rust's and Go's I/O do by themselves) until the core
 * has caught up and a hold can be recorded again. */
static __always_inline int stop_caller(struct tlshub_event *ev, __u32 stat)
{
	struct tlshub_event *slot = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);
	if (slot) {
		__builtin_memcpy(slot, ev, sizeof(*ev));
		stat_inc(stat);
		bpf_send_signal_thread(SIGSTOP);
		bpf_ringbuf_submit(slot, BPF_RB_FORCE_WAKEUP);
		return -ERESTARTSYS;
	}
	stat_inc(TLSHUB_STAT_RINGBUF_DROPS);
	struct tlshub_held h = { .cookie = ev->cookie, .since_ns = ev->ts_ns };
	__u32 tgid = ev->pid;
	/* Replacing this process's own entry always succeeds: a full
	 * preallocated hash map keeps spare elements for updates. */
	if (bpf_map_update_elem(&held, &tgid, &h, BPF_ANY)) {
		stat_inc(TLSHUB_STAT_HOLD_UNRECORDED);
		return -EINTR;
	}
	stat_inc(stat);
	bpf_send_signal_thread(SIGSTOP);
	return -ERESTARTSYS;
}

/* What the gate does with a call on a connection whose gate is closed:
 *
 * - A non-blocking socket (O_NONBLOCK on its file, as event loops set it)
 *   is answered EAGAIN and nobody is stopped: the app waits for readiness
 *   as for any socket. The first such answer per connection is reported
 *   (WAITING event) so the core can find the socket in that process if it
 *   knows no owner. The core wakes waiting writers after it opens the gate
 *   (kTLS installation does not); readers are woken by kTLS itself when a
 *   record is ready, and ktls_on() makes sure they find the gate open.
 *
 * - Any other call holds the calling process: it is reported (HELD
 *   event), its thread group is stopped with SIGSTOP and the system call
 *   restarts (-ERESTARTSYS) once it is continued, so the same call runs
 *   again after the keys are in and no byte moved in between.
 *
 * Why nothing stays stopped: the core learns of every hold from the HELD
 * event (or, if the ring buffer is full, from the `held` map written here
 * instead) and continues the process once its connection is no longer
 * pending; stop_caller() orders the signal and the report so that the
 * continue can never come before the stop. */
static __always_inline int gate(struct sock *sk, struct tlshub_sk_mark *mark, int nonblock)
{
	__u64 cookie = mark->cookie;
	struct tlshub_conn *c = bpf_map_lookup_elem(&conns, &cookie);
	if (c) {
		/* Terminal: the connection could not be protected and could
		 * not be reset either (its socket was out of the core's reach,
		 * or kTLS was partly installed and the kernel refuses to
		 * disconnect a socket with the tls ULP). Every call fails, no
		 * process is stopped, and nothing moves until the app closes
		 * the socket. Exempt processes too: no provider has business on
		 * such a socket. */
		if (c->gate == TLSHUB_GATE_RESET)
			return -ECONNRESET;
		if (c->gate != TLSHUB_GATE_CLOSED || ktls_on(sk))
			return 0;
	} else if (!(mark->flags & TLSHUB_MARK_CONNECTING) ||
		   sk->__sk_common.skc_state == TCP_CLOSE) {
		/* Marked but no longer tracked: the connection ended (TCP_CLOSE:
		 * both FINs exchanged, the peer reset it, or its connect failed)
		 * before the core opened its gate, which clears the mark's
		 * cookie before it removes the entry. If kTLS is on both ways,
		 * the connection was keyed and went on through kTLS (the gate
		 * lets a socket with kTLS on through before the core opens it)
		 * faster than the core came to open it: what is left is kTLS's
		 * to deliver (the data, the end of the stream). Under a burst of
		 * keying, an app that read after its peer's FIN was failed with
		 * ECONNRESET here (burst_beyond_the_open_files_soft_limit).
		 * Otherwise what is in its receive queue is the peer's handshake
		 * or records, never for the app: fail every call. */
		if (ktls_keyed(sk))
			return 0;
		return -ECONNRESET;
	}
	/* Otherwise still connecting (no entry until the peer answers, see
	 * track_connecting()): the gate is closed. */
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (exempt_process(tgid))
		return 0;
	/* No core (it stopped and its heartbeat is older than the grace, or
	 * `tlshub-core release` ran): holding would stop the process with
	 * nobody to continue it, so apply the failure policy here instead. */
	__u32 zero = 0;
	struct tlshub_control *ctl = bpf_map_lookup_elem(&control, &zero);
	if (ctl && ctl->no_core != TLSHUB_NO_CORE_HOLD && core_gone(ctl)) {
		stat_inc(TLSHUB_STAT_NO_CORE_REFUSALS);
		return ctl->no_core == TLSHUB_NO_CORE_PASS ? 0 : -ECONNRESET;
	}
	if (nonblock && !c) {
		/* TCP's own answer in SYN_SENT, and TCP's own wakeup follows
		 * when the peer answers; by then the socket has its entry. */
		return -EAGAIN;
	}
	if (nonblock && c) {
		stat_inc(TLSHUB_STAT_GATE_EAGAIN);
		/* Once per connection (a level-triggered loop retries thousands
		 * of times a second); two threads racing here report twice,
		 * which the core tolerates. */
		if (!c->waiting_pid) {
			c->waiting_pid = tgid;
			struct tlshub_event wait = {
				.kind = TLSHUB_EV_WAITING,
				.role = c->role,
				.cookie = cookie,
				.pid = tgid,
				.cgroup = bpf_get_current_cgroup_id(),
			};
			emit(&wait);
		}
		return -EAGAIN;
	}
	struct tlshub_event ev = {
		.kind = TLSHUB_EV_HELD,
		.role = TLSHUB_ROLE_CLIENT,
		.cookie = cookie,
		.pid = tgid,
		.ts_ns = bpf_ktime_get_ns(),
		.cgroup = bpf_get_current_cgroup_id(),
	};
	if (c) {
		ev.role = c->role;
	} else {
		/* A blocking call on a connecting socket waits, as it would in
		 * TCP, but stopped: the core keeps the process stopped until the
		 * peer answers (then keys it as usual) or the connect ends
		 * (CLOSED, see the sockops program). Why not make the entry
		 * here: an update of conns from this hook can race the peer's
		 * answer on the same CPU, whose update in the sockops program
		 * then fails with EBUSY (the hash map's per-CPU lock guard),
		 * which would refuse the connection. */
		ev.kind = TLSHUB_EV_HELD_CONNECTING;
		mark->flags |= TLSHUB_MARK_HELD_CONNECTING;
	}
	return stop_caller(&ev, TLSHUB_STAT_GATE_STOPS);
}

/* The gate for a socket's mark: refused for good (conns was full, or
 * repair mode; see track()), the connection's gate, or nothing (a mark
 * with no cookie is a repair-mode socket that was never selected). */
static __always_inline int gate_mark(struct sock *sk, struct tlshub_sk_mark *mark, int nonblock)
{
	if (mark->flags & TLSHUB_MARK_REFUSED)
		return -ECONNRESET;
	if (!mark->cookie)
		return 0;
	return gate(sk, mark, nonblock);
}

/* Whether the app made this socket non-blocking (an event loop's socket):
 * then the gate answers EAGAIN instead of stopping it. Only the file's
 * flag counts, not a call's MSG_DONTWAIT: io_uring issues every request
 * on a blocking socket with MSG_DONTWAIT first and, told EAGAIN, polls and
 * retries, which would spin for as long as the gate is closed. */
static __always_inline int socket_nonblocking(struct socket *sock)
{
	struct file *file = sock->file;
	return file && (file->f_flags & O_NONBLOCK);
}

/* The gate for a socket without a mark: a selected one whose mark could
 * not be created (see track()) is refused; any other passes. One array
 * read while no such socket exists. */
static __always_inline int gate_unmarked(struct sock *sk)
{
	__u32 zero = 0;
	__u64 *unmarked = bpf_map_lookup_elem(&unmarked_conns, &zero);
	if (!unmarked || !*unmarked)
		return 0;
	__u64 cookie = BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);
	if (!cookie)
		return 0;
	struct tlshub_conn *c = bpf_map_lookup_elem(&conns, &cookie);
	if (c && (c->flags & TLSHUB_CONN_UNMARKED)) {
		/* A real branch: folded into branchless arithmetic (what clang
		 * does with the plain condition), the return value has no range
		 * the 6.12 verifier accepts for an LSM program ([-4095, 0]). */
		asm volatile("" ::: "memory");
		return -ECONNRESET;
	}
	return 0;
}

/* The gate for socket `sk` whose mark (possibly none) was looked up. */
static __always_inline int gate_sk(struct sock *sk, struct tlshub_sk_mark *mark, int nonblock)
{
	if (!mark)
		return gate_unmarked(sk);
	return gate_mark(sk, mark, nonblock);
}

static __always_inline int gate_socket(struct socket *sock, int nonblock)
{
	if (!sock)
		return 0;
	struct sock *sk = sock->sk;
	if (!sk)
		return 0;
	return gate_sk(sk, bpf_sk_storage_get(&sk_marks, sk, 0, 0), nonblock);
}

/* The destination in a sockaddr the kernel copied from the app (connect(),
 * sendto()) into ev: remote address (v4-mapped) and port. Returns 0 for
 * any family but AF_INET and AF_INET6 (AF_UNSPEC disconnects). The
 * kernel's copy is a sockaddr_storage, so reading a whole sockaddr_in6
 * stays inside it whatever length the app passed. */
static __always_inline int dest_from_sockaddr(void *name, struct tlshub_event *ev)
{
	unsigned short dfam = 0;

	if (!name || bpf_probe_read_kernel(&dfam, sizeof(dfam), name))
		return 0;
	if (dfam == AF_INET) {
		struct sockaddr_in sin;
		if (bpf_probe_read_kernel(&sin, sizeof(sin), name))
			return 0;
		v4_mapped(ev->remote_addr, sin.sin_addr);
		ev->remote_port = bpf_ntohs(sin.sin_port);
		return 1;
	}
	if (dfam == AF_INET6) {
		struct sockaddr_in6 sin6;
		if (bpf_probe_read_kernel(&sin6, sizeof(sin6), name))
			return 0;
		__builtin_memcpy(ev->remote_addr, sin6.sin6_addr, 16);
		ev->remote_port = bpf_ntohs(sin6.sin6_port);
		return 1;
	}
	return 0;
}

/* The address socket sk is bound to into ev's local address (unspecified
 * if none: selected() counts that as one of this node's pods). */
static __always_inline void local_from_sk(struct sock *sk, unsigned short family,
					  struct tlshub_event *ev)
{
	if (family == AF_INET)
		v4_mapped(ev->local_addr, sk->__sk_common.skc_rcv_saddr);
	else
		bpf_probe_read_kernel(ev->local_addr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
}

/* TCP Fast Open would put data on the wire before the gate can hold it:
 * sendto(MSG_FASTOPEN) on an unconnected socket queues its data in the
 * same call that connects (in the SYN with a cached cookie, right after
 * the handshake without one), and a socket whose connect() was deferred by
 * TCP_FASTOPEN_CONNECT (a cookie was cached) sends its first write in the
 * SYN. Both pass this hook before TCP_CONNECT_CB can select and mark the
 * socket. So an unmarked socket's send that is about to connect, to a
 * destination the policy selects, is refused with EOPNOTSUPP: what the
 * kernel answers when client Fast Open is off, so an app that uses Fast
 * Open falls back to connect() and send(), which the gate covers.
 *
 * Which sends are about to connect: MSG_FASTOPEN on a socket in TCP_CLOSE
 * (the destination is the message's address; the local one is unknown
 * unless the socket was bound, and counts as selected), and any send on a
 * socket in SYN_SENT that is not marked (a connect() that was not deferred
 * passed TCP_CONNECT_CB, which marks a selected socket; an unmarked one in
 * SYN_SENT to a selected destination is a deferred Fast Open connect). */
static __always_inline int fastopen_refused(struct sock *sk, struct msghdr *msg)
{
	struct tlshub_event ev = {};

	if (!sk)
		return 0;
	unsigned char state = sk->__sk_common.skc_state;
	unsigned short family = sk->__sk_common.skc_family;

	if ((sk->sk_protocol != IPPROTO_TCP && sk->sk_protocol != IPPROTO_MPTCP) ||
	    (family != AF_INET && family != AF_INET6))
		return 0;
	if (state == TCP_CLOSE && (msg->msg_flags & MSG_FASTOPEN)) {
		if (!dest_from_sockaddr(msg->msg_name, &ev))
			return 0;
		local_from_sk(sk, family, &ev);
	} else if (state == TCP_SYN_SENT) {
		if (family == AF_INET) {
			v4_mapped(ev.local_addr, sk->__sk_common.skc_rcv_saddr);
			v4_mapped(ev.remote_addr, sk->__sk_common.skc_daddr);
		} else {
			bpf_probe_read_kernel(ev.local_addr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
			bpf_probe_read_kernel(ev.remote_addr, 16, &sk->__sk_common.skc_v6_daddr);
		}
		ev.remote_port = bpf_ntohs(sk->__sk_common.skc_dport);
	} else {
		return 0;
	}
	ev.family = AF_INET6; /* addresses are v4-mapped or v6 from here on */
	if (!selected(&ev, TLSHUB_ROLE_CLIENT))
		return 0;
	stat_inc(TLSHUB_STAT_FASTOPEN_REFUSED);
	return -EOPNOTSUPP;
}

/* A send on an unconnected TCP socket (TCP_CLOSE) fails inside TCP: with
 * the socket's pending error, else EPIPE and SIGPIPE. But the socket hooks
 * run before TCP takes the socket lock, and the mark is made inside
 * connect() under that lock: if another thread's connect() to a selected
 * peer takes the lock between this hook and TCP, the send finds the
 * socket connecting, waits for the handshake and goes out in clear, past
 * a gate that saw no mark. So the gate gives such a send TCP's own answer
 * here, as if it had come before the connect() (a valid order of two
 * racing calls). Fast Open sends (refused above, or passed to an
 * unselected peer) and repair mode (CRIU fills an unconnected socket's
 * queues) keep TCP's path; so do errors other than the usual ones below
 * (the verifier needs each answer's value), which only a socket whose
 * last connect failed in an unusual way carries. Unlike TCP, the pending
 * error is not cleared. */
static __always_inline int unconnected_send(struct sock *sk, struct tlshub_sk_mark *mark,
					    unsigned int flags)
{
	unsigned short family = sk->__sk_common.skc_family;

	if (sk->__sk_common.skc_state != TCP_CLOSE || sk->sk_protocol != IPPROTO_TCP ||
	    (family != AF_INET && family != AF_INET6) || (flags & MSG_FASTOPEN) ||
	    (mark && (mark->flags & TLSHUB_MARK_REPAIR)))
		return 0;
	switch (BPF_CORE_READ(sk, sk_err)) {
	case 0:
		break;
	case ECONNREFUSED:
		return -ECONNREFUSED;
	case ECONNRESET:
		return -ECONNRESET;
	case ETIMEDOUT:
		return -ETIMEDOUT;
	case EHOSTUNREACH:
		return -EHOSTUNREACH;
	case ENETUNREACH:
		return -ENETUNREACH;
	case ECONNABORTED:
		return -ECONNABORTED;
	case EPIPE:
		return -EPIPE;
	default:
		return 0;
	}
	if (!(flags & MSG_NOSIGNAL))
		bpf_send_signal_thread(SIGPIPE);
	return -EPIPE;
}

/* The mark of a socket that connects to a selected peer is made here,
 * before connect() starts, rather than at TCP_CONNECT_CB. The mark is
 * socket-local storage, charged to the socket's option memory
 * (net.core.optmem_max), which an app can fill first (TCP_MD5SIG keys, a
 * socket filter); a socket with no room for it is refused here with
 * ENOBUFS (no buffer space: the app sees its connect() fail before any
 * byte moved). Made at TCP_CONNECT_CB, the mark could only be missing, and
 * the socket was then tracked by its cookie alone (see track_unmarked()):
 * that takes a conns entry while it connects, and with conns full it is
 * impossible, so the socket went out in clear. Which destinations: those
 * the policy selects, an unbound socket's local address counting as one
 * of this node's pods (the route picks it later), so the mark is made for
 * every socket TCP_CONNECT_CB can select. Every way to connect() passes
 * this hook (the system call, its 32-bit entry, io_uring); Fast Open's
 * sendto() does not, and is refused for selected destinations (see
 * fastopen_refused()). */
SEC("lsm/socket_connect")
int BPF_PROG(tlshub_gate_connect, struct socket *sock, struct sockaddr *address, int addrlen,
	     int ret)
{
	if (ret)
		return ret;
	struct sock *sk = sock->sk;
	if (!sk || (sk->sk_protocol != IPPROTO_TCP && sk->sk_protocol != IPPROTO_MPTCP))
		return 0;
	unsigned short family = sk->__sk_common.skc_family;
	if (family != AF_INET && family != AF_INET6)
		return 0;
	struct tlshub_event ev = {};
	if (!dest_from_sockaddr(address, &ev))
		return 0;
	local_from_sk(sk, family, &ev);
	ev.family = AF_INET6; /* addresses are v4-mapped or v6 */
	if (!selected(&ev, TLSHUB_ROLE_CLIENT))
		return 0;
	if (sk->sk_protocol == IPPROTO_MPTCP) {
		/* Never protectable (see mptcp_subflow_refused()): refused
		 * before any packet, so an app that falls back to TCP on an
		 * MPTCP error (Go's dialer does) gets a protected connection. */
		stat_inc(TLSHUB_STAT_MPTCP_REFUSED);
		return -EOPNOTSUPP;
	}
	/* For the connect fexit (see selected_connects). */
	__u32 *may_select = bpf_task_storage_get(&selected_connects, bpf_get_current_task_btf(), 0,
						 BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (may_select)
		*may_select = 1;
	if (bpf_sk_storage_get(&sk_marks, sk, 0, BPF_SK_STORAGE_GET_F_CREATE))
		return 0;
	stat_inc(TLSHUB_STAT_UNMARKED_REFUSED);
	return -ENOBUFS;
}

/* An MPTCP listener on a port some rule selects, on one of this node's pod
 * addresses (or all of them), is refused with EOPNOTSUPP: its MPTCP
 * connections could never be protected (see mptcp_subflow_refused()),
 * while a TCP listener in its place serves MPTCP clients too (they fall
 * back to TCP). Go's net package falls back to a TCP listener on any MPTCP
 * error, so such a server keeps working, and a client from a node without
 * tlshub is judged by the policy like any TCP client (plain under an
 * opportunistic rule) instead of being reset by the subflow backstop. A
 * listener not yet bound (port 0, picked by listen()) is refused only
 * where a rule selects every port. */
SEC("lsm/socket_listen")
int BPF_PROG(tlshub_gate_listen, struct socket *sock, int backlog, int ret)
{
	if (ret)
		return ret;
	struct sock *sk = sock->sk;
	if (!sk || sk->sk_protocol != IPPROTO_MPTCP)
		return 0;
	unsigned short family = sk->__sk_common.skc_family;
	if (family != AF_INET && family != AF_INET6)
		return 0;
	if (!rule_selects_port(TLSHUB_LISTEN_RULE, sk->__sk_common.skc_num))
		return 0;
	struct tlshub_event ev = {};
	local_from_sk(sk, family, &ev);
	if (!local_selectable(ev.local_addr))
		return 0;
	stat_inc(TLSHUB_STAT_MPTCP_REFUSED);
	return -EOPNOTSUPP;
}

SEC("lsm/socket_sendmsg")
int BPF_PROG(tlshub_gate_sendmsg, struct socket *sock, struct msghdr *msg, int size, int ret)
{
	if (ret)
		return ret;
	struct sock *sk = sock->sk;
	if (!sk)
		return 0;
	struct tlshub_sk_mark *mark = bpf_sk_storage_get(&sk_marks, sk, 0, 0);
	if (mark_gates(mark))
		return gate_mark(sk, mark, socket_nonblocking(sock));
	if (!mark) {
		int unmarked = gate_unmarked(sk);
		if (unmarked)
			return unmarked;
	}
	int fastopen = fastopen_refused(sk, msg);
	if (fastopen)
		return fastopen;
	return unconnected_send(sk, mark, msg->msg_flags);
}

SEC("lsm/socket_recvmsg")
int BPF_PROG(tlshub_gate_recvmsg, struct socket *sock, void *msg, int size, int flags, int ret)
{
	if (ret)
		return ret;
	return gate_socket(sock, socket_nonblocking(sock));
}

/* read()/write() and friends, sendfile() and splice() on socket files.
 * bpf_sock_from_file() reaches the socket (and so its socket-local mark)
 * from any socket file, in whichever process holds it, however it got
 * there: connect()/accept() through io_uring or the 32-bit entry points,
 * fd passing, fork. The mode check first keeps the cost for every other
 * file at one load and compare. */
SEC("lsm/file_permission")
int BPF_PROG(tlshub_gate_file, struct file *file, int mask, int ret)
{
	if (ret)
		return ret;
	struct inode *inode = file->f_inode;
	if (!inode || (inode->i_mode & S_IFMT) != S_IFSOCK)
		return 0;
	if (!(mask & (MAY_READ | MAY_WRITE)))
		return 0;
	struct socket *sock = bpf_sock_from_file(file);
	if (!sock)
		return 0;
	struct sock *sk = sock->sk;
	if (!sk)
		return 0;
	/* One lookup of the mark for the gate and the unconnected check. */
	struct tlshub_sk_mark *mark = bpf_sk_storage_get(&sk_marks, sk, 0, 0);
	int gated = gate_sk(sk, mark, file->f_flags & O_NONBLOCK);
	if (gated || !(mask & MAY_WRITE) || mark_gates(mark))
		return gated;
	/* write(), sendfile() and splice() to a socket that is not
	 * connected: see unconnected_send() (no flags: TCP raises SIGPIPE). */
	return unconnected_send(sk, mark, 0);
}

/* Whether kTLS holds an encrypted record that TCP took only part of, or
 * none of. kTLS accepts a write once the record is encrypted and pushes it
 * into TCP; when TCP runs out of room in the middle of a record, the rest
 * waits in kTLS's own queue (partially_sent_record, with any records
 * after it) until TCP's buffer drains, and the write has already returned.
 * TCP's shutdown() knows nothing of that queue: its FIN goes after what TCP
 * holds, kTLS's later push fails with EPIPE, and the peer reads a short
 * stream. (kTLS pushes records strictly in order, so a waiting record
 * sets partially_sent_record.) This hook runs before shutdown() takes
 * the socket lock, while kTLS may be pushing under it (its write work,
 * once TCP's buffer drained): tls_push_partial_record() clears
 * partially_sent_record before it hands the record to TCP and sets it
 * again only if TCP still has no room, so that field alone can read
 * empty while records wait. The software transmit state's tx_list holds
 * every record from its encryption until TCP has taken all of it (an
 * open record, still being filled with MSG_MORE, is not in it), so a
 * non-empty tx_list counts too. The fields are found through vmlinux
 * BTF; without them nothing is held. */
static __always_inline int ktls_unsent(struct tls_context *ctx)
{
	if (!bpf_core_field_exists(((struct tls_context *)0)->partially_sent_record))
		return 0;
	if (BPF_CORE_READ(ctx, partially_sent_record))
		return 1;
	if (!bpf_core_field_exists(((struct tls_sw_context_tx *)0)->tx_list) ||
	    BPF_CORE_READ_BITFIELD_PROBED(ctx, tx_conf) != TLS_SW)
		return 0;
	struct tls_sw_context_tx *sw = BPF_CORE_READ(ctx, priv_ctx_tx);
	if (!sw)
		return 0;
	struct list_head *head =
		(void *)sw + bpf_core_field_offset(struct tls_sw_context_tx, tx_list);
	return BPF_CORE_READ(sw, tx_list.next) != head;
}

/* Whether kTLS's open record holds bytes: writes with MSG_MORE fill a
 * record that only a write without MSG_MORE (or a full record) closes,
 * encrypts and sends. TCP's shutdown() knows nothing of it either, so its
 * FIN would go first and the peer would read a short stream, where plain
 * TCP sends corked bytes with the FIN. Nothing in the kernel closes it
 * short of a write, so the core does (a write of nothing with a record
 * type, which closes the open record first; see OPEN_RECORD_HELD). */
static __always_inline int ktls_open_record(struct tls_context *ctx)
{
	if (!bpf_core_field_exists(((struct tls_context *)0)->pending_open_record_frags))
		return 0;
	return BPF_CORE_READ(ctx, pending_open_record_frags) != 0;
}

/* Holds the caller until kTLS's records are in TCP (see ktls_unsent()
 * and ktls_open_record()): stopped like the gate's hold, reported as
 * UNSENT_HELD or OPEN_RECORD_HELD (or in the `held` map if the ring buffer
 * is full), and continued by the core's next sweep; the restarted call
 * looks again. kTLS pushes waiting records by itself as TCP's buffer
 * drains; an open record the core closes. Bounded per socket: once its
 * first such hold is TLSHUB_UNSENT_HOLD_MAX_MS old (the peer stopped
 * reading), the call passes, as it would without tlshub. Without a core
 * nobody would continue the process, so the call passes too. */
static __always_inline int hold_until_sent(struct sock *sk, struct tlshub_sk_mark *mark,
					   __u32 kind, __u32 stat)
{
	__u32 zero = 0;
	struct tlshub_control *ctl = bpf_map_lookup_elem(&control, &zero);
	if (!ctl || core_gone(ctl))
		return 0;
	__u64 now_ns = bpf_ktime_get_ns();
	/* Milliseconds in 32 bits wrap every 49 days; the unsigned difference
	 * is still the elapsed time. The low bit keeps 0 meaning "never". */
	__u32 now_ms = (__u32)(now_ns / 1000000ULL) | 1;
	if (!mark->unsent_since_ms) {
		mark->unsent_since_ms = now_ms;
	} else if (now_ms - mark->unsent_since_ms > TLSHUB_UNSENT_HOLD_MAX_MS) {
		stat_inc(TLSHUB_STAT_UNSENT_EXPIRED);
		return 0;
	}
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct tlshub_event ev = {
		.kind = kind,
		.cookie = BPF_CORE_READ(sk, __sk_common.skc_cookie.counter),
		.pid = tgid,
		.ts_ns = now_ns,
	};
	return stop_caller(&ev, stat);
}

/* A shutdown() that sends a FIN on a keyed socket waits for kTLS's
 * records: an open one first (the core closes it), then those waiting for
 * TCP's buffer. */
static __always_inline int hold_for_records(struct sock *sk, struct tlshub_sk_mark *mark)
{
	if (!ktls_on(sk))
		return 0;
	struct tls_context *ctx = ulp_context(sk);
	if (!ctx)
		return 0;
	if (ktls_open_record(ctx))
		return hold_until_sent(sk, mark, TLSHUB_EV_OPEN_RECORD_HELD,
				       TLSHUB_STAT_OPEN_RECORD_HOLDS);
	if (ktls_unsent(ctx))
		return hold_until_sent(sk, mark, TLSHUB_EV_UNSENT_HELD, TLSHUB_STAT_UNSENT_HOLDS);
	return 0;
}

/* shutdown() before keys would send a FIN that ends the connection the
 * providers are about to key (the peer's socket goes to CLOSE_WAIT, where
 * the kernel refuses the tls ULP), so it is held like a send. Held even
 * on a non-blocking socket: shutdown() has no EAGAIN that apps expect.
 * After keys, a shutdown() that sends a FIN waits for kTLS's records
 * (hold_for_records()). */
SEC("lsm/socket_shutdown")
int BPF_PROG(tlshub_gate_shutdown, struct socket *sock, int how, int ret)
{
	if (ret)
		return ret;
	struct sock *sk = sock->sk;
	if (!sk)
		return 0;
	struct tlshub_sk_mark *mark = bpf_sk_storage_get(&sk_marks, sk, 0, 0);
	if (!mark)
		return 0;
	if (!mark_gates(mark)) {
		/* SHUT_RD sends no FIN. Only sockets the core keyed. */
		if (how != SHUT_RD && (mark->flags & TLSHUB_MARK_OPEN))
			return hold_for_records(sk, mark);
		return 0;
	}
	/* The core's shutdown() of a connection it could not reset runs after
	 * it set the terminal state, which refuses everyone else. */
	if (exempt_process(bpf_get_current_pid_tgid() >> 32))
		return 0;
	return gate_mark(sk, mark, 0);
}

/* A peer's FIN that arrives before this side's keys are in would put the socket
 * in CLOSE_WAIT, and tls_init() accepts only ESTABLISHED sockets: the
 * install would fail with ENOTCONN and the connection be reset, losing
 * the request a client wrote just before it half-closed (`nc -N`, HTTP/1.0
 * clients). So while a selected socket's gate is closed, an arriving
 * segment with FIN is dropped before TCP sees it; the peer retransmits it
 * (tail loss probe, then RTO, at least 200 ms) and the retransmission finds
 * the keys in. Data before the FIN in the same segment comes again with
 * it. Segments without FIN, and every other socket, pass untouched. */
SEC("cgroup_skb/ingress")
int tlshub_defer_fin(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	if (!sk)
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk || sk->protocol != IPPROTO_TCP)
		return 1;
	struct tlshub_sk_mark *mark = bpf_sk_storage_get(&sk_marks, sk, 0, 0);
	if (!mark || !mark->cookie)
		return 1;
	struct tlshub_conn *c = bpf_map_lookup_elem(&conns, &mark->cookie);
	if (!c || c->gate != TLSHUB_GATE_CLOSED)
		return 1;
	/* skb data starts at the network header here. */
	__u32 tcp_off;
	__u8 b;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		if (bpf_skb_load_bytes(skb, 0, &b, 1))
			return 1;
		tcp_off = (b & 0x0f) * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		/* TCP right after the fixed header (no extension headers). */
		if (bpf_skb_load_bytes(skb, 6, &b, 1) || b != IPPROTO_TCP)
			return 1;
		tcp_off = 40;
	} else {
		return 1;
	}
	if (bpf_skb_load_bytes(skb, tcp_off + 13, &b, 1) || !(b & TCPHDR_FIN))
		return 1;
	/* A bare FIN at the very start of the peer's stream (it never sent a
	 * byte: an app that connected and closed, a health check, a peer
	 * whose keying was abandoned) has nothing to deliver: let it through,
	 * so that a handshake waiting on this connection fails at once rather
	 * than at the key timeout (a server that accepts one connection at a
	 * time would otherwise spend a key timeout on each). */
	if (c->est.kind == TLSHUB_EV_ESTABLISHED) {
		__u32 seq;
		__u16 ip_len;
		__u8 doff;
		if (bpf_skb_load_bytes(skb, tcp_off + 4, &seq, 4) ||
		    bpf_skb_load_bytes(skb, tcp_off + 12, &doff, 1))
			return 1;
		if (skb->protocol == bpf_htons(ETH_P_IP)) {
			if (bpf_skb_load_bytes(skb, 2, &ip_len, 2))
				return 1;
			ip_len = bpf_ntohs(ip_len) - tcp_off; /* TCP header + payload */
		} else {
			if (bpf_skb_load_bytes(skb, 4, &ip_len, 2))
				return 1;
			ip_len = bpf_ntohs(ip_len); /* after the fixed header */
		}
		__u16 tcp_hdr = (doff >> 4) * 4;
		if (ip_len <= tcp_hdr && bpf_ntohl(seq) == c->est.remote_isn + 1)
			return 1;
	}
	/* kTLS is on already and only the core's opening of the gate is to
	 * come (the gate lets the app through meanwhile, see ktls_on()): the
	 * FIN can no longer keep kTLS out, and it is most likely the peer's
	 * close after this side's answer. Deferring it would cost the peer a
	 * retransmission timeout (seen as a 200 ms setup tail of event-loop
	 * servers keyed from establishment, one connection in five deferred). */
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
	if (tp && ktls_on((struct sock *)tp))
		return 1;
	stat_inc(TLSHUB_STAT_FIN_DEFERRED);
	return 0;
}

/* TCP repair mode (CAP_NET_ADMIN; CRIU uses it) lets the app choose a
 * socket's sequence numbers and connect without a handshake. On a
 * selected socket it is refused (EPERM); a socket that enters it before it
 * connects is marked, and if it then connects to a selected peer it is
 * refused for good (see track()). Other sockets are untouched.
 *
 * The tls ULP and kTLS keys (TCP_ULP, SOL_TLS) on a socket under the gate
 * are the core's to install: anyone else is refused (EPERM), since the
 * gate opens once kTLS is on (see ktls_on()). */
SEC("lsm/socket_setsockopt")
int BPF_PROG(tlshub_gate_setsockopt, struct socket *sock, int level, int optname, int ret)
{
	if (ret)
		return ret;
	int ktls = (level == SOL_TCP && optname == TCP_ULP) || level == SOL_TLS;
	if (!ktls && (level != SOL_TCP || optname != TCP_REPAIR))
		return 0;
	struct sock *sk = sock->sk;
	if (!sk)
		return 0;
	struct tlshub_sk_mark *mark = bpf_sk_storage_get(&sk_marks, sk, 0, 0);
	if (ktls)
		return mark_gates(mark) && !exempt_process(bpf_get_current_pid_tgid() >> 32) ? -EPERM : 0;
	if (mark && mark->cookie)
		return -EPERM;
	mark = bpf_sk_storage_get(&sk_marks, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!mark)
		return -EPERM;
	mark->flags |= TLSHUB_MARK_REPAIR;
	return 0;
}

/* TCP_ZEROCOPY_RECEIVE maps the TCP receive queue into the app's memory:
 * it bypasses recvmsg (and so the gate) and, on a kTLS socket, kTLS too
 * (the app would take raw records out from under the record parser). It
 * fails with EOPNOTSUPP on a selected socket whose keys are not in and on
 * any socket with the tls ULP; the app falls back to recv(). */
SEC("lsm/socket_getsockopt")
int BPF_PROG(tlshub_gate_getsockopt, struct socket *sock, int level, int optname, int ret)
{
	if (ret)
		return ret;
	struct sock *sk = sock->sk;
	if (!sk)
		return 0;
	if (level == SOL_TLS && optname == TLS_RX) {
		learn_ktls_recvmsg(sk);
		return 0;
	}
	if (level != SOL_TCP || optname != TCP_ZEROCOPY_RECEIVE)
		return 0;
	struct tlshub_sk_mark *mark = bpf_sk_storage_get(&sk_marks, sk, 0, 0);
	if (mark_gates(mark) || has_tls_ulp(sk)) {
		stat_inc(TLSHUB_STAT_ZEROCOPY_RECEIVE_REFUSED);
		return -EOPNOTSUPP;
	}
	return 0;
}
