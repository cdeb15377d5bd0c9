"""The whole cluster's Pods, Services, EndpointSlices and AuthorizationPolicies as the
cluster model (:mod:`agent.model`) and policy judgements (:mod:`agent.policy`) (pure).

Follows istiod's ambient conversion (istio/istio pilot/pkg/serviceregistry/ambient/):

- a Pod with an IP becomes a Workload (``workloads.go`` :: ``podWorkloadBuilder``):
  uid ``<cluster>//v1/Pod/<ns>/<name>``, its IPs, service account, node, canonical
  name/revision from Istio's labels, ``HBONE`` when its redirection annotation is
  ``enabled`` (``setTunnelProtocol``), ``Unhealthy`` when not Ready or being deleted
  (``IsPodReady(p) || p.DeletionTimestamp``); host-network pods as ``HostNetwork``
  workloads; terminal pods (Succeeded/Failed) are left out;
- a Service becomes a Service (``services.go``): hostname
  ``<name>.<ns>.svc.<domain>``, its cluster IPs as VIPs (none for headless), port
  map service port -> target port (0 for a named target port: resolved per
  endpoint), ``trafficDistribution`` to load balancing;
- EndpointSlices bind workloads to services: each endpoint whose targetRef is a
  Pod gives that workload a binding for the slice's service, with the slice's
  port numbers matched to the service's ports by name;
- every AuthorizationPolicy is judged by :func:`agent.policy.loader.judge_document`
  on its own (accepted, ignored, or failed closed with a stand-in), as if it had
  come from a file named ``api:<ns>/<name>``.

Objects that cannot be read are reported (:class:`ObjectProblem`) and left out;
the model is built with :meth:`Model.build`, whose consistency errors (duplicate
addresses, VIP clashes) are reported and the offending entries dropped, never the
whole model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.k8s.objects import (
    EndpointSlice,
    ObjectProblem,
    Pod,
    parse_ip,
    read_endpoint_slice,
    read_pod,
    read_service,
)
from agent.k8s.objects import Service as KService
from agent.k8s.rules import REDIRECTION_ANNOTATION, RedirectionStatus, is_terminal
from agent.model.merge import CANONICAL_NAME_LABELS, CANONICAL_REVISION_LABELS
from agent.model.types import (
    HealthStatus,
    InboundProtocol,
    Model,
    ModelInvalid,
    NamespacedHostname,
    NetworkAddress,
    NetworkMode,
    Service,
    ServiceBinding,
    TrafficDistribution,
    Workload,
    load_balancer_for,
    port_map,
)
from agent.policy.engine import PolicySet
from agent.policy.loader import judge_document
from agent.policy.model import DEFAULT_ROOT_NAMESPACE
from agent.policy.outcomes import DocumentResult

DEFAULT_CLUSTER_ID = "Kubernetes"
DEFAULT_DOMAIN = "cluster.local"


def workload_uid(cluster_id: str, namespace: str, name: str) -> str:
    return f"{cluster_id}//v1/Pod/{namespace}/{name}"


def _first_label(labels: Mapping[str, str], names: Iterable[str], default: str) -> str:
    return next((labels[n] for n in names if labels.get(n)), default)


@dataclass(frozen=True)
class Converted:
    model: Model
    problems: tuple[str, ...]


def _workload(pod: Pod, cluster_id: str, network: str,
              bindings: tuple[ServiceBinding, ...]) -> Workload:
    labels = pod.meta.labels
    hbone = pod.meta.annotations.get(REDIRECTION_ANNOTATION) == RedirectionStatus.ENABLED.value
    return Workload(
        uid=workload_uid(cluster_id, pod.meta.namespace, pod.meta.name),
        name=pod.meta.name, namespace=pod.meta.namespace,
        workload_ips=tuple(parse_ip(ip) for ip in pod.ips),
        service_account=pod.service_account, network=network,
        protocol=InboundProtocol.HBONE if hbone else InboundProtocol.TCP,
        network_mode=NetworkMode.HOST_NETWORK if pod.host_network else NetworkMode.STANDARD,
        node=pod.node,
        canonical_name=_first_label(labels, CANONICAL_NAME_LABELS, pod.meta.name),
        canonical_revision=_first_label(labels, CANONICAL_REVISION_LABELS, "latest"),
        workload_name=pod.meta.name, workload_type="pod", cluster_id=cluster_id,
        status=HealthStatus.HEALTHY if pod.ready and not pod.meta.deleting
        else HealthStatus.UNHEALTHY,
        services=bindings)


def _service(svc: KService, domain: str, network: str) -> Service:
    distribution = None
    if svc.traffic_distribution:
        try:
            distribution = TrafficDistribution(svc.traffic_distribution)
        except ValueError:
            distribution = None
    return Service(
        name=svc.meta.name, namespace=svc.meta.namespace,
        hostname=f"{svc.meta.name}.{svc.meta.namespace}.svc.{domain}",
        vips=tuple(NetworkAddress(network, parse_ip(ip)) for ip in svc.cluster_ips),
        ports=port_map((p.port, p.target_port) for p in svc.ports if p.protocol == "TCP"),
        load_balancer=load_balancer_for(distribution) if distribution else None)


def _bindings(slices: Iterable[EndpointSlice], services: Mapping[str, KService],
              domain: str) -> dict[str, dict[NamespacedHostname, dict[int, int]]]:
    """pod key -> service -> {service port: target port}."""
    out: dict[str, dict[NamespacedHostname, dict[int, int]]] = {}
    for sl in slices:
        svc = services.get(f"{sl.meta.namespace}/{sl.service}")
        if svc is None:
            continue
        key = NamespacedHostname(svc.meta.namespace,
                                 f"{svc.meta.name}.{svc.meta.namespace}.svc.{domain}")
        by_name = dict(sl.ports)
        ports = {p.port: by_name[p.name] for p in svc.ports if p.name in by_name}
        for ep in sl.endpoints:
            if ep.pod:
                out.setdefault(ep.pod, {}).setdefault(key, {}).update(ports)
    return out


def convert(pods: Iterable[Any], services: Iterable[Any], slices: Iterable[Any],
            cluster_id: str = DEFAULT_CLUSTER_ID, domain: str = DEFAULT_DOMAIN,
            network: str = "") -> Converted:
    """Raw API objects (dicts) -> the cluster model, with every problem named."""
    problems: list[str] = []

    def read(objs: Iterable[Any], reader: Any) -> list[Any]:
        good = []
        for obj in objs:
            parsed = reader(obj)
            if isinstance(parsed, ObjectProblem):
                problems.append(str(parsed))
            else:
                good.append(parsed)
        return good

    k_pods: list[Pod] = read(pods, read_pod)
    k_services: dict[str, KService] = {
        f"{s.meta.namespace}/{s.meta.name}": s for s in read(services, read_service)}
    k_slices: list[EndpointSlice] = read(slices, read_endpoint_slice)
    bindings = _bindings(k_slices, k_services, domain)
    workloads = [
        _workload(p, cluster_id, network, tuple(
            ServiceBinding(svc, port_map(ports))
            for svc, ports in sorted(bindings.get(p.key, {}).items())))
        for p in k_pods if p.ips and not is_terminal(p.phase)]
    model_services = [_service(s, domain, network) for s in k_services.values()]
    for _ in range(3):
        try:
            return Converted(Model.build(workloads, model_services), tuple(problems))
        except ModelInvalid as invalid:
            drop_w: set[int] = set()
            drop_s: set[int] = set()
            for issue in invalid.issues:
                problems.append(f"cluster model: {issue}; the entry is left out until the "
                                "conflict is fixed in the cluster")
                index = int(issue.path.split("[", 1)[1].split("]", 1)[0])
                (drop_w if issue.path.startswith("workloads") else drop_s).add(index)
            workloads = [w for i, w in enumerate(workloads) if i not in drop_w]
            model_services = [s for i, s in enumerate(model_services) if i not in drop_s]
    return Converted(Model.build([], []), (*problems, "cluster model: could not be made "
                                           "consistent; it is empty"))


def policy_document(obj: Any) -> Any:
    """The policy as a file would hold it: server-set metadata dropped."""
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        return obj
    meta = {k: v for k, v in obj["metadata"].items()
            if k in ("name", "namespace", "labels", "annotations")}
    return {**{k: v for k, v in obj.items() if k in ("apiVersion", "kind", "spec")},
            "metadata": meta}


def convert_policies(objs: Iterable[Any], root_namespace: str = DEFAULT_ROOT_NAMESPACE
                     ) -> tuple[PolicySet, tuple[DocumentResult, ...]]:
    """AuthorizationPolicy objects -> the policy set in force and each one's judgement."""
    results = []
    for obj in objs:
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        label = "api:" + (f"{meta.get('namespace')}/{meta.get('name')}"
                          if isinstance(meta, dict) else "(unreadable)")
        results.append(judge_document(policy_document(obj), label, 1, root_namespace))
    policies = [r.policy for r in results if r.policy is not None]
    try:
        return PolicySet(policies, root_namespace), tuple(results)
    except ValueError as e:  # two documents with one key: trust neither, deny all
        return PolicySet.fail_closed(f"policies from the API server: {e}",
                                     root_namespace), tuple(results)
