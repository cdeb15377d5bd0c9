"""HTTP/2 floods against our HBONE server in its own process, over mutual TLS on
127.0.0.1 (issue 11 items 4 and 6, SETTINGS/PING floods): each attacker gets GOAWAY
ENHANCE_YOUR_CALM, nothing is dialed for cancelled streams, the server's RSS (read
from /proc) grows by a bounded amount and comes back down once the attacker leaves,
and an honest client on another connection is served throughout.

Every loop is bounded in count; timeouts only turn a hang into a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import hpack
import pytest
from hbone_peers import LOOPBACK, echo_backend, hbone_server
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from agent.hbone import errors
from agent.hbone.client import HboneClient
from agent.identity.ca import init_ca, load_ca
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityStore

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


def check_flood(ca_dir: Path, attack: Callable[[IdentityStore, int, int],
                                               Coroutine[Any, Any, int | None]]
                ) -> dict[str, Any]:
    store = IdentityStore(load_ca(ca_dir))

    async def main() -> dict[str, Any]:
        async with echo_backend() as backend, \
                hbone_server(ca_dir, str(SERVER), lifetime=200, sndbuf=16384) as server:
            await honest_round_trip(store, server.port, backend, -1)  # warm up
            baseline = (await server.stats(collect=True))["rss_kb"]
            peak = baseline
            codes: list[int | None] = []
            for n in range(ROUNDS):
                code, _ = await asyncio.gather(
                    attack(store, server.port, backend),
                    honest_round_trip(store, server.port, backend, n))
                codes.append(code)
                peak = max(peak, server.rss_kb())
            await asyncio.sleep(1.5)  # the server's GOAWAY linger ends
            await honest_round_trip(store, server.port, backend, ROUNDS)
            after = await server.stats(collect=True)
            return {"codes": codes, "baseline": baseline, "peak": peak,
                    "after": after["rss_kb"], "stats": after}

    result = run(main())
    print(f"{getattr(attack, '__name__', attack)}: RSS baseline {result['baseline']} KiB, "
          f"peak {result['peak']} KiB, after {result['after']} KiB; {result['stats']}")
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


def test_rapid_reset_flood(ca_dir: Path) -> None:
    result = check_flood(ca_dir, rapid_reset)
    assert result["codes"] == [errors.ENHANCE_YOUR_CALM] * ROUNDS, result
    # Nothing is dialed for a stream its client cancelled (at most one request per
    # read can be split from its RST by a read boundary and reach a handler, which
    # checks request.cancelled before dialing).
    honest_dials = ROUNDS + 2
    assert result["stats"]["dials"] - honest_dials <= ROUNDS, result


def test_bad_request_flood(ca_dir: Path) -> None:
    result = check_flood(ca_dir, bad_request_flood)
    assert result["codes"] == [errors.ENHANCE_YOUR_CALM] * ROUNDS, result
    assert result["stats"]["dials"] == ROUNDS + 2, result  # the honest ones


def test_continuation_flood(ca_dir: Path) -> None:
    result = check_flood(ca_dir, continuation_flood)
    assert result["codes"] == [errors.ENHANCE_YOUR_CALM] * ROUNDS, result


def test_ping_flood(ca_dir: Path) -> None:
    result = check_flood(ca_dir, ping_flood)
    assert result["codes"] == [errors.ENHANCE_YOUR_CALM] * ROUNDS, result


def test_settings_flood(ca_dir: Path) -> None:
    result = check_flood(ca_dir, settings_flood)
    assert result["codes"] == [errors.ENHANCE_YOUR_CALM] * ROUNDS, result


def test_streams_over_the_limit_are_refused_not_the_connection(ca_dir: Path) -> None:
    """Issue 11 item 9: 150 CONNECTs held open on one connection: the 50 over
    MAX_CONCURRENT_STREAMS (100) get RST_STREAM REFUSED_STREAM, no GOAWAY, and the 100
    admitted ones are dialed and answered 200."""
    store = IdentityStore(load_ca(ca_dir))

    async def main() -> tuple[dict[int, int], set[int], bool, int]:
        async with echo_backend() as backend, hbone_server(ca_dir, str(SERVER)) as server:
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
                stats = await server.stats()
            finally:
                await close_quietly(writer)
            return resets, responses, goaway, stats["dials"]

    resets, responses, goaway, dials = run(main())
    assert not goaway
    assert len(responses) == 100 and not responses & set(resets)
    assert sorted(resets.values()) == [errors.REFUSED_STREAM] * 50, resets
    assert dials == 100
