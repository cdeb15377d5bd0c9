"""Find a Kubernetes pod's network namespace on this node from its IP.

The watch learns a pod from the API server (namespace, name, IPs), but enrolling it
needs its netns. Istio's node agent finds it by the pod's UID in the cgroup path of a
process in the pod (istio cni/pkg/nodeagent/podcgroupns.go); a pod without processes
(our lab's pods) has none, so we go through the routing table instead, which works
for every routed veth CNI (ptp, Calico, Cilium's veth mode, the lab):

1. ``ip route get <pod IP>`` in the node netns: the output interface is the pod's
   host-side veth;
2. that veth's ``IFLA_LINK_NETNSID`` names the peer's netns (an id local to the node
   netns);
3. the file in ``/run/netns`` whose ``RTM_GETNSID`` answer is that id is the pod's
   netns (the map is cached; a miss rescans once);
4. :func:`agent.netns.veth.find_host_veth` on it confirms that its ``eth0`` holds the
   pod's IP and is the peer of that veth.

A pod behind a bridge (the route points at the bridge, not a veth) or whose netns is
not bind-mounted in ``/run/netns`` is not found: :class:`PodNetworkError` says so,
and such pods are enrolled by the CNI plugin, which is handed the netns path.

Side effects: reads only (netlink queries in the calling thread's netns, opens the
files of ``/run/netns`` read-only for the duration of one query each).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.netns.rtnl import RtnlSocket
from agent.netns.veth import NETNS_RUN_DIR, PodNetworkError, find_host_veth

RTM_NEWNSID = 88
RTM_GETNSID = 90
NETNSA_NSID = 1
NETNSA_FD = 3
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
_HDR = struct.Struct("=IHHII")


class NsidSocket:
    """``RTM_GETNSID`` by file descriptor: the id the calling netns gives a netns
    (``ip netns list-id``); -1 when it has none."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def nsid_of_fd(self, fd: int) -> int:
        self.seq += 1
        body = struct.pack("=B3x", socket.AF_UNSPEC) + struct.pack("=HHI", 8, NETNSA_FD, fd)
        self.sock.send(_HDR.pack(_HDR.size + len(body), RTM_GETNSID, NLM_F_REQUEST,
                                 self.seq, 0) + body)
        while True:
            data = self.sock.recv(65536)
            length, kind, _flags, seq, _pid = _HDR.unpack_from(data)
            if seq != self.seq:
                continue
            if kind == NLMSG_ERROR:
                errno = -struct.unpack_from("=i", data, _HDR.size)[0]
                raise OSError(errno, os.strerror(errno))
            if kind != RTM_NEWNSID:
                raise OSError(f"unexpected netlink answer {kind} to RTM_GETNSID")
            offset = _HDR.size + 4
            while offset + 4 <= length:
                alen, atype = struct.unpack_from("=HH", data, offset)
                if atype == NETNSA_NSID:
                    return int(struct.unpack_from("=i", data, offset + 4)[0])
                offset += (alen + 3) & ~3
            return -1

    def nsid_of_path(self, path: str) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return self.nsid_of_fd(fd)
        finally:
            os.close(fd)


class PodNetnsLocator:
    """Pod IP -> netns path in ``run_dir`` (see the module docstring). Use on one
    thread only (the agent's kernel thread)."""

    def __init__(self, ipr: IPRoute, rtnl: RtnlSocket, run_dir: str = NETNS_RUN_DIR) -> None:
        self.ipr, self.rtnl, self.run_dir = ipr, rtnl, run_dir
        self.nsids = NsidSocket()
        self.by_nsid: dict[int, str] = {}

    def close(self) -> None:
        self.nsids.close()

    def _rescan(self) -> None:
        found: dict[int, str] = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.run_dir):
                try:
                    nsid = self.nsids.nsid_of_path(entry.path)
                except OSError:
                    continue  # not a netns bind mount, or gone meanwhile
                if nsid >= 0:
                    found[nsid] = entry.path
        self.by_nsid = found

    def _path_for(self, nsid: int) -> str | None:
        path = self.by_nsid.get(nsid)
        if path is not None:
            try:
                if self.nsids.nsid_of_path(path) == nsid:
                    return path
            except OSError:
                pass
        self._rescan()
        return self.by_nsid.get(nsid)

    def find(self, ip: str, ifname: str = "eth0") -> str:
        """The netns path of the pod that holds ``ip``; raises PodNetworkError."""
        try:
            routes = self.ipr.route("get", dst=ip)
        except (NetlinkError, OSError) as exc:
            raise PodNetworkError(f"no route to pod IP {ip} on this node ({exc}): is the "
                                  "pod on this node and its network set up?") from exc
        oif = routes[0].get_attr("RTA_OIF") if routes else None
        if oif is None:
            raise PodNetworkError(f"the route to pod IP {ip} has no output interface")
        try:
            links = self.ipr.get_links(oif)
        except NetlinkError as exc:
            raise PodNetworkError(f"interface {oif} routing pod IP {ip} vanished") from exc
        nsid = links[0].get_attr("IFLA_LINK_NETNSID") if links else None
        name = links[0].get_attr("IFLA_IFNAME") if links else str(oif)
        if nsid is None:
            raise PodNetworkError(
                f"pod IP {ip} is routed to {name}, which is not a veth whose peer is in "
                "another netns (a bridge CNI?): such pods are enrolled by meshagent-cni, "
                "which is given the netns")
        path = self._path_for(int(nsid))
        if path is None:
            raise PodNetworkError(
                f"the netns of pod IP {ip} (peer of {name}, nsid {nsid}) is not in "
                f"{self.run_dir}: enroll it through meshagent-cni or 'meshagent pod add'")
        veth = find_host_veth(path, ifname, self.rtnl)
        if veth.ifindex != oif or ip not in veth.pod_addresses:
            raise PodNetworkError(f"{path}:{ifname} does not hold pod IP {ip} behind {name}; "
                                  "the pod's network changed: retried on the next pass")
        return path
