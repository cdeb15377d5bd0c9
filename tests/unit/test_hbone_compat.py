"""One test per patch in agent/hbone/compat.py, against the pinned h2/hyperframe/hpack.

If one of these fails after an upgrade, the patch no longer does what HBONE needs:
re-read the patched h2 code before adding the new version to compat.TESTED.
"""

from __future__ import annotations

import h2
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import hyperframe
import hyperframe.frame
import pytest

from agent.hbone import compat
from agent.hbone.exceptions import UnsupportedH2Version


def _pair() -> tuple[compat.H2Connection, h2.connection.H2Connection]:
    server = compat.H2Connection(config=h2.config.H2Configuration(client_side=False))
    client = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    server.initiate_connection()
    client.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return server, client


def test_installed_versions_are_the_tested_ones() -> None:
    compat.check_versions()  # what import did; the pins in pyproject.toml match
    assert h2.__version__ in compat.TESTED["h2"]
    assert hyperframe.__version__ in compat.TESTED["hyperframe"]
    assert hpack.__version__ in compat.TESTED["hpack"]


def test_untested_version_is_a_clear_error() -> None:
    with pytest.raises(UnsupportedH2Version, match=r"h2 9\.9\.9 is not a version.*pinned"):
        compat.check_versions({"h2": "9.9.9", "hyperframe": hyperframe.__version__,
                               "hpack": hpack.__version__})


def test_missing_internal_is_a_clear_error() -> None:
    class Bare:
        pass

    with pytest.raises(UnsupportedH2Version, match="has no '_receive_goaway_frame'"):
        compat._require(Bare, "_receive_goaway_frame")


def test_patch_data_frame_repr_names_the_size_only() -> None:
    """Patch 1: h2 reprs every received frame; the repr must not copy or hex the payload."""
    frame = hyperframe.frame.DataFrame(1, data=b"\xab" * 100_000)
    text = repr(frame)
    assert "100000 bytes" in text
    assert "abab" not in text


def test_patch_graceful_goaway_keeps_streams_running() -> None:
    """Patch 2: NO_ERROR GOAWAY is reported, and streams below last_stream_id go on."""
    server, _ = _pair()
    # Here the compat connection is the one *receiving* GOAWAY: make it the client.
    ours = compat.H2Connection(config=h2.config.H2Configuration(client_side=True))
    peer = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=False))
    ours.initiate_connection()
    peer.initiate_connection()
    peer.receive_data(ours.data_to_send())
    ours.receive_data(peer.data_to_send())
    peer.receive_data(ours.data_to_send())
    ours.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    peer.receive_data(ours.data_to_send())
    peer.send_headers(1, [(":status", "200")])
    # h2 itself cannot send after its own GOAWAY; nghttp2/ztunnel do: hand-make frames.
    goaway = hyperframe.frame.GoAwayFrame(0, error_code=0, last_stream_id=1)
    data = hyperframe.frame.DataFrame(1, data=b"after goaway")
    events = ours.receive_data(peer.data_to_send() + goaway.serialize() + data.serialize())
    terminated = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert terminated and terminated[0].last_stream_id == 1
    assert any(isinstance(e, h2.events.DataReceived) and e.data == b"after goaway"
               for e in events)
    ours.send_data(1, b"still writable")  # the state machine is not closed
    # An error GOAWAY is still fatal, as in h2.
    server.receive_data(
        hyperframe.frame.GoAwayFrame(0, error_code=1, last_stream_id=0).serialize())
    with pytest.raises(h2.exceptions.ProtocolError):
        server.send_headers(2, [(":status", "200")])


def test_patch_local_limits_are_enforced_from_the_first_settings() -> None:
    """Patch 3: the header-list and frame-size limits we advertise are in force."""
    server, client = _pair()
    compat.apply_local_limits(server, max_frame_size=1 << 20, max_header_list_size=1024)
    assert server.max_inbound_frame_size == 1 << 20
    client.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80"),
                            ("x-big", "v" * 2048)])
    with pytest.raises(h2.exceptions.ProtocolError):
        server.receive_data(client.data_to_send())


def test_unpatched_connection_window_is_replenished_in_full() -> None:
    """No patch needed (was one before h2 4.x): once we raise the connection window,
    h2 returns acknowledged bytes up to it. If this fails, restore such a patch."""
    server, client = _pair()
    big = 16 * 1024 * 1024
    server.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: big})
    server.increment_flow_control_window(big - 65535)
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())  # SETTINGS ACK
    client.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    chunk = b"x" * 16384
    for _ in range(9 * 64):  # 9 MiB: past half the 16 MiB target
        client.send_data(1, chunk)
    events = server.receive_data(client.data_to_send())
    for event in events:
        if isinstance(event, h2.events.DataReceived):
            server.acknowledge_received_data(event.flow_controlled_length, 1)
    frames = server.data_to_send()
    # Were h2's target to stay 64 KiB, below the 16 MiB window, it would never return
    # connection window and the connection would stall after 16 MiB.
    updates = [f for f in _frames(frames)
               if isinstance(f, hyperframe.frame.WindowUpdateFrame) and f.stream_id == 0]
    assert updates, "no connection-level WINDOW_UPDATE: the window would leak"


def _frames(data: bytes) -> list[hyperframe.frame.Frame]:
    out = []
    view = memoryview(data)
    while len(view) >= 9:
        frame, length = hyperframe.frame.Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9:9 + length])
        out.append(frame)
        view = view[9 + length:]
    return out


def _raw_server(max_streams: int | None = None) -> compat.H2Connection:
    config = h2.config.H2Configuration(client_side=False)
    server = compat.H2Connection(config=config)
    if max_streams is not None:
        server.local_settings = h2.settings.Settings(
            client=False, initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams})
    server.initiate_connection()
    server.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                        + hyperframe.frame.SettingsFrame(0).serialize())
    server.data_to_send()
    return server


def _headers(encoder: hpack.Encoder, stream_id: int, headers: list[tuple[str, str]]) -> bytes:
    frame = hyperframe.frame.HeadersFrame(stream_id)
    frame.data = encoder.encode(headers)
    frame.flags.add("END_HEADERS")
    return frame.serialize()


CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]


def test_patch_refused_stream_over_the_limit_keeps_the_connection() -> None:
    """Patch 3: the stream one over MAX_CONCURRENT_STREAMS gets RST_STREAM
    REFUSED_STREAM, its header block is still decoded, and later frames on it are
    ignored (h2 alone raises TooManyStreamsError: a connection error)."""
    server, encoder = _raw_server(max_streams=1), hpack.Encoder()
    events = server.receive_data(
        _headers(encoder, 1, CONNECT)
        + _headers(encoder, 3, [*CONNECT, ("x-indexed", "kept in the dynamic table")]))
    assert [type(e) for e in events] == [h2.events.RequestReceived, compat.StreamRefused]
    resets = [f for f in _frames(server.data_to_send())
              if isinstance(f, hyperframe.frame.RstStreamFrame)]
    assert [(f.stream_id, f.error_code) for f in resets] == [(3, 7)]
    late = hyperframe.frame.DataFrame(3, data=b"late")  # sent before it saw the reset
    assert not [e for e in server.receive_data(late.serialize())
                if isinstance(e, h2.events.ConnectionTerminated)]
    server.reset_stream(1)
    events = server.receive_data(
        _headers(encoder, 5, [*CONNECT, ("x-indexed", "kept in the dynamic table")]))
    request = next(e for e in events if isinstance(e, h2.events.RequestReceived))
    assert (b"x-indexed", b"kept in the dynamic table") in request.headers


def test_patch_malformed_request_is_a_stream_error() -> None:
    """Patch 5: a malformed request resets its stream PROTOCOL_ERROR; h2 alone sends
    GOAWAY."""
    server, encoder = _raw_server(), hpack.Encoder()
    events = server.receive_data(_headers(encoder, 1, [*CONNECT, ("connection", "close")]))
    assert [type(e) for e in events] == [compat.StreamMalformed]
    frames = _frames(server.data_to_send())
    assert not [f for f in frames if isinstance(f, hyperframe.frame.GoAwayFrame)]
    assert [(f.stream_id, f.error_code) for f in frames
            if isinstance(f, hyperframe.frame.RstStreamFrame)] == [(1, 1)]
    assert [type(e) for e in server.receive_data(_headers(encoder, 3, CONNECT))] == [
        h2.events.RequestReceived]


def test_patch_queued_control_frames_are_counted() -> None:
    """Patch 6: every PING/SETTINGS ACK and RST_STREAM h2 queues is counted; DATA,
    HEADERS and WINDOW_UPDATE are not."""
    server, encoder = _raw_server(), hpack.Encoder()
    before = server.control_frames_queued
    ping = hyperframe.frame.PingFrame(0, opaque_data=b"12345678").serialize()
    settings = hyperframe.frame.SettingsFrame(0).serialize()
    server.receive_data(ping * 3 + settings * 2)
    assert server.control_frames_queued - before == 5
    server.receive_data(_headers(encoder, 1, CONNECT))
    server.send_headers(1, [(":status", "200")])
    server.send_data(1, b"payload")
    server.increment_flow_control_window(1000)
    assert server.control_frames_queued - before == 5
    server.reset_stream(1)
    server.receive_data(hyperframe.frame.DataFrame(1, data=b"late").serialize() * 4)
    assert server.control_frames_queued - before == 5 + 1 + 4


def test_patch_trailers_without_end_stream_are_a_stream_error() -> None:
    """Patch 5, second half: a client's second HEADERS without END_STREAM resets that
    stream PROTOCOL_ERROR (h2 alone: GOAWAY); HPACK stays in sync."""
    server, encoder = _raw_server(), hpack.Encoder()
    server.receive_data(_headers(encoder, 1, CONNECT))
    server.send_headers(1, [(":status", "200")])
    server.data_to_send()
    events = server.receive_data(_headers(encoder, 1, [("x-trailer", "indexed")]))
    assert [type(e) for e in events] == [compat.StreamMalformed]
    frames = _frames(server.data_to_send())
    assert [(f.stream_id, f.error_code) for f in frames
            if isinstance(f, hyperframe.frame.RstStreamFrame)] == [(1, 1)]
    events = server.receive_data(_headers(encoder, 3, [*CONNECT, ("x-trailer", "indexed")]))
    request = next(e for e in events if isinstance(e, h2.events.RequestReceived))
    assert (b"x-trailer", b"indexed") in request.headers
