"""The tunnel's graceful drain on stop: in-flight connections get a bounded time to end.

Modelled on ztunnel's ``src/drain.rs`` (``run_with_drain``: stop accepting, wait up to
a deadline for the connections to finish on their own, then force the rest down) as
``src/proxy.rs``/``src/app.rs`` use it on SIGTERM. The caller (``Tunnel.run``) closes
the listeners and signals HBONE GOAWAY first; this module only waits and cuts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass

import structlog

log = structlog.get_logger("tunnel.drain")


@dataclass(frozen=True)
class DrainReport:
    """How a drain went: ``waited`` connections were in flight when it began, of which
    ``finished`` ended on their own before the deadline and ``cut`` were aborted."""

    waited: int
    finished: int
    cut: int


async def drain_connections(tasks: Collection[asyncio.Task[None]],
                            deadline_seconds: float) -> DrainReport:
    """Wait up to ``deadline_seconds`` for ``tasks`` (one per connection) to end, then
    cancel those still running and wait for their cancellation to finish.

    Side effects: cancels the tasks left at the deadline (each connection handler then
    aborts its sockets and writes its record, as for any cancelled connection); logs
    the drain's start and its result.
    """
    pending = {t for t in tasks if not t.done()}
    waited = len(pending)
    log.info("tunnel draining", connections=waited, deadline_seconds=deadline_seconds)
    if pending and deadline_seconds > 0:
        _, pending = await asyncio.wait(pending, timeout=deadline_seconds)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    report = DrainReport(waited=waited, finished=waited - len(pending), cut=len(pending))
    if report.cut:
        log.warning("drain deadline passed: connections cut", waited=report.waited,
                    finished=report.finished, cut=report.cut)
    else:
        log.info("tunnel drained", waited=report.waited, finished=report.finished, cut=0)
    return report
