"""The pod registry: which pods are enrolled on this node (pure logic).

The registry is the agent's desired state. It is saved as JSON in the state
directory after every change, handed to the tunnel as its workload list, and
compared with the kernel by the reconciler.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.addr import normalize_ip
from agent.contracts.api import ErrorCode
from agent.identity.spiffe import SpiffeId


class RegistryError(ValueError):
    """An enrollment conflicts with what is already enrolled; ``code`` is the
    API error code it is answered with."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.CONFLICT) -> None:
        super().__init__(message)
        self.code = code


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
    # None: DNS captured as the node's datapath.dns_capture says; True/False: the
    # pod's own choice (Istio's ambient.istio.io/dns-capture annotation).
    dns_capture: bool | None = None
    # metadata.uid of the Kubernetes pod ("" when not enrolled from the API).
    uid: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_json(self) -> dict[str, Any]:
        # Built by hand: dataclasses.asdict deep-copies, and the state file
        # serialises every pod on every change.
        return {"name": self.name, "namespace": self.namespace,
                "service_account": self.service_account, "netns": self.netns,
                "ifname": self.ifname, "host_ifindex": self.host_ifindex,
                "host_ifname": self.host_ifname, "addresses": list(self.addresses),
                "labels": dict(self.labels), "created_clsact": self.created_clsact,
                "dns_capture": self.dns_capture, "uid": self.uid}

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
            "identity": SpiffeId(trust_domain, self.namespace, self.service_account).uri,
        }


class Registry:
    """Enrolled pods, indexed by every key a conflict check needs, so that
    enrolling the 1,000th pod costs what enrolling the first did."""

    def __init__(self, pods: list[Pod] | None = None) -> None:
        self._pods: dict[str, Pod] = {}
        self._by_netns: dict[str, Pod] = {}
        self._by_ifindex: dict[int, Pod] = {}
        self._by_address: dict[str, Pod] = {}
        # Serialised forms, made once per pod: the state file is rewritten on
        # every change and must not cost a re-serialisation of every pod.
        self._json: dict[str, dict[str, Any]] = {}
        self._workloads: dict[str, tuple[str, dict[str, Any]]] = {}
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
        if netns is not None:
            return self._by_netns.get(netns)
        if name is not None:
            return self._pods.get(f"{namespace}/{name}")
        return None

    def check_conflicts(self, pod: Pod) -> None:
        """Raise RegistryError if ``pod`` clashes with an enrolled pod."""
        if pod.key in self._pods:
            raise RegistryError(f"pod {pod.key} is already enrolled; "
                                "run 'meshagent pod del' first to re-enroll it",
                                ErrorCode.ALREADY_ENROLLED)
        other = self._by_netns.get(pod.netns)
        if other is not None:
            raise RegistryError(f"netns {pod.netns} is already enrolled as pod {other.key}")
        other = self._by_ifindex.get(pod.host_ifindex)
        if other is not None:
            raise RegistryError(
                f"veth {pod.host_ifname} (ifindex {pod.host_ifindex}) already belongs to "
                f"enrolled pod {other.key}")
        for address in map(normalize_ip, pod.addresses):
            other = self._by_address.get(address)
            if other is not None:
                raise RegistryError(
                    f"address {address} is already enrolled for pod {other.key}; "
                    "remove that pod first")

    def add(self, pod: Pod) -> None:
        self.check_conflicts(pod)
        self._pods[pod.key] = pod
        self._json[pod.key] = pod.to_json()
        self._by_netns[pod.netns] = pod
        self._by_ifindex[pod.host_ifindex] = pod
        for address in pod.addresses:
            self._by_address[normalize_ip(address)] = pod

    def remove(self, key: str) -> Pod | None:
        pod = self._pods.pop(key, None)
        self._json.pop(key, None)
        self._workloads.pop(key, None)
        if pod is not None:
            self._by_netns.pop(pod.netns, None)
            self._by_ifindex.pop(pod.host_ifindex, None)
            for address in pod.addresses:
                self._by_address.pop(normalize_ip(address), None)
        return pod

    def to_json(self) -> list[dict[str, Any]]:
        return [self._json[key] for key in sorted(self._json)]

    def workloads(self, trust_domain: str) -> list[dict[str, Any]]:
        """What the tunnel needs about every pod (see :meth:`Pod.workload`)."""
        out = []
        for key in sorted(self._pods):
            cached = self._workloads.get(key)
            if cached is None or cached[0] != trust_domain:
                cached = self._workloads[key] = (trust_domain,
                                                 self._pods[key].workload(trust_domain))
            out.append(cached[1])
        return out

    @classmethod
    def from_json(cls, data: list[Mapping[str, Any]]) -> Registry:
        return cls([Pod.from_json(d) for d in data])
