"""Scenario ``waypoint``: seed 004's deployment-model experiment, scaled to this
machine, and one waypoint next to HAProxy. Loopback only (no netns, no eBPF): the
node tunnels are :mod:`agent.bench.waypoint_hops`, the apps are Fortio echo servers
on 127.0.1.x / 127.0.2.x "pod" addresses, the load is Fortio (seed 004's tool).

1. ``capacity``: one namespace through its own waypoint, Fortio at max rate
   (``-qps 0``) with the experiment's connection count: the waypoint path's capacity.
2. ``dedicated`` vs ``shared``: two namespaces, each at ~80 % of half the capacity
   with many connections, at once; first each with its own waypoint (two
   processes), then both bound to one waypoint in ``infra`` (``allowedRoutes: All``).
   Per namespace: average, p50, p90, p99 latency and error %. A plot
   (``waypoint_models.png``) shows them side by side.
3. ``haproxy`` vs ``waypoint``: requests/s at max rate, 16 connections, for HAProxy
   (``nbthread 1``) proxying plain HTTP/1.1 to the same Fortio server, and for the
   waypoint path; the waypoint process's CPU (``/proc/<pid>/stat``) per 1,000
   requests/s, next to Istio's published 0.25 vCPU, with the access log on and off
   (Istio's default), and the tunnel hops' and HAProxy's CPU per 1,000 requests/s.

Every process started is stopped in ``finally``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from agent.bench.scenarios.common import PY, Context
from agent.identity.ca import init_ca
from agent.model.loader import model_to_yaml
from agent.model.types import (
    InboundProtocol,
    Model,
    NamespacedHostname,
    NetworkAddress,
    Service,
    ServiceBinding,
    Workload,
    port_map,
)

NAME = "waypoint"
DESCRIPTION = "waypoint deployment models (seed 004, scaled) and HAProxy comparison"
ROOT = Path(__file__).resolve().parents[3]
FORTIO = ROOT / ".tools" / "bin" / "fortio"
NAMESPACES = ("ns-a", "ns-b")
POD_IP = {"ns-a": "127.0.1.1", "ns-b": "127.0.2.1"}
VIP = {"ns-a": "10.96.1.1", "ns-b": "10.96.2.1"}
APP_PORT = {"ns-a": 18081, "ns-b": 18082}
ENTRY_PORT = {"ns-a": 18181, "ns-b": 18182}
WP_PORT = {"ns-a": 18281, "ns-b": 18282, "infra": 18283}
HAPROXY_PORT = 18381
ISTIO_VCPU_PER_KRPS = 0.25


def _model() -> Model:
    workloads, services = [], []
    for ns in NAMESPACES:
        host = f"echo.{ns}.svc.cluster.local"
        workloads.append(Workload(
            uid=f"bench//v1/Pod/{ns}/echo-1", name="echo-1", namespace=ns,
            workload_ips=(ipaddress.ip_address(POD_IP[ns]),),
            service_account="echo", protocol=InboundProtocol.HBONE,
            services=(ServiceBinding(NamespacedHostname(ns, host),
                                     port_map({80: APP_PORT[ns]})),)))
        services.append(Service("echo", ns, host, vips=(NetworkAddress(
            "", ipaddress.ip_address(VIP[ns])),), ports=port_map({80: APP_PORT[ns]})))
    return Model.build(workloads, services)


def _docs(shared: bool) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for ns in NAMESPACES:
        labels = ({"istio.io/use-waypoint": "waypoint",
                   "istio.io/use-waypoint-namespace": "infra"} if shared
                  else {"istio.io/use-waypoint": "waypoint"})
        docs.append({"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": ns, "labels": labels}})
        docs.append({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": "echo", "namespace": ns},
                     "spec": {"ports": [{"name": "http", "port": 80}]}})
    for ns in (("infra",) if shared else NAMESPACES):
        docs.append({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                     "metadata": {"name": "waypoint", "namespace": ns},
                     "spec": {"gatewayClassName": "istio-waypoint", "listeners": [
                         {"name": "mesh", "port": 15008, "protocol": "HBONE",
                          "allowedRoutes": {"namespaces": {"from": "All" if shared
                                                           else "Same"}}}]}})
        # An L7 policy, so the path does real work: GET only.
        docs.append({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                     "metadata": {"name": "get-only", "namespace": ns},
                     "spec": {"targetRefs": [{"kind": "Gateway",
                                              "group": "gateway.networking.k8s.io",
                                              "name": "waypoint"}],
                              "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}})
    return docs


class Procs:
    """Started processes, stopped (TERM, then KILL) in reverse order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], ready: str | None = None,
              timeout: float = 20.0) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"waypoint-{name}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs.append(proc)
        if ready is not None:
            deadline = time.monotonic() + timeout
            while ready not in (self.log_dir / f"waypoint-{name}.log").read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start (see {log.name})")
                time.sleep(0.1)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _fortio(url: str, qps: int, conns: int, seconds: int, out: Path) -> dict[str, Any]:
    subprocess.run([str(FORTIO), "load", "-qps", str(qps), "-c", str(conns), "-t",
                    f"{seconds}s", "-json", str(out), "-quiet", "-allow-initial-errors", url],
                   check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=seconds + 60)
    return json.loads(out.read_text()) if out.exists() else {}


def _summary(result: dict[str, Any]) -> dict[str, float]:
    hist = result.get("DurationHistogram") or {}
    pct = {p["Percentile"]: p["Value"] * 1000 for p in hist.get("Percentiles") or []}
    codes = result.get("RetCodes") or {}
    total = sum(codes.values()) or 1
    ok = codes.get("200", 0)
    return {"rps": float(result.get("ActualQPS", 0.0)), "avg_ms": hist.get("Avg", 0) * 1000,
            "p50_ms": pct.get(50, 0.0), "p90_ms": pct.get(90, 0.0), "p99_ms": pct.get(99, 0.0),
            "error_pct": 100.0 * (total - ok) / total}


def run(ctx: Context) -> None:
    if not FORTIO.exists() or shutil.which("haproxy") is None:
        ctx.note(NAME, "fortio or haproxy missing: run scripts/setup.sh")
        return
    quick = ctx.params.quick
    seconds = 5 if quick else 20
    conns = 20 if quick else 100  # seed 004: 650 per namespace; scaled to 2 cores
    work = Path(tempfile.mkdtemp(prefix="meshagent-waypoint-bench-"))
    ctx.log_dir.mkdir(parents=True, exist_ok=True)
    procs = Procs(ctx.log_dir)
    try:
        init_ca(work / "ca", "cluster.local")
        (work / "model.yaml").write_text(model_to_yaml(_model()))
        for ns in NAMESPACES:
            procs.start(f"fortio-{ns}", [str(FORTIO), "server", "-http-port",
                                         f"127.0.0.1:{APP_PORT[ns]}", "-grpc-port", "disabled",
                                         "-redirect-port", "disabled"])
        hops = [PY, "-m", "agent.bench.waypoint_hops", "--ca-dir", str(work / "ca")]
        for ns in NAMESPACES:
            hops += ["--dest", f"{POD_IP[ns]}={APP_PORT[ns]}={ns}/echo"]

        def waypoints(shared: bool, access_log: bool = True) -> list[subprocess.Popen[bytes]]:
            cfg = work / ("shared" if shared else "dedicated")
            cfg.mkdir(exist_ok=True)
            (cfg / "docs.yaml").write_text(yaml.safe_dump_all(_docs(shared)))
            started = []
            for ns in (("infra",) if shared else NAMESPACES):
                started.append(procs.start(f"wp-{ns}", [
                    PY, "-m", "agent", "waypoint", "--name", "waypoint", "--namespace", ns,
                    "--model", str(work / "model.yaml"), "--config-dir", str(cfg),
                    "--ca-dir", str(work / "ca"), "--listen", f"127.0.0.1:{WP_PORT[ns]}",
                    "--metrics-port", "0",
                    "--access-log" if access_log else "--no-access-log"],
                    ready="waypoint serving"))
            return started

        def hops_for(shared: bool) -> subprocess.Popen[bytes]:
            argv = list(hops)
            for ns in NAMESPACES:
                wp = WP_PORT["infra" if shared else ns]
                argv += ["--entry", f"{ENTRY_PORT[ns]}={wp}={VIP[ns]}:80={ns}"]
            return procs.start("hops", argv, ready="ready")

        results: dict[str, dict[str, dict[str, float]]] = {}
        # 1. capacity, dedicated model, one namespace.
        wps = waypoints(shared=False)
        hop = hops_for(shared=False)
        url = {ns: f"http://127.0.0.1:{ENTRY_PORT[ns]}/echo" for ns in NAMESPACES}
        cap = _summary(_fortio(url["ns-a"], 0, conns, seconds, work / "cap.json"))
        ctx.add(NAME, "rps", "capacity (1 ns)", 0, cap["rps"])
        rate = max(10, int(cap["rps"] * 0.8 / 2))
        ctx.note(NAME, f"capacity {cap['rps']:.0f} req/s; each namespace at {rate} req/s")
        # 2a. dedicated: both namespaces at once.
        for model_name, shared in (("dedicated", False), ("shared", True)):
            if shared:
                for p in (*wps, hop):
                    procs.stop(p)
                wps = waypoints(shared=True)
                hop = hops_for(shared=True)
            outs = {ns: work / f"{model_name}-{ns}.json" for ns in NAMESPACES}
            runners = [subprocess.Popen(
                [str(FORTIO), "load", "-qps", str(rate), "-c", str(conns), "-t",
                 f"{seconds}s", "-json", str(outs[ns]), "-quiet", "-allow-initial-errors",
                 url[ns]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for ns in NAMESPACES]
            for r in runners:
                r.wait(seconds + 60)
            results[model_name] = {}
            for ns in NAMESPACES:
                s = _summary(json.loads(outs[ns].read_text()))
                results[model_name][ns] = s
                for metric in ("avg_ms", "p50_ms", "p90_ms", "p99_ms", "error_pct", "rps"):
                    ctx.add(NAME, metric, f"{model_name} {ns}", 0, s[metric])
        # 3. HAProxy vs the waypoint path (dedicated waypoint of ns-a), 16 connections.
        for p in (*wps, hop):
            procs.stop(p)
        wps = waypoints(shared=False)
        hop = hops_for(shared=False)
        cpu0, hop0, t0 = _cpu_seconds(wps[0].pid), _cpu_seconds(hop.pid), time.monotonic()
        wp = _summary(_fortio(url["ns-a"], 0, 16, seconds, work / "wp16.json"))
        elapsed = time.monotonic() - t0
        cpu = (_cpu_seconds(wps[0].pid) - cpu0) / elapsed
        hop_cpu = (_cpu_seconds(hop.pid) - hop0) / elapsed
        ctx.add(NAME, "rps", "waypoint path, 16 conns", 0, wp["rps"])
        ctx.add(NAME, "p99_ms", "waypoint path, 16 conns", 0, wp["p99_ms"])
        if wp["rps"]:
            ctx.add(NAME, "waypoint_vcpu_per_krps", "waypoint process", 0, cpu / (wp["rps"] / 1000),
                    istio=ISTIO_VCPU_PER_KRPS)
            # For scale: the bench's two node-tunnel hops (HBONE only, no HTTP) in one
            # process; what two HBONE legs cost in this Python stack.
            ctx.add(NAME, "waypoint_vcpu_per_krps", "both tunnel hops (one process)", 0,
                    hop_cpu / (wp["rps"] / 1000))
        # The same without the access log (Istio's default install logs nothing).
        for p in (*wps, hop):
            procs.stop(p)
        wps = waypoints(shared=False, access_log=False)
        hop = hops_for(shared=False)
        cpu0, t0 = _cpu_seconds(wps[0].pid), time.monotonic()
        quiet = _summary(_fortio(url["ns-a"], 0, 16, seconds, work / "wp16q.json"))
        cpu = (_cpu_seconds(wps[0].pid) - cpu0) / (time.monotonic() - t0)
        ctx.add(NAME, "rps", "waypoint path, 16 conns, no access log", 0, quiet["rps"])
        if quiet["rps"]:
            ctx.add(NAME, "waypoint_vcpu_per_krps", "waypoint process, no access log", 0,
                    cpu / (quiet["rps"] / 1000), istio=ISTIO_VCPU_PER_KRPS)
        cfg = work / "haproxy.cfg"
        cfg.write_text(
            "global\n  nbthread 1\n  maxconn 4096\ndefaults\n  mode http\n"
            "  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n"
            f"frontend f\n  bind 127.0.0.1:{HAPROXY_PORT}\n  default_backend b\n"
            f"backend b\n  server s1 127.0.0.1:{APP_PORT['ns-a']}\n")
        ha = procs.start("haproxy", ["haproxy", "-db", "-f", str(cfg)])
        time.sleep(1)
        ha0, t0 = _cpu_seconds(ha.pid), time.monotonic()
        hp = _summary(_fortio(f"http://127.0.0.1:{HAPROXY_PORT}/echo", 0, 16, seconds,
                              work / "ha16.json"))
        ha_cpu = (_cpu_seconds(ha.pid) - ha0) / (time.monotonic() - t0)
        procs.stop(ha)
        ctx.add(NAME, "rps", "haproxy 1 thread, 16 conns", 0, hp["rps"])
        ctx.add(NAME, "p99_ms", "haproxy 1 thread, 16 conns", 0, hp["p99_ms"])
        if hp["rps"]:
            # CPU per request depends less on what else the machine runs than req/s.
            ctx.add(NAME, "waypoint_vcpu_per_krps", "haproxy 1 thread, 16 conns", 0,
                    ha_cpu / (hp["rps"] / 1000))
        if hp["rps"]:
            ctx.note(NAME, f"waypoint/haproxy requests/s: {wp['rps'] / hp['rps']:.2f} "
                           "(target >= 0.5)")
        _plot(ctx, results)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


def _plot(ctx: Context, results: dict[str, dict[str, dict[str, float]]]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        ctx.note(NAME, "matplotlib missing: no plot")
        return
    metrics = ("avg_ms", "p50_ms", "p90_ms", "p99_ms")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (model_name, per_ns) in zip(axes, results.items(), strict=False):
        for i, ns in enumerate(NAMESPACES):
            ax.bar([j + i * 0.4 for j in range(len(metrics))],
                   [per_ns[ns][m] for m in metrics], width=0.4,
                   label=f"{ns} ({per_ns[ns]['error_pct']:.1f}% errors)")
        ax.set_xticks([j + 0.2 for j in range(len(metrics))], [m[:-3] for m in metrics])
        ax.set_title(f"{model_name} waypoint(s)")
        ax.set_ylabel("ms")
        ax.legend()
    fig.tight_layout()
    fig.savefig(ctx.out / "waypoint_models.png")
    plt.close(fig)
