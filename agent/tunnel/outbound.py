"""Outbound (port 15001): connections captured from enrolled pods on this node.

The accepted socket's peer is the client pod and its local address is the
original destination. Plain mode (and any destination outside the mesh) dials
the destination directly from the client's own address; HBONE mode carries
mesh destinations over mTLS HTTP/2 CONNECT to the destination's port 15008.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING

from agent.addr import family_of
from agent.tunnel import sockets
from agent.tunnel.connection import ConnectionRecord, fmt_addr
from agent.tunnel.relay import relay

if TYPE_CHECKING:
    from agent.tunnel.main import Tunnel


async def dial(tunnel: Tunnel, dst_ip: str, dst_port: int,
               source_ip: str | None) -> socket.socket:
    """Connect to dst with the tunnel's mark, from ``source_ip`` if given."""
    loop = asyncio.get_running_loop()
    up = sockets.upstream(family_of(dst_ip), mark=tunnel.cfg.tunnel.socket_mark,
                          source_ip=source_ip)
    try:
        await asyncio.wait_for(loop.sock_connect(up, (dst_ip, dst_port)),
                               tunnel.cfg.tunnel.connect_timeout_seconds)
    except BaseException:
        up.close()
        raise
    return up


async def handle(tunnel: Tunnel, conn: socket.socket, peer: tuple[str, int]) -> None:
    src_ip, src_port = peer[0], peer[1]
    dst_ip, dst_port = conn.getsockname()[:2]
    rec = ConnectionRecord(direction="outbound", src=fmt_addr(src_ip, src_port),
                           dst=fmt_addr(dst_ip, dst_port), src_ip=src_ip, dst_ip=dst_ip)
    src = tunnel.local_workload(src_ip)
    rec.src_identity = src.identity if src else None
    try:
        if tunnel.hbone is not None and tunnel.is_mesh_destination(dst_ip):
            rec.path = "hbone"
            await tunnel.hbone.outbound(conn, rec, src, src_ip, dst_ip, dst_port)
            return
        rec.path = "passthrough" if tunnel.hbone is not None else "plain"
        try:
            up = await dial(tunnel, dst_ip, dst_port, source_ip=src_ip)
        except (OSError, TimeoutError) as exc:
            rec.result, rec.reason = "connect_failed", str(exc) or type(exc).__name__
            sockets.abort(conn)
            return
        tunnel.connection_opened(rec)
        res = await relay(conn, up)
        rec.sent, rec.received = res.a_to_b, res.b_to_a
        rec.result = "reset" if res.reset else "ok"
    finally:
        tunnel.connection_closed(rec)
