"""The asyncio machinery both HBONE roles share: the read loop, event dispatch,
flushing, keepalive, close, and the TLS peer checks.

:class:`HboneSession` is the :class:`~agent.hbone.stream.StreamCarrier` of its streams.
Works on plain asyncio and on uvloop (the tunnel process chooses the loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

import structlog

from agent.hbone.connection import HboneConnection
from agent.hbone.errors import CANCEL, NO_ERROR
from agent.hbone.events import (
    ConnectionTerminated,
    DataReceived,
    GoingAway,
    HboneEvent,
    PingAcked,
    StreamEnded,
    StreamReset,
    WindowOpened,
)
from agent.hbone.exceptions import (
    ConnectionClosedError,
    HboneConnectionLost,
    HboneError,
    HbonePeerIdentityError,
    HboneStreamReset,
)
from agent.hbone.stream import HboneStream
from agent.identity.spiffe import SpiffeId
from agent.identity.verify import PeerRole, PeerVerificationError, verify_tls_peer

log = structlog.get_logger(__name__)

READ_CHUNK = 256 * 1024
# How long close() waits for TLS close_notify to go out before giving up on the peer.
CLOSE_TIMEOUT = 1.0
# After we end a connection with an error GOAWAY, keep reading (and discarding) for up
# to this long / this much before closing: closing a socket with unread input sends a
# TCP RST, and the peer's kernel then drops our GOAWAY unread. Go's x/net/http2 server
# likewise waits goAwayTimeout = 1s after its GOAWAY (server.go).
GOAWAY_LINGER_SECONDS = 1.0
GOAWAY_LINGER_BYTES = 4 * 1024 * 1024
# Our output counts as drained (the peer is reading) while the transport buffers less
# than asyncio's default high-water mark; a peer that stops reading keeps it above.
OUTPUT_DRAINED_BELOW = 64 * 1024


def peer_identity_of(writer: asyncio.StreamWriter, role: PeerRole, *,
                     trust_domain: str | None,
                     expected: SpiffeId | None = None) -> SpiffeId | None:
    """The verified peer SPIFFE ID of a TLS connection; None for plaintext (tests only).

    Checks in :func:`agent.identity.verify.verify_tls_peer` (leaf profile, one SPIFFE
    URI SAN, trust domain, expected identity); raises HbonePeerIdentityError.
    """
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    try:
        return verify_tls_peer(ssl_object, role=role, trust_domain=trust_domain,
                               expected=expected)
    except PeerVerificationError as exc:
        raise HbonePeerIdentityError(str(exc)) from exc


def check_alpn(writer: asyncio.StreamWriter) -> None:
    """Raise HboneConnectionLost unless TLS negotiated ALPN ``h2`` (plaintext passes)."""
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
        raise HboneConnectionLost(
            f"peer did not negotiate ALPN h2 (got {ssl_object.selected_alpn_protocol()!r})")


class HboneSession:
    """One HBONE connection's I/O: feeds the core, dispatches events to streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 core: HboneConnection, peer_identity: SpiffeId | None) -> None:
        self._reader = reader
        self._writer = writer
        self.core = core
        self._peer_identity = peer_identity
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
    def peer_identity(self) -> SpiffeId | None:
        """The verified SPIFFE ID of the peer (None on plaintext test connections)."""
        return self._peer_identity

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

    # ---- StreamCarrier: what streams call ------------------------------------------------

    def send_data(self, stream_id: int, data: memoryview) -> int:
        try:
            sent = self.core.send_data(stream_id, data)
        except ConnectionClosedError as exc:
            raise HboneConnectionLost(str(exc)) from exc
        except HboneError as exc:
            raise HboneStreamReset(CANCEL, str(exc)) from exc
        if sent:
            self.flush()
        return sent

    def end_stream(self, stream_id: int) -> None:
        try:
            self.core.end_stream(stream_id)
        except ConnectionClosedError as exc:
            raise HboneConnectionLost(str(exc)) from exc
        except HboneError as exc:
            raise HboneStreamReset(CANCEL, str(exc)) from exc
        self.flush()

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        self.core.reset_stream(stream_id, error_code)
        self.flush()

    def acknowledge(self, stream_id: int, size: int) -> None:
        if not self.is_closed:
            self.core.acknowledge_received(stream_id, size)
            self.flush()

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._connection_lost(f"{type(exc).__name__}: {exc}")
            raise HboneConnectionLost(str(exc)) from exc

    def stream_finished(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
        if not self._streams:
            self.idle_since = self._loop.time()
            if not self.core.is_usable and not self.is_closed and self.core.terminated is None:
                # Peer is going away (or we are draining) and the last stream is done.
                # (A terminated core is closed by the read loop, after its linger.)
                self._closing_task = asyncio.ensure_future(self.close())

    # ---- lifecycle --------------------------------------------------------------------

    def start(self, keepalive_interval: float | None, keepalive_timeout: float) -> None:
        """Side effects: writes the HTTP/2 preface/SETTINGS and starts background tasks."""
        self.flush()
        self._read_task = asyncio.ensure_future(self._read_loop())
        if keepalive_interval:
            self._keepalive_task = asyncio.ensure_future(
                self._keepalive(keepalive_interval, keepalive_timeout))

    def flush(self) -> None:
        """Write whatever the core has queued to the transport."""
        data = self.core.data_to_send()
        if data and not self._writer.is_closing():
            self._writer.write(data)

    async def close(self, error_code: int = NO_ERROR, reason: str = "closed") -> None:
        """Send GOAWAY, fail every stream, and close the transport. Idempotent."""
        if not self.is_closed:
            self.core.close(error_code, reason)
            self.flush()
            self._connection_lost(reason)
        current = asyncio.current_task()
        for task in (self._read_task, self._keepalive_task):
            if task is not None and task is not current and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        try:
            await asyncio.wait_for(self._writer.wait_closed(), CLOSE_TIMEOUT)
        except Exception:
            # A peer that does not read keeps our output (and the socket) forever:
            # after CLOSE_TIMEOUT, drop both.
            self._writer.transport.abort()

    def _connection_lost(self, reason: str) -> None:
        if self.is_closed:
            return
        self._close_reason = reason
        self._closed.set()
        for stream in list(self._streams.values()):
            stream.fail(HboneConnectionLost(f"HBONE connection lost: {reason}"))
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
                self._dispatch_all(self.core.receive_data(data))
                self.flush()
                if self._writer.transport.get_write_buffer_size() < OUTPUT_DRAINED_BELOW:
                    # The peer reads what we send: the replies owed so far have left.
                    self.core.output_drained()
                if self.core.terminated is not None:
                    reason = self.core.terminated.reason
                    if self.core.terminated.local:
                        await self._linger()
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

    async def _linger(self) -> None:
        """Discard input for a bounded time/amount so our GOAWAY reaches the peer."""
        deadline = self._loop.time() + GOAWAY_LINGER_SECONDS
        discarded = 0
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError, OSError,
                                 ssl.SSLError):
            while discarded < GOAWAY_LINGER_BYTES:
                remaining = deadline - self._loop.time()
                if remaining <= 0:
                    return
                data = await asyncio.wait_for(self._reader.read(READ_CHUNK), remaining)
                if not data:
                    return
                discarded += len(data)

    # ---- events -------------------------------------------------------------------------

    def _dispatch_all(self, events: list[HboneEvent]) -> None:
        for event in events:
            self._dispatch(event)

    def _dispatch(self, event: HboneEvent) -> None:
        if isinstance(event, DataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is None:
                self.core.acknowledge_received(event.stream_id, len(event.data))
            else:
                stream.feed_data(event.data)
        elif isinstance(event, StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.feed_eof()
        elif isinstance(event, StreamReset):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.fail(HboneStreamReset(event.error_code))
        elif isinstance(event, WindowOpened):
            targets = (self._streams.values() if event.stream_id is None
                       else [s for s in [self._streams.get(event.stream_id)] if s])
            for stream in list(targets):
                stream.window_opened()
        elif isinstance(event, PingAcked):
            waiter = self._ping_waiters.pop(event.payload, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif isinstance(event, ConnectionTerminated):
            log.debug("hbone connection terminated", error_code=event.error_code,
                      reason=event.reason, local=event.local)
        elif isinstance(event, GoingAway):
            log.debug("hbone peer going away", last_stream_id=event.last_stream_id)
        else:
            self._dispatch_role_event(event)

    def _dispatch_role_event(self, event: HboneEvent) -> None:
        raise NotImplementedError

    # ---- keepalive ------------------------------------------------------------------------

    async def ping(self, timeout: float = 10.0) -> float:
        """Send a PING and wait for its ACK; returns the round-trip time in seconds."""
        try:
            payload = self.core.ping()
        except HboneError as exc:
            raise HboneConnectionLost(str(exc)) from exc
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._ping_waiters[payload] = waiter
        started = self._loop.time()
        self.flush()
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
                    self.core.close(NO_ERROR, "keepalive timeout")
                    self.flush()
                    self._connection_lost("keepalive timeout")
                return
