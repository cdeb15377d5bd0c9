"""The agent's persisted state: node plumbing it created and the enrolled pods.

Written atomically (temp file + rename) after every change so that a crash at
any moment leaves either the old or the new state on disk, never half of one.
No fsync: an agent crash keeps the page cache, and a power loss takes the pods'
network namespaces with it, which the start-up reconcile handles anyway; an
fsync per enrollment would double its latency.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.contracts import UnsupportedVersion, document_version
from agent.contracts.files import WORKLOADS_FILE, workloads_document
from agent.netns.node import NodeState
from agent.registry import Registry

# 2: a pod's dns_capture is its own choice (true/false) or null (the node's default);
# version 1 wrote true for "did not opt out", read as null.
STATE_VERSION = 2
STATE_FILE = "state.json"


@dataclass
class AgentState:
    node: NodeState = field(default_factory=NodeState)
    registry: Registry = field(default_factory=Registry)

    def to_json(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "node": self.node.to_json(),
                "pods": self.registry.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = STATE_FILE) -> AgentState:
        """Raises :class:`~agent.contracts.ContractError` (a ValueError) for a
        document that is not a state file of a version this agent knows."""
        if not isinstance(data, dict) or "version" not in data:
            raise ValueError(f"{source}: not an agent state file (no version)")
        version = document_version(data, source=source, what="agent state",
                                   supported=STATE_VERSION)
        pods = data.get("pods", [])
        if version == 1 and isinstance(pods, list):
            pods = [{**p, "dns_capture": None if p.get("dns_capture", True) else False}
                    if isinstance(p, dict) else p for p in pods]
        return cls(node=NodeState.from_json(data.get("node", {})),
                   registry=Registry.from_json(pods))


def write_json_atomic(path: Path, data: Any, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # json.dumps without indent runs the C encoder: with 1,000 pods an indented
    # dump per enrollment was most of the enrollment's time.
    text = json.dumps(data, separators=(",", ":"))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def load_state(state_dir: str) -> AgentState:
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        return AgentState()
    try:
        return AgentState.from_json(json.loads(path.read_text()), source=str(path))
    except UnsupportedVersion:
        raise  # says what to do: a newer agent wrote it
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{path} is unreadable ({exc}); move it away to start fresh, "
                         "then run 'meshagent uninstall' to clean up") from exc


def save_state(state_dir: str, state: AgentState, trust_domain: str) -> None:
    base = Path(state_dir)
    write_json_atomic(base / STATE_FILE, state.to_json())
    workloads = state.registry.workloads(trust_domain)
    # The tunnel (same node, unprivileged reader possible) only needs this part.
    write_json_atomic(base / WORKLOADS_FILE, workloads_document(workloads), mode=0o644)
