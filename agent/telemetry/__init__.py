"""Observability: Prometheus metrics of the tunnel (Istio TCP metrics) and the agent.

See :mod:`agent.telemetry.metrics`.
"""

from agent.telemetry.metrics import (
    RESPONSE_FLAGS,
    TCP_LABEL_NAMES,
    AgentMetrics,
    DatapathCollector,
    MetricsServer,
    ServiceRef,
    TunnelMetrics,
    bounded_label_value,
    serve_metrics,
    tcp_labels,
)

__all__ = [
    "RESPONSE_FLAGS",
    "TCP_LABEL_NAMES",
    "AgentMetrics",
    "DatapathCollector",
    "MetricsServer",
    "ServiceRef",
    "TunnelMetrics",
    "bounded_label_value",
    "serve_metrics",
    "tcp_labels",
]
