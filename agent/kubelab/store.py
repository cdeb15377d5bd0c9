"""The lab API server's object store (no I/O): one global resourceVersion counter,
objects by resource and key, a bounded event history for watches, and 410 Expired
for a watch that asks for a version older than the history holds (as etcd
compaction makes kube-apiserver answer)."""

from __future__ import annotations

import copy
import datetime
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from agent.kubelab import patch as patches
from agent.kubelab.resources import Resource
from agent.kubelab.validate import Invalid, validate

Key = tuple[str, str]  # (namespace or "", name)


class ApiError(Exception):
    """An error the server answers with a ``Status`` object."""

    def __init__(self, code: int, reason: str, message: str,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                               "status": "Failure", "message": self.message,
                               "reason": self.reason, "code": self.code}
        if self.details:
            out["details"] = self.details
        return out


def not_found(resource: Resource, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{resource.plural} "{name}" not found',
                    {"name": name, "kind": resource.plural})


def expired(rv: int, oldest: int) -> ApiError:
    return ApiError(410, "Expired", f"too old resource version: {rv} ({oldest})")


@dataclass(frozen=True)
class Event:
    rv: int
    resource: Resource
    type: str  # ADDED MODIFIED DELETED
    obj: dict[str, Any]
    old: dict[str, Any] | None


Subscriber = Callable[[Event], None]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Store:
    def __init__(self, history: int = 1000) -> None:
        self.rv = 1
        self.objects: dict[Resource, dict[Key, dict[str, Any]]] = {}
        self.history: deque[Event] = deque(maxlen=history)
        # Every event after this version is in the history.
        self.floor = 1
        self.subscribers: list[Subscriber] = []

    # -- reading ------------------------------------------------------------

    def items(self, resource: Resource, namespace: str | None = None
              ) -> Iterator[dict[str, Any]]:
        for (ns, _), obj in sorted(self.objects.get(resource, {}).items()):
            if namespace is None or ns == namespace:
                yield obj

    def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any]:
        obj = self.objects.get(resource, {}).get((namespace, name))
        if obj is None:
            raise not_found(resource, name)
        return obj

    def events_since(self, rv: int) -> list[Event]:
        """Events after ``rv``; :class:`ApiError` 410 if the history no longer covers it."""
        if rv < self.floor:
            raise expired(rv, self.floor)
        return [e for e in self.history if e.rv > rv]

    def inject_unvalidated(self, resource: Resource, obj: dict[str, Any]) -> None:
        """Fault injection for tests: store and announce ``obj`` as MODIFIED (or ADDED)
        without validation, as a buggy or newer API server might send it."""
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", "") if resource.namespaced else "", meta.get("name", ""))
        old = self.objects.get(resource, {}).get(key)
        self.rv += 1
        if isinstance(meta, dict):
            meta["resourceVersion"] = str(self.rv)
        self.objects.setdefault(resource, {})[key] = obj
        self._emit(resource, "MODIFIED" if old else "ADDED", obj, old)

    def restore(self, resource: Resource, obj: dict[str, Any]) -> None:
        """Put back an object saved by :meth:`dump` (uid and resourceVersion kept, as
        etcd keeps them across an API server restart); validated. Call
        :meth:`compact` after the last one, so older watches get 410 and relist."""
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", "") if resource.namespaced else "", meta.get("name", ""))
        self._validated(resource, obj)
        self.objects.setdefault(resource, {})[key] = copy.deepcopy(obj)
        self.rv = max(self.rv, int(meta.get("resourceVersion") or 0))

    def dump(self) -> list[dict[str, Any]]:
        """Every stored object (for :meth:`restore`)."""
        return [copy.deepcopy(obj) for objs in self.objects.values() for obj in objs.values()]

    def compact(self) -> None:
        """Forget the history (as etcd compaction): older watches get 410 Expired."""
        self.history.clear()
        self.floor = self.rv

    # -- writing ------------------------------------------------------------

    def _emit(self, resource: Resource, type_: str, obj: dict[str, Any],
              old: dict[str, Any] | None) -> None:
        event = Event(self.rv, resource, type_, obj, old)
        if len(self.history) == self.history.maxlen:
            self.floor = self.history[0].rv
        self.history.append(event)
        for sub in list(self.subscribers):
            sub(event)

    def _check_namespace(self, resource: Resource, namespace: str) -> None:
        if not resource.namespaced:
            return
        from agent.kubelab.resources import BY_PATH
        ns_res = BY_PATH[("", "v1", "namespaces")]
        if ("", namespace) not in self.objects.get(ns_res, {}):
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                           {"name": namespace, "kind": "namespaces"})

    def _validated(self, resource: Resource, obj: dict[str, Any]) -> None:
        if obj.get("kind") != resource.kind or obj.get("apiVersion") != resource.group_version:
            raise ApiError(400, "BadRequest",
                           f"the object is {obj.get('apiVersion')}/{obj.get('kind')}, "
                           f"this endpoint takes {resource.group_version}/{resource.kind}")
        try:
            validate(obj, resource.builtin)
        except Invalid as e:
            name = obj.get("metadata", {}).get("name", "") if isinstance(
                obj.get("metadata"), dict) else ""
            raise ApiError(422, "Invalid", f'{resource.kind} "{name}" is invalid: {e}',
                           {"name": name, "kind": resource.kind, "group": resource.group,
                            "causes": [{"reason": "FieldValueInvalid", "message": e.problem,
                                        "field": e.field}]}) from None

    def create(self, resource: Resource, namespace: str, body: Any,
               dry_run: bool = False) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body is not a JSON object")
        obj = copy.deepcopy(body)
        obj.setdefault("apiVersion", resource.group_version)
        obj.setdefault("kind", resource.kind)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "BadRequest", "metadata is not an object")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        if resource.namespaced:
            if meta.get("namespace", namespace) != namespace:
                raise ApiError(400, "BadRequest", "the namespace of the object does not "
                               "match the namespace of the request")
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        self._check_namespace(resource, namespace)
        key = (namespace if resource.namespaced else "", str(meta.get("name", "")))
        if key in self.objects.get(resource, {}):
            raise ApiError(409, "AlreadyExists",
                           f'{resource.plural} "{key[1]}" already exists',
                           {"name": key[1], "kind": resource.plural})
        meta.pop("resourceVersion", None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        if resource.kind == "Namespace":
            obj.setdefault("status", {"phase": "Active"})
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = key[1]
        meta["resourceVersion"] = str(self.rv + 1)
        self._validated(resource, obj)
        if dry_run:
            return obj
        self.rv += 1
        self.objects.setdefault(resource, {})[key] = obj
        self._emit(resource, "ADDED", obj, None)
        return obj

    def update(self, resource: Resource, namespace: str, name: str, body: Any,
               subresource: str = "", dry_run: bool = False) -> dict[str, Any]:
        old = self.get(resource, namespace if resource.namespaced else "", name)
        if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
            raise ApiError(400, "BadRequest", "the body is not an object with metadata")
        want_rv = body.get("metadata", {}).get("resourceVersion")
        if want_rv and want_rv != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict",
                           f'Operation cannot be fulfilled on {resource.plural} "{name}": '
                           "the object has been modified; please apply your changes to the "
                           "latest version and try again", {"name": name, "kind": resource.plural})
        return self._replace(resource, old, copy.deepcopy(body), subresource, dry_run)

    def patch(self, resource: Resource, namespace: str, name: str, content_type: str,
              body: Any, subresource: str = "", dry_run: bool = False) -> dict[str, Any]:
        ns = namespace if resource.namespaced else ""
        try:
            old = self.get(resource, ns, name)
        except ApiError:
            if content_type.startswith("application/apply-patch"):
                return self.create(resource, namespace, body, dry_run)
            raise
        try:
            new = patches.apply_patch(content_type, copy.deepcopy(old), body)
        except patches.PatchError as e:
            raise ApiError(422 if "apply" not in str(e) else 400, "Invalid", str(e)) from None
        if not isinstance(new, dict):
            raise ApiError(422, "Invalid", "the patch does not leave an object")
        return self._replace(resource, old, new, subresource, dry_run)

    def _replace(self, resource: Resource, old: dict[str, Any], new: dict[str, Any],
                 subresource: str, dry_run: bool) -> dict[str, Any]:
        meta = new.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(422, "Invalid", "metadata: must be an object")
        for fixed in ("name", "namespace", "uid", "creationTimestamp"):
            if fixed in old["metadata"]:
                meta[fixed] = old["metadata"][fixed]
            else:
                meta.pop(fixed, None)
        if subresource == "status":
            # The status strategy: spec stays; metadata and status may change
            # (Istio patches its annotation through pods/status for that reason).
            if "spec" in old:
                new["spec"] = old["spec"]
            else:
                new.pop("spec", None)
        elif subresource:
            raise ApiError(404, "NotFound", f"no subresource {subresource!r}")
        elif resource.status:
            if "status" in old:
                new["status"] = old["status"]
            else:
                new.pop("status", None)
        if new.get("spec") != old.get("spec"):
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        unchanged = {k: v for k, v in new.items() if k != "metadata"} == {
            k: v for k, v in old.items() if k != "metadata"} and {
            k: v for k, v in meta.items() if k != "resourceVersion"} == {
            k: v for k, v in old["metadata"].items() if k != "resourceVersion"}
        if unchanged:
            return old
        meta["resourceVersion"] = str(self.rv + 1)
        self._validated(resource, new)
        if dry_run:
            return new
        self.rv += 1
        key = (old["metadata"].get("namespace", ""), old["metadata"]["name"])
        self.objects[resource][key] = new
        self._emit(resource, "MODIFIED", new, old)
        return new

    def delete(self, resource: Resource, namespace: str, name: str,
               dry_run: bool = False) -> dict[str, Any]:
        ns = namespace if resource.namespaced else ""
        old = self.get(resource, ns, name)
        if dry_run:
            return old
        if resource.kind == "Namespace":
            for res, objs in list(self.objects.items()):
                if res.namespaced:
                    for key in [k for k in objs if k[0] == name]:
                        self.delete(res, key[0], key[1])
        self.rv += 1
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self.rv)
        del self.objects[resource][(ns, name)]
        self._emit(resource, "DELETED", gone, old)
        return gone
