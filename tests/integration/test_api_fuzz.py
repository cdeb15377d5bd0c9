"""Fuzz the agent's API handler over its real socket: every rejected request
leaves the agent's state and the kernel exactly as they were."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from labkit import AGENT_ARGV, stop, unique_prefix, wait_until

from agent.api import client
from agent.datapath.programs import remove_all_pins

pytestmark = pytest.mark.privileged

POD_V4 = "10.250.0.10/32"
READY_TIMEOUT_S = 60.0


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


class AgentUnderTest:
    def __init__(self, tmp: Path) -> None:
        tag = unique_prefix("fz", 3)
        self.node = f"{tag}-node"
        self.pod = f"{tag}-pod"
        self.host_veth = f"{tag}h"
        self.pins = f"/sys/fs/bpf/meshagent-{tag}"
        self.socket = str(tmp / "agent.sock")
        self.state_dir = tmp / "state"
        (tmp / "config.toml").write_text("")
        self.env = {**os.environ, "MESHAGENT_CONFIG": str(tmp / "config.toml"),
                    "MESHAGENT_AGENT_SOCKET": self.socket,
                    "MESHAGENT_AGENT_STATE_DIR": str(self.state_dir),
                    "MESHAGENT_AGENT_BPF_PIN_DIR": self.pins,
                    "MESHAGENT_AGENT_METRICS_PORT": "0", "MESHAGENT_LOG_JSON": "1"}
        self.log = tmp / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        _run("ip", "netns", "add", self.node)
        _run("ip", "netns", "add", self.pod)
        _run("ip", "-n", self.node, "link", "add", self.host_veth, "type", "veth",
             "peer", "name", "eth0", "netns", self.pod)
        _run("ip", "-n", self.pod, "addr", "add", POD_V4, "dev", "eth0")
        _run("ip", "-n", self.pod, "link", "set", "eth0", "up")
        _run("ip", "-n", self.node, "link", "set", self.host_veth, "up")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.node}", "--", *AGENT_ARGV, "run"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"agent exited: {self.log.read_text()[-2000:]}")
            client.call(self.socket, {"op": "status"}, timeout=2)
            return True

        wait_until(f"the agent to answer (log: {self.log})", ready, timeout=READY_TIMEOUT_S,
                   interval=0.1, tolerate=(client.AgentUnavailable,))

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, signal.SIGTERM)
        for ns in (self.pod, self.node):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        remove_all_pins(self.pins)

    def leftovers(self) -> list[str]:
        """What of this agent's namespaces and BPF pins still exists."""
        left = [ns for ns in (self.pod, self.node) if os.path.exists(f"/run/netns/{ns}")]
        return left + ([self.pins] if os.path.lexists(self.pins) else [])

    def raw_call(self, payload: bytes) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(self.socket)
            sock.sendall(payload + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return json.loads(b"".join(chunks))

    def snapshot(self) -> dict[str, Any]:
        """Everything a request could change: registry, state file, tc on the veth."""
        pods = client.call(self.socket, {"op": "pod_list"})
        for pod in pods:
            pod.pop("counters", None)
        tc = [_run("tc", "-n", self.node, "filter", "show", "dev", self.host_veth, d)
              for d in ("ingress", "egress")]
        qdiscs = _run("tc", "-n", self.node, "qdisc", "show", "dev", self.host_veth)
        state = json.loads((self.state_dir / "state.json").read_text())
        return {"pods": pods, "tc": tc, "qdiscs": qdiscs, "state": state}


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentUnderTest]:
    under_test = AgentUnderTest(tmp_path_factory.mktemp("apifuzz"))
    try:
        under_test.start()
        client.call(under_test.socket, {"op": "pod_add", "netns": under_test.pod,
                                        "name": "web", "namespace": "shop"})
        yield under_test
    finally:
        under_test.stop()
        assert under_test.leftovers() == []


json_leaf = st.none() | st.booleans() | st.integers() | st.text(max_size=30)
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3)
                          | st.dictionaries(st.text(max_size=10), c, max_size=3), max_leaves=8)
FIELDS = ["op", "netns", "ifname", "namespace", "service_account", "name", "labels", "extra"]
# Requests that must all be refused: wrong types, unknown fields, missing or
# bad netns, interfaces that don't exist, and pods that aren't enrolled.
rejected_requests = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), json_value, max_size=5).filter(
        lambda d: d.get("op") not in ("pod_list", "status")),
    st.fixed_dictionaries({"op": st.just("pod_add"),
                           "netns": st.sampled_from(["", "/nonexistent", "/proc/self/ns/uts",
                                                     "no-such-netns", "/dev/null"])}),
    st.fixed_dictionaries({"op": st.just("pod_del"), "name": st.text(min_size=1, max_size=12)
                           .filter(lambda n: n != "web")}),
    st.binary(max_size=40).map(lambda b: {"__raw__": b.hex()}),
)


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=rejected_requests)
def test_rejected_requests_change_nothing(agent: AgentUnderTest, request: dict[str, Any]) -> None:
    before = agent.snapshot()
    if "__raw__" in request:
        payload = bytes.fromhex(request["__raw__"]).replace(b"\n", b" ")
    else:
        payload = json.dumps(request).encode()
    response = agent.raw_call(payload)
    if response.get("ok"):
        # A random dict can be a valid no-op request (e.g. pod_add of the enrolled
        # netns is refused, but pod_list is filtered out above): anything that
        # succeeded must not have been a mutation.
        assert request.get("op") not in ("pod_add", "pod_del"), response
    else:
        assert isinstance(response.get("error"), str) and response["error"], response
    assert agent.snapshot() == before


def test_enrolling_the_enrolled_pod_again_is_refused_and_changes_nothing(
        agent: AgentUnderTest) -> None:
    before = agent.snapshot()
    response = agent.raw_call(json.dumps({"op": "pod_add", "netns": agent.pod, "name": "web",
                                          "namespace": "shop"}).encode())
    assert response["ok"] is False
    assert "already enrolled" in response["error"]
    assert agent.snapshot() == before


def test_many_node_interfaces_do_not_break_enrollment(agent: AgentUnderTest) -> None:
    """Every veth has an IPv6 link-local address; a node with hundreds of them
    must still enroll pods (they are not probe sources and stay out of the map)."""
    extra = 400
    second_pod = f"{agent.pod}2"
    batch = "".join(f"link add {agent.host_veth[:8]}x{i} type veth peer name "
                    f"{agent.host_veth[:8]}y{i}\nlink set {agent.host_veth[:8]}x{i} up\n"
                    f"link set {agent.host_veth[:8]}y{i} up\n"
                    for i in range(extra))
    subprocess.run(["ip", "-n", agent.node, "-batch", "-"], input=batch, text=True, check=True)
    try:
        _run("ip", "netns", "add", second_pod)
        _run("ip", "-n", agent.node, "link", "add", f"{agent.host_veth}2", "type", "veth",
             "peer", "name", "eth0", "netns", second_pod)
        _run("ip", "-n", second_pod, "addr", "add", "10.250.0.11/32", "dev", "eth0")
        _run("ip", "-n", second_pod, "link", "set", "eth0", "up")
        _run("ip", "-n", agent.node, "link", "set", f"{agent.host_veth}2", "up")
        deadline = time.monotonic() + 30
        link_locals = 0
        while time.monotonic() < deadline:  # addrconf assigns them asynchronously
            link_locals = _run("ip", "-n", agent.node, "-6", "addr", "show",
                               "scope", "link").count("fe80::")
            if link_locals > 256:
                break
            time.sleep(0.2)
        assert link_locals > 256
        pod = client.call(agent.socket, {"op": "pod_add", "netns": second_pod, "name": "web2",
                                         "namespace": "shop"})
        assert pod["addresses"] == ["10.250.0.11"]
        client.call(agent.socket, {"op": "pod_del", "name": "web2", "namespace": "shop"})
    finally:
        subprocess.run(["ip", "netns", "del", second_pod], capture_output=True, check=False)
        batch = "".join(f"link del {agent.host_veth[:8]}x{i}\n" for i in range(extra))
        subprocess.run(["ip", "-n", agent.node, "-force", "-batch", "-"], input=batch, text=True,
                       capture_output=True, check=False)
