"""The one copy loop (agent/tunnel/relay.py), over real loopback sockets and a real
HBONE stream: half-close both ways, byte counts, resets mapped both ways
(TCP RST <-> RST_STREAM CONNECT_ERROR), cancellation. Moved here from
tests/unit/test_pool.py with the loop itself."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from agent.hbone import errors
from agent.hbone.exceptions import HboneStreamReset
from agent.hbone.pool import HbonePool
from agent.hbone.server import HboneServerRequest, serve_hbone
from agent.hbone.stream import HboneStream
from agent.identity.ca import init_ca
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityStore
from agent.tunnel import sockets
from agent.tunnel.relay import CopyCounts, HboneByteStream, SocketStream, copy_bidirectional

TRUST_DOMAIN = "cluster.local"
CLIENT = SpiffeId(TRUST_DOMAIN, "default", "client")
SERVER = SpiffeId(TRUST_DOMAIN, "default", "server")
LOOPBACK = "127.0.0.1"
LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


def run(coro: Awaitable[None], loop: str, timeout: float = 20.0) -> None:
    factory = uvloop.new_event_loop if loop == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> IdentityStore:
    return IdentityStore(init_ca(tmp_path_factory.mktemp("ca") / "ca", TRUST_DOMAIN))


async def dial(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (LOOPBACK, port))
    return sock


async def backend(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                    Awaitable[None]]) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, LOOPBACK, 0)
    return server, server.sockets[0].getsockname()[1]


async def upper_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    data = await reader.read()  # until FIN
    writer.write(data.upper())
    writer.write_eof()
    await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def hbone_server(store: IdentityStore, on_stream: Callable[[HboneServerRequest],
                                                                  Awaitable[None]]
                       ) -> AsyncIterator[int]:
    server = await asyncio.start_server(lambda r, w: serve_hbone(r, w, on_stream=on_stream),
                                        LOOPBACK, 0, ssl=store.server_context(SERVER))
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@contextlib.asynccontextmanager
async def pool_for(store: IdentityStore) -> AsyncIterator[HbonePool]:
    pool = HbonePool(store.client_context, trust_domain=TRUST_DOMAIN, keepalive_interval=None)
    try:
        yield pool
    finally:
        await pool.close()


async def open_stream(pool: HbonePool, port: int, authority: str) -> HboneStream:
    return await pool.open_stream(source=CLIENT, peer=(LOOPBACK, port), authority=authority,
                                  forwarded_for=None)


@LOOPS
def test_socket_to_socket_half_close_and_counts(loop: str) -> None:
    async def main() -> None:
        server, port = await backend(upper_echo)
        lsock = socket.socket()
        lsock.bind((LOOPBACK, 0))
        lsock.listen(1)
        lsock.setblocking(False)
        ev = asyncio.get_running_loop()
        try:
            reader, writer = await asyncio.open_connection(*lsock.getsockname())
            conn, _ = await ev.sock_accept(lsock)
            conn.setblocking(False)
            counts = CopyCounts()
            copying = asyncio.ensure_future(copy_bidirectional(
                SocketStream(conn), SocketStream(await dial(port)), counts))
            writer.write(b"half closed")
            writer.write_eof()
            assert await reader.read() == b"HALF CLOSED"
            writer.close()
            assert await copying is False
            assert (counts.up, counts.down) == (11, 11)
        finally:
            lsock.close()
            server.close()

    run(main(), loop)


@LOOPS
def test_half_close_through_hbone(store: IdentityStore, loop: str) -> None:
    """client TCP -> copy -> HBONE -> copy -> backend TCP, and back, with FINs."""

    async def main() -> None:
        results: list[tuple[bool, CopyCounts]] = []
        server, port = await backend(upper_echo)

        async def forward(request: HboneServerRequest) -> None:
            counts = CopyCounts()
            up = await dial(port)
            reset = await copy_bidirectional(HboneByteStream(request.accept()),
                                             SocketStream(up), counts)
            results.append((reset, counts))

        try:
            async with hbone_server(store, forward) as hport, pool_for(store) as pool:
                lsock = socket.socket()
                lsock.bind((LOOPBACK, 0))
                lsock.listen(1)
                lsock.setblocking(False)
                reader, writer = await asyncio.open_connection(*lsock.getsockname())
                conn, _ = await asyncio.get_running_loop().sock_accept(lsock)
                lsock.close()
                conn.setblocking(False)
                stream = await open_stream(pool, hport, f"127.0.0.1:{port}")
                counts = CopyCounts()
                copying = asyncio.ensure_future(copy_bidirectional(
                    SocketStream(conn), HboneByteStream(stream), counts))
                writer.write(b"hello hbone")
                writer.write_eof()
                assert await reader.read() == b"HELLO HBONE"
                writer.close()
                results.append((await copying, counts))
                deadline = asyncio.get_running_loop().time() + 5
                while len(results) < 2 and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.01)
        finally:
            server.close()
        assert [(reset, c.up, c.down) for reset, c in results] == [(False, 11, 11)] * 2

    run(main(), loop)


@LOOPS
def test_backend_reset_becomes_stream_reset(store: IdentityStore, loop: str) -> None:
    async def main() -> None:
        async def backend_rst(reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
            await reader.read(5)
            sockets.abort(writer.get_extra_info("socket"))
            writer.transport.abort()

        server, port = await backend(backend_rst)
        resets: list[bool] = []

        async def forward(request: HboneServerRequest) -> None:
            resets.append(await copy_bidirectional(
                HboneByteStream(request.accept()), SocketStream(await dial(port)),
                CopyCounts()))

        try:
            async with hbone_server(store, forward) as hport, pool_for(store) as pool:
                stream = await open_stream(pool, hport, f"127.0.0.1:{port}")
                await stream.write(b"12345")
                with pytest.raises(HboneStreamReset) as info:
                    while await stream.read():
                        pass
                assert info.value.error_code == errors.CONNECT_ERROR
                deadline = asyncio.get_running_loop().time() + 5
                while not resets and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.01)
                assert resets == [True]
        finally:
            server.close()

    run(main(), loop)


@LOOPS
def test_stream_reset_becomes_tcp_rst(store: IdentityStore, loop: str) -> None:
    async def main() -> None:
        seen: list[BaseException | bytes] = []
        done = asyncio.Event()

        async def backend_read(reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
            try:
                seen.append(await reader.read())
            except ConnectionResetError as exc:
                seen.append(exc)
            finally:
                done.set()
                writer.close()

        server, port = await backend(backend_read)

        async def forward(request: HboneServerRequest) -> None:
            await copy_bidirectional(HboneByteStream(request.accept()),
                                     SocketStream(await dial(port)), CopyCounts())

        try:
            async with hbone_server(store, forward) as hport, pool_for(store) as pool:
                stream = await open_stream(pool, hport, f"127.0.0.1:{port}")
                await stream.write(b"partial")
                await asyncio.sleep(0.1)
                stream.abort(errors.CANCEL)
                await asyncio.wait_for(done.wait(), 5)
        finally:
            server.close()
        assert isinstance(seen[-1], ConnectionResetError)  # a reset, not a clean FIN

    run(main(), loop)


def test_cancellation_aborts_both_and_keeps_counts(tmp_path: Path) -> None:
    async def main() -> None:
        a1, a2 = socket.socketpair()
        b1, b2 = socket.socketpair()
        for s in (a1, a2, b1, b2):
            s.setblocking(False)
        counts = CopyCounts()
        copying = asyncio.ensure_future(copy_bidirectional(SocketStream(a2), SocketStream(b1),
                                                           counts))
        ev = asyncio.get_running_loop()
        await ev.sock_sendall(a1, b"abc")
        assert await ev.sock_recv(b2, 10) == b"abc"
        copying.cancel()
        with pytest.raises(asyncio.CancelledError):
            await copying
        assert counts.up == 3
        assert a2.fileno() == -1 and b1.fileno() == -1  # both ends closed
        for s in (a1, b2):
            s.close()

    run(main(), "asyncio")
