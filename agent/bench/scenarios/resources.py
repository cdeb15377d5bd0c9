"""Scenario ``resources``: HBONE tunnel CPU and memory at a fixed request rate.

One lab in HBONE mode, n1-a and n2-a enrolled. ``hey`` in n1-a sends 1 KiB
POST requests (keep-alive) to the HTTP side of ``agent.bench.rr`` in n2-a
(1 KiB responses) through both tunnels, at a fixed offered rate (1,000 RPS in
total: ``-q`` = rate / connections per worker) for each connection count
``-c`` in 1, 4, 16, 64. CPU = utime+stime of each node's tunnel process
(/proc/<pid>/stat) over the run, normalised to vCPU per 1,000 achieved RPS;
RSS = VmRSS of each tunnel right after the run. Connection counts alternate
within every repetition. hey's own CPU is not counted.
"""

from __future__ import annotations

import time

from agent.bench.labctl import BenchLab, cpu_seconds, memory_mb
from agent.bench.scenarios.common import HTTP_PORT, Context, parse_hey, start_servers

NAME = "resources"


def run(ctx: Context) -> None:
    p = ctx.params
    body = "x" * 1024
    with BenchLab("hbone", ctx.log_dir) as bench:
        ctx.labs.append(bench.prefix)
        ctx.progress(NAME, f"lab {bench.prefix} up")
        bench.set_enrolled(("n1-a", "n2-a"), True)
        start_servers(bench, bench.pod("n2-a").netns)
        url = f"http://{bench.pod('n2-a').ipv4}:{HTTP_PORT}/"
        client_ns = bench.pod("n1-a").netns
        # Warm up: HBONE connection pool, certificates, code paths.
        bench.run(client_ns, ["hey", "-n", "200", "-c", "4", "-m", "POST", "-d", body, url],
                  timeout=60)
        for rep in range(p.reps):
            for conns in p.hey_connections:
                variant = f"c={conns}"
                ctx.progress(NAME, f"rep {rep + 1}/{p.reps} {variant}")
                pids = {n: bench.pid(n, "tunnel") for n in ("node1", "node2")}
                cpu0 = {n: cpu_seconds(pid) for n, pid in pids.items()}
                t0 = time.monotonic()
                proc = bench.run(client_ns, ["hey", "-z", f"{p.hey_seconds}s", "-c", str(conns),
                                             "-q", f"{p.hey_rate / conns:.3f}", "-m", "POST",
                                             "-d", body, url],
                                 timeout=p.hey_seconds + 60, check=False)
                wall = time.monotonic() - t0
                cpu = {n: cpu_seconds(pid) - cpu0[n] for n, pid in pids.items()}
                mem = {n: memory_mb(pid) for n, pid in pids.items()}
                res = parse_hey(proc.stdout)
                rps = res["rps"]
                if not rps:
                    ctx.note(NAME, f"{variant} rep {rep}: hey failed: {proc.stderr[-300:]}")
                    continue
                non_200 = {k: v for k, v in res["statuses"].items() if k != "200"}
                if non_200 or res["errors"]:
                    ctx.note(NAME, f"{variant} rep {rep}: non-200 statuses {non_200} "
                                   f"or errors in hey output")
                per_k = {n: (c / wall) / (rps / 1000.0) for n, c in cpu.items()}
                ctx.add(NAME, "rps", variant, rep, rps, offered=p.hey_rate)
                ctx.add(NAME, "p99_ms", variant, rep, res["p99_ms"])
                ctx.add(NAME, "vcpu_per_krps_n1", variant, rep, per_k["node1"])
                ctx.add(NAME, "vcpu_per_krps_n2", variant, rep, per_k["node2"])
                ctx.add(NAME, "vcpu_per_krps_sum", variant, rep, sum(per_k.values()))
                ctx.add(NAME, "vcpu_per_krps", variant, rep, max(per_k.values()))
                ctx.add(NAME, "rss_mb_n1", variant, rep, mem["node1"]["VmRSS"],
                        hwm=mem["node1"]["VmHWM"])
                ctx.add(NAME, "rss_mb_n2", variant, rep, mem["node2"]["VmRSS"],
                        hwm=mem["node2"]["VmHWM"])
                ctx.add(NAME, "rss_mb", variant, rep,
                        max(mem["node1"]["VmRSS"], mem["node2"]["VmRSS"]))
