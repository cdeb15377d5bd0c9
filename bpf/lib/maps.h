/* The maps every program shares. One compile unit holds all attach points, so
 * each map exists once and the agent fills it from agent/datapath/maps.py.
 */
#ifndef MESHAGENT_MAPS_H
#define MESHAGENT_MAPS_H

#include "lib/common.h"

/* With MA_PIN_DIR (the agent passes -DMA_PIN_DIR="<bpffs dir>") every map is
 * pinned there: a restarted agent reuses the maps the attached programs use,
 * so enrollment state and counters survive it and replacing the programs
 * changes nothing for live traffic. Without it (BPF unit tests) maps are
 * private to the compile. */
#ifdef MA_PIN_DIR
#define MA_MAP(type, key, leaf, name, max, flags) \
	BPF_F_TABLE(type ":" MA_PIN_DIR "/" #name, key, leaf, name, max, flags)
#else
#define MA_MAP(type, key, leaf, name, max, flags) BPF_F_TABLE(type, key, leaf, name, max, flags)
#endif

/* Enrolled pods, keyed by the ifindex of their host-side veth: capture is
 * decided by where a packet comes from, never by an address it claims. */
MA_MAP("hash", __u32, struct ma_pod_info, ma_pods, MA_MAX_PODS, 0);

/* Pod address -> host-side veth ifindex: anti-spoofing and inbound lookup. */
MA_MAP("hash", struct ma_addr_key, __u32, ma_pod_addrs, MA_MAX_POD_ADDRS, 0);

/* The node's own addresses: their traffic (health probes) reaches pods directly. */
MA_MAP("hash", struct ma_addr_key, __u8, ma_node_addrs, MA_MAX_NODE_ADDRS, 0);

/* Destination ports and CIDRs that are never captured. */
MA_MAP("hash", __u16, __u8, ma_excluded_ports, MA_MAX_EXCLUDED_PORTS, 0);
MA_MAP("lpm_trie", struct ma_lpm_key, __u8, ma_excluded_cidrs, MA_MAX_EXCLUDED_CIDRS,
       BPF_F_NO_PREALLOC);

/* UDP destination ports of this node's other tunnels (a custom VXLAN dstport,
 * FOU/GUE), besides the well-known ones in lib/parse.h: host order. */
MA_MAP("hash", __u16, __u8, ma_encap_udp_ports, MA_MAX_ENCAP_PORTS, 0);

MA_MAP("array", int, struct ma_config, ma_config_map, 1, 0);

/* Per-pod counters, per CPU so the hot path never contends. */
MA_MAP("percpu_hash", __u32, struct ma_pod_stats, ma_stats, MA_MAX_PODS, 0);

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
