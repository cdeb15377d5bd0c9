"""One proxied connection's facts, logged as a single access-log line at close.

Paths fill in what they learn (addresses, identities); only the pipeline
(:mod:`agent.tunnel.pipeline`) sets the outcome, the counts and logs the line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.telemetry.metrics import ServiceRef
from agent.tunnel.outcome import Direction, Outcome, Path

access_log = structlog.get_logger("tunnel.access")


@dataclass
class ConnectionRecord:
    direction: Direction
    path: Path
    src: str             # "ip:port" of the client as this tunnel saw it
    dst: str             # "ip:port" of the destination (the :authority inbound on 15008)
    src_ip: str = ""
    dst_ip: str = ""
    src_identity: str | None = None
    dst_identity: str | None = None
    sent: int = 0        # bytes client -> server
    received: int = 0    # bytes server -> client
    outcome: Outcome | None = None  # None while the connection is in progress
    reason: str | None = None
    policy: str | None = None
    traceparent: str | None = None
    # A connection to a Service VIP: the service (metric labels, the access log's
    # ``service``) and the address the client asked for (``original_dst``).
    service: ServiceRef | None = None
    original_dst: str | None = None
    # Sent to (or refused for) a waypoint: its address as the model names it.
    waypoint: str | None = None
    # Set once the upstream leg is up: the connection counts as opened in metrics.
    opened: bool = False
    started: float = field(default_factory=time.monotonic)
    # Metric labels per reporter, fixed when first reported (opened or failed).
    metric_labels: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)

    def fields(self) -> dict[str, Any]:
        """The access-log line's fields (without the event name)."""
        outcome = self.outcome or Outcome.OK
        out: dict[str, Any] = {
            "direction": self.direction.value, "src": self.src, "dst": self.dst,
            "path": self.path.value, "bytes_sent": self.sent, "bytes_received": self.received,
            "result": outcome.result, "response_flags": outcome.response_flag,
            "policy_decision": outcome.policy_decision,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 2),
        }
        for key in ("src_identity", "dst_identity", "reason", "policy", "traceparent",
                    "original_dst", "waypoint"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.service is not None:
            out["service"] = self.service.hostname
        return out

    def log(self) -> None:
        access_log.info("connection closed", **self.fields())


def fmt_addr(ip: str, port: int) -> str:
    """``ip:port`` ([v6]:port); just the IP when the port is unknown (0)."""
    if not port:
        return ip
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
