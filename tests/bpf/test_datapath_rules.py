"""The datapath rule (bpf/lib/parse.h): what an enrolled pod may send and receive.

Each row of the table is run through the REAL from_pod (the pod sends it) and
to_pod (it is about to enter the pod) with BPF_PROG_TEST_RUN. Everything the
table does not allow is dropped and counted under its reason, never passed.

BPF_PROG_TEST_RUN builds the skb with eth_type_trans only, so a tag stays in
the frame's data (skb->protocol 0x8100/0x88a8), as on tc egress. On a real
receive the kernel moves the outer tag to skb->vlan_tci first; the lab suite
(tests/integration/test_bad_input_lab.py) sends the same frames for real.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from bpf_harness import (
    APP_PORT,
    OUTBOUND_PORT,
    POD_V4,
    POD_V6,
    REMOTE_V4,
    REMOTE_V6,
    Harness,
    assert_dropped,
    assert_untouched,
    from_pod_eth,
    to_pod_eth,
)
from scapy.contrib.geneve import GENEVE
from scapy.contrib.lldp import LLDPDUChassisID, LLDPDUEndOfLLDPDU, LLDPDUPortID, LLDPDUTimeToLive
from scapy.contrib.mpls import MPLS
from scapy.layers.inet import GRE, ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import ARP, LLC, STP, Dot1AD, Dot1Q, Ether
from scapy.layers.ppp import PPPoED
from scapy.layers.vxlan import VXLAN
from scapy.packet import Packet, Raw

from agent.datapath.drop_reasons import DropReason
from agent.datapath.testrun import RunResult

pytestmark = pytest.mark.privileged

SYN_SPORT = 43000
IPPROTO_ETHERIP = 97
IPPROTO_L2TP = 115
IPPROTO_MPLS = 137

# A frame builder: (ethernet header, local address, remote address) -> frame.
# "local" is the pod's address, "remote" the other end; the direction test
# below puts them in the right order.
Build = Callable[[Ether, str, str], Packet]
DIRECTIONS = ["from_pod", "to_pod"]


def _syn() -> TCP:
    return TCP(sport=SYN_SPORT, dport=APP_PORT, flags="S")


def _inner_v4(src: str, dst: str) -> Packet:
    return IP(src=src, dst=dst) / _syn()


def run(dp: Harness, direction: str, build: Build,
        v6: bool = False) -> tuple[Packet, RunResult]:
    pod, remote = (POD_V6, REMOTE_V6) if v6 else (POD_V4, REMOTE_V4)
    if direction == "from_pod":
        frame = build(from_pod_eth(), pod, remote)
        return frame, dp.from_pod(frame)
    # Into the pod: the pod's address is the destination.
    frame = build(to_pod_eth(), remote, pod)
    return frame, dp.to_pod(frame)


# -- 802.1Q / 802.1ad: every tagged frame is dropped ----------------------------

TAGGED: list[object] = [
    pytest.param(lambda e, s, d: e / Dot1Q(vlan=0) / IP(src=s, dst=d) / _syn(),
                 id="priority-tag"),
    pytest.param(lambda e, s, d: e / Dot1Q(vlan=0) / Dot1Q(vlan=0) / IP(src=s, dst=d) / _syn(),
                 id="two-priority-tags"),
    pytest.param(lambda e, s, d: e / Dot1Q(vlan=0) / Dot1Q(vlan=0) / Dot1Q(vlan=0)
                 / IP(src=s, dst=d) / _syn(), id="three-priority-tags"),
    pytest.param(lambda e, s, d: e / Dot1AD(vlan=0) / Dot1Q(vlan=0) / IP(src=s, dst=d) / _syn(),
                 id="802.1ad-outer-priority"),
    pytest.param(lambda e, s, d: e / Dot1AD(vlan=0) / IP(src=s, dst=d) / _syn(),
                 id="802.1ad-priority"),
    pytest.param(lambda e, s, d: e / Dot1Q(vlan=100) / IP(src=s, dst=d) / _syn(),
                 id="vlan-100"),
    pytest.param(lambda e, s, d: e / Dot1AD(vlan=200) / Dot1Q(vlan=100) / IP(src=s, dst=d)
                 / _syn(), id="qinq"),
    pytest.param(lambda e, s, d: e / Dot1Q(vlan=0) / IP(src=s, dst=d) / UDP(dport=53),
                 id="priority-tagged-udp"),
    pytest.param(lambda e, s, d: e / Dot1Q(vlan=0) / ARP(psrc=s, pdst=d),
                 id="priority-tagged-arp"),
    pytest.param(lambda e, s, d: e / Dot1Q(vlan=0) / IPv6(src="fd00::1", dst="fd00::2") / _syn(),
                 id="priority-tagged-v6"),
    pytest.param(lambda e, s, d: e / Dot1Q(vlan=0), id="tag-truncated"),
]


@pytest.mark.parametrize("build", TAGGED)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_tagged_frames_are_dropped(dp: Harness, direction: str, build: Build) -> None:
    """Regression (issue 10): priority tags hid a SYN from the parser; the kernel
    strips them after tc and routed it, spoofed sources included."""
    dp.listen_all(OUTBOUND_PORT)
    _, result = run(dp, direction, build)
    assert_dropped(dp, result, dp.net.pod_ifindex, DropReason.VLAN_TAGGED)


def test_tagged_frame_with_a_spoofed_source_is_dropped_as_tagged(dp: Harness) -> None:
    dp.listen_all(OUTBOUND_PORT)
    frame = from_pod_eth() / Dot1Q(vlan=0) / Dot1Q(vlan=0) / IP(src="203.0.113.9",
                                                                dst=REMOTE_V4) / _syn()
    assert_dropped(dp, dp.from_pod(frame), dp.net.pod_ifindex, DropReason.VLAN_TAGGED)


# -- encapsulations the kernel would decapsulate --------------------------------

ENCAPSULATED: list[object] = [
    pytest.param(lambda e, s, d: e / IP(src=s, dst=d) / _inner_v4("203.0.113.9", REMOTE_V4),
                 False, id="ipip"),
    pytest.param(lambda e, s, d: e / IP(src=s, dst=d)
                 / IPv6(src="2001:db8:99::9", dst=REMOTE_V6) / _syn(), False, id="ipv6-in-ipv4"),
    pytest.param(lambda e, s, d: e / IP(src=s, dst=d) / GRE() / _inner_v4("203.0.113.9",
                                                                         REMOTE_V4),
                 False, id="gre"),
    pytest.param(lambda e, s, d: e / IP(src=s, dst=d, proto=IPPROTO_ETHERIP) / Raw(bytes(2))
                 / Ether() / _inner_v4("203.0.113.9", REMOTE_V4), False, id="etherip"),
    pytest.param(lambda e, s, d: e / IP(src=s, dst=d, proto=IPPROTO_L2TP) / Raw(bytes(8)),
                 False, id="l2tpv3"),
    pytest.param(lambda e, s, d: e / IP(src=s, dst=d, proto=IPPROTO_MPLS) / MPLS()
                 / _inner_v4("203.0.113.9", REMOTE_V4), False, id="mpls-in-ip"),
    pytest.param(lambda e, s, d: e / IP(src=s, dst=d) / UDP(sport=40000, dport=4789) / VXLAN()
                 / Ether() / _inner_v4("203.0.113.9", REMOTE_V4), False, id="vxlan-4789"),
    pytest.param(lambda e, s, d: e / IP(src=s, dst=d) / UDP(sport=40000, dport=8472) / VXLAN()
                 / Ether() / _inner_v4("203.0.113.9", REMOTE_V4), False, id="vxlan-8472"),
    pytest.param(lambda e, s, d: e / IP(src=s, dst=d) / UDP(sport=40000, dport=4790)
                 / Raw(bytes(8)), False, id="vxlan-gpe"),
    pytest.param(lambda e, s, d: e / IP(src=s, dst=d) / UDP(sport=40000, dport=6081) / GENEVE()
                 / Ether() / _inner_v4("203.0.113.9", REMOTE_V4), False, id="geneve"),
    pytest.param(lambda e, s, d: e / IP(src=s, dst=d, flags="MF") / UDP(sport=1, dport=4789)
                 / Raw(bytes(32)), False, id="vxlan-first-fragment"),
    pytest.param(lambda e, s, d: e / IPv6(src=s, dst=d) / _inner_v4("203.0.113.9", REMOTE_V4),
                 True, id="ipip6"),
    pytest.param(lambda e, s, d: e / IPv6(src=s, dst=d)
                 / IPv6(src="2001:db8:99::9", dst=REMOTE_V6) / _syn(), True, id="ip6ip6"),
    pytest.param(lambda e, s, d: e / IPv6(src=s, dst=d) / GRE()
                 / _inner_v4("203.0.113.9", REMOTE_V4), True, id="gre-v6"),
    pytest.param(lambda e, s, d: e / IPv6(src=s, dst=d) / IPv6ExtHdrHopByHop()
                 / IPv6ExtHdrDestOpt() / IPv6(src="2001:db8:99::9", dst=REMOTE_V6) / _syn(),
                 True, id="ip6ip6-behind-exthdrs"),
    pytest.param(lambda e, s, d: e / IPv6(src=s, dst=d) / IPv6ExtHdrFragment(m=1)
                 / IPv6(src="2001:db8:99::9", dst=REMOTE_V6) / _syn(), True,
                 id="ip6ip6-in-first-fragment"),
    pytest.param(lambda e, s, d: e / IPv6(src=s, dst=d) / UDP(sport=40000, dport=4789) / VXLAN()
                 / Ether() / _inner_v4("203.0.113.9", REMOTE_V4), True, id="vxlan-v6"),
    pytest.param(lambda e, s, d: e / IPv6(src=s, dst=d) / IPv6ExtHdrDestOpt()
                 / UDP(sport=40000, dport=6081) / GENEVE(), True, id="geneve-v6-behind-exthdr"),
    # The fragment header names the encapsulated protocol: judged without the payload.
    pytest.param(lambda e, s, d: e / IPv6(src=s, dst=d) / IPv6ExtHdrFragment(offset=8, nh=4)
                 / Raw(bytes(16)), True, id="ipip6-later-fragment"),
]


@pytest.mark.parametrize("build,v6", ENCAPSULATED)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_encapsulations_are_dropped(dp: Harness, direction: str, build: Build, v6: bool) -> None:
    dp.listen_all(OUTBOUND_PORT)
    _, result = run(dp, direction, build, v6)
    assert_dropped(dp, result, dp.net.pod_ifindex, DropReason.ENCAPSULATED)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_truncated_udp_header_is_malformed(dp: Harness, direction: str) -> None:
    dp.listen_all(OUTBOUND_PORT)
    _, result = run(dp, direction, lambda e, s, d: e / IP(src=s, dst=d, proto=17) / Raw(b"\0\1"))
    assert_dropped(dp, result, dp.net.pod_ifindex, DropReason.MALFORMED)


# -- the allow list: ARP and IP that is not TCP pass ----------------------------

ALLOWED: list[object] = [
    pytest.param(lambda e, s, d: e / ARP(psrc=s, pdst=d), False, id="arp"),
    pytest.param(lambda e, s, d: e / IPv6(src=s, dst="ff02::1:ff00:1") / ICMPv6ND_NS(tgt=d),
                 True, id="nd-solicitation"),
    pytest.param(lambda e, s, d: e / IPv6(src="fe80::1", dst="ff02::1") / ICMPv6ND_RA(),
                 True, id="nd-router-advert"),
    pytest.param(lambda e, s, d: e / IP(src=s, dst=d) / ICMP(), False, id="icmp"),
    pytest.param(lambda e, s, d: e / IP(src=s, dst=d) / UDP(sport=5353, dport=53), False,
                 id="udp-dns"),
    pytest.param(lambda e, s, d: e / IP(src=s, dst=d) / UDP(sport=5353, dport=4788), False,
                 id="udp-next-to-vxlan-port"),
    pytest.param(lambda e, s, d: e / IP(src=s, dst=d, frag=100, proto=17) / Raw(bytes(8)),
                 False, id="udp-later-fragment"),
    pytest.param(lambda e, s, d: e / IP(src=s, dst=d, proto=132) / Raw(bytes(12)), False,
                 id="sctp"),
]


@pytest.mark.parametrize("build,v6", ALLOWED)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_allow_list_passes(dp: Harness, direction: str, build: Build, v6: bool) -> None:
    dp.listen_all(OUTBOUND_PORT)
    frame, result = run(dp, direction, build, v6)
    assert_untouched(dp, result, frame)


# -- everything else: dropped as an unknown L3 ---------------------------------

UNKNOWN: list[object] = [
    pytest.param(lambda e, s, d: e / MPLS() / _inner_v4(s, d), id="mpls-unicast"),
    pytest.param(lambda e, s, d: Ether(src=e.src, dst=e.dst, type=0x8848) / MPLS()
                 / _inner_v4(s, d), id="mpls-multicast"),
    pytest.param(lambda e, s, d: e / PPPoED(), id="pppoe-discovery"),
    pytest.param(lambda e, s, d: Ether(src=e.src, dst="01:80:c2:00:00:0e")
                 / LLDPDUChassisID(subtype=4, id=b"\x02\0\0\0\0\1")
                 / LLDPDUPortID(subtype=5, id=b"eth0") / LLDPDUTimeToLive(ttl=120)
                 / LLDPDUEndOfLLDPDU(), id="lldp"),
    pytest.param(lambda e, s, d: Ether(src=e.src, dst="01:80:c2:00:00:00") / LLC() / STP(),
                 id="stp-802.3"),
    pytest.param(lambda e, s, d: Ether(src=e.src, dst=e.dst, type=0x8137) / Raw(bytes(30)),
                 id="ipx"),
    pytest.param(lambda e, s, d: Ether(src=e.src, dst=e.dst, type=0x88B5) / Raw(bytes(30)),
                 id="local-experimental"),
    pytest.param(lambda e, s, d: Ether(src=e.src, dst=e.dst, type=0x8035) / Raw(bytes(28)),
                 id="rarp"),
]


@pytest.mark.parametrize("build", UNKNOWN)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_unknown_ethertypes_are_dropped(dp: Harness, direction: str, build: Build) -> None:
    dp.listen_all(OUTBOUND_PORT)
    _, result = run(dp, direction, build)
    assert_dropped(dp, result, dp.net.pod_ifindex, DropReason.UNKNOWN_L3)


def test_unenrolled_veth_is_not_judged(dp: Harness) -> None:
    """The rule is for enrolled pods only: another veth's tagged frame is not ours."""
    frame = from_pod_eth() / Dot1Q(vlan=0) / IP(src=POD_V4, dst=REMOTE_V4) / _syn()
    assert_untouched(dp, dp.from_pod(frame, ifindex=dp.net.peer_ifindex), frame)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_udp_to_a_configured_tunnel_port_is_dropped(dp: Harness, direction: str) -> None:
    """datapath.encapsulation_udp_ports: the node's own tunnels (a custom VXLAN
    dstport, FOU/GUE) on other ports; the well-known ones need no configuration."""
    build: Build = lambda e, s, d: e / IP(src=s, dst=d) / UDP(sport=40000, dport=5555) \
        / Raw(bytes(16))  # noqa: E731
    frame, result = run(dp, direction, build)
    assert_untouched(dp, result, frame)
    dp.maps.set_encapsulation_ports([5555])
    _, result = run(dp, direction, build)
    assert_dropped(dp, result, dp.net.pod_ifindex, DropReason.ENCAPSULATED)
