/* Prints the sizes and offsets of the shared structs, and the values of the
 * constants user space writes into the maps, as Rust constants.
 * Built and run on the host by ebpf/build.rs. */
#include <stddef.h>
#include <stdio.h>
#include "tlshub_shared.h"

#define S(t) printf("pub const SIZE_%s: usize = %zu;\n", #t, sizeof(struct t))
#define V(c) printf("pub const %s: u32 = %u;\n", #c, (unsigned)(c))
#define O(t, f) printf("pub const OFF_%s_%s: usize = %zu;\n", #t, #f, offsetof(struct t, f))

int main(void)
{
	S(tlshub_event);
	O(tlshub_event, cookie);
	O(tlshub_event, ts_ns);
	O(tlshub_event, pid);
	O(tlshub_event, fd);
	O(tlshub_event, local_isn);
	O(tlshub_event, family);
	O(tlshub_event, remote_port);
	O(tlshub_event, local_addr);
	O(tlshub_event, remote_addr);
	S(tlshub_conn);
	O(tlshub_conn, gate);
	O(tlshub_conn, role);
	O(tlshub_conn, est);
	O(tlshub_conn, owner_pid);
	O(tlshub_conn, owner_fd);
	O(tlshub_conn, waiting_pid);
	O(tlshub_conn, flags);
	S(tlshub_owner);
	O(tlshub_owner, fd);
	S(tlshub_held);
	O(tlshub_held, since_ns);
	S(tlshub_control);
	O(tlshub_control, no_core);
	O(tlshub_control, keying);
	O(tlshub_event, peer_keying);
	S(tlshub_sk_mark);
	O(tlshub_sk_mark, flags);
	S(tlshub_lpm_key);
	O(tlshub_lpm_key, addr);
	S(tlshub_port_key);
	O(tlshub_port_key, port);
	V(TLSHUB_GATE_CLOSED);
	V(TLSHUB_GATE_OPEN);
	V(TLSHUB_GATE_RESET);
	V(TLSHUB_MARK_REPAIR);
	V(TLSHUB_MARK_REFUSED);
	V(TLSHUB_MARK_OPEN);
	V(TLSHUB_MARK_CONNECTING);
	V(TLSHUB_MARK_HELD_CONNECTING);
	V(TLSHUB_EV_HELD_CONNECTING);
	V(TLSHUB_EV_WAITING);
	V(TLSHUB_EV_UNSENT_HELD);
	V(TLSHUB_STAT_UNSENT_HOLDS);
	V(TLSHUB_STAT_UNSENT_EXPIRED);
	V(TLSHUB_STAT_HOLD_UNRECORDED);
	V(TLSHUB_STAT_MAP_BUSY);
	V(TLSHUB_STAT_MPTCP_REFUSED);
	V(TLSHUB_STAT_SIMULTANEOUS_OPEN);
	V(TLSHUB_STAT_OPEN_RECORD_HOLDS);
	V(TLSHUB_EV_OPEN_RECORD_HELD);
	V(TLSHUB_UNSENT_HOLD_MAX_MS);
	O(tlshub_sk_mark, unsent_since_ms);
	V(TLSHUB_STAT_GATE_EAGAIN);
	V(TLSHUB_STAT_UNMARKED_REFUSED);
	V(TLSHUB_CONN_UNMARKED);
	V(TLSHUB_STAT_MAX);
	V(TLSHUB_SERVICE_RULE);
	V(TLSHUB_LISTEN_RULE);
	V(TLSHUB_PEER_SILENT);
	V(TLSHUB_PEER_ANNOUNCED);
	O(tlshub_event, peer);
	O(tlshub_event, cgroup);
	O(tlshub_conn, owner_cgroup);
	O(tlshub_owner, cgroup);
	return 0;
}
