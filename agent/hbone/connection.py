"""Sans-IO HBONE protocol core: HTTP/2 CONNECT tunnels on top of the ``h2`` state machine.

HBONE (Istio ztunnel's tunnel protocol) is one TLS 1.3 connection carrying HTTP/2, where
each proxied TCP connection is one ``CONNECT`` stream whose ``:authority`` is the
destination ``ip:port``. This module is only the protocol: bytes in
(:meth:`HboneConnection.receive_data`), events and bytes out
(:meth:`HboneConnection.data_to_send`). It does no I/O, owns no socket, and imports
neither asyncio nor ssl, so it is fully testable by feeding it frames. The asyncio shell
is :mod:`agent.hbone.session` and the modules built on it.

Flow control is end to end: received bytes are handed back to the peer (WINDOW_UPDATE)
only when the application calls :meth:`HboneConnection.acknowledge_received`, and
:meth:`HboneConnection.send_data` accepts no more than the peer's window, so neither
side ever buffers more than one window per stream.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import h2.config
import h2.events
import h2.exceptions
import h2.settings

from agent.hbone import compat
from agent.hbone.config import HboneSettings
from agent.hbone.errors import (
    CANCEL,
    ENHANCE_YOUR_CALM,
    FRAME_SIZE_ERROR,
    INTERNAL_ERROR,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
)
from agent.hbone.events import (
    ConnectionTerminated,
    DataReceived,
    GoingAway,
    HboneEvent,
    PingAcked,
    RequestRefused,
    StreamAccepted,
    StreamEnded,
    StreamRejected,
    StreamRequest,
    StreamReset,
    WindowOpened,
)
from agent.hbone.exceptions import ConnectionClosedError, HboneError, StreamClosedError
from agent.hbone.headers import (
    BAGGAGE_HEADER,
    FORWARDED_HEADER,
    format_forwarded_for,
    parse_hbone_address,
)


def _text(value: bytes | str) -> str:
    # Header bytes are opaque octets; latin-1 maps each byte to one char losslessly.
    return value.decode("latin-1") if isinstance(value, bytes) else value


class _StreamPhase(Enum):
    REQUESTED = "requested"  # CONNECT sent (client) or received (server), no answer yet
    OPEN = "open"            # 200 sent/received: tunnel established
    DEAD = "dead"            # rejected, refused or reset: events are swallowed


@dataclass
class _Stream:
    phase: _StreamPhase
    local_ended: bool = False
    remote_ended: bool = False


@dataclass
class _PingState:
    counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    outstanding: set[bytes] = field(default_factory=set)


_FRAME_HEADER_LEN = 9
_CLIENT_PREFACE_LEN = len(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")


_HEADERS = 0x1
_PUSH_PROMISE = 0x5
_CONTINUATION = 0x9
_END_HEADERS = 0x4
# Padding (up to 255 + 1 length byte), PRIORITY fields and HPACK table-size updates are
# the only bytes of a header block that add nothing to the header list size.
_HEADER_BLOCK_SLACK = 1024


@dataclass(frozen=True)
class _Violation:
    error_code: int
    reason: str


class _FrameGuard:
    """Spots oversized frames and header blocks from 9-byte frame headers, before
    their bodies arrive.

    h2 checks a frame's length only once the whole frame is buffered, so a peer
    announcing a 16 MiB frame would make us buffer 16 MiB first; and it buffers up to
    64 CONTINUATION frames of a header block (64 MiB at our frame size) before it
    decodes any of it. Tracking frame boundaries here lets us refuse at the header.

    Header blocks are bounded by the SETTINGS_MAX_HEADER_LIST_SIZE we advertise: an
    HPACK encoding never takes more octets than the RFC 9113 section 6.5.2 size of the
    list it encodes (name + value + 32 per field), so a block longer than that limit
    (plus padding/priority slack) can only decode to a list over it. As the Rust h2
    crate ztunnel uses does for a header list "way too large" or too many
    CONTINUATIONs (src/codec/framed_read.rs), we answer GOAWAY ENHANCE_YOUR_CALM.
    """

    def __init__(self, max_frame_size: int, max_header_list_size: int,
                 preface_len: int) -> None:
        self._max_frame_size = max_frame_size
        self._max_header_block = max_header_list_size + _HEADER_BLOCK_SLACK
        self._preface_left = preface_len
        self._body_left = 0
        self._header = bytearray()
        self._in_header_block = False
        self._header_block_len = 0

    def check(self, data: bytes) -> _Violation | None:
        """Feed the next received bytes; returns the first violation, if any."""
        view = memoryview(data)
        offset = 0
        if self._preface_left:
            taken = min(self._preface_left, len(view))
            self._preface_left -= taken
            offset += taken
        while offset < len(view):
            if self._body_left:
                taken = min(self._body_left, len(view) - offset)
                self._body_left -= taken
                offset += taken
                continue
            needed = _FRAME_HEADER_LEN - len(self._header)
            self._header += view[offset:offset + needed]
            offset += min(needed, len(view) - offset)
            if len(self._header) == _FRAME_HEADER_LEN:
                violation = self._frame_header(int.from_bytes(self._header[:3], "big"),
                                               self._header[3], self._header[4])
                self._header.clear()
                if violation is not None:
                    return violation
        return None

    def _frame_header(self, length: int, frame_type: int, flags: int) -> _Violation | None:
        if length > self._max_frame_size:
            return _Violation(FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds our "
                              f"MAX_FRAME_SIZE {self._max_frame_size}")
        self._body_left = length
        if frame_type in (_HEADERS, _PUSH_PROMISE):
            self._header_block_len = length
            self._in_header_block = not flags & _END_HEADERS
        elif frame_type == _CONTINUATION and self._in_header_block:
            self._header_block_len += length
            self._in_header_block = not flags & _END_HEADERS
        else:
            return None  # h2 rejects anything else inside a header block
        if self._header_block_len > self._max_header_block:
            limit = self._max_header_block - _HEADER_BLOCK_SLACK
            return _Violation(ENHANCE_YOUR_CALM, f"header block of over "
                              f"{self._header_block_len} bytes exceeds our "
                              f"MAX_HEADER_LIST_SIZE {limit}")
        return None


class HboneConnection:
    """One HBONE HTTP/2 connection, client or server side, as a sans-IO state machine.

    Usage: construct, send :meth:`data_to_send` to the peer, feed every received chunk
    to :meth:`receive_data` and act on the returned events, and send
    :meth:`data_to_send` again after every call. Methods raise :class:`HboneError` for
    misuse; :meth:`receive_data` never raises for anything the peer sends.
    """

    def __init__(self, *, client_side: bool, settings: HboneSettings | None = None) -> None:
        self.settings = settings or HboneSettings()
        self.client_side = client_side
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,  # keep headers as bytes; we decode latin-1 ourselves
            validate_inbound_headers=True,
            validate_outbound_headers=True,
            normalize_inbound_headers=True,
        )
        self._h2 = compat.H2Connection(config=config)
        s = self.settings
        # Advertised in the very first SETTINGS frame (ztunnel's values). h2 treats
        # initial_values as already in force, which is safe: each is at least as
        # permissive as the default the peer assumes until it reads our SETTINGS.
        self._h2.local_settings = h2.settings.Settings(
            client=client_side,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: s.initial_stream_window,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: s.max_frame_size,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: s.max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        # Because the settings above never go through an ACK "change", h2 would not
        # update these derived limits; set them to match what we advertise.
        compat.apply_local_limits(self._h2, max_frame_size=s.max_frame_size,
                                  max_header_list_size=s.max_header_list_size)
        self._h2.initiate_connection()
        # The connection window is not a setting: raise it with a WINDOW_UPDATE on 0.
        default_window = 65535
        if s.connection_window > default_window:
            self._h2.increment_flow_control_window(s.connection_window - default_window)
        self._frame_guard = _FrameGuard(s.max_frame_size, s.max_header_list_size,
                                        0 if client_side else _CLIENT_PREFACE_LEN)
        self._streams: dict[int, _Stream] = {}
        self._pings = _PingState()
        self._terminated: ConnectionTerminated | None = None
        self._going_away = False
        self._draining = False
        self._goaway_sent = False
        # Requests the peer reset before we answered, until the application releases them.
        self._cancelled_requests: set[int] = set()
        self._local_error_resets = 0

    # ---- connection state -------------------------------------------------------

    @property
    def terminated(self) -> ConnectionTerminated | None:
        """The termination event once the connection is over, else None."""
        return self._terminated

    @property
    def is_usable(self) -> bool:
        """True while new streams may be opened on (or accepted by) this connection."""
        return self._terminated is None and not self._going_away and not self._draining

    @property
    def open_stream_count(self) -> int:
        """Streams not yet fully closed (counts toward MAX_CONCURRENT_STREAMS)."""
        return len(self._streams)

    @property
    def peer_max_concurrent_streams(self) -> int:
        return int(self._h2.remote_settings.max_concurrent_streams)

    def available_stream_slots(self, limit: int | None = None) -> int:
        """How many more streams this client may open now (0 if unusable)."""
        if not self.is_usable:
            return 0
        cap = min(self.peer_max_concurrent_streams,
                  limit if limit is not None else self.settings.max_concurrent_streams)
        return max(0, cap - self._h2.open_outbound_streams)

    @property
    def outstanding_pings(self) -> int:
        return len(self._pings.outstanding)

    def data_to_send(self) -> bytes:
        """Bytes to write to the transport now (may be empty)."""
        return bytes(self._h2.data_to_send())

    # ---- client side --------------------------------------------------------------

    def open_stream(self, authority: str, forwarded_for: str | None = None,
                    baggage: str | None = None,
                    extra_headers: Sequence[tuple[str, str]] = ()) -> int:
        """Send a CONNECT for ``authority`` (``ip:port``); returns the new stream id.

        ``forwarded_for`` is the original source IP (sent as RFC 7239 ``Forwarded``),
        ``baggage`` a ready ``k=v,k=v`` string (see :func:`format_baggage`).
        """
        if not self.client_side:
            raise HboneError("open_stream is for the client side")
        if not self.is_usable:
            raise ConnectionClosedError("connection is closed or going away")
        if self.available_stream_slots(limit=self.peer_max_concurrent_streams) <= 0:
            raise HboneError("peer's MAX_CONCURRENT_STREAMS reached")
        parse_hbone_address(authority)  # ValueError for anything but ip:port / host:port
        headers: list[tuple[str, str]] = [(":method", "CONNECT"), (":authority", authority)]
        if forwarded_for is not None:
            headers.append((FORWARDED_HEADER, format_forwarded_for(forwarded_for)))
        if baggage:
            headers.append((BAGGAGE_HEADER, baggage))
        headers.extend((name.lower(), value) for name, value in extra_headers)
        stream_id = self._h2.get_next_available_stream_id()
        try:
            self._h2.send_headers(stream_id, headers, end_stream=False)
        except h2.exceptions.ProtocolError as exc:
            raise HboneError(f"cannot open stream: {exc}") from exc
        self._streams[stream_id] = _Stream(_StreamPhase.REQUESTED)
        return stream_id

    # ---- server side --------------------------------------------------------------

    def accept_stream(self, stream_id: int,
                      extra_headers: Sequence[tuple[str, str]] = ()) -> None:
        """Answer a StreamRequest with 200: the tunnel is established."""
        stream = self._pending_request(stream_id)
        self._h2.send_headers(stream_id, [(":status", "200"), *extra_headers])
        stream.phase = _StreamPhase.OPEN

    def reject_stream(self, stream_id: int, status: int) -> None:
        """Answer a StreamRequest with an error status (403, 400, 502, 503, ...)."""
        if not 400 <= status <= 599:
            raise ValueError(f"reject status must be 4xx or 5xx, got {status}")
        self._pending_request(stream_id)
        self._respond_and_close(stream_id, status)

    def release_request(self, stream_id: int) -> None:
        """The application is done with a request the peer cancelled before our answer."""
        self._cancelled_requests.discard(stream_id)

    def start_draining(self) -> None:
        """Refuse new requests (REFUSED_STREAM, retryable) while existing streams finish."""
        self._draining = True

    def go_away(self) -> None:
        """Graceful shutdown notice (server side): queue GOAWAY (NO_ERROR) with the last
        stream the peer opened and refuse newer ones; open streams keep running, so the
        peer opens new streams on another connection. Idempotent; a no-op once the
        connection is terminated. Side effects: queues a frame for :meth:`data_to_send`."""
        if self._terminated is not None or self._goaway_sent:
            return
        self._goaway_sent = True
        self.start_draining()
        self._h2.send_graceful_goaway()

    def _pending_request(self, stream_id: int) -> _Stream:
        if self.client_side:
            raise HboneError("accept/reject are for the server side")
        stream = self._streams.get(stream_id)
        if stream is None or stream.phase is not _StreamPhase.REQUESTED:
            raise StreamClosedError(f"stream {stream_id} has no request awaiting an answer")
        if self._terminated is not None:
            raise ConnectionClosedError("connection is terminated")
        return stream

    def _respond_and_close(self, stream_id: int, status: int) -> None:
        """Send ``status`` with END_STREAM, then stop the client's upload if any."""
        stream = self._streams.get(stream_id)
        self._h2.send_headers(stream_id, [(":status", str(status))], end_stream=True)
        if stream is not None and not stream.remote_ended and \
                self._h2.streams.get(stream_id) is not None and \
                not self._h2.streams[stream_id].closed:
            # RFC 9113 8.1: a server that answered early resets with NO_ERROR so the
            # client stops sending, and the stream stops counting against concurrency.
            self._h2.reset_stream(stream_id, NO_ERROR)
        self._streams.pop(stream_id, None)

    # ---- data -----------------------------------------------------------------------

    def writable(self, stream_id: int) -> int:
        """Bytes send_data would accept on ``stream_id`` right now (0 if none or closed)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.phase is _StreamPhase.DEAD or stream.local_ended:
            return 0
        if self._terminated is not None:
            return 0
        try:
            return max(0, self._h2.local_flow_control_window(stream_id))
        except h2.exceptions.StreamClosedError:
            return 0

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of ``data`` as flow control allows; returns the bytes accepted.

        Split into frames of at most the peer's MAX_FRAME_SIZE. Returns less than
        ``len(data)`` (possibly 0) when the window is exhausted: wait for WindowOpened.
        """
        stream = self._streams.get(stream_id)
        if stream is None or stream.phase is _StreamPhase.DEAD:
            raise StreamClosedError(f"stream {stream_id} is closed or reset")
        if stream.local_ended:
            raise StreamClosedError(f"stream {stream_id} is already half-closed by us")
        if self._terminated is not None:
            raise ConnectionClosedError("connection is terminated")
        view = memoryview(data)
        accepted = min(len(view), self.writable(stream_id))
        frame_size = self._h2.max_outbound_frame_size
        offset = 0
        while offset < accepted:
            chunk = view[offset:min(accepted, offset + frame_size)]
            self._h2.send_data(stream_id, bytes(chunk))
            offset += len(chunk)
        return accepted

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction (END_STREAM: the TCP FIN of the tunnelled connection)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.phase is _StreamPhase.DEAD:
            raise StreamClosedError(f"stream {stream_id} is closed or reset")
        if stream.local_ended:
            return
        if self._terminated is not None:
            raise ConnectionClosedError("connection is terminated")
        self._h2.end_stream(stream_id)
        stream.local_ended = True
        self._forget_if_closed(stream_id)

    def reset_stream(self, stream_id: int, error_code: int = CANCEL) -> None:
        """Abort the stream (RST_STREAM). No-op if it is already gone."""
        stream = self._streams.pop(stream_id, None)
        if stream is None or self._terminated is not None:
            return
        # The peer may have closed it in the same batch: nothing left to reset then.
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self._h2.reset_stream(stream_id, error_code)

    def acknowledge_received(self, stream_id: int, size: int) -> None:
        """The application consumed ``size`` bytes of ``stream_id``: reopen the windows."""
        if size <= 0 or self._terminated is not None:
            return
        # If the connection is closing the window no longer matters.
        with contextlib.suppress(h2.exceptions.ProtocolError, ValueError):
            self._h2.acknowledge_received_data(size, stream_id)

    # ---- connection control ----------------------------------------------------------

    def ping(self) -> bytes:
        """Send a keepalive PING; returns its 8-byte payload (matched by PingAcked)."""
        if self._terminated is not None:
            raise ConnectionClosedError("connection is terminated")
        payload: bytes = int(next(self._pings.counter)).to_bytes(8, "big")
        self._h2.ping(payload)
        self._pings.outstanding.add(payload)
        return payload

    def close(self, error_code: int = NO_ERROR, reason: str = "") -> None:
        """Send GOAWAY and end the connection. Idempotent."""
        if self._terminated is not None:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.close_connection(error_code=error_code,
                                      additional_data=reason.encode()[:256] or None)
        self._terminated = ConnectionTerminated(error_code, reason or "closed locally",
                                                None, local=True)
        self._streams.clear()

    # ---- input ---------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[HboneEvent]:
        """Feed bytes from the peer; returns the resulting events. Never raises for input.

        A protocol violation yields ConnectionTerminated(local=True) and queues GOAWAY.
        """
        if self._terminated is not None:
            return []
        violation = self._frame_guard.check(data)
        if violation is not None:
            return [self._fail_connection(violation.error_code, violation.reason)]
        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 has already queued a GOAWAY carrying exc.error_code.
            return [self._terminate_locally(int(exc.error_code), f"protocol error: {exc}")]
        except Exception as exc:  # h2 bug or exotic input: fail closed, never propagate
            with contextlib.suppress(Exception):
                self._h2.close_connection(error_code=INTERNAL_ERROR)
            return [self._terminate_locally(INTERNAL_ERROR, f"internal error: {exc!r}")]
        self._check_control_backlog()
        events: list[HboneEvent] = []
        if self._terminated is not None:
            return [self._terminated]
        for event in h2_events:
            try:
                events.extend(self._translate(event))
            except h2.exceptions.StreamClosedError:
                # Answering a stream the peer closed in the same batch: nothing to do.
                continue
            if self._terminated is not None:  # a flood bound tripped, or fatal GOAWAY
                if not events or events[-1] is not self._terminated:
                    events.append(self._terminated)
                break
        return events

    def output_drained(self) -> None:
        """The shell wrote everything we queued to the network (transport buffer empty):
        control-frame replies owed so far have left; restart the flood count."""
        self._h2.control_frames_queued = 0

    def _fail_connection(self, error_code: int, reason: str) -> ConnectionTerminated:
        """Send GOAWAY ``error_code`` and end the connection; returns the event."""
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.close_connection(error_code=error_code,
                                      additional_data=reason.encode()[:256])
        return self._terminate_locally(error_code, reason)

    def _terminate_locally(self, error_code: int, reason: str) -> ConnectionTerminated:
        self._terminated = ConnectionTerminated(error_code, reason, None, local=True)
        self._streams.clear()
        self._cancelled_requests.clear()
        return self._terminated

    def _translate(self, event: h2.events.Event) -> list[HboneEvent]:
        if isinstance(event, h2.events.RequestReceived):
            return self._on_request(event)
        if isinstance(event, h2.events.ResponseReceived):
            return self._on_response(event)
        if isinstance(event, h2.events.DataReceived):
            return self._on_data(event)
        if isinstance(event, h2.events.StreamEnded):
            return self._on_stream_ended(event.stream_id)
        if isinstance(event, h2.events.StreamReset):
            return self._on_reset(event)
        if isinstance(event, h2.events.WindowUpdated):
            return [WindowOpened(event.stream_id or None)]
        if isinstance(event, h2.events.RemoteSettingsChanged):
            changed = event.changed_settings
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in changed or \
                    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS in changed:
                return [WindowOpened(None)]
            return []
        if isinstance(event, compat.StreamRefused):
            self._count_local_error_reset()
            return [RequestRefused(event.stream_id, 503,
                                   "over our MAX_CONCURRENT_STREAMS: REFUSED_STREAM",
                                   REFUSED_STREAM)]
        if isinstance(event, compat.StreamMalformed):
            self._count_local_error_reset()
            if self._streams.pop(event.stream_id, None) is not None:
                # A stream we already knew (trailers): it is reset, tell the application.
                return [StreamReset(event.stream_id, PROTOCOL_ERROR, remote=False)]
            return [RequestRefused(event.stream_id, 400,
                                   f"malformed request: {event.reason}", PROTOCOL_ERROR)]
        if isinstance(event, h2.events.PingAckReceived):
            payload = bytes(event.ping_data or b"")
            if payload in self._pings.outstanding:
                self._pings.outstanding.discard(payload)
                return [PingAcked(payload)]
            return []
        if isinstance(event, h2.events.ConnectionTerminated):
            return self._on_goaway(event)
        if isinstance(event, h2.events.TrailersReceived):
            # Trailers are not part of HBONE; END_STREAM (if set) arrives separately.
            return []
        # SettingsAcknowledged, PingReceived (auto-acked by h2), informational
        # responses, priority updates and unknown frames need no action.
        return []

    def _on_request(self, event: h2.events.RequestReceived) -> list[HboneEvent]:
        """A new request: a valid CONNECT becomes StreamRequest; anything else is
        answered here, on its stream alone (the connection and its other streams go
        on). Status codes as ztunnel's inbound (src/proxy/inbound.rs,
        build_inbound_request): 400 for a non-CONNECT method or an unusable authority."""
        stream_id = event.stream_id
        stream = _Stream(_StreamPhase.REQUESTED, remote_ended=event.stream_ended is not None)
        self._streams[stream_id] = stream
        pseudo: dict[str, str] = {}
        headers: list[tuple[str, str]] = []
        for raw_name, raw_value in event.headers or ():
            name, value = _text(raw_name), _text(raw_value)
            if name.startswith(":"):
                pseudo[name] = value
            else:
                headers.append((name, value))
        method = pseudo.get(":method", "")
        if self._draining or self._terminated is not None:
            self._streams.pop(stream_id, None)
            self._h2.reset_stream(stream_id, REFUSED_STREAM)
            return [RequestRefused(stream_id, 503, "draining", REFUSED_STREAM)]
        if method != "CONNECT":
            return self._refuse_request(stream_id, 400, f"method {method!r} is not CONNECT")
        if ":protocol" in pseudo:
            return self._refuse_request(stream_id, 400, "extended CONNECT is not HBONE")
        authority = pseudo.get(":authority", "")
        try:
            # A hostname goes to the application, which resolves it through a service
            # (ztunnel inbound.rs find_inbound_upstream) or answers 503.
            parse_hbone_address(authority)
        except ValueError as exc:
            return self._refuse_request(stream_id, 400, str(exc))
        return [StreamRequest(stream_id, authority, tuple(headers))]

    def _refuse_request(self, stream_id: int, status: int, reason: str) -> list[HboneEvent]:
        self._respond_and_close(stream_id, status)
        self._count_local_error_reset()
        return [RequestRefused(stream_id, status, reason)]

    def _on_reset(self, event: h2.events.StreamReset) -> list[HboneEvent]:
        stream = self._streams.pop(event.stream_id, None)
        if stream is None or stream.phase is _StreamPhase.DEAD:
            return []
        if (event.remote_reset and not self.client_side
                and stream.phase is _StreamPhase.REQUESTED):
            # Reset before we answered: the application may still be working on it.
            self._cancelled_requests.add(event.stream_id)
            limit = self.settings.max_pending_accept_reset_streams
            if len(self._cancelled_requests) > limit:
                self._fail_connection(ENHANCE_YOUR_CALM, "too_many_resets: over "
                                      f"{limit} requests reset before they were answered")
        return [StreamReset(event.stream_id, int(event.error_code),
                            remote=event.remote_reset)]

    def _count_local_error_reset(self) -> None:
        self._local_error_resets += 1
        limit = self.settings.max_local_error_resets
        if self._local_error_resets > limit and self._terminated is None:
            self._fail_connection(ENHANCE_YOUR_CALM, "too_many_internal_resets: over "
                                  f"{limit} streams refused for bad input")

    def _check_control_backlog(self) -> None:
        limit = self.settings.max_queued_control_replies
        if self._h2.control_frames_queued > limit and self._terminated is None:
            self._fail_connection(ENHANCE_YOUR_CALM, "too many queued control frames: "
                                  f"over {limit} PING/SETTINGS ACKs and RST_STREAMs the "
                                  "peer is not reading")

    def _on_response(self, event: h2.events.ResponseReceived) -> list[HboneEvent]:
        stream_id = event.stream_id
        stream = self._streams.get(stream_id)
        if stream is None or stream.phase is not _StreamPhase.REQUESTED:
            return []
        status_text = ""
        headers: list[tuple[str, str]] = []
        for raw_name, raw_value in event.headers or ():
            name, value = _text(raw_name), _text(raw_value)
            if name == ":status":
                status_text = value
            elif not name.startswith(":"):
                headers.append((name, value))
        status = int(status_text) if status_text.isdigit() else 0
        if status == 200:
            stream.phase = _StreamPhase.OPEN
            return [StreamAccepted(stream_id, tuple(headers))]
        # Any other final status ends the tunnel attempt; cancel our half if still open.
        self._streams.pop(stream_id, None)
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self._h2.reset_stream(stream_id, CANCEL)
        return [StreamRejected(stream_id, status)]

    def _on_data(self, event: h2.events.DataReceived) -> list[HboneEvent]:
        stream_id = event.stream_id
        data = bytes(event.data or b"")
        flow_controlled = int(event.flow_controlled_length or 0)
        stream = self._streams.get(stream_id)
        if stream is None or stream.phase is _StreamPhase.DEAD:
            # Nobody will consume it: return the window at once so the connection
            # window does not leak.
            self.acknowledge_received(stream_id, flow_controlled)
            return []
        # Padding is never seen by the application, so acknowledge it here.
        padding = flow_controlled - len(data)
        if padding > 0:
            self.acknowledge_received(stream_id, padding)
        if not data:
            return []
        return [DataReceived(stream_id, data)]

    def _on_stream_ended(self, stream_id: int) -> list[HboneEvent]:
        stream = self._streams.get(stream_id)
        if stream is None or stream.phase is _StreamPhase.DEAD:
            return []
        stream.remote_ended = True
        self._forget_if_closed(stream_id)
        return [StreamEnded(stream_id)]

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> list[HboneEvent]:
        error_code = int(event.error_code if event.error_code is not None else NO_ERROR)
        last_stream_id = event.last_stream_id
        extra = bytes(event.additional_data or b"").decode("utf-8", "replace")
        self._going_away = True
        events: list[HboneEvent] = []
        # Our streams above last_stream_id were never processed by the peer: they are
        # refused (safe to retry on a new connection).
        if last_stream_id is not None:
            for stream_id in sorted(self._streams):
                if stream_id > last_stream_id and (stream_id % 2 == 1) == self.client_side:
                    self._streams.pop(stream_id)
                    events.append(StreamReset(stream_id, REFUSED_STREAM))
        if error_code == NO_ERROR:
            events.append(GoingAway(last_stream_id if last_stream_id is not None else 0))
            return events
        # An error GOAWAY: h2 has closed its state machine, every stream is dead.
        terminated = ConnectionTerminated(error_code, extra or "GOAWAY received",
                                          last_stream_id, local=False)
        self._terminated = terminated
        for stream_id in sorted(self._streams):
            events.append(StreamReset(stream_id, error_code))
        self._streams.clear()
        events.append(terminated)
        return events

    def _forget_if_closed(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None and stream.local_ended and stream.remote_ended:
            del self._streams[stream_id]


class HboneClientConnection(HboneConnection):
    """Client (originating node) side: opens CONNECT streams."""

    def __init__(self, settings: HboneSettings | None = None) -> None:
        super().__init__(client_side=True, settings=settings)


class HboneServerConnection(HboneConnection):
    """Server (port 15008) side: receives CONNECT streams and accepts or rejects them."""

    def __init__(self, settings: HboneSettings | None = None) -> None:
        super().__init__(client_side=False, settings=settings)
