"""Outbound destination resolution and endpoint selection (pure).

Given the model, the source workload and a captured connection's original
destination ``IP:port``, :func:`resolve_outbound` decides where the connection goes,
as ztunnel's outbound does (istio/ztunnel src/proxy/outbound.rs ::
``OutboundConnection::build_request``, src/state.rs :: ``ProxyState::find_upstream``,
``find_upstream_from_service``, ``load_balance``, and
``DemandProxyState::pick_workload_destination_or_resolve``):

1. The address is a service VIP (visible to the source's namespace): a
   ``Passthrough`` service goes to the original address as plain TCP; otherwise one
   endpoint is picked per connection, the service port is mapped to the endpoint's
   target port, and the endpoint's protocol says HBONE or plaintext. No endpoint ->
   :attr:`OutboundOutcome.NO_HEALTHY_UPSTREAM` (ztunnel ``Error::NoHealthyUpstream``).
2. The address is a workload's: that workload, same port.
3. Anything else passes through (not in the mesh).

Before that, :func:`resolve_waypoint` decides whether the connection goes to a
waypoint instead (the waypoint step of ``build_request``).

Selection (``load_balance``): endpoints are filtered by health (unless the service's
health policy is ``AllowAll``), by having the port, by being reachable (an address
on the source's network: no network gateways here); with a load balancer of mode
``Failover``/``Strict``, each endpoint is ranked by how many of the routing
preferences it shares with the source, in order, stopping at the first mismatch
(``Network`` first counts as all-but-one), only the best rank is kept, and ``Strict``
keeps only endpoints matching every preference; finally one is drawn at random,
weighted by ``capacity`` (ztunnel: ``choose_weighted`` over capacity).

Deviation: ztunnel drops unhealthy endpoints when it inserts them (from workloads)
and trusts inline ``endpoints`` as given; here health is checked at selection for
both, so ``model check`` can still show unhealthy endpoints.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from agent.model.types import (
    Endpoint,
    GatewayAddress,
    InboundProtocol,
    IPAddress,
    LoadBalancerMode,
    LoadBalancerScope,
    Model,
    NetworkAddress,
    Service,
    UnresolvedBinding,
    Workload,
    lookup_port,
)

HBONE_PORT = 15008
# Envoy's response flag for "no healthy upstream hosts" (UH), which Istio's standard
# metrics report in `response_flags`. ztunnel itself logs NoHealthyUpstream as an
# early deny ("connection failed", src/proxy/metrics.rs :: log_early_deny) and counts
# no metric; its catch-all flag for other failures is "CONNECT".
NO_HEALTHY_UPSTREAM_FLAG = "UH"


class OutboundOutcome(Enum):
    SERVICE_ENDPOINT = "service_endpoint"        # a VIP, resolved to one endpoint
    WORKLOAD = "workload"                        # a workload's own address
    PASSTHROUGH = "passthrough"                  # not in the mesh, or a Passthrough service
    NO_HEALTHY_UPSTREAM = "no_healthy_upstream"  # a VIP with nothing to send to: reset


class NoUpstreamReason(Enum):
    PORT_NOT_IN_SERVICE = "the service has no such port"
    NO_ENDPOINTS = "the service has no endpoints"
    NO_HEALTHY_ENDPOINTS = "no endpoint is healthy, has the port and is reachable"
    STRICT_LOCALITY = "no endpoint matches every routing preference (Strict)"
    NO_WEIGHT = "every candidate endpoint has capacity 0"
    NO_ADDRESS_FOR_FAMILY = "the chosen endpoint has no address of the service's family"


@dataclass(frozen=True)
class Upstream:
    """Where one connection goes."""

    outcome: OutboundOutcome
    original: tuple[IPAddress, int]
    service: Service | None = None
    workload: Workload | None = None
    address: IPAddress | None = None
    port: int = 0
    protocol: InboundProtocol = InboundProtocol.TCP
    reason: NoUpstreamReason | None = None

    @property
    def hbone(self) -> bool:
        return (self.outcome in (OutboundOutcome.SERVICE_ENDPOINT, OutboundOutcome.WORKLOAD)
                and self.protocol is InboundProtocol.HBONE)

    def connect_to(self, hbone_port: int = HBONE_PORT) -> tuple[IPAddress, int]:
        """The TCP destination: ``endpointIP:15008`` for HBONE, else ``IP:targetPort``
        (outbound.rs build_request: "only change the port if we're sending HBONE")."""
        if self.outcome is OutboundOutcome.PASSTHROUGH:
            return self.original
        if self.address is None:
            raise ValueError(f"no destination: {self.outcome.value}")
        return (self.address, hbone_port if self.hbone else self.port)

    def authority(self) -> str | None:
        """The CONNECT ``:authority``: ``endpointIP:targetPort`` (``[v6]:port``), HBONE only."""
        if not self.hbone or self.address is None:
            return None
        return socket_text(self.address, self.port)

    def forwarded(self, client: tuple[IPAddress, int]) -> str:
        """The ``Forwarded`` header (outbound.rs :: ``build_forwarded``):
        ``for="<client ip:port>"`` plus ``;host=<service hostname>`` when service-addressed."""
        value = f'for="{socket_text(*client)}"'
        if self.service is not None:
            value += f";host={self.service.hostname}"
        return value

    @property
    def response_flag(self) -> str:
        return NO_HEALTHY_UPSTREAM_FLAG if self.outcome is OutboundOutcome.NO_HEALTHY_UPSTREAM \
            else "-"


def socket_text(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


@dataclass(frozen=True)
class ServiceLabels:
    """Istio's destination service labels (ztunnel src/proxy/metrics.rs ::
    ``with_destination_service``: hostname, name, namespace; "unknown" when absent)."""

    destination_service: str
    destination_service_name: str
    destination_service_namespace: str

    def as_dict(self) -> dict[str, str]:
        return {"destination_service": self.destination_service,
                "destination_service_name": self.destination_service_name,
                "destination_service_namespace": self.destination_service_namespace}


def service_labels(service: Service | None) -> ServiceLabels:
    if service is None:
        return ServiceLabels("unknown", "unknown", "unknown")
    return ServiceLabels(service.hostname or "unknown", service.name or "unknown",
                         service.namespace or "unknown")


def _rank(src: Workload, wl: Workload, scopes: Sequence[LoadBalancerScope]) -> tuple[int, int]:
    """src/state.rs :: load_balance ranking: (consecutive matches of the preferences,
    the adjustment a preferred-network match adds)."""
    network_preferred = bool(scopes) and scopes[0] is LoadBalancerScope.NETWORK
    rank = adjust = 0
    for scope in scopes:
        if scope is LoadBalancerScope.REGION:
            matches = src.locality.region == wl.locality.region
        elif scope is LoadBalancerScope.ZONE:
            matches = src.locality.zone == wl.locality.zone
        elif scope is LoadBalancerScope.SUBZONE:
            matches = src.locality.subzone == wl.locality.subzone
        elif scope is LoadBalancerScope.NODE:
            matches = src.node == wl.node
        elif scope is LoadBalancerScope.CLUSTER:
            matches = src.cluster_id == wl.cluster_id
        else:  # NETWORK
            matches = src.network == wl.network
            if network_preferred:
                if not matches:
                    continue  # try the other scopes
                adjust = len(scopes) - 1
        if not matches:
            break
        rank += 1
    return rank, adjust


def candidates(model: Model, src: Workload, service: Service,
               service_port: int) -> tuple[list[tuple[Endpoint, Workload]],
                                           NoUpstreamReason | None]:
    """The endpoints eligible for one connection (before the random draw)."""
    svc_target = lookup_port(service.ports, service_port)
    if svc_target is None:
        return [], NoUpstreamReason.PORT_NOT_IN_SERVICE
    endpoints = model.endpoints(service)
    if not endpoints:
        return [], NoUpstreamReason.NO_ENDPOINTS
    eligible: list[tuple[Endpoint, Workload]] = []
    for ep in endpoints:
        wl = model.workload_by_uid(ep.workload_uid)
        if wl is None or not wl.workload_ips or wl.network != src.network:
            continue
        if not service.includes(ep.status) or not service.includes(wl.status):
            continue
        if svc_target == 0 and lookup_port(ep.ports, service_port) is None:
            continue  # "per endpoint" target port, and this endpoint has none
        eligible.append((ep, wl))
    if not eligible:
        return [], NoUpstreamReason.NO_HEALTHY_ENDPOINTS
    lb = service.load_balancer
    if lb is None or lb.mode is LoadBalancerMode.STANDARD:
        return eligible, None
    scopes = lb.routing_preferences
    if lb.mode is LoadBalancerMode.STRICT:
        # ztunnel compares the rank before the network adjustment.
        eligible = [(ep, wl) for ep, wl in eligible if _rank(src, wl, scopes)[0] == len(scopes)]
        if not eligible:
            return [], NoUpstreamReason.STRICT_LOCALITY
    ranked = [(sum(_rank(src, wl, scopes)), ep, wl) for ep, wl in eligible]
    best = max(r for r, _, _ in ranked)
    return [(ep, wl) for r, ep, wl in ranked if r == best], None


def pick_endpoint(options: Sequence[tuple[Endpoint, Workload]],
                  rng: random.Random) -> tuple[Endpoint, Workload] | None:
    """A random choice weighted by capacity; None when every weight is 0."""
    weights = [wl.capacity for _, wl in options]
    if not options or sum(weights) == 0:
        return None
    return rng.choices(list(options), weights=weights, k=1)[0]


def pick_address(wl: Workload, original: IPAddress, service: Service | None) -> IPAddress | None:
    """pick_workload_destination_or_resolve: the original IP if it is the workload's;
    else, within the service's IP family, one of the original's family, else the first."""
    if original in wl.workload_ips:
        return original
    allowed = [ip for ip in wl.workload_ips
               if service is None or service.ip_families is None
               or service.ip_families.accepts(ip)]
    for ip in allowed:
        if ip.version == original.version:
            return ip
    return allowed[0] if allowed else None


def resolve_outbound(model: Model, src: Workload, dst_ip: IPAddress | str, dst_port: int,
                     rng: random.Random) -> Upstream:
    """Where a captured connection from ``src`` to ``dst_ip:dst_port`` goes (pure,
    except for drawing from ``rng``)."""
    ip = ipaddress.ip_address(dst_ip)
    original = (ip, dst_port)
    target = NetworkAddress(src.network, ip)
    service = model.service_by_vip(target, src.namespace)
    if service is not None:
        lb = service.load_balancer
        if lb is not None and lb.mode is LoadBalancerMode.PASSTHROUGH:
            return Upstream(OutboundOutcome.PASSTHROUGH, original, service=service)
        options, reason = candidates(model, src, service, dst_port)
        chosen = pick_endpoint(options, rng) if options else None
        if chosen is None:
            return Upstream(OutboundOutcome.NO_HEALTHY_UPSTREAM, original, service=service,
                            reason=reason or NoUpstreamReason.NO_WEIGHT)
        ep, wl = chosen
        # Prefer the endpoint's own mapping, then the service's (find_upstream_from_service).
        target_port = lookup_port(ep.ports, dst_port) or lookup_port(service.ports, dst_port)
        address = pick_address(wl, ip, service)
        if address is None or not target_port:
            return Upstream(OutboundOutcome.NO_HEALTHY_UPSTREAM, original, service=service,
                            workload=wl, reason=NoUpstreamReason.NO_ADDRESS_FOR_FAMILY)
        return Upstream(OutboundOutcome.SERVICE_ENDPOINT, original, service=service,
                        workload=wl, address=address, port=target_port, protocol=wl.protocol)
    direct = model.workload_by_address(target)
    if direct is not None:
        return Upstream(OutboundOutcome.WORKLOAD, original, workload=direct, address=ip,
                        port=dst_port, protocol=direct.protocol)
    return Upstream(OutboundOutcome.PASSTHROUGH, original)


# -- waypoints ----------------------------------------------------------------------


class WaypointOutcome(Enum):
    NOT_BOUND = "not_bound"          # no waypoint: route as resolve_outbound says
    FROM_WAYPOINT = "from_waypoint"  # the source is the destination's own waypoint
    WAYPOINT = "waypoint"            # send it to the waypoint
    MISSING = "waypoint_missing"     # the waypoint names nothing (fail closed)
    LOOP = "waypoint_loop"           # the waypoint would send it back to a waypoint
    # The binding could not be worked out (a binding document could not be read:
    # types.py UnresolvedBinding): fail closed.
    UNRESOLVED = "waypoint_unresolved"

    @property
    def fails_closed(self) -> bool:
        return self in (WaypointOutcome.MISSING, WaypointOutcome.LOOP,
                        WaypointOutcome.UNRESOLVED)


@dataclass(frozen=True)
class WaypointHop:
    """Whether a captured connection goes to a waypoint, and which instance.

    ``service`` is the service the client addressed (VIP), ``target`` the workload
    it addressed (not service-addressed); ``gateway`` the waypoint address bound to
    it; ``instance``/``address``/``port`` the waypoint workload picked and where its
    HBONE listener is.
    """

    outcome: WaypointOutcome
    original: tuple[IPAddress, int]
    service: Service | None = None
    target: Workload | None = None
    gateway: GatewayAddress | None = None
    instance: Workload | None = None
    address: IPAddress | None = None
    port: int = 0
    reason: str = ""

    def authority(self) -> str:
        """The CONNECT ``:authority``: the original ``VIP:port`` or ``podIP:port``
        (outbound.rs: ``hbone_target_destination: Some(HboneAddress::SocketAddr(target))``)."""
        return socket_text(*self.original)


def is_from_waypoint(model: Model, gateway: GatewayAddress, src_identity: str | None,
                     src_ip: IPAddress, trust_domain: str) -> bool:
    """ztunnel ``check_from_waypoint``: a workload the gateway names has the source's
    identity *and* address."""
    return src_identity is not None and any(
        w.identity(trust_domain) == src_identity and src_ip in w.workload_ips
        for w in model.waypoint_instances(gateway))


def _pick_waypoint(model: Model, src: Workload, gateway: GatewayAddress,
                   rng: random.Random) -> tuple[Workload | None, str]:
    """ztunnel ``fetch_waypoint`` (``ServiceResolutionMode::Waypoint``): the workload
    at a waypoint address, or one healthy endpoint of the waypoint's service on its
    HBONE port; (None, why) when there is none."""
    dest = gateway.destination
    if isinstance(dest, NetworkAddress):
        found = model.workload_by_address(dest)
        if found is not None:
            return found, ""
        services = model.services_by_vip(dest)
    else:
        service = model.service(dest)
        services = (service,) if service is not None else ()
    if not services:
        return None, f"waypoint {dest} not found"
    service = services[0]
    options, reason = candidates(model, src, service, gateway.hbone_mtls_port)
    chosen = pick_endpoint(options, rng)
    if chosen is None:
        why = reason.value if reason else NoUpstreamReason.NO_WEIGHT.value
        return None, f"waypoint {dest} has no instance on port {gateway.hbone_mtls_port}: {why}"
    return chosen[1], ""


def resolve_waypoint(model: Model, src: Workload, dst_ip: IPAddress | str, dst_port: int,
                     rng: random.Random, *, src_identity: str | None = None,
                     src_ip: IPAddress | str | None = None,
                     trust_domain: str = "cluster.local") -> WaypointHop:
    """The waypoint step of ztunnel's ``build_request`` (src/proxy/outbound.rs): a
    VIP of a service with a waypoint goes to that waypoint; a connection that is not
    service-addressed, to a workload with a waypoint, goes to the workload's waypoint
    unless it comes from that waypoint (``check_from_waypoint``). Beyond ztunnel,
    which trusts istiod, the service case also lets the waypoint's own traffic through
    (it is never captured here, but would loop if it were), and a waypoint that names
    nothing (``UnknownWaypoint``) or whose instance is the destination itself or has a
    waypoint of its own is reported (MISSING, LOOP), and an unresolved binding
    (:class:`~agent.model.types.UnresolvedBinding`) as UNRESOLVED, so the caller fails
    closed."""
    ip = ipaddress.ip_address(dst_ip)
    original = (ip, dst_port)
    source_ip = ipaddress.ip_address(src_ip) if src_ip is not None else None
    target = NetworkAddress(src.network, ip)
    service = model.service_by_vip(target, src.namespace)
    workload: Workload | None = None
    if service is not None:
        gateway = service.waypoint
    else:
        workload = model.workload_by_address(target)
        gateway = workload.waypoint if workload is not None else None
    if gateway is None:
        return WaypointHop(WaypointOutcome.NOT_BOUND, original, service, workload)
    fault = UnresolvedBinding.of(gateway)
    if fault is not None:
        what = (f"service {service.key()}" if service is not None
                else f"workload {workload.uid}" if workload is not None else str(target))
        return WaypointHop(WaypointOutcome.UNRESOLVED, original, service, workload, gateway,
                           reason=f"the waypoint binding of {what} is unresolved: {fault} "
                                  "could not be read")
    if source_ip is not None and is_from_waypoint(model, gateway, src_identity, source_ip,
                                                  trust_domain):
        return WaypointHop(WaypointOutcome.FROM_WAYPOINT, original, service, workload,
                           gateway, reason="from the destination's own waypoint")
    instance, why = _pick_waypoint(model, src, gateway, rng)
    if instance is None:
        return WaypointHop(WaypointOutcome.MISSING, original, service, workload, gateway,
                           reason=why)
    if (workload is not None and instance.uid == workload.uid) or instance.waypoint is not None:
        return WaypointHop(WaypointOutcome.LOOP, original, service, workload, gateway, instance,
                           reason=f"waypoint {gateway.destination} ({instance.uid}) would send "
                                  "it to a waypoint again")
    address = pick_address(instance, ip, None)
    if address is None:
        return WaypointHop(WaypointOutcome.MISSING, original, service, workload, gateway,
                           instance, reason=f"waypoint instance {instance.uid} has no address")
    return WaypointHop(WaypointOutcome.WAYPOINT, original, service, workload, gateway,
                       instance, address, gateway.hbone_mtls_port)
