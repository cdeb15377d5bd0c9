"""In-pod server of the datapath suite: HTTP, half-close and UDP echo, both families.

Usage: ``datapath_server.py NAME HTTP_PORT HALF_PORT UDP_PORT REPLY_BYTES``

* HTTP_PORT: replies ``server=NAME peer=<ip> port=<port>`` to any request;
* HALF_PORT: reads to EOF, then sends ``<bytes> <sha256> <peer ip>\\n`` followed
  by REPLY_BYTES bytes of a fixed pattern (the half-close test);
* UDP_PORT: echoes ``<peer ip> <peer port> <data>``.

Prints ``ready`` once every socket listens; runs until killed.
"""

from __future__ import annotations

import hashlib
import socket
import sys
import threading
from collections.abc import Callable

Peer = tuple[str, int]
Handler = Callable[[socket.socket, Peer], None]


def listen(kind: int, port: int) -> list[socket.socket]:
    out = []
    for fam, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(fam, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        if kind == socket.SOCK_STREAM:
            s.listen(64)
        out.append(s)
    return out


def main() -> None:
    name, http_port, half_port, udp_port, reply_bytes = sys.argv[1], *map(int, sys.argv[2:6])
    pattern = bytes(i % 251 for i in range(reply_bytes))

    def http(c: socket.socket, peer: Peer) -> None:
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 65536:
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
        body = f"server={name} peer={peer[0]} port={peer[1]}\n".encode()
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def half(c: socket.socket, peer: Peer) -> None:
        digest, n = hashlib.sha256(), 0
        while True:
            chunk = c.recv(65536)
            if not chunk:
                break
            digest.update(chunk)
            n += len(chunk)
        c.sendall(f"{n} {digest.hexdigest()} {peer[0]}\n".encode() + pattern)

    def conn(c: socket.socket, peer: Peer, fn: Handler) -> None:
        try:
            c.settimeout(30)
            fn(c, peer)
        except OSError as exc:
            print(f"{fn.__name__} {peer}: {exc}", file=sys.stderr, flush=True)
        finally:
            c.close()

    def accept(lsock: socket.socket, fn: Handler) -> None:
        while True:
            c, peer = lsock.accept()
            threading.Thread(target=conn, args=(c, peer, fn), daemon=True).start()

    def udp(s: socket.socket) -> None:
        while True:
            data, peer = s.recvfrom(2048)
            s.sendto(f"{peer[0]} {peer[1]} ".encode() + data, peer)

    handlers: tuple[tuple[int, Handler], ...] = ((http_port, http), (half_port, half))
    threads = [threading.Thread(target=accept, args=(s, fn), daemon=True)
               for port, fn in handlers
               for s in listen(socket.SOCK_STREAM, port)]
    threads += [threading.Thread(target=udp, args=(s,), daemon=True)
                for s in listen(socket.SOCK_DGRAM, udp_port)]
    for t in threads:
        t.start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
