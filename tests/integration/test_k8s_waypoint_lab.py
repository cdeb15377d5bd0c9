"""Waypoints bound from the API server (root): ``lab up --kube``, real kubectl, a
waypoint pod, real curl, the real kernel datapath.

The lab API server holds the waypoint as Kubernetes objects applied with kubectl: its
Pod (``team-b/n1-w0`` on node1, ``gateway.networking.k8s.io/gateway-name: waypoint``,
never enrolled), its Service (headless, ``gateway.istio.io/managed``) and
EndpointSlice, the ``Gateway`` ``team-b/waypoint`` and the L7 AuthorizationPolicy
"GET only, from namespace default" attached to it with ``targetRefs``. The node agents
compute the waypoint bindings from the API (``assign_waypoints``) into the model each
tunnel loads. The waypoint process reads its configuration from files: this test
writes into its config directory the documents the API holds (``kubectl get ... -o
json``), and it reads node1's model (the one node1's agent writes from the API).

* ``kubectl label namespace team-b istio.io/use-waypoint=waypoint``: an enrolled pod's
  curl to Service ``web.team-b`` goes through the waypoint (node1's tunnel records
  ``path=waypoint``, the server sees the waypoint's address, the waypoint's access
  log and ``reporter="waypoint"`` metrics count it) and the L7 policy applies (POST
  403 ``RBAC: access denied``);
* the label removed: the same curl goes straight to the pod over HBONE (POST 200, the
  server sees the client), the waypoint sees nothing more.

Behaviour only, never timings; every wait is bounded; the lab is removed afterwards.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from labkit import (
    CurlResult,
    Lab,
    LabSpec,
    closed_records,
    curl,
    diagnose,
    kube_lab_up,
    log_events,
    mark,
    program,
    run_in,
    until,
)
from prometheus_client.parser import text_string_to_metric_families

from agent.lab import kube, netlab, waypoints
from agent.waypoint.binding import GATEWAY_NAME_LABEL, MANAGED_LABEL, MESH_CONTROLLER

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(300)]

LAB = LabSpec(letter="g", mode="hbone")
WAIT = 15.0
WAYPOINT = waypoints.WaypointPod("team-b", "waypoint", "node1", traffic="service")
WAYPOINT_HOST = "waypoint.team-b.svc.cluster.local"
SERVERS = ("n1-b", "n2-b")


def kubectl(lab: Lab, *args: str, stdin: str | None = None) -> str:
    out = subprocess.run(kube.kubectl_argv(lab.plan, *args), capture_output=True, text=True,
                         timeout=30, input=stdin)
    assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
    return out.stdout


def waypoint_objects(lab: Lab) -> list[dict[str, Any]]:
    """The waypoint as the API holds it (what istiod's deployment controller and the
    kubelet would create for a waypoint Gateway), and the Gateway and its policy."""
    pod = waypoints.waypoint_pod(lab.plan, WAYPOINT, 0)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": WAYPOINT.name, "namespace": WAYPOINT.namespace}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
         "metadata": {"name": WAYPOINT.name, "namespace": WAYPOINT.namespace,
                      "labels": {"istio.io/waypoint-for": WAYPOINT.traffic}},
         "spec": {"gatewayClassName": "istio-waypoint", "listeners": [
             {"name": "mesh", "port": 15008, "protocol": "HBONE"}]}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": pod.name, "namespace": WAYPOINT.namespace,
                      "labels": {GATEWAY_NAME_LABEL: WAYPOINT.name,
                                 "istio.io/dataplane-mode": "none"}},
         "spec": {"nodeName": WAYPOINT.node, "serviceAccountName": WAYPOINT.name,
                  "containers": [{"name": "istio-proxy", "image": "registry.local/wp:1"}]}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": WAYPOINT.name, "namespace": WAYPOINT.namespace,
                      "labels": {MANAGED_LABEL: MESH_CONTROLLER}},
         "spec": {"clusterIP": "None", "ports": [
             {"name": "mesh", "port": 15008, "protocol": "TCP", "targetPort": 15008}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": f"{WAYPOINT.name}-ipv4", "namespace": WAYPOINT.namespace,
                      "labels": {"kubernetes.io/service-name": WAYPOINT.name}},
         "addressType": "IPv4",
         "ports": [{"name": "mesh", "port": 15008, "protocol": "TCP"}],
         "endpoints": [{"addresses": [pod.ipv4], "conditions": {"ready": True},
                        "nodeName": WAYPOINT.node,
                        "targetRef": {"kind": "Pod", "name": pod.name,
                                      "namespace": WAYPOINT.namespace}}]},
        waypoints.POLICY,
    ]


def model_loaded(lab: Lab, node: str, bound: bool) -> None:
    """``node``'s agent wrote a model with (without) Service web's waypoint, and its
    tunnel loaded that file."""
    model = lab.node_dir(node) / "model.yaml"

    def written() -> float | None:
        text = model.read_text() if model.exists() else ""
        docs = yaml.safe_load(text) or {} if text else {}
        web = [s for s in docs.get("services") or []
               if s.get("hostname") == kube.SERVICE_HOSTNAME]
        if web and bool(web[0].get("waypoint")) == bound:
            return model.stat().st_mtime
        return None

    at = until(f"{node}'s model has web {'bound' if bound else 'not bound'}", written, WAIT)
    until(f"{node}'s tunnel loaded that model", lambda: any(
        e.get("event") == "model loaded" and e.get("path") == str(model)
        and datetime.fromisoformat(e["timestamp"]).timestamp() >= at - 0.001
        for e in log_events(lab, node)) or None, WAIT)


def web(lab: Lab, method: str = "GET") -> CurlResult:
    """Real curl from the enrolled n1-a to Service web.team-b's VIP."""
    return curl(lab.ns("n1-a"), kube.SERVICE_VIPS[0], kube.SERVICE_PORT, method=method)


def requests_seen(lab: Lab, netns: str, code: str) -> float:
    res = run_in(netns, ["curl", "-s", "-m", "5",
                         f"http://127.0.0.1:{WAYPOINT.metrics_port}/metrics"])
    assert res.returncode == 0, res.stderr
    return sum(s.value for f in text_string_to_metric_families(res.stdout) for s in f.samples
               if s.name == "istio_requests_total" and s.labels.get("reporter") == "waypoint"
               and s.labels.get("response_code") == code
               and s.labels.get("destination_service") == kube.SERVICE_HOSTNAME)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with kube_lab_up(LAB, tmp_path_factory.mktemp("lab-k8s-wp")) as lab:
        yield lab


def test_namespace_label_binds_the_waypoint_from_the_api_and_unlabel_goes_direct(
        lab: Lab, tmp_path: Path) -> None:
    for pod in SERVERS:
        lab.background.start(
            lab.ns(pod), f"http-{pod}",
            [*program("datapath_server"), pod, str(kube.SERVICE_TARGET_PORT), "18081",
             "18082", "16"], ready_line="ready")
    wp_pod = waypoints.waypoint_pod(lab.plan, WAYPOINT, 0)
    netlab.add_extra_pod(lab.plan, lab.plan.node(WAYPOINT.node), wp_pod)
    kubectl(lab, "apply", "-f", "-", stdin=yaml.safe_dump_all(waypoint_objects(lab)))
    kubectl(lab, "patch", "pod", "-n", WAYPOINT.namespace, wp_pod.name,
            "--subresource=status", "--type=merge", "-p", json.dumps({"status": {
                "phase": "Running", "podIP": wp_pod.ipv4, "podIPs": [{"ip": wp_pod.ipv4}],
                "conditions": [{"type": "Ready", "status": "True"}]}}))
    for ns in ("default", "team-b"):
        kubectl(lab, "label", "namespace", ns, "istio.io/dataplane-mode=ambient")
    kubectl(lab, "label", "namespace", "team-b", "istio.io/use-waypoint=waypoint")
    for node in ("node1", "node2"):
        model_loaded(lab, node, bound=True)

    # The waypoint's files: the documents the API holds, and node1's model (from the API).
    config = tmp_path / "waypoint-config"
    config.mkdir()
    held = json.loads(kubectl(
        lab, "get", "namespaces,services,pods,gateways.gateway.networking.k8s.io,"
        "authorizationpolicies.security.istio.io", "-A", "-o", "json"))["items"]
    (config / "api.yaml").write_text(yaml.safe_dump_all(held, sort_keys=False))
    waypoints.start_waypoint(lab.plan, WAYPOINT, wp_pod, lab.node_dir("node1") / "model.yaml",
                             config)

    since = mark(lab)
    got = web(lab)
    assert got.status == 200, f"{got}\n{diagnose(lab)}"
    assert got.server_view()["peer"] == wp_pod.ipv4  # reached from the waypoint
    got = web(lab, "POST")
    assert (got.status, got.body.strip()) == (403, "RBAC: access denied")
    record = until("node1's outbound record to web", lambda: next(
        (r for r in closed_records(lab, "node1", since, direction="outbound")
         if r.get("original_dst") == f"{kube.SERVICE_VIPS[0]}:{kube.SERVICE_PORT}"), None),
                   WAIT)
    assert record["path"] == "waypoint", record
    assert record["waypoint"] == f"team-b/{WAYPOINT_HOST}"
    assert record["dst"] == f"{wp_pod.ipv4}:15008"
    assert record["dst_identity"] == "spiffe://cluster.local/ns/team-b/sa/waypoint"
    access = until("the waypoint's access log lines", lambda: [
        e for e in log_events(lab, WAYPOINT.node, name=WAYPOINT.process)
        if e.get("event") == "request"
        and e.get("destination_service") == kube.SERVICE_HOSTNAME] or None, WAIT)
    assert sorted((e["method"], e["response_code"]) for e in access) == [
        ("GET", 200), ("POST", 403)]
    assert requests_seen(lab, wp_pod.netns, "200") == 1
    assert requests_seen(lab, wp_pod.netns, "403") == 1

    kubectl(lab, "label", "namespace", "team-b", "istio.io/use-waypoint-")
    for node in ("node1", "node2"):
        model_loaded(lab, node, bound=False)
    since = mark(lab)
    got = web(lab, "POST")
    assert got.status == 200, f"{got}\n{diagnose(lab)}"
    assert got.server_view()["peer"] == lab.pod("n1-a").ipv4  # straight from the client
    record = until("node1's outbound record to web", lambda: next(
        (r for r in closed_records(lab, "node1", since, direction="outbound")
         if r.get("original_dst") == f"{kube.SERVICE_VIPS[0]}:{kube.SERVICE_PORT}"), None),
                   WAIT)
    # either endpoint: n2-b over HBONE, or n1-b on the client's own node
    assert record["path"] in ("hbone", "hbone-local") and "waypoint" not in record, record
    assert requests_seen(lab, wp_pod.netns, "200") == 1  # the waypoint saw nothing more
    for ns in ("default", "team-b"):
        kubectl(lab, "label", "namespace", ns, "istio.io/dataplane-mode-")
