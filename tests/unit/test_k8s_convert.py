"""Cluster objects -> the cluster model and the policy judgements."""

from __future__ import annotations

import ipaddress

from agent.k8s.convert import convert, convert_policies
from agent.model.types import (
    HealthStatus,
    InboundProtocol,
    NamespacedHostname,
    NetworkAddress,
    NetworkMode,
)
from agent.policy.outcomes import DocumentOutcome


def pod(name, ip, ready=True, annotations=None, host_network=False, phase="Running",
        labels=None):
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "apps", "uid": f"u-{name}",
                         "resourceVersion": "7", "labels": labels or {"app": "web"},
                         "annotations": annotations or {}},
            "spec": {"nodeName": "n1", "serviceAccountName": "web", "hostNetwork": host_network},
            "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}],
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


SERVICE = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "web", "namespace": "apps"},
           "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                    "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                              {"name": "grpc", "port": 9090, "targetPort": 9091}]}}
SLICE = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "web-abc", "namespace": "apps",
                      "labels": {"kubernetes.io/service-name": "web"}},
         "addressType": "IPv4",
         "ports": [{"name": "http", "port": 8080}, {"name": "grpc", "port": 9091}],
         "endpoints": [{"addresses": ["10.1.0.1"], "conditions": {"ready": True},
                        "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "apps"}},
                       {"addresses": ["10.1.0.2"], "conditions": {"ready": False},
                        "targetRef": {"kind": "Pod", "name": "web-2", "namespace": "apps"}}]}


def test_pods_services_and_slices_become_the_model():
    enabled = {"ambient.istio.io/redirection": "enabled"}
    result = convert([pod("web-1", "10.1.0.1", annotations=enabled),
                      pod("web-2", "10.1.0.2", ready=False),
                      pod("job", "10.1.0.9", phase="Succeeded"),
                      pod("hn", "192.168.0.5", host_network=True),
                      pod("hn2", "192.168.0.5", host_network=True)],
                     [SERVICE], [SLICE])
    assert result.problems == ()
    model = result.model
    w1 = model.workload_by_uid("Kubernetes//v1/Pod/apps/web-1")
    assert w1 is not None and w1.protocol is InboundProtocol.HBONE
    assert w1.identity() == "spiffe://cluster.local/ns/apps/sa/web"
    assert w1.canonical_name == "web" and w1.canonical_revision == "latest"
    w2 = model.workload_by_uid("Kubernetes//v1/Pod/apps/web-2")
    assert w2 is not None and w2.status is HealthStatus.UNHEALTHY
    assert w2.protocol is InboundProtocol.TCP
    assert model.workload_by_uid("Kubernetes//v1/Pod/apps/job") is None
    hn = model.workload_by_uid("Kubernetes//v1/Pod/apps/hn")
    assert hn is not None and hn.network_mode is NetworkMode.HOST_NETWORK
    svc = model.service(NamespacedHostname("apps", "web.apps.svc.cluster.local"))
    assert svc is not None
    assert svc.vips == (NetworkAddress("", ipaddress.ip_address("10.96.0.10")),)
    assert dict(svc.ports) == {80: 0, 9090: 9091}
    endpoints = {e.workload_uid: dict(e.ports) for e in model.endpoints(svc)}
    assert endpoints["Kubernetes//v1/Pod/apps/web-1"] == {80: 8080, 9090: 9091}


def test_bad_objects_and_conflicts_are_reported_not_fatal():
    bad_pod = pod("bad", "10.1.0.7")
    bad_pod["metadata"]["labels"] = {"app": 5}
    dup = pod("dup", "10.1.0.1")
    result = convert([pod("web-1", "10.1.0.1"), dup, bad_pod], [SERVICE], [SLICE])
    assert any("metadata.labels" in p for p in result.problems)
    assert any("already" in p for p in result.problems)
    assert result.model.workload_by_uid("Kubernetes//v1/Pod/apps/web-1") is not None
    assert result.model.workload_by_uid("Kubernetes//v1/Pod/apps/dup") is None


def test_authorization_policies_are_judged_one_by_one():
    def ap(name, spec):
        return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": {"name": name, "namespace": "apps", "uid": "x",
                             "resourceVersion": "9", "creationTimestamp": "2024-01-01T00:00:00Z",
                             "managedFields": []},
                "spec": spec, "status": {}}
    policies, results = convert_policies([
        ap("allow", {"action": "ALLOW", "rules": [{"from": [{"source": {
            "principals": ["cluster.local/ns/apps/sa/web"]}}]}]}),
        ap("broken", {"action": "ALLOW", "rules": [{"from": [{"source": {
            "ipBlocks": ["10.0.0.300/8"]}}]}]}),
        ap("audit", {"action": "AUDIT", "rules": [{}]}),
    ])
    outcomes = {r.key: r.outcome for r in results}
    assert outcomes == {"apps/allow": DocumentOutcome.ACCEPTED,
                        "apps/broken": DocumentOutcome.FAIL_CLOSED,
                        "apps/audit": DocumentOutcome.IGNORED}
    assert any("api:apps/broken" in str(r) for r in results if r.issues)
    # the accepted policy and the broken one's fail-closed stand-in are in force
    assert len(policies.policies) == 2
