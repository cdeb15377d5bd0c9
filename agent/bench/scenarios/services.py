"""Scenario ``services``: the cost of Service resolution and of the DNS proxy.

One HBONE lab; both tunnels read the lab's model (agent/lab/services.py), whose
``rr`` service (10.96.0.12:7000) has n2-a as its only endpoint, so the two
variants reach the same server over the same HBONE path:

- ``pod-ip``  n1-a -> n2-a's own address (10.244.2.10:7000);
- ``vip``     n1-a -> the VIP: the tunnel resolves it and picks the endpoint.

DNS (``dns_p50_us``/``dns_p99_us``), with dnsmasq in node2's netns as the pods'
resolver and node1's agent restarted with ``datapath.dns_capture`` on:

- ``dns-direct``  n1-plain (not enrolled: nothing captured) asks dnsmasq for
  external.test;
- ``dns-tunnel``  n1-a asks the same resolver for the service name; the datapath
  captures the query and node1's tunnel answers it (the name never reaches
  dnsmasq, which would answer it differently).
"""

from __future__ import annotations

import contextlib
import json
import time

from agent.api import client
from agent.bench.labctl import BenchError, BenchLab
from agent.bench.scenarios.common import (
    PY,
    RR_PORT,
    Context,
    Target,
    measure,
    start_servers,
)
from agent.lab import mesh, netlab
from agent.lab.services import RR_ENDPOINT, RR_HOSTNAME, RR_VIPS

NAME = "services"
VARIANTS = ("pod-ip", "vip")
DNS_VARIANTS = ("dns-direct", "dns-tunnel")
EXTERNAL_NAME = "external.test"
DNS_COUNT_QUICK, DNS_COUNT = 300, 2000
AGENT_WAIT_POLLS = 900  # 0.1 s each: the agent compiles its BPF programs at start


def _start_dns(bench: BenchLab) -> str:
    """dnsmasq on node2's underlay address; node1's agent with DNS capture on."""
    plan = bench._plan()
    resolver = plan.node("node2").underlay_ipv4
    bench.spawn(bench.node_ns("node2"), [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
        "--no-hosts", "--bind-interfaces", f"--listen-address={resolver}", "--port=53",
        "--pid-file=", "--log-facility=-", "--cache-size=0", "--user=root",
        f"--address=/{EXTERNAL_NAME}/192.0.2.7"], "dnsmasq")
    bench.stop_process("node1", "agent")
    env = {**mesh.node_env(plan, plan.node("node1"), "hbone"),
           "MESHAGENT_DATAPATH_DNS_CAPTURE": "1"}
    netlab.start_node_process(plan, "node1", "agent", [PY, "-m", "agent", "run"], env)
    enrolled = sum(p.enroll for p in plan.node("node1").pods)
    for _ in range(AGENT_WAIT_POLLS):
        with contextlib.suppress(client.AgentUnavailable, client.AgentError, OSError):
            if len(client.call(bench.sock("node1"), {"op": "pod_list"}, timeout=5)) == enrolled:
                return resolver
        time.sleep(0.1)
    raise BenchError("node1's agent did not restore its pods after the DNS-capture restart")


def _dns(ctx: Context, bench: BenchLab, variant: str, rep: int, pod: str, resolver: str,
         name: str) -> None:
    count = DNS_COUNT_QUICK if ctx.params.quick else DNS_COUNT
    proc = bench.run(bench.pod(pod).netns,
                     [PY, "-m", "agent.bench.dnsrr", "--server", resolver, "--name", name,
                      "--count", str(count), "--max-seconds", "30"], timeout=60)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    if r.get("failed"):
        ctx.note(NAME, f"{variant} rep {rep}: {r['failed']} DNS queries failed")
    ctx.add(NAME, "dns_p50_us", variant, rep, r.get("p50_us"))
    ctx.add(NAME, "dns_p99_us", variant, rep, r.get("p99_us"))


def run(ctx: Context) -> None:
    p = ctx.params
    with BenchLab("hbone", ctx.log_dir) as bench:
        ctx.labs.append(bench.prefix)
        ctx.progress(NAME, f"lab {bench.prefix} up")
        server = bench.pod(RR_ENDPOINT)
        start_servers(bench, server.netns)
        client = bench.pod("n1-a").netns
        targets = {"pod-ip": Target(client, server.ipv4, server.netns, rr_port=RR_PORT),
                   "vip": Target(client, RR_VIPS[0], server.netns, rr_port=RR_PORT)}
        for rep in range(p.reps):
            for variant in VARIANTS:
                ctx.progress(NAME, f"rep {rep + 1}/{p.reps} {variant}")
                measure(ctx, bench, NAME, variant, rep, targets[variant],
                        ("lat", "conn_per_s"), via_tunnel=True)
        resolver = _start_dns(bench)
        bench.wait_listening(bench.node_ns("node1"), 15001)
        for rep in range(p.reps):
            ctx.progress(NAME, f"rep {rep + 1}/{p.reps} dns")
            _dns(ctx, bench, "dns-direct", rep, "n1-plain", resolver, EXTERNAL_NAME)
            _dns(ctx, bench, "dns-tunnel", rep, "n1-a", resolver, RR_HOSTNAME)
