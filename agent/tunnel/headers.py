"""What the tunnel writes into and reads from an HBONE CONNECT's headers (pure).

- ``traceparent`` (W3C Trace Context): the outbound side makes one per connection
  and sends it; the inbound side takes the client's (or makes one if it is absent
  or malformed) and both log it, so the two ends of a connection correlate.
  As ztunnel: ``src/proxy.rs`` ``TraceParent`` (version 0, random 128-bit trace id
  and 64-bit parent id, flags 0; parsed only from the 55-character form),
  sent by ``src/proxy/outbound.rs`` ``create_hbone_request`` and read by
  ``src/proxy/inbound.rs`` ``extract_traceparent``.
- ``baggage``: the source workload's description, as ztunnel's
  ``src/baggage.rs`` ``baggage_header_val`` writes it from
  ``src/state/workload.rs`` ``Workload::baggage``: ``k8s.cluster.name``,
  ``k8s.namespace.name``, ``k8s.<workload type>.name``, ``service.name`` (the
  canonical service, not the service account), ``service.version`` (the canonical
  revision); empty values are left out. Our workloads are pods, so the type is
  ``pod``.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from agent.telemetry.metrics import WorkloadLike, canonical_revision, canonical_service

TRACEPARENT_HEADER = "traceparent"
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@dataclass(frozen=True)
class TraceParent:
    trace_id: int
    parent_id: int
    version: int = 0
    flags: int = 0

    @classmethod
    def new(cls) -> TraceParent:
        return cls(trace_id=secrets.randbits(128), parent_id=secrets.randbits(64))

    @classmethod
    def parse(cls, value: str | None) -> TraceParent | None:
        """The header's value parsed, or None when absent or malformed."""
        if not value:
            return None
        match = _TRACEPARENT.match(value.strip().lower())
        if match is None:
            return None
        version, trace_id, parent_id, flags = (int(g, 16) for g in match.groups())
        return cls(trace_id=trace_id, parent_id=parent_id, version=version, flags=flags)

    @classmethod
    def from_header(cls, value: str | None) -> TraceParent:
        """As ztunnel's inbound side: the client's traceparent, else a new one."""
        return cls.parse(value) or cls.new()

    def header(self) -> str:
        return (f"{self.version:02x}-{self.trace_id:032x}-{self.parent_id:016x}-"
                f"{self.flags:02x}")


def baggage_entries(workload: WorkloadLike, cluster: str | None = None,
                    workload_type: str = "pod") -> list[tuple[str, str]]:
    """The source workload's baggage members, in ztunnel's order."""
    entries = [("k8s.cluster.name", cluster or ""),
               ("k8s.namespace.name", workload.namespace),
               (f"k8s.{workload_type}.name", workload.name),
               ("service.name", canonical_service(workload)),
               ("service.version", canonical_revision(workload))]
    return [(key, value) for key, value in entries if value]
