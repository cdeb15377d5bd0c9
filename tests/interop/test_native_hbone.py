"""Wire interop of the native datapath (``meshagent-datapath``, Rust) with the Python
HBONE implementation (agent/hbone) and with Node's http2 (nghttp2), both directions,
over mutual TLS 1.3 on 127.0.0.1; exact byte counts, half-close, reset, identity checks
and the HTTP/2 hardening of issue 11, driven with raw frames.

No root needed. Every process and server is stopped in ``finally``/context managers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import re
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from hbone_peers import ALLOW_ALL, WORKLOAD
from node_peers import node_process, pattern, read_line

from agent.hbone.client import HboneClient
from agent.hbone.server import HboneServerRequest, serve_hbone
from agent.hbone.stream import HboneStream
from agent.identity.ca import WorkloadCert, init_ca
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityStore
from agent.tunnel.native.driver import NativeDatapath
from agent.tunnel.native.protocol import (
    DatapathConfig,
    HboneConnectionClosed,
    InboundListener,
    OutboundListener,
    Outcome,
)

TRUST_DOMAIN = "cluster.local"
CLIENT = SpiffeId(TRUST_DOMAIN, "default", "native-client")
SERVER = SpiffeId(TRUST_DOMAIN, "istio-system", "native-server")
LOOPBACK = "127.0.0.1"
NODE_TIMEOUT = 20
TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-00$")
ENHANCE_YOUR_CALM = 0xB
REFUSED_STREAM = 0x7




# The Node helpers below mirror tests/interop/test_node_http2.py (h3-hbone's file, which
# this branch may not edit); the lead can fold them into one helper module.
def write_pems(directory: Path, cert: WorkloadCert) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"cert": directory / "cert.pem", "key": directory / "key.pem",
             "ca": directory / "ca.pem"}
    paths["cert"].write_bytes(cert.full_chain_pem)
    paths["key"].touch(mode=0o600)
    paths["key"].write_bytes(cert.key_pem)
    paths["ca"].write_bytes(cert.trust_anchors_pem)
    return {name: str(path) for name, path in paths.items()}


def run(coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> IdentityStore:
    return IdentityStore(init_ca(tmp_path_factory.mktemp("ca") / "ca", TRUST_DOMAIN))


def pems(tmp: Path, cert: WorkloadCert, name: str) -> dict[str, str]:
    return write_pems(tmp / name, cert)


# ---- a TCP destination ------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    """A loopback TCP server: echo (half-close aware) or a scripted handler."""

    server: asyncio.Server
    address: str = ""
    accepted: int = 0

    def __post_init__(self) -> None:
        host, port = self.server.sockets[0].getsockname()[:2]
        self.address = f"{host}:{port}"


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then half-close (FIN) our side."""
    while data := await reader.read(256 * 1024):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def target(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                   Awaitable[None]] = echo) -> AsyncIterator[Target]:
    holder: list[Target] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        holder[0].accepted += 1
        with contextlib.suppress(ConnectionError):
            await handler(reader, writer)

    server = await asyncio.start_server(on_conn, LOOPBACK, 0)
    holder.append(Target(server))
    try:
        yield holder[0]
    finally:
        server.close()


def inbound(files: dict[str, str], *destinations: str) -> InboundListener:
    return InboundListener(name="hbone", listen=f"{LOOPBACK}:0", cert=files["cert"],
                           key=files["key"], destinations=destinations, workload=WORKLOAD)


def outbound(files: dict[str, str], peer: str, authority: str,
             peer_identities: tuple[str, ...] = (str(SERVER),),
             baggage: str | None = "k8s.namespace.name=default,k8s.pod.name=client-0",
             ) -> OutboundListener:
    return OutboundListener(name="out", listen=f"{LOOPBACK}:0", peer=peer,
                            authority=authority, cert=files["cert"], key=files["key"],
                            peer_identities=peer_identities, baggage=baggage)


def config(files: dict[str, str], *, inbound_: tuple[InboundListener, ...] = (),
           outbound_: tuple[OutboundListener, ...] = (), workers: int = 2,
           runtime: str = "per_core") -> DatapathConfig:
    return DatapathConfig(trust_domain=TRUST_DOMAIN, roots=files["ca"], inbound=inbound_,
                          outbound=outbound_, workers=workers, runtime=runtime)


async def read_all(stream: HboneStream, limit: int = 64 << 20) -> bytes:
    received = bytearray()
    while data := await stream.read():
        received += data
        assert len(received) <= limit
    return bytes(received)


async def tcp_exchange(host: str, port: int, payload: bytes) -> bytes:
    """Send payload, half-close, read to EOF."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        async def send() -> None:
            writer.write(payload)
            await writer.drain()
            writer.write_eof()

        sender = asyncio.ensure_future(send())
        received = await reader.read(-1)
        await sender
        return received
    finally:
        writer.close()


# ---- Python client -> native server --------------------------------------------------


def test_python_client_against_native_server(store: IdentityStore, tmp_path: Path) -> None:
    server_files = pems(tmp_path, store.get(SERVER), "server")
    payload = pattern(6 * 1024 * 1024 + 123)  # more than one 4 MiB stream window

    async def main() -> None:
        async with target() as dest:
            cfg = config(server_files, inbound_=(inbound(server_files, dest.address),))
            async with NativeDatapath(cfg, policy=ALLOW_ALL) as dp:
                client = await HboneClient.connect(dp.address("hbone"),
                                                   store.client_context(CLIENT),
                                                   trust_domain=TRUST_DOMAIN,
                                                   expected_peer=SERVER)
                try:
                    streams = [await client.open_stream(
                        dest.address, forwarded_for="10.1.2.3",
                        baggage="k8s.namespace.name=default",
                        extra_headers=[("traceparent", "00-" + "1" * 32 + "-" + "2" * 16
                                        + "-00")]) for _ in range(2)]

                    async def one(stream: HboneStream) -> bytes:
                        sender = asyncio.ensure_future(stream.write(payload))
                        await sender
                        await stream.close_write()
                        return await read_all(stream)

                    replies = await asyncio.gather(*(one(s) for s in streams))
                finally:
                    await client.close()
                assert all(r == payload for r in replies)
                records = await dp.connection_records(2)
        for record in records:
            assert record.direction == "inbound"
            assert record.outcome is Outcome.CLOSED
            assert record.status == 200
            assert record.bytes_to_destination == len(payload)
            assert record.bytes_from_destination == len(payload)
            assert record.peer_identity == str(CLIENT)
            assert record.dst == dest.address
            assert record.forwarded == 'for="10.1.2.3"'
            assert record.baggage == "k8s.namespace.name=default"
            assert record.traceparent == "00-" + "1" * 32 + "-" + "2" * 16 + "-00"
            # The source is the HBONE connection's TCP peer, not the Forwarded header.
            assert record.src.startswith(f"{LOOPBACK}:")
        assert dest.accepted == 2

    run(main())


# ---- native client -> Python server ---------------------------------------------------


def test_native_client_against_python_server(store: IdentityStore, tmp_path: Path) -> None:
    client_files = pems(tmp_path, store.get(CLIENT), "client")
    payload = pattern(5 * 1024 * 1024 + 7)

    async def main() -> None:
        seen: list[HboneServerRequest] = []
        tls_connections = 0

        async def on_stream(request: HboneServerRequest) -> None:
            seen.append(request)
            stream = request.accept()
            while data := await stream.read():
                await stream.write(data)
            await stream.close_write()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal tls_connections
            tls_connections += 1
            await serve_hbone(reader, writer, on_stream=on_stream, handler_grace=1.0)

        server = await asyncio.start_server(handle, LOOPBACK, 0,
                                            ssl=store.server_context(SERVER))
        port = server.sockets[0].getsockname()[1]
        try:
            # One worker: its pool is the only pool (each per-core worker has its own).
            cfg = config(client_files, outbound_=(
                outbound(client_files, f"{LOOPBACK}:{port}", "10.3.3.3:9000"),), workers=1)
            async with NativeDatapath(cfg, policy=ALLOW_ALL) as dp:
                host, out_port = dp.address("out")
                replies = await asyncio.gather(
                    *(tcp_exchange(host, out_port, payload) for _ in range(3)))
                records = await dp.connection_records(3)
        finally:
            server.close()
        assert all(r == payload for r in replies)
        assert tls_connections == 1  # three streams multiplexed on one pooled connection
        assert len(seen) == 3
        for request in seen:
            assert request.authority == "10.3.3.3:9000"
            assert request.peer_identity == CLIENT
            assert request.header("forwarded") == f'for="{LOOPBACK}"'
            assert request.baggage == {"k8s.namespace.name": "default",
                                       "k8s.pod.name": "client-0"}
            assert TRACEPARENT.match(request.header("traceparent") or "")
        for record in records:
            assert record.direction == "outbound"
            assert record.outcome is Outcome.CLOSED
            assert record.status == 200
            assert record.bytes_to_destination == len(payload)
            assert record.bytes_from_destination == len(payload)

    run(main())


def test_native_pool_closes_idle_connections(store: IdentityStore, tmp_path: Path) -> None:
    """A pooled connection that carried no stream for the idle timeout is closed; the
    next connection opens a new one (the Python pool's behaviour)."""
    client_files = pems(tmp_path, store.get(CLIENT), "client")

    async def main() -> None:
        opened = 0
        closed = asyncio.Event()

        async def on_stream(request: HboneServerRequest) -> None:
            stream = request.accept()
            while data := await stream.read():
                await stream.write(data)
            await stream.close_write()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal opened
            opened += 1
            await serve_hbone(reader, writer, on_stream=on_stream, handler_grace=1.0)
            closed.set()

        server = await asyncio.start_server(handle, LOOPBACK, 0,
                                            ssl=store.server_context(SERVER))
        port = server.sockets[0].getsockname()[1]
        try:
            listener = dataclasses.replace(
                outbound(client_files, f"{LOOPBACK}:{port}", "10.3.3.3:9000"),
                pool_idle_ms=300)
            async with NativeDatapath(config(client_files, outbound_=(listener,)),
                                      policy=ALLOW_ALL) as dp:
                assert await tcp_exchange(*dp.address("out"), b"one") == b"one"
                await asyncio.wait_for(closed.wait(), 10)  # reaped after ~300 ms idle
                assert await tcp_exchange(*dp.address("out"), b"two") == b"two"
        finally:
            server.close()
        assert opened == 2

    run(main())


# ---- Node client -> native server; native client -> Node server ------------------------


def test_node_client_against_native_server(store: IdentityStore, tmp_path: Path) -> None:
    server_files = pems(tmp_path, store.get(SERVER), "server")
    client_files = pems(tmp_path, store.get(CLIENT), "client")
    size = 5 * 1024 * 1024 + 7

    async def main() -> None:
        async with target() as dest:
            cfg = config(server_files, inbound_=(inbound(server_files, dest.address),))
            async with NativeDatapath(cfg, policy=ALLOW_ALL) as dp:
                port = dp.address("hbone")[1]
                async with node_process("connect_client.js", "--cert", client_files["cert"],
                                        "--key", client_files["key"],
                                        "--ca", client_files["ca"], "--port", str(port),
                                        "--authority", dest.address, "--bytes", str(size),
                                        "--timeout", str(NODE_TIMEOUT)) as proc:
                    result = json.loads(await read_line(proc, timeout=NODE_TIMEOUT + 5))
                    assert await asyncio.wait_for(proc.wait(), 10) == 0
                [record] = await dp.connection_records(1)
        assert result["status"] == 200, result
        expected = hashlib.sha256(pattern(size)).hexdigest()
        assert result["sent_sha256"] == expected == result["received_sha256"]
        assert result["server_san"] == f"URI:{SERVER}"
        assert record.bytes_to_destination == size == record.bytes_from_destination
        assert record.peer_identity == str(CLIENT)

    run(main())


@pytest.mark.parametrize(("method", "authority"), [("GET", None), ("CONNECT", "example.com:80")])
def test_node_bad_requests_get_400(store: IdentityStore, tmp_path: Path, method: str,
                                   authority: str | None) -> None:
    server_files = pems(tmp_path, store.get(SERVER), "server")
    client_files = pems(tmp_path, store.get(CLIENT), "client")

    async def main() -> None:
        async with target() as dest:
            cfg = config(server_files, inbound_=(inbound(server_files, dest.address),))
            async with NativeDatapath(cfg, policy=ALLOW_ALL) as dp:
                port = dp.address("hbone")[1]
                async with node_process("connect_client.js", "--cert", client_files["cert"],
                                        "--key", client_files["key"],
                                        "--ca", client_files["ca"], "--port", str(port),
                                        "--authority", authority or dest.address,
                                        "--method", method,
                                        "--timeout", str(NODE_TIMEOUT)) as proc:
                    result = json.loads(await read_line(proc, timeout=NODE_TIMEOUT + 5))
                [record] = await dp.connection_records(1)
        assert result["status"] == 400, result
        assert record.outcome is Outcome.REJECTED and record.status == 400
        assert dest.accepted == 0

    run(main())


def test_native_client_against_node_server(store: IdentityStore, tmp_path: Path) -> None:
    server_files = pems(tmp_path, store.get(SERVER), "server")
    client_files = pems(tmp_path, store.get(CLIENT), "client")
    payload = pattern(6 * 1024 * 1024 + 1)

    async def main() -> None:
        async with node_process("connect_server.js", "--cert", server_files["cert"],
                                "--key", server_files["key"], "--ca", server_files["ca"],
                                "--streams", "2", "--timeout", str(NODE_TIMEOUT)) as proc:
            port = int((await read_line(proc)).split()[1])
            cfg = config(client_files, outbound_=(
                outbound(client_files, f"{LOOPBACK}:{port}", "[fd00::9]:443"),))
            async with NativeDatapath(cfg, policy=ALLOW_ALL) as dp:
                host, out_port = dp.address("out")
                replies = await asyncio.gather(
                    *(tcp_exchange(host, out_port, payload) for _ in range(2)))
                records = await dp.connection_records(2)
            assert await asyncio.wait_for(proc.wait(), 10) == 0
        for reply in replies:
            header, _, echoed = reply.partition(b"\n")
            info = json.loads(header)
            assert info["authority"] == "[fd00::9]:443"
            assert info["forwarded"] == f'for="{LOOPBACK}"'
            assert info["baggage"] == "k8s.namespace.name=default,k8s.pod.name=client-0"
            assert info["peer_san"] == f"URI:{CLIENT}"
            assert info["alpn"] == "h2" and info["tls"] == "TLSv1.3"
            assert echoed == payload
        for record, reply in zip(records, replies, strict=True):
            assert record.bytes_to_destination == len(payload)
            assert record.bytes_from_destination == len(reply)

    run(main())


# ---- native pair: half-close and reset semantics ----------------------------------------


@contextlib.asynccontextmanager
async def native_pair(store: IdentityStore, tmp: Path, dest: Target, runtime: str = "per_core"
                      ) -> AsyncIterator[tuple[NativeDatapath, NativeDatapath]]:
    """Client-side datapath (outbound listener) -> server-side datapath (15008) -> dest."""
    server_files = pems(tmp, store.get(SERVER), "server")
    client_files = pems(tmp, store.get(CLIENT), "client")
    async with NativeDatapath(config(server_files, inbound_=(
            inbound(server_files, dest.address),), runtime=runtime), policy=ALLOW_ALL) as server_dp:
        host, port = server_dp.address("hbone")
        async with NativeDatapath(config(client_files, outbound_=(
                outbound(client_files, f"{host}:{port}", dest.address),),
                runtime=runtime), policy=ALLOW_ALL) as client_dp:
            yield client_dp, server_dp


@pytest.mark.parametrize("runtime", ["per_core", "multi_thread"])
def test_half_close_both_ways(store: IdentityStore, tmp_path: Path, runtime: str) -> None:
    """The client's FIN reaches the destination while the destination keeps sending,
    and the destination's later FIN reaches the client."""

    async def late_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read(-1)  # to EOF: the client's FIN came through
        writer.write(b"after-eof:" + hashlib.sha256(request).hexdigest().encode())
        await writer.drain()
        writer.write_eof()
        writer.close()

    payload = pattern(300_000)

    async def main() -> None:
        async with target(late_reply) as dest, \
                native_pair(store, tmp_path, dest, runtime) as (c, s):
            reply = await tcp_exchange(*c.address("out"), payload)
            [out_record] = await c.connection_records(1)
            [in_record] = await s.connection_records(1)
        expected = b"after-eof:" + hashlib.sha256(payload).hexdigest().encode()
        assert reply == expected
        for record in (out_record, in_record):
            assert record.outcome is Outcome.CLOSED
            assert record.bytes_to_destination == len(payload)
            assert record.bytes_from_destination == len(expected)

    run(main())


def test_destination_reset_reaches_client(store: IdentityStore, tmp_path: Path) -> None:
    async def reset_after_data(reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def main() -> None:
        async with target(reset_after_data) as dest, \
                native_pair(store, tmp_path, dest) as (c, s):
            reader, writer = await asyncio.open_connection(*c.address("out"))
            writer.write(b"hello")
            await writer.drain()
            with pytest.raises(ConnectionResetError):
                data = await asyncio.wait_for(reader.read(100), 10)
                # A FIN here instead of an RST would mean the reset was lost.
                assert data != b"", "got FIN, expected RST"
            writer.close()
            [out_record] = await c.connection_records(1)
            [in_record] = await s.connection_records(1)
        assert in_record.outcome is Outcome.SOCKET_RESET
        assert out_record.outcome is Outcome.STREAM_RESET
        assert in_record.bytes_to_destination == 5 == out_record.bytes_to_destination

    run(main())


def test_client_reset_reaches_destination(store: IdentityStore, tmp_path: Path) -> None:
    seen: list[str] = []

    async def wait_for_reset(reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readexactly(3)
            seen.append("data")
            rest = await asyncio.wait_for(reader.read(100), 10)
            seen.append("fin" if rest == b"" else "more")
        except ConnectionResetError:
            seen.append("reset")

    async def main() -> None:
        async with target(wait_for_reset) as dest, \
                native_pair(store, tmp_path, dest) as (c, s):
            _, writer = await asyncio.open_connection(*c.address("out"))
            writer.write(b"abc")
            await writer.drain()
            for _ in range(100):  # until the destination has the bytes (bounded)
                if seen:
                    break
                await asyncio.sleep(0.05)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            [out_record] = await c.connection_records(1)
            [in_record] = await s.connection_records(1)
            for _ in range(100):
                if len(seen) >= 2:
                    break
                await asyncio.sleep(0.05)
        assert seen == ["data", "reset"]
        assert out_record.outcome is Outcome.SOCKET_RESET
        assert in_record.outcome is Outcome.STREAM_RESET

    run(main())


# ---- identity checks ---------------------------------------------------------------------


def test_foreign_trust_domain_client_refused(store: IdentityStore, tmp_path: Path) -> None:
    """A spiffe://evil.example certificate signed by the mesh CA is refused (issue 11 #2)."""
    server_files = pems(tmp_path, store.get(SERVER), "server")
    rogue_ca = dataclasses.replace(store.ca, trust_domain="evil.example")
    evil = rogue_ca.issue(SpiffeId("evil.example", "default", "intruder"))
    evil_store = IdentityStore(rogue_ca)
    evil_store._certs[evil.spiffe_id] = evil  # type: ignore[attr-defined]

    async def main() -> None:
        async with target() as dest:
            cfg = config(server_files, inbound_=(inbound(server_files, dest.address),))
            async with NativeDatapath(cfg, policy=ALLOW_ALL) as dp:
                with pytest.raises((ssl.SSLError, ConnectionError, OSError, Exception)):
                    client = await HboneClient.connect(
                        dp.address("hbone"), evil_store.client_context(evil.spiffe_id),
                        connect_timeout=5)
                    try:
                        await client.open_stream(dest.address, timeout=5)
                    finally:
                        await client.close()
                event = await dp.next_event()
        assert isinstance(event, HboneConnectionClosed)
        assert "outside trust domain" in event.reason
        assert dest.accepted == 0

    run(main())


def test_native_client_refuses_unexpected_server(store: IdentityStore, tmp_path: Path) -> None:
    client_files = pems(tmp_path, store.get(CLIENT), "client")
    other = SpiffeId(TRUST_DOMAIN, "default", "impostor")

    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await serve_hbone(reader, writer, on_stream=lambda r: asyncio.sleep(0),
                              handler_grace=0.1)

        server = await asyncio.start_server(handle, LOOPBACK, 0,
                                            ssl=store.server_context(other))
        port = server.sockets[0].getsockname()[1]
        try:
            cfg = config(client_files, outbound_=(
                outbound(client_files, f"{LOOPBACK}:{port}", "10.0.0.1:80"),))
            async with NativeDatapath(cfg, policy=ALLOW_ALL) as dp:
                # The client's connection is reset: nothing was sent anywhere.
                with pytest.raises(ConnectionResetError):
                    await tcp_exchange(*dp.address("out"), b"x")
                [record] = await dp.connection_records(1)
        finally:
            server.close()
        assert record.outcome is Outcome.CONNECT_FAILED
        assert "not the expected identity" in (record.reason or "")

    run(main())


# ---- raw HTTP/2 against the native server (issue 11 hardening) ---------------------------


class RawClient:
    """An mTLS HTTP/2 client that can send frames h2 would never send (pure sockets)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_outbound_headers=False))
        self.encoder = hpack.Encoder()
        self.events: list[h2.events.Event] = []

    @classmethod
    async def connect(cls, address: tuple[str, int], ctx: ssl.SSLContext) -> RawClient:
        reader, writer = await asyncio.open_connection(*address, ssl=ctx,
                                                       server_hostname=address[0])
        client = cls(reader, writer)
        client.conn.initiate_connection()
        await client.flush()
        return client

    async def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())
        await self.writer.drain()

    def raw_frame(self, frame_type: int, flags: int, stream_id: int, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload))[1:] + bytes([frame_type, flags]) + \
            struct.pack(">I", stream_id) + payload

    def connect_headers(self, stream_id: int, authority: str, end_stream: bool = False
                        ) -> bytes:
        block = self.encoder.encode([(":method", "CONNECT"), (":authority", authority)])
        return self.raw_frame(0x1, 0x4 | (0x1 if end_stream else 0), stream_id, block)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_until(self, done: Callable[[list[h2.events.Event]], bool],
                         timeout: float = 10.0) -> list[h2.events.Event]:
        """Feed what the server sends into a lenient h2 state machine until ``done``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done(self.events):
            data = await asyncio.wait_for(self.reader.read(65536),
                                          max(0.01, deadline - loop.time()))
            if not data:
                break
            try:
                self.events += self.conn.receive_data(data)
            except Exception as exc:  # frames for streams h2 never opened
                self.events.append(exc)  # type: ignore[arg-type]
                break
            with contextlib.suppress(Exception):
                await self.flush()
        return self.events

    def close(self) -> None:
        self.writer.close()


def _text(headers: dict[Any, Any]) -> str:
    """The :status of a decoded header dict (str keys with header_encoding set)."""
    value = headers.get(":status", headers.get(b":status", b""))
    return value.decode() if isinstance(value, bytes) else str(value)


def goaway(events: list[Any]) -> h2.events.ConnectionTerminated | None:
    return next((e for e in events if isinstance(e, h2.events.ConnectionTerminated)), None)


@contextlib.asynccontextmanager
async def native_server(store: IdentityStore, tmp: Path, dest: Target
                        ) -> AsyncIterator[NativeDatapath]:
    files = pems(tmp, store.get(SERVER), "server")
    async with NativeDatapath(config(files, inbound_=(inbound(files, dest.address),)),
                              policy=ALLOW_ALL) as dp:
        yield dp


def test_bad_requests_answered_on_their_stream(store: IdentityStore, tmp_path: Path) -> None:
    """GET, and CONNECT with a host name, both with END_STREAM, get 400 on their own
    streams; a good CONNECT on the same connection still gets 200 (issue 11 #3)."""

    async def main() -> None:
        async with target() as dest, native_server(store, tmp_path, dest) as dp:
            raw = await RawClient.connect(dp.address("hbone"), store.client_context(CLIENT))
            try:
                raw.conn.send_headers(1, [(":method", "GET"), (":scheme", "https"),
                                          (":path", "/"), (":authority", dest.address)],
                                      end_stream=True)
                raw.conn.send_headers(3, [(":method", "CONNECT"),
                                          (":authority", "example.com:80")], end_stream=True)
                raw.conn.send_headers(5, [(":method", "CONNECT"), (":authority", dest.address)])
                await raw.flush()
                events = await raw.read_until(lambda ev: sum(
                    isinstance(e, h2.events.ResponseReceived) for e in ev) >= 3)
            finally:
                raw.close()
        statuses = {e.stream_id: _text(dict(e.headers or [])) for e in events
                    if isinstance(e, h2.events.ResponseReceived)}
        assert statuses == {1: "400", 3: "400", 5: "200"}
        assert goaway(events) is None

    run(main())


def test_rapid_reset_never_dials(store: IdentityStore, tmp_path: Path) -> None:
    """HEADERS + RST_STREAM floods (CVE-2023-44487): nothing is dialed for a cancelled
    stream, the flood ends in GOAWAY ENHANCE_YOUR_CALM or is absorbed, and a new client
    is served afterwards."""

    async def main() -> None:
        async with target() as dest, native_server(store, tmp_path, dest) as dp:
            raw = await RawClient.connect(dp.address("hbone"), store.client_context(CLIENT))
            try:
                burst = b"".join(
                    raw.connect_headers(sid, dest.address)
                    + raw.raw_frame(0x3, 0, sid, struct.pack(">I", 0x8))  # RST CANCEL
                    for sid in range(1, 2 * 2000, 2))
                with contextlib.suppress(ConnectionError):
                    await raw.send_raw(burst)
                events = await raw.read_until(lambda ev: goaway(ev) is not None, timeout=5)
            except (asyncio.TimeoutError, ConnectionError):
                events = raw.events
            finally:
                raw.close()
            terminated = goaway(events)
            if terminated is not None:
                assert terminated.error_code == ENHANCE_YOUR_CALM
            assert dest.accepted == 0
            # Other clients keep being served.
            client = await HboneClient.connect(dp.address("hbone"),
                                               store.client_context(CLIENT))
            try:
                stream = await client.open_stream(dest.address, timeout=5)
                await stream.write(b"still here")
                await stream.close_write()
                assert await read_all(stream) == b"still here"
            finally:
                await client.close()

    run(main())


def test_ping_flood_goaway(store: IdentityStore, tmp_path: Path) -> None:
    async def main() -> None:
        async with target() as dest, native_server(store, tmp_path, dest) as dp:
            raw = await RawClient.connect(dp.address("hbone"), store.client_context(CLIENT))
            try:
                # 12 bursts of 1,000 PINGs, reading the PONGs in between (a peer that reads
                # its ACKs: the flood is only ended by the guard's bound, 10,000 / 10 s).
                for burst in range(12):
                    await raw.send_raw(b"".join(
                        raw.raw_frame(0x6, 0, 0, struct.pack(">Q", burst * 1000 + i))
                        for i in range(1000)))
                    with contextlib.suppress(asyncio.TimeoutError):
                        await raw.read_until(lambda ev: goaway(ev) is not None, timeout=0.1)
                    if goaway(raw.events) is not None:
                        break
                events = raw.events
            finally:
                raw.close()
        terminated = goaway(events)
        assert terminated is not None
        assert terminated.error_code == ENHANCE_YOUR_CALM

    run(main())


def test_streams_over_the_limit_refused(store: IdentityStore, tmp_path: Path) -> None:
    """Stream 101 gets RST_STREAM REFUSED_STREAM; the connection and the first 100 live on
    (issue 11 #9)."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)
        writer.close()

    async def main() -> None:
        async with target(hold) as dest, native_server(store, tmp_path, dest) as dp:
            raw = await RawClient.connect(dp.address("hbone"), store.client_context(CLIENT))
            try:
                # Wait for the server's SETTINGS (MAX_CONCURRENT_STREAMS 100) to arrive.
                await raw.read_until(lambda ev: any(
                    isinstance(e, h2.events.RemoteSettingsChanged) for e in ev))
                await raw.send_raw(b"".join(raw.connect_headers(2 * i + 1, dest.address)
                                            for i in range(101)))
                refused: list[int] = []
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 10
                buffer = b""
                while not refused and loop.time() < deadline:
                    buffer += await asyncio.wait_for(raw.reader.read(65536), 10)
                    while len(buffer) >= 9:
                        length = int.from_bytes(buffer[:3], "big")
                        if len(buffer) < 9 + length:
                            break
                        ftype, sid = buffer[3], int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                        body = buffer[9:9 + length]
                        buffer = buffer[9 + length:]
                        if ftype == 0x3 and int.from_bytes(body, "big") == REFUSED_STREAM:
                            refused.append(sid)
                        assert ftype != 0x7, "GOAWAY instead of REFUSED_STREAM"
            finally:
                raw.close()
        assert refused == [201]

    run(main())


def test_continuation_flood_goaway(store: IdentityStore, tmp_path: Path) -> None:
    """A header block that never ends (HEADERS then endless CONTINUATION) is cut off with
    GOAWAY ENHANCE_YOUR_CALM long before it could grow large (issue 11 #6); the native
    process stays small and a new client is served."""

    async def main() -> None:
        async with target() as dest, native_server(store, tmp_path, dest) as dp:
            raw = await RawClient.connect(dp.address("hbone"), store.client_context(CLIENT))
            try:
                # Settle the handshake first: nothing of ours may come between the
                # HEADERS and its CONTINUATIONs (that alone is a PROTOCOL_ERROR).
                await raw.read_until(lambda ev: any(
                    isinstance(e, h2.events.RemoteSettingsChanged) for e in ev))
                block = raw.encoder.encode([(":method", "CONNECT"),
                                            (":authority", dest.address)])
                flood = raw.raw_frame(0x1, 0, 1, block)  # no END_HEADERS
                for _ in range(2000):  # valid HPACK, one small header per frame
                    flood += raw.raw_frame(0x9, 0, 1, raw.encoder.encode([("x-pad", "a" * 64)]))
                with contextlib.suppress(ConnectionError):
                    await raw.send_raw(flood)
                with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
                    await raw.read_until(lambda ev: goaway(ev) is not None, timeout=5)
            finally:
                raw.close()
            terminated = goaway(raw.events)
            assert terminated is not None
            assert terminated.error_code == ENHANCE_YOUR_CALM
            status = Path(f"/proc/{dp.pid}/status").read_text()
            rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
            assert rss_kb < 64 * 1024
            assert dest.accepted == 0
            client = await HboneClient.connect(dp.address("hbone"),
                                               store.client_context(CLIENT))
            try:
                stream = await client.open_stream(dest.address, timeout=5)
                await stream.close_write()
                assert await read_all(stream) == b""
            finally:
                await client.close()

    run(main())
