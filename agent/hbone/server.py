"""Serving one accepted HBONE connection: each CONNECT becomes an
:class:`HboneServerRequest` handed to the caller's ``on_stream`` coroutine."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from agent.hbone.config import HboneSettings
from agent.hbone.connection import HboneServerConnection
from agent.hbone.errors import CANCEL, NO_ERROR
from agent.hbone.events import HboneEvent, RequestRefused, StreamRequest
from agent.hbone.exceptions import (
    HboneError,
    HboneRejected,
    HboneStreamError,
    HboneStreamReset,
)
from agent.hbone.headers import (
    BAGGAGE_HEADER,
    FORWARDED_HEADER,
    header_value,
    parse_authority,
    parse_baggage,
    parse_forwarded_for,
)
from agent.hbone.session import HboneSession, check_alpn, peer_identity_of
from agent.hbone.stream import HboneStream
from agent.identity.spiffe import SpiffeId
from agent.identity.verify import PeerRole

log = structlog.get_logger(__name__)

StreamHandler = Callable[["HboneServerRequest"], Awaitable[None]]


class HboneServerRequest:
    """An inbound CONNECT awaiting the caller's decision: ``accept()`` or ``reject()``.

    Both are synchronous (they only queue frames). If the ``on_stream`` handler returns
    without deciding, the request is rejected with 503. A client may reset the stream
    before we answer (``cancelled``); a handler should check it, or race its work
    against :meth:`wait_cancelled`, before dialing anything for the request.
    """

    def __init__(self, session: HboneServerSession, event: StreamRequest) -> None:
        self._session = session
        self.stream_id = event.stream_id
        self.authority = event.authority
        self.headers = event.headers
        self.stream = HboneStream(session, event.stream_id, event.authority, event.headers)
        self.decided = False
        self.status: int | None = None

    @property
    def peer_identity(self) -> SpiffeId | None:
        """The verified SPIFFE ID of the calling node's workload (from its client cert)."""
        return self._session.peer_identity

    @property
    def destination(self) -> tuple[str, int]:
        """``:authority`` parsed into (ip, port)."""
        return parse_authority(self.authority)

    @property
    def forwarded_for(self) -> str | None:
        """The original source IP from the ``Forwarded`` header, if present."""
        return parse_forwarded_for(header_value(self.headers, FORWARDED_HEADER))

    @property
    def baggage(self) -> dict[str, str]:
        return parse_baggage(header_value(self.headers, BAGGAGE_HEADER))

    def header(self, name: str) -> str | None:
        return header_value(self.headers, name)

    @property
    def cancelled(self) -> bool:
        """True once the client reset the stream (or the connection died) before we
        answered: do no work (no dial) for it."""
        return not self.decided and self.stream.error is not None

    async def wait_cancelled(self) -> None:
        """Return once the request is cancelled; never returns for one we answered
        (race it against the handler's work with asyncio.wait)."""
        await self.stream.wait_finished()
        if not self.cancelled:
            await asyncio.Event().wait()

    def accept(self) -> HboneStream:
        """Answer 200 and return the tunnel stream.

        Raises the stream's error (HboneStreamReset / HboneConnectionLost) if the client
        cancelled meanwhile."""
        self._decide(200)
        if self.stream.error is not None:
            self._session.release_request(self.stream_id)
            raise self.stream.error
        self._session.accept_request(self.stream_id)
        return self.stream

    def reject(self, status: int) -> None:
        """Answer ``status`` (4xx/5xx) and end the stream. Never raises for a dead stream."""
        self._decide(status)
        self._session.reject_request(self.stream_id, status)
        self.stream.fail(HboneRejected(status))

    def _decide(self, status: int) -> None:
        if self.decided:
            raise RuntimeError(f"request {self.stream_id} was already answered {self.status}")
        self.decided = True
        self.status = status


class HboneServerSession(HboneSession):
    """The server role of :class:`HboneSession`: runs a handler task per CONNECT."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 core: HboneServerConnection, peer_identity: SpiffeId | None,
                 on_stream: StreamHandler) -> None:
        super().__init__(reader, writer, core, peer_identity)
        self.server_core = core
        self._on_stream = on_stream
        self.handlers: set[asyncio.Task[None]] = set()
        self._new_requests: list[HboneServerRequest] = []

    # ---- what HboneServerRequest calls ------------------------------------------------

    def accept_request(self, stream_id: int) -> None:
        """Answer 200. Raises HboneStreamReset if the stream cannot be accepted."""
        try:
            self.server_core.accept_stream(stream_id)
        except HboneError as exc:
            raise HboneStreamReset(CANCEL, f"cannot accept: {exc}") from exc
        self.flush()

    def reject_request(self, stream_id: int, status: int) -> None:
        """Answer ``status`` and end the stream; never raises for a dead stream."""
        with contextlib.suppress(HboneError):
            self.server_core.reject_stream(stream_id, status)
        self.release_request(stream_id)
        self.flush()

    def release_request(self, stream_id: int) -> None:
        """The application is done with a request that was cancelled before its answer."""
        self.server_core.release_request(stream_id)

    # ---- events ----------------------------------------------------------------------

    def _dispatch_all(self, events: list[HboneEvent]) -> None:
        # Start handlers only after the whole batch: a HEADERS and its RST_STREAM that
        # arrived together (rapid reset) never start one (nothing is dialed).
        super()._dispatch_all(events)
        requests, self._new_requests = self._new_requests, []
        for request in requests:
            if request.cancelled:
                request.decided = True
                self.release_request(request.stream_id)
                continue
            task = asyncio.ensure_future(self._run_handler(request))
            self.handlers.add(task)
            task.add_done_callback(self.handlers.discard)

    def _dispatch_role_event(self, event: HboneEvent) -> None:
        if isinstance(event, StreamRequest):
            request = HboneServerRequest(self, event)
            self._streams[event.stream_id] = request.stream
            self._new_requests.append(request)
        elif isinstance(event, RequestRefused):
            log.info("hbone request refused", stream_id=event.stream_id,
                     status=event.status, reason=event.reason)

    async def _run_handler(self, request: HboneServerRequest) -> None:
        failed = False
        try:
            if not request.cancelled:
                await self._on_stream(request)
        except asyncio.CancelledError:
            failed = True
            raise
        except HboneStreamError as exc:
            # Resets and lost connections are ordinary network events, not bugs.
            failed = True
            log.debug("hbone stream ended with error", authority=request.authority,
                      error=str(exc))
        except Exception:
            failed = True
            log.exception("hbone on_stream handler failed", authority=request.authority)
        finally:
            if not request.decided:
                request.reject(503)
            elif request.status == 200 and not request.stream.is_finished:
                # The handler is done with the stream; do not leave it dangling.
                request.stream.abort(CANCEL if failed else NO_ERROR)


async def serve_hbone(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                      on_stream: StreamHandler,
                      trust_domain: str | None = None,
                      settings: HboneSettings | None = None,
                      keepalive_interval: float | None = None,
                      keepalive_timeout: float = 10.0,
                      handler_grace: float = 5.0,
                      draining: asyncio.Event | None = None) -> None:
    """Serve one accepted HBONE connection until it closes.

    Use as (part of) an ``asyncio.start_server`` callback on a TLS listener whose context
    requires client certificates (:meth:`IdentityStore.server_context`); the client's
    certificate must be a mesh identity in ``trust_domain`` (None: any, tests only), or
    the connection is closed before HTTP/2 starts. Each valid CONNECT runs
    ``on_stream(request)`` in its own task. When the connection ends,
    handlers get ``handler_grace`` seconds to finish, then are cancelled.
    When ``draining`` is set (the tunnel is stopping), the connection gets a graceful
    GOAWAY (NO_ERROR: the peer opens new streams elsewhere, newer requests are refused
    REFUSED_STREAM), its open streams run to their end, then it is closed; as
    ztunnel's inbound drains its HTTP/2 server (``src/proxy/inbound.rs`` under
    ``drain::run_with_drain``, ``src/drain.rs``).
    Side effects: reads/writes ``writer``'s transport and closes it at the end.
    """
    try:
        check_alpn(writer)
        identity = peer_identity_of(writer, PeerRole.CLIENT, trust_domain=trust_domain)
    except HboneStreamError as exc:
        log.warning("hbone connection refused", error=str(exc))
        writer.close()
        return
    session = HboneServerSession(reader, writer, HboneServerConnection(settings),
                                 identity, on_stream)
    session.start(keepalive_interval, keepalive_timeout)
    goaway = (asyncio.ensure_future(_close_when_drained(session, draining))
              if draining is not None else None)
    try:
        await session.wait_closed()
    finally:
        if goaway is not None:
            goaway.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await goaway
        await session.close()
        if session.handlers:
            _, pending = await asyncio.wait(set(session.handlers), timeout=handler_grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=handler_grace)


async def _close_when_drained(session: HboneServerSession, draining: asyncio.Event) -> None:
    """Once ``draining`` is set: GOAWAY (NO_ERROR), wait for the running stream
    handlers, then close the connection. Side effects: writes GOAWAY to the session's
    transport and closes it."""
    await draining.wait()
    session.server_core.go_away()
    session.flush()
    while session.handlers:
        await asyncio.wait(set(session.handlers))
    await session.close(reason="drained")
