"""Events the HBONE protocol core hands to the application.

Our own types, so callers never depend on h2's (as ``h2.events`` is for h2's users).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.hbone.headers import header_value


@dataclass(frozen=True)
class StreamRequest:
    """Server side: a valid CONNECT request; answer with accept_stream or reject_stream."""

    stream_id: int
    authority: str
    # Non-pseudo headers, lower-case names, in arrival order.
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or None."""
        return header_value(self.headers, name)


@dataclass(frozen=True)
class StreamAccepted:
    """Client side: the peer answered our CONNECT with 200; data may flow."""

    stream_id: int
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class StreamRejected:
    """Client side: the peer answered our CONNECT with a non-200 status. The stream is gone."""

    stream_id: int
    status: int


@dataclass(frozen=True)
class RequestRefused:
    """Server side, informational: we answered a bad request ourselves, on its stream
    alone: with an HTTP ``status`` (400), or with RST_STREAM ``error_code`` (REFUSED_STREAM
    over the stream limit or while draining, status 503; PROTOCOL_ERROR for a malformed
    request, status 400)."""

    stream_id: int
    status: int
    reason: str
    error_code: int | None = None


@dataclass(frozen=True)
class DataReceived:
    """Tunnel payload; call acknowledge_received(stream_id, len(data)) once consumed."""

    stream_id: int
    data: bytes


@dataclass(frozen=True)
class StreamEnded:
    """The peer half-closed the stream (END_STREAM, i.e. TCP FIN)."""

    stream_id: int


@dataclass(frozen=True)
class StreamReset:
    """The stream was reset (RST_STREAM from the peer, or refused by GOAWAY)."""

    stream_id: int
    error_code: int
    remote: bool = True


@dataclass(frozen=True)
class WindowOpened:
    """The peer granted send window: on one stream, or (None) on the connection/all."""

    stream_id: int | None


@dataclass(frozen=True)
class ConnectionTerminated:
    """The connection is over: GOAWAY received, or we hit a protocol error (local=True)."""

    error_code: int
    reason: str
    last_stream_id: int | None = None
    local: bool = False


@dataclass(frozen=True)
class GoingAway:
    """The peer sent a graceful GOAWAY (NO_ERROR): open no new streams here; streams
    up to ``last_stream_id`` keep running. Close the connection once they are done."""

    last_stream_id: int


@dataclass(frozen=True)
class PingAcked:
    """The peer answered one of our PINGs."""

    payload: bytes


HboneEvent = (StreamRequest | StreamAccepted | StreamRejected | RequestRefused | DataReceived
              | StreamEnded | StreamReset | WindowOpened | GoingAway | ConnectionTerminated
              | PingAcked)
