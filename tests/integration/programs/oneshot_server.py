"""In-pod server for one connection: ``oneshot_server.py PORT REPLY_PREFIX TIMEOUT_S``.

Listens on 0.0.0.0:PORT, prints ``ready``, accepts one connection (within
TIMEOUT_S), answers REPLY_PREFIX followed by what the client sent (up to 64
bytes), then exits.
"""

from __future__ import annotations

import socket
import sys


def main() -> None:
    port, prefix, timeout = int(sys.argv[1]), sys.argv[2].encode(), float(sys.argv[3])
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(8)
    s.settimeout(timeout)
    print("ready", flush=True)
    c, _ = s.accept()
    c.settimeout(5)
    c.sendall(prefix + c.recv(64))
    c.close()
    s.close()


if __name__ == "__main__":
    main()
