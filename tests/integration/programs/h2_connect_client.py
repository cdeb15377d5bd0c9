"""One HBONE CONNECT with a given client certificate (runs in a node netns).

Usage: ``h2_connect_client.py CONFIG_JSON`` with keys ``cert``, ``key``,
``trust`` (CA file the server is verified against), ``host``, ``port``,
``authority`` and ``send``.

A TLS 1.3 + ALPN h2 client: sends one CONNECT for ``authority``; on 200 sends
``send`` and reads the stream to its end. Prints one JSON object
(``handshake``, ``alpn``, ``status``, ``data``, ``error``) and exits 0.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import time
from typing import Any, NoReturn

import h2.config
import h2.connection
import h2.events

OUT: dict[str, Any] = {"handshake": False, "alpn": None, "status": None, "data": "",
                       "error": None}


def finish() -> NoReturn:
    print(json.dumps(OUT))
    sys.exit(0)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    ctx.check_hostname = False  # the mesh checks SPIFFE IDs, not host names
    ctx.load_verify_locations(cfg["trust"])
    ctx.load_cert_chain(cfg["cert"], cfg["key"])
    try:
        raw = socket.create_connection((cfg["host"], cfg["port"]), timeout=5)
        tls = ctx.wrap_socket(raw)
    except (OSError, ssl.SSLError) as exc:
        OUT["error"] = f"handshake: {type(exc).__name__}: {exc}"
        finish()
    OUT["handshake"] = True
    OUT["alpn"] = tls.selected_alpn_protocol()
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "CONNECT"), (":authority", cfg["authority"])])
    deadline = time.monotonic() + 10
    try:
        tls.sendall(conn.data_to_send())
        while time.monotonic() < deadline:
            data = tls.recv(65536)
            if not data:
                OUT["error"] = "connection closed by the server"
                finish()
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    OUT["status"] = int(dict(ev.headers or [])[b":status"])
                    if OUT["status"] == 200:
                        conn.send_data(1, cfg["send"].encode(), end_stream=True)
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length or 0, 1)
                    OUT["data"] += (ev.data or b"").decode()
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    finish()
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    OUT["error"] = f"GOAWAY {ev.error_code}"
                    finish()
            tls.sendall(conn.data_to_send())
            if OUT["status"] is not None and OUT["status"] != 200:
                finish()
        OUT["error"] = "timeout"
    except (OSError, ssl.SSLError) as exc:
        OUT["error"] = f"{type(exc).__name__}: {exc}"
    finish()


if __name__ == "__main__":
    main()
