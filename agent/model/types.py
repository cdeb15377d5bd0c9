"""The cluster model: workloads and services shaped like ztunnel's (pure).

The shapes follow istio/ztunnel ``proto/workload.proto`` and its Rust mirror
(``src/state/workload.rs`` :: ``Workload``, ``src/state/service.rs`` :: ``Service``,
``Endpoint``, ``LoadBalancer``); the enum *values* are the spellings ztunnel's serde
derive uses in its local-config YAML (``LOCAL_XDS_PATH``, ``src/xds.rs`` ::
``LocalConfig``), so a model converts to and from that file without a mapping table.

Everything here is a frozen dataclass; :class:`Model` adds the lookups the tunnel and
the DNS proxy need (by uid, by address, by VIP, by hostname), built once. A model is
consistent by construction: :meth:`Model.build` refuses duplicate uids, duplicate
VIPs, a VIP that is also a workload address, two Standard workloads with one address
and two services with one ``namespace/hostname``, naming each offender by its path.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# service port -> target port, sorted by service port (ztunnel: HashMap<u16, u16>).
PortMap = tuple[tuple[int, int], ...]

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_SERVICE_ACCOUNT = "default"


class InboundProtocol(Enum):
    """How a workload receives traffic (YAML ``protocol``; proto ``tunnel_protocol``).

    ztunnel maps proto ``NONE`` to ``TCP`` and ``HBONE`` to ``HBONE``
    (src/state/workload.rs :: ``InboundProtocol``); ``LEGACY_ISTIO_MTLS`` is refused
    there and here.
    """

    TCP = "TCP"
    HBONE = "HBONE"


class HealthStatus(Enum):
    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"


class NetworkMode(Enum):
    STANDARD = "Standard"
    # The address is shared by many workloads (host network): never looked up by IP.
    HOST_NETWORK = "HostNetwork"


class LoadBalancerMode(Enum):
    """src/state/service.rs :: ``LoadBalancerMode`` (proto ``LoadBalancing.Mode``)."""

    STANDARD = "Standard"
    STRICT = "Strict"
    FAILOVER = "Failover"
    PASSTHROUGH = "Passthrough"


class LoadBalancerScope(Enum):
    """src/state/service.rs :: ``LoadBalancerScopes`` (proto ``LoadBalancing.Scope``)."""

    REGION = "Region"
    ZONE = "Zone"
    SUBZONE = "Subzone"
    NODE = "Node"
    CLUSTER = "Cluster"
    NETWORK = "Network"


class HealthPolicy(Enum):
    ONLY_HEALTHY = "OnlyHealthy"
    ALLOW_ALL = "AllowAll"


class IpFamily(Enum):
    DUAL = "Dual"
    IPV4 = "IPv4"
    IPV6 = "IPv6"

    def accepts(self, address: IPAddress) -> bool:
        if self is IpFamily.DUAL:
            return True
        return (address.version == 4) == (self is IpFamily.IPV4)


class Visibility(Enum):
    PUBLIC = "Public"
    # Resolvable and routable only from clients in the service's own namespace.
    NAMESPACE = "Namespace"


class TrafficDistribution(Enum):
    """Kubernetes ``spec.trafficDistribution`` values Istio turns into load balancing."""

    PREFER_CLOSE = "PreferClose"
    PREFER_SAME_ZONE = "PreferSameZone"
    PREFER_SAME_NODE = "PreferSameNode"


@dataclass(frozen=True, order=True)
class NetworkAddress:
    """An address on a network; ztunnel writes it ``network/IP`` (``/10.0.0.1``: default)."""

    network: str
    address: IPAddress

    def __str__(self) -> str:
        return f"{self.network}/{self.address}"

    @classmethod
    def parse(cls, text: str) -> NetworkAddress:
        """``network/IP`` -> NetworkAddress; ValueError when it is not that form.

        As ztunnel's deserializer (src/state/workload.rs, ``NetworkAddressVisitor``):
        split at the first ``/``; the rest must be a bare IP (no prefix length).
        """
        network, sep, address = text.partition("/")
        if not sep:
            raise ValueError(f"{text!r} is not network/IP (write '/{text}' for the "
                             "default network)")
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"{address!r} in {text!r} is not an IP address") from None
        return cls(network, ip)


@dataclass(frozen=True, order=True)
class NamespacedHostname:
    """A service key, written ``namespace/hostname`` (ztunnel ``NamespacedHostname``)."""

    namespace: str
    hostname: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.hostname}"

    @classmethod
    def parse(cls, text: str) -> NamespacedHostname:
        namespace, sep, hostname = text.partition("/")
        if not sep or not namespace or not hostname:
            raise ValueError(f"{text!r} is not namespace/hostname")
        return cls(namespace, hostname)


def port_map(mapping: Mapping[int, int] | Iterable[tuple[int, int]]) -> PortMap:
    """A PortMap from a dict or pairs (sorted, so equal maps compare equal)."""
    items = mapping.items() if isinstance(mapping, Mapping) else mapping
    return tuple(sorted((int(k), int(v)) for k, v in items))


def lookup_port(ports: PortMap, service_port: int) -> int | None:
    for svc_port, target in ports:
        if svc_port == service_port:
            return target
    return None


HBONE_MTLS_PORT = 15008


@dataclass(frozen=True)
class GatewayAddress:
    """Where a waypoint is reached (proto ``GatewayAddress``; src/state/workload.rs ::
    ``GatewayAddress``): a ``namespace/hostname`` (the waypoint's Service, the form
    istiod sends) or a ``network/IP`` (a waypoint workload or VIP), and the port its
    HBONE listener takes mTLS on.

    Written in the local-config YAML as ztunnel's serde writes it:
    ``{destination: "ns/host" | "network/IP", hboneMtlsPort: 15008}`` (``Destination``
    is ``#[serde(untagged)]``: an address when the part after ``/`` is an IP)."""

    destination: NetworkAddress | NamespacedHostname
    hbone_mtls_port: int = HBONE_MTLS_PORT

    def __str__(self) -> str:
        return f"{self.destination}:{self.hbone_mtls_port}"


# -- unresolved bindings (our extension, carried in ztunnel's own field) -------------

# RFC 6761 reserves ``.invalid``: no name under it ever resolves, so a ``GatewayAddress``
# naming a host there is an unknown waypoint to any reader (ztunnel fails such traffic
# as ``UnknownWaypoint``); meshagent's tunnel also decodes it to say which document
# could not be read.
UNRESOLVED_WAYPOINT_DOMAIN = "waypoint-unresolved.invalid"
UNKNOWN_PART = "_"  # a namespace or name that is unknown or does not apply
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class BindingDocument(Enum):
    """The kind of a binding document (its DNS-label spelling in the marker)."""

    NAMESPACE = "namespace"
    SERVICE = "service"
    POD = "pod"
    GATEWAY = "gateway"
    GATEWAY_CLASS = "gatewayclass"
    UNKNOWN = "document"  # no kind, not a mapping, an unreadable file

    @property
    def title(self) -> str:
        return _DOCUMENT_TITLES[self]


_DOCUMENT_TITLES = {
    BindingDocument.NAMESPACE: "Namespace", BindingDocument.SERVICE: "Service",
    BindingDocument.POD: "Pod", BindingDocument.GATEWAY: "Gateway",
    BindingDocument.GATEWAY_CLASS: "GatewayClass",
    BindingDocument.UNKNOWN: "a document of unknown kind"}


class BindingField(Enum):
    """The part of a binding document that could not be read."""

    DOCUMENT = "document"
    METADATA = "metadata"
    LABELS = "labels"
    USE_WAYPOINT = "use-waypoint"
    USE_WAYPOINT_NAMESPACE = "use-waypoint-namespace"
    WAYPOINT_FOR = "waypoint-for"
    SPEC = "spec"
    PORTS = "ports"
    LISTENERS = "listeners"
    ALLOWED_ROUTES = "allowed-routes"
    GATEWAY_CLASS = "gateway-class"

    @property
    def path(self) -> str:
        """The field as written in the document."""
        return _FIELD_PATHS[self]


_FIELD_PATHS = {
    BindingField.DOCUMENT: "(the whole document)", BindingField.METADATA: "metadata",
    BindingField.LABELS: "metadata.labels",
    BindingField.USE_WAYPOINT: "metadata.labels[istio.io/use-waypoint]",
    BindingField.USE_WAYPOINT_NAMESPACE: "metadata.labels[istio.io/use-waypoint-namespace]",
    BindingField.WAYPOINT_FOR: "metadata.labels[istio.io/waypoint-for]",
    BindingField.SPEC: "spec", BindingField.PORTS: "spec.ports",
    BindingField.LISTENERS: "spec.listeners",
    BindingField.ALLOWED_ROUTES: "spec.listeners[].allowedRoutes",
    BindingField.GATEWAY_CLASS: "spec.gatewayClassName"}


@dataclass(frozen=True)
class UnresolvedBinding:
    """A target whose waypoint binding we could not work out, because a document that
    could bind it cannot be read: it must fail closed (never go direct).

    Our extension, carried without a field of our own: :meth:`gateway` is a
    ``GatewayAddress`` to ``<target namespace>/<field>.<kind>.<namespace>.<name>.``
    :data:`UNRESOLVED_WAYPOINT_DOMAIN` (``_`` for a namespace or name that is unknown
    or does not apply). A name that is not a DNS name, or too long for one, is
    written ``_``. ``namespace``/``name`` are ``""`` when unknown."""

    kind: BindingDocument
    field: BindingField
    namespace: str = ""
    name: str = ""

    def __str__(self) -> str:
        if self.kind is BindingDocument.UNKNOWN:
            what = self.kind.title
        elif self.namespace or self.kind not in (BindingDocument.NAMESPACE,
                                                 BindingDocument.GATEWAY_CLASS):
            what = f"{self.kind.title} {self.namespace or '?'}/{self.name or '?'}"
        else:
            what = f"{self.kind.title} {self.name or '?'}"
        return f"{what}: {self.field.path}"

    def hostname(self) -> str:
        def part(text: str) -> str:
            return text if text and _DNS_NAME.match(text) else UNKNOWN_PART

        namespace = part(self.namespace) if len(self.namespace) <= 63 else UNKNOWN_PART
        host = ".".join((self.field.value, self.kind.value, namespace, part(self.name),
                         UNRESOLVED_WAYPOINT_DOMAIN))
        if len(host) > 253:
            host = ".".join((self.field.value, self.kind.value, namespace, UNKNOWN_PART,
                             UNRESOLVED_WAYPOINT_DOMAIN))
        return host

    def gateway(self, target_namespace: str) -> GatewayAddress:
        return GatewayAddress(NamespacedHostname(target_namespace, self.hostname()))

    @classmethod
    def parse_hostname(cls, hostname: str) -> UnresolvedBinding:
        """The marker from a hostname under :data:`UNRESOLVED_WAYPOINT_DOMAIN`;
        ValueError when it is not one."""
        head, dot, _ = hostname.lower().partition("." + UNRESOLVED_WAYPOINT_DOMAIN)
        if not dot or hostname.lower() != f"{head}.{UNRESOLVED_WAYPOINT_DOMAIN}":
            raise ValueError(f"{hostname!r} is not under {UNRESOLVED_WAYPOINT_DOMAIN}")
        parts = head.split(".")
        if len(parts) < 4:
            raise ValueError(f"{hostname!r}: an unresolved binding is "
                             f"<field>.<kind>.<namespace>.<name>.{UNRESOLVED_WAYPOINT_DOMAIN}")
        field_, kind, namespace, name = parts[0], parts[1], parts[2], ".".join(parts[3:])
        try:
            fault = cls(BindingDocument(kind), BindingField(field_),
                        "" if namespace == UNKNOWN_PART else namespace,
                        "" if name == UNKNOWN_PART else name)
        except ValueError:
            raise ValueError(
                f"{hostname!r}: unknown kind {kind!r} or field {field_!r} (kinds: "
                f"{', '.join(k.value for k in BindingDocument)}; fields: "
                f"{', '.join(f.value for f in BindingField)})") from None
        if fault.hostname() != hostname.lower():
            raise ValueError(f"{hostname!r} is not an unresolved binding as meshagent "
                             f"writes it (expected {fault.hostname()!r})")
        return fault

    @classmethod
    def of(cls, gateway: GatewayAddress | None) -> UnresolvedBinding | None:
        """The marker a waypoint address carries, or None for a real waypoint."""
        if gateway is None or not isinstance(gateway.destination, NamespacedHostname) \
                or not is_unresolved_hostname(gateway.destination.hostname):
            return None
        try:
            return cls.parse_hostname(gateway.destination.hostname)
        except ValueError:
            # The loader refuses these; one built in code still fails closed.
            return cls(BindingDocument.UNKNOWN, BindingField.DOCUMENT)


def is_unresolved_hostname(hostname: str) -> bool:
    return hostname.lower().endswith("." + UNRESOLVED_WAYPOINT_DOMAIN)


@dataclass(frozen=True)
class Locality:
    region: str = ""
    zone: str = ""
    subzone: str = ""


@dataclass(frozen=True)
class ServiceBinding:
    """One entry of a workload's ``services`` map: it backs this service on these ports."""

    service: NamespacedHostname
    ports: PortMap = ()


@dataclass(frozen=True)
class Workload:
    """A workload (pod, VM): src/state/workload.rs :: ``Workload`` plus the local-config
    ``services`` map of ``LocalWorkload`` (src/xds.rs)."""

    uid: str
    name: str
    namespace: str
    workload_ips: tuple[IPAddress, ...] = ()
    service_account: str = ""
    trust_domain: str = ""
    network: str = ""
    protocol: InboundProtocol = InboundProtocol.TCP
    network_mode: NetworkMode = NetworkMode.STANDARD
    node: str = ""
    hostname: str = ""
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_name: str = ""
    workload_type: str = ""
    cluster_id: str = ""
    locality: Locality = field(default_factory=Locality)
    status: HealthStatus = HealthStatus.HEALTHY
    capacity: int = 1
    authorization_policies: tuple[str, ...] = ()
    services: tuple[ServiceBinding, ...] = ()
    # The workload waypoint (proto Workload.waypoint): traffic addressed to this
    # workload (not through a service) goes there.
    waypoint: GatewayAddress | None = None

    def identity(self, default_trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
        """The SPIFFE ID (proto: trust domain and service account may be elided)."""
        domain = self.trust_domain or default_trust_domain
        account = self.service_account or DEFAULT_SERVICE_ACCOUNT
        return f"spiffe://{domain}/ns/{self.namespace}/sa/{account}"

    def network_addresses(self) -> tuple[NetworkAddress, ...]:
        return tuple(NetworkAddress(self.network, ip) for ip in self.workload_ips)


@dataclass(frozen=True)
class Endpoint:
    """A workload backing a service (src/state/service.rs :: ``Endpoint``)."""

    workload_uid: str
    ports: PortMap = ()
    status: HealthStatus = HealthStatus.HEALTHY


@dataclass(frozen=True)
class LoadBalancer:
    routing_preferences: tuple[LoadBalancerScope, ...] = ()
    mode: LoadBalancerMode = LoadBalancerMode.STANDARD
    health_policy: HealthPolicy = HealthPolicy.ONLY_HEALTHY


def load_balancer_for(distribution: TrafficDistribution) -> LoadBalancer:
    """The load balancing Istio sends ztunnel for a Service's ``trafficDistribution``.

    istio/istio pilot/pkg/serviceregistry/ambient/services.go ::
    ``preferSameZoneLoadBalancer`` (PreferClose and PreferSameZone: network, region,
    zone; failover) and ``preferSameNodeLoadBalancer`` (PreferSameNode: ... subzone,
    node; failover). Note that in Istio ``PreferClose`` does not rank the same node
    above the rest of the zone; ``PreferSameNode`` does.
    """
    scopes = [LoadBalancerScope.NETWORK, LoadBalancerScope.REGION, LoadBalancerScope.ZONE]
    if distribution is TrafficDistribution.PREFER_SAME_NODE:
        scopes += [LoadBalancerScope.SUBZONE, LoadBalancerScope.NODE]
    return LoadBalancer(tuple(scopes), LoadBalancerMode.FAILOVER)


@dataclass(frozen=True)
class Service:
    """A service (src/state/service.rs :: ``Service``); ``endpoints`` holds only those
    the file lists inline; :meth:`Model.endpoints` adds the workloads' bindings."""

    name: str
    namespace: str
    hostname: str
    vips: tuple[NetworkAddress, ...] = ()
    ports: PortMap = ()
    endpoints: tuple[Endpoint, ...] = ()
    subject_alt_names: tuple[str, ...] = ()
    load_balancer: LoadBalancer | None = None
    ip_families: IpFamily | None = None
    canonical: bool = False
    visibility: Visibility = Visibility.PUBLIC
    # The service waypoint (proto Service.waypoint): traffic to a VIP goes there.
    waypoint: GatewayAddress | None = None

    def key(self) -> NamespacedHostname:
        return NamespacedHostname(self.namespace, self.hostname)

    def visible_to(self, client_namespace: str | None) -> bool:
        """ztunnel ``Service::visible_to``; ``None`` (no client known) sees everything."""
        return (client_namespace is None or self.visibility is not Visibility.NAMESPACE
                or self.namespace == client_namespace)

    def includes(self, status: HealthStatus) -> bool:
        """ztunnel ``Service::should_include_endpoint``."""
        return status is HealthStatus.HEALTHY or (
            self.load_balancer is not None
            and self.load_balancer.health_policy is HealthPolicy.ALLOW_ALL)


@dataclass(frozen=True)
class ModelIssue:
    """One consistency problem, at a field path such as ``services[1].vips[0]``."""

    path: str
    problem: str
    # What the entry is, e.g. "workload cluster1//v1/Pod/default/web-1".
    entry: str = ""

    def __str__(self) -> str:
        where = self.path + (f" ({self.entry})" if self.entry else "")
        return f"{where}: {self.problem}" if where else self.problem


class ModelInvalid(ValueError):
    """The workloads and services do not form a consistent model."""

    def __init__(self, issues: Iterable[ModelIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("; ".join(str(i) for i in self.issues))


def best_service_match(candidates: Iterable[Service], client_namespace: str | None,
                       preferred_namespace: str | None = None) -> Service | None:
    """ztunnel ``ServiceMatch::find_best_match`` (src/state/service.rs): a service in
    the client's namespace wins at once; else a ``canonical`` one; else one in the
    preferred namespace; else the first seen."""
    best: Service | None = None
    best_is_canonical = False
    for service in candidates:
        if client_namespace is not None and service.namespace == client_namespace:
            return service
        if service.canonical:
            best, best_is_canonical = service, True
        elif (preferred_namespace and service.namespace == preferred_namespace
              and not best_is_canonical) or best is None:
            best = service
    return best


@dataclass(frozen=True)
class Model:
    """Workloads and services with their lookups. Build it with :meth:`build`."""

    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    # ztunnel-format authorization policies, carried opaquely (never enforced here);
    # only a loader told to allow them fills this.
    foreign_policies: tuple[Any, ...] = ()
    _by_uid: Mapping[str, Workload] = field(default_factory=dict, repr=False, compare=False)
    _by_addr: Mapping[NetworkAddress, Workload] = field(default_factory=dict, repr=False,
                                                        compare=False)
    _by_vip: Mapping[NetworkAddress, tuple[Service, ...]] = field(
        default_factory=dict, repr=False, compare=False)
    _by_host: Mapping[str, tuple[Service, ...]] = field(default_factory=dict, repr=False,
                                                        compare=False)
    _by_key: Mapping[NamespacedHostname, Service] = field(default_factory=dict, repr=False,
                                                          compare=False)
    _endpoints: Mapping[NamespacedHostname, tuple[Endpoint, ...]] = field(
        default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, workloads: Iterable[Workload], services: Iterable[Service],
              foreign_policies: Iterable[Any] = ()) -> Model:
        """Check consistency and index; raise :class:`ModelInvalid` naming every problem."""
        wls, svcs = tuple(workloads), tuple(services)
        issues: list[ModelIssue] = []
        by_uid: dict[str, Workload] = {}
        uid_index: dict[str, int] = {}
        by_addr: dict[NetworkAddress, Workload] = {}
        addr_index: dict[NetworkAddress, int] = {}  # paths are formatted only for issues

        def addr_path(na: NetworkAddress) -> str:
            return f"workloads[{addr_index[na]}] ({by_addr[na].uid})"

        for i, w in enumerate(wls):
            if w.uid in by_uid:
                issues.append(ModelIssue(f"workloads[{i}].uid",
                                         f"uid {w.uid!r} is already used by "
                                         f"workloads[{uid_index[w.uid]}]", f"workload {w.uid}"))
            else:
                by_uid[w.uid] = w
                uid_index[w.uid] = i
            if w.network_mode is NetworkMode.HOST_NETWORK:
                continue
            for j, na in enumerate(w.network_addresses()):
                if na in by_addr:
                    issues.append(ModelIssue(
                        f"workloads[{i}].workloadIps[{j}]",
                        f"address {na.address} (network {na.network!r}) is already "
                        f"{addr_path(na)}'s; only HostNetwork workloads may share one",
                        f"workload {w.uid}"))
                else:
                    by_addr[na] = w
                    addr_index[na] = i

        by_vip: dict[NetworkAddress, tuple[Service, ...]] = {}
        vip_path: dict[NetworkAddress, str] = {}
        by_host: dict[str, tuple[Service, ...]] = {}
        by_key: dict[NamespacedHostname, Service] = {}
        key_path: dict[NamespacedHostname, str] = {}
        for i, s in enumerate(svcs):
            path = f"services[{i}]"
            if s.key() in by_key:
                issues.append(ModelIssue(path, f"service {s.key()} is already defined by "
                                               f"{key_path[s.key()]}", f"service {s.key()}"))
                continue
            by_key[s.key()] = s
            key_path[s.key()] = path
            host = s.hostname.lower()
            by_host[host] = (*by_host.get(host, ()), s)
            for j, vip in enumerate(s.vips):
                if vip in vip_path:
                    issues.append(ModelIssue(f"{path}.vips[{j}]",
                                             f"VIP {vip} is already used by {vip_path[vip]}",
                                             f"service {s.key()}"))
                    continue
                if vip in by_addr:
                    issues.append(ModelIssue(
                        f"{path}.vips[{j}]",
                        f"VIP {vip} is also the address of {addr_path(vip)}",
                        f"service {s.key()}"))
                    continue
                vip_path[vip] = f"{path} ({s.key()})"
                by_vip[vip] = (*by_vip.get(vip, ()), s)
        if issues:
            raise ModelInvalid(issues)
        endpoints: dict[NamespacedHostname, dict[str, Endpoint]] = {
            key: {ep.workload_uid: ep for ep in s.endpoints} for key, s in by_key.items()}
        # Workload bindings override inline endpoints of the same uid, as ztunnel's
        # LocalClient stages workload endpoints and merges them in on service insert.
        for w in wls:
            for binding in w.services:
                if binding.service in endpoints:
                    endpoints[binding.service][w.uid] = Endpoint(w.uid, binding.ports, w.status)
        model = cls(wls, svcs, tuple(foreign_policies))
        object.__setattr__(model, "_by_uid", by_uid)
        object.__setattr__(model, "_by_addr", by_addr)
        object.__setattr__(model, "_by_vip", by_vip)
        object.__setattr__(model, "_by_host", by_host)
        object.__setattr__(model, "_by_key", by_key)
        object.__setattr__(model, "_endpoints", {
            k: tuple(sorted(v.values(), key=lambda e: e.workload_uid))
            for k, v in endpoints.items()})
        return model

    # -- lookups -------------------------------------------------------------

    def workload_by_uid(self, uid: str) -> Workload | None:
        return self._by_uid.get(uid)

    def workload_by_address(self, address: NetworkAddress) -> Workload | None:
        return self._by_addr.get(address)

    def service(self, key: NamespacedHostname) -> Service | None:
        return self._by_key.get(key)

    def services_by_vip(self, vip: NetworkAddress) -> tuple[Service, ...]:
        return self._by_vip.get(vip, ())

    def service_by_vip(self, vip: NetworkAddress, client_namespace: str | None) -> Service | None:
        """ztunnel ``ServiceStore::get_best_by_vip`` (without CIDR VIPs)."""
        return best_service_match(
            (s for s in self.services_by_vip(vip) if s.visible_to(client_namespace)),
            client_namespace)

    def services_by_hostname(self, hostname: str) -> tuple[Service, ...]:
        """Services with this hostname (DNS names: compared case-insensitively)."""
        return self._by_host.get(hostname.lower(), ())

    def service_by_hostname(self, hostname: str, client_namespace: str | None,
                            preferred_namespace: str | None = None) -> Service | None:
        return best_service_match(
            (s for s in self.services_by_hostname(hostname) if s.visible_to(client_namespace)),
            client_namespace, preferred_namespace)

    def endpoints(self, service: Service) -> tuple[Endpoint, ...]:
        """Every endpoint of a service (inline ones and workload bindings), any health."""
        return self._endpoints.get(service.key(), ())

    def is_vip(self, address: NetworkAddress) -> bool:
        return address in self._by_vip

    def unbound_bindings(self) -> list[tuple[Workload, ServiceBinding]]:
        """Workload bindings naming a service the model does not have (ztunnel stages
        these until the service arrives; from a file they never do)."""
        return [(w, b) for w in self.workloads for b in w.services if b.service not in self._by_key]

    def waypoint_instances(self, gateway: GatewayAddress) -> tuple[Workload, ...]:
        """The workloads a waypoint address names (ztunnel ``check_gateway_address``):
        the workload at a ``network/IP``, or every endpoint workload of the service at
        that VIP or ``namespace/hostname``; () when it names nothing."""
        dest = gateway.destination
        if isinstance(dest, NetworkAddress):
            found = self.workload_by_address(dest)
            if found is not None:
                return (found,)
            services = self.services_by_vip(dest)
        else:
            service = self.service(dest)
            services = (service,) if service is not None else ()
        out = []
        for s in services:
            for ep in self.endpoints(s):
                w = self.workload_by_uid(ep.workload_uid)
                if w is not None:
                    out.append(w)
        return tuple(out)

    def waypoint_uids(self) -> frozenset[str]:
        """The uids of every workload some service's or workload's waypoint names."""
        gateways = {g for g in (*(s.waypoint for s in self.services),
                                *(w.waypoint for w in self.workloads)) if g is not None}
        return frozenset(w.uid for g in gateways for w in self.waypoint_instances(g))

    def dangling_endpoints(self) -> list[tuple[Service, Endpoint]]:
        """Inline endpoints whose workload uid is unknown (never selected)."""
        return [(s, ep) for s in self.services for ep in self.endpoints(s)
                if ep.workload_uid not in self._by_uid]
