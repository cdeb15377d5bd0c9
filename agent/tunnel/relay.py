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
from dataclasses import dataclass

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
