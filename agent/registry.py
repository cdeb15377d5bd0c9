"""The pod registry: which pods are enrolled on this node (pure logic).

The registry is the agent's desired state. It is saved as JSON in the state
directory after every change, handed to the tunnel as its workload list, and
compared with the kernel by the reconciler.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


class RegistryError(ValueError):
    """An enrollment conflicts with what is already enrolled."""


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    service_account: str
    netns: str
    ifname: str
    host_ifindex: int
    host_ifname: str
    addresses: tuple[str, ...]
    labels: Mapping[str, str] = field(default_factory=dict)
    # Whether enrolling this pod created the clsact qdisc on its veth.
    created_clsact: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["addresses"] = list(self.addresses)
        data["labels"] = dict(self.labels)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Pod:
        values = dict(data)
        values["addresses"] = tuple(values.get("addresses", ()))
        values["labels"] = dict(values.get("labels", {}))
        return cls(**values)

    def workload(self, trust_domain: str) -> dict[str, Any]:
        """What the tunnel needs to know about this pod."""
        return {
            "name": self.name,
            "namespace": self.namespace,
            "service_account": self.service_account,
            "addresses": list(self.addresses),
            "labels": dict(self.labels),
            "identity": f"spiffe://{trust_domain}/ns/{self.namespace}/sa/{self.service_account}",
        }


class Registry:
    def __init__(self, pods: list[Pod] | None = None) -> None:
        self._pods: dict[str, Pod] = {}
        for pod in pods or []:
            self.add(pod)

    def __iter__(self) -> Iterator[Pod]:
        return iter(sorted(self._pods.values(), key=lambda p: p.key))

    def __len__(self) -> int:
        return len(self._pods)

    def get(self, key: str) -> Pod | None:
        return self._pods.get(key)

    def find(self, *, netns: str | None = None, name: str | None = None,
             namespace: str | None = None) -> Pod | None:
        for pod in self._pods.values():
            if netns is not None and pod.netns == netns:
                return pod
            if name is not None and pod.name == name and pod.namespace == namespace:
                return pod
        return None

    def check_conflicts(self, pod: Pod) -> None:
        """Raise RegistryError if ``pod`` clashes with an enrolled pod."""
        if pod.key in self._pods:
            raise RegistryError(f"pod {pod.key} is already enrolled; "
                                "run 'meshagent pod del' first to re-enroll it")
        for other in self._pods.values():
            if other.netns == pod.netns:
                raise RegistryError(f"netns {pod.netns} is already enrolled as pod {other.key}")
            if other.host_ifindex == pod.host_ifindex:
                raise RegistryError(
                    f"veth {pod.host_ifname} (ifindex {pod.host_ifindex}) already belongs to "
                    f"enrolled pod {other.key}")
            shared = set(map(_norm, other.addresses)) & set(map(_norm, pod.addresses))
            if shared:
                raise RegistryError(
                    f"address {', '.join(sorted(shared))} is already enrolled for pod "
                    f"{other.key}; remove that pod first")

    def add(self, pod: Pod) -> None:
        self.check_conflicts(pod)
        self._pods[pod.key] = pod

    def remove(self, key: str) -> Pod | None:
        return self._pods.pop(key, None)

    def to_json(self) -> list[dict[str, Any]]:
        return [p.to_json() for p in self]

    @classmethod
    def from_json(cls, data: list[Mapping[str, Any]]) -> Registry:
        return cls([Pod.from_json(d) for d in data])


def _norm(address: str) -> str:
    return str(ipaddress.ip_address(address))
