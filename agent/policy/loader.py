"""Load and strictly validate AuthorizationPolicy YAML files into a :class:`PolicySet`.

Every ``*.yaml``/``*.yml`` in a directory is read (several documents per file allowed,
separated by ``---``). Validation is strict and all-or-nothing: unknown fields, wrong
types, bad CIDRs or ports, unsupported actions, duplicates... any problem rejects the
whole set with :class:`PolicyLoadError`, whose message names the file, the 1-based
document index and the field path, e.g.::

    deny.yaml: document 2: spec.rules[0].from[0].source.ipBlocks[1]: '10.0.0.300/8' is not a CIDR

:class:`PolicyWatcher` re-reads the directory when its files change (names, sizes,
mtimes) and keeps the last good set when the new one is invalid. It has no thread or
event loop of its own: the caller invokes :meth:`PolicyWatcher.poll` periodically.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.identity.spiffe import SCHEME
from agent.policy.engine import PolicySet
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

API_VERSIONS = frozenset({"security.istio.io/v1", "security.istio.io/v1beta1"})
POLICY_FILE_SUFFIXES = (".yaml", ".yml")

# Kubernetes ObjectMeta fields tolerated (e.g. from `kubectl get -o yaml`), unused here.
_IGNORED_METADATA = frozenset({"labels", "uid", "resourceVersion", "generation",
                               "creationTimestamp", "managedFields"})
_L7_SOURCE_FIELDS = ("requestPrincipals", "notRequestPrincipals",
                     "remoteIpBlocks", "notRemoteIpBlocks")
_L7_OPERATION_FIELDS = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
# `when` keys Istio accepts that only an HTTP proxy can evaluate.
_L7_CONDITION_KEYS = frozenset({"remote.ip", "request.auth.principal",
                                "request.auth.audiences", "request.auth.presenter",
                                "connection.sni"})
_L7_CONDITION_PREFIXES = ("request.headers[", "request.auth.claims[",
                          "experimental.envoy.filters.")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


@dataclass(frozen=True)
class PolicyIssue:
    """One validation problem: where (file, 1-based document, field path) and what."""

    file: str
    document: int | None
    path: str
    problem: str

    def __str__(self) -> str:
        parts = [self.file]
        if self.document is not None:
            parts.append(f"document {self.document}")
        if self.path:
            parts.append(self.path)
        parts.append(self.problem)
        return ": ".join(parts)


class PolicyLoadError(Exception):
    """The policy files are invalid; nothing from them was accepted."""

    def __init__(self, issues: Sequence[PolicyIssue]) -> None:
        self.issues: tuple[PolicyIssue, ...] = tuple(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))

    @property
    def first(self) -> PolicyIssue:
        return self.issues[0]


class _Invalid(Exception):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


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
        raise _Invalid(path, f"{pattern!r}: '*' is only allowed once, at the start or the end")
    if field in ("principals", "source.principal") and pattern.startswith(SCHEME):
        raise _Invalid(path, f"{pattern!r}: write principals without 'spiffe://' "
                             "(e.g. cluster.local/ns/default/sa/sleep)")
    return StringMatch.parse(pattern)


def _string_matches(value: Any, path: str, field: str) -> tuple[StringMatch, ...]:
    return tuple(_string_match(item, f"{path}[{i}]", field)
                 for i, item in enumerate(_list(value, path)))


def _cidr(value: Any, path: str) -> IPNetwork:
    text = _string(value, path)
    try:
        # Like istiod (netip.ParsePrefix): host bits may be set; a bare IP is a /32 or /128.
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise _Invalid(path, f"{text!r} is not a CIDR") from None


def _cidrs(value: Any, path: str) -> tuple[IPNetwork, ...]:
    return tuple(_cidr(item, f"{path}[{i}]") for i, item in enumerate(_list(value, path)))


def _port(value: Any, path: str) -> int:
    # Istio writes ports as strings ("8080"); YAML integers are accepted too.
    if isinstance(value, bool):
        raise _Invalid(path, f"{value!r} is not a port")
    if isinstance(value, int):
        port = value
    elif isinstance(value, str) and value.isdigit() and value.isascii():
        port = int(value)
    else:
        raise _Invalid(path, f"{value!r} is not a port (an integer 1..65535)")
    if not 1 <= port <= 65535:
        raise _Invalid(path, f"{value!r} is not a port (an integer 1..65535)")
    return port


def _ports(value: Any, path: str) -> tuple[int, ...]:
    return tuple(_port(item, f"{path}[{i}]") for i, item in enumerate(_list(value, path)))


def _service_accounts(value: Any, path: str, policy_namespace: str
                      ) -> tuple[ServiceAccountMatch, ...]:
    accounts = []
    for i, item in enumerate(_list(value, path)):
        item_path = f"{path}[{i}]"
        text = _string(item, item_path)
        namespace, slash, account = text.rpartition("/")
        if not slash:
            namespace = policy_namespace
        if "*" in text or not account or not namespace or "/" in namespace:
            raise _Invalid(item_path, f"{text!r} is not a service account "
                                      "('<namespace>/<name>' or '<name>', no wildcards)")
        accounts.append(ServiceAccountMatch(namespace, account))
    return tuple(accounts)


def _non_empty(value: Any, path: str) -> None:
    if not value:
        raise _Invalid(path, "must not be empty")


_SOURCE_FIELDS = ("principals", "notPrincipals", "namespaces", "notNamespaces", "ipBlocks",
                  "notIpBlocks", "serviceAccounts", "notServiceAccounts", *_L7_SOURCE_FIELDS)


def _parse_source(value: Any, path: str, policy_namespace: str) -> SourceMatch:
    source = _mapping(value, path, _SOURCE_FIELDS)
    if not source:
        raise _Invalid(path, "must not be empty (omit 'from' to match any source)")
    has_principals = "principals" in source or "notPrincipals" in source
    if has_principals and ("serviceAccounts" in source or "notServiceAccounts" in source):
        raise _Invalid(path, "serviceAccounts/notServiceAccounts cannot be combined with "
                             "principals/notPrincipals in one source")
    for name in _L7_SOURCE_FIELDS:
        if name in source:
            _strings(source[name], f"{path}.{name}")

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
        l7_fields=tuple(name for name in _L7_SOURCE_FIELDS if source.get(name)),
    )


def _parse_operation(value: Any, path: str) -> OperationMatch:
    operation = _mapping(value, path, ("ports", "notPorts", *_L7_OPERATION_FIELDS))
    if not operation:
        raise _Invalid(path, "must not be empty (omit 'to' to match any operation)")
    for name in _L7_OPERATION_FIELDS:
        if name in operation:
            _strings(operation[name], f"{path}.{name}")
    return OperationMatch(
        ports=_ports(operation.get("ports", []), f"{path}.ports"),
        not_ports=_ports(operation.get("notPorts", []), f"{path}.notPorts"),
        l7_fields=tuple(name for name in _L7_OPERATION_FIELDS if operation.get(name)),
    )


def _condition_values(key: str, values: Any, path: str) -> tuple[Any, ...]:
    if key in ("source.ip", "destination.ip"):
        return _cidrs(values, path)
    if key == "destination.port":
        return _ports(values, path)
    if key in ("source.principal", "source.namespace"):
        return _string_matches(values, path, key)
    return tuple(_strings(values, path))


def _parse_condition(value: Any, path: str) -> Condition:
    condition = _mapping(value, path, ("key", "values", "notValues"))
    if "key" not in condition:
        raise _Invalid(f"{path}.key", "is required")
    key = _string(condition["key"], f"{path}.key")
    known = (key in L4_CONDITION_KEYS or key in _L7_CONDITION_KEYS
             or (key.startswith(_L7_CONDITION_PREFIXES) and key.endswith("]")))
    if not known:
        raise _Invalid(f"{path}.key", f"unknown condition key {key!r} "
                                      f"(L4 keys: {', '.join(sorted(L4_CONDITION_KEYS))})")
    if not condition.get("values") and not condition.get("notValues"):
        raise _Invalid(path, f"values or notValues must be set for key {key!r}")
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
        raise _Invalid("metadata.name", f"{name!r} is not a valid Kubernetes name")
    if not _DNS_LABEL.match(namespace) or len(namespace) > 63:
        raise _Invalid("metadata.namespace", f"{namespace!r} is not a valid namespace")
    annotations = metadata.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise _Invalid("metadata.annotations",
                       f"must be a mapping, got {_type_name(annotations)}")
    for key, annotation in annotations.items():
        _string(annotation, f"metadata.annotations[{key}]")
    dry_run_text = annotations.get(DRY_RUN_ANNOTATION, "false")
    if dry_run_text.lower() not in ("true", "false"):
        raise _Invalid(f"metadata.annotations[{DRY_RUN_ANNOTATION}]",
                       f"{dry_run_text!r} must be \"true\" or \"false\"")
    return name, namespace, dry_run_text.lower() == "true"


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
    """Validate one YAML document (already parsed) into an :class:`AuthorizationPolicy`.

    Raises ``ValueError`` carrying ``path: problem`` (see :func:`load_policy_documents`
    for errors naming the file and document too).
    """
    try:
        return _parse_policy(document, origin)
    except _Invalid as invalid:
        raise ValueError(str(invalid)) from None


def _parse_policy(document: Any, origin: str) -> AuthorizationPolicy:
    top = _mapping(document, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    api_version = top.get("apiVersion")
    if api_version not in API_VERSIONS:
        raise _Invalid("apiVersion", f"{api_version!r} is not supported "
                                     f"(use {' or '.join(sorted(API_VERSIONS))})")
    if top.get("kind") != "AuthorizationPolicy":
        raise _Invalid("kind", f"{top.get('kind')!r} is not supported (use AuthorizationPolicy)")
    if "metadata" not in top:
        raise _Invalid("metadata", "is required")
    name, namespace, dry_run = _parse_metadata(top["metadata"])
    spec = top.get("spec")
    if spec is None:
        spec = {}
    spec_fields = ("selector", "action", "rules", "targetRef", "targetRefs", "provider")
    spec = _mapping(spec, "spec", spec_fields)
    for waypoint_only in ("targetRef", "targetRefs"):
        if waypoint_only in spec:
            raise _Invalid(f"spec.{waypoint_only}",
                           "is not supported at L4 (it targets waypoints/gateways; use selector)")
    if "provider" in spec:
        raise _Invalid("spec.provider", "is not supported (CUSTOM action is not enforced at L4)")
    action_text = spec.get("action", "ALLOW")
    if action_text not in ("ALLOW", "DENY"):
        extra = (" (AUDIT/CUSTOM are not enforced at L4)"
                 if action_text in ("AUDIT", "CUSTOM") else "")
        raise _Invalid("spec.action", f"{action_text!r} is not a supported action: "
                                      f"use ALLOW or DENY{extra}")
    selector = _parse_selector(spec["selector"]) if "selector" in spec else None
    rules_value = spec.get("rules")
    rules = () if rules_value is None else tuple(
        _parse_rule(rule, f"spec.rules[{i}]", namespace)
        for i, rule in enumerate(_list(rules_value, "spec.rules")))
    return AuthorizationPolicy(name=name, namespace=namespace,
                               action=PolicyAction(action_text), selector=selector,
                               rules=rules, dry_run=dry_run, origin=origin)


def load_policy_documents(text: str, file_label: str) -> list[AuthorizationPolicy]:
    """Parse every document of one file's ``text``; errors name ``file_label``."""
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise PolicyLoadError([PolicyIssue(file_label, None, "",
                                           f"{where}invalid YAML: {problem}")]) from None
    policies, issues = [], []
    for index, document in enumerate(documents, start=1):
        if document is None:
            continue  # empty document (e.g. a trailing '---')
        try:
            policies.append(_parse_policy(document, f"{file_label} document {index}"))
        except _Invalid as invalid:
            issues.append(PolicyIssue(file_label, index, invalid.path, invalid.problem))
    if issues:
        raise PolicyLoadError(issues)
    return policies


def policy_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The policy files of ``directory``, sorted by name (hidden files skipped)."""
    root = Path(directory)
    return sorted(p for p in root.iterdir()
                  if p.suffix in POLICY_FILE_SUFFIXES and not p.name.startswith(".")
                  and p.is_file())


def load_policy_dir(directory: str | os.PathLike[str],
                    root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> PolicySet:
    """Load every policy file in ``directory``; any problem rejects the whole set."""
    root = Path(directory)
    if not root.is_dir():
        raise PolicyLoadError([PolicyIssue(str(root), None, "", "is not a directory")])
    issues: list[PolicyIssue] = []
    policies: list[AuthorizationPolicy] = []
    for path in policy_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            issues.append(PolicyIssue(path.name, None, "", f"cannot read: {error}"))
            continue
        try:
            policies.extend(load_policy_documents(text, path.name))
        except PolicyLoadError as error:
            issues.extend(error.issues)
    seen: dict[str, str] = {}
    for policy in policies:
        if policy.key in seen:
            file_label, _, document = policy.origin.rpartition(" document ")
            issues.append(PolicyIssue(file_label, int(document), "metadata.name",
                                      f"duplicate policy {policy.key} "
                                      f"(already defined in {seen[policy.key]})"))
        else:
            seen[policy.key] = policy.origin
    if issues:
        raise PolicyLoadError(issues)
    return PolicySet(policies, root_namespace)


Fingerprint = tuple[tuple[str, int, int], ...]


def directory_fingerprint(directory: str | os.PathLike[str]) -> Fingerprint | None:
    """(name, size, mtime_ns) of each policy file; None when the directory is missing."""
    try:
        files = policy_files(directory)
    except OSError:
        return None
    entries = []
    for path in files:
        try:
            stat = path.stat()
        except OSError:
            continue  # removed between listing and stat: the next poll sees it
        entries.append((path.name, stat.st_size, stat.st_mtime_ns))
    return tuple(entries)


class PolicyWatcher:
    """Reloads a policy directory when it changes; keeps the last good set.

    ``current`` starts empty (allow all) until the first successful load. Call
    :meth:`poll` periodically: it returns the new :class:`PolicySet` when the files
    changed and are valid, else None (unchanged, or invalid: see ``last_error``).
    """

    def __init__(self, directory: str | os.PathLike[str],
                 root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> None:
        self.directory = Path(directory)
        self.root_namespace = root_namespace
        self.current: PolicySet = PolicySet.empty(root_namespace)
        self.last_error: PolicyLoadError | None = None
        self.loaded_once = False
        self._fingerprint: Fingerprint | None = None
        self._polled = False

    def poll(self) -> PolicySet | None:
        fingerprint = directory_fingerprint(self.directory)
        if self._polled and fingerprint == self._fingerprint:
            return None
        self._polled = True
        self._fingerprint = fingerprint
        try:
            policies = load_policy_dir(self.directory, self.root_namespace)
        except PolicyLoadError as error:
            self.last_error = error
            return None
        if directory_fingerprint(self.directory) != fingerprint:
            # Files changed while we read them: the next poll reloads the settled
            # contents (this set may mix old and new files).
            self._polled = False
        self.current = policies
        self.last_error = None
        self.loaded_once = True
        return policies
