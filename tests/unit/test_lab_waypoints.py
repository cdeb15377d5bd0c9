"""The lab's waypoint scenario as data (agent/lab/waypoints.py, pure): the model the
node tunnels get, with every binding rule the lab test exercises."""

from __future__ import annotations

from agent.lab import waypoints
from agent.lab.topology import IFNAMSIZ_MAX, build_plan
from agent.model.types import GatewayAddress
from agent.waypoint.config import AppProtocol, build_state, waypoint_hostname


def test_the_scenario_model_binds_as_the_lab_test_expects() -> None:
    plan = build_plan("wxyz12", pods_per_node=waypoints.PODS_PER_NODE)
    model, problems = waypoints.waypoint_model(plan)
    # Only the deliberately missing waypoint is a problem.
    assert len(problems) == 1 and "team-b/gone" in problems[0], problems
    services = {(s.namespace, s.name): s for s in model.services}

    def via(namespace: str, name: str) -> str | None:
        gw = services[(namespace, name)].waypoint
        return None if gw is None else str(gw.destination)

    assert via("team-b", "echo") == "team-b/waypoint.team-b.svc.cluster.local"
    assert via("team-b", "db") is None                       # use-waypoint: none
    assert via("team-b", "hot") == "team-b/hot-waypoint.team-b.svc.cluster.local"
    assert via("team-b", "ghost") == "team-b/gone.team-b.svc.cluster.local"
    assert via("team-c", "echo") == "infra/shared.infra.svc.cluster.local"
    assert via("default", "web") is None                     # namespace without a label
    assert via("team-b", "waypoint") is None                 # a waypoint's own Service
    pods = {w.name: w for w in model.workloads}
    assert str(pods["n1-b"].waypoint.destination) == "team-b/waypoint.team-b.svc.cluster.local"
    assert str(pods["n2-b"].waypoint.destination) == \
        "team-b/hot-waypoint.team-b.svc.cluster.local"       # its own label wins
    assert pods["n1-c"].waypoint is None                     # shared is service-only
    for i, wp in enumerate(waypoints.SCENARIO):
        pod = waypoints.waypoint_pod(plan, wp, i)
        assert pods[pod.name].waypoint is None and not pod.enroll
        assert len(pod.host_ifname) <= IFNAMSIZ_MAX
        instances = model.waypoint_instances(GatewayAddress(waypoint_hostname(wp.key)))
        assert [w.name for w in instances] == [pod.name]


def test_a_pod_address_takes_the_protocol_of_its_own_namespaces_service() -> None:
    """n1-b backs default/web (no port name: TCP) and team-b/echo (http) on 8080: the
    namespace waypoint takes n1-b:8080 as HTTP, from the Service of n1-b's namespace."""
    plan = build_plan("wxyz12", pods_per_node=waypoints.PODS_PER_NODE)
    model, _ = waypoints.waypoint_model(plan)
    state = build_state(model, waypoints.documents(plan), ("team-b", "waypoint"))
    dest = state.destination(plan.pod("n1-b").ipv4, 8080)
    assert dest is not None and dest.protocol is AppProtocol.HTTP
