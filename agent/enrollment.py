"""Enroll and unenroll pods: the all-or-nothing kernel transaction.

Each step that changes the kernel pushes its undo onto a stack; if a later
step fails, the stack unwinds in reverse and the error is re-raised, so a
failed enrollment leaves the node exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.config import Config
from agent.contracts.api import PodAdd, PodDel, default_pod_name
from agent.datapath import attach
from agent.datapath.maps import POD_F_BRIDGED, POD_F_DNS, DatapathMaps
from agent.datapath.programs import FROM_POD, TO_POD, Programs
from agent.netns.rtnl import RtnlSocket
from agent.netns.veth import HostVeth, find_host_veth, link_addresses, resolve_netns
from agent.registry import Pod, Registry, RegistryError

log = structlog.get_logger("agent.enrollment")



def captures_dns(node_default: bool, pod_choice: bool | None) -> bool:
    """Whether a pod's DNS is captured: its own choice if it made one, else the node's
    (istio cni/pkg/nodeagent/net.go: PodDNSEnabled / PodDNSDisabled / PodDNSUnset)."""
    return node_default if pod_choice is None else pod_choice


def pod_flags(veth: HostVeth, dns_capture: bool = False) -> int:
    """struct ma_pod_info flags for a pod on ``veth`` (bpf/lib/common.h);
    ``dns_capture``: the node captures DNS and the pod did not opt out."""
    return (POD_F_BRIDGED if veth.bridged else 0) | (POD_F_DNS if dns_capture else 0)

class EnrollmentError(RuntimeError):
    """Enrollment failed and was rolled back; the message says what to do."""


def link_exists(ipr: Any, ifindex: int) -> bool:
    try:
        return bool(ipr.get_links(ifindex))
    except NetlinkError:
        return False


class Enroller:
    def __init__(self, cfg: Config, programs: Programs, maps: DatapathMaps,
                 registry: Registry, on_change: Callable[[], None]) -> None:
        self.cfg = cfg
        self.programs = programs
        self.maps = maps
        self.registry = registry
        self.on_change = on_change
        self._ipr: IPRoute | None = None
        self._rtnl: RtnlSocket | None = None

    @property
    def rtnl(self) -> RtnlSocket:
        """A fast read-only rtnetlink socket of the node netns (kernel thread only)."""
        if self._rtnl is None:
            self._rtnl = RtnlSocket()
        return self._rtnl

    @property
    def ipr(self) -> IPRoute:
        """One netlink socket of the node netns, reused: opening one per request
        costs more than the rest of an enrollment. Only used on the kernel thread."""
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    @property
    def _prio_handle(self) -> tuple[int, int]:
        return self.cfg.agent.tc_priority, self.cfg.agent.tc_handle

    def attach_filters(self, ipr: Any, ifindex: int) -> None:
        """Install (or atomically replace) both of our filters on a pod's veth."""
        prio, handle = self._prio_handle
        attach.attach(ipr, ifindex, attach.FilterSpec(attach.INGRESS, FROM_POD,
                                                      self.programs.fds[FROM_POD]), prio, handle,
                      self.rtnl)
        attach.attach(ipr, ifindex, attach.FilterSpec(attach.EGRESS, TO_POD,
                                                      self.programs.fds[TO_POD]), prio, handle,
                      self.rtnl)

    def add(self, req: PodAdd) -> Pod:
        """Enroll a pod.

        Side effects, in order (undone in reverse if any step fails):
        1. validate the netns, find the host-side veth and the pod's addresses;
        2. check for conflicts with enrolled pods (netns, veth, addresses);
        3. add the host veth's own addresses to the node-address map, and the
           pod's ifindex and addresses to the pod maps;
        4. add a clsact qdisc to the veth if it has none;
        5. attach from_pod on tc ingress, then to_pod on tc egress;
        6. record the pod in the registry and persist state (``on_change``).
        """
        path = resolve_netns(req.netns)
        veth = find_host_veth(path, req.ifname, self.rtnl)
        pod = Pod(name=req.name or default_pod_name(path), namespace=req.namespace,
                  service_account=req.service_account, netns=path, ifname=req.ifname,
                  host_ifindex=veth.ifindex, host_ifname=veth.ifname,
                  addresses=veth.pod_addresses, labels=dict(req.labels),
                  dns_capture=req.dns_capture, uid=req.uid)
        self.registry.check_conflicts(pod)

        undo: list[Callable[[], object]] = []  # return values are ignored
        prio, handle = self._prio_handle
        ipr = self.ipr
        try:
            # The primary CNI may have put a gateway address on the new host
            # veth; traffic from it is the node's own (probes), not a client.
            added = self.maps.add_node_addresses(link_addresses(self.rtnl, pod.host_ifindex))
            undo.append(lambda: self.maps.remove_node_addresses(added))
            self.maps.add_pod(pod.host_ifindex, pod.addresses, pod_flags(
                veth, captures_dns(self.cfg.datapath.dns_capture, pod.dns_capture)))
            undo.append(lambda: self.maps.remove_pod(pod.host_ifindex, pod.addresses))
            created = attach.ensure_clsact(ipr, pod.host_ifindex, self.rtnl)
            if created:
                undo.append(lambda: self._remove_clsact_if_unused(pod.host_ifindex))
            pod = replace(pod, created_clsact=created)
            ingress = attach.FilterSpec(attach.INGRESS, FROM_POD, self.programs.fds[FROM_POD])
            attach.attach(ipr, pod.host_ifindex, ingress, prio, handle, self.rtnl)
            undo.append(lambda: self._detach(pod.host_ifindex, attach.INGRESS))
            egress = attach.FilterSpec(attach.EGRESS, TO_POD, self.programs.fds[TO_POD])
            attach.attach(ipr, pod.host_ifindex, egress, prio, handle, self.rtnl)
            undo.append(lambda: self._detach(pod.host_ifindex, attach.EGRESS))
            self.registry.add(pod)
            key = pod.key
            undo.append(lambda: self._forget(key))
            self.on_change()
        except (RegistryError, attach.AttachError, OSError) as exc:
            self._unwind(undo)
            raise EnrollmentError(f"enrolling {pod.key} failed and was rolled back: {exc}") \
                from exc
        except BaseException:
            self._unwind(undo)
            raise
        log.info("pod enrolled", pod=pod.key, veth=pod.host_ifname, ifindex=pod.host_ifindex,
                 addresses=list(pod.addresses), clsact_created=pod.created_clsact)
        return pod

    def _forget(self, key: Any) -> None:
        self.registry.remove(key)

    def _unwind(self, undo: list[Callable[[], object]]) -> None:
        for step in reversed(undo):
            try:
                step()
            except Exception as exc:  # keep unwinding: a partial undo is worse
                log.error("rollback step failed", error=str(exc))

    def _detach(self, ifindex: int, direction: str) -> None:
        attach.detach(self.ipr, ifindex, direction, *self._prio_handle)

    def _remove_clsact_if_unused(self, ifindex: int) -> None:
        ipr = self.ipr
        if not link_exists(ipr, ifindex):
            return
        if attach.foreign_filters(ipr, ifindex, *self._prio_handle):
            log.info("keeping clsact: other filters use it", ifindex=ifindex)
            return
        attach.remove_clsact(ipr, ifindex)

    def find(self, req: PodDel) -> Pod | None:
        if req.name:
            return self.registry.find(name=req.name, namespace=req.namespace)
        assert req.netns is not None
        path = req.netns if req.netns.startswith("/") else f"/run/netns/{req.netns}"
        return self.registry.find(netns=path)

    def remove(self, pod: Pod) -> None:
        """Unenroll a pod.

        Side effects, in order: detach to_pod (egress) then from_pod (ingress)
        if the veth still exists; delete the clsact qdisc only if enrolling
        created it and no other filter uses it; remove the pod from the maps
        and the registry; persist state.
        """
        ipr = self.ipr
        if link_exists(ipr, pod.host_ifindex):
            attach.detach(ipr, pod.host_ifindex, attach.EGRESS, *self._prio_handle)
            attach.detach(ipr, pod.host_ifindex, attach.INGRESS, *self._prio_handle)
        if pod.created_clsact:
            self._remove_clsact_if_unused(pod.host_ifindex)
        self.maps.remove_pod(pod.host_ifindex, pod.addresses)
        self.registry.remove(pod.key)
        self.on_change()
        log.info("pod unenrolled", pod=pod.key, veth=pod.host_ifname)
