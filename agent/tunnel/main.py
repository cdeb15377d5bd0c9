"""``meshagent tunnel``: the node's co-located tunnel process (lifecycle and listeners).

It listens, IP_TRANSPARENT, on the outbound (15001), inbound plaintext (15006)
and HBONE (15008) ports, IPv4 and IPv6, in the node's netns; the datapath
assigns captured connections to these listeners. Each accepted connection goes
to its path's handler (``outbound``, ``inbound``, ``hbone_inbound``) with one
frozen :class:`~agent.tunnel.inputs.ProxyInputs`; :class:`Tunnel` itself only
builds that bundle, runs the accept loops, polls workloads and policies, writes
the status file and stops.

Everything a test needs to run the tunnel in process on loopback is injectable:
the workload source, the dialer, the listener factory and the identity store.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from agent.config import Config, resolver_address
from agent.contracts.files import TUNNEL_STATUS_FILE, WORKLOADS_FILE, TunnelStatus
from agent.dns.captured import CapturedDns
from agent.dns.server import DnsProxy, DnsProxyConfig
from agent.hbone.pool import HbonePool
from agent.identity.ca import IdentityError, load_ca
from agent.identity.store import IdentityStore
from agent.model.types import IPAddress, Model
from agent.model.types import Workload as ModelWorkload
from agent.policy.metrics import PolicyDocumentsCollector
from agent.state import write_json_atomic
from agent.telemetry.metrics import MetricsServer, TunnelMetrics, serve_metrics
from agent.tunnel import hbone_inbound, inbound, outbound, sockets
from agent.tunnel.cluster import dns_client
from agent.tunnel.connection import ConnectionRecord
from agent.tunnel.dialer import Dialer, TransparentDialer
from agent.tunnel.discovery import FileWorkloads, WorkloadSource
from agent.tunnel.drain import DrainReport, drain_connections
from agent.tunnel.gate import PolicyGate
from agent.tunnel.inputs import ProxyInputs
from agent.tunnel.tracker import ConnectionTracker

log = structlog.get_logger("tunnel")
WORKLOADS_POLL_SECONDS = 0.2
ROTATION_CHECK_SECONDS = 60.0

Handler = Callable[[ProxyInputs, socket.socket, tuple[str, int], tuple[str, int]],
                   Awaitable[None]]
ListenerFactory = Callable[[int], list[socket.socket]]
"""Makes the listening sockets for a port (production: transparent, v4 and v6)."""


EMPTY_MODEL = Model.build((), ())

class TunnelStartError(RuntimeError):
    """The tunnel cannot start; the message says what to do."""


def load_identities(cfg: Config) -> IdentityStore:
    """The identity store over the mesh CA. Raises TunnelStartError with what to run."""
    t = cfg.tunnel
    try:
        ca = load_ca(t.ca_dir, t.trust_domain)
    except (IdentityError, OSError, ValueError) as exc:
        raise TunnelStartError(
            f"no usable mesh CA in {t.ca_dir} ({exc}): run `meshagent ca init` first "
            f"(or set tunnel.mode = \"plain\" to run without HBONE)") from exc
    return IdentityStore(ca, ttl_seconds=t.cert_ttl_seconds)


def transparent_listeners(mark: int) -> ListenerFactory:
    def listen(port: int) -> list[socket.socket]:
        out: list[socket.socket] = []
        try:
            for family in (socket.AF_INET, socket.AF_INET6):
                out.append(sockets.listener(family, port, mark=mark))
        except OSError:
            for sock in out:
                sock.close()
            raise
        return out
    return listen


class Tunnel:
    def __init__(self, cfg: Config, *, workloads: WorkloadSource | None = None,
                 dialer: Dialer | None = None, listen: ListenerFactory | None = None,
                 identities: IdentityStore | None = None,
                 collectors: CollectorRegistry | None = None,
                 access_log: Callable[[ConnectionRecord], None] = ConnectionRecord.log,
                 dns_hosts: Sequence[str] = ("0.0.0.0", "::"),
                 dns_transparent: bool = True) -> None:
        t = cfg.tunnel
        self.cfg = cfg
        self.file_workloads: FileWorkloads | None = None
        if workloads is None:
            self.file_workloads = FileWorkloads(
                Path(cfg.agent.state_dir) / WORKLOADS_FILE, t.peer_workloads, t.mesh_cidrs,
                model_file=t.model_file or None, node=t.node_name or socket.gethostname(),
                trust_domain=t.trust_domain, cluster_id=t.cluster_id)
            workloads = self.file_workloads
        dialer = dialer or TransparentDialer(t.socket_mark, t.connect_timeout_seconds)
        self._listen = listen or transparent_listeners(t.socket_mark)
        self.collectors = collectors or CollectorRegistry()
        tracker = ConnectionTracker()
        pool = None
        if t.mode == "hbone":
            identities = identities or load_identities(cfg)
            pool = HbonePool(identities.client_context, trust_domain=t.trust_domain,
                             connect_timeout=t.connect_timeout_seconds,
                             socket_factory=lambda family: dialer.socket_for(family, None))
        else:
            identities = None
        self.inputs = ProxyInputs(
            cfg=t, workloads=workloads,
            policy=PolicyGate(t.policy_dir, t.root_namespace, tracker),
            tracker=tracker, metrics=TunnelMetrics(self.collectors), dialer=dialer,
            identities=identities, pool=pool, access_log=access_log)
        self.collectors.register(PolicyDocumentsCollector(self.inputs.policy.watcher))
        self.dns_hosts = tuple(dns_hosts)
        self.dns_transparent = dns_transparent
        self.dns: CapturedDns | None = None
        self.listeners: list[socket.socket] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self._handlers: dict[int, Handler] = {}  # listener fd -> its path's handler
        self.drained: DrainReport | None = None  # how the last drain went
        self.metrics_server: MetricsServer | None = None
        self._last_status: dict[str, Any] | None = None

    # --- status ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        inputs = self.inputs
        certs = []
        if inputs.identities is not None:
            for spiffe_id in inputs.identities.identities():
                cert = inputs.identities.get(spiffe_id)
                certs.append({"identity": str(spiffe_id), "not_after": cert.not_after})
        local, remote = inputs.workloads.counts()
        error = inputs.policy.last_error
        return {"mode": self.cfg.tunnel.mode, "workloads": local, "peer_workloads": remote,
                "policies": len(inputs.policy.policies.policies),
                "policy_error": str(error) if error else None, "certificates": tuple(certs),
                "active_inbound": len(inputs.tracker)}

    def write_status(self) -> None:
        status = self.status()
        if status != self._last_status:
            self._last_status = status
            write_json_atomic(Path(self.cfg.agent.state_dir) / TUNNEL_STATUS_FILE,
                              TunnelStatus(**status).to_json(), mode=0o644)

    def refresh(self) -> None:
        """Re-read workloads and policies. Side effects: reads their files."""
        if self.file_workloads is not None:
            self.file_workloads.refresh()
        self.inputs.policy.reload()

    async def _watch(self) -> None:
        while True:
            self.refresh()
            try:
                self.write_status()
            except OSError as exc:
                log.warning("could not write tunnel status", error=str(exc))
            await asyncio.sleep(WORKLOADS_POLL_SECONDS)

    async def _rotate(self) -> None:
        identities = self.inputs.identities
        while identities is not None:
            await asyncio.sleep(ROTATION_CHECK_SECONDS)
            rotated = identities.rotate_due()
            if rotated:
                log.info("certificates rotated", identities=[str(i) for i in rotated])

    # --- serving -----------------------------------------------------------------

    def open_listeners(self) -> list[tuple[socket.socket, Handler]]:
        t = self.cfg.tunnel
        plan: list[tuple[int, Handler]] = [(t.outbound_port, outbound.handle),
                                           (t.inbound_port, inbound.handle),
                                           (t.hbone_port, hbone_inbound.handle)]
        out: list[tuple[socket.socket, Handler]] = []
        try:
            for port, handler in plan:
                for sock in self._listen(port):
                    self.listeners.append(sock)
                    out.append((sock, handler))
        except OSError:
            self.close()
            raise
        return out

    def _dns_client(self, ip: IPAddress) -> ModelWorkload | None:
        workloads = self.inputs.workloads
        return dns_client(workloads.cluster(), workloads.local(str(ip)), str(ip))

    def _dns_model(self) -> Model:
        cluster = self.inputs.workloads.cluster()
        return cluster.model if cluster is not None else EMPTY_MODEL

    async def start_dns(self) -> None:
        """The DNS proxy on ``tunnel.dns_port`` (UDP and TCP), for the datapath's DNS
        capture. A proxy that cannot start is logged and left out: the datapath then
        finds no DNS socket and pods' queries reach their own resolvers (fail open)."""
        t = self.cfg.tunnel
        if not t.dns_port:
            return
        proxy = DnsProxy(DnsProxyConfig(upstreams=[resolver_address(u) for u in t.dns_upstreams],
                                        forward_to_original=True),
                         self._dns_model, self._dns_client)
        dns = CapturedDns(proxy, t.dns_port, mark=t.socket_mark, hosts=self.dns_hosts,
                          transparent=self.dns_transparent)
        try:
            await dns.start()
        except OSError as exc:
            log.error("DNS proxy could not start; captured pods' DNS goes to their own "
                      "resolvers until it does (check that nothing else holds the port)",
                      port=t.dns_port, error=str(exc))
            return
        self.dns = dns

    async def _accept_loop(self, lsock: socket.socket, handler: Handler) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(lsock)
            except OSError as exc:
                log.warning("accept failed", error=str(exc))
                await asyncio.sleep(0.05)
                continue
            conn.setblocking(False)
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                local = conn.getsockname()  # the original destination (no NAT)
            except OSError:
                conn.close()
                continue
            task = asyncio.create_task(self._run_handler(handler, conn, peer, local))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _run_handler(self, handler: Handler, conn: socket.socket,
                           peer: tuple[str, int], local: tuple[str, int]) -> None:
        try:
            await handler(self.inputs, conn, (peer[0], peer[1]), (local[0], local[1]))
        except asyncio.CancelledError:
            sockets.abort(conn)
            raise
        except Exception:
            log.exception("connection handler failed", peer=peer[0])
            sockets.abort(conn)

    def _accept_backlog(self, handlers: dict[int, Handler]) -> None:
        """Take the connections the kernel completed but the accept loops had not yet
        taken, so closing the listeners resets none of them. Side effects: accepts on
        every listener until it has none queued; starts their handler tasks."""
        for lsock in self.listeners:
            handler = handlers.get(lsock.fileno())
            while handler is not None:
                try:
                    conn, peer = lsock.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    log.warning("accept failed while draining", error=str(exc))
                    break
                conn.setblocking(False)
                try:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    local = conn.getsockname()
                except OSError:
                    conn.close()
                    continue
                task = asyncio.create_task(self._run_handler(handler, conn, peer, local))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    async def drain(self) -> DrainReport:
        """Stop gracefully (the accept loops must be stopped already): take the accept
        backlog, close the TCP and DNS listeners (a new tunnel can bind at once; new
        SYNs meanwhile find no socket and the datapath drops them, fail closed, so the
        client retransmits), send GOAWAY (NO_ERROR) on inbound HBONE connections so
        peers open new streams elsewhere, let the connections in flight run for up to
        ``tunnel.drain_seconds``, then cut what is left (abort, as any cancelled
        connection, with its record). ztunnel ``src/drain.rs``, ``src/app.rs``.

        Side effects: accepts and closes the listeners, closes the DNS proxy, sets
        ``inputs.draining``, cancels the connection tasks left at the deadline, sets
        ``self.drained``, logs the drain (:func:`agent.tunnel.drain.drain_connections`).
        """
        self._accept_backlog(self._handlers)
        self.close()
        if self.dns is not None:
            await self.dns.close()
            self.dns = None
        self.inputs.draining.set()
        self.drained = await drain_connections(list(self.tasks), self.cfg.tunnel.drain_seconds)
        return self.drained

    def close(self) -> None:
        for sock in self.listeners:
            sock.close()
        self.listeners.clear()

    async def run(self, stop: asyncio.Event | None = None,
                  ready: asyncio.Event | None = None) -> None:
        t = self.cfg.tunnel
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
        self.refresh()
        if t.metrics_port:
            self.metrics_server = serve_metrics(self.collectors, t.metrics_host, t.metrics_port)
        background = [asyncio.create_task(self._watch()), asyncio.create_task(self._rotate())]
        for sock, handler in self.open_listeners():
            self._handlers[sock.fileno()] = handler
            background.append(asyncio.create_task(self._accept_loop(sock, handler)))
        await self.start_dns()
        local, _ = self.inputs.workloads.counts()
        log.info("tunnel ready", mode=t.mode, outbound=t.outbound_port, inbound=t.inbound_port,
                 hbone=t.hbone_port, workloads=local)
        if ready is not None:
            ready.set()
        try:
            await stop.wait()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.drain()
            if self.inputs.pool is not None:
                await self.inputs.pool.close()
            if self.metrics_server is not None:
                self.metrics_server.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(RuntimeError, ValueError, NotImplementedError):
                    loop.remove_signal_handler(sig)
            log.info("tunnel stopped")


def install_event_loop_policy() -> str:
    """Use uvloop when it is installed; return the loop's name for the log."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def run(cfg: Config) -> None:
    """Run the tunnel until SIGTERM/SIGINT, then drain (:meth:`Tunnel.drain`). Raises
    TunnelStartError (one line, what to do) when it cannot start, e.g. without a mesh CA
    in HBONE mode."""
    tunnel = Tunnel(cfg)  # loads the CA first: a missing one fails here, before the loop
    loop_name = install_event_loop_policy()
    log.info("starting tunnel", event_loop=loop_name)
    asyncio.run(tunnel.run())
