/* Attach point: tc INGRESS of an enrolled pod's host-side veth, i.e. every
 * packet the pod sends. Captures the pod's TCP into the tunnel's outbound
 * listener.
 *
 *   not enrolled ifindex          -> pass (the filter outlived its pod entry)
 *   not allowed by the datapath rule (lib/parse.h: tagged, encapsulated,
 *   unknown ethertype, malformed, TCP fragment) -> drop, counted by reason
 *   ARP, IP that is not TCP       -> pass (UDP, ICMP, ND, ...), except:
 *   DNS (UDP to 53) of a pod with MA_POD_F_DNS, not excluded -> assign to the
 *     tunnel's DNS socket; no such socket -> pass (DNS fails open: the query
 *     reaches the pod's real resolver; see README "Services and DNS")
 *   source not one of pod's addrs -> drop (the tunnel trusts the source)
 *   socket owns the 4-tuple       -> assign (replies to the tunnel, later segments)
 *   not a SYN                     -> pass (a connection older than enrollment)
 *   excluded port or CIDR         -> pass
 *   SYN to 53 of a MA_POD_F_DNS pod -> the DNS proxy's TCP listener if there
 *                                    is one (else as any SYN)
 *   SYN                           -> assign to the outbound listener, or drop
 *
 * A bridged pod (MA_POD_F_BRIDGED) gets the same decisions, but "assign" is
 * "redirect to the tunnel device", which assigns the same socket there (its
 * DNS too: the socket is looked up here first, so with no DNS socket its UDP
 * query passes to the resolver, as a veth pod's does).
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/sock.h"
#include "lib/metrics.h"
#include "lib/capture.h"

/* UDP from an enrolled pod (source already checked): DNS to the tunnel's DNS
 * socket (for a bridged pod: redirected to the tunnel device, which assigns
 * it there), anything else (and DNS with no socket: fail open) passes. */
static __always_inline int ma_from_pod_udp(struct __sk_buff *skb, const struct ma_packet *pkt,
					   const struct ma_pod_info *info, __u32 ifindex)
{
	const struct ma_config *cfg = ma_config();
	struct bpf_sock *sk;
	int verdict;

	if (!cfg || !ma_dns_query(pkt, info, cfg))
		return MA_PASS;
	sk = ma_lookup_udp(skb, pkt, cfg->dns_port);
	if (!sk)
		return MA_PASS;
	if (info->flags & MA_POD_F_BRIDGED) {
		bpf_sk_release(sk);
		verdict = ma_redirect_out(skb, cfg);
		if (verdict < 0)
			return ma_drop(ifindex, DROP_REDIRECT_FAILED);
		ma_count_out(ifindex, skb->len);
		return verdict;
	}
	if (ma_assign_and_mark(skb, sk, cfg))
		return ma_drop(ifindex, DROP_ASSIGN_FAILED);
	ma_count_out(ifindex, skb->len);
	return TC_ACT_OK;
}

int from_pod(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct ma_packet pkt = {};
	struct ma_addr_key src = {};
	const struct ma_config *cfg;
	struct ma_pod_info *info;
	struct bpf_sock *sk;
	__u32 *owner;
	int verdict;

	info = ma_pods.lookup(&ifindex);
	if (!info)
		return MA_PASS;

	switch (ma_parse(skb, &pkt)) {
	case MA_PARSE_TCP:
		break;
	case MA_PARSE_DROP:
		return ma_drop(ifindex, pkt.drop_reason);
	case MA_PARSE_NOT_TCP:
		if (pkt.udp && (info->flags & MA_POD_F_DNS) &&
		    pkt.dport == bpf_htons(MA_DNS_PORT))
			break; /* a DNS query: source checked, then ma_from_pod_udp */
		return MA_PASS;
	default:
		return MA_PASS;
	}

	ma_addr_key_src(&pkt, &src);
	owner = ma_pod_addrs.lookup(&src);
	if (!owner || *owner != ifindex)
		return ma_drop(ifindex, DROP_SPOOFED_SOURCE);
	if (pkt.udp)
		return ma_from_pod_udp(skb, &pkt, info, ifindex);

	cfg = ma_config();
	if (!cfg)
		return ma_drop(ifindex, DROP_NO_CONFIG);

	sk = ma_lookup_established(skb, &pkt);
	if (sk && (info->flags & MA_POD_F_BRIDGED)) {
		bpf_sk_release(sk);
		goto redirect;
	}
	if (sk) {
		if (ma_assign_and_mark(skb, sk, cfg))
			return ma_drop(ifindex, DROP_ASSIGN_FAILED);
		ma_count_out(ifindex, skb->len);
		return TC_ACT_OK;
	}

	if (!ma_is_syn(&pkt) || ma_excluded(&pkt))
		return MA_PASS;

	sk = NULL;
	if (ma_dns_query(&pkt, info, cfg))
		sk = ma_lookup_listener(skb, &pkt, cfg->dns_port);
	if (!sk)
		sk = ma_lookup_listener(skb, &pkt, cfg->outbound_port);
	if (!sk)
		return ma_drop(ifindex, DROP_NO_LISTENER);
	if (info->flags & MA_POD_F_BRIDGED) {
		bpf_sk_release(sk);
		goto redirect;
	}
	if (ma_assign_and_mark(skb, sk, cfg))
		return ma_drop(ifindex, DROP_ASSIGN_FAILED);
	ma_count_out(ifindex, skb->len);
	return TC_ACT_OK;

redirect:
	verdict = ma_redirect_out(skb, cfg);
	if (verdict < 0)
		return ma_drop(ifindex, DROP_REDIRECT_FAILED);
	ma_count_out(ifindex, skb->len);
	return verdict;
}
