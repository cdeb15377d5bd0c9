"""Pool of outbound HBONE connections, shared by streams like ztunnel's pool.

One TLS + HTTP/2 connection carries up to ``max_streams_per_connection`` CONNECT streams
for the same (source identity, destination node address, expected peer identity); the
next stream beyond that opens another connection. Connections idle for
``idle_timeout`` seconds are closed, PINGs keep the others alive, and the server's
SPIFFE ID is checked on every new connection (trust domain, and the expected identity
when the caller names one).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from agent.hbone.client import HboneClient, SocketFactory
from agent.hbone.config import HboneSettings
from agent.hbone.errors import REFUSED_STREAM
from agent.hbone.exceptions import HboneConnectionLost, HboneStreamReset
from agent.hbone.stream import HboneStream
from agent.identity.spiffe import SpiffeId

log = structlog.get_logger(__name__)

DEFAULT_MAX_STREAMS = 100
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_KEEPALIVE_INTERVAL = 30.0
DEFAULT_KEEPALIVE_TIMEOUT = 10.0
# A stream refused because the connection was going away is retried this many times.
REFUSED_STREAM_RETRIES = 2


@dataclass(frozen=True)
class PoolKey:
    source: SpiffeId
    peer: tuple[str, int]
    expected_peer: SpiffeId | None


class PoolClosedError(RuntimeError):
    """The pool was closed; no new streams."""


class HbonePool:
    """Outbound HBONE connections keyed by (source, peer address, expected peer).

    ``client_context(source)`` gives the TLS client context presenting ``source``'s
    certificate (normally :meth:`IdentityStore.client_context`), called per new
    connection so rotated certificates are picked up by new connections only.
    """

    def __init__(self, client_context: Callable[[SpiffeId], ssl.SSLContext], *,
                 trust_domain: str,
                 max_streams_per_connection: int = DEFAULT_MAX_STREAMS,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 response_timeout: float | None = None,
                 keepalive_interval: float | None = DEFAULT_KEEPALIVE_INTERVAL,
                 keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
                 socket_factory: SocketFactory | None = None,
                 settings: HboneSettings | None = None) -> None:
        if max_streams_per_connection < 1:
            raise ValueError("max_streams_per_connection must be at least 1")
        self._client_context = client_context
        self.trust_domain = trust_domain
        self.max_streams_per_connection = max_streams_per_connection
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.response_timeout = response_timeout
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.socket_factory = socket_factory
        self.settings = settings or HboneSettings()
        self._connections: dict[PoolKey, list[HboneClient]] = {}
        self._connect_locks: dict[PoolKey, asyncio.Lock] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False

    # ---- public ----------------------------------------------------------------------

    async def open_stream(self, *, source: SpiffeId, peer: tuple[str, int], authority: str,
                          forwarded_for: str | None, baggage: str | None = None,
                          expected_peer: SpiffeId | None = None,
                          trust_domain: str | None = None,
                          extra_headers: Sequence[tuple[str, str]] = (),
                          socket_factory: SocketFactory | None = None,
                          local_addr: tuple[str, int] | None = None) -> HboneStream:
        """Open a CONNECT stream for ``authority`` via the node at ``peer`` (ip, 15008).

        Reuses a pooled connection with a free stream slot or opens a new one (with
        ``socket_factory``/``local_addr`` for the TCP leg, else the pool's factory).
        Raises HbonePeerIdentityError if the server is outside ``trust_domain`` (default:
        the pool's) or is not ``expected_peer``; HboneRejected(status) if the peer refuses
        the CONNECT; HboneConnectionLost, TimeoutError or OSError for transport failures.
        """
        if self._closed:
            raise PoolClosedError("HBONE pool is closed")
        self._ensure_reaper()
        key = PoolKey(source, (peer[0], int(peer[1])), expected_peer)
        for attempt in range(REFUSED_STREAM_RETRIES + 1):
            client = await self._client_with_capacity(
                key, trust_domain or self.trust_domain, socket_factory, local_addr)
            try:
                pending = client.begin_stream(authority, forwarded_for, baggage,
                                              extra_headers)
            except HboneConnectionLost:
                continue  # lost between pick and use: pick again
            try:
                return await pending.established(self.response_timeout)
            except HboneStreamReset as exc:
                if exc.error_code != REFUSED_STREAM or attempt == REFUSED_STREAM_RETRIES:
                    raise
                log.debug("hbone stream refused, retrying", peer=peer, attempt=attempt)
        raise HboneConnectionLost(f"could not open a stream to {peer}")

    def connection_count(self, source: SpiffeId | None = None,
                         peer: tuple[str, int] | None = None) -> int:
        """Open pooled connections, optionally only those for ``source`` / ``peer``."""
        return sum(1 for key, clients in self._connections.items()
                   for client in clients
                   if not client.is_closed
                   and (source is None or key.source == source)
                   and (peer is None or key.peer == peer))

    def connections(self) -> list[HboneClient]:
        return [c for clients in self._connections.values() for c in clients]

    async def close(self) -> None:
        """Close every connection (GOAWAY) and stop the reaper. Idempotent."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        clients = self.connections()
        self._connections.clear()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)

    async def reap_idle(self) -> int:
        """Close connections idle for ``idle_timeout``; returns how many were closed."""
        now = asyncio.get_running_loop().time()
        to_close: list[HboneClient] = []
        for key, clients in list(self._connections.items()):
            keep = []
            for client in clients:
                if client.is_closed:
                    continue
                if client.active_streams == 0 and now - client.idle_since >= self.idle_timeout:
                    to_close.append(client)
                else:
                    keep.append(client)
            if keep:
                self._connections[key] = keep
            else:
                del self._connections[key]
                # Do not drop a lock someone holds (a connect in progress).
                lock = self._connect_locks.get(key)
                if lock is not None and not lock.locked():
                    del self._connect_locks[key]
        await asyncio.gather(*(c.close(reason="idle") for c in to_close),
                             return_exceptions=True)
        return len(to_close)

    # ---- internals ---------------------------------------------------------------------

    def _pick(self, key: PoolKey) -> HboneClient | None:
        for client in self._connections.get(key, []):
            if client.available_streams > 0:
                return client
        return None

    async def _client_with_capacity(self, key: PoolKey, trust_domain: str,
                                    socket_factory: SocketFactory | None,
                                    local_addr: tuple[str, int] | None) -> HboneClient:
        client = self._pick(key)
        if client is not None:
            return client
        # One connect per key at a time: callers arriving meanwhile share its result.
        lock = self._connect_locks.setdefault(key, asyncio.Lock())
        async with lock:
            client = self._pick(key)
            if client is not None:
                return client
            client = await HboneClient.connect(
                key.peer, self._client_context(key.source),
                settings=self.settings,
                max_streams=self.max_streams_per_connection,
                socket_factory=socket_factory or self.socket_factory,
                local_addr=local_addr,
                connect_timeout=self.connect_timeout,
                trust_domain=trust_domain,
                expected_peer=key.expected_peer,
                keepalive_interval=self.keepalive_interval,
                keepalive_timeout=self.keepalive_timeout)
            if self._closed:
                await client.close()
                raise PoolClosedError("HBONE pool closed while connecting")
            clients = [c for c in self._connections.get(key, []) if not c.is_closed]
            clients.append(client)
            self._connections[key] = clients
            log.debug("hbone connection opened", peer=key.peer, source=str(key.source),
                      server=str(client.peer_identity), pooled=len(clients))
            return client

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.ensure_future(self._reap_forever())

    async def _reap_forever(self) -> None:
        interval = max(0.05, min(self.idle_timeout / 4, 5.0))
        while not self._closed:
            await asyncio.sleep(interval)
            try:
                await self.reap_idle()
            except Exception:
                log.exception("hbone pool reaper failed")
