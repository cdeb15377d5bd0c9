# ruff: noqa: E501  (a table: one case per line reads best)
"""L7 authorization as a table, from Istio's documented semantics (AuthorizationPolicy
reference, "Authorization Policy" concept page) and the builder code cited in
agent/waypoint/authz.py."""

from __future__ import annotations

from typing import Any

import pytest

from agent.waypoint.authz import (
    Action,
    DocumentOutcome,
    Request,
    Scope,
    Verdict,
    compile_document,
    compile_documents,
    evaluate,
)

SCOPE = Scope("apps", "waypoint", "apps", "web")
ALICE = "cluster.local/ns/front/sa/alice"
BOB = "cluster.local/ns/other/sa/bob"


def doc(spec: dict[str, Any], name: str = "p", namespace: str = "apps",
        annotations: dict[str, str] | None = None) -> dict[str, Any]:
    spec = {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                            "name": "waypoint"}], **spec}
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": meta, "spec": spec}


def req(method: str = "GET", path: str = "/", host: str = "web.apps.svc.cluster.local",
        port: int = 80, principal: str | None = ALICE, source_ip: str = "10.0.0.5",
        remote_ip: str | None = None, headers: dict[str, str] | None = None) -> Request:
    return Request(method, path, host, port, principal, source_ip, remote_ip or source_ip,
                   "10.96.0.10", {k.lower(): (v,) for k, v in (headers or {}).items()})


def verdict(docs: list[dict[str, Any]], request: Request, scope: Scope = SCOPE) -> Verdict:
    policies, _ = compile_documents(docs)
    return evaluate(policies, scope, request).verdict


A, D = Verdict.ALLOW, Verdict.DENY

# (case, policy specs, request, expected verdict)
TABLE: list[tuple[str, list[dict[str, Any]], Request, Verdict]] = [
    ("no policy: allow", [], req(), A),
    ("ALLOW without rules denies everything", [{"action": "ALLOW"}], req(), D),
    ("ALLOW rules:[{}] allows everything", [{"rules": [{}]}], req(), A),
    ("DENY without rules denies nothing", [{"action": "DENY"}], req(), A),
    ("DENY rules:[{}] denies everything", [{"action": "DENY", "rules": [{}]}], req(), D),
    ("GET only: GET allowed", [{"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}],
     req("GET"), A),
    ("GET only: POST denied", [{"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}],
     req("POST"), D),
    ("methods are case-sensitive", [{"rules": [{"to": [{"operation": {"methods": ["get"]}}]}]}],
     req("GET"), D),
    ("principal exact", [{"rules": [{"from": [{"source": {"principals": [ALICE]}}]}]}],
     req(), A),
    ("principal other", [{"rules": [{"from": [{"source": {"principals": [ALICE]}}]}]}],
     req(principal=BOB), D),
    ("principal with spiffe:// never matches",
     [{"rules": [{"from": [{"source": {"principals": ["spiffe://" + ALICE]}}]}]}], req(), D),
    ("principal '*' needs an identity",
     [{"rules": [{"from": [{"source": {"principals": ["*"]}}]}]}], req(principal=None), D),
    ("notPrincipals '*' matches plaintext",
     [{"action": "DENY", "rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]}]}],
     req(principal=None), D),
    ("notPrincipals '*' spares mTLS",
     [{"action": "DENY", "rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]}]}],
     req(), A),
    ("principal suffix", [{"rules": [{"from": [{"source": {"principals": ["*/sa/alice"]}}]}]}],
     req(), A),
    ("namespace from principal", [{"rules": [{"from": [{"source": {"namespaces": ["front"]}}]}]}],
     req(), A),
    ("namespace other", [{"rules": [{"from": [{"source": {"namespaces": ["front"]}}]}]}],
     req(principal=BOB), D),
    ("notNamespaces", [{"rules": [{"from": [{"source": {"notNamespaces": ["front"]}}]}]}],
     req(principal=BOB), A),
    ("ipBlocks CIDR", [{"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/24"]}}]}]}],
     req(source_ip="10.0.0.9"), A),
    ("ipBlocks miss", [{"rules": [{"from": [{"source": {"ipBlocks": ["10.0.1.0/24"]}}]}]}],
     req(source_ip="10.0.0.9"), D),
    ("remoteIpBlocks use remote.ip, not the peer",
     [{"rules": [{"from": [{"source": {"remoteIpBlocks": ["192.0.2.1"]}}]}]}],
     req(source_ip="10.0.0.9", remote_ip="192.0.2.1"), A),
    ("notIpBlocks", [{"action": "DENY",
                      "rules": [{"from": [{"source": {"notIpBlocks": ["10.0.0.0/8"]}}]}]}],
     req(source_ip="192.168.1.1"), D),
    ("fields in one source are ANDed",
     [{"rules": [{"from": [{"source": {"namespaces": ["front"], "ipBlocks": ["10.9.0.0/16"]}}]}]}],
     req(), D),
    ("sources are ORed",
     [{"rules": [{"from": [{"source": {"namespaces": ["x"]}},
                           {"source": {"ipBlocks": ["10.0.0.0/8"]}}]}]}], req(), A),
    ("from AND to",
     [{"rules": [{"from": [{"source": {"namespaces": ["front"]}}],
                  "to": [{"operation": {"methods": ["POST"]}}]}]}], req("GET"), D),
    ("rules are ORed",
     [{"rules": [{"to": [{"operation": {"methods": ["POST"]}}]},
                 {"to": [{"operation": {"paths": ["/ok"]}}]}]}], req("GET", "/ok"), A),
    ("path exact ignores the query", [{"rules": [{"to": [{"operation": {"paths": ["/a"]}}]}]}],
     req(path="/a?x=1"), A),
    ("path prefix", [{"rules": [{"to": [{"operation": {"paths": ["/api/*"]}}]}]}],
     req(path="/api/v1"), A),
    ("path prefix miss", [{"rules": [{"to": [{"operation": {"paths": ["/api/*"]}}]}]}],
     req(path="/apx"), D),
    ("path suffix", [{"rules": [{"to": [{"operation": {"paths": ["*.png"]}}]}]}],
     req(path="/x/y.png"), A),
    ("path presence", [{"rules": [{"to": [{"operation": {"paths": ["*"]}}]}]}], req(), A),
    ("notPaths", [{"action": "DENY", "rules": [{"to": [{"operation": {"notPaths": ["/public/*"]}}]}]}],
     req(path="/private"), D),
    ("notPaths spared", [{"action": "DENY",
                          "rules": [{"to": [{"operation": {"notPaths": ["/public/*"]}}]}]}],
     req(path="/public/x"), A),
    ("hosts are case-insensitive",
     [{"rules": [{"to": [{"operation": {"hosts": ["WEB.apps.svc.cluster.local"]}}]}]}], req(), A),
    ("hosts prefix", [{"rules": [{"to": [{"operation": {"hosts": ["web.*"]}}]}]}], req(), A),
    ("notHosts", [{"action": "DENY", "rules": [{"to": [{"operation": {"notHosts": ["web*"]}}]}]}],
     req(host="evil"), D),
    ("ports", [{"rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]}], req(port=80), D),
    ("notPorts", [{"rules": [{"to": [{"operation": {"notPorts": ["8080"]}}]}]}], req(port=80), A),
    ("when header exact",
     [{"rules": [{"when": [{"key": "request.headers[x-user]", "values": ["admin"]}]}]}],
     req(headers={"X-User": "admin"}), A),
    ("when header absent",
     [{"rules": [{"when": [{"key": "request.headers[x-user]", "values": ["*"]}]}]}], req(), D),
    ("when header notValues on absent header matches",
     [{"action": "DENY",
       "rules": [{"when": [{"key": "request.headers[x-token]", "notValues": ["*"]}]}]}], req(), D),
    ("when conditions are ANDed",
     [{"rules": [{"when": [{"key": "source.namespace", "values": ["front"]},
                           {"key": "request.headers[x-a]", "values": ["1"]}]}]}], req(), D),
    ("when source.ip", [{"rules": [{"when": [{"key": "source.ip", "values": ["10.0.0.5"]}]}]}],
     req(), A),
    ("when destination.port",
     [{"rules": [{"when": [{"key": "destination.port", "values": ["80"]}]}]}], req(), A),
    ("when source.principal notValues",
     [{"rules": [{"when": [{"key": "source.principal", "notValues": [ALICE]}]}]}], req(), D),
    ("serviceAccounts", [{"rules": [{"from": [{"source": {"serviceAccounts": ["front/alice"]}}]}]}],
     req(), A),
    ("serviceAccounts default to the policy namespace",
     [{"rules": [{"from": [{"source": {"serviceAccounts": ["alice"]}}]}]}], req(), D),
    ("DENY beats ALLOW",
     [{"rules": [{}]}, {"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}],
     req("GET"), D),
    ("one ALLOW of two matching is enough",
     [{"rules": [{"to": [{"operation": {"methods": ["POST"]}}]}]},
      {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}], req("GET"), A),
    ("AUDIT never changes the decision", [{"action": "AUDIT", "rules": [{}]}], req(), A),
    ("AUDIT alongside an ALLOW is not an ALLOW",
     [{"action": "AUDIT", "rules": [{}]}, {"rules": [{"to": [{"operation": {"methods": ["POST"]}}]}]}],
     req("GET"), D),
    # unsupported: never widens
    ("ALLOW with requestPrincipals never matches",
     [{"rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}], req(), D),
    ("DENY with requestPrincipals denies more",
     [{"action": "DENY", "rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}],
     req(), D),
    ("ALLOW with request.auth.claims never matches",
     [{"rules": [{"when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]}]}], req(), D),
    ("DENY with request.auth.claims denies",
     [{"action": "DENY", "rules": [{"when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]}]}],
     req(), D),
    ("ALLOW with a path template never matches",
     [{"rules": [{"to": [{"operation": {"paths": ["/a/{*}"]}}]}]}], req(path="/a/b"), D),
    ("CUSTOM fails closed (deny-all on the target)", [{"action": "CUSTOM",
                                                       "provider": {"name": "x"}, "rules": [{}]}],
     req(), D),
    ("unknown field fails closed", [{"rules": [{"to": [{"operation": {"method": ["GET"]}}]}]}],
     req(), D),
    ("bad CIDR fails closed even for a DENY",
     [{"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/99"]}}]}]}],
     req(), D),
    ("unknown action fails closed", [{"action": "PERMIT", "rules": [{}]}], req(), D),
    ("an IPv4-mapped CIDR in a DENY fails closed (it would never match: not 'denies nothing')",
     [{"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["::ffff:10.0.0.0/104"]}}]}]}],
     req(source_ip="10.0.0.9"), D),
    ("an IPv4-mapped source address is compared as IPv4",
     [{"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/24"]}}]}]}],
     req(source_ip="::ffff:10.0.0.9"), A),
]


@pytest.mark.parametrize(("case", "specs", "request_", "expected"), TABLE,
                         ids=[t[0] for t in TABLE])
def test_semantics_table(case: str, specs: list[dict[str, Any]], request_: Request,
                         expected: Verdict) -> None:
    docs = [doc(s, name=f"p{i}") for i, s in enumerate(specs)]
    assert verdict(docs, request_) is expected, case


def test_dry_run_policy_is_reported_not_enforced() -> None:
    policies, results = compile_documents([doc({"action": "DENY", "rules": [{}]},
                                               annotations={"istio.io/dry-run": "true"})])
    assert results[0].outcome is DocumentOutcome.ACCEPTED
    decision = evaluate(policies, SCOPE, req())
    assert decision.allowed
    assert decision.dry_run == ("apps/p",)


def test_bad_dry_run_value_fails_closed() -> None:
    _, results = compile_documents([doc({"rules": [{}]}, annotations={"istio.io/dry-run": "yes"})])
    assert results[0].outcome is DocumentOutcome.FAIL_CLOSED


def test_target_refs_decide_which_requests_a_policy_sees() -> None:
    on_service = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                  "metadata": {"name": "svc", "namespace": "apps"},
                  "spec": {"targetRefs": [{"kind": "Service", "group": "", "name": "web"}],
                           "action": "DENY", "rules": [{}]}}
    policies, _ = compile_documents([on_service])
    assert evaluate(policies, SCOPE, req()).verdict is D
    other = Scope("apps", "waypoint", "apps", "db")
    assert evaluate(policies, other, req()).verdict is A
    # A policy on another waypoint's Gateway does not apply here.
    elsewhere = doc({"action": "DENY", "rules": [{}]})
    elsewhere["spec"]["targetRefs"][0]["name"] = "other-waypoint"
    policies, _ = compile_documents([elsewhere])
    assert evaluate(policies, SCOPE, req()).verdict is A


def test_selector_policies_are_the_tunnels() -> None:
    plain = doc({"rules": [{}]})
    del plain["spec"]["targetRefs"]
    plain["spec"]["selector"] = {"matchLabels": {"app": "web"}}
    result = compile_document(plain)
    assert result.outcome is DocumentOutcome.IGNORED
    assert result.policy is None


def test_audit_matches_are_reported() -> None:
    policies, _ = compile_documents([doc({"action": "AUDIT", "rules": [{}]})])
    decision = evaluate(policies, SCOPE, req())
    assert decision.allowed and decision.audited == ("apps/p",)


def test_duplicate_names_fail_closed() -> None:
    policies, results = compile_documents([doc({"rules": [{}]}), doc({"rules": [{}]})])
    assert {r.outcome for r in results} == {DocumentOutcome.FAIL_CLOSED}
    assert all(p.action is Action.DENY for p in policies)


def test_unsupported_fields_are_named() -> None:
    result = compile_document(doc({"rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}))
    assert result.outcome is DocumentOutcome.ACCEPTED_WITH_WARNINGS
    assert "spec.rules[0].from[0].source.requestPrincipals" in result.problems[0]
    bad = compile_document(doc({"rules": [{"to": [{"operation": {"paths": ["/a*b"]}}]}]}))
    assert bad.outcome is DocumentOutcome.FAIL_CLOSED
    assert "spec.rules[0].to[0].operation.paths" in bad.problems[0]


def test_garbage_documents_never_widen() -> None:
    allow_get = doc({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}, name="good")
    garbage_documents: list[Any] = [
        None, 3, "x", [], {"kind": "AuthorizationPolicy"}, doc({"rules": "all"}, name="g1"),
        doc({"action": "ALLOW", "rules": [[]]}, name="g2")]
    for garbage in garbage_documents:
        policies, _ = compile_documents([allow_get, garbage])
        assert evaluate(policies, SCOPE, req("POST")).verdict is D


def test_tcp_passthrough_sees_only_l4_attributes() -> None:
    tcp = Request("", "", "", 5432, ALICE, "10.0.0.5", "10.0.0.5", "10.96.0.10", http=False)
    allow_get = doc({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]})
    assert verdict([allow_get], tcp) is D  # an HTTP-only ALLOW never matches TCP
    deny_get_from_front = doc({"action": "DENY", "rules": [{
        "from": [{"source": {"namespaces": ["front"]}}],
        "to": [{"operation": {"methods": ["GET"]}}]}]})
    assert verdict([deny_get_from_front], tcp) is D  # the method is dropped: denies more
    allow_ns = doc({"rules": [{"from": [{"source": {"namespaces": ["front"]}}]}]})
    assert verdict([allow_ns], tcp) is A


@pytest.mark.parametrize(("target", "normalized"), [
    ("/a/b", "/a/b"), ("/x/../admin", "/admin"), ("/./admin", "/admin"),
    ("/a/b/..", "/a/"), ("/../../etc", "/etc"), ("/a/./b/?q=/../x", "/a/b/?q=/../x"),
    ("/a%2F..%2Fadmin", "/a%2F..%2Fadmin"), ("*", "*"), ("http://h/x", None), ("x", None),
])
def test_paths_are_normalized_before_policy(target: str, normalized: str | None) -> None:
    from agent.waypoint.proxy import normalize_path
    assert normalize_path(target) == normalized


def test_gateway_class_policy_in_the_root_namespace_applies_to_every_waypoint() -> None:
    mesh_wide = doc({"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]},
                    namespace="istio-system")
    mesh_wide["spec"]["targetRefs"] = [{"kind": "GatewayClass", "group": "gateway.networking.k8s.io",
                                        "name": "istio-waypoint"}]
    assert verdict([mesh_wide], req("DELETE")) is D
    assert verdict([mesh_wide], req("GET")) is A
    elsewhere = {**mesh_wide, "metadata": {"name": "p", "namespace": "apps"}}
    assert verdict([elsewhere], req("DELETE")) is A  # only from the root namespace
