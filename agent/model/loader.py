"""Read and write the cluster model in ztunnel's local-config YAML (pure, plus file I/O).

Two spellings of one format: block YAML for people (:func:`model_to_yaml`) and the
JSON spelling the agent writes at cluster scale (:func:`model_to_json_yaml`, one flow
mapping the stdlib ``json`` reads); :func:`load_model_text` reads either, with the
same checks and the same messages.

The format is what ztunnel reads from ``LOCAL_XDS_PATH``: istio/ztunnel src/xds.rs ::
``LocalConfig`` (``workloads``, ``policies``, ``services``), whose workloads are
``LocalWorkload`` (a flattened src/state/workload.rs :: ``Workload`` plus a
``services`` map ``"namespace/hostname" -> {servicePort: targetPort}``) and whose
services are src/state/service.rs :: ``Service``. Field names are serde's camelCase of
those structs, enum values their variant names, and fields ztunnel requires (no
``#[serde(default)]``) are required here too, so a file this module accepts or writes
is one ztunnel accepts (it follows ztunnel's examples/localhost.yaml format; our own
sample is in tests/unit/data/local-config/).

Stricter than ztunnel, on purpose (never half-understood, never widened):

- unknown fields are refused everywhere (ztunnel's ``LocalWorkload`` flattens
  ``Workload`` with ``#[serde(flatten)]``, and serde documents
  ``deny_unknown_fields`` as unsupported together with flatten, so ztunnel may let
  unknown workload fields through);
- fields we cannot honour are refused when set: weighted waypoints, network gateways,
  ``cidrVips``, application tunnels, native tunnels, hostname-only workloads, and
  ztunnel-format ``policies`` (enforcing none of them would open access: write
  AuthorizationPolicy YAML under ``tunnel.policy_dir`` instead);
- a ``waypoint`` under ``waypoint-unresolved.invalid`` (our fail-closed marker for a
  binding the feed could not work out, types.py ``UnresolvedBinding``) must decode,
  and no Service may take a hostname there;
- a uid is required and unique, VIPs are unique across services and never a workload
  address, ports are 1..65535 (a service's target port may be 0: "per endpoint", how
  Istio sends a named targetPort), duplicate YAML keys are refused.

Every problem is reported with file, field path and entry, e.g.::

    model.yaml: services[1].ports.80 (service default/web.default.svc.cluster.local):
    target port 70000 is not in 0..65535

:class:`ModelWatcher` re-reads the file when it changes and keeps the last good model
in force when the new one is bad or the file is gone.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import yaml

from agent.model.types import (
    Endpoint,
    GatewayAddress,
    HealthPolicy,
    HealthStatus,
    InboundProtocol,
    IpFamily,
    LoadBalancer,
    LoadBalancerMode,
    LoadBalancerScope,
    Locality,
    Model,
    ModelInvalid,
    ModelIssue,
    NamespacedHostname,
    NetworkAddress,
    NetworkMode,
    PortMap,
    Service,
    ServiceBinding,
    UnresolvedBinding,
    Visibility,
    Workload,
    is_unresolved_hostname,
)

# Field names as ztunnel's serde derives them (camelCase of the Rust field names).
TOP_FIELDS = ("workloads", "policies", "services")
WORKLOAD_FIELDS = (
    "uid", "name", "namespace", "serviceAccount", "trustDomain", "workloadIps", "protocol",
    "networkMode", "network", "node", "hostname", "canonicalName", "canonicalRevision",
    "workloadName", "workloadType", "clusterId", "locality", "status", "capacity",
    "authorizationPolicies", "services", "waypoint", "networkGateway", "nativeTunnel",
    "applicationTunnel",
)
WORKLOAD_REQUIRED = ("namespace", "workloadIps", "services")
SERVICE_FIELDS = (
    "name", "namespace", "hostname", "vips", "ports", "endpoints", "subjectAltNames",
    "loadBalancer", "ipFamilies", "canonical", "visibility", "cidrVips", "waypoint",
    "weightedWaypoints",
)
SERVICE_REQUIRED = ("name", "namespace", "hostname", "vips", "ports")
ENDPOINT_FIELDS = ("workloadUid", "port", "status")
LOAD_BALANCER_FIELDS = ("routingPreferences", "mode", "healthPolicy")
LOCALITY_FIELDS = ("region", "zone", "subzone")
# src/state/workload.rs :: GatewayAddress (deny_unknown_fields, both required).
GATEWAY_FIELDS = ("destination", "hboneMtlsPort")
# Known to ztunnel, not supported here: refused unless absent/empty/false.
UNSUPPORTED_WORKLOAD_FIELDS = {
    "networkGateway": "network gateways (multi-network) are not supported",
    "nativeTunnel": "native tunnel workloads are not supported",
    "applicationTunnel": "application tunnels (PROXY protocol) are not supported",
}
UNSUPPORTED_SERVICE_FIELDS = {
    "cidrVips": "CIDR VIPs are not supported; list each VIP in vips",
    "weightedWaypoints": "weighted waypoints are not supported (use waypoint)",
}

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_HOST_LABEL = re.compile(r"^([a-z0-9_]([-a-z0-9_]{0,61}[a-z0-9_])?|\*)$", re.IGNORECASE)

E = TypeVar("E", bound=Enum)


class ModelLoadError(Exception):
    """A model file is bad; ``issues`` lists every problem found."""

    def __init__(self, file: str, issues: Iterable[ModelIssue]) -> None:
        self.file = file
        self.issues = tuple(issues)
        super().__init__("\n".join(f"{file}: {i}" for i in self.issues))


class _Invalid(Exception):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(problem)
        self.path = path
        self.problem = problem


class _UniqueKeyLoader(yaml.CSafeLoader):
    """SafeLoader (libyaml's parser: a 10,000-pod model from the API server is megabytes)
    that refuses duplicate mapping keys (PyYAML keeps the last silently; serde_yaml
    refuses them)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode,
                       deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    result: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in result
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"unhashable mapping key {key!r}", key_node.start_mark) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        result[key] = loader.construct_object(value_node, deep=deep)
    return result


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _construct_mapping)


# -- field helpers ------------------------------------------------------------

def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(
        type(value), type(value).__name__)


def _mapping(value: Any, path: str, allowed: Iterable[str],
             required: Iterable[str] = ()) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(path, f"must be a mapping, not {_type_name(value)}")
    allowed = tuple(allowed)
    for key in value:
        if key not in allowed:
            raise _Invalid(f"{path}.{key}" if path else str(key),
                           f"unknown field (known: {', '.join(allowed)})")
    for key in required:
        if key not in value:
            raise _Invalid(f"{path}.{key}" if path else key, "required field is missing")
    return value


def _list(value: Any, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid(path, f"must be a list, not {_type_name(value)}")
    return value


def _string(value: Any, path: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _Invalid(path, f"must be a string, not {_type_name(value)}")
    return value


def _bool(value: Any, path: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _Invalid(path, f"must be true or false, not {_type_name(value)}")
    return value


def _int(value: Any, path: str, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(path, f"{what} must be an integer, not {_type_name(value)} {value!r}")
    if not low <= value <= high:
        raise _Invalid(path, f"{what} {value} is not in {low}..{high}")
    return value


@functools.cache
def _members(cls: type[E]) -> Mapping[str, E]:
    return {member.value: member for member in cls}


def _enum(cls: type[E], value: Any, path: str) -> E:
    if isinstance(value, str):
        member = _members(cls).get(value)
        if member is not None:
            return member
    names = ", ".join(str(m.value) for m in cls)
    if not isinstance(value, str):
        raise _Invalid(path, f"must be one of {names}, not {_type_name(value)}")
    raise _Invalid(path, f"{value!r} is not one of {names}")


def _ip(value: Any, path: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if not isinstance(value, str):
        raise _Invalid(path, f"must be an IP address string, not {_type_name(value)}")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise _Invalid(path, f"{value!r} is not an IP address") from None


# A cluster has far fewer namespaces and service hostnames than references to them:
# each distinct string is checked once (pure functions of the text, bounded caches).
@functools.lru_cache(maxsize=8192)
def _is_namespace(text: str) -> bool:
    return _DNS_LABEL.match(text) is not None


@functools.lru_cache(maxsize=65536)
def _is_hostname(text: str) -> bool:
    labels = text.split(".")
    return bool(text) and len(text) <= 253 and all(
        _HOST_LABEL.match(label) for label in labels) and "*" not in labels[1:]


def _namespace(value: Any, path: str) -> str:
    text = _string(value, path)
    if not _is_namespace(text):
        raise _Invalid(path, f"{text!r} is not a namespace (a DNS label: lower-case "
                             "letters, digits and '-', at most 63)")
    return text


def _hostname(value: Any, path: str) -> str:
    text = _string(value, path)
    if not _is_hostname(text):
        raise _Invalid(path, f"{text!r} is not a hostname (DNS labels separated by '.', "
                             "'*' only as the first label)")
    return text


def _port_map(value: Any, path: str, target_low: int) -> PortMap:
    """``{servicePort: targetPort}`` with integer keys, as serde's ``HashMap<u16, u16>``."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _Invalid(path, f"must be a mapping of service port to target port, not "
                             f"{_type_name(value)}")
    pairs = []
    for key, target in value.items():
        service_port = _int(key, f"{path}.{key}", 1, 65535, "service port")
        pairs.append((service_port, _int(target, f"{path}.{key}", target_low, 65535,
                                         "target port")))
    return tuple(sorted(pairs))


def _unsupported(data: Mapping[str, Any], path: str, table: Mapping[str, str]) -> None:
    for key, why in table.items():
        if data.get(key) not in (None, False, [], {}):
            raise _Invalid(f"{path}.{key}", f"{why} by meshagent; remove the field")


# -- parsing ------------------------------------------------------------------

def _parse_locality(value: Any, path: str) -> Locality:
    if value is None:
        return Locality()
    # ztunnel's Locality has no serde defaults: all three are required.
    data = _mapping(value, path, LOCALITY_FIELDS, LOCALITY_FIELDS)
    return Locality(*(_string(data[k], f"{path}.{k}") for k in LOCALITY_FIELDS))


def parse_gateway(value: Any, path: str) -> GatewayAddress | None:
    """A ``waypoint`` field: ``{destination: "ns/hostname" | "network/IP",
    hboneMtlsPort: N}``. As serde's untagged ``Destination``: an address when what
    follows the first ``/`` is an IP, else a namespaced hostname."""
    if value is None:
        return None
    data = _mapping(value, path, GATEWAY_FIELDS, GATEWAY_FIELDS)
    dest_path = f"{path}.destination"
    text = data["destination"]
    if not isinstance(text, str):
        raise _Invalid(dest_path, "must be a \"namespace/hostname\" or \"network/IP\" "
                                  f"string, not {_type_name(text)}")
    destination: NetworkAddress | NamespacedHostname
    try:
        destination = NetworkAddress.parse(text)
    except ValueError:
        try:
            destination = NamespacedHostname.parse(text)
        except ValueError:
            raise _Invalid(dest_path, f"{text!r} is neither network/IP nor "
                                      "namespace/hostname") from None
        _namespace(destination.namespace, dest_path)
        _hostname(destination.hostname, dest_path)
        if is_unresolved_hostname(destination.hostname):
            try:  # our fail-closed marker (types.py UnresolvedBinding): strictly ours
                UnresolvedBinding.parse_hostname(destination.hostname)
            except ValueError as exc:
                raise _Invalid(dest_path, f"{exc}; write it with meshagent's feed "
                                          "(agent/waypoint/config.py assign_waypoints)"
                               ) from None
    port = _int(data["hboneMtlsPort"], f"{path}.hboneMtlsPort", 1, 65535, "HBONE port")
    return GatewayAddress(destination, port)


def parse_workload(value: Any, path: str) -> Workload:
    """One ``workloads[]`` entry -> Workload; raises _Invalid."""
    data = _mapping(value, path, WORKLOAD_FIELDS)
    uid = _string(data.get("uid"), f"{path}.uid")
    if not uid:
        raise _Invalid(f"{path}.uid", "required: a unique id such as "
                                      "cluster1//v1/Pod/<namespace>/<name>")
    for key in WORKLOAD_REQUIRED:
        if key not in data:
            raise _Invalid(f"{path}.{key}", "required field is missing (ztunnel requires it)")
    _unsupported(data, path, UNSUPPORTED_WORKLOAD_FIELDS)
    ips = tuple(_ip(v, f"{path}.workloadIps[{i}]")
                for i, v in enumerate(_list(data["workloadIps"], f"{path}.workloadIps")))
    if len(set(ips)) != len(ips):
        raise _Invalid(f"{path}.workloadIps", "lists an address twice")
    hostname = _string(data.get("hostname"), f"{path}.hostname")
    if not ips:
        raise _Invalid(f"{path}.workloadIps",
                       "a workload needs at least one address (workloads reached by "
                       "hostname alone are not supported)")
    services_value = data["services"]
    if services_value is not None and not isinstance(services_value, dict):
        raise _Invalid(f"{path}.services", "must be a mapping of \"namespace/hostname\" to "
                                           f"ports, not {_type_name(services_value)}")
    bindings = []
    for key, ports in (services_value or {}).items():
        key_path = f"{path}.services.{key}"
        if not isinstance(key, str):
            raise _Invalid(key_path, "the key must be \"namespace/hostname\"")
        try:
            service = NamespacedHostname.parse(key)
        except ValueError as error:
            raise _Invalid(key_path, str(error)) from None
        _namespace(service.namespace, key_path)
        _hostname(service.hostname, key_path)
        bindings.append(ServiceBinding(service, _port_map(ports, key_path, 1)))
    authz = tuple(_string(v, f"{path}.authorizationPolicies[{i}]") for i, v in
                  enumerate(_list(data.get("authorizationPolicies"),
                                  f"{path}.authorizationPolicies")))
    capacity = data.get("capacity", 1)
    return Workload(
        uid=uid,
        name=_string(data.get("name"), f"{path}.name"),
        namespace=_namespace(data["namespace"], f"{path}.namespace"),
        workload_ips=ips,
        service_account=_string(data.get("serviceAccount"), f"{path}.serviceAccount"),
        trust_domain=_string(data.get("trustDomain"), f"{path}.trustDomain"),
        network=_string(data.get("network"), f"{path}.network"),
        protocol=_enum(InboundProtocol, data.get("protocol", "TCP"), f"{path}.protocol"),
        network_mode=_enum(NetworkMode, data.get("networkMode", "Standard"),
                           f"{path}.networkMode"),
        node=_string(data.get("node"), f"{path}.node"),
        hostname=hostname,
        canonical_name=_string(data.get("canonicalName"), f"{path}.canonicalName"),
        canonical_revision=_string(data.get("canonicalRevision"), f"{path}.canonicalRevision"),
        workload_name=_string(data.get("workloadName"), f"{path}.workloadName"),
        workload_type=_string(data.get("workloadType"), f"{path}.workloadType"),
        cluster_id=_string(data.get("clusterId"), f"{path}.clusterId"),
        locality=_parse_locality(data.get("locality"), f"{path}.locality"),
        status=_enum(HealthStatus, data.get("status", "Healthy"), f"{path}.status"),
        capacity=_int(capacity, f"{path}.capacity", 0, 2**32 - 1, "capacity"),
        authorization_policies=authz,
        services=tuple(sorted(bindings, key=lambda b: b.service)),
        waypoint=parse_gateway(data.get("waypoint"), f"{path}.waypoint"),
    )


def _parse_load_balancer(value: Any, path: str) -> LoadBalancer | None:
    if value is None:
        return None
    data = _mapping(value, path, LOAD_BALANCER_FIELDS, LOAD_BALANCER_FIELDS)
    scopes = tuple(_enum(LoadBalancerScope, v, f"{path}.routingPreferences[{i}]")
                   for i, v in enumerate(_list(data["routingPreferences"],
                                               f"{path}.routingPreferences")))
    return LoadBalancer(scopes, _enum(LoadBalancerMode, data["mode"], f"{path}.mode"),
                        _enum(HealthPolicy, data["healthPolicy"], f"{path}.healthPolicy"))


def _parse_endpoints(value: Any, path: str) -> tuple[Endpoint, ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _Invalid(path, f"must be a mapping of workload uid to endpoint, not "
                             f"{_type_name(value)}")
    out = []
    for uid, entry in value.items():
        entry_path = f"{path}.{uid}"
        data = _mapping(entry, entry_path, ENDPOINT_FIELDS, ENDPOINT_FIELDS)
        workload_uid = _string(data["workloadUid"], f"{entry_path}.workloadUid")
        if workload_uid != uid:
            raise _Invalid(f"{entry_path}.workloadUid",
                           f"{workload_uid!r} differs from the key {uid!r}")
        out.append(Endpoint(workload_uid, _port_map(data["port"], f"{entry_path}.port", 1),
                            _enum(HealthStatus, data["status"], f"{entry_path}.status")))
    return tuple(sorted(out, key=lambda e: e.workload_uid))


def parse_service(value: Any, path: str) -> Service:
    """One ``services[]`` entry -> Service; raises _Invalid."""
    data = _mapping(value, path, SERVICE_FIELDS, SERVICE_REQUIRED)
    _unsupported(data, path, UNSUPPORTED_SERVICE_FIELDS)
    vips = []
    for i, item in enumerate(_list(data["vips"], f"{path}.vips")):
        vip_path = f"{path}.vips[{i}]"
        if not isinstance(item, str):
            raise _Invalid(vip_path, f"must be a \"network/IP\" string, not {_type_name(item)}")
        try:
            vips.append(NetworkAddress.parse(item))
        except ValueError as error:
            raise _Invalid(vip_path, str(error)) from None
    if len(set(vips)) != len(vips):
        raise _Invalid(f"{path}.vips", "lists a VIP twice")
    ports = _port_map(data["ports"], f"{path}.ports", 0)
    if not ports:
        raise _Invalid(f"{path}.ports", "a service needs at least one port")
    families = data.get("ipFamilies")
    if isinstance(data["hostname"], str) and is_unresolved_hostname(data["hostname"]):
        _raise(f"{path}.hostname", "names under waypoint-unresolved.invalid are reserved "
                                   "for unresolved waypoint bindings; pick another hostname")
    return Service(
        name=_string(data["name"], f"{path}.name") or _raise(f"{path}.name", "must not be empty"),
        namespace=_namespace(data["namespace"], f"{path}.namespace"),
        hostname=_hostname(data["hostname"], f"{path}.hostname"),
        vips=tuple(vips),
        ports=ports,
        endpoints=_parse_endpoints(data.get("endpoints"), f"{path}.endpoints"),
        subject_alt_names=tuple(_string(v, f"{path}.subjectAltNames[{i}]") for i, v in
                                enumerate(_list(data.get("subjectAltNames"),
                                                f"{path}.subjectAltNames"))),
        load_balancer=_parse_load_balancer(data.get("loadBalancer"), f"{path}.loadBalancer"),
        ip_families=None if families is None else _enum(IpFamily, families,
                                                        f"{path}.ipFamilies"),
        canonical=_bool(data.get("canonical"), f"{path}.canonical"),
        visibility=_enum(Visibility, data.get("visibility", "Public"), f"{path}.visibility"),
        waypoint=parse_gateway(data.get("waypoint"), f"{path}.waypoint"),
    )


def _raise(path: str, problem: str) -> str:
    raise _Invalid(path, problem)


def _entry_name(kind: str, value: Any) -> str:
    if isinstance(value, dict):
        if kind == "workload" and isinstance(value.get("uid"), str):
            return f"workload {value['uid']}"
        if kind == "service" and isinstance(value.get("hostname"), str):
            return f"service {value.get('namespace')}/{value['hostname']}"
    return ""


def parse_model(data: Any, file_label: str, *, allow_foreign_policies: bool = False) -> Model:
    """A parsed YAML document -> Model; raise :class:`ModelLoadError` with every problem."""
    issues: list[ModelIssue] = []
    if data is None:
        data = {}
    try:
        top = _mapping(data, "", TOP_FIELDS)
    except _Invalid as bad:
        raise ModelLoadError(file_label, [ModelIssue(bad.path, bad.problem)]) from None
    workloads: list[Workload] = []
    services: list[Service] = []
    sections: list[tuple[str, str, Callable[[Any, str], Any], list[Any]]] = [
        ("workloads", "workload", parse_workload, workloads),
        ("services", "service", parse_service, services)]
    for key, kind, parse, out in sections:
        try:
            entries = _list(top.get(key), key)
        except _Invalid as bad:
            issues.append(ModelIssue(bad.path, bad.problem))
            continue
        for i, entry in enumerate(entries):
            try:
                out.append(parse(entry, f"{key}[{i}]"))
            except _Invalid as bad:
                issues.append(ModelIssue(bad.path, bad.problem, _entry_name(kind, entry)))
    policies: list[Any] = []
    try:
        policies = _list(top.get("policies"), "policies")
    except _Invalid as bad:
        issues.append(ModelIssue(bad.path, bad.problem))
    if policies and not allow_foreign_policies:
        issues.append(ModelIssue(
            "policies", f"{len(policies)} ztunnel-format authorization policies: meshagent "
            "does not enforce these, and ignoring them would allow what they deny; remove "
            "them and write AuthorizationPolicy YAML under tunnel.policy_dir"))
    if issues:
        raise ModelLoadError(file_label, issues)
    try:
        return Model.build(workloads, services, policies)
    except ModelInvalid as invalid:
        raise ModelLoadError(file_label, invalid.issues) from None


# -- the JSON spelling ----------------------------------------------------------
#
# YAML is a superset of JSON, but serde_yaml (0.9, src/de.rs :: deserialize_u64 and
# is_plain_or_tagged_literal_scalar) reads a ``u16`` only from a plain scalar, so the
# port maps (``HashMap<u16, u16>``) need bare integer keys, which strict JSON cannot
# spell (``{"80": 8080}`` is refused by ztunnel and here alike). The compact spelling
# is therefore one YAML flow mapping in JSON syntax whose only extension is bare
# integer keys: ``{"ports": {80: 8080}}``. It is parsed with the stdlib ``json``
# (after marking every key as string or integer, so neither is taken for the other);
# a document outside that subset -- comments, bare words, floats, duplicate keys,
# characters YAML treats differently from JSON -- is parsed as YAML, so it reads as
# ztunnel reads it and every error is reported exactly as in the block spelling.

# A bare integer key, as the writer spells it (another spelling, such as 010, which
# YAML 1.1 reads as octal, is left as it is and fails the JSON parse).
_BARE_INT_KEY = re.compile(r"([{,]\s*)(-?(?:0|[1-9][0-9]*))(\s*:)")
_BARE_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
# A quoted key that reads as an integer once quoted bare keys are in (also matches in
# string values that contain such text: then the document is read as YAML, never wrongly).
_QUOTED_INT_KEY = re.compile(r'"-?[0-9]+"\s*:')
# What YAML reads otherwise than JSON: non-printable characters (yaml.reader), YAML 1.1
# line breaks, a byte order mark, and escaped surrogates (libyaml refuses them).
_YAML_READS_OTHERWISE = re.compile(
    yaml.reader.Reader.NON_PRINTABLE.pattern + "|[\x85\u2028\u2029\ufeff]")
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89abcdefABCDEF]")


class NotJsonSubset(Exception):
    """The document is not in the JSON subset; read it as YAML."""


def _object(pairs: list[tuple[str, Any]]) -> dict[Any, Any]:
    result: dict[Any, Any] = {}
    for key, value in pairs:
        # After _QUOTED_INT_KEY found none, an integer-looking key was a bare one.
        typed: Any = int(key) if key[:1] in "-0123456789" and _BARE_INT.fullmatch(key) \
            else key
        if typed in result:  # the YAML parser names the duplicate with its position
            raise NotJsonSubset
        result[typed] = value
    return result


def _not_json_subset(_text: str) -> Any:
    raise NotJsonSubset


def parse_json_subset(text: str) -> Any:
    """A document in the JSON spelling -> the data YAML reads from it; raise
    :class:`NotJsonSubset` for anything outside that spelling (pure).

    Quoting the bare integer keys can only break a string it lands in, never change
    one: the string would end right before a digit, which JSON refuses."""
    if (not text.lstrip(" \t\r\n").startswith("{") or _QUOTED_INT_KEY.search(text)
            or _YAML_READS_OTHERWISE.search(text) or _ESCAPED_SURROGATE.search(text)):
        raise NotJsonSubset
    try:
        return json.loads(_BARE_INT_KEY.sub(r'\1"\2"\3', text), object_pairs_hook=_object,
                          parse_float=_not_json_subset, parse_constant=_not_json_subset)
    except ValueError:  # json.JSONDecodeError included
        raise NotJsonSubset from None


def load_model_text(text: str, file_label: str = "<model>", *,
                    allow_foreign_policies: bool = False) -> Model:
    """YAML text (either spelling: block YAML, or the JSON spelling the agent writes,
    see :func:`model_to_json_yaml`) -> Model; raise :class:`ModelLoadError`."""
    try:
        data = parse_json_subset(text)
    except NotJsonSubset:
        data = _load_yaml(text, file_label)
    return parse_model(data, file_label, allow_foreign_policies=allow_foreign_policies)


def _load_yaml(text: str, file_label: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ModelLoadError(file_label, [ModelIssue(where, f"not valid YAML: {problem}")]) \
            from None


def _read_model_file(path: str | os.PathLike[str]) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ModelLoadError(str(path), [ModelIssue("", f"cannot read the file: {error}")]) \
            from None


def load_model_file(path: str | os.PathLike[str], *,
                    allow_foreign_policies: bool = False) -> Model:
    """Read and parse a model file; raise :class:`ModelLoadError` (I/O errors included)."""
    return load_model_text(_read_model_file(path), str(path),
                           allow_foreign_policies=allow_foreign_policies)


# -- writing ------------------------------------------------------------------

def _ports_out(ports: PortMap) -> dict[int, int]:
    return dict(ports)


def gateway_to_yaml(g: GatewayAddress) -> dict[str, Any]:
    return {"destination": str(g.destination), "hboneMtlsPort": g.hbone_mtls_port}


def workload_to_yaml(w: Workload) -> dict[str, Any]:
    """ztunnel's LocalWorkload fields; defaults are left out where ztunnel has a default."""
    out: dict[str, Any] = {"uid": w.uid, "name": w.name, "namespace": w.namespace}
    optional = (("serviceAccount", w.service_account), ("trustDomain", w.trust_domain))
    out.update({k: v for k, v in optional if v})
    out["workloadIps"] = [str(ip) for ip in w.workload_ips]
    out["protocol"] = w.protocol.value
    if w.network_mode is not NetworkMode.STANDARD:
        out["networkMode"] = w.network_mode.value
    for key, value in (("network", w.network), ("node", w.node), ("hostname", w.hostname),
                       ("canonicalName", w.canonical_name),
                       ("canonicalRevision", w.canonical_revision),
                       ("workloadName", w.workload_name), ("workloadType", w.workload_type),
                       ("clusterId", w.cluster_id)):
        if value:
            out[key] = value
    if w.locality != Locality():
        out["locality"] = {"region": w.locality.region, "zone": w.locality.zone,
                           "subzone": w.locality.subzone}
    if w.status is not HealthStatus.HEALTHY:
        out["status"] = w.status.value
    if w.capacity != 1:
        out["capacity"] = w.capacity
    if w.authorization_policies:
        out["authorizationPolicies"] = list(w.authorization_policies)
    out["services"] = {str(b.service): _ports_out(b.ports) for b in w.services}
    if w.waypoint is not None:
        out["waypoint"] = gateway_to_yaml(w.waypoint)
    return out


def service_to_yaml(s: Service) -> dict[str, Any]:
    out: dict[str, Any] = {"name": s.name, "namespace": s.namespace, "hostname": s.hostname,
                           "vips": [str(v) for v in s.vips], "ports": _ports_out(s.ports)}
    if s.endpoints:
        out["endpoints"] = {ep.workload_uid: {"workloadUid": ep.workload_uid,
                                              "port": _ports_out(ep.ports),
                                              "status": ep.status.value}
                            for ep in s.endpoints}
    if s.subject_alt_names:
        out["subjectAltNames"] = list(s.subject_alt_names)
    if s.load_balancer is not None:
        lb = s.load_balancer
        out["loadBalancer"] = {"routingPreferences": [p.value for p in lb.routing_preferences],
                               "mode": lb.mode.value, "healthPolicy": lb.health_policy.value}
    if s.ip_families is not None:
        out["ipFamilies"] = s.ip_families.value
    if s.canonical:
        out["canonical"] = True
    if s.visibility is not Visibility.PUBLIC:
        out["visibility"] = s.visibility.value
    if s.waypoint is not None:
        out["waypoint"] = gateway_to_yaml(s.waypoint)
    return out


def _document(model: Model) -> dict[str, Any]:
    doc: dict[str, Any] = {"workloads": [workload_to_yaml(w) for w in model.workloads]}
    if model.foreign_policies:
        doc["policies"] = list(model.foreign_policies)
    doc["services"] = [service_to_yaml(s) for s in model.services]
    return doc


def model_to_yaml(model: Model) -> str:
    """The model as ztunnel local-config YAML (LOCAL_XDS_PATH), block style: for people."""
    return yaml.dump(_document(model), Dumper=yaml.CSafeDumper, sort_keys=False,
                     default_flow_style=False)


_json_string = json.JSONEncoder(ensure_ascii=False).encode


def _escape_for_yaml(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _emit(value: Any, out: list[str]) -> None:
    if isinstance(value, dict):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            if i:
                out.append(",")
            # int keys bare (serde_yaml reads u16 only from plain scalars), str quoted;
            # after a plain key YAML needs ": " (80:8080 is one plain scalar)
            out.append(f"{key}: " if type(key) is int else f"{_json_string(key)}:")
            _emit(item, out)
        out.append("}")
    elif isinstance(value, list):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _emit(item, out)
        out.append("]")
    else:
        out.append(_json_string(value))


def to_json_yaml(doc: Any) -> str:
    """Data (mappings with string or integer keys, lists, strings, integers, booleans,
    null) in the JSON spelling: what :func:`parse_json_subset` and YAML read alike."""
    out: list[str] = []
    _emit(doc, out)
    out.append("\n")
    # Characters YAML reads otherwise than JSON occur only inside strings: escape them.
    return _YAML_READS_OTHERWISE.sub(_escape_for_yaml, "".join(out))


def model_to_json_yaml(model: Model) -> str:
    """The model as ztunnel local-config in the JSON spelling (one YAML flow mapping in
    JSON syntax, port maps with bare integer keys; see the section above
    :func:`parse_json_subset`): what the agent writes for the tunnels, read back
    without a YAML parser."""
    return to_json_yaml(_document(model))


# -- watching -------------------------------------------------------------------

class ReloadOutcome(Enum):
    LOADED = "loaded"            # a new model is in force
    UNCHANGED = "unchanged"      # the file did not change
    REJECTED = "rejected"        # the file is bad; the last good model stays
    MISSING = "missing"          # the file is gone; the last good model stays


Fingerprint = tuple[int, int, int, int]


def file_fingerprint(path: str | os.PathLike[str]) -> Fingerprint | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class ModelWatcher:
    """Holds the model in force and reloads it from ``path`` when the file changes.

    No thread or loop of its own: call :meth:`poll` periodically. Until a first good
    load, ``model`` is the empty model. ``generation`` counts accepted models. A file
    rewritten with the text of the model in force (same SHA-256) is not parsed again.
    Side effects: reads the file (stat on every poll, a full read when it changed).
    """

    path: str
    allow_foreign_policies: bool = False

    def __post_init__(self) -> None:
        self.model: Model = Model.build((), ())
        self.generation = 0
        self.error: ModelLoadError | None = None
        self._fingerprint: Fingerprint | None = None
        self._digest: bytes | None = None  # of the text of the model in force
        self._seen_missing = False

    def poll(self) -> ReloadOutcome:
        fingerprint = file_fingerprint(self.path)
        if fingerprint is None:
            self._fingerprint = None
            self._seen_missing = True
            return ReloadOutcome.MISSING
        if fingerprint == self._fingerprint:
            return ReloadOutcome.UNCHANGED
        self._fingerprint = fingerprint
        try:
            text = _read_model_file(self.path)
            digest = hashlib.sha256(text.encode("utf-8")).digest()
            if digest == self._digest:
                self.error = None  # the file holds the model in force again
                return ReloadOutcome.UNCHANGED
            model = load_model_text(text, self.path,
                                    allow_foreign_policies=self.allow_foreign_policies)
        except ModelLoadError as error:
            self.error = error
            return ReloadOutcome.REJECTED
        self.model = model
        self._digest = digest
        self.error = None
        self.generation += 1
        return ReloadOutcome.LOADED
