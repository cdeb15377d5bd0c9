"""The tunnel's HBONE side: mesh traffic over mTLS HTTP/2 CONNECT on port 15008.

Outbound (from ``outbound.handle``): the client pod's connection becomes a
CONNECT stream on a pooled TLS connection to ``dst_ip:15008``, presenting the
source workload's certificate and verifying the destination's SPIFFE ID.

Inbound (the 15008 listener): the datapath assigns connections for an
enrolled pod's port 15008 here. We serve TLS with the destination pod's
identity (picked by the original destination address), require a client
certificate from the mesh CA, accept only CONNECT to that same pod, apply
policy, then dial the pod from the client's original address.

Same node: a destination enrolled on this node is handed from the outbound
side straight to the inbound side in process (``hbone-local``): the same
policy check as traffic from another node, no TLS round trip through the
kernel, and no byte ever leaves the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import TYPE_CHECKING, Any

import structlog

from agent.addr import normalize_ip
from agent.hbone import headers as hbone
from agent.hbone.exceptions import HboneRejected, HboneStreamError
from agent.hbone.pool import HbonePool
from agent.hbone.server import HboneServerRequest, serve_hbone
from agent.identity.ca import load_ca
from agent.identity.spiffe import parse_spiffe_id
from agent.identity.store import IdentityStore
from agent.tunnel import sockets
from agent.tunnel.connection import ConnectionRecord, fmt_addr
from agent.tunnel.outbound import dial
from agent.tunnel.relay import RelayResult, pipe_stream_and_socket, relay
from agent.tunnel.workloads import Workload

if TYPE_CHECKING:
    from agent.tunnel.main import Tunnel

log = structlog.get_logger("tunnel.hbone")
ROTATION_CHECK_SECONDS = 60.0
TLS_HANDSHAKE_TIMEOUT = 10.0


def _baggage(workload: Workload | None) -> str | None:
    if workload is None:
        return None
    return hbone.format_baggage([("k8s.namespace.name", workload.namespace),
                                 ("k8s.pod.name", workload.name),
                                 ("service.name", workload.service_account)])


async def _stream_pair(conn: socket.socket) -> tuple[asyncio.StreamReader,
                                                     asyncio.StreamWriter]:
    return await asyncio.open_connection(sock=conn, limit=hbone_io_limit())


def hbone_io_limit() -> int:
    return 1 << 20


class HboneEndpoint:
    def __init__(self, tunnel: Tunnel) -> None:
        t = tunnel.cfg.tunnel
        self.tunnel = tunnel
        self.trust_domain = t.trust_domain
        self.store = IdentityStore(load_ca(t.ca_dir, t.trust_domain),
                                   ttl_seconds=t.cert_ttl_seconds)
        mark = t.socket_mark
        self.pool = HbonePool(self.store.client_context, trust_domain=t.trust_domain,
                              connect_timeout=t.connect_timeout_seconds,
                              socket_factory=lambda family: sockets.upstream(family, mark=mark))
        self._rotation: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._rotation = asyncio.create_task(self._rotate_loop())

    async def close(self) -> None:
        if self._rotation:
            self._rotation.cancel()
        await self.pool.close()

    def certificates(self) -> list[dict[str, Any]]:
        """Identity and expiry of every certificate held (for ``meshagent status``)."""
        out = []
        for spiffe_id in self.store.identities():
            cert = self.store.get(spiffe_id)
            out.append({"identity": str(spiffe_id), "not_after": cert.not_after})
        return out

    async def _rotate_loop(self) -> None:
        while True:
            await asyncio.sleep(ROTATION_CHECK_SECONDS)
            rotated = self.store.rotate_due()
            if rotated:
                log.info("certificates rotated", identities=[str(i) for i in rotated])

    # --- outbound ------------------------------------------------------------

    async def outbound(self, conn: socket.socket, rec: ConnectionRecord, src: Workload | None,
                       src_ip: str, dst_ip: str, dst_port: int) -> None:
        if src is None:
            rec.result, rec.reason = "refused", "source pod is not a known workload yet"
            sockets.abort(conn)
            return
        local_dst = self.tunnel.workloads.by_address(dst_ip)
        if local_dst is not None:
            rec.path = "hbone-local"
            await self._local(conn, rec, src, src_ip, local_dst, dst_ip, dst_port)
            return
        dst = self.tunnel.peers.by_address(dst_ip)
        rec.dst_identity = dst.identity if dst else None
        try:
            stream = await self.pool.open_stream(
                source=parse_spiffe_id(src.identity),
                peer=(dst_ip, self.tunnel.cfg.tunnel.hbone_port),
                authority=hbone.format_authority(dst_ip, dst_port),
                forwarded_for=src_ip, baggage=_baggage(src),
                expected_peer=parse_spiffe_id(dst.identity) if dst else None)
        except HboneRejected as exc:
            rec.result = "denied" if exc.status == 403 else "refused"
            rec.reason = f"peer answered {exc.status}"
            sockets.abort(conn)
            return
        except (HboneStreamError, OSError, TimeoutError, ssl.SSLError, ValueError) as exc:
            rec.result, rec.reason = "connect_failed", str(exc) or type(exc).__name__
            sockets.abort(conn)
            return
        if stream.peer_identity is not None:
            rec.dst_identity = str(stream.peer_identity)
        self.tunnel.connection_opened(rec)
        reader, writer = await _stream_pair(conn)
        result = await pipe_stream_and_socket(stream, reader, writer)
        rec.sent, rec.received = result.bytes_up, result.bytes_down
        rec.result = "ok" if result.outcome == "closed" else "reset"

    async def _local(self, conn: socket.socket, rec: ConnectionRecord, src: Workload,
                     src_ip: str, dst: Workload, dst_ip: str, dst_port: int) -> None:
        rec.dst_identity = dst.identity
        decision = self.tunnel.authorize_inbound(src_ip=src_ip, src_identity=src.identity,
                                                 dst=dst, dst_ip=dst_ip, dst_port=dst_port,
                                                 rec=rec)
        rec.policy = decision.policy
        if not decision.allowed:
            rec.result, rec.reason = "denied", decision.reason
            sockets.abort(conn)
            return
        try:
            up = await dial(self.tunnel, dst_ip, dst_port, source_ip=src_ip)
        except (OSError, TimeoutError) as exc:
            rec.result, rec.reason = "connect_failed", str(exc) or type(exc).__name__
            sockets.abort(conn)
            return
        self.tunnel.connection_opened(rec)
        res = RelayResult()
        try:  # a policy change may cancel us: count the bytes all the same
            await relay(conn, up, res)
        finally:
            rec.sent, rec.received = res.a_to_b, res.b_to_a
        rec.result = "reset" if res.reset else "ok"

    # --- inbound (15008) -----------------------------------------------------

    async def serve(self, tunnel: Tunnel, conn: socket.socket, peer: tuple[str, int]) -> None:
        dst_ip = conn.getsockname()[0]
        dst = tunnel.local_workload(dst_ip)
        if dst is None:
            log.info("HBONE connection for a pod not enrolled here", dst=dst_ip, peer=peer[0])
            sockets.abort(conn)
            return
        ctx = self.store.server_context(parse_spiffe_id(dst.identity))
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=hbone_io_limit())
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=ctx, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        except (ssl.SSLError, OSError, TimeoutError, asyncio.TimeoutError) as exc:
            log.info("HBONE TLS handshake failed", peer=peer[0], dst=dst_ip,
                     reason=str(exc) or type(exc).__name__)
            with contextlib.suppress(OSError):
                conn.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)

        async def on_stream(request: HboneServerRequest) -> None:
            await self._serve_stream(request, dst, dst_ip, peer)

        await serve_hbone(reader, writer, on_stream=on_stream, trust_domain=self.trust_domain)

    async def _serve_stream(self, request: HboneServerRequest, dst: Workload, dst_ip: str,
                            peer: tuple[str, int]) -> None:
        client_ip = request.forwarded_for or peer[0]
        try:
            target_ip, target_port = request.destination
        except ValueError:
            target_ip, target_port = "", 0
        rec = ConnectionRecord(direction="inbound", src=fmt_addr(client_ip, 0),
                               dst=request.authority, path="hbone", dst_ip=dst_ip,
                               src_identity=str(request.peer_identity)
                               if request.peer_identity else None,
                               dst_identity=dst.identity)
        try:
            if normalize_ip(target_ip) != normalize_ip(dst_ip):
                rec.result = "refused"
                rec.reason = f":authority {request.authority} is not this connection's " \
                             f"destination {dst_ip}"
                request.reject(400)
                return
            try:
                normalize_ip(client_ip)
            except ValueError:
                client_ip = peer[0]
            rec.src_ip = client_ip
            decision = self.tunnel.authorize_inbound(
                src_ip=client_ip, src_identity=rec.src_identity, dst=dst, dst_ip=dst_ip,
                dst_port=target_port, rec=rec)
            rec.policy = decision.policy
            if not decision.allowed:
                rec.result, rec.reason = "denied", decision.reason
                request.reject(403)
                return
            try:
                up = await dial(self.tunnel, dst_ip, target_port, source_ip=client_ip)
            except (OSError, TimeoutError) as exc:
                rec.result, rec.reason = "connect_failed", str(exc) or type(exc).__name__
                request.reject(503)
                return
            stream = request.accept()
            self.tunnel.connection_opened(rec)
            reader, writer = await _stream_pair(up)
            counts = [0, 0]  # [up, down], live: a policy change may cancel us
            try:
                result = await pipe_stream_and_socket(stream, reader, writer, counts=counts)
            finally:
                # Inbound: "sent" is client -> pod, i.e. stream -> socket.
                rec.sent, rec.received = counts[1], counts[0]
            rec.result = "ok" if result.outcome == "closed" else "reset"
        finally:
            self.tunnel.connection_closed(rec)

