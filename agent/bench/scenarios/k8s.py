"""Scenario ``k8s``: the Kubernetes watch at cluster scale (no datapath).

A lab API server (``python -m agent.kubelab``, its own process) holds 10,000 pods
on 100 nodes in 100 namespaces, 2,000 Services and one EndpointSlice per Service
(5 pods each). In this process the agent's watch (the official client, real HTTP)
lists and watches every kind the agent uses, as node ``node-0``, and the
controller builds the cluster model from it. Measured:

- ``model_rss_mb``: this process's RSS growth from before the watch to after the
  cache is synced and the model built (cache of raw objects + model);
- ``model_traced_mb``: memory tracemalloc attributes to the conversion alone (the
  Model and its indexes, transient peaks excluded);
- ``model_build_s``: one conversion (10,000 pods, 2,000 Services);
- ``model_yaml_write_s`` / ``model_yaml_read_s``: that model as the ztunnel
  local-config YAML the agent writes to ``tunnel.model_file``, and read back as the
  tunnel does on each change (``model_yaml_mb``: its size);
- ``sync_s``: from starting the watch to every kind listed;
- ``label_to_enroll_ms``: from sending the namespace label patch (what ``kubectl
  label namespace bench istio.io/dataplane-mode=ambient`` sends) to the controller
  having computed and handed all 100 enroll actions of that namespace's pods on
  this node to the (in-memory, instant) enrollment backend; repeated with
  unlabel -> 100 unenrolls. Excludes the datapath's own enrollment time (see the
  ``enroll`` scenario for that).

**In the real datapath** (:func:`measure_datapath`, root): a lab (``lab up --kube``,
plain tunnels) whose node1 gets 100 more veth pods (netns ``<prefix>-eNNN`` with
``eth0`` 10.250.0.N/32, host veth routed in node1, as a routed CNI leaves them) and
100 Pod objects for them in namespace ``bench`` on the lab API server. Measured:
``datapath_label_to_enrolled_s``, from starting ``kubectl --kubeconfig ... label
namespace bench istio.io/dataplane-mode=ambient`` to node1's agent listing all 100
in ``pod_list`` (each enrolled by the daemon's pod_add transaction: netns found from
the IP, BPF maps, tc filters, registry), and ``datapath_unlabel_to_unenrolled_s``
back to none; ``kubectl_s`` is one kubectl run alone (its own start-up is part of the
above). The anchor, in the same lab: the same 100 pods enrolled by 100 direct
``pod_add`` API calls (netns given, names the API server does not know, periodic
passes off for the run so the watch leaves them alone) and removed by ``pod_del``
(``anchor_pod_add_s`` / ``anchor_pod_del_s``).

Run: ``.venv/bin/python -m agent.bench.scenarios.k8s`` (prints JSON), or as a
scenario: ``scripts/bench.sh k8s``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Mapping
from pathlib import Path
from typing import Any

NAME = "k8s"
DESCRIPTION = ("Kubernetes: kubectl label namespace -> 100 pods enrolled in the datapath; "
               "agent memory with 10k pods and 2k Services in the model")
PODS, NODES, NAMESPACES, SERVICES, PER_SERVICE = 10_000, 100, 100, 2_000, 5


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cluster_objects(pods: int = PODS, services: int = SERVICES) -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace",
                                   "metadata": {"name": "bench"}}]
    objs += [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"ns-{i}"}}
             for i in range(NAMESPACES - 1)]
    names = []
    for i in range(pods):
        node = i % NODES
        ns = "bench" if node == 0 else f"ns-{i % (NAMESPACES - 1)}"
        name = f"pod-{i}"
        ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        names.append((ns, name, ip))
        objs.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": name, "namespace": ns,
                                  "labels": {"app": f"app-{i % services}", "version": "v1"}},
                     "spec": {"nodeName": f"node-{node}", "serviceAccountName": "default",
                              "containers": [{"name": "app", "image": "registry.local/app:1",
                                              "ports": [{"containerPort": 8080}]}]},
                     "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                                "conditions": [{"type": "Ready", "status": "True"}]}})
    for s in range(services):
        ns = f"ns-{s % (NAMESPACES - 1)}"
        vip = f"10.96.{(s >> 8) & 255}.{s & 255}"
        objs.append({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": f"svc-{s}", "namespace": ns},
                     "spec": {"clusterIP": vip, "clusterIPs": [vip],
                              "selector": {"app": f"app-{s}"},
                              "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
        members = [names[(s * PER_SERVICE + k) % pods] for k in range(PER_SERVICE)]
        objs.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                     "metadata": {"name": f"svc-{s}-1", "namespace": ns,
                                  "labels": {"kubernetes.io/service-name": f"svc-{s}"}},
                     "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
                     "endpoints": [{"addresses": [ip], "conditions": {"ready": True},
                                    "targetRef": {"kind": "Pod", "namespace": pns,
                                                  "name": pname}}
                                   for pns, pname, ip in members]})
    return objs


class _Backend:
    def __init__(self) -> None:
        self.pods: dict[str, Any] = {}

    async def enrolled(self) -> Mapping[str, Any]:
        return dict(self.pods)

    async def enroll(self, pod: Any) -> None:
        from agent.k8s.reconcile import Enrolled
        self.pods[pod.key] = Enrolled(pod.key, pod.meta.uid)

    async def unenroll(self, key: str) -> None:
        self.pods.pop(key, None)


async def _measure(url: str, reps: int, node_pods: int = PODS // NODES) -> dict[str, Any]:
    from kubernetes import client

    from agent.k8s.controller import NodeController
    from agent.k8s.convert import convert
    from agent.k8s.watch import ClusterWatch, Kind, targets

    cfg = client.Configuration()
    cfg.host = url
    api = client.ApiClient(cfg)
    core = client.CoreV1Api(api)
    backend = _Backend()
    controller = NodeController("node-0", backend, None)
    gc.collect()
    rss0 = _rss_mb()
    watch = ClusterWatch(api, targets("node-0"), watch_timeout=60)
    t0 = time.monotonic()
    watch.start(asyncio.get_running_loop())
    kinds = [t.kind for t in watch.targets]
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(watch, full_every=3600, model_every=3600,
                                              stop=stop))
    out: dict[str, Any] = {}
    try:
        while not controller.cache.is_synced(*kinds):
            await asyncio.sleep(0.01)
        out["sync_s"] = time.monotonic() - t0
        t1 = time.monotonic()
        converted, _ = controller.build_model()
        out["model_build_s"] = time.monotonic() - t1
        gc.collect()
        out["model_rss_mb"] = _rss_mb() - rss0
        out["workloads"] = len(converted.model.workloads)
        out["services"] = len(converted.model.services)
        from agent.model.loader import load_model_text, model_to_yaml
        t1 = time.monotonic()
        text = model_to_yaml(converted.model)  # what the agent writes for the tunnel
        out["model_yaml_write_s"] = time.monotonic() - t1
        out["model_yaml_mb"] = len(text) / 2**20
        t1 = time.monotonic()
        load_model_text(text)  # what the tunnel does with it on every change
        out["model_yaml_read_s"] = time.monotonic() - t1
        del converted, text
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        kept = convert(controller.cache.raw[Kind.PODS].values(),
                       controller.cache.raw[Kind.SERVICES].values(),
                       controller.cache.raw[Kind.ENDPOINT_SLICES].values())
        gc.collect()
        out["model_traced_mb"] = (tracemalloc.get_traced_memory()[0] - base) / 2**20
        tracemalloc.stop()
        del kept
        latencies = []
        for _ in range(reps):
            for value, want in (("ambient", node_pods), (None, 0)):
                t = time.monotonic()
                # what `kubectl label namespace bench istio.io/dataplane-mode=ambient`
                # (and `istio.io/dataplane-mode-`) sends: a JSON merge patch
                body = {"metadata": {"labels": {"istio.io/dataplane-mode": value}}}
                ctype = "application/merge-patch+json"
                await asyncio.to_thread(core.patch_namespace, "bench", body, _content_type=ctype)
                while len(backend.pods) != want:
                    await asyncio.sleep(0.001)
                latencies.append((value or "unlabel", (time.monotonic() - t) * 1000))
        out["label_to_enroll_ms"] = [ms for v, ms in latencies if v == "ambient"]
        out["unlabel_to_unenroll_ms"] = [ms for v, ms in latencies if v == "unlabel"]
    finally:
        stop.set()
        await task
        await asyncio.to_thread(watch.stop)
        api.close()
    return out


def measure(reps: int = 5) -> dict[str, Any]:
    """Start the lab API server with the cluster, measure, stop it; the numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        load = Path(tmp) / "cluster.json"
        load.write_text(json.dumps(cluster_objects()))
        port_file = Path(tmp) / "kubeconfig"
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "agent.kubelab", "--port", "0",
                                 "--load", str(load), "--kubeconfig", str(port_file)],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("lab API server on "):
                raise RuntimeError(f"the lab API server did not start: {line!r}")
            url = line.split()[-1]
            load_s = time.monotonic() - t0
            result = asyncio.run(_measure(url, reps))
            result["server_load_s"] = load_s
            result["pods"], result["services_in_api"] = PODS, SERVICES
            return result
        finally:
            proc.terminate()
            proc.wait(30)


DATAPATH_PODS = 100
DATAPATH_TIMEOUT_S = 120.0


def _bench_pods(prefix: str, count: int) -> list[tuple[str, str, str]]:
    """(netns, host veth, IPv4) of the extra pods."""
    return [(f"{prefix}-e{i:03d}", f"{prefix}e{i:03d}", f"10.250.0.{i + 1}")
            for i in range(count)]


def _create_routed_pods(node_ns: str, pods: list[tuple[str, str, str]]) -> None:
    """Side effects: the pods' netns, veth pairs, addresses and node routes."""
    subprocess.run(["ip", "-batch", "-"], input="".join(f"netns add {n}\n" for n, _, _ in pods),
                   text=True, check=True, timeout=300, capture_output=True)
    lines = []
    for netns, veth, ip in pods:
        lines += [f"link add {veth} type veth peer name eth0 netns {netns}\n",
                  f"link set {veth} up\n", f"route add {ip}/32 dev {veth} scope link\n"]
    subprocess.run(["ip", "-n", node_ns, "-batch", "-"], input="".join(lines), text=True,
                   check=True, timeout=300, capture_output=True)
    for netns, _, ip in pods:
        subprocess.run(["ip", "-n", netns, "-batch", "-"],
                       input=f"addr add {ip}/32 dev eth0\nlink set eth0 up\nlink set lo up\n",
                       text=True, check=True, timeout=30, capture_output=True)


def _pod_objects(pods: list[tuple[str, str, str]]) -> dict[str, Any]:
    items: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace",
                                    "metadata": {"name": "bench"}}]
    items += [{"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": f"bench-{i:03d}", "namespace": "bench"},
               "spec": {"nodeName": "node1",
                        "containers": [{"name": "app", "image": "registry.local/app:1"}]},
               "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                          "conditions": [{"type": "Ready", "status": "True"}]}}
              for i, (_, _, ip) in enumerate(pods)]
    return {"apiVersion": "v1", "kind": "List", "items": items}


def measure_datapath(reps: int = 2, log_dir: Path | None = None) -> dict[str, Any]:
    """``kubectl label namespace`` -> 100 pods enrolled in the kernel (module doc).

    Side effects: a whole lab (removed afterwards, with the extra pods' netns)."""
    from agent.api import client
    from agent.bench.labctl import BenchLab
    from agent.lab import kube

    out: dict[str, Any] = {"label_s": [], "unlabel_s": [], "kubectl_s": [],
                           "anchor_pod_add_s": [], "anchor_pod_del_s": []}
    os.environ[kube.KUBE_ENV] = "1"
    # no periodic pass or relist during the run: the anchor's pods stay enrolled
    os.environ["MESHAGENT_K8S_RECONCILE_SECONDS"] = "3600"
    os.environ["MESHAGENT_K8S_RESYNC_SECONDS"] = "3600"
    try:
        with BenchLab("plain", log_dir or Path(tempfile.mkdtemp())) as bench:
            assert bench.plan is not None
            plan = bench.plan
            pods = _bench_pods(bench.prefix, DATAPATH_PODS)
            _create_routed_pods(bench.node_ns("node1"), pods)
            try:
                # --validate=false: kubectl's client-side check needs OpenAPI, which the
                # lab server does not serve; it validates every object itself.
                subprocess.run(kube.kubectl_argv(plan, "create", "--validate=false", "-f", "-"),
                               check=True,
                               input=json.dumps(_pod_objects(pods)), text=True, timeout=120,
                               capture_output=True)
                sock = str(Path(plan.node_run_dir("node1")) / "agent.sock")

                def bench_enrolled() -> int:
                    return sum(1 for p in client.call(sock, {"op": "pod_list"}, timeout=30)
                               if p["namespace"] == "bench")

                for _ in range(reps):
                    t = time.perf_counter()
                    subprocess.run(kube.kubectl_argv(plan, "get", "namespace", "bench"),
                                   check=True, capture_output=True, timeout=60)
                    out["kubectl_s"].append(time.perf_counter() - t)
                    for label, want, key in (("istio.io/dataplane-mode=ambient",
                                              DATAPATH_PODS, "label_s"),
                                             ("istio.io/dataplane-mode-", 0, "unlabel_s")):
                        t = time.perf_counter()
                        subprocess.run(kube.kubectl_argv(plan, "label", "namespace", "bench",
                                                         label),
                                       check=True, capture_output=True, timeout=60)
                        deadline = time.monotonic() + DATAPATH_TIMEOUT_S
                        while bench_enrolled() != want:
                            if time.monotonic() > deadline:
                                raise RuntimeError(f"{want} bench pods not reached within "
                                                   f"{DATAPATH_TIMEOUT_S:.0f}s")
                            time.sleep(0.01)
                        out[key].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    for i, (netns, _, _) in enumerate(pods):
                        client.call(sock, {"op": "pod_add", "netns": f"/run/netns/{netns}",
                                           "name": f"anchor-{i:03d}", "namespace": "bench"},
                                    timeout=30)
                    out["anchor_pod_add_s"].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    for i in range(len(pods)):
                        client.call(sock, {"op": "pod_del", "name": f"anchor-{i:03d}",
                                           "namespace": "bench"}, timeout=30)
                    out["anchor_pod_del_s"].append(time.perf_counter() - t)
            finally:
                subprocess.run(["ip", "-batch", "-"], text=True, timeout=300,
                               input="".join(f"netns del {n}\n" for n, _, _ in pods),
                               capture_output=True)
    finally:
        for key in (kube.KUBE_ENV, "MESHAGENT_K8S_RECONCILE_SECONDS",
                    "MESHAGENT_K8S_RESYNC_SECONDS"):
            os.environ.pop(key, None)
    return out


def run(ctx: Any) -> None:
    """As a bench scenario: one measurement, samples into ``ctx``."""
    datapath = measure_datapath(reps=ctx.params.reps)
    for key, metric in (("label_s", "datapath_label_to_enrolled_s"),
                        ("unlabel_s", "datapath_unlabel_to_unenrolled_s"),
                        ("anchor_pod_add_s", "anchor_100_pod_add_s"),
                        ("anchor_pod_del_s", "anchor_100_pod_del_s"),
                        ("kubectl_s", "kubectl_s")):
        for i, seconds in enumerate(datapath[key]):
            ctx.add(NAME, metric, "100 veth pods", i, seconds)
    result = measure(reps=ctx.params.reps)
    for metric in ("model_rss_mb", "model_traced_mb", "model_build_s", "sync_s",
                   "model_yaml_write_s", "model_yaml_read_s"):
        ctx.add(NAME, metric, "10k pods, 2k services", 0, result[metric])
    for i, ms in enumerate(result["label_to_enroll_ms"]):
        ctx.add(NAME, "label_to_enroll_ms", "100 pods", i, ms)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    print(json.dumps({"datapath": measure_datapath(), "model": measure()}, indent=2))
