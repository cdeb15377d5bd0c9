"""In-pod client of the half-close test.

Usage: ``half_close_client.py HOST PORT SIZE REPLY_BYTES``

Sends SIZE bytes, shuts down its sending side, reads the reply to EOF and
prints one JSON object: local address, the server's head line, the sha256 of
what was sent, the total received and whether the pattern after the head line
arrived intact.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys


def main() -> None:
    host, port, size, reply_bytes = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:5])
    payload = hashlib.shake_256(b"meshagent half-close").digest(size)
    with socket.create_connection((host, port), timeout=20) as c:
        local = c.getsockname()
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = c.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    data = b"".join(chunks)
    head, _, rest = data.partition(b"\n")
    print(json.dumps({"local_ip": local[0], "local_port": local[1], "head": head.decode(),
                      "sha": hashlib.sha256(payload).hexdigest(), "total": len(data),
                      "reply_ok": rest == bytes(i % 251 for i in range(reply_bytes))}))


if __name__ == "__main__":
    main()
