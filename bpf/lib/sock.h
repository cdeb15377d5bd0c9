/* Socket lookup and assignment: the heart of capture without NAT.
 *
 * A packet is handed to a tunnel socket with bpf_sk_assign at tc ingress and
 * marked so the fwmark rule routes it to the local table: the stack delivers
 * it to that socket, and the socket's local address stays the original
 * destination (no SO_ORIGINAL_DST, no conntrack).
 */
#ifndef MESHAGENT_SOCK_H
#define MESHAGENT_SOCK_H

#include "lib/maps.h"
#include "lib/parse.h"

static __always_inline struct bpf_sock *ma_lookup(struct __sk_buff *skb,
						  const struct ma_packet *pkt, __u16 dport)
{
	struct bpf_sock_tuple t = {};

	if (pkt->family == MA_AF_INET) {
		__builtin_memcpy(&t.ipv4.saddr, pkt->saddr, 4);
		__builtin_memcpy(&t.ipv4.daddr, pkt->daddr, 4);
		t.ipv4.sport = pkt->sport;
		t.ipv4.dport = dport;
		return bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	}
	__builtin_memcpy(t.ipv6.saddr, pkt->saddr, 16);
	__builtin_memcpy(t.ipv6.daddr, pkt->daddr, 16);
	t.ipv6.sport = pkt->sport;
	t.ipv6.dport = dport;
	return bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv6), BPF_F_CURRENT_NETNS, 0);
}

/* The socket that already owns this exact 4-tuple (established or handshaking),
 * or NULL. A listener that happens to match the original port is not ours. */
static __always_inline struct bpf_sock *ma_lookup_established(struct __sk_buff *skb,
							      const struct ma_packet *pkt)
{
	struct bpf_sock *sk = ma_lookup(skb, pkt, pkt->dport);

	if (sk && sk->state == MA_TCP_LISTEN) {
		bpf_sk_release(sk);
		return NULL;
	}
	return sk;
}

/* The tunnel listener on port (host order), or NULL when none is listening. */
static __always_inline struct bpf_sock *ma_lookup_listener(struct __sk_buff *skb,
							   const struct ma_packet *pkt, __u16 port)
{
	struct bpf_sock *sk = ma_lookup(skb, pkt, bpf_htons(port));

	if (sk && sk->state != MA_TCP_LISTEN) {
		bpf_sk_release(sk);
		return NULL;
	}
	return sk;
}

/* The tunnel's UDP socket on port (host order) for this datagram (its DNS
 * proxy, bound to the wildcard address with IP_TRANSPARENT), or NULL. */
static __always_inline struct bpf_sock *ma_lookup_udp(struct __sk_buff *skb,
						      const struct ma_packet *pkt, __u16 port)
{
	struct bpf_sock_tuple t = {};

	if (pkt->family == MA_AF_INET) {
		__builtin_memcpy(&t.ipv4.saddr, pkt->saddr, 4);
		__builtin_memcpy(&t.ipv4.daddr, pkt->daddr, 4);
		t.ipv4.sport = pkt->sport;
		t.ipv4.dport = bpf_htons(port);
		return bpf_sk_lookup_udp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	}
	__builtin_memcpy(t.ipv6.saddr, pkt->saddr, 16);
	__builtin_memcpy(t.ipv6.daddr, pkt->daddr, 16);
	t.ipv6.sport = pkt->sport;
	t.ipv6.dport = bpf_htons(port);
	return bpf_sk_lookup_udp(skb, &t, sizeof(t.ipv6), BPF_F_CURRENT_NETNS, 0);
}

#ifdef MESHAGENT_TEST_RUN
static __always_inline long ma_sk_assign(struct __sk_buff *skb, struct bpf_sock *sk)
{
	__u32 zero = 0;
	struct ma_test_assignment a = {
		.assigned = 1, .state = sk->state, .family = sk->family, .src_port = sk->src_port,
	};

	ma_test_assigned.update(&zero, &a);
	return 0;
}
#else
static __always_inline long ma_sk_assign(struct __sk_buff *skb, struct bpf_sock *sk)
{
	return bpf_sk_assign(skb, sk, 0);
}
#endif

/* Assign sk (consumed: always released), mark the skb for local delivery.
 * Returns 0, or -1 when the kernel refused the socket. */
static __always_inline int ma_assign_and_mark(struct __sk_buff *skb, struct bpf_sock *sk,
					      const struct ma_config *cfg)
{
	long err = ma_sk_assign(skb, sk);

	bpf_sk_release(sk);
	if (err)
		return -1;
	skb->mark = (skb->mark & ~cfg->capture_mask) | cfg->capture_mark;
	return 0;
}

/* Send a captured packet of a bridged pod to the tunnel device's ingress,
 * marked so tunnel_dev_ingress treats it as outbound (see MA_POD_F_BRIDGED).
 * A mark set in the pod never arrives here: crossing the veth into the node
 * netns scrubs it. Returns the tc verdict, or -1 when it cannot. */
static __always_inline int ma_redirect_out(struct __sk_buff *skb, const struct ma_config *cfg)
{
	if (!cfg->tunnel_ifindex || !cfg->redirect_mark)
		return -1;
	if (bpf_skb_store_bytes(skb, 0, (void *)cfg->tunnel_mac, 6, 0) < 0)
		return -1;
	skb->mark = (skb->mark & ~cfg->capture_mask) | cfg->redirect_mark;
	return bpf_redirect(cfg->tunnel_ifindex, BPF_F_INGRESS);
}

static __always_inline int ma_is_redirected_out(const struct __sk_buff *skb,
						const struct ma_config *cfg)
{
	return cfg->redirect_mark && (skb->mark & cfg->capture_mask) == cfg->redirect_mark;
}

/* The agent's settings, or NULL before it has written them. ma_config_map is
 * an array, whose one entry always exists and reads as zeros until written,
 * so "unset" is a zero outbound port (the agent always sets one). */
static __always_inline const struct ma_config *ma_config(void)
{
	__u32 zero = 0;
	const struct ma_config *cfg = ma_config_map.lookup(&zero);

	if (!cfg || !cfg->outbound_port)
		return NULL;
	return cfg;
}

#endif
