"""L4 authorization engine: Istio's documented AuthorizationPolicy semantics, as ztunnel."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.policy import (
    ConnectionRequest,
    PolicyAction,
    PolicySet,
    WorkloadRef,
    explain,
    parse_policy,
)
from agent.policy.engine import policy_applies

SLEEP = "spiffe://cluster.local/ns/foo/sa/sleep"
OTHER = "spiffe://cluster.local/ns/bar/sa/client"
HTTPBIN = WorkloadRef("httpbin", "foo", {"app": "httpbin", "version": "v1"})
DB = WorkloadRef("db", "foo", {"app": "db"})
BAR_APP = WorkloadRef("app", "bar", {"app": "httpbin"})


def document(name: str = "p", namespace: str = "foo", *, action: str | None = None,
             selector: dict[str, str] | None = None, rules: Any = ..., dry_run: bool = False,
             spec: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = dict(spec or {})
    if action is not None:
        body["action"] = action
    if selector is not None:
        body["selector"] = {"matchLabels": selector}
    if rules is not ...:
        body["rules"] = rules
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if dry_run:
        metadata["annotations"] = {"istio.io/dry-run": "true"}
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": metadata, "spec": body}


def policy(name: str = "p", namespace: str = "foo", **fields: Any):
    return parse_policy(document(name, namespace, **fields))


def request(identity: str | None = SLEEP, *, src_ip: str = "10.0.0.5", dst_ip: str = "10.1.0.7",
            port: int = 8080, workload: WorkloadRef = HTTPBIN) -> ConnectionRequest:
    return ConnectionRequest(src_ip=src_ip, src_identity=identity, dst_ip=dst_ip,
                             dst_port=port, dst_workload=workload)


def allowed(policies: list, req: ConnectionRequest, root: str = "istio-system") -> bool:
    return PolicySet(policies, root).evaluate(req).allowed


def from_source(**source: Any) -> list[dict[str, Any]]:
    return [{"from": [{"source": source}]}]


# (description, documents, request, expected allowed) drawn from Istio's documentation.
# Also exported as fixtures for the native evaluator (tests/unit/policy_fixtures.py).
CASES = [
    ("no policies: allow", [], request(), True),
    ("allow-nothing (spec: {})", [document(spec={})], request(), False),
    ("allow-nothing (rules: [])", [document(rules=[])], request(), False),
    ("allow-all (rules: [{}])", [document(rules=[{}])], request(None), True),
    ("deny-all (DENY rules: [{}])",
     [document(action="DENY", rules=[{}]), document("allow", rules=[{}])], request(), False),
    ("DENY without rules matches nothing", [document(action="DENY", spec={})], request(), True),
    ("policy in another namespace does not apply",
     [document(namespace="bar", spec={})], request(), True),
    ("root namespace policy applies mesh-wide",
     [document(namespace="istio-system", spec={})], request(workload=BAR_APP), False),
    ("custom root namespace", [document(namespace="mesh-root", spec={})], request(), True),
    ("selector matches labels", [document(selector={"app": "httpbin"}, spec={})], request(), False),
    ("selector does not match other workload",
     [document(selector={"app": "httpbin"}, spec={})], request(workload=DB), True),
    ("selector needs every label",
     [document(selector={"app": "httpbin", "version": "v2"}, spec={})], request(), True),
    ("root-namespace selector matches in every namespace",
     [document(namespace="istio-system", selector={"app": "httpbin"}, spec={})],
     request(workload=BAR_APP), False),
    ("non-root selector stays in its namespace",
     [document(namespace="foo", selector={"app": "httpbin"}, spec={})],
     request(workload=BAR_APP), True),
    ("exact principal allows", [document(rules=from_source(
        principals=["cluster.local/ns/foo/sa/sleep"]))], request(), True),
    ("exact principal rejects other", [document(rules=from_source(
        principals=["cluster.local/ns/foo/sa/sleep"]))], request(OTHER), False),
    ("principal prefix wildcard", [document(rules=from_source(
        principals=["cluster.local/ns/foo/*"]))], request(), True),
    ("principal suffix wildcard", [document(rules=from_source(
        principals=["*/sa/sleep"]))], request(), True),
    ("principal suffix wildcard mismatch", [document(rules=from_source(
        principals=["*/sa/sleep"]))], request(OTHER), False),
    ("principal '*' requires any identity", [document(rules=from_source(
        principals=["*"]))], request(None), False),
    ("plaintext never matches principals", [document(rules=from_source(
        principals=["*"]))], request(None), False),
    ("notPrincipals excludes", [document(rules=from_source(
        notPrincipals=["cluster.local/ns/foo/sa/sleep"]))], request(), False),
    ("notPrincipals admits others", [document(rules=from_source(
        notPrincipals=["cluster.local/ns/foo/sa/sleep"]))], request(OTHER), True),
    ("DENY notPrincipals '*' denies plaintext (require mTLS)",
     [document(action="DENY", rules=from_source(notPrincipals=["*"]))], request(None), False),
    ("DENY notPrincipals '*' lets mTLS through",
     [document(action="DENY", rules=from_source(notPrincipals=["*"]))], request(), True),
    ("namespaces from SPIFFE ID", [document(rules=from_source(namespaces=["foo"]))],
     request(), True),
    ("namespaces mismatch", [document(rules=from_source(namespaces=["foo"]))],
     request(OTHER), False),
    ("plaintext has no namespace", [document(rules=from_source(namespaces=["*"]))],
     request(None), False),
    ("notNamespaces", [document(rules=from_source(notNamespaces=["bar"]))],
     request(OTHER), False),
    ("serviceAccounts ns/sa", [document(rules=from_source(serviceAccounts=["foo/sleep"]))],
     request(), True),
    ("serviceAccounts bare name uses policy namespace",
     [document(rules=from_source(serviceAccounts=["sleep"]))], request(), True),
    ("serviceAccounts bare name is not another namespace",
     [document(namespace="istio-system", rules=from_source(serviceAccounts=["sleep"]))],
     request(), False),
    ("serviceAccounts never match plaintext",
     [document(rules=from_source(serviceAccounts=["foo/sleep"]))], request(None), False),
    ("notServiceAccounts", [document(rules=from_source(notServiceAccounts=["foo/sleep"]))],
     request(), False),
    ("ipBlocks match", [document(rules=from_source(ipBlocks=["10.0.0.0/16"]))],
     request(None), True),
    ("ipBlocks bare IP", [document(rules=from_source(ipBlocks=["10.0.0.5"]))], request(), True),
    ("ipBlocks mismatch", [document(rules=from_source(ipBlocks=["192.168.0.0/16"]))],
     request(), False),
    ("ipBlocks IPv4-mapped source", [document(rules=from_source(ipBlocks=["10.0.0.0/8"]))],
     request(src_ip="::ffff:10.0.0.5"), True),
    ("notIpBlocks", [document(rules=from_source(ipBlocks=["10.0.0.0/8"],
                                              notIpBlocks=["10.0.0.0/24"]))], request(), False),
    ("ports", [document(rules=[{"to": [{"operation": {"ports": ["8080"]}}]}])], request(), True),
    ("ports mismatch", [document(rules=[{"to": [{"operation": {"ports": ["9090"]}}]}])],
     request(), False),
    ("notPorts", [document(rules=[{"to": [{"operation": {"notPorts": [8080]}}]}])],
     request(), False),
    ("from AND to", [document(rules=[{"from": [{"source": {"namespaces": ["foo"]}}],
                                    "to": [{"operation": {"ports": ["9090"]}}]}])],
     request(), False),
    ("from entries are ORed", [document(rules=[{"from": [
        {"source": {"namespaces": ["nope"]}}, {"source": {"namespaces": ["foo"]}}]}])],
     request(), True),
    ("fields in one source are ANDed", [document(rules=from_source(
        namespaces=["foo"], ipBlocks=["192.168.0.0/16"]))], request(), False),
    ("rules are ORed", [document(rules=[{"to": [{"operation": {"ports": ["1"]}}]},
                                      {"to": [{"operation": {"ports": ["8080"]}}]}])],
     request(), True),
    ("when destination.ip", [document(rules=[{"when": [
        {"key": "destination.ip", "values": ["10.1.0.0/24"]}]}])], request(), True),
    ("when destination.ip notValues", [document(rules=[{"when": [
        {"key": "destination.ip", "notValues": ["10.1.0.7"]}]}])], request(), False),
    ("when source.ip", [document(rules=[{"when": [
        {"key": "source.ip", "values": ["10.0.0.5/32"]}]}])], request(), True),
    ("when destination.port", [document(rules=[{"when": [
        {"key": "destination.port", "values": ["8080"]}]}])], request(), True),
    ("when source.namespace", [document(rules=[{"when": [
        {"key": "source.namespace", "values": ["bar"]}]}])], request(), False),
    ("when source.principal", [document(rules=[{"when": [
        {"key": "source.principal", "values": ["cluster.local/ns/foo/*"]}]}])],
     request(), True),
    ("when conditions are ANDed", [document(rules=[{"when": [
        {"key": "destination.port", "values": ["8080"]},
        {"key": "source.ip", "values": ["192.168.0.1"]}]}])], request(), False),
    ("DENY wins over ALLOW",
     [document("allow", rules=[{}]), document("deny", action="DENY",
                                          rules=from_source(namespaces=["foo"]))],
     request(), False),
    ("mesh DENY wins over namespace ALLOW",
     [document("allow", rules=[{}]),
      document("deny", namespace="istio-system", action="DENY", rules=[{}])], request(), False),
    ("any matching ALLOW suffices",
     [document("a", rules=from_source(namespaces=["nope"])),
      document("b", rules=from_source(namespaces=["foo"]))], request(), True),
    ("ALLOW elsewhere does not restrict this workload",
     [document(selector={"app": "db"}, spec={})], request(), True),
    ("ALLOW rule with HTTP methods never matches at L4",
     [document(rules=[{"to": [{"operation": {"methods": ["GET"], "ports": ["8080"]}}]}])],
     request(), False),
    ("ALLOW: only the L7 rule is dropped, other rules still match",
     [document(rules=[{"to": [{"operation": {"paths": ["/x"]}}]}, {}])], request(), True),
    ("ALLOW rule with requestPrincipals never matches",
     [document(rules=from_source(requestPrincipals=["*"], namespaces=["foo"]))],
     request(), False),
    ("ALLOW rule with L7 when never matches",
     [document(rules=[{"when": [{"key": "request.headers[x]", "values": ["1"]}]}])],
     request(), False),
    # ztunnel skips the empty match istiod leaves (rbac.rs Authorization::matches,
    # `mg.is_empty() => continue`): the DENY has no effect at L4 (was: deny-all).
    ("DENY with only HTTP methods matches nothing (emptied match skipped)",
     [document(action="DENY", rules=[{"to": [{"operation": {"methods": ["DELETE"]}}]}])],
     request(), True),
    ("DENY with methods + ports is enforced on ports",
     [document(action="DENY", rules=[{"to": [{"operation": {"methods": ["GET"],
                                                          "ports": ["9090"]}}]}])],
     request(), True),
    # An L7 `when` becomes a clause holding one empty match (istiod handleRule), which
    # can never match: the whole DENY rule never matches (was: L4 from enforced).
    ("DENY rule with an L7 when never matches, even with an L4 from",
     [document(action="DENY", rules=[{"from": [{"source": {"namespaces": ["bar"]}}],
                                    "when": [{"key": "request.auth.claims[iss]",
                                              "values": ["x"]}]}])], request(OTHER), True),
    ("dry-run DENY is not enforced",
     [document(action="DENY", rules=[{}], dry_run=True)], request(), True),
    ("dry-run ALLOW does not restrict",
     [document(spec={}, dry_run=True)], request(), True),
]


@pytest.mark.parametrize(("documents", "req", "expected"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_documented_semantics(documents: list, req: ConnectionRequest, expected: bool) -> None:
    assert allowed([parse_policy(d) for d in documents], req) is expected


def test_custom_root_namespace_applies_mesh_wide() -> None:
    assert not allowed([policy(namespace="mesh-root", spec={})], request(), root="mesh-root")


def test_decision_names_the_deciding_policy_and_rule() -> None:
    policies = PolicySet([policy("allow", rules=[{"to": [{"operation": {"ports": ["1"]}}]}, {}]),
                          policy("deny", action="DENY", rules=from_source(namespaces=["bar"]))])
    decision = policies.evaluate(request())
    assert (decision.allowed, decision.policy, decision.action, decision.rule_index) == (
        True, "foo/allow", PolicyAction.ALLOW, 1)
    denied = policies.evaluate(request(OTHER))
    assert (denied.allowed, denied.policy, denied.action) == (False, "foo/deny",
                                                              PolicyAction.DENY)
    assert "foo/deny" in denied.reason


def test_default_deny_when_no_allow_matches_has_no_policy() -> None:
    decision = PolicySet([policy(spec={})]).evaluate(request())
    assert not decision.allowed and decision.policy is None and decision.action is None
    assert "none matched" in decision.reason


def test_dry_run_matches_are_reported_with_would_be_decision() -> None:
    policies = PolicySet([policy("audit", action="DENY", rules=[{}], dry_run=True),
                          policy("allow-sleep", rules=from_source(namespaces=["foo"]))])
    decision = policies.evaluate(request())
    assert decision.allowed
    assert [(m.policy, m.action) for m in decision.dry_run_matches] == [
        ("foo/audit", PolicyAction.DENY)]
    assert decision.dry_run_allowed is False
    assert PolicySet([policy(rules=[{}])]).evaluate(request()).dry_run_allowed is None


def test_dry_run_allow_that_would_deny() -> None:
    decision = PolicySet([policy(rules=from_source(namespaces=["bar"]), dry_run=True)]
                         ).evaluate(request())
    assert decision.allowed and decision.dry_run_matches == ()
    assert decision.dry_run_allowed is False


def test_unknown_source_ip_never_matches_ip_blocks() -> None:
    req = ConnectionRequest(None, SLEEP, "10.1.0.7", 8080, HTTPBIN)
    assert not allowed([policy(rules=from_source(ipBlocks=["0.0.0.0/0"]))], req)
    assert allowed([policy(rules=from_source(notIpBlocks=["0.0.0.0/0"]))], req)


def test_request_validation() -> None:
    with pytest.raises(ValueError, match="SPIFFE"):
        request("cluster.local/ns/foo/sa/sleep")
    with pytest.raises(ValueError, match="dst_port"):
        request(port=70000)


def test_applicable_lists_scope() -> None:
    mesh = policy("mesh", namespace="istio-system", spec={})
    other = policy("other", namespace="bar", spec={})
    mine = policy("mine", selector={"app": "httpbin"}, spec={})
    assert PolicySet([mesh, other, mine]).applicable(HTTPBIN) == (mesh, mine)
    assert policy_applies(mine, HTTPBIN) and not policy_applies(mine, DB)


def test_explain_is_readable() -> None:
    policies = PolicySet([
        policy("allow-sleep", selector={"app": "httpbin"},
               rules=[{"from": [{"source": {"principals": ["cluster.local/ns/foo/sa/sleep"]}}],
                       "to": [{"operation": {"ports": ["9090"]}}]}]),
        policy("audit", namespace="istio-system", action="DENY", rules=[{}], dry_run=True),
        policy("unrelated", namespace="bar", spec={}),
    ])
    text = explain(policies, request())
    assert "policies applying to foo/httpbin (2)" in text
    assert "ports: port 8080 not in [9090]" in text
    assert "foo/unrelated" not in text and "bar/unrelated" not in text
    assert "decision: DENY" in text
    assert "dry-run: DENY policy istio-system/audit matched" in text
    assert "mesh-wide" in text


# ---------------------------------------------------------------- properties

namespaces = st.sampled_from(["foo", "bar", "istio-system"])
identities = st.one_of(st.none(), st.builds(
    lambda ns, sa: f"spiffe://cluster.local/ns/{ns}/sa/{sa}", namespaces,
    st.sampled_from(["sleep", "client", "default"])))
ips = st.builds(lambda n: str(ipaddress.IPv4Address(0x0A000000 + n)), st.integers(0, 1023))
ports = st.sampled_from([80, 443, 8080, 9090])
workloads = st.sampled_from([HTTPBIN, DB, BAR_APP])
requests = st.builds(lambda i, s, d, p, w: ConnectionRequest(s, i, d, p, w),
                     identities, ips, ips, ports, workloads)

sources = st.fixed_dictionaries({}, optional={
    "principals": st.lists(st.sampled_from(["cluster.local/ns/foo/sa/sleep", "*",
                                            "cluster.local/ns/bar/*", "*/sa/client"]),
                           min_size=1, max_size=2),
    "notNamespaces": st.lists(namespaces, min_size=1, max_size=2),
    "namespaces": st.lists(namespaces, min_size=1, max_size=2),
    "ipBlocks": st.lists(st.sampled_from(["10.0.0.0/24", "10.0.1.0/24", "10.0.0.0/8"]),
                         min_size=1, max_size=2),
    "notIpBlocks": st.lists(st.sampled_from(["10.0.0.0/28", "10.0.2.0/24"]),
                            min_size=1, max_size=1),
}).filter(bool)
operations = st.fixed_dictionaries({}, optional={
    "ports": st.lists(ports.map(str), min_size=1, max_size=2),
    "notPorts": st.lists(ports.map(str), min_size=1, max_size=1),
    "methods": st.just(["GET"]),
}).filter(bool)
rules = st.fixed_dictionaries({}, optional={
    "from": st.lists(sources.map(lambda s: {"source": s}), min_size=1, max_size=2),
    "to": st.lists(operations.map(lambda o: {"operation": o}), min_size=1, max_size=2),
})
policy_specs = st.fixed_dictionaries({
    "action": st.sampled_from(["ALLOW", "DENY"]),
    "rules": st.lists(rules, max_size=3),
}, optional={"selector": st.sampled_from([{"app": "httpbin"}, {"app": "db"}])})


@st.composite
def policy_sets(draw: st.DrawFn) -> list:
    specs = draw(st.lists(st.tuples(namespaces, policy_specs), max_size=4))
    return [policy(f"p{i}", ns, action=spec["action"], selector=spec.get("selector"),
                   rules=spec["rules"]) for i, (ns, spec) in enumerate(specs)]


@given(requests)
def test_empty_policy_set_allows_everything(req: ConnectionRequest) -> None:
    assert PolicySet().evaluate(req).allowed


@settings(max_examples=300)
@given(policy_sets(), requests)
def test_adding_a_matching_deny_always_denies(policies: list, req: ConnectionRequest) -> None:
    workload = req.dst_workload
    deny = policy("zz-deny", workload.namespace, action="DENY", rules=[{}])
    assert not PolicySet([*policies, deny]).evaluate(req).allowed


@settings(max_examples=300)
@given(policy_sets(), requests, policy_specs, namespaces)
def test_adding_a_deny_never_turns_deny_into_allow(policies: list, req: ConnectionRequest,
                                                   spec: dict, namespace: str) -> None:
    before = PolicySet(policies).evaluate(req)
    deny = policy("zz-deny", namespace, action="DENY", rules=spec["rules"],
                  selector=spec.get("selector"))
    after = PolicySet([*policies, deny]).evaluate(req)
    if not before.allowed:
        assert not after.allowed


@settings(max_examples=300)
@given(policy_sets(), requests, policy_specs, namespaces)
def test_adding_an_allow_never_overrides_a_deny_policy(policies: list, req: ConnectionRequest,
                                                       spec: dict, namespace: str) -> None:
    before = PolicySet(policies).evaluate(req)
    allow = policy("zz-allow", namespace, action="ALLOW", rules=spec["rules"],
                   selector=spec.get("selector"))
    after = PolicySet([*policies, allow]).evaluate(req)
    if before.action is PolicyAction.DENY:
        assert not after.allowed and after.policy == before.policy


@settings(max_examples=200)
@given(policy_sets(), requests)
def test_dry_run_never_changes_the_enforced_decision(policies: list,
                                                     req: ConnectionRequest) -> None:
    enforced = PolicySet(policies).evaluate(req)
    extra = [policy(f"dry{i}", p.namespace, action=p.action.value, rules=[{}], dry_run=True)
             for i, p in enumerate(policies)]
    with_dry = PolicySet([*policies, *extra]).evaluate(req)
    assert (with_dry.allowed, with_dry.policy) == (enforced.allowed, enforced.policy)


@settings(max_examples=200)
@given(policy_sets(), requests)
def test_explain_agrees_with_evaluate(policies: list, req: ConnectionRequest) -> None:
    policy_set = PolicySet(policies)
    assert policy_set.explain(req).decision == policy_set.evaluate(req)
