"""The DNS proxy's asyncio shell: UDP and TCP listeners and upstream forwarding.

All decisions are :func:`agent.dns.answer.decide`'s; this module only moves bytes.
Like ztunnel's server (istio/ztunnel src/dns/server.rs :: ``Server::new``: one TCP
listener with a 5 s request timeout and one UDP socket on the same address), it
listens on UDP and TCP (RFC 1035 4.2.2: two-byte length prefix, several queries per
connection, answered in order).

Bounds (nothing here grows without limit):

- at most ``max_inflight`` forwarded queries at once (UDP and TCP together); past
  that a query gets SERVFAIL at once rather than queueing;
- each forward has ``timeout`` seconds in all, across the upstreams tried in order;
  a UDP upstream that answers with ICMP port-unreachable (nothing listening) fails
  at once, not at the timeout (a connected socket sees ECONNREFUSED);
- at most ``max_tcp_connections`` TCP clients; a connection idle for ``tcp_idle``
  seconds between queries is closed, as is one that sends a zero-length frame;
- upstream replies are accepted only if they match the query (id, question) and
  come from the upstream the query went to; anything else is ignored.

A client is a workload by source address (``client_for``); the model comes from
``model_source()`` on every query, so a reloaded model is used at once.

Where a query goes: with ``forward_to_original`` set and the query's original
destination known (a captured query keeps it: the resolver the pod asked, e.g. the
cluster DNS VIP), there first, as "the resolver the pod would have used"; then the
configured ``upstreams`` in order. The proxy's own address is never an upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import random
import socket
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import dns.asyncquery
import dns.exception
import dns.message

from agent.dns.answer import (
    Decision,
    DnsSettings,
    QueryOutcome,
    Transport,
    Verdict,
    decide,
    forward_failed,
    forwarded_reply,
)
from agent.model.types import IPAddress, Model, Workload

Upstream = tuple[str, int]
ANSWER_CACHE_SIZE = 4096


@dataclass
class DnsProxyConfig:
    upstreams: Sequence[Upstream] = ()
    forward_to_original: bool = False
    settings: DnsSettings = field(default_factory=DnsSettings)
    timeout: float = 2.0
    max_inflight: int = 256
    max_tcp_connections: int = 128
    tcp_idle: float = 5.0  # server.rs :: DEFAULT_TCP_REQUEST_TIMEOUT


class _UpstreamUdp(asyncio.DatagramProtocol):
    """One query's exchange with one upstream on a connected UDP socket."""

    def __init__(self, query: dns.message.Message) -> None:
        self.query = query
        self.done: asyncio.Future[dns.message.Message] = \
            asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            reply = dns.message.from_wire(data, ignore_trailing=True)
        except Exception:  # a garbled or unrelated datagram: keep waiting
            return
        if self.query.is_response(reply) and not self.done.done():
            self.done.set_result(reply)

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("upstream socket closed"))


async def _udp_exchange(query: dns.message.Message, upstream: Upstream,
                        timeout: float) -> dns.message.Message:
    loop = asyncio.get_running_loop()
    host, port = upstream
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _UpstreamUdp(query), remote_addr=(host, port), family=family)
    try:
        transport.sendto(query.to_wire())
        return await asyncio.wait_for(protocol.done, timeout)
    finally:
        transport.close()


class DnsProxy:
    """Serves DNS on one address over UDP and TCP. Side effects: binds two sockets,
    opens sockets to the upstreams, runs tasks on the running loop."""

    def __init__(self, config: DnsProxyConfig, model_source: Callable[[], Model],
                 client_for: Callable[[IPAddress], Workload | None],
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.model_source = model_source
        self.client_for = client_for
        self.rng = rng or random.SystemRandom()
        self.counts: Counter[QueryOutcome] = Counter()
        self._inflight = 0
        self._tcp_clients = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.udp_address: tuple[str, int] = ("", 0)
        self._cache: OrderedDict[tuple[Workload, Transport, bytes], Decision] = OrderedDict()
        self._cache_model: Model | None = None
        self.cache_hits = 0
        self.tcp_address: tuple[str, int] = ("", 0)

    # -- lifecycle -------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 53) -> None:
        """Bind TCP then UDP on the same port (port 0: a free one for both)."""
        loop = asyncio.get_running_loop()
        for _attempt in range(20):
            self._tcp = await asyncio.start_server(self._serve_tcp, host, port,
                                                   reuse_address=True)
            bound = self._tcp.sockets[0].getsockname()
            try:
                self._udp, _ = await loop.create_datagram_endpoint(
                    lambda: _ClientUdp(self), local_addr=(host, bound[1]))
            except OSError:
                self._tcp.close()
                await self._tcp.wait_closed()
                if port:
                    raise
                continue
            self.tcp_address = (bound[0], bound[1])
            sockname = self._udp.get_extra_info("sockname")
            self.udp_address = (sockname[0], sockname[1])
            return
        raise OSError(f"no port free for both UDP and TCP on {host}")

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the query path --------------------------------------------------------------

    def _decide(self, wire: bytes, transport: Transport, client: IPAddress | str) -> Decision:
        """:func:`decide`, through the answer cache: a query whose bytes (all but the
        id) the same client workload already sent over the same transport, under the
        same model, gets the same answer with its own id. Only answers with at most
        one record are cached (more are shuffled per query); a new model empties the
        cache; at most ``ANSWER_CACHE_SIZE`` entries (least recently used go first)."""
        model = self.model_source()
        if model is not self._cache_model:
            self._cache.clear()
            self._cache_model = model
        if len(wire) < 12:
            return decide(wire, transport, client, self.client_for, model,
                          self.config.settings, self.rng)
        try:
            workload = self.client_for(ipaddress.ip_address(client))
        except ValueError:
            workload = None
        key = (workload, transport, wire[2:]) if workload is not None else None
        if key is not None:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                return dataclasses.replace(hit, response=wire[:2] + hit.response[2:])
        decision = decide(wire, transport, client, self.client_for, model,
                          self.config.settings, self.rng)
        if (key is not None and decision.verdict is Verdict.ANSWER and decision.answers <= 1
                and len(decision.response) >= 12):
            self._cache[key] = decision
            while len(self._cache) > ANSWER_CACHE_SIZE:
                self._cache.popitem(last=False)
        return decision

    def upstreams_for(self, original: Upstream | None) -> list[Upstream]:
        own = {self.udp_address, self.tcp_address}
        first = [original] if original is not None and self.config.forward_to_original else []
        out: list[Upstream] = []
        for upstream in (*first, *self.config.upstreams):
            if upstream not in own and upstream not in out:
                out.append(upstream)
        return out

    async def _forward(self, decision: Decision, transport: Transport,
                       original: Upstream | None = None) -> bytes:
        """Forward to the upstreams in order within the time budget; SERVFAIL if none
        answers."""
        assert decision.query is not None
        if self._inflight >= self.config.max_inflight:
            self.counts[QueryOutcome.OVERLOADED] += 1
            return forward_failed(decision)
        self._inflight += 1
        query = decision.query
        query.id = self.rng.randrange(0, 65536)  # never the client's (spoofing)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.timeout
        try:
            for upstream in self.upstreams_for(original):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    if transport is Transport.TCP:
                        reply = await dns.asyncquery.tcp(query, upstream[0], port=upstream[1],
                                                         timeout=remaining)
                    else:
                        reply = await _udp_exchange(query, upstream, remaining)
                except (OSError, asyncio.TimeoutError, dns.exception.DNSException, EOFError):
                    continue
                self.counts[QueryOutcome.FORWARDED] += 1
                return forwarded_reply(decision, reply)
        finally:
            self._inflight -= 1
        self.counts[QueryOutcome.FORWARD_FAILED] += 1
        return forward_failed(decision)

    async def handle(self, wire: bytes, transport: Transport, client: IPAddress | str,
                     original: Upstream | None = None) -> bytes:
        """The reply for one query (b"" for none); ``original`` is where the client sent
        it, when known."""
        decision = self._decide(wire, transport, client)
        if decision.verdict is Verdict.DROP:
            self.counts[decision.outcome] += 1
            return b""
        if decision.verdict is Verdict.ANSWER:
            self.counts[decision.outcome] += 1
            return decision.response
        return await self._forward(decision, transport, original)

    def _send_udp(self, reply: bytes, addr: tuple[str, int]) -> None:
        if reply and self._udp is not None and not self._udp.is_closing():
            self._udp.sendto(reply, addr)

    def datagram(self, wire: bytes, addr: tuple[str, int],
                 original: Upstream | None = None,
                 send: Callable[[bytes], None] | None = None) -> None:
        """A UDP query: answered at once, or forwarded in a task (bounded in number by
        ``max_inflight``: past it, SERVFAIL at once). ``send`` sends the reply (default:
        from this proxy's own UDP socket to ``addr``)."""
        reply_to: Callable[[bytes], None] = send or (lambda reply: self._send_udp(reply, addr))
        decision = self._decide(wire, Transport.UDP, addr[0])
        if decision.verdict is not Verdict.FORWARD:
            self.counts[decision.outcome] += 1
            if decision.response:
                reply_to(decision.response)
            return
        if self._inflight >= self.config.max_inflight:
            self.counts[QueryOutcome.OVERLOADED] += 1
            reply_to(forward_failed(decision))
            return
        task = asyncio.ensure_future(self._forward_udp(decision, original, reply_to))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward_udp(self, decision: Decision, original: Upstream | None,
                           reply_to: Callable[[bytes], None]) -> None:
        reply = await self._forward(decision, Transport.UDP, original)
        if reply:
            reply_to(reply)

    async def _serve_tcp(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        await self.serve_tcp(reader, writer)

    async def serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        original: Upstream | None = None) -> None:
        """One TCP client (also on a listener of someone else's: the tunnel's captured
        one passes the connection's original destination)."""
        peer = writer.get_extra_info("peername")
        if self._tcp_clients >= self.config.max_tcp_connections:
            self.counts[QueryOutcome.OVERLOADED] += 1
            writer.close()
            return
        self._tcp_clients += 1
        try:
            while True:
                try:
                    prefix = await asyncio.wait_for(reader.readexactly(2),
                                                    self.config.tcp_idle)
                    (length,) = struct.unpack("!H", prefix)
                    if length == 0:
                        break
                    wire = await asyncio.wait_for(reader.readexactly(length),
                                                  self.config.tcp_idle)
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, OSError):
                    break
                reply = await self.handle(wire, Transport.TCP, peer[0], original)
                if not reply:
                    continue
                writer.write(struct.pack("!H", len(reply)) + reply)
                try:
                    await writer.drain()
                except OSError:
                    break
        finally:
            self._tcp_clients -= 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class _ClientUdp(asyncio.DatagramProtocol):
    def __init__(self, proxy: DnsProxy) -> None:
        self.proxy = proxy

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.proxy.datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error for a reply we sent: nothing to do
