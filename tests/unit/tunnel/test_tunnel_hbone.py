"""The HBONE legs in process (no root): TLS failures, the source taken from the TCP
peer and checked against its certificate, :authority rules and status codes,
traceparent and baggage, a client that cancels before the 200
(agent/tunnel/{hbone_inbound,outbound,pipeline}.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    A1,
    A2,
    APP_PORT,
    B2,
    TRUST_DOMAIN,
    Mesh,
    identity,
    ip,
    run,
    start_mesh,
    until,
)
from cryptography.hazmat.primitives import serialization

from agent.hbone.exceptions import HboneRejected
from agent.hbone.pool import HbonePool
from agent.hbone.server import HboneServerRequest, serve_hbone
from agent.hbone.stream import HboneStream
from agent.identity.ca import MeshCA
from agent.identity.spiffe import SpiffeId, parse_spiffe_id
from agent.identity.store import IdentityStore, client_context_for
from agent.tunnel import sockets
from agent.tunnel.dialer import TransparentDialer
from agent.tunnel.workloads import ServiceEntry, Workload

FAILED = "istio_tcp_connections_failed_total"
OPENED = "istio_tcp_connections_opened_total"


@contextlib.asynccontextmanager
async def client_pool(ca: MeshCA) -> AsyncIterator[HbonePool]:
    pool = HbonePool(IdentityStore(ca).client_context, trust_domain=TRUST_DOMAIN,
                     keepalive_interval=None)
    try:
        yield pool
    finally:
        await pool.close()


async def connect(pool: HbonePool, m: Mesh, *, as_: str, from_ip: str, to: Workload,
                  authority: str | None = None, forwarded_for: str | None = None,
                  headers: tuple[tuple[str, str], ...] = ()) -> HboneStream:
    """A CONNECT to ``to``'s 15008 on node2, made from ``from_ip`` with ``as_``'s cert."""
    return await pool.open_stream(
        source=parse_spiffe_id(as_), peer=(ip(to), m.ports["hbone"]),
        authority=authority or f"{ip(to)}:{APP_PORT}", forwarded_for=forwarded_for,
        extra_headers=headers, source_ip=from_ip,
        socket_factory=lambda family: sockets.upstream(family, mark=0, source_ip=from_ip,
                                                       transparent=False))


async def read_line(stream: HboneStream) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = await asyncio.wait_for(stream.read(), 5)
        assert chunk, data
        data += chunk
    return data


def one(entries: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(entries) == 1, entries
    return entries[0]


def test_inbound_tls_failure_is_reported(tmp_path: Path, mesh_ca: MeshCA,
                                         foreign_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca) as m:
            # A client that trusts the mesh CA but presents a foreign CA's certificate.
            ctx = client_context_for(foreign_ca.issue(parse_spiffe_id(A1.identity)))
            ctx.load_verify_locations(
                cadata=mesh_ca.cert.public_bytes(serialization.Encoding.PEM).decode())
            with contextlib.suppress(ssl.SSLError, OSError):
                reader, writer = await asyncio.open_connection(
                    ip(A2), m.ports["hbone"], ssl=ctx, local_addr=(ip(A1), 0))
                await asyncio.wait_for(reader.read(), 5)
                writer.close()
            entry = await until("node2 logs the handshake", lambda: m.node2.log)
            entry = one(entry)
            assert (entry["direction"], entry["path"], entry["result"]) == (
                "inbound", "hbone", "tls_failed")
            assert (entry["response_flags"], entry["policy_decision"]) == (
                "TLS_FAILURE", "deny")
            assert entry["src"] == ip(A1) and "certificate" in entry["reason"].lower()
            assert m.node2.metric(FAILED, reporter="destination",
                                  response_flags="TLS_FAILURE",
                                  destination_workload="a2") == 1

    run(main())


def _leaf_of_domain(ca: MeshCA, uri: str, directory: Path) -> tuple[str, str]:
    """A leaf for ``uri`` signed by the mesh CA (issue() refuses other trust domains)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca.cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                       critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False,
                                     False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256()))
    crt, pem = directory / "evil.crt", directory / "evil.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return str(crt), str(pem)


def test_peer_certificate_outside_the_trust_domain_is_a_tls_failure(
        tmp_path: Path, mesh_ca: MeshCA) -> None:
    evil = "spiffe://evil.example/ns/default/sa/sa-a"

    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca) as m:
            crt, key = _leaf_of_domain(mesh_ca, evil, tmp_path)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.set_alpn_protocols(["h2"])
            ctx.load_cert_chain(crt, key)
            ctx.load_verify_locations(
                cadata=mesh_ca.cert.public_bytes(serialization.Encoding.PEM).decode())
            with contextlib.suppress(ssl.SSLError, OSError):
                reader, writer = await asyncio.open_connection(
                    ip(A2), m.ports["hbone"], ssl=ctx, local_addr=(ip(A1), 0))
                await asyncio.wait_for(reader.read(), 5)
                writer.close()
            entry = one(await until("node2 logs", lambda: m.node2.log))
            assert (entry["result"], entry["response_flags"]) == ("tls_failed", "TLS_FAILURE")
            assert "trust domain" in entry["reason"] and "src_identity" not in entry, entry

    run(main())


def test_hbone_for_a_pod_not_here_is_refused_and_counted(tmp_path: Path,
                                                         mesh_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca) as m:
            # node2's node address: no pod there (the datapath would never do this)
            reader, writer = await asyncio.open_connection(m.node2.ip, m.ports["hbone"])
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            entry = one(await until("node2 logs", lambda: m.node2.log))
            assert (entry["result"], entry["policy_decision"]) == ("refused", "deny")
            assert "not enrolled" in entry["reason"]
            assert m.node2.metric(FAILED, reporter="destination", response_flags="DENY") == 1

    run(main())


def test_outbound_tls_failure_is_reported(tmp_path: Path, mesh_ca: MeshCA,
                                          foreign_ca: MeshCA) -> None:
    impostor = Workload("c2", "default", "sa-c", ("127.0.2.9",), identity("default", "sa-c"))

    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca, extra_remote=(impostor,)) as m:
            # Something at c2's 15008 that the mesh CA never signed.
            ctx = IdentityStore(foreign_ca).server_context(SpiffeId(TRUST_DOMAIN, "default",
                                                                     "sa-c"))
            server = await asyncio.start_server(lambda r, w: w.close(), ip(impostor),
                                                m.ports["hbone"], ssl=ctx)
            try:
                reader, writer = await m.node1.capture(ip(A1), ip(impostor))
                with contextlib.suppress(ConnectionResetError):
                    assert await asyncio.wait_for(reader.read(), 5) == b""
                writer.close()
                await m.node1.drain()
            finally:
                server.close()
            entry = one(m.node1.log)
            assert (entry["result"], entry["response_flags"]) == ("tls_failed", "TLS_FAILURE")
            assert m.node1.metric(FAILED, reporter="source", response_flags="TLS_FAILURE",
                                  source_workload="a1") == 1

    run(main())


def test_source_is_the_tcp_peer_never_forwarded(tmp_path: Path, mesh_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca) as m, client_pool(mesh_ca) as pool:
            # a1 claims (Forwarded) to be b2: the pod still sees a1, policy sees a1.
            stream = await connect(pool, m, as_=A1.identity, from_ip=ip(A1), to=A2,
                                   forwarded_for=ip(B2))
            assert await read_line(stream) == f"peer {ip(A1)}\n".encode()
            await stream.close_write()
            await until("node2 logs", lambda: m.node2.log)
            entry = one(m.node2.log)
            assert (entry["src"], entry["src_identity"], entry["result"]) == (
                ip(A1), A1.identity, "ok")

    run(main())


def test_forwarded_cannot_satisfy_an_ip_blocks_allow(tmp_path: Path, mesh_ca: MeshCA) -> None:
    from conftest import policy_yaml

    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca) as m, client_pool(mesh_ca) as pool:
            m.node2.write_policy("allow-b2", policy_yaml(
                "allow-b2", "ALLOW", [{"from": [{"source": {"ipBlocks": [ip(B2)]}}]}]))
            # issue 11 item 1: a mesh identity writing b2's address into Forwarded
            with pytest.raises(HboneRejected) as info:
                await connect(pool, m, as_=A1.identity, from_ip=ip(A1), to=A2,
                              forwarded_for=ip(B2))
            assert info.value.status == 401
            entry = one(await until("node2 logs", lambda: m.node2.log))
            assert (entry["result"], entry["src"]) == ("denied", ip(A1))

    run(main())


def test_identity_must_match_the_source_address(tmp_path: Path, mesh_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca) as m, client_pool(mesh_ca) as pool:
            # b2's identity, connecting from a1's address: refused.
            with pytest.raises(HboneRejected) as info:
                await connect(pool, m, as_=B2.identity, from_ip=ip(A1), to=A2)
            assert info.value.status == 401
            entry = await until("node2 logs", lambda: m.node2.log)
            entry = one(entry)
            assert (entry["result"], entry["response_flags"], entry["policy_decision"]) == (
                "identity_error", "IDENTITY_ERROR", "deny")
            assert A1.identity in entry["reason"] and entry["src_identity"] == B2.identity
            assert m.node2.metric(FAILED, reporter="destination",
                                  response_flags="IDENTITY_ERROR") == 1
            # From an address no workload owns (e.g. a node), the certificate decides.
            stream = await connect(pool, m, as_=B2.identity, from_ip="127.0.2.254", to=A2)
            assert await read_line(stream) == b"peer 127.0.2.254\n"
            await stream.close_write()

    run(main())


def test_authority_must_be_this_destination(tmp_path: Path, mesh_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca) as m, client_pool(mesh_ca) as pool:
            wrong = f"{ip(B2)}:{APP_PORT}"
            with pytest.raises(HboneRejected) as info:
                await connect(pool, m, as_=A1.identity, from_ip=ip(A1), to=A2,
                              authority=wrong)
            assert info.value.status == 400  # ztunnel validate_destination: BAD_REQUEST
            entry = one(await until("node2 logs", lambda: m.node2.log))
            assert (entry["result"], entry["dst"]) == ("refused", wrong)
            assert ":authority" in entry["reason"]
            assert (entry["bytes_sent"], entry["bytes_received"]) == (0, 0)
            # ... and never one of the tunnel's own ports (ztunnel: SelfCall, 503)
            with pytest.raises(HboneRejected) as info:
                await connect(pool, m, as_=A1.identity, from_ip=ip(A1), to=A2,
                              authority=f"{ip(A2)}:{m.ports['inbound']}")
            assert info.value.status == 503

    run(main())


def test_hostname_authority_resolves_through_a_service(tmp_path: Path,
                                                        mesh_ca: MeshCA) -> None:
    service = ServiceEntry("api.default.svc.cluster.local", "default", {80: APP_PORT},
                           (ip(A2),))

    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca, services=(service,)) as m, \
                client_pool(mesh_ca) as pool:
            stream = await connect(pool, m, as_=A1.identity, from_ip=ip(A1), to=A2,
                                   authority="api.default.svc.cluster.local:80")
            assert await read_line(stream) == f"peer {ip(A1)}\n".encode()
            await stream.close_write()
            # An unknown hostname: 503, as ztunnel's find_inbound_upstream (NoHostname).
            with pytest.raises(HboneRejected) as info:
                await connect(pool, m, as_=A1.identity, from_ip=ip(A1), to=A2,
                              authority="nope.default.svc.cluster.local:80")
            assert info.value.status == 503
            await until("node2 logs both", lambda: len(m.node2.log) == 2)
            ok = one(m.node2.closed(result="ok"))
            assert ok["dst"] == "api.default.svc.cluster.local:80"
            bad = one(m.node2.closed(result="connect_failed"))
            assert "no service" in bad["reason"]

    run(main())


def test_policy_denial_is_401_and_deny_on_both_ends(tmp_path: Path, mesh_ca: MeshCA) -> None:
    from conftest import B1, policy_yaml

    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca) as m:
            m.node2.write_policy("deny-team-b", policy_yaml(
                "deny-team-b", "DENY", [{"from": [{"source": {"namespaces": ["team-b"]}}]}]))
            reader, writer = await m.node1.capture(ip(B1), ip(A2))
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            await m.node1.drain()
            await until("node2 logs", lambda: m.node2.log)
            out, inb = one(m.node1.log), one(m.node2.log)
            assert (out["result"], out["reason"]) == ("denied", "peer answered 401")
            assert (inb["result"], inb["policy"], inb["policy_decision"]) == (
                "denied", "default/deny-team-b", "deny")
            for node, reporter in ((m.node1, "source"), (m.node2, "destination")):
                labels = {"reporter": reporter, "source_workload": "b1",
                          "destination_workload": "a2"}
                assert node.metric(FAILED, response_flags="DENY", **labels) == 1
                assert node.metric(OPENED, **labels) == 0
            # a1 is still let through
            reader, writer = await m.node1.capture(ip(A1), ip(A2))
            assert await asyncio.wait_for(reader.readline(), 5) == f"peer {ip(A1)}\n".encode()
            writer.close()

    run(main())


def test_headers_traceparent_and_baggage(tmp_path: Path, mesh_ca: MeshCA) -> None:
    probe = Workload("c2", "default", "sa-c", ("127.0.2.9",), identity("default", "sa-c"))
    seen: list[HboneServerRequest] = []

    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca, extra_remote=(probe,)) as m:
            ctx = IdentityStore(mesh_ca).server_context(parse_spiffe_id(probe.identity))

            async def on_stream(request: HboneServerRequest) -> None:
                seen.append(request)
                request.reject(503)

            server = await asyncio.start_server(
                lambda r, w: serve_hbone(r, w, on_stream=on_stream), ip(probe),
                m.ports["hbone"], ssl=ctx)
            try:
                reader, writer = await m.node1.capture(ip(A1), ip(probe))
                with contextlib.suppress(ConnectionResetError):
                    await asyncio.wait_for(reader.read(), 5)
                writer.close()
                await m.node1.drain()
            finally:
                server.close()
            assert len(seen) == 1, seen
            request = seen[0]
            # ztunnel src/baggage.rs: service.name is the canonical service (app label).
            assert request.header("baggage") == (
                "k8s.namespace.name=default,k8s.pod.name=a1,service.name=web,"
                "service.version=v1")
            trace = request.header("traceparent")
            assert trace is not None and len(trace) == 55 and trace.startswith("00-")
            assert one(m.node1.log)["traceparent"] == trace
            assert request.forwarded_for == ip(A1)

    run(main())


class HeldDialer(TransparentDialer):
    """Dials only once ``release`` is set (to cancel a client while we dial)."""

    def __init__(self) -> None:
        super().__init__(0, 2.0, transparent=False)
        self.release = asyncio.Event()
        self.dialing = asyncio.Event()

    async def connect(self, dst: tuple[str, int], source_ip: str | None) -> socket.socket:
        self.dialing.set()
        await self.release.wait()
        return await super().connect(dst, source_ip)


def test_client_cancels_before_the_200(tmp_path: Path, mesh_ca: MeshCA) -> None:
    async def main() -> None:
        dialer = HeldDialer()
        async with start_mesh(tmp_path, ca=mesh_ca, dialers={"node2": dialer}) as m, \
                client_pool(mesh_ca) as pool:
            opening = asyncio.ensure_future(
                connect(pool, m, as_=A1.identity, from_ip=ip(A1), to=A2))
            await asyncio.wait_for(dialer.dialing.wait(), 5)
            opening.cancel()  # resets the stream before any answer
            with contextlib.suppress(asyncio.CancelledError):
                await opening
            # The pipeline abandons the dial as soon as the client is gone.
            entry = one(await until("node2 logs", lambda: m.node2.log))
            dialer.release.set()
            await asyncio.sleep(0.05)
            assert ip(A1) not in m.servers.peers  # the pod was never dialed
            assert (entry["result"], entry["response_flags"]) == ("cancelled", "CONNECT")
            assert entry["policy_decision"] == "allow"
            assert m.node2.metric(FAILED, reporter="destination", response_flags="CONNECT") == 1
            assert m.node2.metric(OPENED) == 0

    run(main())
