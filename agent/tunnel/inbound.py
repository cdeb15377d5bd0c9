"""Inbound plaintext (port 15006): TCP for an enrolled pod from outside the mesh.

The datapath hands this listener any new connection to an enrolled pod that the
tunnel did not make itself and that is not for port 15008. ``permissive``
forwards it to the pod from the client's own address after the policy check;
``strict`` refuses it with a reset. A plaintext client has no identity: policy
sees only its address (``ipBlocks``), never an identity looked up from it, and
metrics do not name a source workload for it.

Also the two steps every inbound path shares (15006, 15008 and ``hbone-local``):
the policy request and dialing the pod from the client's address.
"""

from __future__ import annotations

import ipaddress
import socket

from agent.policy import ConnectionRequest, WorkloadRef
from agent.tunnel.connection import ConnectionRecord, fmt_addr
from agent.tunnel.inputs import ProxyInputs
from agent.tunnel.outcome import Direction, Outcome, Path
from agent.tunnel.pipeline import DialError, Flow, Pipeline, SocketDownstream
from agent.tunnel.relay import ByteStream, SocketStream
from agent.tunnel.workloads import Workload


def inbound_request(src_ip: str, src_identity: str | None, dst: Workload, dst_ip: str,
                    dst_port: int) -> ConnectionRequest:
    """What policy is evaluated on for a connection to a pod enrolled here."""
    return ConnectionRequest(src_ip=ipaddress.ip_address(src_ip), src_identity=src_identity,
                             dst_ip=ipaddress.ip_address(dst_ip),
                             dst_port=dst_port,
                             dst_workload=WorkloadRef(dst.name, dst.namespace, dict(dst.labels)))


async def dial_pod(inputs: ProxyInputs, dst_ip: str, dst_port: int,
                   source_ip: str) -> ByteStream:
    """Connect to the pod from the client's own address, so the pod sees the real client."""
    try:
        sock = await inputs.dialer.connect((dst_ip, dst_port), source_ip=source_ip)
    except (OSError, TimeoutError) as exc:
        raise DialError(Outcome.CONNECT_FAILED, str(exc) or type(exc).__name__) from exc
    return SocketStream(sock)


async def handle(inputs: ProxyInputs, conn: socket.socket, peer: tuple[str, int],
                 local: tuple[str, int]) -> None:
    src_ip, src_port = peer[0], peer[1]
    dst_ip, dst_port = local[0], local[1]
    pipeline = Pipeline(inputs)
    rec = ConnectionRecord(direction=Direction.INBOUND, path=Path.PLAIN,
                           src=fmt_addr(src_ip, src_port), dst=fmt_addr(dst_ip, dst_port),
                           src_ip=src_ip, dst_ip=dst_ip)
    downstream = SocketDownstream(conn)
    if dst_port in inputs.tunnel_ports:
        # As ztunnel's inbound_passthrough.rs (illegal_ports -> SelfCall): a direct
        # connection to the tunnel, or one that would loop back into it.
        pipeline.refuse(rec, downstream, Outcome.REFUSED,
                        f"direct connection to the tunnel's port {dst_port} (not captured)")
        return
    dst = inputs.workloads.local(dst_ip)
    rec.dst_identity = dst.identity if dst else None
    if dst is None:
        pipeline.refuse(rec, downstream, Outcome.REFUSED,
                        "destination is not enrolled on this node")
        return
    if inputs.cfg.inbound_mode == "strict" and inputs.hbone:
        pipeline.refuse(rec, downstream, Outcome.REFUSED,
                        "strict mode: plaintext inbound refused")
        return
    request = inbound_request(src_ip, None, dst, dst_ip, dst_port)
    await pipeline.run(Flow(rec, downstream, admission=request,
                            dial=lambda: dial_pod(inputs, dst_ip, dst_port, src_ip)))
