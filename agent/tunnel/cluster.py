"""The tunnel's view of the cluster model (pure): the model file merged with this
node's enrolled workloads, and the lookups the tunnel's paths need from it.

The model (:mod:`agent.model`, ztunnel's local-config shape) says which services
exist, their VIPs, ports and endpoints, and which workloads live on other nodes;
this node's ``workloads.json`` (the agent's enrollment) is the truth about this
node's pods (:func:`agent.model.merge.merge_local_workloads`). A :class:`Cluster`
is rebuilt whenever either changes and swapped in with one assignment.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.model.merge import MergeConflict, merge_local_workloads, workload_from_enrollment
from agent.model.select import WaypointHop, resolve_waypoint
from agent.model.types import InboundProtocol, Locality, Model, NetworkAddress, lookup_port
from agent.model.types import Workload as ModelWorkload
from agent.tunnel.workloads import ServiceEntry, Workload

DEFAULT_CLUSTER_ID = "Kubernetes"


def _address(ip: str) -> NetworkAddress | None:
    """``ip`` on the default network (the only one a node's tunnel serves)."""
    try:
        return NetworkAddress("", ipaddress.ip_address(ip))
    except ValueError:
        return None


@dataclass(frozen=True)
class Cluster:
    """The merged model as one tunnel sees it (``node`` is this tunnel's node)."""

    model: Model
    node: str
    trust_domain: str
    cluster_id: str = DEFAULT_CLUSTER_ID
    # Workloads some waypoint address names (never enrolled, reached over HBONE).
    waypoints: frozenset[str] = field(default_factory=frozenset)
    # Whether any service or workload has a waypoint (else the step is skipped).
    binds_waypoints: bool = False

    def workload_at(self, ip: str) -> ModelWorkload | None:
        address = _address(ip)
        return self.model.workload_by_address(address) if address else None

    def is_vip(self, ip: str) -> bool:
        address = _address(ip)
        return address is not None and self.model.is_vip(address)

    def tunnel_workload(self, w: ModelWorkload) -> Workload:
        """The tunnel's workload record for a model workload (identity from its
        trust domain, or this tunnel's)."""
        labels = {"app": w.canonical_name} if w.canonical_name else {}
        if w.canonical_revision:
            labels["version"] = w.canonical_revision
        return Workload(name=w.workload_name or w.name, namespace=w.namespace,
                        service_account=w.service_account or "default",
                        addresses=tuple(str(a) for a in w.workload_ips),
                        identity=w.identity(self.trust_domain), labels=labels)

    def remote(self, ip: str) -> Workload | None:
        """A mesh (HBONE) workload at ``ip`` that the model places on another node, or
        a waypoint instance (never enrolled: reached over HBONE wherever it runs)."""
        w = self.workload_at(ip)
        if w is None or w.protocol is not InboundProtocol.HBONE or (
                w.node == self.node and w.uid not in self.waypoints):
            return None
        return self.tunnel_workload(w)

    def waypoint_hop(self, src_ip: str, local: Workload | None, dst_ip: str, dst_port: int,
                     rng: random.Random) -> WaypointHop:
        """Whether a connection from ``src_ip`` (this node's ``local`` workload) to
        ``dst_ip:dst_port`` goes to a waypoint (:func:`agent.model.select.resolve_waypoint`)."""
        return resolve_waypoint(self.model, self.source(src_ip, local), dst_ip, dst_port, rng,
                                src_identity=local.identity if local else None, src_ip=src_ip,
                                trust_domain=self.trust_domain)

    def is_mesh_destination(self, ip: str) -> bool:
        """A VIP (resolved per connection) or an HBONE workload's address."""
        if self.is_vip(ip):
            return True
        w = self.workload_at(ip)
        return w is not None and w.protocol is InboundProtocol.HBONE

    def source(self, ip: str, local: Workload | None) -> ModelWorkload:
        """The model workload a connection from ``ip`` resolves as (its node and
        locality rank endpoints); a source the model does not know is a workload of
        this node in ``local``'s namespace (or none)."""
        found = self.workload_at(ip)
        if found is not None:
            return found
        return ModelWorkload(uid="", name="", namespace=local.namespace if local else "",
                             node=self.node, cluster_id=self.cluster_id)

    def service(self, hostname: str, namespace: str | None) -> ServiceEntry | None:
        """The service a hostname ``:authority`` names (ztunnel
        ``find_service_by_hostname``), with its endpoints' addresses and ports."""
        svc = self.model.service_by_hostname(hostname, namespace)
        if svc is None:
            return None
        addresses: list[str] = []
        per_endpoint: dict[str, dict[int, int]] = {}
        for ep in self.model.endpoints(svc):
            w = self.model.workload_by_uid(ep.workload_uid)
            if w is None or not svc.includes(ep.status) or not svc.includes(w.status):
                continue
            for a in w.workload_ips:
                addresses.append(str(a))
                ports = {p: t for p, _ in svc.ports
                         if (t := lookup_port(ep.ports, p) or lookup_port(svc.ports, p))}
                per_endpoint[str(a)] = ports
        return ServiceEntry(hostname=svc.hostname, namespace=svc.namespace,
                            ports=dict(svc.ports), addresses=tuple(addresses),
                            endpoint_ports=per_endpoint)


def build_cluster(model: Model, local: Iterable[Workload], *, node: str, trust_domain: str,
                  cluster_id: str = DEFAULT_CLUSTER_ID,
                  locality: Locality | None = None
                  ) -> tuple[Cluster, tuple[MergeConflict, ...]]:
    """Merge this node's enrolled workloads into ``model``.

    Raises :class:`agent.model.types.ModelInvalid` when the enrolled workloads
    contradict each other (the agent never writes such a file)."""
    enrolled = [workload_from_enrollment(
        name=w.name, namespace=w.namespace, service_account=w.service_account,
        addresses=w.addresses, node=node, labels=w.labels, cluster_id=cluster_id,
        trust_domain=trust_domain, locality=locality) for w in local]
    merged, conflicts = merge_local_workloads(model, enrolled, node)
    binds = any(s.waypoint for s in merged.services) or any(w.waypoint for w in merged.workloads)
    return Cluster(merged, node, trust_domain, cluster_id, merged.waypoint_uids(),
                   binds), conflicts


def dns_client(cluster: Cluster | None, local: Workload | None, ip: str) -> ModelWorkload | None:
    """The workload a DNS query from ``ip`` is answered for: this node's enrolled pod
    there (the merged model's entry, with its namespace for search domains), or None
    (the DNS proxy answers an unknown client SERVFAIL, as ztunnel)."""
    if local is None:
        return None
    if cluster is not None:
        found = cluster.workload_at(ip)
        if found is not None and found.node == cluster.node:
            return found
    return workload_from_enrollment(
        name=local.name, namespace=local.namespace, service_account=local.service_account,
        addresses=local.addresses, node=cluster.node if cluster else "")
