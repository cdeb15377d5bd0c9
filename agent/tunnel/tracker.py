"""Connections the tunnel let through, so a policy change can revoke exactly those
it no longer allows (as ztunnel's ``src/proxy/connection_manager.rs``: ``assert_rbac``
registers a connection with the context it was authorized with, and its
``PolicyWatcher`` re-checks every tracked connection when policies change and
closes the ones now denied).

The tracker never sets a connection's outcome: it marks the entry revoked (with
the decision that revoked it) and calls the entry's ``cancel``; the pipeline
sees the mark and records the denial.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agent.policy import ConnectionRequest, Decision


@dataclass(eq=False)
class TrackedConnection:
    request: ConnectionRequest
    cancel: Callable[[], object]
    revoked: Decision | None = None


class ConnectionTracker:
    def __init__(self) -> None:
        self._active: set[TrackedConnection] = set()

    def track(self, request: ConnectionRequest,
              cancel: Callable[[], object]) -> TrackedConnection:
        entry = TrackedConnection(request, cancel)
        self._active.add(entry)
        return entry

    def release(self, entry: TrackedConnection) -> None:
        self._active.discard(entry)

    def revoke(self, evaluate: Callable[[ConnectionRequest], Decision]) -> int:
        """Re-evaluate every tracked connection; cancel those now denied. Returns how many.

        Side effects: calls ``cancel`` of each denied entry and forgets it.
        """
        closed = 0
        for entry in list(self._active):
            decision = evaluate(entry.request)
            if not decision.allowed:
                entry.revoked = decision
                self._active.discard(entry)
                entry.cancel()
                closed += 1
        return closed

    def __len__(self) -> int:
        return len(self._active)
