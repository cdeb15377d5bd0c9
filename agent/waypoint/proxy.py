"""The waypoint process: HBONE in, L7 (or L4) per CONNECT stream, HBONE out.

Shaped like ztunnel's proxy (src/proxy/inbound.rs: one handler per CONNECT, the
decision before any upstream work; a ``ProxyInputs``-like bundle,
:class:`WaypointInputs`) with Envoy's HTTP connection manager behaviour inside:

1. CONNECT ``:authority`` must be a destination bound to this waypoint
   (agent/waypoint/config.py); else 403 at CONNECT (nothing dialed).
2. Port declared HTTP: the first bytes choose HTTP/2 (the h2 preface, prior
   knowledge: h2c, gRPC) or HTTP/1.1 (h11), as Envoy's codec ``AUTO``. Other ports:
   L4 policy, then bytes copied to the endpoint (``copy_bidirectional``).
3. Per request: L7 AuthorizationPolicy (403 ``RBAC: access denied``), HTTPRoute
   (404 NR when routes attach but none match), fault injection, circuit breakers (503
   UO), endpoint choice (agent.model.select, healthy only; 503 UH), upstream HBONE to
   ``podIP:15008`` with ``:authority podIP:targetPort`` under the waypoint's identity,
   retries with Istio's default policy (another host each time; at most 3 retries at
   once per cluster; 503 URX when spent), metrics and an access-log line.

Bad input gets a clear answer and only that stream/connection ends: malformed
requests 400, conflicting Content-Length/Transfer-Encoding 400 (smuggling), header
block over ``max_header_bytes`` 431, a head not complete within ``header_timeout``
408 (slowloris). Request bodies are buffered for retries up to ``max_body_bytes``;
beyond it the rest streams upstream, not retried (:class:`BodyRest` for HTTP/1.1,
:class:`H2BodyRest` for h2c).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import http
import ipaddress
import random
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h11
import structlog

from agent.hbone.exceptions import HboneError, HboneRejected, HboneStreamError
from agent.hbone.headers import TRACEPARENT_HEADER
from agent.hbone.pool import HbonePool
from agent.hbone.server import HboneServerRequest, serve_hbone
from agent.hbone.stream import HboneStream
from agent.identity.spiffe import SpiffeId, parse_spiffe_id
from agent.model.select import candidates, pick_address, pick_endpoint
from agent.model.types import Endpoint, Service, Workload, lookup_port
from agent.waypoint import authz, routing
from agent.waypoint.config import AppProtocol, Destination, WaypointState, waypoint_workload
from agent.waypoint.limits import BodyBudget, Budgets, ClusterBudget, ResponseFlag, Thresholds
from agent.waypoint.telemetry import RequestRecord, WaypointMetrics
from agent.waypoint.upstream import (
    HOP_BY_HOP,
    H2Connections,
    H2Upstream,
    Http1Upstream,
    IdleConnections,
    UpstreamProtocolError,
    UpstreamResponse,
)

log = structlog.get_logger(__name__)

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
READ_SIZE = 64 * 1024


@dataclass
class WaypointSettings:
    header_timeout: float = 10.0          # whole request head (slowloris)
    idle_timeout: float = 60.0            # keep-alive between requests
    body_timeout: float = 30.0
    max_header_bytes: int = 60 * 1024     # Envoy max_request_headers_kb default 60
    max_body_bytes: int = 4 * 1024 * 1024  # retry buffer per request; beyond: streamed
    upstream_timeout: float = 15.0        # Envoy's default route timeout
    connect_timeout: float = 5.0
    max_downstream_streams: int = 4096
    # The endpoint's node must present the destination workload's SPIFFE ID.
    verify_upstream_identity: bool = True
    thresholds: Thresholds = field(default_factory=Thresholds)


@dataclass
class WaypointInputs:
    """What every handler needs (ztunnel ProxyInputs)."""

    identity: SpiffeId
    state: WaypointState
    pool: HbonePool
    metrics: WaypointMetrics
    settings: WaypointSettings
    budgets: Budgets
    rng: random.Random
    idle: IdleConnections = field(default_factory=IdleConnections)
    h2: H2Connections = field(default_factory=H2Connections)
    bodies: BodyBudget = field(default_factory=BodyBudget)
    memo: StateMemo = field(default_factory=lambda: StateMemo())
    hbone_port: int = 15008
    active_streams: int = 0
    # Where each endpoint's HBONE listener is (tests: several on loopback); default
    # is (podIP, hbone_port).
    hbone_peer: Callable[[str], tuple[str, int]] | None = None


@dataclass
class DownstreamInfo:
    principal: str | None
    source_ip: str | None
    baggage: str | None
    destination: Destination
    dest_ip: str
    authority: str


@dataclass
class HttpRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]       # lower-case names, in order, no hop-by-hop
    body: bytes
    http2: bool
    upgrade: str | None = None
    trailers: list[tuple[str, str]] = field(default_factory=list)
    authority: str = ""
    # HTTP/1.1: the part of a body beyond ``max_body_bytes`` (``body`` holds the start),
    # read from the client while it is sent upstream; such a request is never retried.
    rest: BodyRest | H2BodyRest | None = None

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        return ",".join(values) if values else None

    def header_map(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {}
        for k, v in self.headers:
            out.setdefault(k, []).append(v)
        return {k: tuple(v) for k, v in out.items()}


class Answer(Exception):
    """Answer the request locally with ``status`` (and an Envoy response flag)."""

    def __init__(self, status: int, body: bytes, flag: ResponseFlag = ResponseFlag.NONE,
                 details: str = "") -> None:
        super().__init__(details or body.decode("latin-1"))
        self.status = status
        self.body = body
        self.flag = flag


class ClientBodyError(Exception):
    """The client's streamed request body failed (malformed, too slow, reset)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BodyRest:
    """The rest of an HTTP/1.1 request body that did not fit the retry buffer (Envoy
    streams a body and buffers only what retries need): read from the client's h11
    connection while it is written upstream, once. ``length`` is the client's
    Content-Length (None: chunked); ``read`` counts the bytes delivered."""

    def __init__(self, conn: h11.Connection, stream: HboneStream, settings: WaypointSettings,
                 first: bytes, length: int | None) -> None:
        self._conn = conn
        self._stream = stream
        self._settings = settings
        self._first = first
        self.length = length
        self.trailers: list[tuple[str, str]] = []  # (HTTP/1.1 trailers are not forwarded)
        self.read = 0
        self.used = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The remaining bytes as they arrive. Raises ClientBodyError (400: malformed
        or ended early, 408: slower than ``body_timeout`` between reads)."""
        if self.used:
            raise ClientBodyError(500, "a streamed request body can be sent only once")
        self.used = True
        self.read += len(self._first)
        yield self._first
        while True:
            try:
                event = await _next_event(self._conn, self._stream, self._settings,
                                          head=False)
            except TimeoutError:
                raise ClientBodyError(408, "request body timeout") from None
            except h11.RemoteProtocolError as exc:
                raise ClientBodyError(exc.error_status_hint or 400, str(exc)) from None
            except HboneStreamError as exc:
                raise ClientBodyError(400, f"client stream ended: {exc}") from None
            if isinstance(event, h11.Data):
                self.read += len(event.data)
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise ClientBodyError(400, "request body ended early")


class H2BodyRest:
    """The rest of an h2c request body beyond the retry buffer: DATA frames queued by
    the connection as they arrive and handed out once. Flow control is the bound: a
    frame's bytes are acknowledged (window reopened) only when they are taken, so at
    most one stream window (65,535 bytes) waits here. Trailers, if any, in
    ``trailers`` once ``chunks()`` is exhausted."""

    def __init__(self, owner: H2Downstream, stream_id: int, first: bytes) -> None:
        self._owner = owner
        self._stream_id = stream_id
        self._first = first
        self._queue: collections.deque[tuple[bytes, int]] = collections.deque()
        self._ready = asyncio.Event()
        self._ended = False
        self._error: str | None = None
        self.length: int | None = None
        self.trailers: list[tuple[str, str]] = []
        self.read = 0
        self.used = False

    @property
    def ended(self) -> bool:
        return self._ended

    def feed(self, data: bytes, unacknowledged: int) -> None:
        self._queue.append((data, unacknowledged))
        self._ready.set()

    def end(self) -> None:
        self._ended = True
        self._ready.set()

    def fail(self, why: str) -> None:
        self._error = why
        self._ready.set()

    def discard(self) -> int:
        """Drop what was not taken; returns its bytes not yet acknowledged (the caller
        gives them back to the connection's window)."""
        unacknowledged = sum(n for _, n in self._queue)
        self._queue.clear()
        return unacknowledged

    async def chunks(self) -> AsyncIterator[bytes]:
        """Raises ClientBodyError (400: reset or connection gone, 408: stalled)."""
        if self.used:
            raise ClientBodyError(500, "a streamed request body can be sent only once")
        self.used = True
        self.read += len(self._first)
        yield self._first
        timeout = self._owner.inputs.settings.body_timeout
        while True:
            while not self._queue:
                if self._error is not None:
                    raise ClientBodyError(400, self._error)
                if self._ended:
                    return
                self._ready.clear()
                try:
                    async with asyncio.timeout(timeout):
                        await self._ready.wait()
                except TimeoutError:
                    raise ClientBodyError(408, "request body timeout") from None
            data, unacknowledged = self._queue.popleft()
            if unacknowledged:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self._owner.conn.acknowledge_received_data(unacknowledged,
                                                               self._stream_id)
                await self._owner.flush()
            self.read += len(data)
            yield data


# ---- the HBONE listener -------------------------------------------------------------

class WaypointServer:
    """Listen for HBONE and serve each CONNECT. Side effects: a TCP listener."""

    def __init__(self, inputs: WaypointInputs, server_context: ssl.SSLContext,
                 trust_domain: str) -> None:
        self.inputs = inputs
        self.server_context = server_context
        self.trust_domain = trust_domain
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(
            self._on_connection, host, port, ssl=self.server_context,
            ssl_handshake_timeout=self.inputs.settings.connect_timeout, limit=READ_SIZE)
        sock = self._server.sockets[0].getsockname()
        return sock[0], sock[1]

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        await serve_hbone(reader, writer, on_stream=self._on_stream,
                          trust_domain=self.trust_domain)

    async def _on_stream(self, request: HboneServerRequest) -> None:
        await handle_connect(self.inputs, request)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        self.inputs.idle.close()
        self.inputs.h2.close()
        await self.inputs.pool.close()


async def handle_connect(inputs: WaypointInputs, request: HboneServerRequest) -> None:
    """One inbound CONNECT: check the destination, accept, run L7 or L4."""
    try:
        dest_ip, dest_port = request.destination
    except ValueError:
        request.reject(400)
        return
    dest = inputs.state.destination(dest_ip, dest_port)
    if dest is None:
        log.info("waypoint refused a destination not bound to it", authority=request.authority)
        request.reject(403)
        return
    if inputs.active_streams >= inputs.settings.max_downstream_streams:
        request.reject(503)
        return
    peer = request.peer_identity
    info = DownstreamInfo(peer.principal if peer else None,
                          request.forwarded_for, request.header("baggage"), dest, dest_ip,
                          request.authority)
    inputs.active_streams += 1
    try:
        stream = request.accept()
        if dest.protocol is AppProtocol.HTTP:
            await serve_http(inputs, stream, info)
        else:
            await serve_tcp(inputs, stream, info)
    finally:
        inputs.active_streams -= 1


# ---- L4 ----------------------------------------------------------------------------

async def serve_tcp(inputs: WaypointInputs, stream: HboneStream, info: DownstreamInfo) -> None:
    """TCP passthrough with L4 policy (HTTP fields of policies cannot match: ALLOW rules
    with them never match, DENY rules drop them, as Istio's TCP filter chain)."""
    decision = authz.evaluate(inputs.state.policies, inputs.state.scope(info.destination),
                              authz.Request("", "", "", info.destination.port,
                                            info.principal, info.source_ip, info.source_ip,
                                            info.dest_ip, http=False))
    if not decision.allowed:
        log.info("waypoint L4 deny", authority=info.authority, reason=decision.reason)
        stream.abort()
        return
    try:
        endpoint = choose_endpoint(inputs, info.destination, info.destination.port, set())
    except Answer:
        stream.abort()
        return
    address, target_port, workload = endpoint
    try:
        upstream = await open_upstream(inputs, address, target_port, info, None,
                                       expected_identity(inputs, workload))
    except (HboneError, OSError, asyncio.TimeoutError):
        stream.abort()
        return
    await _pipe(stream, upstream, b"", b"")


async def _copy(src: HboneStream, dst: HboneStream) -> None:
    try:
        while True:
            data = await src.read(READ_SIZE)
            if not data:
                with contextlib.suppress(HboneStreamError):
                    await dst.close_write()
                return
            await dst.write(data)
    except HboneStreamError:
        dst.abort()
        src.abort()


async def _pipe(a: HboneStream, b: HboneStream, a_first: bytes, b_first: bytes) -> None:
    """Copy both ways until both ends finish (ztunnel copy_bidirectional)."""
    with contextlib.suppress(HboneStreamError):
        if a_first:
            await b.write(a_first)
        if b_first:
            await a.write(b_first)
    await asyncio.gather(_copy(a, b), _copy(b, a))


# ---- upstream selection ---------------------------------------------------------------

@dataclass(frozen=True)
class _Choice:
    """One eligible endpoint of a service port, resolved once per state."""

    endpoint: Endpoint
    workload: Workload
    address: str | None       # pick_address, as text (None: no usable address)
    target: int               # the target port (0: none)
    ips: frozenset[str]       # the workload's IPs, for "another host" on retries


class StateMemo:
    """What depends only on one :class:`WaypointState` (the state is replaced whole on
    reload, never changed), computed on first use instead of per request: the eligible
    endpoints of each service port and each workload's expected SPIFFE ID. Forgotten
    when ``inputs.state`` is another object. Bounded by the state's size."""

    def __init__(self) -> None:
        self._state: WaypointState | None = None
        self._choices: dict[tuple[str, str, int], list[_Choice]] = {}
        self._identities: dict[str, SpiffeId | None] = {}

    def _check(self, state: WaypointState) -> None:
        if state is not self._state:
            self._state = state
            self._choices = {}
            self._identities = {}

    def choices(self, state: WaypointState, service: Service, port: int) -> list[_Choice]:
        self._check(state)
        key = (service.namespace, service.name, port)
        found = self._choices.get(key)
        if found is None:
            src = waypoint_workload(state.model, state.me.namespace)
            options, _reason = candidates(state.model, src, service, port)
            vip = service.vips[0].address if service.vips else None
            found = []
            for ep, wl in options:
                address = pick_address(wl, vip if vip is not None else wl.workload_ips[0],
                                       service)
                target = lookup_port(ep.ports, port) or lookup_port(service.ports, port) or 0
                found.append(_Choice(ep, wl, str(address) if address is not None else None,
                                     target, frozenset(str(ip) for ip in wl.workload_ips)))
            self._choices[key] = found
        return found

    def identity(self, state: WaypointState, workload: Workload,
                 trust_domain: str) -> SpiffeId | None:
        self._check(state)
        uri = workload.identity(trust_domain)
        if uri not in self._identities:
            try:
                self._identities[uri] = parse_spiffe_id(uri)
            except ValueError:
                self._identities[uri] = None  # the trust domain check still applies
        return self._identities[uri]


def choose_endpoint(inputs: WaypointInputs, dest: Destination, port: int,
                    tried: set[str], backend: routing.BackendRef | None = None
                    ) -> tuple[str, int, Workload]:
    """Pick one healthy endpoint (agent.model.select), avoiding ``tried`` hosts when
    another is available (Envoy RetryPreviousHosts). Raises Answer(503 UH)."""
    state = inputs.state
    if dest.workload is not None and backend is None:
        ip = str(dest.workload.workload_ips[0])
        return ip, port, dest.workload
    service: Service | None = dest.service
    if backend is not None and service is not None and (
            backend.namespace, backend.name) != (service.namespace, service.name):
        service = state.service(backend.namespace, backend.name)
    svc_port = backend.port if backend is not None and backend.port else port
    if service is None:
        raise Answer(500, b"backend service not found", ResponseFlag.NO_HEALTHY_UPSTREAM)
    choices = inputs.memo.choices(state, service, svc_port)
    if tried:
        choices = [c for c in choices if not c.ips & tried] or choices
    pairs = [(c.endpoint, c.workload) for c in choices]
    picked = pick_endpoint(pairs, inputs.rng)
    if picked is None:
        raise Answer(503, b"no healthy upstream", ResponseFlag.NO_HEALTHY_UPSTREAM)
    chosen = next(c for c, pair in zip(choices, pairs, strict=True) if pair is picked)
    if chosen.address is None or not chosen.target:
        raise Answer(503, b"no healthy upstream", ResponseFlag.NO_HEALTHY_UPSTREAM)
    return chosen.address, chosen.target, chosen.workload


def expected_identity(inputs: WaypointInputs, workload: Workload) -> SpiffeId | None:
    """The SPIFFE ID the endpoint's node must present: the workload's own (ztunnel
    answers with the destination workload's certificate), unless turned off."""
    if not inputs.settings.verify_upstream_identity:
        return None
    return inputs.memo.identity(inputs.state, workload, inputs.pool.trust_domain)


async def open_upstream(inputs: WaypointInputs, address: str, port: int,
                        info: DownstreamInfo, traceparent: str | None,
                        expected: SpiffeId | None = None) -> HboneStream:
    """HBONE CONNECT to ``address:port`` via the endpoint's node (``address:15008``)
    under the waypoint's identity, checking the server is ``expected`` (when given)
    and in the trust domain. Side effects: may open a pooled TLS connection."""
    peer = (inputs.hbone_peer(address) if inputs.hbone_peer
            else (address, inputs.hbone_port))
    authority = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    extra = [(TRACEPARENT_HEADER, traceparent)] if traceparent else []
    return await asyncio.wait_for(
        inputs.pool.open_stream(source=inputs.identity, peer=peer, authority=authority,
                                forwarded_for=info.source_ip, baggage=info.baggage,
                                expected_peer=expected, extra_headers=extra),
        inputs.settings.connect_timeout)


# ---- HTTP: shared request path ---------------------------------------------------------

async def process(inputs: WaypointInputs, info: DownstreamInfo, req: HttpRequest,
                  record: RequestRecord) -> UpstreamResponse:
    """Policy, route, limits, upstream with retries. Raises Answer for local replies."""
    state = inputs.state
    dest = info.destination
    path = req.target
    record.method, record.path, record.authority = req.method, path, req.authority or "-"
    record.http_version = "HTTP/2" if req.http2 else "HTTP/1.1"
    record.protocol = "grpc" if (req.header("content-type") or "").startswith(
        "application/grpc") else "http"
    record.source_principal = info.principal or "unknown"
    record.source_ip = info.source_ip or "-"
    record.traceparent = req.header(TRACEPARENT_HEADER) or "-"
    if dest.service is not None:
        record.destination_service = dest.service.hostname
        record.destination_service_name = dest.service.name
        record.destination_service_namespace = dest.service.namespace
    # 1. authorization (the RBAC filter runs before the router).
    decision = authz.evaluate(state.policies, state.scope(dest), authz.Request(
        req.method, path, req.authority, dest.port, info.principal, info.source_ip,
        _remote_ip(req, info), info.dest_ip, req.header_map()))
    record.rbac = decision.policy or decision.reason
    record.audited = ",".join(decision.audited) or "-"
    if not decision.allowed:
        raise Answer(authz.DENIED_STATUS, authz.DENIED_BODY, ResponseFlag.RBAC_DENIED,
                     decision.reason)
    # 2. route.
    rule: routing.RouteRule | None = None
    backend: routing.BackendRef | None = None
    ref = dest.service_ref
    if ref is not None:
        table = state.table(ref)
        if table:
            routed = table.route(routing.RouteRequest(req.method, path, req.header_map()),
                                 inputs.rng)
            rule, backend = routed.rule, routed.backend
            if routed.delay:
                record.add_flag(ResponseFlag.DELAY_INJECTED.value)
                await asyncio.sleep(routed.delay)
            if routed.outcome is routing.RouteOutcome.NO_ROUTE:
                raise Answer(404, b"", ResponseFlag.NO_ROUTE_FOUND, "no route matched")
            if routed.outcome is routing.RouteOutcome.ABORTED:
                raise Answer(routed.abort_status, b"fault filter abort",
                             ResponseFlag.FAULT_INJECTED)
            if routed.outcome is routing.RouteOutcome.NO_BACKEND:
                raise Answer(500, b"", ResponseFlag.NO_ROUTE_FOUND, "every backend weight is 0")
            record.route = rule.name if rule else "-"
    headers = list(req.headers)
    if rule is not None:
        headers = rule.modifier.apply(headers)
    retry = rule.retry if rule is not None else routing.RetryPolicy()
    if req.upgrade or req.rest is not None:
        retry = routing.RetryPolicy(attempts=0)  # nothing to replay
    timeout = (rule.request_timeout if rule is not None and rule.request_timeout
               else inputs.settings.upstream_timeout)
    cluster_name = (f"{backend.namespace}/{backend.name}:{backend.port}" if backend
                    else f"{ref.namespace}/{ref.name}:{ref.port}" if ref
                    else f"{info.dest_ip}:{dest.port}")
    budget = inputs.budgets.cluster(cluster_name)
    try:
        # asyncio.timeout, not wait_for: no extra task per request.
        async with asyncio.timeout(timeout):
            return await _with_retries(inputs, info, req, headers, backend, retry, budget,
                                       record)
    except TimeoutError:
        raise Answer(504, b"upstream request timeout",
                     ResponseFlag.UPSTREAM_REQUEST_TIMEOUT) from None


def _remote_ip(req: HttpRequest, info: DownstreamInfo) -> str | None:
    xff = req.header("x-forwarded-for")
    if xff:
        first = xff.split(",", 1)[0].strip()
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(first))
    return info.source_ip


async def _with_retries(inputs: WaypointInputs, info: DownstreamInfo, req: HttpRequest,
                        headers: list[tuple[str, str]], backend: routing.BackendRef | None,
                        retry: routing.RetryPolicy, budget: ClusterBudget,
                        record: RequestRecord) -> UpstreamResponse:
    tried: set[str] = set()
    last: Answer | None = None
    last_response: UpstreamResponse | None = None
    for attempt in range(retry.attempts + 1):
        if attempt > 0:
            if not budget.try_retry():
                break  # retry overflow: answer with the last failure
            record.retries += 1
            try:
                await asyncio.sleep(retry.backoff * inputs.rng.uniform(0.5, 1.5) * attempt)
            finally:
                budget.end_retry()
        if last_response is not None:
            last_response.discard()
            last_response = None
        address, port, workload = choose_endpoint(inputs, info.destination,
                                                  info.destination.port, tried, backend)
        tried.add(address)
        record.upstream = f"{address}:{port}"
        record.destination_workload = workload.name or "unknown"
        record.destination_workload_namespace = workload.namespace or "unknown"
        record.destination_principal = workload.identity()
        try:
            response = await _attempt(inputs, info, req, headers, address, port, budget,
                                      expected_identity(inputs, workload))
        except Answer as exc:
            if exc.flag is ResponseFlag.UPSTREAM_OVERFLOW:
                raise
            last = exc
            if exc.flag is ResponseFlag.UPSTREAM_CONNECTION_FAILURE and \
                    retry.retriable_connect_failure():
                continue
            if exc.flag is ResponseFlag.UPSTREAM_REMOTE_RESET and retry.retriable_reset():
                continue
            raise
        if retry.retriable_status(response.status) and attempt < retry.attempts:
            last_response = response
            continue
        if attempt > 0 and retry.retriable_status(response.status):
            record.add_flag(ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED.value)
        return response
    if last_response is not None:
        record.add_flag(ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED.value)
        return last_response
    assert last is not None
    if record.retries:
        record.add_flag(ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED.value)
        raise Answer(last.status, last.body, last.flag, f"{last} after {record.retries} "
                     "retries (URX)") from None
    raise last


async def _attempt(inputs: WaypointInputs, info: DownstreamInfo, req: HttpRequest,
                   headers: list[tuple[str, str]], address: str, port: int,
                   budget: ClusterBudget, expected: SpiffeId | None) -> UpstreamResponse:
    """One upstream try. Raises Answer(503 UO | 503 UF | 503 UR)."""
    if not budget.try_request():
        raise Answer(503, b"upstream connect error or disconnect/reset before headers. "
                     b"reset reason: overflow", ResponseFlag.UPSTREAM_OVERFLOW)
    released = False

    def release(_reuse: bool) -> None:
        nonlocal released
        if not released:
            released = True
            budget.end_request()

    key = (address, port)
    connecting: asyncio.Future[None] | None = None
    try:
        traceparent = req.header(TRACEPARENT_HEADER)
        conn: Http1Upstream | None = None
        h2conn: H2Upstream | None = None
        if req.http2:
            h2conn = inputs.h2.take(key)
            waiting = inputs.h2.connecting.get(key)
            if h2conn is None and waiting is not None:
                # One connection is being opened: share it rather than open one each
                # (a waiter is a pending request: bounded by the pending budget).
                if not budget.try_pending():
                    raise Answer(503, b"upstream connect error or disconnect/reset before "
                                 b"headers. reset reason: overflow",
                                 ResponseFlag.UPSTREAM_OVERFLOW)
                try:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(asyncio.shield(waiting),
                                               inputs.settings.connect_timeout)
                finally:
                    budget.end_pending()
                h2conn = inputs.h2.take(key)
        elif not req.upgrade:
            conn = inputs.idle.take(key)
        if req.http2 and h2conn is None and key not in inputs.h2.connecting:
            connecting = asyncio.get_running_loop().create_future()
            inputs.h2.connecting[key] = connecting
        if conn is None and h2conn is None:
            if not budget.try_pending():
                raise Answer(503, b"upstream connect error or disconnect/reset before "
                             b"headers. reset reason: overflow",
                             ResponseFlag.UPSTREAM_OVERFLOW)
            try:
                if not budget.try_connection():
                    raise Answer(503, b"upstream connect error or disconnect/reset before "
                                 b"headers. reset reason: overflow",
                                 ResponseFlag.UPSTREAM_OVERFLOW)
                try:
                    stream = await open_upstream(inputs, address, port, info, traceparent,
                                                 expected)
                except (HboneRejected, HboneError, OSError, asyncio.TimeoutError) as exc:
                    budget.end_connection()
                    raise Answer(503, b"upstream connect error or disconnect/reset before "
                                 b"headers. reset reason: connection failure",
                                 ResponseFlag.UPSTREAM_CONNECTION_FAILURE, str(exc)) from None
            finally:
                budget.end_pending()
            _watch_connection(stream, budget)
        else:
            stream = conn.stream if conn is not None else h2conn.stream  # type: ignore[union-attr]
        authority = req.authority or f"{address}:{port}"
        try:
            if req.http2:
                if h2conn is None:
                    h2conn = H2Upstream(stream, key)
                    try:
                        await h2conn.start()
                        inputs.h2.add(h2conn)
                    finally:
                        _done_connecting(inputs, key, connecting)
                pseudo = [(":method", req.method), (":scheme", "http"),
                          (":authority", authority), (":path", req.target)]
                rest = req.rest
                try:
                    response = await h2conn.request(
                        pseudo + headers, req.body, req.trailers,
                        rest.chunks() if rest is not None else None,
                        (lambda: rest.trailers) if rest is not None else None)
                except ClientBodyError as exc:  # (request() reset the upstream stream)
                    raise Answer(exc.status, b"bad request body",
                                 ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR, str(exc)) from None
                inner = response.body

                async def body_then_release() -> AsyncIterator[bytes]:
                    try:
                        async for chunk in inner:
                            yield chunk
                    finally:
                        response.finished = True
                        release(False)

                response.body = body_then_release()
                abandon = response.discard_hook

                def drop_h2() -> None:
                    abandon()  # resets this request's stream only
                    release(False)

                response.discard_hook = drop_h2
            else:
                h1 = conn or Http1Upstream(stream, key)
                out_headers = [("host", authority), *[(k, v) for k, v in headers if k != "host"]]
                if req.upgrade:
                    out_headers += [("connection", "upgrade"), ("upgrade", req.upgrade)]
                elif req.rest is not None:
                    out_headers.append(("content-length", str(req.rest.length))
                                       if req.rest.length is not None
                                       else ("transfer-encoding", "chunked"))
                elif req.body or req.method in ("POST", "PUT", "PATCH"):
                    out_headers.append(("content-length", str(len(req.body))))
                try:
                    response = await h1.request(
                        req.method, req.target, out_headers, req.body, bool(req.upgrade),
                        req.rest.chunks() if req.rest is not None else None)
                except ClientBodyError as exc:
                    h1.stream.abort()  # the upstream got a partial request
                    raise Answer(exc.status, b"bad request body",
                                 ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR, str(exc)) from None
                inner1 = response.body

                async def body_then_pool() -> AsyncIterator[bytes]:
                    done = False
                    try:
                        async for chunk in inner1:
                            yield chunk
                        done = True
                    finally:
                        response.finished = True
                        if response.upgraded is None and not (done and inputs.idle.give(h1)):
                            h1.stream.abort()
                        release(done)

                response.body = body_then_pool()

                def drop_h1() -> None:
                    h1.stream.abort()
                    release(False)

                if response.upgraded is None:
                    response.discard_hook = drop_h1
        except (UpstreamProtocolError, HboneStreamError) as exc:
            if not req.http2:  # a shared h2 connection stays for its other requests
                stream.abort()
            raise Answer(503, b"upstream connect error or disconnect/reset before headers. "
                         b"reset reason: remote reset", ResponseFlag.UPSTREAM_REMOTE_RESET,
                         str(exc)) from None
        response.release = release
        return response
    except BaseException:
        _done_connecting(inputs, key, connecting)
        release(False)
        raise


def _done_connecting(inputs: WaypointInputs, key: tuple[str, int],
                     connecting: asyncio.Future[None] | None) -> None:
    """Wake the requests waiting for the h2 connection this request opened."""
    if connecting is not None and inputs.h2.connecting.get(key) is connecting:
        del inputs.h2.connecting[key]
    if connecting is not None and not connecting.done():
        connecting.set_result(None)


def _watch_connection(stream: HboneStream, budget: ClusterBudget) -> None:
    """Count the upstream connection until its stream finishes."""
    async def wait() -> None:
        try:
            await stream.wait_finished()
        finally:
            budget.end_connection()
    task = asyncio.ensure_future(wait())
    _WATCHERS.add(task)
    task.add_done_callback(_WATCHERS.discard)


_WATCHERS: set[asyncio.Task[None]] = set()


def response_headers(response: UpstreamResponse) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in response.headers if k.lower() not in HOP_BY_HOP]


# ---- HTTP/1.1 downstream --------------------------------------------------------------

async def serve_http(inputs: WaypointInputs, stream: HboneStream,
                     info: DownstreamInfo) -> None:
    """Sniff h2c (prior knowledge) vs HTTP/1.1 on one CONNECT stream."""
    settings = inputs.settings
    first = b""
    try:
        while len(first) < len(H2_PREFACE) and H2_PREFACE.startswith(first):
            async with asyncio.timeout(settings.header_timeout):
                chunk = await stream.read(READ_SIZE)
            if not chunk:
                break
            first += chunk
    except asyncio.TimeoutError:
        if first:
            await _send_raw(inputs, info, stream, 408, b"request timeout")
        stream.abort()
        return
    if first.startswith(H2_PREFACE):
        await H2Downstream(inputs, stream, info).run(first)
    else:
        await serve_http1(inputs, stream, info, first)


@functools.lru_cache(maxsize=128)
def _reason(status: int) -> bytes:
    """The standard reason phrase (h11 sends none by default; Envoy sends it)."""
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def normalize_path(target: str) -> str | None:
    """Envoy ``normalize_path`` (Istio's default ``BASE`` path normalization): RFC 3986
    section 5.2.4 dot-segment removal on the path (the query kept as is), so a policy on
    ``/admin`` sees ``/x/../admin`` as ``/admin``; escaped slashes are left unchanged
    (Envoy's default). None for a target that is not an origin-form path (``*`` is
    kept for OPTIONS)."""
    if target == "*":
        return target
    if not target.startswith("/"):
        return None
    path, sep, query = target.partition("?")
    segments: list[str] = []
    parts = path.split("/")
    for i, seg in enumerate(parts[1:], 1):
        last = i == len(parts) - 1
        if seg == "..":
            if segments:
                segments.pop()
            if last:
                segments.append("")
        elif seg == ".":
            if last:
                segments.append("")
        else:
            segments.append(seg)
    return "/" + "/".join(segments) + (sep + query if sep else "")


async def _send_raw(inputs: WaypointInputs, info: DownstreamInfo, stream: HboneStream,
                    status: int, body: bytes) -> None:
    """Answer a request we could not (or would not) parse, close, and count it: one
    access-log line and the metrics, flagged DPE (downstream protocol error) or OM
    (overload). Side effects: writes and half-closes ``stream``."""
    record = RequestRecord()
    record.status = status
    record.response_bytes = len(body)
    record.source_principal = info.principal or "unknown"
    record.source_ip = info.source_ip or "-"
    record.authority = info.authority
    dest = info.destination
    if dest.service is not None:
        record.destination_service = dest.service.hostname
        record.destination_service_name = dest.service.name
        record.destination_service_namespace = dest.service.namespace
    record.add_flag(ResponseFlag.OVERLOAD_MANAGER.value if status == 503
                    else ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR.value)
    inputs.metrics.record(record)
    await _write_raw(stream, status, body)


async def _write_raw(stream: HboneStream, status: int, body: bytes) -> None:
    # Before (or instead of) a parsed request h11 cannot answer: write the bytes.
    reason = {400: "Bad Request", 408: "Request Timeout", 413: "Payload Too Large",
              431: "Request Header Fields Too Large", 501: "Not Implemented"}.get(status, "")
    with contextlib.suppress(HboneStreamError):
        await stream.write(f"HTTP/1.1 {status} {reason}\r\ncontent-length: {len(body)}\r\n"
                           f"content-type: text/plain\r\nconnection: close\r\n\r\n"
                           .encode() + body)
    await linger_close(stream)


async def linger_close(stream: HboneStream, timeout: float = 2.0,
                       max_bytes: int = 1024 * 1024) -> None:
    """Half-close, then read (and drop) what the client still sends until it closes too,
    at most ``timeout`` seconds / ``max_bytes``: returning earlier would reset the stream
    (the HBONE server aborts a stream its handler left open) and the client could lose
    our answer. Never raises."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen = 0
    with contextlib.suppress(HboneStreamError, asyncio.TimeoutError):
        await stream.close_write()
        while seen <= max_bytes:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            data = await asyncio.wait_for(stream.read(READ_SIZE), remaining)
            if not data:
                return
            seen += len(data)


class _TooBig(Exception):
    pass


async def serve_http1(inputs: WaypointInputs, stream: HboneStream, info: DownstreamInfo,
                      first: bytes) -> None:
    settings = inputs.settings
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=settings.max_header_bytes)
    if first:
        conn.receive_data(first)
    while True:
        # --- the request head, within header_timeout (or idle_timeout before any byte)
        try:
            event = await _next_event(conn, stream, settings, head=True)
        except asyncio.TimeoutError:
            if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                stream.abort()  # idle keep-alive: close quietly
            else:
                await _send_raw(inputs, info, stream, 408, b"request timeout")
            return
        except h11.RemoteProtocolError as exc:
            await _send_raw(inputs, info, stream, exc.error_status_hint or 400, str(exc).encode())
            return
        except HboneStreamError:
            return
        if isinstance(event, h11.ConnectionClosed) or event is None:
            await linger_close(stream)
            return
        if not isinstance(event, h11.Request):
            await _send_raw(inputs, info, stream, 400, b"bad request")
            return
        raw_headers = [(k.decode("latin-1").lower(), v.decode("latin-1"))
                       for k, v in event.headers]
        names = [k for k, _ in raw_headers]
        if "transfer-encoding" in names and "content-length" in names:
            await _send_raw(inputs, info, stream, 400,
                            b"both Content-Length and Transfer-Encoding: "
                            b"refused (request smuggling)")
            return
        if sum(len(k) + len(v) + 4 for k, v in raw_headers) > settings.max_header_bytes:
            await _send_raw(inputs, info, stream, 431, b"request headers too large")
            return
        upgrade = None
        connection_tokens = {t.strip().lower() for k, v in raw_headers if k == "connection"
                             for t in v.split(",")}
        if "upgrade" in connection_tokens:
            upgrade = next((v for k, v in raw_headers if k == "upgrade"), None)
            if upgrade is not None and upgrade.strip().lower() == "h2c":
                # HTTP/1.1 -> h2c upgrade (curl --http2 on http://): not offered, as
                # Envoy; the request is served as plain HTTP/1.1.
                upgrade = None
        if names.count("host") > 1:
            await _send_raw(inputs, info, stream, 400, b"more than one Host header")
            return
        target = normalize_path(event.target.decode("latin-1"))
        if target is None:
            await _send_raw(inputs, info, stream, 400,
                            b"request target must be an origin-form path")
            return
        # --- the body (buffered, bounded)
        if conn.they_are_waiting_for_100_continue:
            with contextlib.suppress(HboneStreamError):
                await stream.write(conn.send(h11.InformationalResponse(status_code=100,
                                                                       headers=[])))
        body = bytearray()
        try:
            keep = await _body_and_respond(inputs, stream, info, conn, event, raw_headers,
                                           target, upgrade, body)
        finally:
            inputs.bodies.give(len(body))
        if not keep:
            return
        if h11.MUST_CLOSE in (conn.our_state, conn.their_state) or \
                conn.their_state is not h11.DONE:
            # (Not DONE: an answer before the client's whole body, e.g. a 403 to a
            # streamed upload; the rest is read and dropped, bounded, then closed.)
            await linger_close(stream)
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return


async def _body_and_respond(inputs: WaypointInputs, stream: HboneStream,
                            info: DownstreamInfo, conn: h11.Connection, event: h11.Request,
                            raw_headers: list[tuple[str, str]], target: str,
                            upgrade: str | None, body: bytearray) -> bool:
    """Read the body into ``body`` (bounded per request and by the process-wide
    :class:`BodyBudget`; the caller gives back ``len(body)``), then answer. True to
    keep the connection."""
    settings = inputs.settings
    rest: BodyRest | None = None
    try:
        while True:
            ev = await _next_event(conn, stream, settings, head=False)
            if isinstance(ev, h11.Data):
                if len(body) + len(ev.data) > settings.max_body_bytes:
                    if upgrade is not None:
                        raise _TooBig
                    # Beyond the retry buffer: the rest streams upstream (no retry).
                    length = next((v for k, v in raw_headers if k == "content-length"), None)
                    rest = BodyRest(conn, stream, settings, bytes(ev.data),
                                    int(length) if length is not None else None)
                    break
                if not inputs.bodies.take(len(ev.data)):
                    await _send_raw(inputs, info, stream, 503,
                                    b"overloaded: too many buffered request bodies, "
                                    b"retry later")
                    return False
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage) or ev is h11.PAUSED:
                break
            elif isinstance(ev, h11.ConnectionClosed) or ev is None:
                return False
    except _TooBig:
        await _send_raw(inputs, info, stream, 413, b"request body too large")
        return False
    except asyncio.TimeoutError:
        await _send_raw(inputs, info, stream, 408, b"request timeout")
        return False
    except h11.RemoteProtocolError as exc:
        await _send_raw(inputs, info, stream, exc.error_status_hint or 400, str(exc).encode())
        return False
    except HboneStreamError:
        return False
    authority = next((v for k, v in raw_headers if k == "host"), "")
    req = HttpRequest(event.method.decode("latin-1"), target,
                      [(k, v) for k, v in raw_headers
                       if k not in HOP_BY_HOP and k not in ("host", "content-length",
                                                             "expect")],
                      bytes(body), False, upgrade, authority=authority, rest=rest)
    return await _respond_http1(inputs, stream, info, conn, req)


async def _next_event(conn: h11.Connection, stream: HboneStream, settings: WaypointSettings,
                      head: bool) -> h11.Event | type[h11.PAUSED] | None:
    """The next h11 event, reading as needed, within the head/body deadline."""
    loop = asyncio.get_running_loop()
    deadline = None
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event  # type: ignore[return-value]
        if deadline is None:
            idle = head and conn.their_state is h11.IDLE and not conn.trailing_data[0]
            deadline = loop.time() + (settings.idle_timeout if idle
                                      else settings.header_timeout if head
                                      else settings.body_timeout)
        elif head and conn.trailing_data[0]:
            # The first byte of a head arrived: the slowloris clock starts now.
            deadline = min(deadline, loop.time() + settings.header_timeout)
        if deadline <= loop.time():
            raise asyncio.TimeoutError
        async with asyncio.timeout_at(deadline):
            data = await stream.read(READ_SIZE)
        conn.receive_data(data)
        if not data:
            return conn.next_event()  # type: ignore[return-value]


async def process_or_answer(inputs: WaypointInputs, info: DownstreamInfo, req: HttpRequest,
                            record: RequestRecord) -> UpstreamResponse:
    """:func:`process`, with a bug turned into a 500 for this request only (logged),
    never a reset connection for everyone on it."""
    try:
        return await process(inputs, info, req, record)
    except (Answer, asyncio.CancelledError):
        raise
    except Exception as exc:
        log.exception("waypoint request failed", path=req.target)
        raise Answer(500, b"internal error", ResponseFlag.NONE, str(exc)) from None


async def _respond_http1(inputs: WaypointInputs, stream: HboneStream, info: DownstreamInfo,
                         conn: h11.Connection, req: HttpRequest) -> bool:
    """Answer one request; True to keep the connection for another."""
    record = RequestRecord()
    record.request_bytes = len(req.body)
    response: UpstreamResponse | None = None
    try:
        try:
            response = await process_or_answer(inputs, info, req, record)
        except Answer as answer:
            record.status = answer.status
            if answer.flag is not ResponseFlag.NONE and answer.flag is not \
                    ResponseFlag.RBAC_DENIED:
                record.add_flag(answer.flag.value)
            body = answer.body
            headers = [("content-length", str(len(body))), ("content-type", "text/plain")]
            if answer.status == 403 and answer.flag is ResponseFlag.RBAC_DENIED:
                record.rbac = f"denied: {answer}"
            out = conn.send(h11.Response(status_code=answer.status, headers=headers,
                                         reason=_reason(answer.status)))
            if req.method != "HEAD":  # a HEAD answer carries the length, not the body
                out += conn.send(h11.Data(data=body))
                record.response_bytes = len(body)
            await stream.write(out + conn.send(h11.EndOfMessage()))
            return True
        record.status = response.status
        if response.upgraded is not None:
            await stream.write(conn.send(h11.InformationalResponse(
                status_code=101, headers=[(k, v) for k, v in response.headers])))
            leftover, _ = conn.trailing_data
            response.release(False)
            inputs.metrics.record(record)
            record = None  # type: ignore[assignment]
            await _pipe(stream, response.upgraded, bytes(leftover), response.leftover)
            return False
        headers = response_headers(response)
        head = conn.send(h11.Response(status_code=response.status, headers=headers,
                                      reason=_reason(response.status)))
        if response.complete:
            # The body is here already: head, body and end in one write.
            whole = bytearray(head or b"")
            async for chunk in response.body:
                record.response_bytes += len(chunk)
                whole += conn.send(h11.Data(data=chunk)) or b""
            whole += conn.send(h11.EndOfMessage()) or b""
            await stream.write(whole)
            return True
        await stream.write(head or b"")
        async for chunk in response.body:
            record.response_bytes += len(chunk)
            await stream.write(conn.send(h11.Data(data=chunk)) or b"")
        await stream.write(conn.send(h11.EndOfMessage()) or b"")
        return True
    except (HboneStreamError, h11.LocalProtocolError) as exc:
        record_flag = ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION.value
        if record is not None:
            record.add_flag(record_flag)
        log.debug("waypoint downstream ended", error=str(exc))
        stream.abort()
        return False
    finally:
        if response is not None and response.upgraded is None:
            await response.close_body()
        if record is not None:
            if req.rest is not None:
                record.request_bytes += req.rest.read
            inputs.metrics.record(record)


# ---- HTTP/2 downstream ------------------------------------------------------------------

MAX_CLIENT_RESETS = 1000


class _Flood(Exception):
    pass


class H2Downstream:
    """h2c (prior knowledge) on one CONNECT stream: a task per request."""

    def __init__(self, inputs: WaypointInputs, stream: HboneStream,
                 info: DownstreamInfo) -> None:
        self.inputs = inputs
        self.stream = stream
        self.info = info
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8"))
        self.requests: dict[int, tuple[list[tuple[str, str]], bytearray,
                                       list[tuple[str, str]]]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        # Requests whose body outgrew the retry buffer: started, the rest streams.
        self.rests: dict[int, H2BodyRest] = {}
        self.window = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self.resets = 0
        self.reset_ids: set[int] = set()
        self._preface_left = len(H2_PREFACE)
        self._header = b""
        self._payload_left = 0

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            async with self._write_lock:
                await self.stream.write(data)

    async def run(self, first: bytes) -> None:
        self.conn.initiate_connection()
        try:
            await self._feed(first)
            while True:
                async with asyncio.timeout(self.inputs.settings.idle_timeout):
                    data = await self.stream.read(READ_SIZE)
                if not data:
                    break
                await self._feed(data)
        except (asyncio.TimeoutError, HboneStreamError):
            pass
        except _Flood as exc:
            log.warning("waypoint h2 flood", error=str(exc))
            with contextlib.suppress(Exception):
                self.conn.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                await self.flush()
        except h2.exceptions.ProtocolError as exc:
            log.info("waypoint h2 protocol error", error=str(exc))
            code = getattr(exc, "error_code", h2.errors.ErrorCodes.PROTOCOL_ERROR)
            with contextlib.suppress(Exception):
                self.conn.close_connection(code)
                await self.flush()
        finally:
            if self.tasks:
                await asyncio.wait(set(self.tasks), timeout=5)
            for task in self.tasks:
                task.cancel()
            for stream_id in list(self.requests):
                self._drop(stream_id)
            for rest in self.rests.values():
                rest.fail("client connection ended")
            self.rests.clear()
            await linger_close(self.stream)

    def _check_frame_sizes(self, data: bytes) -> None:
        """Raise FrameTooLargeError as soon as a frame header announces more than our
        SETTINGS_MAX_FRAME_SIZE (h2 itself waits for the whole frame first, so a peer
        could make us buffer 16 MiB before the error)."""
        limit = self.conn.local_settings.max_frame_size
        view = memoryview(data)
        if self._preface_left:
            skip = min(self._preface_left, len(view))
            self._preface_left -= skip
            view = view[skip:]
        while view:
            if self._payload_left:
                skip = min(self._payload_left, len(view))
                self._payload_left -= skip
                view = view[skip:]
                continue
            need = 9 - len(self._header)
            self._header += bytes(view[:need])
            view = view[need:]
            if len(self._header) < 9:
                return
            length = int.from_bytes(self._header[:3], "big")
            self._header = b""
            if length > limit:
                raise h2.exceptions.FrameTooLargeError(
                    f"frame of {length} bytes exceeds SETTINGS_MAX_FRAME_SIZE {limit}")
            self._payload_left = length

    async def _feed(self, data: bytes) -> None:
        self._check_frame_sizes(data)
        events = self.conn.receive_data(data)
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.requests[event.stream_id] = (
                    [(str(k), str(v)) for k, v in event.headers], bytearray(), [])
                if event.stream_ended is not None:
                    self._start(event.stream_id)
            elif isinstance(event, h2.events.DataReceived):
                rest = self.rests.get(event.stream_id)
                if rest is not None:  # acknowledged when the upstream side takes it
                    rest.feed(event.data, event.flow_controlled_length)
                    continue
                entry = self.requests.get(event.stream_id)
                self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                    event.stream_id)
                if entry is not None:
                    if len(entry[1]) + len(event.data) > self.inputs.settings.max_body_bytes:
                        # Beyond the retry buffer: start the request, stream the rest.
                        rest = H2BodyRest(self, event.stream_id, event.data)
                        self.rests[event.stream_id] = rest
                        self._start(event.stream_id, rest)
                    elif not self.inputs.bodies.take(len(event.data)):
                        self._drop(event.stream_id)
                        self._local(event.stream_id, 503, b"overloaded")
                    else:
                        entry[1].extend(event.data)
            elif isinstance(event, h2.events.TrailersReceived):
                rest = self.rests.get(event.stream_id)
                entry = self.requests.get(event.stream_id)
                if rest is not None:
                    rest.trailers = [(str(k), str(v)) for k, v in event.headers]
                elif entry is not None:
                    entry[2].extend((str(k), str(v)) for k, v in event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                rest = self.rests.pop(event.stream_id, None)
                if rest is not None:
                    rest.end()
                elif event.stream_id in self.requests:
                    self._start(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                rest = self.rests.pop(event.stream_id, None)
                if rest is not None:
                    rest.fail("client reset the stream")
                    self._give_back(event.stream_id, rest)
                self._drop(event.stream_id)
                self.reset_ids.add(event.stream_id)
                self.resets += 1
                if self.resets > MAX_CLIENT_RESETS:
                    # Rapid reset (CVE-2023-44487): Envoy and Go close such a connection.
                    raise _Flood("too many streams reset by the client")
            elif isinstance(event, h2.events.WindowUpdated):
                self.window.set()
        await self.flush()

    def _drop(self, stream_id: int) -> None:
        """Forget a request not yet started, giving back its buffered bytes."""
        entry = self.requests.pop(stream_id, None)
        if entry is not None:
            self.inputs.bodies.give(len(entry[1]))

    def _local(self, stream_id: int, status: int, body: bytes) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.send_headers(stream_id, [(":status", str(status)),
                                               ("content-length", str(len(body)))],
                                   end_stream=not body)
            if body:
                self.conn.send_data(stream_id, body, end_stream=True)

    def _start(self, stream_id: int, rest: H2BodyRest | None = None) -> None:
        task = asyncio.ensure_future(self._handle(stream_id, rest))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _handle(self, stream_id: int, rest: H2BodyRest | None) -> None:
        entry = self.requests.pop(stream_id, None)
        if entry is None:  # reset (and dropped) before we started: dial nothing
            return
        headers, body, trailers = entry
        if stream_id in self.reset_ids:
            self.inputs.bodies.give(len(body))
            return
        try:
            await self._serve(stream_id, headers, body, trailers, rest)
        finally:
            self.inputs.bodies.give(len(body))

    async def _serve(self, stream_id: int, headers: list[tuple[str, str]], body: bytearray,
                     trailers: list[tuple[str, str]], rest: H2BodyRest | None) -> None:
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        # HTTP/2 allows ``te: trailers`` (gRPC requires it); other hop-by-hop go.
        regular = [(k, v) for k, v in headers if not k.startswith(":")
                   and (k not in HOP_BY_HOP or (k == "te" and v.strip() == "trailers"))]
        path = normalize_path(pseudo.get(":path", "/"))
        if path is None:
            self._local(stream_id, 400, b"bad :path")
            if rest is not None:
                self._stop_upload(stream_id, rest)
            await self.flush()
            return
        req = HttpRequest(pseudo.get(":method", "GET"), path, regular,
                          bytes(body), True, trailers=trailers,
                          rest=rest,
                          # RFC 9113 8.3.1: :authority, else a Host header.
                          authority=pseudo.get(":authority")
                          or next((v for k, v in regular if k == "host"), ""))
        record = RequestRecord()
        record.request_bytes = len(body)
        response: UpstreamResponse | None = None
        try:
            try:
                response = await process_or_answer(self.inputs, self.info, req, record)
            except Answer as answer:
                record.status = answer.status
                if answer.flag not in (ResponseFlag.NONE, ResponseFlag.RBAC_DENIED):
                    record.add_flag(answer.flag.value)
                self._local(stream_id, answer.status, answer.body)
                record.response_bytes = len(answer.body)
                await self.flush()
                return
            record.status = response.status
            out = [(":status", str(response.status)), *response_headers(response)]
            # Peek: a response that ends with its headers (gRPC "trailers-only") must
            # go as one HEADERS with END_STREAM, or the client reads no status.
            body_iter = response.body.__aiter__()
            first = await anext(body_iter, None)
            if first is None and not response.trailers:
                record.grpc_status = dict(response.headers).get("grpc-status", "")
                self.conn.send_headers(stream_id, out, end_stream=True)
                await self.flush()
                return
            self.conn.send_headers(stream_id, out)
            # A body that is all here already goes out with the head, in one write
            # (flushed early only when the client's window makes it wait).
            eager = not response.complete
            if eager:
                await self.flush()
            if first is not None:
                record.response_bytes += len(first)
                await self._send_data(stream_id, first, eager)
            async for chunk in body_iter:
                record.response_bytes += len(chunk)
                await self._send_data(stream_id, chunk, eager)
            if response.trailers:
                record.grpc_status = dict(response.trailers).get("grpc-status", "")
                self.conn.send_headers(stream_id, response.trailers, end_stream=True)
            else:
                record.grpc_status = dict(response.headers).get("grpc-status", "")
                self.conn.end_stream(stream_id)
            await self.flush()
        except (h2.exceptions.ProtocolError, HboneStreamError) as exc:
            record.add_flag(ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION.value)
            log.debug("waypoint h2 stream ended", error=str(exc))
        finally:
            if response is not None:
                await response.close_body()
            if rest is not None:
                record.request_bytes += rest.read
                self._stop_upload(stream_id, rest)
                with contextlib.suppress(HboneStreamError):
                    await self.flush()
            self.inputs.metrics.record(record)

    def _stop_upload(self, stream_id: int, rest: H2BodyRest) -> None:
        """The request is answered: give back the window of what it did not take, and
        if the client's upload has not ended (a 403, an error), stop it (RFC 9113 8.1:
        RST_STREAM NO_ERROR after a complete response)."""
        self._give_back(stream_id, rest)
        if self.rests.pop(stream_id, None) is not None:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)

    def _give_back(self, stream_id: int, rest: H2BodyRest) -> None:
        unacknowledged = rest.discard()
        if unacknowledged:  # (h2 credits the connection window for a closed stream too)
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.acknowledge_received_data(unacknowledged, stream_id)

    async def _send_data(self, stream_id: int, data: bytes, flush: bool = True) -> None:
        """Queue ``data`` within the client's window; write it out unless ``flush`` is
        False (the caller flushes), except before waiting for window."""
        view = memoryview(data)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.inputs.settings.body_timeout
        while view:
            window = min(self.conn.local_flow_control_window(stream_id),
                         self.conn.max_outbound_frame_size)
            if window <= 0:
                await self.flush()
                self.window.clear()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise HboneStreamError("downstream h2 window stayed closed")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.window.wait(), remaining)
                continue
            size = min(window, len(view))
            self.conn.send_data(stream_id, bytes(view[:size]))
            view = view[size:]
            if flush:
                await self.flush()
