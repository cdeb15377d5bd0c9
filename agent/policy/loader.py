"""Load AuthorizationPolicy YAML files, judging every document on its own.

Every ``*.yaml``/``*.yml`` in a directory is read (several documents per file,
separated by ``---``). Each document is judged the way istiod judges an
``AuthorizationPolicy`` for ztunnel (``convertAuthorizationPolicy`` and ``handleRule``
in istio ``pilot/pkg/serviceregistry/ambient/authorization.go``), with one outcome per
document (:class:`~agent.policy.outcomes.DocumentOutcome`):

* accepted, or accepted with warnings (attributes ztunnel cannot see are dropped as
  istiod drops them; values that can never match are named);
* ignored, where istiod sends ztunnel nothing (AUDIT, CUSTOM, targetRef/targetRefs,
  a DENY without rules);
* failed closed: a document that cannot be read or that Istio's validation would
  reject (``ValidateAuthorizationPolicy``, ``checkDryRunAnnotation`` in istio
  ``pkg/config/validation/validation.go``) is replaced by a stand-in that is never
  wider than anything the document could have meant: DENY-all over the narrowest
  scope that can be read for sure (its selector, else its namespace, else the whole
  mesh), or allow-nothing over that scope when it is readably an ALLOW. A YAML
  syntax error loses only the document it is in (documents are split at ``---``
  first); an unreadable file or directory denies mesh-wide.

One bad document never rejects the others, and nothing unreadable ever silently
disappears. docs/policy.md has the table of cases with their istiod sources. Issues
name the file, the 1-based document and the field path, e.g.::

    deny.yaml: document 2: spec.rules[0].from[0].source.ipBlocks[1]: '10.0.0.300/8' is not a CIDR

:class:`PolicyWatcher` re-reads the directory when its files change (names, sizes,
mtimes). It starts failed closed (deny all) until the first read. It has no thread or
event loop of its own: the caller invokes :meth:`PolicyWatcher.poll` periodically.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from agent.addr import parse_cidr
from agent.identity.spiffe import SCHEME as SPIFFE_SCHEME
from agent.policy.engine import FAIL_CLOSED_NAME, PolicySet, deny_all_stand_in
from agent.policy.model import (
    DEFAULT_ROOT_NAMESPACE,
    DRY_RUN_ANNOTATION,
    L4_CONDITION_KEYS,
    AuthorizationPolicy,
    Condition,
    IPNetwork,
    OperationMatch,
    PolicyAction,
    Rule,
    ServiceAccountMatch,
    SourceMatch,
    StringMatch,
)
from agent.policy.outcomes import (
    DocumentOutcome,
    DocumentResult,
    LoadReport,
    PolicyIssue,
    PolicyLoadError,
)

API_VERSIONS = frozenset({"security.istio.io/v1", "security.istio.io/v1beta1"})
POLICY_FILE_SUFFIXES = (".yaml", ".yml")

# Kubernetes ObjectMeta fields tolerated (e.g. from `kubectl get -o yaml`), unused here.
_IGNORED_METADATA = frozenset({"labels", "uid", "resourceVersion", "generation",
                               "creationTimestamp", "managedFields", "ownerReferences",
                               "finalizers", "generateName", "selfLink",
                               "deletionTimestamp", "deletionGracePeriodSeconds"})
_L7_SOURCE_FIELDS = ("requestPrincipals", "notRequestPrincipals",
                     "remoteIpBlocks", "notRemoteIpBlocks")
# Valid Istio fields that istiod's ztunnel conversion (handleRule) does not read.
_TRUST_DOMAIN_FIELDS = ("trustDomains", "notTrustDomains")
_L7_OPERATION_FIELDS = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
# `when` keys Istio accepts that ztunnel cannot evaluate (not in istiod's
# l4WhenAttributes): HTTP ones, and source.serviceAccount / source.trustDomain.
_L7_CONDITION_KEYS = frozenset({"remote.ip", "request.auth.principal",
                                "request.auth.audiences", "request.auth.presenter",
                                "connection.sni", "source.serviceAccount",
                                "source.trustDomain"})
_L7_CONDITION_PREFIXES = ("request.headers[", "request.auth.claims[",
                          "experimental.envoy.filters.")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
# Go's strconv.ParseBool, which istiod uses for istio.io/dry-run.
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def parse_bool(text: Any) -> bool | None:
    """Go ``strconv.ParseBool``: True/False, or None when ``text`` is not a boolean."""
    if not isinstance(text, str):
        return None
    if text in _GO_TRUE:
        return True
    if text in _GO_FALSE:
        return False
    return None


class _Invalid(Exception):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def _shown(value: Any, limit: int = 80) -> str:
    """A value for an error message: repr of a scalar, cut at ``limit`` characters; the
    type of anything else (never the repr of a large, possibly alias-expanded tree)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        text = repr(value)
        return text if len(text) <= limit else text[:limit] + "...'"
    return _type_name(value)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _mapping(value: Any, path: str, allowed: Iterable[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(path, f"must be a mapping, got {_type_name(value)}")
    allowed_set = set(allowed)
    for key in value:
        if not isinstance(key, str) or key not in allowed_set:
            where = f"{path}.{key}" if path else str(key)
            raise _Invalid(where, f"unknown field (allowed: {', '.join(sorted(allowed_set))})")
    return value


def _list(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise _Invalid(path, f"must be a list, got {_type_name(value)}")
    return value


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(path, f"must be a string, got {_type_name(value)}")
    return value


def _strings(value: Any, path: str) -> list[str]:
    return [_string(item, f"{path}[{i}]") for i, item in enumerate(_list(value, path))]


def _string_match(value: Any, path: str, field: str) -> StringMatch:
    pattern = _string(value, path)
    if not pattern:
        raise _Invalid(path, "must not be empty")
    if pattern != "*" and ("*" in pattern[1:-1] or pattern.count("*") > 1):
        raise _Invalid(path, f"{_shown(pattern)}: '*' is only allowed once, "
                             "at the start or the end")
    if field == "trustDomains" and "/" in pattern:
        raise _Invalid(path, f"{_shown(pattern)}: a trust domain has no '/'")
    return StringMatch.parse(pattern)


def _string_matches(value: Any, path: str, field: str) -> tuple[StringMatch, ...]:
    return tuple(_string_match(item, f"{path}[{i}]", field)
                 for i, item in enumerate(_list(value, path)))


def _cidr(value: Any, path: str) -> IPNetwork:
    text = _string(value, path)
    try:
        return parse_cidr(text)
    except ValueError as e:
        raise _Invalid(path, f"{_shown(text)} {e}") from None


def _cidrs(value: Any, path: str) -> tuple[IPNetwork, ...]:
    return tuple(_cidr(item, f"{path}[{i}]") for i, item in enumerate(_list(value, path)))


def _port(value: Any, path: str) -> int:
    # Istio writes ports as strings ("8080"); YAML integers are accepted too. 0 is
    # valid as in Istio's security.ValidatePorts (it never matches a connection).
    if isinstance(value, bool):
        raise _Invalid(path, f"{_shown(value)} is not a port")
    if isinstance(value, int):
        port = value
    elif isinstance(value, str) and value.isdigit() and value.isascii():
        port = int(value)
    else:
        raise _Invalid(path, f"{_shown(value)} is not a port (an integer 0..65535)")
    if not 0 <= port <= 65535:
        raise _Invalid(path, f"{_shown(value)} is not a port (an integer 0..65535)")
    return port


def _ports(value: Any, path: str) -> tuple[int, ...]:
    return tuple(_port(item, f"{path}[{i}]") for i, item in enumerate(_list(value, path)))


def _service_accounts(value: Any, path: str, policy_namespace: str
                      ) -> tuple[ServiceAccountMatch, ...]:
    accounts = []
    items = _list(value, path)
    if len(items) > 16:  # Istio's security.CheckServiceAccount limit
        raise _Invalid(path, f"has {len(items)} values; at most 16 are allowed")
    for i, item in enumerate(items):
        item_path = f"{path}[{i}]"
        text = _string(item, item_path)
        namespace, slash, account = text.rpartition("/")
        if not slash:
            namespace = policy_namespace
        if ("*" in text or not account or not namespace or "/" in namespace
                or len(text) > 320):
            raise _Invalid(item_path, f"{_shown(text)} is not a service account "
                                      "('<namespace>/<name>' or '<name>', no wildcards)")
        accounts.append(ServiceAccountMatch(namespace, account))
    return tuple(accounts)


def _non_empty(value: Any, path: str) -> None:
    if not value:
        raise _Invalid(path, "must not be empty")


_SOURCE_FIELDS = ("principals", "notPrincipals", "namespaces", "notNamespaces", "ipBlocks",
                  "notIpBlocks", "serviceAccounts", "notServiceAccounts",
                  *_TRUST_DOMAIN_FIELDS, *_L7_SOURCE_FIELDS)


def _parse_source(value: Any, path: str, policy_namespace: str) -> SourceMatch:
    source = _mapping(value, path, _SOURCE_FIELDS)
    if not any(source.get(name) for name in _SOURCE_FIELDS):
        raise _Invalid(path, "must not be empty (omit 'from' to match any source)")
    # As Istio's ValidateAuthorizationPolicy: serviceAccounts exclude the other
    # identity fields in one source.
    has_identity = any(source.get(name) for name in
                       ("principals", "notPrincipals", "namespaces", "notNamespaces"))
    if has_identity and (source.get("serviceAccounts") or source.get("notServiceAccounts")):
        raise _Invalid(path, "serviceAccounts/notServiceAccounts cannot be combined with "
                             "principals/namespaces (or their not* forms) in one source")
    for name in _L7_SOURCE_FIELDS:
        if name in source:
            for i, item in enumerate(_strings(source[name], f"{path}.{name}")):
                if not item:
                    raise _Invalid(f"{path}.{name}[{i}]", "must not be empty")
    for name in _TRUST_DOMAIN_FIELDS:
        if name in source:
            _string_matches(source[name], f"{path}.{name}", "trustDomains")

    def get(name: str) -> Any:
        return source.get(name, [])

    return SourceMatch(
        principals=_string_matches(get("principals"), f"{path}.principals", "principals"),
        not_principals=_string_matches(get("notPrincipals"), f"{path}.notPrincipals",
                                       "principals"),
        namespaces=_string_matches(get("namespaces"), f"{path}.namespaces", "namespaces"),
        not_namespaces=_string_matches(get("notNamespaces"), f"{path}.notNamespaces",
                                       "namespaces"),
        ip_blocks=_cidrs(get("ipBlocks"), f"{path}.ipBlocks"),
        not_ip_blocks=_cidrs(get("notIpBlocks"), f"{path}.notIpBlocks"),
        service_accounts=_service_accounts(get("serviceAccounts"), f"{path}.serviceAccounts",
                                           policy_namespace),
        not_service_accounts=_service_accounts(get("notServiceAccounts"),
                                               f"{path}.notServiceAccounts", policy_namespace),
        unsupported_fields=tuple(name for name in (*_TRUST_DOMAIN_FIELDS, *_L7_SOURCE_FIELDS)
                                 if source.get(name)),
    )


def _parse_operation(value: Any, path: str) -> OperationMatch:
    operation = _mapping(value, path, ("ports", "notPorts", *_L7_OPERATION_FIELDS))
    if not any(operation.get(name) for name in ("ports", "notPorts", *_L7_OPERATION_FIELDS)):
        raise _Invalid(path, "must not be empty (omit 'to' to match any operation)")
    for name in _L7_OPERATION_FIELDS:
        if name in operation:
            for i, item in enumerate(_strings(operation[name], f"{path}.{name}")):
                if not item:
                    raise _Invalid(f"{path}.{name}[{i}]", "must not be empty")
    return OperationMatch(
        ports=_ports(operation.get("ports", []), f"{path}.ports"),
        not_ports=_ports(operation.get("notPorts", []), f"{path}.notPorts"),
        unsupported_fields=tuple(name for name in _L7_OPERATION_FIELDS if operation.get(name)),
    )


def _check_condition_key(key: str, path: str) -> None:
    """The keys Istio's security.ValidateAttribute accepts, with its messages."""
    if key in L4_CONDITION_KEYS or key in _L7_CONDITION_KEYS:
        return
    if key.startswith(_L7_CONDITION_PREFIXES):
        open_at = key.find("[")
        if key.endswith("]") and 0 < open_at < len(key) - 2:
            return
        raise _Invalid(path, f"bad key {_shown(key)}: should have the form a[b]")
    replaced = {"destination.namespace": "is replaced by metadata.namespace",
                "destination.name": "is deprecated (only supported in v1alpha1)",
                "destination.user": "is deprecated (only supported in v1alpha1)"}
    if key in replaced:
        raise _Invalid(path, f"{_shown(key)} {replaced[key]}")
    if key.startswith("destination.labels"):
        raise _Invalid(path, f"{_shown(key)} is replaced by spec.selector")
    raise _Invalid(path, f"unknown condition key {_shown(key)} "
                         f"(L4 keys: {', '.join(sorted(L4_CONDITION_KEYS))})")


def _condition_values(key: str, values: Any, path: str) -> tuple[Any, ...]:
    if key in ("source.ip", "destination.ip"):
        return _cidrs(values, path)
    if key == "destination.port":
        return _ports(values, path)
    if key in ("source.principal", "source.namespace"):
        return _string_matches(values, path, key)
    strings = _strings(values, path)
    for i, item in enumerate(strings):
        if not item:
            raise _Invalid(f"{path}[{i}]", "must not be empty")
    return tuple(strings)


def _parse_condition(value: Any, path: str) -> Condition:
    condition = _mapping(value, path, ("key", "values", "notValues"))
    if "key" not in condition:
        raise _Invalid(f"{path}.key", "is required")
    key = _string(condition["key"], f"{path}.key")
    _check_condition_key(key, f"{path}.key")
    if not condition.get("values") and not condition.get("notValues"):
        raise _Invalid(path, f"values or notValues must be set for key {_shown(key)}")
    return Condition(
        key=key,
        values=_condition_values(key, condition.get("values", []), f"{path}.values"),
        not_values=_condition_values(key, condition.get("notValues", []), f"{path}.notValues"),
    )


def _parse_rule(value: Any, path: str, policy_namespace: str) -> Rule:
    rule = _mapping(value, path, ("from", "to", "when"))
    sources = operations = None
    if "from" in rule:
        entries = _list(rule["from"], f"{path}.from")
        _non_empty(entries, f"{path}.from")
        parsed_sources = []
        for i, entry in enumerate(entries):
            entry_path = f"{path}.from[{i}]"
            entry_map = _mapping(entry, entry_path, ("source",))
            if "source" not in entry_map:
                raise _Invalid(f"{entry_path}.source", "is required")
            parsed_sources.append(_parse_source(entry_map["source"], f"{entry_path}.source",
                                                policy_namespace))
        sources = tuple(parsed_sources)
    if "to" in rule:
        entries = _list(rule["to"], f"{path}.to")
        _non_empty(entries, f"{path}.to")
        parsed_operations = []
        for i, entry in enumerate(entries):
            entry_path = f"{path}.to[{i}]"
            entry_map = _mapping(entry, entry_path, ("operation",))
            if "operation" not in entry_map:
                raise _Invalid(f"{entry_path}.operation", "is required")
            parsed_operations.append(_parse_operation(entry_map["operation"],
                                                      f"{entry_path}.operation"))
        operations = tuple(parsed_operations)
    conditions = tuple(_parse_condition(c, f"{path}.when[{i}]")
                       for i, c in enumerate(_list(rule.get("when", []), f"{path}.when")))
    return Rule(sources=sources, operations=operations, conditions=conditions)


def _parse_metadata(value: Any) -> tuple[str, str, bool]:
    metadata = _mapping(value, "metadata",
                        ("name", "namespace", "annotations", *_IGNORED_METADATA))
    for required in ("name", "namespace"):
        if required not in metadata:
            hint = (" (policies come from files: there is no kubectl namespace to default to)"
                    if required == "namespace" else "")
            raise _Invalid(f"metadata.{required}", f"is required{hint}")
    name = _string(metadata["name"], "metadata.name")
    namespace = _string(metadata["namespace"], "metadata.namespace")
    if not _DNS_SUBDOMAIN.match(name) or len(name) > 253:
        raise _Invalid("metadata.name", f"{_shown(name)} is not a valid Kubernetes name")
    if not _DNS_LABEL.match(namespace) or len(namespace) > 63:
        raise _Invalid("metadata.namespace", f"{_shown(namespace)} is not a valid namespace")
    annotations = metadata.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise _Invalid("metadata.annotations",
                       f"must be a mapping, got {_type_name(annotations)}")
    for key, annotation in annotations.items():
        _string(annotation, f"metadata.annotations[{key}]")
    dry_run = False
    if DRY_RUN_ANNOTATION in annotations:
        dry_run_text = annotations[DRY_RUN_ANNOTATION]
        parsed = parse_bool(dry_run_text)
        if parsed is None:
            # Istio's validation (checkDryRunAnnotation) rejects it. istiod's converter,
            # were it to see one, would log and *enforce* the policy, which for an
            # ALLOW can widen access: so it is invalid here (fails closed).
            raise _Invalid(f"metadata.annotations[{DRY_RUN_ANNOTATION}]",
                           f"{_shown(dry_run_text)} is not a boolean (Go strconv.ParseBool: "
                           "true/false, 1/0, t/f, TRUE/FALSE, True/False)")
        dry_run = parsed
    return name, namespace, dry_run


def _parse_selector(value: Any) -> Mapping[str, str]:
    selector = _mapping(value, "spec.selector", ("matchLabels",))
    labels = selector.get("matchLabels") or {}
    if not isinstance(labels, dict):
        raise _Invalid("spec.selector.matchLabels",
                       f"must be a mapping, got {_type_name(labels)}")
    parsed = {}
    for key, label in labels.items():
        path = f"spec.selector.matchLabels[{key}]"
        if not isinstance(key, str) or not key:
            raise _Invalid(path, "label names must be non-empty strings")
        parsed[key] = _string(label, path)
    return parsed


def parse_policy(document: Any, origin: str = "") -> AuthorizationPolicy:
    """Validate and convert one YAML document (already parsed) for L4 enforcement.

    Raises ``ValueError`` carrying ``path: problem`` when it is invalid or is not for
    ztunnel (AUDIT, CUSTOM, targetRef); :func:`judge_document` says what the loader
    does with such a document instead.
    """
    reason = _ignore_reason(document)
    if reason is not None:
        raise ValueError(f"{reason[0]}: {reason[1]}")
    try:
        return _parse_policy(document, origin)
    except _Invalid as invalid:
        raise ValueError(str(invalid)) from None


def _parse_policy(document: Any, origin: str) -> AuthorizationPolicy:
    top = _mapping(document, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    api_version = top.get("apiVersion")
    if api_version not in API_VERSIONS:
        raise _Invalid("apiVersion", f"{_shown(api_version)} is not supported "
                                     f"(use {' or '.join(sorted(API_VERSIONS))})")
    if top.get("kind") != "AuthorizationPolicy":
        raise _Invalid("kind", f"{_shown(top.get('kind'))} is not supported (use "
                               "AuthorizationPolicy; keep other resources out of the "
                               "policy directory)")
    if "metadata" not in top:
        raise _Invalid("metadata", "is required")
    name, namespace, dry_run = _parse_metadata(top["metadata"])
    spec = top.get("spec")
    if spec is None:
        spec = {}
    spec_fields = ("selector", "action", "rules", "targetRef", "targetRefs", "provider")
    spec = _mapping(spec, "spec", spec_fields)
    for waypoint_only in ("targetRef", "targetRefs"):
        # A present, non-empty one makes the document ignored (see _ignore_reason).
        if spec.get(waypoint_only) is not None and spec.get(waypoint_only) != []:
            raise _Invalid(f"spec.{waypoint_only}", "binds the policy to a waypoint")
    action_text = spec.get("action", "ALLOW")
    if action_text is None:
        action_text = "ALLOW"
    if action_text not in ("ALLOW", "DENY"):
        raise _Invalid("spec.action", f"{_shown(action_text)} is not an action: use ALLOW or DENY "
                                      "(AUDIT and CUSTOM are valid but not enforced by ztunnel)")
    if spec.get("provider") is not None:
        raise _Invalid("spec.provider", f"must only be set with action CUSTOM, found {action_text}")
    selector = _parse_selector(spec["selector"]) if spec.get("selector") is not None else None
    rules_value = spec.get("rules")
    rules = () if rules_value is None else tuple(
        _parse_rule(rule, f"spec.rules[{i}]", namespace)
        for i, rule in enumerate(_list(rules_value, "spec.rules")))
    return AuthorizationPolicy(name=name, namespace=namespace,
                               action=PolicyAction(action_text), selector=selector,
                               rules=rules, dry_run=dry_run, origin=origin)


# ------------------------------------------------------------------ judgement

def _ignore_reason(document: Any) -> tuple[str, str] | None:
    """(field, why) when istiod would send ztunnel nothing for this document, whatever
    the rest of it says (``convertAuthorizationPolicy``: targetRef first, then action).
    Only fields that read unambiguously count."""
    if not isinstance(document, dict) or document.get("kind") != "AuthorizationPolicy":
        return None
    if document.get("apiVersion") not in API_VERSIONS:
        return None
    spec = document.get("spec")
    if not isinstance(spec, dict):
        return None
    for field in ("targetRef", "targetRefs"):
        value = spec.get(field)
        if value is not None and value != []:
            return (f"spec.{field}",
                    "binds the policy to a waypoint or gateway: istiod sends it to that "
                    "proxy, never to ztunnel (ignored; use spec.selector for the node tunnel)")
    action = spec.get("action")
    if action in ("AUDIT", "CUSTOM"):
        return ("spec.action",
                f"ztunnel does not support the {action} action (ignored, as istiod does; "
                "a waypoint enforces it)")
    return None


def _readable_dry_run(document: Any) -> bool:
    """Whether the document is unambiguously a dry-run ``AuthorizationPolicy``."""
    if not (isinstance(document, dict) and document.get("kind") == "AuthorizationPolicy"
            and document.get("apiVersion") in API_VERSIONS):
        return False
    metadata = document.get("metadata")
    annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
    if not isinstance(annotations, dict):
        return False
    return parse_bool(annotations.get(DRY_RUN_ANNOTATION)) is True


def _readable_key(document: Any) -> tuple[str | None, str | None]:
    """(namespace, name) where each is a valid Kubernetes name, else None."""
    metadata = document.get("metadata") if isinstance(document, dict) else None
    if not isinstance(metadata, dict):
        return None, None
    namespace, name = metadata.get("namespace"), metadata.get("name")
    if not (isinstance(namespace, str) and _DNS_LABEL.match(namespace) and len(namespace) <= 63):
        namespace = None
    if not (isinstance(name, str) and _DNS_SUBDOMAIN.match(name) and len(name) <= 253):
        name = None
    return namespace, name


def _stand_in(document: Any, file_label: str, index: int | None, root_namespace: str,
              reason: str, item: int | None = None) -> tuple[AuthorizationPolicy, str]:
    """The fail-closed stand-in for an unreadable/invalid document, and its effect.

    Scope: the document's namespace when readable (mesh-wide for the root namespace or
    when unreadable), narrowed to its selector only when that selector is valid.
    Action: allow-nothing when the document is readably an AuthorizationPolicy with
    action ALLOW (an ALLOW can only add to what other ALLOW policies allow, so
    allow-nothing is never wider), else DENY-all.
    """
    namespace, _ = _readable_key(document)
    selector: Mapping[str, str] | None = None
    spec = document.get("spec", {}) if isinstance(document, dict) else None
    if namespace is not None and isinstance(spec, dict) and spec.get("selector") is not None:
        try:
            selector = _parse_selector(spec["selector"])
        except _Invalid:
            selector = None
    is_policy = (isinstance(document, dict) and document.get("kind") == "AuthorizationPolicy"
                 and document.get("apiVersion") in API_VERSIONS)
    is_allow = is_policy and (spec is None or (isinstance(spec, dict)
                                               and spec.get("action") in (None, "ALLOW")))
    where = file_label if index is None else f"{file_label}#{index}"
    origin = file_label if index is None else f"{file_label} document {index}"
    if item is not None:
        where, origin = f"{where}.items[{item}]", f"{origin} items[{item}]"
    name = f"{FAIL_CLOSED_NAME}[{where}]"
    scope_ns = namespace or root_namespace
    if scope_ns == root_namespace:
        scope = "every workload in the mesh"
    else:
        scope = f"workloads in namespace {scope_ns}"
    if selector is not None:
        labels = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        scope += f" labelled {labels or '(any)'}"
    if is_allow:
        policy = AuthorizationPolicy(name=name, namespace=scope_ns, action=PolicyAction.ALLOW,
                                     selector=selector, rules=(), origin=origin,
                                     stands_in_for=reason)
        effect = (f"an allow-nothing ALLOW for {scope} stands in for it "
                  "(only what other ALLOW policies allow gets through); fix the document")
    else:
        policy = deny_all_stand_in(reason, scope_ns, name, selector, origin)
        effect = f"every connection to {scope} is denied until it is fixed"
    return policy, effect


def _spiffe_principal_issues(policy: AuthorizationPolicy) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    hint = ("can never match: ztunnel compares principals with the peer's SPIFFE ID "
            "without 'spiffe://' (rbac.rs StringMatch::matches_principal); write it "
            "without the prefix")
    for r, rule in enumerate(policy.rules):
        for f, source in enumerate(rule.sources or ()):
            for field, matches in (("principals", source.principals),
                                   ("notPrincipals", source.not_principals)):
                for i, match in enumerate(matches):
                    if str(match).startswith(SPIFFE_SCHEME):
                        found.append((f"spec.rules[{r}].from[{f}].source.{field}[{i}]",
                                      f"{_shown(str(match))} {hint}"))
        for w, condition in enumerate(rule.conditions):
            if condition.key != "source.principal":
                continue
            for field, values in (("values", condition.values),
                                  ("notValues", condition.not_values)):
                for i, match in enumerate(values):
                    if str(match).startswith(SPIFFE_SCHEME):
                        found.append((f"spec.rules[{r}].when[{w}].{field}[{i}]",
                                      f"{_shown(str(match))} {hint}"))
    return found


def _deny_rule_can_match(rule: Rule) -> bool:
    """istiod's hasEffectiveRules for one DENY rule: no clause left all-empty."""
    if any(not c.is_l4 for c in rule.conditions):
        return False
    if rule.operations is not None and not any(o.has_l4 for o in rule.operations):
        return False
    return rule.sources is None or any(s.has_l4 for s in rule.sources)


def _conversion_warnings(policy: AuthorizationPolicy) -> list[tuple[str, str]]:
    """The status istiod writes when converting ``policy`` for ztunnel (the
    httpRuleFmt boilerplates of convertAuthorizationPolicy), plus never-matching
    principals."""
    warnings = []
    for index, rule in enumerate(policy.rules):
        fields = rule.unsupported_fields
        if not fields:
            continue
        listed = ", ".join(fields)
        if policy.action is PolicyAction.ALLOW:
            problem = (f"uses {listed}, which ztunnel cannot enforce: in an ALLOW policy the "
                       "rule is omitted (never matches), more restrictive than written; "
                       "use a waypoint for HTTP rules")
        elif _deny_rule_can_match(rule):
            problem = (f"uses {listed}, which ztunnel cannot enforce: the DENY rule is "
                       "enforced without them, more restrictive than written")
        else:
            problem = (f"uses {listed}, which ztunnel cannot enforce: after omitting them "
                       "this DENY rule has no enforceable match (ztunnel skips an empty "
                       "match) and has no effect at L4; use a waypoint and targetRefs")
        warnings.append((f"spec.rules[{index}]", problem))
    if (policy.action is PolicyAction.DENY and warnings
            and not any(_deny_rule_can_match(rule) for rule in policy.rules)):
        warnings.append(("spec.rules", "this DENY policy has no effect at ztunnel"))
    warnings.extend(_spiffe_principal_issues(policy))
    return warnings


def judge_document(document: Any, file_label: str, index: int,
                   root_namespace: str = DEFAULT_ROOT_NAMESPACE,
                   item: int | None = None) -> DocumentResult:
    """The outcome of one parsed YAML document (see the module docstring); ``item`` is
    its index in a ``kind: List`` document (``kubectl get -o yaml``), if it is one."""
    namespace, name = _readable_key(document)
    key = f"{namespace}/{name}" if namespace and name else None
    origin = f"{file_label} document {index}"
    prefix = ""
    if item is not None:
        origin, prefix = f"{origin} items[{item}]", f"items[{item}]"

    def issue(path: str, problem: str) -> PolicyIssue:
        full = f"{prefix}.{path}" if prefix and path else (prefix or path)
        return PolicyIssue(file_label, index, full, problem)

    reason = _ignore_reason(document)
    if reason is not None:
        return DocumentResult(file_label, index, key, DocumentOutcome.IGNORED,
                              (issue(*reason),), None, "not enforced by the node tunnel", item)
    try:
        policy = _parse_policy(document, origin)
    except _Invalid as invalid:
        problem = issue(invalid.path, invalid.problem)
        if _readable_dry_run(document):
            # A dry-run policy never changes a decision: dropping it widens nothing.
            return DocumentResult(file_label, index, key, DocumentOutcome.IGNORED, (problem,),
                                  None, "an invalid dry-run policy is dropped (fix it to see "
                                        "its dry-run matches)", item)
        stand_in, effect = _stand_in(document, file_label, index, root_namespace,
                                     str(problem), item)
        return DocumentResult(file_label, index, key, DocumentOutcome.FAIL_CLOSED, (problem,),
                              stand_in, effect, item)
    spec = document.get("spec") or {}
    if policy.action is PolicyAction.DENY and not spec.get("rules"):
        return DocumentResult(
            file_label, index, key, DocumentOutcome.IGNORED,
            (issue("spec.rules", "a DENY without rules never matches (Istio's validation "
                                 "rejects it); add `rules: [{}]` to deny everything"),),
            None, "it would never match", item)
    warnings = _conversion_warnings(policy)
    if warnings:
        return DocumentResult(file_label, index, key, DocumentOutcome.ACCEPTED_WITH_WARNINGS,
                              tuple(issue(path, problem) for path, problem in warnings),
                              policy, "enforced as ztunnel enforces it", item)
    return DocumentResult(file_label, index, key, DocumentOutcome.ACCEPTED, (), policy, "",
                          item)


# ------------------------------------------------------------------ YAML

class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate mapping keys (PyYAML keeps the last one
    silently; the Kubernetes API server rejects them)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # unhashable: construct_mapping reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {_shown(key)}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

_DOCUMENT_START = re.compile(r"^---(?=[ \t]|$)", re.MULTILINE)


def _split_documents(text: str) -> list[tuple[int, str]]:
    """(first line number - 1, text) of each ``---``-separated part. A document marker
    at column 0 cannot occur inside YAML content, so a syntax error in one part cannot
    hide the others."""
    starts = [m.start() for m in _DOCUMENT_START.finditer(text)]
    bounds = [0, *starts] if not starts or starts[0] != 0 else starts
    parts = []
    carried: tuple[int, str] | None = None  # directives/comments before a '---'
    for i, start in enumerate(bounds):
        end = bounds[i + 1] if i + 1 < len(bounds) else len(text)
        line, part = text.count("\n", 0, start), text[start:end]
        if carried is not None:
            line, part = carried[0], carried[1] + part
            carried = None
        if i + 1 < len(bounds) and all(
                not row.strip() or row.lstrip().startswith(("#", "%"))
                for row in part.splitlines()) and not part.startswith("---"):
            carried = (line, part)  # e.g. "%YAML 1.1": belongs to the next document
            continue
        parts.append((line, part))
    return parts


def _yaml_problem(error: yaml.YAMLError, line_offset: int) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1 + line_offset}, column {mark.column + 1}: " if mark else ""
    problem = getattr(error, "problem", None) or str(error)
    return f"{where}invalid YAML: {problem}"


def judge_text(text: str, file_label: str,
               root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> list[DocumentResult]:
    """Judge every document of one file's ``text`` (empty documents are skipped)."""
    return [result for result, _ in _judge_text(text, file_label, root_namespace)]


def _judge_text(text: str, file_label: str,
                root_namespace: str) -> list[tuple[DocumentResult, Any]]:
    """(result, parsed document or None) for each document of ``text``."""
    results: list[tuple[DocumentResult, Any]] = []
    index = 0
    for line_offset, part in _split_documents(text):
        try:
            documents = list(yaml.load_all(part, Loader=_StrictLoader))
        except yaml.YAMLError as error:
            index += 1
            problem = PolicyIssue(file_label, index, "", _yaml_problem(error, line_offset))
            stand_in, effect = _stand_in(None, file_label, index, root_namespace, str(problem))
            results.append((DocumentResult(file_label, index, None, DocumentOutcome.FAIL_CLOSED,
                                           (problem,), stand_in, effect), None))
            continue
        for document in documents:
            index += 1
            if document is None:
                continue
            items = _list_items(document)
            if items is None:
                results.append((judge_document(document, file_label, index, root_namespace),
                                document))
                continue
            for item, element in enumerate(items):
                results.append((judge_document(element, file_label, index, root_namespace,
                                               item), element))
    return results


def _list_items(document: Any) -> list[Any] | None:
    """The items of a well-formed Kubernetes ``v1 List`` (what ``kubectl get -o yaml``
    prints for several objects), else None (the document is judged as a policy)."""
    if not (isinstance(document, dict) and document.get("apiVersion") == "v1"
            and document.get("kind") == "List" and isinstance(document.get("items"), list)
            and set(document) <= {"apiVersion", "kind", "items", "metadata"}):
        return None
    return list(document["items"])


# ------------------------------------------------------------------ directory

def policy_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The policy files of ``directory``, sorted by name (hidden files skipped)."""
    root = Path(directory)
    return sorted(p for p in root.iterdir()
                  if p.suffix in POLICY_FILE_SUFFIXES and not p.name.startswith(".")
                  and p.is_file())


def _whole_failure(label: str, problem: str, root_namespace: str) -> DocumentResult:
    issue = PolicyIssue(label, None, "", problem)
    stand_in, effect = _stand_in(None, label, None, root_namespace, str(issue))
    return DocumentResult(label, None, None, DocumentOutcome.FAIL_CLOSED, (issue,), stand_in,
                          effect)


def _fail_duplicates(results: list[DocumentResult], documents: dict[int, Any],
                     root_namespace: str) -> list[DocumentResult]:
    """Every document sharing a key with another fails closed: which one the author
    meant is unknown, so none of them is trusted."""
    by_key: dict[str, list[int]] = {}
    for position, result in enumerate(results):
        if result.key is not None:
            by_key.setdefault(result.key, []).append(position)
    out = list(results)
    for key, positions in by_key.items():
        if len(positions) < 2:
            continue
        wheres = [results[p].where for p in positions]
        for position in positions:
            result = results[position]
            others = ", ".join(w for w in wheres if w != result.where)
            path = "metadata.name" if result.item is None else f"items[{result.item}].metadata.name"
            issue = PolicyIssue(result.file, result.document, path,
                                f"duplicate policy {key} (also defined in {others})")
            stand_in, effect = _stand_in(documents.get(position), result.file, result.document,
                                         root_namespace, str(issue), result.item)
            out[position] = DocumentResult(result.file, result.document, key,
                                           DocumentOutcome.FAIL_CLOSED,
                                           (*result.issues, issue), stand_in, effect,
                                           result.item)
    return out


def load_policy_report(directory: str | os.PathLike[str],
                       root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> LoadReport:
    """Judge every document in ``directory``; never raises for bad content.

    A missing directory means no policies (an empty set, ``directory_missing``); one
    that cannot be listed, and any file that cannot be read, fails closed mesh-wide.
    """
    root = Path(directory)
    try:
        files = policy_files(root)
    except FileNotFoundError:
        return LoadReport(PolicySet.empty(root_namespace), (), directory_missing=True)
    except OSError as error:
        failure = _whole_failure(str(root), f"cannot list the policy directory: {error}",
                                 root_namespace)
        return LoadReport(PolicySet([failure.policy] if failure.policy else [], root_namespace),
                          (failure,))
    results: list[DocumentResult] = []
    documents: dict[int, Any] = {}
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            results.append(_whole_failure(path.name, f"cannot read: {error}", root_namespace))
            continue
        for result, document in _judge_text(text, path.name, root_namespace):
            documents[len(results)] = document
            results.append(result)
    results = _fail_duplicates(results, documents, root_namespace)
    policies = [r.policy for r in results if r.policy is not None]
    return LoadReport(PolicySet(policies, root_namespace), tuple(results))


def load_policy_dir(directory: str | os.PathLike[str],
                    root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> PolicySet:
    """The set :func:`load_policy_report` puts in force (stand-ins included)."""
    return load_policy_report(directory, root_namespace).policies


Fingerprint = tuple[tuple[str, int, int], ...]


def directory_fingerprint(directory: str | os.PathLike[str]) -> Fingerprint | None:
    """(name, size, mtime_ns) of each policy file; None when the directory is missing,
    one ("", -1, errno) entry when it cannot be listed."""
    try:
        files = policy_files(directory)
    except FileNotFoundError:
        return None
    except OSError as error:
        return (("", -1, error.errno or 0),)
    entries = []
    for path in files:
        try:
            stat = path.stat()
        except OSError:
            continue  # removed between listing and stat: the next poll sees it
        entries.append((path.name, stat.st_size, stat.st_mtime_ns))
    return tuple(entries)


class PolicyWatcher:
    """Reloads a policy directory when it changes.

    ``current`` starts failed closed (:meth:`PolicySet.fail_closed`: every connection
    denied) until the first :meth:`poll` has read the directory: a set that has not
    been read never allows. Every read replaces the set: documents are judged one by
    one, so there is no "last good set" to fall back to; a bad document fails closed
    for its own scope only (see the module docstring). ``report`` is the last read's
    :class:`LoadReport` (per-document outcomes, counts), None before the first.
    """

    def __init__(self, directory: str | os.PathLike[str],
                 root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> None:
        self.directory = Path(directory)
        self.root_namespace = root_namespace
        self.current: PolicySet = PolicySet.fail_closed(
            "the policy directory has not been read yet", root_namespace)
        self.report: LoadReport | None = None
        self.loaded_once = False
        self._fingerprint: Fingerprint | None = None
        self._polled = False

    @property
    def last_error(self) -> PolicyLoadError | None:
        """The documents of the last read that failed closed, as one error."""
        return None if self.report is None else self.report.error

    def poll(self) -> PolicySet | None:
        """Re-read the directory if it changed: the new set, or None when unchanged.

        Side effects: reads the directory and its policy files; sets ``current``,
        ``report`` and ``loaded_once``.
        """
        fingerprint = directory_fingerprint(self.directory)
        if self._polled and fingerprint == self._fingerprint:
            return None
        self._polled = True
        self._fingerprint = fingerprint
        report = load_policy_report(self.directory, self.root_namespace)
        if directory_fingerprint(self.directory) != fingerprint:
            # Files changed while we read them: the next poll reloads the settled
            # contents (this set may mix old and new files).
            self._polled = False
        self.report = report
        self.current = report.policies
        self.loaded_once = True
        return report.policies


__all__ = [
    "API_VERSIONS",
    "PolicyIssue",
    "PolicyLoadError",
    "PolicyWatcher",
    "directory_fingerprint",
    "judge_document",
    "judge_text",
    "load_policy_dir",
    "load_policy_report",
    "parse_bool",
    "parse_policy",
    "policy_files",
]
