"""Tunnel and agent metrics: Istio's exact names and labels, exact counts, bounded labels."""

from __future__ import annotations

import ipaddress
import re
import urllib.request

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from agent.policy import WorkloadRef
from agent.telemetry import (
    TCP_LABEL_NAMES,
    AgentMetrics,
    ServiceRef,
    TunnelMetrics,
    bounded_label_value,
    serve_metrics,
    tcp_labels,
)

SLEEP = WorkloadRef("sleep", "foo", {"app": "sleep", "version": "v1"})
HTTPBIN = WorkloadRef("httpbin", "bar", {"service.istio.io/canonical-name": "httpbin-svc"})
SLEEP_ID = "spiffe://cluster.local/ns/foo/sa/sleep"
HTTPBIN_ID = "spiffe://cluster.local/ns/bar/sa/httpbin"

# From Istio's "Istio Standard Metrics" (TCP) and ztunnel's CommonTrafficLabels.
ISTIO_TCP_METRICS = {
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_sent_bytes_total",
    "istio_tcp_received_bytes_total",
    "istio_tcp_connections_failed_total",
}
ISTIO_TCP_LABELS = {
    "reporter", "source_workload", "source_workload_namespace", "source_principal",
    "source_app", "source_version", "source_canonical_service", "source_canonical_revision",
    "source_cluster", "destination_workload", "destination_workload_namespace",
    "destination_principal", "destination_app", "destination_version",
    "destination_service", "destination_service_name", "destination_service_namespace",
    "destination_canonical_service", "destination_canonical_revision", "destination_cluster",
    "request_protocol", "response_flags", "connection_security_policy",
}


def exposition(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def sample_names(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def label_names(text: str, metric: str) -> set[str]:
    line = next(line for line in text.splitlines() if line.startswith(metric + "{"))
    return set(re.findall(r'(\w+)="', line))


def labels() -> dict[str, str]:
    return tcp_labels("destination", SLEEP, HTTPBIN, SLEEP_ID, HTTPBIN_ID, mtls=True)


def test_tunnel_exposes_exactly_istio_names_and_labels() -> None:
    registry = CollectorRegistry()
    metrics = TunnelMetrics(registry)
    metrics.connection_opened(labels())
    metrics.connection_closed(labels(), sent=100, received=40)
    metrics.connection_failed(labels(), "CONNECT")
    text = exposition(registry)
    assert sample_names(text) == ISTIO_TCP_METRICS  # no *_created series
    for metric in ISTIO_TCP_METRICS:
        assert label_names(text, metric) == ISTIO_TCP_LABELS
    assert set(TCP_LABEL_NAMES) == ISTIO_TCP_LABELS


def test_dedicated_registry_not_the_global_one() -> None:
    TunnelMetrics(CollectorRegistry()).connection_opened(labels())
    assert "istio_tcp_connections_opened_total" not in generate_latest(REGISTRY).decode()


def test_counts_are_exact() -> None:
    registry = CollectorRegistry()
    metrics = TunnelMetrics(registry)
    for _ in range(3):
        metrics.connection_opened(labels())
    metrics.bytes_transferred(labels(), sent=10, received=5)
    metrics.connection_closed(labels(), sent=90, received=35)
    metrics.connection_closed(labels(), sent=0, received=0)
    metrics.connection_failed(labels(), "DENY")
    metrics.connection_failed(labels(), "DENY")

    def sample(name: str, extra: dict[str, str] | None = None) -> float | None:
        return registry.get_sample_value(name, {**labels(), **(extra or {})})

    assert sample("istio_tcp_connections_opened_total") == 3
    assert sample("istio_tcp_connections_closed_total") == 2
    assert sample("istio_tcp_sent_bytes_total") == 100
    assert sample("istio_tcp_received_bytes_total") == 40
    assert sample("istio_tcp_connections_failed_total", {"response_flags": "DENY"}) == 2
    assert metrics.value("istio_tcp_sent_bytes", labels()) == 100


def test_tcp_labels_values() -> None:
    built = tcp_labels("source", SLEEP, HTTPBIN, SLEEP_ID, HTTPBIN_ID, mtls=False,
                       response_flags="DENY", dst_service=ServiceRef("httpbin", "bar"))
    assert built["reporter"] == "source"
    assert built["source_workload"] == "sleep" and built["source_workload_namespace"] == "foo"
    assert built["source_canonical_service"] == "sleep"
    assert built["source_canonical_revision"] == "v1" and built["source_version"] == "v1"
    assert built["destination_canonical_service"] == "httpbin-svc"
    assert built["destination_canonical_revision"] == "latest"
    assert built["destination_service"] == "httpbin.bar.svc.cluster.local"
    assert built["source_principal"] == SLEEP_ID and built["destination_principal"] == HTTPBIN_ID
    assert built["connection_security_policy"] == "none"
    assert built["response_flags"] == "DENY" and built["request_protocol"] == "tcp"
    assert list(built) == list(TCP_LABEL_NAMES)


def test_unknown_everything() -> None:
    built = tcp_labels("destination", None, None, None, None, mtls=False)
    assert {k for k, v in built.items() if v != "unknown"} == {
        "reporter", "request_protocol", "response_flags", "connection_security_policy"}


def test_bad_enumerations_are_rejected() -> None:
    with pytest.raises(ValueError, match="reporter"):
        tcp_labels("inbound", None, None, None, None, mtls=True)
    with pytest.raises(ValueError, match="response flag"):
        tcp_labels("source", None, None, None, None, mtls=True, response_flags="8080")
    with pytest.raises(ValueError, match="response flag"):
        TunnelMetrics(CollectorRegistry()).connection_failed(labels(), "-")
    with pytest.raises(ValueError, match="labels"):
        TunnelMetrics(CollectorRegistry()).connection_opened({"reporter": "source"})


@pytest.mark.parametrize("value", ["10.0.0.5", "::1", "[fe80::1]", "10.0.0.5:8080",
                                   "[::1]:15008", "", None, "x" * 300])
def test_address_like_values_become_unknown(value: str | None) -> None:
    assert bounded_label_value(value) == "unknown"


def test_ip_named_workload_and_non_spiffe_principal_are_dropped() -> None:
    built = tcp_labels("destination", WorkloadRef("10.0.0.5", "foo", {}),
                       WorkloadRef("10.1.0.7:8080", "bar", {}), "10.0.0.5", "10.1.0.7:8080",
                       mtls=True)
    assert built["source_workload"] == "unknown" and built["destination_workload"] == "unknown"
    assert built["source_principal"] == "unknown" and built["destination_principal"] == "unknown"


def looks_like_address(value: str) -> bool:
    """An IP, or an IP with a port (the oracle, independent of the implementation)."""
    host, _, port = value.rpartition(":")
    for candidate in (value, value.strip("[]"), host.strip("[]") if port.isdigit() else ""):
        try:
            ipaddress.ip_address(candidate)
            return True
        except ValueError:
            continue
    return False

names = st.one_of(
    st.ip_addresses().map(str),
    st.builds(lambda ip, port: f"{ip}:{port}", st.ip_addresses(v=4).map(str),
              st.integers(0, 65535)),
    st.builds(lambda ip, port: f"[{ip}]:{port}", st.ip_addresses(v=6).map(str),
              st.integers(0, 65535)),
    st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True),
)


@given(names, names, names, names, st.booleans())
def test_labels_never_carry_addresses_or_ports(src: str, dst: str, src_ns: str, dst_ns: str,
                                               mtls: bool) -> None:
    built = tcp_labels("source", WorkloadRef(src, src_ns, {"app": src}),
                       WorkloadRef(dst, dst_ns, {"version": dst}), src, dst, mtls)
    for name, value in built.items():
        if name == "response_flags":
            continue
        assert not looks_like_address(value), (name, value)


def test_agent_metrics() -> None:
    counters = {
        "foo/sleep-1": {"captured_out_packets": 5, "captured_out_bytes": 500,
                        "captured_in_packets": 4, "captured_in_bytes": 400,
                        "drops": {"fragment": 2, "no_settings": 1}},
        "bar/httpbin-1": {"captured_out_packets": 1, "captured_out_bytes": 60,
                          "captured_in_packets": 0, "captured_in_bytes": 0, "drops": {}},
    }
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry, lambda: counters)
    metrics.set_enrolled_pods(2)
    metrics.observe_enrollment(0.3)
    metrics.enrollment_failed("netns_missing")
    metrics.enrollment_failed("netns_missing")
    metrics.enrollment_failed("10.0.0.1")  # misuse: stays bounded

    value = registry.get_sample_value
    assert value("meshagent_enrolled_pods") == 2
    assert value("meshagent_enrollment_duration_seconds_count") == 1
    assert value("meshagent_enrollment_errors_total", {"reason": "netns_missing"}) == 2
    assert value("meshagent_enrollment_errors_total", {"reason": "unknown"}) == 1
    assert metrics.enrollment_errors("netns_missing") == 2
    pod = {"pod": "sleep-1", "namespace": "foo"}
    assert value("meshagent_datapath_captured_packets_total", {**pod, "direction": "out"}) == 5
    assert value("meshagent_datapath_captured_bytes_total", {**pod, "direction": "in"}) == 400
    assert value("meshagent_datapath_drops_total", {**pod, "reason": "fragment"}) == 2
    assert value("meshagent_datapath_captured_packets_total",
                 {"pod": "httpbin-1", "namespace": "bar", "direction": "out"}) == 1
    assert value("meshagent_datapath_drops_total",
                 {"pod": "httpbin-1", "namespace": "bar", "reason": "fragment"}) is None

    counters["foo/sleep-1"]["captured_out_packets"] = 9  # read live at scrape time
    assert value("meshagent_datapath_captured_packets_total", {**pod, "direction": "out"}) == 9


def test_datapath_reader_failure_does_not_break_scrape() -> None:
    def broken() -> dict:
        raise OSError("map gone")

    registry = CollectorRegistry()
    AgentMetrics(registry, broken).set_enrolled_pods(1)
    text = exposition(registry)
    assert "meshagent_enrolled_pods 1.0" in text
    assert "meshagent_datapath_captured_packets_total{" not in text


def test_serve_metrics_is_closable() -> None:
    registry = CollectorRegistry()
    TunnelMetrics(registry).connection_opened(labels())
    with serve_metrics(registry, "127.0.0.1", 0) as server:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics",
                                    timeout=5) as response:
            body = response.read().decode()
        assert "istio_tcp_connections_opened_total{" in body
