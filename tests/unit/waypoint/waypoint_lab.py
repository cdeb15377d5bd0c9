"""An in-process waypoint lab on loopback (no root): a test CA, app servers (stdlib
HTTP/1.1, grpcio, raw TCP), a destination "node tunnel" (our HBONE server piping to
the apps), the waypoint, and a source "node tunnel" (our HBONE client) with a
plaintext entry shim so curl, h2load and grpcio can be the clients.

Every socket is on 127.0.0.1; everything started is stopped by :meth:`Lab.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import random
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc

from agent.hbone.client import HboneClient
from agent.hbone.pool import HbonePool
from agent.hbone.server import HboneServerRequest, serve_hbone
from agent.hbone.stream import HboneStream
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityStore
from agent.model.types import (
    InboundProtocol,
    Model,
    NamespacedHostname,
    NetworkAddress,
    Service,
    ServiceBinding,
    Workload,
    port_map,
)
from agent.waypoint.config import build_state
from agent.waypoint.limits import Budgets
from agent.waypoint.proxy import WaypointInputs, WaypointServer, WaypointSettings
from agent.waypoint.telemetry import WaypointMetrics

TD = "cluster.local"
LOOPBACK = "127.0.0.1"
WEB_VIP, GRPC_VIP, DB_VIP, OPT_VIP = "10.96.0.10", "10.96.0.11", "10.96.0.12", "10.96.0.13"
WEB_PODS = ("10.10.0.1", "10.10.0.2")
WAYPOINT_ID = SpiffeId(TD, "apps", "waypoint")
FRONT_ID = SpiffeId(TD, "front", "alice")
OTHER_ID = SpiffeId(TD, "other", "bob")


# ---- apps ----------------------------------------------------------------------------

class EchoHandler(BaseHTTPRequestHandler):
    """Answers JSON describing the request. ``/status/N`` answers N; ``/slow`` waits."""

    protocol_version = "HTTP/1.1"
    server: EchoServer

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            body = self.rfile.read(length) if length else b""
        self.server.seen.append((self.command, self.path, dict(self.headers.items())))
        status = 200
        if self.path.startswith("/status/"):
            status = int(self.path.split("/")[2])
        if self.path.startswith("/slow"):
            time.sleep(1.0)
        payload = json.dumps({"server": self.server.name, "method": self.command,
                              "path": self.path, "body": body.decode("latin-1"),
                              "headers": {k.lower(): v for k, v in self.headers.items()}}
                             ).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer


class EchoServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, name: str) -> None:
        super().__init__((LOOPBACK, 0), EchoHandler)
        self.name = name
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def grpc_server() -> tuple[grpc.Server, int]:
    """A grpcio server with /echo.Echo/Say (bytes in, b"echo:" + bytes out)."""
    def say(request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"fail":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "asked to fail")
        return b"echo:" + request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        "echo.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    server.start()
    return server, port


def echo_say(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
    """The client of ``grpc_server``'s /echo.Echo/Say on ``channel`` (bytes, no codec)."""
    return channel.unary_unary("/echo.Echo/Say")


async def raw_upgrade_server() -> tuple[asyncio.base_events.Server, int]:
    """Answers any request head with 101 and then echoes bytes (a WebSocket stand-in)."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                         b"connection: upgrade\r\n\r\n")
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, LOOPBACK, 0)
    return server, server.sockets[0].getsockname()[1]


# ---- the lab ------------------------------------------------------------------------------

@dataclass
class Seen:
    authority: str
    peer: SpiffeId | None
    headers: dict[str, str]


@dataclass
class Lab:
    store: IdentityStore
    inputs: WaypointInputs
    waypoint: WaypointServer
    waypoint_port: int
    dest_server: asyncio.base_events.Server
    connects: list[Seen]
    http_apps: dict[str, EchoServer]
    grpc: grpc.Server
    upgrade_server: asyncio.base_events.Server
    clients: list[HboneClient] = field(default_factory=list)
    shims: list[asyncio.base_events.Server] = field(default_factory=list)
    down_pods: set[str] = field(default_factory=set)

    async def client(self, identity: SpiffeId = FRONT_ID) -> HboneClient:
        client = await HboneClient.connect((LOOPBACK, self.waypoint_port),
                                           self.store.client_context(identity),
                                           trust_domain=TD, expected_peer=WAYPOINT_ID)
        self.clients.append(client)
        return client

    async def open(self, authority: str, identity: SpiffeId = FRONT_ID,
                   source_ip: str = "10.20.0.5", traceparent: str | None = None
                   ) -> HboneStream:
        client = await self.client(identity)
        extra = [("traceparent", traceparent)] if traceparent else []
        return await client.open_stream(authority, forwarded_for=source_ip,
                                        baggage="k8s.namespace.name=front",
                                        extra_headers=extra)

    async def shim(self, authority: str, identity: SpiffeId = FRONT_ID) -> int:
        """A plaintext listener: each TCP connection becomes one CONNECT to ``authority``
        (what the source node tunnel does for a captured connection)."""
        client = await self.client(identity)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                stream = await client.open_stream(authority, forwarded_for="10.20.0.5")
            except Exception:
                writer.close()
                return

            async def up() -> None:
                while data := await reader.read(65536):
                    await stream.write(data)
                await stream.close_write()

            async def down() -> None:
                while data := await stream.read():
                    writer.write(data)
                    await writer.drain()
                writer.write_eof()

            with contextlib.suppress(Exception):
                await asyncio.gather(up(), down())
            writer.close()

        server = await asyncio.start_server(handle, LOOPBACK, 0)
        self.shims.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for c in self.clients:
            await c.close()
        for s in self.shims:
            s.close()
        await self.waypoint.close()
        self.dest_server.close()
        self.upgrade_server.close()
        for app in self.http_apps.values():
            app.stop()
        self.grpc.stop(0)


def workload(name: str, ip: str, service: str, ports: dict[int, int],
             namespace: str = "apps") -> Workload:
    return Workload(uid=f"c1//v1/Pod/{namespace}/{name}", name=name, namespace=namespace,
                    workload_ips=(ipaddress.ip_address(ip),), service_account=name,
                    protocol=InboundProtocol.HBONE,
                    services=(ServiceBinding(NamespacedHostname(
                        namespace, f"{service}.{namespace}.svc.cluster.local"),
                        port_map(ports)),))


def service(name: str, vip: str, ports: dict[int, int], namespace: str = "apps") -> Service:
    return Service(name, namespace, f"{name}.{namespace}.svc.cluster.local",
                   vips=(NetworkAddress("", ipaddress.ip_address(vip)),),
                   ports=port_map(ports))


def lab_model() -> Model:
    return Model.build(
        [workload("web-1", WEB_PODS[0], "web", {80: 8080}),
         workload("web-2", WEB_PODS[1], "web", {80: 8080}),
         workload("canary-1", "10.10.0.9", "canary", {80: 8080}),
         workload("grpc-1", "10.10.1.1", "grpc", {50051: 50051}),
         workload("db-1", "10.10.2.1", "db", {5432: 5432}),
         workload("ws-1", "10.10.3.1", "ws", {80: 9000}),
         workload("opt-1", "10.10.4.1", "opt", {80: 8080})],
        [service("web", WEB_VIP, {80: 8080}), service("canary", "10.96.0.19", {80: 8080}),
         service("grpc", GRPC_VIP, {50051: 50051}), service("db", DB_VIP, {5432: 5432}),
         service("ws", "10.96.0.14", {80: 9000}), service("opt", OPT_VIP, {80: 8080})])


def base_docs() -> list[dict[str, Any]]:
    def svc(name: str, ports: list[dict[str, Any]], labels: dict[str, str] | None = None
            ) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "apps", "labels": labels or {}},
                "spec": {"ports": ports}}

    return [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "apps", "labels": {"istio.io/use-waypoint": "waypoint"}}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
         "metadata": {"name": "waypoint", "namespace": "apps"},
         "spec": {"gatewayClassName": "istio-waypoint", "listeners": [
             {"name": "mesh", "port": 15008, "protocol": "HBONE"}]}},
        svc("web", [{"name": "http", "port": 80}]),
        svc("canary", [{"name": "http", "port": 80}]),
        svc("grpc", [{"name": "grpc", "port": 50051, "appProtocol": "grpc"}]),
        svc("db", [{"name": "tcp-postgres", "port": 5432}]),
        svc("ws", [{"name": "http-ws", "port": 80}]),
        svc("opt", [{"name": "http", "port": 80}], {"istio.io/use-waypoint": "none"}),
    ]


async def start_lab(store: IdentityStore, docs: list[dict[str, Any]] | None = None,
                    settings: WaypointSettings | None = None,
                    budgets: Budgets | None = None, verify_upstream: bool = False) -> Lab:
    """``verify_upstream``: the waypoint checks the destination node presents the
    workload's identity; off by default here, where one loopback listener (identity
    ``apps/node``) stands in for every pod's node."""
    settings = settings or WaypointSettings()
    settings.verify_upstream_identity = verify_upstream
    http_apps = {"web": EchoServer("web"), "canary": EchoServer("canary")}
    grpc_srv, grpc_port = grpc_server()
    upgrade_srv, upgrade_port = await raw_upgrade_server()
    connects: list[Seen] = []
    down: set[str] = set()
    # Pod IP -> local port of its app (the destination node tunnel's "pod").
    app_port: dict[str, int] = {WEB_PODS[0]: http_apps["web"].port,
                                WEB_PODS[1]: http_apps["web"].port,
                                "10.10.0.9": http_apps["canary"].port,
                                "10.10.1.1": grpc_port, "10.10.3.1": upgrade_port,
                                "10.10.4.1": http_apps["web"].port}

    async def on_stream(request: HboneServerRequest) -> None:
        ip, _port = request.destination
        connects.append(Seen(request.authority, request.peer_identity,
                             dict(request.headers)))
        if ip in down:
            request.reject(503)
            return
        if ip == "10.10.2.1":  # db: an echo "database"
            stream = request.accept()
            while data := await stream.read():
                await stream.write(b"db:" + data)
            await stream.close_write()
            return
        reader, writer = await asyncio.open_connection(LOOPBACK, app_port[ip])
        stream = request.accept()

        async def up() -> None:
            while data := await stream.read():
                writer.write(data)
                await writer.drain()
            writer.write_eof()

        async def downstream() -> None:
            while data := await reader.read(65536):
                await stream.write(data)
            await stream.close_write()

        with contextlib.suppress(Exception):
            await asyncio.gather(up(), downstream())
        writer.close()

    dest_ctx = store.server_context(SpiffeId(TD, "apps", "node"))
    dest_server = await asyncio.start_server(
        lambda r, w: serve_hbone(r, w, on_stream=on_stream, trust_domain=TD),
        LOOPBACK, 0, ssl=dest_ctx)
    dest_port = dest_server.sockets[0].getsockname()[1]
    state = build_state(lab_model(), docs if docs is not None else base_docs(),
                        ("apps", "waypoint"))
    inputs = WaypointInputs(WAYPOINT_ID, state,
                            HbonePool(store.client_context, trust_domain=TD),
                            WaypointMetrics(), settings,
                            budgets or Budgets(), random.Random(5),
                            hbone_peer=lambda _ip: (LOOPBACK, dest_port))
    server = WaypointServer(inputs, store.server_context(WAYPOINT_ID), TD)
    _, port = await server.start(LOOPBACK, 0)
    lab = Lab(store, inputs, server, port, dest_server, connects, http_apps, grpc_srv,
              upgrade_srv, down_pods=down)
    return lab


async def http1(stream: HboneStream, raw: bytes, expect_close: bool = False) -> bytes:
    """Send raw bytes on a CONNECT stream and read until the response looks complete."""
    await stream.write(raw)
    data = b""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return data
        try:
            chunk = await asyncio.wait_for(stream.read(), remaining)
        except Exception:
            return data
        if not chunk:
            return data
        data += chunk
        if not expect_close and _complete(data):
            return data


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0


def body_of(data: bytes) -> bytes:
    return data.partition(b"\r\n\r\n")[2]


def with_docs(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [*base_docs(), *extra]


Factory = Callable[..., Any]
