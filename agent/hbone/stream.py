"""One tunnelled byte stream (a CONNECT stream after 200), for asyncio.

The stream and the connection carrying it talk only through public methods: the stream
calls its :class:`StreamCarrier` (implemented by :class:`agent.hbone.session.HboneSession`)
to send, end, reset and acknowledge; the connection calls the stream's ``feed_*``,
``window_opened`` and ``fail`` as events arrive.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

from agent.hbone.errors import CANCEL
from agent.hbone.exceptions import HboneStreamError, HboneStreamReset
from agent.identity.spiffe import SpiffeId

READ_CHUNK = 256 * 1024


class StreamCarrier(Protocol):
    """What a stream needs from the connection that carries it."""

    @property
    def peer_identity(self) -> SpiffeId | None: ...

    def send_data(self, stream_id: int, data: memoryview) -> int:
        """Queue up to ``len(data)`` bytes within flow control; returns how many.
        Raises HboneConnectionLost, or HboneStreamReset if the stream is gone."""
        ...

    def end_stream(self, stream_id: int) -> None:
        """Queue END_STREAM. Raises like send_data."""
        ...

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        """Queue RST_STREAM; never raises."""
        ...

    def acknowledge(self, stream_id: int, size: int) -> None:
        """The application consumed ``size`` bytes: give the peer its window back."""
        ...

    async def drain(self) -> None:
        """Wait until the transport's buffer is low. Raises HboneConnectionLost."""
        ...

    def stream_finished(self, stream_id: int) -> None:
        """The stream is done in both directions (or failed); forget it."""
        ...


class HboneStream:
    """One tunnelled byte stream.

    ``read()`` returns b"" at END_STREAM and raises :class:`HboneStreamReset` /
    :class:`HboneConnectionLost` on failure. ``write()`` waits for flow-control window,
    so a slow peer slows the writer (back-pressure) instead of growing buffers.
    """

    def __init__(self, carrier: StreamCarrier, stream_id: int, authority: str,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        self._carrier = carrier
        self.stream_id = stream_id
        self.authority = authority
        self.headers = headers
        self._chunks: deque[bytes] = deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._done = asyncio.Event()
        self._remote_ended = False
        self._local_ended = False
        self._error: HboneStreamError | None = None
        self._finished = False

    # ---- application side ---------------------------------------------------------

    @property
    def peer_identity(self) -> SpiffeId | None:
        """The verified SPIFFE ID of the node at the other end of the connection."""
        return self._carrier.peer_identity

    @property
    def error(self) -> HboneStreamError | None:
        """Why the stream failed, if it did."""
        return self._error

    @property
    def is_finished(self) -> bool:
        return self._finished

    @property
    def buffered_bytes(self) -> int:
        """Received payload not yet read by the application (at most one window)."""
        return sum(len(c) for c in self._chunks)

    async def wait_finished(self) -> None:
        """Return once the stream is finished (both directions ended, or failed)."""
        await self._done.wait()

    async def read(self, max_bytes: int = READ_CHUNK) -> bytes:
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
        self._carrier.acknowledge(self.stream_id, len(chunk))
        return chunk

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``, waiting for window and for the transport to drain."""
        view = memoryview(data)
        while view:
            self._raise_if_unwritable()
            self._writable.clear()
            try:
                sent = self._carrier.send_data(self.stream_id, view)
            except HboneStreamReset as exc:
                raise self._error or exc from None
            if sent:
                view = view[sent:]
                await self._carrier.drain()
            else:
                await self._writable.wait()

    async def close_write(self) -> None:
        """Half-close: send END_STREAM (the tunnelled connection's FIN). Idempotent."""
        if self._local_ended:
            return
        self._raise_if_unwritable()
        try:
            self._carrier.end_stream(self.stream_id)
        except HboneStreamReset as exc:
            raise self._error or exc from None
        self._local_ended = True
        self._maybe_finished()
        await self._carrier.drain()

    def abort(self, error_code: int = CANCEL) -> None:
        """Reset the stream (RST_STREAM with ``error_code``). Idempotent, never raises."""
        if self._finished:
            return
        self._carrier.reset_stream(self.stream_id, error_code)
        self.fail(HboneStreamReset(error_code, f"stream reset by us ({error_code})"))

    # ---- connection side (called by the carrier as events arrive) ------------------

    def feed_data(self, data: bytes) -> None:
        """Payload arrived from the peer."""
        if self._error is not None:
            self._carrier.acknowledge(self.stream_id, len(data))
            return
        self._chunks.append(data)
        self._readable.set()

    def feed_eof(self) -> None:
        """The peer half-closed (END_STREAM)."""
        self._remote_ended = True
        self._readable.set()
        self._maybe_finished()

    def window_opened(self) -> None:
        """The peer granted send window."""
        self._writable.set()

    def fail(self, error: HboneStreamError) -> None:
        """The stream is over with ``error`` (reset, rejected, connection lost)."""
        if self._error is None and not self._finished:
            self._error = error
        # Unread bytes will never be consumed: return them to the connection window.
        unread = sum(len(c) for c in self._chunks)
        self._chunks.clear()
        if unread:
            self._carrier.acknowledge(self.stream_id, unread)
        self._readable.set()
        self._writable.set()
        self._set_finished()

    # ---- internals -------------------------------------------------------------------

    def _raise_if_unwritable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._local_ended:
            raise HboneStreamError("stream already half-closed for writing")

    def _maybe_finished(self) -> None:
        if self._local_ended and self._remote_ended:
            self._set_finished()

    def _set_finished(self) -> None:
        if not self._finished:
            self._finished = True
            self._done.set()
            self._carrier.stream_finished(self.stream_id)
