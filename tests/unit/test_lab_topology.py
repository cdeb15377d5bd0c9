"""The pure lab plan: names fit the kernel, nothing collides, JSON round-trips."""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.lab.topology import (
    IFNAMSIZ_MAX,
    MAX_NODES,
    MAX_PODS_PER_NODE,
    LabPlan,
    PlanError,
    build_plan,
    validate_process_name,
)


def _ifnames(plan: LabPlan) -> list[str]:
    names = [plan.underlay.bridge]
    for node in plan.nodes:
        names += [node.underlay_ifname, node.underlay_peer_ifname]
        for pod in node.pods:
            names += [pod.ifname, pod.host_ifname]
    return names


def test_default_plan_matches_the_spec() -> None:
    plan = build_plan()
    assert plan.prefix == "malab"
    assert plan.underlay.netns == "malab-ul"
    assert [n.name for n in plan.nodes] == ["node1", "node2"]
    n1, n2 = plan.nodes
    assert n1.netns == "malab-node1"
    assert (n1.underlay_ipv4, n1.underlay_ipv6) == ("198.18.0.1", "fd00:198:18::1")
    assert (n2.underlay_ipv4, n2.underlay_ipv6) == ("198.18.0.2", "fd00:198:18::2")
    assert n1.underlay_ifname == "ul0"
    assert n1.pod_cidrs == ("10.244.1.0/24", "fd00:10:244:1::/64")
    assert n2.pod_cidrs == ("10.244.2.0/24", "fd00:10:244:2::/64")
    assert [p.name for p in n1.pods] == ["n1-a", "n1-b", "n1-plain"]
    assert [p.name for p in n2.pods] == ["n2-a", "n2-b", "n2-plain"]
    a = plan.pod("n1-a")
    assert (a.netns, a.ipv4, a.ipv6) == ("malab-n1-a", "10.244.1.10", "fd00:10:244:1::10")
    assert (a.gateway_ipv4, a.gateway_ipv6) == ("10.244.1.1", "fd00:10:244:1::1")
    assert (a.namespace, a.service_account, a.enroll) == ("default", "sa-a", True)
    b = plan.pod("n2-b")
    assert (b.namespace, b.service_account, b.enroll) == ("team-b", "sa-b", True)
    plain = plan.pod("n2-plain")
    assert plain.enroll is False
    assert [p.enroll for p in plan.pods()].count(False) == 2


def test_all_names_carry_the_prefix_and_fit() -> None:
    plan = build_plan("abcdef", nodes=MAX_NODES, pods_per_node=MAX_PODS_PER_NODE)
    for name in _ifnames(plan):
        assert len(name) <= IFNAMSIZ_MAX, name
    for ns in plan.all_netns():
        assert ns.startswith("abcdef-")
    for node in plan.nodes:
        assert node.underlay_peer_ifname.startswith("abcdef")
        for pod in node.pods:
            assert pod.host_ifname.startswith("abcdef")


def test_teardown_order_is_pods_nodes_underlay() -> None:
    plan = build_plan(nodes=2, pods_per_node=1)
    order = plan.all_netns()
    assert order[-1] == "malab-ul"
    assert order[-3:-1] == ("malab-node1", "malab-node2")
    assert set(order[:-3]) == {p.netns for p in plan.pods()}


@settings(max_examples=40, deadline=None)
@given(
    prefix=st.from_regex(r"\A[a-z][a-z0-9]{0,5}\Z"),
    nodes=st.integers(1, MAX_NODES),
    pods=st.integers(1, MAX_PODS_PER_NODE),
)
def test_any_valid_plan_is_unique_and_round_trips(prefix: str, nodes: int, pods: int) -> None:
    plan = build_plan(prefix, nodes=nodes, pods_per_node=pods)
    assert len(plan.nodes) == nodes
    assert all(len(n.pods) == pods + 1 for n in plan.nodes)
    assert max(len(n) for n in _ifnames(plan)) <= IFNAMSIZ_MAX
    addrs = [ipaddress.ip_address(a) for p in plan.pods() for a in (p.ipv4, p.ipv6)]
    addrs += [
        ipaddress.ip_address(a) for n in plan.nodes for a in (n.underlay_ipv4, n.underlay_ipv6)
    ]
    assert len(addrs) == len(set(addrs))
    assert len(set(plan.all_netns())) == len(plan.all_netns())
    for node in plan.nodes:
        hosts = [p.host_ifname for p in node.pods]
        assert len(hosts) == len(set(hosts))
        nets = [ipaddress.ip_network(c) for c in node.pod_cidrs]
        for pod in node.pods:
            assert ipaddress.ip_address(pod.ipv4) in nets[0]
            assert ipaddress.ip_address(pod.ipv6) in nets[1]
    assert LabPlan.from_json(plan.to_json()) == plan


def test_json_is_plain_and_versioned() -> None:
    data = json.loads(build_plan("x1").to_json())
    assert data["schema"] == 1
    assert data["prefix"] == "x1"
    assert data["nodes"][0]["pods"][0]["host_ifname"] == "x1n1a"


@pytest.mark.parametrize("prefix", ["", "toolong", "Malab", "ma-lab", "1ab", "a b", "ab/"])
def test_bad_prefix_is_refused_with_advice(prefix: str) -> None:
    with pytest.raises(PlanError, match="lower-case letters"):
        build_plan(prefix)


@pytest.mark.parametrize(("nodes", "pods"), [(0, 2), (MAX_NODES + 1, 2), (2, 0), (2, 16)])
def test_out_of_range_sizes_are_refused(nodes: int, pods: int) -> None:
    with pytest.raises(PlanError, match="between"):
        build_plan(nodes=nodes, pods_per_node=pods)


def test_lookup_errors_name_the_choices() -> None:
    plan = build_plan()
    with pytest.raises(PlanError, match="n1-a, n1-b"):
        plan.pod("n9-z")
    with pytest.raises(PlanError, match="node1, node2"):
        plan.node("node9")


def test_malformed_json_is_a_plan_error() -> None:
    with pytest.raises(PlanError):
        LabPlan.from_json("[]")
    with pytest.raises(PlanError):
        LabPlan.from_json("{not json")
    with pytest.raises(PlanError, match="schema"):
        LabPlan.from_json('{"schema": 99}')
    data = build_plan().to_dict()
    del data["nodes"][0]["pods"][0]["ipv4"]
    with pytest.raises(PlanError, match="malformed"):
        LabPlan.from_dict(data)


def test_tampered_plan_with_duplicates_is_refused() -> None:
    data = build_plan().to_dict()
    data["nodes"][1]["pods"][0]["ipv4"] = "10.244.2.11"  # same as n2-b
    with pytest.raises(PlanError, match="duplicate addresses"):
        LabPlan.from_dict(data)
    data = build_plan().to_dict()
    data["nodes"][0]["pods"][0]["host_ifname"] = "x" * 16
    with pytest.raises(PlanError, match="at most 15"):
        LabPlan.from_dict(data)


def test_run_paths() -> None:
    plan = build_plan("t1")
    assert plan.run_dir == "/run/meshagent-lab/t1"
    assert plan.plan_path == "/run/meshagent-lab/t1/lab.json"
    assert plan.node_run_dir("node2") == "/run/meshagent-lab/t1/node2"


@pytest.mark.parametrize("name", ["agent", "tunnel", "my_daemon-2.x"])
def test_process_names_ok(name: str) -> None:
    assert validate_process_name(name) == name


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "-x", "a b"])
def test_process_names_bad(name: str) -> None:
    with pytest.raises(PlanError):
        validate_process_name(name)
