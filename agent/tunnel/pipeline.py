"""The one connection pipeline: every connection the tunnel carries goes through it.

A path (``outbound``, ``inbound``, ``hbone_inbound``) classifies a connection,
fills in a :class:`~agent.tunnel.connection.ConnectionRecord` and hands a
:class:`Flow` to :meth:`Pipeline.run`, which owns the whole sequence:

    authorize -> record a denial -> dial -> record a failure -> opened ->
    relay (one copy loop) -> count bytes -> result

or calls :meth:`Pipeline.refuse` for a connection it refuses before that. The
pipeline is the only code that sets an outcome, reports metrics and writes the
access-log line, exactly once per connection. As ztunnel, where
``ConnectionResultBuilder``/``ConnectionResult`` (``src/proxy/metrics.rs``) are
the only reporters and the paths only classify.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from agent.hbone.server import HboneServerRequest
from agent.policy import ConnectionRequest
from agent.telemetry.metrics import REPORTER_DESTINATION, REPORTER_SOURCE, tcp_labels
from agent.tunnel import sockets
from agent.tunnel.connection import ConnectionRecord
from agent.tunnel.inputs import ProxyInputs
from agent.tunnel.outcome import Direction, Outcome, Path
from agent.tunnel.relay import (
    ByteStream,
    CopyCounts,
    HboneByteStream,
    SocketStream,
    copy_bidirectional,
)

log = structlog.get_logger("tunnel")

# HTTP status answering a refused inbound CONNECT, as ztunnel's src/proxy/inbound.rs:
# policy denial 401 (serve_connect: assert_rbac -> StatusCode::UNAUTHORIZED), upstream
# connect failure 503 (freebind_connect -> SERVICE_UNAVAILABLE), a bad or mismatched
# :authority 400 (build_inbound_request / validate_destination -> BAD_REQUEST).
HBONE_STATUS = {
    Outcome.DENIED: 401,
    Outcome.IDENTITY_ERROR: 401,
    Outcome.REFUSED: 400,
    Outcome.CONNECT_FAILED: 503,
    Outcome.TLS_FAILED: 503,
    Outcome.CANCELLED: 503,
}


_CLIENT_GONE = "the client went away before the connection was established"


class DialError(Exception):
    """A path's dial failed: how (the outcome) and why."""

    def __init__(self, outcome: Outcome, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason
        self.status = status


class Downstream(Protocol):
    """The client's side of a connection, before it is established."""

    def refuse(self, outcome: Outcome, status: int | None) -> None:
        """Tell the client no (a reset, or an HTTP status on an HBONE stream)."""
        ...

    def establish(self) -> ByteStream:
        """Tell the client yes; raises OSError if the client has already gone."""
        ...

    @property
    def gone(self) -> bool:
        """True when the client is known to have given up already (nothing to dial for)."""
        ...

    def wait_gone(self) -> Awaitable[None] | None:
        """Something that completes when the client gives up before an answer (the dial
        is abandoned then), or None when that cannot be told."""
        ...


class SocketDownstream:
    """A captured TCP connection: refused with a reset."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def refuse(self, outcome: Outcome, status: int | None) -> None:
        sockets.abort(self.sock)

    def establish(self) -> ByteStream:
        return SocketStream(self.sock)

    @property
    def gone(self) -> bool:
        return False

    def wait_gone(self) -> Awaitable[None] | None:
        return None


class HboneRequestDownstream:
    """An inbound CONNECT stream: refused with a status, established with a 200."""

    def __init__(self, request: HboneServerRequest) -> None:
        self.request = request

    def refuse(self, outcome: Outcome, status: int | None) -> None:
        if not self.request.decided:
            self.request.reject(status or HBONE_STATUS.get(outcome, 503))

    def establish(self) -> ByteStream:
        return HboneByteStream(self.request.accept())

    @property
    def gone(self) -> bool:
        return self.request.cancelled

    def wait_gone(self) -> Awaitable[None] | None:
        return self.request.wait_cancelled()


@dataclass
class Flow:
    """A classified connection, ready for the pipeline."""

    record: ConnectionRecord
    downstream: Downstream
    dial: Callable[[], Awaitable[ByteStream]]
    # The request policy is evaluated on (inbound paths); None: no policy on this leg.
    admission: ConnectionRequest | None = None


async def _dial_unless_gone(flow: Flow) -> ByteStream | None:
    """``flow.dial()``, abandoned (None) if the client gives up first: no work is done
    for a stream the client already reset (issue 11: rapid reset)."""
    gone = flow.downstream.wait_gone()
    if gone is None:
        return await flow.dial()
    dialing = asyncio.ensure_future(flow.dial())
    watching = asyncio.ensure_future(gone)
    try:
        await asyncio.wait({dialing, watching}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        dialing.cancel()
        raise
    finally:
        watching.cancel()
    if not dialing.done():
        dialing.cancel()
        await asyncio.gather(dialing, return_exceptions=True)
        return None
    return dialing.result()


class Pipeline:
    def __init__(self, inputs: ProxyInputs) -> None:
        self.inputs = inputs

    # ---- the sequence ---------------------------------------------------------

    def refuse(self, record: ConnectionRecord, downstream: Downstream | None,
               outcome: Outcome, reason: str, *, status: int | None = None) -> None:
        """Refuse a connection before it is dialed (or record one that failed before a
        downstream existed, e.g. a TLS handshake). Side effects: resets/answers the
        client, reports the failure."""
        if downstream is not None:
            downstream.refuse(outcome, status)
        self._finish(record, outcome, reason)

    async def run(self, flow: Flow) -> None:
        """Carry ``flow`` to its end. Side effects: dials, relays, closes both ends,
        reports the connection once. A cancellation (a policy change revoking the
        connection, or shutdown) is recorded and propagated."""
        rec = flow.record
        tracked = None
        counts = CopyCounts()
        try:
            if flow.admission is not None:
                decision = self.inputs.policy.evaluate(flow.admission)
                rec.policy = decision.policy
                if not decision.allowed:
                    self.refuse(rec, flow.downstream, Outcome.DENIED, decision.reason)
                    return
                task = asyncio.current_task()
                if task is not None:
                    tracked = self.inputs.tracker.track(flow.admission, task.cancel)
            if flow.downstream.gone:
                self._finish(rec, Outcome.CANCELLED, _CLIENT_GONE)
                return
            try:
                upstream = await _dial_unless_gone(flow)
            except DialError as exc:
                self.refuse(rec, flow.downstream, exc.outcome, exc.reason, status=exc.status)
                return
            if upstream is None:
                self._finish(rec, Outcome.CANCELLED, _CLIENT_GONE)
                return
            try:
                client = flow.downstream.establish()
            except OSError as exc:
                upstream.abort()
                self._finish(rec, Outcome.CANCELLED, f"{_CLIENT_GONE}: {exc or type(exc).__name__}")
                return
            self._opened(rec)
            try:
                reset = await copy_bidirectional(client, upstream, counts)
            finally:
                rec.sent, rec.received = counts.up, counts.down
            self._finish(rec, Outcome.RESET if reset else Outcome.OK, None)
        except asyncio.CancelledError:
            if rec.outcome is None:
                if tracked is not None and tracked.revoked is not None:
                    rec.policy = tracked.revoked.policy
                    outcome, reason = Outcome.DENIED, tracked.revoked.reason
                elif rec.opened:
                    outcome, reason = Outcome.RESET, "closed by the tunnel (shutting down)"
                else:
                    outcome, reason = Outcome.CANCELLED, "cancelled before it was established"
                if not rec.opened:
                    flow.downstream.refuse(outcome, None)
                self._finish(rec, outcome, reason)
            raise
        except Exception as exc:
            if rec.outcome is None:
                if not rec.opened:
                    flow.downstream.refuse(Outcome.CONNECT_FAILED, None)
                self._finish(rec, Outcome.RESET if rec.opened else Outcome.CONNECT_FAILED,
                             f"internal error: {type(exc).__name__}: {exc}")
            raise
        finally:
            if tracked is not None:
                self.inputs.tracker.release(tracked)

    # ---- reporting (the only place) -------------------------------------------

    def _reporters(self, rec: ConnectionRecord) -> tuple[str, ...]:
        if rec.path is Path.HBONE_LOCAL:  # this tunnel is both ends
            return (REPORTER_SOURCE, REPORTER_DESTINATION)
        return (REPORTER_SOURCE,) if rec.direction is Direction.OUTBOUND \
            else (REPORTER_DESTINATION,)

    def _labels(self, rec: ConnectionRecord, reporter: str) -> dict[str, str]:
        labels = rec.metric_labels.get(reporter)
        if labels is None:
            workloads = self.inputs.workloads
            # A plaintext source is not identified by its address (only mTLS or the
            # capture of an enrolled pod's own veth says who a client is).
            src = None if rec.src_identity is None else workloads.lookup(rec.src_ip)
            dst = workloads.lookup(rec.dst_ip)
            labels = tcp_labels(reporter, src, dst, rec.src_identity, rec.dst_identity,
                                mtls=rec.path.mtls, dst_service=rec.service)
            rec.metric_labels[reporter] = labels
        return labels

    def _opened(self, rec: ConnectionRecord) -> None:
        rec.opened = True
        for reporter in self._reporters(rec):
            self.inputs.metrics.connection_opened(self._labels(rec, reporter))

    def _finish(self, rec: ConnectionRecord, outcome: Outcome, reason: str | None) -> None:
        if rec.outcome is not None:  # reported already
            return
        rec.outcome = outcome
        if reason is not None:
            rec.reason = reason
        self.inputs.access_log(rec)
        metrics = self.inputs.metrics
        for reporter in self._reporters(rec):
            labels = self._labels(rec, reporter)
            if rec.opened:
                # Istio: "sent" is server -> client, "received" client -> server.
                metrics.connection_closed(labels, sent=rec.received, received=rec.sent)
            else:
                metrics.connection_failed(labels, outcome.response_flag)
