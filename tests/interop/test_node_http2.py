"""Wire compatibility with an independent HTTP/2 stack: Node.js's built-in ``http2``
(nghttp2), both directions, over mutual TLS 1.3 on 127.0.0.1.

(a) our HBONE client (HboneClient / HbonePool) against a Node CONNECT echo server;
(b) a Node CONNECT client against our ``serve_hbone``.

Node is a hard requirement: if it is missing these tests fail, they do not skip.
The Node scripts exit on their own after a bounded time; we also kill them in finally.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from node_peers import node_process, pattern, read_line

from agent.hbone.client import HboneClient
from agent.hbone.exceptions import HboneRejected, HboneStreamError
from agent.hbone.pool import HbonePool
from agent.hbone.server import HboneServerRequest, serve_hbone
from agent.hbone.stream import HboneStream
from agent.identity.ca import WorkloadCert, init_ca
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityStore

TRUST_DOMAIN = "cluster.local"
CLIENT = SpiffeId(TRUST_DOMAIN, "default", "node-client")
SERVER = SpiffeId(TRUST_DOMAIN, "istio-system", "node-server")
LOOPBACK = "127.0.0.1"
NODE_TIMEOUT = 20  # seconds the node scripts allow themselves before exiting


def run(coro: Coroutine[Any, Any, Any], timeout: float = 40.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> IdentityStore:
    return IdentityStore(init_ca(tmp_path_factory.mktemp("ca") / "ca", TRUST_DOMAIN))


def write_pems(directory: Path, cert: WorkloadCert) -> dict[str, str]:
    """The node scripts take files; the key file is 0600 inside a pytest tmp dir."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"cert": directory / "cert.pem", "key": directory / "key.pem",
             "ca": directory / "ca.pem"}
    paths["cert"].write_bytes(cert.cert_pem)
    paths["key"].touch(mode=0o600)
    paths["key"].write_bytes(cert.key_pem)
    paths["ca"].write_bytes(cert.trust_anchors_pem)
    return {name: str(path) for name, path in paths.items()}


async def read_until_eof(stream: HboneStream, limit: int = 64 * 1024 * 1024) -> bytes:
    received = bytearray()
    while len(received) <= limit:
        data = await stream.read()
        if not data:
            return bytes(received)
        received += data
    raise AssertionError("read more than the limit")


# ---- (a) our client -> Node server --------------------------------------------------------


def test_our_client_against_node_server(store: IdentityStore, tmp_path: Path) -> None:
    files = write_pems(tmp_path / "server", store.get(SERVER))
    payload = pattern(6 * 1024 * 1024 + 123)  # > one 4 MiB stream window

    async def main() -> None:
        async with node_process("connect_server.js", "--cert", files["cert"],
                                "--key", files["key"], "--ca", files["ca"],
                                "--streams", "2", "--timeout", str(NODE_TIMEOUT)) as proc:
            ready = await read_line(proc)
            assert ready.startswith("READY ")
            port = int(ready.split()[1])
            pool = HbonePool(store.client_context, trust_domain=TRUST_DOMAIN)
            try:
                streams = [
                    await pool.open_stream(
                        source=CLIENT, peer=(LOOPBACK, port), authority=authority,
                        forwarded_for=source_ip, expected_peer=SERVER,
                        baggage="k8s.namespace.name=default,k8s.pod.name=client-0")
                    for authority, source_ip in (("10.0.0.9:8080", "10.1.2.3"),
                                                 ("[fd00::9]:443", "fd00::1"))]
                assert pool.connection_count() == 1  # both streams on one connection
                for stream in streams:
                    assert stream.peer_identity == SERVER

                async def send(stream: HboneStream) -> None:
                    await stream.write(payload)
                    await stream.close_write()

                senders = [asyncio.ensure_future(send(s)) for s in streams]
                replies = await asyncio.gather(*(read_until_eof(s) for s in streams))
                await asyncio.gather(*senders)
            finally:
                await pool.close()
            for reply, (authority, forwarded) in zip(
                    replies, (("10.0.0.9:8080", 'for="10.1.2.3"'),
                              ("[fd00::9]:443", 'for="[fd00::1]"')), strict=True):
                header, _, echoed = reply.partition(b"\n")
                info = json.loads(header)
                assert info["authority"] == authority
                assert info["forwarded"] == forwarded
                assert info["baggage"] == "k8s.namespace.name=default,k8s.pod.name=client-0"
                assert info["peer_san"] == f"URI:{CLIENT}"
                assert info["alpn"] == "h2" and info["tls"] == "TLSv1.3"
                assert echoed == payload
            assert await asyncio.wait_for(proc.wait(), 10) == 0

    run(main())


def test_node_server_refuses_foreign_client(store: IdentityStore, tmp_path: Path) -> None:
    files = write_pems(tmp_path / "server", store.get(SERVER))
    foreign = IdentityStore(init_ca(tmp_path / "foreign-ca", TRUST_DOMAIN))

    async def main() -> None:
        async with node_process("connect_server.js", "--cert", files["cert"],
                                "--key", files["key"], "--ca", files["ca"],
                                "--timeout", str(NODE_TIMEOUT)) as proc:
            port = int((await read_line(proc)).split()[1])
            # Foreign CA on both sides of the trust: the server cert fails our check.
            with pytest.raises((ssl.SSLError, ConnectionError, HboneStreamError)) as info:
                client = await HboneClient.connect((LOOPBACK, port),
                                                   foreign.client_context(CLIENT),
                                                   connect_timeout=5)
                await client.open_stream("10.0.0.1:80", timeout=5)
            assert not isinstance(info.value, HboneRejected)

    run(main())


# ---- (b) Node client -> our server --------------------------------------------------------


async def _serve_echo(store: IdentityStore,
                      seen: list[HboneServerRequest]) -> asyncio.Server:
    async def on_stream(request: HboneServerRequest) -> None:
        seen.append(request)
        stream = request.accept()
        while data := await stream.read():
            await stream.write(data)
        await stream.close_write()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_hbone(reader, writer, on_stream=on_stream, handler_grace=1.0)

    return await asyncio.start_server(handle, LOOPBACK, 0, ssl=store.server_context(SERVER))


def test_node_client_against_our_server(store: IdentityStore, tmp_path: Path) -> None:
    files = write_pems(tmp_path / "client", store.get(CLIENT))
    size = 5 * 1024 * 1024 + 7

    async def main() -> None:
        seen: list[HboneServerRequest] = []
        server = await _serve_echo(store, seen)
        port = server.sockets[0].getsockname()[1]
        try:
            async with node_process("connect_client.js", "--cert", files["cert"],
                                    "--key", files["key"], "--ca", files["ca"],
                                    "--port", str(port), "--authority", "10.3.3.3:9000",
                                    "--bytes", str(size),
                                    "--timeout", str(NODE_TIMEOUT)) as proc:
                result = json.loads(await read_line(proc, timeout=NODE_TIMEOUT + 5))
                assert await asyncio.wait_for(proc.wait(), 10) == 0
        finally:
            server.close()
        assert result["status"] == 200, result
        assert result["received"] == size
        expected = hashlib.sha256(pattern(size)).hexdigest()
        assert result["sent_sha256"] == expected
        assert result["received_sha256"] == expected
        assert result["server_san"] == f"URI:{SERVER}"
        assert len(seen) == 1
        assert seen[0].authority == "10.3.3.3:9000"
        assert seen[0].peer_identity == CLIENT

    run(main())


def test_node_client_non_connect_gets_400(store: IdentityStore, tmp_path: Path) -> None:
    files = write_pems(tmp_path / "client", store.get(CLIENT))

    async def main() -> None:
        seen: list[HboneServerRequest] = []
        server = await _serve_echo(store, seen)
        port = server.sockets[0].getsockname()[1]
        try:
            async with node_process("connect_client.js", "--cert", files["cert"],
                                    "--key", files["key"], "--ca", files["ca"],
                                    "--port", str(port), "--authority", "10.3.3.3:9000",
                                    "--method", "GET",
                                    "--timeout", str(NODE_TIMEOUT)) as proc:
                result = json.loads(await read_line(proc, timeout=NODE_TIMEOUT + 5))
        finally:
            server.close()
        assert result["status"] == 400, result
        assert seen == []

    run(main())


def test_node_client_bad_authority_gets_400(store: IdentityStore, tmp_path: Path) -> None:
    # A hostname authority (example.com:80) is a service hostname now, as in ztunnel;
    # an out-of-range port is still a bad request.
    files = write_pems(tmp_path / "client", store.get(CLIENT))

    async def main() -> None:
        seen: list[HboneServerRequest] = []
        server = await _serve_echo(store, seen)
        port = server.sockets[0].getsockname()[1]
        try:
            async with node_process("connect_client.js", "--cert", files["cert"],
                                    "--key", files["key"], "--ca", files["ca"],
                                    "--port", str(port), "--authority", "10.0.0.1:99999",
                                    "--timeout", str(NODE_TIMEOUT)) as proc:
                result = json.loads(await read_line(proc, timeout=NODE_TIMEOUT + 5))
        finally:
            server.close()
        assert result["status"] == 400, result
        assert seen == []

    run(main())

