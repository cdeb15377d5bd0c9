"""Synchronous client of the agent API, used by the CLI and the CNI plugin."""

from __future__ import annotations

import json
import socket
from typing import Any


class AgentUnavailable(RuntimeError):
    """The agent's socket is missing or refuses connections."""


class AgentError(RuntimeError):
    """The agent refused the request; the message is the agent's."""


def call(socket_path: str, request: dict[str, Any], timeout: float = 30.0) -> Any:
    """Send one request and return its result, or raise AgentError/AgentUnavailable."""
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
        response = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise AgentUnavailable(f"the agent sent an invalid response: {exc}") from exc
    if not response.get("ok"):
        raise AgentError(response.get("error", "unknown error"))
    return response.get("result")
