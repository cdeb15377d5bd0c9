"""Prometheus view of the policy watcher: how many documents got which outcome.

``meshagent_policy_documents{outcome}`` (gauge): documents of the last read by
outcome (``accepted``, ``accepted_with_warnings``, ``ignored``, ``fail_closed``);
``meshagent_policy_fail_closed`` (gauge): 1 while anything fails closed, including the
deny-all in force before the first read. Read from the watcher at scrape time, so the
tunnel only registers the collector::

    registry.register(PolicyDocumentsCollector(watcher))
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from agent.policy.loader import PolicyWatcher
from agent.policy.outcomes import DocumentOutcome


class PolicyDocumentsCollector(Collector):
    """Reads ``watcher.report`` on every scrape (no state of its own)."""

    def __init__(self, watcher: PolicyWatcher) -> None:
        self._watcher = watcher

    def collect(self) -> Iterator[Metric]:
        report = self._watcher.report
        documents = GaugeMetricFamily(
            "meshagent_policy_documents",
            "AuthorizationPolicy documents of the last read of the policy directory, "
            "by outcome", labels=["outcome"])
        counts = report.counts() if report is not None else dict.fromkeys(DocumentOutcome, 0)
        for outcome, count in counts.items():
            documents.add_metric([outcome.value], count)
        yield documents
        failing = report is None or bool(report.failed_closed)
        yield GaugeMetricFamily(
            "meshagent_policy_fail_closed",
            "1 while a policy document (or the whole unread set) fails closed",
            value=1 if failing else 0)

    def describe(self) -> Iterator[Metric]:
        return self.collect()
