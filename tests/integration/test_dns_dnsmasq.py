"""The DNS proxy against real peers: dnsmasq (Debian) as the upstream resolver, dig and
dnspython as clients, over UDP and TCP on loopback. No root needed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from agent.dns.answer import QueryOutcome, Transport
from agent.dns.server import DnsProxy, DnsProxyConfig
from agent.model.loader import load_model_file
from agent.model.types import NetworkAddress

MODEL = load_model_file(Path(__file__).parents[1] / "unit" / "data" / "model" / "dns.yaml")
HOST = "127.0.0.1"


def need(binary: str) -> str:
    path = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{binary} missing in CI (scripts/setup.sh installs it)")
        pytest.skip(f"{binary} not installed (run scripts/setup.sh)")
    return path


def free_port() -> int:
    """A port free for both UDP and TCP on loopback (bounded retries)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((HOST, 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((HOST, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


@pytest.fixture
def dnsmasq() -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    binary = need("dnsmasq")
    port = free_port()
    args = [binary, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", "--bind-interfaces", f"--listen-address={HOST}", f"--port={port}",
            "--pid-file=", "--log-facility=-", "--cache-size=0",
            "--address=/forwarded.test/192.0.2.10",
            "--host-record=host.test,192.0.2.20,2001:db8::20",
            "--txt-record=txt.test,hello", "--address=/invalid/"]  # *.invalid: NXDOMAIN
    if os.geteuid() == 0:
        args.append("--user=root")  # no privilege drop: nothing to set up for 'nobody'
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Its log goes to a pipe we read only on failure: a few lines, far below a pipe's size.
    try:
        deadline = time.monotonic() + 10
        while True:  # wait until it answers (bounded)
            try:
                q = dns.message.make_query("host.test", "A")
                dns.query.udp(q, HOST, port=port, timeout=0.5)
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    err = proc.communicate(timeout=10)[1].decode()
                    raise RuntimeError(f"dnsmasq did not start: {err}") from None
        yield port, proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def client_for(ip: Any) -> Any:
    return MODEL.workload_by_address(NetworkAddress("", ip))


@contextlib.asynccontextmanager
async def proxy(upstream_port: int, **kw: object) -> AsyncIterator[DnsProxy]:
    config = DnsProxyConfig(upstreams=[(HOST, upstream_port)], **kw)  # type: ignore[arg-type]
    server = DnsProxy(config, lambda: MODEL, client_for)
    await server.start(HOST, 0)
    try:
        yield server
    finally:
        await server.close()


async def query(server: DnsProxy, name: str, rdtype: str = "A", tcp: bool = False,
                timeout: float = 5.0) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    if tcp:
        return await dns.asyncquery.tcp(q, HOST, port=server.tcp_address[1], timeout=timeout)
    return await dns.asyncquery.udp(q, HOST, port=server.udp_address[1], timeout=timeout)


def answers(reply: dns.message.Message) -> list[str]:
    return sorted(r.to_text() for rrset in reply.answer for r in rrset)


async def dig(server: DnsProxy, *args: str) -> str:
    binary = need("dig")
    proc = await asyncio.create_subprocess_exec(
        binary, f"@{HOST}", "-p", str(server.udp_address[1]), "+time=5", "+tries=1", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode()


def test_service_names_answered_others_forwarded_to_dnsmasq(dnsmasq) -> None:
    port, _ = dnsmasq

    async def scenario() -> None:
        async with proxy(port) as server:
            for tcp in (False, True):
                reply = await query(server, "productpage.ns1.svc.cluster.local", tcp=tcp)
                assert answers(reply) == ["9.9.9.9"] and reply.flags & dns.flags.AA
                reply = await query(server, "host.test", tcp=tcp)
                assert answers(reply) == ["192.0.2.20"]
                reply = await query(server, "host.test", "AAAA", tcp=tcp)
                assert answers(reply) == ["2001:db8::20"]
                reply = await query(server, "deep.forwarded.test", tcp=tcp)
                assert answers(reply) == ["192.0.2.10"]
                reply = await query(server, "txt.test", "TXT", tcp=tcp)
                assert answers(reply) == ['"hello"']
                reply = await query(server, "nothing.invalid", tcp=tcp)
                assert reply.rcode() == dns.rcode.NXDOMAIN  # dnsmasq's, relayed
            assert server.counts[QueryOutcome.SERVED] == 2
            assert server.counts[QueryOutcome.FORWARDED] == 10
    asyncio.run(scenario())


def test_dig_over_udp_and_tcp(dnsmasq) -> None:
    port, _ = dnsmasq

    async def scenario() -> None:
        async with proxy(port) as server:
            out = await dig(server, "productpage.ns1.svc.cluster.local", "A", "+short")
            assert out.split() == ["9.9.9.9"]
            out = await dig(server, "productpage", "A", "+short", "+tcp")
            assert out.split() == ["9.9.9.9"]
            out = await dig(server, "productpage.ns1.ns1.svc.cluster.local", "A")
            lines = [line.split() for line in out.splitlines()]
            assert ["productpage.ns1.ns1.svc.cluster.local.", "30", "IN", "CNAME",
                    "productpage.ns1."] in lines
            assert ["productpage.ns1.", "30", "IN", "A", "9.9.9.9"] in lines
            assert "status: NOERROR" in out
            out = await dig(server, "dual.localhost", "AAAA", "+short", "+tcp")
            assert out.split() == ["2001:db8::ff00:42:8329"]
            out = await dig(server, "host.test", "A", "+short", "+tcp")
            assert out.split() == ["192.0.2.20"]
            out = await dig(server, "nothing.invalid", "A")
            assert "status: NXDOMAIN" in out
            out = await dig(server, "ipv4.localhost", "AAAA")
            assert "status: NOERROR" in out and "ANSWER: 0" in out
    asyncio.run(scenario())


def test_upstream_down_is_servfail_quickly(dnsmasq) -> None:
    port, proc = dnsmasq
    proc.kill()
    proc.wait(timeout=10)

    async def scenario() -> None:
        # The proxy would wait 60 s for a silent upstream; a refused one (nothing
        # listening: ICMP port unreachable / RST) must end well before the client's 5 s.
        async with proxy(port, timeout=60.0) as server:
            for tcp in (False, True):
                reply = await query(server, "host.test", tcp=tcp, timeout=5.0)
                assert reply.rcode() == dns.rcode.SERVFAIL
            reply = await query(server, "productpage.ns1.svc.cluster.local")
            assert answers(reply) == ["9.9.9.9"]  # service names need no upstream
            assert server.counts[QueryOutcome.FORWARD_FAILED] == 2
    asyncio.run(scenario())


def test_silent_upstream_times_out_and_concurrency_is_bounded() -> None:
    async def scenario() -> None:
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # receives, never answers
        silent.bind((HOST, 0))
        try:
            async with proxy(silent.getsockname()[1], timeout=1.0, max_inflight=2) as server:
                replies = await asyncio.gather(
                    *(query(server, f"q{i}.test", timeout=10.0) for i in range(6)))
                assert all(r.rcode() == dns.rcode.SERVFAIL for r in replies)
                assert server.counts[QueryOutcome.OVERLOADED] == 4
                assert server.counts[QueryOutcome.FORWARD_FAILED] == 2
        finally:
            silent.close()
    asyncio.run(scenario())


def test_garbage_and_framing_never_stop_the_server(dnsmasq) -> None:
    port, _ = dnsmasq

    async def scenario() -> None:
        async with proxy(port, tcp_idle=1.0) as server:
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                for junk in (b"", b"\x00", b"\xff" * 11, b"\x12\x34" + b"\xff" * 40,
                             os.urandom(600), b"\x00" * 5000):
                    udp.sendto(junk, (HOST, server.udp_address[1]))
            finally:
                udp.close()
            # TCP: two pipelined queries on one connection, answered in order; then a
            # zero-length frame closes the connection.
            reader, writer = await asyncio.open_connection(HOST, server.tcp_address[1])
            q1 = dns.message.make_query("productpage.ns1.", "A")
            q2 = dns.message.make_query("host.test", "A")
            for q in (q1, q2):
                wire = q.to_wire()
                writer.write(struct.pack("!H", len(wire)) + wire)
            await writer.drain()
            got = []
            for _ in range(2):
                (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 5))
                got.append(dns.message.from_wire(await asyncio.wait_for(
                    reader.readexactly(length), 5)))
            assert [g.id for g in got] == [q1.id, q2.id]
            assert answers(got[0]) == ["9.9.9.9"] and answers(got[1]) == ["192.0.2.20"]
            writer.write(b"\x00\x00")
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            # An idle connection is closed by the server.
            reader, writer = await asyncio.open_connection(HOST, server.tcp_address[1])
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            reply = await query(server, "productpage.ns1.svc.cluster.local")
            assert answers(reply) == ["9.9.9.9"]
            assert server.counts[QueryOutcome.DROPPED] >= 3
    asyncio.run(scenario())


def test_forwarding_to_the_original_destination_first(dnsmasq) -> None:
    """A captured query goes to the resolver the pod asked (its original destination),
    then to the configured upstreams; the proxy never forwards to itself."""
    port, _ = dnsmasq

    async def scenario() -> None:
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind((HOST, 0))
        try:
            async with proxy(silent.getsockname()[1], forward_to_original=True,
                             timeout=5.0) as server:
                assert server.upstreams_for((HOST, port)) == [(HOST, port),
                                                             silent.getsockname()]
                assert server.upstreams_for(server.udp_address) == [silent.getsockname()]
                wire = dns.message.make_query("host.test", "A").to_wire()
                reply = dns.message.from_wire(
                    await server.handle(wire, Transport.UDP, HOST, original=(HOST, port)))
                assert answers(reply) == ["192.0.2.20"]
        finally:
            silent.close()
    asyncio.run(scenario())


def test_oversized_queries_never_stop_the_server(dnsmasq) -> None:
    """The largest datagram UDP carries and the largest frame TCP carries (65,535 bytes),
    as junk and as a well-formed query padded to that size (EDNS padding), and a TCP
    frame announced at 65,535 bytes that never arrives: junk gets at most an error, the
    padded query FORMERR (over MAX_QUERY_SIZE), the stalled frame is closed after
    tcp_idle; the proxy keeps answering."""
    port, _ = dnsmasq

    async def scenario() -> None:
        async with proxy(port, tcp_idle=1.0) as server:
            big = dns.message.make_query("productpage.ns1.svc.cluster.local", "A")
            big.use_edns(0, payload=65535, options=[dns.edns.GenericOption(
                dns.edns.OptionType.PADDING, b"\x00" * 65000)])
            big_wire = big.to_wire()
            assert 65000 < len(big_wire) <= 65507
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
                udp.sendto(os.urandom(65507), (HOST, server.udp_address[1]))  # IPv4's max
            finally:
                udp.close()
            reply = await dns.asyncquery.udp(big, HOST, port=server.udp_address[1], timeout=5)
            assert reply.rcode() == dns.rcode.FORMERR
            reader, writer = await asyncio.open_connection(HOST, server.tcp_address[1])
            junk = os.urandom(65535)
            writer.write(struct.pack("!H", len(junk)) + junk)
            writer.write(struct.pack("!H", len(big_wire)) + big_wire)
            await writer.drain()
            replies = []
            while True:  # junk: nothing, or an error with its id; then the big query's
                (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2),
                                                                        5))
                replies.append(dns.message.from_wire(
                    await asyncio.wait_for(reader.readexactly(length), 5)))
                if replies[-1].id == big.id or len(replies) > 2:
                    break
            assert replies[-1].id == big.id and replies[-1].rcode() == dns.rcode.FORMERR
            writer.close()
            # Announced, never sent: closed after tcp_idle, nothing else held up.
            reader, writer = await asyncio.open_connection(HOST, server.tcp_address[1])
            writer.write(b"\xff\xff" + b"\x00" * 100)
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            for tcp in (False, True):
                reply = await query(server, "host.test", tcp=tcp)
                assert answers(reply) == ["192.0.2.20"]
                reply = await query(server, "productpage.ns1.svc.cluster.local", tcp=tcp)
                assert answers(reply) == ["9.9.9.9"]
            assert server.counts[QueryOutcome.FORMERR] >= 2
    asyncio.run(scenario())
