"""Every patch of h2/hyperframe internals HBONE relies on, checked against the versions
it was tested with.

Importing this module fails with :class:`UnsupportedH2Version` (saying what to install)
when h2, hyperframe or hpack is not a tested version, or when an internal we patch is
missing, rather than misbehaving at run time. Each patch has a test in
``tests/unit/test_hbone_compat.py``. When upgrading h2: re-read each patched function
in the new version, run those tests, then add the version to ``TESTED``.
"""

from __future__ import annotations

from typing import Any

import h2
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.stream
import hpack
import hyperframe
import hyperframe.frame

from agent.hbone.exceptions import UnsupportedH2Version

# The versions pinned in pyproject.toml; all tests pass with exactly these.
TESTED: dict[str, frozenset[str]] = {
    "h2": frozenset({"4.4.1"}),
    "hyperframe": frozenset({"6.1.0"}),
    "hpack": frozenset({"4.2.0"}),
}


def check_versions(installed: dict[str, str] | None = None) -> None:
    """Raise UnsupportedH2Version unless every library is a TESTED version. Pure."""
    installed = installed if installed is not None else {
        "h2": h2.__version__, "hyperframe": hyperframe.__version__,
        "hpack": hpack.__version__}
    for name, versions in TESTED.items():
        version = installed.get(name)
        if version not in versions:
            raise UnsupportedH2Version(
                f"{name} {version} is not a version agent.hbone was tested with "
                f"({', '.join(sorted(versions))}); install the pinned versions "
                f"(pip install -e . from pyproject.toml) or re-validate "
                f"agent/hbone/compat.py against {name} {version} and add it to TESTED")


def _require(owner: object, attribute: str) -> None:
    if not hasattr(owner, attribute):
        raise UnsupportedH2Version(
            f"{getattr(owner, '__name__', owner)!s} has no {attribute!r}: agent.hbone.compat "
            f"patches it; this h2/hyperframe differs from the tested one")


check_versions()

# Not patched (checked by a test): h2's inbound window manager raises its replenish
# target when we raise the connection window (WindowManager.window_opened), so a
# 16 MiB connection window is returned in full as the application acknowledges bytes.

# ---- patch 1: cheap DataFrame repr ---------------------------------------------------
# h2 formats repr(frame) of every frame it receives for its trace log, whether or not
# tracing is on, and hyperframe's DataFrame repr re-serializes the whole payload and
# hex-encodes it: on a bulk stream that was ~15% of the receiving tunnel's CPU. A DATA
# frame's repr now names its size only. (Process-wide: hyperframe has no other hook.)
_require(hyperframe.frame.DataFrame, "_body_repr")


def _data_frame_body_repr(frame: hyperframe.frame.DataFrame) -> str:
    return f"<{len(frame.data)} bytes>"


hyperframe.frame.DataFrame._body_repr = _data_frame_body_repr  # type: ignore[method-assign,assignment]


# ---- patch 2: graceful GOAWAY ---------------------------------------------------------
# h2 treats every GOAWAY as fatal: it closes its state machine (so the frames of streams
# still running become protocol errors) and drops queued output. A GOAWAY with NO_ERROR
# is a graceful shutdown notice (nghttp2/Node and ztunnel send one when draining), so
# for that case we only report it and let the streams finish. Scoped to our subclass.
_require(h2.connection.H2Connection, "_receive_goaway_frame")

# ---- patch 3: REFUSED_STREAM over MAX_CONCURRENT_STREAMS --------------------------------
# h2 answers a HEADERS that opens one stream too many with TooManyStreamsError, a
# connection error (GOAWAY: every other stream dies), and before decoding the header
# block. RFC 9113 section 5.1.2 allows a stream error (REFUSED_STREAM, which tells the
# client it may retry, as nghttp2, Go and the Rust h2 crate answer). We decode the
# block anyway (HPACK state is connection-wide, RFC 9113 section 4.3), record the stream
# as closed by our RST_STREAM so late frames on it are ignored (section 5.4.2), and
# report it.
_require(h2.connection.H2Connection, "_receive_headers_frame")
_require(h2.connection, "_decode_headers")
_require(h2.stream.StreamClosedBy, "SEND_RST_STREAM")
_require(h2.stream, "StreamState")
_REMOTE_MAY_SEND = (h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_LOCAL)


class StreamRefused(h2.events.Event):
    """A new stream over our MAX_CONCURRENT_STREAMS was refused with REFUSED_STREAM."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class StreamMalformed(h2.events.Event):
    """A new request's header block was malformed; the stream was reset PROTOCOL_ERROR."""

    def __init__(self, stream_id: int, reason: str) -> None:
        self.stream_id = stream_id
        self.reason = reason


# ---- patch 5: a malformed request is a stream error ------------------------------------
# h2 validates a request's headers (pseudo-headers, connection-specific fields, case...)
# inside H2Stream.receive_headers and raises ProtocolError, which it treats as a
# connection error: one malformed request ends every stream on the connection. RFC 9113
# section 8.1.1 makes it a stream error of type PROTOCOL_ERROR. When the error comes
# from validating a *new* inbound stream's headers (the block was decoded, so HPACK is
# in sync, and the stream was created), we reset just that stream; likewise for
# trailers without END_STREAM on a stream the client may still send on.


# ---- patch 6: count the control frames we queue ---------------------------------------
# A peer can make us queue a reply per frame it sends: PING and SETTINGS ACKs, and a
# RST_STREAM for every frame on a stream we reset. If it does not read, they pile up in
# our output buffer. Go's server bounds such queued control frames
# (maxQueuedControlFrames, server.go); to do the same we count them where h2 queues
# every outgoing frame (_prepare_for_sending). The core resets the count whenever the
# shell reports its output drained.
_require(h2.connection.H2Connection, "_prepare_for_sending")
_CONTROL_REPLIES = (hyperframe.frame.PingFrame, hyperframe.frame.SettingsFrame,
                    hyperframe.frame.RstStreamFrame)


class H2Connection(h2.connection.H2Connection):
    """h2's connection with a graceful (NO_ERROR) GOAWAY that keeps streams running,
    REFUSED_STREAM (not GOAWAY) for a stream over MAX_CONCURRENT_STREAMS, a stream
    error (not GOAWAY) for a malformed request, and a count of queued control frames."""

    control_frames_queued = 0

    def _prepare_for_sending(self, frames: list[hyperframe.frame.Frame]) -> None:
        self.control_frames_queued += sum(1 for f in frames if isinstance(f, _CONTROL_REPLIES))
        super()._prepare_for_sending(frames)

    def _receive_headers_frame(
            self, frame: hyperframe.frame.HeadersFrame,
    ) -> tuple[list[Any], list[h2.events.Event]]:
        stream_id = frame.stream_id
        is_new = stream_id not in self.streams
        if (not self.config.client_side and is_new
                and stream_id % 2 == 1 and stream_id > self.highest_inbound_stream_id
                and self.open_inbound_streams + 1 > self.local_settings.max_concurrent_streams):
            h2.connection._decode_headers(self.decoder, frame.data)
            self.highest_inbound_stream_id = stream_id
            self._closed_streams[stream_id] = h2.stream.StreamClosedBy.SEND_RST_STREAM
            refusal = hyperframe.frame.RstStreamFrame(stream_id)
            refusal.error_code = int(h2.errors.ErrorCodes.REFUSED_STREAM)
            return [refusal], [StreamRefused(stream_id)]
        if not self.config.client_side and not is_new and "END_STREAM" not in frame.flags:
            stream = self.streams[stream_id]
            if stream.state_machine.state in _REMOTE_MAY_SEND:
                # A second HEADERS from a client is trailers, which must end the stream
                # (RFC 9113 8.1): malformed, a stream error. h2 makes it a connection
                # error. Decode it first: HPACK state is connection-wide.
                h2.connection._decode_headers(self.decoder, frame.data)
                frames = stream.reset_stream(int(h2.errors.ErrorCodes.PROTOCOL_ERROR))
                return frames, [StreamMalformed(stream_id, "trailers without END_STREAM")]
        try:
            return super()._receive_headers_frame(frame)
        except h2.exceptions.ProtocolError as exc:
            created = self.streams.get(stream_id)
            if (self.config.client_side or not is_new or created is None
                    or isinstance(exc, h2.exceptions.DenialOfServiceError)):
                raise
            frames = created.reset_stream(int(h2.errors.ErrorCodes.PROTOCOL_ERROR))
            return frames, [StreamMalformed(stream_id, str(exc))]

    def send_graceful_goaway(self) -> None:
        """Queue a GOAWAY (NO_ERROR) naming the highest stream the peer opened, without
        closing h2's state machine: the streams up to it keep running (the sending side
        of patch 2; h2's ``close_connection`` would end them). Side effects: appends the
        frame to the output buffer."""
        frame = hyperframe.frame.GoAwayFrame(0)
        frame.last_stream_id = self.highest_inbound_stream_id
        frame.error_code = int(h2.errors.ErrorCodes.NO_ERROR)
        self._prepare_for_sending([frame])

    def _receive_goaway_frame(
            self, frame: hyperframe.frame.GoAwayFrame,
    ) -> tuple[list[Any], list[h2.events.Event]]:
        if frame.error_code != int(h2.errors.ErrorCodes.NO_ERROR):
            return super()._receive_goaway_frame(frame)
        notice = h2.events.ConnectionTerminated()
        notice.error_code = h2.errors.ErrorCodes.NO_ERROR
        notice.last_stream_id = frame.last_stream_id
        notice.additional_data = frame.additional_data or None
        return [], [notice]


# ---- patch 4: limits advertised in the first SETTINGS ------------------------------
def apply_local_limits(conn: h2.connection.H2Connection, *, max_frame_size: int,
                       max_header_list_size: int) -> None:
    """Make h2 enforce the limits we put in ``local_settings.initial_values``.

    h2 derives ``max_inbound_frame_size`` and the HPACK decoder's header-list limit
    only when a settings *change* is acknowledged; initial values never go through
    that, so set the derived limits to match what we advertise.
    """
    conn.max_inbound_frame_size = max_frame_size
    conn.decoder.max_header_list_size = max_header_list_size
