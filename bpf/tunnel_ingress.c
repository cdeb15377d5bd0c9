/* Attach point: tc INGRESS of the agent-owned tunnel device. Every packet here
 * was redirected by one of our programs:
 *
 *   by to_pod (pod_ingress.c): addressed to an enrolled pod. Assigned to the
 *     tunnel socket that owns it, or for a SYN to the HBONE listener (port
 *     15008) or the plaintext inbound listener (any other port);
 *   by from_pod for a bridged pod (skb->mark == redirect_mark under the
 *     capture mask): sent by that pod. Assigned to the tunnel socket that owns
 *     it, or for a SYN to the outbound listener (15001).
 *
 * Anything that finds no socket is dropped: routing it would only send it
 * back to the pod's veth (inbound) or around capture (outbound).
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/sock.h"
#include "lib/metrics.h"

int tunnel_dev_ingress(struct __sk_buff *skb)
{
	struct ma_packet pkt = {};
	struct ma_addr_key dst = {};
	const struct ma_config *cfg;
	struct bpf_sock *sk;
	__u32 pod_ifindex = 0;
	__u32 *owner;
	__u16 port;
	int outbound;

	switch (ma_parse(skb, &pkt)) {
	case MA_PARSE_TCP:
		break;
	case MA_PARSE_DROP:
		return TC_ACT_SHOT;
	default:
		return MA_PASS;
	}
	cfg = ma_config();
	outbound = cfg && ma_is_redirected_out(skb, cfg);
	if (outbound)
		ma_addr_key_src(&pkt, &dst);
	else
		ma_addr_key_dst(&pkt, &dst);
	owner = ma_pod_addrs.lookup(&dst);
	if (owner)
		pod_ifindex = *owner;
	if (!cfg)
		return ma_drop(pod_ifindex, DROP_NO_CONFIG);

	sk = ma_lookup_established(skb, &pkt);
	if (!sk) {
		/* Dropping, not passing: routing would send it back to the pod's
		 * veth and so to us again. */
		if (!ma_is_syn(&pkt))
			return ma_drop(pod_ifindex, DROP_NO_SOCKET);
		if (outbound)
			port = cfg->outbound_port;
		else
			port = bpf_ntohs(pkt.dport) == cfg->hbone_port ? cfg->hbone_port
									: cfg->inbound_port;
		sk = ma_lookup_listener(skb, &pkt, port);
		if (!sk)
			return ma_drop(pod_ifindex, DROP_NO_LISTENER);
	}
	if (ma_assign_and_mark(skb, sk, cfg))
		return ma_drop(pod_ifindex, DROP_ASSIGN_FAILED);
	return TC_ACT_OK;
}
