"""L7 AuthorizationPolicy for a waypoint, as Istio builds Envoy RBAC for it (pure).

Semantics followed (istio/istio, cited by function):

- ``pilot/pkg/security/authz/builder/builder.go`` :: ``build``: AUDIT policies become
  an RBAC filter with action LOG (never changes a decision), then DENY, then ALLOW
  filters, in that order. A policy without ``rules`` becomes ``rbacPolicyMatchNever``:
  an ALLOW without rules therefore denies everything its target gets (an ALLOW filter
  whose only policy never matches), a DENY without rules denies nothing.
- Envoy RBAC: a DENY filter denies when any policy matches; an ALLOW filter denies when
  none matches. No ALLOW policy at all: allowed. Envoy's answer to a denied request is
  ``403`` with body ``RBAC: access denied``.
- ``pilot/pkg/security/authz/model/model.go`` :: ``New``: a rule is an AND of its
  ``from`` (OR of sources), ``to`` (OR of operations) and each ``when`` condition; a
  field is an OR of its values; a ``not*`` field matches when none of its values does.
- ``.../model/generator.go``: ``principals`` match the peer's SPIFFE ID without
  ``spiffe://`` (``StringMatcherWithPrefix``), ``namespaces`` the regex
  ``.*/ns/<ns>/.*`` on it, ``ipBlocks`` the direct remote IP, ``remoteIpBlocks`` the
  remote (X-Forwarded-For) IP, ``hosts`` the ``:authority`` case-insensitively
  (``matcher.HostMatcher``), ``methods`` and headers case-sensitively
  (``matcher.HeaderMatcher``), ``paths`` the path without query (``PathMatcher``).
- ``.../matcher/string.go`` :: ``StringMatcherWithPrefix``: ``*`` is ``.+`` (presence:
  an empty value never matches), ``*x`` suffix, ``x*`` prefix, else exact.

Fail closed (as agent/policy does for L4): a document that targets this waypoint but
cannot be read or uses something we do not enforce never grants more than written.
``requestPrincipals``/``request.auth.*`` (no JWT here), path templates, ``connection.sni``
and ``experimental.*``: in an ALLOW rule the rule never matches; in a DENY rule the
field is dropped, so the rule denies more. ``action: CUSTOM`` (no ext_authz here), an
unknown action or field, or a malformed value: the document is replaced by a DENY-all
on its target (:attr:`DocumentOutcome.FAIL_CLOSED`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.addr import parse_cidr, parse_ip

HTTP_KINDS = frozenset({"host", "method", "path", "header"})

DENIED_STATUS = 403
DENIED_BODY = b"RBAC: access denied"
GATEWAY_GROUP = "gateway.networking.k8s.io"
DRY_RUN_ANNOTATION = "istio.io/dry-run"
API_VERSIONS = frozenset({"security.istio.io/v1", "security.istio.io/v1beta1"})


class Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"


class DocumentOutcome(enum.Enum):
    ACCEPTED = "accepted"
    ACCEPTED_WITH_WARNINGS = "accepted_with_warnings"  # narrowed: never wider
    IGNORED = "ignored"            # not attached to this waypoint or its services
    FAIL_CLOSED = "fail_closed"    # replaced by a DENY-all on its target


class Verdict(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True)
class StringMatch:
    """Istio's one-star pattern: ``*`` presence (non-empty), ``*x``, ``x*``, exact."""

    pattern: str
    ignore_case: bool = False

    def matches(self, value: str | None) -> bool:
        if value is None:
            return False
        p, v = self.pattern, value
        if self.ignore_case:
            p, v = p.lower(), v.lower()
        if p == "*":
            return v != ""
        if p.startswith("*"):
            return v.endswith(p[1:])
        if p.endswith("*"):
            return v.startswith(p[:-1])
        return v == p


def _namespace_of(principal: str | None) -> str | None:
    """``td/ns/<ns>/sa/<sa>`` -> ``<ns>`` (generator.go srcNamespaceGenerator's regex)."""
    if not principal:
        return None
    m = re.search(r"/ns/([^/]+)/", principal)
    return m.group(1) if m else None


def _trust_domain_of(principal: str | None) -> str | None:
    if not principal:
        return None
    return principal.split("/", 1)[0]


@dataclass(frozen=True)
class Request:
    """What L7 authorization sees of one HTTP request.

    ``principal``: the client's verified SPIFFE ID without ``spiffe://`` (from the
    HBONE connection's client certificate), None for none. ``source_ip``: the direct
    client address (the ``Forwarded`` address the node tunnel sent, else the peer).
    ``remote_ip``: the first X-Forwarded-For address, else ``source_ip``.
    ``headers``: lower-case names to values in order.
    """

    method: str
    path: str
    host: str
    port: int
    principal: str | None = None
    source_ip: str | None = None
    remote_ip: str | None = None
    destination_ip: str | None = None
    headers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # False for TCP passthrough: HTTP attributes cannot be seen (Istio's TCP filter
    # chain: an ALLOW rule using them never matches, a DENY rule drops them).
    http: bool = True

    @property
    def path_only(self) -> str:
        return self.path.split("?", 1)[0].split("#", 1)[0]

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return ",".join(values) if values else None


# ---- compiled predicates --------------------------------------------------------------

@dataclass(frozen=True)
class Predicate:
    """One attribute with its values and not-values; ``kind`` names the attribute."""

    kind: str
    values: tuple[Any, ...] = ()
    not_values: tuple[Any, ...] = ()
    arg: str = ""  # header name for request.headers

    def _one(self, request: Request, value: Any) -> bool:
        k = self.kind
        if k == "principal":
            return bool(value.matches(request.principal))
        if k == "namespace":
            return bool(value.matches(_namespace_of(request.principal)))
        if k == "trust_domain":
            return bool(value.matches(_trust_domain_of(request.principal)))
        if k == "service_account":
            ns, sa = value
            if not request.principal:
                return False
            return re.fullmatch(rf".+/ns/{re.escape(ns)}/(.+/|)sa/{re.escape(sa)}(/.+)?",
                                request.principal) is not None
        if k in ("source_ip", "remote_ip", "destination_ip"):
            text = {"source_ip": request.source_ip, "remote_ip": request.remote_ip,
                    "destination_ip": request.destination_ip}[k]
            if text is None:
                return False
            try:
                return parse_ip(text) in value
            except ValueError:
                return False
        if k == "port":
            return bool(request.port == value)
        if k == "host":
            return bool(value.matches(request.host))
        if k == "method":
            return bool(value.matches(request.method))
        if k == "path":
            return bool(value.matches(request.path_only))
        if k == "header":
            return bool(value.matches(request.header(self.arg)))
        raise AssertionError(f"unknown predicate {k}")

    def matches(self, request: Request, deny: bool = False) -> bool:
        if not request.http and self.kind in HTTP_KINDS:
            return deny
        if self.values and not any(self._one(request, v) for v in self.values):
            return False
        return not any(self._one(request, v) for v in self.not_values)


@dataclass(frozen=True)
class Clause:
    """An AND of predicates (one source, one operation, or one condition).
    ``never``: the clause can never match (an unsupported field in an ALLOW)."""

    predicates: tuple[Predicate, ...] = ()
    never: bool = False

    def matches(self, request: Request, deny: bool = False) -> bool:
        return not self.never and all(p.matches(request, deny) for p in self.predicates)


@dataclass(frozen=True)
class Rule:
    sources: tuple[Clause, ...] = ()     # OR; empty = any
    operations: tuple[Clause, ...] = ()  # OR; empty = any
    conditions: tuple[Clause, ...] = ()  # AND
    never: bool = False

    def matches(self, request: Request, deny: bool = False) -> bool:
        if self.never:
            return False
        if self.sources and not any(c.matches(request, deny) for c in self.sources):
            return False
        if self.operations and not any(c.matches(request, deny) for c in self.operations):
            return False
        return all(c.matches(request, deny) for c in self.conditions)


@dataclass(frozen=True)
class Target:
    """What a policy is attached to: the waypoint (``Gateway``) or a ``Service``."""

    kind: str  # "Gateway" | "Service"
    namespace: str
    name: str


@dataclass(frozen=True)
class Policy:
    name: str
    namespace: str
    action: Action
    targets: tuple[Target, ...]
    rules: tuple[Rule, ...]
    dry_run: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def matches(self, request: Request) -> bool:
        deny = self.action is Action.DENY
        return any(r.matches(request, deny) for r in self.rules)


@dataclass(frozen=True)
class DocumentResult:
    """How one document was judged; ``problems`` name the fields (``spec.rules[0]...``)."""

    name: str
    outcome: DocumentOutcome
    problems: tuple[str, ...] = ()
    policy: Policy | None = None


class PolicyInvalid(ValueError):
    """A document Istio's validation would reject; the message names the field."""


# ---- parsing ---------------------------------------------------------------------------

_SOURCE_FIELDS = {
    "principals": "principal", "notPrincipals": "principal",
    "namespaces": "namespace", "notNamespaces": "namespace",
    "ipBlocks": "source_ip", "notIpBlocks": "source_ip",
    "remoteIpBlocks": "remote_ip", "notRemoteIpBlocks": "remote_ip",
    "trustDomains": "trust_domain", "notTrustDomains": "trust_domain",
    "serviceAccounts": "service_account", "notServiceAccounts": "service_account",
}
_UNSUPPORTED_SOURCE = {"requestPrincipals", "notRequestPrincipals"}
_OPERATION_FIELDS = {
    "hosts": "host", "notHosts": "host", "ports": "port", "notPorts": "port",
    "methods": "method", "notMethods": "method", "paths": "path", "notPaths": "path",
}
_CONDITION_KEYS = {
    "source.ip": "source_ip", "remote.ip": "remote_ip", "source.namespace": "namespace",
    "source.principal": "principal", "source.serviceAccount": "service_account",
    "source.trustDomain": "trust_domain", "destination.ip": "destination_ip",
    "destination.port": "port",
}
_UNSUPPORTED_CONDITION_PREFIXES = ("request.auth.", "connection.sni", "experimental.")


class _Unsupported(Exception):
    """A field we do not enforce (valid for Istio, but not for us)."""


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyInvalid(f"{where}: must be a list of strings")
    if not value:
        raise PolicyInvalid(f"{where}: must not be empty")
    for v in value:
        if "*" in v.strip("*") or (v.count("*") > 1 and v != "*"):
            raise PolicyInvalid(f"{where}: {v!r}: '*' only at the start or the end")
    return value


def _compile_value(kind: str, text: str, where: str, policy_namespace: str) -> Any:
    if kind in ("source_ip", "remote_ip", "destination_ip"):
        try:
            return parse_cidr(text)
        except ValueError as e:
            raise PolicyInvalid(f"{where}: {text!r} {e}") from None
    if kind == "port":
        if not text.isdigit() or not 0 <= int(text) <= 65535:
            raise PolicyInvalid(f"{where}: {text!r} is not a port number")
        return int(text)
    if kind == "service_account":
        ns, sep, sa = text.partition("/")
        if not sep:
            ns, sa = policy_namespace, text
        if not ns or not sa or "/" in sa or "*" in text:
            raise PolicyInvalid(f"{where}: {text!r} is not <namespace>/<sa> or <sa>")
        return (ns, sa)
    if kind == "path" and ("{" in text or "}" in text):
        raise _Unsupported(f"{where}: path templates ({text!r}) are not supported")
    if kind == "principal" and text.startswith("spiffe://"):
        # Istio keeps it as written and matches it against the ID without spiffe://:
        # never matches. Kept so, as istiod does.
        return StringMatch(text)
    return StringMatch(text, ignore_case=(kind == "host"))


def _compile_fields(entry: Any, table: Mapping[str, str], unsupported: set[str], where: str,
                    policy_namespace: str, action: Action, problems: list[str]) -> Clause:
    if not isinstance(entry, dict) or not entry:
        raise PolicyInvalid(f"{where}: must be a non-empty mapping")
    preds: list[Predicate] = []
    never = False
    for name, raw in entry.items():
        path = f"{where}.{name}"
        if name in unsupported:
            problems.append(f"{path}: not supported (no request authentication here)")
            never = never or action is not Action.DENY
            continue
        if name not in table:
            raise PolicyInvalid(f"{path}: unknown field")
        kind = table[name]
        values = _strings(raw, path)
        try:
            compiled = tuple(_compile_value(kind, v, path, policy_namespace) for v in values)
        except _Unsupported as exc:
            problems.append(str(exc))
            never = never or action is not Action.DENY
            continue
        is_not = name.startswith("not")
        preds.append(Predicate(kind, () if is_not else compiled, compiled if is_not else ()))
    return Clause(_merge(preds), never)


def _merge(preds: Iterable[Predicate]) -> tuple[Predicate, ...]:
    """Keep ``x`` and ``notX`` of one attribute as one predicate (model.go insertFront)."""
    merged: dict[tuple[str, str], Predicate] = {}
    for p in preds:
        key = (p.kind, p.arg)
        old = merged.get(key)
        merged[key] = p if old is None else Predicate(
            p.kind, old.values + p.values, old.not_values + p.not_values, p.arg)
    return tuple(merged.values())


def _compile_condition(entry: Any, where: str, policy_namespace: str, action: Action,
                       problems: list[str]) -> Clause:
    if not isinstance(entry, dict):
        raise PolicyInvalid(f"{where}: must be a mapping")
    unknown = set(entry) - {"key", "values", "notValues"}
    if unknown:
        raise PolicyInvalid(f"{where}.{sorted(unknown)[0]}: unknown field")
    key = entry.get("key")
    if not isinstance(key, str) or not key:
        raise PolicyInvalid(f"{where}.key: required")
    if "values" not in entry and "notValues" not in entry:
        raise PolicyInvalid(f"{where}: needs values or notValues")
    values = _strings(entry["values"], f"{where}.values") if "values" in entry else []
    not_values = (_strings(entry["notValues"], f"{where}.notValues")
                  if "notValues" in entry else [])
    arg = ""
    if key.startswith(_UNSUPPORTED_CONDITION_PREFIXES):
        problems.append(f"{where}.key: {key!r} is not supported here")
        return Clause((), never=action is not Action.DENY)
    if key.startswith("request.headers"):
        m = re.fullmatch(r"request\.headers\[([^\]]+)\]", key)
        if not m:
            raise PolicyInvalid(f"{where}.key: {key!r}: write request.headers[<name>]")
        kind, arg = "header", m.group(1).lower()
    elif key in _CONDITION_KEYS:
        kind = _CONDITION_KEYS[key]
    else:
        raise PolicyInvalid(f"{where}.key: unknown attribute {key!r}")
    try:
        vals = tuple(_compile_value(kind, v, f"{where}.values", policy_namespace)
                     for v in values)
        nots = tuple(_compile_value(kind, v, f"{where}.notValues", policy_namespace)
                     for v in not_values)
    except _Unsupported as exc:
        problems.append(str(exc))
        return Clause((), never=action is not Action.DENY)
    return Clause((Predicate(kind, vals, nots, arg),))


def _compile_rule(raw: Any, where: str, namespace: str, action: Action,
                  problems: list[str]) -> Rule:
    if not isinstance(raw, dict):
        raise PolicyInvalid(f"{where}: must be a mapping")
    unknown = set(raw) - {"from", "to", "when"}
    if unknown:
        raise PolicyInvalid(f"{where}.{sorted(unknown)[0]}: unknown field")
    sources: list[Clause] = []
    operations: list[Clause] = []
    conditions: list[Clause] = []
    for i, item in enumerate(_list(raw.get("from", []), f"{where}.from")):
        if not isinstance(item, dict) or set(item) != {"source"}:
            raise PolicyInvalid(f"{where}.from[{i}]: must be {{source: ...}}")
        sources.append(_compile_fields(item["source"], _SOURCE_FIELDS, _UNSUPPORTED_SOURCE,
                                       f"{where}.from[{i}].source", namespace, action,
                                       problems))
    for i, item in enumerate(_list(raw.get("to", []), f"{where}.to")):
        if not isinstance(item, dict) or set(item) != {"operation"}:
            raise PolicyInvalid(f"{where}.to[{i}]: must be {{operation: ...}}")
        operations.append(_compile_fields(item["operation"], _OPERATION_FIELDS, set(),
                                          f"{where}.to[{i}].operation", namespace, action,
                                          problems))
    for i, item in enumerate(_list(raw.get("when", []), f"{where}.when")):
        conditions.append(_compile_condition(item, f"{where}.when[{i}]", namespace, action,
                                             problems))
    # A DENY clause emptied of every predicate by dropped fields would match anything:
    # that is "denies more", as documented. An ALLOW one is marked never.
    return Rule(tuple(sources), tuple(operations), tuple(conditions))


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise PolicyInvalid(f"{where}: must be a list")
    return value


def _targets(spec: Mapping[str, Any], namespace: str) -> tuple[Target, ...] | None:
    refs: list[Any]
    if "targetRefs" in spec:
        refs = _list(spec["targetRefs"], "spec.targetRefs")
    elif "targetRef" in spec:
        refs = [spec["targetRef"]]
    else:
        return None
    out = []
    for i, ref in enumerate(refs):
        where = f"spec.targetRefs[{i}]"
        if not isinstance(ref, dict) or not isinstance(ref.get("name"), str):
            raise PolicyInvalid(f"{where}: needs kind and name")
        unknown = set(ref) - {"group", "kind", "name", "namespace"}
        if unknown:
            raise PolicyInvalid(f"{where}.{sorted(unknown)[0]}: unknown field")
        kind, group = ref.get("kind"), ref.get("group", "")
        if kind == "Gateway" and group == GATEWAY_GROUP:
            out.append(Target("Gateway", namespace, ref["name"]))
        elif kind == "Service" and group in ("", "core"):
            out.append(Target("Service", namespace, ref["name"]))
        elif kind == "GatewayClass" and group == GATEWAY_GROUP:
            out.append(Target("GatewayClass", namespace, ref["name"]))
        else:
            raise PolicyInvalid(f"{where}: kind {kind!r} group {group!r} is not a Gateway, "
                                "GatewayClass or Service")
        if ref.get("namespace") not in (None, namespace):
            raise PolicyInvalid(f"{where}.namespace: must be the policy's own namespace")
    return tuple(out)


def _parse_bool(text: Any) -> bool:
    """Go strconv.ParseBool, as istio's checkDryRunAnnotation."""
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise PolicyInvalid(f"metadata.annotations[{DRY_RUN_ANNOTATION}]: {text!r} is not a bool")


def compile_document(doc: Any) -> DocumentResult:
    """Judge one AuthorizationPolicy document (a parsed YAML mapping)."""
    name = "<unnamed>"
    problems: list[str] = []
    namespace = ""
    targets: tuple[Target, ...] | None = None
    try:
        if not isinstance(doc, dict):
            raise PolicyInvalid("document: must be a mapping")
        meta = doc.get("metadata") or {}
        if isinstance(meta, dict):
            name = f"{meta.get('namespace', '?')}/{meta.get('name', '?')}"
            raw_ns = meta.get("namespace")
            namespace = raw_ns if isinstance(raw_ns, str) else ""
        api = doc.get("apiVersion")
        if not isinstance(api, str) or api not in API_VERSIONS \
                or doc.get("kind") != "AuthorizationPolicy":
            raise PolicyInvalid("apiVersion/kind: expected security.istio.io/v1 "
                                "AuthorizationPolicy")
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) \
                or not meta["name"] or not namespace:
            raise PolicyInvalid("metadata: name and namespace are required")
        spec = doc.get("spec") or {}
        if not isinstance(spec, dict):
            raise PolicyInvalid("spec: must be a mapping")
        unknown = set(spec) - {"targetRefs", "targetRef", "selector", "action", "rules",
                               "provider"}
        if unknown:
            raise PolicyInvalid(f"spec.{sorted(unknown)[0]}: unknown field")
        targets = _targets(spec, namespace)
        if targets is None:
            # selector / namespace-wide policies are the node tunnel's (or sidecars').
            return DocumentResult(name, DocumentOutcome.IGNORED,
                                  ("no targetRefs: not a waypoint policy",))
        if "selector" in spec:
            raise PolicyInvalid("spec.selector: cannot be used with targetRefs")
        raw_action = spec.get("action", "ALLOW")
        if raw_action == "CUSTOM":
            raise PolicyInvalid("spec.action: CUSTOM (ext_authz) is not supported by this "
                                "waypoint")
        try:
            action = Action(raw_action)
        except ValueError:
            raise PolicyInvalid(f"spec.action: unknown action {raw_action!r}") from None
        if "provider" in spec:
            raise PolicyInvalid("spec.provider: only with action CUSTOM")
        annotations = meta.get("annotations") or {}
        dry_run = (_parse_bool(annotations[DRY_RUN_ANNOTATION])
                   if DRY_RUN_ANNOTATION in annotations else False)
        rules = tuple(_compile_rule(r, f"spec.rules[{i}]", namespace, action, problems)
                      for i, r in enumerate(_list(spec.get("rules", []), "spec.rules")))
        if not rules and action is Action.DENY:
            problems.append("spec.rules: a DENY without rules matches nothing")
        policy = Policy(meta["name"], namespace, action, targets, rules, dry_run)
        outcome = (DocumentOutcome.ACCEPTED_WITH_WARNINGS if problems
                   else DocumentOutcome.ACCEPTED)
        return DocumentResult(name, outcome, tuple(problems), policy)
    except (PolicyInvalid, TypeError, AttributeError, KeyError) as exc:
        # TypeError & co: a value of a shape no check above foresaw; judged as invalid.
        stand_in = None
        if namespace:
            if targets is None:
                # Unknown target: deny everything the waypoint serves in this namespace.
                targets = (Target("Namespace", namespace, "*"),)
            stand_in = Policy(f"{name.split('/')[-1]}", namespace, Action.DENY, targets,
                              (Rule(),))
        else:
            stand_in = Policy("unreadable", "*", Action.DENY, (Target("Any", "*", "*"),),
                              (Rule(),))
        return DocumentResult(name, DocumentOutcome.FAIL_CLOSED, (str(exc),), stand_in)


# ---- the decision ------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    policy: str | None = None       # the DENY that matched, or None
    audited: tuple[str, ...] = ()   # AUDIT policies that matched (access log hint)
    dry_run: tuple[str, ...] = ()   # dry-run policies that would have changed it
    reason: str = ""

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW


@dataclass(frozen=True)
class Scope:
    """Who a request is for: the waypoint's Gateway and the destination service."""

    gateway_namespace: str
    gateway_name: str
    service_namespace: str | None = None
    service_name: str | None = None
    gateway_class: str = "istio-waypoint"
    root_namespace: str = "istio-system"

    def covers(self, target: Target) -> bool:
        if target.kind == "Any":
            return True
        if target.kind == "Gateway":
            return (target.namespace, target.name) == (self.gateway_namespace,
                                                       self.gateway_name)
        if target.kind == "GatewayClass":
            return target.namespace == self.root_namespace and target.name == \
                self.gateway_class
        if target.kind == "Service":
            return (target.namespace, target.name) == (self.service_namespace,
                                                       self.service_name)
        if target.kind == "Namespace":
            return target.namespace in (self.gateway_namespace, self.service_namespace)
        return False


def _applies(policy: Policy, scope: Scope) -> bool:
    return any(scope.covers(t) for t in policy.targets)


def evaluate(policies: Sequence[Policy], scope: Scope, request: Request) -> Decision:
    """Envoy's RBAC filter chain for this waypoint and destination (builder.go ``build``).

    AUDIT (LOG) first, then DENY, then ALLOW; dry-run policies are shadow rules: they
    are evaluated and reported but never change the verdict."""
    applicable = [p for p in policies if _applies(p, scope)]
    audited = tuple(p.key for p in applicable
                    if p.action is Action.AUDIT and not p.dry_run and p.matches(request))
    shadow: list[str] = []
    for p in applicable:
        if p.action is Action.DENY and p.matches(request):
            if p.dry_run:
                shadow.append(p.key)
                continue
            return Decision(Verdict.DENY, p.key, audited, tuple(shadow),
                            f"denied by {p.key}")
    allows = [p for p in applicable if p.action is Action.ALLOW]
    enforced = [p for p in allows if not p.dry_run]
    for p in allows:
        if p.dry_run and not p.matches(request):
            shadow.append(p.key)
    if enforced:
        for p in enforced:
            if p.matches(request):
                return Decision(Verdict.ALLOW, None, audited, tuple(shadow),
                                f"allowed by {p.key}")
        return Decision(Verdict.DENY, None, audited, tuple(shadow),
                        "no ALLOW policy matched")
    return Decision(Verdict.ALLOW, None, audited, tuple(shadow), "no ALLOW policy applies")


def compile_documents(docs: Iterable[Any]) -> tuple[list[Policy], list[DocumentResult]]:
    """Judge every document; one bad document never affects the others. Duplicate
    ``namespace/name``: every copy fails closed (which one was meant is unknown)."""
    results = [compile_document(d) for d in docs]
    seen: dict[str, int] = {}
    for r in results:
        if r.outcome is not DocumentOutcome.IGNORED:
            seen[r.name] = seen.get(r.name, 0) + 1
    final: list[DocumentResult] = []
    for r in results:
        if seen.get(r.name, 0) > 1 and r.policy is not None:
            p = r.policy
            r = DocumentResult(r.name, DocumentOutcome.FAIL_CLOSED,
                               (*r.problems, "metadata: another document has this name"),
                               Policy(p.name, p.namespace, Action.DENY, p.targets, (Rule(),)))
        final.append(r)
    return [r.policy for r in final if r.policy is not None], final
