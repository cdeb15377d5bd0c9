"""The namespace lab against the real kernel (root).

Each test uses its own random prefix (``t`` + 4 hex digits) so parallel or
crashed runs never collide, and the ``lab`` fixture removes everything with
that prefix afterwards, whatever happened. Traffic stays inside the lab.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from labkit import LabSpec, leftovers, program, read_line, running, spawned
from pyroute2 import netns

from agent.lab import netlab
from agent.lab.commands import build_lab_group, lab
from agent.lab.topology import LabPlan, build_plan, netns_path

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(120)]

LAB = LabSpec(letter="t", mode=None)
REPO = Path(__file__).resolve().parents[2]
PORT = 18080  # programs/peer_echo_server.py --name


def _ip_netns_list() -> str:
    return subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True, timeout=10
    ).stdout


def _assert_gone(prefix: str) -> None:
    assert leftovers(prefix) == []
    listed = [line.split()[0] for line in _ip_netns_list().splitlines() if line.strip()]
    assert not [n for n in listed if n.startswith(f"{prefix}-")]


@pytest.fixture
def prefix(lab_prefix: str) -> str:
    """A fresh prefix; whatever exists under it is removed afterwards (conftest)."""
    return lab_prefix


@pytest.fixture
def plan(prefix: str) -> LabPlan:
    """A lab that is up (torn down by the ``prefix`` fixture)."""
    return netlab.up(build_plan(prefix))


@contextlib.contextmanager
def _server(plan: LabPlan, pod: str, count: int) -> Iterator[subprocess.Popen[str]]:
    argv = [*program("peer_echo_server"), str(PORT), "--name", pod, "--count", str(count)]
    with spawned(plan.pod(pod).netns, argv) as proc:
        line = read_line(proc, 10)
        assert line, "echo server did not start within 10 s"
        assert line == "ready", (
            f"server said {line!r}; stderr: {proc.stderr.read() if proc.stderr else ''}"
        )
        yield proc


def _tcp(plan: LabPlan, client: str, host: str) -> str:
    out = subprocess.run(
        netlab.nsenter_argv(
            plan.pod(client).netns, [*program("send_recv_client"), host, str(PORT), "ping", "5"]
        ),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert out.returncode == 0, f"{client} -> {host}: {out.stderr}"
    return out.stdout.strip()


def _ping(plan: LabPlan, pod: str, target: str) -> int:
    return netlab.exec_in_pod(
        plan.prefix,
        pod,
        ["ping", "-c", "1", "-W", "2", target],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=10,
    )


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.lab.commands", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


# -- the full round trip ----------------------------------------------------------


def test_up_list_traffic_down_up_down(prefix: str) -> None:
    runner = CliRunner()
    res = runner.invoke(lab, ["up", "--prefix", prefix])
    assert res.exit_code == 0, res.output
    plan = netlab.load_plan(prefix)
    assert set(_ip_netns_list().split()) >= set(plan.all_netns())

    # list --json reads the kernel back and matches the plan
    res = runner.invoke(lab, ["list", "--prefix", prefix, "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["healthy"], info["problems"]
    assert info["prefix"] == prefix
    assert info["underlay"]["netns"] == f"{prefix}-ul"
    assert sorted(info["underlay"]["ports"]) == [f"{prefix}u1", f"{prefix}u2"]
    n1, n2 = info["nodes"]
    assert (n1["name"], n1["netns"]) == ("node1", f"{prefix}-node1")
    assert (n1["underlay_ipv4"], n1["underlay_ipv6"]) == ("198.18.0.1", "fd00:198:18::1")
    assert (n2["underlay_ipv4"], n2["underlay_ipv6"]) == ("198.18.0.2", "fd00:198:18::2")
    assert n2["pod_cidrs"] == ["10.244.2.0/24", "fd00:10:244:2::/64"]
    assert [p["name"] for p in n1["pods"]] == ["n1-a", "n1-b", "n1-plain"]
    a = n1["pods"][0]
    assert a == {
        "name": "n1-a",
        "netns": f"{prefix}-n1-a",
        "ipv4": "10.244.1.10",
        "ipv6": "fd00:10:244:1::10",
        "host_ifname": f"{prefix}n1a",
        "namespace": "default",
        "service_account": "sa-a",
        "enroll": True,
    }
    assert [p["enroll"] for p in n2["pods"]] == [True, True, False]
    res = runner.invoke(lab, ["list", "--prefix", prefix])
    assert res.exit_code == 0 and "n2-plain" in res.output and "10.244.2.100" in res.output

    # kernel details the daemons rely on
    node1 = plan.node("node1").netns
    sysctls = subprocess.run(
        netlab.nsenter_argv(
            node1,
            [
                "cat",
                "/proc/sys/net/ipv4/ip_forward",
                "/proc/sys/net/ipv6/conf/all/forwarding",
                "/proc/sys/net/ipv4/conf/all/rp_filter",
                "/proc/sys/net/ipv4/conf/default/rp_filter",
            ],
        ),
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.split()
    assert sysctls == ["1", "1", "0", "0"]
    routes = subprocess.run(
        ["ip", "-n", f"{prefix}-n1-a", "route"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    assert "default via 10.244.1.1 dev eth0" in routes and "onlink" in routes
    routes6 = subprocess.run(
        ["ip", "-n", node1, "-6", "route"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    assert "fd00:10:244:2::/64 via fd00:198:18::2 dev ul0" in routes6
    assert f"fd00:10:244:1::10 dev {prefix}n1a" in routes6

    # ICMP same node, cross node, v4 and v6, and to the other node's underlay
    for target in (
        "10.244.1.11",
        "10.244.2.10",
        "fd00:10:244:1::100",
        "fd00:10:244:2::11",
        "198.18.0.2",
    ):
        assert _ping(plan, "n1-a", target) == 0, target

    # TCP: n2-a serves; clients on the same node and across the underlay, v4 and v6
    with _server(plan, "n2-a", count=4):
        assert _tcp(plan, "n2-b", "10.244.2.10") == "n2-a:10.244.2.11:ping"
        assert _tcp(plan, "n1-a", "10.244.2.10") == "n2-a:10.244.1.10:ping"
        assert _tcp(plan, "n1-plain", "fd00:10:244:2::10") == "n2-a:fd00:10:244:1::100:ping"
        assert _tcp(plan, "n2-plain", "fd00:10:244:2::10") == "n2-a:fd00:10:244:2::100:ping"

    res = runner.invoke(lab, ["down", "--prefix", prefix])
    assert res.exit_code == 0, res.output
    _assert_gone(prefix)

    # and again: a second up/down on the same prefix behaves the same
    res = runner.invoke(lab, ["up", "--prefix", prefix])
    assert res.exit_code == 0, res.output
    assert _ping(netlab.load_plan(prefix), "n2-b", "10.244.1.11") == 0
    res = runner.invoke(lab, ["down", "--prefix", prefix])
    assert res.exit_code == 0, res.output
    _assert_gone(prefix)


def test_exec_passes_stdin_stdout_and_exit_code(plan: LabPlan) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.lab.commands",
            "exec",
            "--prefix",
            plan.prefix,
            "n1-b",
            "--",
            "sh",
            "-c",
            "cat; ip -o -4 addr show dev eth0; exit 7",
        ],
        input="from-stdin\n",
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )
    assert out.returncode == 7, out.stderr
    assert "from-stdin" in out.stdout
    assert "10.244.1.11/32" in out.stdout
    # a node name works too, and an unknown pod says which ones exist
    assert _cli("exec", "--prefix", plan.prefix, "node2", "--", "true").returncode == 0
    bad = _cli("exec", "--prefix", plan.prefix, "n7-q", "--", "true")
    assert bad.returncode == 1 and "n1-a" in bad.stderr


# -- refusals and failures ----------------------------------------------------------


def test_up_refuses_when_lab_exists(plan: LabPlan) -> None:
    with pytest.raises(netlab.LabError, match=r"already exists.*lab down"):
        netlab.up(build_plan(plan.prefix))
    res = CliRunner().invoke(lab, ["up", "--prefix", plan.prefix])
    assert res.exit_code == 1 and "lab down" in res.output
    # the existing lab was not touched
    assert netlab.list_lab(plan.prefix)["healthy"]


def test_failure_halfway_leaves_nothing(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = netlab._build_pod
    calls = {"n": 0}

    def flaky(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("injected failure")
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(netlab, "_build_pod", flaky)
    with pytest.raises(netlab.LabError, match=r"injected failure.*removed") as err:
        netlab.up(build_plan(prefix))
    assert "run `meshagent lab up` again" in str(err.value)
    assert calls["n"] == 4
    _assert_gone(prefix)


def test_failing_step_is_named(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(ns: str, settings: object) -> None:
        if ns.endswith("-node2"):
            raise netlab.LabError("sysctl says no")
        real(ns, settings)  # type: ignore[arg-type]

    real = netlab._sysctl
    monkeypatch.setattr(netlab, "_sysctl", broken)
    with pytest.raises(netlab.LabError, match=f"set sysctls in {prefix}-node2"):
        netlab.up(build_plan(prefix))
    _assert_gone(prefix)


def test_failing_hook_stops_its_processes_and_removes_everything(prefix: str) -> None:
    started: list[int] = []

    def hook(p: LabPlan) -> None:
        started.append(netlab.start_node_process(p, "node1", "agent", ["sleep", "60"]))
        raise RuntimeError("agent did not become ready")

    with pytest.raises(netlab.LabError, match=r"after_topology.*did not become ready"):
        netlab.up(build_plan(prefix), after_topology=hook)
    assert started and not running(started[0])
    _assert_gone(prefix)


def test_cli_up_runs_the_hook(prefix: str) -> None:
    seen: list[str] = []
    group = build_lab_group(after_topology=lambda p: seen.append(p.prefix))
    res = CliRunner().invoke(
        group, ["up", "--prefix", prefix, "--nodes", "2", "--pods-per-node", "3"]
    )
    assert res.exit_code == 0, res.output
    assert seen == [prefix]
    assert len(netlab.load_plan(prefix).pods()) == 8


def test_down_after_crash_without_run_dir(plan: LabPlan) -> None:
    shutil.rmtree(plan.run_dir)  # "crash": the plan and pid files are gone
    with pytest.raises(netlab.LabError, match=r"no plan.*lab down"):
        netlab.list_lab(plan.prefix)
    result = netlab.down(plan.prefix)
    assert sorted(result.removed_netns) == sorted(plan.all_netns())
    _assert_gone(plan.prefix)


def test_down_after_crash_midway_through_create(prefix: str) -> None:
    netns.create(f"{prefix}-ul")
    netns.create(f"{prefix}-node1")  # as if `up` died right here
    assert netlab.lab_exists(prefix)
    res = CliRunner().invoke(lab, ["down", "--prefix", prefix])
    assert res.exit_code == 0, res.output
    _assert_gone(prefix)


def test_down_is_idempotent_when_nothing_exists(prefix: str) -> None:
    assert netlab.down(prefix).removed_netns == []
    res = CliRunner().invoke(lab, ["down", "--prefix", prefix])
    assert res.exit_code == 0 and "nothing to do" in res.output
    _assert_gone(prefix)


def test_list_without_lab_says_what_to_do(prefix: str) -> None:
    res = CliRunner().invoke(lab, ["list", "--prefix", prefix, "--json"])
    assert res.exit_code == 1 and "lab up" in res.output


# -- processes --------------------------------------------------------------------


def test_start_and_stop_node_process(plan: LabPlan) -> None:
    pid = netlab.start_node_process(
        plan, "node2", "sleeper", ["sh", "-c", 'echo "FOO=$FOO"; exec sleep 60'], {"FOO": "bar"}
    )
    ndir = Path(plan.node_run_dir("node2"))
    assert (ndir / "sleeper.pid").read_text().strip() == str(pid)
    # it runs in node2's netns, in its own session
    assert (
        os.stat(f"/proc/{pid}/ns/net").st_ino
        == os.stat(netns_path(plan.node("node2").netns)).st_ino
    )
    assert os.getsid(pid) == pid
    log = ndir / "sleeper.log"
    for _ in range(100):  # bounded: 5 s
        if "FOO=bar" in log.read_text():
            break
        time.sleep(0.05)
    assert "FOO=bar" in log.read_text()
    with pytest.raises(netlab.LabError, match="already runs"):
        netlab.start_node_process(plan, "node2", "sleeper", ["sleep", "60"])

    stopped = netlab.stop_node_processes(plan.prefix)
    assert pid in stopped
    assert not running(pid)
    assert not (ndir / "sleeper.pid").exists()


def test_stop_escalates_to_sigkill(plan: LabPlan) -> None:
    pid = netlab.start_node_process(
        plan,
        "node1",
        "stubborn",
        ["sh", "-c", "trap '' TERM; echo armed; while :; do sleep 1; done"],
    )
    log = Path(plan.node_run_dir("node1")) / "stubborn.log"
    for _ in range(100):  # bounded: 5 s, wait until the trap is installed
        if "armed" in log.read_text():
            break
        time.sleep(0.05)
    t0 = time.monotonic()
    assert pid in netlab.stop_node_processes(plan.prefix, timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert not running(pid)


def test_start_node_process_errors(plan: LabPlan) -> None:
    with pytest.raises(netlab.LabError, match="not found"):
        netlab.start_node_process(plan, "node1", "x", ["/nonexistent/daemon"])
    with pytest.raises(ValueError, match="invalid process name"):
        netlab.start_node_process(plan, "node1", "../evil", ["true"])
    with pytest.raises(ValueError, match="node1, node2"):
        netlab.start_node_process(plan, "node7", "x", ["true"])


def test_down_kills_leftover_exec_processes(plan: LabPlan) -> None:
    # as if `lab exec n1-a -- sleep 60 &` had been left running
    proc = subprocess.Popen(
        netlab.nsenter_argv(plan.pod("n1-a").netns, ["sleep", "60"]), start_new_session=True
    )
    try:
        for _ in range(100):  # bounded: wait until nsenter has switched namespaces
            if proc.pid in netlab.processes_in_netns([plan.pod("n1-a").netns]):
                break
            time.sleep(0.05)
        result = netlab.down(plan.prefix)
        assert proc.pid in result.stopped_pids
        assert proc.wait(timeout=10) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    _assert_gone(plan.prefix)
