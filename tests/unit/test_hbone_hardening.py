"""The HBONE server core under adversarial input, frame by frame (issue 11 items 3, 4,
6, 9 and the SETTINGS/PING floods). Each bound is the field's, cited in
agent/hbone/config.py; every bad input is answered on its stream alone unless the peer
is flooding, and then with GOAWAY ENHANCE_YOUR_CALM.
"""

from __future__ import annotations

from typing import TypeVar

import h2.config
import h2.connection
import h2.events
import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from agent.hbone import errors
from agent.hbone.config import HboneSettings
from agent.hbone.connection import HboneServerConnection
from agent.hbone.events import (
    ConnectionTerminated,
    HboneEvent,
    RequestRefused,
    StreamEnded,
    StreamRequest,
    StreamReset,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
E = TypeVar("E")


def frames_of(data: bytes) -> list[Frame]:
    if data.startswith(PREFACE):
        data = data[len(PREFACE):]
    out = []
    view = memoryview(data)
    while len(view) >= 9:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9:9 + length])
        out.append(frame)
        view = view[9 + length:]
    return out


def server(settings: HboneSettings | None = None) -> HboneServerConnection:
    core = HboneServerConnection(settings)
    core.receive_data(PREFACE + SettingsFrame(0).serialize())
    core.data_to_send()
    return core


def headers_frame(encoder: hpack.Encoder, stream_id: int, headers: list[tuple[str, str]],
                  end_stream: bool = False) -> bytes:
    frame = HeadersFrame(stream_id)
    frame.data = encoder.encode(headers)
    frame.flags.add("END_HEADERS")
    if end_stream:
        frame.flags.add("END_STREAM")
    return frame.serialize()


def connect(authority: str = "10.0.0.7:8080") -> list[tuple[str, str]]:
    return [(":method", "CONNECT"), (":authority", authority)]


def rst(stream_id: int, code: int = errors.CANCEL) -> bytes:
    frame = RstStreamFrame(stream_id)
    frame.error_code = code
    return frame.serialize()


def only(events: list[HboneEvent], kind: type[E]) -> E:
    """The one event in ``events``, which must be a ``kind``."""
    assert [type(e) for e in events] == [kind], events
    event = events[0]
    assert isinstance(event, kind)
    return event


def goaways(core: HboneServerConnection) -> list[GoAwayFrame]:
    return [f for f in frames_of(core.data_to_send()) if isinstance(f, GoAwayFrame)]


# ---- item 3: one bad request never kills the connection --------------------------


def test_non_connect_with_end_stream_is_answered_on_its_stream_alone() -> None:
    core, encoder = server(), hpack.Encoder()
    get = [(":method", "GET"), (":scheme", "https"), (":path", "/"),
           (":authority", "10.0.0.7:8080")]
    events = core.receive_data(headers_frame(encoder, 1, get, end_stream=True))
    assert RequestRefused(1, 400, "method 'GET' is not CONNECT") in events
    assert not any(isinstance(e, ConnectionTerminated) for e in events)
    out = frames_of(core.data_to_send())
    assert not [f for f in out if isinstance(f, GoAwayFrame)]
    response = next(f for f in out if isinstance(f, HeadersFrame))
    assert response.stream_id == 1 and "END_STREAM" in response.flags
    # The connection goes on: the next CONNECT is served.
    events = core.receive_data(headers_frame(encoder, 3, connect()))
    assert events == [StreamRequest(3, "10.0.0.7:8080", ())]


def test_bad_authority_with_end_stream_is_answered_on_its_stream_alone() -> None:
    core, encoder = server(), hpack.Encoder()
    for stream_id, authority in ((1, "example.com"), (3, "10.0.0.7"), (5, "[::1]:0")):
        events = core.receive_data(headers_frame(encoder, stream_id, connect(authority),
                                                 end_stream=True))
        assert only(events, RequestRefused).status == 400
    assert not goaways(core)
    assert core.receive_data(headers_frame(encoder, 7, connect())) == [
        StreamRequest(7, "10.0.0.7:8080", ())]


def test_valid_connect_with_end_stream_is_a_request_and_a_half_close() -> None:
    core, encoder = server(), hpack.Encoder()
    events = core.receive_data(headers_frame(encoder, 1, connect(), end_stream=True))
    assert events == [StreamRequest(1, "10.0.0.7:8080", ()), StreamEnded(1)]
    core.reject_stream(1, 503)  # no RST on a stream the peer already ended
    assert not goaways(core)


def test_malformed_request_is_reset_on_its_stream_alone() -> None:
    """RFC 9113 8.1.1: a malformed request (here an upper-case header name, a
    connection-specific header, a :path on CONNECT) is a stream error PROTOCOL_ERROR."""
    core, encoder = server(), hpack.Encoder()
    malformed = [[*connect(), ("X-Upper", "1")], [*connect(), ("connection", "close")],
                 [*connect(), (":path", "/")]]
    for n, headers in enumerate(malformed):
        stream_id = 2 * n + 1
        events = core.receive_data(headers_frame(encoder, stream_id, headers))
        assert only(events, RequestRefused).error_code == errors.PROTOCOL_ERROR
    out = frames_of(core.data_to_send())
    assert not [f for f in out if isinstance(f, GoAwayFrame)]
    assert [f.error_code for f in out if isinstance(f, RstStreamFrame)] == [
        errors.PROTOCOL_ERROR] * 3
    assert core.receive_data(headers_frame(encoder, 7, connect())) == [
        StreamRequest(7, "10.0.0.7:8080", ())]


# ---- item 9: REFUSED_STREAM beyond the limit, not GOAWAY --------------------------------


def test_stream_over_the_limit_is_refused_and_hpack_stays_in_sync() -> None:
    core, encoder = server(HboneSettings(max_concurrent_streams=2)), hpack.Encoder()
    # Each request adds its custom header to the HPACK dynamic table.
    for stream_id in (1, 3, 5):
        events = core.receive_data(headers_frame(
            encoder, stream_id, [*connect(), (f"x-n{stream_id}", "v" * 40)]))
    assert events == [RequestRefused(5, 503, "over our MAX_CONCURRENT_STREAMS: "
                                             "REFUSED_STREAM", errors.REFUSED_STREAM)]
    out = frames_of(core.data_to_send())
    assert not [f for f in out if isinstance(f, GoAwayFrame)]
    refusal = [f for f in out if isinstance(f, RstStreamFrame)]
    assert [(f.stream_id, f.error_code) for f in refusal] == [(5, errors.REFUSED_STREAM)]
    # Late frames on the refused stream are ignored, not a connection error.
    assert not any(isinstance(e, ConnectionTerminated) for e in core.receive_data(rst(5)))
    # Free a slot; the next request references the refused one's table entry.
    core.reject_stream(1, 503)
    events = core.receive_data(headers_frame(encoder, 7, [*connect(), ("x-n5", "v" * 40)]))
    assert events == [StreamRequest(7, "10.0.0.7:8080", (("x-n5", "v" * 40),))]


# ---- item 4: rapid reset (CVE-2023-44487) --------------------------------------------------


def test_rapid_reset_flood_gets_goaway_enhance_your_calm() -> None:
    core, encoder = server(), hpack.Encoder()
    flood = b"".join(headers_frame(encoder, n, connect()) + rst(n)
                     for n in range(1, 2 * 1000, 2))
    events = core.receive_data(flood)
    assert isinstance(events[-1], ConnectionTerminated)
    assert events[-1].error_code == errors.ENHANCE_YOUR_CALM
    # Bounded: it stopped at the Rust h2 limit, not after a thousand requests.
    limit = HboneSettings().max_pending_accept_reset_streams
    assert len([e for e in events if isinstance(e, StreamRequest)]) == limit + 1
    away = goaways(core)
    assert away and away[0].error_code == errors.ENHANCE_YOUR_CALM


def test_cancellations_the_application_lets_go_of_are_not_a_flood() -> None:
    core, encoder = server(), hpack.Encoder()
    for n in range(1, 2 * 500, 2):
        events = core.receive_data(headers_frame(encoder, n, connect()) + rst(n))
        assert events == [StreamRequest(n, "10.0.0.7:8080", ()), StreamReset(n, errors.CANCEL)]
        core.release_request(n)  # the shell does this once no handler works on it
    assert not goaways(core)


def test_flood_of_bad_requests_gets_goaway_enhance_your_calm() -> None:
    core, encoder = server(), hpack.Encoder()
    get = [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a:1")]
    limit = HboneSettings().max_local_error_resets
    flood = b"".join(headers_frame(encoder, n, get, end_stream=True)
                     for n in range(1, 2 * (limit + 10), 2))
    events = core.receive_data(flood)
    assert isinstance(events[-1], ConnectionTerminated)
    assert events[-1].error_code == errors.ENHANCE_YOUR_CALM


# ---- item 6: CONTINUATION floods bounded by MAX_HEADER_LIST_SIZE ---------------------------


def test_continuation_flood_is_refused_at_the_frame_header() -> None:
    core = server()
    first = HeadersFrame(1)
    first.data = b"\x00" * 16_000  # no END_HEADERS
    assert core.receive_data(first.serialize()) == []
    # Announce a CONTINUATION that takes the block past 16 KiB + slack: refused from
    # its 9-byte header, before any of its body is buffered.
    cont = ContinuationFrame(1)
    cont.data = b"\x00" * 16_000
    events = core.receive_data(cont.serialize()[:9])
    assert only(events, ConnectionTerminated).error_code == errors.ENHANCE_YOUR_CALM
    away = goaways(core)
    assert away and away[0].error_code == errors.ENHANCE_YOUR_CALM


def test_header_list_under_the_limit_split_over_continuations_is_served() -> None:
    core = server()
    block = hpack.Encoder().encode([*connect(), ("x-big", "v" * 12_000)])
    head, rest = block[:1000], block[1000:]
    frame = HeadersFrame(1)
    frame.data = head
    chunks = [rest[i:i + 4000] for i in range(0, len(rest), 4000)]
    data = frame.serialize()
    for i, chunk in enumerate(chunks):
        cont = ContinuationFrame(1)
        cont.data = chunk
        if i == len(chunks) - 1:
            cont.flags.add("END_HEADERS")
        data += cont.serialize()
    events = core.receive_data(data)
    assert [type(e) for e in events] == [StreamRequest]


# ---- SETTINGS and PING floods ----------------------------------------------------------------


def test_ping_flood_while_not_reading_gets_goaway_enhance_your_calm() -> None:
    core = server()
    limit = HboneSettings().max_queued_control_replies
    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    events = core.receive_data(ping * (limit + 1))
    assert isinstance(events[-1], ConnectionTerminated)
    assert events[-1].error_code == errors.ENHANCE_YOUR_CALM


def test_frames_on_a_reset_stream_from_a_peer_not_reading_are_bounded() -> None:
    """h2 answers every DATA frame on a stream we reset with a RST_STREAM: a peer that
    does not read could make us queue one per 9 bytes it sends. Counted with the
    PING/SETTINGS ACKs (Go counts every queued control frame)."""
    core, encoder = server(), hpack.Encoder()
    core.receive_data(headers_frame(encoder, 1, connect()))
    core.reject_stream(1, 503)  # 503 + RST_STREAM NO_ERROR: the client had not ended it
    core.output_drained()
    limit = HboneSettings().max_queued_control_replies
    data = DataFrame(1, data=b"x").serialize()
    events = core.receive_data(data * (limit + 1))
    assert isinstance(events[-1], ConnectionTerminated)
    assert events[-1].error_code == errors.ENHANCE_YOUR_CALM


def test_pings_of_a_peer_that_reads_are_answered() -> None:
    core = server()
    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    for _ in range(30):
        assert core.receive_data(ping * 1000) == []
        acks = [f for f in frames_of(core.data_to_send()) if isinstance(f, PingFrame)]
        assert len(acks) == 1000
        core.output_drained()  # the shell saw its transport buffer empty


def test_settings_flood_while_not_reading_gets_goaway_enhance_your_calm() -> None:
    core = server()
    limit = HboneSettings().max_queued_control_replies
    settings = SettingsFrame(0, settings={SettingsFrame.ENABLE_PUSH: 0}).serialize()
    events = core.receive_data(settings * (limit + 1))
    assert isinstance(events[-1], ConnectionTerminated)
    assert events[-1].error_code == errors.ENHANCE_YOUR_CALM


def test_a_plain_h2_client_still_works_after_the_hardening() -> None:
    core = HboneServerConnection()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    core.receive_data(client.data_to_send())
    client.receive_data(core.data_to_send())
    core.receive_data(client.data_to_send())
    client.send_headers(1, connect())
    assert core.receive_data(client.data_to_send()) == [
        StreamRequest(1, "10.0.0.7:8080", ())]
    core.accept_stream(1)
    events = client.receive_data(core.data_to_send())
    assert any(isinstance(e, h2.events.ResponseReceived) for e in events)


# ---- what the h2spec cases excluded in tests/interop/test_h2spec.py check, on CONNECT -------


def test_window_update_and_priority_on_half_closed_connect_stream() -> None:
    """h2spec generic/2 #2 and #3: WINDOW_UPDATE and PRIORITY on a half-closed (remote)
    stream are accepted and data keeps flowing."""
    core, encoder = server(), hpack.Encoder()
    assert core.receive_data(headers_frame(encoder, 1, connect(), end_stream=True)) == [
        StreamRequest(1, "10.0.0.7:8080", ()), StreamEnded(1)]
    core.accept_stream(1)
    update = WindowUpdateFrame(1, window_increment=1000).serialize()
    priority = PriorityFrame(1, depends_on=0, stream_weight=16).serialize()
    events = core.receive_data(update + priority)
    assert not any(isinstance(e, (ConnectionTerminated, StreamReset)) for e in events)
    assert core.send_data(1, b"payload") == 7
    out = frames_of(core.data_to_send())
    assert [f.data for f in out if isinstance(f, DataFrame)] == [b"payload"]
    assert not [f for f in out if isinstance(f, (GoAwayFrame, RstStreamFrame))]


def test_stream_window_overflow_on_connect_stream_is_a_stream_error() -> None:
    """h2spec http2/6.9.1 #3 (strict): a stream window past 2^31-1 resets that stream
    with FLOW_CONTROL_ERROR; the connection stays."""
    core, encoder = server(), hpack.Encoder()
    core.receive_data(headers_frame(encoder, 1, connect()))
    core.accept_stream(1)
    core.data_to_send()
    update = WindowUpdateFrame(1, window_increment=2**31 - 1).serialize()
    events = core.receive_data(update + update)
    assert StreamReset(1, errors.FLOW_CONTROL_ERROR, remote=False) in events
    out = frames_of(core.data_to_send())
    assert [(f.stream_id, f.error_code) for f in out if isinstance(f, RstStreamFrame)] == [
        (1, errors.FLOW_CONTROL_ERROR)]
    assert not [f for f in out if isinstance(f, GoAwayFrame)]


def test_second_headers_without_end_stream_on_connect_stream_is_rejected() -> None:
    """h2spec http2/8.1 #1: a second HEADERS (trailers) without END_STREAM is a
    PROTOCOL_ERROR."""
    core, encoder = server(), hpack.Encoder()
    core.receive_data(headers_frame(encoder, 1, connect()))
    core.accept_stream(1)
    core.data_to_send()
    events = core.receive_data(headers_frame(encoder, 1, [("x-trailer", "1")]))
    # A stream error (RFC 9113 8.1: trailers must end the stream), not the connection.
    assert events == [StreamReset(1, errors.PROTOCOL_ERROR, remote=False)]
    out = frames_of(core.data_to_send())
    assert [(f.stream_id, f.error_code) for f in out if isinstance(f, RstStreamFrame)] == [
        (1, errors.PROTOCOL_ERROR)]
    assert not [f for f in out if isinstance(f, GoAwayFrame)]
    assert core.receive_data(headers_frame(encoder, 3, connect())) == [
        StreamRequest(3, "10.0.0.7:8080", ())]


def test_header_block_just_under_the_guard_that_decodes_over_the_limit() -> None:
    """A block small enough for the frame guard but decoding past
    MAX_HEADER_LIST_SIZE is refused by the HPACK limit: GOAWAY ENHANCE_YOUR_CALM."""
    core, encoder = server(), hpack.Encoder()
    # One literal then 600 indexed references to it: a short block, a long list.
    names = [(":method", "CONNECT"), (":authority", "10.0.0.7:8080")]
    block = encoder.encode(names + [("x-a", "v" * 27)] * 600)
    assert len(block) < 16 * 1024
    frame = HeadersFrame(1)
    frame.data = block
    frame.flags.add("END_HEADERS")
    events = core.receive_data(frame.serialize())
    assert only(events, ConnectionTerminated).error_code == errors.ENHANCE_YOUR_CALM
