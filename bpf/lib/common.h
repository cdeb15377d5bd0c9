/* Shared definitions for every meshagent program: constants, map value types,
 * the datapath config. Included once per compile by each attach point.
 */
#ifndef MESHAGENT_COMMON_H
#define MESHAGENT_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/in.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>

#include "lib/drop_reasons.h"

#define MA_AF_INET 2
#define MA_AF_INET6 10

#define MA_TCP_LISTEN 10

/* "Not ours": continue with the next tc filter on the device (a primary CNI's,
 * an operator's) instead of ending classification, so they still see every
 * packet we do not capture. Captured packets end with TC_ACT_OK. */
#define MA_PASS TC_ACT_UNSPEC

/* Sized for at least 65,536 pods, each with one IPv4 and one IPv6 address. */
#ifndef MA_MAX_PODS
#define MA_MAX_PODS 65536
#endif
#define MA_MAX_POD_ADDRS (2 * MA_MAX_PODS)
#define MA_MAX_NODE_ADDRS 1024
#define MA_MAX_EXCLUDED_PORTS 1024
#define MA_MAX_EXCLUDED_CIDRS 1024
#define MA_MAX_ENCAP_PORTS 64

/* IPv6 extension headers walked before giving up (fail closed). */
#define MA_MAX_EXTHDRS 6

/* An address of either family: IPv4 uses the first 4 bytes of addr. */
struct ma_addr_key {
	__u32 family;
	__u8 addr[16];
};

struct ma_lpm_key {
	__u32 prefixlen; /* 8 bits of family + the CIDR's prefix length */
	__u8 family;
	__u8 addr[16];
} __attribute__((packed));

/* The pod's host veth is a port of a bridge (or any device with a master:
 * its rx_handler would take the frame next). A bridge forwards by MAC before
 * routing, and br_netfilter orphans the skb (setup_pre_routing: skb_orphan),
 * so a socket assigned at the veth's ingress is lost: captured packets of
 * such a pod are redirected to the tunnel device's ingress instead and
 * assigned there (tunnel_ingress.c). */
#define MA_POD_F_BRIDGED 0x1
/* The pod's DNS (UDP and TCP to port 53) goes to the tunnel's DNS proxy
 * (ma_config.dns_port). Unset: the pod opted out, or the node does not capture DNS. */
#define MA_POD_F_DNS 0x2
#define MA_DNS_PORT 53

struct ma_pod_info {
	__u32 flags;
	__u32 reserved;
};

struct ma_config {
	__u32 capture_mark;
	__u32 capture_mask;
	__u32 tunnel_mark;   /* SO_MARK of tunnel sockets, never recaptured */
	__u32 tunnel_ifindex;/* agent-owned device whose ingress assigns inbound sockets */
	__u16 outbound_port;
	__u16 inbound_port;
	__u16 hbone_port;
	__u8 tunnel_mac[6];
	__u16 dns_port;      /* the tunnel's DNS proxy (UDP and TCP); 0: no DNS capture */
	__u32 redirect_mark; /* under capture_mask: from_pod redirected it to the tunnel device */
};

struct ma_pod_stats {
	__u64 captured_out_packets;
	__u64 captured_out_bytes;
	__u64 captured_in_packets;
	__u64 captured_in_bytes;
	__u64 drops[DROP_REASON_MAX];
};

#endif
