"""Shared pieces of the scenarios: run parameters, the run context, and the
three traffic measurements (iperf3 throughput, 1 KiB request/response latency,
connections/s) run from one lab pod against a server in another."""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.bench.labctl import BenchError, BenchLab
from agent.bench.report import Sample

IPERF_PORT = 5201
RR_PORT = 7000
HTTP_PORT = 8080
SOCKPERF_PORT = 11111
PY = sys.executable


@dataclass(frozen=True)
class Params:
    """How long and how often; ``quick`` shrinks everything to a smoke test."""

    quick: bool
    reps: int
    tput_seconds: int
    lat_count: int
    lat_max_s: float
    conn_count: int
    conn_max_s: float
    scale_sizes: tuple[int, ...]
    scale_tput_seconds: int
    enroll_pods: int
    restart_reps: int
    hey_seconds: int
    hey_connections: tuple[int, ...]
    hey_rate: int
    sockperf_seconds: int = 3

    @classmethod
    def make(cls, quick: bool) -> Params:
        if quick:
            return cls(quick=True, reps=1, tput_seconds=2, lat_count=1000, lat_max_s=5,
                       conn_count=300, conn_max_s=5, scale_sizes=(10, 1000),
                       scale_tput_seconds=2, enroll_pods=100, restart_reps=1, hey_seconds=3,
                       hey_connections=(1, 16), hey_rate=1000, sockperf_seconds=1)
        return cls(quick=False, reps=3, tput_seconds=4, lat_count=2000, lat_max_s=5,
                   conn_count=1000, conn_max_s=5, scale_sizes=(10, 1000, 10000),
                   scale_tput_seconds=2, enroll_pods=1000, restart_reps=1, hey_seconds=5,
                   hey_connections=(1, 4, 16, 64), hey_rate=1000)


@dataclass
class Context:
    params: Params
    out: Path
    samples: list[Sample] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    labs: list[str] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        return self.out / "logs"

    def add(self, scenario: str, metric: str, variant: str, rep: int, value: float | None,
            **extra: Any) -> None:
        if value is None:
            self.note(scenario, f"{variant} rep {rep}: {metric} not measured "
                                f"({extra.get('error', 'no value')})")
            return
        self.samples.append(Sample(scenario, metric, variant, rep, float(value), extra))

    def note(self, scenario: str, text: str) -> None:
        self.notes.setdefault(scenario, []).append(text)
        print(f"  [{scenario}] {text}", file=sys.stderr, flush=True)

    def progress(self, scenario: str, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {scenario}: {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Target:
    """Where a client in ``client_ns`` connects for each measurement; the
    servers run in ``server_ns``."""

    client_ns: str
    host: str
    server_ns: str
    iperf_port: int = IPERF_PORT
    rr_port: int = RR_PORT
    sockperf_port: int = 11111
    http_port: int = 8080


IPERF_NAME = "mbtput"  # see iperf_binary()


def iperf_binary(bench: BenchLab) -> str:
    """A copy of iperf3 in the lab's run directory, under another name.

    On a shared machine other test suites end stray ``iperf3`` processes by
    name; a copy with its own name is left alone. ``lab down`` deletes it.
    """
    path = Path(bench._plan().run_dir) / IPERF_NAME
    if not path.exists():
        found = shutil.which("iperf3")
        if found is None:
            raise BenchError("iperf3 not found: run scripts/setup.sh")
        shutil.copy2(found, path)
    return str(path)


def start_servers(bench: BenchLab, server_ns: str) -> None:
    """The request/response server (+HTTP) in ``server_ns``; iperf3 runs per test."""
    iperf_binary(bench)
    bench.spawn(server_ns, [PY, "-m", "agent.bench.rr", "server", "--port", str(RR_PORT),
                            "--http-port", str(HTTP_PORT)], "rr-server")
    for port in (RR_PORT, HTTP_PORT):
        bench.wait_listening(server_ns, port)


def iperf(bench: BenchLab, t: Target, seconds: int, length: str | None = None,
          streams: int = 1) -> float:
    """iperf3 throughput in Gbit/s (receiver side), ``streams`` parallel streams.

    A fresh one-shot server (``-s -1``) in ``t.server_ns`` per attempt; up
    to three attempts.
    """
    exe = iperf_binary(bench)
    argv = [exe, "-c", t.host, "-p", str(t.iperf_port), "-t", str(seconds), "-J",
            "--connect-timeout", "3000"]
    if length:
        argv += ["-l", length]
    if streams > 1:
        argv += ["-P", str(streams)]
    last = ""
    for _attempt in range(3):
        server = bench.spawn(t.server_ns, [exe, "-s", "-1", "-p", str(IPERF_PORT)],
                             "iperf3-server")
        try:
            bench.wait_listening(t.server_ns, IPERF_PORT, timeout=10)
            proc = bench.run(t.client_ns, argv, timeout=seconds + 20, check=False)
            try:
                data = json.loads(proc.stdout)
                if "error" not in data:
                    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
                last = data["error"]
            except (ValueError, KeyError) as exc:
                last = f"{exc}: {proc.stderr.strip()[-300:]}"
        except BenchError as exc:
            last = str(exc)
        finally:
            bench.stop(server)
        time.sleep(0.5)
    raise BenchError(f"iperf3 to {t.host}:{t.iperf_port} failed 3 times: {last}")


_SP_PCT = re.compile(r"percentile\s+([0-9.]+)\s+=\s+([0-9.]+)")


def parse_sockperf(text: str) -> dict[str, float]:
    """p50/p99/p99.9 one-way latency (µs; sockperf's ping-pong reports half the RTT)."""
    pct = {float(p): float(v) for p, v in _SP_PCT.findall(text)}
    if 50.0 not in pct or 99.0 not in pct:
        raise BenchError(f"sockperf: no percentiles in output {text[-300:]!r}")
    return {"p50_us": pct[50.0], "p99_us": pct[99.0], "p999_us": pct.get(99.9, pct[99.0])}


def start_sockperf_server(bench: BenchLab, server_ns: str, host: str) -> None:
    bench.spawn(server_ns, ["sockperf", "sr", "--tcp", "-i", host, "-p", str(SOCKPERF_PORT)],
                "sockperf-server")
    bench.wait_listening(server_ns, SOCKPERF_PORT)


def sockperf(bench: BenchLab, t: Target, seconds: int) -> dict[str, float]:
    """sockperf TCP ping-pong, 1 KiB messages, ``seconds`` long, from ``t.client_ns``."""
    argv = ["sockperf", "pp", "--tcp", "-i", t.host, "-p", str(t.sockperf_port),
            "-m", "1024", "-t", str(seconds)]
    proc = bench.run(t.client_ns, argv, timeout=seconds + 30, check=False)
    return parse_sockperf(proc.stdout + proc.stderr)


def rr(bench: BenchLab, t: Target, mode: str, count: int, max_s: float) -> dict[str, Any]:
    """``latency`` or ``connrate`` via :mod:`agent.bench.rr` in the client pod."""
    argv = [PY, "-m", "agent.bench.rr", mode, "--host", t.host, "--port", str(t.rr_port),
            "--count", str(count), "--max-seconds", str(max_s)]
    proc = bench.run(t.client_ns, argv, timeout=max_s + 30)
    try:
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError) as exc:
        raise BenchError(f"rr {mode}: unreadable output {proc.stdout[-300:]!r}") from exc


def measure(ctx: Context, bench: BenchLab, scenario: str, variant: str, rep: int, t: Target,
            metrics: tuple[str, ...], tput_seconds: int | None = None,
            via_tunnel: bool | None = None) -> None:
    """Run the requested measurements; a failed one is noted, not fatal.

    ``via_tunnel`` checks the path: node1's tunnel must (True) or must not
    (False) have logged connections meanwhile; a mismatch is noted loudly.
    """
    before = bench.tunnel_connections("node1")
    _measure(ctx, bench, scenario, variant, rep, t, metrics, tput_seconds)
    seen = bench.tunnel_connections("node1") - before
    if via_tunnel is not None and (seen > 0) != via_tunnel:
        ctx.note(scenario, f"PATH CHECK FAILED: {variant} rep {rep}: node1 tunnel logged {seen} "
                           f"connections, expected {'some' if via_tunnel else 'none'}")
    ctx.add(scenario, "tunnel_conns", variant, rep, seen)


def _measure(ctx: Context, bench: BenchLab, scenario: str, variant: str, rep: int, t: Target,
             metrics: tuple[str, ...], tput_seconds: int | None) -> None:
    p = ctx.params
    secs = tput_seconds or p.tput_seconds
    for m in metrics:
        try:
            if m == "tput_gbps":
                ctx.add(scenario, m, variant, rep, iperf(bench, t, secs))
            elif m == "tput8_gbps":
                ctx.add(scenario, m, variant, rep, iperf(bench, t, secs, streams=8))
            elif m == "sockperf":
                r = sockperf(bench, t, p.sockperf_seconds)
                ctx.add(scenario, "sp_p50_us", variant, rep, r["p50_us"], **r)
                ctx.add(scenario, "sp_p99_us", variant, rep, r["p99_us"])
            elif m == "tput_1k_gbps":
                ctx.add(scenario, m, variant, rep, iperf(bench, t, secs, "1K"))
            elif m == "lat":
                r = rr(bench, t, "latency", p.lat_count, p.lat_max_s)
                ctx.add(scenario, "lat_p50_us", variant, rep, r["p50_us"], **r)
                ctx.add(scenario, "lat_p99_us", variant, rep, r["p99_us"])
            elif m == "conn_per_s":
                r = rr(bench, t, "connrate", p.conn_count, p.conn_max_s)
                ctx.add(scenario, m, variant, rep, r["conn_per_s"], **r)
                if r.get("failed"):
                    ctx.note(scenario, f"{variant} rep {rep}: {r['failed']} connections failed")
            else:
                raise ValueError(f"unknown measurement {m}")
        except BenchError as exc:
            ctx.note(scenario, f"{variant} rep {rep}: {m} failed: {exc}")


_HEY_RPS = re.compile(r"Requests/sec:\s+([0-9.]+)")
_HEY_P99 = re.compile(r"99%\s+in\s+([0-9.]+)\s+secs")
_HEY_STATUS = re.compile(r"\[(\d{3})\]\s+(\d+)\s+responses")


def parse_hey(text: str) -> dict[str, Any]:
    """Requests/s, p99 latency (ms) and status counts from hey's summary."""
    rps = _HEY_RPS.search(text)
    p99 = _HEY_P99.search(text)
    statuses = {code: int(n) for code, n in _HEY_STATUS.findall(text)}
    return {"rps": float(rps.group(1)) if rps else None,
            "p99_ms": float(p99.group(1)) * 1000 if p99 else None,
            "statuses": statuses,
            "errors": "Error distribution" in text}
