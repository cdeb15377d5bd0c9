"""agent/lab/cnipods.py: the lab's CNI conflists and results (pure parts)."""

from __future__ import annotations

from agent.lab import cnipods
from agent.lab.topology import build_plan


def test_ptp_and_bridge_conflists_differ_only_in_the_primary_plugin() -> None:
    ptp = build_plan("t", pod_network="cni")
    bridge = build_plan("t", pod_network="cni-bridge")
    a = cnipods.build_conflist(ptp, ptp.nodes[0], "/run/x.sock")
    b = cnipods.build_conflist(bridge, bridge.nodes[0], "/run/x.sock")
    assert a["plugins"][0]["type"] == "ptp"
    assert b["plugins"][0] == {**b["plugins"][0], "type": "bridge", "bridge": "cni0",
                               "isGateway": True, "ipMasq": False}
    assert a["plugins"][0]["ipam"] == b["plugins"][0]["ipam"]
    assert a["plugins"][1] == b["plugins"][1] and a["plugins"][1]["type"] == "meshagent-cni"


def test_each_pod_asks_host_local_for_its_planned_addresses() -> None:
    plan = build_plan("t", pod_network="cni-bridge")
    node = plan.nodes[0]
    conf = cnipods.build_conflist(plan, node, None)
    pod = node.pods[0]
    per_pod = cnipods.pod_conflist(conf, pod)
    assert per_pod["plugins"][0]["args"] == {"cni": {"ips": [pod.ipv4, pod.ipv6]}}
    assert "args" not in conf["plugins"][0], "the node's conflist (used by DEL) is unchanged"


def test_the_host_veth_is_read_from_the_result_and_recorded_in_the_plan() -> None:
    plan = build_plan("t", pod_network="cni-bridge")
    pod = plan.nodes[0].pods[0]
    result = {"interfaces": [{"name": "cni0", "mac": "aa"}, {"name": "veth1234", "mac": "bb"},
                             {"name": "eth0", "mac": "cc", "sandbox": "/run/netns/x"}]}
    assert cnipods.host_ifname_of(result) == "veth1234"
    assert cnipods.host_ifname_of({"interfaces": []}) is None
    updated = cnipods.plan_with_results(plan, {pod.name: result})
    assert updated.pod(pod.name).host_ifname == "veth1234"
    assert updated.pod(plan.nodes[0].pods[1].name) == plan.nodes[0].pods[1]
    assert updated.uses_cni and not build_plan("t").uses_cni
