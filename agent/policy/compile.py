"""Compile a loaded :class:`~agent.policy.engine.PolicySet` into the rule set the native
datapath evaluates (``agent/tunnel/native/src/policy.rs``).

This is the split istiod and ztunnel have: istiod converts ``AuthorizationPolicy`` for
ztunnel (``convertAuthorizationPolicy``/``handleRule`` in istio
``pilot/pkg/serviceregistry/ambient/authorization.go``) into ``Authorization{rules:
[[[Match]]]}`` (``pkg/workloadapi/security/authorization.proto``), and ztunnel only
evaluates that (``Authorization::matches`` in ztunnel ``src/rbac.rs``). Here the loader
is istiod's half (judgement, fail-closed stand-ins), this module writes its result
down, and the datapath evaluates it.

What the compiled form is (docs/policy.md, "The compiled form"):

* ``{"format": "meshagent.policy.compiled", "version": 1, "policies": [...]}``; the
  policies in the engine's evaluation order (root namespace first, then by namespace
  and name), which is the order that names the deciding policy.
* A policy: ``key`` (``namespace/name``), ``namespace``, ``mesh_wide`` (it is in the
  root namespace), ``selector`` (labels or null), ``action``, ``dry_run``,
  ``fail_closed`` (the reason when it is a loader stand-in, else null), ``rules``.
* A rule: ``{"clauses": [clause, ...]}`` (AND; no clauses: matches everything) or
  ``{"unmatchable": "why"}`` (a rule ztunnel can never match: an ALLOW rule with
  attributes it cannot see, a DENY rule with a non-L4 ``when`` or a clause left with
  only skipped entries). Rules keep their positions, so rule indexes are the
  document's.
* A clause: a non-empty list of matches (OR). A match: a non-empty object of the
  fields of ztunnel's ``RbacMatch`` that are set (AND; a positive field matches if any
  value does, a ``not_*`` field if none does): ``principals``, ``namespaces``
  (string matches ``{"kind": "exact"|"prefix"|"suffix"|"presence", "value": ...}``),
  ``service_accounts`` (``{"namespace", "service_account"}``), ``source_ips``,
  ``destination_ips`` (CIDRs, network address and prefix length),
  ``destination_ports`` (integers), each with its ``not_`` form.

Unlike ztunnel's form there is nothing empty to skip: what istiod leaves as an empty
``Match`` (an entry with only HTTP attributes, skipped by ``mg.is_empty() =>
continue`` in rbac.rs) is left out of its clause here, and a clause with nothing left
makes the rule ``unmatchable``. So the evaluator never has to know the "empty means
skip" rule, and an empty list it receives is an error, not "no constraint".

The compiled set is never wider than the engine's: the differential tables
(``tests/unit/test_policy_fixtures.py``, ``agent/tunnel/native/tests/policy_tables.rs``)
run the same cases through both. Pure: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from agent.policy.engine import PolicySet
from agent.policy.model import (
    AuthorizationPolicy,
    Condition,
    OperationMatch,
    PolicyAction,
    Rule,
    ServiceAccountMatch,
    SourceMatch,
    StringMatch,
    StringMatchKind,
)

FORMAT = "meshagent.policy.compiled"
VERSION = 1

Json = dict[str, Any]

# when key -> the match field it fills, as istiod's handleRule converts each L4 key.
_CONDITION_FIELDS = {
    "source.ip": "source_ips",
    "destination.ip": "destination_ips",
    "destination.port": "destination_ports",
    "source.principal": "principals",
    "source.namespace": "namespaces",
}


def _string_match(match: StringMatch) -> Json:
    if match.kind is StringMatchKind.PRESENCE:
        return {"kind": "presence"}
    return {"kind": match.kind.value, "value": match.value}


def _service_account(match: ServiceAccountMatch) -> Json:
    return {"namespace": match.namespace, "service_account": match.service_account}


def _value(value: Any) -> Any:
    """One typed value of a match field in its JSON form."""
    if isinstance(value, StringMatch):
        return _string_match(value)
    if isinstance(value, ServiceAccountMatch):
        return _service_account(value)
    if isinstance(value, int):
        return value
    return str(value)  # ip_network: "10.0.0.0/8", "2001:db8::/32"


def _fields(pairs: Iterable[tuple[str, Iterable[Any]]]) -> Json:
    """A match object with the non-empty fields of ``pairs`` (name, values)."""
    match: Json = {}
    for name, values in pairs:
        listed = [_value(v) for v in values]
        if listed:
            match[name] = listed
    return match


def _source(source: SourceMatch) -> Json:
    return _fields((
        ("principals", source.principals), ("not_principals", source.not_principals),
        ("namespaces", source.namespaces), ("not_namespaces", source.not_namespaces),
        ("service_accounts", source.service_accounts),
        ("not_service_accounts", source.not_service_accounts),
        ("source_ips", source.ip_blocks), ("not_source_ips", source.not_ip_blocks),
    ))


def _operation(operation: OperationMatch) -> Json:
    return _fields((("destination_ports", operation.ports),
                    ("not_destination_ports", operation.not_ports)))


def _condition(condition: Condition) -> Json:
    name = _CONDITION_FIELDS[condition.key]
    return _fields(((name, condition.values), (f"not_{name}", condition.not_values)))


def compile_rule(rule: Rule, action: PolicyAction) -> Json:
    """One rule in compiled form; the same decisions as ``engine.rule_mismatch``."""
    unsupported = rule.unsupported_fields
    if action is PolicyAction.ALLOW and unsupported:
        # handleRule: ALLOW && l7RuleFound => rules = nil (the rule is dropped).
        return {"unmatchable": "an ALLOW rule using attributes ztunnel cannot enforce ("
                               + ", ".join(unsupported) + ")"}
    for condition in rule.conditions:
        if not condition.is_l4:
            # handleRule: each when is a clause; a non-L4 one holds only an empty Match.
            return {"unmatchable": f"a DENY rule with when[{condition.key}], which "
                                   "cannot be evaluated at L4"}
    clauses: list[list[Json]] = []
    # Entries without an L4 field are the empty Match ztunnel skips: left out.
    if rule.operations is not None:
        clause = [_operation(o) for o in rule.operations if o.has_l4]
        if not clause:
            return {"unmatchable": "a DENY rule whose 'to' entries have only HTTP "
                                   "attributes"}
        clauses.append(clause)
    if rule.sources is not None:
        clause = [_source(s) for s in rule.sources if s.has_l4]
        if not clause:
            return {"unmatchable": "a DENY rule whose 'from' entries have only attributes "
                                   "ztunnel cannot enforce"}
        clauses.append(clause)
    clauses.extend([_condition(c)] for c in rule.conditions)
    return {"clauses": clauses}


def compile_policy(policy: AuthorizationPolicy, root_namespace: str) -> Json:
    """One policy in compiled form (scope resolved against ``root_namespace``)."""
    return {
        "key": policy.key,
        "namespace": policy.namespace,
        "mesh_wide": policy.namespace == root_namespace,
        "selector": None if policy.selector is None else dict(sorted(policy.selector.items())),
        "action": policy.action.value,
        "dry_run": policy.dry_run,
        "fail_closed": policy.stands_in_for or None,
        "rules": [compile_rule(rule, policy.action) for rule in policy.rules],
    }


def compile_policy_set(policies: PolicySet) -> Json:
    """The compiled rule set of ``policies`` (what ``Policy{snapshot}`` will carry)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "policies": [compile_policy(p, policies.root_namespace) for p in policies.policies],
    }


def to_json(compiled: Json) -> str:
    """The canonical text of a compiled set (sorted keys, compact): equal sets give
    equal bytes, so a snapshot can be compared or hashed as sent."""
    return json.dumps(compiled, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


__all__ = ["FORMAT", "VERSION", "compile_policy", "compile_policy_set", "compile_rule",
           "to_json"]
