"""How the tunnel opens upstream TCP connections: a :class:`Dialer`.

The production :class:`TransparentDialer` marks every socket (SO_MARK: the
datapath never recaptures it) and binds the source address it is given with
IP_TRANSPARENT, so a pod's server sees the real client and the outer HBONE
connection leaves from the source pod's own address. Tests use the same class
with ``transparent=False`` on loopback addresses (no privileges needed) or a
dialer of their own.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol

from agent.addr import family_of
from agent.tunnel import sockets


class Dialer(Protocol):
    def socket_for(self, family: int, source_ip: str | None) -> socket.socket:
        """An unconnected non-blocking socket bound to ``source_ip`` (if given)."""
        ...

    async def connect(self, dst: tuple[str, int], source_ip: str | None) -> socket.socket:
        """A connected socket to ``dst`` from ``source_ip``. Raises OSError/TimeoutError."""
        ...


class TransparentDialer:
    def __init__(self, mark: int, timeout: float, *, transparent: bool = True) -> None:
        self.mark = mark
        self.timeout = timeout
        self.transparent = transparent

    def socket_for(self, family: int, source_ip: str | None) -> socket.socket:
        return sockets.upstream(family, mark=self.mark, source_ip=source_ip,
                                transparent=self.transparent)

    async def connect(self, dst: tuple[str, int], source_ip: str | None) -> socket.socket:
        loop = asyncio.get_running_loop()
        sock = self.socket_for(family_of(dst[0]), source_ip)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, dst), self.timeout)
        except BaseException:
            sock.close()
            raise
        return sock
