"""L4 authorization: Istio AuthorizationPolicy evaluated the way ztunnel does.

Public API::

    from agent.policy import (PolicySet, ConnectionRequest, WorkloadRef, Decision,
                              load_policy_dir, PolicyWatcher, PolicyLoadError, explain)

    watcher = PolicyWatcher("/etc/meshagent/policies")   # call watcher.poll() periodically
    decision = watcher.current.evaluate(ConnectionRequest(
        src_ip="10.0.0.5", src_identity="spiffe://cluster.local/ns/foo/sa/sleep",
        dst_ip="10.0.1.7", dst_port=8080,
        dst_workload=WorkloadRef("httpbin", "foo", {"app": "httpbin"})))
    if not decision.allowed: ...   # decision.policy / .reason / .dry_run_matches

Semantics are documented in :mod:`agent.policy.engine`. Everything but the loader is
pure (no I/O, no asyncio).
"""

from agent.policy.engine import Evaluation, PolicyResult, PolicySet, RuleResult, policy_applies
from agent.policy.explain import explain, render
from agent.policy.loader import (
    PolicyIssue,
    PolicyLoadError,
    PolicyWatcher,
    load_policy_dir,
    load_policy_documents,
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

__all__ = [
    "DEFAULT_ROOT_NAMESPACE",
    "DRY_RUN_ANNOTATION",
    "AuthorizationPolicy",
    "ConnectionRequest",
    "Decision",
    "DryRunMatch",
    "Evaluation",
    "PolicyAction",
    "PolicyIssue",
    "PolicyLoadError",
    "PolicyResult",
    "PolicySet",
    "PolicyWatcher",
    "RuleResult",
    "WorkloadRef",
    "explain",
    "load_policy_dir",
    "load_policy_documents",
    "parse_policy",
    "policy_applies",
    "render",
]
