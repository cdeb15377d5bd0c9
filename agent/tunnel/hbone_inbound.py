"""Inbound HBONE (port 15008): mTLS HTTP/2 CONNECT from other nodes' tunnels.

The datapath assigns connections for an enrolled pod's port 15008 here. This
module classifies; :class:`~agent.tunnel.pipeline.Pipeline` carries each stream:

- TLS with the destination pod's identity (picked by the original destination
  address), client certificate from the mesh CA required. A failed handshake is
  a connection with outcome ``tls_failed`` (response flag ``TLS_FAILURE``).
- The source is the outer connection's TCP peer address, as ztunnel takes it
  (``src/proxy/inbound.rs``: ``listener.accept()`` gives ``src``, which becomes
  ``Connection.src`` for RBAC and for the pod dial); the ``Forwarded`` header is
  never trusted for address or policy. Beyond ztunnel, the peer's certificate
  must agree with that address: when a workload we know owns the address, it must
  have the certificate's identity (else ``401``, ``identity_error``), so a mesh
  identity cannot claim another workload's address.
- ``:authority`` must be this connection's own destination (``400`` otherwise, as
  ztunnel's ``validate_destination`` -> ``BAD_REQUEST``), or a hostname naming a
  service this pod serves (ztunnel ``find_inbound_upstream``: the target is
  always the local pod, on the service's target port; an unknown hostname is
  ``503``, ``NoHostname`` -> ``SERVICE_UNAVAILABLE``).
- Then policy (denied: ``401``), the pod dialed from the source address
  (failure: ``503``), ``200``, and the copy loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

import structlog

from agent.addr import normalize_ip
from agent.hbone import headers as hbone
from agent.hbone.exceptions import HbonePeerIdentityError
from agent.hbone.server import HboneServerRequest, serve_hbone
from agent.hbone.session import peer_identity_of
from agent.identity.spiffe import parse_spiffe_id
from agent.identity.verify import PeerRole
from agent.tunnel.connection import ConnectionRecord, fmt_addr
from agent.tunnel.headers import TRACEPARENT_HEADER, TraceParent
from agent.tunnel.inbound import dial_pod, inbound_request
from agent.tunnel.inputs import ProxyInputs
from agent.tunnel.outcome import Direction, Outcome, Path
from agent.tunnel.pipeline import Flow, HboneRequestDownstream, Pipeline, SocketDownstream
from agent.tunnel.workloads import Workload

log = structlog.get_logger("tunnel.hbone")
STREAM_LIMIT = 1 << 20


async def handle(inputs: ProxyInputs, conn: socket.socket, peer: tuple[str, int],
                 local: tuple[str, int]) -> None:
    """Serve one accepted 15008 connection until it closes."""
    dst_ip = local[0]
    pipeline = Pipeline(inputs)
    dst = inputs.workloads.local(dst_ip)
    if not inputs.hbone or inputs.identities is None or dst is None:
        reason = ("HBONE refused: the tunnel runs in plain mode" if not inputs.hbone
                  else "HBONE for a pod not enrolled on this node")
        log.info(reason, dst=dst_ip, peer=peer[0])
        rec = ConnectionRecord(direction=Direction.INBOUND, path=Path.HBONE, src=peer[0],
                               dst=fmt_addr(dst_ip, local[1]), src_ip=peer[0], dst_ip=dst_ip)
        pipeline.refuse(rec, SocketDownstream(conn), Outcome.REFUSED, reason)
        return
    ctx = inputs.identities.server_context(parse_spiffe_id(dst.identity))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=STREAM_LIMIT)
    protocol = asyncio.StreamReaderProtocol(reader)
    try:
        transport, _ = await loop.connect_accepted_socket(
            lambda: protocol, conn, ssl=ctx, ssl_handshake_timeout=inputs.tls_handshake_timeout)
    except (ssl.SSLError, OSError, TimeoutError, asyncio.TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        log.info("HBONE TLS handshake failed", peer=peer[0], dst=dst_ip, reason=reason)
        with contextlib.suppress(OSError):
            conn.close()
        _tls_failed(pipeline, peer, local, dst, f"TLS handshake failed: {reason}")
        return
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    try:
        # The client's certificate as the SPIFFE profile wants it (trust domain, one
        # URI SAN, ...): part of the TLS handshake for ztunnel (its verifier), so a
        # failure is a TLS failure. serve_hbone checks the same again.
        peer_identity_of(writer, PeerRole.CLIENT, trust_domain=inputs.cfg.trust_domain)
    except HbonePeerIdentityError as exc:
        log.warning("hbone connection refused", peer=peer[0], dst=dst_ip, error=str(exc))
        transport.abort()
        _tls_failed(pipeline, peer, local, dst, f"peer certificate refused: {exc}")
        return

    async def on_stream(request: HboneServerRequest) -> None:
        await _serve_stream(inputs, pipeline, request, dst, dst_ip, peer)

    await serve_hbone(reader, writer, on_stream=on_stream, trust_domain=inputs.cfg.trust_domain,
                      draining=inputs.draining)


def _tls_failed(pipeline: Pipeline, peer: tuple[str, int], local: tuple[str, int],
                dst: Workload, reason: str) -> None:
    rec = ConnectionRecord(direction=Direction.INBOUND, path=Path.HBONE, src=peer[0],
                           dst=fmt_addr(local[0], local[1]), src_ip=peer[0], dst_ip=local[0],
                           dst_identity=dst.identity)
    pipeline.refuse(rec, None, Outcome.TLS_FAILED, reason)


def _target_port(inputs: ProxyInputs, authority: str, dst: Workload,
                 dst_ip: str) -> tuple[int | None, Outcome, str, int]:
    """(target port, or None with the refusal's outcome, reason and status)."""
    try:
        host, port, is_ip = hbone.parse_hbone_address(authority)
    except ValueError as exc:
        return None, Outcome.REFUSED, f"bad :authority {authority!r}: {exc}", 400
    if is_ip:
        if normalize_ip(host) != normalize_ip(dst_ip):
            return (None, Outcome.REFUSED,
                    f":authority {authority} is not this connection's destination {dst_ip}", 400)
        return port, Outcome.OK, "", 200
    service = inputs.workloads.service(host, dst.namespace)
    if service is None:
        return None, Outcome.CONNECT_FAILED, f"no service with hostname {host}", 503
    target = service.target_port(port, dst_ip)
    if target is None:
        return (None, Outcome.CONNECT_FAILED,
                f"service {host} has no port {port} served by {dst_ip}", 503)
    return target, Outcome.OK, "", 200


async def _serve_stream(inputs: ProxyInputs, pipeline: Pipeline,
                        request: HboneServerRequest, dst: Workload, dst_ip: str,
                        peer: tuple[str, int]) -> None:
    src_ip = normalize_ip(peer[0])
    identity = str(request.peer_identity) if request.peer_identity else None
    trace = TraceParent.from_header(request.header(TRACEPARENT_HEADER))
    rec = ConnectionRecord(direction=Direction.INBOUND, path=Path.HBONE, src=src_ip,
                           dst=request.authority, src_ip=src_ip, dst_ip=dst_ip,
                           src_identity=identity, dst_identity=dst.identity,
                           traceparent=trace.header())
    downstream = HboneRequestDownstream(request)
    target_port, refusal, reason, status = _target_port(inputs, request.authority, dst, dst_ip)
    if target_port is None:
        pipeline.refuse(rec, downstream, refusal, reason, status=status)
        return
    if target_port in inputs.tunnel_ports:
        # ztunnel find_inbound_upstream: illegal_ports -> SelfCall -> 503.
        pipeline.refuse(rec, downstream, Outcome.REFUSED,
                        f"CONNECT to the tunnel's own port {target_port}", status=503)
        return
    owner = inputs.workloads.lookup(src_ip)
    if owner is not None and owner.identity != identity:
        pipeline.refuse(rec, downstream, Outcome.IDENTITY_ERROR,
                        f"peer {identity} connects from {src_ip}, which belongs to "
                        f"{owner.identity}")
        return
    admission = inbound_request(src_ip, identity, dst, dst_ip, target_port)
    await pipeline.run(Flow(rec, downstream, admission=admission,
                            dial=lambda: dial_pod(inputs, dst_ip, target_port, src_ip)))
