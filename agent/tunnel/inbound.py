"""Inbound plaintext (port 15006): TCP for an enrolled pod from outside the mesh.

The datapath hands this listener any new connection to an enrolled pod that
the tunnel did not make itself and that is not for port 15008. ``permissive``
forwards it to the pod from the client's own address; ``strict`` refuses it
with a reset.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from agent.tunnel import sockets
from agent.tunnel.connection import ConnectionRecord, fmt_addr
from agent.tunnel.outbound import dial
from agent.tunnel.relay import RelayResult, relay

if TYPE_CHECKING:
    from agent.tunnel.main import Tunnel


async def handle(tunnel: Tunnel, conn: socket.socket, peer: tuple[str, int]) -> None:
    src_ip, src_port = peer[0], peer[1]
    dst_ip, dst_port = conn.getsockname()[:2]
    rec = ConnectionRecord(direction="inbound", src=fmt_addr(src_ip, src_port),
                           dst=fmt_addr(dst_ip, dst_port), path="plain", src_ip=src_ip,
                           dst_ip=dst_ip)
    dst = tunnel.local_workload(dst_ip)
    rec.dst_identity = dst.identity if dst else None
    try:
        if dst is None:
            rec.result, rec.reason = "refused", "destination is not enrolled on this node"
            sockets.abort(conn)
            return
        if tunnel.cfg.tunnel.inbound_mode == "strict" and tunnel.hbone is not None:
            rec.result, rec.reason = "refused", "strict mode: plaintext inbound refused"
            sockets.abort(conn)
            return
        decision = tunnel.authorize_inbound(src_ip=src_ip, src_identity=None, dst=dst,
                                            dst_ip=dst_ip, dst_port=dst_port, rec=rec)
        rec.policy = decision.policy
        if not decision.allowed:
            rec.result, rec.reason = "denied", decision.reason
            sockets.abort(conn)
            return
        try:
            up = await dial(tunnel, dst_ip, dst_port, source_ip=src_ip)
        except (OSError, TimeoutError) as exc:
            rec.result, rec.reason = "connect_failed", str(exc) or type(exc).__name__
            sockets.abort(conn)
            return
        tunnel.connection_opened(rec)
        res = RelayResult()
        try:  # a policy change may cancel us: count the bytes all the same
            await relay(conn, up, res)
        finally:
            rec.sent, rec.received = res.a_to_b, res.b_to_a
        rec.result = "reset" if res.reset else "ok"
    finally:
        tunnel.connection_closed(rec)

