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
:func:`assign_waypoints` writes the same bindings into the model (every Service's and
Workload's ``waypoint``, ztunnel's ``GatewayAddress``) for the node tunnels.
Anything unreadable is reported (``problems``) and never widens: an unreadable
``AuthorizationPolicy`` fails closed (agent/waypoint/authz.py); an unreadable route
serves nothing; an unreadable binding document binds nothing at the waypoint and
makes what it could bind fail closed at the node tunnels (binding.py ``Fault``).
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from agent.model.types import (
    BindingDocument,
    BindingField,
    GatewayAddress,
    Model,
    NamespacedHostname,
    NetworkAddress,
    Service,
    UnresolvedBinding,
    Workload,
)
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
    # Workloads bound to this waypoint by address: any port of theirs is ours (a port
    # no Service declares is TCP).
    bound_workloads: dict[str, Workload] = field(default_factory=dict)

    def destination(self, ip: str, port: int) -> Destination | None:
        key = (str(ipaddress.ip_address(ip)), port)
        found = self.destinations.get(key)
        if found is None and key[0] in self.bound_workloads:
            return Destination(AppProtocol.TCP, port, workload=self.bound_workloads[key[0]])
        return found

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
            # We cannot know whether it held a DENY, or a binding: fail closed for
            # everything.
            docs.append({"kind": "AuthorizationPolicy", "unreadable": str(path)})
            docs.append({"kind": UNREADABLE_KIND, "source": str(path)})
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


# Stands in for a file read_documents could not read (it could have held any binding).
UNREADABLE_KIND = "meshagent.io/Unreadable"
_BINDING_KINDS = ("Namespace", "Service", "Pod", "Gateway", "GatewayClass")
_KNOWN_KINDS = (*_BINDING_KINDS, "HTTPRoute", "AuthorizationPolicy")


def _str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                           for k, v in value.items())


_WAYPOINT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")
_NAMESPACE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DOCUMENT_KINDS = {"Namespace": BindingDocument.NAMESPACE, "Service": BindingDocument.SERVICE,
                   "Pod": BindingDocument.POD, "Gateway": BindingDocument.GATEWAY,
                   "GatewayClass": BindingDocument.GATEWAY_CLASS}


def _label_problem(kind: str, labels: Mapping[str, str]) -> tuple[BindingField, str] | None:
    """A binding label whose value we cannot honour (it would otherwise be ignored or
    read as something narrower, and its targets sent direct)."""
    if kind in ("Namespace", "Service", "Pod"):
        value = labels.get(binding.USE_WAYPOINT)
        if value is not None and value != "none" and not _WAYPOINT_NAME.match(value):
            return BindingField.USE_WAYPOINT, (
                f"{value!r} is neither 'none' nor a waypoint name (a lower-case DNS name)")
        value = labels.get(binding.USE_WAYPOINT_NAMESPACE)
        if value is not None and not _NAMESPACE_NAME.match(value):
            return BindingField.USE_WAYPOINT_NAMESPACE, f"{value!r} is not a namespace name"
    if kind in ("Gateway", "GatewayClass"):
        value = labels.get(binding.WAYPOINT_FOR)
        if value is not None and value not in {t.value for t in binding.TrafficType}:
            return BindingField.WAYPOINT_FOR, (
                f"{value!r} is not one of {', '.join(t.value for t in binding.TrafficType)}")
    return None


def binding_doc_problem(doc: dict[str, Any]) -> tuple[BindingField, str] | None:
    """Why a Namespace/Service/Pod/Gateway/GatewayClass document cannot be read (the
    fields binding uses), as the field at fault and the problem; or None."""
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) \
            or not meta["name"]:
        return BindingField.METADATA, "metadata.name: required"
    if doc["kind"] not in ("Namespace", "GatewayClass") and (
            not isinstance(meta.get("namespace"), str) or not meta["namespace"]):
        return BindingField.METADATA, "metadata.namespace: required"
    if "labels" in meta and not _str_map(meta["labels"]):
        return BindingField.LABELS, "metadata.labels: must map strings to strings"
    label = _label_problem(doc["kind"], meta.get("labels") or {})
    if label is not None:
        return label
    spec = doc.get("spec", {})
    if not isinstance(spec, dict):
        return BindingField.SPEC, "spec: must be a mapping"
    if doc["kind"] == "Service":
        ports = spec.get("ports", [])
        if not isinstance(ports, list) or not all(
                isinstance(p, dict) and isinstance(p.get("port"), int)
                and isinstance(p.get("name", ""), str)
                and isinstance(p.get("appProtocol", ""), str) for p in ports):
            return BindingField.PORTS, ("spec.ports: each needs an integer port (name, "
                                        "appProtocol: strings)")
    if doc["kind"] == "Gateway":
        listeners = spec.get("listeners", [])
        if not isinstance(listeners, list) or not all(isinstance(x, dict) for x in listeners):
            return BindingField.LISTENERS, "spec.listeners: must be a list of mappings"
        for i, x in enumerate(listeners):
            where = f"spec.listeners[{i}].allowedRoutes.namespaces"
            routes = x.get("allowedRoutes", {})
            ns = routes.get("namespaces", {}) if isinstance(routes, dict) else None
            if not isinstance(ns, dict):
                return BindingField.ALLOWED_ROUTES, f"{where}: must be a mapping"
            allowed = ns.get("from", "Same")
            if allowed not in {f.value for f in binding.FromNamespaces}:
                return BindingField.ALLOWED_ROUTES, (
                    f"{where}.from: {allowed!r} is not one of "
                    f"{', '.join(f.value for f in binding.FromNamespaces)}")
            if allowed == binding.FromNamespaces.SELECTOR.value and "selector" not in ns:
                return BindingField.ALLOWED_ROUTES, f"{where}.selector: required by Selector"
            sel = ns.get("selector", {})
            if not isinstance(sel, dict) or not _str_map(sel.get("matchLabels", {})) or \
                    not isinstance(sel.get("matchExpressions", []), list) or not all(
                        isinstance(e, dict) and isinstance(e.get("key"), str)
                        and e.get("operator") in ("In", "NotIn", "Exists", "DoesNotExist")
                        and isinstance(e.get("values", []), list)
                        for e in sel.get("matchExpressions", [])):
                return BindingField.ALLOWED_ROUTES, f"{where}.selector: invalid"
        if not isinstance(spec.get("gatewayClassName", ""), str):
            return BindingField.GATEWAY_CLASS, "spec.gatewayClassName: must be a string"
    return None


def _fault(kind: str, doc: Mapping[str, Any], where: BindingField, problem: str
           ) -> binding.Fault:
    raw = doc.get("metadata")
    meta: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
    name, ns = meta.get("name"), meta.get("namespace")
    cluster_scoped = kind in ("Namespace", "GatewayClass")
    return binding.Fault.of(UnresolvedBinding(
        _DOCUMENT_KINDS[kind], where,
        "" if cluster_scoped or not isinstance(ns, str) else ns,
        name if isinstance(name, str) else ""), problem)


@dataclass
class _Documents:
    """The documents sorted by kind, with the broken binding documents set aside."""

    by_kind: dict[str, list[dict[str, Any]]]
    faults: list[binding.Fault]
    issues: list[str]
    waypoints: list[binding.Waypoint]
    bindings: binding.Bindings
    _labels: dict[tuple[str, str, str], dict[str, str]] | None = None

    def labels(self, kind: str, namespace: str, name: str) -> dict[str, str]:
        if self._labels is None:  # indexed once: a 10,000-pod cluster is looked up per pod
            self._labels = {}
            for k, docs in self.by_kind.items():
                for d in docs:
                    ns, n, labels = _meta(d)
                    self._labels.setdefault((k, ns, n), labels)
        return self._labels.get((kind, namespace, name), {})


def _sort_documents(docs: Iterable[Any], problems: Iterable[str]) -> _Documents:
    issues = list(problems)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    faults: list[binding.Fault] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            issues.append(f"document {i}: not a mapping (ignored)")
            continue
        kind = str(doc.get("kind"))
        if kind == UNREADABLE_KIND:
            faults.append(binding.Fault.of(
                UnresolvedBinding(BindingDocument.UNKNOWN, BindingField.DOCUMENT),
                f"{doc.get('source')} cannot be read"))
            issues.append(f"{doc.get('source')}: unreadable, so every service and workload "
                          "fails closed (waypoint_unresolved)")
            continue
        if kind not in _KNOWN_KINDS:
            issues.append(f"document {i}: kind {kind!r} is not used by the waypoint (ignored)")
            continue
        if kind in _BINDING_KINDS:
            problem = binding_doc_problem(doc)
            if problem is not None:
                fault = _fault(kind, doc, *problem)
                faults.append(fault)
                issues.append(f"{fault.cause}: {problem[1]}: binds nothing, and what it "
                              "could bind fails closed (waypoint_unresolved)")
                continue
        by_kind.setdefault(kind, []).append(doc)
    classes = {(_meta(d)[1]): _meta(d)[2] for d in by_kind.get("GatewayClass", [])}
    class_faults = [f for f in faults if f.target is BindingDocument.GATEWAY_CLASS]
    waypoints = []
    for d in by_kind.get("Gateway", []):
        class_name = (d.get("spec") or {}).get("gatewayClassName", "istio-waypoint")
        namespace, name, labels = _meta(d)
        broken_class = next((f for f in class_faults
                             if f.covers(BindingDocument.GATEWAY_CLASS, "", class_name)), None)
        if broken_class is not None and binding.WAYPOINT_FOR not in labels:
            # Its traffic type would come from a class we cannot read.
            faults.append(binding.Fault(BindingDocument.GATEWAY, namespace, name,
                                        broken_class.cause, broken_class.problem))
            continue
        waypoints.append(_gateway(d, classes.get(class_name, {})))
    namespaces = [binding.Object(_meta(d)[1], _meta(d)[1], _meta(d)[2])
                  for d in by_kind.get("Namespace", [])]
    return _Documents(by_kind, faults, issues, waypoints,
                      binding.Bindings(namespaces, waypoints, faults))


def waypoint_hostname(key: str, domain: str = "cluster.local") -> NamespacedHostname:
    """The waypoint Service a Gateway ``namespace/name`` is reached through (Istio
    creates ``<name>.<namespace>.svc.<domain>`` for every waypoint Gateway)."""
    namespace, _, name = key.partition("/")
    return NamespacedHostname(namespace, f"{name}.{namespace}.svc.{domain}")


def _gateway_address(b: binding.Binding, target_namespace: str,
                     domain: str) -> GatewayAddress | None:
    """What the node tunnel gets for a binding: the waypoint's Service for a bound
    target and for one that must fail closed (a missing waypoint names a Service
    nobody has; a loop is detected by the tunnel; an unresolved binding names the
    document at fault under ``waypoint-unresolved.invalid``, types.py
    ``UnresolvedBinding``), nothing otherwise (as istiod, which reports
    attachment-denied and unsupported-traffic in status and sends no waypoint)."""
    if b.fault is not None:
        return b.fault.cause.gateway(target_namespace)
    if b.named is None or not (b.bound or b.outcome.fails_closed):
        return None
    return GatewayAddress(waypoint_hostname(b.named, domain), HBONE_PORT)


def assign_waypoints(model: Model, docs: Iterable[Any], problems: Iterable[str] = (),
                     domain: str = "cluster.local") -> tuple[Model, list[str]]:
    """The model with every Service's and Workload's ``waypoint`` set as istiod would
    (binding.py's rules over the Namespace/Service/Pod/Gateway documents), and the
    problems found (bad documents, refused bindings). What a lab or Kubernetes feed
    calls before writing the model for the node tunnels. What a broken document could
    bind fails closed: its targets get an unresolved waypoint (binding.py
    :class:`~agent.waypoint.binding.Fault`), which the tunnel refuses; the previous
    ``waypoint`` values are replaced."""
    sorted_docs = _sort_documents(docs, problems)
    issues = sorted_docs.issues
    quiet = (binding.BindingOutcome.NOT_BOUND, binding.BindingOutcome.OPTED_OUT)

    def waypoint_of(kind: str, namespace: str, name: str) -> GatewayAddress | None:
        target = binding.Object(namespace, name, sorted_docs.labels(kind, namespace, name))
        b = (sorted_docs.bindings.for_service(target) if kind == "Service"
             else sorted_docs.bindings.for_workload(target))
        if b.reason and not b.bound and b.outcome not in quiet:
            issues.append(f"{kind} {namespace}/{name}: {b.outcome.value}: {b.reason}")
        return _gateway_address(b, namespace, domain)

    services = [replace(s, waypoint=waypoint_of("Service", s.namespace, s.name))
                for s in model.services]
    workloads = [replace(w, waypoint=waypoint_of("Pod", w.namespace, w.name))
                 for w in model.workloads]
    return Model.build(workloads, services, model.foreign_policies), issues


def build_state(model: Model, docs: Iterable[Any], me: tuple[str, str],
                problems: Iterable[str] = ()) -> WaypointState:
    """Bind the model's services and workloads; compile routes and policies. Never
    raises for bad documents: each is reported in ``problems`` and binds nothing here
    (what it could bind is unresolved: not ours; the node tunnels refuse it)."""
    sorted_docs = _sort_documents(docs, problems)
    issues, by_kind = sorted_docs.issues, sorted_docs.by_kind
    waypoints, bindings = sorted_docs.waypoints, sorted_docs.bindings
    mine = next((w for w in waypoints if (w.namespace, w.name) == me), None)
    if mine is None:
        issues.append(f"no Gateway {me[0]}/{me[1]} among the documents: this waypoint "
                      "binds nothing until one exists")
        mine = binding.Waypoint(me[0], me[1], binding.TrafficType.NONE)
    svc_docs = {(_meta(d)[0], _meta(d)[1]): d for d in by_kind.get("Service", [])}
    pod_docs = {(_meta(d)[0], _meta(d)[1]): d for d in by_kind.get("Pod", [])}
    destinations: dict[tuple[str, int], Destination] = {}
    bound_workloads: dict[str, Workload] = {}
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
        # A target port's protocol comes from the first Service declaring it, those of
        # the workload's own namespace first (a Kubernetes Service selects pods of its
        # own namespace only), then in key order: deterministic.
        backing_first = sorted(wl.services,
                               key=lambda sb: (sb.service.namespace != wl.namespace, sb.service))
        for ip in wl.workload_ips:
            bound_workloads[str(ip)] = wl
            for svc_b in backing_first:
                backing = model.service(svc_b.service)
                doc = svc_docs.get((backing.namespace, backing.name), {}) if backing else {}
                for port, target in svc_b.ports:
                    if (str(ip), target) in destinations:
                        continue
                    p = next((x for x in ((doc.get("spec") or {}).get("ports") or [])
                              if isinstance(x, dict) and x.get("port") == port), {})
                    destinations[(str(ip), target)] = Destination(
                        port_protocol(p.get("name"), p.get("appProtocol")), target,
                        workload=wl)
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
                         refused, bound_workloads)


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
