"""The tunnel's view of enrolled workloads (pure), from the agent's workloads.json."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.addr import normalize_ip, parse_ip
from agent.contracts.files import WORKLOADS_FILE, WorkloadsFile


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
    def from_json(cls, data: Any, source: str = WORKLOADS_FILE) -> WorkloadIndex:
        """Index a decoded ``workloads.json`` (:class:`agent.contracts.files.WorkloadsFile`)
        read from ``source``; raises :class:`agent.contracts.ContractError` (a ValueError)."""
        return cls(Workload(name=w.name, namespace=w.namespace,
                            service_account=w.service_account, addresses=w.addresses,
                            identity=w.identity, labels=dict(w.labels))
                   for w in WorkloadsFile.from_json(data, source).workloads)


def in_cidrs(address: str, cidrs: Iterable[str]) -> bool:
    ip = parse_ip(address)
    return any(ip in ipaddress.ip_network(c, strict=False) for c in cidrs)


@dataclass(frozen=True)
class ServiceEntry:
    """A service a hostname ``:authority`` may name (ztunnel ``find_service_by_hostname``).

    ``ports`` maps service port -> target port; ``addresses`` are the endpoints;
    ``endpoint_ports`` (by endpoint address) overrides ``ports`` for one endpoint
    (a named target port, which the model carries per endpoint).
    """

    hostname: str
    namespace: str
    ports: Mapping[int, int]
    addresses: tuple[str, ...] = ()
    endpoint_ports: Mapping[str, Mapping[int, int]] = field(default_factory=dict)

    def target_port(self, service_port: int, endpoint: str) -> int | None:
        """The target port on ``endpoint`` for ``service_port``; None if not served there."""
        try:
            normalized = normalize_ip(endpoint)
        except ValueError:
            return None
        if normalized not in {normalize_ip(a) for a in self.addresses}:
            return None
        for address, ports in self.endpoint_ports.items():
            if normalize_ip(address) == normalized and ports.get(service_port):
                return ports[service_port]
        return self.ports.get(service_port) or None
