"""The HBONE pool and asyncio shell over real loopback mTLS (127.0.0.1 only).

Each test runs its own event loop under a hard timeout, starts an HBONE server with
``serve_hbone`` on an ephemeral port, and tears everything down in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from agent.hbone import errors
from agent.hbone.client import HboneClient
from agent.hbone.exceptions import (
    HboneConnectionLost,
    HbonePeerIdentityError,
    HboneRejected,
    HboneStreamError,
    HboneStreamReset,
)
from agent.hbone.pool import HbonePool
from agent.hbone.server import HboneServerRequest, serve_hbone
from agent.hbone.stream import HboneStream
from agent.identity.ca import init_ca
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityStore, client_context_for
from agent.tunnel.relay import abort_with_rst, pipe_stream_and_socket

TRUST_DOMAIN = "cluster.local"
CLIENT = SpiffeId(TRUST_DOMAIN, "default", "client")
SERVER = SpiffeId(TRUST_DOMAIN, "istio-system", "ztunnel")
LOOPBACK = "127.0.0.1"

Handler = Callable[[HboneServerRequest], Awaitable[None]]


def run(coro: Coroutine[Any, Any, Any], timeout: float = 30.0, loop: str = "asyncio") -> Any:
    """Run ``coro`` on a fresh loop, failing (not hanging) after ``timeout`` seconds.

    ``loop`` is "asyncio" or "uvloop": the tunnel prefers uvloop, the code must work on both.
    """
    factory = uvloop.new_event_loop if loop == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(asyncio.wait_for(coro, timeout))


LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> IdentityStore:
    return IdentityStore(init_ca(tmp_path_factory.mktemp("ca") / "ca", TRUST_DOMAIN))


@pytest.fixture(scope="module")
def foreign_store(tmp_path_factory: pytest.TempPathFactory) -> IdentityStore:
    return IdentityStore(init_ca(tmp_path_factory.mktemp("foreign") / "ca", TRUST_DOMAIN))


class HboneTestServer:
    """serve_hbone on 127.0.0.1:<ephemeral>, counting TLS connections and requests."""

    def __init__(self, ssl_context: ssl.SSLContext, on_stream: Handler) -> None:
        self.ssl_context = ssl_context
        self.on_stream = on_stream
        self.connections = 0
        self.requests: list[HboneServerRequest] = []
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1

        async def recording_handler(request: HboneServerRequest) -> None:
            self.requests.append(request)
            await self.on_stream(request)

        await serve_hbone(reader, writer, on_stream=recording_handler, handler_grace=1.0)

    async def __aenter__(self) -> HboneTestServer:
        self.server = await asyncio.start_server(self._handle, LOOPBACK, 0,
                                                 ssl=self.ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.server.wait_closed(), 2.0)

    @property
    def address(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)


async def echo_handler(request: HboneServerRequest) -> None:
    stream = request.accept()
    while data := await stream.read():
        await stream.write(data)
    await stream.close_write()


async def hold_handler(request: HboneServerRequest) -> None:
    """Accept and keep the stream open until the client half-closes."""
    stream = request.accept()
    while await stream.read():
        pass
    await stream.close_write()


@contextlib.asynccontextmanager
async def pool_for(store: IdentityStore, **kwargs: Any) -> AsyncIterator[HbonePool]:
    pool = HbonePool(store.client_context, trust_domain=TRUST_DOMAIN,
                     **{"connect_timeout": 5.0, **kwargs})
    try:
        yield pool
    finally:
        await pool.close()


async def open_on(pool: HbonePool, server: HboneTestServer, **kwargs: Any) -> HboneStream:
    args: dict[str, Any] = {"source": CLIENT, "peer": server.address,
                            "authority": "10.0.0.1:8080", "forwarded_for": "10.0.0.2"}
    args.update(kwargs)
    return await pool.open_stream(**args)


async def read_all(stream: HboneStream, limit: int = 64 * 1024 * 1024) -> bytes:
    received = bytearray()
    while len(received) <= limit:
        data = await stream.read()
        if not data:
            return bytes(received)
        received += data
    raise AssertionError("read more than the limit")


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


# ---- happy path -------------------------------------------------------------------------------


@LOOPS
def test_echo_with_headers_identity_and_half_close(store: IdentityStore, loop: str) -> None:
    async def main() -> None:
        async with HboneTestServer(store.server_context(SERVER), echo_handler) as server, \
                pool_for(store) as pool:
            stream = await open_on(pool, server, authority="[fd00::5]:9090",
                                   forwarded_for="fd00::9",
                                   baggage="k8s.namespace.name=default,k8s.pod.name=c-1",
                                   expected_peer=SERVER)
            assert stream.peer_identity == SERVER
            payload = bytes(range(256)) * 40_000  # ~10 MiB: several windows' worth

            async def send() -> None:
                await stream.write(payload)
                await stream.close_write()

            sender = asyncio.ensure_future(send())
            echoed = await read_all(stream)
            await sender
            assert echoed == payload
            request = server.requests[0]
            assert request.authority == "[fd00::5]:9090"
            assert request.destination == ("fd00::5", 9090)
            assert request.forwarded_for == "fd00::9"
            assert request.header("forwarded") == 'for="[fd00::9]"'
            assert request.baggage == {"k8s.namespace.name": "default", "k8s.pod.name": "c-1"}
            assert request.peer_identity == CLIENT

    run(main(), loop=loop)


def test_streams_share_a_connection_up_to_the_limit(store: IdentityStore) -> None:
    async def main() -> None:
        async with HboneTestServer(store.server_context(SERVER), hold_handler) as server, \
                pool_for(store, max_streams_per_connection=3) as pool:
            streams = await asyncio.gather(*(open_on(pool, server) for _ in range(3)))
            assert pool.connection_count() == 1 and server.connections == 1
            fourth = await open_on(pool, server)
            assert pool.connection_count() == 2 and server.connections == 2
            # A freed slot is reused before any new connection is made.
            await streams[0].close_write()
            assert await streams[0].read() == b""
            fifth = await open_on(pool, server)
            assert pool.connection_count() == 2
            for stream in [*streams[1:], fourth, fifth]:
                await stream.close_write()
                assert await stream.read() == b""
            # A different source identity never shares a connection.
            other = await open_on(pool, server, source=SpiffeId(TRUST_DOMAIN, "x", "y"))
            assert pool.connection_count() == 3
            other.abort()

    run(main())


def test_idle_connections_are_closed(store: IdentityStore) -> None:
    async def main() -> None:
        async with HboneTestServer(store.server_context(SERVER), echo_handler) as server, \
                pool_for(store, idle_timeout=0.3) as pool:
            stream = await open_on(pool, server)
            await stream.write(b"hello")
            await stream.close_write()
            assert await read_all(stream) == b"hello"
            connection = pool.connections()[0]
            # Reaping drops it from the pool first, then closes it (TLS
            # close_notify is sent asynchronously): wait for both.
            await wait_until(lambda: pool.connection_count() == 0 and connection.is_closed)
            # The pool works again afterwards, with a fresh connection.
            again = await open_on(pool, server)
            again.abort()
            assert server.connections == 2

    run(main())


def test_keepalive_ping(store: IdentityStore) -> None:
    async def main() -> None:
        async with HboneTestServer(store.server_context(SERVER), hold_handler) as server, \
                pool_for(store, keepalive_interval=0.05) as pool:
            stream = await open_on(pool, server)
            client = pool.connections()[0]
            assert await client.ping(timeout=2.0) < 2.0
            await asyncio.sleep(0.3)  # several keepalive rounds
            assert not client.is_closed
            stream.abort()

    run(main())


# ---- refusals -----------------------------------------------------------------------------------


def test_wrong_server_identity_refused(store: IdentityStore) -> None:
    async def main() -> None:
        async with HboneTestServer(store.server_context(SERVER), echo_handler) as server, \
                pool_for(store) as pool:
            wrong = SpiffeId(TRUST_DOMAIN, "prod", "payments")
            with pytest.raises(HbonePeerIdentityError, match="expected"):
                await open_on(pool, server, expected_peer=wrong)
            with pytest.raises(HbonePeerIdentityError, match="trust domain"):
                await open_on(pool, server, trust_domain="other.example")
            assert pool.connection_count() == 0
            assert server.requests == []

    run(main())


def test_client_cert_from_foreign_ca_refused(store: IdentityStore,
                                              foreign_store: IdentityStore) -> None:
    # The client trusts our CA (so it accepts the server) but presents a foreign cert.
    foreign_cert = foreign_store.get(CLIENT)
    forged = client_context_for(foreign_cert)
    forged.load_verify_locations(cadata=store.ca.cert_pem.decode())

    async def main() -> None:
        async with HboneTestServer(store.server_context(SERVER), echo_handler) as server:
            pool = HbonePool(lambda _source: forged, trust_domain=TRUST_DOMAIN)
            try:
                with pytest.raises((HboneStreamError, ssl.SSLError, ConnectionError)) as info:
                    stream = await open_on(pool, server)
                    await stream.write(b"x")
                    await stream.read()
                assert not isinstance(info.value, HboneRejected)  # refused at TLS, not HTTP
            finally:
                await pool.close()
            assert server.requests == []

    run(main())


def test_expired_server_certificate_refused(store: IdentityStore) -> None:
    past = time.time() - 7200
    expired = IdentityStore(store.ca, ttl_seconds=600, clock=lambda: past)

    async def main() -> None:
        async with HboneTestServer(expired.server_context(SERVER), echo_handler) as server, \
                pool_for(store) as pool:
            with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
                await open_on(pool, server)
            assert server.requests == []

    run(main())


def test_expired_client_certificate_refused(store: IdentityStore) -> None:
    past = time.time() - 7200
    expired = IdentityStore(store.ca, ttl_seconds=600, clock=lambda: past)

    async def main() -> None:
        async with HboneTestServer(store.server_context(SERVER), echo_handler) as server, \
                pool_for(expired) as pool:
            with pytest.raises((HboneStreamError, ssl.SSLError, ConnectionError)) as info:
                stream = await open_on(pool, server)
                await stream.read()
            assert not isinstance(info.value, HboneRejected)  # refused at TLS, not HTTP
            assert server.requests == []

    run(main())


def test_rejected_connect(store: IdentityStore) -> None:
    async def reject(request: HboneServerRequest) -> None:
        request.reject(403)

    async def main() -> None:
        async with HboneTestServer(store.server_context(SERVER), reject) as server, \
                pool_for(store) as pool:
            with pytest.raises(HboneRejected) as info:
                await open_on(pool, server)
            assert info.value.status == 403
            # The connection survives a rejected stream and stays pooled.
            with pytest.raises(HboneRejected):
                await open_on(pool, server)
            assert server.connections == 1

    run(main())


def test_server_handler_learns_of_a_cancel_before_it_answers(store: IdentityStore) -> None:
    """A client that gives up before the 200 resets the stream; the handler, busy (say,
    dialing), sees ``wait_cancelled`` return and ``cancelled`` true, and accept()
    raises: nothing is connected for a request nobody wants any more."""
    outcomes: list[str] = []

    async def slow_dial(request: HboneServerRequest) -> None:
        dial = asyncio.ensure_future(asyncio.sleep(30))  # a dial that takes long
        cancelled = asyncio.ensure_future(request.wait_cancelled())
        done, _ = await asyncio.wait({dial, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        dial.cancel()
        cancelled.cancel()
        outcomes.append("cancelled" if cancelled in done and request.cancelled else "dialed")
        with pytest.raises(HboneStreamReset):
            request.accept()

    async def main() -> None:
        async with HboneTestServer(store.server_context(SERVER), slow_dial) as server, \
                pool_for(store, response_timeout=0.5) as pool:
            with pytest.raises(asyncio.TimeoutError):
                await open_on(pool, server)
            await wait_until(lambda: bool(outcomes))
            assert outcomes == ["cancelled"]
            # The connection carries on.
            assert pool.connection_count() == 1

    run(main())


def test_connect_timeout() -> None:
    async def main() -> None:
        # A listener that never completes TLS: the handshake must time out.
        server = await asyncio.start_server(lambda r, w: None, LOOPBACK, 0)
        port = server.sockets[0].getsockname()[1]
        ctx = ssl.create_default_context()
        try:
            started = time.monotonic()
            with pytest.raises((asyncio.TimeoutError, TimeoutError)):
                await HboneClient.connect((LOOPBACK, port), ctx, connect_timeout=0.3)
            assert time.monotonic() - started < 3
        finally:
            server.close()

    run(main())


# ---- flow control and reset semantics over sockets -----------------------------------------------


def test_write_blocks_when_server_does_not_read(store: IdentityStore) -> None:
    async def main() -> None:
        never_read = asyncio.Event()

        async def lazy(request: HboneServerRequest) -> None:
            stream = request.accept()
            await never_read.wait()
            stream.abort()

        async with HboneTestServer(store.server_context(SERVER), lazy) as server, \
                pool_for(store) as pool:
            stream = await open_on(pool, server)
            chunk = b"b" * (1024 * 1024)
            written = 0
            with pytest.raises(asyncio.TimeoutError):
                for _ in range(64):  # 64 MiB would be far beyond any window
                    await asyncio.wait_for(stream.write(chunk), 1.0)
                    written += len(chunk)
            # Bounded by the 4 MiB stream window (plus what socket buffers absorbed).
            assert 4 * 1024 * 1024 <= written <= 8 * 1024 * 1024
            buffered = server.requests[0].stream.buffered_bytes
            assert buffered <= 4 * 1024 * 1024
            never_read.set()

    run(main())


async def _tcp_backend(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                         Awaitable[None]]) -> tuple[asyncio.Server, int]:
    backend = await asyncio.start_server(handler, LOOPBACK, 0)
    return backend, backend.sockets[0].getsockname()[1]


@LOOPS
def test_pipe_half_close_through_the_tunnel(store: IdentityStore, loop: str) -> None:
    """client TCP -> pipe -> HBONE -> pipe -> backend TCP, and back, with FINs."""

    async def main() -> None:
        results: list[Any] = []

        async def backend_echo(reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
            data = await reader.read()  # until FIN
            writer.write(data.upper())
            writer.write_eof()
            await writer.drain()
            writer.close()

        backend, backend_port = await _tcp_backend(backend_echo)

        async def forward(request: HboneServerRequest) -> None:
            host, port = request.destination
            assert host == LOOPBACK
            reader, writer = await asyncio.open_connection(host, port)
            results.append(await pipe_stream_and_socket(request.accept(), reader, writer))

        try:
            async with HboneTestServer(store.server_context(SERVER), forward) as server, \
                    pool_for(store) as pool:
                async def outbound(reader: asyncio.StreamReader,
                                   writer: asyncio.StreamWriter) -> None:
                    stream = await open_on(pool, server,
                                           authority=f"127.0.0.1:{backend_port}")
                    results.append(await pipe_stream_and_socket(stream, reader, writer))

                front, front_port = await _tcp_backend(outbound)
                try:
                    reader, writer = await asyncio.open_connection(LOOPBACK, front_port)
                    writer.write(b"hello hbone")
                    writer.write_eof()
                    assert await reader.read() == b"HELLO HBONE"
                    writer.close()
                    await wait_until(lambda: len(results) == 2)
                finally:
                    front.close()
        finally:
            backend.close()
        for result in results:
            assert result.outcome == "closed"
            assert tuple(result) == (11, 11)

    run(main(), loop=loop)


@LOOPS
def test_backend_reset_becomes_stream_reset(store: IdentityStore, loop: str) -> None:
    async def main() -> None:
        async def backend_rst(reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
            await reader.read(5)
            abort_with_rst(writer)

        backend, backend_port = await _tcp_backend(backend_rst)
        outcomes: list[str] = []

        async def forward(request: HboneServerRequest) -> None:
            reader, writer = await asyncio.open_connection(LOOPBACK, backend_port)
            outcomes.append((await pipe_stream_and_socket(request.accept(), reader,
                                                          writer)).outcome)

        try:
            async with HboneTestServer(store.server_context(SERVER), forward) as server, \
                    pool_for(store) as pool:
                stream = await open_on(pool, server)
                await stream.write(b"12345")
                with pytest.raises(HboneStreamReset) as info:
                    await read_all(stream)
                assert info.value.error_code == errors.CONNECT_ERROR
                await wait_until(lambda: outcomes == ["socket_reset"])
        finally:
            backend.close()

    run(main(), loop=loop)


@LOOPS
def test_stream_reset_becomes_tcp_rst(store: IdentityStore, loop: str) -> None:
    async def main() -> None:
        seen: list[BaseException | bytes] = []
        backend_done = asyncio.Event()

        async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                seen.append(await reader.read())
            except ConnectionResetError as exc:
                seen.append(exc)
            finally:
                backend_done.set()
                writer.close()

        backend_server, backend_port = await _tcp_backend(backend)

        async def forward(request: HboneServerRequest) -> None:
            reader, writer = await asyncio.open_connection(LOOPBACK, backend_port)
            await pipe_stream_and_socket(request.accept(), reader, writer)

        try:
            async with HboneTestServer(store.server_context(SERVER), forward) as server, \
                    pool_for(store) as pool:
                stream = await open_on(pool, server)
                await stream.write(b"partial")
                await asyncio.sleep(0.1)
                stream.abort(errors.CANCEL)
                await asyncio.wait_for(backend_done.wait(), 5)
        finally:
            backend_server.close()
        # The backend saw a reset, not a clean FIN (b"" / only the bytes).
        assert isinstance(seen[-1], ConnectionResetError)

    run(main(), loop=loop)


def test_rotation_keeps_existing_connections(store: IdentityStore, tmp_path: Path) -> None:
    clock = [time.time()]
    rotating = IdentityStore(store.ca, ttl_seconds=3600, clock=lambda: clock[0])

    async def main() -> None:
        async with HboneTestServer(store.server_context(SERVER), echo_handler) as server, \
                pool_for(rotating) as pool:
            first = await open_on(pool, server)
            old_serial = rotating.get(CLIENT).serial
            clock[0] += 3000
            assert rotating.rotate_due() == [CLIENT]
            assert rotating.get(CLIENT).serial != old_serial
            await first.write(b"still works")
            await first.close_write()
            assert await read_all(first) == b"still works"

    run(main())


def test_connection_loss_fails_streams(store: IdentityStore) -> None:
    async def main() -> None:
        async with HboneTestServer(store.server_context(SERVER), hold_handler) as server, \
                pool_for(store) as pool:
            stream = await open_on(pool, server)
            await pool.connections()[0].close()
            with pytest.raises(HboneConnectionLost):
                await stream.read()
            with pytest.raises(HboneConnectionLost):
                await stream.write(b"x")

    run(main())
