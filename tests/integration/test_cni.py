"""meshagent-cni as a real executable against real agents in netns labs (root).

Part 1 runs the plugin by hand, like a runtime would, against the agent of a
veth lab (its ``nN-plain`` pod has a veth and addresses but is not enrolled).
Part 2 builds a lab whose pods are created through ptp + host-local +
meshagent-cni (``lab up --pods cni``) and sends traffic through the mesh.

Every lab uses its own prefix (``c`` + 4 hex digits) and is removed by its
fixture whatever happens; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from labkit import (
    Lab,
    LabSpec,
    leftovers,
    log_events,
    meshagent_cli,
    our_filters,
    program,
    read_line,
    run_in,
    spawned,
    wait_until,
)

from agent.api import client
from agent.cni import spec
from agent.lab import mesh, netlab
from agent.lab.topology import LabPlan, netns_path

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(240)]

# part 1's lab (mesh_lab): one node, one enrolled pod and n1-plain, plain tunnel
LAB = LabSpec(letter="c", mode="plain", nodes=1, pods_per_node=1)
PLUGIN = Path(sys.executable).parent / "meshagent-cni"
PORT = 18090


# -- part 1: the executable against a veth lab's agent ------------------------------


@pytest.fixture(scope="module")
def lab(mesh_lab: Lab) -> LabPlan:
    if not PLUGIN.exists():
        pytest.fail(f"{PLUGIN} is missing: run `{sys.executable} -m pip install -e .`")
    return mesh_lab.plan


def _sock(plan: LabPlan) -> str:
    return mesh.agent_socket(plan, "node1")


def _pods(plan: LabPlan) -> list[dict[str, Any]]:
    return client.call(_sock(plan), {"op": "pod_list"}, timeout=10)


def _state(plan: LabPlan) -> list[tuple[str, int]]:
    return sorted((p["namespace"] + "/" + p["name"], p["host_ifindex"]) for p in _pods(plan))


def _netconf(plan: LabPlan, **section: Any) -> dict[str, Any]:
    pod = plan.pod("n1-plain")
    prev = {"cniVersion": "1.0.0",
            "interfaces": [{"name": pod.host_ifname}, {"name": "eth0",
                                                       "sandbox": netns_path(pod.netns)}],
            "ips": [{"interface": 1, "address": f"{pod.ipv4}/32"}]}
    return {"cniVersion": "1.0.0", "name": "k8s", "type": "meshagent-cni", "prevResult": prev,
            "meshagent": {"agent_socket": _sock(plan), "enrolled_namespaces": ["default"],
                          "log_file": f"{plan.node_run_dir('node1')}/cni-test.log", **section}}


def _cni_env(plan: LabPlan, command: str, **overrides: str | None) -> dict[str, str]:
    pod = plan.pod("n1-plain")
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": f"test-{plan.prefix}",
           "CNI_NETNS": netns_path(pod.netns), "CNI_IFNAME": "eth0",
           "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};"
                       f"K8S_POD_NAME={pod.name}",
           "CNI_PATH": f"/usr/lib/cni:{PLUGIN.parent}", **overrides}
    return {k: v for k, v in env.items() if v is not None}


def _run(plan: LabPlan, env: dict[str, str], stdin: bytes | dict[str, Any]
         ) -> tuple[int, Any, str]:
    """Exec meshagent-cni in node1's netns like a runtime; (exit, stdout JSON|None, stderr)."""
    data = stdin if isinstance(stdin, bytes) else json.dumps(stdin).encode()
    base = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    proc = subprocess.run(netlab.nsenter_argv(plan.node("node1").netns, [str(PLUGIN)]),
                          input=data, env={**base, **env}, capture_output=True, timeout=60,
                          check=False)
    out = proc.stdout.decode()
    return proc.returncode, json.loads(out) if out.strip() else None, proc.stderr.decode()


def test_add_check_del_del(lab: LabPlan) -> None:
    pod = lab.pod("n1-plain")
    node_ns = lab.node("node1").netns
    before = _state(lab)
    assert "default/n1-plain" not in [key for key, _ in before]
    assert our_filters(node_ns, pod.host_ifname, "ingress") == []
    conf = _netconf(lab, service_account_patterns=[
        {"pod_name_pattern": "n1-p*", "service_account": "sa-plain"}])
    try:
        rc, out, err = _run(lab, _cni_env(lab, "ADD"), conf)
        assert rc == 0, (out, err)
        assert out == {**conf["prevResult"], "cniVersion": "1.0.0"}  # passed through
        enrolled = [p for p in _pods(lab) if p["name"] == "n1-plain"]
        assert len(enrolled) == 1 and enrolled[0]["namespace"] == "default"
        assert enrolled[0]["service_account"] == "sa-plain"
        assert enrolled[0]["host_ifname"] == pod.host_ifname
        assert len(our_filters(node_ns, pod.host_ifname, "ingress")) >= 1
        assert len(our_filters(node_ns, pod.host_ifname, "egress")) >= 1

        rc, out, err = _run(lab, _cni_env(lab, "CHECK"), conf)
        assert (rc, out) == (0, None), err
        rc, out, err = _run(lab, _cni_env(lab, "ADD"), conf)  # a repeated ADD is fine
        assert rc == 0, out

        rc, out, err = _run(lab, _cni_env(lab, "DEL"), conf)
        assert (rc, out) == (0, None), err
        assert _state(lab) == before
        assert our_filters(node_ns, pod.host_ifname, "ingress") == []
        assert our_filters(node_ns, pod.host_ifname, "egress") == []
        rc, out, err = _run(lab, _cni_env(lab, "CHECK"), conf)  # should be enrolled, is not
        assert rc != 0 and out["code"] == spec.ERR_NOT_ENROLLED

        rc, out, err = _run(lab, _cni_env(lab, "DEL"), conf)  # again: still fine
        assert (rc, out) == (0, None), err
        assert _state(lab) == before
        log = Path(conf["meshagent"]["log_file"]).read_text().splitlines()
        events = [json.loads(line)["event"] for line in log]
        assert "pod enrolled" in events and "pod unenrolled" in events
    finally:
        with contextlib.suppress(client.AgentError):
            client.call(_sock(lab), {"op": "pod_del", "name": "n1-plain"}, timeout=10)


def test_del_unknown_container_and_missing_netns(lab: LabPlan) -> None:
    before = _state(lab)
    conf = _netconf(lab)
    cases = [
        _cni_env(lab, "DEL", CNI_CONTAINERID="never-added",
                 CNI_ARGS="K8S_POD_NAMESPACE=default;K8S_POD_NAME=ghost"),
        _cni_env(lab, "DEL", CNI_NETNS=f"/run/netns/{lab.prefix}-gone"),
        _cni_env(lab, "DEL", CNI_NETNS=None, CNI_ARGS=None),
    ]
    for env in cases:
        rc, out, err = _run(lab, env, conf)
        assert (rc, out) == (0, None), (env, err)
    rc, out, _ = _run(lab, _cni_env(lab, "DEL"), {**conf, "prevResult": None})
    assert (rc, out) == (0, None)
    assert _state(lab) == before


def test_add_with_agent_down_fails_closed_or_passes_through(lab: LabPlan) -> None:
    before = _state(lab)
    dead = f"{lab.node_run_dir('node1')}/no-agent-here.sock"
    rc, out, _ = _run(lab, _cni_env(lab, "ADD"), _netconf(lab, agent_socket=dead))
    assert rc != 0 and out["code"] == spec.ERR_TRY_AGAIN_LATER == 11
    assert "fail_open" in out["details"] and out["cniVersion"] == "1.0.0"
    conf = _netconf(lab, agent_socket=dead, fail_open=True)
    rc, out, _ = _run(lab, _cni_env(lab, "ADD"), conf)
    assert rc == 0 and out == conf["prevResult"]
    rc, out, _ = _run(lab, _cni_env(lab, "DEL"), conf)  # DEL never blocks on a dead agent
    assert (rc, out) == (0, None)
    assert _state(lab) == before


def test_malformed_stdin_and_missing_env_change_nothing(lab: LabPlan) -> None:
    pod = lab.pod("n1-plain")
    node_ns = lab.node("node1").netns
    before = _state(lab)
    for stdin in (b"{oops", b"\xff\xfe\x00", b"[]", b""):
        rc, out, _ = _run(lab, _cni_env(lab, "ADD"), stdin)
        assert rc != 0 and out["code"] == spec.ERR_DECODE == 6, stdin
    for missing in ("CNI_NETNS", "CNI_CONTAINERID", "CNI_COMMAND", "CNI_ARGS"):
        rc, out, _ = _run(lab, _cni_env(lab, "ADD", **{missing: None}), _netconf(lab))
        assert rc != 0 and out["code"] == spec.ERR_INVALID_ENV == 4, missing
    assert _state(lab) == before
    assert our_filters(node_ns, pod.host_ifname, "ingress") == []


def test_version(lab: LabPlan) -> None:
    rc, out, _ = _run(lab, {"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "1.0.0"}')
    assert rc == 0
    assert out == {"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0",
                                                                "1.0.0"]}


# -- part 2: a lab whose pods come from ptp + host-local + meshagent-cni ------------

def test_cni_lab_pods_are_enrolled_and_mesh_traffic_flows(lab_prefix: str) -> None:
    prefix = lab_prefix
    res = meshagent_cli(["lab", "up", "--prefix", prefix, "--pods", "cni"], timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    plan = netlab.load_plan(prefix)
    assert plan.pod_network == "cni"

    res = meshagent_cli(["lab", "list", "--prefix", prefix, "--json"], timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    info = json.loads(res.stdout)
    assert info["healthy"], info["problems"]
    listed = {p["name"]: p for n in info["nodes"] for p in n["pods"]}
    for node in plan.nodes:
        v4net = ipaddress.ip_network(node.pod_cidrs[0])
        for pod in node.pods:
            entry = listed[pod.name]
            assert ipaddress.ip_address(entry["ipv4"]) in v4net, entry
            assert entry["host_ifname"].startswith("veth"), entry  # made by ptp
        enrolled = {p["name"]: p for p in client.call(
            mesh.agent_socket(plan, node.name), {"op": "pod_list"}, timeout=10)}
        want = {p.name for p in node.pods if p.enroll}
        assert set(enrolled) == want and f"n{node.index}-plain" not in enrolled
        for name in want:
            assert enrolled[name]["service_account"] == plan.pod(name).service_account
            assert listed[name]["ipv4"] in enrolled[name]["addresses"]
            host = listed[name]["host_ifname"]
            assert enrolled[name]["host_ifname"] == host
            assert our_filters(node.netns, host, "ingress"), host
    ipam = Path(plan.node_run_dir("node1")) / "ipam" / "meshlab"
    assert ipam.is_dir() and any(ipam.glob("10.244.1.*"))

    dst = listed["n2-a"]["ipv4"]
    server_argv = [*program("oneshot_server"), str(PORT), "hello ", "30"]
    with spawned(plan.pod("n2-a").netns, server_argv) as server:
        assert read_line(server, 30) == "ready"
        out = run_in(plan.pod("n1-a").netns,
                     [*program("send_recv_client"), dst, str(PORT), "from-cni-pod"])
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "hello from-cni-pod"

    def closed_records() -> list[dict[str, Any]]:
        return [r for node in ("node1", "node2") for r in log_events(plan, node)
                if r.get("event") == "connection closed" and dst in json.dumps(r)]

    closed = wait_until("a 'connection closed' record for the mesh connection in tunnel.log",
                        closed_records, timeout=15, interval=0.2)
    assert closed, "no 'connection closed' record for the mesh connection in tunnel.log"

    res = meshagent_cli(["lab", "down", "--prefix", prefix, "-v"], timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "CNI DEL n1-a" in res.stderr
    assert "CNI DEL (best effort) failed" not in res.stderr
    assert leftovers(prefix) == []
