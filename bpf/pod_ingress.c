/* Attach point: tc EGRESS of an enrolled pod's host-side veth, i.e. every
 * packet about to enter the pod. Sends inbound TCP to the tunnel.
 *
 * Why this design: sk_assign only works at tc ingress, and inbound traffic
 * reaches a pod from many places (the uplink, other pods' veths, tunnels).
 * Rather than hooking every uplink and every veth on the node, we catch the
 * traffic where all of it converges, at the pod's own veth, and bounce it to
 * the ingress of one device the agent owns, where tunnel_ingress.c assigns
 * the socket. Only enrolled veths and our own device carry our programs.
 *
 *   not enrolled                         -> pass
 *   sent by the tunnel (its SO_MARK)     -> pass (before any parsing)
 *   not allowed by the datapath rule (lib/parse.h) -> drop, counted by reason
 *   ARP, IP that is not TCP              -> pass
 *   not addressed to this pod            -> pass
 *   SYN from the node's own addresses    -> pass (kubelet-style probes)
 *   SYN, or a segment a tunnel socket owns -> redirect to the tunnel device
 *     (from a node address too: the reply of a node-local service to a
 *     connection the pod made through the tunnel)
 *   anything else                        -> pass (connection older than enrollment)
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/sock.h"
#include "lib/metrics.h"

int to_pod(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct ma_packet pkt = {};
	struct ma_addr_key key = {};
	const struct ma_config *cfg;
	struct bpf_sock *sk;
	__u32 *owner;

	if (!ma_pods.lookup(&ifindex))
		return MA_PASS;
	cfg = ma_config();
	if (!cfg)
		return ma_drop(ifindex, DROP_NO_CONFIG);
	if (skb->mark == cfg->tunnel_mark)
		return MA_PASS;

	switch (ma_parse(skb, &pkt)) {
	case MA_PARSE_TCP:
		break;
	case MA_PARSE_DROP:
		return ma_drop(ifindex, pkt.drop_reason);
	default:
		return MA_PASS;
	}

	ma_addr_key_dst(&pkt, &key);
	owner = ma_pod_addrs.lookup(&key);
	if (!owner || *owner != ifindex)
		return MA_PASS;
	ma_addr_key_src(&pkt, &key);
	if (ma_is_syn(&pkt) && ma_node_addrs.lookup(&key))
		return MA_PASS;

	if (!ma_is_syn(&pkt)) {
		sk = ma_lookup_established(skb, &pkt);
		if (!sk)
			return MA_PASS;
		bpf_sk_release(sk);
	}

	if (!cfg->tunnel_ifindex)
		return ma_drop(ifindex, DROP_REDIRECT_FAILED);
	if (bpf_skb_store_bytes(skb, 0, (void *)cfg->tunnel_mac, 6, 0) < 0)
		return ma_drop(ifindex, DROP_REDIRECT_FAILED);
	ma_count_in(ifindex, skb->len);
	return bpf_redirect(cfg->tunnel_ifindex, BPF_F_INGRESS);
}
