"""Find an enrolled pod's host-side veth from inside the pod's network namespace.

Enrollment is keyed by the host-side ifindex, so this is the step that turns
"the pod in netns X" into "packets arriving on ifindex N".
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
from dataclasses import dataclass

from pyroute2 import IPRoute

from agent.netns import enter
from agent.netns.rtnl import RtnlSocket

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
    master: int | None = None  # ifindex of the bridge the host veth is a port of

    @property
    def bridged(self) -> bool:
        """A port of a bridge (or another master): frames go to its rx_handler."""
        return self.master is not None


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


_RT_SCOPE_UNIVERSE = 0


def _global_addresses(rtnl: RtnlSocket, ifindex: int) -> tuple[str, ...]:
    out = []
    for _index, scope, address in rtnl.addresses(ifindex):
        ip = ipaddress.ip_address(address)
        if scope != _RT_SCOPE_UNIVERSE or ip.is_link_local or ip.is_loopback:
            continue
        out.append(str(ip))
    return tuple(sorted(out))


def find_host_veth(netns_path: str, ifname: str = "eth0",
                   node: RtnlSocket | None = None) -> HostVeth:
    """Locate the node-side peer (in the calling thread's netns) of ``ifname`` in the pod.

    Reads only; changes nothing. ``node`` is an open rtnetlink socket of the
    node netns to reuse (enrollment is latency sensitive). Raises
    PodNetworkError with a next step when the interface is missing, is not a
    veth, or its peer is not in this netns.
    """
    try:
        with enter.netns(netns_path):
            pod = RtnlSocket()
    except OSError as exc:
        raise PodNetworkError(f"cannot enter netns {netns_path}: {exc}") from exc
    with pod:
        link = pod.link(name=ifname)
        if link is None:
            names = sorted(name for _i, name in _link_names(netns_path))
            raise PodNetworkError(
                f"no interface {ifname!r} in netns {netns_path} (it has: {', '.join(names)}); "
                "pass --ifname")
        if link.kind != "veth" or link.link is None:
            raise PodNetworkError(f"{ifname} in {netns_path} is {link.kind or 'not a veth'}; "
                                  "meshagent enrolls pods attached by a veth pair")
        pod_addresses = _global_addresses(pod, link.index)
    if not pod_addresses:
        raise PodNetworkError(f"{ifname} in {netns_path} has no address yet: enroll the pod "
                              "after its IPs are configured (CNI chained after IPAM)")
    with contextlib.nullcontext(node) if node is not None else RtnlSocket() as node_rtnl:
        peer = node_rtnl.link(index=link.link)
    if peer is None:
        raise PodNetworkError(
            f"the peer of {ifname} (ifindex {link.link}) is not in the agent's netns: "
            "run the agent in the node's network namespace")
    if peer.link != link.index or peer.kind != "veth":
        raise PodNetworkError(
            f"ifindex {link.link} in the node netns is not the peer of {ifname} "
            f"in {netns_path}: run the agent in the node's network namespace")
    return HostVeth(ifindex=peer.index, ifname=peer.name, mac=peer.mac or "",
                    pod_ifindex=link.index, pod_addresses=pod_addresses, master=peer.master)


def _link_names(netns_path: str) -> list[tuple[int, str]]:
    """Interfaces of a netns, for error messages only."""
    with enter.netns(netns_path):
        ipr = IPRoute()
    with ipr:
        return [(m["index"], m.get_attr("IFLA_IFNAME")) for m in ipr.get_links()]


def _probe_source(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return not ip.is_loopback and not (ip.version == 6 and ip.is_link_local)


def link_addresses(node: RtnlSocket, ifindex: int) -> list[str]:
    """The probe-source addresses on one node link (e.g. a pod gateway on its veth)."""
    found = {ipaddress.ip_address(a) for _i, _s, a in node.addresses(ifindex)}
    return sorted(str(ip) for ip in found if _probe_source(ip))


def node_addresses(node: RtnlSocket | None = None) -> list[str]:
    """The node's own addresses that its traffic to pods can come from (probe sources).

    IPv6 link-local addresses are left out: every veth has one, so on a busy
    node they would crowd the map, and traffic to a pod's global address never
    uses one as its source. Loopback is left out for the same reason.
    """
    with contextlib.nullcontext(node) if node is not None else RtnlSocket() as rtnl:
        found = {ipaddress.ip_address(address) for _index, _scope, address in rtnl.addresses()}
    return sorted(str(ip) for ip in found if _probe_source(ip))
