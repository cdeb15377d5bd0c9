"""Node.js peers of the interop suites (tests/interop/node/*.js): run one, read its
JSON lines, and the byte pattern its CONNECT client sends."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).parent / "node"


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js ('node') is required for the HBONE interop tests")
    return node


@contextlib.asynccontextmanager
async def node_process(script: str, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        node_binary(), str(NODE_DIR / script), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), 5)


async def read_line(proc: asyncio.subprocess.Process, timeout: float = 10.0) -> str:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not line:
        stderr = b""
        if proc.stderr is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                stderr = await asyncio.wait_for(proc.stderr.read(), 2)
        raise AssertionError(f"node exited early: {stderr.decode(errors='replace')}")
    return line.decode().strip()


def pattern(size: int) -> bytes:
    """The byte pattern connect_client.js sends: 64 KiB blocks of (i*7+3) & 0xff."""
    block = bytes(((i * 7 + 3) & 0xFF) for i in range(64 * 1024))
    return (block * (size // len(block) + 1))[:size]
