"""HTTP/2 settings an HBONE connection advertises, and its flood limits."""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class HboneSettings:
    """HTTP/2 tuning; the defaults are ztunnel's."""

    initial_stream_window: int = 4 * MIB
    connection_window: int = 16 * MIB
    max_frame_size: int = 1 * MIB
    max_concurrent_streams: int = 100
    # Largest request/response header list we accept (RFC 9113 SETTINGS_MAX_HEADER_LIST_SIZE).
    max_header_list_size: int = 16 * KIB

    # ---- flood bounds (each exceeded -> GOAWAY ENHANCE_YOUR_CALM) ----
    # Requests the peer reset before we answered them and that the application has not
    # yet let go of (rapid reset, CVE-2023-44487). The Rust h2 crate ztunnel serves
    # HBONE with: max_pending_accept_reset_streams, DEFAULT_REMOTE_RESET_STREAM_MAX = 20
    # (src/proto/mod.rs, src/proto/streams/recv.rs "too_many_resets").
    max_pending_accept_reset_streams: int = 20
    # Streams we reset ourselves because of the peer's bad input (bad requests answered
    # by the core, streams over MAX_CONCURRENT_STREAMS refused), per connection. Rust h2:
    # max_local_error_reset_streams, DEFAULT_LOCAL_RESET_COUNT_MAX = 1024
    # ("too_many_internal_resets", src/proto/streams/streams.rs).
    max_local_error_resets: int = 1024
    # Control frames (PING/SETTINGS ACKs, RST_STREAMs) we queued while the peer was not
    # reading what we send (our output never drained in between). Go's x/net/http2
    # server: maxQueuedControlFrames = 10000 (server.go, "too many queued control
    # frames").
    max_queued_control_replies: int = 10_000
