"""In-pod UDP client: ``udp_client.py HOST PORT``.

Sends ``hello-N`` (at most 5 tries, UDP may lose a datagram) and prints one
JSON object: its local address and the reply (null if none came).
"""

from __future__ import annotations

import json
import socket
import sys


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1)
    s.connect((host, port))
    local, reply = s.getsockname(), None
    for i in range(5):
        s.send(b"hello-%d" % i)
        try:
            reply = s.recv(2048).decode()
            break
        except TimeoutError:
            continue
    print(json.dumps({"local_ip": local[0], "local_port": local[1], "reply": reply}))


if __name__ == "__main__":
    main()
