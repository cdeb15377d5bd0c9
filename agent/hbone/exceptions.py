"""Every exception the HBONE package raises.

:class:`HboneError` and its subclasses are misuse of the sans-IO core;
:class:`HboneStreamError` and its subclasses are what the asyncio shell raises to the
application when a stream or its connection fails (they are ``ConnectionError``\\ s).
"""

from __future__ import annotations


class HboneError(Exception):
    """Misuse of the HBONE connection (bad arguments, closed stream or connection)."""


class StreamClosedError(HboneError):
    """The stream is reset, unknown, or already half-closed in the direction used."""


class ConnectionClosedError(HboneError):
    """The connection is terminated or going away; open a new one."""


class UnsupportedH2Version(RuntimeError):
    """The installed h2/hyperframe/hpack is not a version :mod:`agent.hbone.compat`
    was tested with; install the versions pinned in pyproject.toml."""


class HboneStreamError(ConnectionError):
    """An HBONE stream failed; subclasses say how."""


class HboneStreamReset(HboneStreamError):
    """The stream was reset (RST_STREAM) by the peer or by us."""

    def __init__(self, error_code: int, message: str = "") -> None:
        super().__init__(message or f"HBONE stream reset (error code {error_code})")
        self.error_code = error_code


class HboneConnectionLost(HboneStreamError):
    """The HBONE connection carrying the stream is gone."""


class HboneRejected(HboneStreamError):
    """The peer answered CONNECT with a non-200 status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HBONE CONNECT rejected with HTTP status {status}")
        self.status = status


class HbonePeerIdentityError(HboneStreamError):
    """The peer's certificate does not carry the SPIFFE identity we require."""
