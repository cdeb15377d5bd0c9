"""The waypoint's documents: garbage anywhere is reported and binds nothing; it
never raises and never binds more than the good documents do."""

from __future__ import annotations

import contextlib
import copy
import random
from typing import Any

from waypoint_lab import WEB_VIP, base_docs, lab_model

from agent.waypoint.config import AppProtocol, build_state, port_protocol

GARBAGE: list[Any] = [None, 3, "x", [], {}, [1], {"a": 1}, True]


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths(v, (*prefix, i))
    return out


def replaced(doc: Any, path: tuple[Any, ...], new: Any) -> Any:
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return doc


def test_every_field_replaced_by_garbage_never_raises_nor_widens() -> None:
    model = lab_model()
    good = build_state(model, base_docs(), ("apps", "waypoint"))
    rng = random.Random(11)
    docs = base_docs()
    for i, doc in enumerate(docs):
        for path in paths(doc):
            junk = rng.choice(GARBAGE)
            mutated = [*docs[:i], replaced(doc, path, junk), *docs[i + 1:]]
            state = build_state(model, mutated, ("apps", "waypoint"))
            # Garbage can only remove bindings or change a port's protocol; never add a
            # destination the good documents do not bind (opt-out included).
            assert set(state.destinations) <= set(good.destinations) | {
                ("10.96.0.13", 80), ("10.10.4.1", 8080)}, (path, junk)
    for junk in GARBAGE:
        state = build_state(model, [*docs, junk], ("apps", "waypoint"))
        assert set(state.destinations) == set(good.destinations)


def test_a_broken_namespace_binds_nothing_in_it() -> None:
    docs = base_docs()
    docs[0]["metadata"]["labels"] = {"istio.io/use-waypoint": 7}
    state = build_state(lab_model(), docs, ("apps", "waypoint"))
    assert not state.destinations
    assert any("Namespace" in p and "binds nothing" in p for p in state.problems)


def test_unknown_kinds_are_reported() -> None:
    docs = [*base_docs(), {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                           "metadata": {"name": "v", "namespace": "apps"}}]
    state = build_state(lab_model(), docs, ("apps", "waypoint"))
    assert (WEB_VIP, 80) in state.destinations
    assert any("VirtualService" in p for p in state.problems)


def test_port_protocol_selection() -> None:
    assert port_protocol("http", None) is AppProtocol.HTTP
    assert port_protocol("http-web", None) is AppProtocol.HTTP
    assert port_protocol("grpc-api", None) is AppProtocol.HTTP
    assert port_protocol("tcp-db", None) is AppProtocol.TCP
    assert port_protocol("web", None) is AppProtocol.TCP
    assert port_protocol("tcp", "kubernetes.io/h2c") is AppProtocol.HTTP
    assert port_protocol("http", "mysql") is AppProtocol.TCP


def test_policies_and_routes_with_garbage_in_any_field_never_raise() -> None:
    from agent.waypoint.authz import compile_document
    from agent.waypoint.routing import RouteInvalid, parse_http_route

    policy = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
              "metadata": {"name": "p", "namespace": "apps",
                           "annotations": {"istio.io/dry-run": "false"}},
              "spec": {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                                       "name": "waypoint"}],
                       "action": "DENY",
                       "rules": [{"from": [{"source": {"principals": ["a/*"],
                                                       "notIpBlocks": ["10.0.0.0/8"]}}],
                                  "to": [{"operation": {"methods": ["GET"], "paths": ["/x*"]}}],
                                  "when": [{"key": "request.headers[x]", "values": ["1"]}]}]}}
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
             "metadata": {"name": "r", "namespace": "apps"},
             "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                      "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/a"},
                                              "headers": [{"name": "h", "value": "v"}],
                                              "queryParams": [{"name": "q", "value": "1"}],
                                              "method": "GET"}],
                                 "filters": [{"type": "RequestHeaderModifier",
                                              "requestHeaderModifier": {
                                                  "set": [{"name": "a", "value": "b"}],
                                                  "remove": ["c"]}}],
                                 "backendRefs": [{"name": "web", "port": 80, "weight": 2}],
                                 "timeouts": {"request": "1s"},
                                 "retry": {"attempts": 1, "codes": [503], "backoff": "10ms"},
                                 "fault": {"abort": {"percentage": {"value": 5},
                                                     "httpStatus": 503},
                                           "delay": {"percentage": {"value": 5},
                                                     "fixedDelay": "1ms"}}}]}}
    for path in paths(policy):
        for junk in GARBAGE:
            compile_document(replaced(policy, path, junk))  # a result, never an exception
    for path in paths(route):
        for junk in GARBAGE:
            with contextlib.suppress(RouteInvalid):  # a route or RouteInvalid, nothing else
                parse_http_route(replaced(route, path, junk))
