"""tunnel_dev_ingress (bpf/tunnel_ingress.c): tc ingress of the agent's tunnel device.

Everything here was bounced by to_pod and is addressed to an enrolled pod: it is
assigned to the tunnel socket that owns it, or a SYN to the HBONE listener
(destination port 15008) or the plaintext inbound listener (15006). Drops are
counted against the destination pod's veth.
"""

from __future__ import annotations

import pytest
from bpf_harness import (
    AF_INET,
    AF_INET6,
    APP_PORT,
    CLIENT_PORT,
    HBONE_PORT,
    INBOUND_PORT,
    OTHER_POD_V4,
    POD_V4,
    POD_V6,
    REMOTE_V4,
    REMOTE_V6,
    TC_ACT_SHOT,
    TCP_ESTABLISHED,
    TCP_LISTEN,
    UNKNOWN_V4,
    Harness,
    assert_assigned,
    assert_dropped,
    assert_untouched,
    ip,
    tunnel_eth,
)
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment
from scapy.packet import Packet

from agent.datapath.drop_reasons import DropReason

pytestmark = pytest.mark.privileged

SYN_SPORT = 43000  # source port of SYNs that open no real connection

FAMILIES = [pytest.param((REMOTE_V4, POD_V4, AF_INET), id="v4"),
            pytest.param((REMOTE_V6, POD_V6, AF_INET6), id="v6")]


def tcp_frame(src: str, dst: str, flags: str = "S", *, sport: int = SYN_SPORT,
              dport: int = APP_PORT) -> Packet:
    return tunnel_eth() / ip(src, dst) / TCP(sport=sport, dport=dport, flags=flags)


def assert_assigned_here(dp: Harness, frame: Packet, *, state: int, family: int,
                         port: int) -> None:
    result = dp.tunnel(frame)
    assert_assigned(dp, result, state=state, family=family, port=port)
    assert result.data == bytes(frame)
    assert dp.all_counters() == {}  # to_pod already counted it as captured_in


@pytest.mark.parametrize("addrs", FAMILIES)
def test_syn_to_hbone_port_goes_to_the_hbone_listener(dp: Harness,
                                                     addrs: tuple[str, str, int]) -> None:
    remote, pod, family = addrs
    dp.listen_all(HBONE_PORT)
    dp.listen_all(INBOUND_PORT)
    assert_assigned_here(dp, tcp_frame(remote, pod, dport=HBONE_PORT), state=TCP_LISTEN,
                         family=family, port=HBONE_PORT)


@pytest.mark.parametrize("addrs", FAMILIES)
def test_syn_to_any_other_port_goes_to_the_inbound_listener(dp: Harness,
                                                           addrs: tuple[str, str, int]) -> None:
    remote, pod, family = addrs
    dp.listen_all(HBONE_PORT)
    dp.listen_all(INBOUND_PORT)
    assert_assigned_here(dp, tcp_frame(remote, pod), state=TCP_LISTEN, family=family,
                         port=INBOUND_PORT)


@pytest.mark.parametrize("dport,listening", [
    pytest.param(APP_PORT, HBONE_PORT, id="plaintext-without-inbound-listener"),
    pytest.param(HBONE_PORT, INBOUND_PORT, id="hbone-without-hbone-listener"),
])
def test_syn_without_its_listener_fails_closed(dp: Harness, dport: int,
                                               listening: int) -> None:
    """Only the listener for the port counts: no fallback to the other one."""
    dp.listen_all(listening)
    result = dp.tunnel(tcp_frame(REMOTE_V4, POD_V4, dport=dport))
    assert_dropped(dp, result, dp.net.pod_ifindex, DropReason.NO_LISTENER)


@pytest.mark.parametrize("dst,owner", [
    pytest.param(POD_V4, "pod", id="pod"),
    pytest.param(OTHER_POD_V4, "other_pod", id="other-pod"),
    pytest.param(UNKNOWN_V4, "none", id="not-a-pod"),
])
def test_drops_are_counted_against_the_destination_pod(dp: Harness, dst: str,
                                                       owner: str) -> None:
    ifindex = {"pod": dp.net.pod_ifindex, "other_pod": dp.net.other_pod_ifindex,
               "none": 0}[owner]
    result = dp.tunnel(tcp_frame(REMOTE_V4, dst))
    assert_dropped(dp, result, ifindex, DropReason.NO_LISTENER)


@pytest.mark.parametrize("flags", ["A", "PA", "SA", "R"])
@pytest.mark.parametrize("addrs", FAMILIES)
def test_non_syn_without_socket_is_dropped(dp: Harness, addrs: tuple[str, str, int],
                                           flags: str) -> None:
    """Passing would route it back to the pod's veth, and so back here."""
    remote, pod, _ = addrs
    dp.listen_all(INBOUND_PORT)
    result = dp.tunnel(tcp_frame(remote, pod, flags))
    assert_dropped(dp, result, dp.net.pod_ifindex, DropReason.NO_SOCKET)


@pytest.mark.parametrize("addrs", FAMILIES)
def test_established_socket_is_assigned(dp: Harness, addrs: tuple[str, str, int]) -> None:
    """The tunnel's inbound socket (local POD:APP_PORT, peer REMOTE:CLIENT_PORT) owns it."""
    remote, pod, family = addrs
    dp.listen_all(INBOUND_PORT)
    dp.connect(remote, CLIENT_PORT, pod, APP_PORT)
    frame = tcp_frame(remote, pod, "PA", sport=CLIENT_PORT, dport=APP_PORT)
    assert_assigned_here(dp, frame, state=TCP_ESTABLISHED, family=family, port=APP_PORT)


@pytest.mark.parametrize("frame", [
    pytest.param(tunnel_eth() / IP(src=REMOTE_V4, dst=POD_V4) / UDP(sport=53, dport=5353),
                 id="udp-v4"),
    pytest.param(tunnel_eth() / IPv6(src=REMOTE_V6, dst=POD_V6) / UDP(sport=53, dport=5353),
                 id="udp-v6"),
    pytest.param(tunnel_eth() / IP(src=REMOTE_V4, dst=POD_V4) / ICMP(), id="icmp"),
    pytest.param(tunnel_eth() / IPv6(src=REMOTE_V6, dst=POD_V6) / ICMPv6EchoRequest(),
                 id="icmpv6"),
])
def test_not_tcp_passes_untouched(dp: Harness, frame: Packet) -> None:
    assert_untouched(dp, dp.tunnel(frame), frame)


@pytest.mark.parametrize("frame", [
    pytest.param(tunnel_eth() / IP(src=REMOTE_V4, dst=POD_V4, ihl=4) / TCP(flags="S"),
                 id="v4-ihl-below-5"),
    pytest.param(tunnel_eth() / IP(src=REMOTE_V4, dst=POD_V4) / TCP(flags="S", dataofs=4),
                 id="v4-tcp-doff-below-5"),
    pytest.param(tunnel_eth() / IP(src=REMOTE_V4, dst=POD_V4, flags="MF") / TCP(flags="S"),
                 id="v4-fragment"),
    pytest.param(tunnel_eth() / IPv6(src=REMOTE_V6, dst=POD_V6) / IPv6ExtHdrFragment(m=1)
                 / TCP(flags="S"), id="v6-fragment"),
])
def test_malformed_is_dropped_uncounted(dp: Harness, frame: Packet) -> None:
    """Dropped before the destination is known, so no pod's counters move."""
    dp.listen_all(INBOUND_PORT)
    result = dp.tunnel(frame)
    assert result.retval == TC_ACT_SHOT
    assert dp.assigned() is None
    assert dp.all_counters() == {}


def test_missing_config_drops(dp: Harness) -> None:
    dp.clear_settings()
    dp.listen_all(INBOUND_PORT)
    result = dp.tunnel(tcp_frame(REMOTE_V4, POD_V4))
    assert_dropped(dp, result, dp.net.pod_ifindex, DropReason.NO_CONFIG)
