"""Fail closed on binding documents we cannot read (pure): each kind of broken
Namespace/Service/Pod/Gateway/GatewayClass document, and an unreadable file, makes
exactly the targets it could bind *unresolved* (agent/waypoint/binding.py ``Fault``,
written by agent/waypoint/config.py ``assign_waypoints`` as a ``GatewayAddress`` under
``waypoint-unresolved.invalid``, agent/model/types.py ``UnresolvedBinding``), which
the tunnel refuses (agent/model/select.py ``resolve_waypoint``: UNRESOLVED); the
others bind as before. The marker round-trips through the YAML and is validated
strictly."""

from __future__ import annotations

import copy
import ipaddress
import random
from pathlib import Path
from typing import Any

import pytest

from agent.model.commands import warnings
from agent.model.loader import ModelLoadError, load_model_text, model_to_yaml
from agent.model.select import WaypointOutcome, resolve_waypoint
from agent.model.types import (
    BindingDocument,
    BindingField,
    Model,
    NamespacedHostname,
    NetworkAddress,
    Service,
    ServiceBinding,
    UnresolvedBinding,
    Workload,
)
from agent.waypoint.config import UNREADABLE_KIND, assign_waypoints, read_documents

USE, USE_NS, FOR = "istio.io/use-waypoint", "istio.io/use-waypoint-namespace", \
    "istio.io/waypoint-for"


def _svc(namespace: str, name: str, vip: str) -> Service:
    return Service(name, namespace, f"{name}.{namespace}.svc.cluster.local",
                   vips=(NetworkAddress("", ipaddress.ip_address(vip)),), ports=((80, 8080),))


def _model() -> Model:
    services = [_svc("apps", "web", "10.96.0.1"), _svc("apps", "own", "10.96.0.2"),
                _svc("apps", "opt", "10.96.0.3"), _svc("front", "api", "10.96.0.4"),
                _svc("front", "plain", "10.96.0.5")]
    web = NamespacedHostname("apps", "web.apps.svc.cluster.local")
    workloads = [
        Workload("c//v1/Pod/apps/web-1", "web-1", "apps",
                 (ipaddress.ip_address("10.0.0.1"),), services=(ServiceBinding(
                     web, ((80, 8080),)),)),
        Workload("c//v1/Pod/front/api-1", "api-1", "front",
                 (ipaddress.ip_address("10.0.0.2"),)),
        Workload("c//v1/Pod/front/client", "client", "front",
                 (ipaddress.ip_address("10.0.0.3"),)),
        Workload("c//v1/Pod/apps/waypoint-0", "waypoint-0", "apps",
                 (ipaddress.ip_address("10.0.0.9"),))]
    return Model.build(workloads, services)


def _doc(kind: str, name: str, namespace: str | None = None, **labels: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if namespace:
        meta["namespace"] = namespace
    return {"kind": kind, "metadata": meta}


def _gateway(name: str, namespace: str, traffic: str | None, routes: dict[str, Any]
             ) -> dict[str, Any]:
    doc = _doc("Gateway", name, namespace, **({FOR: traffic} if traffic else {}))
    doc["spec"] = {"gatewayClassName": "istio-waypoint", "listeners": [
        {"name": "mesh", "port": 15008, "protocol": "HBONE",
         "allowedRoutes": {"namespaces": routes}}]}
    return doc


def _docs() -> list[dict[str, Any]]:
    """apps (namespace waypoint ``waypoint``, for all), own -> ``hot`` (service-only, its
    traffic type from the class), opt opts out; front/api -> ``infra/shared``, which
    admits namespaces labelled team=front (Selector); front/plain and the pods of front
    are not bound."""
    return [
        _doc("Namespace", "apps", **{USE: "waypoint"}),
        _doc("Namespace", "front", team="front"),
        _doc("Namespace", "infra"),
        _gateway("waypoint", "apps", "all", {"from": "Same"}),
        _gateway("hot", "apps", None, {"from": "Same"}),
        _gateway("shared", "infra", "service",
                 {"from": "Selector", "selector": {"matchLabels": {"team": "front"}}}),
        _doc("GatewayClass", "istio-waypoint"),
        _doc("Service", "own", "apps", **{USE: "hot"}),
        _doc("Service", "opt", "apps", **{USE: "none"}),
        _doc("Service", "api", "front", **{USE: "shared", USE_NS: "infra"}),
        _doc("Pod", "web-1", "apps", app="web"),
        _doc("Pod", "waypoint-0", "apps",
             **{"gateway.networking.k8s.io/gateway-name": "waypoint"}),
    ]


def _summary(docs: list[Any]) -> dict[str, str]:
    """target name -> the waypoint key, "-" (none) or "unresolved: <document: field>"."""
    model, _ = assign_waypoints(_model(), docs)
    out = {}
    for name, gw in [*((s.name, s.waypoint) for s in model.services),
                     *((w.name, w.waypoint) for w in model.workloads)]:
        fault = UnresolvedBinding.of(gw)
        if fault is not None:
            out[name] = f"unresolved: {fault}"
        elif gw is None:
            out[name] = "-"
        else:
            assert isinstance(gw.destination, NamespacedHostname)
            out[name] = f"{gw.destination.namespace}/{gw.destination.hostname.split('.')[0]}"
    return out


GOOD = {"web": "apps/waypoint", "own": "apps/hot", "opt": "-", "api": "infra/shared",
        "plain": "-", "web-1": "apps/waypoint", "api-1": "-", "client": "-",
        "waypoint-0": "-"}


def test_valid_documents_bind_as_before() -> None:
    assert _summary(_docs()) == GOOD


def _set(docs: list[dict[str, Any]], index: int, path: tuple[Any, ...], value: Any
         ) -> list[dict[str, Any]]:
    docs = copy.deepcopy(docs)
    target = docs[index]
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return docs


_DELETE = object()
(NS_APPS, NS_FRONT, _NS_INFRA, GW_WP, _GW_HOT, GW_SHARED, GWC, SVC_OWN, _SVC_OPT, SVC_API,
 POD_WEB) = range(11)
LABELS = ("metadata", "labels")
ROUTES = ("spec", "listeners", 0, "allowedRoutes", "namespaces")

CASES: list[tuple[str, int, tuple[Any, ...], Any, dict[str, str]]] = [
    ("namespace use-waypoint not a name", NS_APPS, (*LABELS, USE), "Bad_Name!",
     {"web": "Namespace apps: metadata.labels[istio.io/use-waypoint]",
      "web-1": "Namespace apps: metadata.labels[istio.io/use-waypoint]"}),
    ("namespace labels not strings", NS_APPS, (*LABELS, USE), 7,
     {"web": "Namespace apps: metadata.labels", "web-1": "Namespace apps: metadata.labels"}),
    ("namespace use-waypoint-namespace not a namespace", NS_APPS, (*LABELS, USE_NS), "x_y",
     {"web": "Namespace apps: metadata.labels[istio.io/use-waypoint-namespace]",
      "web-1": "Namespace apps: metadata.labels[istio.io/use-waypoint-namespace]"}),
    # front's labels are unknown: its inheritors, and api, whose waypoint admits
    # namespaces by label (Selector).
    ("namespace front labels garbage", NS_FRONT, LABELS, ["team"],
     {"api": "Namespace front: metadata.labels", "plain": "Namespace front: metadata.labels",
      "api-1": "Namespace front: metadata.labels",
      "client": "Namespace front: metadata.labels"}),
    ("service use-waypoint empty", SVC_OWN, (*LABELS, USE), "",
     {"own": "Service apps/own: metadata.labels[istio.io/use-waypoint]"}),
    ("service use-waypoint-namespace bad", SVC_API, (*LABELS, USE_NS), "Infra!",
     {"api": "Service front/api: metadata.labels[istio.io/use-waypoint-namespace]"}),
    ("service without a namespace", SVC_OWN, ("metadata", "namespace"), _DELETE,
     {"own": "Service ?/own: metadata"}),
    ("pod use-waypoint-namespace bad", POD_WEB, (*LABELS, USE_NS), "a.b",
     {"web-1": "Pod apps/web-1: metadata.labels[istio.io/use-waypoint-namespace]"}),
    # Its own pod too: we cannot tell whether that is a waypoint instance.
    ("gateway waypoint-for unsupported", GW_WP, (*LABELS, FOR), "bogus",
     {"web": "Gateway apps/waypoint: metadata.labels[istio.io/waypoint-for]",
      "web-1": "Gateway apps/waypoint: metadata.labels[istio.io/waypoint-for]",
      "waypoint-0": "Gateway apps/waypoint: metadata.labels[istio.io/waypoint-for]"}),
    ("gateway allowedRoutes from unsupported", GW_SHARED, (*ROUTES, "from"), "Everyone",
     {"api": "Gateway infra/shared: spec.listeners[].allowedRoutes"}),
    ("gateway Selector without a selector", GW_SHARED, (*ROUTES, "selector"), _DELETE,
     {"api": "Gateway infra/shared: spec.listeners[].allowedRoutes"}),
    ("gateway selector operator unsupported", GW_SHARED, (*ROUTES, "selector"),
     {"matchExpressions": [{"key": "team", "operator": "Like"}]},
     {"api": "Gateway infra/shared: spec.listeners[].allowedRoutes"}),
    ("gateway listeners not a list", GW_WP, ("spec", "listeners"), "mesh",
     {"web": "Gateway apps/waypoint: spec.listeners",
      "web-1": "Gateway apps/waypoint: spec.listeners",
      "waypoint-0": "Gateway apps/waypoint: spec.listeners"}),
    # A Gateway with no namespace could be any namespace's "waypoint".
    ("gateway without a namespace", GW_WP, ("metadata", "namespace"), _DELETE,
     {"web": "Gateway ?/waypoint: metadata", "web-1": "Gateway ?/waypoint: metadata",
      "waypoint-0": "Gateway ?/waypoint: metadata"}),
    # hot takes its traffic type from the class; waypoint has its own label.
    ("gatewayclass waypoint-for unsupported", GWC, (*LABELS, FOR), "everything",
     {"own": "GatewayClass istio-waypoint: metadata.labels[istio.io/waypoint-for]"}),
]


@pytest.mark.parametrize(("index", "path", "value", "unresolved"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_broken_document_fails_what_it_could_bind_closed(
        index: int, path: tuple[Any, ...], value: Any, unresolved: dict[str, str]) -> None:
    got = _summary(_set(_docs(), index, path, value))
    assert got == {**GOOD, **{k: f"unresolved: {v}" for k, v in unresolved.items()}}


def test_a_namespace_document_without_a_name_could_be_any_namespace() -> None:
    got = _summary(_set(_docs(), NS_APPS, ("metadata", "name"), _DELETE))
    why = "unresolved: Namespace ?: metadata"
    # Every target that would inherit, and api (Selector: its namespace's labels).
    assert got == {**GOOD, "web": why, "plain": why, "web-1": why, "api-1": why,
                   "client": why, "api": why}


def test_an_unreadable_file_fails_everything_closed(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("kind: Namespace\nmetadata: {name: apps\n")
    docs, problems = read_documents(tmp_path)
    assert any(d.get("kind") == UNREADABLE_KIND for d in docs)
    got = _summary([*_docs(), *docs])
    assert got == dict.fromkeys(GOOD, "unresolved: a document of unknown kind: "
                                      "(the whole document)")
    _, issues = assign_waypoints(_model(), [*_docs(), *docs], problems)
    assert any("a.yaml" in p and "fails closed" in p for p in issues)


def test_the_problems_name_document_field_and_targets() -> None:
    docs = _set(_docs(), GW_WP, (*LABELS, FOR), "bogus")
    _, issues = assign_waypoints(_model(), docs)
    assert any(p.startswith("Gateway apps/waypoint: metadata.labels[istio.io/waypoint-for]")
               and "'bogus'" in p for p in issues), issues
    assert any(p.startswith("Service apps/web: waypoint_unresolved") for p in issues), issues


def test_the_marker_round_trips_is_strict_and_the_tunnel_refuses_it() -> None:
    docs = _set(_docs(), NS_APPS, (*LABELS, USE), "Bad_Name!")
    model, _ = assign_waypoints(_model(), docs)
    web = next(s for s in model.services if s.name == "web")
    assert web.waypoint is not None
    assert str(web.waypoint) == ("apps/use-waypoint.namespace._.apps."
                                 "waypoint-unresolved.invalid:15008")
    again = load_model_text(model_to_yaml(model), "again.yaml")
    assert again == model
    client = next(w for w in again.workloads if w.name == "client")
    hop = resolve_waypoint(again, client, "10.96.0.1", 80, random.Random(1))
    assert hop.outcome is WaypointOutcome.UNRESOLVED and hop.outcome.fails_closed
    assert "Namespace apps: metadata.labels[istio.io/use-waypoint]" in hop.reason
    hop = resolve_waypoint(again, client, "10.0.0.1", 8080, random.Random(1))
    assert hop.outcome is WaypointOutcome.UNRESOLVED
    assert any("unresolved waypoint binding (Namespace apps" in w for w in warnings(again))
    # Strict: a hand-written marker that does not decode, a reserved Service hostname.
    text = model_to_yaml(model)
    for bad, field in (("use-waypoint.namespace._.apps", "whatever.namespace._.apps"),
                       ("use-waypoint.namespace._.apps", "use-waypoint.nope._.apps")):
        with pytest.raises(ModelLoadError) as info:
            load_model_text(text.replace(bad, field, 1), "m.yaml")
        assert "waypoint.destination" in str(info.value)
    reserved = text.replace("hostname: web.apps.svc.cluster.local",
                            "hostname: x.waypoint-unresolved.invalid", 1)
    with pytest.raises(ModelLoadError, match="reserved"):
        load_model_text(reserved, "m.yaml")


def test_marker_parts_that_are_not_dns_names_are_written_unknown() -> None:
    fault = UnresolvedBinding(BindingDocument.POD, BindingField.LABELS, "apps", "Web_1")
    assert fault.hostname() == "labels.pod.apps._.waypoint-unresolved.invalid"
    assert UnresolvedBinding.parse_hostname(fault.hostname()) == UnresolvedBinding(
        BindingDocument.POD, BindingField.LABELS, "apps", "")
    long_name = ".".join(["a" * 60] * 4)
    fault = UnresolvedBinding(BindingDocument.POD, BindingField.LABELS, "apps", long_name)
    assert len(fault.hostname()) <= 253 and "._.waypoint-unresolved" in fault.hostname()
