"""In-pod echo server that tells the client who it sees.

Usage: ``peer_echo_server.py PORT [--name NAME] [--count COUNT]``

Both families on PORT. Prints ``ready`` once listening; exits by itself after
10 minutes (orphan guard), or (with ``--name``) once it has served COUNT connections.

* Default: on each connection it sends ``peer <getpeername() ip>\\n``, then echoes
  everything until the client half-closes (``echo_client.py``); connections are
  served at once, each in its own thread.
* ``--name NAME``: answers each connection's first read (up to 1024 bytes) with
  ``NAME:<peer ip>:<data>`` and closes it (``send_recv_client.py``: which pod
  answered, and the source address it saw); one connection after the other.
"""

from __future__ import annotations

import argparse
import select
import socket
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


def answer_once(c: socket.socket, name: str) -> None:
    try:
        c.settimeout(5)
        data = c.recv(1024).decode()
        c.sendall(f"{name}:{c.getpeername()[0]}:{data}".encode())
    except OSError:
        pass
    finally:
        c.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--name", help="answer once with NAME:<peer ip>:<data> and close")
    parser.add_argument("--count", type=int, help="with --name: exit after this many")
    args = parser.parse_args()
    if args.count is not None and args.name is None:
        parser.error("--count goes with --name (echo connections run in threads that "
                     "exiting would cut)")
    port = args.port
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
    served = 0
    while time.monotonic() < deadline and (args.count is None or served < args.count):
        for s in select.select(socks, [], [], 0.5)[0]:
            c, _ = s.accept()
            served += 1
            if args.name is None:
                threading.Thread(target=serve, args=(c,), daemon=True).start()
            else:
                answer_once(c, args.name)


if __name__ == "__main__":
    main()
