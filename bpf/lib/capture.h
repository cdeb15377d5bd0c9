/* Capture decisions shared by from_pod (pod_egress.c) and, for a bridged pod's
 * redirected packets, tunnel_dev_ingress (tunnel_ingress.c): which destinations
 * are never captured, and which packets are DNS the tunnel answers.
 */
#ifndef MESHAGENT_CAPTURE_H
#define MESHAGENT_CAPTURE_H

#include "lib/common.h"
#include "lib/maps.h"
#include "lib/parse.h"

/* The destination port or CIDR is excluded from capture (datapath.excluded_*). */
static __always_inline int ma_excluded(const struct ma_packet *pkt)
{
	struct ma_lpm_key lpm = {};
	__u16 port = bpf_ntohs(pkt->dport);

	if (ma_excluded_ports.lookup(&port))
		return 1;
	lpm.prefixlen = 8 + (pkt->family == MA_AF_INET ? 32 : 128);
	lpm.family = (__u8)pkt->family;
	__builtin_memcpy(lpm.addr, pkt->daddr, 16);
	return ma_excluded_cidrs.lookup(&lpm) != NULL;
}

/* UDP or TCP to port 53 of a pod whose DNS the tunnel answers (MA_POD_F_DNS,
 * a DNS port configured), not excluded. */
static __always_inline int ma_dns_query(const struct ma_packet *pkt, const struct ma_pod_info *info,
					const struct ma_config *cfg)
{
	return (info->flags & MA_POD_F_DNS) && cfg->dns_port &&
	       pkt->dport == bpf_htons(MA_DNS_PORT) && !ma_excluded(pkt);
}

#endif
