"""The last seen objects of every watched kind (pure: no I/O, no threads).

:meth:`ClusterCache.apply` takes the watch layer's events. A relist replaces a
kind's objects wholesale (so deletions missed while disconnected are seen); an
object that cannot be read is reported and its last good version kept; a failure
changes nothing (an unreachable API server leaves everything as last seen).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from agent.k8s.objects import (
    Namespace,
    ObjectProblem,
    Pod,
    object_key,
    read_namespace,
    read_pod,
)
from agent.k8s.watch import Changed, Kind, Listed, WatchEvent, WatchFailed


@dataclass
class Delta:
    kind: Kind
    keys: set[str] = field(default_factory=set)
    # namespaces whose labels changed (their pods are re-judged)
    namespaces: set[str] = field(default_factory=set)
    relisted: bool = False
    # objects that could not be read (their last good version was kept)
    problems: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.keys and not self.namespaces and not self.relisted


def _read(kind: Kind, obj: Any) -> Any:
    if kind in (Kind.NODE_PODS, Kind.PODS):
        return read_pod(obj)
    if kind is Kind.NAMESPACES:
        return read_namespace(obj)
    key = object_key(obj)
    if not key:
        return ObjectProblem(kind.value, "", "metadata.name", "is missing or not a string")
    return obj


class ClusterCache:
    def __init__(self, problem_history: int = 100) -> None:
        self.raw: dict[Kind, dict[str, dict[str, Any]]] = {k: {} for k in Kind}
        self.node_pods: dict[str, Pod] = {}
        self.namespaces: dict[str, Namespace] = {}
        self.synced: set[Kind] = set()
        self.problems: deque[str] = deque(maxlen=problem_history)
        self.failures: dict[Kind, WatchFailed] = {}

    def is_synced(self, *kinds: Kind) -> bool:
        return all(k in self.synced for k in kinds)

    def _store(self, kind: Kind, key: str, obj: dict[str, Any], parsed: Any) -> None:
        self.raw[kind][key] = obj
        if kind is Kind.NODE_PODS:
            self.node_pods[key] = parsed
        elif kind is Kind.NAMESPACES:
            self.namespaces[key] = parsed

    def _remove(self, kind: Kind, key: str) -> None:
        self.raw[kind].pop(key, None)
        if kind is Kind.NODE_PODS:
            self.node_pods.pop(key, None)
        elif kind is Kind.NAMESPACES:
            self.namespaces.pop(key, None)

    def _labels(self, kind: Kind, key: str) -> dict[str, str] | None:
        ns = self.namespaces.get(key) if kind is Kind.NAMESPACES else None
        return None if ns is None else ns.labels

    def _upsert(self, kind: Kind, obj: Any, delta: Delta) -> str | None:
        parsed = _read(kind, obj)
        key = object_key(obj)
        if isinstance(parsed, ObjectProblem):
            self.problems.append(str(parsed))
            delta.problems.append(str(parsed))
            return key or None
        before = self._labels(kind, key)
        self._store(kind, key, obj, parsed)
        delta.keys.add(key)
        if kind is Kind.NAMESPACES and before != parsed.labels:
            delta.namespaces.add(key)
        return key

    def apply(self, event: WatchEvent) -> Delta:
        delta = Delta(event.kind)
        if isinstance(event, WatchFailed):
            self.failures[event.kind] = event
            return delta
        self.failures.pop(event.kind, None)
        if isinstance(event, Listed):
            delta.relisted = True
            seen = set()
            for obj in event.items:
                key = self._upsert(event.kind, obj, delta)
                if key:
                    seen.add(key)
            for key in set(self.raw[event.kind]) - seen:
                self._remove(event.kind, key)
                delta.keys.add(key)
                if event.kind is Kind.NAMESPACES:
                    delta.namespaces.add(key)
            self.synced.add(event.kind)
            return delta
        assert isinstance(event, Changed)
        if event.type == "DELETED":
            key = object_key(event.obj)
            if key in self.raw[event.kind]:
                self._remove(event.kind, key)
                delta.keys.add(key)
                if event.kind is Kind.NAMESPACES:
                    delta.namespaces.add(key)
            return delta
        self._upsert(event.kind, event.obj, delta)
        return delta
