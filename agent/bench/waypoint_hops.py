"""The two node-tunnel hops around a waypoint, for the waypoint benchmark (loopback).

``python -m agent.bench.waypoint_hops --ca-dir D --dest IP=APPPORT=NS/SA ... --entry
LISTENPORT=WAYPOINTPORT=AUTHORITY=NAMESPACE ...``

- destination side: an HBONE server on ``IP:15008`` for every ``--dest`` pod IP
  (127.x loopback addresses) presenting the pod's identity ``NS/SA``, piping each
  accepted CONNECT to ``127.0.0.1:APPPORT``;
- source side: a plaintext listener on ``127.0.0.1:LISTENPORT`` per ``--entry``; each
  TCP connection becomes one CONNECT to ``AUTHORITY`` at the waypoint on
  ``127.0.0.1:WAYPOINTPORT``, under ``spiffe://<td>/ns/NAMESPACE/sa/client`` (what
  a source node tunnel does for a captured connection).

Runs until SIGTERM. Side effects: listeners on loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable

from agent.hbone.pool import HbonePool
from agent.hbone.server import HboneServerRequest, serve_hbone
from agent.hbone.stream import HboneStream
from agent.identity.ca import load_ca
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityStore

CHUNK = 64 * 1024


async def _pipe_stream_socket(stream: HboneStream, reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
    async def up() -> None:
        while data := await reader.read(CHUNK):
            await stream.write(data)
        await stream.close_write()

    async def down() -> None:
        while data := await stream.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    with contextlib.suppress(Exception):
        await asyncio.gather(up(), down())
    stream.abort()
    writer.close()


async def main(args: argparse.Namespace) -> None:
    store = IdentityStore(load_ca(args.ca_dir))
    td = store.trust_domain
    apps: dict[str, str] = {}
    identities: dict[str, SpiffeId] = {}
    for item in args.dest:
        ip, port, who = item.split("=")
        ns, sa = who.split("/")
        apps[ip] = port
        identities[ip] = SpiffeId(td, ns, sa)
    servers = []

    async def on_stream(request: HboneServerRequest) -> None:
        ip, _ = request.destination
        if ip not in apps:
            request.reject(403)
            return
        reader, writer = await asyncio.open_connection("127.0.0.1", int(apps[ip]))
        await _pipe_stream_socket(request.accept(), reader, writer)

    for ip in apps:
        # ztunnel answers with the destination workload's own certificate.
        ctx = store.server_context(identities[ip])
        servers.append(await asyncio.start_server(
            lambda r, w: serve_hbone(r, w, on_stream=on_stream, trust_domain=td),
            ip, 15008, ssl=ctx, backlog=4096))
    pool = HbonePool(store.client_context, trust_domain=td, max_streams_per_connection=100)
    for item in args.entry:
        listen, wp_port, authority, namespace = item.split("=")
        source = SpiffeId(td, namespace, "client")

        def handler(wp: int, auth: str, src: SpiffeId) -> Callable[
                [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
            async def handle(reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
                try:
                    stream = await pool.open_stream(source=src, peer=("127.0.0.1", wp),
                                                    authority=auth,
                                                    forwarded_for="127.0.0.1")
                except Exception:
                    writer.close()
                    return
                await _pipe_stream_socket(stream, reader, writer)
            return handle

        servers.append(await asyncio.start_server(
            handler(int(wp_port), authority, source), "127.0.0.1", int(listen), backlog=4096))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for s in servers:
        s.close()
    await pool.close()


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ca-dir", required=True)
    ap.add_argument("--dest", action="append", default=[])
    ap.add_argument("--entry", action="append", default=[])
    from agent.tunnel.main import install_event_loop_policy

    install_event_loop_policy()
    asyncio.run(main(ap.parse_args()))


if __name__ == "__main__":
    cli()
