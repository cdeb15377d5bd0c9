"""In-pod sender of malformed and oversized DNS: what a broken or hostile resolver
library could send to its resolver's port 53 (captured, so it reaches the tunnel).

Usage: ``dns_garbage.py RESOLVER_IP``

UDP: an empty datagram, 1 byte, a bare header, a header with QR set (a response),
random bytes up to the link's MTU, a query with 200 questions. TCP: a frame of
65,535 random bytes, a zero-length frame, and a frame announced at 65,535 bytes of
which only 100 arrive before the client closes. Waits for nothing: prints one JSON
line ``{"udp_sent": N, "tcp_frames": N}``.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys


def main() -> int:
    resolver = sys.argv[1]
    family = socket.AF_INET6 if ":" in resolver else socket.AF_INET
    header = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    many = struct.pack("!HHHHHH", 0x4321, 0x0100, 200, 0, 0, 0) + b"\x01a\x00\x00\x01\x00\x01" * 200
    datagrams = [b"", b"\x00", header, struct.pack("!HHHHHH", 1, 0x8180, 0, 0, 0, 0),
                 os.urandom(600), os.urandom(1400), many]
    with socket.socket(family, socket.SOCK_DGRAM) as udp:
        for d in datagrams:
            udp.sendto(d, (resolver, 53))
    frames = 0
    with socket.create_connection((resolver, 53), timeout=10) as tcp:
        junk = os.urandom(65535)
        tcp.sendall(struct.pack("!H", len(junk)) + junk + b"\x00\x00")
        frames += 2
    with socket.create_connection((resolver, 53), timeout=10) as tcp:
        tcp.sendall(b"\xff\xff" + b"\x00" * 100)
        frames += 1
    print(json.dumps({"udp_sent": len(datagrams), "tcp_frames": frames}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
