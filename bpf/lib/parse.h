/* Header parsing into one packet summary, for both address families.
 *
 * THE DATAPATH RULE: what an enrolled pod may send (from_pod, pod_egress.c)
 * and receive (to_pod, pod_ingress.c), and what happens to everything else.
 * README.md "Datapath rules" mirrors this table; tests/bpf has a
 * BPF_PROG_TEST_RUN case for every row.
 *
 *   frame                                         | verdict
 *   ----------------------------------------------+-----------------------------
 *   untagged IPv4 / IPv6, TCP                     | capture rules (pod_egress.c,
 *                                                 | pod_ingress.c): assign, pass
 *                                                 | or drop (spoofed, no listener)
 *   untagged IPv4 / IPv6, UDP, ICMP, ICMPv6       | pass (IPv6 ND and DHCP are
 *     (ND included), any other IP protocol        | in here)
 *   ARP                                           | pass (the only non-IP frame)
 *   802.1Q / 802.1ad tag, any VID (0 = priority), | drop VLAN_TAGGED
 *     one or stacked                              |
 *   IP-in-IP, IPv6-in-IP, GRE, EtherIP, L2TPv3,   | drop ENCAPSULATED
 *     MPLS-in-IP (after any IPv6 ext. headers)    |
 *   UDP to 4789/4790/8472 (VXLAN), 6081 (Geneve)  | drop ENCAPSULATED
 *     or a port in datapath.encapsulation_udp_ports |
 *   TCP fragment (first, later, atomic), and an   | drop FRAGMENT
 *     IPv6 later fragment whose fragment header   |
 *     names another extension header              |
 *   truncated or invalid IP / TCP / UDP header    | drop MALFORMED
 *   more than MA_MAX_EXTHDRS IPv6 ext. headers    | drop EXTHDR_LIMIT
 *     before TCP                                  |
 *   any other ethertype (MPLS, PPPoE, LLDP, STP,  | drop UNKNOWN_L3
 *     802.3 length frames, IPX, ...)              |
 *
 * Later fragments of non-TCP datagrams (by the IPv4 protocol field or the
 * IPv6 fragment header's next header) pass: they carry no header to judge and
 * cannot be reassembled without the first fragment, which was judged.
 *
 * Headers are copied with bpf_skb_load_bytes rather than read in place: veth
 * traffic can be non-linear after GRO, and copying keeps variable offsets
 * (IPv4 options, IPv6 extension headers) simple for the verifier.
 */
#ifndef MESHAGENT_PARSE_H
#define MESHAGENT_PARSE_H

#include "lib/common.h"
#include "lib/maps.h"

#define MA_ETH_HLEN 14
#define MA_IP_MF 0x2000
#define MA_IP_OFFSET 0x1FFF
#define MA_TCP_FIN 0x01
#define MA_TCP_SYN 0x02
#define MA_TCP_RST 0x04
#define MA_TCP_ACK 0x10

#define MA_NEXTHDR_HOP 0
#define MA_NEXTHDR_ROUTING 43
#define MA_NEXTHDR_FRAGMENT 44
#define MA_NEXTHDR_AUTH 51
#define MA_NEXTHDR_DEST 60

#define MA_ETH_P_ARP 0x0806
#define MA_ETH_P_8021Q 0x8100
#define MA_ETH_P_8021AD 0x88A8

/* IP protocols that carry another packet. A node device (ipip, sit, gre,
 * ip6tnl, an overlay's vxlan) whose addresses match would decapsulate them and
 * route the inner packet from the node itself, around capture and the source
 * check: an enrolled pod may not send them, nor receive them. */
#define MA_IPPROTO_IPIP 4
#define MA_IPPROTO_IPV6 41
#define MA_IPPROTO_GRE 47
#define MA_IPPROTO_ETHERIP 97
#define MA_IPPROTO_L2TP 115
#define MA_IPPROTO_MPLS 137
/* UDP destination ports of encapsulations the kernel decapsulates: VXLAN
 * (IANA 4789, and Linux's/flannel's 8472), VXLAN-GPE 4790, Geneve 6081. */
#define MA_UDP_VXLAN 4789
#define MA_UDP_VXLAN_GPE 4790
#define MA_UDP_VXLAN_LINUX 8472
#define MA_UDP_GENEVE 6081

enum ma_parse_result {
	MA_PARSE_TCP = 0,     /* a complete TCP header was found */
	MA_PARSE_NOT_TCP = 1, /* IP, not TCP, not an encapsulation: pass */
	MA_PARSE_ARP = 2,     /* ARP, the one non-IP frame on the allow list: pass */
	MA_PARSE_DROP = 3,    /* drop; the reason is in pkt->drop_reason */
};

struct ma_packet {
	__u32 family;
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport; /* network order */
	__u16 dport; /* network order */
	__u8 tcp_flags;
	__u8 udp;    /* 1: a UDP datagram (NOT_TCP), sport/dport are its ports */
	__u8 pad[2];
	__u32 drop_reason;
};

static __always_inline int ma_is_encap_proto(__u8 proto)
{
	return proto == MA_IPPROTO_IPIP || proto == MA_IPPROTO_IPV6 || proto == MA_IPPROTO_GRE ||
	       proto == MA_IPPROTO_ETHERIP || proto == MA_IPPROTO_L2TP || proto == MA_IPPROTO_MPLS;
}

/* UDP at off: NOT_TCP, or DROP for a tunnel port (or a truncated header).
 * A whole (unfragmented) datagram also gets pkt->udp and its ports, which the
 * DNS capture uses; a first fragment does not (it is never captured). */
static __always_inline int ma_parse_udp(struct __sk_buff *skb, __u32 off, struct ma_packet *pkt,
					int whole)
{
	__be16 ports[2];
	__u16 port;

	if (bpf_skb_load_bytes(skb, off, ports, sizeof(ports)) < 0) {
		pkt->drop_reason = DROP_MALFORMED;
		return MA_PARSE_DROP;
	}
	if (whole) {
		pkt->udp = 1;
		pkt->sport = ports[0];
		pkt->dport = ports[1];
	}
	port = bpf_ntohs(ports[1]);
	if (port == MA_UDP_VXLAN || port == MA_UDP_VXLAN_GPE || port == MA_UDP_VXLAN_LINUX ||
	    port == MA_UDP_GENEVE || ma_encap_udp_ports.lookup(&port)) {
		pkt->drop_reason = DROP_ENCAPSULATED;
		return MA_PARSE_DROP;
	}
	return MA_PARSE_NOT_TCP;
}

static __always_inline int ma_parse_tcp(struct __sk_buff *skb, __u32 off, struct ma_packet *pkt)
{
	__u8 tcp[14];

	if (bpf_skb_load_bytes(skb, off, tcp, sizeof(tcp)) < 0)
		goto malformed;
	if ((tcp[12] >> 4) < 5)
		goto malformed;
	__builtin_memcpy(&pkt->sport, &tcp[0], 2);
	__builtin_memcpy(&pkt->dport, &tcp[2], 2);
	pkt->tcp_flags = tcp[13];
	return MA_PARSE_TCP;
malformed:
	pkt->drop_reason = DROP_MALFORMED;
	return MA_PARSE_DROP;
}

static __always_inline int ma_parse_ipv4(struct __sk_buff *skb, struct ma_packet *pkt)
{
	struct iphdr iph;
	__u32 ihl;

	if (bpf_skb_load_bytes(skb, MA_ETH_HLEN, &iph, sizeof(iph)) < 0)
		goto malformed;
	ihl = iph.ihl;
	if (iph.version != 4 || ihl < 5)
		goto malformed;
	pkt->family = MA_AF_INET;
	__builtin_memcpy(pkt->saddr, &iph.saddr, 4);
	__builtin_memcpy(pkt->daddr, &iph.daddr, 4);
	if (ma_is_encap_proto(iph.protocol)) {
		pkt->drop_reason = DROP_ENCAPSULATED;
		return MA_PARSE_DROP;
	}
	if (iph.protocol == IPPROTO_UDP) {
		/* Only a first fragment (or a whole datagram) holds the port. */
		if (iph.frag_off & bpf_htons(MA_IP_OFFSET))
			return MA_PARSE_NOT_TCP;
		return ma_parse_udp(skb, MA_ETH_HLEN + ihl * 4, pkt,
				    !(iph.frag_off & bpf_htons(MA_IP_MF)));
	}
	if (iph.protocol != IPPROTO_TCP)
		return MA_PARSE_NOT_TCP;
	if (iph.frag_off & bpf_htons(MA_IP_MF | MA_IP_OFFSET)) {
		pkt->drop_reason = DROP_FRAGMENT;
		return MA_PARSE_DROP;
	}
	return ma_parse_tcp(skb, MA_ETH_HLEN + ihl * 4, pkt);
malformed:
	pkt->drop_reason = DROP_MALFORMED;
	return MA_PARSE_DROP;
}

static __always_inline int ma_parse_ipv6(struct __sk_buff *skb, struct ma_packet *pkt)
{
	struct ipv6hdr ip6h;
	__u32 off = MA_ETH_HLEN + sizeof(struct ipv6hdr);
	__u8 nexthdr;
	__u8 ext[2];
	__u16 frag_off;
	int fragmented = 0; /* a fragment header was walked: TCP behind it is dropped */
	int i;

	if (bpf_skb_load_bytes(skb, MA_ETH_HLEN, &ip6h, sizeof(ip6h)) < 0 || ip6h.version != 6) {
		pkt->drop_reason = DROP_MALFORMED;
		return MA_PARSE_DROP;
	}
	pkt->family = MA_AF_INET6;
	__builtin_memcpy(pkt->saddr, &ip6h.saddr, 16);
	__builtin_memcpy(pkt->daddr, &ip6h.daddr, 16);
	nexthdr = ip6h.nexthdr;

#pragma unroll
	for (i = 0; i < MA_MAX_EXTHDRS; i++) {
		switch (nexthdr) {
		case IPPROTO_TCP:
			if (fragmented)
				goto fragment;
			return ma_parse_tcp(skb, off, pkt);
		case IPPROTO_UDP:
			return ma_parse_udp(skb, off, pkt, !fragmented);
		case MA_NEXTHDR_HOP:
		case MA_NEXTHDR_ROUTING:
		case MA_NEXTHDR_DEST:
			if (bpf_skb_load_bytes(skb, off, ext, 2) < 0)
				goto malformed;
			nexthdr = ext[0];
			off += ((__u32)ext[1] + 1) * 8;
			break;
		case MA_NEXTHDR_AUTH:
			if (bpf_skb_load_bytes(skb, off, ext, 2) < 0)
				goto malformed;
			nexthdr = ext[0];
			off += ((__u32)ext[1] + 2) * 4;
			break;
		case MA_NEXTHDR_FRAGMENT:
			if (bpf_skb_load_bytes(skb, off, ext, 2) < 0 ||
			    bpf_skb_load_bytes(skb, off + 2, &frag_off, 2) < 0)
				goto malformed;
			nexthdr = ext[0];
			/* A fragmented TCP segment hides or splits the ports. */
			if (nexthdr == IPPROTO_TCP)
				goto fragment;
			if (ma_is_encap_proto(nexthdr))
				goto encapsulated;
			/* A later fragment holds no upper-layer header to inspect: it
			 * passes only when the fragment header names a protocol that
			 * is not TCP. Naming another extension header leaves the upper
			 * layer unknown (it may be TCP): cannot classify, drop. */
			if (frag_off & bpf_htons(0xFFF8)) {
				if (nexthdr == MA_NEXTHDR_HOP || nexthdr == MA_NEXTHDR_ROUTING ||
				    nexthdr == MA_NEXTHDR_DEST || nexthdr == MA_NEXTHDR_AUTH ||
				    nexthdr == MA_NEXTHDR_FRAGMENT)
					goto fragment;
				return MA_PARSE_NOT_TCP;
			}
			/* The first fragment may put more extension headers before
			 * TCP: keep walking, and drop if TCP turns up (as above). */
			fragmented = 1;
			off += 8;
			break;
		default:
			if (ma_is_encap_proto(nexthdr))
				goto encapsulated;
			return MA_PARSE_NOT_TCP;
		}
	}
	if (nexthdr == IPPROTO_TCP) {
		if (fragmented)
			goto fragment;
		return ma_parse_tcp(skb, off, pkt);
	}
	pkt->drop_reason = DROP_EXTHDR_LIMIT;
	return MA_PARSE_DROP;
fragment:
	pkt->drop_reason = DROP_FRAGMENT;
	return MA_PARSE_DROP;
encapsulated:
	pkt->drop_reason = DROP_ENCAPSULATED;
	return MA_PARSE_DROP;
malformed:
	pkt->drop_reason = DROP_MALFORMED;
	return MA_PARSE_DROP;
}

/* Fill pkt from the skb; see enum ma_parse_result for what the caller does.
 *
 * VLAN tags: on receive the kernel moves the outer 802.1Q/802.1ad tag out of
 * the frame (skb->vlan_present) before tc runs, and after tc strips priority
 * tags (VID 0) one after another, to any depth, then routes what is inside;
 * a nonzero VID without a VLAN device is "other host" (not routed, but a
 * bridge still forwards it, tag and all). No finite walk covers "any depth",
 * and pod networks are untagged, so every tagged frame is dropped: the tag in
 * skb->vlan_tci, or (when the frame was not received, as in
 * BPF_PROG_TEST_RUN or on tc egress) one still in the data. */
static __always_inline int ma_parse(struct __sk_buff *skb, struct ma_packet *pkt)
{
	__u32 proto = skb->protocol;

	if (skb->vlan_present || proto == bpf_htons(MA_ETH_P_8021Q) ||
	    proto == bpf_htons(MA_ETH_P_8021AD)) {
		pkt->drop_reason = DROP_VLAN_TAGGED;
		return MA_PARSE_DROP;
	}
	if (proto == bpf_htons(ETH_P_IP))
		return ma_parse_ipv4(skb, pkt);
	if (proto == bpf_htons(ETH_P_IPV6))
		return ma_parse_ipv6(skb, pkt);
	if (proto == bpf_htons(MA_ETH_P_ARP))
		return MA_PARSE_ARP;
	pkt->drop_reason = DROP_UNKNOWN_L3;
	return MA_PARSE_DROP;
}

static __always_inline int ma_is_syn(const struct ma_packet *pkt)
{
	return (pkt->tcp_flags & (MA_TCP_SYN | MA_TCP_ACK)) == MA_TCP_SYN;
}

static __always_inline void ma_addr_key_src(const struct ma_packet *pkt, struct ma_addr_key *k)
{
	k->family = pkt->family;
	__builtin_memcpy(k->addr, pkt->saddr, 16);
}

static __always_inline void ma_addr_key_dst(const struct ma_packet *pkt, struct ma_addr_key *k)
{
	k->family = pkt->family;
	__builtin_memcpy(k->addr, pkt->daddr, 16);
}

#endif
