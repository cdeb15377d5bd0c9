"""In-pod echo server of the lab suite: ``lab_echo_server.py NAME PORT COUNT``.

Both families on PORT. Prints ``ready``, then answers each connection with
``NAME:<peer ip>:<data>`` until it has served COUNT connections or 30 s passed.
"""

from __future__ import annotations

import select
import socket
import sys
import time


def main() -> None:
    name, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    socks = []
    for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port))
        s.listen(16)
        socks.append(s)
    print("ready", flush=True)
    deadline = time.monotonic() + 30
    served = 0
    while served < count and time.monotonic() < deadline:
        readable, _, _ = select.select(socks, [], [], 0.5)
        for s in readable:
            c, peer = s.accept()
            c.settimeout(5)
            data = c.recv(1024).decode()
            c.sendall(f"{name}:{peer[0]}:{data}".encode())
            c.close()
            served += 1


if __name__ == "__main__":
    main()
