"""Prometheus metrics of the tunnel (Istio's standard TCP metrics) and of the node agent.

Everything registers on a dedicated :class:`~prometheus_client.CollectorRegistry`
passed in by the caller (never prometheus_client's global one).

Tunnel: the four Istio standard TCP metrics, exposed under exactly Istio's names
(``istio_tcp_connections_opened_total``, ``istio_tcp_connections_closed_total``,
``istio_tcp_sent_bytes_total``, ``istio_tcp_received_bytes_total``) plus ztunnel's
``istio_tcp_connections_failed_total``, all with the label set ztunnel uses (see
:data:`TCP_LABEL_NAMES`), so Istio's Grafana dashboards work. Missing values are
``"unknown"`` as in Istio. Label values are bounded: workload/namespace/service names,
SPIFFE principals and enumerations only; a value that looks like an IP address or an
``addr:port`` is replaced by ``"unknown"`` (never ports or client IPs). Counters are
exported without ``_created`` series, as Istio does.

Sent/received follow Istio: ``sent`` is bytes sent during the response (server to
client), ``received`` bytes received during the request (client to server), both
seen from the reporting side.

Agent: ``meshagent_enrolled_pods``, ``meshagent_enrollment_duration_seconds``,
``meshagent_enrollment_errors_total{reason}`` and per-pod datapath counters read from
a callable at scrape time (``meshagent_datapath_*``).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from agent.addr import is_ip
from agent.identity.spiffe import SCHEME

UNKNOWN = "unknown"
REPORTER_SOURCE = "source"
REPORTER_DESTINATION = "destination"

# ztunnel's response_flags values ("-" = none).
RESPONSE_FLAG_NONE = "-"
RESPONSE_FLAGS = frozenset({
    RESPONSE_FLAG_NONE,
    "DENY",                   # connection denied by authorization policy
    "CONNECT",                # could not connect upstream
    "TLS_FAILURE",            # TLS handshake failed
    "H2_HANDSHAKE_FAILURE",   # HTTP/2 handshake failed
    "NETWORK_POLICY",         # blocked by network policy
    "IDENTITY_ERROR",         # no certificate / identity problem
    "CERT_REVOKED",
    # Envoy's "no healthy upstream" (UH), as Istio's sidecar/waypoint metrics report
    # it: a Service VIP with no endpoint to send to (agent.model.select
    # NO_HEALTHY_UPSTREAM_FLAG). ztunnel itself only logs that case.
    "UH",
})
SECURITY_POLICY_MTLS = "mutual_tls"
SECURITY_POLICY_NONE = "none"

# Istio/ztunnel TCP metric label names, in ztunnel's order.
TCP_LABEL_NAMES: tuple[str, ...] = (
    "reporter",
    "source_workload", "source_canonical_service", "source_canonical_revision",
    "source_workload_namespace", "source_principal", "source_app", "source_version",
    "source_cluster",
    "destination_service", "destination_service_namespace", "destination_service_name",
    "destination_workload", "destination_canonical_service",
    "destination_canonical_revision", "destination_workload_namespace",
    "destination_principal", "destination_app", "destination_version",
    "destination_cluster",
    "request_protocol", "response_flags", "connection_security_policy",
)

TCP_CONNECTIONS_OPENED = "istio_tcp_connections_opened"
TCP_CONNECTIONS_CLOSED = "istio_tcp_connections_closed"
TCP_CONNECTIONS_FAILED = "istio_tcp_connections_failed"
TCP_SENT_BYTES = "istio_tcp_sent_bytes"
TCP_RECEIVED_BYTES = "istio_tcp_received_bytes"

# Istio's canonical service/revision labels, most specific first.
_CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
_CANONICAL_REVISION_LABELS = ("service.istio.io/canonical-revision",
                              "app.kubernetes.io/version", "version")
_HOST_PORT = re.compile(r"^\[?[0-9A-Fa-f:.]+\]?:\d+$")
_MAX_LABEL_LENGTH = 253


class WorkloadLike(Protocol):
    """What metric labels need of a workload (``agent.policy.WorkloadRef`` fits).

    ``name`` is the workload (e.g. Deployment) name, as Istio's ``*_workload`` label;
    prefer it over a pod name so label values stay bounded across restarts.
    """

    @property
    def name(self) -> str: ...
    @property
    def namespace(self) -> str: ...
    @property
    def labels(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class ServiceRef:
    """The destination service, when known (``destination_service*`` labels)."""

    name: str
    namespace: str
    hostname: str = ""


def bounded_label_value(value: str | None) -> str:
    """``value`` if it is a bounded identifier, else ``"unknown"``.

    Rejects empty values, IP addresses and ``host:port``, and overlong strings, so a
    caller passing an address by mistake cannot blow up series cardinality.
    """
    if not value or len(value) > _MAX_LABEL_LENGTH:
        return UNKNOWN
    candidate = value.strip("[]")
    if is_ip(candidate):
        return UNKNOWN
    if _HOST_PORT.match(value):
        return UNKNOWN
    return value


def _principal_value(principal: str | None) -> str:
    if not principal or not principal.startswith(SCHEME):
        return UNKNOWN
    return bounded_label_value(principal)


def _first_label(labels: Mapping[str, str], names: Iterable[str]) -> str | None:
    for name in names:
        if labels.get(name):
            return labels[name]
    return None


def canonical_service(workload: WorkloadLike) -> str:
    """Istio's canonical service of a workload: its canonical-name label, else the name."""
    return _first_label(workload.labels, _CANONICAL_NAME_LABELS) or workload.name


def canonical_revision(workload: WorkloadLike) -> str:
    """Istio's canonical revision of a workload: its canonical-revision label, else "latest"."""
    return _first_label(workload.labels, _CANONICAL_REVISION_LABELS) or "latest"


def _workload_labels(prefix: str, workload: WorkloadLike | None,
                     cluster: str | None) -> dict[str, str]:
    if workload is None:
        values: dict[str, str | None] = dict.fromkeys(
            ("workload", "canonical_service", "canonical_revision", "workload_namespace",
             "app", "version"))
    else:
        service, revision = canonical_service(workload), canonical_revision(workload)
        values = {
            "workload": workload.name,
            "canonical_service": service,
            "canonical_revision": revision,
            "workload_namespace": workload.namespace,
            # ztunnel fills app/version from the canonical service/revision.
            "app": service,
            "version": revision,
        }
    result = {f"{prefix}_{key}": bounded_label_value(value) for key, value in values.items()}
    result[f"{prefix}_cluster"] = bounded_label_value(cluster)
    return result


def tcp_labels(
    reporter: str,
    src_workload: WorkloadLike | None,
    dst_workload: WorkloadLike | None,
    src_principal: str | None,
    dst_principal: str | None,
    mtls: bool,
    response_flags: str = RESPONSE_FLAG_NONE,
    *,
    dst_service: ServiceRef | None = None,
    cluster: str | None = None,
) -> dict[str, str]:
    """The Istio TCP label set for one connection (pure; every value bounded).

    ``reporter`` is ``"source"`` (outbound side) or ``"destination"`` (inbound side);
    principals are SPIFFE IDs (anything else becomes ``"unknown"``); ``response_flags``
    is one of :data:`RESPONSE_FLAGS`.
    """
    if reporter not in (REPORTER_SOURCE, REPORTER_DESTINATION):
        raise ValueError(f"reporter must be 'source' or 'destination', got {reporter!r}")
    if response_flags not in RESPONSE_FLAGS:
        raise ValueError(f"unknown response flag {response_flags!r} "
                         f"(one of {', '.join(sorted(RESPONSE_FLAGS))})")
    labels = {"reporter": reporter}
    labels.update(_workload_labels("source", src_workload, cluster))
    labels["source_principal"] = _principal_value(src_principal)
    if dst_service is None:
        service = {"destination_service": UNKNOWN, "destination_service_namespace": UNKNOWN,
                   "destination_service_name": UNKNOWN}
    else:
        hostname = dst_service.hostname or (
            f"{dst_service.name}.{dst_service.namespace}.svc.cluster.local")
        service = {"destination_service": bounded_label_value(hostname),
                   "destination_service_namespace": bounded_label_value(dst_service.namespace),
                   "destination_service_name": bounded_label_value(dst_service.name)}
    labels.update(service)
    labels.update(_workload_labels("destination", dst_workload, cluster))
    labels["destination_principal"] = _principal_value(dst_principal)
    labels["request_protocol"] = "tcp"
    labels["response_flags"] = response_flags
    labels["connection_security_policy"] = (SECURITY_POLICY_MTLS if mtls
                                            else SECURITY_POLICY_NONE)
    return {name: labels[name] for name in TCP_LABEL_NAMES}


class LabeledCounters(Collector):
    """Thread-safe counter families exported without ``_created`` series.

    prometheus_client's ``Counter`` adds a ``<name>_created`` series per label set,
    which Istio's exposition does not have; this keeps output to ``<name>_total``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._values: dict[str, dict[tuple[str, ...], float]] = {}

    def declare(self, name: str, documentation: str, label_names: Iterable[str]) -> None:
        self._families[name] = (documentation, tuple(label_names))
        self._values[name] = {}

    def inc(self, name: str, labels: Mapping[str, str], amount: float = 1) -> None:
        if amount < 0:
            raise ValueError(f"counters only go up (got {amount} for {name})")
        _, label_names = self._families[name]
        if set(labels) != set(label_names):
            raise ValueError(f"{name} takes labels {sorted(label_names)}, got {sorted(labels)}")
        key = tuple(str(labels[label]) for label in label_names)
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0) + amount

    def value(self, name: str, labels: Mapping[str, str]) -> float:
        _, label_names = self._families[name]
        with self._lock:
            return self._values[name].get(tuple(labels[n] for n in label_names), 0)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snapshot = {name: dict(series) for name, series in self._values.items()}
        for name, (documentation, label_names) in self._families.items():
            family = CounterMetricFamily(name, documentation, labels=label_names)
            for key, count in sorted(snapshot[name].items()):
                family.add_metric(list(key), count)
            yield family

    def describe(self) -> Iterator[Metric]:
        for name, (documentation, label_names) in self._families.items():
            yield CounterMetricFamily(name, documentation, labels=label_names)


class TunnelMetrics:
    """The tunnel's Istio TCP metrics. Labels come from :func:`tcp_labels`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._counters = LabeledCounters()
        for name, documentation in (
            (TCP_CONNECTIONS_OPENED, "The total number of TCP connections opened"),
            (TCP_CONNECTIONS_CLOSED, "The total number of TCP connections closed"),
            (TCP_CONNECTIONS_FAILED,
             "The total number of TCP connections that failed to establish"),
            (TCP_SENT_BYTES, "The size of total bytes sent during response in case of a "
                             "TCP connection"),
            (TCP_RECEIVED_BYTES, "The size of total bytes received during request in case "
                                 "of a TCP connection"),
        ):
            self._counters.declare(name, documentation, TCP_LABEL_NAMES)
        registry.register(self._counters)

    def connection_opened(self, labels: Mapping[str, str]) -> None:
        self._counters.inc(TCP_CONNECTIONS_OPENED, labels)

    def bytes_transferred(self, labels: Mapping[str, str], sent: int, received: int) -> None:
        """Account bytes of a still-open connection (call periodically for long ones)."""
        if sent:
            self._counters.inc(TCP_SENT_BYTES, labels, sent)
        if received:
            self._counters.inc(TCP_RECEIVED_BYTES, labels, received)

    def connection_closed(self, labels: Mapping[str, str], sent: int, received: int) -> None:
        """Count the close and the bytes not yet reported by :meth:`bytes_transferred`."""
        self.bytes_transferred(labels, sent, received)
        self._counters.inc(TCP_CONNECTIONS_CLOSED, labels)

    def connection_failed(self, labels: Mapping[str, str], flag: str) -> None:
        """Count a connection that could not be established, with its response flag."""
        if flag not in RESPONSE_FLAGS or flag == RESPONSE_FLAG_NONE:
            raise ValueError(f"a failure needs a response flag other than '-', got {flag!r}")
        self._counters.inc(TCP_CONNECTIONS_FAILED, {**labels, "response_flags": flag})

    def value(self, metric: str, labels: Mapping[str, str]) -> float:
        """Current value of ``metric`` (e.g. :data:`TCP_SENT_BYTES`) for ``labels``."""
        return self._counters.value(metric, labels)


# Pod datapath counters as the agent reports them (agent.datapath.maps.PodCounters.as_dict).
DatapathCounters = Mapping[str, Mapping[str, Any]]
ENROLLMENT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _split_pod_key(pod_key: str) -> tuple[str, str]:
    namespace, slash, name = pod_key.partition("/")
    return (namespace, name) if slash else (UNKNOWN, pod_key)


class DatapathCollector(Collector):
    """Per-pod datapath counters, read from ``read_counters()`` at scrape time.

    ``read_counters`` returns ``{"namespace/pod": {"captured_out_packets": n,
    "captured_out_bytes": n, "captured_in_packets": n, "captured_in_bytes": n,
    "drops": {reason: n}}}``; values are cumulative (BPF map totals). A failing reader
    yields no samples rather than failing the whole scrape.
    """

    def __init__(self, read_counters: Callable[[], DatapathCounters]) -> None:
        self._read_counters = read_counters

    def collect(self) -> Iterator[Metric]:
        packets = CounterMetricFamily(
            "meshagent_datapath_captured_packets",
            "Packets of enrolled pods redirected into the tunnel, by direction",
            labels=("pod", "namespace", "direction"))
        bytes_ = CounterMetricFamily(
            "meshagent_datapath_captured_bytes",
            "Bytes of enrolled pods redirected into the tunnel, by direction",
            labels=("pod", "namespace", "direction"))
        drops = CounterMetricFamily(
            "meshagent_datapath_drops",
            "Packets the datapath dropped, by reason",
            labels=("pod", "namespace", "reason"))
        try:
            counters = self._read_counters()
        except Exception:  # a scrape must not fail because one map read did
            counters = {}
        for pod_key, pod_counters in sorted(counters.items()):
            namespace, pod = _split_pod_key(pod_key)
            for direction in ("out", "in"):
                packets.add_metric([pod, namespace, direction],
                                   pod_counters.get(f"captured_{direction}_packets", 0))
                bytes_.add_metric([pod, namespace, direction],
                                  pod_counters.get(f"captured_{direction}_bytes", 0))
            for reason, count in sorted((pod_counters.get("drops") or {}).items(),
                                        key=lambda item: str(item[0])):
                reason_label = str(getattr(reason, "label", reason))
                drops.add_metric([pod, namespace, reason_label], count)
        yield packets
        yield bytes_
        yield drops

    def describe(self) -> Iterator[Metric]:
        return iter(())  # samples depend on the live pod set


class AgentMetrics:
    """The node agent's metrics: enrollment state and datapath counters."""

    def __init__(self, registry: CollectorRegistry,
                 read_datapath_counters: Callable[[], DatapathCounters] | None = None) -> None:
        self.registry = registry
        self.enrolled_pods = Gauge("meshagent_enrolled_pods",
                                   "Pods currently enrolled on this node", registry=registry)
        self.enrollment_duration = Histogram(
            "meshagent_enrollment_duration_seconds",
            "Time to enroll a pod (netns setup, BPF attach, map writes)",
            buckets=ENROLLMENT_BUCKETS, registry=registry)
        self._errors = LabeledCounters()
        self._errors.declare("meshagent_enrollment_errors", "Pod enrollments that failed",
                             ("reason",))
        registry.register(self._errors)
        if read_datapath_counters is not None:
            registry.register(DatapathCollector(read_datapath_counters))

    def set_enrolled_pods(self, count: int) -> None:
        self.enrolled_pods.set(count)

    def observe_enrollment(self, seconds: float) -> None:
        self.enrollment_duration.observe(seconds)

    def enrollment_failed(self, reason: str) -> None:
        """Count a failed enrollment; ``reason`` must be a short fixed code (bounded)."""
        self._errors.inc("meshagent_enrollment_errors",
                         {"reason": bounded_label_value(reason)})

    def enrollment_errors(self, reason: str) -> float:
        return self._errors.value("meshagent_enrollment_errors", {"reason": reason})


class MetricsServer:
    """A running metrics HTTP endpoint; :meth:`close` stops it."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_metrics(registry: CollectorRegistry, host: str = "0.0.0.0",
                  port: int = 15020) -> MetricsServer:
    """Serve ``registry`` on ``http://host:port/metrics`` in a daemon thread.

    ``port=0`` picks a free port (see :attr:`MetricsServer.port`).
    """
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)
