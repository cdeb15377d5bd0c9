"""Outbound (port 15001): connections captured from enrolled pods on this node.

The accepted socket's peer is the client pod and its local address the original
destination. This module only classifies; :class:`~agent.tunnel.pipeline.Pipeline`
carries the connection:

- a direct connection to a tunnel port (not captured: its local port is the
  tunnel's own) is refused, and so is a client that is not an enrolled pod in
  HBONE mode: nothing is ever labelled with an identity on the strength of an
  address alone;
- plain mode, and HBONE mode for a destination outside the mesh
  (``passthrough``): dial the destination from the client's own address;
- a mesh destination on another node (``hbone``): a CONNECT stream on a pooled
  mTLS connection to ``dst:15008`` made from the source pod's own address, with
  the source pod's certificate, checking the server's SPIFFE ID;
- a destination enrolled on this node (``hbone-local``): handed straight to the
  inbound side in process (same policy check, no TLS round trip);
- a Service VIP of the cluster model: one endpoint is picked per connection
  (:func:`agent.model.select.resolve_outbound`, ztunnel outbound.rs
  ``build_request``), the service port mapped to its target port, and the
  connection takes the endpoint's path above (HBONE to ``endpointIP:15008`` with
  ``:authority endpointIP:targetPort`` and ``Forwarded: for=...;host=<hostname>``,
  same node, or a direct dial of a plaintext endpoint); with no healthy endpoint
  the client is reset at once (``no_healthy_upstream``, flag UH);
- a destination bound to a waypoint (``waypoint``; first, as ztunnel's outbound.rs
  ``build_request``): a VIP of a service with a waypoint, or a workload with a
  waypoint when the connection is not service-addressed and does not come from that
  waypoint (:func:`agent.model.select.resolve_waypoint`). HBONE to the waypoint
  instance's ``IP:15008`` with ``:authority`` the original ``VIP:port`` /
  ``podIP:port``, presenting the source pod's certificate and expecting the
  waypoint's SPIFFE ID; metrics name the waypoint as the destination workload and
  the service the client asked for. A waypoint that names nothing, a loop, or a
  binding the feed could not work out (a binding document it could not read) is
  refused (``no_waypoint``, ``waypoint_loop``, ``waypoint_unresolved``): never sent
  direct.
"""

from __future__ import annotations

import socket
import ssl

from agent.hbone import headers as hbone
from agent.hbone.exceptions import HbonePeerIdentityError, HboneRejected, HboneStreamError
from agent.identity.spiffe import parse_spiffe_id
from agent.model.select import (
    OutboundOutcome,
    Upstream,
    WaypointHop,
    WaypointOutcome,
    resolve_outbound,
)
from agent.telemetry.metrics import ServiceRef
from agent.tunnel.connection import ConnectionRecord, fmt_addr
from agent.tunnel.headers import TRACEPARENT_HEADER, TraceParent, baggage_entries
from agent.tunnel.inbound import dial_pod, inbound_request
from agent.tunnel.inputs import ProxyInputs
from agent.tunnel.outcome import Direction, Outcome, Path
from agent.tunnel.pipeline import DialError, Flow, Pipeline, SocketDownstream
from agent.tunnel.relay import ByteStream, HboneByteStream, SocketStream
from agent.tunnel.workloads import Workload


async def handle(inputs: ProxyInputs, conn: socket.socket, peer: tuple[str, int],
                 local: tuple[str, int]) -> None:
    src_ip, src_port = peer[0], peer[1]
    dst_ip, dst_port = local[0], local[1]
    pipeline = Pipeline(inputs)
    rec = ConnectionRecord(direction=Direction.OUTBOUND,
                           path=Path.PASSTHROUGH if inputs.hbone else Path.PLAIN,
                           src=fmt_addr(src_ip, src_port), dst=fmt_addr(dst_ip, dst_port),
                           src_ip=src_ip, dst_ip=dst_ip)
    downstream = SocketDownstream(conn)
    if dst_port == inputs.cfg.outbound_port:
        # Captured connections keep their original destination as the local address;
        # one whose local port is this listener's own came straight at the tunnel.
        pipeline.refuse(rec, downstream, Outcome.REFUSED,
                        f"direct connection to the tunnel's port {dst_port} (not captured)")
        return
    src = inputs.workloads.local(src_ip)
    rec.src_identity = src.identity if src else None
    cluster = inputs.workloads.cluster()
    if cluster is not None and cluster.binds_waypoints:
        hop = cluster.waypoint_hop(src_ip, src, dst_ip, dst_port, inputs.rng)
        if hop.outcome not in (WaypointOutcome.NOT_BOUND, WaypointOutcome.FROM_WAYPOINT):
            await _to_waypoint(inputs, pipeline, rec, downstream, src, hop)
            return
    if cluster is not None and cluster.is_vip(dst_ip):
        up = resolve_outbound(cluster.model, cluster.source(src_ip, src), dst_ip, dst_port,
                              inputs.rng)
        await _to_service(inputs, pipeline, rec, downstream, src, up)
        return
    if inputs.hbone and inputs.workloads.is_mesh_destination(dst_ip):
        if src is None:
            rec.path = Path.HBONE
            pipeline.refuse(rec, downstream, Outcome.IDENTITY_ERROR,
                            "source is not a workload enrolled on this node")
            return
        local_dst = inputs.workloads.local(dst_ip)
        if local_dst is not None:
            await _same_node(inputs, pipeline, rec, downstream, src, local_dst, dst_port)
        else:
            await _hbone(inputs, pipeline, rec, downstream, src, dst_port)
        return
    await pipeline.run(Flow(rec, downstream, dial=lambda: _dial_direct(inputs, rec, dst_port)))


async def _to_service(inputs: ProxyInputs, pipeline: Pipeline, rec: ConnectionRecord,
                      downstream: SocketDownstream, src: Workload | None,
                      up: Upstream) -> None:
    """Carry a connection to a Service VIP to the endpoint ``up`` chose."""
    if up.service is not None:
        rec.service = ServiceRef(up.service.name, up.service.namespace, up.service.hostname)
        rec.original_dst = rec.dst
    if up.outcome is OutboundOutcome.NO_HEALTHY_UPSTREAM:
        reason = up.reason.value if up.reason else "no healthy upstream"
        pipeline.refuse(rec, downstream, Outcome.NO_HEALTHY_UPSTREAM,
                        f"no healthy upstream: {reason}")
        return
    if up.outcome is OutboundOutcome.PASSTHROUGH:  # a Passthrough service: as addressed
        port = up.original[1]
        await pipeline.run(Flow(rec, downstream, dial=lambda: _dial_direct(inputs, rec, port)))
        return
    assert up.address is not None
    rec.dst_ip, target_port = str(up.address), up.port
    rec.dst = fmt_addr(rec.dst_ip, target_port)
    if not (inputs.hbone and up.hbone):
        # Plain mode, or a plaintext endpoint outside the mesh: dial it directly.
        await pipeline.run(Flow(rec, downstream,
                                dial=lambda: _dial_direct(inputs, rec, target_port)))
        return
    if src is None:
        rec.path = Path.HBONE
        pipeline.refuse(rec, downstream, Outcome.IDENTITY_ERROR,
                        "source is not a workload enrolled on this node")
        return
    local_dst = inputs.workloads.local(rec.dst_ip)
    if local_dst is not None:  # same path as any same-node connection, policy included
        await _same_node(inputs, pipeline, rec, downstream, src, local_dst, target_port)
        return
    forwarded = hbone.format_forwarded_for(rec.src_ip)
    if up.service is not None:
        forwarded += f";host={up.service.hostname}"
    await _hbone(inputs, pipeline, rec, downstream, src, target_port, forwarded=forwarded)


async def _to_waypoint(inputs: ProxyInputs, pipeline: Pipeline, rec: ConnectionRecord,
                       downstream: SocketDownstream, src: Workload | None,
                       hop: WaypointHop) -> None:
    """Carry a connection to the waypoint ``hop`` names, or refuse it (fail closed)."""
    rec.path = Path.WAYPOINT
    rec.original_dst = rec.dst
    if hop.service is not None:
        rec.service = ServiceRef(hop.service.name, hop.service.namespace, hop.service.hostname)
    if hop.gateway is not None:
        rec.waypoint = str(hop.gateway.destination)
    if hop.outcome is WaypointOutcome.MISSING:
        pipeline.refuse(rec, downstream, Outcome.NO_WAYPOINT,
                        f"{hop.reason}: refused, never sent direct (fail closed)")
        return
    if hop.outcome is WaypointOutcome.UNRESOLVED:
        pipeline.refuse(rec, downstream, Outcome.WAYPOINT_UNRESOLVED,
                        f"{hop.reason}: refused, never sent direct (fail closed); fix that "
                        "document")
        return
    if hop.outcome is WaypointOutcome.LOOP:
        pipeline.refuse(rec, downstream, Outcome.WAYPOINT_LOOP,
                        f"{hop.reason}: refused (fail closed)")
        return
    if not inputs.hbone:
        pipeline.refuse(rec, downstream, Outcome.NO_WAYPOINT,
                        "the destination uses a waypoint, which only HBONE reaches; the "
                        "tunnel runs in plain mode: refused (fail closed)")
        return
    if src is None:
        pipeline.refuse(rec, downstream, Outcome.IDENTITY_ERROR,
                        "source is not a workload enrolled on this node")
        return
    cluster = inputs.workloads.cluster()
    assert hop.address is not None and hop.instance is not None and cluster is not None
    rec.dst_ip = str(hop.address)
    rec.dst = fmt_addr(rec.dst_ip, hop.port)
    forwarded = hbone.format_forwarded_for(rec.src_ip)
    if hop.service is not None:
        forwarded += f";host={hop.service.hostname}"
    await _hbone(inputs, pipeline, rec, downstream, src, hop.original[1], forwarded=forwarded,
                 authority=hop.authority(), peer_port=hop.port,
                 expected=cluster.tunnel_workload(hop.instance).identity)


async def _dial_direct(inputs: ProxyInputs, rec: ConnectionRecord,
                       dst_port: int) -> ByteStream:
    try:
        sock = await inputs.dialer.connect((rec.dst_ip, dst_port), source_ip=rec.src_ip)
    except (OSError, TimeoutError) as exc:
        raise DialError(Outcome.CONNECT_FAILED, str(exc) or type(exc).__name__) from exc
    return SocketStream(sock)


async def _same_node(inputs: ProxyInputs, pipeline: Pipeline, rec: ConnectionRecord,
                     downstream: SocketDownstream, src: Workload, dst: Workload,
                     dst_port: int) -> None:
    rec.path = Path.HBONE_LOCAL
    rec.dst_identity = dst.identity
    request = inbound_request(rec.src_ip, src.identity, dst, rec.dst_ip, dst_port)
    await pipeline.run(Flow(rec, downstream, admission=request,
                            dial=lambda: dial_pod(inputs, rec.dst_ip, dst_port, rec.src_ip)))


async def _hbone(inputs: ProxyInputs, pipeline: Pipeline, rec: ConnectionRecord,
                 downstream: SocketDownstream, src: Workload, dst_port: int,
                 forwarded: str | None = None, *, authority: str | None = None,
                 peer_port: int | None = None, expected: str | None = None) -> None:
    """HBONE to ``rec.dst_ip`` (port ``peer_port``, default the HBONE port).
    ``forwarded``: a whole ``Forwarded`` value (a Service's carries ``host=``);
    default ``for="<source ip>"``. ``authority`` (default ``dst:dst_port``) and
    ``expected`` (the server's SPIFFE ID; default the model's workload at dst) are
    given for a waypoint, whose path this keeps."""
    if rec.path is not Path.WAYPOINT:
        rec.path = Path.HBONE
    if expected is None:
        dst = inputs.workloads.remote(rec.dst_ip)
        expected = dst.identity if dst else None
    rec.dst_identity = expected
    trace = TraceParent.new()
    rec.traceparent = trace.header()

    async def dial() -> ByteStream:
        pool = inputs.pool
        assert pool is not None
        src_ip = rec.src_ip
        try:
            stream = await pool.open_stream(
                source=parse_spiffe_id(src.identity),
                peer=(rec.dst_ip, peer_port or inputs.cfg.hbone_port),
                authority=authority or hbone.format_authority(rec.dst_ip, dst_port),
                forwarded_for=src_ip if forwarded is None else None,
                baggage=hbone.format_baggage(baggage_entries(src)),
                expected_peer=parse_spiffe_id(expected) if expected else None,
                extra_headers=[(TRACEPARENT_HEADER, rec.traceparent or ""),
                               *([(hbone.FORWARDED_HEADER, forwarded)] if forwarded else [])],
                # The outer connection leaves from the source pod's own address, as
                # ztunnel's does (it connects from inside the pod's netns:
                # src/proxy/pool.rs freebind_connect(None, ...)); replies come back
                # through the pod's veth to this socket (see README "Tunnel").
                socket_factory=lambda family: inputs.dialer.socket_for(family, src_ip),
                source_ip=src_ip)
        except HboneRejected as exc:
            # ztunnel's inbound answers a policy denial 401; an older peer may say 403.
            outcome = Outcome.DENIED if exc.status in (401, 403) else Outcome.CONNECT_FAILED
            raise DialError(outcome, f"peer answered {exc.status}") from exc
        except (ssl.SSLError, HbonePeerIdentityError) as exc:
            raise DialError(Outcome.TLS_FAILED, str(exc) or type(exc).__name__) from exc
        except (HboneStreamError, OSError, TimeoutError, ValueError) as exc:
            raise DialError(Outcome.CONNECT_FAILED, str(exc) or type(exc).__name__) from exc
        if stream.peer_identity is not None:
            rec.dst_identity = str(stream.peer_identity)
        return HboneByteStream(stream)

    await pipeline.run(Flow(rec, downstream, dial=dial))

