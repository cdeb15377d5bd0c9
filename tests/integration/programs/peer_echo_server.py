"""In-pod echo server that first tells the client who it sees.

Usage: ``peer_echo_server.py PORT``

On each connection (both families on PORT) it sends ``peer <getpeername() ip>\\n``,
then echoes everything until the client half-closes. Prints ``ready`` once
listening; exits by itself after 10 minutes (orphan guard).
"""

from __future__ import annotations

import select
import socket
import sys
import threading
import time


def serve(c: socket.socket) -> None:
    try:
        c.settimeout(20)
        c.sendall(f"peer {c.getpeername()[0]}\n".encode())
        while True:
            data = c.recv(65536)
            if not data:
                break
            c.sendall(data)
    except OSError:
        pass
    finally:
        c.close()


def main() -> None:
    port = int(sys.argv[1])
    socks = []
    for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port))
        s.listen(64)
        socks.append(s)
    print("ready", flush=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        for s in select.select(socks, [], [], 0.5)[0]:
            c, _ = s.accept()
            threading.Thread(target=serve, args=(c,), daemon=True).start()


if __name__ == "__main__":
    main()
