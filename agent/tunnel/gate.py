"""The tunnel's policy gate: the AuthorizationPolicy set in force and its reloads.

Inbound paths ask :meth:`PolicyGate.evaluate` before they dial a pod; a new set
from the watcher is swapped in and every tracked connection re-checked
(:class:`~agent.tunnel.tracker.ConnectionTracker`).
"""

from __future__ import annotations

from pathlib import Path

import structlog

from agent.policy import ConnectionRequest, Decision, PolicySet, PolicyWatcher
from agent.tunnel.tracker import ConnectionTracker

log = structlog.get_logger("tunnel")


class PolicyGate:
    def __init__(self, policy_dir: str | Path, root_namespace: str,
                 tracker: ConnectionTracker, *, policies: PolicySet | None = None) -> None:
        self.policy_dir = Path(policy_dir)
        self.root_namespace = root_namespace
        self.tracker = tracker
        self.watcher = PolicyWatcher(str(policy_dir), root_namespace)
        self.policies: PolicySet = policies if policies is not None else self.watcher.current

    @property
    def last_error(self) -> Exception | None:
        return self.watcher.last_error

    def evaluate(self, request: ConnectionRequest) -> Decision:
        decision = self.policies.evaluate(request)
        if decision.dry_run_matches:
            log.info("dry-run policy matched", src=request.src_ip,
                     dst=f"{request.dst_ip}:{request.dst_port}",
                     matches=[f"{m.policy} {m.action}" for m in decision.dry_run_matches],
                     would_allow=decision.dry_run_allowed)
        return decision

    def apply(self, new: PolicySet) -> int:
        """Put ``new`` in force; close the tracked connections it denies. Returns how many."""
        self.policies = new
        closed = self.tracker.revoke(new.evaluate)
        log.info("policies loaded", count=len(new.policies), connections_closed=closed)
        return closed

    def reload(self) -> None:
        """Side effects: reads the policy directory (via the watcher); logs every
        document not enforced as written.

        The watcher judges each document on its own (a bad one fails closed for its
        scope) and treats a missing directory as no policies; until its first read
        the set in force denies everything.
        """
        new = self.watcher.poll()
        if new is None:
            return
        report = self.watcher.report
        for result in report.problems if report is not None else ():
            for issue in result.issues:
                log.warning("policy document not enforced as written", file=result.file,
                            document=result.document, policy=result.key,
                            outcome=result.outcome.value, field=issue.path,
                            problem=issue.problem, effect=result.effect)
        self.apply(new)
