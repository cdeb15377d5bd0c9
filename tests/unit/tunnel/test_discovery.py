"""Where the tunnel learns workloads (agent/tunnel/discovery.py): the agent's
workloads.json and its peers', read through agent.contracts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import structlog.testing

from agent.contracts.files import WorkloadEntry, WorkloadsFile
from agent.tunnel.discovery import FileWorkloads, StaticWorkloads
from agent.tunnel.workloads import ServiceEntry, Workload


def write(path: Path, *entries: WorkloadEntry, bump: int = 0) -> None:
    path.write_text(json.dumps(WorkloadsFile(entries).to_json()))
    stat = path.stat()
    os.utime(path, (stat.st_atime, stat.st_mtime + bump))  # a distinct mtime


def entry(name: str, address: str) -> WorkloadEntry:
    return WorkloadEntry(name=name, namespace="default", service_account=name,
                         addresses=(address,), identity=f"spiffe://td/ns/default/sa/{name}",
                         labels={})


def test_local_miss_rereads_the_file(tmp_path: Path) -> None:
    local, peer = tmp_path / "workloads.json", tmp_path / "peer.json"
    write(local, entry("a", "10.0.0.1"))
    write(peer, entry("b", "10.0.1.1"))
    source = FileWorkloads(local, [peer], mesh_cidrs=["10.9.0.0/16"])
    source.refresh()
    assert source.local("10.0.0.1") is not None and source.remote("10.0.1.1") is not None
    assert source.counts() == (1, 1)
    # enrolled a moment ago: found on the first connection, before the next poll
    write(local, entry("a", "10.0.0.1"), entry("c", "10.0.0.2"), bump=5)
    assert source.local("10.0.0.2") is not None
    assert source.is_mesh_destination("10.9.3.4") and not source.is_mesh_destination("8.8.8.8")
    assert source.lookup("10.0.1.1") is not None and source.lookup("not an ip") is None


def test_unreadable_file_keeps_the_last_good_set(tmp_path: Path) -> None:
    local = tmp_path / "workloads.json"
    write(local, entry("a", "10.0.0.1"))
    source = FileWorkloads(local)
    source.refresh()
    local.write_text("{not json")
    os.utime(local, (0, local.stat().st_mtime + 10))
    source.refresh()
    assert source.local("10.0.0.1") is not None
    local.write_text(json.dumps({"version": 99, "workloads": []}))  # a newer contract
    os.utime(local, (0, local.stat().st_mtime + 20))
    source.refresh()
    assert source.local("10.0.0.1") is not None


def test_a_rejected_file_is_warned_about_once_per_version(tmp_path: Path) -> None:
    local, peer = tmp_path / "workloads.json", tmp_path / "peer.json"
    write(local, entry("a", "10.0.0.1"))
    write(peer, entry("b", "10.0.1.1"))
    source = FileWorkloads(local, [peer])
    source.refresh()
    with structlog.testing.capture_logs() as logs:
        local.write_text(json.dumps({"version": 99, "workloads": []}))  # a newer contract
        os.utime(local, (0, local.stat().st_mtime + 10))
        peer.write_text("{not json")
        os.utime(peer, (0, peer.stat().st_mtime + 10))
        for _ in range(5):  # five polls of the same bad versions
            source.refresh()
            assert source.local("10.0.0.9") is None  # a miss re-stats, still no re-warn
        warned = [e["event"] for e in logs if e["log_level"] == "warning"]
        assert warned == ["workloads file unreadable; keeping the last good one",
                          "peer workloads unreadable; keeping the last good set"], warned
        write(local, entry("a", "10.0.0.1"), entry("c", "10.0.0.2"), bump=20)  # fixed
        source.refresh()
    assert source.local("10.0.0.2") is not None and source.remote("10.0.1.1") is not None


def test_static_services_prefer_the_namespace() -> None:
    w = Workload("a", "default", "a", ("10.0.0.1",), "spiffe://td/ns/default/sa/a")
    other = ServiceEntry("api.svc", "other", {80: 8081}, ("10.0.0.1",))
    mine = ServiceEntry("api.svc", "default", {80: 8080}, ("10.0.0.1",))
    source = StaticWorkloads([w], services=[other, mine])
    found = source.service("api.svc", "default")
    assert found is mine and found.target_port(80, "10.0.0.1") == 8080
    assert found.target_port(81, "10.0.0.1") is None
    assert found.target_port(80, "10.0.0.9") is None
    assert source.service("api.svc", "elsewhere") is other
    assert source.service("nope", "default") is None
