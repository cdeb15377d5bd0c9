"""Where the tunnel learns workloads: a :class:`WorkloadSource`.

Production uses :class:`FileWorkloads` (the agent's ``workloads.json`` for this
node, the cluster model from ``tunnel.model_file`` merged with it (a
:class:`~agent.tunnel.cluster.Cluster`), and, for labs without a model, other
nodes' files from ``tunnel.peer_workloads`` and ``tunnel.mesh_cidrs``); tests hand
the tunnel a :class:`StaticWorkloads`. The rest of the tunnel only
sees the protocol, as ztunnel's proxies see ``DemandProxyState``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import structlog

from agent.model.loader import ModelWatcher, ReloadOutcome
from agent.model.types import Model, ModelInvalid
from agent.tunnel.cluster import DEFAULT_CLUSTER_ID, Cluster, build_cluster
from agent.tunnel.workloads import ServiceEntry, Workload, WorkloadIndex, in_cidrs

log = structlog.get_logger("tunnel")


class WorkloadSource(Protocol):
    def local(self, ip: str) -> Workload | None:
        """The workload enrolled on this node at ``ip``."""
        ...

    def remote(self, ip: str) -> Workload | None:
        """A workload known to be enrolled on another node at ``ip``."""
        ...

    def lookup(self, ip: str) -> Workload | None:
        """Any known workload at ``ip`` (this node's first)."""
        ...

    def is_mesh_destination(self, ip: str) -> bool:
        """Whether traffic to ``ip`` goes over HBONE."""
        ...

    def service(self, hostname: str, namespace: str | None) -> ServiceEntry | None:
        """The service called ``hostname``, preferring one in ``namespace``."""
        ...

    def counts(self) -> tuple[int, int]:
        """(local workloads, remote workloads), for the status file."""
        ...

    def cluster(self) -> Cluster | None:
        """The merged cluster model (services, VIPs, endpoints), or None without one."""
        ...


class StaticWorkloads:
    """A fixed set of workloads (tests, or a tunnel fed by something else)."""

    def __init__(self, local: Iterable[Workload] = (), remote: Iterable[Workload] = (),
                 services: Iterable[ServiceEntry] = (),
                 mesh_cidrs: Sequence[str] = (), *, model: Model | None = None,
                 node: str = "", trust_domain: str = "cluster.local",
                 cluster_id: str = DEFAULT_CLUSTER_ID) -> None:
        self.local_index = WorkloadIndex(local)
        self.remote_index = WorkloadIndex(remote)
        self.services = list(services)
        self.mesh_cidrs = tuple(mesh_cidrs)
        self._cluster: Cluster | None = None
        if model is not None:
            self._cluster, _ = build_cluster(model, self.local_index.workloads, node=node,
                                             trust_domain=trust_domain, cluster_id=cluster_id)

    def local(self, ip: str) -> Workload | None:
        return self.local_index.by_address(ip)

    def remote(self, ip: str) -> Workload | None:
        return self.remote_index.by_address(ip) or (
            self._cluster.remote(ip) if self._cluster else None)

    def lookup(self, ip: str) -> Workload | None:
        return self.local(ip) or self.remote(ip)

    def is_mesh_destination(self, ip: str) -> bool:
        return (self.remote(ip) is not None or _in_cidrs(ip, self.mesh_cidrs)
                or self.local(ip) is not None
                or (self._cluster is not None and self._cluster.is_mesh_destination(ip)))

    def service(self, hostname: str, namespace: str | None) -> ServiceEntry | None:
        found = self._cluster.service(hostname, namespace) if self._cluster else None
        return found or _best_service(self.services, hostname, namespace)

    def counts(self) -> tuple[int, int]:
        return len(self.local_index), len(self.remote_index)

    def cluster(self) -> Cluster | None:
        return self._cluster


class FileWorkloads:
    """Workloads from JSON files written by agents (this node's and its peers').

    With ``model_file``, the cluster model (ztunnel local-config YAML) is merged
    with this node's workloads into :meth:`cluster` on every change of either.

    Side effects: reads ``workloads_path``, ``peer_paths`` and ``model_file``
    (polled with :meth:`refresh`; a miss on :meth:`local` stats this node's file once
    more). A file that cannot be read keeps the last good set (the model: the last
    good model, the error logged once per change of the file).
    """

    def __init__(self, workloads_path: Path, peer_paths: Sequence[str | Path] = (),
                 mesh_cidrs: Sequence[str] = (), *, model_file: str | Path | None = None,
                 node: str = "", trust_domain: str = "cluster.local",
                 cluster_id: str = DEFAULT_CLUSTER_ID) -> None:
        self.workloads_path = workloads_path
        self.peer_paths = [Path(p) for p in peer_paths]
        self.mesh_cidrs = tuple(mesh_cidrs)
        self.local_index = WorkloadIndex()
        self.remote_index = WorkloadIndex()
        self._mtime: float | None = None
        self._peer_mtimes: tuple[float | None, ...] = ()
        # The version of a file last rejected: warned about once, not on every poll.
        self._rejected_mtime: float | None = None
        self._rejected_peer_mtimes: tuple[float | None, ...] | None = None
        self.model_watcher = ModelWatcher(str(model_file)) if model_file else None
        self.node = node
        self.trust_domain = trust_domain
        self.cluster_id = cluster_id
        self._cluster: Cluster | None = None

    def local(self, ip: str) -> Workload | None:
        """On a miss, re-read ``workloads.json`` (a stat when unchanged) before
        answering: the agent writes it before ``pod add`` returns, so a pod's first
        connection right after enrollment must not be refused just because the next
        poll has not come yet."""
        found = self.local_index.by_address(ip)
        if found is None and self.reload_local():
            found = self.local_index.by_address(ip)
        return found

    def remote(self, ip: str) -> Workload | None:
        return self.remote_index.by_address(ip) or (
            self._cluster.remote(ip) if self._cluster else None)

    def lookup(self, ip: str) -> Workload | None:
        return self.local_index.by_address(ip) or self.remote(ip)

    def is_mesh_destination(self, ip: str) -> bool:
        # The local lookup goes last: on a miss it stats workloads.json, so a pod
        # enrolled here a moment ago is already reached over the mesh.
        return (self.remote(ip) is not None or _in_cidrs(ip, self.mesh_cidrs)
                or (self._cluster is not None and self._cluster.is_mesh_destination(ip))
                or self.local(ip) is not None)

    def service(self, hostname: str, namespace: str | None) -> ServiceEntry | None:
        return self._cluster.service(hostname, namespace) if self._cluster else None

    def counts(self) -> tuple[int, int]:
        return len(self.local_index), len(self.remote_index)

    def cluster(self) -> Cluster | None:
        return self._cluster

    def refresh(self) -> None:
        self.reload_local()  # rebuilds the merged model when it changed
        self.reload_remote()
        if self.model_watcher is not None:
            outcome = self.model_watcher.poll()
            if outcome is ReloadOutcome.REJECTED and self.model_watcher.error is not None:
                log.error("model file rejected; keeping the last good model",
                          path=self.model_watcher.path, error=str(self.model_watcher.error))
            elif outcome is ReloadOutcome.LOADED:
                log.info("model loaded", path=self.model_watcher.path,
                         workloads=len(self.model_watcher.model.workloads),
                         services=len(self.model_watcher.model.services))
            if outcome is ReloadOutcome.LOADED or self._cluster is None:
                self._rebuild_cluster()

    def _rebuild_cluster(self) -> None:
        """Merge the model in force with this node's workloads and swap it in."""
        if self.model_watcher is None:
            return
        try:
            cluster, conflicts = build_cluster(
                self.model_watcher.model, self.local_index.workloads, node=self.node,
                trust_domain=self.trust_domain, cluster_id=self.cluster_id)
        except ModelInvalid as exc:
            log.error("enrolled workloads contradict each other; keeping the last merged "
                      "model", error=str(exc))
            return
        for conflict in conflicts:
            log.warning("model workload displaced by this node's enrollment",
                        conflict=str(conflict))
        self._cluster = cluster

    def reload_local(self) -> bool:
        try:
            mtime = self.workloads_path.stat().st_mtime
        except FileNotFoundError:
            return False
        if mtime in (self._mtime, self._rejected_mtime):
            return False
        try:
            index = WorkloadIndex.from_json(json.loads(self.workloads_path.read_text()),
                                            str(self.workloads_path))
        except (OSError, ValueError, KeyError) as exc:
            self._rejected_mtime = mtime
            log.warning("workloads file unreadable; keeping the last good one",
                        path=str(self.workloads_path), error=str(exc))
            return False
        self._mtime = mtime
        self.local_index = index
        log.info("workloads loaded", count=len(index))
        if self._cluster is not None:
            self._rebuild_cluster()
        return True

    def reload_remote(self) -> bool:
        mtimes = tuple(p.stat().st_mtime if p.exists() else None for p in self.peer_paths)
        if mtimes in (self._peer_mtimes, self._rejected_peer_mtimes):
            return False
        workloads: list[Workload] = []
        for path in self.peer_paths:
            try:
                workloads.extend(
                    WorkloadIndex.from_json(json.loads(path.read_text()), str(path)).workloads)
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError) as exc:
                self._rejected_peer_mtimes = mtimes
                log.warning("peer workloads unreadable; keeping the last good set",
                            path=str(path), error=str(exc))
                return False
        self._peer_mtimes = mtimes
        self.remote_index = WorkloadIndex(workloads)
        log.info("peer workloads loaded", count=len(self.remote_index))
        return True


def _in_cidrs(ip: str, cidrs: Sequence[str]) -> bool:
    try:
        return bool(cidrs) and in_cidrs(ip, cidrs)
    except ValueError:
        return False


def _best_service(services: Iterable[ServiceEntry], hostname: str,
                  namespace: str | None) -> ServiceEntry | None:
    matches = [s for s in services if s.hostname == hostname]
    for service in matches:
        if service.namespace == namespace:
            return service
    return matches[0] if matches else None
