/* The maps every program shares. One compile unit holds all attach points, so
 * each map exists once and the agent fills it from agent/datapath/maps.py.
 */
#ifndef MESHAGENT_MAPS_H
#define MESHAGENT_MAPS_H

#include "lib/common.h"

/* Enrolled pods, keyed by the ifindex of their host-side veth: capture is
 * decided by where a packet comes from, never by an address it claims. */
BPF_HASH(ma_pods, __u32, struct ma_pod_info, MA_MAX_PODS);

/* Pod address -> host-side veth ifindex: anti-spoofing and inbound lookup. */
BPF_HASH(ma_pod_addrs, struct ma_addr_key, __u32, MA_MAX_POD_ADDRS);

/* The node's own addresses: their traffic (health probes) reaches pods directly. */
BPF_HASH(ma_node_addrs, struct ma_addr_key, __u8, MA_MAX_NODE_ADDRS);

/* Destination ports and CIDRs that are never captured. */
BPF_HASH(ma_excluded_ports, __u16, __u8, MA_MAX_EXCLUDED_PORTS);
BPF_LPM_TRIE(ma_excluded_cidrs, struct ma_lpm_key, __u8, MA_MAX_EXCLUDED_CIDRS);

BPF_ARRAY(ma_config_map, struct ma_config, 1);

/* Per-pod counters, per CPU so the hot path never contends. */
BPF_PERCPU_HASH(ma_stats, __u32, struct ma_pod_stats, MA_MAX_PODS);

#ifdef MESHAGENT_TEST_RUN
/* BPF_PROG_TEST_RUN runs outside tc ingress, where bpf_sk_assign refuses
 * every socket. Tests compile with this mock, which records what would have
 * been assigned so they can assert on it. */
struct ma_test_assignment {
	__u32 assigned;
	__u32 state;
	__u32 family;
	__u32 src_port; /* the socket's local port, host order */
};
BPF_ARRAY(ma_test_assigned, struct ma_test_assignment, 1);
#endif

#endif
