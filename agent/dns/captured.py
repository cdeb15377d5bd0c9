"""The DNS proxy on captured traffic: the tunnel's 15053 listeners (asyncio shell).

The datapath hands an enrolled pod's DNS query, still addressed to the pod's own
resolver (``resolverIP:53``), to these sockets (bpf/pod_egress.c: bpf_sk_assign to
the UDP socket found with bpf_sk_lookup_udp, or to the TCP listener; a bridged pod's
query is assigned the same way at the tunnel device, bpf/tunnel_ingress.c), as
ztunnel's in-pod redirection does for its DNS proxy (istio cni
``DNSCapturePort`` 15053). So:

- UDP: the socket has ``IP_TRANSPARENT`` and ``IP_RECVORIGDSTADDR``
  (``IPV6_*`` for v6); each datagram's original destination comes from its
  ancillary data. The reply must come *from* that address, or the pod's resolver
  library drops it: it is sent on a socket bound (``IP_TRANSPARENT``, non-local
  bind) to ``resolverIP:53``, cached per resolver (a pod has one to three);
- TCP: a transparent listener; an accepted connection's local address is the
  original destination, and the kernel answers from it by itself.

Queries are decided by :class:`agent.dns.server.DnsProxy` (``forward_to_original``:
a forwarded query goes to the resolver the pod asked first). A query sent straight
to the proxy's port (not captured) is served too, with no original destination.

Bounds: at most ``MAX_DATAGRAMS_PER_WAKEUP`` datagrams read per wake-up, at most
``MAX_REPLY_SOCKETS`` cached reply sockets (the oldest is closed first).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import socket
import struct
from collections import OrderedDict
from collections.abc import Sequence

import structlog

from agent.dns.server import DnsProxy, Upstream

log = structlog.get_logger("tunnel.dns")

# linux/in.h, linux/in6.h (not all in the socket module).
IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20
IP_ORIGDSTADDR = IP_RECVORIGDSTADDR
IPV6_RECVORIGDSTADDR = 74
IPV6_ORIGDSTADDR = IPV6_RECVORIGDSTADDR
IPV6_TRANSPARENT = 75
SOL_IP = 0
SOL_IPV6 = 41

MAX_DATAGRAMS_PER_WAKEUP = 64
MAX_REPLY_SOCKETS = 64
MAX_DATAGRAM = 65535
_ANCILLARY = 128


def original_destination(ancdata: Sequence[tuple[int, int, bytes]]) -> Upstream | None:
    """The ``(ip, port)`` a datagram was sent to, from its IP(V6)_ORIGDSTADDR message
    (a ``struct sockaddr_in`` / ``sockaddr_in6``), or None."""
    for level, kind, data in ancdata:
        if level == SOL_IP and kind == IP_ORIGDSTADDR and len(data) >= 8:
            (port,) = struct.unpack_from("!H", data, 2)
            return str(ipaddress.IPv4Address(data[4:8])), port
        if level == SOL_IPV6 and kind == IPV6_ORIGDSTADDR and len(data) >= 24:
            (port,) = struct.unpack_from("!H", data, 2)
            return str(ipaddress.IPv6Address(data[8:24])), port
    return None


def _transparent(sock: socket.socket, v6: bool) -> None:
    if v6:
        sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)


class CapturedDns:
    """UDP and TCP on ``port`` for every host in ``hosts`` (wildcards by default).

    ``transparent=False`` (tests without privileges): plain sockets, and replies to a
    captured query go out from the listener. Side effects: binds sockets, runs
    tasks and readers on the running loop; :meth:`close` undoes all of it.
    """

    def __init__(self, proxy: DnsProxy, port: int, *, mark: int = 0,
                 hosts: Sequence[str] = ("0.0.0.0", "::"), transparent: bool = True) -> None:
        self.proxy = proxy
        self.port = port
        self.mark = mark
        self.hosts = tuple(hosts)
        self.transparent = transparent
        self._udp: list[socket.socket] = []
        self._tcp: list[asyncio.base_events.Server] = []
        self._reply_socks: OrderedDict[Upstream, socket.socket] = OrderedDict()
        self.reply_errors = 0

    def _socket(self, host: str, kind: int) -> socket.socket:
        v6 = ipaddress.ip_address(host).version == 6
        sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, kind)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if v6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if self.mark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            if self.transparent:
                _transparent(sock, v6)
            if kind == socket.SOCK_DGRAM:
                sock.setsockopt(SOL_IPV6 if v6 else SOL_IP,
                                IPV6_RECVORIGDSTADDR if v6 else IP_RECVORIGDSTADDR, 1)
            sock.bind((host, self.port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    async def start(self) -> None:
        """Bind every listener, or none (a failure closes what was opened)."""
        loop = asyncio.get_running_loop()
        try:
            for host in self.hosts:
                tcp = self._socket(host, socket.SOCK_STREAM)
                tcp.listen(128)
                self._tcp.append(await asyncio.start_server(self._serve_tcp, sock=tcp))
                udp = self._socket(host, socket.SOCK_DGRAM)
                self._udp.append(udp)
                loop.add_reader(udp.fileno(), self._readable, udp)
        except BaseException:
            await self.close()
            raise
        log.info("dns proxy listening", port=self.port, hosts=list(self.hosts),
                 transparent=self.transparent)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for udp in self._udp:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(udp.fileno())
            udp.close()
        self._udp.clear()
        for server in self._tcp:
            server.close()
            await server.wait_closed()
        self._tcp.clear()
        for sock in self._reply_socks.values():
            sock.close()
        self._reply_socks.clear()
        await self.proxy.close()

    async def _serve_tcp(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        local = writer.get_extra_info("sockname")  # the original destination (no NAT)
        original: Upstream | None = None
        if local and local[1] != self.port:
            original = (str(local[0]), int(local[1]))
        await self.proxy.serve_tcp(reader, writer, original)

    def _readable(self, udp: socket.socket) -> None:
        for _ in range(MAX_DATAGRAMS_PER_WAKEUP):
            try:
                wire, ancdata, _flags, addr = udp.recvmsg(MAX_DATAGRAM,
                                                          socket.CMSG_SPACE(_ANCILLARY))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. an ICMP error queued for a reply we sent
                log.debug("dns socket error", error=str(exc))
                continue
            client = (addr[0], addr[1])
            original = original_destination(ancdata)
            if original is not None and original[1] == self.port:
                original = None  # sent straight to the proxy, not captured
            self.proxy.datagram(wire, client, original=original,
                                send=functools.partial(self._send, original, client, udp))

    def _send(self, original: Upstream | None, client: tuple[str, int],
              listener: socket.socket, reply: bytes) -> None:
        if not reply:
            return
        sock = listener
        if original is not None and self.transparent:
            sock = self._reply_socket(original) or listener
        try:
            sock.sendto(reply, client)
        except OSError as exc:
            self.reply_errors += 1
            log.debug("dns reply not sent", client=client[0], error=str(exc))

    def _reply_socket(self, original: Upstream) -> socket.socket | None:
        """A UDP socket bound to the resolver's address (the reply's source)."""
        sock = self._reply_socks.get(original)
        if sock is not None:
            self._reply_socks.move_to_end(original)
            return sock
        v6 = ipaddress.ip_address(original[0]).version == 6
        sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.mark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            _transparent(sock, v6)
            sock.bind(original)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            self.reply_errors += 1
            log.warning("cannot answer from the resolver's address; the pod may drop "
                        "the reply", resolver=f"{original[0]}:{original[1]}", error=str(exc))
            return None
        self._reply_socks[original] = sock
        while len(self._reply_socks) > MAX_REPLY_SOCKETS:
            _, oldest = self._reply_socks.popitem(last=False)
            oldest.close()
        return sock
