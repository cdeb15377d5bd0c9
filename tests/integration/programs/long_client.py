"""In-pod client: one long-lived echo exchange. ``long_client.py HOST PORT LIMIT_S``.

Prints ``connected`` after the first round trip, then keeps exchanging until
the connection ends and prints how: ``closed`` (EOF), ``reset: ...`` (error)
or ``timeout`` (still alive after LIMIT_S seconds).
"""

from __future__ import annotations

import socket
import sys
import time


def main() -> None:
    host, port, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    c = socket.create_connection((host, port), timeout=5)
    c.sendall(b"ping\n")
    if c.recv(64) != b"ping\n":
        print("bad echo", flush=True)
        sys.exit(1)
    print("connected", flush=True)
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            c.sendall(b"ping\n")
            if not c.recv(64):
                print("closed", flush=True)
                sys.exit(0)
            time.sleep(0.1)
    except OSError as exc:
        print(f"reset: {type(exc).__name__}: {exc}", flush=True)
        sys.exit(0)
    print("timeout", flush=True)


if __name__ == "__main__":
    main()
