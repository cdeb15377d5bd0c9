"""Scenario ``enroll``: enrollment latency through the agent API, and agent
restart with many pods.

In one lab (plain mode), N extra pods are created in node1 (N = 1,000; 100 in
``--quick``): netns ``<prefix>-eNNNN`` with ``eth0`` (one /32 in
10.250.0.0/16) and host veth ``<prefix>eNNNN`` in node1's netns, built with
``ip -batch`` (not timed); each host veth gets its IPv6 link-local address as
on a real node (1,000 of them once broke enrollment: a bug this benchmark
found, fixed since). Then each pod is enrolled with one ``pod_add`` API
call, one after the other; each call is timed from connect to answer
(``enroll_p50_ms``/``enroll_p99_ms``), and the whole loop is
``enroll_total_s``. The agent's RSS (VmRSS) and peak (VmHWM) are read after.

Restart (repeated): SIGTERM the agent, start it again and time until the API
answers ``status`` (``restart_ready_s``) and until ``pod_list`` shows every
pod again (``restart_restored_s``; the agent restores pods before it serves,
so the two are close); VmHWM/VmRSS of the new agent are read once it is ready.
"""

from __future__ import annotations

import subprocess
import time

from agent.api import client
from agent.bench.labctl import BenchError, BenchLab, memory_mb
from agent.bench.report import percentile
from agent.bench.scenarios.common import Context

NAME = "enroll"
POLL_S = 0.02
RESTART_TIMEOUT_S = 300.0


def create_pods(bench: BenchLab, count: int) -> list[str]:
    """``count`` veth pods in node1; returns their netns names."""
    p = bench.prefix
    names = [f"{p}-e{i:04d}" for i in range(count)]
    subprocess.run(["ip", "-batch", "-"], input="".join(f"netns add {n}\n" for n in names),
                   text=True, check=True, timeout=300, capture_output=True)
    node = bench.node_ns("node1")
    lines = []
    for i, n in enumerate(names):
        lines.append(f"link add {p}e{i:04d} type veth peer name eth0 netns {n}\n")
        lines.append(f"link set {p}e{i:04d} up\n")
    subprocess.run(["ip", "-n", node, "-batch", "-"], input="".join(lines), text=True,
                   check=True, timeout=300, capture_output=True)
    for i, n in enumerate(names):
        ip = f"10.250.{i // 250}.{i % 250 + 1}"
        subprocess.run(["ip", "-n", n, "-batch", "-"],
                       input=f"addr add {ip}/32 dev eth0\nlink set eth0 up\nlink set lo up\n",
                       text=True, check=True, timeout=30, capture_output=True)
    return names


def _wait_restored(sock: str, expected: int, t0: float) -> tuple[float, float]:
    ready = None
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if ready is None:
                client.call(sock, {"op": "status"}, timeout=30)
                ready = time.perf_counter() - t0
            pods = client.call(sock, {"op": "pod_list"}, timeout=30)
            if len(pods) >= expected:
                return ready, time.perf_counter() - t0
        except (client.AgentUnavailable, client.AgentError):
            pass
        time.sleep(POLL_S)
    raise BenchError(f"agent did not restore {expected} pods within {RESTART_TIMEOUT_S:.0f}s")


def run(ctx: Context) -> None:
    p = ctx.params
    n = p.enroll_pods
    with BenchLab("plain", ctx.log_dir) as bench:
        ctx.labs.append(bench.prefix)
        ctx.progress(NAME, f"lab {bench.prefix} up; creating {n} pods")
        t0 = time.perf_counter()
        names = create_pods(bench, n)
        ctx.note(NAME, f"created {n} veth pods in {time.perf_counter() - t0:.1f} s (not timed)")
        sock = bench.sock("node1")
        ctx.progress(NAME, f"enrolling {n} pods")
        lat_ms: list[float] = []
        t_all = time.perf_counter()
        for i, ns in enumerate(names):
            t = time.perf_counter()
            client.call(sock, {"op": "pod_add", "netns": ns, "name": f"e{i:04d}",
                               "namespace": "bench", "service_account": "sa-bench"})
            lat_ms.append((time.perf_counter() - t) * 1000)
        total = time.perf_counter() - t_all
        ctx.add(NAME, "pods", "api", 0, n)
        ctx.add(NAME, "enroll_p50_ms", "api", 0, percentile(lat_ms, 50))
        ctx.add(NAME, "enroll_p99_ms", "api", 0, percentile(lat_ms, 99))
        ctx.add(NAME, "enroll_total_s", "api", 0, total, latencies_ms=[round(x, 3) for x in lat_ms])
        mem = memory_mb(bench.pid("node1", "agent"))
        ctx.add(NAME, "agent_hwm_mb", "api", 0, mem["VmHWM"])
        ctx.add(NAME, "agent_rss_mb", "api", 0, mem["VmRSS"])
        expected = len(client.call(sock, {"op": "pod_list"}))
        for rep in range(p.restart_reps):
            ctx.progress(NAME, f"restart {rep + 1}/{p.restart_reps} with {expected} pods")
            bench.stop_process("node1", "agent")
            t0 = time.perf_counter()
            bench.start_process("node1", "agent", "plain")
            ready, restored = _wait_restored(sock, expected, t0)
            ctx.add(NAME, "restart_ready_s", "restart", rep, ready)
            ctx.add(NAME, "restart_restored_s", "restart", rep, restored)
            mem = memory_mb(bench.pid("node1", "agent"))
            ctx.add(NAME, "agent_hwm_mb", "restart", rep, mem["VmHWM"])
            ctx.add(NAME, "agent_rss_mb", "restart", rep, mem["VmRSS"])
        ctx.progress(NAME, "tearing down (removes the pods too)")
