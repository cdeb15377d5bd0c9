"""Peers for the interop, conformance and flood tests, all on 127.0.0.1: our HBONE
server in its own process, an echo backend, and a plaintext-to-mTLS bridge.

Everything here is bounded in time and cleaned up by its context manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agent.policy.compile import compile_policy_set
from agent.policy.engine import PolicySet
from agent.tunnel.native.protocol import PolicySnapshot, Workload

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = Path(__file__).parent / "programs"
LOOPBACK = "127.0.0.1"
# The native datapath denies every inbound connection until it has a policy snapshot:
# tests that are not about policy give it the empty set (no policy applies: allowed).
ALLOW_ALL = PolicySnapshot(1, compile_policy_set(PolicySet()))
# The destination workload of test inbound listeners.
WORKLOAD = Workload("default", {"app": "backend"})


class HboneServerProcess:
    """tests/interop/programs/hbone_server.py, running; ``port``, ``pid``, ``stats()``."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, pid: int) -> None:
        self.proc = proc
        self.port = port
        self.pid = pid

    async def stats(self, collect: bool = False) -> dict[str, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"gc\n" if collect else b"stats\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        return dict(json.loads(line))

    def rss_kb(self) -> int:
        """The server process's resident set size, from /proc."""
        return rss_kb(self.pid)


def rss_kb(pid: int) -> int:
    """A process's resident set size (KiB), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@contextlib.asynccontextmanager
async def hbone_server(ca_dir: Path, identity: str, lifetime: float = 120.0,
                       sndbuf: int = 0) -> AsyncIterator[HboneServerProcess]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(PROGRAMS / "hbone_server.py"), "--ca-dir", str(ca_dir),
        "--identity", identity, "--lifetime", str(lifetime),
        "--sndbuf", str(sndbuf),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not line:
            raise AssertionError("hbone_server.py exited before printing its port")
        info = json.loads(line)
        yield HboneServerProcess(proc, int(info["port"]), int(info["pid"]))
    finally:
        if proc.returncode is None:
            proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 10)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except ConnectionError:
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def echo_backend() -> AsyncIterator[int]:
    """A TCP echo server on 127.0.0.1; yields its port."""
    server = await asyncio.start_server(_echo, LOOPBACK, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 2)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


@contextlib.asynccontextmanager
async def mtls_bridge(target_port: int, client_context: ssl.SSLContext) -> AsyncIterator[int]:
    """Plaintext on 127.0.0.1:<yielded port> -> mutual TLS (ALPN h2, our client
    certificate) to 127.0.0.1:target_port, bytes passed through unchanged.

    For a peer that can do TLS but cannot present a client certificate (h2spec): the
    server keeps its production TLS config (client certificate required) and sees
    exactly the frames the peer sent.
    """
    tasks: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(
                LOOPBACK, target_port, ssl=client_context, server_hostname=LOOPBACK)
        except (OSError, ssl.SSLError):
            writer.close()
            return
        both = [asyncio.ensure_future(_pump(reader, up_writer)),
                asyncio.ensure_future(_pump(up_reader, writer))]
        tasks.update(both)
        await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        for task in both:
            task.cancel()
        writer.close()
        up_writer.close()

    server = await asyncio.start_server(handle, LOOPBACK, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 2)
