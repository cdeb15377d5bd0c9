"""Asyncio shell around the sans-IO HBONE core (:mod:`agent.tunnel.hbone`).

What lives here: moving bytes between an asyncio TLS connection and the protocol core,
turning core events into awaitable stream objects, and the TCP <-> HBONE relay.

* :class:`HboneClient` - one outbound mTLS HTTP/2 connection multiplexing CONNECT streams
  (:meth:`HboneClient.connect`, :meth:`HboneClient.open_stream`).
* :func:`serve_hbone` - serve one accepted inbound connection; each CONNECT becomes an
  :class:`HboneServerRequest` handed to the caller's ``on_stream`` coroutine.
* :class:`HboneStream` - a tunnelled byte stream: ``read()`` / ``write()`` with
  flow-control back-pressure, ``close_write()`` (END_STREAM), ``abort()`` (RST_STREAM).
* :func:`pipe_stream_and_socket` - the bidirectional copy with TCP FIN <-> END_STREAM
  and TCP RST <-> RST_STREAM mapping.

Works on plain asyncio and on uvloop (the tunnel process chooses the loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog

from agent.identity.spiffe import SpiffeId
from agent.identity.verify import PeerRole, PeerVerificationError, verify_tls_peer
from agent.tunnel import hbone

log = structlog.get_logger(__name__)

READ_CHUNK = 256 * 1024
PIPE_CHUNK = 256 * 1024
# How long close() waits for TLS close_notify to go out before giving up on the peer.
CLOSE_TIMEOUT = 1.0

SocketFactory = Callable[[int], socket.socket]
"""Makes the (unconnected) TCP socket for an outbound connection, given the address
family, so the caller can set SO_MARK, IP_TRANSPARENT, bind a source address, etc."""


class HboneStreamError(ConnectionError):
    """An HBONE stream failed; subclasses say how."""


class HboneStreamReset(HboneStreamError):
    """The stream was reset (RST_STREAM) by the peer or by us."""

    def __init__(self, error_code: int, message: str = "") -> None:
        super().__init__(message or f"HBONE stream reset (error code {error_code})")
        self.error_code = error_code


class HboneConnectionLost(HboneStreamError):
    """The HBONE connection carrying the stream is gone."""


class HboneRejected(HboneStreamError):
    """The peer answered CONNECT with a non-200 status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HBONE CONNECT rejected with HTTP status {status}")
        self.status = status


class HbonePeerIdentityError(HboneStreamError):
    """The peer's certificate does not carry the SPIFFE identity we require."""


def _peer_identity_of(writer: asyncio.StreamWriter, role: PeerRole, *,
                      trust_domain: str | None,
                      expected: SpiffeId | None = None) -> SpiffeId | None:
    """The verified peer SPIFFE ID of a TLS connection; None for plaintext (tests only).

    Checks in :func:`agent.identity.verify.verify_tls_peer` (leaf profile, one SPIFFE
    URI SAN, trust domain, expected identity).
    """
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    try:
        return verify_tls_peer(ssl_object, role=role, trust_domain=trust_domain,
                               expected=expected)
    except PeerVerificationError as exc:
        raise HbonePeerIdentityError(str(exc)) from exc


def _check_alpn(writer: asyncio.StreamWriter) -> None:
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
        raise HboneConnectionLost(
            f"peer did not negotiate ALPN h2 (got {ssl_object.selected_alpn_protocol()!r})")


class HboneStream:
    """One tunnelled byte stream (a CONNECT stream after 200).

    ``read()`` returns b"" at END_STREAM and raises :class:`HboneStreamReset` /
    :class:`HboneConnectionLost` on failure. ``write()`` waits for flow-control window,
    so a slow peer slows the writer (back-pressure) instead of growing buffers.
    """

    def __init__(self, connection: _HboneConnectionIO, stream_id: int, authority: str,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        self._connection = connection
        self.stream_id = stream_id
        self.authority = authority
        self.headers = headers
        self._chunks: deque[bytes] = deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._remote_ended = False
        self._local_ended = False
        self._error: HboneStreamError | None = None
        self._finished = False

    # ---- public ----------------------------------------------------------------------

    @property
    def peer_identity(self) -> SpiffeId | None:
        """The verified SPIFFE ID of the node at the other end of the connection."""
        return self._connection.peer_identity

    @property
    def error(self) -> HboneStreamError | None:
        """Why the stream failed, if it did."""
        return self._error

    @property
    def is_finished(self) -> bool:
        return self._finished

    async def read(self, max_bytes: int = PIPE_CHUNK) -> bytes:
        """Up to ``max_bytes`` of payload; b"" once the peer half-closed (END_STREAM)."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._remote_ended:
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunk = self._chunks.popleft()
        if len(chunk) > max_bytes:
            self._chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        # Only now that the application has the bytes do we reopen the peer's window.
        self._connection._acknowledge(self.stream_id, len(chunk))
        return chunk

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``, waiting for window and for the transport to drain."""
        view = memoryview(data)
        core = self._connection.core
        while view:
            self._raise_if_unwritable()
            self._writable.clear()
            try:
                sent = core.send_data(self.stream_id, view)
            except hbone.ConnectionClosedError as exc:
                raise HboneConnectionLost(str(exc)) from exc
            except hbone.HboneError as exc:
                raise self._error or HboneStreamReset(hbone.CANCEL, str(exc)) from exc
            if sent:
                view = view[sent:]
                self._connection._flush()
                await self._connection._drain()
            else:
                await self._writable.wait()

    async def close_write(self) -> None:
        """Half-close: send END_STREAM (the tunnelled connection's FIN). Idempotent."""
        if self._local_ended:
            return
        self._raise_if_unwritable()
        try:
            self._connection.core.end_stream(self.stream_id)
        except hbone.HboneError as exc:
            raise self._error or HboneStreamReset(hbone.CANCEL, str(exc)) from exc
        self._local_ended = True
        self._connection._flush()
        self._maybe_finished()
        await self._connection._drain()

    def abort(self, error_code: int = hbone.CANCEL) -> None:
        """Reset the stream (RST_STREAM with ``error_code``). Idempotent, never raises."""
        if self._finished:
            return
        self._connection.core.reset_stream(self.stream_id, error_code)
        self._connection._flush()
        self._fail(HboneStreamReset(error_code, f"stream reset by us ({error_code})"))

    # ---- driven by the connection ---------------------------------------------------------

    def _raise_if_unwritable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._local_ended:
            raise HboneStreamError("stream already half-closed for writing")

    def _feed_data(self, data: bytes) -> None:
        if self._error is not None:
            self._connection._acknowledge(self.stream_id, len(data))
            return
        self._chunks.append(data)
        self._readable.set()

    def _feed_eof(self) -> None:
        self._remote_ended = True
        self._readable.set()
        self._maybe_finished()

    def _window_opened(self) -> None:
        self._writable.set()

    def _fail(self, error: HboneStreamError) -> None:
        if self._error is None and not self._finished:
            self._error = error
        # Unread bytes will never be consumed: return them to the connection window.
        unread = sum(len(c) for c in self._chunks)
        self._chunks.clear()
        if unread:
            self._connection._acknowledge(self.stream_id, unread)
        self._readable.set()
        self._writable.set()
        self._set_finished()

    def _maybe_finished(self) -> None:
        if self._local_ended and self._remote_ended:
            self._set_finished()

    def _set_finished(self) -> None:
        if not self._finished:
            self._finished = True
            self._connection._stream_finished(self.stream_id)


class _HboneConnectionIO:
    """Shared machinery: the read loop, event dispatch, flushing, keepalive, close."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 core: hbone.HboneConnection, peer_identity: SpiffeId | None) -> None:
        self._reader = reader
        self._writer = writer
        self.core = core
        self.peer_identity = peer_identity
        self._streams: dict[int, HboneStream] = {}
        self._closed = asyncio.Event()
        self._close_reason: str | None = None
        self._ping_waiters: dict[bytes, asyncio.Future[None]] = {}
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.idle_since: float = loop.time()
        self._read_task: asyncio.Task[None] | None = None
        self._keepalive_task: asyncio.Task[None] | None = None
        self._closing_task: asyncio.Task[None] | None = None

    # ---- state ----------------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self._closed.is_set()

    @property
    def close_reason(self) -> str | None:
        return self._close_reason

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def is_usable(self) -> bool:
        return not self.is_closed and self.core.is_usable

    def local_address(self) -> Any:
        return self._writer.get_extra_info("sockname")

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # ---- lifecycle --------------------------------------------------------------------

    def _start(self, keepalive_interval: float | None, keepalive_timeout: float) -> None:
        """Side effects: writes the HTTP/2 preface/SETTINGS and starts background tasks."""
        self._flush()
        self._read_task = asyncio.ensure_future(self._read_loop())
        if keepalive_interval:
            self._keepalive_task = asyncio.ensure_future(
                self._keepalive(keepalive_interval, keepalive_timeout))

    async def close(self, error_code: int = hbone.NO_ERROR, reason: str = "closed") -> None:
        """Send GOAWAY, fail every stream, and close the transport. Idempotent."""
        if not self.is_closed:
            self.core.close(error_code, reason)
            self._flush()
            self._connection_lost(reason)
        current = asyncio.current_task()
        for task in (self._read_task, self._keepalive_task):
            if task is not None and task is not current and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), CLOSE_TIMEOUT)

    def _connection_lost(self, reason: str) -> None:
        if self.is_closed:
            return
        self._close_reason = reason
        self._closed.set()
        for stream in list(self._streams.values()):
            stream._fail(HboneConnectionLost(f"HBONE connection lost: {reason}"))
        self._streams.clear()
        for waiter in self._ping_waiters.values():
            if not waiter.done():
                waiter.set_exception(HboneConnectionLost(reason))
        self._ping_waiters.clear()
        self._on_lost()
        if not self._writer.is_closing():
            self._writer.close()

    def _on_lost(self) -> None:
        """Hook for subclasses (fail pending opens)."""

    async def _read_loop(self) -> None:
        reason = "peer closed the connection"
        try:
            while not self.is_closed:
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    break
                for event in self.core.receive_data(data):
                    self._dispatch(event)
                self._flush()
                if self.core.terminated is not None:
                    reason = self.core.terminated.reason
                    break
                if not self.core.is_usable and not self._streams:
                    reason = "peer sent GOAWAY and all streams finished"
                    break
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        except asyncio.CancelledError:
            reason = "cancelled"
            raise
        finally:
            self._connection_lost(reason)

    def _flush(self) -> None:
        data = self.core.data_to_send()
        if data and not self._writer.is_closing():
            self._writer.write(data)

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._connection_lost(f"{type(exc).__name__}: {exc}")
            raise HboneConnectionLost(str(exc)) from exc

    def _acknowledge(self, stream_id: int, size: int) -> None:
        if not self.is_closed:
            self.core.acknowledge_received(stream_id, size)
            self._flush()

    def _stream_finished(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
        if not self._streams:
            self.idle_since = self._loop.time()
            if not self.core.is_usable and not self.is_closed:
                # Peer is going away (or we are draining) and the last stream is done.
                self._closing_task = asyncio.ensure_future(self.close())

    # ---- events -------------------------------------------------------------------------

    def _dispatch(self, event: hbone.HboneEvent) -> None:
        if isinstance(event, hbone.DataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is None:
                self.core.acknowledge_received(event.stream_id, len(event.data))
            else:
                stream._feed_data(event.data)
        elif isinstance(event, hbone.StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._feed_eof()
        elif isinstance(event, hbone.StreamReset):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._fail(HboneStreamReset(event.error_code))
        elif isinstance(event, hbone.WindowOpened):
            targets = (self._streams.values() if event.stream_id is None
                       else [s for s in [self._streams.get(event.stream_id)] if s])
            for stream in list(targets):
                stream._window_opened()
        elif isinstance(event, hbone.PingAcked):
            waiter = self._ping_waiters.pop(event.payload, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif isinstance(event, hbone.ConnectionTerminated):
            log.debug("hbone connection terminated", error_code=event.error_code,
                      reason=event.reason, local=event.local)
        elif isinstance(event, hbone.GoingAway):
            log.debug("hbone peer going away", last_stream_id=event.last_stream_id)
        else:
            self._dispatch_role_event(event)

    def _dispatch_role_event(self, event: hbone.HboneEvent) -> None:
        raise NotImplementedError

    # ---- keepalive ------------------------------------------------------------------------

    async def ping(self, timeout: float = 10.0) -> float:
        """Send a PING and wait for its ACK; returns the round-trip time in seconds."""
        try:
            payload = self.core.ping()
        except hbone.HboneError as exc:
            raise HboneConnectionLost(str(exc)) from exc
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._ping_waiters[payload] = waiter
        started = self._loop.time()
        self._flush()
        try:
            await asyncio.wait_for(waiter, timeout)
        finally:
            self._ping_waiters.pop(payload, None)
        return self._loop.time() - started

    async def _keepalive(self, interval: float, timeout: float) -> None:
        while not self.is_closed:
            await asyncio.sleep(interval)
            try:
                await self.ping(timeout)
            except (asyncio.TimeoutError, HboneConnectionLost):
                if not self.is_closed:
                    log.info("hbone keepalive failed; closing connection")
                    self.core.close(hbone.NO_ERROR, "keepalive timeout")
                    self._flush()
                    self._connection_lost("keepalive timeout")
                return


class HboneClient(_HboneConnectionIO):
    """An outbound HBONE connection (TLS + HTTP/2) multiplexing CONNECT streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 core: hbone.HboneClientConnection, peer_identity: SpiffeId | None,
                 max_streams: int) -> None:
        super().__init__(reader, writer, core, peer_identity)
        self.max_streams = max_streams
        self._pending: dict[int, asyncio.Future[None]] = {}

    @classmethod
    async def connect(cls, peer: tuple[str, int], ssl_context: ssl.SSLContext, *,
                      settings: hbone.HboneSettings | None = None,
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
        settings = settings or hbone.HboneSettings()
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
            _check_alpn(writer)
            identity = _peer_identity_of(writer, PeerRole.SERVER, trust_domain=trust_domain,
                                         expected=expected_peer)
        except BaseException:
            writer.close()
            raise
        client = cls(reader, writer, hbone.HboneClientConnection(settings), identity,
                     max_streams or settings.max_concurrent_streams)
        client._start(keepalive_interval, keepalive_timeout)
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
        except hbone.ConnectionClosedError as exc:
            raise HboneConnectionLost(str(exc)) from exc
        except hbone.HboneError as exc:
            raise HboneStreamError(str(exc)) from exc
        stream = HboneStream(self, stream_id, authority)
        self._streams[stream_id] = stream
        response: asyncio.Future[None] = self._loop.create_future()
        self._pending[stream_id] = response
        self._flush()
        self.idle_since = self._loop.time()
        return PendingStream(self, stream, response)

    def _dispatch_role_event(self, event: hbone.HboneEvent) -> None:
        if isinstance(event, hbone.StreamAccepted):
            waiter = self._pending.get(event.stream_id)
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.headers = event.headers
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif isinstance(event, hbone.StreamRejected):
            stream = self._streams.get(event.stream_id)
            error = HboneRejected(event.status)
            if stream is not None:
                stream._fail(error)
            waiter = self._pending.get(event.stream_id)
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)

    def _stream_finished(self, stream_id: int) -> None:
        waiter = self._pending.get(stream_id)
        stream = self._streams.get(stream_id)
        if waiter is not None and not waiter.done():
            error = stream.error if stream is not None and stream.error else \
                HboneStreamReset(hbone.CANCEL)
            waiter.set_exception(error)
        super()._stream_finished(stream_id)

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
            self._client._pending.pop(self.stream.stream_id, None)
            if not self._response.done():
                self._response.cancel()
            self.stream.abort(hbone.CANCEL)
            raise
        finally:
            self._client._pending.pop(self.stream.stream_id, None)
        return self.stream


class HboneServerRequest:
    """An inbound CONNECT awaiting the caller's decision: ``accept()`` or ``reject()``.

    Both are synchronous (they only queue frames). If the ``on_stream`` handler returns
    without deciding, the request is rejected with 503.
    """

    def __init__(self, connection: _HboneServerSession, event: hbone.StreamRequest) -> None:
        self._connection = connection
        self.stream_id = event.stream_id
        self.authority = event.authority
        self.headers = event.headers
        self.stream = HboneStream(connection, event.stream_id, event.authority, event.headers)
        self.decided = False
        self.status: int | None = None

    @property
    def peer_identity(self) -> SpiffeId | None:
        """The verified SPIFFE ID of the calling node's workload (from its client cert)."""
        return self._connection.peer_identity

    @property
    def destination(self) -> tuple[str, int]:
        """``:authority`` parsed into (ip, port)."""
        return hbone.parse_authority(self.authority)

    @property
    def forwarded_for(self) -> str | None:
        """The original source IP from the ``Forwarded`` header, if present."""
        return hbone.parse_forwarded_for(hbone.header_value(self.headers,
                                                            hbone.FORWARDED_HEADER))

    @property
    def baggage(self) -> dict[str, str]:
        return hbone.parse_baggage(hbone.header_value(self.headers, hbone.BAGGAGE_HEADER))

    def header(self, name: str) -> str | None:
        return hbone.header_value(self.headers, name)

    def accept(self) -> HboneStream:
        """Answer 200 and return the tunnel stream."""
        self._decide(200)
        if self.stream.error is not None:
            raise self.stream.error
        try:
            self._connection.core.accept_stream(self.stream_id)
        except hbone.HboneError as exc:
            raise HboneStreamReset(hbone.CANCEL, f"cannot accept: {exc}") from exc
        self._connection._flush()
        return self.stream

    def reject(self, status: int) -> None:
        """Answer ``status`` (4xx/5xx) and end the stream. Never raises for a dead stream."""
        self._decide(status)
        with contextlib.suppress(hbone.HboneError):
            self._connection.core.reject_stream(self.stream_id, status)
        self._connection._flush()
        self.stream._fail(HboneRejected(status))

    def _decide(self, status: int) -> None:
        if self.decided:
            raise RuntimeError(f"request {self.stream_id} was already answered {self.status}")
        self.decided = True
        self.status = status


class _HboneServerSession(_HboneConnectionIO):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 core: hbone.HboneServerConnection, peer_identity: SpiffeId | None,
                 on_stream: Callable[[HboneServerRequest], Awaitable[None]]) -> None:
        super().__init__(reader, writer, core, peer_identity)
        self._on_stream = on_stream
        self.handlers: set[asyncio.Task[None]] = set()

    def _dispatch_role_event(self, event: hbone.HboneEvent) -> None:
        if isinstance(event, hbone.StreamRequest):
            request = HboneServerRequest(self, event)
            self._streams[event.stream_id] = request.stream
            task = asyncio.ensure_future(self._run_handler(request))
            self.handlers.add(task)
            task.add_done_callback(self.handlers.discard)
        elif isinstance(event, hbone.RequestRefused):
            log.info("hbone request refused", stream_id=event.stream_id,
                     status=event.status, reason=event.reason)

    async def _run_handler(self, request: HboneServerRequest) -> None:
        failed = False
        try:
            await self._on_stream(request)
        except asyncio.CancelledError:
            failed = True
            raise
        except HboneStreamError as exc:
            # Resets and lost connections are ordinary network events, not bugs.
            failed = True
            log.debug("hbone stream ended with error", authority=request.authority,
                      error=str(exc))
        except Exception:
            failed = True
            log.exception("hbone on_stream handler failed", authority=request.authority)
        finally:
            if not request.decided:
                request.reject(503)
            elif request.status == 200 and not request.stream.is_finished:
                # The handler is done with the stream; do not leave it dangling.
                request.stream.abort(hbone.CANCEL if failed else hbone.NO_ERROR)


async def serve_hbone(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                      on_stream: Callable[[HboneServerRequest], Awaitable[None]],
                      trust_domain: str | None = None,
                      settings: hbone.HboneSettings | None = None,
                      keepalive_interval: float | None = None,
                      keepalive_timeout: float = 10.0,
                      handler_grace: float = 5.0) -> None:
    """Serve one accepted HBONE connection until it closes.

    Use as (part of) an ``asyncio.start_server`` callback on a TLS listener whose context
    requires client certificates (:meth:`IdentityStore.server_context`); the client's
    certificate must be a mesh identity in ``trust_domain`` (None: any, tests only), or
    the connection is closed before HTTP/2 starts. Each valid
    CONNECT runs ``on_stream(request)`` in its own task. When the connection ends,
    handlers get ``handler_grace`` seconds to finish, then are cancelled.
    Side effects: reads/writes ``writer``'s transport and closes it at the end.
    """
    try:
        _check_alpn(writer)
        identity = _peer_identity_of(writer, PeerRole.CLIENT, trust_domain=trust_domain)
    except HboneStreamError as exc:
        log.warning("hbone connection refused", error=str(exc))
        writer.close()
        return
    session = _HboneServerSession(reader, writer, hbone.HboneServerConnection(settings),
                                  identity, on_stream)
    session._start(keepalive_interval, keepalive_timeout)
    try:
        await session.wait_closed()
    finally:
        await session.close()
        if session.handlers:
            _, pending = await asyncio.wait(set(session.handlers), timeout=handler_grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=handler_grace)


# ----------------------------------------------------------------------------------------
# TCP <-> HBONE relay
# ----------------------------------------------------------------------------------------


class PipeResult(tuple):
    """``(bytes_up, bytes_down)`` plus ``outcome``: "closed", "stream_reset" or
    "socket_reset". ``up`` is socket -> stream, ``down`` is stream -> socket."""

    outcome: str

    def __new__(cls, bytes_up: int, bytes_down: int, outcome: str) -> PipeResult:
        result = super().__new__(cls, (bytes_up, bytes_down))
        result.outcome = outcome
        return result

    @property
    def bytes_up(self) -> int:
        return int(self[0])

    @property
    def bytes_down(self) -> int:
        return int(self[1])


def abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Close a TCP connection with RST instead of FIN (SO_LINGER 0, then abort).

    Side effects: sets SO_LINGER on the socket and aborts the transport.
    """
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _SocketFailed(Exception):
    pass


class _StreamFailed(Exception):
    pass


async def pipe_stream_and_socket(stream: HboneStream, reader: asyncio.StreamReader,
                                 writer: asyncio.StreamWriter, *,
                                 chunk_size: int = PIPE_CHUNK,
                                 counts: list[int] | None = None) -> PipeResult:
    """Copy bytes both ways between ``stream`` and a TCP connection until both are done.

    FIN from the socket becomes END_STREAM and END_STREAM becomes a FIN (write_eof);
    a socket error/RST resets the stream (CONNECT_ERROR, RFC 9113 8.5) and a stream
    reset or lost HBONE connection aborts the socket with RST. Never raises for those;
    returns the byte counts and the outcome. Side effects: closes ``writer`` at the end.
    ``counts`` (``[up, down]``), when given, is updated as bytes flow, so a caller
    whose task is cancelled (e.g. a policy change closing the connection) still
    knows what was copied.
    """
    if counts is None:
        counts = [0, 0]

    async def socket_to_stream() -> None:
        while True:
            try:
                data = await reader.read(chunk_size)
            except (ConnectionError, OSError) as exc:
                raise _SocketFailed(str(exc)) from exc
            try:
                if not data:
                    await stream.close_write()
                    return
                await stream.write(data)
            except HboneStreamError as exc:
                raise _StreamFailed(str(exc)) from exc
            counts[0] += len(data)

    async def stream_to_socket() -> None:
        while True:
            try:
                data = await stream.read(chunk_size)
            except HboneStreamError as exc:
                raise _StreamFailed(str(exc)) from exc
            try:
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
            except (ConnectionError, OSError) as exc:
                raise _SocketFailed(str(exc)) from exc
            counts[1] += len(data)

    tasks = [asyncio.ensure_future(socket_to_stream()),
             asyncio.ensure_future(stream_to_socket())]
    outcome = "closed"
    try:
        for finished in asyncio.as_completed(tasks):
            try:
                await finished
            except _SocketFailed:
                outcome = "socket_reset"
                stream.abort(hbone.CONNECT_ERROR)
                abort_with_rst(writer)
                break
            except _StreamFailed:
                outcome = "stream_reset"
                abort_with_rst(writer)
                stream.abort(hbone.CANCEL)
                break
    except asyncio.CancelledError:
        # The caller gave up on this connection: tear both sides down hard.
        outcome = "cancelled"
        stream.abort(hbone.CANCEL)
        abort_with_rst(writer)
        raise
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if outcome == "closed":
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
    return PipeResult(counts[0], counts[1], outcome)
