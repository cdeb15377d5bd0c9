"""Bridged pods (MA_POD_F_BRIDGED) and node-local services, with BPF_PROG_TEST_RUN.

On a bridge CNI the pod's host veth is a bridge port: a socket assigned at its
tc ingress is lost (the bridge forwards by MAC, and br_netfilter's
setup_pre_routing orphans the skb), so from_pod redirects what it captures to
the tunnel device instead, marked with REDIRECT_MARK, and tunnel_dev_ingress
assigns it there: established socket first, else the outbound listener.

A pod's connection to a node-local service goes through the tunnel like any
other (as Istio ambient captures it); the service's reply comes from a node
address, and to_pod hands it to the tunnel socket that owns it. Probes (a SYN
from a node address) still reach the pod directly.
"""

from __future__ import annotations

import dataclasses

import pytest
from bpf_harness import (
    AF_INET,
    AF_INET6,
    APP_PORT,
    CAPTURE_MARK,
    CLIENT_PORT,
    EXCLUDED_PORT,
    NODE_V4,
    NODE_V6,
    OTHER_POD_V4,
    OUTBOUND_PORT,
    POD_V4,
    POD_V6,
    REDIRECT_MARK,
    REMOTE_V4,
    REMOTE_V6,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    TCP_ESTABLISHED,
    TCP_LISTEN,
    TUNNEL_MAC,
    Harness,
    assert_assigned,
    assert_dropped,
    assert_redirected_out,
    assert_untouched,
    default_settings,
    from_pod_eth,
    ip,
    mac_bytes,
    to_pod_eth,
    tunnel_eth,
)
from scapy.layers.inet import TCP
from scapy.packet import Packet

from agent.datapath import testrun
from agent.datapath.drop_reasons import DropReason
from agent.datapath.maps import PodCounters

pytestmark = pytest.mark.privileged

SYN_SPORT = 44000
FAMILIES = [pytest.param((POD_V4, REMOTE_V4, AF_INET), id="v4"),
            pytest.param((POD_V6, REMOTE_V6, AF_INET6), id="v6")]


def out_frame(src: str, dst: str, flags: str = "S", *, sport: int = SYN_SPORT,
              dport: int = APP_PORT) -> Packet:
    return from_pod_eth() / ip(src, dst) / TCP(sport=sport, dport=dport, flags=flags)


# -- from_pod on a bridge port --------------------------------------------------

@pytest.mark.parametrize("addrs", FAMILIES)
def test_bridged_syn_is_redirected_to_the_tunnel_device(
        dp: Harness, addrs: tuple[str, str, int]) -> None:
    dp.enroll_bridged()
    dp.listen_all(OUTBOUND_PORT)
    assert_redirected_out(dp, out_frame(addrs[0], addrs[1]))


def test_bridged_redirect_keeps_mark_bits_outside_the_mask(dp: Harness) -> None:
    dp.enroll_bridged()
    dp.listen_all(OUTBOUND_PORT)
    assert_redirected_out(dp, out_frame(POD_V4, REMOTE_V4), mark=0x1_0F01)


@pytest.mark.parametrize("addrs", FAMILIES)
def test_bridged_segment_a_socket_owns_is_redirected(
        dp: Harness, addrs: tuple[str, str, int]) -> None:
    """E.g. the pod's reply to the tunnel dialing it from a client's address: on a
    bridge it would be forwarded by MAC to the real client, never to the tunnel."""
    pod, remote, _ = addrs
    dp.enroll_bridged()
    dp.connect(pod, CLIENT_PORT, remote, APP_PORT)
    assert_redirected_out(dp, out_frame(pod, remote, "PA", sport=CLIENT_PORT))


def test_bridged_pod_keeps_every_other_rule(dp: Harness) -> None:
    dp.enroll_bridged()
    dp.listen_all(OUTBOUND_PORT)
    passed = out_frame(POD_V4, REMOTE_V4, "A")  # no socket: older than enrollment
    assert_untouched(dp, dp.from_pod(passed), passed)
    excluded = out_frame(POD_V4, REMOTE_V4, dport=EXCLUDED_PORT)
    assert_untouched(dp, dp.from_pod(excluded), excluded)
    result = dp.from_pod(out_frame(OTHER_POD_V4, REMOTE_V4))
    assert_dropped(dp, result, dp.net.pod_ifindex, DropReason.SPOOFED_SOURCE)


def test_bridged_syn_without_listener_fails_closed(dp: Harness) -> None:
    dp.enroll_bridged()
    result = dp.from_pod(out_frame(POD_V4, REMOTE_V4))
    assert_dropped(dp, result, dp.net.pod_ifindex, DropReason.NO_LISTENER)


def test_bridged_without_redirect_mark_fails_closed(dp: Harness) -> None:
    """An agent that did not set redirect_mark: drop, never assign where it is lost."""
    dp.maps.set_settings(dataclasses.replace(default_settings(dp.net), redirect_mark=0))
    dp.enroll_bridged()
    dp.listen_all(OUTBOUND_PORT)
    result = dp.from_pod(out_frame(POD_V4, REMOTE_V4))
    assert result.retval == TC_ACT_SHOT
    assert dp.all_counters() == {dp.net.pod_ifindex: PodCounters(
        drops={DropReason.REDIRECT_FAILED: 1})}


def test_ptp_pod_is_still_assigned_in_place(dp: Harness) -> None:
    dp.listen_all(OUTBOUND_PORT)
    result = dp.from_pod(out_frame(POD_V4, REMOTE_V4))
    assert_assigned(dp, result, state=TCP_LISTEN, family=AF_INET, port=OUTBOUND_PORT)


# -- tunnel_dev_ingress: the outbound half ----------------------------------------

def redirected(src: str, dst: str, flags: str = "S", *, sport: int = SYN_SPORT) -> Packet:
    return tunnel_eth() / ip(src, dst) / TCP(sport=sport, dport=APP_PORT, flags=flags)


def assert_dropped_redirected(dp: Harness, result: testrun.RunResult,
                              reason: DropReason) -> None:
    """Dropped, counted for the SENDING pod (found by source address)."""
    assert result.retval == TC_ACT_SHOT
    assert dp.assigned() is None
    assert dp.all_counters() == {dp.net.pod_ifindex: PodCounters(drops={reason: 1})}


@pytest.mark.parametrize("addrs", FAMILIES)
def test_tunnel_device_assigns_a_redirected_syn_to_the_outbound_listener(
        dp: Harness, addrs: tuple[str, str, int]) -> None:
    pod, remote, family = addrs
    dp.listen_all(OUTBOUND_PORT)
    dp.listen_all(15006)  # the inbound listener must not win
    result = dp.tunnel(redirected(pod, remote), mark=REDIRECT_MARK)
    assert_assigned(dp, result, state=TCP_LISTEN, family=family, port=OUTBOUND_PORT,
                    mark=CAPTURE_MARK)
    assert dp.all_counters() == {}  # from_pod counted it


def test_tunnel_device_assigns_a_redirected_segment_to_its_socket(dp: Harness) -> None:
    dp.connect(POD_V4, CLIENT_PORT, REMOTE_V4, APP_PORT)
    result = dp.tunnel(redirected(POD_V4, REMOTE_V4, "PA", sport=CLIENT_PORT),
                       mark=REDIRECT_MARK)
    assert_assigned(dp, result, state=TCP_ESTABLISHED, family=AF_INET, port=APP_PORT,
                    mark=CAPTURE_MARK)


def test_tunnel_device_drops_a_redirected_segment_nobody_owns(dp: Harness) -> None:
    dp.listen_all(OUTBOUND_PORT)
    result = dp.tunnel(redirected(POD_V4, REMOTE_V4, "A"), mark=REDIRECT_MARK)
    assert_dropped_redirected(dp, result, DropReason.NO_SOCKET)


def test_tunnel_device_redirected_syn_without_listener_fails_closed(dp: Harness) -> None:
    result = dp.tunnel(redirected(POD_V6, REMOTE_V6), mark=REDIRECT_MARK)
    assert_dropped_redirected(dp, result, DropReason.NO_LISTENER)


# -- to_pod: node-local services and probes ---------------------------------------

@pytest.mark.parametrize("node,pod", [pytest.param(NODE_V4, POD_V4, id="v4"),
                                      pytest.param(NODE_V6, POD_V6, id="v6")])
def test_reply_of_a_node_service_to_a_tunnel_socket_is_redirected(
        dp: Harness, node: str, pod: str) -> None:
    """Regression (issue 10): the tunnel dials a node-local service from the pod's
    address; the service's SYN-ACK comes from a node address and used to pass
    straight into the pod, which reset it."""
    dp.connect(node, APP_PORT, pod, CLIENT_PORT)  # local pod:CLIENT_PORT owns the reply
    frame = to_pod_eth() / ip(node, pod) / TCP(sport=APP_PORT, dport=CLIENT_PORT, flags="SA")
    result = dp.to_pod(frame)
    assert result.retval == TC_ACT_REDIRECT
    assert result.data[:6] == mac_bytes(TUNNEL_MAC)


@pytest.mark.parametrize("flags", ["S", "A", "PA"])
def test_probe_from_a_node_address_reaches_the_pod_directly(dp: Harness, flags: str) -> None:
    dp.listen_all(15006)
    frame = to_pod_eth() / ip(NODE_V4, POD_V4) / TCP(sport=SYN_SPORT, dport=APP_PORT,
                                                      flags=flags)
    assert_untouched(dp, dp.to_pod(frame), frame)


def test_pod_flags_can_be_rewritten_in_place(dp: Harness) -> None:
    """The agent re-flags a pod whose veth joined a bridge after enrollment."""
    from agent.datapath.maps import POD_F_BRIDGED

    dp.listen_all(OUTBOUND_PORT)
    assert dp.maps.pod_flags(dp.net.pod_ifindex) == 0
    assert dp.maps.set_pod_flags(dp.net.pod_ifindex, POD_F_BRIDGED)
    assert dp.maps.pod_flags(dp.net.pod_ifindex) == POD_F_BRIDGED
    assert_redirected_out(dp, out_frame(POD_V4, REMOTE_V4))
    assert not dp.maps.set_pod_flags(dp.net.peer_ifindex, POD_F_BRIDGED)  # not enrolled
    assert dp.maps.pod_flags(dp.net.peer_ifindex) is None
