"""The waypoint's view of the cluster, from files (pure but for reading them).

Inputs (the lab writes them; a Kubernetes feed would produce the same documents):

- the cluster model (agent/model local-config YAML: workloads and services);
- one directory of Kubernetes-shaped YAML documents, any number per file:
  ``Namespace`` and ``Service`` (labels, ``spec.ports[].name/appProtocol``) and ``Pod``
  (labels; matched to model workloads by namespace/name) for binding and protocols,
  ``Gateway`` (the waypoints: ``istio.io/waypoint-for``, listeners' ``allowedRoutes``),
  ``HTTPRoute`` and ``AuthorizationPolicy``.

:func:`build_state` turns them into a :class:`WaypointState`: which ``IP:port``
destinations are bound to *this* waypoint, with their protocol, routes and policies.
Anything unreadable is reported (``problems``) and never widens: an unreadable
``AuthorizationPolicy`` fails closed (agent/waypoint/authz.py); an unreadable route
serves nothing; an unreadable binding document binds nothing.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.model.types import Model, NetworkAddress, Service, Workload
from agent.waypoint import authz, binding, routing

HBONE_PORT = 15008


class AppProtocol(enum.Enum):
    HTTP = "http"     # HTTP/1.1 or h2c, sniffed per stream (Envoy codec AUTO)
    TCP = "tcp"


# Istio's protocol selection: appProtocol, else the port name's prefix before '-'
# (istio pkg/config/protocol/instance.go :: Parse, kube ConvertProtocol).
_HTTP_NAMES = {"http", "http2", "grpc", "grpc-web", "h2c", "kubernetes.io/h2c",
               "kubernetes.io/ws", "kubernetes.io/wss"}


def port_protocol(name: str | None, app_protocol: str | None) -> AppProtocol:
    if app_protocol:
        return AppProtocol.HTTP if app_protocol.lower() in _HTTP_NAMES else AppProtocol.TCP
    prefix = (name or "").split("-", 1)[0].lower()
    return AppProtocol.HTTP if prefix in _HTTP_NAMES else AppProtocol.TCP


@dataclass(frozen=True)
class Destination:
    """One bound ``IP:port``: a service VIP (``service`` set) or a workload address."""

    protocol: AppProtocol
    port: int
    service: Service | None = None
    workload: Workload | None = None

    @property
    def service_ref(self) -> routing.ServiceRef | None:
        if self.service is None:
            return None
        return routing.ServiceRef(self.service.namespace, self.service.name, self.port)


@dataclass
class WaypointState:
    """Everything a request needs, rebuilt whole on each reload (never half-applied)."""

    me: binding.Waypoint
    model: Model
    destinations: dict[tuple[str, int], Destination]
    policies: list[authz.Policy]
    policy_results: list[authz.DocumentResult]
    routes: list[routing.HttpRoute]
    tables: dict[tuple[str, str, int], routing.RouteTable]
    problems: list[str] = field(default_factory=list)
    refused: dict[str, binding.Binding] = field(default_factory=dict)

    def destination(self, ip: str, port: int) -> Destination | None:
        return self.destinations.get((str(ipaddress.ip_address(ip)), port))

    def table(self, ref: routing.ServiceRef) -> routing.RouteTable:
        key = (ref.namespace, ref.name, ref.port or 0)
        table = self.tables.get(key)
        if table is None:
            table = routing.RouteTable(self.routes, ref)
            self.tables[key] = table
        return table

    def scope(self, dest: Destination) -> authz.Scope:
        svc = dest.service
        return authz.Scope(self.me.namespace, self.me.name,
                           svc.namespace if svc else None, svc.name if svc else None)

    def service(self, namespace: str, name: str) -> Service | None:
        for s in self.model.services:
            if s.namespace == namespace and s.name == name:
                return s
        return None


def read_documents(directory: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every YAML document in ``*.yaml``/``*.yml`` under ``directory`` (sorted)."""
    docs: list[dict[str, Any]] = []
    problems: list[str] = []
    if not directory.is_dir():
        return docs, [f"{directory}: not a directory"]
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        try:
            for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
                if doc is None:
                    continue
                if not isinstance(doc, dict):
                    problems.append(f"{path}[{i}]: not a mapping")
                    if "AuthorizationPolicy" in str(doc):
                        docs.append({"kind": "AuthorizationPolicy", "unreadable": True})
                    continue
                docs.append(doc)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            problems.append(f"{path}: {exc}")
            # We cannot know whether it held a DENY: fail closed for everything.
            docs.append({"kind": "AuthorizationPolicy", "unreadable": str(path)})
    return docs, problems


def _meta(doc: Mapping[str, Any]) -> tuple[str, str, dict[str, str]]:
    meta = doc.get("metadata") or {}
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        labels = {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""),
            {str(k): str(v) for k, v in labels.items()})


def _gateway(doc: Mapping[str, Any], class_labels: Mapping[str, str]) -> binding.Waypoint:
    namespace, name, labels = _meta(doc)
    spec = doc.get("spec") or {}
    allowed = binding.FromNamespaces.SAME
    selector = None
    listeners = spec.get("listeners") or []
    hbone = [listener for listener in listeners if isinstance(listener, dict)
             and listener.get("protocol") == "HBONE" and listener.get("port") == HBONE_PORT]
    if hbone:
        ns_sel = ((hbone[0].get("allowedRoutes") or {}).get("namespaces") or {})
        try:
            allowed = binding.FromNamespaces(ns_sel.get("from", "Same"))
        except ValueError:
            allowed = binding.FromNamespaces.SAME  # unknown: the narrowest
        raw = ns_sel.get("selector") or {}
        selector = binding.LabelSelector(
            tuple(sorted((raw.get("matchLabels") or {}).items())),
            tuple((e.get("key", ""), e.get("operator", ""), tuple(e.get("values") or ()))
                  for e in (raw.get("matchExpressions") or [])))
    return binding.Waypoint(namespace, name, binding.waypoint_traffic(labels, class_labels),
                            allowed, selector)


def build_state(model: Model, docs: Iterable[dict[str, Any]], me: tuple[str, str],
                problems: Iterable[str] = ()) -> WaypointState:
    """Bind the model's services and workloads; compile routes and policies."""
    issues = list(problems)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(str(doc.get("kind")), []).append(doc)
    classes = {(_meta(d)[1]): _meta(d)[2] for d in by_kind.get("GatewayClass", [])}
    waypoints = []
    for d in by_kind.get("Gateway", []):
        class_name = (d.get("spec") or {}).get("gatewayClassName", "istio-waypoint")
        waypoints.append(_gateway(d, classes.get(class_name, {})))
    mine = next((w for w in waypoints if (w.namespace, w.name) == me), None)
    if mine is None:
        issues.append(f"no Gateway {me[0]}/{me[1]} among the documents: this waypoint "
                      "binds nothing until one exists")
        mine = binding.Waypoint(me[0], me[1], binding.TrafficType.NONE)
    namespaces = [binding.Object(_meta(d)[1], _meta(d)[1], _meta(d)[2])
                  for d in by_kind.get("Namespace", [])]
    bindings = binding.Bindings(namespaces, waypoints)
    svc_docs = {(_meta(d)[0], _meta(d)[1]): d for d in by_kind.get("Service", [])}
    pod_docs = {(_meta(d)[0], _meta(d)[1]): d for d in by_kind.get("Pod", [])}
    destinations: dict[tuple[str, int], Destination] = {}
    refused: dict[str, binding.Binding] = {}
    for svc in model.services:
        doc = svc_docs.get((svc.namespace, svc.name), {})
        labels = _meta(doc)[2] if doc else {}
        b = bindings.for_service(binding.Object(svc.namespace, svc.name, labels))
        if b.outcome.fails_closed or b.outcome in (binding.BindingOutcome.ATTACHMENT_DENIED,
                                                   binding.BindingOutcome.UNSUPPORTED_TRAFFIC):
            refused[f"service {svc.namespace}/{svc.name}"] = b
        if not b.bound or b.waypoint is None or b.waypoint.key != mine.key:
            continue
        port_docs = {p.get("port"): p for p in ((doc.get("spec") or {}).get("ports") or [])
                     if isinstance(p, dict)} if doc else {}
        for port, _target in svc.ports:
            p = port_docs.get(port, {})
            proto = port_protocol(p.get("name"), p.get("appProtocol"))
            for vip in svc.vips:
                destinations[(str(vip.address), port)] = Destination(proto, port, service=svc)
    for wl in model.workloads:
        doc = pod_docs.get((wl.namespace, wl.name), {})
        labels = _meta(doc)[2] if doc else {}
        b = bindings.for_workload(binding.Object(wl.namespace, wl.name, labels))
        if b.outcome.fails_closed:
            refused[f"workload {wl.namespace}/{wl.name}"] = b
        if not b.bound or b.waypoint is None or b.waypoint.key != mine.key:
            continue
        ports = {port for svc_b in wl.services for port, _ in svc_b.ports}
        for ip in wl.workload_ips:
            for port in ports:
                target = next((t for s in wl.services for p, t in s.ports if p == port), port)
                backing = model.service(next(s.service for s in wl.services
                                             if any(p == port for p, _ in s.ports)))
                doc = svc_docs.get((backing.namespace, backing.name), {}) if backing else {}
                p = next((x for x in ((doc.get("spec") or {}).get("ports") or [])
                          if isinstance(x, dict) and x.get("port") == port), {})
                destinations[(str(ip), target)] = Destination(
                    port_protocol(p.get("name"), p.get("appProtocol")), target, workload=wl)
    policies, results = authz.compile_documents(
        _policy_doc(d) for d in by_kind.get("AuthorizationPolicy", []))
    for r in results:
        if r.outcome in (authz.DocumentOutcome.FAIL_CLOSED,
                         authz.DocumentOutcome.ACCEPTED_WITH_WARNINGS):
            issues.append(f"AuthorizationPolicy {r.name}: {r.outcome.value}: "
                          + "; ".join(r.problems))
    routes, route_problems = routing.load_routes(by_kind.get("HTTPRoute", []))
    issues += route_problems
    return WaypointState(mine, model, destinations, policies, results, routes, {}, issues,
                         refused)


def _policy_doc(doc: dict[str, Any]) -> Any:
    """An unreadable file stands in as an invalid document with no namespace: the
    compiler turns it into a DENY-all for everything (fail closed)."""
    if doc.get("unreadable"):
        return None
    return doc


def waypoint_workload(model: Model, namespace: str, network: str = "") -> Workload:
    """The waypoint as a model source workload (for endpoint selection): no locality."""
    return Workload(uid=f"waypoint/{namespace}", name="waypoint", namespace=namespace,
                    network=network)


def network_address(ip: str, network: str = "") -> NetworkAddress:
    return NetworkAddress(network, ipaddress.ip_address(ip))
