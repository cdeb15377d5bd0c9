"""``lab up --kube``: the lab's Kubernetes API server and its objects.

The lab API server (:mod:`agent.kubelab`, lab and tests only) runs as a process of
node1 (like a control plane on the first node), listening on node1's underlay
address, so every node's agent reaches it over the underlay. Before the agents start
it is loaded with the lab as Kubernetes objects (:func:`lab_objects`): one Node per
lab node, the pods' Namespaces (unlabelled: nothing is enrolled until someone runs
``kubectl label namespace ... istio.io/dataplane-mode=ambient``; those named in
$MESHAGENT_LAB_KUBE_AMBIENT are labelled from the start), and one Pod per
lab pod (``spec.nodeName``, its IPs in ``status.podIPs``, ``Running`` and ``Ready``);
the plain pods (``nN-plain``) carry ``istio.io/dataplane-mode=none``; and Service
``web.team-b`` (VIPs 10.96.1.10, fd00:96::1:10, port 80 -> 8080) with EndpointSlices
of the ``b`` pods.

kubectl talks to it from node1's netns: :func:`kubectl_argv` (``meshagent lab exec
node1 -- kubectl --kubeconfig <run dir>/kubeconfig ...`` does the same).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from agent.k8s.rules import DATAPLANE_MODE_LABEL, DATAPLANE_MODE_NONE
from agent.lab import netlab
from agent.lab.topology import LabPlan, PodPlan

KUBE_ENV = "MESHAGENT_LAB_KUBE"  # "1": lab up --kube
# Namespaces registered already labelled istio.io/dataplane-mode=ambient (comma list).
AMBIENT_ENV = "MESHAGENT_LAB_KUBE_AMBIENT"
API_PORT = 6443
PROCESS = "kubelab"
READY_TIMEOUT_S = 30.0
READY_LINE = "lab API server on"
# A Service with an EndpointSlice, so the model from the API has one: team-b's pods
# ("b" of every node) behind a VIP, port 80 -> 8080.
SERVICE_NAME, SERVICE_NAMESPACE = "web", "team-b"
SERVICE_HOSTNAME = f"{SERVICE_NAME}.{SERVICE_NAMESPACE}.svc.cluster.local"
SERVICE_VIPS = ("10.96.1.10", "fd00:96::1:10")
SERVICE_PORT, SERVICE_TARGET_PORT = 80, 8080


def kube_enabled() -> bool:
    return os.environ.get(KUBE_ENV, "") in ("1", "true", "yes")


def api_url(plan: LabPlan) -> str:
    return f"http://{plan.nodes[0].underlay_ipv4}:{API_PORT}"


def kubeconfig_path(plan: LabPlan) -> Path:
    return Path(plan.run_dir) / "kubeconfig"


def state_path(plan: LabPlan) -> Path:
    """Where the API server keeps its objects while stopped (a restart restores them)."""
    return Path(plan.run_dir) / "kube-state.json"


def kubectl_argv(plan: LabPlan, *args: str) -> list[str]:
    """``kubectl --kubeconfig <lab kubeconfig> ARGS`` run in node1's netns."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise netlab.LabError("kubectl is not installed: run scripts/setup.sh")
    return netlab.nsenter_argv(plan.nodes[0].netns,
                               [kubectl, "--kubeconfig", str(kubeconfig_path(plan)), *args])


def _pod(pod: PodPlan) -> dict[str, Any]:
    labels = {"app": pod.name}
    if not pod.enroll:
        labels[DATAPLANE_MODE_LABEL] = DATAPLANE_MODE_NONE
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": labels},
        "spec": {"nodeName": pod.node, "serviceAccountName": pod.service_account,
                 "containers": [{"name": "app", "image": "registry.local/lab-app:1"}]},
        "status": {"phase": "Running", "podIP": pod.ipv4,
                   "podIPs": [{"ip": pod.ipv4}, {"ip": pod.ipv6}],
                   "conditions": [{"type": "Ready", "status": "True"}]}}


def lab_objects(plan: LabPlan) -> list[dict[str, Any]]:
    """The lab as Kubernetes objects (see the module docstring; pure)."""
    nodes = [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": n.name},
              "status": {"addresses": [{"type": "InternalIP", "address": n.underlay_ipv4}]}}
             for n in plan.nodes]
    ambient = {n for n in os.environ.get(AMBIENT_ENV, "").split(",") if n}
    namespaces = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": ns, "labels": {DATAPLANE_MODE_LABEL: "ambient"} if ns in ambient else {}}}
                  for ns in sorted({p.namespace for p in plan.pods()})]
    service_accounts = [{"apiVersion": "v1", "kind": "ServiceAccount",
                         "metadata": {"name": sa, "namespace": ns}}
                        for ns, sa in sorted({(p.namespace, p.service_account)
                                              for p in plan.pods()})]
    backends = [p for p in plan.pods() if p.namespace == SERVICE_NAMESPACE]
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": SERVICE_NAME, "namespace": SERVICE_NAMESPACE},
        # no selector: the lab's EndpointSlices below are managed by hand
        "spec": {"clusterIP": SERVICE_VIPS[0], "clusterIPs": list(SERVICE_VIPS),
                 "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                 "ports": [{"name": "http", "port": SERVICE_PORT, "protocol": "TCP",
                            "targetPort": SERVICE_TARGET_PORT}]}}
    slices = [{
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{SERVICE_NAME}-{family.lower()}",
                     "namespace": SERVICE_NAMESPACE,
                     "labels": {"kubernetes.io/service-name": SERVICE_NAME,
                                "endpointslice.kubernetes.io/managed-by": "meshagent-lab"}},
        "addressType": family,
        "ports": [{"name": "http", "port": SERVICE_TARGET_PORT, "protocol": "TCP"}],
        "endpoints": [{"addresses": [p.ipv4 if family == "IPv4" else p.ipv6],
                       "conditions": {"ready": True}, "nodeName": p.node,
                       "targetRef": {"kind": "Pod", "name": p.name,
                                     "namespace": p.namespace}} for p in backends]}
        for family in ("IPv4", "IPv6")] if backends else []
    return [*nodes, *namespaces, *service_accounts, *(_pod(p) for p in plan.pods()),
            *([service] if backends else []), *slices]


def write_kubeconfig(plan: LabPlan) -> Path:
    """Side effects: writes ``<run dir>/kubeconfig`` (plain HTTP, no credentials)."""
    path = kubeconfig_path(plan)
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "lab",
        "clusters": [{"name": "lab", "cluster": {"server": api_url(plan)}}],
        "users": [{"name": "lab", "user": {}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "lab"}}]}))
    return path


def start_api_server(plan: LabPlan, objects: list[dict[str, Any]] | None = None) -> int:
    """Start the lab API server on node1 loaded with ``objects`` (default: the lab's)
    and wait until it serves; return its pid. Started again after a stop, it restores
    the objects it saved (:func:`state_path`) instead.

    Side effects: writes ``<run dir>/kubeconfig`` and ``<run dir>/kube-objects.json``,
    starts process ``kubelab`` on node1 (stopped by ``lab down``)."""
    load = Path(plan.run_dir) / "kube-objects.json"
    state = state_path(plan)
    load.write_text(json.dumps(lab_objects(plan) if objects is None else objects))
    write_kubeconfig(plan)
    node = plan.nodes[0]
    log_path = Path(netlab.process_log_path(plan, node.name, PROCESS))
    offset = log_path.stat().st_size if log_path.exists() else 0
    pid = netlab.start_node_process(
        plan, node, PROCESS,
        [sys.executable, "-m", "agent.kubelab", "--host", node.underlay_ipv4,
         "--port", str(API_PORT), *(("--load", str(load)) if not state.exists() else ()),
         "--state", str(state)], {"PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        with open(log_path, "rb") as fh:
            fh.seek(offset)
            if READY_LINE.encode() in fh.read():
                return pid
        time.sleep(0.1)
    raise netlab.LabError(f"the lab API server did not start within {READY_TIMEOUT_S:.0f}s; "
                          f"see {log_path}")


def node_env(plan: LabPlan, node_name: str) -> dict[str, str]:
    """The agent's and tunnel's overrides in a kube lab: watch the lab API server; the
    model comes from it (no files exchanged between nodes)."""
    run = Path(plan.node_run_dir(node_name))
    return {"MESHAGENT_K8S_ENABLED": "1",
            "MESHAGENT_K8S_KUBECONFIG": str(kubeconfig_path(plan)),
            "MESHAGENT_K8S_NODE_NAME": node_name,
            # a full pass every 5 s unless the caller's environment says otherwise
            "MESHAGENT_K8S_RECONCILE_SECONDS": os.environ.get(
                "MESHAGENT_K8S_RECONCILE_SECONDS", "5"),
            "MESHAGENT_TUNNEL_PEER_WORKLOADS": "",
            "MESHAGENT_TUNNEL_MODEL_FILE": str(run / "model.yaml")}
