"""DNS query latency from inside a pod (the ``services`` benchmark's client).

``python -m agent.bench.dnsrr --server IP --name NAME --count N --max-seconds S``
sends N A queries for NAME over UDP to IP:53, one at a time (a fresh query id
each), and prints one JSON line: ``{"count", "failed", "p50_us", "p99_us"}``.
A query unanswered within 2 s counts as failed. Bounded by ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import dns.exception
import dns.message
import dns.query

QUERY_TIMEOUT_S = 2.0


def measure(server: str, name: str, count: int, max_seconds: float) -> dict[str, float | int]:
    samples: list[float] = []
    failed = 0
    deadline = time.monotonic() + max_seconds
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        query = dns.message.make_query(name, "A")
        start = time.perf_counter()
        try:
            dns.query.udp(query, server, timeout=QUERY_TIMEOUT_S)
        except (dns.exception.DNSException, OSError):
            failed += 1
            continue
        samples.append((time.perf_counter() - start) * 1e6)
    out: dict[str, float | int] = {"count": len(samples), "failed": failed}
    if samples:
        ordered = sorted(samples)
        out["p50_us"] = statistics.median(ordered)
        out["p99_us"] = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.bench.dnsrr")
    ap.add_argument("--server", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--max-seconds", type=float, default=10.0)
    args = ap.parse_args(argv)
    print(json.dumps(measure(args.server, args.name, args.count, args.max_seconds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
