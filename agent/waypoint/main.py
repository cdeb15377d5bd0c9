"""``meshagent waypoint``: one waypoint process (asyncio shell around the pure cores).

Side effects of :func:`run`: listens for HBONE on ``listen`` (15008), serves
Prometheus metrics on ``metrics_port``, polls the model file and config directory
every ``reload_interval`` seconds and swaps in a whole new
:class:`~agent.waypoint.config.WaypointState` when they change (a state that cannot
be built keeps the previous one, logged; never half-applied).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass
from pathlib import Path

import structlog
from prometheus_client import start_http_server

from agent.hbone.pool import HbonePool
from agent.identity.ca import load_ca
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityStore
from agent.model.loader import ModelLoadError, load_model_file
from agent.waypoint.config import WaypointState, build_state, read_documents
from agent.waypoint.limits import Budgets
from agent.waypoint.proxy import WaypointInputs, WaypointServer, WaypointSettings
from agent.waypoint.telemetry import WaypointMetrics

log = structlog.get_logger(__name__)


@dataclass
class WaypointOptions:
    name: str
    namespace: str
    service_account: str
    model_path: Path
    config_dir: Path
    ca_dir: Path
    listen_host: str = "0.0.0.0"
    listen_port: int = 15008
    metrics_port: int = 15020
    reload_interval: float = 2.0
    access_log: bool = True


def load_state(opts: WaypointOptions) -> WaypointState:
    """Read the model and the documents and build the state. Raises ModelLoadError."""
    model = load_model_file(opts.model_path)
    docs, problems = read_documents(opts.config_dir)
    state = build_state(model, docs, (opts.namespace, opts.name), problems)
    for problem in state.problems:
        log.warning("waypoint configuration problem", problem=problem)
    for what, b in state.refused.items():
        log.warning("waypoint binding refused", target=what, outcome=b.outcome.value,
                    reason=b.reason)
    return state


def check_report(namespace: str, name: str, model_path: Path,
                 config_dir: Path) -> tuple[str, int]:
    """What ``meshagent waypoint --check`` prints, and its exit code: 0 clean, 1 with
    problems, 2 when a policy fails closed or the model cannot be read. Pure but for
    reading the files."""
    from agent.waypoint.authz import DocumentOutcome

    try:
        model = load_model_file(model_path)
    except ModelLoadError as exc:
        return f"model: {exc}", 2
    docs, problems = read_documents(config_dir)
    state = build_state(model, docs, (namespace, name), problems)
    lines = [f"waypoint {namespace}/{name} ({state.me.traffic.value} traffic, routes from "
             f"{state.me.allowed_from.value})", "destinations:"]
    for (ip, port), dest in sorted(state.destinations.items()):
        what = (f"service {dest.service.namespace}/{dest.service.name}" if dest.service
                else f"workload {dest.workload.namespace}/{dest.workload.name}"
                if dest.workload else "?")
        lines.append(f"  {ip}:{port}  {dest.protocol.value}  {what}")
    for what, b in sorted(state.refused.items()):
        lines.append(f"refused: {what}: {b.outcome.value}: {b.reason}")
    for r in state.policy_results:
        lines.append(f"policy {r.name}: {r.outcome.value}"
                     + (f" ({'; '.join(r.problems)})" if r.problems else ""))
    lines += [f"problem: {p}" for p in state.problems]
    failed = any(r.outcome is DocumentOutcome.FAIL_CLOSED for r in state.policy_results)
    return "\n".join(lines), 2 if failed else 1 if state.problems else 0


def _stamp(opts: WaypointOptions) -> tuple[float, ...]:
    paths = [opts.model_path, *sorted(opts.config_dir.glob("*.y*ml"))]
    stamps: list[float] = []
    for p in paths:
        with contextlib.suppress(OSError):
            stamps.append(p.stat().st_mtime_ns)
    return (len(paths), *stamps)


async def serve(opts: WaypointOptions, stop: asyncio.Event | None = None) -> None:
    store = IdentityStore(load_ca(opts.ca_dir))
    identity = SpiffeId(store.trust_domain, opts.namespace, opts.service_account)
    state = load_state(opts)
    inputs = WaypointInputs(identity, state,
                            HbonePool(store.client_context, trust_domain=store.trust_domain),
                            WaypointMetrics(access_log=opts.access_log), WaypointSettings(),
                            Budgets(), random.Random())
    server = WaypointServer(inputs, store.server_context(identity), store.trust_domain)
    host, port = await server.start(opts.listen_host, opts.listen_port)
    if opts.metrics_port:
        start_http_server(opts.metrics_port, registry=inputs.metrics.registry)
    log.info("waypoint serving", waypoint=f"{opts.namespace}/{opts.name}",
             identity=str(identity), listen=f"{host}:{port}",
             destinations=len(state.destinations))
    stamp = _stamp(opts)
    stop = stop or asyncio.Event()
    try:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), opts.reload_interval)
            new = _stamp(opts)
            if new != stamp:
                stamp = new
                try:
                    inputs.state = load_state(opts)
                    log.info("waypoint reloaded", destinations=len(inputs.state.destinations))
                except ModelLoadError as exc:
                    log.error("waypoint reload failed; keeping the previous state",
                              error=str(exc))
                except Exception:  # a bug must not take the serving state down
                    log.exception("waypoint reload failed; keeping the previous state")
    finally:
        await server.close()


def run(opts: WaypointOptions) -> None:
    from agent.tunnel.main import install_event_loop_policy

    loop_name = install_event_loop_policy()
    log.info("starting waypoint", event_loop=loop_name)
    asyncio.run(serve(opts))
