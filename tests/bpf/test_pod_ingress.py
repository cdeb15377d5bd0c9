"""to_pod (bpf/pod_ingress.c): tc egress of an enrolled pod's host-side veth.

Inbound TCP is bounced to the tunnel device's ingress: TC_ACT_REDIRECT with the
destination MAC rewritten to the tunnel device's. BPF_PROG_TEST_RUN returns the
verdict and the rewritten frame without performing the redirect.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from bpf_harness import (
    APP_PORT,
    CLIENT_PORT,
    NODE_V4,
    NODE_V6,
    OTHER_POD_V4,
    OTHER_POD_V6,
    POD_V4,
    POD_V6,
    REMOTE_V4,
    REMOTE_V6,
    TC_ACT_REDIRECT,
    TUNNEL_MAC,
    TUNNEL_MARK,
    UNKNOWN_V4,
    UNKNOWN_V6,
    Harness,
    assert_dropped,
    assert_untouched,
    default_settings,
    ip,
    mac_bytes,
    to_pod_eth,
)
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import ARP
from scapy.packet import Packet, Raw

from agent.datapath.drop_reasons import DropReason
from agent.datapath.maps import PodCounters

pytestmark = pytest.mark.privileged

SYN_SPORT = 42000  # source port of SYNs that open no real connection
OTHER_MARK = 0x1  # some unrelated skb mark that must not matter
IPPROTO_TCP = 6

FAMILIES = [pytest.param((REMOTE_V4, POD_V4), id="v4"), pytest.param((REMOTE_V6, POD_V6), id="v6")]


def tcp_frame(src: str, dst: str, flags: str = "S", *, sport: int = SYN_SPORT,
              dport: int = APP_PORT) -> Packet:
    return to_pod_eth() / ip(src, dst) / TCP(sport=sport, dport=dport, flags=flags)


def assert_redirected(dp: Harness, frame: Packet, *, mark: int = 0) -> None:
    """Bounced to the tunnel device, its MAC in front, counted as captured_in."""
    result = dp.to_pod(frame, mark=mark)
    assert result.retval == TC_ACT_REDIRECT
    assert result.data[:6] == mac_bytes(TUNNEL_MAC)
    assert result.data[6:] == bytes(frame)[6:]
    assert result.mark == mark
    assert dp.assigned() is None  # assignment happens on the tunnel device, not here
    assert dp.all_counters() == {dp.net.pod_ifindex: PodCounters(
        captured_in_packets=1, captured_in_bytes=len(frame))}


def test_not_enrolled_ifindex_passes_untouched(dp: Harness) -> None:
    frame = tcp_frame(REMOTE_V4, POD_V4)
    assert_untouched(dp, dp.to_pod(frame, ifindex=dp.net.peer_ifindex), frame)


@pytest.mark.parametrize("addrs", FAMILIES)
def test_tunnel_mark_passes_untouched(dp: Harness, addrs: tuple[str, str]) -> None:
    """The tunnel dialing the pod (its SO_MARK) is never bounced back to itself."""
    frame = tcp_frame(*addrs)
    assert_untouched(dp, dp.to_pod(frame, mark=TUNNEL_MARK), frame, mark=TUNNEL_MARK)


@pytest.mark.parametrize("frame", [
    pytest.param(to_pod_eth() / IP(src=REMOTE_V4, dst=POD_V4) / UDP(sport=53, dport=5353),
                 id="udp-v4"),
    pytest.param(to_pod_eth() / IPv6(src=REMOTE_V6, dst=POD_V6) / UDP(sport=53, dport=5353),
                 id="udp-v6"),
    pytest.param(to_pod_eth() / IP(src=REMOTE_V4, dst=POD_V4) / ICMP(), id="icmp"),
    pytest.param(to_pod_eth() / IPv6(src=REMOTE_V6, dst=POD_V6) / ICMPv6EchoRequest(),
                 id="icmpv6"),
    pytest.param(to_pod_eth() / ARP(psrc=REMOTE_V4, pdst=POD_V4), id="arp"),
])
def test_not_tcp_passes_untouched(dp: Harness, frame: Packet) -> None:
    assert_untouched(dp, dp.to_pod(frame), frame)


@pytest.mark.parametrize("src,dst", [
    pytest.param(REMOTE_V4, OTHER_POD_V4, id="v4-another-pods-address"),
    pytest.param(REMOTE_V4, UNKNOWN_V4, id="v4-nobodys-address"),
    pytest.param(REMOTE_V6, OTHER_POD_V6, id="v6-another-pods-address"),
    pytest.param(REMOTE_V6, UNKNOWN_V6, id="v6-nobodys-address"),
])
def test_not_addressed_to_this_pod_passes(dp: Harness, src: str, dst: str) -> None:
    frame = tcp_frame(src, dst)
    assert_untouched(dp, dp.to_pod(frame), frame)


@pytest.mark.parametrize("src,dst", [pytest.param(NODE_V4, POD_V4, id="v4"),
                                     pytest.param(NODE_V6, POD_V6, id="v6")])
def test_from_a_node_address_passes(dp: Harness, src: str, dst: str) -> None:
    """Kubelet-style probes from the node reach the pod directly."""
    frame = tcp_frame(src, dst)
    assert_untouched(dp, dp.to_pod(frame), frame)


@pytest.mark.parametrize("src,dst", [
    pytest.param(REMOTE_V4, POD_V4, id="v4-remote"),
    pytest.param(OTHER_POD_V4, POD_V4, id="v4-other-pod"),
    pytest.param(REMOTE_V6, POD_V6, id="v6-remote"),
    pytest.param(OTHER_POD_V6, POD_V6, id="v6-other-pod"),
])
def test_syn_is_redirected_to_the_tunnel_device(dp: Harness, src: str, dst: str) -> None:
    assert_redirected(dp, tcp_frame(src, dst))


def test_unrelated_mark_does_not_stop_the_redirect(dp: Harness) -> None:
    assert_redirected(dp, tcp_frame(REMOTE_V4, POD_V4), mark=OTHER_MARK)


@pytest.mark.parametrize("flags", ["A", "PA", "SA", "R"])
@pytest.mark.parametrize("addrs", FAMILIES)
def test_non_syn_without_tunnel_socket_passes(dp: Harness, addrs: tuple[str, str],
                                              flags: str) -> None:
    """A connection older than enrollment keeps reaching the pod directly."""
    frame = tcp_frame(*addrs, flags)
    assert_untouched(dp, dp.to_pod(frame), frame)


@pytest.mark.parametrize("addrs", FAMILIES)
def test_non_syn_owned_by_a_tunnel_socket_is_redirected(dp: Harness,
                                                        addrs: tuple[str, str]) -> None:
    """The tunnel's inbound socket (local POD:APP_PORT, peer REMOTE:CLIENT_PORT) owns it."""
    remote, pod = addrs
    dp.connect(remote, CLIENT_PORT, pod, APP_PORT)
    assert_redirected(dp, tcp_frame(remote, pod, "PA", sport=CLIENT_PORT, dport=APP_PORT))


def test_listener_on_the_port_does_not_own_a_segment(dp: Harness) -> None:
    dp.listen("0.0.0.0", APP_PORT)
    frame = tcp_frame(REMOTE_V4, POD_V4, "A")
    assert_untouched(dp, dp.to_pod(frame), frame)


def _v4(**fields: Any) -> Packet:
    return to_pod_eth() / IP(src=REMOTE_V4, dst=POD_V4, **fields)


def _syn() -> TCP:
    return TCP(sport=SYN_SPORT, dport=APP_PORT, flags="S")


@pytest.mark.parametrize("frame,reason", [
    pytest.param(_v4(ihl=4) / _syn(), DropReason.MALFORMED, id="v4-ihl-below-5"),
    pytest.param(_v4(proto=IPPROTO_TCP) / Raw(bytes(_syn())[:10]), DropReason.MALFORMED,
                 id="v4-truncated-tcp"),
    pytest.param(_v4() / TCP(sport=SYN_SPORT, dport=APP_PORT, flags="S", dataofs=4),
                 DropReason.MALFORMED, id="v4-tcp-doff-below-5"),
    pytest.param(to_pod_eth() / IPv6(src=REMOTE_V6, dst=POD_V6, nh=IPPROTO_TCP)
                 / Raw(bytes(_syn())[:10]), DropReason.MALFORMED, id="v6-truncated-tcp"),
    pytest.param(_v4(flags="MF") / _syn(), DropReason.FRAGMENT, id="v4-fragment"),
    pytest.param(to_pod_eth() / IPv6(src=REMOTE_V6, dst=POD_V6) / IPv6ExtHdrFragment(m=1)
                 / _syn(), DropReason.FRAGMENT, id="v6-fragment"),
])
def test_malformed_or_fragmented_tcp_is_dropped(dp: Harness, frame: Packet,
                                                reason: DropReason) -> None:
    assert_dropped(dp, dp.to_pod(frame), dp.net.pod_ifindex, reason)


def test_missing_config_drops(dp: Harness) -> None:
    """Before the agent writes its settings nothing reaches an enrolled pod uncaptured."""
    dp.clear_settings()
    result = dp.to_pod(tcp_frame(REMOTE_V4, POD_V4))
    assert_dropped(dp, result, dp.net.pod_ifindex, DropReason.NO_CONFIG)


def test_missing_tunnel_device_drops(dp: Harness) -> None:
    dp.maps.set_settings(dataclasses.replace(default_settings(dp.net), tunnel_ifindex=0))
    result = dp.to_pod(tcp_frame(REMOTE_V4, POD_V4))
    assert_dropped(dp, result, dp.net.pod_ifindex, DropReason.REDIRECT_FAILED)
