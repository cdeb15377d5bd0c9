"""Upstream side of the waypoint: HBONE to the chosen endpoint, then HTTP on the stream.

HTTP/1.1 upstream connections (h11 over one CONNECT stream each) are kept idle per
endpoint and reused (keep-alive), at most ``MAX_IDLE_PER_ENDPOINT`` each; the TLS
connections under them are the :class:`agent.hbone.pool.HbonePool`'s. HTTP/2 requests
go as h2c on a fresh CONNECT stream each (one request per upstream h2 connection:
simple, correct for gRPC, not the fastest).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import h2.config
import h2.connection
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
                      body: bytes, upgrade: bool) -> UpstreamResponse:
        """Send a whole request; return when the response head arrived."""
        out = self.conn.send(h11.Request(method=method, target=target, headers=list(headers)))
        if not upgrade:
            if body:
                out += self.conn.send(h11.Data(data=body))
            out += self.conn.send(h11.EndOfMessage())
        await self.stream.write(out)
        while True:
            event = await self._next()
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101 and upgrade:
                    leftover, _ = self.conn.trailing_data
                    return UpstreamResponse(101, _decode(event.headers), _empty(),
                                            upgraded=self.stream, leftover=bytes(leftover))
                continue  # 100 Continue and friends: not forwarded
            if isinstance(event, h11.Response):
                return UpstreamResponse(event.status_code, _decode(event.headers),
                                        self._body())
            if event is h11.PAUSED:
                raise UpstreamProtocolError("upstream switched protocols unasked")
            raise UpstreamProtocolError(f"unexpected {type(event).__name__} before response")

    async def _body(self) -> AsyncIterator[bytes]:
        while True:
            event = await self._next()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                return
            elif isinstance(event, h11.ConnectionClosed):
                return
            else:
                raise UpstreamProtocolError(f"unexpected {type(event).__name__} in body")


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
    """One h2c request on its own HBONE stream (prior knowledge, as Envoy's
    ``USE_DOWNSTREAM_PROTOCOL`` upstream for an HTTP/2 client)."""

    def __init__(self, stream: HboneStream) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_inbound_headers=True))
        self._events: asyncio.Queue[h2.events.Event | None] = asyncio.Queue(maxsize=256)
        self._reader: asyncio.Task[None] | None = None
        self.stream_id = 1

    async def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.stream.write(data)

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
                    await self._events.put(event)
                await self._flush()
        except Exception:  # any stream failure ends the response
            pass
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                self._events.put_nowait(None)

    async def request(self, headers: Sequence[tuple[str, str]], body: bytes,
                      trailers: Sequence[tuple[str, str]] = ()) -> UpstreamResponse:
        self.conn.initiate_connection()
        self.conn.send_headers(self.stream_id, list(headers),
                               end_stream=not body and not trailers)
        await self._flush()
        self._reader = asyncio.ensure_future(self._read_loop())
        if body:
            await self._send_body(body, end=not trailers)
        if trailers:
            self.conn.send_headers(self.stream_id, list(trailers), end_stream=True)
            await self._flush()
        while True:
            event = await self._events.get()
            if event is None:
                raise UpstreamProtocolError("upstream h2 connection ended before a response")
            if isinstance(event, h2.events.ResponseReceived):
                head = [(str(k), str(v)) for k, v in event.headers]
                status = int(dict(head).get(":status", "502"))
                if 100 <= status < 200:
                    continue
                response = UpstreamResponse(status, [h for h in head if h[0] != ":status"],
                                            _empty())
                response.body = self._body(response)
                return response
            if isinstance(event, h2.events.StreamReset):
                raise UpstreamProtocolError(f"upstream reset the stream ({event.error_code})")

    async def _send_body(self, body: bytes, end: bool) -> None:
        view = memoryview(body)
        while view:
            window = self.conn.local_flow_control_window(self.stream_id)
            size = min(window, self.conn.max_outbound_frame_size, len(view))
            if size <= 0:
                await asyncio.sleep(0.005)  # bounded by the request timeout
                continue
            self.conn.send_data(self.stream_id, bytes(view[:size]))
            view = view[size:]
            await self._flush()
        if end:
            self.conn.end_stream(self.stream_id)
            await self._flush()

    async def _body(self, response: UpstreamResponse) -> AsyncIterator[bytes]:
        while True:
            event = await self._events.get()
            if event is None:
                return
            if isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                    event.stream_id)
                await self._flush()
                yield event.data
            elif isinstance(event, h2.events.TrailersReceived):
                response.trailers = [(str(k), str(v)) for k, v in event.headers]
            elif isinstance(event, h2.events.StreamEnded):
                return
            elif isinstance(event, h2.events.StreamReset):
                raise UpstreamProtocolError(f"upstream reset the stream ({event.error_code})")

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self.stream.abort()
