"""Request/response load tools used inside lab pods (``python -m agent.bench.rr``).

``server``   an asyncio (uvloop when installed) server; on ``--port`` it answers
             every ``--size``-byte request with ``--size`` bytes (echo-style
             request/response); on ``--http-port`` it speaks minimal HTTP/1.1
             keep-alive and answers every request with a ``--size``-byte body.
``latency``  one persistent connection, ``--count`` round trips of ``--size``
             bytes each (after ``--warmup``), timed one by one with
             ``time.perf_counter_ns``; prints percentiles in microseconds.
``connrate`` one client process, sequential connections: connect, one
             request, one response, close; ``--count`` connections or
             ``--max-seconds``, whichever ends first; prints connections/s.
``paired``   both of the above for several ``--host``s at once, interleaved one
             sample at a time (round i visits the hosts in rotated order), so
             load that comes and goes on a shared machine hits every host alike;
             prints per host RTT percentiles and connection times, and
             connections/s two ways: 1 / median connection time (``conn_per_s``,
             robust to the scheduling stalls of a loaded machine) and connections
             / total connection time (``conn_per_s_mean``, what a sequential
             client achieves, outliers included).

Every loop is bounded by a count and a deadline. Output is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import time
from typing import Any

from agent.bench.report import percentile

DEFAULT_SIZE = 1024
IO_TIMEOUT_S = 5.0
MAX_HEADER_BYTES = 16 * 1024


def _recv_exact(sock: socket.socket, n: int, buf: bytearray) -> None:
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:n])
        if k == 0:
            raise ConnectionError("peer closed the connection mid-response")
        got += k


# -- server ------------------------------------------------------------------


async def _serve_rr(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    size: int) -> None:
    reply = b"r" * size
    try:
        while True:
            try:
                await reader.readexactly(size)
            except asyncio.IncompleteReadError:
                return
            writer.write(reply)
            await writer.drain()
    except (ConnectionError, OSError):
        return
    finally:
        writer.close()


async def _serve_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      size: int) -> None:
    body = b"h" * size
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: " + str(size).encode() + b"\r\n\r\n")
    try:
        while True:
            try:
                header = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            length = 0
            close = False
            for line in header.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                lname = name.strip().lower()
                if lname == b"content-length":
                    length = int(value.strip() or 0)
                elif lname == b"connection" and value.strip().lower() == b"close":
                    close = True
            if length:
                await reader.readexactly(length)
            writer.write(head + body)
            await writer.drain()
            if close:
                return
    except (ConnectionError, OSError, ValueError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


async def _server_main(port: int, http_port: int | None, size: int) -> None:
    servers = [await asyncio.start_server(lambda r, w: _serve_rr(r, w, size),
                                          host="0.0.0.0", port=port, backlog=4096,
                                          reuse_address=True)]
    if http_port:
        servers.append(await asyncio.start_server(lambda r, w: _serve_http(r, w, size),
                                                  host="0.0.0.0", port=http_port,
                                                  backlog=4096, reuse_address=True,
                                                  limit=MAX_HEADER_BYTES))
    print(json.dumps({"listening": [port, http_port]}), flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def run_server(port: int, http_port: int | None, size: int) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_server_main(port, http_port, size))


# -- clients -----------------------------------------------------------------


def _connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=IO_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def latency(host: str, port: int, count: int, warmup: int, size: int,
            max_seconds: float) -> dict[str, Any]:
    """Round-trip times of ``size``-byte request/response on one connection."""
    req = b"q" * size
    buf = bytearray(size)
    samples: list[int] = []
    deadline = time.monotonic() + max_seconds
    with _connect(host, port) as sock:
        for _ in range(warmup):
            sock.sendall(req)
            _recv_exact(sock, size, buf)
        clock = time.perf_counter_ns
        for _ in range(count):
            t0 = clock()
            sock.sendall(req)
            _recv_exact(sock, size, buf)
            samples.append(clock() - t0)
            if len(samples) % 256 == 0 and time.monotonic() > deadline:
                break
    us = sorted(s / 1000.0 for s in samples)
    return {"count": len(us), "p50_us": percentile(us, 50), "p90_us": percentile(us, 90),
            "p99_us": percentile(us, 99), "min_us": us[0], "max_us": us[-1],
            "mean_us": sum(us) / len(us)}


def connrate(host: str, port: int, count: int, size: int, max_seconds: float) -> dict[str, Any]:
    """Sequential connect / request / response / close; connections per second."""
    req = b"q" * size
    buf = bytearray(size)
    ok = failed = 0
    connect_us: list[float] = []
    t_start = time.perf_counter()
    deadline = time.monotonic() + max_seconds
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        t0 = time.perf_counter_ns()
        try:
            with _connect(host, port) as sock:
                connect_us.append((time.perf_counter_ns() - t0) / 1000.0)
                sock.sendall(req)
                _recv_exact(sock, size, buf)
            ok += 1
        except OSError:
            failed += 1
    elapsed = time.perf_counter() - t_start
    connect_us.sort()
    return {"connections": ok, "failed": failed, "seconds": elapsed,
            "conn_per_s": ok / elapsed if elapsed > 0 else 0.0,
            "connect_p50_us": percentile(connect_us, 50) if connect_us else None,
            "connect_p99_us": percentile(connect_us, 99) if connect_us else None}


def _rotated(items: list[Any], i: int) -> list[Any]:
    k = i % len(items)
    return items[k:] + items[:k]


def paired(hosts: list[str], port: int, count: int, warmup: int, size: int,
           max_seconds: float) -> dict[str, Any]:
    """:func:`latency` and :func:`connrate` for every host, one sample per host in
    turn; each half gets ``max_seconds / 2``."""
    req = b"q" * size
    buf = bytearray(size)
    clock = time.perf_counter_ns
    rtt: dict[str, list[float]] = {h: [] for h in hosts}
    conn: dict[str, list[float]] = {h: [] for h in hosts}
    failed = dict.fromkeys(hosts, 0)
    with contextlib.ExitStack() as stack:
        socks = {h: stack.enter_context(_connect(h, port)) for h in hosts}
        for _ in range(warmup):
            for h in hosts:
                socks[h].sendall(req)
                _recv_exact(socks[h], size, buf)
        deadline = time.monotonic() + max_seconds / 2
        for i in range(count):
            for h in _rotated(hosts, i):
                t0 = clock()
                socks[h].sendall(req)
                _recv_exact(socks[h], size, buf)
                rtt[h].append((clock() - t0) / 1000.0)
            if i % 64 == 0 and time.monotonic() > deadline:
                break
    deadline = time.monotonic() + max_seconds / 2
    for i in range(count):
        if time.monotonic() > deadline:
            break
        for h in _rotated(hosts, i):
            t0 = clock()
            try:
                with _connect(h, port) as sock:
                    sock.sendall(req)
                    _recv_exact(sock, size, buf)
            except OSError:
                failed[h] += 1
                continue
            conn[h].append((clock() - t0) / 1000.0)
    out: dict[str, Any] = {}
    for h in hosts:
        r, c = rtt[h], conn[h]
        out[h] = {"lat_count": len(r), "lat_p50_us": percentile(r, 50) if r else None,
                  "lat_p99_us": percentile(r, 99) if r else None,
                  "connections": len(c), "failed": failed[h],
                  "conn_p50_us": percentile(c, 50) if c else None,
                  "conn_p99_us": percentile(c, 99) if c else None,
                  "conn_per_s": 1e6 / percentile(c, 50) if c else None,
                  "conn_per_s_mean": 1e6 * len(c) / sum(c) if c else None}
    return {"hosts": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.bench.rr", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--port", type=int, default=7000)
    s.add_argument("--http-port", type=int, default=None)
    s.add_argument("--size", type=int, default=DEFAULT_SIZE)
    lat = sub.add_parser("latency")
    cr = sub.add_parser("connrate")
    for p in (lat, cr):
        p.add_argument("--host", required=True)
        p.add_argument("--port", type=int, default=7000)
        p.add_argument("--count", type=int, default=5000)
        p.add_argument("--size", type=int, default=DEFAULT_SIZE)
        p.add_argument("--max-seconds", type=float, default=20.0)
    lat.add_argument("--warmup", type=int, default=200)
    pr = sub.add_parser("paired")
    pr.add_argument("--host", required=True, action="append", dest="hosts")
    pr.add_argument("--port", type=int, default=7000)
    pr.add_argument("--count", type=int, default=2000)
    pr.add_argument("--warmup", type=int, default=100)
    pr.add_argument("--size", type=int, default=DEFAULT_SIZE)
    pr.add_argument("--max-seconds", type=float, default=20.0)
    args = ap.parse_args(argv)
    if args.cmd == "server":
        run_server(args.port, args.http_port, args.size)
        return 0
    if args.cmd == "paired":
        out = paired(args.hosts, args.port, args.count, args.warmup, args.size,
                     args.max_seconds)
    elif args.cmd == "latency":
        out = latency(args.host, args.port, args.count, args.warmup, args.size, args.max_seconds)
    else:
        out = connrate(args.host, args.port, args.count, args.size, args.max_seconds)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
