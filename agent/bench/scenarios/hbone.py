"""Scenario ``hbone``: the cost of the secure overlay, cross-node n1-a -> n2-a.

One lab (built in HBONE mode, so the mesh CA exists); variants are switched
in place, in the order below, once per repetition (A B C D A B C D ...):

- ``direct``     n1-a and n2-a unenrolled: no capture, no tunnel.
- ``tlsrelay``   pods unenrolled; the client connects explicitly to relay A
  (``agent.bench.tlsrelay client``) in node1's netns at 10.244.1.1, which
  carries each TCP connection over its own mutual-TLS 1.3 connection across
  the underlay to relay B in node2's netns (198.18.0.2), which dials n2-a.
  Same path and hop count as the mesh (pod -> node1 process -> underlay ->
  node2 process -> pod), without capture.
- ``ebpf+plain`` both pods enrolled, both tunnels restarted with
  MESHAGENT_TUNNEL_MODE=plain: eBPF capture on both ends, plain TCP between
  the tunnels (n1 outbound 15001 -> n2 inbound 15006).
- ``hbone``      both pods enrolled, tunnels restarted in HBONE mode: mTLS
  HTTP/2 CONNECT from node1's tunnel to node2's port 15008.
- ``stunnel``    pods unenrolled; a stunnel4 pair (C, OpenSSL, mutual TLS 1.3, one
  TLS connection per TCP connection) on the tlsrelay path: the native anchor of
  issue 14.
- ``native-hbone`` pods unenrolled; the native datapath (Rust) as a standalone
  HBONE pair on the same path: relay A (node1) opens CONNECT streams on a pooled
  mTLS HTTP/2 connection to relay B (node2, port 15108), which dials n2-a. Not yet
  the tunnel's path (integration: docs/native-datapath.md), so no eBPF capture.
  Its default runtime: one single-threaded runtime per CPU (2 here), each with its
  own SO_REUSEPORT listeners and pool.
- ``native-hbone-mt`` the same pair on one work-stealing multi-thread runtime with 2
  workers (ztunnel's model).
- ``native-hbone-1core`` the same pair with one worker each, both pinned to CPU 0
  (taskset): how the native path grows from 1 to 2 cores.

Every variant gets sockperf ping-pong (1 KiB, one-way p50/p99) besides the
throughput, RR-latency and connection-rate measurements; the native pair and the
stunnel pair also get 8 parallel streams and their CPU and RSS at 1,000 RPS
(hey, 1 KiB POSTs, 16 connections) through them.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from agent.bench.labctl import BenchLab, cpu_seconds, memory_mb
from agent.bench.nativepair import PairPlan, write_native, write_stunnel
from agent.bench.scenarios.common import (
    HTTP_PORT,
    IPERF_PORT,
    PY,
    RR_PORT,
    SOCKPERF_PORT,
    Context,
    Target,
    measure,
    parse_hey,
    start_servers,
    start_sockperf_server,
)
from agent.tunnel.native.driver import binary_path

NAME = "hbone"
VARIANTS = ("direct", "stunnel", "native-hbone", "native-hbone-mt", "native-hbone-1core",
            "tlsrelay", "ebpf+plain", "hbone")
NATIVE_VARIANTS = ("native-hbone", "native-hbone-mt", "native-hbone-1core")
METRICS = ("tput_gbps", "tput8_gbps", "lat_p50_us", "lat_p99_us", "sp_p50_us", "sp_p99_us",
           "conn_per_s")
PAIR_PORTS = (IPERF_PORT, RR_PORT, HTTP_PORT, SOCKPERF_PORT)
STUNNEL_A, STUNNEL_B = 12000, 13000  # port offsets in node1 / node2
NATIVE_A, NATIVE_B = 14000, 15108  # native B: one HBONE listener on node2:15108
NATIVE1_A, NATIVE1_B = 15000, 15109
NATIVEMT_A, NATIVEMT_B = 16000, 15110
RELAY_A_OFFSET = 10000  # relay A listens on port + 10000 in node1
RELAY_B_OFFSET = 11000  # relay B listens on port + 11000 in node2


def start_relays(bench: BenchLab, ctx: Context) -> Target:
    """The TLS relay pair for n1-a -> n2-a; returns where the client connects."""
    certs = ctx.out / "tlsrelay-certs"
    bench.run(bench.node_ns("node1"), [PY, "-m", "agent.bench.tlsrelay", "certs", str(certs)])
    dst = bench.pod("n2-a").ipv4
    node2 = bench._plan().node("node2").underlay_ipv4
    b_routes, a_routes = [], []
    for port in (IPERF_PORT, RR_PORT, SOCKPERF_PORT):
        b_routes += ["--route", f"{port + RELAY_B_OFFSET}={dst}:{port}"]
        a_routes += ["--route", f"{port + RELAY_A_OFFSET}={node2}:{port + RELAY_B_OFFSET}"]
    bench.spawn(bench.node_ns("node2"), [PY, "-m", "agent.bench.tlsrelay", "server",
                                         "--certs", str(certs), *b_routes], "tlsrelay-b")
    bench.spawn(bench.node_ns("node1"), [PY, "-m", "agent.bench.tlsrelay", "client",
                                         "--certs", str(certs), *a_routes], "tlsrelay-a")
    for port in (IPERF_PORT, RR_PORT, SOCKPERF_PORT):
        bench.wait_listening(bench.node_ns("node2"), port + RELAY_B_OFFSET)
        bench.wait_listening(bench.node_ns("node1"), port + RELAY_A_OFFSET)
    return Target(bench.pod("n1-a").netns, bench.pod("n1-a").gateway_ipv4,
                  bench.pod("n2-a").netns, IPERF_PORT + RELAY_A_OFFSET,
                  RR_PORT + RELAY_A_OFFSET, SOCKPERF_PORT + RELAY_A_OFFSET)


def _pair_target(bench: BenchLab, offset: int) -> Target:
    return Target(bench.pod("n1-a").netns, bench.pod("n1-a").gateway_ipv4,
                  bench.pod("n2-a").netns, IPERF_PORT + offset, RR_PORT + offset,
                  SOCKPERF_PORT + offset, HTTP_PORT + offset)


def _plan(bench: BenchLab, a_offset: int, b_offset: int) -> PairPlan:
    return PairPlan(a_host=bench.pod("n1-a").gateway_ipv4,
                    b_host=bench._plan().node("node2").underlay_ipv4,
                    dst_host=bench.pod("n2-a").ipv4, ports=PAIR_PORTS,
                    a_offset=a_offset, b_offset=b_offset)


Pair = tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]


def start_stunnel(bench: BenchLab, ctx: Context) -> tuple[Target, Pair]:
    certs = ctx.out / "tlsrelay-certs"  # written by start_relays
    conf_a, conf_b = write_stunnel(_plan(bench, STUNNEL_A, STUNNEL_B), certs,
                                   ctx.out / "stunnel")
    b = bench.spawn(bench.node_ns("node2"), ["stunnel4", str(conf_b)], "stunnel-b")
    a = bench.spawn(bench.node_ns("node1"), ["stunnel4", str(conf_a)], "stunnel-a")
    for port in PAIR_PORTS:
        bench.wait_listening(bench.node_ns("node2"), port + STUNNEL_B)
        bench.wait_listening(bench.node_ns("node1"), port + STUNNEL_A)
    return _pair_target(bench, STUNNEL_A), (a, b)


def start_native(bench: BenchLab, ctx: Context, a_offset: int, b_port: int, one_core: bool,
                 name: str, runtime: str = "per_core") -> tuple[Target, Pair]:
    """The native HBONE pair; ``one_core``: one worker each, both pinned to CPU 0."""
    exe = str(binary_path())  # a missing or stale build stops the bench here
    conf_a, conf_b, policy = write_native(_plan(bench, a_offset, b_port), Path(ctx.out / name),
                                  workers=1 if one_core else 0, runtime=runtime)
    pin = ["taskset", "-c", "0"] if one_core else []
    b = bench.spawn(bench.node_ns("node2"),
                    [*pin, exe, "--config", str(conf_b), "--policy", str(policy)], f"{name}-b")
    a = bench.spawn(bench.node_ns("node1"),
                    [*pin, exe, "--config", str(conf_a), "--policy", str(policy)], f"{name}-a")
    bench.wait_listening(bench.node_ns("node2"), b_port)
    for port in PAIR_PORTS:
        bench.wait_listening(bench.node_ns("node1"), port + a_offset)
    return _pair_target(bench, a_offset), (a, b)


def measure_resources(ctx: Context, bench: BenchLab, variant: str, rep: int, t: Target,
                      pair: Pair) -> None:
    """CPU (vCPU per 1k RPS) and RSS of both relays at 1,000 RPS of 1 KiB POSTs, c=16,
    as the ``resources`` scenario measures the tunnel."""
    p = ctx.params
    conns = 16
    url = f"http://{t.host}:{t.http_port}/"
    pids = {"a": pair[0].pid, "b": pair[1].pid}
    cpu0 = {k: cpu_seconds(pid) for k, pid in pids.items()}
    t0 = time.monotonic()
    proc = bench.run(t.client_ns, ["hey", "-z", f"{p.hey_seconds}s", "-c", str(conns),
                                   "-q", f"{p.hey_rate / conns:.3f}", "-m", "POST",
                                   "-d", "x" * 1024, url],
                     timeout=p.hey_seconds + 60, check=False)
    wall = time.monotonic() - t0
    res = parse_hey(proc.stdout)
    if not res["rps"]:
        ctx.note(NAME, f"{variant} rep {rep}: hey failed: {proc.stderr[-300:]}")
        return
    per_k = {k: ((cpu_seconds(pid) - cpu0[k]) / wall) / (res["rps"] / 1000.0)
             for k, pid in pids.items()}
    rss = {k: memory_mb(pid)["VmRSS"] for k, pid in pids.items()}
    ctx.add(NAME, "rps", variant, rep, res["rps"])
    ctx.add(NAME, "vcpu_per_krps", variant, rep, max(per_k.values()), **per_k)
    ctx.add(NAME, "vcpu_per_krps_sum", variant, rep, sum(per_k.values()))
    ctx.add(NAME, "rss_mb", variant, rep, max(rss.values()), **rss)


def configure(bench: BenchLab, variant: str) -> None:
    pods = ("n1-a", "n2-a")
    if variant in ("direct", "tlsrelay", "stunnel", *NATIVE_VARIANTS):
        bench.set_enrolled(pods, False)
        return
    bench.set_tunnel_mode("plain" if variant == "ebpf+plain" else "hbone")
    bench.set_enrolled(pods, True)


def run(ctx: Context) -> None:
    p = ctx.params
    with BenchLab("hbone", ctx.log_dir) as bench:
        ctx.labs.append(bench.prefix)
        ctx.progress(NAME, f"lab {bench.prefix} up")
        start_servers(bench, bench.pod("n2-a").netns)
        start_sockperf_server(bench, bench.pod("n2-a").netns, bench.pod("n2-a").ipv4)
        direct = Target(bench.pod("n1-a").netns, bench.pod("n2-a").ipv4,
                        bench.pod("n2-a").netns)
        relay = start_relays(bench, ctx)
        stunnel, stunnel_pair = start_stunnel(bench, ctx)
        native, native_pair = start_native(bench, ctx, NATIVE_A, NATIVE_B, False, "native")
        native1, _ = start_native(bench, ctx, NATIVE1_A, NATIVE1_B, True, "native1")
        native_mt, native_mt_pair = start_native(bench, ctx, NATIVEMT_A, NATIVEMT_B, False,
                                                 "native-mt", runtime="multi_thread")
        targets = {"tlsrelay": relay, "stunnel": stunnel, "native-hbone": native,
                   "native-hbone-mt": native_mt, "native-hbone-1core": native1}
        for rep in range(p.reps):
            for variant in VARIANTS:
                ctx.progress(NAME, f"rep {rep + 1}/{p.reps} {variant}")
                configure(bench, variant)
                target = targets.get(variant, direct)
                metrics: tuple[str, ...] = ("tput_gbps", "lat", "sockperf", "conn_per_s")
                if variant in ("direct", "stunnel", "native-hbone", "native-hbone-mt", "hbone"):
                    metrics += ("tput8_gbps",)
                if variant == "native-hbone-1core":
                    metrics = ("tput_gbps", "tput8_gbps", "sockperf")
                measure(ctx, bench, NAME, variant, rep, target, metrics,
                        via_tunnel=variant in ("ebpf+plain", "hbone"))
                if variant == "stunnel":
                    measure_resources(ctx, bench, variant, rep, target, stunnel_pair)
                elif variant == "native-hbone":
                    measure_resources(ctx, bench, variant, rep, target, native_pair)
                elif variant == "native-hbone-mt":
                    measure_resources(ctx, bench, variant, rep, target, native_mt_pair)
