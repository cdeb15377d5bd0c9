"""Waypoints in the lab: the deployment models of issue 16 as pods.

A waypoint runs as a pod of its own (netns ``<prefix>-nN-wK``, host veth
``<prefix>nNwK``, address ``10.244.N.(200+K)`` / ``fd00:10:244:N::(200+K)``, its own
SPIFFE identity ``ns/<namespace>/sa/<gateway name>``), never enrolled (as Istio's
waypoints carry ``istio.io/dataplane-mode: none``), running ``meshagent waypoint``.

:data:`SCENARIO` is the lab's (and the demo's) set-up, on a lab with three pods per
node (``-a`` in ``default``, ``-b`` in ``team-b``, ``-c`` in ``team-c``):

- **per namespace**: ``team-b/waypoint`` (node1, ``waypoint-for: all``), used by
  namespace ``team-b`` (``istio.io/use-waypoint: waypoint``). Service ``team-b/echo``
  (``10.96.1.10:80`` -> n1-b, n2-b ``:8080``, port ``http``) goes through it, and so
  does traffic to n1-b's own address. Its L7 policy (:data:`POLICY`): GET only, from
  namespace ``default``;
- **L4 only**: ``team-b/db`` (``10.96.1.11:80`` -> n2-b, port ``tcp``) is labelled
  ``istio.io/use-waypoint: none`` and skips the waypoint;
- **per service**: ``team-b/hot-waypoint`` (node2, ``all``) for Service ``team-b/hot``
  (``10.96.1.12:80`` -> n2-b) and, by the pod's own label beating the namespace's,
  for traffic to n2-b's address;
- **shared**: ``infra/shared`` (node2, ``service``, ``allowedRoutes`` from ``All``),
  used by namespace ``team-c`` through ``istio.io/use-waypoint-namespace: infra``:
  Service ``team-c/echo`` (``10.96.1.20:80`` -> n1-c, n2-c);
- **missing**: Service ``team-b/ghost`` (``10.96.1.13:80``) names waypoint ``gone``,
  which nobody runs: the node tunnels refuse its connections.

:func:`waypoint_model` (pure) is the lab's model plus the waypoint pods, their
Services and the scenario's Services, with every ``waypoint`` field filled by
:func:`agent.waypoint.config.assign_waypoints` from :func:`documents` (the
Namespace/Service/Pod/Gateway/AuthorizationPolicy YAML the waypoints also read).
:func:`start_waypoints` builds the pods, writes the files (``<run>/model.yaml``,
which every node tunnel reloads, and ``<run>/waypoints/*.yaml``) and starts one
``meshagent waypoint`` per pod; ``lab down`` removes all of it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.lab import netlab
from agent.lab.services import CLUSTER_ID, MODEL_FILENAME, lab_model
from agent.lab.topology import LabPlan, PodPlan
from agent.model.loader import model_to_yaml
from agent.model.merge import pod_uid
from agent.model.types import (
    InboundProtocol,
    Model,
    NamespacedHostname,
    NetworkAddress,
    Service,
    ServiceBinding,
    Workload,
)
from agent.waypoint.binding import (
    GATEWAY_NAME_LABEL,
    MANAGED_LABEL,
    MESH_CONTROLLER,
    USE_WAYPOINT,
    USE_WAYPOINT_NAMESPACE,
    WAYPOINT_FOR,
)
from agent.waypoint.config import HBONE_PORT, assign_waypoints, waypoint_hostname

FIRST_WAYPOINT_HOST = 200
CONFIG_DIRNAME = "waypoints"
APP_PORT = 8080
READY_TIMEOUT_S = 30.0
POLL_S = 0.1
PODS_PER_NODE = 3  # the scenario's pods: -a default, -b team-b, -c team-c


@dataclass(frozen=True)
class WaypointPod:
    """One waypoint: its Gateway (namespace/name, ``waypoint-for``, ``allowedRoutes``)
    and where its pod runs."""

    namespace: str
    name: str
    node: str
    traffic: str = "service"
    allowed_from: str = "Same"
    metrics_port: int = 15020

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def process(self) -> str:
        """Its log/pid file name under the node's run directory."""
        return f"waypoint-{self.namespace}-{self.name}"


@dataclass(frozen=True)
class LabService:
    """A Service of the scenario: VIP, port name (protocol), endpoint pods, labels."""

    namespace: str
    name: str
    vip: str
    port_name: str
    endpoints: tuple[str, ...]
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    port: int = 80

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"


SCENARIO: tuple[WaypointPod, ...] = (
    WaypointPod("team-b", "waypoint", "node1", traffic="all"),
    WaypointPod("team-b", "hot-waypoint", "node2", traffic="all"),
    WaypointPod("infra", "shared", "node2", traffic="service", allowed_from="All"),
)
SERVICES: tuple[LabService, ...] = (
    LabService("team-b", "echo", "10.96.1.10", "http", ("n1-b", "n2-b")),
    LabService("team-b", "db", "10.96.1.11", "tcp", ("n2-b",), {USE_WAYPOINT: "none"}),
    LabService("team-b", "hot", "10.96.1.12", "http", ("n2-b",), {USE_WAYPOINT: "hot-waypoint"}),
    LabService("team-b", "ghost", "10.96.1.13", "http", ("n2-b",), {USE_WAYPOINT: "gone"}),
    LabService("team-c", "echo", "10.96.1.20", "http", ("n1-c", "n2-c")),
)
NAMESPACE_LABELS: Mapping[str, Mapping[str, str]] = {
    "default": {},
    "team-b": {USE_WAYPOINT: "waypoint"},
    "team-c": {USE_WAYPOINT: "shared", USE_WAYPOINT_NAMESPACE: "infra"},
    "infra": {},
}
POD_LABELS: Mapping[str, Mapping[str, str]] = {"n2-b": {USE_WAYPOINT: "hot-waypoint"}}
# The demo's L7 policy, at the namespace waypoint: GET only, from namespace default.
POLICY: dict[str, Any] = {
    "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
    "metadata": {"name": "get-from-default", "namespace": "team-b"},
    "spec": {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                             "name": "waypoint"}],
             "action": "ALLOW",
             "rules": [{"from": [{"source": {"namespaces": ["default"]}}],
                        "to": [{"operation": {"methods": ["GET"]}}]}]},
}


def waypoint_pod(plan: LabPlan, wp: WaypointPod, index: int) -> PodPlan:
    """The pod plan of the ``index``-th waypoint (pure)."""
    node = plan.node(wp.node)
    host = FIRST_WAYPOINT_HOST + index
    v4 = ipaddress.ip_network(node.pod_cidrs[0])
    return PodPlan(
        name=f"n{node.index}-w{index}", node=node.name,
        netns=f"{plan.prefix}-n{node.index}-w{index}",
        ipv4=str(v4.network_address + host),
        ipv6=str(ipaddress.IPv6Address(f"fd00:10:244:{node.index}::{host}")),
        host_ifname=f"{plan.prefix}n{node.index}w{index}",
        gateway_ipv4=str(v4.network_address + 1),
        gateway_ipv6=str(ipaddress.IPv6Address(f"fd00:10:244:{node.index}::1")),
        namespace=wp.namespace, service_account=wp.name, enroll=False)


def _addresses(pod: PodPlan) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    return (ipaddress.ip_address(pod.ipv4), ipaddress.ip_address(pod.ipv6))


def _service(namespace: str, name: str, hostname: str, vips: Sequence[str],
             ports: tuple[tuple[int, int], ...]) -> Service:
    return Service(name=name, namespace=namespace, hostname=hostname,
                   vips=tuple(NetworkAddress("", ipaddress.ip_address(v)) for v in vips),
                   ports=ports)


def documents(plan: LabPlan, waypoints: Sequence[WaypointPod] = SCENARIO,
              services: Sequence[LabService] = SERVICES,
              pod_labels: Mapping[str, Mapping[str, str]] = POD_LABELS
              ) -> list[dict[str, Any]]:
    """The binding documents (Namespace, Gateway, Service, Pod) and the policy (pure).
    ``pod_labels``: extra labels by pod name (a waypoint pod's too, ``nN-wK``)."""
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": ns, "labels": dict(labels)}}
        for ns, labels in NAMESPACE_LABELS.items()]
    for i, wp in enumerate(waypoints):
        docs.append({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": wp.name, "namespace": wp.namespace,
                         "labels": {WAYPOINT_FOR: wp.traffic}},
            "spec": {"gatewayClassName": "istio-waypoint", "listeners": [
                {"name": "mesh", "port": HBONE_PORT, "protocol": "HBONE",
                 "allowedRoutes": {"namespaces": {"from": wp.allowed_from}}}]}})
        docs.append({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": wp.name, "namespace": wp.namespace,
                                  "labels": {MANAGED_LABEL: MESH_CONTROLLER}},
                     "spec": {"ports": [{"name": "mesh", "port": HBONE_PORT}]}})
        pod = waypoint_pod(plan, wp, i)
        docs.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": pod.name, "namespace": wp.namespace,
                                  "labels": {GATEWAY_NAME_LABEL: wp.name,
                                             **pod_labels.get(pod.name, {})}}})
    for svc in services:
        docs.append({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": svc.name, "namespace": svc.namespace,
                                  "labels": dict(svc.labels)},
                     "spec": {"ports": [{"name": svc.port_name, "port": svc.port}]}})
    waypoint_pods = {waypoint_pod(plan, wp, i).name for i, wp in enumerate(waypoints)}
    for pod_name, labels in pod_labels.items():
        if pod_name in waypoint_pods:
            continue
        pod = plan.pod(pod_name)
        docs.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": pod.name, "namespace": pod.namespace,
                                  "labels": dict(labels)}})
    docs.append(POLICY)
    return docs


def waypoint_model(plan: LabPlan, waypoints: Sequence[WaypointPod] = SCENARIO,
                   services: Sequence[LabService] = SERVICES,
                   pod_labels: Mapping[str, Mapping[str, str]] = POD_LABELS
                   ) -> tuple[Model, list[str]]:
    """The lab's model with the waypoints and the scenario's Services, every
    ``waypoint`` field set by the binding rules; and the binding problems (pure)."""
    base = lab_model(plan)
    extra: dict[str, list[ServiceBinding]] = {}
    new_services: list[Service] = []
    for svc in services:
        model_svc = _service(svc.namespace, svc.name, svc.hostname, (svc.vip,),
                             ((svc.port, APP_PORT),))
        new_services.append(model_svc)
        for pod_name in svc.endpoints:
            extra.setdefault(pod_name, []).append(
                ServiceBinding(model_svc.key(), ((svc.port, APP_PORT),)))
    workloads = [dataclasses.replace(w, services=tuple(sorted(
        (*w.services, *extra.get(w.name, ())), key=lambda b: b.service)))
        for w in base.workloads]
    for i, wp in enumerate(waypoints):
        pod = waypoint_pod(plan, wp, i)
        host = waypoint_hostname(wp.key)
        new_services.append(_service(wp.namespace, wp.name, host.hostname, (),
                                     ((HBONE_PORT, HBONE_PORT),)))
        workloads.append(Workload(
            uid=pod_uid(CLUSTER_ID, wp.namespace, pod.name), name=pod.name,
            namespace=wp.namespace, workload_ips=_addresses(pod), service_account=wp.name,
            protocol=InboundProtocol.HBONE, node=wp.node, canonical_name=wp.name,
            workload_name=pod.name, workload_type="pod", cluster_id=CLUSTER_ID,
            services=(ServiceBinding(NamespacedHostname(wp.namespace, host.hostname),
                                     ((HBONE_PORT, HBONE_PORT),)),)))
    model = Model.build(workloads, (*base.services, *new_services))
    return assign_waypoints(model, documents(plan, waypoints, services, pod_labels))


def config_dir(plan: LabPlan) -> Path:
    return Path(plan.run_dir) / CONFIG_DIRNAME


def write_files(plan: LabPlan, waypoints: Sequence[WaypointPod] = SCENARIO,
                pod_labels: Mapping[str, Mapping[str, str]] = POD_LABELS) -> list[str]:
    """Write the waypoints' documents and the model every tunnel reads; return the
    binding problems. Side effects: writes ``<run>/waypoints/lab.yaml`` and replaces
    ``<run>/model.yaml`` (each atomically)."""
    model, problems = waypoint_model(plan, waypoints, pod_labels=pod_labels)
    directory = config_dir(plan)
    directory.mkdir(parents=True, exist_ok=True)
    _write(directory / "lab.yaml", yaml.safe_dump_all(
        documents(plan, waypoints, pod_labels=pod_labels), sort_keys=False))
    _write(Path(plan.run_dir) / MODEL_FILENAME, model_to_yaml(model))
    return problems


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _listening(netns_name: str, port: int) -> bool:
    out = subprocess.run(["ip", "netns", "exec", netns_name, "ss", "-Hltn", f"sport = :{port}"],
                         capture_output=True, text=True, timeout=10, check=False)
    return out.returncode == 0 and bool(out.stdout.strip())


def _start(plan: LabPlan, wp: WaypointPod, pod: PodPlan, model_file: Path,
           config: Path) -> int:
    """Start ``meshagent waypoint`` in the pod's netns (log and pid file in the
    node's run directory: ``lab down`` stops it)."""
    run = Path(plan.run_dir)
    argv = [sys.executable, "-m", "agent", "waypoint", "--name", wp.name,
            "--namespace", wp.namespace, "--service-account", wp.name,
            "--model", str(model_file), "--config-dir", str(config),
            "--ca-dir", str(run / "ca"), "--metrics-port", str(wp.metrics_port)]
    return netlab.start_node_process(plan, wp.node, wp.process, argv,
                                     {"MESHAGENT_LOG_JSON": "1", "PYTHONUNBUFFERED": "1"},
                                     in_netns=pod.netns)


def _wait_listening(plan: LabPlan, wp: WaypointPod, pod: PodPlan, pid: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not _listening(pod.netns, HBONE_PORT):
        if time.monotonic() > deadline or not netlab.process_alive(pid):
            log = Path(plan.node_run_dir(wp.node)) / f"{wp.process}.log"
            tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
            raise netlab.LabError(f"waypoint {wp.key} did not listen on {HBONE_PORT} "
                                  f"within {READY_TIMEOUT_S:.0f}s; {log}:\n{tail}")
        time.sleep(POLL_S)


def start_waypoint(plan: LabPlan, wp: WaypointPod, pod: PodPlan, model_file: Path,
                   config: Path) -> int:
    """Start one waypoint in its pod (built already: :func:`netlab.add_extra_pod`)
    reading ``model_file`` and the documents in ``config``, and wait until it listens
    on 15008; return its pid. For a lab whose model comes from elsewhere (``lab up
    --kube``: the node agent writes it from the API server).

    Side effects: one process (``lab down`` stops it). Raises :class:`netlab.LabError`
    with its log when it does not come up."""
    pid = _start(plan, wp, pod, model_file, config)
    _wait_listening(plan, wp, pod, pid)
    return pid


def start_waypoints(plan: LabPlan, waypoints: Sequence[WaypointPod] = SCENARIO
                    ) -> list[tuple[WaypointPod, PodPlan]]:
    """Build every waypoint pod, write the files, start the waypoints and wait until
    each listens on 15008. The lab must be up in HBONE mode (its CA exists).

    Side effects: namespaces, veths, addresses and routes (:func:`netlab.add_extra_pod`),
    the files of :func:`write_files`, one process per waypoint. Raises
    :class:`netlab.LabError` naming the waypoint that did not come up (and its log);
    ``lab down`` removes everything this started."""
    if not (Path(plan.run_dir) / "ca").is_dir():
        raise netlab.LabError(f"lab {plan.prefix} has no mesh CA: waypoints need the lab up "
                              "in HBONE mode (`meshagent lab up`, MESHAGENT_LAB_MODE=hbone)")
    missing = sorted({p for svc in SERVICES for p in svc.endpoints}
                     - {p.name for p in plan.pods()})
    if missing:
        raise netlab.LabError(f"lab {plan.prefix} has no pods {', '.join(missing)}: the "
                              f"waypoint scenario needs --pods-per-node {PODS_PER_NODE}")
    pods = [(wp, waypoint_pod(plan, wp, i)) for i, wp in enumerate(waypoints)]
    write_files(plan, waypoints)
    for wp, pod in pods:
        netlab.add_extra_pod(plan, plan.node(wp.node), pod)
    model_file = Path(plan.run_dir) / MODEL_FILENAME
    pids = {wp.key: _start(plan, wp, pod, model_file, config_dir(plan)) for wp, pod in pods}
    for wp, pod in pods:
        _wait_listening(plan, wp, pod, pids[wp.key])
    return pods
