/* Attach point: tc INGRESS of the agent-owned tunnel device. Every packet here
 * was redirected by one of our programs:
 *
 *   by to_pod (pod_ingress.c): addressed to an enrolled pod. Assigned to the
 *     tunnel socket that owns it, or for a SYN to the HBONE listener (port
 *     15008) or the plaintext inbound listener (any other port);
 *   by from_pod for a bridged pod (skb->mark == redirect_mark under the
 *     capture mask): sent by that pod. Assigned to the tunnel socket that owns
 *     it, or for a SYN to the outbound listener (15001); a SYN to port 53 of a
 *     pod whose DNS is captured to the DNS proxy's TCP listener first (as
 *     from_pod does for a veth pod); a UDP DNS query to the DNS proxy's socket.
 *
 * Anything that finds no socket is dropped: routing it would only send it
 * back to the pod's veth (inbound) or around capture (outbound). For a
 * redirected DNS query that means the DNS socket closed after from_pod found
 * it (the tunnel stopping): the resolver library retries, and from_pod then
 * lets the retry pass to the pod's resolver (DNS fails open).
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/sock.h"
#include "lib/metrics.h"
#include "lib/capture.h"

/* The outbound listener for a SYN a bridged pod sent: the DNS proxy's for its
 * DNS over TCP when there is one, else the outbound listener (15001). */
static __always_inline struct bpf_sock *ma_outbound_listener(struct __sk_buff *skb,
							     const struct ma_packet *pkt,
							     const struct ma_config *cfg,
							     __u32 pod_ifindex)
{
	const struct ma_pod_info *info = ma_pods.lookup(&pod_ifindex);
	struct bpf_sock *sk = NULL;

	if (info && ma_dns_query(pkt, info, cfg))
		sk = ma_lookup_listener(skb, pkt, cfg->dns_port);
	if (!sk)
		sk = ma_lookup_listener(skb, pkt, cfg->outbound_port);
	return sk;
}

/* A bridged pod's redirected UDP DNS query: to the DNS proxy's socket. (Its own
 * function: the verifier refuses one assign for a UDP bpf_sock and a TCP
 * sock_common.) */
static __always_inline int ma_assign_dns_query(struct __sk_buff *skb, const struct ma_packet *pkt,
					       const struct ma_config *cfg, __u32 pod_ifindex)
{
	struct bpf_sock *sk = cfg->dns_port ? ma_lookup_udp(skb, pkt, cfg->dns_port) : NULL;

	if (!sk)
		return ma_drop(pod_ifindex, DROP_NO_LISTENER);
	if (ma_assign_and_mark(skb, sk, cfg))
		return ma_drop(pod_ifindex, DROP_ASSIGN_FAILED);
	return TC_ACT_OK;
}

int tunnel_dev_ingress(struct __sk_buff *skb)
{
	struct ma_packet pkt = {};
	struct ma_addr_key dst = {};
	const struct ma_config *cfg;
	struct bpf_sock *sk;
	__u32 pod_ifindex = 0;
	__u32 *owner;
	int outbound;

	switch (ma_parse(skb, &pkt)) {
	case MA_PARSE_TCP:
		break;
	case MA_PARSE_DROP:
		return TC_ACT_SHOT;
	case MA_PARSE_NOT_TCP:
		if (pkt.udp)
			break; /* a bridged pod's DNS query, if redirected (below) */
		return MA_PASS;
	default:
		return MA_PASS;
	}
	cfg = ma_config();
	outbound = cfg && ma_is_redirected_out(skb, cfg);
	if (pkt.udp && !outbound)
		return MA_PASS; /* nothing of ours: only from_pod redirects UDP here */
	if (outbound)
		ma_addr_key_src(&pkt, &dst);
	else
		ma_addr_key_dst(&pkt, &dst);
	owner = ma_pod_addrs.lookup(&dst);
	if (owner)
		pod_ifindex = *owner;
	if (!cfg)
		return ma_drop(pod_ifindex, DROP_NO_CONFIG);

	if (pkt.udp)
		return ma_assign_dns_query(skb, &pkt, cfg, pod_ifindex);

	sk = ma_lookup_established(skb, &pkt);
	if (!sk) {
		/* Dropping, not passing: routing would send it back to the pod's
		 * veth and so to us again. */
		if (!ma_is_syn(&pkt))
			return ma_drop(pod_ifindex, DROP_NO_SOCKET);
		if (outbound)
			sk = ma_outbound_listener(skb, &pkt, cfg, pod_ifindex);
		else
			sk = ma_lookup_listener(skb, &pkt,
						bpf_ntohs(pkt.dport) == cfg->hbone_port
							? cfg->hbone_port : cfg->inbound_port);
		if (!sk)
			return ma_drop(pod_ifindex, DROP_NO_LISTENER);
	}
	if (ma_assign_and_mark(skb, sk, cfg))
		return ma_drop(pod_ifindex, DROP_ASSIGN_FAILED);
	return TC_ACT_OK;
}
