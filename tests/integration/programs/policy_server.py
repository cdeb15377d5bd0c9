"""In-pod servers of the policy suite (IPv4).

Usage: ``policy_server.py RESPONSE_HEX HTTP_PORTS ECHO_PORT``

HTTP on each port of HTTP_PORTS (comma separated): reads the request up to its
blank line, answers with the fixed response (hex-encoded RESPONSE_HEX, whatever
the request), half-closes and drains until the client's FIN (so nothing unread
turns the close into a reset). Echo on ECHO_PORT. Prints ``ready``; exits by
itself after 10 minutes (orphan guard).
"""

from __future__ import annotations

import select
import socket
import sys
import threading
import time
from collections.abc import Callable


def listen(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(64)
    return s


def echo(c: socket.socket) -> None:
    try:
        c.settimeout(120)
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
    response = bytes.fromhex(sys.argv[1])
    http_ports = [int(p) for p in sys.argv[2].split(",")]
    echo_port = int(sys.argv[3])

    def http(c: socket.socket) -> None:
        try:
            c.settimeout(20)
            buf = b""
            while b"\r\n\r\n" not in buf and len(buf) < 65536:
                data = c.recv(65536)
                if not data:
                    break
                buf += data
            c.sendall(response)
            c.shutdown(socket.SHUT_WR)
            while c.recv(65536):
                pass
        except OSError:
            pass
        finally:
            c.close()

    handlers: dict[socket.socket, Callable[[socket.socket], None]] = {
        listen(p): http for p in http_ports
    }
    handlers[listen(echo_port)] = echo
    print("ready", flush=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        for s in select.select(list(handlers), [], [], 0.5)[0]:
            c, _ = s.accept()
            threading.Thread(target=handlers[s], args=(c,), daemon=True).start()


if __name__ == "__main__":
    main()
