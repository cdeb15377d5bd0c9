"""from_pod (bpf/pod_egress.c): tc ingress of an enrolled pod's host-side veth.

One test (or parametrized group) per branch of the program's header comment,
run on the REAL program with BPF_PROG_TEST_RUN; bpf_sk_assign is the test
mock that records the socket in ma_test_assigned.
"""

from __future__ import annotations

from typing import Any

import pytest
from bpf_harness import (
    AF_INET,
    AF_INET6,
    APP_PORT,
    CAPTURE_MARK,
    CAPTURE_MASK,
    CLIENT_PORT,
    EXCLUDED_DST_V4,
    EXCLUDED_DST_V6,
    EXCLUDED_PORT,
    OTHER_POD_V4,
    OTHER_POD_V6,
    OUTBOUND_PORT,
    POD_V4,
    POD_V6,
    REMOTE_V4,
    REMOTE_V6,
    TC_ACT_OK,
    TCP_ESTABLISHED,
    TCP_LISTEN,
    Harness,
    assert_assigned,
    assert_dropped,
    assert_untouched,
    family_of,
    from_pod_eth,
    ip,
)
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import ARP
from scapy.packet import Packet, Raw

from agent.datapath.drop_reasons import DropReason
from agent.datapath.maps import PodCounters

pytestmark = pytest.mark.privileged

# Addresses of this file's traffic; the shared ones come from bpf_harness.
JUST_OUTSIDE_EXCLUDED_V4 = "198.18.2.5"  # next /24 after EXCLUDED_CIDR_V4
JUST_OUTSIDE_EXCLUDED_V6 = "2001:db8:2::5"  # next /48 after EXCLUDED_CIDR_V6
SYN_SPORT = 41000  # source port of SYNs that open no real connection
IPV6_EXTHDR_LIMIT = 6  # MA_MAX_EXTHDRS in bpf/lib/common.h
IPPROTO_TCP = 6
IPPROTO_DSTOPTS = 60
AH_ICV = b"\0" * 12
AH_PAYLOADLEN = 4  # (12 fixed + 12 ICV bytes) / 4 - 2

FAMILIES = [pytest.param((POD_V4, REMOTE_V4), id="v4"), pytest.param((POD_V6, REMOTE_V6), id="v6")]


def tcp_frame(src: str, dst: str, flags: str = "S", *, sport: int = SYN_SPORT,
              dport: int = APP_PORT) -> Packet:
    return from_pod_eth() / ip(src, dst) / TCP(sport=sport, dport=dport, flags=flags)


def assert_captured_out(dp: Harness, frame: Packet, *, state: int, port: int,
                        mark: int = 0) -> None:
    result = dp.from_pod(frame, mark=mark)
    src = frame[IPv6].src if IPv6 in frame else frame[IP].src
    expected_mark = (mark & ~CAPTURE_MASK) | CAPTURE_MARK
    assert_assigned(dp, result, state=state, family=family_of(src), port=port,
                    mark=expected_mark)
    assert result.data == bytes(frame)
    assert dp.all_counters() == {dp.net.pod_ifindex: PodCounters(
        captured_out_packets=1, captured_out_bytes=len(frame))}


# -- not enrolled --------------------------------------------------------------

def test_not_enrolled_ifindex_passes_untouched(dp: Harness) -> None:
    dp.listen_all(OUTBOUND_PORT)
    frame = tcp_frame(POD_V4, REMOTE_V4)
    result = dp.from_pod(frame, ifindex=dp.net.peer_ifindex)
    assert_untouched(dp, result, frame)


# -- SYN -> outbound listener --------------------------------------------------

@pytest.mark.parametrize("addrs", FAMILIES)
def test_syn_is_assigned_to_outbound_listener(dp: Harness, addrs: tuple[str, str]) -> None:
    dp.listen_all(OUTBOUND_PORT)
    assert_captured_out(dp, tcp_frame(*addrs), state=TCP_LISTEN, port=OUTBOUND_PORT)


def test_capture_mark_keeps_bits_outside_the_mask(dp: Harness) -> None:
    dp.listen_all(OUTBOUND_PORT)
    assert_captured_out(dp, tcp_frame(POD_V4, REMOTE_V4), state=TCP_LISTEN,
                        port=OUTBOUND_PORT, mark=0x1_0F01)


@pytest.mark.parametrize("addrs", FAMILIES)
def test_syn_without_listener_fails_closed(dp: Harness, addrs: tuple[str, str]) -> None:
    result = dp.from_pod(tcp_frame(*addrs))
    assert_dropped(dp, result, dp.net.pod_ifindex, DropReason.NO_LISTENER)


def test_listener_of_the_other_family_does_not_count(dp: Harness) -> None:
    dp.listen("::", OUTBOUND_PORT)  # V6ONLY
    result = dp.from_pod(tcp_frame(POD_V4, REMOTE_V4))
    assert_dropped(dp, result, dp.net.pod_ifindex, DropReason.NO_LISTENER)


def test_syn_ack_is_not_a_new_syn(dp: Harness) -> None:
    dp.listen_all(OUTBOUND_PORT)
    frame = tcp_frame(POD_V4, REMOTE_V4, "SA")
    assert_untouched(dp, dp.from_pod(frame), frame)


# -- non-SYN -------------------------------------------------------------------

@pytest.mark.parametrize("flags", ["A", "PA", "FA", "R"])
@pytest.mark.parametrize("addrs", FAMILIES)
def test_non_syn_without_socket_passes(dp: Harness, addrs: tuple[str, str], flags: str) -> None:
    """A connection older than enrollment keeps flowing, uncaptured."""
    dp.listen_all(OUTBOUND_PORT)
    frame = tcp_frame(*addrs, flags)
    assert_untouched(dp, dp.from_pod(frame), frame)


@pytest.mark.parametrize("addrs", FAMILIES)
def test_established_socket_is_assigned(dp: Harness, addrs: tuple[str, str]) -> None:
    """The tunnel's accepted socket (local REMOTE:APP_PORT, peer POD:CLIENT_PORT) owns it."""
    pod, remote = addrs
    dp.connect(pod, CLIENT_PORT, remote, APP_PORT)
    frame = tcp_frame(pod, remote, "PA", sport=CLIENT_PORT, dport=APP_PORT)
    assert_captured_out(dp, frame, state=TCP_ESTABLISHED, port=APP_PORT)


def test_established_socket_wins_over_exclusions(dp: Harness) -> None:
    """Exclusions decide new connections only; an owned segment always goes to its owner."""
    dp.connect(POD_V4, CLIENT_PORT, REMOTE_V4, EXCLUDED_PORT)
    frame = tcp_frame(POD_V4, REMOTE_V4, "A", sport=CLIENT_PORT, dport=EXCLUDED_PORT)
    assert_captured_out(dp, frame, state=TCP_ESTABLISHED, port=EXCLUDED_PORT)


# -- exclusions ----------------------------------------------------------------

@pytest.mark.parametrize("addrs", FAMILIES)
def test_excluded_port_passes(dp: Harness, addrs: tuple[str, str]) -> None:
    dp.listen_all(OUTBOUND_PORT)
    frame = tcp_frame(*addrs, dport=EXCLUDED_PORT)
    assert_untouched(dp, dp.from_pod(frame), frame)


@pytest.mark.parametrize("addrs", [pytest.param((POD_V4, EXCLUDED_DST_V4), id="v4"),
                                   pytest.param((POD_V6, EXCLUDED_DST_V6), id="v6")])
def test_excluded_cidr_passes(dp: Harness, addrs: tuple[str, str]) -> None:
    dp.listen_all(OUTBOUND_PORT)
    frame = tcp_frame(*addrs)
    assert_untouched(dp, dp.from_pod(frame), frame)


@pytest.mark.parametrize("addrs", [pytest.param((POD_V4, JUST_OUTSIDE_EXCLUDED_V4), id="v4"),
                                   pytest.param((POD_V6, JUST_OUTSIDE_EXCLUDED_V6), id="v6")])
def test_address_outside_excluded_cidr_is_captured(dp: Harness, addrs: tuple[str, str]) -> None:
    dp.listen_all(OUTBOUND_PORT)
    assert_captured_out(dp, tcp_frame(*addrs), state=TCP_LISTEN, port=OUTBOUND_PORT)


# -- not TCP -------------------------------------------------------------------

NOT_TCP = [
    pytest.param(from_pod_eth() / IP(src=POD_V4, dst=REMOTE_V4) / UDP(sport=5353, dport=53),
                 id="udp-v4"),
    pytest.param(from_pod_eth() / IPv6(src=POD_V6, dst=REMOTE_V6) / UDP(sport=5353, dport=53),
                 id="udp-v6"),
    pytest.param(from_pod_eth() / IP(src=POD_V4, dst=REMOTE_V4) / ICMP(), id="icmp"),
    pytest.param(from_pod_eth() / IPv6(src=POD_V6, dst=REMOTE_V6) / ICMPv6EchoRequest(),
                 id="icmpv6"),
    pytest.param(from_pod_eth() / ARP(psrc=POD_V4, pdst=REMOTE_V4), id="arp"),
    pytest.param(from_pod_eth() / IPv6(src=POD_V6, dst=REMOTE_V6) / IPv6ExtHdrHopByHop()
                 / IPv6ExtHdrDestOpt() / UDP(sport=5353, dport=53), id="exthdrs-then-udp"),
    pytest.param(from_pod_eth() / IP(src=POD_V4, dst=REMOTE_V4, flags="MF")
                 / UDP(sport=5353, dport=53), id="udp-v4-fragment"),
    pytest.param(from_pod_eth() / IPv6(src=POD_V6, dst=REMOTE_V6)
                 / IPv6ExtHdrFragment(offset=8, nh=17) / Raw(b"\0" * 16),
                 id="udp-v6-later-fragment"),
    # Not TCP, so not even the source is checked: spoofing is only enforced for TCP.
    pytest.param(from_pod_eth() / IP(src=REMOTE_V4, dst=POD_V4) / UDP(sport=53, dport=53),
                 id="udp-foreign-source"),
]


@pytest.mark.parametrize("frame", NOT_TCP)
def test_not_tcp_passes_untouched(dp: Harness, frame: Packet) -> None:
    dp.listen_all(OUTBOUND_PORT)
    assert_untouched(dp, dp.from_pod(frame), frame)


# -- spoofing ------------------------------------------------------------------

@pytest.mark.parametrize("flags", ["S", "A"])
@pytest.mark.parametrize("src,dst", [
    pytest.param(REMOTE_V4, REMOTE_V4, id="v4-foreign"),
    pytest.param(OTHER_POD_V4, REMOTE_V4, id="v4-other-pods-address"),
    pytest.param(REMOTE_V6, REMOTE_V6, id="v6-foreign"),
    pytest.param(OTHER_POD_V6, REMOTE_V6, id="v6-other-pods-address"),
])
def test_spoofed_source_is_dropped(dp: Harness, src: str, dst: str, flags: str) -> None:
    dp.listen_all(OUTBOUND_PORT)
    result = dp.from_pod(tcp_frame(src, dst, flags))
    assert_dropped(dp, result, dp.net.pod_ifindex, DropReason.SPOOFED_SOURCE)


def test_address_of_another_pod_is_accepted_from_that_pods_veth(dp: Harness) -> None:
    dp.listen_all(OUTBOUND_PORT)
    frame = tcp_frame(OTHER_POD_V4, REMOTE_V4)
    result = dp.from_pod(frame, ifindex=dp.net.other_pod_ifindex)
    assert_assigned(dp, result, state=TCP_LISTEN, family=AF_INET, port=OUTBOUND_PORT)
    assert dp.all_counters() == {dp.net.other_pod_ifindex: PodCounters(
        captured_out_packets=1, captured_out_bytes=len(frame))}


# -- malformed and fragments ---------------------------------------------------

def _v4(**fields: Any) -> Packet:
    return from_pod_eth() / IP(src=POD_V4, dst=REMOTE_V4, **fields)


def _v6() -> Packet:
    return from_pod_eth() / IPv6(src=POD_V6, dst=REMOTE_V6)


def _syn() -> TCP:
    return TCP(sport=SYN_SPORT, dport=APP_PORT, flags="S")


MALFORMED = [
    pytest.param(_v4(ihl=4) / _syn(), id="v4-ihl-below-5"),
    pytest.param(_v4(version=6) / _syn(), id="v4-ethertype-with-version-6"),
    pytest.param(_v4(proto=IPPROTO_TCP) / Raw(bytes(_syn())[:10]), id="v4-truncated-tcp"),
    pytest.param(_v4() / TCP(sport=SYN_SPORT, dport=APP_PORT, flags="S", dataofs=4),
                 id="v4-tcp-doff-below-5"),
    # BPF_PROG_TEST_RUN refuses (EINVAL) a frame shorter than the fixed IP header,
    # so a truncated IPv4 header is one whose options run past the frame's end.
    pytest.param(_v4(ihl=15) / _syn(), id="v4-truncated-ip-header-options"),
    pytest.param(_v6() / IPv6ExtHdrHopByHop(nh=IPPROTO_TCP) / Raw(bytes(_syn())[:10]),
                 id="v6-truncated-tcp-after-exthdr"),
    pytest.param(_v6() / TCP(sport=SYN_SPORT, dport=APP_PORT, flags="S", dataofs=4),
                 id="v6-tcp-doff-below-5"),
    pytest.param(from_pod_eth() / IPv6(src=POD_V6, dst=REMOTE_V6, nh=IPPROTO_DSTOPTS)
                 / Raw(bytes([IPPROTO_TCP])), id="v6-truncated-exthdr"),
]


@pytest.mark.parametrize("frame", MALFORMED)
def test_malformed_tcp_is_dropped(dp: Harness, frame: Packet | bytes) -> None:
    dp.listen_all(OUTBOUND_PORT)
    result = dp.from_pod(frame)
    assert_dropped(dp, result, dp.net.pod_ifindex, DropReason.MALFORMED)


def test_ipv4_options_do_not_hide_the_syn(dp: Harness) -> None:
    dp.listen_all(OUTBOUND_PORT)
    frame = _v4(options=[IPOption(b"\x01\x01\x01\x00"), IPOption(b"\x01\x01\x01\x00")]) / _syn()
    assert frame[IP].ihl is None and IP(bytes(frame[IP])).ihl == 7
    assert_captured_out(dp, frame, state=TCP_LISTEN, port=OUTBOUND_PORT)


@pytest.mark.parametrize("fields", [
    pytest.param({"flags": "MF"}, id="more-fragments"),
    pytest.param({"frag": 185}, id="offset"),
    pytest.param({"flags": "MF", "frag": 185}, id="middle"),
])
def test_ipv4_tcp_fragment_is_dropped(dp: Harness, fields: dict[str, object]) -> None:
    dp.listen_all(OUTBOUND_PORT)
    result = dp.from_pod(_v4(**fields) / _syn())
    assert_dropped(dp, result, dp.net.pod_ifindex, DropReason.FRAGMENT)


def test_ipv4_dont_fragment_is_not_a_fragment(dp: Harness) -> None:
    dp.listen_all(OUTBOUND_PORT)
    assert_captured_out(dp, _v4(flags="DF") / _syn(), state=TCP_LISTEN, port=OUTBOUND_PORT)


def test_ipv6_extension_headers_before_tcp_are_walked(dp: Harness) -> None:
    dp.listen_all(OUTBOUND_PORT)
    frame = (_v6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting()
             / _syn())
    assert_captured_out(dp, frame, state=TCP_LISTEN, port=OUTBOUND_PORT)


def test_ipv6_authentication_header_is_walked(dp: Harness) -> None:
    """AH counts its length in 4-byte units (+2), unlike the other extension headers."""
    dp.listen_all(OUTBOUND_PORT)
    frame = (_v6() / IPv6ExtHdrHopByHop()
             / AH(nh=IPPROTO_DSTOPTS, payloadlen=AH_PAYLOADLEN, spi=1, icv=AH_ICV)
             / IPv6ExtHdrDestOpt() / _syn())
    assert_captured_out(dp, frame, state=TCP_LISTEN, port=OUTBOUND_PORT)


def test_ipv6_exactly_the_limit_of_extension_headers_is_walked(dp: Harness) -> None:
    dp.listen_all(OUTBOUND_PORT)
    frame: Packet = _v6() / IPv6ExtHdrHopByHop()
    for _ in range(IPV6_EXTHDR_LIMIT - 1):
        frame = frame / IPv6ExtHdrDestOpt()
    assert_captured_out(dp, frame / _syn(), state=TCP_LISTEN, port=OUTBOUND_PORT)


def test_ipv6_more_extension_headers_than_the_limit_are_dropped(dp: Harness) -> None:
    dp.listen_all(OUTBOUND_PORT)
    frame: Packet = _v6() / IPv6ExtHdrHopByHop()
    for _ in range(IPV6_EXTHDR_LIMIT):
        frame = frame / IPv6ExtHdrDestOpt()
    result = dp.from_pod(frame / _syn())
    assert_dropped(dp, result, dp.net.pod_ifindex, DropReason.EXTHDR_LIMIT)


@pytest.mark.parametrize("fragment", [
    pytest.param(IPv6ExtHdrFragment(), id="atomic"),
    pytest.param(IPv6ExtHdrFragment(m=1), id="first"),
    pytest.param(IPv6ExtHdrFragment(offset=8), id="last"),
])
def test_ipv6_tcp_fragment_is_dropped(dp: Harness, fragment: IPv6ExtHdrFragment) -> None:
    dp.listen_all(OUTBOUND_PORT)
    result = dp.from_pod(_v6() / fragment / _syn())
    assert_dropped(dp, result, dp.net.pod_ifindex, DropReason.FRAGMENT)


@pytest.mark.parametrize("fragment", [
    pytest.param(IPv6ExtHdrFragment(), id="atomic"),
    pytest.param(IPv6ExtHdrFragment(m=1), id="first"),
])
def test_ipv6_tcp_fragment_behind_more_headers_is_dropped(
        dp: Harness, fragment: IPv6ExtHdrFragment) -> None:
    """Destination options between the fragment header and TCP must not hide the fragment.

    Regression: the walk used to stop at a first fragment whose next header was
    not TCP and pass it, so such a SYN escaped capture.
    """
    dp.listen_all(OUTBOUND_PORT)
    result = dp.from_pod(_v6() / fragment / IPv6ExtHdrDestOpt() / _syn())
    assert_dropped(dp, result, dp.net.pod_ifindex, DropReason.FRAGMENT)


def test_ipv6_later_fragment_behind_more_headers_is_dropped(dp: Harness) -> None:
    """Its upper layer is unknown (it may be TCP): it cannot be classified, so it is
    dropped (it used to pass, and left the node in clear)."""
    dp.listen_all(OUTBOUND_PORT)
    frame = _v6() / IPv6ExtHdrFragment(offset=8, nh=IPPROTO_DSTOPTS) / Raw(bytes(16))
    assert_dropped(dp, dp.from_pod(frame), dp.net.pod_ifindex, DropReason.FRAGMENT)


# -- configuration -------------------------------------------------------------

def test_missing_config_drops_tcp(dp: Harness) -> None:
    """Before the agent writes its settings a pod's TCP is dropped, never let through."""
    dp.clear_settings()
    dp.listen_all(OUTBOUND_PORT)
    result = dp.from_pod(tcp_frame(POD_V4, REMOTE_V4))
    assert_dropped(dp, result, dp.net.pod_ifindex, DropReason.NO_CONFIG)


def test_missing_config_still_passes_non_tcp(dp: Harness) -> None:
    dp.clear_settings()
    frame = from_pod_eth() / IP(src=POD_V4, dst=REMOTE_V4) / UDP(sport=5353, dport=53)
    assert_untouched(dp, dp.from_pod(frame), frame)


def test_counters_accumulate_per_pod(dp: Harness) -> None:
    dp.listen_all(OUTBOUND_PORT)
    syn = tcp_frame(POD_V4, REMOTE_V4)
    for _ in range(3):
        assert dp.from_pod(syn).retval == TC_ACT_OK
    dp.from_pod(tcp_frame(REMOTE_V4, REMOTE_V4))
    assert dp.all_counters() == {dp.net.pod_ifindex: PodCounters(
        captured_out_packets=3, captured_out_bytes=3 * len(syn),
        drops={DropReason.SPOOFED_SOURCE: 1})}


def test_v6_assignment_reports_v6_socket(dp: Harness) -> None:
    dp.listen_all(OUTBOUND_PORT)
    dp.from_pod(tcp_frame(POD_V6, REMOTE_V6))
    assigned = dp.assigned()
    assert assigned is not None and assigned.family == AF_INET6
