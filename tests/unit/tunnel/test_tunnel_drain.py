"""The tunnel's drain on stop (agent.tunnel.drain, Tunnel.drain), in process on loopback:
node2's tunnel stops while node1's pod has a connection through it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import A1, A2, APP_PORT, Mesh, run, start_mesh, until

from agent.identity.ca import MeshCA


async def _connect(m: Mesh) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """a1 (node1) -> a2 (node2) over HBONE; returns once a2's server has greeted."""
    reader, writer = await m.node1.capture(A1.addresses[0], A2.addresses[0], APP_PORT)
    greeting = await asyncio.wait_for(reader.readline(), 5)
    assert greeting.startswith(b"peer "), greeting
    return reader, writer


async def _stopped(m: Mesh) -> None:
    running = m.node2.running
    assert running is not None
    await asyncio.wait_for(asyncio.shield(running), 15)


def test_a_connection_in_flight_finishes_while_the_tunnel_drains(
        tmp_path: Path, mesh_ca: MeshCA) -> None:
    async def body() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca, drain_seconds=10.0) as m:
            reader, writer = await _connect(m)
            m.node2.stop.set()
            # the listeners close first: a new connection to node2's 15008 finds none
            await until("node2's listeners closed", lambda: not m.node2.tunnel.listeners)
            payload = b"x" * 200_000
            writer.write(payload)
            writer.write_eof()
            echoed = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert echoed == payload  # every byte, through a stopping tunnel
            await _stopped(m)
            report = m.node2.tunnel.drained
            assert report is not None
            # the HBONE connection from node1 was waited for and ended on its own:
            # GOAWAY made node1 stop using it, and it closed once its stream was done
            assert report.waited >= 1 and report.cut == 0, report
    run(body())


def test_a_connection_that_never_ends_is_cut_at_the_drain_deadline(
        tmp_path: Path, mesh_ca: MeshCA) -> None:
    async def body() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca, drain_seconds=0.5) as m:
            reader, writer = await _connect(m)
            m.node2.stop.set()
            await _stopped(m)  # returns although the connection is still open
            report = m.node2.tunnel.drained
            assert report is not None and report.cut >= 1, report
            # the client's connection is reset (cut, as any aborted connection), not
            # left hanging, and node2 recorded it as reset
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 10)
            writer.close()
            cut = m.node2.closed(dst=f"{A2.addresses[0]}:{APP_PORT}")
            assert [str(e["result"]) for e in cut] == ["reset"], m.node2.log
    run(body())
