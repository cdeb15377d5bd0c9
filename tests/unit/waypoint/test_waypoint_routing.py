"""HTTPRoute matching and precedence (Gateway API spec, istio conversion.go
sortHTTPRoutes), retries (istio retry.go DefaultPolicy), faults, weights."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from agent.waypoint.routing import (
    DEFAULT_RETRY_ON,
    RouteInvalid,
    RouteOutcome,
    RouteRequest,
    RouteTable,
    ServiceRef,
    load_routes,
    parse_duration,
    parse_http_route,
)

SVC = ServiceRef("apps", "web", 80)


def route(rules: list[dict[str, Any]], name: str = "r", created: str = "") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "apps"}
    if created:
        meta["creationTimestamp"] = created
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": meta,
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                     "rules": rules}}


def backend(name: str, weight: int = 1) -> dict[str, Any]:
    return {"name": name, "port": 8080, "weight": weight}


def pick(docs: list[dict[str, Any]], method: str = "GET", path: str = "/",
         headers: dict[str, str] | None = None) -> str | None:
    routes, problems = load_routes(docs)
    assert not problems
    table = RouteTable(routes, SVC)
    decision = table.route(RouteRequest(method, path, {k.lower(): (v,) for k, v in
                                                       (headers or {}).items()}),
                           random.Random(1))
    if decision.outcome is not RouteOutcome.ROUTED:
        return decision.outcome.value
    assert decision.backend is not None
    return decision.backend.name


def rule(b: str, **match: Any) -> dict[str, Any]:
    return {"matches": [match], "backendRefs": [backend(b)]}


PATHS = [
    # (match path, request path, matches)
    ({"type": "PathPrefix", "value": "/foo"}, "/foo", True),
    ({"type": "PathPrefix", "value": "/foo"}, "/foo/bar", True),
    ({"type": "PathPrefix", "value": "/foo"}, "/foobar", False),
    ({"type": "PathPrefix", "value": "/foo/"}, "/foo", True),
    ({"type": "PathPrefix", "value": "/"}, "/anything", True),
    ({"type": "Exact", "value": "/foo"}, "/foo", True),
    ({"type": "Exact", "value": "/foo"}, "/foo/", False),
    ({"type": "Exact", "value": "/foo"}, "/foo?x=1", True),
    ({"type": "RegularExpression", "value": "/v[0-9]+/.*"}, "/v2/x", True),
    ({"type": "RegularExpression", "value": "/v[0-9]+"}, "/v2/x", False),
]


@pytest.mark.parametrize(("path", "request_path", "hit"), PATHS)
def test_path_matching(path: dict[str, str], request_path: str, hit: bool) -> None:
    got = pick([route([{"matches": [{"path": path}], "backendRefs": [backend("a")]}])],
               path=request_path)
    assert (got == "a") is hit


PRECEDENCE = [
    ("exact beats prefix",
     [rule("prefix", path={"type": "PathPrefix", "value": "/a"}),
      rule("exact", path={"type": "Exact", "value": "/a"})], {"path": "/a"}, "exact"),
    ("prefix beats regex",
     [rule("regex", path={"type": "RegularExpression", "value": "/a.*"}),
      rule("prefix", path={"type": "PathPrefix", "value": "/a"})], {"path": "/a/b"}, "prefix"),
    ("longer prefix wins",
     [rule("short", path={"type": "PathPrefix", "value": "/a"}),
      rule("long", path={"type": "PathPrefix", "value": "/a/b"})], {"path": "/a/b/c"}, "long"),
    ("method match wins a tie",
     [rule("any", path={"type": "PathPrefix", "value": "/"}),
      rule("get", path={"type": "PathPrefix", "value": "/"}, method="GET")], {}, "get"),
    ("more headers win",
     [rule("one", headers=[{"name": "a", "value": "1"}]),
      rule("two", headers=[{"name": "a", "value": "1"}, {"name": "b", "value": "2"}])],
     {"headers": {"A": "1", "B": "2"}}, "two"),
    ("more query params win",
     [rule("none"), rule("q", queryParams=[{"name": "v", "value": "1"}])],
     {"path": "/x?v=1"}, "q"),
    ("first rule wins a full tie", [rule("first"), rule("second")], {}, "first"),
    ("header names are case-insensitive", [rule("h", headers=[{"name": "X-Env", "value": "b"}])],
     {"headers": {"x-env": "b"}}, "h"),
    ("header values are case-sensitive", [rule("h", headers=[{"name": "x", "value": "B"}])],
     {"headers": {"x": "b"}}, "no_route"),
    ("header regex", [rule("h", headers=[{"type": "RegularExpression", "name": "x",
                                          "value": "v[0-9]"}])],
     {"headers": {"x": "v7"}}, "h"),
    ("query names are case-sensitive", [rule("q", queryParams=[{"name": "V", "value": "1"}])],
     {"path": "/?v=1"}, "no_route"),
    ("method mismatch", [rule("post", method="POST")], {}, "no_route"),
]


@pytest.mark.parametrize(("case", "rules", "req", "expected"), PRECEDENCE,
                         ids=[p[0] for p in PRECEDENCE])
def test_precedence(case: str, rules: list[dict[str, Any]], req: dict[str, Any],
                    expected: str) -> None:
    assert pick([route(rules)], **req) == expected, case


def test_older_route_wins_across_routes() -> None:
    newer = route([rule("newer")], name="a", created="2026-01-02T00:00:00Z")
    older = route([rule("older")], name="b", created="2026-01-01T00:00:00Z")
    assert pick([newer, older]) == "older"
    # Same age: namespace then name.
    assert pick([route([rule("z")], name="z"), route([rule("a")], name="a")]) == "a"


def test_more_specific_rule_of_a_newer_route_still_wins() -> None:
    older = route([rule("catchall")], name="old", created="2026-01-01T00:00:00Z")
    newer = route([rule("exact", path={"type": "Exact", "value": "/x"})], name="new",
                  created="2026-02-01T00:00:00Z")
    assert pick([older, newer], path="/x") == "exact"


def test_routes_for_other_services_or_ports_do_not_attach() -> None:
    other = route([rule("x")])
    other["spec"]["parentRefs"][0]["name"] = "db"
    assert not RouteTable(load_routes([other])[0], SVC)
    port = route([rule("x")])
    port["spec"]["parentRefs"][0]["port"] = 81
    assert not RouteTable(load_routes([port])[0], SVC)


def test_weighted_backends() -> None:
    routes, _ = load_routes([route([{"backendRefs": [backend("v1", 90), backend("v2", 10)]}])])
    table = RouteTable(routes, SVC)
    rng = random.Random(7)
    counts = Counter(table.route(RouteRequest("GET", "/"), rng).backend.name  # type: ignore[union-attr]
                     for _ in range(2000))
    assert 1650 < counts["v1"] < 1950 and counts["v1"] + counts["v2"] == 2000
    zero = RouteTable(load_routes([route([{"backendRefs": [backend("v1", 0)]}])])[0], SVC)
    assert zero.route(RouteRequest("GET", "/"), rng).outcome is RouteOutcome.NO_BACKEND


def test_no_backend_refs_means_the_parent_service() -> None:
    table = RouteTable(load_routes([route([{"matches": [{}]}])])[0], SVC)
    decision = table.route(RouteRequest("GET", "/"), random.Random(0))
    assert decision.backend is not None
    assert (decision.backend.name, decision.backend.port) == ("web", 80)


def test_header_modifier() -> None:
    r = route([{"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
        "set": [{"name": "X-Set", "value": "s"}], "add": [{"name": "X-Add", "value": "a"}],
        "remove": ["x-drop"]}}], "backendRefs": [backend("a")]}])
    parsed = parse_http_route(r)
    out = parsed.rules[0].modifier.apply([("x-set", "old"), ("x-add", "1"), ("X-Drop", "d"),
                                          ("keep", "k")])
    assert out == [("x-add", "1"), ("keep", "k"), ("x-set", "s"), ("x-add", "a")]


def test_default_retry_policy_is_istios() -> None:
    parsed = parse_http_route(route([rule("a")]))
    retry = parsed.rules[0].retry
    assert retry.attempts == 2
    assert ",".join(DEFAULT_RETRY_ON) == \
        "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
    assert retry.retriable_status(503) and not retry.retriable_status(500)
    custom = parse_http_route(route([{**rule("a"), "retry": {"attempts": 0, "codes": [502]}}]))
    assert custom.rules[0].retry.attempts == 0 and custom.rules[0].retry.codes == (502,)


def test_timeouts_and_durations() -> None:
    parsed = parse_http_route(route([{**rule("a"), "timeouts": {"request": "1s500ms",
                                                                 "backendRequest": "250ms"}}]))
    assert parsed.rules[0].request_timeout == pytest.approx(1.5)
    assert parsed.rules[0].backend_timeout == pytest.approx(0.25)
    assert parse_duration("1h2m", "x") == 3720
    with pytest.raises(RouteInvalid, match=r"timeouts\.request"):
        parse_http_route(route([{**rule("a"), "timeouts": {"request": "soon"}}]))


def test_fault_injection_percentages() -> None:
    docs = [route([{**rule("a"), "fault": {"abort": {"percentage": {"value": 25},
                                                     "httpStatus": 418},
                                           "delay": {"percentage": {"value": 100},
                                                     "fixedDelay": "10ms"}}}])]
    table = RouteTable(load_routes(docs)[0], SVC)
    rng = random.Random(3)
    decisions = [table.route(RouteRequest("GET", "/"), rng) for _ in range(1000)]
    aborted = [d for d in decisions if d.outcome is RouteOutcome.ABORTED]
    assert 180 < len(aborted) < 320
    assert all(d.abort_status == 418 for d in aborted)
    assert all(d.delay == pytest.approx(0.01) for d in decisions)


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda r: r["spec"]["parentRefs"][0].update(kind="Gateway"), "spec.parentRefs[0]"),
    (lambda r: r["spec"]["rules"][0]["matches"][0].update(path={"type": "Glob", "value": "/"}),
     "path.type"),
    (lambda r: r["spec"]["rules"][0]["matches"][0].update(
        path={"type": "RegularExpression", "value": "("}), "path.value"),
    (lambda r: r["spec"]["rules"][0].update(filters=[{"type": "URLRewrite"}]), "filters[0]"),
    (lambda r: r["spec"]["rules"][0].update(sessionPersistence={}), "sessionPersistence"),
    (lambda r: r["spec"]["rules"][0]["backendRefs"][0].update(weight=-1), "weight"),
])
def test_invalid_routes_name_the_field(mutate: Any, field: str) -> None:
    doc = route([rule("a", path={"type": "PathPrefix", "value": "/"})])
    mutate(doc)
    routes, problems = load_routes([doc, route([rule("ok")], name="ok")])
    assert len(routes) == 1 and routes[0].name == "ok"
    assert field in problems[0]
