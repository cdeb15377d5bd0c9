"""Each binding rule of istio's pilot/pkg/serviceregistry/ambient/waypoints.go."""

from __future__ import annotations

from agent.waypoint.binding import (
    GATEWAY_NAME_LABEL,
    MANAGED_LABEL,
    MESH_CONTROLLER,
    BindingOutcome,
    Bindings,
    FromNamespaces,
    LabelSelector,
    Object,
    TrafficType,
    Waypoint,
    waypoint_traffic,
)

USE = "istio.io/use-waypoint"
USE_NS = "istio.io/use-waypoint-namespace"


def ns(name: str, **labels: str) -> Object:
    return Object(name, name, dict(labels))


def world(*waypoints: Waypoint, namespaces: tuple[Object, ...] = ()) -> Bindings:
    return Bindings(list(namespaces), list(waypoints))


NS_WP = Waypoint("apps", "waypoint")
ALL_WP = Waypoint("apps", "all", TrafficType.ALL)


def test_namespace_label_binds_its_services() -> None:
    b = world(NS_WP, namespaces=(ns("apps", **{USE: "waypoint"}),))
    got = b.for_service(Object("apps", "web"))
    assert got.outcome is BindingOutcome.BOUND and got.waypoint == NS_WP


def test_no_label_anywhere() -> None:
    assert world(NS_WP, namespaces=(ns("apps"),)).for_service(
        Object("apps", "web")).outcome is BindingOutcome.NOT_BOUND


def test_object_label_beats_namespace_label() -> None:
    hot = Waypoint("apps", "hot")
    b = world(NS_WP, hot, namespaces=(ns("apps", **{USE: "waypoint"}),))
    assert b.for_service(Object("apps", "web", {USE: "hot"})).waypoint == hot


def test_none_opts_out_even_when_the_namespace_binds() -> None:
    b = world(NS_WP, namespaces=(ns("apps", **{USE: "waypoint"}),))
    got = b.for_service(Object("apps", "db", {USE: "none"}))
    assert got.outcome is BindingOutcome.OPTED_OUT and got.waypoint is None


def test_use_waypoint_namespace_names_another_namespace() -> None:
    shared = Waypoint("infra", "shared", allowed_from=FromNamespaces.ALL)
    b = world(shared, namespaces=(ns("apps", **{USE: "shared", USE_NS: "infra"}), ns("infra")))
    assert b.for_service(Object("apps", "web")).waypoint == shared


def test_a_missing_waypoint_fails_closed() -> None:
    b = world(namespaces=(ns("apps", **{USE: "ghost"}),))
    got = b.for_service(Object("apps", "web"))
    assert got.outcome is BindingOutcome.WAYPOINT_MISSING and got.outcome.fails_closed
    assert got.named == "apps/ghost"


def test_allowed_routes_same_refuses_other_namespaces() -> None:
    b = world(Waypoint("infra", "wp"), namespaces=(ns("apps"), ns("infra")))
    got = b.for_service(Object("apps", "web", {USE: "wp", USE_NS: "infra"}))
    assert got.outcome is BindingOutcome.ATTACHMENT_DENIED
    assert not got.outcome.fails_closed


def test_allowed_routes_all() -> None:
    b = world(Waypoint("infra", "wp", allowed_from=FromNamespaces.ALL))
    assert b.for_service(Object("apps", "web", {USE: "wp", USE_NS: "infra"})).bound


def test_allowed_routes_selector_reads_the_namespace_labels() -> None:
    wp = Waypoint("infra", "wp", allowed_from=FromNamespaces.SELECTOR,
                  selector=LabelSelector((("mesh", "shared"),)))
    b = world(wp, namespaces=(ns("apps", mesh="shared"), ns("other")))
    assert b.for_service(Object("apps", "web", {USE: "wp", USE_NS: "infra"})).bound
    assert b.for_service(Object("other", "web", {USE: "wp", USE_NS: "infra"})).outcome is \
        BindingOutcome.ATTACHMENT_DENIED
    expr = LabelSelector((), (("tier", "In", ("a", "b")), ("x", "DoesNotExist", ())))
    assert expr.matches({"tier": "a"}) and not expr.matches({"tier": "c"})
    assert not expr.matches({"tier": "a", "x": "1"})


def test_waypoint_for_defaults_to_service() -> None:
    assert waypoint_traffic({}) is TrafficType.SERVICE
    assert waypoint_traffic({}, {"istio.io/waypoint-for": "all"}) is TrafficType.ALL
    assert waypoint_traffic({"istio.io/waypoint-for": "workload"},
                            {"istio.io/waypoint-for": "all"}) is TrafficType.WORKLOAD
    assert waypoint_traffic({"istio.io/waypoint-for": "bogus"}) is TrafficType.NONE


def test_service_waypoint_does_not_take_workload_traffic() -> None:
    b = world(NS_WP, namespaces=(ns("apps", **{USE: "waypoint"}),))
    # Inherited from the namespace: silently not bound (no error).
    assert b.for_workload(Object("apps", "web-1")).outcome is BindingOutcome.NOT_BOUND
    # Asked for directly: an error status.
    assert b.for_workload(Object("apps", "web-1", {USE: "waypoint"})).outcome is \
        BindingOutcome.UNSUPPORTED_TRAFFIC


def test_workload_and_all_waypoints() -> None:
    wl = Waypoint("apps", "wl", TrafficType.WORKLOAD)
    b = world(wl, ALL_WP)
    assert b.for_workload(Object("apps", "p", {USE: "wl"})).bound
    assert b.for_service(Object("apps", "s", {USE: "wl"})).outcome is \
        BindingOutcome.UNSUPPORTED_TRAFFIC
    assert b.for_workload(Object("apps", "p", {USE: "all"})).bound
    assert b.for_service(Object("apps", "s", {USE: "all"})).bound
    none = Waypoint("apps", "off", TrafficType.NONE)
    assert world(none).for_service(Object("apps", "s", {USE: "off"})).outcome is \
        BindingOutcome.UNSUPPORTED_TRAFFIC


def test_a_waypoints_own_service_never_uses_a_waypoint() -> None:
    b = world(NS_WP, namespaces=(ns("apps", **{USE: "waypoint"}),))
    own = Object("apps", "waypoint", {MANAGED_LABEL: MESH_CONTROLLER})
    assert b.for_service(own).outcome is BindingOutcome.NOT_BOUND


def test_binding_loops_are_refused() -> None:
    # The waypoint's own pod, in a namespace bound to that waypoint, with an all waypoint.
    b = world(ALL_WP, namespaces=(ns("apps", **{USE: "all"}),))
    pod = Object("apps", "all-abc", {GATEWAY_NAME_LABEL: "all", USE: "all"})
    got = b.for_workload(pod)
    assert got.outcome is BindingOutcome.LOOP and got.outcome.fails_closed
    assert "apps/all -> apps/all" in got.reason
    # A chain: a's pods use b, b's namespace uses a.
    a = Waypoint("ns-a", "a", TrafficType.ALL, FromNamespaces.ALL)
    b2 = Waypoint("ns-b", "b", TrafficType.ALL, FromNamespaces.ALL)
    chain = world(a, b2, namespaces=(ns("ns-a"), ns("ns-b", **{USE: "a", USE_NS: "ns-a"})))
    pod_a = Object("ns-a", "a-1", {GATEWAY_NAME_LABEL: "a", USE: "b", USE_NS: "ns-b"})
    got = chain.for_workload(pod_a)
    assert got.outcome is BindingOutcome.LOOP
    assert "ns-a/a -> ns-b/b -> ns-a/a" in got.reason
