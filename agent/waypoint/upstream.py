"""Upstream side of the waypoint: HBONE to the chosen endpoint, then HTTP on the stream.

HTTP/1.1 upstream connections (h11 over one CONNECT stream each) are kept idle per
endpoint and reused (keep-alive), at most ``MAX_IDLE_PER_ENDPOINT`` each; the TLS
connections under them are the :class:`agent.hbone.pool.HbonePool`'s. HTTP/2 requests
share h2c connections (one CONNECT stream each) per endpoint, up to 100 requests on
one (:class:`H2Connections`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h11

from agent.hbone.stream import HboneStream

MAX_IDLE_PER_ENDPOINT = 64
READ_SIZE = 64 * 1024

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                        "transfer-encoding", "upgrade", "http2-settings"})


class UpstreamProtocolError(Exception):
    """The upstream spoke broken HTTP (answered 502 UR... as Envoy does: 503 UC/502)."""


@dataclass
class UpstreamResponse:
    status: int
    headers: list[tuple[str, str]]
    body: AsyncIterator[bytes]
    trailers: list[tuple[str, str]] = field(default_factory=list)
    # HTTP/1.1 upgrade (101): the raw stream and bytes already read past the head.
    upgraded: HboneStream | None = None
    leftover: bytes = b""
    release: Callable[[bool], None] = lambda reuse: None
    # Set once the body iterator has dealt with its stream (pooled or closed it).
    finished: bool = False
    # For a response whose body is never read (a retried 503, a client gone): closes
    # the upstream stream and returns the request budget. No-op once ``finished``.
    discard_hook: Callable[[], None] = lambda: None
    # The whole body arrived with the head: iterating ``body`` waits on no I/O, so the
    # downstream can send head, body and end in one write (one TLS record).
    complete: bool = False

    def discard(self) -> None:
        if not self.finished:
            self.finished = True
            self.discard_hook()

    async def close_body(self) -> None:
        """Finish with the body however far it was read (idempotent)."""
        aclose = getattr(self.body, "aclose", None)
        if aclose is not None:
            await aclose()
        self.discard()


class Http1Upstream:
    """One HTTP/1.1 connection to an endpoint, over one HBONE stream."""

    def __init__(self, stream: HboneStream, key: tuple[str, int]) -> None:
        self.stream = stream
        self.key = key
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)

    @property
    def reusable(self) -> bool:
        return (self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE
                and self.stream.error is None and not self.stream.is_finished)

    async def _next(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamProtocolError(str(exc)) from exc
            if event is h11.NEED_DATA:
                data = await self.stream.read(READ_SIZE)
                try:
                    self.conn.receive_data(data)
                except h11.RemoteProtocolError as exc:
                    raise UpstreamProtocolError(str(exc)) from exc
                continue
            return event  # type: ignore[return-value]

    async def request(self, method: str, target: str, headers: Sequence[tuple[str, str]],
                      body: bytes, upgrade: bool,
                      rest: AsyncIterator[bytes] | None = None) -> UpstreamResponse:
        """Send a request, ``body`` then ``rest`` as it comes (the caller's ``headers``
        frame it); return when the response head arrived. Exceptions of ``rest``
        propagate (the connection is then unusable)."""
        out = self.conn.send(h11.Request(method=method, target=target, headers=list(headers)))
        if not upgrade:
            if body:
                out += self.conn.send(h11.Data(data=body))
            if rest is None:
                out += self.conn.send(h11.EndOfMessage())
        await self.stream.write(out)
        if rest is not None and not upgrade:
            async for chunk in rest:
                await self.stream.write(self.conn.send(h11.Data(data=chunk)) or b"")
            await self.stream.write(self.conn.send(h11.EndOfMessage()) or b"")
        while True:
            event = await self._next()
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101 and upgrade:
                    leftover, _ = self.conn.trailing_data
                    return UpstreamResponse(101, _decode(event.headers), _empty(),
                                            upgraded=self.stream, leftover=bytes(leftover))
                continue  # 100 Continue and friends: not forwarded
            if isinstance(event, h11.Response):
                ready, complete = self._ready_body()
                return UpstreamResponse(event.status_code, _decode(event.headers),
                                        self._body(ready, complete), complete=complete)
            if event is h11.PAUSED:
                raise UpstreamProtocolError("upstream switched protocols unasked")
            raise UpstreamProtocolError(f"unexpected {type(event).__name__} before response")

    def _ready_body(self) -> tuple[list[bytes], bool]:
        """The body chunks already received (parsed without reading), and whether the
        end of the message is among them. A parse error stops here: the body iterator
        meets it again (h11 stays in ERROR) and raises UpstreamProtocolError."""
        chunks: list[bytes] = []
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                return chunks, False
            if isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return chunks, True
            else:  # NEED_DATA; ConnectionClosed / PAUSED are met again by _next
                return chunks, False

    async def _body(self, ready: list[bytes], complete: bool) -> AsyncIterator[bytes]:
        for chunk in ready:
            yield chunk
        if complete:
            self._end_of_message()
            return
        while True:
            event = await self._next()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._end_of_message()
                return
            elif isinstance(event, h11.ConnectionClosed):
                return
            else:
                raise UpstreamProtocolError(f"unexpected {type(event).__name__} in body")


    def _end_of_message(self) -> None:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()


async def _empty() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover


def _decode(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]


class IdleConnections:
    """Idle HTTP/1.1 upstream connections per endpoint (bounded)."""

    def __init__(self, max_per_endpoint: int = MAX_IDLE_PER_ENDPOINT) -> None:
        self.max_per_endpoint = max_per_endpoint
        self._idle: dict[tuple[str, int], list[Http1Upstream]] = {}

    def take(self, key: tuple[str, int]) -> Http1Upstream | None:
        conns = self._idle.get(key, [])
        while conns:
            conn = conns.pop()
            if conn.reusable:
                return conn
            conn.stream.abort()
        return None

    def give(self, conn: Http1Upstream) -> bool:
        """Keep ``conn`` for reuse; False (and the stream is closed) when full or spent."""
        conns = self._idle.setdefault(conn.key, [])
        if not conn.reusable or len(conns) >= self.max_per_endpoint:
            conn.stream.abort()
            return False
        conns.append(conn)
        return True

    def count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.stream.abort()
        self._idle.clear()


class H2Upstream:
    """One upstream HTTP/2 (h2c, prior knowledge) connection over one HBONE stream,
    multiplexing requests (Envoy's ``USE_DOWNSTREAM_PROTOCOL`` upstream for an HTTP/2
    client). At most ``max_streams`` requests at once (and never more than the peer's
    SETTINGS_MAX_CONCURRENT_STREAMS). Each request's events wait in a bounded queue;
    a request whose reader falls that far behind is reset, never buffered without end.
    """

    def __init__(self, stream: HboneStream, key: tuple[str, int],
                 max_streams: int = 100) -> None:
        self.stream = stream
        self.key = key
        self.max_streams = max_streams
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_inbound_headers=True))
        self._queues: dict[int, asyncio.Queue[h2.events.Event | None]] = {}
        # Streams whose StreamEnded is already queued (see UpstreamResponse.complete).
        self._ended: set[int] = set()
        self._window = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._flushes: set[asyncio.Task[None]] = set()
        self.closed = False

    @property
    def available(self) -> bool:
        limit = min(self.max_streams, self.conn.remote_settings.max_concurrent_streams)
        return not self.closed and self.stream.error is None and len(self._queues) < limit

    async def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            async with self._write_lock:
                await self.stream.write(data)

    async def start(self) -> None:
        self.conn.initiate_connection()
        await self._flush()
        self._reader = asyncio.ensure_future(self._read_loop())

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self.stream.read(READ_SIZE)
                if not data:
                    break
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                for event in events:
                    self._dispatch(event)
                await self._flush()
        except Exception:  # any stream failure ends every request on it
            pass
        finally:
            self.closed = True
            for queue in self._queues.values():
                _put_last(queue)
            self._window.set()
            self.stream.abort()

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window.set()
        if isinstance(event, h2.events.ConnectionTerminated):
            self.closed = True
            for waiting in self._queues.values():
                _put_last(waiting)
            return
        stream_id = getattr(event, "stream_id", None)
        if not isinstance(stream_id, int):
            return
        queue = self._queues.get(stream_id)
        if queue is None:
            return
        if isinstance(event, h2.events.StreamEnded):
            # The response's end is queued: its reader will wait on no more I/O.
            self._ended.add(stream_id)
        try:
            queue.put_nowait(event)
        except asyncio.QueueFull:
            self._queues.pop(stream_id, None)
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            _put_last(queue)

    def _finish(self, stream_id: int) -> None:
        """Forget a request; reset it upstream unless it ended both ways."""
        self._queues.pop(stream_id, None)
        self._ended.discard(stream_id)
        if self.closed:
            return
        with contextlib.suppress(Exception):
            if self.conn.streams.get(stream_id) is not None and \
                    not self.conn.streams[stream_id].closed:
                self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                data = self.conn.data_to_send()
                if data:
                    task = asyncio.ensure_future(self._flush_bytes(data))
                    self._flushes.add(task)
                    task.add_done_callback(self._flushes.discard)

    async def _flush_bytes(self, data: bytes) -> None:
        with contextlib.suppress(Exception):
            async with self._write_lock:
                await self.stream.write(data)

    async def request(self, headers: Sequence[tuple[str, str]], body: bytes,
                      trailers: Sequence[tuple[str, str]] = (),
                      rest: AsyncIterator[bytes] | None = None,
                      rest_trailers: Callable[[], Sequence[tuple[str, str]]] | None = None
                      ) -> UpstreamResponse:
        """Send one request: ``body``, then ``rest`` as it comes and the trailers
        ``rest_trailers()`` gives after it (or ``trailers``); return once its response
        head arrived. Raises UpstreamProtocolError when the connection or the stream
        fails first; exceptions of ``rest`` propagate (this stream is reset)."""
        if not self.available:
            raise UpstreamProtocolError("upstream h2 connection not available")
        stream_id = self.conn.get_next_available_stream_id()
        queue: asyncio.Queue[h2.events.Event | None] = asyncio.Queue(maxsize=256)
        self._queues[stream_id] = queue
        try:
            more = rest is not None
            self.conn.send_headers(stream_id, list(headers),
                                   end_stream=not body and not trailers and not more)
            await self._flush()
            if body:
                await self._send_body(stream_id, body, end=not trailers and not more)
            if rest is not None:
                async for chunk in rest:
                    await self._send_body(stream_id, chunk, end=False)
                trailers = rest_trailers() if rest_trailers is not None else ()
                if not trailers:
                    self.conn.end_stream(stream_id)
                    await self._flush()
            if trailers:
                self.conn.send_headers(stream_id, list(trailers), end_stream=True)
                await self._flush()
            while True:
                event = await queue.get()
                if event is None:
                    raise UpstreamProtocolError("upstream h2 connection ended before a "
                                                "response")
                if isinstance(event, h2.events.ResponseReceived):
                    head = [(str(k), str(v)) for k, v in event.headers]
                    status = int(dict(head).get(":status", "502"))
                    if 100 <= status < 200:
                        continue
                    response = UpstreamResponse(status, [h for h in head if h[0] != ":status"],
                                                _empty(), complete=stream_id in self._ended)
                    response.body = self._body(stream_id, queue, response,
                                               event.stream_ended is not None)
                    response.discard_hook = lambda: self._finish(stream_id)
                    return response
                if isinstance(event, h2.events.StreamReset):
                    raise UpstreamProtocolError(f"upstream reset the stream "
                                                f"({event.error_code})")
        except BaseException:
            self._finish(stream_id)
            raise

    async def _send_body(self, stream_id: int, body: bytes, end: bool) -> None:
        view = memoryview(body)
        while view:
            if self.closed:
                raise UpstreamProtocolError("upstream h2 connection ended")
            window = min(self.conn.local_flow_control_window(stream_id),
                         self.conn.max_outbound_frame_size)
            if window <= 0:
                self._window.clear()
                await self._window.wait()  # bounded by the request timeout
                continue
            size = min(window, len(view))
            self.conn.send_data(stream_id, bytes(view[:size]))
            view = view[size:]
            await self._flush()
        if end:
            self.conn.end_stream(stream_id)
            await self._flush()

    async def _body(self, stream_id: int, queue: asyncio.Queue[h2.events.Event | None],
                    response: UpstreamResponse, ended: bool) -> AsyncIterator[bytes]:
        try:
            while not ended:
                event = await queue.get()
                if event is None:
                    raise UpstreamProtocolError("upstream h2 connection ended mid-body")
                if isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                        stream_id)
                    await self._flush()
                    yield event.data
                    if event.stream_ended is not None:
                        return
                elif isinstance(event, h2.events.TrailersReceived):
                    response.trailers = [(str(k), str(v)) for k, v in event.headers]
                    if event.stream_ended is not None:
                        return
                elif isinstance(event, h2.events.StreamEnded):
                    return
                elif isinstance(event, h2.events.StreamReset):
                    raise UpstreamProtocolError(f"upstream reset the stream "
                                                f"({event.error_code})")
        finally:
            self._finish(stream_id)

    def close(self) -> None:
        self.closed = True
        if self._reader is not None:
            self._reader.cancel()
        self.stream.abort()


def _put_last(queue: asyncio.Queue[h2.events.Event | None]) -> None:
    with contextlib.suppress(asyncio.QueueFull):
        queue.put_nowait(None)


class H2Connections:
    """Upstream HTTP/2 connections per endpoint, shared by requests."""

    def __init__(self, max_per_endpoint: int = 8) -> None:
        self.max_per_endpoint = max_per_endpoint
        self._conns: dict[tuple[str, int], list[H2Upstream]] = {}
        # Per endpoint: the connection being opened now (others wait for it).
        self.connecting: dict[tuple[str, int], asyncio.Future[None]] = {}

    def take(self, key: tuple[str, int]) -> H2Upstream | None:
        conns = [c for c in self._conns.get(key, []) if not c.closed]
        self._conns[key] = conns
        for conn in conns:
            if conn.available:
                return conn
        return None

    def add(self, conn: H2Upstream) -> None:
        conns = self._conns.setdefault(conn.key, [])
        conns.append(conn)
        while len(conns) > self.max_per_endpoint:
            # Keep the newest; older ones finish their requests and are not reused.
            conns.pop(0)

    def count(self) -> int:
        return sum(1 for conns in self._conns.values() for c in conns if not c.closed)

    def close(self) -> None:
        for conns in self._conns.values():
            for conn in conns:
                conn.close()
        self._conns.clear()
