"""Read API objects (plain JSON dicts) into typed facts, tolerantly (pure).

The API server validates what it stores, but this agent must survive anything a
watch delivers: a missing field, a label whose value is not a string, an IP that
does not parse. Each reader returns the facts or an :class:`ObjectProblem` naming
the object, the field and what to do; the caller logs it and keeps the last good
version of that object (nothing is half-read or guessed).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.k8s.rules import PodFacts


@dataclass(frozen=True)
class ObjectProblem:
    kind: str
    key: str
    field: str
    problem: str

    def __str__(self) -> str:
        return (f"{self.kind} {self.key or '(unnamed)'}: {self.field}: {self.problem}; "
                "the object is ignored and its last good version kept: fix the object "
                "(kubectl edit) or report the client that wrote it")


class _Bad(Exception):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field, self.problem = field, problem


def _map(value: Any, field: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _Bad(field, f"is a {type(value).__name__}, not an object")
    return value


def _str_map(value: Any, field: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in _map(value, field).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise _Bad(f"{field}[{k!r}]", f"{v!r} is not a string (label and annotation "
                                          "values are strings: quote it)")
        out[k] = v
    return out


def _str(value: Any, field: str, required: bool = False) -> str:
    if value is None:
        if required:
            raise _Bad(field, "is required")
        return ""
    if not isinstance(value, str):
        raise _Bad(field, f"{value!r} is not a string")
    if required and not value:
        raise _Bad(field, "is empty")
    return value


def _list(value: Any, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Bad(field, f"is a {type(value).__name__}, not a list")
    return value


def object_key(obj: Any) -> str:
    """``namespace/name`` (or ``name``), best effort, for messages and cache keys."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        return ""
    name, ns = meta.get("name"), meta.get("namespace")
    if not isinstance(name, str):
        return ""
    return f"{ns}/{name}" if isinstance(ns, str) and ns else name


@dataclass(frozen=True)
class Meta:
    namespace: str
    name: str
    uid: str
    labels: dict[str, str]
    annotations: dict[str, str]
    resource_version: str
    deleting: bool


def _meta(obj: Any, namespaced: bool) -> Meta:
    if not isinstance(obj, Mapping):
        raise _Bad("", f"is a {type(obj).__name__}, not an object")
    meta = _map(obj.get("metadata"), "metadata")
    return Meta(
        namespace=_str(meta.get("namespace"), "metadata.namespace", required=namespaced),
        name=_str(meta.get("name"), "metadata.name", required=True),
        uid=_str(meta.get("uid"), "metadata.uid"),
        labels=_str_map(meta.get("labels"), "metadata.labels"),
        annotations=_str_map(meta.get("annotations"), "metadata.annotations"),
        resource_version=_str(meta.get("resourceVersion"), "metadata.resourceVersion"),
        deleting=meta.get("deletionTimestamp") is not None)


@functools.lru_cache(maxsize=1 << 16)
def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``ipaddress.ip_address``, cached: a pod's IP is read from the pod, its
    EndpointSlices and the model (the stdlib parser dominated a 10,000-pod build)."""
    return ipaddress.ip_address(text)


@functools.lru_cache(maxsize=1 << 16)
def _canonical_ip(text: str) -> str:
    return str(parse_ip(text))


def _ip(value: Any, field: str) -> str:
    text = _str(value, field, required=True)
    try:
        return _canonical_ip(text)
    except ValueError:
        raise _Bad(field, f"{text!r} is not an IP address") from None


@dataclass(frozen=True)
class Pod:
    meta: Meta
    node: str
    service_account: str
    host_network: bool
    phase: str
    ips: tuple[str, ...]
    ready: bool

    @property
    def key(self) -> str:
        return f"{self.meta.namespace}/{self.meta.name}"

    def facts(self) -> PodFacts:
        return PodFacts(self.meta.namespace, self.meta.name, self.meta.labels,
                        self.meta.annotations, self.host_network, self.phase, self.ips)


def read_pod(obj: Any) -> Pod | ObjectProblem:
    try:
        meta = _meta(obj, namespaced=True)
        spec = _map(obj.get("spec"), "spec")
        status = _map(obj.get("status"), "status")
        host_network = spec.get("hostNetwork", False)
        if not isinstance(host_network, bool):
            raise _Bad("spec.hostNetwork", f"{host_network!r} is not a boolean")
        # GetPodIPsIfPresent: status.podIPs preferred, else status.podIP.
        pod_ips = _list(status.get("podIPs"), "status.podIPs")
        if pod_ips:
            ips = tuple(_ip(_map(p, f"status.podIPs[{i}]").get("ip"), f"status.podIPs[{i}].ip")
                        for i, p in enumerate(pod_ips))
        elif status.get("podIP"):
            ips = (_ip(status.get("podIP"), "status.podIP"),)
        else:
            ips = ()
        ready = False
        for i, cond in enumerate(_list(status.get("conditions"), "status.conditions")):
            cond = _map(cond, f"status.conditions[{i}]")
            if cond.get("type") == "Ready":
                ready = cond.get("status") == "True"
        return Pod(meta, _str(spec.get("nodeName"), "spec.nodeName"),
                   _str(spec.get("serviceAccountName"), "spec.serviceAccountName") or "default",
                   host_network, _str(status.get("phase"), "status.phase"), ips, ready)
    except _Bad as bad:
        return ObjectProblem("Pod", object_key(obj), bad.field, bad.problem)


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: dict[str, str]


def read_namespace(obj: Any) -> Namespace | ObjectProblem:
    try:
        meta = _meta(obj, namespaced=False)
        return Namespace(meta.name, meta.labels)
    except _Bad as bad:
        return ObjectProblem("Namespace", object_key(obj), bad.field, bad.problem)


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    target_port: int  # 0: a named target port, resolved per endpoint
    protocol: str


@dataclass(frozen=True)
class Service:
    meta: Meta
    cluster_ips: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    traffic_distribution: str
    type: str


def _port_number(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise _Bad(field, f"{value!r} is not a port number (1-65535)")
    return value


def read_service(obj: Any) -> Service | ObjectProblem:
    try:
        meta = _meta(obj, namespaced=True)
        spec = _map(obj.get("spec"), "spec")
        ips = [_str(v, f"spec.clusterIPs[{i}]")
               for i, v in enumerate(_list(spec.get("clusterIPs"), "spec.clusterIPs"))]
        if not ips and spec.get("clusterIP"):
            ips = [_str(spec.get("clusterIP"), "spec.clusterIP")]
        cluster_ips = tuple(_ip(ip, "spec.clusterIPs") for ip in ips if ip and ip != "None")
        ports = []
        for i, raw in enumerate(_list(spec.get("ports"), "spec.ports")):
            raw = _map(raw, f"spec.ports[{i}]")
            port = _port_number(raw.get("port"), f"spec.ports[{i}].port")
            target = raw.get("targetPort", port)
            target_port = target if isinstance(target, int) and not isinstance(
                target, bool) else 0
            if target_port:
                _port_number(target_port, f"spec.ports[{i}].targetPort")
            elif not isinstance(target, str):
                raise _Bad(f"spec.ports[{i}].targetPort", f"{target!r} is neither a port "
                           "number nor a port name")
            ports.append(ServicePort(_str(raw.get("name"), f"spec.ports[{i}].name"), port,
                                     target_port, _str(raw.get("protocol"), "") or "TCP"))
        return Service(meta, cluster_ips, tuple(ports),
                       _str(spec.get("trafficDistribution"), "spec.trafficDistribution"),
                       _str(spec.get("type"), "spec.type") or "ClusterIP")
    except _Bad as bad:
        return ObjectProblem("Service", object_key(obj), bad.field, bad.problem)


@dataclass(frozen=True)
class SliceEndpoint:
    addresses: tuple[str, ...]
    ready: bool
    pod: str  # "namespace/name" of targetRef kind Pod, "" for others


@dataclass(frozen=True)
class EndpointSlice:
    meta: Meta
    service: str  # kubernetes.io/service-name
    address_type: str
    ports: tuple[tuple[str, int], ...]  # (name, port)
    endpoints: tuple[SliceEndpoint, ...]


SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def read_endpoint_slice(obj: Any) -> EndpointSlice | ObjectProblem:
    try:
        meta = _meta(obj, namespaced=True)
        ports = []
        for i, raw in enumerate(_list(obj.get("ports"), "ports")):
            raw = _map(raw, f"ports[{i}]")
            ports.append((_str(raw.get("name"), f"ports[{i}].name"),
                          _port_number(raw.get("port"), f"ports[{i}].port")))
        endpoints = []
        for i, raw in enumerate(_list(obj.get("endpoints"), "endpoints")):
            raw = _map(raw, f"endpoints[{i}]")
            conditions = _map(raw.get("conditions"), f"endpoints[{i}].conditions")
            # EndpointConditions.ready: "nil should be interpreted as true".
            ready = conditions.get("ready") is not False
            ref = _map(raw.get("targetRef"), f"endpoints[{i}].targetRef")
            pod = ""
            if ref.get("kind") == "Pod":
                pod = (f"{_str(ref.get('namespace'), '') or meta.namespace}/"
                       f"{_str(ref.get('name'), f'endpoints[{i}].targetRef.name', True)}")
            addresses = tuple(_ip(a, f"endpoints[{i}].addresses[{j}]") for j, a in
                              enumerate(_list(raw.get("addresses"), f"endpoints[{i}].addresses")))
            endpoints.append(SliceEndpoint(addresses, ready, pod))
        return EndpointSlice(meta, meta.labels.get(SERVICE_NAME_LABEL, ""),
                             _str(obj.get("addressType"), "addressType"), tuple(ports),
                             tuple(endpoints))
    except _Bad as bad:
        return ObjectProblem("EndpointSlice", object_key(obj), bad.field, bad.problem)
