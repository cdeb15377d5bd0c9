"""Files the agent and the tunnel exchange in the agent's state directory (pure).

``workloads.json`` - written by the agent after every enrollment change
(:func:`agent.state.save_state`), read by the tunnel of the same node (and, in
the lab, by the other nodes' tunnels as peer workloads)::

    {"version": 1, "workloads": [{"name": "web-0", "namespace": "shop",
      "service_account": "web", "addresses": ["10.244.1.10"], "labels": {},
      "identity": "spiffe://cluster.local/ns/shop/sa/web"}, ...]}

``tunnel-status.json`` - written by the tunnel when its status changes, read
by the agent for ``meshagent status`` (the ``tunnel`` part of the ``status``
API result)::

    {"version": 1, "mode": "hbone", "workloads": 2, "peer_workloads": 2,
     "policies": 0, "policy_error": null, "certificates": [...], "active_inbound": 0}

Both are replaced atomically (temporary file + rename) by their writer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.contracts import ContractError, document_version, field_of

WORKLOADS_FILE = "workloads.json"
WORKLOADS_VERSION = 1
TUNNEL_STATUS_FILE = "tunnel-status.json"
TUNNEL_STATUS_VERSION = 1


def _str_tuple(data: Mapping[str, Any], key: str, *, source: str, what: str) -> tuple[str, ...]:
    items = field_of(data, key, list, source=source, what=what)
    if not all(isinstance(i, str) for i in items):
        raise ContractError(f"{source}: {what}.{key} must be a list of strings")
    return tuple(items)


def _str_map(data: Mapping[str, Any], key: str, *, source: str, what: str) -> dict[str, str]:
    items = field_of(data, key, dict, source=source, what=what, default={})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in items.items()):
        raise ContractError(f"{source}: {what}.{key} must map strings to strings")
    return dict(items)


@dataclass(frozen=True)
class WorkloadEntry:
    """One enrolled pod as the tunnel needs to know it."""

    name: str
    namespace: str
    service_account: str
    addresses: tuple[str, ...]
    identity: str  # SPIFFE ID URI
    labels: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "namespace": self.namespace,
                "service_account": self.service_account, "addresses": list(self.addresses),
                "labels": dict(self.labels), "identity": self.identity}

    @classmethod
    def from_json(cls, data: Any, *, source: str, index: int = 0) -> WorkloadEntry:
        what = f"workloads[{index}]"
        if not isinstance(data, Mapping):
            raise ContractError(f"{source}: {what} must be a JSON object")
        text = {k: field_of(data, k, str, source=source, what=what)
                for k in ("name", "namespace", "service_account", "identity")}
        return cls(addresses=_str_tuple(data, "addresses", source=source, what=what),
                   labels=_str_map(data, "labels", source=source, what=what), **text)


@dataclass(frozen=True)
class WorkloadsFile:
    """``workloads.json``: the workloads enrolled on one node."""

    workloads: tuple[WorkloadEntry, ...] = ()
    version: int = WORKLOADS_VERSION

    def to_json(self) -> dict[str, Any]:
        return workloads_document([w.to_json() for w in self.workloads])

    @classmethod
    def from_json(cls, data: Any, source: str = WORKLOADS_FILE) -> WorkloadsFile:
        """Parse a decoded ``workloads.json`` (read from ``source``, named in
        errors). Raises :class:`~agent.contracts.ContractError`."""
        version = document_version(data, source=source, what="workloads file",
                                   supported=WORKLOADS_VERSION)
        items = field_of(data, "workloads", list, source=source, what="workloads file",
                         default=[])
        return cls(tuple(WorkloadEntry.from_json(w, source=source, index=i)
                         for i, w in enumerate(items)), version)


def workloads_document(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The JSON document of ``workloads.json`` around already-serialised entries
    (the agent caches each pod's entry: see :meth:`agent.registry.Pod.workload`,
    whose keys are :class:`WorkloadEntry`'s)."""
    return {"version": WORKLOADS_VERSION, "workloads": list(entries)}


@dataclass(frozen=True)
class TunnelStatus:
    """``tunnel-status.json``: what the tunnel reports about itself."""

    mode: str  # "hbone" | "plain"
    workloads: int  # enrolled on this node
    peer_workloads: int  # known on other nodes
    policies: int  # AuthorizationPolicies in force
    policy_error: str | None = None  # why the last policy change was rejected
    certificates: tuple[Mapping[str, Any], ...] = ()  # one per workload identity served
    active_inbound: int = 0  # inbound connections open now
    version: int = TUNNEL_STATUS_VERSION

    def to_json(self) -> dict[str, Any]:
        return {"version": TUNNEL_STATUS_VERSION, "mode": self.mode,
                "workloads": self.workloads, "peer_workloads": self.peer_workloads,
                "policies": self.policies, "policy_error": self.policy_error,
                "certificates": [dict(c) for c in self.certificates],
                "active_inbound": self.active_inbound}

    @classmethod
    def from_json(cls, data: Any, source: str = TUNNEL_STATUS_FILE) -> TunnelStatus:
        """Parse a decoded ``tunnel-status.json``. Raises
        :class:`~agent.contracts.ContractError`."""
        what = "tunnel status"
        version = document_version(data, source=source, what=what,
                                   supported=TUNNEL_STATUS_VERSION)
        certs = field_of(data, "certificates", list, source=source, what=what, default=[])
        if not all(isinstance(c, Mapping) for c in certs):
            raise ContractError(f"{source}: {what}.certificates must be a list of objects")

        def count(key: str) -> int:
            value: int = field_of(data, key, int, source=source, what=what, default=0)
            return value

        return cls(mode=field_of(data, "mode", str, source=source, what=what),
                   workloads=count("workloads"), peer_workloads=count("peer_workloads"),
                   policies=count("policies"),
                   policy_error=field_of(data, "policy_error", (str, type(None)), source=source,
                                         what=what, default=None),
                   certificates=tuple(certs), active_inbound=count("active_inbound"),
                   version=version)
