"""A standalone HBONE server for interop and flood tests: our 15008 server code
(agent.hbone.server.serve_hbone) on 127.0.0.1 with mutual TLS from a test CA.

Each accepted CONNECT dials its ``:authority`` (loopback only: anything else is
refused with 400) and relays with the tunnel's copy loop (agent.tunnel.relay). It runs
in its own process so a test can read its RSS from /proc/<pid>/status.

Protocol with the test (line-oriented, stdout/stdin):
  stdout first line: {"port": N, "pid": P}
  stdin "stats"   -> stdout {"dials": n, "requests": n, "connections": n, "rss_kb": n}
  stdin "gc"      -> collect garbage, then "stats"
  stdin EOF       -> exit
It exits on its own after --lifetime seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import json
import os
import socket
import sys

import structlog

from agent.hbone.server import HboneServerRequest, serve_hbone
from agent.identity.ca import load_ca
from agent.identity.spiffe import parse_spiffe_id
from agent.identity.store import IdentityStore
from agent.tunnel.relay import CopyCounts, HboneByteStream, SocketStream, copy_bidirectional

TRUST_DOMAIN = "cluster.local"
STATS = {"dials": 0, "requests": 0, "connections": 0}


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def on_stream(request: HboneServerRequest) -> None:
    STATS["requests"] += 1
    try:
        host, port = request.destination
    except ValueError:
        request.reject(400)
        return
    if not ipaddress.ip_address(host).is_loopback:
        request.reject(400)  # a test server dials nothing but loopback
        return
    if request.cancelled:
        return
    STATS["dials"] += 1
    loop = asyncio.get_running_loop()
    upstream = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                             socket.SOCK_STREAM)
    upstream.setblocking(False)
    try:
        await loop.sock_connect(upstream, (host, port))
    except OSError:
        upstream.close()
        request.reject(503)
        return
    try:
        stream = request.accept()
    except ConnectionError:
        upstream.close()
        return
    # The tunnel's one copy loop (agent/tunnel/relay.py), as the real tunnel runs it.
    await copy_bidirectional(HboneByteStream(stream), SocketStream(upstream), CopyCounts())


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    STATS["connections"] += 1
    await serve_hbone(reader, writer, on_stream=on_stream, trust_domain=TRUST_DOMAIN,
                      handler_grace=1.0)


async def commands() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = line.decode().strip()
        if command == "gc":
            gc.collect()
        if command in ("stats", "gc"):
            print(json.dumps({**STATS, "rss_kb": rss_kb()}), flush=True)


async def main() -> None:
    # Logs go to stderr: stdout carries the JSON lines the test reads.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    parser = argparse.ArgumentParser()
    parser.add_argument("--ca-dir", required=True)
    parser.add_argument("--identity", required=True, help="spiffe://td/ns/N/sa/S")
    parser.add_argument("--lifetime", type=float, default=120.0)
    parser.add_argument("--sndbuf", type=int, default=0,
                        help="SO_SNDBUF of accepted sockets (0: kernel default). Flood "
                             "tests shrink it so a peer that does not read fills our own "
                             "buffers after thousands of frames, not millions.")
    args = parser.parse_args()
    store = IdentityStore(load_ca(args.ca_dir))
    identity = parse_spiffe_id(args.identity)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.sndbuf:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, args.sndbuf)
    listener.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(handle, sock=listener,
                                        ssl=store.server_context(identity))
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(commands(), args.lifetime)
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
