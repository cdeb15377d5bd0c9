"""The tunnel's side of waypoints, in process on loopback (no root): a captured
connection bound to a waypoint goes over HBONE to the waypoint instead of its
destination (agent/tunnel/outbound.py ``_to_waypoint``, agent/model/select.py
``resolve_waypoint``; ztunnel src/proxy/outbound.rs ``build_request``).

The model: the conftest pods, plus a waypoint workload ``team-b/waypoint``
(127.0.1.9, node1, never enrolled) behind its Service
``waypoint.team-b.svc.cluster.local``, and

- ``echo`` (10.96.0.20:80 -> b2:18080) bound to that Service (hostname form);
- ``direct`` (10.96.0.22:80 -> b2) without a waypoint: service-addressed, so b2's
  own workload waypoint is not used either;
- ``ghost`` (10.96.0.21:80 -> b2) bound to a waypoint nobody runs: refused;
- ``loopy`` (10.96.0.23:80 -> b2) bound to ``waypoint2`` (127.0.1.10), which is
  itself bound to a waypoint: refused;
- b2 with a workload waypoint (address form ``/127.0.1.9``).

The waypoint is a stand-in with the waypoint's real certificate: an HBONE server
that records each CONNECT, then carries it on over HBONE under its own identity to
the destination's node tunnel (as the waypoint's upstream does), so node2's
inbound sees the waypoint as the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import (
    A1,
    A2,
    APP_PORT,
    B1,
    B2,
    TRUST_DOMAIN,
    echo,
    free_ports,
    identity,
    ip,
    run,
    start_mesh,
)

from agent.hbone.pool import HbonePool
from agent.hbone.server import HboneServerRequest, serve_hbone
from agent.identity.ca import MeshCA
from agent.identity.spiffe import parse_spiffe_id
from agent.identity.store import IdentityStore
from agent.model.loader import load_model_text
from agent.model.types import Model
from agent.tunnel.relay import CopyCounts, HboneByteStream, copy_bidirectional
from agent.tunnel.workloads import Workload

WP_IP, WP2_IP = "127.0.1.9", "127.0.1.10"
WP_ID = identity("team-b", "waypoint")
ECHO, GHOST, DIRECT, LOOPY = "10.96.0.20", "10.96.0.21", "10.96.0.22", "10.96.0.23"
WP_HOST = "waypoint.team-b.svc.cluster.local"
FAILED = "istio_tcp_connections_failed_total"
OPENED = "istio_tcp_connections_opened_total"


def _uid(name: str, namespace: str) -> str:
    return f"Kubernetes//v1/Pod/{namespace}/{name}"


def _pod(w: Workload, node: str, tail: str = "") -> str:
    return (f"- uid: {_uid(w.name, w.namespace)}\n  name: {w.name}\n"
            f"  namespace: {w.namespace}\n  serviceAccount: {w.service_account}\n"
            f"  workloadIps: [\"{ip(w)}\"]\n  protocol: HBONE\n  node: {node}\n{tail}")


def _svc(name: str, vip: str, waypoint: str | None) -> str:
    text = (f"- name: {name}\n  namespace: team-b\n  hostname: {name}.team-b.svc.cluster.local\n"
            f"  vips: [\"/{vip}\"]\n  ports: {{80: {APP_PORT}}}\n")
    return text + (f"  waypoint: {waypoint}\n" if waypoint else "")


def model_yaml(wp_port: int) -> str:
    gw = f"{{destination: \"team-b/{WP_HOST}\", hboneMtlsPort: {wp_port}}}"
    b2_services = ", ".join(f'"team-b/{s}.team-b.svc.cluster.local": {{80: {APP_PORT}}}'
                            for s in ("echo", "ghost", "direct", "loopy"))
    return (
        "workloads:\n"
        + _pod(A1, "node1", "  services: {}\n") + _pod(B1, "node1", "  services: {}\n")
        + _pod(A2, "node2", "  services: {}\n")
        + _pod(B2, "node2", f"  services: {{{b2_services}}}\n"
               f"  waypoint: {{destination: \"/{WP_IP}\", hboneMtlsPort: {wp_port}}}\n")
        + f"- uid: {_uid('waypoint-0', 'team-b')}\n  name: waypoint-0\n  namespace: team-b\n"
          f"  serviceAccount: waypoint\n  workloadIps: [\"{WP_IP}\"]\n  protocol: HBONE\n"
          f"  node: node1\n  services: {{\"team-b/{WP_HOST}\": {{{wp_port}: {wp_port}}}}}\n"
        + f"- uid: {_uid('waypoint2-0', 'team-b')}\n  name: waypoint2-0\n  namespace: team-b\n"
          f"  serviceAccount: waypoint2\n  workloadIps: [\"{WP2_IP}\"]\n  protocol: HBONE\n"
          f"  node: node1\n  services: {{}}\n  waypoint: {gw}\n"
        + "services:\n"
        + f"- name: waypoint\n  namespace: team-b\n  hostname: {WP_HOST}\n  vips: []\n"
          f"  ports: {{{wp_port}: {wp_port}}}\n"
        + _svc("echo", ECHO, gw)
        + _svc("ghost", GHOST, f"{{destination: \"team-b/gone.team-b.svc.cluster.local\", "
                               f"hboneMtlsPort: {wp_port}}}")
        + _svc("direct", DIRECT, None)
        + _svc("loopy", LOOPY, f"{{destination: \"/{WP2_IP}\", hboneMtlsPort: {wp_port}}}")
    )


@dataclass
class Seen:
    authority: str
    peer: str | None
    forwarded: str | None


@dataclass
class StandInWaypoint:
    """An HBONE server under the waypoint's identity on ``WP_IP:port``; each CONNECT
    is recorded and carried on to ``<authority's pod>`` via that pod's node tunnel
    (``podIP:hbone_port``), from the waypoint's own address, under its identity.
    ``vips`` maps a VIP ``:authority`` to the pod behind it."""

    store: IdentityStore
    port: int
    hbone_port: int
    vips: dict[str, str]
    seen: list[Seen] = field(default_factory=list)

    async def _stream(self, request: HboneServerRequest) -> None:
        self.seen.append(Seen(request.authority, str(request.peer_identity)
                              if request.peer_identity else None, request.header("forwarded")))
        target = self.vips.get(request.authority, request.authority)
        host = target.rpartition(":")[0]
        upstream = await self.pool.open_stream(
            source=parse_spiffe_id(WP_ID), peer=(host, self.hbone_port), authority=target,
            forwarded_for=None, local_addr=(WP_IP, 0), source_ip=WP_IP)
        await copy_bidirectional(HboneByteStream(request.accept()), HboneByteStream(upstream),
                                 CopyCounts())

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[StandInWaypoint]:
        self.pool = HbonePool(self.store.client_context, trust_domain=TRUST_DOMAIN)
        ctx = self.store.server_context(parse_spiffe_id(WP_ID))

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await serve_hbone(reader, writer, on_stream=self._stream, trust_domain=TRUST_DOMAIN)

        server = await asyncio.start_server(connection, WP_IP, self.port, ssl=ctx)
        try:
            yield self
        finally:
            server.close()
            await self.pool.close()


async def _refused(stream: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> bool:
    reader, writer = stream
    try:
        data = await asyncio.wait_for(reader.read(), 5)
    except (ConnectionResetError, OSError):
        data = b""
    writer.close()
    return data == b""


def _setup(tmp_path: Path, mesh_ca: MeshCA) -> tuple[int, Model]:
    (wp_port,) = free_ports(1, [WP_IP, WP2_IP])
    return wp_port, load_model_text(model_yaml(wp_port), "model.yaml")


def _only(entries: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(entries) == 1, entries
    return entries[0]


def test_a_vip_with_a_waypoint_goes_to_the_waypoint_not_the_endpoint(
        tmp_path: Path, mesh_ca: MeshCA) -> None:
    wp_port, model = _setup(tmp_path, mesh_ca)

    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca, model=model) as m:
            wp = StandInWaypoint(IdentityStore(mesh_ca), wp_port, m.ports["hbone"],
                                 {f"{ECHO}:80": f"{ip(B2)}:{APP_PORT}"})
            async with wp.running():
                peer, data = await echo(*await m.node1.capture(ip(A1), ECHO, 80))
                # b2 was reached from the waypoint's address: the waypoint carried it.
                assert (peer, data) == (WP_IP, b"ping")
                await m.node1.drain()
                await m.node2.drain()
            # The waypoint got the original VIP:port, the client pod's own identity.
            (seen,) = wp.seen
            assert seen.authority == f"{ECHO}:80"
            assert seen.peer == A1.identity
            assert seen.forwarded == f'for="{ip(A1)}";host=echo.team-b.svc.cluster.local'
            out = _only(m.node1.closed(direction="outbound"))
            assert out["path"] == "waypoint" and out["result"] == "ok"
            assert out["dst"] == f"{WP_IP}:{wp_port}" and out["original_dst"] == f"{ECHO}:80"
            assert out["dst_identity"] == WP_ID and out["src_identity"] == A1.identity
            assert out["service"] == "echo.team-b.svc.cluster.local"
            assert out["waypoint"] == f"team-b/{WP_HOST}"
            # Metrics name the waypoint as the destination workload, and the service.
            assert m.node1.metric(OPENED, reporter="source", destination_workload="waypoint-0",
                                  destination_principal=WP_ID,
                                  destination_service="echo.team-b.svc.cluster.local",
                                  connection_security_policy="mutual_tls") == 1
            # node2's tunnel sees the waypoint as the source (L4 policy applies to it).
            inbound = _only(m.node2.closed(direction="inbound"))
            assert inbound["src_identity"] == WP_ID and inbound["src"] == WP_IP
            assert inbound["dst"] == f"{ip(B2)}:{APP_PORT}" and inbound["result"] == "ok"

    run(main())


def test_a_pod_address_goes_to_its_workload_waypoint_but_a_service_address_does_not(
        tmp_path: Path, mesh_ca: MeshCA) -> None:
    wp_port, model = _setup(tmp_path, mesh_ca)

    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca, model=model) as m:
            wp = StandInWaypoint(IdentityStore(mesh_ca), wp_port, m.ports["hbone"], {})
            async with wp.running():
                assert await echo(*await m.node1.capture(ip(A1), ip(B2))) == \
                    (WP_IP, b"ping")
                # Service-addressed, service without a waypoint: straight to b2.
                assert await echo(*await m.node1.capture(ip(A1), DIRECT, 80)) == \
                    (ip(A1), b"ping")
                await m.node1.drain()
            assert [s.authority for s in wp.seen] == [f"{ip(B2)}:{APP_PORT}"]
            to_pod = _only(m.node1.closed(original_dst=f"{ip(B2)}:{APP_PORT}"))
            assert to_pod["path"] == "waypoint" and to_pod["waypoint"] == f"/{WP_IP}"
            direct = _only(m.node1.closed(original_dst=f"{DIRECT}:80"))
            assert direct["path"] == "hbone" and "waypoint" not in direct

    run(main())


def test_a_missing_waypoint_or_a_loop_fails_closed(tmp_path: Path, mesh_ca: MeshCA) -> None:
    wp_port, model = _setup(tmp_path, mesh_ca)

    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca, model=model) as m:
            wp = StandInWaypoint(IdentityStore(mesh_ca), wp_port, m.ports["hbone"], {})
            async with wp.running():
                assert await _refused(await m.node1.capture(ip(A1), GHOST, 80))
                assert await _refused(await m.node1.capture(ip(A1), LOOPY, 80))
                await m.node1.drain()
            assert wp.seen == [] and m.servers.peers == []  # never sent anywhere
            ghost = _only(m.node1.closed(original_dst=f"{GHOST}:80"))
            assert ghost["result"] == "no_waypoint" and ghost["path"] == "waypoint"
            assert ghost["response_flags"] == "CONNECT" and ghost["policy_decision"] == "deny"
            assert "team-b/gone.team-b.svc.cluster.local not found" in ghost["reason"]
            loop = _only(m.node1.closed(original_dst=f"{LOOPY}:80"))
            assert loop["result"] == "waypoint_loop" and loop["waypoint"] == f"/{WP2_IP}"
            assert m.node1.metric(FAILED, response_flags="CONNECT",
                                  destination_service="ghost.team-b.svc.cluster.local") == 1
            assert m.node1.metric(FAILED, response_flags="CONNECT",
                                  destination_service="loopy.team-b.svc.cluster.local") == 1
            assert m.node2.closed() == []

    run(main())


def test_plain_mode_never_bypasses_a_waypoint(tmp_path: Path, mesh_ca: MeshCA) -> None:
    model = _setup(tmp_path, mesh_ca)[1]

    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca, model=model, mode="plain") as m:
            assert await _refused(await m.node1.capture(ip(A1), ECHO, 80))
            await m.node1.drain()
            entry = _only(m.node1.closed(original_dst=f"{ECHO}:80"))
            assert entry["result"] == "no_waypoint" and "plain mode" in entry["reason"]
            assert m.servers.peers == []

    run(main())


def test_the_waypoint_instance_on_this_node_stays_in_the_merged_model(
        tmp_path: Path, mesh_ca: MeshCA) -> None:
    """Waypoint pods are never enrolled: node1's merge keeps them (an unenrolled
    workload claiming node1 is otherwise dropped) and knows their identity."""
    model = _setup(tmp_path, mesh_ca)[1]

    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca, model=model) as m:
            found = m.node1.inputs.workloads.remote(WP_IP)
            assert found is not None and found.identity == WP_ID
            cluster = m.node1.inputs.workloads.cluster()
            assert cluster.workload_at(WP_IP) is not None
            assert ipaddress.ip_address(WP_IP) in cluster.workload_at(WP_IP).workload_ips

    run(main())


def test_a_connection_from_the_destinations_own_waypoint_is_not_sent_back(
        tmp_path: Path, mesh_ca: MeshCA) -> None:
    """The waypoint enrolled on node1 (a sandwich, as ztunnel's check_from_waypoint
    has in mind): its own connection to b2, whose workload waypoint it is, goes to b2."""
    wp_port, model = _setup(tmp_path, mesh_ca)
    waypoint_pod = Workload("waypoint-0", "team-b", "waypoint", (WP_IP,), WP_ID)

    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca, model=model,
                              extra_local={"node1": (waypoint_pod,)}) as m:
            wp = StandInWaypoint(IdentityStore(mesh_ca), wp_port, m.ports["hbone"], {})
            async with wp.running():
                assert await echo(*await m.node1.capture(WP_IP, ip(B2))) == (WP_IP, b"ping")
                # Anyone else to the same address still goes to the waypoint.
                assert await echo(*await m.node1.capture(ip(B1), ip(B2))) == (WP_IP, b"ping")
                await m.node1.drain()
            assert [s.peer for s in wp.seen] == [B1.identity]
            direct = _only(m.node1.closed(direction="outbound", src_identity=WP_ID))
            assert direct["path"] == "hbone" and "waypoint" not in direct
            assert direct["dst"] == f"{ip(B2)}:{APP_PORT}"

    run(main())
