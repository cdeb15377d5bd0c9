"""Policy in the tunnel, in process (no root): decisions on every inbound path,
revocation of exactly the connections a new set denies, dry-run, exact metrics and
one access-log line per connection (agent/tunnel/{gate,tracker,pipeline}.py).
Moved here from tests/integration/test_policy_lab.py where no kernel is needed."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import structlog.testing
from conftest import A1, A2, APP_PORT, B1, EXTERNAL, ip, policy_yaml, run, start_mesh, until

from agent.identity.ca import MeshCA

DENY_TEAM_B = policy_yaml("deny-team-b", "DENY",
                          [{"from": [{"source": {"namespaces": ["team-b"]}}]}])
FAILED = "istio_tcp_connections_failed_total"
OPENED = "istio_tcp_connections_opened_total"
CLOSED = "istio_tcp_connections_closed_total"


async def attempt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """True if the server answered (its peer line), False if the tunnel refused."""
    try:
        line = await asyncio.wait_for(reader.readline(), 5)
    except ConnectionResetError:
        line = b""
    writer.close()
    return line.startswith(b"peer ")


def test_allow_port_only(tmp_path: Path, mesh_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca) as m:
            m.node2.write_policy("allow-port", policy_yaml(
                "allow-port", "ALLOW", [{"to": [{"operation": {"ports": [str(APP_PORT)]}}]}]))
            assert await attempt(*await m.node1.capture(ip(A1), ip(A2)))
            # Nothing listens on 1, but policy answers first: denied, not connect_failed.
            assert not await attempt(*await m.node1.capture(ip(A1), ip(A2), 1))
            await m.node1.drain()
            await until("node2 logs", lambda: len(m.node2.log) == 2)
            denied = m.node2.closed(result="denied")
            assert len(denied) == 1 and "allow" in denied[0]["reason"].lower(), denied
            assert denied[0]["policy_decision"] == "deny"

    run(main())


def test_ip_blocks_see_the_plaintext_source_address(tmp_path: Path, mesh_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca) as m:
            m.node2.write_policy("deny-external", policy_yaml(
                "deny-external", "DENY", [{"from": [{"source": {"ipBlocks": [EXTERNAL]}}]}]))
            assert not await attempt(*await m.node2.plaintext_in(EXTERNAL, ip(A2)))
            # A principal rule never matches plaintext: no identity from an address.
            m.node2.write_policy("deny-external", policy_yaml(
                "deny-external", "DENY",
                [{"from": [{"source": {"principals": [A1.identity.removeprefix("spiffe://")]}}]}]))
            assert await attempt(*await m.node2.plaintext_in(ip(A1), ip(A2)))
            await m.node2.drain()
            first, second = m.node2.log
            assert (first["result"], first["policy"]) == ("denied", "default/deny-external")
            assert second["result"] == "ok" and "src_identity" not in second

    run(main())


def test_same_node_is_checked_like_cross_node(tmp_path: Path, mesh_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca) as m:
            m.node1.write_policy("deny-team-b", DENY_TEAM_B)
            # b1 (team-b) -> a1 on the same node: denied in process.
            assert not await attempt(*await m.node1.capture(ip(B1), ip(A1)))
            await m.node1.drain()
            entry = m.node1.log[0]
            assert (entry["path"], entry["result"], entry["policy"]) == (
                "hbone-local", "denied", "default/deny-team-b")
            for reporter in ("source", "destination"):
                assert m.node1.metric(FAILED, reporter=reporter, response_flags="DENY",
                                      source_workload="b1") == 1

    run(main())


def test_policy_change_revokes_exactly_the_denied_connections(tmp_path: Path,
                                                              mesh_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca) as m:
            held: dict[str, Any] = {}
            for name, w in (("a1", A1), ("b1", B1)):
                reader, writer = await m.node1.capture(ip(w), ip(A2))
                assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"peer ")
                held[name] = (reader, writer)
            assert len(m.node2.inputs.tracker) == 2
            m.node2.write_policy("deny-team-b", DENY_TEAM_B)
            # b1's connection is closed by node2, a1's keeps working.
            reader, writer = held["b1"]
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            reader, writer = held["a1"]
            writer.write(b"still here")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b"still here"
            writer.close()
            await m.node1.drain()
            await until("node2 logs both", lambda: len(m.node2.log) == 2)
            revoked = m.node2.closed(src=ip(B1))[0]
            assert (revoked["result"], revoked["policy"], revoked["policy_decision"]) == (
                "denied", "default/deny-team-b", "deny")
            assert m.node2.closed(src=ip(A1))[0]["result"] == "ok"
            # It had been opened: counted as opened and closed, not failed.
            labels = {"reporter": "destination", "source_workload": "b1"}
            assert m.node2.metric(OPENED, **labels) == 1
            assert m.node2.metric(CLOSED, **labels) == 1
            assert m.node2.metric(FAILED, **labels) == 0
            assert len(m.node2.inputs.tracker) == 0

    run(main())


def test_dry_run_deny_is_reported_not_enforced(tmp_path: Path, mesh_ca: MeshCA) -> None:
    import json
    doc = json.loads(DENY_TEAM_B)
    doc["metadata"]["annotations"] = {"istio.io/dry-run": "true"}

    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca) as m:
            m.node2.write_policy("audit", json.dumps(doc))
            with structlog.testing.capture_logs() as logs:
                assert await attempt(*await m.node1.capture(ip(B1), ip(A2)))
                await m.node1.drain()
                await until("node2 logs", lambda: m.node2.log)
            assert m.node2.log[0]["result"] == "ok"
            matched = [e for e in logs if e["event"] == "dry-run policy matched"]
            assert matched and matched[0]["would_allow"] is False, logs

    run(main())


def test_exact_counts_and_one_line_per_connection(tmp_path: Path, mesh_ca: MeshCA) -> None:
    count, request = 5, b"r" * 300

    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca) as m:
            for _ in range(count):
                reader, writer = await m.node1.capture(ip(A1), ip(A2))
                line = await asyncio.wait_for(reader.readline(), 5)
                writer.write(request)
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(), 5) == request
                writer.close()
            await m.node1.drain()
            await until("node2 logs all", lambda: len(m.node2.log) == count)
            answer = len(line) + len(request)
            for node, reporter in ((m.node1, "source"), (m.node2, "destination")):
                assert len(node.log) == count
                assert {e["result"] for e in node.log} == {"ok"}
                labels = {"reporter": reporter, "source_workload": "a1",
                          "destination_workload": "a2"}
                assert node.metric(OPENED, **labels) == count
                assert node.metric(CLOSED, **labels) == count
                assert node.metric("istio_tcp_received_bytes_total", **labels) == \
                    count * len(request)
                assert node.metric("istio_tcp_sent_bytes_total", **labels) == count * answer
            # one HBONE connection carried them all (pooled per source pod and address)
            pool = m.node1.inputs.pool
            assert pool is not None and pool.connection_count() == 1

    run(main())
