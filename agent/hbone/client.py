"""An outbound HBONE connection (TLS + HTTP/2) multiplexing CONNECT streams."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Sequence

from agent.hbone.config import HboneSettings
from agent.hbone.connection import HboneClientConnection
from agent.hbone.errors import CANCEL
from agent.hbone.events import HboneEvent, StreamAccepted, StreamRejected
from agent.hbone.exceptions import (
    ConnectionClosedError,
    HboneConnectionLost,
    HboneError,
    HboneRejected,
    HboneStreamError,
    HboneStreamReset,
)
from agent.hbone.session import (
    READ_CHUNK,
    HboneSession,
    check_alpn,
    peer_identity_of,
)
from agent.hbone.stream import HboneStream
from agent.identity.spiffe import SpiffeId
from agent.identity.verify import PeerRole

SocketFactory = Callable[[int], socket.socket]
"""Makes the (unconnected) TCP socket for an outbound connection, given the address
family, so the caller can set SO_MARK, IP_TRANSPARENT, bind a source address, etc."""


class HboneClient(HboneSession):
    """An outbound HBONE connection (TLS + HTTP/2) multiplexing CONNECT streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 core: HboneClientConnection, peer_identity: SpiffeId | None,
                 max_streams: int) -> None:
        super().__init__(reader, writer, core, peer_identity)
        self.max_streams = max_streams
        self._pending: dict[int, asyncio.Future[None]] = {}

    @classmethod
    async def connect(cls, peer: tuple[str, int], ssl_context: ssl.SSLContext, *,
                      settings: HboneSettings | None = None,
                      max_streams: int | None = None,
                      socket_factory: SocketFactory | None = None,
                      local_addr: tuple[str, int] | None = None,
                      sock: socket.socket | None = None,
                      connect_timeout: float = 5.0,
                      trust_domain: str | None = None,
                      expected_peer: SpiffeId | None = None,
                      keepalive_interval: float | None = None,
                      keepalive_timeout: float = 10.0) -> HboneClient:
        """Open TCP (+ TLS 1.3, ALPN h2) to ``peer`` and start HTTP/2.

        ``sock``: an already connected socket to use as is; otherwise ``socket_factory``
        (given the address family) makes the socket, which is bound to ``local_addr`` if
        given, then connected. The peer's SPIFFE ID is checked against ``trust_domain``
        and ``expected_peer``; a mismatch closes the connection and raises
        :class:`HbonePeerIdentityError`. Raises TimeoutError after ``connect_timeout``.
        Side effects: opens a socket; starts read (and keepalive) tasks.
        """
        settings = settings or HboneSettings()
        loop = asyncio.get_running_loop()
        host, port = peer
        deadline = loop.time() + connect_timeout
        if sock is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket_factory(family) if socket_factory else socket.socket(
                family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                if local_addr is not None:
                    sock.bind(local_addr)
                await asyncio.wait_for(loop.sock_connect(sock, (host, port)),
                                       connect_timeout)
            except BaseException:
                sock.close()
                raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        remaining = max(0.001, deadline - loop.time())
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(sock=sock, ssl=ssl_context, server_hostname=host,
                                        ssl_handshake_timeout=remaining, limit=READ_CHUNK),
                remaining)
        except BaseException:
            sock.close()
            raise
        try:
            check_alpn(writer)
            identity = peer_identity_of(writer, PeerRole.SERVER, trust_domain=trust_domain,
                                        expected=expected_peer)
        except BaseException:
            writer.close()
            raise
        client = cls(reader, writer, HboneClientConnection(settings), identity,
                     max_streams or settings.max_concurrent_streams)
        client.start(keepalive_interval, keepalive_timeout)
        return client

    @property
    def available_streams(self) -> int:
        """How many more streams may be opened on this connection right now."""
        if not self.is_usable:
            return 0
        return self.core.available_stream_slots(limit=self.max_streams)

    async def open_stream(self, authority: str, forwarded_for: str | None = None,
                          baggage: str | None = None,
                          extra_headers: Sequence[tuple[str, str]] = (),
                          timeout: float | None = None) -> HboneStream:
        """CONNECT to ``authority`` (``ip:port``) and wait for 200.

        Raises HboneRejected(status), HboneStreamReset, HboneConnectionLost, TimeoutError.
        """
        pending = self.begin_stream(authority, forwarded_for, baggage, extra_headers)
        return await pending.established(timeout)

    def begin_stream(self, authority: str, forwarded_for: str | None = None,
                     baggage: str | None = None,
                     extra_headers: Sequence[tuple[str, str]] = ()) -> PendingStream:
        """Send the CONNECT now (synchronously taking a stream slot); await the answer
        with :meth:`PendingStream.established`. Lets a pool pick a connection and take
        its slot with no await in between. Side effects: queues the request frames.
        """
        if not self.is_usable:
            raise HboneConnectionLost(self.close_reason or "connection not usable")
        try:
            stream_id = self.core.open_stream(authority, forwarded_for, baggage, extra_headers)
        except ConnectionClosedError as exc:
            raise HboneConnectionLost(str(exc)) from exc
        except HboneError as exc:
            raise HboneStreamError(str(exc)) from exc
        stream = HboneStream(self, stream_id, authority)
        self._streams[stream_id] = stream
        response: asyncio.Future[None] = self._loop.create_future()
        self._pending[stream_id] = response
        self.flush()
        self.idle_since = self._loop.time()
        return PendingStream(self, stream, response)

    def forget_pending(self, stream_id: int) -> None:
        """Stop waiting for the answer to ``stream_id``'s CONNECT."""
        self._pending.pop(stream_id, None)

    def _dispatch_role_event(self, event: HboneEvent) -> None:
        if isinstance(event, StreamAccepted):
            waiter = self._pending.get(event.stream_id)
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.headers = event.headers
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif isinstance(event, StreamRejected):
            stream = self._streams.get(event.stream_id)
            error = HboneRejected(event.status)
            if stream is not None:
                stream.fail(error)
            waiter = self._pending.get(event.stream_id)
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)

    def stream_finished(self, stream_id: int) -> None:
        waiter = self._pending.get(stream_id)
        stream = self._streams.get(stream_id)
        if waiter is not None and not waiter.done():
            error = stream.error if stream is not None and stream.error else \
                HboneStreamReset(CANCEL)
            waiter.set_exception(error)
        super().stream_finished(stream_id)

    def _on_lost(self) -> None:
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(HboneConnectionLost(self.close_reason or "lost"))


class PendingStream:
    """A CONNECT sent on an :class:`HboneClient`, not yet answered."""

    def __init__(self, client: HboneClient, stream: HboneStream,
                 response: asyncio.Future[None]) -> None:
        self._client = client
        self.stream = stream
        self._response = response

    async def established(self, timeout: float | None = None) -> HboneStream:
        """Wait for the 200; on timeout or cancellation the stream is reset."""
        try:
            await asyncio.wait_for(asyncio.shield(self._response), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self._client.forget_pending(self.stream.stream_id)
            if not self._response.done():
                self._response.cancel()
            self.stream.abort(CANCEL)
            raise
        finally:
            self._client.forget_pending(self.stream.stream_id)
        return self.stream
