"""``meshagent tunnel``: the node's co-located tunnel process.

It listens, IP_TRANSPARENT, on the outbound (15001), inbound plaintext
(15006) and HBONE (15008) ports, IPv4 and IPv6, in the node's netns; the
datapath assigns captured connections to these listeners. It learns the
node's enrolled workloads from the agent's ``workloads.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
from prometheus_client import CollectorRegistry

from agent.config import Config
from agent.policy import ConnectionRequest, PolicySet, PolicyWatcher, WorkloadRef
from agent.policy.metrics import PolicyDocumentsCollector
from agent.state import WORKLOADS_FILE, write_json_atomic
from agent.telemetry.metrics import (
    REPORTER_DESTINATION,
    REPORTER_SOURCE,
    MetricsServer,
    TunnelMetrics,
    serve_metrics,
    tcp_labels,
)
from agent.tunnel import inbound, outbound, sockets
from agent.tunnel.connection import ConnectionRecord
from agent.tunnel.workloads import Workload, WorkloadIndex, in_cidrs

log = structlog.get_logger("tunnel")
WORKLOADS_POLL_SECONDS = 0.2
STATUS_FILE = "tunnel-status.json"
# Result of a connection -> ztunnel's response flag in metrics.
_RESPONSE_FLAGS = {"denied": "DENY", "refused": "DENY", "connect_failed": "CONNECT",
                   "tls_failed": "TLS_FAILURE"}

Handler = Callable[[Any, socket.socket, tuple[str, int]], Awaitable[None]]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    policy: str | None = None
    reason: str | None = None


class HboneEndpoint(Protocol):
    async def outbound(self, conn: socket.socket, rec: ConnectionRecord, src: Workload | None,
                       src_ip: str, dst_ip: str, dst_port: int) -> None: ...

    async def serve(self, tunnel: Tunnel, conn: socket.socket,
                    peer: tuple[str, int]) -> None: ...

    async def close(self) -> None: ...

    def certificates(self) -> list[dict[str, Any]]: ...


class Tunnel:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.workloads = WorkloadIndex()
        self.workloads_path = Path(cfg.agent.state_dir) / WORKLOADS_FILE
        self._workloads_mtime: float | None = None
        self.peers = WorkloadIndex()
        self._peer_mtimes: tuple[float | None, ...] = ()
        self.hbone: HboneEndpoint | None = None
        self.listeners: list[socket.socket] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.on_close: list[Callable[[ConnectionRecord], None]] = []
        self.policy_watcher = PolicyWatcher(cfg.tunnel.policy_dir, cfg.tunnel.root_namespace)
        self.policies: PolicySet = self.policy_watcher.current
        # Allowed inbound connections and what they were allowed as, so a policy
        # change can close exactly the ones it no longer allows.
        self._active: dict[asyncio.Task[Any], tuple[ConnectionRequest, ConnectionRecord]] = {}
        self.registry = CollectorRegistry()
        self.metrics = TunnelMetrics(self.registry)
        self.registry.register(PolicyDocumentsCollector(self.policy_watcher))
        self.metrics_server: MetricsServer | None = None
        self._last_status: dict[str, Any] | None = None

    # --- decisions -----------------------------------------------------------

    def local_workload(self, ip: str) -> Workload | None:
        """The workload enrolled on this node at ``ip``.

        On a miss, re-read ``workloads.json`` (a stat when unchanged) before
        answering: the agent writes it before ``pod add`` returns, so a pod's
        first connection right after enrollment must not be refused just
        because the next poll has not come yet.
        """
        found = self.workloads.by_address(ip)
        if found is None and self.reload_workloads():
            found = self.workloads.by_address(ip)
        return found

    def is_mesh_destination(self, ip: str) -> bool:
        # The local lookup goes last: on a miss it stats workloads.json, so a
        # pod enrolled here a moment ago is already reached over the mesh.
        return (self.peers.by_address(ip) is not None
                or in_cidrs(ip, self.cfg.tunnel.mesh_cidrs)
                or self.local_workload(ip) is not None)

    def authorize_inbound(self, *, src_ip: str, src_identity: str | None, dst: Workload,
                          dst_ip: str, dst_port: int,
                          rec: ConnectionRecord | None = None) -> Decision:
        """Evaluate the L4 authorization policies for a connection to a local pod.

        An allowed connection is remembered (keyed by the task serving it) so
        a later policy change that denies it closes it.
        """
        request = ConnectionRequest(
            src_ip=src_ip, src_identity=src_identity, dst_ip=dst_ip, dst_port=dst_port,
            dst_workload=WorkloadRef(dst.name, dst.namespace, dict(dst.labels)))
        result = self.policies.evaluate(request)
        if result.dry_run_matches:
            log.info("dry-run policy matched", src=src_ip, dst=f"{dst_ip}:{dst_port}",
                     matches=[f"{m.policy} {m.action}" for m in result.dry_run_matches],
                     would_allow=result.dry_run_allowed)
        if result.allowed and rec is not None:
            task = asyncio.current_task()
            if task is not None:
                self._active[task] = (request, rec)
                task.add_done_callback(lambda t: self._active.pop(t, None))
        return Decision(allowed=result.allowed, policy=result.policy, reason=result.reason)

    def _apply_policy_change(self, new: PolicySet) -> None:
        self.policies = new
        closed = 0
        for task, (request, rec) in list(self._active.items()):
            decision = new.evaluate(request)
            if not decision.allowed:
                rec.result, rec.reason, rec.policy = "denied", decision.reason, decision.policy
                task.cancel()
                closed += 1
        log.info("policies loaded", count=len(new.policies), connections_closed=closed)

    def reload_policies(self) -> None:
        # The watcher judges each document on its own (a bad one fails closed for its
        # scope); a missing directory means no policies. Until the first read the set
        # in force denies everything.
        new = self.policy_watcher.poll()
        if new is None:
            return
        report = self.policy_watcher.report
        for result in report.problems if report is not None else ():
            for issue in result.issues:
                log.warning("policy document not enforced as written", file=result.file,
                            document=result.document, policy=result.key,
                            outcome=result.outcome.value, field=issue.path,
                            problem=issue.problem, effect=result.effect)
        self._apply_policy_change(new)

    def _metric_labels(self, rec: ConnectionRecord, reporter: str) -> dict[str, str]:
        src = self.workloads.by_address(rec.src_ip) or self.peers.by_address(rec.src_ip)
        dst = self.workloads.by_address(rec.dst_ip) or self.peers.by_address(rec.dst_ip)
        flag = _RESPONSE_FLAGS.get(rec.result, "-")
        return tcp_labels(reporter, _ref(src), _ref(dst), rec.src_identity, rec.dst_identity,
                          mtls=rec.path in ("hbone", "hbone-local"), response_flags=flag)

    def _reporters(self, rec: ConnectionRecord) -> tuple[str, ...]:
        if rec.path == "hbone-local":  # this tunnel is both ends
            return (REPORTER_SOURCE, REPORTER_DESTINATION)
        return (REPORTER_SOURCE,) if rec.direction == "outbound" else (REPORTER_DESTINATION,)

    def connection_opened(self, rec: ConnectionRecord) -> None:
        rec.opened = True
        for reporter in self._reporters(rec):
            self.metrics.connection_opened(self._metric_labels(rec, reporter))

    def connection_closed(self, rec: ConnectionRecord) -> None:
        rec.log()
        for reporter in self._reporters(rec):
            if rec.opened:
                # Istio: "sent" is server -> client, "received" client -> server.
                labels = self._metric_labels(rec, reporter)
                labels["response_flags"] = "-"
                self.metrics.connection_closed(labels, sent=rec.received, received=rec.sent)
            else:
                labels = self._metric_labels(rec, reporter)
                self.metrics.connection_failed(labels, labels["response_flags"])
        for callback in self.on_close:
            callback(rec)

    def status(self) -> dict[str, Any]:
        certs = []
        if self.hbone is not None:
            certs = self.hbone.certificates()
        error = self.policy_watcher.last_error
        return {"mode": self.cfg.tunnel.mode, "workloads": len(self.workloads),
                "peer_workloads": len(self.peers), "policies": len(self.policies.policies),
                "policy_error": str(error) if error else None, "certificates": certs,
                "active_inbound": len(self._active)}

    def write_status(self) -> None:
        status = self.status()
        if status != self._last_status:
            self._last_status = status
            write_json_atomic(Path(self.cfg.agent.state_dir) / STATUS_FILE, status, mode=0o644)

    # --- workloads -----------------------------------------------------------

    def reload_workloads(self) -> bool:
        try:
            mtime = self.workloads_path.stat().st_mtime
        except FileNotFoundError:
            return False
        if mtime == self._workloads_mtime:
            return False
        try:
            index = WorkloadIndex.from_json(json.loads(self.workloads_path.read_text()))
        except (OSError, ValueError, KeyError) as exc:
            log.warning("workloads file unreadable; keeping the last good one",
                        path=str(self.workloads_path), error=str(exc))
            return False
        self._workloads_mtime = mtime
        self.workloads = index
        log.info("workloads loaded", count=len(index))
        return True

    def reload_peers(self) -> bool:
        paths = [Path(p) for p in self.cfg.tunnel.peer_workloads]
        mtimes = tuple(p.stat().st_mtime if p.exists() else None for p in paths)
        if mtimes == self._peer_mtimes:
            return False
        workloads: list[Workload] = []
        for path in paths:
            try:
                workloads.extend(WorkloadIndex.from_json(json.loads(path.read_text())).workloads)
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError) as exc:
                log.warning("peer workloads unreadable; keeping the last good set",
                            path=str(path), error=str(exc))
                return False
        self._peer_mtimes = mtimes
        self.peers = WorkloadIndex(workloads)
        log.info("peer workloads loaded", count=len(self.peers))
        return True

    async def _watch_workloads(self) -> None:
        while True:
            self.reload_workloads()
            self.reload_peers()
            self.reload_policies()
            try:
                self.write_status()
            except OSError as exc:
                log.warning("could not write tunnel status", error=str(exc))
            await asyncio.sleep(WORKLOADS_POLL_SECONDS)

    # --- serving -------------------------------------------------------------

    def open_listeners(self) -> list[tuple[socket.socket, Handler]]:
        t = self.cfg.tunnel
        hbone_handler: Handler = self._serve_hbone
        plan: list[tuple[int, Handler]] = [(t.outbound_port, outbound.handle),
                                           (t.inbound_port, inbound.handle),
                                           (t.hbone_port, hbone_handler)]
        out: list[tuple[socket.socket, Handler]] = []
        try:
            for port, handler in plan:
                for family in (socket.AF_INET, socket.AF_INET6):
                    sock = sockets.listener(family, port, mark=t.socket_mark)
                    self.listeners.append(sock)
                    out.append((sock, handler))
        except OSError:
            self.close()
            raise
        return out

    async def _serve_hbone(self, _tunnel: Any, conn: socket.socket,
                           peer: tuple[str, int]) -> None:
        if self.hbone is None:
            log.info("HBONE connection refused: tunnel runs in plain mode", peer=peer[0])
            sockets.abort(conn)
            return
        await self.hbone.serve(self, conn, peer)

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
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._run_handler(handler, conn, peer))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _run_handler(self, handler: Handler, conn: socket.socket,
                           peer: tuple[str, int]) -> None:
        try:
            await handler(self, conn, peer)
        except asyncio.CancelledError:
            sockets.abort(conn)
            raise
        except Exception:
            log.exception("connection handler failed", peer=peer[0])
            sockets.abort(conn)

    def close(self) -> None:
        for sock in self.listeners:
            sock.close()
        self.listeners.clear()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        t = self.cfg.tunnel
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        self.reload_workloads()
        self.reload_peers()
        self.reload_policies()
        if t.metrics_port:
            self.metrics_server = serve_metrics(self.registry, t.metrics_host, t.metrics_port)
        if self.cfg.tunnel.mode == "hbone" and self.hbone is None:
            from agent.tunnel.hbone_endpoint import HboneEndpoint as Endpoint

            endpoint = Endpoint(self)
            endpoint.start()
            self.hbone = endpoint
        background = [asyncio.create_task(self._watch_workloads())]
        for sock, handler in self.open_listeners():
            background.append(asyncio.create_task(self._accept_loop(sock, handler)))
        log.info("tunnel ready", mode=t.mode, outbound=t.outbound_port, inbound=t.inbound_port,
                 hbone=t.hbone_port, workloads=len(self.workloads))
        await stop.wait()
        for task in background:
            task.cancel()
        self.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*background, *self.tasks, return_exceptions=True)
        if self.hbone is not None:
            await self.hbone.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        log.info("tunnel stopped")


def _ref(workload: Workload | None) -> WorkloadRef | None:
    if workload is None:
        return None
    return WorkloadRef(workload.name, workload.namespace, dict(workload.labels))


def install_event_loop_policy() -> str:
    """Use uvloop when it is installed; return the loop's name for the log."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def run(cfg: Config) -> None:
    loop_name = install_event_loop_policy()
    log.info("starting tunnel", event_loop=loop_name)
    tunnel = Tunnel(cfg)
    asyncio.run(tunnel.run())
