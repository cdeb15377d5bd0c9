"""Outbound resolution and endpoint selection: VIPs, health, locality, ports, families."""

from __future__ import annotations

import collections
import ipaddress
import random

import pytest

from agent.model.select import (
    NO_HEALTHY_UPSTREAM_FLAG,
    NoUpstreamReason,
    OutboundOutcome,
    resolve_outbound,
    service_labels,
)
from agent.model.types import (
    Endpoint,
    HealthPolicy,
    HealthStatus,
    InboundProtocol,
    IpFamily,
    LoadBalancer,
    LoadBalancerMode,
    LoadBalancerScope,
    Locality,
    Model,
    NamespacedHostname,
    NetworkAddress,
    Service,
    ServiceBinding,
    TrafficDistribution,
    Visibility,
    Workload,
    load_balancer_for,
    port_map,
)

WEB = NamespacedHostname("default", "web.default.svc.cluster.local")
VIP4, VIP6 = "10.96.0.10", "fd00:96::10"


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def wl(name: str, *addrs: str, node: str = "node1", zone: str = "z1", ports: dict[int, int]
       | None = None, status: HealthStatus = HealthStatus.HEALTHY, capacity: int = 1,
       protocol: InboundProtocol = InboundProtocol.HBONE, network: str = "",
       namespace: str = "default", services: tuple[NamespacedHostname, ...] = (WEB,)
       ) -> Workload:
    return Workload(uid=f"c1//v1/Pod/{namespace}/{name}", name=name, namespace=namespace,
                    workload_ips=tuple(ip(a) for a in addrs), node=node,
                    locality=Locality("r1", zone, ""), status=status, capacity=capacity,
                    protocol=protocol, network=network,
                    services=tuple(ServiceBinding(s, port_map(ports or {})) for s in services))


def web_service(ports: dict[int, int] | None = None, lb: LoadBalancer | None = None,
                families: IpFamily | None = None, endpoints: tuple[Endpoint, ...] = (),
                visibility: Visibility = Visibility.PUBLIC) -> Service:
    return Service("web", "default", WEB.hostname,
                   vips=(NetworkAddress("", ip(VIP4)), NetworkAddress("", ip(VIP6))),
                   ports=port_map(ports or {80: 8080}), load_balancer=lb, ip_families=families,
                   endpoints=endpoints, visibility=visibility)


CLIENT = wl("client", "10.0.1.9", services=())


def model_of(*workloads: Workload, service: Service | None = None) -> Model:
    return Model.build((CLIENT, *workloads), (service or web_service(),))


def resolve(model: Model, dst: str = VIP4, port: int = 80, src: Workload = CLIENT,
            seed: int = 1):
    return resolve_outbound(model, src, dst, port, random.Random(seed))


def test_vip_to_hbone_endpoint_is_carried_to_15008_with_target_port() -> None:
    model = model_of(wl("web-1", "10.0.2.5"))
    up = resolve(model)
    assert up.outcome is OutboundOutcome.SERVICE_ENDPOINT and up.hbone
    assert up.connect_to() == (ip("10.0.2.5"), 15008)
    assert up.authority() == "10.0.2.5:8080"
    assert up.forwarded((ip("10.0.1.9"), 40000)) == \
        'for="10.0.1.9:40000";host=web.default.svc.cluster.local'
    assert up.response_flag == "-"
    assert service_labels(up.service).as_dict() == {
        "destination_service": "web.default.svc.cluster.local",
        "destination_service_name": "web", "destination_service_namespace": "default"}


def test_plaintext_endpoint_is_dialed_directly() -> None:
    up = resolve(model_of(wl("web-1", "10.0.2.5", protocol=InboundProtocol.TCP)))
    assert up.outcome is OutboundOutcome.SERVICE_ENDPOINT and not up.hbone
    assert up.connect_to() == (ip("10.0.2.5"), 8080)
    assert up.authority() is None


def test_spread_is_even_and_follows_capacity() -> None:
    model = model_of(wl("a", "10.0.2.1"), wl("b", "10.0.2.2", node="node2"),
                     wl("c", "10.0.2.3", node="node2"))
    rng = random.Random(7)
    counts = collections.Counter(
        resolve_outbound(model, CLIENT, VIP4, 80, rng).workload.name for _ in range(3000))
    assert set(counts) == {"a", "b", "c"}
    assert all(900 <= n <= 1100 for n in counts.values()), counts
    weighted = model_of(wl("a", "10.0.2.1", capacity=1), wl("b", "10.0.2.2", capacity=3))
    counts = collections.Counter(
        resolve_outbound(weighted, CLIENT, VIP4, 80, rng).workload.name for _ in range(4000))
    assert 2700 <= counts["b"] <= 3300, counts


def test_unhealthy_endpoint_is_skipped_unless_allow_all() -> None:
    model = model_of(wl("sick", "10.0.2.1", status=HealthStatus.UNHEALTHY),
                     wl("well", "10.0.2.2"))
    assert {resolve(model, seed=s).workload.name for s in range(50)} == {"well"}
    only_sick = model_of(wl("sick", "10.0.2.1", status=HealthStatus.UNHEALTHY))
    up = resolve(only_sick)
    assert up.outcome is OutboundOutcome.NO_HEALTHY_UPSTREAM
    assert up.reason is NoUpstreamReason.NO_HEALTHY_ENDPOINTS
    allow_all = model_of(wl("sick", "10.0.2.1", status=HealthStatus.UNHEALTHY),
                         service=web_service(lb=LoadBalancer(
                             health_policy=HealthPolicy.ALLOW_ALL)))
    assert resolve(allow_all).workload.name == "sick"


def test_inline_unhealthy_endpoint_is_skipped() -> None:
    target = wl("web-1", "10.0.2.5", services=())
    svc = web_service(endpoints=(Endpoint(target.uid, (), HealthStatus.UNHEALTHY),))
    assert resolve(model_of(target, service=svc)).outcome is OutboundOutcome.NO_HEALTHY_UPSTREAM
    svc = web_service(endpoints=(Endpoint(target.uid, (), HealthStatus.HEALTHY),))
    assert resolve(model_of(target, service=svc)).port == 8080


def test_no_endpoints_is_a_distinct_outcome_with_istio_flag() -> None:
    up = resolve(model_of())
    assert up.outcome is OutboundOutcome.NO_HEALTHY_UPSTREAM
    assert up.reason is NoUpstreamReason.NO_ENDPOINTS
    assert up.response_flag == NO_HEALTHY_UPSTREAM_FLAG == "UH"
    assert up.service is not None and up.authority() is None
    with pytest.raises(ValueError):
        up.connect_to()


def test_port_not_in_service() -> None:
    up = resolve(model_of(wl("web-1", "10.0.2.5")), port=81)
    assert up.outcome is OutboundOutcome.NO_HEALTHY_UPSTREAM
    assert up.reason is NoUpstreamReason.PORT_NOT_IN_SERVICE


def test_per_endpoint_target_port_named_port() -> None:
    # Service target port 0 ("per endpoint", how Istio sends a named targetPort):
    # each endpoint says its own number; an endpoint without it is not eligible.
    svc = web_service(ports={80: 0})
    model = model_of(wl("a", "10.0.2.1", ports={80: 9000}), wl("b", "10.0.2.2"), service=svc)
    ups = {resolve(model, seed=s).workload.name for s in range(40)}
    assert ups == {"a"}
    assert resolve(model).authority() == "10.0.2.1:9000"


def test_endpoint_mapping_overrides_service_target() -> None:
    model = model_of(wl("a", "10.0.2.1", ports={80: 9090}))
    assert resolve(model).port == 9090


def test_prefer_same_node_then_zone_then_anything() -> None:
    lb = load_balancer_for(TrafficDistribution.PREFER_SAME_NODE)
    here = wl("here", "10.0.1.2", node="node1", zone="z1")
    zone = wl("zone", "10.0.3.2", node="node3", zone="z1")
    far = wl("far", "10.0.2.2", node="node2", zone="z2")
    svc = web_service(lb=lb)
    model = model_of(here, zone, far, service=svc)
    assert {resolve(model, seed=s).workload.name for s in range(40)} == {"here"}
    sick_here = wl("here", "10.0.1.2", node="node1", status=HealthStatus.UNHEALTHY)
    model = model_of(sick_here, zone, far, service=svc)
    assert {resolve(model, seed=s).workload.name for s in range(40)} == {"zone"}
    model = model_of(far, service=svc)
    assert resolve(model).workload.name == "far"


def test_prefer_close_is_zone_level_as_in_istio() -> None:
    lb = load_balancer_for(TrafficDistribution.PREFER_CLOSE)
    assert lb.mode is LoadBalancerMode.FAILOVER
    assert lb.routing_preferences == (LoadBalancerScope.NETWORK, LoadBalancerScope.REGION,
                                      LoadBalancerScope.ZONE)
    here = wl("here", "10.0.1.2", node="node1", zone="z1")
    zone = wl("zone", "10.0.3.2", node="node3", zone="z1")
    far = wl("far", "10.0.2.2", node="node2", zone="z2")
    model = model_of(here, zone, far, service=web_service(lb=lb))
    assert {resolve(model, seed=s).workload.name for s in range(60)} == {"here", "zone"}


def test_strict_keeps_only_full_matches() -> None:
    lb = LoadBalancer((LoadBalancerScope.NODE,), LoadBalancerMode.STRICT)
    model = model_of(wl("far", "10.0.2.2", node="node2"), service=web_service(lb=lb))
    up = resolve(model)
    assert up.outcome is OutboundOutcome.NO_HEALTHY_UPSTREAM
    assert up.reason is NoUpstreamReason.STRICT_LOCALITY
    model = model_of(wl("far", "10.0.2.2", node="node2"), wl("here", "10.0.1.2"),
                     service=web_service(lb=lb))
    assert {resolve(model, seed=s).workload.name for s in range(30)} == {"here"}


def test_ipv6_vip_picks_the_endpoints_ipv6_address() -> None:
    model = model_of(wl("dual", "10.0.2.5", "fd00::2:5"))
    up = resolve(model, dst=VIP6)
    assert up.address == ip("fd00::2:5")
    assert up.connect_to() == (ip("fd00::2:5"), 15008)
    assert up.authority() == "[fd00::2:5]:8080"
    assert up.forwarded((ip("fd00::1:9"), 5)) == \
        'for="[fd00::1:9]:5";host=web.default.svc.cluster.local'
    # A v4-only endpoint behind a v6 VIP: find_or_first falls back to its v4 address...
    assert resolve(model_of(wl("v4", "10.0.2.5")), dst=VIP6).address == ip("10.0.2.5")
    # ...unless the service is IPv6 only.
    up = resolve(model_of(wl("v4", "10.0.2.5"), service=web_service(families=IpFamily.IPV6)),
                 dst=VIP6)
    assert up.outcome is OutboundOutcome.NO_HEALTHY_UPSTREAM
    assert up.reason is NoUpstreamReason.NO_ADDRESS_FOR_FAMILY


def test_workload_address_and_passthrough() -> None:
    model = model_of(wl("web-1", "10.0.2.5", protocol=InboundProtocol.TCP))
    up = resolve(model, dst="10.0.2.5", port=8080)
    assert up.outcome is OutboundOutcome.WORKLOAD and up.connect_to() == (ip("10.0.2.5"), 8080)
    up = resolve(model, dst="192.0.2.1", port=443)
    assert up.outcome is OutboundOutcome.PASSTHROUGH
    assert up.connect_to() == (ip("192.0.2.1"), 443) and up.service is None
    assert service_labels(None).destination_service == "unknown"
    passthrough = web_service(lb=LoadBalancer(mode=LoadBalancerMode.PASSTHROUGH))
    up = resolve(model_of(service=passthrough))
    assert up.outcome is OutboundOutcome.PASSTHROUGH and up.service is passthrough
    assert up.connect_to() == (ip(VIP4), 80)


def test_namespace_visibility() -> None:
    svc = web_service(visibility=Visibility.NAMESPACE)
    model = model_of(wl("web-1", "10.0.2.5"), service=svc)
    assert resolve(model).outcome is OutboundOutcome.SERVICE_ENDPOINT
    stranger = wl("stranger", "10.0.1.77", namespace="other", services=())
    model = Model.build((stranger, wl("web-1", "10.0.2.5")), (svc,))
    assert resolve(model, src=stranger).outcome is OutboundOutcome.PASSTHROUGH


def test_other_network_endpoints_are_not_reachable() -> None:
    model = model_of(wl("remote", "10.0.2.5", network="nw2"))
    up = resolve(model)
    assert up.outcome is OutboundOutcome.NO_HEALTHY_UPSTREAM


def test_zero_capacity_everywhere() -> None:
    up = resolve(model_of(wl("a", "10.0.2.5", capacity=0)))
    assert up.reason is NoUpstreamReason.NO_WEIGHT
