"""Binding documents we cannot read fail closed at the tunnel, in process on loopback
(no root): the model comes from agent/waypoint/config.py ``assign_waypoints`` over
Namespace/Service/Pod/Gateway documents, some of them broken; the tunnel resets what
they could bind (``waypoint_unresolved``, counted as a failed connection, the document
and field in the log line) and never sends it direct, while valid documents still bind
as before (to the stand-in waypoint of test_tunnel_waypoints.py).

The documents, over test_tunnel_waypoints.py's model (its ``waypoint`` fields dropped):

- Service ``echo``: ``istio.io/use-waypoint: waypoint`` (valid) -> the waypoint;
- Service ``direct``: no label, namespace without one -> straight to b2;
- Service ``ghost``: ``istio.io/use-waypoint: Not_A_Name`` -> refused;
- Service ``loopy``: names Gateway ``waypoint2``, whose ``istio.io/waypoint-for`` is
  ``bogus`` (before: "takes no service traffic", so loopy went direct) -> refused;
- Pod ``b2``: ``istio.io/use-waypoint-namespace: Team_B`` -> its address refused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from conftest import A1, APP_PORT, B2, echo, ip, run, start_mesh
from test_tunnel_waypoints import (
    DIRECT,
    ECHO,
    FAILED,
    GHOST,
    LOOPY,
    WP_IP,
    StandInWaypoint,
    _only,
    _refused,
    _setup,
)

from agent.identity.ca import MeshCA
from agent.identity.store import IdentityStore
from agent.model.types import GatewayAddress, Model, UnresolvedBinding
from agent.waypoint.config import assign_waypoints

USE, FOR = "istio.io/use-waypoint", "istio.io/waypoint-for"


def _doc(kind: str, name: str, **labels: str) -> dict[str, Any]:
    return {"kind": kind, "metadata": {"name": name, "namespace": "team-b", "labels": labels}}


def _gateway(name: str, traffic: str) -> dict[str, Any]:
    doc = _doc("Gateway", name, **{FOR: traffic})
    doc["spec"] = {"gatewayClassName": "istio-waypoint", "listeners": [
        {"name": "mesh", "port": 15008, "protocol": "HBONE"}]}
    return doc


def _documents() -> list[dict[str, Any]]:
    return [
        {"kind": "Namespace", "metadata": {"name": "team-b"}},
        _gateway("waypoint", "all"), _gateway("waypoint2", "bogus"),
        _doc("Service", "waypoint", **{"gateway.istio.io/managed": "istio.io-mesh-controller"}),
        _doc("Pod", "waypoint-0", **{"gateway.networking.k8s.io/gateway-name": "waypoint"}),
        _doc("Service", "echo", **{USE: "waypoint"}),
        _doc("Service", "ghost", **{USE: "Not_A_Name"}),
        _doc("Service", "loopy", **{USE: "waypoint2"}),
        _doc("Pod", "b2", **{"istio.io/use-waypoint-namespace": "Team_B"}),
    ]


def _fed(model: Model, wp_port: int) -> Model:
    """The feed's model; the stand-in takes HBONE on a free port, not 15008."""
    bare = Model.build([dataclasses.replace(w, waypoint=None) for w in model.workloads],
                       [dataclasses.replace(s, waypoint=None) for s in model.services])
    fed, problems = assign_waypoints(bare, _documents())
    assert any("Service team-b/ghost: metadata.labels[istio.io/use-waypoint]" in p
               for p in problems), problems

    def port(gw: GatewayAddress | None) -> GatewayAddress | None:
        if gw is None or UnresolvedBinding.of(gw) is not None:
            return gw
        return dataclasses.replace(gw, hbone_mtls_port=wp_port)

    return Model.build([dataclasses.replace(w, waypoint=port(w.waypoint)) for w in fed.workloads],
                       [dataclasses.replace(s, waypoint=port(s.waypoint)) for s in fed.services])


def test_what_a_broken_binding_document_could_bind_is_reset_never_sent_direct(
        tmp_path: Path, mesh_ca: MeshCA) -> None:
    wp_port, model = _setup(tmp_path, mesh_ca)
    model = _fed(model, wp_port)

    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca, model=model) as m:
            wp = StandInWaypoint(IdentityStore(mesh_ca), wp_port, m.ports["hbone"],
                                 {f"{ECHO}:80": f"{ip(B2)}:{APP_PORT}"})
            async with wp.running():
                for vip in (GHOST, LOOPY):
                    assert await _refused(await m.node1.capture(ip(A1), vip, 80)), vip
                assert await _refused(await m.node1.capture(ip(A1), ip(B2)))
                # Valid documents still bind as before.
                peer, data = await echo(*await m.node1.capture(ip(A1), ECHO, 80))
                assert (peer, data) == (WP_IP, b"ping")
                peer, data = await echo(*await m.node1.capture(ip(A1), DIRECT, 80))
                assert (peer, data) == (ip(A1), b"ping")
                await m.node1.drain()
                await m.node2.drain()
            assert [s.authority for s in wp.seen] == [f"{ECHO}:80"]
            # b2 was reached twice only: through the waypoint, and for direct.
            assert sorted(m.servers.peers) == sorted([WP_IP, ip(A1)])
            expected = {
                f"{GHOST}:80": ("ghost", "Service team-b/ghost: "
                                         "metadata.labels[istio.io/use-waypoint]"),
                f"{LOOPY}:80": ("loopy", "Gateway team-b/waypoint2: "
                                         "metadata.labels[istio.io/waypoint-for]"),
                f"{ip(B2)}:{APP_PORT}": (None, "Pod team-b/b2: "
                                               "metadata.labels[istio.io/use-waypoint-namespace]"),
            }
            for original, (service, why) in expected.items():
                entry = _only(m.node1.closed(original_dst=original))
                assert entry["result"] == "waypoint_unresolved", entry
                assert entry["path"] == "waypoint" and entry["response_flags"] == "CONNECT"
                assert entry["policy_decision"] == "deny"
                assert why in entry["reason"] and "never sent direct" in entry["reason"]
                if service is not None:
                    assert m.node1.metric(
                        FAILED, response_flags="CONNECT",
                        destination_service=f"{service}.team-b.svc.cluster.local") == 1
            # Only the two good connections reached node2's tunnel.
            assert len(m.node2.closed(direction="inbound")) == 2

    run(main())

