"""Data model of L4 authorization: parsed policies, connection requests and decisions.

Everything here is immutable and free of I/O. The loader (:mod:`agent.policy.loader`)
turns Istio ``AuthorizationPolicy`` YAML into these objects; the engine
(:mod:`agent.policy.engine`) evaluates them.

The shapes mirror what ztunnel receives from istiod for an AuthorizationPolicy:
a rule is an AND of clauses (its ``from`` list, its ``to`` list, each ``when``
condition), a clause is an OR of entries, and an entry is an AND of its fields,
where a positive field matches if ANY value matches and a ``not*`` field matches
if NO value matches.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]  # noqa: UP007 (py3.10 alias)
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]  # noqa: UP007

SPIFFE_SCHEME = "spiffe://"
DEFAULT_ROOT_NAMESPACE = "istio-system"
DRY_RUN_ANNOTATION = "istio.io/dry-run"


class PolicyAction(str, enum.Enum):
    """What a policy does when one of its rules matches."""

    ALLOW = "ALLOW"
    DENY = "DENY"

    def __str__(self) -> str:
        return self.value


class StringMatchKind(str, enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"


@dataclass(frozen=True)
class StringMatch:
    """Istio's string matching for principals and namespaces.

    ``"*"`` matches any non-empty value, ``"abc*"`` is a prefix match, ``"*abc"`` a
    suffix match, anything else is exact (Istio allows one ``*`` at either end only).
    """

    kind: StringMatchKind
    value: str = ""

    @classmethod
    def parse(cls, pattern: str) -> StringMatch:
        if pattern == "*":
            return cls(StringMatchKind.PRESENCE)
        if pattern.startswith("*"):
            return cls(StringMatchKind.SUFFIX, pattern[1:])
        if pattern.endswith("*"):
            return cls(StringMatchKind.PREFIX, pattern[:-1])
        return cls(StringMatchKind.EXACT, pattern)

    def matches(self, candidate: str) -> bool:
        if self.kind is StringMatchKind.PRESENCE:
            return candidate != ""
        if self.kind is StringMatchKind.PREFIX:
            return candidate.startswith(self.value)
        if self.kind is StringMatchKind.SUFFIX:
            return candidate.endswith(self.value)
        return candidate == self.value

    def __str__(self) -> str:
        if self.kind is StringMatchKind.PRESENCE:
            return "*"
        if self.kind is StringMatchKind.PREFIX:
            return f"{self.value}*"
        if self.kind is StringMatchKind.SUFFIX:
            return f"*{self.value}"
        return self.value


@dataclass(frozen=True)
class ServiceAccountMatch:
    """``serviceAccounts`` entry: ``ns/sa``, or ``sa`` in the policy's own namespace."""

    namespace: str
    service_account: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.service_account}"


@dataclass(frozen=True)
class SourceMatch:
    """One ``rules[].from[].source`` entry.

    The L4 fields are kept; ``unsupported_fields`` names the fields ztunnel cannot
    enforce (HTTP-only ones, and ``trustDomains``/``notTrustDomains``, which istiod
    does not convert for ztunnel).
    """

    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    ip_blocks: tuple[IPNetwork, ...] = ()
    not_ip_blocks: tuple[IPNetwork, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    unsupported_fields: tuple[str, ...] = ()

    @property
    def has_l4(self) -> bool:
        """Whether any field ztunnel evaluates is set. An entry without one is the
        empty ``Match`` istiod sends, which ztunnel skips (it matches nothing)."""
        return bool(self.principals or self.not_principals or self.namespaces
                    or self.not_namespaces or self.ip_blocks or self.not_ip_blocks
                    or self.service_accounts or self.not_service_accounts)


@dataclass(frozen=True)
class OperationMatch:
    """One ``rules[].to[].operation`` entry (ports; HTTP-only fields listed by name)."""

    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    unsupported_fields: tuple[str, ...] = ()

    @property
    def has_l4(self) -> bool:
        """Whether ports/notPorts are set (else ztunnel skips the emptied match)."""
        return bool(self.ports or self.not_ports)


# ``when`` keys ztunnel can evaluate at L4, and what each compares against.
L4_CONDITION_KEYS = frozenset({
    "source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port",
})


@dataclass(frozen=True)
class Condition:
    """One ``rules[].when[]`` entry. ``values``/``not_values`` are typed by ``key``:
    IP networks for ``*.ip``, ints for ``destination.port``, :class:`StringMatch`
    for ``source.namespace``/``source.principal``, raw strings for L7 keys."""

    key: str
    values: tuple[Any, ...] = ()
    not_values: tuple[Any, ...] = ()

    @property
    def is_l4(self) -> bool:
        return self.key in L4_CONDITION_KEYS


@dataclass(frozen=True)
class Rule:
    """One ``spec.rules[]`` entry. ``sources``/``operations`` are None when the
    ``from``/``to`` key is absent (no constraint)."""

    sources: tuple[SourceMatch, ...] | None = None
    operations: tuple[OperationMatch, ...] | None = None
    conditions: tuple[Condition, ...] = ()

    @property
    def unsupported_fields(self) -> tuple[str, ...]:
        """Names of the attributes this rule uses that ztunnel cannot evaluate at L4
        (HTTP-only ones, ``trustDomains``, non-L4 ``when`` keys)."""
        found: list[str] = []
        for source in self.sources or ():
            found.extend(f"from.source.{name}" for name in source.unsupported_fields)
        for operation in self.operations or ():
            found.extend(f"to.operation.{name}" for name in operation.unsupported_fields)
        found.extend(f"when[{c.key}]" for c in self.conditions if not c.is_l4)
        return tuple(dict.fromkeys(found))


def _frozen_labels(labels: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(labels or {}))


@dataclass(frozen=True)
class AuthorizationPolicy:
    """A validated ``AuthorizationPolicy``.

    ``selector`` None means no ``spec.selector`` (namespace- or mesh-wide);
    ``origin`` says where it was loaded from (``file.yaml document 2``) for explanations.
    ``stands_in_for`` is set on the fail-closed stand-ins the loader puts in place of a
    document it could not read or validate: why, so decisions and explanations say so.
    """

    name: str
    namespace: str
    action: PolicyAction = PolicyAction.ALLOW
    selector: Mapping[str, str] | None = None
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False
    origin: str = ""
    stands_in_for: str = ""

    def __post_init__(self) -> None:
        if self.selector is not None and not isinstance(self.selector, MappingProxyType):
            object.__setattr__(self, "selector", _frozen_labels(self.selector))

    @property
    def key(self) -> str:
        """``namespace/name``, as ztunnel names policies in logs and errors."""
        return f"{self.namespace}/{self.name}"

    def __hash__(self) -> int:
        return hash((self.namespace, self.name))


@dataclass(frozen=True)
class WorkloadRef:
    """The destination workload: its name, namespace and labels (for selectors)."""

    name: str
    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.labels, MappingProxyType):
            object.__setattr__(self, "labels", _frozen_labels(self.labels))

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __hash__(self) -> int:
        return hash((self.name, self.namespace, tuple(sorted(self.labels.items()))))


def normalize_ip(value: str | IPAddress) -> IPAddress:
    """Parse an address; IPv4-mapped IPv6 (``::ffff:10.0.0.1``) becomes plain IPv4,
    so dual-stack sockets compare equal to IPv4 ``ipBlocks``."""
    address = ipaddress.ip_address(value) if isinstance(value, str) else value
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class SourceIdentity:
    """Parts of a SPIFFE ID the rules compare against.

    ``principal`` is the ID without ``spiffe://`` (``td/ns/foo/sa/bar``), the form
    Istio's ``principals`` are written in. ``namespace``/``service_account`` are
    empty when the ID is not in Istio's ``/ns/<ns>/sa/<sa>`` shape.
    """

    uri: str
    principal: str
    namespace: str
    service_account: str

    @classmethod
    def parse(cls, uri: str) -> SourceIdentity:
        if not uri.startswith(SPIFFE_SCHEME) or len(uri) == len(SPIFFE_SCHEME):
            raise ValueError(f"source identity must be a SPIFFE ID (spiffe://...), got {uri!r}")
        principal = uri[len(SPIFFE_SCHEME):]
        parts = principal.split("/")
        if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa" and parts[2] and parts[4]:
            return cls(uri, principal, parts[2], parts[4])
        return cls(uri, principal, "", "")


@dataclass(frozen=True)
class ConnectionRequest:
    """A connection arriving at ``dst_workload``.

    ``src_identity`` is the peer's SPIFFE ID from mTLS, or None for plaintext.
    ``src_ip`` may be None only in offline checks where the client address is
    unknown; then ``ipBlocks`` never match and ``notIpBlocks`` never exclude.
    Strings are accepted for addresses and normalised.
    """

    src_ip: IPAddress | None
    src_identity: str | None
    dst_ip: IPAddress
    dst_port: int
    dst_workload: WorkloadRef

    def __post_init__(self) -> None:
        if self.src_ip is not None:
            object.__setattr__(self, "src_ip", normalize_ip(self.src_ip))
        object.__setattr__(self, "dst_ip", normalize_ip(self.dst_ip))
        if not isinstance(self.dst_port, int) or not 0 <= self.dst_port <= 65535:
            raise ValueError(f"dst_port must be an int in 0..65535, got {self.dst_port!r}")
        if self.src_identity is not None:
            SourceIdentity.parse(self.src_identity)  # validate early

    @property
    def identity(self) -> SourceIdentity | None:
        return None if self.src_identity is None else SourceIdentity.parse(self.src_identity)


@dataclass(frozen=True)
class DryRunMatch:
    """A dry-run policy that matched: it would have decided ``action``."""

    policy: str
    action: PolicyAction
    rule_index: int


@dataclass(frozen=True)
class Decision:
    """The outcome of evaluating a connection.

    ``policy``/``action``/``rule_index`` name the enforced policy that decided, or are
    None when the default applied (no ALLOW policy: allowed; ALLOW policies but none
    matched: denied). ``dry_run_matches`` lists matching dry-run policies, and
    ``dry_run_allowed`` is what the decision would be were they enforced.
    """

    allowed: bool
    policy: str | None
    action: PolicyAction | None
    reason: str
    rule_index: int | None = None
    dry_run_matches: tuple[DryRunMatch, ...] = ()
    dry_run_allowed: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "policy": self.policy,
            "action": None if self.action is None else self.action.value,
            "rule_index": self.rule_index,
            "reason": self.reason,
            "dry_run_matches": [
                {"policy": m.policy, "action": m.action.value, "rule_index": m.rule_index}
                for m in self.dry_run_matches
            ],
            "dry_run_allowed": self.dry_run_allowed,
        }
