"""What the loader made of each policy document (pure data, no I/O).

Every document in the policy directory gets one :class:`DocumentResult`; a
:class:`LoadReport` holds them with the :class:`~agent.policy.engine.PolicySet` they
produced. The outcomes follow what istiod does when it converts an
``AuthorizationPolicy`` for ztunnel (``convertAuthorizationPolicy`` in istio
``pilot/pkg/serviceregistry/ambient/authorization.go``), plus one outcome istiod does
not need because its validation webhook keeps unreadable objects out of the cluster:
:attr:`DocumentOutcome.FAIL_CLOSED`. docs/policy.md has the case-by-case table.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from agent.policy.engine import PolicySet
from agent.policy.model import AuthorizationPolicy


class DocumentOutcome(str, enum.Enum):
    """How one document is enforced."""

    #: Converted exactly; enforced as written.
    ACCEPTED = "accepted"
    #: Converted with a warning, as istiod accepts it with an ``UnsupportedValue``
    #: status: attributes ztunnel cannot see are dropped (more restrictive), or a value
    #: can never match (a principal written with ``spiffe://``).
    ACCEPTED_WITH_WARNINGS = "accepted_with_warnings"
    #: Not for the node tunnel: istiod sends ztunnel nothing for it (action AUDIT or
    #: CUSTOM, bound to a waypoint by targetRef/targetRefs, a DENY without rules).
    IGNORED = "ignored"
    #: Unreadable or invalid (what Istio's validation rejects): replaced by a stand-in
    #: that is never wider than anything the document could mean: DENY-all for its
    #: scope, or allow-nothing when it is readably an ALLOW.
    FAIL_CLOSED = "fail_closed"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class PolicyIssue:
    """One problem: where (file, 1-based document, field path) and what."""

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


@dataclass(frozen=True)
class DocumentResult:
    """One document (``document`` None: a whole file or the directory; ``item``: its
    index in a ``kind: List`` document) and its fate.

    ``policy`` is what is enforced for it: the converted policy, its fail-closed
    stand-in, or None when ignored. ``effect`` says in words what is enforced and
    what to do about it (it ends up in logs and ``meshagent policy validate``).
    """

    file: str
    document: int | None
    key: str | None
    outcome: DocumentOutcome
    issues: tuple[PolicyIssue, ...] = ()
    policy: AuthorizationPolicy | None = None
    effect: str = ""
    item: int | None = None

    @property
    def where(self) -> str:
        where = self.file if self.document is None else f"{self.file} document {self.document}"
        return where if self.item is None else f"{where} items[{self.item}]"

    def __str__(self) -> str:
        name = f" ({self.key})" if self.key else ""
        lines = [f"{self.where}{name}: {self.outcome.value}"
                 + (f": {self.effect}" if self.effect else "")]
        lines.extend(f"  {issue}" for issue in self.issues)
        return "\n".join(lines)


class PolicyLoadError(Exception):
    """Documents that fail closed (each replaced by a stand-in), as one error: what the
    tunnel reports as ``policy_error``. Nothing is ever silently dropped."""

    def __init__(self, issues: Sequence[PolicyIssue]) -> None:
        self.issues: tuple[PolicyIssue, ...] = tuple(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))

    @property
    def first(self) -> PolicyIssue:
        return self.issues[0]


@dataclass(frozen=True)
class LoadReport:
    """A loaded directory: the set in force and every document's outcome.

    ``directory_missing``: the directory does not exist, which means "no policies"
    (an empty set), not an error.
    """

    policies: PolicySet
    documents: tuple[DocumentResult, ...] = ()
    directory_missing: bool = False

    def counts(self) -> dict[DocumentOutcome, int]:
        """Documents per outcome (every outcome present, zeros included)."""
        counts = dict.fromkeys(DocumentOutcome, 0)
        for result in self.documents:
            counts[result.outcome] += 1
        return counts

    @property
    def problems(self) -> tuple[DocumentResult, ...]:
        """Documents not enforced exactly as written (to log and show)."""
        return tuple(r for r in self.documents if r.outcome is not DocumentOutcome.ACCEPTED)

    @property
    def failed_closed(self) -> tuple[DocumentResult, ...]:
        return tuple(r for r in self.documents if r.outcome is DocumentOutcome.FAIL_CLOSED)

    @property
    def error(self) -> PolicyLoadError | None:
        """The fail-closed documents' issues as one error, or None when there are none."""
        issues = [issue for result in self.failed_closed for issue in result.issues]
        return PolicyLoadError(issues) if issues else None
