"""Every path through the tunnel, in process on loopback (no root): outcome, access
log and metrics of each (agent/tunnel/{outbound,inbound,hbone_inbound,pipeline}.py)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    A1,
    A2,
    APP_PORT,
    B1,
    EXTERNAL,
    ip,
    run,
    start_mesh,
    until,
)

from agent.identity.ca import MeshCA

OPENED = "istio_tcp_connections_opened_total"
CLOSED = "istio_tcp_connections_closed_total"
FAILED = "istio_tcp_connections_failed_total"
SENT = "istio_tcp_sent_bytes_total"
RECEIVED = "istio_tcp_received_bytes_total"


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               payload: bytes = b"ping") -> tuple[str, bytes]:
    """Read the server's peer line, send ``payload``, half-close, read the echo."""
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.write(payload)
    writer.write_eof()
    rest = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return line.decode().strip().removeprefix("peer "), rest


async def refused(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The tunnel closed the client's connection without a byte (a reset, usually)."""
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


def one(entries: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(entries) == 1, entries
    return entries[0]


def test_cross_node_hbone(tmp_path: Path, mesh_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca) as m:
            peer, data = await echo(*await m.node1.capture(ip(A1), ip(A2)), b"hello")
            # The pod sees the client pod's own address: the outer connection was
            # made from it and node2 took the source from the TCP peer.
            assert (peer, data) == (ip(A1), b"hello")
            await m.node1.drain()
            await until("node2 logs", lambda: m.node2.log)
            await m.node2.drain()
            out = one(m.node1.closed(direction="outbound"))
            inb = one(m.node2.closed(direction="inbound"))
            line = len(f"peer {ip(A1)}\n") + 5
            assert out == {**out, "path": "hbone", "result": "ok", "response_flags": "-",
                           "policy_decision": "allow", "src": out["src"],
                           "dst": f"{ip(A2)}:{APP_PORT}", "src_identity": A1.identity,
                           "dst_identity": A2.identity, "bytes_sent": 5,
                           "bytes_received": line}
            assert inb == {**inb, "path": "hbone", "result": "ok", "src": ip(A1),
                           "dst": f"{ip(A2)}:{APP_PORT}", "src_identity": A1.identity,
                           "dst_identity": A2.identity, "bytes_sent": 5,
                           "bytes_received": line, "policy_decision": "allow"}
            # One traceparent for both ends of the connection.
            assert out["traceparent"] == inb["traceparent"]
            for node, reporter in ((m.node1, "source"), (m.node2, "destination")):
                labels = {"reporter": reporter, "source_workload": "a1",
                          "source_canonical_service": "web", "source_version": "v1",
                          "source_principal": A1.identity, "destination_workload": "a2",
                          "destination_canonical_service": "api",
                          "destination_principal": A2.identity,
                          "connection_security_policy": "mutual_tls",
                          "response_flags": "-"}
                assert node.metric(OPENED, **labels) == 1, reporter
                assert node.metric(CLOSED, **labels) == 1, reporter
                # Istio: received = client -> server, sent = server -> client.
                assert node.metric(RECEIVED, **labels) == 5, reporter
                assert node.metric(SENT, **labels) == line, reporter
                assert node.metric(FAILED) == 0, reporter

    run(main())


def test_same_node_is_hbone_local_reported_by_both_reporters(tmp_path: Path,
                                                             mesh_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca) as m:
            peer, data = await echo(*await m.node1.capture(ip(A1), ip(B1)))
            assert (peer, data) == (ip(A1), b"ping")
            await m.node1.drain()
            entry = one(m.node1.log)
            assert (entry["direction"], entry["path"], entry["result"]) == (
                "outbound", "hbone-local", "ok")
            assert (entry["src_identity"], entry["dst_identity"]) == (A1.identity, B1.identity)
            for reporter in ("source", "destination"):
                labels = {"reporter": reporter, "source_workload": "a1",
                          "destination_workload": "b1",
                          "connection_security_policy": "mutual_tls"}
                assert m.node1.metric(OPENED, **labels) == 1
                assert m.node1.metric(CLOSED, **labels) == 1
            assert not m.node2.log  # nothing crossed to the other node

    run(main())


def test_passthrough_outside_the_mesh(tmp_path: Path, mesh_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca) as m:
            peer, data = await echo(*await m.node1.capture(ip(A1), EXTERNAL))
            assert (peer, data) == (ip(A1), b"ping")
            await m.node1.drain()
            entry = one(m.node1.log)
            assert (entry["path"], entry["result"], entry["dst"]) == (
                "passthrough", "ok", f"{EXTERNAL}:{APP_PORT}")
            assert "dst_identity" not in entry and "traceparent" not in entry
            assert m.node1.metric(OPENED, reporter="source", source_workload="a1",
                                  destination_workload="unknown",
                                  connection_security_policy="none") == 1

    run(main())


def test_plain_mode_carries_mesh_traffic_in_clear(tmp_path: Path, mesh_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca, mode="plain") as m:
            peer, data = await echo(*await m.node1.capture(ip(A1), ip(A2)))
            assert (peer, data) == (ip(A1), b"ping")
            await m.node1.drain()
            assert one(m.node1.log)["path"] == "plain"

    run(main())


def test_connect_failure(tmp_path: Path, mesh_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca) as m:
            # Nothing listens on a2:1 -> node2 cannot dial the pod: 503 on the stream,
            # CONNECT on both ends.
            await refused(*(await m.node1.capture(ip(A1), ip(A2), 1)))
            await m.node1.drain()
            await until("node2 logs", lambda: m.node2.log)
            out, inb = one(m.node1.log), one(m.node2.log)
            assert (out["result"], out["response_flags"]) == ("connect_failed", "CONNECT")
            assert out["reason"] == "peer answered 503", out
            assert (inb["result"], inb["response_flags"]) == ("connect_failed", "CONNECT")
            assert m.node1.metric(FAILED, reporter="source", response_flags="CONNECT") == 1
            assert m.node2.metric(FAILED, reporter="destination",
                                  response_flags="CONNECT") == 1
            assert m.node1.metric(OPENED) == 0 and m.node2.metric(OPENED) == 0

            # Passthrough to a closed port: CONNECT on the source side only.
            await refused(*(await m.node1.capture(ip(A1), EXTERNAL, 1)))
            await m.node1.drain()
            entry = m.node1.closed(path="passthrough")[0]
            assert entry["result"] == "connect_failed" and entry["policy_decision"] == "allow"

    run(main())


def test_plaintext_inbound_never_names_a_source_by_address(tmp_path: Path,
                                                         mesh_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca) as m:
            # From a1's address, but in plaintext: nothing proves it is a1.
            peer, data = await echo(*await m.node2.plaintext_in(ip(A1), ip(A2)))
            assert (peer, data) == (ip(A1), b"ping")
            await m.node2.drain()
            entry = one(m.node2.log)
            assert (entry["direction"], entry["path"], entry["result"]) == (
                "inbound", "plain", "ok")
            assert "src_identity" not in entry and entry["dst_identity"] == A2.identity
            assert m.node2.metric(OPENED, reporter="destination", source_workload="unknown",
                                  source_principal="unknown", destination_workload="a2",
                                  connection_security_policy="none") == 1

    run(main())


def test_plaintext_inbound_refusals(tmp_path: Path, mesh_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca, inbound_mode="strict") as m:
            await refused(*(await m.node2.plaintext_in(EXTERNAL, ip(A2))))
            await refused(*(await m.node2.plaintext_in(EXTERNAL, ip(A1))))  # not here
            await m.node2.drain()
            strict, elsewhere = m.node2.log
            assert (strict["result"], strict["policy_decision"]) == ("refused", "deny")
            assert "strict" in strict["reason"]
            assert elsewhere["result"] == "refused" and "not enrolled" in elsewhere["reason"]
            assert m.node2.metric(FAILED, reporter="destination", response_flags="DENY") == 2

    run(main())


def test_direct_connection_to_a_tunnel_port_is_refused(tmp_path: Path,
                                                      mesh_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca) as m:
            # Not captured: straight at node1's own 15001, from a1's address.
            await refused(*(await asyncio.open_connection(
                m.node1.ip, m.ports["outbound"], local_addr=(ip(A1), 0))))
            await refused(*(await asyncio.open_connection(
                m.node2.ip, m.ports["inbound"], local_addr=(EXTERNAL, 0))))
            await until("both logged", lambda: m.node1.log and m.node2.log)
            for node in (m.node1, m.node2):
                entry = one(node.log)
                assert (entry["result"], entry["policy_decision"]) == ("refused", "deny")
                assert "direct connection" in entry["reason"], entry
                # No identity is attached on the strength of the source address.
                assert "src_identity" not in entry
            assert m.node1.metric(FAILED, reporter="source", response_flags="DENY",
                                  source_principal="unknown") == 1

    run(main())


def test_unknown_source_is_refused_in_hbone_mode(tmp_path: Path, mesh_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca) as m:
            await refused(*(await m.node1.capture(EXTERNAL, ip(A2))))
            await m.node1.drain()
            entry = one(m.node1.log)
            assert (entry["result"], entry["response_flags"]) == (
                "identity_error", "IDENTITY_ERROR")

    run(main())


def test_every_access_log_line_is_written(tmp_path: Path, mesh_ca: MeshCA) -> None:
    import structlog.testing

    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca) as m:
            with structlog.testing.capture_logs() as logs:
                await echo(*await m.node1.capture(ip(A1), ip(B1)))
                await m.node1.drain()
            lines = [e for e in logs if e["event"] == "connection closed"]
            assert len(lines) == 1
            assert {k: v for k, v in lines[0].items() if k not in ("event", "log_level")} \
                == {**m.node1.log[0], "duration_ms": lines[0]["duration_ms"]}

    run(main())



def test_a_reset_midway_is_reset_on_both_sides(tmp_path: Path, mesh_ca: MeshCA) -> None:
    from agent.tunnel import sockets

    async def rst_after_hello(reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        sockets.abort(writer.get_extra_info("socket"))
        writer.transport.abort()

    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca) as m:
            server = await asyncio.start_server(rst_after_hello, EXTERNAL, APP_PORT + 1)
            try:
                reader, writer = await m.node1.capture(ip(A1), EXTERNAL, APP_PORT + 1)
                writer.write(b"hello")
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(reader.read(), 5)
                writer.close()
                await m.node1.drain()
            finally:
                server.close()
            entry = one(m.node1.log)
            assert (entry["result"], entry["response_flags"], entry["bytes_sent"]) == (
                "reset", "-", 5)
            assert m.node1.metric(CLOSED, reporter="source", source_workload="a1") == 1
            assert m.node1.metric(FAILED) == 0

    run(main())
