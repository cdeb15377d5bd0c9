"""Find an enrolled pod's host-side veth from inside the pod's network namespace.

Enrollment is keyed by the host-side ifindex, so this is the step that turns
"the pod in netns X" into "packets arriving on ifindex N".
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.netns import enter

NETNS_RUN_DIR = "/run/netns"
_NS_GET_NSTYPE = 0xB703
_CLONE_NEWNET = 0x40000000


class PodNetworkError(ValueError):
    """The pod's netns or interface is not usable; the message says why and what to do."""


@dataclass(frozen=True)
class HostVeth:
    ifindex: int
    ifname: str
    mac: str
    pod_ifindex: int
    pod_addresses: tuple[str, ...]


def resolve_netns(ref: str) -> str:
    """A netns NAME (as in ``ip netns``) or PATH, checked to be a network namespace."""
    if not ref:
        raise PodNetworkError("netns is empty: give a name from 'ip netns list' or a path")
    path = ref if ref.startswith("/") else os.path.join(NETNS_RUN_DIR, ref)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise PodNetworkError(
            f"netns {ref!r} not found ({path} does not exist): check 'ip netns list' "
            "or pass the pod's netns path (/proc/<pid>/ns/net)") from None
    except OSError as exc:
        raise PodNetworkError(f"cannot open netns {path}: {exc.strerror}") from exc
    try:
        nstype = fcntl.ioctl(fd, _NS_GET_NSTYPE)
    except OSError:
        raise PodNetworkError(f"{path} is not a namespace file") from None
    finally:
        os.close(fd)
    if nstype != _CLONE_NEWNET:
        raise PodNetworkError(f"{path} is a namespace, but not a network namespace")
    return path


def _global_addresses(ns: IPRoute, ifindex: int) -> tuple[str, ...]:
    out = []
    for msg in ns.get_addr(index=ifindex):
        addr = ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
        if addr.is_link_local or addr.is_loopback:
            continue
        out.append(str(addr))
    return tuple(sorted(out))


def find_host_veth(netns_path: str, ifname: str = "eth0",
                   ipr: IPRoute | None = None) -> HostVeth:
    """Locate the node-side peer (in the calling process's netns) of ``ifname`` in the pod.

    Reads only; changes nothing. ``ipr`` is an open netlink socket of the node
    netns to reuse (enrollment is latency sensitive). Raises PodNetworkError
    with a next step when the interface is missing, is not a veth, or its peer
    is not in this netns.
    """
    try:
        with enter.netns(netns_path):
            pod = IPRoute()
    except (OSError, NetlinkError) as exc:
        raise PodNetworkError(f"cannot enter netns {netns_path}: {exc}") from exc
    try:
        idx = pod.link_lookup(ifname=ifname)
        if not idx:
            names = sorted(link.get_attr("IFLA_IFNAME") for link in pod.get_links())
            raise PodNetworkError(
                f"no interface {ifname!r} in netns {netns_path} (it has: {', '.join(names)}); "
                "pass --ifname")
        (link,) = pod.get_links(idx[0])
        kind = link.get_attr("IFLA_LINKINFO") and link.get_attr("IFLA_LINKINFO").get_attr(
            "IFLA_INFO_KIND")
        if kind != "veth":
            raise PodNetworkError(f"{ifname} in {netns_path} is {kind or 'not a veth'}; "
                                  "meshagent enrolls pods attached by a veth pair")
        peer_index = link.get_attr("IFLA_LINK")
        pod_addresses = _global_addresses(pod, idx[0])
        pod_ifindex = idx[0]
    finally:
        pod.close()
    if not pod_addresses:
        raise PodNetworkError(f"{ifname} in {netns_path} has no address yet: enroll the pod "
                              "after its IPs are configured (CNI chained after IPAM)")
    with contextlib.nullcontext(ipr) if ipr is not None else IPRoute() as node:
        try:
            (peer,) = node.get_links(peer_index)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                raise PodNetworkError(
                    f"the peer of {ifname} (ifindex {peer_index}) is not in the agent's netns: "
                    "run the agent in the node's network namespace") from None
            raise
        if peer.get_attr("IFLA_LINK") != pod_ifindex:
            raise PodNetworkError(
                f"ifindex {peer_index} in the node netns is not the peer of {ifname} "
                f"in {netns_path}: run the agent in the node's network namespace")
        return HostVeth(ifindex=peer_index, ifname=peer.get_attr("IFLA_IFNAME"),
                        mac=peer.get_attr("IFLA_ADDRESS"), pod_ifindex=pod_ifindex,
                        pod_addresses=pod_addresses)


def node_addresses(ipr: IPRoute | None = None) -> list[str]:
    """Every address configured in the calling process's netns (health-probe sources)."""
    with contextlib.nullcontext(ipr) if ipr is not None else IPRoute() as node:
        return sorted({str(ipaddress.ip_address(m.get_attr("IFA_ADDRESS")))
                       for m in node.get_addr()
                       if m.get_attr("IFA_ADDRESS")})
