"""Scenario ``services``: the cost of Service resolution and of the DNS proxy.

One HBONE lab; both tunnels read the lab's model (agent/lab/services.py), whose
``rr`` service (10.96.0.12:7000) has n2-a as its only endpoint, so the two
variants reach the same server over the same HBONE path:

- ``pod-ip``  n1-a -> n2-a's own address (10.244.2.10:7000);
- ``vip``     n1-a -> the VIP: the tunnel resolves it and picks the endpoint.

DNS (``dns_p50_us``/``dns_p99_us``), with dnsmasq in node2's netns as the pods'
resolver (the lab runs with the default ``datapath.dns_capture`` on):

- ``dns-direct``  n1-plain (not enrolled: nothing captured) asks dnsmasq for
  external.test;
- ``dns-tunnel``  n1-a asks the same resolver for the service name; the datapath
  captures the query and node1's tunnel answers it (the name never reaches
  dnsmasq, which would answer it differently).

The differences measured are small next to a shared machine's drift, so the
comparison is paired at two scales. Within a repetition, one client
(``agent.bench.rr paired``) interleaves the two variants sample by sample: 1 KiB
round trips on one connection to each, alternately, then sequential connections
(connect, 1 KiB each way, close), alternately; connections/s is 1 / the median
connection time (the mean-based rate is kept as ``conn_per_s_mean`` in
results.json). Across ``REPS`` (9) repetitions, each repetition's ratio
(``ratio_*``: vip / pod-ip) is a sample of its own, and the targets are judged on
the median of those paired ratios; their min-max is the spread. DNS alternates the
two variants per repetition (A B, B A, ...), 1,000 queries each, with the same
per-repetition ratio.
"""

from __future__ import annotations

import json

from agent.bench.labctl import BenchError, BenchLab
from agent.bench.report import Sample
from agent.bench.scenarios.common import PY, RR_PORT, Context, start_servers
from agent.lab.services import RR_ENDPOINT, RR_HOSTNAME, RR_VIPS

NAME = "services"
VARIANTS = ("pod-ip", "vip")
DNS_VARIANTS = ("dns-direct", "dns-tunnel")
VIP_RATIO = "vip/pod-ip"
DNS_RATIO = "tunnel/direct"
# metric measured -> the paired-ratio metric recorded for it (report.METRICS).
RATIOS = {"conn_per_s": "ratio_conn_per_s", "lat_p50_us": "ratio_lat_p50_us",
          "dns_p50_us": "ratio_dns_p50_us"}
EXTERNAL_NAME = "external.test"
REPS_QUICK, REPS = 2, 9
DNS_COUNT_QUICK, DNS_COUNT = 300, 1000


def _alternating(variants: tuple[str, str], rep: int) -> tuple[str, ...]:
    """A B in even repetitions, B A in odd ones: drift over the run cancels out."""
    return variants if rep % 2 == 0 else variants[::-1]


def _value(ctx: Context, metric: str, variant: str, rep: int) -> float | None:
    found: list[Sample] = [s for s in ctx.samples if (s.scenario, s.metric, s.variant, s.rep)
                           == (NAME, metric, variant, rep)]
    return found[-1].value if found else None


def _add_ratio(ctx: Context, metric: str, variant: str, baseline: str, label: str,
               rep: int) -> None:
    """This repetition's ``variant / baseline`` for ``metric``, when both were measured."""
    a, b = _value(ctx, metric, variant, rep), _value(ctx, metric, baseline, rep)
    if a is None or b is None or b <= 0:
        ctx.note(NAME, f"rep {rep}: no paired {metric} ratio ({variant} {a}, {baseline} {b})")
        return
    ctx.add(NAME, RATIOS[metric], label, rep, a / b)


def _paired_rr(ctx: Context, bench: BenchLab, rep: int, client: str,
               hosts: dict[str, str]) -> None:
    """One repetition of both variants, interleaved in one client (``rr paired``);
    node1's tunnel must have logged every connection (path check)."""
    p = ctx.params
    argv = [PY, "-m", "agent.bench.rr", "paired", "--port", str(RR_PORT),
            "--count", str(p.conn_count), "--max-seconds", str(4 * p.conn_max_s)]
    for host in hosts.values():
        argv += ["--host", host]
    before = bench.tunnel_connections("node1")
    try:
        proc = bench.run(client, argv, timeout=4 * p.conn_max_s + 30)
        result = json.loads(proc.stdout.strip().splitlines()[-1])["hosts"]
    except (BenchError, ValueError, IndexError, KeyError) as exc:
        ctx.note(NAME, f"rep {rep}: paired rr failed: {exc}")
        return
    seen = bench.tunnel_connections("node1") - before
    expected = sum(r["connections"] + 1 for r in result.values())  # + the RTT connection
    if seen < expected:
        ctx.note(NAME, f"PATH CHECK FAILED: rep {rep}: node1 tunnel logged {seen} "
                       f"connections, expected {expected}")
    for variant, host in hosts.items():
        r = result[host]
        if r["failed"]:
            ctx.note(NAME, f"{variant} rep {rep}: {r['failed']} connections failed")
        ctx.add(NAME, "lat_p50_us", variant, rep, r["lat_p50_us"])
        ctx.add(NAME, "lat_p99_us", variant, rep, r["lat_p99_us"])
        ctx.add(NAME, "conn_per_s", variant, rep, r["conn_per_s"], **r)
    ctx.add(NAME, "tunnel_conns", "pod-ip+vip", rep, seen)


def _start_dns(bench: BenchLab) -> str:
    """dnsmasq on node2's underlay address, the pods' resolver; returns that address."""
    resolver = bench._plan().node("node2").underlay_ipv4
    bench.spawn(bench.node_ns("node2"), [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
        "--no-hosts", "--bind-interfaces", f"--listen-address={resolver}", "--port=53",
        "--pid-file=", "--log-facility=-", "--cache-size=0", "--user=root",
        f"--address=/{EXTERNAL_NAME}/192.0.2.7"], "dnsmasq")
    bench.wait_listening(bench.node_ns("node2"), 53)
    return resolver


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
    reps = REPS_QUICK if ctx.params.quick else REPS
    with BenchLab("hbone", ctx.log_dir) as bench:
        ctx.labs.append(bench.prefix)
        ctx.progress(NAME, f"lab {bench.prefix} up")
        server = bench.pod(RR_ENDPOINT)
        start_servers(bench, server.netns)
        client = bench.pod("n1-a").netns
        hosts = {"pod-ip": server.ipv4, "vip": RR_VIPS[0]}
        for rep in range(reps):
            ctx.progress(NAME, f"rep {rep + 1}/{reps} pod-ip + vip, interleaved")
            _paired_rr(ctx, bench, rep, client,
                       {v: hosts[v] for v in _alternating(VARIANTS, rep)})
            _add_ratio(ctx, "conn_per_s", "vip", "pod-ip", VIP_RATIO, rep)
            _add_ratio(ctx, "lat_p50_us", "vip", "pod-ip", VIP_RATIO, rep)
        resolver = _start_dns(bench)
        asks = {"dns-direct": ("n1-plain", EXTERNAL_NAME), "dns-tunnel": ("n1-a", RR_HOSTNAME)}
        for rep in range(reps):
            ctx.progress(NAME, f"rep {rep + 1}/{reps} dns")
            for variant in _alternating(DNS_VARIANTS, rep):
                pod, name = asks[variant]
                _dns(ctx, bench, variant, rep, pod, resolver, name)
            _add_ratio(ctx, "dns_p50_us", "dns-tunnel", "dns-direct", DNS_RATIO, rep)
