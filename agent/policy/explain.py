"""Human-readable explanation of an authorization decision (pure: builds a string).

Used by ``meshagent policy check``: which policies apply to the destination workload,
which of their rules matched and why the others did not, and the final decision.
"""

from __future__ import annotations

from agent.policy.engine import Evaluation, PolicyResult, PolicySet
from agent.policy.model import ConnectionRequest, Decision
from agent.policy.outcomes import DocumentOutcome, LoadReport


def _describe_request(request: ConnectionRequest) -> str:
    source = str(request.src_ip) if request.src_ip is not None else "unknown IP"
    identity = request.src_identity or "plaintext, no identity"
    workload = request.dst_workload
    labels = ",".join(f"{k}={v}" for k, v in sorted(workload.labels.items())) or "no labels"
    return (f"connection: {source} ({identity}) -> {request.dst_ip}:{request.dst_port}, "
            f"workload {workload.key} [{labels}]")


def _describe_policy(result: PolicyResult) -> list[str]:
    policy = result.policy
    flags = " [dry-run: reported, not enforced]" if policy.dry_run else ""
    origin = f" ({policy.origin})" if policy.origin else ""
    verdict = (f"MATCHED rule {result.matched_rule}" if result.matched
               else "did not match")
    lines = [f"  {policy.action.value:<5} {policy.key}: {verdict}{flags}",
             f"        scope: {result.scope}{origin}"]
    if policy.stands_in_for:
        lines.append(f"        fail-closed stand-in for: {policy.stands_in_for}")
    if not policy.rules:
        lines.append("        no rules: matches nothing"
                     + (" (allow-nothing)" if policy.action.value == "ALLOW" else ""))
    for rule in result.rules:
        if rule.matched:
            lines.append(f"        rule {rule.index}: matches")
        else:
            lines.append(f"        rule {rule.index}: no match: {rule.detail}")
    return lines


def _describe_decision(decision: Decision) -> list[str]:
    lines = [f"decision: {'ALLOW' if decision.allowed else 'DENY'} ({decision.reason})"]
    for match in decision.dry_run_matches:
        lines.append(f"dry-run: {match.action.value} policy {match.policy} "
                     f"matched (rule {match.rule_index}); not enforced")
    if decision.dry_run_allowed is not None and decision.dry_run_allowed != decision.allowed:
        would = "ALLOW" if decision.dry_run_allowed else "DENY"
        lines.append(f"dry-run: were dry-run policies enforced, the decision would be {would}")
    return lines


def render(evaluation: Evaluation) -> str:
    """The text for an :class:`Evaluation` (see :meth:`PolicySet.explain`)."""
    lines = [_describe_request(evaluation.request),
             f"root namespace: {evaluation.root_namespace}"]
    if evaluation.request.src_ip is None:
        lines.append("note: source IP unknown: ipBlocks/source.ip never match, "
                     "notIpBlocks never exclude")
    if evaluation.results:
        lines.append(f"policies applying to {evaluation.request.dst_workload.key} "
                     f"({len(evaluation.results)}):")
        for result in evaluation.results:
            lines.extend(_describe_policy(result))
    else:
        lines.append(f"no policy applies to {evaluation.request.dst_workload.key}")
    lines.extend(_describe_decision(evaluation.decision))
    return "\n".join(lines)


def explain(policy_set: PolicySet, request: ConnectionRequest) -> str:
    """Multi-line explanation of how ``policy_set`` decides ``request``."""
    return render(policy_set.explain(request))


def render_report(report: LoadReport) -> str:
    """Every document's outcome, then the counts (``meshagent policy validate``)."""
    if report.directory_missing:
        return "policy directory missing: no policies (every connection allowed)"
    lines = []
    for result in report.documents:
        if result.outcome is DocumentOutcome.ACCEPTED and result.policy is not None:
            flags = " (dry-run)" if result.policy.dry_run else ""
            lines.append(f"{result.where}: accepted: {result.policy.action.value} "
                         f"{result.policy.key}{flags}")
        else:
            lines.append(str(result))
    counts = report.counts()
    lines.append(f"{len(report.documents)} documents: "
                 + ", ".join(f"{counts[o]} {o.value}" for o in DocumentOutcome)
                 + f"; {len(report.policies)} policies in force")
    return "\n".join(lines)
