"""The tunnel's view of enrolled workloads (pure), from the agent's workloads.json."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.addr import normalize_ip, parse_ip


@dataclass(frozen=True)
class Workload:
    name: str
    namespace: str
    service_account: str
    addresses: tuple[str, ...]
    identity: str
    labels: Mapping[str, str] = field(default_factory=dict)


class WorkloadIndex:
    """Enrolled workloads of this node, looked up by address."""

    def __init__(self, workloads: Iterable[Workload] = ()) -> None:
        self._by_addr: dict[str, Workload] = {}
        self.workloads = list(workloads)
        for w in self.workloads:
            for a in w.addresses:
                self._by_addr[normalize_ip(a)] = w

    def by_address(self, address: str) -> Workload | None:
        try:
            return self._by_addr.get(normalize_ip(address))
        except ValueError:
            return None

    def __len__(self) -> int:
        return len(self.workloads)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WorkloadIndex:
        return cls(Workload(name=w["name"], namespace=w["namespace"],
                            service_account=w["service_account"],
                            addresses=tuple(w["addresses"]), identity=w["identity"],
                            labels=dict(w.get("labels", {})))
                   for w in data.get("workloads", []))


def in_cidrs(address: str, cidrs: Iterable[str]) -> bool:
    ip = parse_ip(address)
    return any(ip in ipaddress.ip_network(c, strict=False) for c in cidrs)
