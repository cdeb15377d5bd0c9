"""L4 authorization: Istio AuthorizationPolicy evaluated the way ztunnel does.

Public API::

    from agent.policy import (PolicySet, ConnectionRequest, WorkloadRef, Decision,
                              load_policy_report, PolicyWatcher, explain)

    watcher = PolicyWatcher("/etc/meshagent/policies")   # denies all until the first poll
    watcher.poll()                                       # then call it periodically
    for result in watcher.report.problems: ...           # per-document outcomes to log
    decision = watcher.current.evaluate(ConnectionRequest(
        src_ip="10.0.0.5", src_identity="spiffe://cluster.local/ns/foo/sa/sleep",
        dst_ip="10.0.1.7", dst_port=8080,
        dst_workload=WorkloadRef("httpbin", "foo", {"app": "httpbin"})))
    if not decision.allowed: ...   # decision.policy / .reason / .dry_run_matches

Semantics are documented in :mod:`agent.policy.engine`, how documents are judged in
:mod:`agent.policy.loader`, both case by case in docs/policy.md. Everything but the
loader and :mod:`agent.policy.metrics` is pure (no I/O, no asyncio).
"""

from agent.policy.engine import Evaluation, PolicyResult, PolicySet, RuleResult, policy_applies
from agent.policy.explain import explain, render
from agent.policy.loader import (
    PolicyWatcher,
    judge_document,
    judge_text,
    load_policy_dir,
    load_policy_report,
    parse_policy,
)
from agent.policy.model import (
    DEFAULT_ROOT_NAMESPACE,
    DRY_RUN_ANNOTATION,
    AuthorizationPolicy,
    ConnectionRequest,
    Decision,
    DryRunMatch,
    PolicyAction,
    WorkloadRef,
)
from agent.policy.outcomes import (
    DocumentOutcome,
    DocumentResult,
    LoadReport,
    PolicyIssue,
    PolicyLoadError,
)

__all__ = [
    "DEFAULT_ROOT_NAMESPACE",
    "DRY_RUN_ANNOTATION",
    "AuthorizationPolicy",
    "ConnectionRequest",
    "Decision",
    "DocumentOutcome",
    "DocumentResult",
    "DryRunMatch",
    "Evaluation",
    "LoadReport",
    "PolicyAction",
    "PolicyIssue",
    "PolicyLoadError",
    "PolicyResult",
    "PolicySet",
    "PolicyWatcher",
    "RuleResult",
    "WorkloadRef",
    "explain",
    "judge_document",
    "judge_text",
    "load_policy_dir",
    "load_policy_report",
    "parse_policy",
    "policy_applies",
    "render",
]
