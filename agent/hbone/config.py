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
