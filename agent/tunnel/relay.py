"""The tunnel's one copy loop: bytes both ways between two byte streams.

Modelled on ztunnel's ``src/copy.rs`` ``copy_bidirectional``: each direction
copies until its source ends, then half-closes its destination (TCP FIN, or
END_STREAM on an HBONE stream), so a half-closed connection keeps flowing the
other way; when one side fails (TCP RST, RST_STREAM, a lost HBONE connection)
both sides are aborted (RST / RST_STREAM CONNECT_ERROR, RFC 9113 section 8.5)
and the copy stops. Byte counts are kept live in a :class:`CopyCounts` the
caller owns, so a connection cancelled midway (a policy change) still reports
what it carried. Each direction reads at most one buffer ahead: a slow reader
back-pressures the fast writer (socket buffers, HTTP/2 flow control), never
through our memory.

The two ends are :class:`ByteStream`: :class:`SocketStream` (a TCP socket) and
:class:`HboneByteStream` (an HBONE CONNECT stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass
from typing import Protocol

import structlog

from agent.hbone.errors import CONNECT_ERROR, NO_ERROR
from agent.hbone.stream import HboneStream
from agent.tunnel.sockets import abort as abort_socket

log = structlog.get_logger("tunnel.relay")
BUFFER_SIZE = 256 * 1024


class ByteStream(Protocol):
    """One end of a proxied connection, as the copy loop sees it."""

    async def read(self) -> bytes | memoryview:
        """The next bytes; b"" once the peer half-closed. Raises OSError on a reset."""
        ...

    async def write(self, data: bytes | memoryview) -> None:
        """Send all of ``data``. Raises OSError when the peer is gone."""
        ...

    async def close_write(self) -> None:
        """Half-close (FIN / END_STREAM)."""
        ...

    def abort(self) -> None:
        """Reset (RST / RST_STREAM). Idempotent, never raises."""
        ...

    async def close(self) -> None:
        """Release the end after both directions finished cleanly."""
        ...


class SocketStream:
    """A non-blocking TCP socket as a :class:`ByteStream` (owns the socket)."""

    def __init__(self, sock: socket.socket, buffer_size: int = BUFFER_SIZE) -> None:
        self.sock = sock
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._loop = asyncio.get_running_loop()

    async def read(self) -> memoryview:
        # The view is valid until the next read: the copy loop writes it out first.
        n = await self._loop.sock_recv_into(self.sock, self._buf)
        return self._view[:n]

    async def write(self, data: bytes | memoryview) -> None:
        await self._loop.sock_sendall(self.sock, data)

    async def close_write(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def abort(self) -> None:
        abort_socket(self.sock)

    async def close(self) -> None:
        self.sock.close()


class HboneByteStream:
    """An established HBONE CONNECT stream as a :class:`ByteStream`."""

    def __init__(self, stream: HboneStream, buffer_size: int = BUFFER_SIZE) -> None:
        self.stream = stream
        self._size = buffer_size

    async def read(self) -> bytes:
        return await self.stream.read(self._size)

    async def write(self, data: bytes | memoryview) -> None:
        await self.stream.write(data)

    async def close_write(self) -> None:
        await self.stream.close_write()

    def abort(self) -> None:
        self.stream.abort(CONNECT_ERROR)

    async def close(self) -> None:
        if not self.stream.is_finished:
            self.stream.abort(NO_ERROR)


@dataclass
class CopyCounts:
    """Bytes copied so far: ``up`` client -> server, ``down`` server -> client."""

    up: int = 0
    down: int = 0


async def _pump(src: ByteStream, dst: ByteStream, counts: CopyCounts, upstream: bool) -> None:
    while True:
        data = await src.read()
        if not data:
            await dst.close_write()
            return
        await dst.write(data)
        if upstream:
            counts.up += len(data)
        else:
            counts.down += len(data)


async def copy_bidirectional(client: ByteStream, server: ByteStream,
                             counts: CopyCounts) -> bool:
    """Copy until both directions finish; return True if it ended in a reset.

    Never raises for I/O errors (they are the reset). Side effects: both ends are
    closed at the end (aborted after a reset or a cancellation); ``counts`` is
    updated as bytes flow. A cancellation aborts both ends and propagates.
    """
    tasks = [asyncio.ensure_future(_pump(client, server, counts, True)),
             asyncio.ensure_future(_pump(server, client, counts, False))]
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            failed = [t.exception() for t in done if t.exception() is not None]
            if failed:
                for exc in failed:
                    if not isinstance(exc, OSError):  # a bug, not a network event
                        log.error("copy loop failed", error=repr(exc))
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                client.abort()
                server.abort()
                return True
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        client.abort()
        server.abort()
        raise
    await client.close()
    await server.close()
    return False
