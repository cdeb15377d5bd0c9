"""DNS capture (MA_POD_F_DNS) with BPF_PROG_TEST_RUN: a pod's UDP and TCP queries to
port 53 are handed to the tunnel's DNS proxy (ma_config.dns_port); with no proxy
socket they pass untouched to the pod's real resolver (DNS fails open); a pod
without the flag (opted out) is never touched; everything else is as before.
A bridged pod's query (MA_POD_F_BRIDGED) is redirected to the tunnel device instead,
where tunnel_dev_ingress assigns it to the same UDP socket / TCP listener.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator

import pytest
from bpf_harness import (
    AF_INET,
    AF_INET6,
    CAPTURE_MARK,
    EXCLUDED_CIDR_V4,
    EXCLUDED_DST_V4,
    OTHER_POD_V4,
    OUTBOUND_PORT,
    POD_V4,
    POD_V6,
    REDIRECT_MARK,
    REMOTE_V4,
    REMOTE_V6,
    TC_ACT_OK,
    TC_ACT_SHOT,
    TCP_LISTEN,
    Harness,
    assert_assigned,
    assert_dropped,
    assert_redirected_out,
    assert_untouched,
    default_settings,
    from_pod_eth,
    ip,
    is_v6,
    tunnel_eth,
)
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import IPv6ExtHdrFragment
from scapy.packet import Packet, Raw

from agent.datapath.drop_reasons import DropReason
from agent.datapath.maps import POD_F_BRIDGED, POD_F_DNS, PodCounters

pytestmark = pytest.mark.privileged

DNS_PORT = 15053
QUERY_SPORT = 45000
FAMILIES = [pytest.param((POD_V4, REMOTE_V4, AF_INET), id="v4"),
            pytest.param((POD_V6, REMOTE_V6, AF_INET6), id="v6")]


def query(src: str, dst: str, *, dport: int = 53) -> Packet:
    return (from_pod_eth() / ip(src, dst) / UDP(sport=QUERY_SPORT, dport=dport)
            / Raw(b"\x12\x34" + b"\x01\x00" + b"\x00\x01" + b"\x00" * 6))


def syn(src: str, dst: str, *, dport: int = 53) -> Packet:
    return from_pod_eth() / ip(src, dst) / TCP(sport=QUERY_SPORT, dport=dport, flags="S")


@pytest.fixture
def dns_dp(dp: Harness) -> Iterator[Harness]:
    """The defaults, with the DNS port configured and POD's DNS captured."""
    dp.maps.set_settings(dataclasses.replace(default_settings(dp.net), dns_port=DNS_PORT))
    dp.maps.add_pod(dp.net.pod_ifindex, dp.pods[dp.net.pod_ifindex], POD_F_DNS)
    yield dp


def udp_listen(dp: Harness, address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if is_v6(address) else socket.AF_INET
    sock = dp._sockets.enter_context(socket.socket(family, socket.SOCK_DGRAM))
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((address, port))
    return sock


def assert_assigned_udp(dp: Harness, frame: Packet, family: int) -> None:
    result = dp.from_pod(frame)
    assert result.retval == TC_ACT_OK and result.mark == CAPTURE_MARK
    got = dp.assigned()
    assert got is not None and (got.family, got.port) == (family, DNS_PORT)
    assert dp.all_counters() == {dp.net.pod_ifindex: PodCounters(
        captured_out_packets=1, captured_out_bytes=len(frame))}


@pytest.mark.parametrize("addrs", FAMILIES)
def test_udp_query_goes_to_the_dns_socket(dns_dp: Harness, addrs: tuple[str, str, int]) -> None:
    udp_listen(dns_dp, "0.0.0.0", DNS_PORT)
    udp_listen(dns_dp, "::", DNS_PORT)
    assert_assigned_udp(dns_dp, query(addrs[0], addrs[1]), addrs[2])


@pytest.mark.parametrize("addrs", FAMILIES)
def test_tcp_query_goes_to_the_dns_listener(dns_dp: Harness,
                                             addrs: tuple[str, str, int]) -> None:
    dns_dp.listen_all(DNS_PORT)
    dns_dp.listen_all(OUTBOUND_PORT)
    result = dns_dp.from_pod(syn(addrs[0], addrs[1]))
    assert_assigned(dns_dp, result, state=TCP_LISTEN, family=addrs[2], port=DNS_PORT)


def test_tcp_query_without_a_dns_listener_is_captured_as_any_tcp(dns_dp: Harness) -> None:
    dns_dp.listen_all(OUTBOUND_PORT)
    result = dns_dp.from_pod(syn(POD_V4, REMOTE_V4))
    assert_assigned(dns_dp, result, state=TCP_LISTEN, family=AF_INET, port=OUTBOUND_PORT)


@pytest.mark.parametrize("addrs", FAMILIES)
def test_no_dns_socket_fails_open(dns_dp: Harness, addrs: tuple[str, str, int]) -> None:
    frame = query(addrs[0], addrs[1])
    assert_untouched(dns_dp, dns_dp.from_pod(frame), frame)


def test_opted_out_pod_is_untouched(dns_dp: Harness) -> None:
    udp_listen(dns_dp, "0.0.0.0", DNS_PORT)
    dns_dp.listen_all(DNS_PORT)
    dns_dp.listen_all(OUTBOUND_PORT)
    dns_dp.maps.add_pod(dns_dp.net.pod_ifindex, dns_dp.pods[dns_dp.net.pod_ifindex], 0)
    frame = query(POD_V4, REMOTE_V4)
    assert_untouched(dns_dp, dns_dp.from_pod(frame), frame)
    # Its TCP to 53 is captured as any TCP (to the outbound listener).
    result = dns_dp.from_pod(syn(POD_V4, REMOTE_V4))
    assert_assigned(dns_dp, result, state=TCP_LISTEN, family=AF_INET, port=OUTBOUND_PORT)


def test_no_dns_port_configured_is_untouched(dns_dp: Harness) -> None:
    udp_listen(dns_dp, "0.0.0.0", DNS_PORT)
    dns_dp.maps.set_settings(default_settings(dns_dp.net))  # dns_port 0
    frame = query(POD_V4, REMOTE_V4)
    assert_untouched(dns_dp, dns_dp.from_pod(frame), frame)


def test_other_udp_and_excluded_resolvers_pass(dns_dp: Harness) -> None:
    udp_listen(dns_dp, "0.0.0.0", DNS_PORT)
    for frame in (query(POD_V4, REMOTE_V4, dport=5353),
                  query(POD_V4, EXCLUDED_DST_V4)):
        assert EXCLUDED_CIDR_V4
        assert_untouched(dns_dp, dns_dp.from_pod(frame), frame)


def test_fragmented_query_is_not_captured(dns_dp: Harness) -> None:
    udp_listen(dns_dp, "::", DNS_PORT)
    udp_listen(dns_dp, "0.0.0.0", DNS_PORT)
    v4 = (from_pod_eth() / ip(POD_V4, REMOTE_V4, flags="MF") / UDP(sport=QUERY_SPORT, dport=53)
          / Raw(b"x" * 16))
    v6 = (from_pod_eth() / ip(POD_V6, REMOTE_V6) / IPv6ExtHdrFragment(m=1, id=7)
          / UDP(sport=QUERY_SPORT, dport=53) / Raw(b"x" * 16))
    for frame in (v4, v6):
        assert_untouched(dns_dp, dns_dp.from_pod(frame), frame)


def test_spoofed_query_is_dropped(dns_dp: Harness) -> None:
    udp_listen(dns_dp, "0.0.0.0", DNS_PORT)
    result = dns_dp.from_pod(query(OTHER_POD_V4, REMOTE_V4))
    assert_dropped(dns_dp, result, dns_dp.net.pod_ifindex, DropReason.SPOOFED_SOURCE)


# -- bridged pods: redirected at the veth, assigned at the tunnel device ------------------

def enroll_bridged_dns(dp: Harness, flags: int = POD_F_BRIDGED | POD_F_DNS) -> None:
    dp.maps.add_pod(dp.net.pod_ifindex, dp.pods[dp.net.pod_ifindex], flags)


def redirected_query(src: str, dst: str) -> Packet:
    return (tunnel_eth() / ip(src, dst) / UDP(sport=QUERY_SPORT, dport=53)
            / Raw(b"\x12\x34" + b"\x01\x00" + b"\x00\x01" + b"\x00" * 6))


def redirected_syn(src: str, dst: str) -> Packet:
    return tunnel_eth() / ip(src, dst) / TCP(sport=QUERY_SPORT, dport=53, flags="S")


@pytest.mark.parametrize("addrs", FAMILIES)
def test_bridged_udp_query_is_redirected_to_the_tunnel_device(
        dns_dp: Harness, addrs: tuple[str, str, int]) -> None:
    udp_listen(dns_dp, "0.0.0.0", DNS_PORT)
    udp_listen(dns_dp, "::", DNS_PORT)
    enroll_bridged_dns(dns_dp)
    assert_redirected_out(dns_dp, query(addrs[0], addrs[1]))


@pytest.mark.parametrize("addrs", FAMILIES)
def test_bridged_udp_query_without_a_dns_socket_fails_open(
        dns_dp: Harness, addrs: tuple[str, str, int]) -> None:
    enroll_bridged_dns(dns_dp)
    frame = query(addrs[0], addrs[1])
    assert_untouched(dns_dp, dns_dp.from_pod(frame), frame)


def test_bridged_opted_out_pod_dns_is_untouched(dns_dp: Harness) -> None:
    udp_listen(dns_dp, "0.0.0.0", DNS_PORT)
    enroll_bridged_dns(dns_dp, POD_F_BRIDGED)
    frame = query(POD_V4, REMOTE_V4)
    assert_untouched(dns_dp, dns_dp.from_pod(frame), frame)


def test_bridged_udp_query_without_redirect_mark_is_dropped(dns_dp: Harness) -> None:
    """An agent that set no redirect_mark: never assigned at the veth, where it is lost."""
    udp_listen(dns_dp, "0.0.0.0", DNS_PORT)
    dns_dp.maps.set_settings(dataclasses.replace(default_settings(dns_dp.net),
                                                 dns_port=DNS_PORT, redirect_mark=0))
    enroll_bridged_dns(dns_dp)
    result = dns_dp.from_pod(query(POD_V4, REMOTE_V4))
    assert_dropped(dns_dp, result, dns_dp.net.pod_ifindex, DropReason.REDIRECT_FAILED)


@pytest.mark.parametrize("addrs", FAMILIES)
def test_bridged_tcp_query_is_redirected(dns_dp: Harness, addrs: tuple[str, str, int]) -> None:
    dns_dp.listen_all(DNS_PORT)
    enroll_bridged_dns(dns_dp)
    assert_redirected_out(dns_dp, syn(addrs[0], addrs[1]))


@pytest.mark.parametrize("addrs", FAMILIES)
def test_tunnel_device_assigns_a_redirected_udp_query_to_the_dns_socket(
        dns_dp: Harness, addrs: tuple[str, str, int]) -> None:
    udp_listen(dns_dp, "0.0.0.0", DNS_PORT)
    udp_listen(dns_dp, "::", DNS_PORT)
    enroll_bridged_dns(dns_dp)
    result = dns_dp.tunnel(redirected_query(addrs[0], addrs[1]), mark=REDIRECT_MARK)
    assert result.retval == TC_ACT_OK and result.mark == CAPTURE_MARK
    got = dns_dp.assigned()
    assert got is not None and (got.family, got.port) == (addrs[2], DNS_PORT)
    assert dns_dp.all_counters() == {}  # from_pod counted it


def test_tunnel_device_redirected_udp_query_without_a_dns_socket_is_dropped(
        dns_dp: Harness) -> None:
    """The DNS socket closed after from_pod found it: dropped and counted for the pod
    (the resolver's retry then passes at the veth)."""
    enroll_bridged_dns(dns_dp)
    result = dns_dp.tunnel(redirected_query(POD_V6, REMOTE_V6), mark=REDIRECT_MARK)
    assert result.retval == TC_ACT_SHOT and dns_dp.assigned() is None
    assert dns_dp.all_counters() == {dns_dp.net.pod_ifindex: PodCounters(
        drops={DropReason.NO_LISTENER: 1})}


def test_tunnel_device_passes_udp_nobody_redirected(dns_dp: Harness) -> None:
    udp_listen(dns_dp, "0.0.0.0", DNS_PORT)
    frame = redirected_query(POD_V4, REMOTE_V4)
    assert_untouched(dns_dp, dns_dp.tunnel(frame), frame)


@pytest.mark.parametrize("addrs", FAMILIES)
def test_tunnel_device_assigns_a_redirected_tcp_query_to_the_dns_listener(
        dns_dp: Harness, addrs: tuple[str, str, int]) -> None:
    dns_dp.listen_all(DNS_PORT)
    dns_dp.listen_all(OUTBOUND_PORT)
    enroll_bridged_dns(dns_dp)
    result = dns_dp.tunnel(redirected_syn(addrs[0], addrs[1]), mark=REDIRECT_MARK)
    assert_assigned(dns_dp, result, state=TCP_LISTEN, family=addrs[2], port=DNS_PORT)


@pytest.mark.parametrize("flags", [pytest.param(POD_F_BRIDGED | POD_F_DNS, id="no-listener"),
                                   pytest.param(POD_F_BRIDGED, id="opted-out")])
def test_tunnel_device_other_tcp_to_53_goes_to_the_outbound_listener(
        dns_dp: Harness, flags: int) -> None:
    """No DNS listener (as from_pod: captured as any TCP), or a pod whose DNS is not
    captured."""
    if not flags & POD_F_DNS:
        dns_dp.listen_all(DNS_PORT)
    dns_dp.listen_all(OUTBOUND_PORT)
    enroll_bridged_dns(dns_dp, flags)
    result = dns_dp.tunnel(redirected_syn(POD_V4, REMOTE_V4), mark=REDIRECT_MARK)
    assert_assigned(dns_dp, result, state=TCP_LISTEN, family=AF_INET, port=OUTBOUND_PORT)
