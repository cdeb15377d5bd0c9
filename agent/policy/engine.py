"""Pure L4 authorization engine: which policies apply to a workload, and the verdict.

Semantics (Istio AuthorizationPolicy as ztunnel enforces it at L4):

* Scope: a policy in the root namespace (default ``istio-system``) applies mesh-wide;
  any other policy applies to workloads in its own namespace. ``selector.matchLabels``
  narrows either to workloads carrying all those labels (a root-namespace policy with a
  selector matches labelled workloads in every namespace, as Istio documents).
* Order: if an enforced DENY policy matches, deny. Else, if no enforced ALLOW policy
  applies to the workload, allow. Else allow only if one of them matches.
* Matching: a policy matches if ANY of its rules matches (no rules: matches nothing;
  so ``spec: {}`` is allow-nothing and ``rules: [{}]`` is allow-all / deny-all). A rule
  matches if ALL its clauses do (its ``from``, its ``to``, each ``when``; an absent
  clause is no constraint). A clause matches if ANY entry does; an entry matches if ALL
  its fields do: a positive field if ANY value matches, a ``not*`` field if NONE does.
* Identity: principals are compared without ``spiffe://``; source namespaces and
  service accounts come from the SPIFFE ID. Plaintext (no identity) never matches
  ``principals``/``serviceAccounts``, so it always satisfies ``notPrincipals``; its
  namespace is the empty string, so it never matches ``namespaces`` and satisfies
  ``notNamespaces`` (exactly as ztunnel).
* Attributes ztunnel cannot see (methods, paths, hosts, requestPrincipals,
  remoteIpBlocks, ``when`` keys other than source.ip/namespace/principal and
  destination.ip/port; also ``trustDomains``), as istiod converts them for ztunnel
  (``handleRule`` in istio pilot/pkg/serviceregistry/ambient/authorization.go) and
  ztunnel evaluates the result (``Authorization::matches`` in ztunnel src/rbac.rs):
  in an ALLOW policy a rule using any of them never matches (more restrictive). In a
  DENY policy they are dropped; a ``from``/``to`` entry left with no L4 field is an
  empty match, which ztunnel *skips* (it matches nothing), and a non-L4 ``when`` makes
  the whole rule unmatchable. So ``DENY to: [{operation: {methods: [GET]}}]`` has no
  effect at L4, while ``{methods: [GET], ports: ["80"]}`` denies all of port 80.
* Principals are compared with the peer's SPIFFE ID without ``spiffe://``
  (``StringMatch::matches_principal``): a principal written with ``spiffe://`` never
  matches (and a ``notPrincipals`` one excludes nobody), exactly as in ztunnel.
* Dry-run (``istio.io/dry-run``, Go ``strconv.ParseBool`` true): evaluated and
  reported on the decision, never enforced (ztunnel ``assert_rbac``).
* Fail-closed stand-ins (``stands_in_for`` set) are ordinary DENY-all or
  allow-nothing policies; the loader puts them where a document could not be used.

Nothing here does I/O; :class:`PolicySet` is immutable and safe to share across threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.policy.model import (
    DEFAULT_ROOT_NAMESPACE,
    AuthorizationPolicy,
    Condition,
    ConnectionRequest,
    Decision,
    DryRunMatch,
    IPAddress,
    OperationMatch,
    PolicyAction,
    Rule,
    ServiceAccountMatch,
    SourceIdentity,
    SourceMatch,
    StringMatch,
    WorkloadRef,
)

# A matcher returns None when it matches, else why not (a short text only when verbose).
Mismatch = str | None
_TERSE = "no match"


def _values(values: Iterable[Any]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


def _check_field(
    name: str,
    negated_name: str,
    positives: Sequence[Any],
    negatives: Sequence[Any],
    predicate: Callable[[Any], bool],
    shown_value: Callable[[], str],
    verbose: bool,
) -> Mismatch:
    """Istio's field rule: some positive value matches (if any given) and no negative one."""
    if positives and not any(predicate(p) for p in positives):
        return f"{name}: {shown_value()} not in {_values(positives)}" if verbose else _TERSE
    if negatives:
        for negative in negatives:
            if predicate(negative):
                return (f"{negated_name}: {shown_value()} matches {negative}"
                        if verbose else _TERSE)
    return None


def _principal_predicate(identity: SourceIdentity | None) -> Callable[[StringMatch], bool]:
    if identity is None:
        return lambda _match: False
    return lambda match: match.matches(identity.principal)


def _service_account_predicate(
        identity: SourceIdentity | None) -> Callable[[ServiceAccountMatch], bool]:
    if identity is None or not identity.namespace:
        return lambda _match: False
    return lambda match: (match.namespace == identity.namespace
                          and match.service_account == identity.service_account)


def _ip_predicate(address: IPAddress | None) -> Callable[[Any], bool]:
    if address is None:
        return lambda _network: False
    return lambda network: address in network


def _shown_identity(identity: SourceIdentity | None) -> str:
    return "plaintext (no identity)" if identity is None else repr(identity.principal)


def _shown_namespace(identity: SourceIdentity | None) -> str:
    if identity is None:
        return "plaintext (no namespace)"
    return repr(identity.namespace) if identity.namespace else "'' (identity has no namespace)"


def _shown_ip(address: IPAddress | None) -> str:
    return "unknown source IP" if address is None else str(address)


def source_mismatch(source: SourceMatch, request: ConnectionRequest,
                    identity: SourceIdentity | None, verbose: bool = False) -> Mismatch:
    """Why ``source`` (one ``from`` entry) does not match, or None if it does."""
    namespace = identity.namespace if identity is not None else ""
    checks: tuple[tuple[str, str, Sequence[Any], Sequence[Any], Callable[[Any], bool],
                        Callable[[], str]], ...] = (
        ("principals", "notPrincipals", source.principals, source.not_principals,
         _principal_predicate(identity), lambda: _shown_identity(identity)),
        ("serviceAccounts", "notServiceAccounts", source.service_accounts,
         source.not_service_accounts, _service_account_predicate(identity),
         lambda: _shown_identity(identity)),
        ("namespaces", "notNamespaces", source.namespaces, source.not_namespaces,
         lambda match: match.matches(namespace), lambda: _shown_namespace(identity)),
        ("ipBlocks", "notIpBlocks", source.ip_blocks, source.not_ip_blocks,
         _ip_predicate(request.src_ip), lambda: _shown_ip(request.src_ip)),
    )
    for name, negated, positives, negatives, predicate, shown in checks:
        mismatch = _check_field(name, negated, positives, negatives, predicate, shown, verbose)
        if mismatch is not None:
            return mismatch
    return None


def operation_mismatch(operation: OperationMatch, request: ConnectionRequest,
                       verbose: bool = False) -> Mismatch:
    """Why ``operation`` (one ``to`` entry) does not match, or None if it does."""
    return _check_field("ports", "notPorts", operation.ports, operation.not_ports,
                        lambda port: port == request.dst_port,
                        lambda: f"port {request.dst_port}", verbose)


def condition_mismatch(condition: Condition, request: ConnectionRequest,
                       identity: SourceIdentity | None, verbose: bool = False) -> Mismatch:
    """Why an L4 ``when`` condition does not hold, or None if it does."""
    key = condition.key
    predicate: Callable[[Any], bool]
    shown: Callable[[], str]
    if key == "source.ip":
        predicate, shown = _ip_predicate(request.src_ip), lambda: _shown_ip(request.src_ip)
    elif key == "destination.ip":
        predicate, shown = _ip_predicate(request.dst_ip), lambda: str(request.dst_ip)
    elif key == "destination.port":
        predicate = lambda port: port == request.dst_port  # noqa: E731
        shown = lambda: f"port {request.dst_port}"  # noqa: E731
    elif key == "source.principal":
        predicate, shown = _principal_predicate(identity), lambda: _shown_identity(identity)
    elif key == "source.namespace":
        namespace = identity.namespace if identity is not None else ""
        predicate = lambda match: match.matches(namespace)  # noqa: E731
        shown = lambda: _shown_namespace(identity)  # noqa: E731
    else:  # pragma: no cover - the loader only builds L4 keys into evaluated conditions
        raise ValueError(f"condition key {key!r} cannot be evaluated at L4")
    return _check_field(f"when[{key}].values", f"when[{key}].notValues", condition.values,
                        condition.not_values, predicate, shown, verbose)


def rule_mismatch(rule: Rule, action: PolicyAction, request: ConnectionRequest,
                  identity: SourceIdentity | None, verbose: bool = False) -> Mismatch:
    """Why ``rule`` does not match at L4, or None.

    Follows the form istiod converts a rule into for ztunnel
    (``handleRule`` in istio pilot/pkg/serviceregistry/ambient/authorization.go) and
    how ztunnel evaluates it (``Authorization::matches`` in ztunnel src/rbac.rs):

    * ALLOW: a rule using any attribute ztunnel cannot see is dropped (never matches).
    * DENY: those attributes are removed. A ``from``/``to`` entry left with no L4
      field becomes an empty ``Match``, which ztunnel *skips* (it matches nothing, it
      does not match everything); a non-L4 ``when`` becomes a clause holding only an
      empty ``Match``, so the whole rule can never match.
    """
    unsupported = rule.unsupported_fields
    if action is PolicyAction.ALLOW and unsupported:
        return (f"uses attributes ztunnel cannot enforce {_values(unsupported)}: an ALLOW "
                "rule using them never matches at L4" if verbose else _TERSE)
    for condition in rule.conditions:
        if not condition.is_l4:
            return (f"when[{condition.key}] cannot be evaluated at L4: istiod sends an "
                    "empty match for it, which ztunnel skips, so this DENY rule never "
                    "matches" if verbose else _TERSE)
    if rule.operations is not None:
        reasons = []
        for index, operation in enumerate(rule.operations):
            if not operation.has_l4:
                reasons.append(f"to[{index}]: only HTTP attributes "
                               f"{_values(operation.unsupported_fields)}: skipped at L4")
                continue
            mismatch = operation_mismatch(operation, request, verbose)
            if mismatch is None:
                break
            reasons.append(f"to[{index}]: {mismatch}")
        else:
            return "; ".join(reasons) if verbose else _TERSE
    if rule.sources is not None:
        reasons = []
        for index, source in enumerate(rule.sources):
            if not source.has_l4:
                reasons.append(f"from[{index}]: only attributes ztunnel cannot enforce "
                               f"{_values(source.unsupported_fields)}: skipped at L4")
                continue
            mismatch = source_mismatch(source, request, identity, verbose)
            if mismatch is None:
                break
            reasons.append(f"from[{index}]: {mismatch}")
        else:
            return "; ".join(reasons) if verbose else _TERSE
    for condition in rule.conditions:
        mismatch = condition_mismatch(condition, request, identity, verbose)
        if mismatch is not None:
            return mismatch
    return None


@dataclass(frozen=True)
class RuleResult:
    """How one rule fared: ``detail`` says why it did not match (empty when it did)."""

    index: int
    matched: bool
    detail: str = ""


@dataclass(frozen=True)
class PolicyResult:
    """One policy that applies to the workload, and how its rules fared."""

    policy: AuthorizationPolicy
    scope: str
    rules: tuple[RuleResult, ...]

    @property
    def matched_rule(self) -> int | None:
        for result in self.rules:
            if result.matched:
                return result.index
        return None

    @property
    def matched(self) -> bool:
        return self.matched_rule is not None


@dataclass(frozen=True)
class Evaluation:
    """Everything :func:`agent.policy.explain.explain` shows: per-policy results + verdict."""

    request: ConnectionRequest
    root_namespace: str
    results: tuple[PolicyResult, ...]
    decision: Decision


FAIL_CLOSED_NAME = "meshagent-fail-closed"


def deny_all_stand_in(reason: str, namespace: str, name: str = FAIL_CLOSED_NAME,
                      selector: Mapping[str, str] | None = None,
                      origin: str = "") -> AuthorizationPolicy:
    """A DENY policy with one empty rule (deny-all) standing in for something that
    could not be read; scoped to ``namespace`` (+ ``selector``)."""
    return AuthorizationPolicy(name=name, namespace=namespace, action=PolicyAction.DENY,
                               selector=selector, rules=(Rule(),), origin=origin,
                               stands_in_for=reason)


def policy_applies(policy: AuthorizationPolicy, workload: WorkloadRef,
                   root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> bool:
    """Whether ``policy``'s scope (namespace + selector) covers ``workload``."""
    if policy.namespace != root_namespace and policy.namespace != workload.namespace:
        return False
    if policy.selector is None:
        return True
    return all(workload.labels.get(k) == v for k, v in policy.selector.items())


def describe_scope(policy: AuthorizationPolicy, root_namespace: str) -> str:
    where = ("mesh-wide (root namespace)" if policy.namespace == root_namespace
             else f"namespace {policy.namespace}")
    if policy.selector is None:
        return where
    labels = ",".join(f"{k}={v}" for k, v in sorted(policy.selector.items()))
    return f"{where}, selector {labels or '(empty: every workload)'}"


def _first_matching_rule(policy: AuthorizationPolicy, request: ConnectionRequest,
                         identity: SourceIdentity | None) -> int | None:
    for index, rule in enumerate(policy.rules):
        if rule_mismatch(rule, policy.action, request, identity) is None:
            return index
    return None


def _verdict(policies: Sequence[AuthorizationPolicy],
             matched: Mapping[str, int | None]) -> Decision:
    """Istio's order over already-matched policies (all treated as enforced)."""
    for policy in policies:
        if policy.action is PolicyAction.DENY and matched[policy.key] is not None:
            rule = matched[policy.key]
            if policy.stands_in_for:
                return Decision(False, policy.key, PolicyAction.DENY,
                                f"denied: fail closed ({policy.stands_in_for})", rule)
            return Decision(False, policy.key, PolicyAction.DENY,
                            f"denied by DENY policy {policy.key} rule {rule}", rule)
    allows = [p for p in policies if p.action is PolicyAction.ALLOW]
    if not allows:
        return Decision(True, None, None, "allowed: no ALLOW policy applies to the workload")
    for policy in allows:
        rule = matched[policy.key]
        if rule is not None:
            return Decision(True, policy.key, PolicyAction.ALLOW,
                            f"allowed by ALLOW policy {policy.key} rule {rule}", rule)
    names = ", ".join(p.key for p in allows)
    return Decision(False, None, None,
                    f"denied: {len(allows)} ALLOW policy(ies) apply ({names}) and none matched")


class PolicySet:
    """An immutable, validated set of policies; :meth:`evaluate` is the hot path."""

    __slots__ = ("_by_namespace", "_policies", "_root_namespace")

    def __init__(self, policies: Iterable[AuthorizationPolicy] = (),
                 root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> None:
        ordered = sorted(policies, key=lambda p: (p.namespace != root_namespace,
                                                  p.namespace, p.name))
        keys = [p.key for p in ordered]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError(f"duplicate policies: {', '.join(duplicates)}")
        by_namespace: dict[str, list[AuthorizationPolicy]] = {}
        for policy in ordered:
            by_namespace.setdefault(policy.namespace, []).append(policy)
        self._policies: tuple[AuthorizationPolicy, ...] = tuple(ordered)
        self._by_namespace = {ns: tuple(ps) for ns, ps in by_namespace.items()}
        self._root_namespace = root_namespace

    @classmethod
    def empty(cls, root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> PolicySet:
        return cls((), root_namespace)

    @classmethod
    def fail_closed(cls, reason: str,
                    root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> PolicySet:
        """A set that denies every connection (one mesh-wide DENY-all stand-in):
        what is in force while the policy files have not been read successfully."""
        return cls((deny_all_stand_in(reason, root_namespace),), root_namespace)

    @property
    def policies(self) -> tuple[AuthorizationPolicy, ...]:
        return self._policies

    @property
    def root_namespace(self) -> str:
        return self._root_namespace

    def __len__(self) -> int:
        return len(self._policies)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, PolicySet) and self._policies == other._policies
                and self._root_namespace == other._root_namespace)

    def __hash__(self) -> int:
        return hash((self._policies, self._root_namespace))

    def __repr__(self) -> str:
        return (f"PolicySet({len(self._policies)} policies, "
                f"root_namespace={self._root_namespace!r})")

    def with_policies(self, *policies: AuthorizationPolicy) -> PolicySet:
        """A new set with ``policies`` added (replacing any with the same key)."""
        replaced = {p.key for p in policies}
        kept = [p for p in self._policies if p.key not in replaced]
        return PolicySet([*kept, *policies], self._root_namespace)

    def applicable(self, workload: WorkloadRef) -> tuple[AuthorizationPolicy, ...]:
        """Policies (enforced and dry-run) whose scope covers ``workload``."""
        candidates = self._by_namespace.get(self._root_namespace, ())
        if workload.namespace != self._root_namespace:
            candidates = candidates + self._by_namespace.get(workload.namespace, ())
        return tuple(p for p in candidates
                     if policy_applies(p, workload, self._root_namespace))

    def evaluate(self, request: ConnectionRequest) -> Decision:
        """The verdict for ``request`` (dry-run policies reported, not enforced)."""
        applicable = self.applicable(request.dst_workload)
        if not applicable:
            return Decision(True, None, None, "allowed: no policy applies to the workload")
        identity = request.identity
        matched = {p.key: _first_matching_rule(p, request, identity) for p in applicable}
        return self._decide(applicable, matched)

    def explain(self, request: ConnectionRequest) -> Evaluation:
        """Like :meth:`evaluate`, keeping why each rule of each applicable policy fared."""
        applicable = self.applicable(request.dst_workload)
        identity = request.identity
        results = []
        for policy in applicable:
            rule_results = []
            for index, rule in enumerate(policy.rules):
                mismatch = rule_mismatch(rule, policy.action, request, identity, verbose=True)
                rule_results.append(RuleResult(index, mismatch is None, mismatch or ""))
            results.append(PolicyResult(policy, describe_scope(policy, self._root_namespace),
                                        tuple(rule_results)))
        matched = {r.policy.key: r.matched_rule for r in results}
        decision = (self._decide(applicable, matched) if applicable else
                    Decision(True, None, None, "allowed: no policy applies to the workload"))
        return Evaluation(request, self._root_namespace, tuple(results), decision)

    @staticmethod
    def _decide(applicable: Sequence[AuthorizationPolicy],
                matched: Mapping[str, int | None]) -> Decision:
        enforced = [p for p in applicable if not p.dry_run]
        decision = _verdict(enforced, matched)
        dry_runs = [p for p in applicable if p.dry_run]
        if not dry_runs:
            return decision
        dry_run_matches = tuple(
            DryRunMatch(p.key, p.action, rule)
            for p in dry_runs if (rule := matched[p.key]) is not None
        )
        would_be = _verdict(applicable, matched)
        return Decision(decision.allowed, decision.policy, decision.action, decision.reason,
                        decision.rule_index, dry_run_matches, would_be.allowed)
