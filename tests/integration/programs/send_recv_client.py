"""In-pod TCP client: ``send_recv_client.py HOST PORT MESSAGE [TIMEOUT_S]``.

Connects (TIMEOUT_S, default 10), sends MESSAGE, prints the first reply (up to
1024 bytes) on one line.
"""

from __future__ import annotations

import socket
import sys


def main() -> None:
    host, port, message = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 10.0
    with socket.create_connection((host, port), timeout=timeout) as c:
        c.sendall(message)
        print(c.recv(1024).decode())


if __name__ == "__main__":
    main()
