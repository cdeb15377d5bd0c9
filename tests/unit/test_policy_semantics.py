"""The policy semantics table: ztunnel's expected decisions, case by case, with sources.

Every row is an Istio ``AuthorizationPolicy`` as a user writes it, taken through the
loader (istiod's conversion for ztunnel) and the engine (ztunnel's evaluation), and the
decision ztunnel makes for the same connection. Each row cites what it follows:

* ``rbac.rs::<test>``: the test of that name in istio/ztunnel ``src/rbac.rs`` (its
  connections are reproduced exactly: ``PLAIN``, ``TLS``, ``TLS_ALT`` below);
* ``state.rs::<test>``: istio/ztunnel ``src/state.rs`` (``assert_rbac`` order);
* ``authorization.go::<func>``: istio/istio
  ``pilot/pkg/serviceregistry/ambient/authorization.go`` (istiod's conversion);
* ``workloads.go::buildWorkloadPolicies``: the same directory, which policies a
  workload gets;
* ``validation.go::<func>``: istio/istio ``pkg/config/validation/validation.go``.

A row whose ``deviation`` is set is one place meshagent decides differently from
ztunnel on purpose (never wider); the text says what ztunnel does and why.
docs/policy.md renders the same cases as a table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.policy import (
    ConnectionRequest,
    DocumentOutcome,
    PolicySet,
    WorkloadRef,
    judge_document,
)

ROOT = "istio-system"
# The destination of rbac.rs's connections: ztunnel's tests call Authorization::matches
# directly; here the policy is in the workload's namespace ("namespace").
DEST = WorkloadRef("dest", "namespace", {"app": "dest"})
OTHER_NS_DEST = WorkloadRef("dest2", "ns2", {"app": "dest"})


def conn(identity: str | None, src: str, dst: str, port: int,
         workload: WorkloadRef = DEST) -> ConnectionRequest:
    return ConnectionRequest(ip_address(src), identity, ip_address(dst), port, workload)


# rbac.rs tests::plaintext_conn / tls_conn / tls_conn_alt.
# (ztunnel writes the alt service account "sa=alt"; our SPIFFE parser follows the
# SPIFFE spec, which has no "=" in path segments, so it is "sa-alt" here.)
PLAIN = conn(None, "127.0.0.1", "127.0.0.2", 8080)
TLS = conn("spiffe://td/ns/namespace/sa/account", "127.0.0.1", "127.0.0.2", 8080)
TLS_ALT = conn("spiffe://td-alt/ns/ns-alt/sa/sa-alt", "127.0.0.3", "127.0.0.4", 9090)


def from_ns(namespace: str, port: int = 8080) -> ConnectionRequest:
    return conn(f"spiffe://td/ns/{namespace}/sa/account", "127.0.0.1", "127.0.0.2", port)


def sa_conn(account: str, workload: WorkloadRef = DEST) -> ConnectionRequest:
    return conn(f"spiffe://cluster.local/ns/default/sa/{account}", "127.0.0.1",
                "127.0.0.2", 8080, workload)


def doc(rules: Any = ..., *, action: str | None = None, name: str = "p",
        namespace: str = "namespace", selector: dict[str, str] | None = None,
        dry_run: str | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = dict(spec)
    if action is not None:
        body["action"] = action
    if selector is not None:
        body["selector"] = {"matchLabels": selector}
    if rules is not ...:
        body["rules"] = rules
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if dry_run is not None:
        metadata["annotations"] = {"istio.io/dry-run": dry_run}
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": metadata, "spec": body}


def source(**fields: Any) -> list[dict[str, Any]]:
    return [{"from": [{"source": fields}]}]


def operation(**fields: Any) -> list[dict[str, Any]]:
    return [{"to": [{"operation": fields}]}]


def when(key: str, values: list[str] | None = None,
         not_values: list[str] | None = None) -> list[dict[str, Any]]:
    condition: dict[str, Any] = {"key": key}
    if values:
        condition["values"] = values
    if not_values:
        condition["notValues"] = not_values
    return [{"when": [condition]}]


@dataclass(frozen=True)
class Case:
    name: str
    cite: str
    documents: list[dict[str, Any]]
    request: ConnectionRequest
    allowed: bool
    deviation: str = ""
    dry_run_matches: tuple[str, ...] | None = None
    outcomes: tuple[DocumentOutcome, ...] | None = field(default=None)


def rbac_field(name: str, cite: str, rules: Any,
               expected: tuple[bool, bool, bool]) -> list[Case]:
    """rbac.rs's rbac_test! macro: one ALLOW policy, one match, three connections."""
    return [Case(f"{name}: {label}", f"rbac.rs::{cite}", [doc(rules)], request, want)
            for (label, request), want in zip(
                (("plaintext", PLAIN), ("tls", TLS), ("tls_alt", TLS_ALT)), expected,
                strict=True)]


CASES: list[Case] = [
    # --------------------------------------------------- rbac.rs: matching basics
    Case("rules: [] matches nothing (allow-nothing)", "rbac.rs::rbac_empty_policy "
         "(vec![] => false)", [doc([])], PLAIN, False),
    Case("rules: [{}] matches everything (allow-all)", "rbac.rs::rbac_empty_policy "
         "(vec![vec![]] => true)", [doc([{}])], PLAIN, True),
    Case("an empty match is skipped, not match-all", "rbac.rs::rbac_empty_policy "
         "(vec![vec![vec![RbacMatch::default()]]] => false); authorization.go::handleRule "
         "emits it for a DENY entry with only HTTP fields",
         [doc(operation(methods=["GET"]), action="DENY")], PLAIN, True),
    Case("from entries OR, AND with to: ns a", "rbac.rs::rbac_nesting",
         [doc([{"from": [{"source": {"namespaces": ["a"]}}, {"source": {"namespaces": ["b"]}}],
                "to": [{"operation": {"ports": ["80"]}}]}])], from_ns("a", 80), True),
    Case("from entries OR, AND with to: ns b", "rbac.rs::rbac_nesting",
         [doc([{"from": [{"source": {"namespaces": ["a"]}}, {"source": {"namespaces": ["b"]}}],
                "to": [{"operation": {"ports": ["80"]}}]}])], from_ns("b", 80), True),
    Case("from entries OR, AND with to: wrong namespace", "rbac.rs::rbac_nesting",
         [doc([{"from": [{"source": {"namespaces": ["a"]}}, {"source": {"namespaces": ["b"]}}],
                "to": [{"operation": {"ports": ["80"]}}]}])], from_ns("bad", 80), False),
    Case("from entries OR, AND with to: wrong port", "rbac.rs::rbac_nesting",
         [doc([{"from": [{"source": {"namespaces": ["a"]}}, {"source": {"namespaces": ["b"]}}],
                "to": [{"operation": {"ports": ["80"]}}]}])], from_ns("b", 12345), False),
    Case("rules OR: first", "rbac.rs::rbac_multi_rule",
         [doc([*source(namespaces=["a"]), *source(namespaces=["b"])])], from_ns("a"), True),
    Case("rules OR: second", "rbac.rs::rbac_multi_rule",
         [doc([*source(namespaces=["a"]), *source(namespaces=["b"])])], from_ns("b"), True),
    Case("rules OR: neither", "rbac.rs::rbac_multi_rule",
         [doc([*source(namespaces=["a"]), *source(namespaces=["b"])])], from_ns("bad"), False),
    *rbac_field("namespaces", "namespaces", source(namespaces=["namespace"]),
                (False, True, False)),
    *rbac_field("notNamespaces", "not_namespaces", source(notNamespaces=["namespace"]),
                (True, False, True)),
    *rbac_field("serviceAccounts", "service_accounts",
                source(serviceAccounts=["namespace/account"]), (False, True, False)),
    *rbac_field("notServiceAccounts", "not_service_accounts",
                source(notServiceAccounts=["namespace/account"]), (True, False, True)),
    *rbac_field("principals", "principals", source(principals=["td/ns/namespace/sa/account"]),
                (False, True, False)),
    *rbac_field("notPrincipals", "not_principals",
                source(notPrincipals=["td/ns/namespace/sa/account"]), (True, False, True)),
    *rbac_field("ipBlocks", "source_ips", source(ipBlocks=["127.0.0.1/32"]),
                (True, True, False)),
    *rbac_field("notIpBlocks", "not_source_ips", source(notIpBlocks=["127.0.0.1/32"]),
                (False, False, True)),
    *rbac_field("when destination.ip", "destination_ips",
                when("destination.ip", ["127.0.0.2/32"]), (True, True, False)),
    *rbac_field("when destination.ip notValues", "not_destination_ips",
                when("destination.ip", not_values=["127.0.0.2/32"]), (False, False, True)),
    *rbac_field("destination.ip /24 with host bits", "cidr_range",
                when("destination.ip", ["127.0.0.1/24"]), (True, True, True)),
    *rbac_field("ports", "destination_ports", operation(ports=["8080"]), (True, True, False)),
    *rbac_field("notPorts", "not_destination_ports", operation(notPorts=["8080"]),
                (False, False, True)),
    # ------------------------------------------ rbac.rs: string_match (via namespaces)
    Case("exact match", "rbac.rs::string_match (exact match)",
         [doc(source(namespaces=["foo"]))], from_ns("foo"), True),
    Case("exact mismatch", "rbac.rs::string_match (exact mismatch)",
         [doc(source(namespaces=["foo"]))], from_ns("not"), False),
    Case("exact vs empty (plaintext has namespace '')",
         "rbac.rs::string_match (exact empty mismatch)",
         [doc(source(namespaces=["foo"]))], PLAIN, False),
    Case("prefix match", "rbac.rs::string_match (prefix match)",
         [doc(source(namespaces=["foo*"]))], from_ns("foobar"), True),
    Case("prefix mismatch", "rbac.rs::string_match (prefix mismatch)",
         [doc(source(namespaces=["foo*"]))], from_ns("notfoo"), False),
    Case("suffix match", "rbac.rs::string_match (suffix match)",
         [doc(source(namespaces=["*foo"]))], from_ns("barfoo"), True),
    Case("suffix mismatch", "rbac.rs::string_match (suffix mismatch)",
         [doc(source(namespaces=["*foo"]))], from_ns("foonot"), False),
    Case("presence match", "rbac.rs::string_match (presence match)",
         [doc(source(namespaces=["*"]))], from_ns("foo"), True),
    Case("presence vs empty", "rbac.rs::string_match (presence mismatch)",
         [doc(source(namespaces=["*"]))], PLAIN, False),
    Case("principal prefix is matched after spiffe:// is removed",
         "rbac.rs::StringMatch::matches_principal",
         [doc(source(principals=["td/ns/namespace/*"]))], TLS, True),
    # -------------------------------------------- state.rs: the decision order
    Case("no policy for the workload's namespace: allow",
         "state.rs::assert_rbac_logic_deny_allow (step 3)",
         [doc(source(principals=["cluster.local/ns/default/sa/defaultacct"]),
              namespace="ns1")], sa_conn("not-defaultacct", OTHER_NS_DEST), True),
    Case("a matching ALLOW allows", "state.rs::assert_rbac_logic_deny_allow (step 4)",
         [doc(source(principals=["cluster.local/ns/default/sa/defaultacct"]), name="allow",
              namespace="ns2"),
          doc(source(principals=["cluster.local/ns/default/sa/denyacct"]), name="deny",
              namespace="ns2", action="DENY"),
          doc([{}], name="wildcard-allow", namespace="ns2", dry_run="true"),
          doc([{}], name="wildcard-deny", namespace="ns2", action="DENY", dry_run="true")],
         sa_conn("defaultacct", OTHER_NS_DEST), True,
         dry_run_matches=("ns2/wildcard-deny", "ns2/wildcard-allow")),
    Case("ALLOW policies but none matches: deny",
         "state.rs::assert_rbac_logic_deny_allow (step 5, NotAllowed)",
         [doc(source(principals=["cluster.local/ns/default/sa/defaultacct"]),
              namespace="ns2")], sa_conn("not-defaultacct", OTHER_NS_DEST), False),
    Case("a matching DENY denies, whatever ALLOWs say",
         "state.rs::assert_rbac_logic_deny_allow (step 2, ExplicitlyDenied)",
         [doc([{}], name="allow", namespace="ns2"),
          doc(source(principals=["cluster.local/ns/default/sa/denyacct"]), name="deny",
              namespace="ns2", action="DENY")], sa_conn("denyacct", OTHER_NS_DEST), False),
    Case("dry-run policies are reported, never enforced",
         "state.rs::assert_rbac_dry_run_with_real_policies",
         [doc(source(principals=["cluster.local/ns/default/sa/denyacct"]), name="real-deny",
              action="DENY"),
          doc([*source(principals=["cluster.local/ns/default/sa/defaultacct"]),
               *source(principals=["cluster.local/ns/default/sa/denyacct"])],
              name="dry-run-deny", action="DENY", dry_run="true"),
          doc(source(principals=["cluster.local/ns/default/sa/defaultacct"]),
              name="real-allow"),
          doc(source(principals=["cluster.local/ns/default/sa/defaultacct"]),
              name="dry-run-allow", dry_run="true")],
         sa_conn("defaultacct"), True,
         dry_run_matches=("namespace/dry-run-allow", "namespace/dry-run-deny")),
    Case("dry-run value parsed as Go's ParseBool ('True')",
         "authorization.go::convertAuthorizationPolicy (strconv.ParseBool)",
         [doc([{}], action="DENY", dry_run="True")], TLS, True),
    Case("dry-run value '0' enforces", "authorization.go::convertAuthorizationPolicy",
         [doc([{}], action="DENY", dry_run="0")], TLS, False),
    # ------------------------------------------------------- scope (which policies)
    Case("root namespace policy applies mesh-wide",
         "authorization.go::convertAuthorizationPolicy (Scope_GLOBAL)",
         [doc([], namespace=ROOT)], TLS_ALT, False),
    Case("namespace policy does not apply elsewhere",
         "authorization.go::convertAuthorizationPolicy (Scope_NAMESPACE)",
         [doc([], namespace="elsewhere")], TLS, True),
    Case("selector selects by labels", "workloads.go::buildWorkloadPolicies",
         [doc([], selector={"app": "dest"})], TLS, False),
    Case("selector that does not match", "workloads.go::buildWorkloadPolicies",
         [doc([], selector={"app": "other"})], TLS, True),
    Case("root-namespace selector applies in every namespace",
         "workloads.go::buildWorkloadPolicies (nsMatch: root or own namespace)",
         [doc([], namespace=ROOT, selector={"app": "dest"})], TLS, False),
    # ------------------------------------ istiod: attributes ztunnel cannot see
    Case("ALLOW rule with methods is omitted", "authorization.go::handleRule "
         "(ALLOW && l7RuleFound => rules = nil)",
         [doc(operation(ports=["8080"], methods=["GET"]))], TLS, False),
    Case("ALLOW: only the HTTP rule is omitted", "authorization.go::handleRule",
         [doc([*operation(paths=["/x"]), {}])], TLS, True),
    Case("ALLOW rule with requestPrincipals is omitted", "authorization.go::httpSources",
         [doc(source(namespaces=["namespace"], requestPrincipals=["*"]))], TLS, False),
    Case("ALLOW rule with an HTTP when is omitted", "authorization.go::handleRule "
         "(l4WhenAttributes)",
         [doc(when("request.headers[x-user]", ["a"]))], TLS, False),
    Case("ALLOW rule with when source.serviceAccount is omitted (not an L4 key for istiod)",
         "authorization.go::l4WhenAttributes",
         [doc(when("source.serviceAccount", ["namespace/account"]))], TLS, False),
    Case("DENY with only methods has no effect", "authorization.go::hasEffectiveRules "
         "(httpDenyNoEffectBoilerplate); rbac.rs::Authorization::matches (empty match "
         "skipped)", [doc(operation(methods=["DELETE"]), action="DENY")], TLS, True),
    Case("DENY with methods + ports is enforced on the port (more restrictive)",
         "authorization.go::handleRule (httpDenyMixedBoilerplate)",
         [doc(operation(methods=["GET"], ports=["8080"]), action="DENY")], TLS, False),
    Case("DENY with methods + ports leaves other ports alone", "authorization.go::handleRule",
         [doc(operation(methods=["GET"], ports=["8080"]), action="DENY")], TLS_ALT, True),
    Case("DENY: an emptied to entry is skipped, the other entry still applies",
         "authorization.go::isMatchEmpty; rbac.rs::Authorization::matches",
         [doc([{"to": [{"operation": {"methods": ["GET"]}},
                       {"operation": {"ports": ["9090"]}}]}], action="DENY")], TLS, True),
    Case("DENY: ... and denies its own port",
         "authorization.go::isMatchEmpty; rbac.rs::Authorization::matches",
         [doc([{"to": [{"operation": {"methods": ["GET"]}},
                       {"operation": {"ports": ["9090"]}}]}], action="DENY")], TLS_ALT, False),
    Case("DENY notRequestPrincipals ['*'] (require JWT) has no effect at L4",
         "authorization.go::httpSources; hasEffectiveRules",
         [doc(source(notRequestPrincipals=["*"]), action="DENY")], PLAIN, True),
    Case("DENY: HTTP field dropped from a source with L4 fields",
         "authorization.go::handleRule",
         [doc(source(namespaces=["namespace"], requestPrincipals=["*"]), action="DENY")],
         TLS, False),
    Case("DENY rule with an HTTP when never matches, even with an L4 from",
         "authorization.go::handleRule (when => one clause with an empty match); "
         "rbac.rs::Authorization::matches",
         [doc([{"from": [{"source": {"namespaces": ["namespace"]}}],
                "when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]}],
              action="DENY")], TLS, True),
    Case("DENY with trustDomains next to namespaces: trustDomains dropped",
         "authorization.go::handleRule (Source.TrustDomains is not converted)",
         [doc(source(namespaces=["namespace"], trustDomains=["other.example"]),
              action="DENY")], TLS, False),
    Case("ALLOW with trustDomains next to namespaces never matches",
         "authorization.go::handleRule",
         [doc(source(namespaces=["namespace"], trustDomains=["other.example"]))], TLS, False,
         deviation="istiod drops trustDomains silently, so ztunnel would ALLOW any trust "
                   "domain from that namespace (wider than written); meshagent treats it "
                   "like an HTTP attribute: the ALLOW rule never matches"),
    # ---------------------------------------------- principals written with spiffe://
    Case("ALLOW principal with spiffe:// never matches",
         "rbac.rs::StringMatch::matches_principal; authorization.go::stringToMatch "
         "(no prefix stripping)",
         [doc(source(principals=["spiffe://td/ns/namespace/sa/account"]))], TLS, False),
    Case("DENY principal with spiffe:// never matches",
         "rbac.rs::StringMatch::matches_principal",
         [doc(source(principals=["spiffe://td/ns/namespace/sa/account"]), action="DENY")],
         TLS, True),
    Case("ALLOW notPrincipals with spiffe:// excludes nobody",
         "rbac.rs::StringMatch::matches_principal",
         [doc(source(notPrincipals=["spiffe://td/ns/namespace/sa/account"]))], TLS, True),
    Case("DENY notPrincipals ['*'] denies plaintext (require mTLS)",
         "rbac.rs::not_principals; istio docs (deny-plaintext)",
         [doc(source(notPrincipals=["*"]), action="DENY", namespace=ROOT)], PLAIN, False),
    # ------------------------------------------ documents istiod never sends to ztunnel
    Case("AUDIT is ignored", "authorization.go::convertAuthorizationPolicy (UnsupportedValue)",
         [doc([{}], action="AUDIT"), doc([], name="allow-nothing-in-other-ns",
                                         namespace="other")], TLS, True,
         outcomes=(DocumentOutcome.IGNORED, DocumentOutcome.ACCEPTED)),
    Case("CUSTOM is ignored", "authorization.go::convertAuthorizationPolicy",
         [doc([{}], action="CUSTOM", provider={"name": "ext-authz"})], TLS, True,
         outcomes=(DocumentOutcome.IGNORED,)),
    Case("targetRefs (waypoint) DENY-all is ignored",
         "authorization.go::convertAuthorizationPolicy ('TargetRef is not intended for "
         "ztunnel')",
         [doc([{}], action="DENY",
              targetRefs=[{"kind": "Service", "group": "", "name": "dest"}])], TLS, True,
         outcomes=(DocumentOutcome.IGNORED,)),
    Case("DENY without rules is ignored (matches nothing)",
         "validation.go::ValidateAuthorizationPolicy ('DENY action without rules is "
         "meaningless')", [doc(action="DENY")], TLS, True,
         outcomes=(DocumentOutcome.IGNORED,)),
    # ----------------------- meshagent only: invalid documents fail closed (no istiod analogue)
    Case("an invalid DENY denies its whole namespace",
         "validation.go::ValidateAuthorizationPolicy (the webhook would reject it)",
         [doc(source(ipBlocks=["10.0.0.300/8"]), action="DENY")], TLS_ALT, False,
         outcomes=(DocumentOutcome.FAIL_CLOSED,),
         deviation="ztunnel never sees a policy the webhook rejects; in a directory there is "
                   "no webhook, so the document fails closed instead of vanishing"),
    Case("an invalid ALLOW is allow-nothing for its scope",
         "validation.go::ValidateAuthorizationPolicy",
         [doc(source(ipBlocks=["bad"]), name="bad"), doc([{}], name="allow-all")], TLS, True,
         outcomes=(DocumentOutcome.FAIL_CLOSED, DocumentOutcome.ACCEPTED),
         deviation="as above; an allow-nothing ALLOW lets through only what the other "
                   "ALLOW policies allow"),
    Case("an unusual dry-run value fails closed",
         "validation.go::checkDryRunAnnotation",
         [doc([{}], dry_run="yes")], TLS, False, outcomes=(DocumentOutcome.FAIL_CLOSED,),
         deviation="istiod's converter would log and enforce the ALLOW as written, which "
                   "can widen access next to other ALLOWs; it is made allow-nothing"),
]


def evaluate(case: Case) -> tuple[PolicySet, list[DocumentOutcome]]:
    results = [judge_document(document, "table.yaml", index, ROOT)
               for index, document in enumerate(case.documents, start=1)]
    return (PolicySet([r.policy for r in results if r.policy is not None], ROOT),
            [r.outcome for r in results])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_semantics_table(case: Case) -> None:
    assert case.cite
    policies, outcomes = evaluate(case)
    decision = policies.evaluate(case.request)
    assert decision.allowed is case.allowed, (case.cite, decision.reason)
    if case.dry_run_matches is not None:
        assert sorted(m.policy for m in decision.dry_run_matches) == sorted(
            case.dry_run_matches)
    if case.outcomes is not None:
        assert tuple(outcomes) == case.outcomes
    else:
        assert DocumentOutcome.FAIL_CLOSED not in outcomes


def test_table_names_are_unique() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))


# ----------------------------------------------------- fail closed is never wider

namespaces = st.sampled_from(["namespace", "ns2", ROOT])
sources = st.fixed_dictionaries({}, optional={
    "namespaces": st.lists(st.sampled_from(["namespace", "ns-alt", "ns2"]), min_size=1,
                           max_size=2),
    "notPrincipals": st.just(["*"]),
    "ipBlocks": st.sampled_from([["127.0.0.0/24"], ["127.0.0.3"]]),
}).filter(bool)
rules = st.lists(st.fixed_dictionaries({}, optional={
    "from": st.lists(sources.map(lambda s: {"source": s}), min_size=1, max_size=2),
    "to": st.sampled_from([[{"operation": {"ports": ["8080"]}}],
                           [{"operation": {"notPorts": ["9090"]}}]]),
}), max_size=2)
documents = st.builds(
    lambda action, rules_, namespace, selector, name: doc(
        rules_, action=action, namespace=namespace, selector=selector, name=name),
    st.sampled_from(["ALLOW", "DENY"]), rules, namespaces,
    st.sampled_from([None, {"app": "dest"}, {"app": "other"}]),
    st.sampled_from(["a", "b", "c"]))
requests = st.sampled_from([
    PLAIN, TLS, TLS_ALT, from_ns("ns2"),
    conn("spiffe://td/ns/ns2/sa/x", "127.0.0.3", "127.0.0.9", 8080, OTHER_NS_DEST)])


def corrupt(document: dict[str, Any], how: str) -> dict[str, Any]:
    broken = {**document, "metadata": dict(document["metadata"]),
              "spec": dict(document["spec"])}
    if how == "unknown-field":
        broken["spec"]["rulez"] = []
    elif how == "bad-selector":
        broken["spec"]["selector"] = {"matchLabels": ["not", "a", "mapping"]}
        broken["spec"]["rulez"] = []
    elif how == "no-namespace":
        del broken["metadata"]["namespace"]
    elif how == "bad-action":
        broken["spec"]["action"] = "DENNY"
    return broken


@settings(max_examples=300, deadline=None)
@given(document=documents, others=st.lists(documents, max_size=3), request=requests,
       how=st.sampled_from(["unknown-field", "bad-selector", "no-namespace", "bad-action"]))
def test_a_document_that_fails_closed_never_widens_access(
        document: dict[str, Any], others: list[dict[str, Any]], request: ConnectionRequest,
        how: str) -> None:
    """Whatever the broken document meant, the stand-in allows no more than it would."""
    named = [{**o, "metadata": {**o["metadata"], "name": f"other-{i}"}}
             for i, o in enumerate(others)]
    base = [r.policy for i, o in enumerate(named)
            if (r := judge_document(o, "o.yaml", i + 1, ROOT)).policy is not None]
    intended = judge_document(document, "d.yaml", 1, ROOT)
    stand_in = judge_document(corrupt(document, how), "d.yaml", 1, ROOT)
    assert stand_in.outcome is DocumentOutcome.FAIL_CLOSED and stand_in.policy is not None
    meant = [] if intended.policy is None else [intended.policy]  # ignored: no policy
    if PolicySet([*base, stand_in.policy], ROOT).evaluate(request).allowed:
        assert PolicySet([*base, *meant], ROOT).evaluate(request).allowed
