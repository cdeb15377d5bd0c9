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
"""

from __future__ import annotations

from agent.bench.labctl import BenchLab
from agent.bench.scenarios.common import (
    IPERF_PORT,
    PY,
    RR_PORT,
    Context,
    Target,
    measure,
    start_servers,
)

NAME = "hbone"
VARIANTS = ("direct", "tlsrelay", "ebpf+plain", "hbone")
METRICS = ("tput_gbps", "lat_p50_us", "lat_p99_us", "conn_per_s")
RELAY_A_OFFSET = 10000  # relay A listens on port + 10000 in node1
RELAY_B_OFFSET = 11000  # relay B listens on port + 11000 in node2


def start_relays(bench: BenchLab, ctx: Context) -> Target:
    """The TLS relay pair for n1-a -> n2-a; returns where the client connects."""
    certs = ctx.out / "tlsrelay-certs"
    bench.run(bench.node_ns("node1"), [PY, "-m", "agent.bench.tlsrelay", "certs", str(certs)])
    dst = bench.pod("n2-a").ipv4
    node2 = bench._plan().node("node2").underlay_ipv4
    b_routes, a_routes = [], []
    for port in (IPERF_PORT, RR_PORT):
        b_routes += ["--route", f"{port + RELAY_B_OFFSET}={dst}:{port}"]
        a_routes += ["--route", f"{port + RELAY_A_OFFSET}={node2}:{port + RELAY_B_OFFSET}"]
    bench.spawn(bench.node_ns("node2"), [PY, "-m", "agent.bench.tlsrelay", "server",
                                         "--certs", str(certs), *b_routes], "tlsrelay-b")
    bench.spawn(bench.node_ns("node1"), [PY, "-m", "agent.bench.tlsrelay", "client",
                                         "--certs", str(certs), *a_routes], "tlsrelay-a")
    for port in (IPERF_PORT, RR_PORT):
        bench.wait_listening(bench.node_ns("node2"), port + RELAY_B_OFFSET)
        bench.wait_listening(bench.node_ns("node1"), port + RELAY_A_OFFSET)
    return Target(bench.pod("n1-a").netns, bench.pod("n1-a").gateway_ipv4,
                  bench.pod("n2-a").netns, IPERF_PORT + RELAY_A_OFFSET,
                  RR_PORT + RELAY_A_OFFSET)


def configure(bench: BenchLab, variant: str) -> None:
    pods = ("n1-a", "n2-a")
    if variant in ("direct", "tlsrelay"):
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
        direct = Target(bench.pod("n1-a").netns, bench.pod("n2-a").ipv4,
                        bench.pod("n2-a").netns)
        relay = start_relays(bench, ctx)
        for rep in range(p.reps):
            for variant in VARIANTS:
                ctx.progress(NAME, f"rep {rep + 1}/{p.reps} {variant}")
                configure(bench, variant)
                target = relay if variant == "tlsrelay" else direct
                measure(ctx, bench, NAME, variant, rep, target,
                        ("tput_gbps", "lat", "conn_per_s"),
                        via_tunnel=variant in ("ebpf+plain", "hbone"))
