"""The sans-IO HBONE core, driven by raw frames from a plain h2/hyperframe peer.

The "other side" is h2's own H2Connection (with validation switched off where a test
needs to send something invalid) or hand-made hyperframe frames, so these tests check
what goes on the wire, not just what our two halves agree on.
"""

from __future__ import annotations

import random

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.hbone import errors, exceptions
from agent.hbone import events as hbone_events
from agent.hbone import headers as hbone_headers
from agent.hbone.config import HboneSettings
from agent.hbone.connection import HboneClientConnection, HboneConnection, HboneServerConnection
from agent.hbone.events import (
    ConnectionTerminated,
    DataReceived,
    GoingAway,
    PingAcked,
    RequestRefused,
    StreamAccepted,
    StreamEnded,
    StreamRejected,
    StreamRequest,
    StreamReset,
    WindowOpened,
)
from agent.hbone.exceptions import StreamClosedError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


# ---- a small frame factory / raw peer ------------------------------------------------


def parse_frames(data: bytes) -> list[Frame]:
    """Split a byte string into hyperframe frames (skipping a client preface)."""
    if data.startswith(PREFACE):
        data = data[len(PREFACE):]
    frames = []
    view = memoryview(data)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9:9 + length])
        frames.append(frame)
        view = view[9 + length:]
    return frames


def raw_peer(client_side: bool, validate: bool = True) -> h2.connection.H2Connection:
    """A plain h2 endpoint with h2's default settings (65535-byte windows)."""
    config = h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8",
                                       validate_outbound_headers=validate,
                                       validate_inbound_headers=validate)
    conn = h2.connection.H2Connection(config=config)
    conn.initiate_connection()
    return conn


def to_core(peer: h2.connection.H2Connection, core: HboneConnection) -> list:
    return core.receive_data(peer.data_to_send())


def to_peer(core: HboneConnection, peer: h2.connection.H2Connection) -> list:
    return peer.receive_data(core.data_to_send())


def handshake_server() -> tuple[HboneServerConnection, h2.connection.H2Connection]:
    core = HboneServerConnection()
    client = raw_peer(client_side=True)
    to_core(client, core)
    to_peer(core, client)
    to_core(client, core)  # SETTINGS ACK
    return core, client


def handshake_client(**peer_kw: bool) -> tuple[HboneClientConnection,
                                                h2.connection.H2Connection]:
    core = HboneClientConnection()
    server = raw_peer(client_side=False, **peer_kw)
    to_peer(core, server)
    to_core(server, core)
    to_peer(core, server)
    return core, server


def connect_headers(authority: str = "10.0.0.7:8080", method: str = "CONNECT") -> list:
    headers = [(":method", method), (":authority", authority)]
    if method != "CONNECT":
        headers += [(":scheme", "https"), (":path", "/")]
    return headers


def of_type(events: list, kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


# ---- settings and request format ------------------------------------------------------


def test_initial_settings_are_ztunnels() -> None:
    frames = parse_frames(HboneClientConnection().data_to_send())
    settings_frame = next(f for f in frames if isinstance(f, SettingsFrame))
    values = settings_frame.settings
    assert values[SettingsFrame.INITIAL_WINDOW_SIZE] == 4 * 1024 * 1024
    assert values[SettingsFrame.MAX_FRAME_SIZE] == 1024 * 1024
    assert values[SettingsFrame.MAX_CONCURRENT_STREAMS] == 100
    assert values[SettingsFrame.MAX_HEADER_LIST_SIZE] == 16 * 1024
    update = next(f for f in frames if isinstance(f, WindowUpdateFrame))
    assert update.stream_id == 0
    assert update.window_increment + 65535 == 16 * 1024 * 1024


def test_client_sends_connect_with_forwarded_and_baggage() -> None:
    core, server = handshake_client()
    baggage = hbone_headers.format_baggage([("k8s.namespace.name", "default"),
                                    ("k8s.pod.name", "web-1")])
    stream_id = core.open_stream("[fd00::7]:8080", forwarded_for="fd00::1", baggage=baggage)
    events = to_peer(core, server)
    request = of_type(events, h2.events.RequestReceived)[0]
    headers = dict(request.headers)
    assert request.stream_id == stream_id
    assert headers[":method"] == "CONNECT"
    assert headers[":authority"] == "[fd00::7]:8080"
    assert ":scheme" not in headers and ":path" not in headers
    assert headers["forwarded"] == 'for="[fd00::1]"'
    assert headers["baggage"] == "k8s.namespace.name=default,k8s.pod.name=web-1"
    server.send_headers(stream_id, [(":status", "200")])
    assert to_core(server, core) == [StreamAccepted(stream_id)]


@pytest.mark.parametrize("authority", ["exa_mple.com:80", "10.0.0.1", "fd00::1:80",
                                       "10.0.0.1:0", "10.0.0.1:99999", "[10.0.0.1]:80"])
def test_client_refuses_bad_authority(authority: str) -> None:
    core, _ = handshake_client()
    with pytest.raises(ValueError):
        core.open_stream(authority, forwarded_for="10.0.0.1")


def test_header_helpers() -> None:
    assert hbone_headers.parse_authority("[fd00::7]:8080") == ("fd00::7", 8080)
    assert hbone_headers.format_authority("fd00::7", 8080) == "[fd00::7]:8080"
    assert hbone_headers.format_forwarded_for("10.1.2.3") == 'for="10.1.2.3"'
    assert hbone_headers.parse_forwarded_for(
        'for="[fd00::1]";proto=https, for=1.2.3.4') == "fd00::1"
    assert hbone_headers.parse_forwarded_for("for=192.0.2.43:4711") == "192.0.2.43"
    assert hbone_headers.parse_forwarded_for("for=unknown") is None
    assert hbone_headers.parse_baggage("a=1,b=2;prop") == {"a": "1", "b": "2"}
    with pytest.raises(ValueError):
        hbone_headers.format_baggage([("bad key", "v")])


# ---- server-side request validation ---------------------------------------------------


def test_server_surfaces_connect_and_accepts() -> None:
    core, client = handshake_server()
    client.send_headers(1, [*connect_headers(), ("forwarded", 'for="10.1.1.1"')])
    events = to_core(client, core)
    assert events == [StreamRequest(1, "10.0.0.7:8080", (("forwarded", 'for="10.1.1.1"'),))]
    assert events[0].header("Forwarded") == 'for="10.1.1.1"'
    core.accept_stream(1)
    response = of_type(to_peer(core, client), h2.events.ResponseReceived)[0]
    assert dict(response.headers)[":status"] == "200"


def test_server_answers_non_connect_with_400() -> None:
    # ztunnel src/proxy/inbound.rs build_inbound_request: NonConnectMethod -> 400.
    core, client = handshake_server()
    client.send_headers(1, connect_headers(method="GET"))
    events = to_core(client, core)
    assert events == [RequestRefused(1, 400, "method 'GET' is not CONNECT")]
    peer_events = to_peer(core, client)
    response = of_type(peer_events, h2.events.ResponseReceived)[0]
    assert dict(response.headers)[":status"] == "400"
    assert of_type(peer_events, h2.events.StreamEnded)
    # The client had not finished its request: it is told to stop with RST(NO_ERROR).
    assert of_type(peer_events, h2.events.StreamReset)[0].error_code == errors.NO_ERROR
    assert core.open_stream_count == 0


@pytest.mark.parametrize("authority", ["exa_mple.com:80", "10.0.0.1", "10.0.0.1:http",
                                       "fd00::1:80", "10.0.0.1:70000", ":80",
                                       "svc.local:0"])
def test_server_answers_malformed_authority_with_400(authority: str) -> None:
    core, client = handshake_server()
    client.send_headers(1, connect_headers(authority))
    events = to_core(client, core)
    assert [type(e) for e in events] == [RequestRefused]
    assert events[0].status == 400
    response = of_type(to_peer(core, client), h2.events.ResponseReceived)[0]
    assert dict(response.headers)[":status"] == "400"


def test_server_hands_a_hostname_authority_to_the_application() -> None:
    # ztunnel accepts hostname:port (HboneAddress::SvcHostname) and resolves it
    # through a service; the core passes it on, the tunnel decides.
    core, client = handshake_server()
    client.send_headers(1, connect_headers("api.default.svc.cluster.local:80"))
    events = to_core(client, core)
    assert [type(e) for e in events] == [StreamRequest]
    assert hbone_headers.parse_hbone_address("API.default.svc:80") == (
        "api.default.svc", 80, False)


def test_server_missing_authority_is_a_stream_error_not_an_exception() -> None:
    core = HboneServerConnection()
    client = raw_peer(client_side=True, validate=False)
    to_core(client, core)
    to_peer(core, client)
    client.send_headers(1, [(":method", "CONNECT")])
    events = to_core(client, core)
    # A malformed request is a stream error (RFC 9113 8.1.1): RST_STREAM PROTOCOL_ERROR
    # on that stream, and the connection goes on.
    assert [type(e) for e in events] == [RequestRefused]
    assert events[0].error_code == errors.PROTOCOL_ERROR
    frames = parse_frames(core.data_to_send())
    assert not any(isinstance(f, GoAwayFrame) for f in frames)
    assert [(f.stream_id, f.error_code) for f in frames if isinstance(f, RstStreamFrame)] \
        == [(1, errors.PROTOCOL_ERROR)]
    client.send_headers(3, connect_headers())
    assert to_core(client, core) == [StreamRequest(3, "10.0.0.7:8080", ())]


def test_reject_stream_status_reaches_our_client() -> None:
    server, client = HboneServerConnection(), HboneClientConnection()

    def pump() -> tuple[list, list]:
        return server.receive_data(client.data_to_send()), client.receive_data(
            server.data_to_send())

    pump()
    pump()
    stream_id = client.open_stream("10.0.0.1:80", forwarded_for="10.9.9.9")
    server_events, _ = pump()
    assert of_type(server_events, StreamRequest)
    server.reject_stream(stream_id, 403)
    _, client_events = pump()
    assert client_events == [StreamRejected(stream_id, 403)]
    with pytest.raises(StreamClosedError):
        client.send_data(stream_id, b"x")
    pump()
    assert client.open_stream_count == 0 and server.open_stream_count == 0


def test_draining_server_refuses_new_streams() -> None:
    core, client = handshake_server()
    core.start_draining()
    client.send_headers(1, connect_headers())
    assert to_core(client, core) == [RequestRefused(1, 503, "draining", errors.REFUSED_STREAM)]
    reset = of_type(to_peer(core, client), h2.events.StreamReset)[0]
    assert reset.error_code == errors.REFUSED_STREAM


# ---- hostile input ------------------------------------------------------------------------


@given(st.binary(min_size=1, max_size=512))
@settings(max_examples=200, deadline=None)
def test_garbage_never_raises(garbage: bytes) -> None:
    for core in (HboneServerConnection(), HboneClientConnection()):
        events = core.receive_data(garbage)
        for event in events:
            assert isinstance(event, hbone_events.HboneEvent)
        core.data_to_send()


def test_garbage_after_preface_yields_goaway() -> None:
    core, _ = handshake_server()
    events = core.receive_data(b"\x00\x00\x08\x07\x00\x00\x00\x00\x01" + b"\xff" * 40)
    assert [type(e) for e in events] == [ConnectionTerminated]
    goaway = [f for f in parse_frames(core.data_to_send()) if isinstance(f, GoAwayFrame)]
    assert goaway and goaway[0].error_code != errors.NO_ERROR


def test_oversized_frame_refused_at_its_header() -> None:
    core, _ = handshake_server()
    # A DATA frame header announcing 8 MiB; only the header is sent.
    header = (8 * 1024 * 1024).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"
    events = core.receive_data(header)
    assert isinstance(events[0], ConnectionTerminated), events
    assert events[0].error_code == errors.FRAME_SIZE_ERROR
    goaway = [f for f in parse_frames(core.data_to_send()) if isinstance(f, GoAwayFrame)]
    assert goaway[0].error_code == errors.FRAME_SIZE_ERROR


def test_oversized_header_block_terminates_connection() -> None:
    core, client = handshake_server()
    client.send_headers(1, [*connect_headers(), ("x-big", "v" * (20 * 1024))])
    events = to_core(client, core)
    assert [type(e) for e in events] == [ConnectionTerminated]
    assert not of_type(events, StreamRequest)
    assert any(isinstance(f, GoAwayFrame) for f in parse_frames(core.data_to_send()))


def test_data_on_unknown_stream_is_handled() -> None:
    core, _ = handshake_server()
    frame = DataFrame(7)
    frame.data = b"hello"
    events = core.receive_data(frame.serialize())
    # Data on an idle stream is a connection error; it must come out as an event.
    assert all(isinstance(e, ConnectionTerminated) for e in events)


# ---- data, half-close, reset ------------------------------------------------------------


def test_data_both_ways_and_half_close() -> None:
    core, client = handshake_server()
    client.send_headers(1, connect_headers())
    to_core(client, core)
    core.accept_stream(1)
    to_peer(core, client)
    client.send_data(1, b"ping", end_stream=True)
    assert to_core(client, core) == [DataReceived(1, b"ping"), StreamEnded(1)]
    assert core.send_data(1, b"pong") == 4
    core.end_stream(1)
    events = to_peer(core, client)
    assert of_type(events, h2.events.DataReceived)[0].data == b"pong"
    assert of_type(events, h2.events.StreamEnded)
    assert core.open_stream_count == 0
    with pytest.raises(StreamClosedError):
        core.send_data(1, b"late")


def test_reset_mid_transfer() -> None:
    core, client = handshake_server()
    client.send_headers(1, connect_headers())
    to_core(client, core)
    core.accept_stream(1)
    to_peer(core, client)
    client.send_data(1, b"a" * 1000)
    client.reset_stream(1, error_code=errors.CONNECT_ERROR)
    events = to_core(client, core)
    assert events == [DataReceived(1, b"a" * 1000), StreamReset(1, errors.CONNECT_ERROR)]
    assert core.writable(1) == 0
    with pytest.raises(StreamClosedError):
        core.send_data(1, b"x")
    core.reset_stream(1)  # resetting a dead stream is a no-op, not an error
    core.acknowledge_received(1, 1000)  # late ack after reset is harmless


def test_send_respects_peer_window_and_frame_size() -> None:
    core, server = handshake_client()  # raw h2 server: 65535-byte windows, 16 KiB frames
    stream_id = core.open_stream("10.0.0.1:80", forwarded_for="10.0.0.2")
    to_peer(core, server)
    server.send_headers(stream_id, [(":status", "200")])
    to_core(server, core)
    assert core.writable(stream_id) == 65535
    assert core.send_data(stream_id, b"z" * 100_000) == 65535
    assert core.send_data(stream_id, b"z" * 10) == 0  # window exhausted: nothing queued
    wire = core.data_to_send()
    frames = [f for f in parse_frames(wire) if isinstance(f, DataFrame)]
    assert sum(len(f.data) for f in frames) == 65535
    assert max(len(f.data) for f in frames) <= 16384
    server.receive_data(wire)
    # The peer consumes and acknowledges: the window reopens and we are told.
    server.acknowledge_received_data(65535, stream_id)
    events = to_core(server, core)
    assert WindowOpened(stream_id) in events and WindowOpened(None) in events
    assert core.writable(stream_id) > 0


def test_receiver_that_never_acks_stops_the_sender() -> None:
    # Our server core receives; the application never calls acknowledge_received.
    core, client = handshake_server()
    client.send_headers(1, connect_headers())
    to_core(client, core)
    core.accept_stream(1)
    to_peer(core, client)
    sent = 0
    for _ in range(200):  # bounded: 200 * 64 KiB is well past a 4 MiB window
        room = client.local_flow_control_window(1)
        if room == 0:
            break
        chunk = min(room, 65536, client.max_outbound_frame_size)
        client.send_data(1, b"d" * chunk)
        sent += chunk
        to_core(client, core)
        to_peer(core, client)
    assert sent == 4 * 1024 * 1024
    assert client.local_flow_control_window(1) == 0
    assert not any(isinstance(f, WindowUpdateFrame) for f in parse_frames(
        core.data_to_send()))
    core.acknowledge_received(1, sent)
    to_peer(core, client)
    assert client.local_flow_control_window(1) > 0


def test_sender_stops_when_our_peer_never_acks() -> None:
    server, client = HboneServerConnection(), HboneClientConnection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    stream_id = client.open_stream("10.0.0.1:80", forwarded_for="10.9.9.9")
    server.receive_data(client.data_to_send())
    server.accept_stream(stream_id)
    client.receive_data(server.data_to_send())
    total = 0
    for _ in range(100):
        accepted = client.send_data(stream_id, b"q" * (1024 * 1024))
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
        if accepted == 0:
            break
        total += accepted
    assert total == 4 * 1024 * 1024
    assert client.writable(stream_id) == 0


# ---- connection control -------------------------------------------------------------------


def test_ping_round_trip() -> None:
    core, server = handshake_client()
    payload = core.ping()
    assert core.outstanding_pings == 1
    to_peer(core, server)  # raw h2 auto-acks PINGs
    assert to_core(server, core) == [PingAcked(payload)]
    assert core.outstanding_pings == 0


def test_graceful_goaway_keeps_older_streams() -> None:
    core, server = handshake_client()
    first = core.open_stream("10.0.0.1:80", forwarded_for="10.0.0.2")
    second = core.open_stream("10.0.0.1:81", forwarded_for="10.0.0.2")
    to_peer(core, server)
    server.send_headers(first, [(":status", "200")])
    to_core(server, core)
    # A raw GOAWAY(NO_ERROR, last_stream_id=first), then more data on the first stream.
    goaway = GoAwayFrame(0)
    goaway.last_stream_id = first
    goaway.error_code = errors.NO_ERROR
    data = DataFrame(first)
    data.data = b"still here"
    events = core.receive_data(goaway.serialize() + data.serialize())
    assert StreamReset(second, errors.REFUSED_STREAM) in events
    assert GoingAway(first) in events
    assert DataReceived(first, b"still here") in events
    assert not core.is_usable
    with pytest.raises(exceptions.ConnectionClosedError):
        core.open_stream("10.0.0.1:82")
    assert core.send_data(first, b"reply") == 5


def test_error_goaway_terminates_everything() -> None:
    core, server = handshake_client()
    stream_id = core.open_stream("10.0.0.1:80", forwarded_for="10.0.0.2")
    to_peer(core, server)
    server.close_connection(error_code=errors.INTERNAL_ERROR, last_stream_id=stream_id)
    events = to_core(server, core)
    assert StreamReset(stream_id, errors.INTERNAL_ERROR) in events
    assert isinstance(events[-1], ConnectionTerminated)
    assert events[-1].error_code == errors.INTERNAL_ERROR and not events[-1].local


def test_concurrency_limit_from_peer_settings() -> None:
    server = HboneServerConnection(HboneSettings(max_concurrent_streams=2))
    client = HboneClientConnection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    assert client.available_stream_slots() == 2
    client.open_stream("10.0.0.1:80")
    client.open_stream("10.0.0.1:81")
    assert client.available_stream_slots() == 0
    with pytest.raises(exceptions.HboneError):
        client.open_stream("10.0.0.1:82")


def test_close_sends_goaway() -> None:
    core, server = handshake_client()
    core.close(reason="bye")
    events = to_peer(core, server)
    assert of_type(events, h2.events.ConnectionTerminated)
    assert core.terminated is not None and not core.is_usable
    core.close()  # idempotent


# ---- random chunking and interleaving ------------------------------------------------------


def _reference_stream_bytes(n_streams: int, sizes: list[int]) -> dict[int, bytes]:
    return {2 * i + 1: bytes([65 + i]) * sizes[i] for i in range(n_streams)}


@given(
    n_streams=st.integers(min_value=1, max_value=4),
    sizes=st.lists(st.integers(min_value=0, max_value=40_000), min_size=4, max_size=4),
    cuts=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=60),
    order=st.randoms(use_true_random=False),
)
@settings(max_examples=60, deadline=None)
def test_events_independent_of_chunking_and_interleaving(
        n_streams: int, sizes: list[int], cuts: list[int], order: random.Random) -> None:
    """Any split of the client's bytes, any interleaving of its streams' writes:
    the server sees each stream's exact bytes, once, followed by its END_STREAM."""
    client, server = HboneClientConnection(), HboneServerConnection()
    wire = bytearray(client.data_to_send())
    client.receive_data(server.data_to_send())
    expected = _reference_stream_bytes(n_streams, sizes)
    for stream_id in expected:
        assert client.open_stream(f"10.0.0.{stream_id}:80") == stream_id
    # Write each stream in 1000-byte pieces, interleaved in a random order.
    pieces = [(sid, data[i:i + 1000]) for sid, data in expected.items()
              for i in range(0, len(data), 1000)]
    order.shuffle(pieces)
    # The shuffle decides which stream writes next; within a stream the pieces keep
    # their order (a TCP byte stream is ordered).
    per_stream = {sid: [expected[sid][i:i + 1000]
                        for i in range(0, len(expected[sid]), 1000)] for sid in expected}
    schedule = [sid for sid, _ in pieces]
    cursors = dict.fromkeys(expected, 0)
    for sid in schedule:
        piece = per_stream[sid][cursors[sid]]
        cursors[sid] += 1
        assert client.send_data(sid, piece) == len(piece)  # within initial windows
    for sid in expected:
        client.end_stream(sid)
    wire += client.data_to_send()

    received: dict[int, bytearray] = {}
    ended: list[int] = []
    offset, cut_index = 0, 0
    while offset < len(wire):
        size = cuts[cut_index % len(cuts)]
        cut_index += 1
        for event in server.receive_data(bytes(wire[offset:offset + size])):
            assert not isinstance(event, ConnectionTerminated), event
            if isinstance(event, StreamRequest):
                received[event.stream_id] = bytearray()
            elif isinstance(event, DataReceived):
                assert event.stream_id not in ended
                received[event.stream_id] += event.data
            elif isinstance(event, StreamEnded):
                ended.append(event.stream_id)
        offset += size
    assert {k: bytes(v) for k, v in received.items()} == expected
    assert sorted(ended) == sorted(expected)


def test_raw_headers_frame_factory_round_trip() -> None:
    """A hand-built HEADERS frame (HPACK by h2's encoder) is accepted like h2's own."""
    core, client = handshake_server()
    block = client.encoder.encode(connect_headers("192.0.2.1:443"))
    frame = HeadersFrame(1)
    frame.data = block
    frame.flags.add("END_HEADERS")
    events = core.receive_data(frame.serialize())
    assert events == [StreamRequest(1, "192.0.2.1:443", ())]
    rst = RstStreamFrame(1)
    rst.error_code = errors.CANCEL
    assert core.receive_data(rst.serialize()) == [StreamReset(1, errors.CANCEL)]
