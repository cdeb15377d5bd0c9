"""One proxied connection's facts, logged as a single access-log line at close."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import structlog

access_log = structlog.get_logger("tunnel.access")


@dataclass
class ConnectionRecord:
    direction: str  # "outbound" | "inbound"
    src: str
    dst: str
    src_ip: str = ""
    dst_ip: str = ""
    path: str = ""  # "plain" | "passthrough" | "hbone" | "hbone-local"
    src_identity: str | None = None
    dst_identity: str | None = None
    sent: int = 0        # bytes client -> server
    received: int = 0    # bytes server -> client
    result: str = "ok"   # ok | reset | refused | connect_failed | denied | error
    reason: str | None = None
    policy: str | None = None
    # Set once the upstream leg is up: the connection counts as opened in metrics.
    opened: bool = False
    started: float = field(default_factory=time.monotonic)

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "direction": self.direction, "src": self.src, "dst": self.dst, "path": self.path,
            "bytes_sent": self.sent, "bytes_received": self.received, "result": self.result,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 2),
        }
        out["policy_decision"] = "deny" if self.result == "denied" else "allow"
        for key in ("src_identity", "dst_identity", "reason", "policy"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    def log(self) -> None:
        access_log.info("connection closed", **self.fields())


def fmt_addr(ip: str, port: int) -> str:
    """``ip:port`` ([v6]:port); just the IP when the port is unknown (0)."""
    if not port:
        return ip
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
