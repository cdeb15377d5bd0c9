"""Circuit breakers with Envoy's defaults (pure counters; no queues).

Envoy ``envoy.config.cluster.v3.CircuitBreakers.Thresholds`` defaults, per upstream
cluster (here: per destination service, or per workload for workload-addressed
traffic): ``max_connections`` 1024, ``max_pending_requests`` 1024, ``max_requests``
1024, ``max_retries`` 3. Exceeding one answers at once with 503 and Envoy's response
flag: ``UO`` (upstream overflow: connections, pending or requests), ``URX`` (retry
limit reached, with the last failure's flag). Nothing waits in an unbounded queue: a
request is *pending* while its upstream stream is being opened, and the pending
count is the bound on that wait.

Downstream, the waypoint accepts at most ``max_downstream_connections`` HBONE
streams at once (Envoy's overload manager has no default; Istio's waypoint sets
none; we keep one so memory is bounded) and answers the rest 503 at CONNECT.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field

DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_PENDING = 1024
DEFAULT_MAX_REQUESTS = 1024
DEFAULT_MAX_RETRIES = 3
DEFAULT_MAX_DOWNSTREAM = 4096


class ResponseFlag(enum.Enum):
    """Envoy access-log response flags (the ones this waypoint sets)."""

    NONE = "-"
    UPSTREAM_OVERFLOW = "UO"
    UPSTREAM_CONNECTION_FAILURE = "UF"
    UPSTREAM_RETRY_LIMIT_EXCEEDED = "URX"
    NO_HEALTHY_UPSTREAM = "UH"
    NO_ROUTE_FOUND = "NR"
    FAULT_INJECTED = "FI"
    DELAY_INJECTED = "DI"
    UPSTREAM_REQUEST_TIMEOUT = "UT"
    UPSTREAM_REMOTE_RESET = "UR"
    DOWNSTREAM_CONNECTION_TERMINATION = "DC"
    DOWNSTREAM_PROTOCOL_ERROR = "DPE"
    OVERLOAD_MANAGER = "OM"
    RBAC_DENIED = "RBAC"  # Envoy logs "RBAC" with response code details rbac_access_denied


@dataclass(frozen=True)
class Thresholds:
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_pending_requests: int = DEFAULT_MAX_PENDING
    max_requests: int = DEFAULT_MAX_REQUESTS
    max_retries: int = DEFAULT_MAX_RETRIES


@dataclass
class ClusterBudget:
    """Live counts for one upstream cluster."""

    thresholds: Thresholds
    connections: int = 0
    pending: int = 0
    requests: int = 0
    retries: int = 0
    overflows: dict[str, int] = field(default_factory=dict)

    def _overflow(self, what: str) -> bool:
        self.overflows[what] = self.overflows.get(what, 0) + 1
        return False

    def try_request(self) -> bool:
        if self.requests >= self.thresholds.max_requests:
            return self._overflow("requests")
        self.requests += 1
        return True

    def end_request(self) -> None:
        self.requests = max(0, self.requests - 1)

    def try_pending(self) -> bool:
        if self.pending >= self.thresholds.max_pending_requests:
            return self._overflow("pending")
        self.pending += 1
        return True

    def end_pending(self) -> None:
        self.pending = max(0, self.pending - 1)

    def try_connection(self) -> bool:
        if self.connections >= self.thresholds.max_connections:
            return self._overflow("connections")
        self.connections += 1
        return True

    def end_connection(self) -> None:
        self.connections = max(0, self.connections - 1)

    def try_retry(self) -> bool:
        if self.retries >= self.thresholds.max_retries:
            return self._overflow("retries")
        self.retries += 1
        return True

    def end_retry(self) -> None:
        self.retries = max(0, self.retries - 1)


class Budgets:
    """One :class:`ClusterBudget` per cluster name, made on first use."""

    def __init__(self, thresholds: Thresholds | None = None) -> None:
        self.thresholds = thresholds or Thresholds()
        self._clusters: dict[str, ClusterBudget] = {}

    def cluster(self, name: str) -> ClusterBudget:
        budget = self._clusters.get(name)
        if budget is None:
            budget = self._clusters[name] = ClusterBudget(self.thresholds)
        return budget

    def __iter__(self) -> Iterator[tuple[str, ClusterBudget]]:
        return iter(self._clusters.items())


DEFAULT_MAX_BUFFERED_BYTES = 64 * 1024 * 1024


class BodyBudget:
    """Request bytes buffered across the whole process (bodies are buffered for
    retries): a request that would go over ``limit`` is answered 503 (OM) instead,
    so memory stays bounded however many requests arrive at once."""

    def __init__(self, limit: int = DEFAULT_MAX_BUFFERED_BYTES) -> None:
        self.limit = limit
        self.used = 0
        self.refused = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            self.refused += 1
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used = max(0, self.used - size)
