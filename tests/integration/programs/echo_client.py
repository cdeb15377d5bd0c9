"""In-pod client of ``peer_echo_server.py``: ``echo_client.py HOST PORT PAYLOAD``.

Connects, reads the ``peer`` line, sends PAYLOAD, half-closes, reads the echo.
Always prints one JSON object (``peer``, ``echo_ok``, ``error``) and exits 0.
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any


def main() -> None:
    host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
    out: dict[str, Any] = {"peer": None, "echo_ok": False, "error": None}
    try:
        with socket.create_connection((host, port), timeout=10) as c:
            buf = b""
            while b"\n" not in buf:
                chunk = c.recv(4096)
                if not chunk:
                    raise ConnectionError(f"closed before the peer line (got {buf!r})")
                buf += chunk
            line, rest = buf.split(b"\n", 1)
            out["peer"] = line.decode().removeprefix("peer ")
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            while True:
                chunk = c.recv(65536)
                if not chunk:
                    break
                rest += chunk
            out["echo_ok"] = rest == payload
    except OSError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
