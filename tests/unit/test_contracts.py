"""The contracts between the agent, the tunnel and API clients (agent/contracts):
round trips through what each side writes, and clear refusals of documents of a
version the reader does not know."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.api import client
from agent.contracts import ContractError, UnsupportedVersion
from agent.contracts.api import (
    API_VERSION,
    ErrorCode,
    PodInfo,
    RequestError,
    Response,
    default_pod_name,
    parse_request,
    pod_list,
)
from agent.contracts.files import (
    TUNNEL_STATUS_FILE,
    WORKLOADS_FILE,
    TunnelStatus,
    WorkloadEntry,
    WorkloadsFile,
    workloads_document,
)
from agent.registry import Pod, Registry, RegistryError
from agent.state import AgentState, load_state, save_state
from agent.tunnel.workloads import WorkloadIndex

POD = Pod(name="web-0", namespace="shop", service_account="web", netns="/run/netns/p1",
          ifname="eth0", host_ifindex=12, host_ifname="veth12",
          addresses=("10.244.1.10", "fd00:10:244:1::10"), labels={"app": "web"},
          created_clsact=True)


# -- workloads.json -------------------------------------------------------------------


def test_workloads_written_by_the_agent_are_read_by_the_tunnel(tmp_path: Path) -> None:
    registry = Registry([POD])
    state = AgentState(registry=registry)
    save_state(str(tmp_path), state, "cluster.local")
    raw = json.loads((tmp_path / WORKLOADS_FILE).read_text())
    assert raw["version"] == 1
    doc = WorkloadsFile.from_json(raw)
    assert doc.workloads == (WorkloadEntry(
        name="web-0", namespace="shop", service_account="web",
        addresses=("10.244.1.10", "fd00:10:244:1::10"),
        identity="spiffe://cluster.local/ns/shop/sa/web", labels={"app": "web"}),)
    assert doc.to_json() == raw  # the agent's cached entries have exactly the contract's keys
    index = WorkloadIndex.from_json(raw)
    found = index.by_address("fd00:10:244:1:0::10")
    assert found is not None and found.identity == "spiffe://cluster.local/ns/shop/sa/web"


def test_workloads_without_version_are_version_1() -> None:
    entry = POD.workload("cluster.local")
    assert WorkloadsFile.from_json({"workloads": [entry]}).version == 1
    assert WorkloadsFile.from_json(workloads_document([entry])).workloads[0].name == "web-0"


def test_workloads_of_a_newer_version_are_refused_clearly() -> None:
    with pytest.raises(UnsupportedVersion) as err:
        WorkloadsFile.from_json({"version": 2, "workloads": []}, "/var/lib/meshagent/w.json")
    message = str(err.value)
    assert "/var/lib/meshagent/w.json" in message and "version 2" in message
    assert "up to 1" in message and "upgrade meshagent" in message
    with pytest.raises(ContractError, match=r"/x/workloads\.json: workloads file version 2"):
        WorkloadIndex.from_json({"version": 2}, "/x/workloads.json")


@pytest.mark.parametrize(("doc", "problem"), [
    ([], "must be a JSON object"),
    ({"version": "1"}, "version '1' is not a positive integer"),
    ({"version": True}, "is not a positive integer"),
    ({"version": 0}, "is not a positive integer"),
    ({"workloads": {}}, "workloads must be list"),
    ({"workloads": [{"name": "a"}]}, r"workloads\[0\] has no 'namespace'"),
    ({"workloads": [{**POD.workload("c"), "addresses": "10.0.0.1"}]}, "addresses must be list"),
    ({"workloads": [{**POD.workload("c"), "addresses": [1]}]}, "list of strings"),
    ({"workloads": [{**POD.workload("c"), "labels": {"a": 1}}]}, "map strings to strings"),
    ({"workloads": [{**POD.workload("c"), "identity": None}]}, "identity must be str"),
])
def test_malformed_workloads_name_the_field(doc: Any, problem: str) -> None:
    with pytest.raises(ContractError, match=problem) as err:
        WorkloadsFile.from_json(doc, "w.json")
    assert str(err.value).startswith("w.json: ")


def test_unknown_keys_are_ignored_within_a_version() -> None:
    entry = {**POD.workload("c"), "future_field": [1, 2]}
    doc = WorkloadsFile.from_json({"version": 1, "workloads": [entry], "extra": True})
    assert doc.workloads[0].name == "web-0"


# -- tunnel-status.json ----------------------------------------------------------------


def test_tunnel_status_round_trip() -> None:
    status = TunnelStatus(mode="hbone", workloads=2, peer_workloads=3, policies=1,
                          policy_error="bad.yaml: ...", certificates=({"identity": "x"},),
                          active_inbound=4)
    data = status.to_json()
    assert data["version"] == 1 and TUNNEL_STATUS_FILE == "tunnel-status.json"
    assert TunnelStatus.from_json(json.loads(json.dumps(data))) == status
    assert TunnelStatus.from_json({"mode": "plain"}) == TunnelStatus("plain", 0, 0, 0)


def test_tunnel_status_of_a_newer_version_or_malformed_is_refused() -> None:
    with pytest.raises(UnsupportedVersion, match=r"/s/tunnel-status.json: tunnel status "
                                                 r"version 3 is newer.*up to 1"):
        TunnelStatus.from_json({"version": 3, "mode": "hbone"}, "/s/tunnel-status.json")
    with pytest.raises(ContractError, match="workloads must be int"):
        TunnelStatus.from_json({"mode": "hbone", "workloads": "2"})
    with pytest.raises(ContractError, match="has no 'mode'"):
        TunnelStatus.from_json({})


# -- the agent's own state file ---------------------------------------------------------


def test_state_of_a_newer_agent_is_refused_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(json.dumps({"version": 9, "node": {}, "pods": []}))
    with pytest.raises(UnsupportedVersion, match=r"state.json: agent state version 9.*upgrade"):
        load_state(str(tmp_path))
    (tmp_path / "state.json").write_text(json.dumps({"node": {}}))
    with pytest.raises(ValueError, match=r"unreadable.*move it away"):
        load_state(str(tmp_path))


# -- API requests and responses -----------------------------------------------------------


def test_request_version() -> None:
    assert parse_request({"op": "pod_list", "version": API_VERSION}) == parse_request(
        {"op": "pod_list"})
    with pytest.raises(RequestError) as err:
        parse_request({"op": "pod_add", "netns": "p", "version": 2})
    assert err.value.code is ErrorCode.UNSUPPORTED_VERSION
    assert "version 2" in str(err.value) and "speaks API version 1" in str(err.value)
    with pytest.raises(RequestError) as err:
        parse_request({"op": "status", "version": "2"})
    assert err.value.code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("response", [
    Response.success({"a": [1]}),
    Response.success(None),
    Response.failure(ErrorCode.ALREADY_ENROLLED, "pod shop/web-0 is already enrolled"),
])
def test_response_round_trip(response: Response) -> None:
    data = json.loads(json.dumps(response.to_json()))
    assert data["version"] == API_VERSION
    assert Response.from_json(data) == response


def test_response_codes_a_client_does_not_know_are_unknown() -> None:
    got = Response.from_json({"ok": False, "code": "from_the_future", "error": "x"})
    assert (got.code, got.error) == (ErrorCode.UNKNOWN, "x")
    older_agent = Response.from_json({"ok": False, "error": "no such enrolled pod"})
    assert older_agent.code is ErrorCode.UNKNOWN and older_agent.version == 1
    with pytest.raises(UnsupportedVersion):
        Response.from_json({"version": 2, "ok": True, "result": None})


def test_registry_errors_carry_their_code() -> None:
    registry = Registry([POD])
    with pytest.raises(RegistryError) as err:
        registry.check_conflicts(POD)
    assert err.value.code is ErrorCode.ALREADY_ENROLLED
    other = Pod(**{**POD.to_json(), "name": "web-1", "addresses": ("10.244.1.10",),
                   "labels": {}})
    with pytest.raises(RegistryError) as err:
        registry.check_conflicts(other)
    assert err.value.code is ErrorCode.CONFLICT


def test_pod_info_is_what_the_agent_answers() -> None:
    data = POD.to_json()
    info = PodInfo.from_json(data)
    assert info.to_json() == data and info.key == "shop/web-0"
    listed = pod_list([{**data, "counters": {"drops": {}}}, {**data, "future": 1}])
    assert listed[0].counters == {"drops": {}} and listed[1].counters is None
    with pytest.raises(ContractError, match=r"pod_list result\[0\]: pod.host_ifindex must be"):
        pod_list([{**data, "host_ifindex": "12"}])
    with pytest.raises(ContractError, match="must be a JSON list"):
        pod_list({"pods": []})


# -- the client against a socket that answers what we tell it -----------------------------


@pytest.fixture
def agent_socket(tmp_path: Path) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A UNIX socket answering each connection with the next queued response."""
    path = str(tmp_path / "agent.sock")
    answers: list[dict[str, Any]] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    server.settimeout(0.1)
    done = threading.Event()

    def serve() -> None:
        for _ in range(200):  # bounded: 20 s at most
            if done.is_set():
                return
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(json.dumps(answers.pop(0)).encode() + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path, answers
    finally:
        done.set()
        thread.join(timeout=10)
        server.close()


def test_client_raises_the_agents_code(agent_socket: tuple[str, list[dict[str, Any]]]) -> None:
    path, answers = agent_socket
    answers.append(Response.failure(ErrorCode.NOT_ENROLLED, "no such enrolled pod").to_json())
    with pytest.raises(client.AgentError, match="no such enrolled pod") as err:
        client.call(path, {"op": "pod_del", "name": "x"}, timeout=5)
    assert err.value.code is ErrorCode.NOT_ENROLLED
    answers.append(Response.success([1]).to_json())
    assert client.call(path, {"op": "pod_list"}, timeout=5) == [1]


def test_client_refuses_a_newer_agent_clearly(
        agent_socket: tuple[str, list[dict[str, Any]]]) -> None:
    path, answers = agent_socket
    answers.append({"version": 2, "ok": True, "result": []})
    with pytest.raises(client.AgentError) as err:
        client.call(path, {"op": "pod_list"}, timeout=5)
    assert err.value.code is ErrorCode.UNSUPPORTED_VERSION
    assert path in str(err.value) and "version 2" in str(err.value)
    answers.append({"version": 1, "ok": "yes"})
    with pytest.raises(client.AgentUnavailable, match=r"invalid response.*ok must be bool"):
        client.call(path, {"op": "pod_list"}, timeout=5)


# -- default pod names -------------------------------------------------------------------


def test_default_pod_name_is_the_netns_name_or_a_stable_digest() -> None:
    assert default_pod_name("/run/netns/web-0") == "web-0"
    assert default_pod_name("/var/run/netns/cni-1234/") == "cni-1234"
    name = default_pod_name("/proc/4242/ns/net")
    assert name == "pod-" + hashlib.sha256(b"/proc/4242/ns/net").hexdigest()[:8]
    assert default_pod_name("/proc/4243/ns/net") != name
    # the same in other processes, whatever their hash seed (hash() is not)
    code = "from agent.contracts.api import default_pod_name as d; print(d('/proc/4242/ns/net'))"
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, check=True, env={**os.environ, "PYTHONHASHSEED": seed})
        assert out.stdout.strip() == name
