"""Synchronous client of the agent API, used by the CLI and the CNI plugin.

Requests and responses follow :mod:`agent.contracts.api`; an error answer
raises :class:`AgentError` carrying the agent's :class:`ErrorCode`, which
callers switch on (the message is for people).
"""

from __future__ import annotations

import json
import socket
from typing import Any

from agent.contracts import ContractError, UnsupportedVersion
from agent.contracts.api import ErrorCode, Response


class AgentUnavailable(RuntimeError):
    """The agent's socket is missing or refuses connections, or it did not answer."""


class AgentError(RuntimeError):
    """The agent refused the request: ``code`` says why, the message is the agent's."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.UNKNOWN) -> None:
        super().__init__(message)
        self.code = code


def call(socket_path: str, request: dict[str, Any], timeout: float = 30.0) -> Any:
    """Send one request and return its result, or raise AgentError/AgentUnavailable.

    An answer of a newer API version than this client knows raises
    AgentError with :attr:`ErrorCode.UNSUPPORTED_VERSION` (retrying cannot help).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(socket_path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise AgentUnavailable(
                f"the agent is not running (no listener on {socket_path}): start it with "
                "'meshagent run' or 'systemctl start meshagent'") from exc
        except PermissionError as exc:
            raise AgentUnavailable(f"permission denied on {socket_path}: run as root") from exc
        sock.sendall(json.dumps(request).encode() + b"\n")
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except TimeoutError as exc:
        raise AgentUnavailable(f"the agent did not answer within {timeout:.0f}s") from exc
    finally:
        sock.close()
    try:
        raw = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise AgentUnavailable(f"the agent sent an invalid response: {exc}") from exc
    try:
        response = Response.from_json(raw, source=f"the answer of the agent on {socket_path}")
    except UnsupportedVersion as exc:
        raise AgentError(str(exc), ErrorCode.UNSUPPORTED_VERSION) from exc
    except ContractError as exc:
        raise AgentUnavailable(f"the agent sent an invalid response: {exc}") from exc
    if not response.ok:
        raise AgentError(response.error or "unknown error", response.code or ErrorCode.UNKNOWN)
    return response.result
