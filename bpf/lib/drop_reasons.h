/* Drop reasons: the one table of why the datapath drops a packet.
 *
 * Mirrored by agent/datapath/drop_reasons.py; tests/unit/test_drop_reasons.py
 * parses this file and fails when the two disagree. Values are stable: they
 * index the per-pod counters and appear in metrics, so never renumber one.
 */
#ifndef MESHAGENT_DROP_REASONS_H
#define MESHAGENT_DROP_REASONS_H

enum ma_drop_reason {
	DROP_SPOOFED_SOURCE = 0, /* pod sent TCP from an address that is not its own */
	DROP_NO_LISTENER = 1,    /* tunnel listener missing: fail closed */
	DROP_ASSIGN_FAILED = 2,  /* bpf_sk_assign refused the socket */
	DROP_MALFORMED = 3,      /* truncated or invalid IP/TCP header */
	DROP_FRAGMENT = 4,       /* fragmented TCP: ports unknown, cannot be captured safely */
	DROP_EXTHDR_LIMIT = 5,   /* more IPv6 extension headers than we walk */
	DROP_NO_SOCKET = 6,      /* non-SYN reached the tunnel device with no socket */
	DROP_NO_CONFIG = 7,      /* datapath config missing: agent not ready */
	DROP_REDIRECT_FAILED = 8,/* could not redirect to the tunnel device */
	DROP_VLAN_TAGGED = 9,    /* 802.1Q/802.1ad tag (priority tags too): pods send untagged frames */
	DROP_UNKNOWN_L3 = 10,    /* not IPv4, IPv6 or ARP: not on the allow list */
	DROP_ENCAPSULATED = 11,  /* IP-in-IP, GRE, VXLAN, Geneve...: would be decapsulated around capture */
	DROP_REASON_MAX = 12,
};

#endif
