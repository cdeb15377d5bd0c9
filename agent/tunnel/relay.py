"""Copy bytes between two TCP sockets with TCP's semantics kept end to end.

A FIN on one side becomes shutdown(SHUT_WR) on the other (half-close), and a
reset on one side becomes a reset on the other (SO_LINGER 0 close). Each
direction reads at most one buffer ahead: a slow reader back-pressures the
fast writer through the kernel's socket buffers, never through our memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass

from agent.hbone.errors import CANCEL, CONNECT_ERROR
from agent.hbone.exceptions import HboneStreamError
from agent.hbone.stream import HboneStream
from agent.tunnel.sockets import abort

BUFFER_SIZE = 256 * 1024


@dataclass
class RelayResult:
    a_to_b: int = 0
    b_to_a: int = 0
    reset: bool = False


async def _copy(loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket,
                result: RelayResult, forward: bool) -> None:
    buf = bytearray(BUFFER_SIZE)
    view = memoryview(buf)
    while True:
        n = await loop.sock_recv_into(src, buf)
        if n == 0:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            return
        await loop.sock_sendall(dst, view[:n])
        if forward:
            result.a_to_b += n
        else:
            result.b_to_a += n


async def relay(a: socket.socket, b: socket.socket,
                result: RelayResult | None = None) -> RelayResult:
    """Relay until both directions finish; closes both sockets. Never raises on I/O errors.

    ``result``, when given, is filled in as bytes flow, so a caller whose task is
    cancelled (e.g. a policy change closing the connection) still has the counts.
    """
    loop = asyncio.get_running_loop()
    result = result if result is not None else RelayResult()
    tasks = [asyncio.create_task(_copy(loop, a, b, result, True)),
             asyncio.create_task(_copy(loop, b, a, result, False))]
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(t.exception() is not None for t in done):
                # One side reset or failed: reset the other too and stop.
                result.reset = True
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                abort(a)
                abort(b)
                return result
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        abort(a)
        abort(b)
        raise
    a.close()
    b.close()
    return result


# ---- TCP <-> HBONE stream (moved here from hbone_io when HBONE became agent/hbone/) ----

PIPE_CHUNK = 256 * 1024
# How long a clean close waits for the socket to finish closing.
CLOSE_TIMEOUT = 1.0


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
                stream.abort(CONNECT_ERROR)
                abort_with_rst(writer)
                break
            except _StreamFailed:
                outcome = "stream_reset"
                abort_with_rst(writer)
                stream.abort(CANCEL)
                break
    except asyncio.CancelledError:
        # The caller gave up on this connection: tear both sides down hard.
        outcome = "cancelled"
        stream.abort(CANCEL)
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
