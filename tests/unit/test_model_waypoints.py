"""Waypoints in the cluster model (pure): ztunnel's ``GatewayAddress`` on Service and
Workload read and written in local-config YAML, strict errors, the merge keeping
never-enrolled waypoint pods, the waypoint step of outbound resolution
(agent/model/select.py ``resolve_waypoint``), and the feed that fills the fields
from binding documents (agent/waypoint/config.py ``assign_waypoints``)."""

from __future__ import annotations

import ipaddress
import json
import random
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.model.commands import warnings
from agent.model.loader import ModelLoadError, load_model_text, model_to_yaml
from agent.model.merge import ConflictKind, merge_local_workloads, workload_from_enrollment
from agent.model.select import WaypointOutcome, resolve_waypoint
from agent.model.types import GatewayAddress, NamespacedHostname, NetworkAddress
from agent.waypoint.config import assign_waypoints

WP_HOST = "waypoint.apps.svc.cluster.local"
MODEL = f"""\
workloads:
- uid: c1//v1/Pod/apps/web-1
  name: web-1
  namespace: apps
  workloadIps: ["10.0.1.5"]
  protocol: HBONE
  node: node2
  services: {{"apps/web.apps.svc.cluster.local": {{80: 8080}}}}
  waypoint: {{destination: "/10.0.9.1", hboneMtlsPort: 15008}}
- uid: c1//v1/Pod/apps/waypoint-1
  name: waypoint-1
  namespace: apps
  serviceAccount: waypoint
  workloadIps: ["10.0.9.1", "fd00::9:1"]
  protocol: HBONE
  node: node1
  services: {{"apps/{WP_HOST}": {{15008: 15008}}}}
- uid: c1//v1/Pod/front/client
  name: client
  namespace: front
  workloadIps: ["10.0.2.7"]
  protocol: HBONE
  node: node1
  services: {{}}
services:
- name: web
  namespace: apps
  hostname: web.apps.svc.cluster.local
  vips: ["/10.96.0.10"]
  ports: {{80: 8080}}
  waypoint: {{destination: "apps/{WP_HOST}", hboneMtlsPort: 15008}}
- name: waypoint
  namespace: apps
  hostname: {WP_HOST}
  vips: []
  ports: {{15008: 15008}}
"""


def _errors(text: str) -> list[str]:
    with pytest.raises(ModelLoadError) as info:
        load_model_text(text, "m.yaml")
    return [f"m.yaml: {i}" for i in info.value.issues]


def test_both_waypoint_forms_load_and_round_trip() -> None:
    model = load_model_text(MODEL, "m.yaml")
    web = model.services[0]
    assert web.waypoint == GatewayAddress(NamespacedHostname("apps", WP_HOST), 15008)
    pod = model.workloads[0]
    assert pod.waypoint == GatewayAddress(
        NetworkAddress("", ipaddress.ip_address("10.0.9.1")), 15008)
    again = load_model_text(model_to_yaml(model), "again.yaml")
    assert again == model
    assert [w.uid for w in again.waypoint_instances(web.waypoint)] == \
        ["c1//v1/Pod/apps/waypoint-1"]
    assert model.waypoint_uids() == {"c1//v1/Pod/apps/waypoint-1"}


@pytest.mark.parametrize(("edit", "expected"), [
    ((", hboneMtlsPort: 15008}\n- uid: c1//v1/Pod/apps/waypoint-1",
      "}\n- uid: c1//v1/Pod/apps/waypoint-1"),
     "m.yaml: workloads[0].waypoint.hboneMtlsPort (workload c1//v1/Pod/apps/web-1): "
     "required field is missing"),
    (('destination: "/10.0.9.1"', 'destination: "10.0.9.1"'),
     "workloads[0].waypoint.destination (workload c1//v1/Pod/apps/web-1): '10.0.9.1' is "
     "neither network/IP nor namespace/hostname"),
    ((f'destination: "apps/{WP_HOST}"', 'destination: "Apps/waypoint"'),
     "services[0].waypoint.destination (service apps/web.apps.svc.cluster.local): 'Apps' "
     "is not a namespace"),
    ((f'destination: "apps/{WP_HOST}", hboneMtlsPort: 15008',
      f'destination: "apps/{WP_HOST}", hboneMtlsPort: 0'),
     "services[0].waypoint.hboneMtlsPort (service apps/web.apps.svc.cluster.local): HBONE "
     "port 0 is not in 1..65535"),
    ((f'destination: "apps/{WP_HOST}", hboneMtlsPort: 15008',
      f'destination: "apps/{WP_HOST}", hboneMtlsPort: 15008, port: 1'),
     "services[0].waypoint.port (service apps/web.apps.svc.cluster.local): unknown field"),
    ((f'{{destination: "apps/{WP_HOST}", hboneMtlsPort: 15008}}', '"apps/waypoint"'),
     "services[0].waypoint (service apps/web.apps.svc.cluster.local): must be a mapping"),
    (('destination: "/10.0.9.1"', "destination: 7"),
     "workloads[0].waypoint.destination (workload c1//v1/Pod/apps/web-1): must be a"),
])
def test_bad_waypoints_name_file_entry_and_field(edit: tuple[str, str], expected: str) -> None:
    old, new = edit
    assert old in MODEL, old
    messages = _errors(MODEL.replace(old, new, 1))
    assert any(expected in m for m in messages), messages


def test_merge_keeps_the_unenrolled_waypoint_pod_and_the_workload_waypoint() -> None:
    model = load_model_text(MODEL, "m.yaml")
    client = workload_from_enrollment(name="client", namespace="front", service_account="c",
                                      addresses=["10.0.2.7"], node="node1", cluster_id="c1")
    merged, conflicts = merge_local_workloads(model, [client], "node1")
    assert merged.workload_by_uid("c1//v1/Pod/apps/waypoint-1") is not None
    assert all(c.kind is not ConflictKind.NOT_ENROLLED for c in conflicts)
    # An enrolled pod keeps the waypoint only the model knows.
    web = workload_from_enrollment(name="web-1", namespace="apps", service_account="web",
                                   addresses=["10.0.1.5"], node="node2", cluster_id="c1")
    merged2, _ = merge_local_workloads(model, [web], "node2")
    found = merged2.workload_by_uid("c1//v1/Pod/apps/web-1")
    assert found is not None and found.waypoint == model.workloads[0].waypoint


def _client(model: Any) -> Any:
    return model.workload_by_uid("c1//v1/Pod/front/client")


def test_resolve_waypoint_as_build_request() -> None:
    model = load_model_text(MODEL, "m.yaml")
    rng = random.Random(1)
    client = _client(model)
    # A VIP of a service with a waypoint: to the waypoint, :authority the VIP:port, and
    # the waypoint address of the client's family.
    hop = resolve_waypoint(model, client, "10.96.0.10", 80, rng)
    assert hop.outcome is WaypointOutcome.WAYPOINT and hop.authority() == "10.96.0.10:80"
    assert (str(hop.address), hop.port) == ("10.0.9.1", 15008)
    assert hop.instance is not None and hop.instance.identity() == \
        "spiffe://cluster.local/ns/apps/sa/waypoint"
    assert hop.service is not None and hop.service.name == "web"
    # The pod's address (not service-addressed): its workload waypoint.
    hop = resolve_waypoint(model, client, "10.0.1.5", 8080, rng)
    assert hop.outcome is WaypointOutcome.WAYPOINT and hop.authority() == "10.0.1.5:8080"
    assert hop.service is None and hop.target is not None
    # From the waypoint itself (its identity and address): not sent back to it.
    waypoint = model.workload_by_uid("c1//v1/Pod/apps/waypoint-1")
    hop = resolve_waypoint(model, waypoint, "10.0.1.5", 8080, rng,
                           src_identity="spiffe://cluster.local/ns/apps/sa/waypoint",
                           src_ip="10.0.9.1")
    assert hop.outcome is WaypointOutcome.FROM_WAYPOINT
    # Its identity from another address is not the waypoint (check_from_waypoint wants both).
    hop = resolve_waypoint(model, client, "10.0.1.5", 8080, rng,
                           src_identity="spiffe://cluster.local/ns/apps/sa/waypoint",
                           src_ip="10.0.2.7")
    assert hop.outcome is WaypointOutcome.WAYPOINT
    # The waypoint's own address: not bound, nothing in the way.
    assert resolve_waypoint(model, client, "10.0.9.1", 15008, rng).outcome is \
        WaypointOutcome.NOT_BOUND


def test_a_waypoint_naming_nothing_or_looping_fails_closed() -> None:
    missing = MODEL.replace(f'destination: "apps/{WP_HOST}"',
                            'destination: "apps/gone.apps.svc.cluster.local"')
    model = load_model_text(missing, "m.yaml")
    hop = resolve_waypoint(model, _client(model), "10.96.0.10", 80, random.Random(1))
    assert hop.outcome is WaypointOutcome.MISSING and hop.outcome.fails_closed
    assert "not found" in hop.reason
    assert any("names no workload" in w for w in warnings(model))
    # The waypoint's own pod bound to a waypoint: a loop.
    looping = MODEL.replace(
        f'  services: {{"apps/{WP_HOST}": {{15008: 15008}}}}\n',
        f'  services: {{"apps/{WP_HOST}": {{15008: 15008}}}}\n'
        '  waypoint: {destination: "/10.0.9.1", hboneMtlsPort: 15008}\n')
    model = load_model_text(looping, "m.yaml")
    for dst, port in (("10.96.0.10", 80), ("10.0.9.1", 15008)):
        hop = resolve_waypoint(model, _client(model), dst, port, random.Random(1))
        assert hop.outcome is WaypointOutcome.LOOP, (dst, hop)
    # A waypoint Service without its HBONE port names no instance.
    no_port = MODEL.replace("  ports: {15008: 15008}\n", "  ports: {15009: 15009}\n")
    model = load_model_text(no_port, "m.yaml")
    hop = resolve_waypoint(model, _client(model), "10.96.0.10", 80, random.Random(1))
    assert hop.outcome is WaypointOutcome.MISSING


def _doc(kind: str, name: str, namespace: str | None = None, **labels: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if namespace:
        meta["namespace"] = namespace
    return {"kind": kind, "metadata": meta}


def _gateway(name: str, namespace: str, traffic: str = "service",
             allowed: str = "Same") -> dict[str, Any]:
    doc = _doc("Gateway", name, namespace, **{"istio.io/waypoint-for": traffic})
    doc["spec"] = {"gatewayClassName": "istio-waypoint", "listeners": [
        {"name": "mesh", "port": 15008, "protocol": "HBONE",
         "allowedRoutes": {"namespaces": {"from": allowed}}}]}
    return doc


def test_assign_waypoints_applies_the_binding_rules() -> None:
    bare = load_model_text(MODEL.replace(
        '  waypoint: {destination: "/10.0.9.1", hboneMtlsPort: 15008}\n', "").replace(
        f'  waypoint: {{destination: "apps/{WP_HOST}", hboneMtlsPort: 15008}}\n', ""), "m.yaml")
    assert all(s.waypoint is None for s in bare.services)
    use = "istio.io/use-waypoint"
    docs = [_doc("Namespace", "apps", **{use: "waypoint"}), _doc("Namespace", "front"),
            _gateway("waypoint", "apps", traffic="all"),
            _doc("Pod", "waypoint-1", "apps",
                 **{"gateway.networking.k8s.io/gateway-name": "waypoint"}),
            _doc("Service", "waypoint", "apps",
                 **{"gateway.istio.io/managed": "istio.io-mesh-controller"})]
    model, problems = assign_waypoints(bare, docs)
    assert problems == []
    gw = GatewayAddress(NamespacedHostname("apps", WP_HOST), 15008)
    by_name = {s.name: s for s in model.services}
    assert by_name["web"].waypoint == gw           # the namespace's label
    assert by_name["waypoint"].waypoint is None    # a waypoint's own Service
    pods = {w.name: w for w in model.workloads}
    assert pods["web-1"].waypoint == gw            # waypoint-for all: workloads too
    assert pods["waypoint-1"].waypoint is None     # a waypoint's own pod never inherits
    assert pods["client"].waypoint is None
    # none on the object beats the namespace; a missing waypoint is still written
    # (the tunnel fails it closed); use-waypoint-namespace names another namespace's.
    docs2 = [*docs, _doc("Service", "web", "apps", **{use: "none"}),
             _doc("Pod", "web-1", "apps", **{use: "gone"})]
    model, problems = assign_waypoints(bare, docs2)
    assert {s.name: s.waypoint for s in model.services}["web"] is None
    pods = {w.name: w for w in model.workloads}
    assert pods["web-1"].waypoint == GatewayAddress(
        NamespacedHostname("apps", "gone.apps.svc.cluster.local"), 15008)
    assert any("waypoint_missing" in p for p in problems)
    shared = [_doc("Namespace", "apps", **{use: "shared",
                                           "istio.io/use-waypoint-namespace": "infra"}),
              _gateway("shared", "infra", allowed="All")]
    model, _ = assign_waypoints(bare, shared)
    assert {s.name: s.waypoint for s in model.services}["web"] == GatewayAddress(
        NamespacedHostname("infra", "shared.infra.svc.cluster.local"), 15008)
    # allowedRoutes Same: another namespace may not attach (istiod sends no waypoint).
    model, problems = assign_waypoints(bare, [shared[0], _gateway("shared", "infra")])
    assert {s.name: s.waypoint for s in model.services}["web"] is None
    assert any("attachment_denied" in p for p in problems)


def test_model_check_shows_waypoints(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(MODEL.replace(f'destination: "apps/{WP_HOST}"',
                                  'destination: "apps/gone.apps.svc.cluster.local"'))
    result = CliRunner().invoke(main, ["model", "check", str(path)])
    assert result.exit_code == 0, result.output
    assert "waypoint=apps/gone.apps.svc.cluster.local:15008" in result.stdout
    assert "waypoint=/10.0.9.1:15008" in result.stdout
    assert ("warning: service apps/web.apps.svc.cluster.local uses waypoint "
            "apps/gone.apps.svc.cluster.local:15008, which names no workload") in result.stdout
    result = CliRunner().invoke(main, ["model", "check", str(path), "--json"])
    data = json.loads(result.stdout)
    assert data["services"][0]["waypoint"] == "apps/gone.apps.svc.cluster.local:15008"
    assert data["workloads"][0]["waypoint"] == "/10.0.9.1:15008"
