"""HTTP/2 floods and other bad peers against our HBONE servers in their own process,
over mutual TLS on 127.0.0.1 (issue 11 items 2, 4 and 6, SETTINGS/PING floods,
oversized headers, slow peers, foreign certificates): each flooding attacker gets
GOAWAY ENHANCE_YOUR_CALM, nothing is dialed for cancelled or refused streams, the
server's RSS (read from /proc) grows by a bounded amount and comes back down once the
attacker leaves, and an honest client on another connection is served throughout.

Every case runs against both servers (issue 14, Bad input): ``python`` (agent.hbone's
server, tests/interop/programs/hbone_server.py) and ``native`` (meshagent-datapath's
15008). Dials are counted where they land, at the backend.

Every loop is bounded in count; timeouts only turn a hang into a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import hpack
import pytest
from hbone_peers import ALLOW_ALL, LOOPBACK, WORKLOAD, hbone_server, rss_kb
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)
from test_native_hbone import Target, target, write_pems

from agent.hbone import errors
from agent.hbone.client import HboneClient
from agent.identity.ca import init_ca, load_ca
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityStore, client_context_for
from agent.tunnel.native.driver import NativeDatapath
from agent.tunnel.native.protocol import DatapathConfig, InboundListener

TRUST_DOMAIN = "cluster.local"
SERVER = SpiffeId(TRUST_DOMAIN, "istio-system", "ztunnel")
ATTACKER = SpiffeId(TRUST_DOMAIN, "default", "attacker")
HONEST = SpiffeId(TRUST_DOMAIN, "default", "honest")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MIB = 1024  # in KiB, as /proc reports RSS
# Growth of the server's RSS (KiB) we accept while under attack, and what may remain
# once the attacker is gone. Before the fixes a rapid-reset or CONTINUATION flood grew
# it by hundreds of MB.
MAX_GROWTH_KB = 64 * MIB
MAX_RESIDUE_KB = 24 * MIB
ROUNDS = 8


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("flood-ca") / "ca"
    init_ca(path, TRUST_DOMAIN)
    return path


@pytest.fixture(params=["python", "native"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclasses.dataclass
class FloodServer:
    """An HBONE server under attack: its port and pid; ``settle`` lets it return what
    it freed (the Python server collects garbage); ``backend`` counts the dials."""

    port: int
    pid: int
    backend: Target
    settle: Callable[[], Awaitable[object]]

    @property
    def backend_port(self) -> int:
        return int(self.backend.address.rpartition(":")[2])

    def rss_kb(self) -> int:
        return rss_kb(self.pid)


@contextlib.asynccontextmanager
async def flood_server(kind: str, ca_dir: Path) -> AsyncIterator[FloodServer]:
    """An echo backend and the ``kind`` HBONE server (identity SERVER) in front of it.
    Side effects: starts a server process and a loopback listener, ended on exit."""
    async with target() as backend:
        if kind == "python":
            async with hbone_server(ca_dir, str(SERVER), lifetime=200,
                                    sndbuf=16384) as server:
                yield FloodServer(server.port, server.pid, backend,
                                  lambda: server.stats(collect=True))
            return
        store = IdentityStore(load_ca(ca_dir))
        files = write_pems(ca_dir.parent / "native-server", store.get(SERVER))
        listener = InboundListener("hbone", f"{LOOPBACK}:0", files["cert"], files["key"],
                                   destinations=(backend.address,), workload=WORKLOAD)
        cfg = DatapathConfig(trust_domain=TRUST_DOMAIN, roots=files["ca"], workers=2,
                             inbound=(listener,))
        async with NativeDatapath(cfg, policy=ALLOW_ALL) as dp:
            assert dp.pid is not None

            async def settle() -> None:
                dp.pending_events()  # the per-stream records are not under test here

            yield FloodServer(dp.address("hbone")[1], dp.pid, backend, settle)


def run(coro: Coroutine[Any, Any, Any], timeout: float = 240.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def scan_for_goaway(data: bytes) -> tuple[int | None, int]:
    """(GOAWAY error code or None, bytes of complete frames scanned)."""
    offset = 0
    while len(data) - offset >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data)[offset:offset + 9])
        if len(data) - offset < 9 + length:
            break
        if isinstance(frame, GoAwayFrame):
            frame.parse_body(memoryview(data)[offset + 9:offset + 9 + length])
            return int(frame.error_code), offset
        offset += 9 + length
    return None, offset


async def attacker_connection(store: IdentityStore, port: int, *,
                              rcvbuf: int | None = None
                              ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw mTLS HTTP/2 connection (valid mesh identity) that has sent its preface."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (LOOPBACK, port))
    reader, writer = await asyncio.open_connection(
        sock=sock, ssl=store.client_context(ATTACKER), server_hostname=LOOPBACK)
    writer.write(PREFACE + SettingsFrame(0).serialize())
    await writer.drain()
    return reader, writer


async def goaway_code(reader: asyncio.StreamReader, limit: int = 64 * 1024 * 1024) -> int | None:
    """Read until the server's GOAWAY (its error code) or EOF (None); bounded."""
    buffer = bytearray()
    read = 0
    with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        while read < limit:
            chunk = await asyncio.wait_for(reader.read(1 << 20), 30)
            if not chunk:
                break
            read += len(chunk)
            buffer += chunk
            # Keep only an unparsed tail: frames are scanned as they complete.
            code, consumed = scan_for_goaway(bytes(buffer))
            if code is not None:
                return code
            del buffer[:consumed]
    return None


async def close_quietly(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 5)


async def honest_round_trip(store: IdentityStore, port: int, backend: int, n: int) -> bytes:
    client = await HboneClient.connect((LOOPBACK, port), store.client_context(HONEST),
                                       trust_domain=TRUST_DOMAIN, expected_peer=SERVER)
    try:
        stream = await client.open_stream(f"127.0.0.1:{backend}", timeout=30)
        payload = f"honest {n} ".encode() * 100
        await stream.write(payload)
        await stream.close_write()
        received = b""
        while chunk := await asyncio.wait_for(stream.read(), 30):
            received += chunk
        assert received == payload
        return received
    finally:
        await client.close()


def check_flood(kind: str, ca_dir: Path,
                attack: Callable[[IdentityStore, int, int], Coroutine[Any, Any, int | None]],
                rounds: int = ROUNDS) -> dict[str, Any]:
    store = IdentityStore(load_ca(ca_dir))

    async def main() -> dict[str, Any]:
        async with flood_server(kind, ca_dir) as server:
            backend = server.backend_port
            await honest_round_trip(store, server.port, backend, -1)  # warm up
            await server.settle()
            baseline = server.rss_kb()
            peak = baseline
            codes: list[int | None] = []
            for n in range(rounds):
                code, _ = await asyncio.gather(
                    attack(store, server.port, backend),
                    honest_round_trip(store, server.port, backend, n))
                codes.append(code)
                peak = max(peak, server.rss_kb())
            await asyncio.sleep(1.5)  # the servers' GOAWAY linger ends
            await honest_round_trip(store, server.port, backend, rounds)
            await server.settle()
            return {"kind": kind, "codes": codes, "baseline": baseline, "peak": peak,
                    "after": server.rss_kb(), "dials": server.backend.accepted,
                    "honest_dials": rounds + 2}

    result = run(main())
    print(f"{kind} {getattr(attack, '__name__', attack)}: RSS baseline "
          f"{result['baseline']} KiB, peak {result['peak']} KiB, after {result['after']} "
          f"KiB; {result['dials']} dials")
    assert result["peak"] - result["baseline"] < MAX_GROWTH_KB, result
    assert result["after"] - result["baseline"] < MAX_RESIDUE_KB, result
    return result


# ---- the floods --------------------------------------------------------------------


async def rapid_reset(store: IdentityStore, port: int, backend: int) -> int | None:
    """HEADERS + RST_STREAM pairs (CVE-2023-44487): 5000 per connection at most."""
    reader, writer = await attacker_connection(store, port)
    answer = asyncio.ensure_future(goaway_code(reader))
    encoder = hpack.Encoder()
    try:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            for burst in range(10):
                if answer.done():
                    break
                data = bytearray()
                for i in range(500):
                    stream_id = 2 * (burst * 500 + i) + 1
                    frame = HeadersFrame(stream_id)
                    frame.data = encoder.encode([(":method", "CONNECT"),
                                                 (":authority", f"127.0.0.1:{backend}")])
                    frame.flags.add("END_HEADERS")
                    reset = RstStreamFrame(stream_id)
                    reset.error_code = errors.CANCEL
                    data += frame.serialize() + reset.serialize()
                writer.write(bytes(data))
                await asyncio.wait_for(writer.drain(), 30)
        return await answer
    finally:
        await close_quietly(writer)


async def bad_request_flood(store: IdentityStore, port: int, backend: int) -> int | None:
    """GETs with END_STREAM, each answered 400 on its stream: 3000 per connection."""
    reader, writer = await attacker_connection(store, port)
    answer = asyncio.ensure_future(goaway_code(reader))
    encoder = hpack.Encoder()
    get = [(":method", "GET"), (":scheme", "https"), (":path", "/"),
           (":authority", f"127.0.0.1:{backend}")]
    try:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            for burst in range(6):
                if answer.done():
                    break
                data = bytearray()
                for i in range(500):
                    frame = HeadersFrame(2 * (burst * 500 + i) + 1)
                    frame.data = encoder.encode(get)
                    frame.flags.add("END_HEADERS")
                    frame.flags.add("END_STREAM")
                    data += frame.serialize()
                writer.write(bytes(data))
                await asyncio.wait_for(writer.drain(), 30)
        return await answer
    finally:
        await close_quietly(writer)


async def continuation_flood(store: IdentityStore, port: int, backend: int) -> int | None:
    """One header block that never ends: 16 KiB CONTINUATIONs, 32 MiB at most."""
    reader, writer = await attacker_connection(store, port)
    answer = asyncio.ensure_future(goaway_code(reader))
    try:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            first = HeadersFrame(1)
            first.data = b"\x00" * 16_000
            writer.write(first.serialize())
            cont = ContinuationFrame(1)
            cont.data = b"\x00" * 16_384
            chunk = cont.serialize() * 64  # 1 MiB
            for _ in range(32):
                if answer.done():
                    break
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 30)
        return await answer
    finally:
        await close_quietly(writer)


async def control_flood(frame: bytes, store: IdentityStore, port: int) -> int | None:
    """Control frames the server must ACK, sent by a peer that does not read (tiny
    receive buffer), 200k at most; then read to see the server's answer."""
    reader, writer = await attacker_connection(store, port, rcvbuf=4096)
    try:
        with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.TimeoutError):
            burst = frame * 2000
            for _ in range(100):
                writer.write(burst)
                await asyncio.wait_for(writer.drain(), 10)
        return await goaway_code(reader)
    finally:
        await close_quietly(writer)


async def ping_flood(store: IdentityStore, port: int, backend: int) -> int | None:
    return await control_flood(PingFrame(0, opaque_data=b"flooding").serialize(), store, port)


async def settings_flood(store: IdentityStore, port: int, backend: int) -> int | None:
    settings = SettingsFrame(0, settings={SettingsFrame.ENABLE_PUSH: 0}).serialize()
    return await control_flood(settings, store, port)


OVERSIZED_REQUESTS = 300


async def oversized_header_flood(store: IdentityStore, port: int, backend: int
                                 ) -> int | None:
    """CONNECTs whose header list (20 KiB) is over our 16 KiB MAX_HEADER_LIST_SIZE, each
    as HEADERS + CONTINUATION (legal frame sizes), 300 per connection. The Python server
    ends the connection at the first (its guard bounds the header block: GOAWAY
    ENHANCE_YOUR_CALM); the native one (the h2 crate, as ztunnel) answers each on its
    own stream (431, RST_STREAM) and keeps the connection. Returns the GOAWAY code, or
    -1 when every request was answered on its stream and no GOAWAY came."""
    reader, writer = await attacker_connection(store, port)
    encoder = hpack.Encoder()
    encoder.huffman = False
    # One self-contained block (no dynamic-table references), sent for every stream.
    block = encoder.encode([(":method", "CONNECT"), (":authority", f"127.0.0.1:{backend}"),
                            ("x-pad", "v" * 20 * 1024)])
    try:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            data = bytearray()
            for n in range(OVERSIZED_REQUESTS):
                first = HeadersFrame(2 * n + 1)
                first.data = block[:16_000]
                rest = ContinuationFrame(2 * n + 1)
                rest.data = block[16_000:]
                rest.flags.add("END_HEADERS")
                data += first.serialize() + rest.serialize()
            writer.write(bytes(data))
        return await answers(reader, OVERSIZED_REQUESTS)
    finally:
        await close_quietly(writer)


async def answers(reader: asyncio.StreamReader, streams: int) -> int | None:
    """Read until GOAWAY (its code), every stream reset (-1) or EOF (None); bounded."""
    buffer = bytearray()
    reset: set[int] = set()
    with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        for _ in range(100_000):
            chunk = await asyncio.wait_for(reader.read(1 << 20), 30)
            if not chunk:
                break
            buffer += chunk
            offset = 0
            while len(buffer) - offset >= 9:
                frame, length = Frame.parse_frame_header(memoryview(buffer)[offset:offset + 9])
                if len(buffer) - offset < 9 + length:
                    break
                frame.parse_body(memoryview(buffer)[offset + 9:offset + 9 + length])
                offset += 9 + length
                if isinstance(frame, GoAwayFrame):
                    return int(frame.error_code)
                if isinstance(frame, RstStreamFrame):
                    reset.add(frame.stream_id)
            del buffer[:offset]
            if len(reset) == streams:
                return -1
    return None


async def slow_reader(store: IdentityStore, port: int, backend: int) -> int | None:
    """A peer that keeps to flow control but never reads: it ACKs the server's SETTINGS
    (so the 4 MiB stream window applies), opens a CONNECT to the echo backend, sends
    3 MiB (inside the windows), then reads nothing for 1 s while the echo comes back.
    The server may only buffer about what our windows allow. Returns the GOAWAY code
    seen (None: the connection was not ended for it, as it must not be)."""
    reader, writer = await attacker_connection(store, port, rcvbuf=4096)
    encoder = hpack.Encoder()
    try:
        buffer = b""
        for _ in range(100):  # the server's SETTINGS (its first frame)
            buffer += await asyncio.wait_for(reader.read(65536), 10)
            if len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
                break
        writer.write(SettingsFrame(0, flags=["ACK"]).serialize())
        headers = HeadersFrame(1)
        headers.data = encoder.encode([(":method", "CONNECT"),
                                       (":authority", f"127.0.0.1:{backend}")])
        headers.flags.add("END_HEADERS")
        writer.write(headers.serialize())
        with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.TimeoutError):
            for _ in range(3):
                writer.write(b"".join(_data_frame(1, b"s" * 16_384) for _ in range(64)))
                await asyncio.wait_for(writer.drain(), 5)
        await asyncio.sleep(1)
        code, _ = scan_for_goaway(buffer)
        return code
    finally:
        await close_quietly(writer)


def _data_frame(stream_id: int, payload: bytes) -> bytes:
    return (len(payload).to_bytes(3, "big") + b"\x00\x00"
            + stream_id.to_bytes(4, "big") + payload)


async def stalled_handshakes(store: IdentityStore, port: int, backend: int) -> int | None:
    """20 TCP connections that never start TLS, held while the honest client is
    served (they end at the server's handshake timeout or when we close them)."""
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    try:
        for _ in range(20):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setblocking(False)
            await loop.sock_connect(sock, (LOOPBACK, port))
        await asyncio.sleep(0.5)
        return None
    finally:
        for sock in socks:
            sock.close()


def _foreign_contexts(store: IdentityStore, tmp: Path) -> list[ssl.SSLContext]:
    """Client contexts that trust our CA (so they reach the server's check) but present
    (a) a certificate from another CA with our trust domain, (b) a certificate of a
    foreign trust domain signed by our CA."""
    other_ca = init_ca(tmp / "other-ca", TRUST_DOMAIN)
    stranger = IdentityStore(other_ca).get(ATTACKER)
    rogue = dataclasses.replace(store.ca, trust_domain="evil.example")
    evil = rogue.issue(SpiffeId("evil.example", "default", "intruder"))
    ours = store.get(HONEST).trust_anchors_pem.decode()
    contexts = []
    for cert in (stranger, evil):
        ctx = client_context_for(cert)
        ctx.load_verify_locations(cadata=ours)
        contexts.append(ctx)
    return contexts


def foreign_certs(tmp: Path) -> Callable[[IdentityStore, int, int],
                                         Coroutine[Any, Any, int | None]]:
    async def attack(store: IdentityStore, port: int, backend: int) -> int | None:
        """20 handshakes with each foreign certificate; returns how many connections
        the server answered with any HTTP/2 bytes (must be 0)."""
        served = 0
        for ctx in _foreign_contexts(store, tmp) * 10:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    LOOPBACK, port, ssl=ctx, server_hostname=LOOPBACK), 10)
            except (ssl.SSLError, ConnectionError, OSError):
                continue
            try:
                writer.write(PREFACE + SettingsFrame(0).serialize())
                with contextlib.suppress(ssl.SSLError, ConnectionError, OSError):
                    await writer.drain()
                    if await asyncio.wait_for(reader.read(1024), 10):
                        served += 1
            finally:
                await close_quietly(writer)
        return served
    attack.__name__ = "foreign_certs"
    return attack


def test_rapid_reset_flood(kind: str, ca_dir: Path) -> None:
    result = check_flood(kind, ca_dir, rapid_reset)
    assert result["codes"] == [errors.ENHANCE_YOUR_CALM] * ROUNDS, result
    # Nothing is dialed for a stream its client cancelled (at most one request per
    # read can be split from its RST by a read boundary and reach a handler, which
    # checks for the reset before dialing).
    assert result["dials"] - result["honest_dials"] <= ROUNDS, result


def test_bad_request_flood(kind: str, ca_dir: Path) -> None:
    result = check_flood(kind, ca_dir, bad_request_flood)
    assert result["codes"] == [errors.ENHANCE_YOUR_CALM] * ROUNDS, result
    assert result["dials"] == result["honest_dials"], result


def test_continuation_flood(kind: str, ca_dir: Path) -> None:
    result = check_flood(kind, ca_dir, continuation_flood)
    assert result["codes"] == [errors.ENHANCE_YOUR_CALM] * ROUNDS, result


def test_ping_flood(kind: str, ca_dir: Path) -> None:
    result = check_flood(kind, ca_dir, ping_flood)
    assert result["codes"] == [errors.ENHANCE_YOUR_CALM] * ROUNDS, result


def test_settings_flood(kind: str, ca_dir: Path) -> None:
    result = check_flood(kind, ca_dir, settings_flood)
    assert result["codes"] == [errors.ENHANCE_YOUR_CALM] * ROUNDS, result


def test_oversized_header_flood(kind: str, ca_dir: Path) -> None:
    result = check_flood(kind, ca_dir, oversized_header_flood, rounds=3)
    expected = errors.ENHANCE_YOUR_CALM if kind == "python" else -1
    assert result["codes"] == [expected] * 3, result
    assert result["dials"] == result["honest_dials"], result


def test_slow_reader_is_held_by_flow_control(kind: str, ca_dir: Path) -> None:
    result = check_flood(kind, ca_dir, slow_reader, rounds=3)
    # Not ended (a slow peer is not an attack), and bounded by the windows: the RSS
    # checks in check_flood; its one stream per round was dialed.
    assert result["codes"] == [None] * 3, result
    assert result["dials"] == result["honest_dials"] + 3, result


def test_stalled_handshakes_do_not_block_others(kind: str, ca_dir: Path) -> None:
    result = check_flood(kind, ca_dir, stalled_handshakes, rounds=3)
    assert result["dials"] == result["honest_dials"], result


def test_foreign_certificates_refused(kind: str, ca_dir: Path, tmp_path: Path) -> None:
    result = check_flood(kind, ca_dir, foreign_certs(tmp_path), rounds=3)
    assert result["codes"] == [0] * 3, result
    assert result["dials"] == result["honest_dials"], result


def test_streams_over_the_limit_are_refused_not_the_connection(kind: str, ca_dir: Path
                                                                ) -> None:
    """Issue 11 item 9: 150 CONNECTs held open on one connection: the 50 over
    MAX_CONCURRENT_STREAMS (100) get RST_STREAM REFUSED_STREAM, no GOAWAY, and the 100
    admitted ones are dialed and answered 200."""
    store = IdentityStore(load_ca(ca_dir))

    async def main() -> tuple[dict[int, int], set[int], bool, int]:
        async with flood_server(kind, ca_dir) as server:
            backend = server.backend_port
            reader, writer = await attacker_connection(store, server.port)
            encoder = hpack.Encoder()
            data = bytearray()
            for n in range(150):
                frame = HeadersFrame(2 * n + 1)
                frame.data = encoder.encode([(":method", "CONNECT"),
                                             (":authority", f"127.0.0.1:{backend}")])
                frame.flags.add("END_HEADERS")
                data += frame.serialize()
            writer.write(bytes(data))
            await writer.drain()
            resets: dict[int, int] = {}
            responses: set[int] = set()
            goaway = False
            buffer = bytearray()
            try:
                while len(responses) + len(resets) < 150 and not goaway:
                    chunk = await asyncio.wait_for(reader.read(65536), 30)
                    if not chunk:
                        break
                    buffer += chunk
                    offset = 0
                    while len(buffer) - offset >= 9:
                        frame, length = Frame.parse_frame_header(
                            memoryview(buffer)[offset:offset + 9])
                        if len(buffer) - offset < 9 + length:
                            break
                        frame.parse_body(memoryview(buffer)[offset + 9:offset + 9 + length])
                        offset += 9 + length
                        if isinstance(frame, RstStreamFrame):
                            resets[frame.stream_id] = int(frame.error_code)
                        elif isinstance(frame, HeadersFrame):
                            responses.add(frame.stream_id)
                        elif isinstance(frame, GoAwayFrame):
                            goaway = True
                    del buffer[:offset]
                # Each 200 followed its dial; let the backend's accepts run (bounded).
                for _ in range(50):
                    if server.backend.accepted >= len(responses):
                        break
                    await asyncio.sleep(0.1)
            finally:
                await close_quietly(writer)
            return resets, responses, goaway, server.backend.accepted

    resets, responses, goaway, dials = run(main())
    assert not goaway
    assert len(responses) == 100 and not responses & set(resets)
    assert sorted(resets.values()) == [errors.REFUSED_STREAM] * 50, resets
    assert dials == 100
