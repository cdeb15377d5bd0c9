"""Istio's standard HTTP metrics and an access-log line per request, for the waypoint.

Metric names and labels as Istio's telemetry (istio.io "Istio Standard Metrics":
``istio_requests_total`` counter, ``istio_request_duration_milliseconds``,
``istio_request_bytes``, ``istio_response_bytes`` distributions), with
``reporter="waypoint"`` as Istio's waypoints report. The label names are the TCP
ones the tunnel uses (agent/telemetry/metrics.py ``TCP_LABEL_NAMES``) plus
``response_code`` and ``grpc_response_status``. The access log follows Envoy's
default format fields (start time, method, path, protocol, code, flags, bytes,
duration, upstream host, authority) as one structured line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram

from agent.telemetry.metrics import TCP_LABEL_NAMES

REPORTER = "waypoint"
LABEL_NAMES: tuple[str, ...] = (*TCP_LABEL_NAMES, "response_code", "grpc_response_status")
# Istio's default buckets (ms) for durations; bytes use powers of ten.
DURATION_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
                    60000, 300000, 600000, 1800000, 3600000)
MAX_CACHED_SERIES = 10_000
BYTES_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000)

access_log = structlog.get_logger("meshagent.waypoint.access")


@dataclass
class RequestRecord:
    """What one request did (filled in as it goes; logged and counted at the end)."""

    method: str = "-"
    path: str = "-"
    authority: str = "-"
    protocol: str = "http"          # "http" | "grpc" (Istio's request_protocol)
    http_version: str = "HTTP/1.1"
    status: int = 0
    grpc_status: str = ""
    flags: str = "-"
    request_bytes: int = 0
    response_bytes: int = 0
    upstream: str = "-"
    route: str = "-"
    source_principal: str = "unknown"
    source_namespace: str = "unknown"
    source_ip: str = "-"
    destination_service: str = "unknown"
    destination_service_name: str = "unknown"
    destination_service_namespace: str = "unknown"
    destination_workload: str = "unknown"
    destination_workload_namespace: str = "unknown"
    destination_principal: str = "unknown"
    rbac: str = "-"
    audited: str = "-"              # AUDIT policies that matched (Envoy's access_log_hint)
    retries: int = 0
    started: float = 0.0
    traceparent: str = "-"

    def __post_init__(self) -> None:
        self.started = time.monotonic()
        self._wall = time.time()

    def add_flag(self, flag: str) -> None:
        self.flags = flag if self.flags == "-" else f"{self.flags},{flag}"


class WaypointMetrics:
    """The four Istio HTTP metrics on their own registry (serve with prometheus_client)."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 access_log: bool = True) -> None:
        """``access_log``: write the per-request line (off: metrics only, as Istio's
        default install, whose ``accessLogFile`` is empty)."""
        self.registry = registry or CollectorRegistry()
        self.access_log = access_log
        self.requests = Counter("istio_requests_total", "Requests handled by the waypoint",
                                LABEL_NAMES, registry=self.registry)
        self.duration = Histogram("istio_request_duration_milliseconds",
                                  "Request duration (ms)", LABEL_NAMES,
                                  buckets=DURATION_BUCKETS, registry=self.registry)
        self.request_bytes = Histogram("istio_request_bytes", "Request size (bytes)",
                                       LABEL_NAMES, buckets=BYTES_BUCKETS,
                                       registry=self.registry)
        self.response_bytes = Histogram("istio_response_bytes", "Response size (bytes)",
                                        LABEL_NAMES, buckets=BYTES_BUCKETS,
                                        registry=self.registry)
        # Label children per label-value tuple: resolving 25 labels four times per
        # request is most of the metrics cost.
        self._children: dict[tuple[str, ...], tuple[Any, Any, Any, Any]] = {}

    def record(self, r: RequestRecord) -> None:
        """Count and log one finished request. Side effects: metrics, one log line
        (unless ``access_log`` is off)."""
        elapsed_ms = (time.monotonic() - r.started) * 1000.0
        labels = {
            "reporter": REPORTER,
            "source_workload": "unknown", "source_canonical_service": "unknown",
            "source_canonical_revision": "unknown",
            "source_workload_namespace": r.source_namespace,
            "source_principal": (f"spiffe://{r.source_principal}"
                                 if r.source_principal != "unknown" else "unknown"),
            "source_app": "unknown", "source_version": "unknown", "source_cluster": "unknown",
            "destination_service": r.destination_service,
            "destination_service_namespace": r.destination_service_namespace,
            "destination_service_name": r.destination_service_name,
            "destination_workload": r.destination_workload,
            "destination_canonical_service": r.destination_workload,
            "destination_canonical_revision": "latest",
            "destination_workload_namespace": r.destination_workload_namespace,
            "destination_principal": r.destination_principal,
            "destination_app": "unknown", "destination_version": "unknown",
            "destination_cluster": "unknown",
            "request_protocol": r.protocol,
            "response_flags": r.flags,
            "connection_security_policy": "mutual_tls",
            "response_code": str(r.status),
            "grpc_response_status": r.grpc_status,
        }
        key = tuple(labels[name] for name in LABEL_NAMES)
        children = self._children.get(key)
        if children is None:
            if len(self._children) >= MAX_CACHED_SERIES:
                self._children.clear()  # a bound, not an eviction policy
            children = self._children[key] = (
                self.requests.labels(*key), self.duration.labels(*key),
                self.request_bytes.labels(*key), self.response_bytes.labels(*key))
        requests, duration, request_bytes, response_bytes = children
        requests.inc()
        duration.observe(elapsed_ms)
        request_bytes.observe(r.request_bytes)
        response_bytes.observe(r.response_bytes)
        if not self.access_log:
            return
        access_log.info(
            "request", start_time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r._wall)),
            method=r.method, path=r.path, protocol=r.http_version, response_code=r.status,
            response_flags=r.flags, bytes_received=r.request_bytes,
            bytes_sent=r.response_bytes, duration_ms=round(elapsed_ms, 3),
            upstream_host=r.upstream, authority=r.authority, route_name=r.route,
            source_principal=labels["source_principal"], downstream_remote_address=r.source_ip,
            destination_service=r.destination_service, rbac=r.rbac, audited=r.audited,
            retries=r.retries,
            traceparent=r.traceparent, grpc_status=r.grpc_status or "-")
