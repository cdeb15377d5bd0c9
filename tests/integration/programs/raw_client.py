"""In-pod client: ``raw_client.py HOST PORT COUNT REQUEST_HEX``.

Makes COUNT connections one after the other; each sends the request,
half-closes and reads to EOF. Prints one JSON list of
``{"port": local port, "received": bytes, "error": str|null}``.
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any


def main() -> None:
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    request = bytes.fromhex(sys.argv[4])
    out = []
    for _ in range(count):
        item: dict[str, Any] = {"port": None, "received": 0, "error": None}
        try:
            with socket.create_connection((host, port), timeout=10) as c:
                item["port"] = c.getsockname()[1]
                c.sendall(request)
                c.shutdown(socket.SHUT_WR)
                while True:
                    data = c.recv(65536)
                    if not data:
                        break
                    item["received"] += len(data)
        except OSError as exc:
            item["error"] = f"{type(exc).__name__}: {exc}"
        out.append(item)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
