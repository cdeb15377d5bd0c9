"""The patch types kubectl and clients send.

- ``application/merge-patch+json``: RFC 7386 (kubectl label/annotate, Istio's
  redirection annotation);
- ``application/json-patch+json``: RFC 6902 via the ``jsonpatch`` package;
- ``application/strategic-merge-patch+json`` (kubectl apply/edit on built-in kinds):
  merge patch, except that lists with a Kubernetes merge key (``containers`` by
  ``name``, ``ports`` by ``containerPort``/``port``, ...) merge element by element,
  and the ``$patch``/``$setElementOrder``/``$retainKeys``/``$deleteFromPrimitiveList``
  directives are honoured in the subset kubectl emits (``$patch: delete`` on a list
  element or map, order hints ignored). This is the lab's subset of
  k8s.io/apimachinery pkg/util/strategicpatch, not all of it.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch

MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "volumes": "name", "volumeMounts": "mountPath", "env": "name", "imagePullSecrets": "name",
    "tolerations": "key", "hostAliases": "ip", "conditions": "type",
    "ownerReferences": "uid", "subjects": "name", "readinessGates": "conditionType",
}
# Lists whose merge key depends on where they are.
PORT_KEYS = ("containerPort", "port")


class PatchError(ValueError):
    pass


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _merge_key(name: str, items: list[Any]) -> str | None:
    if name == "ports":
        for key in PORT_KEYS:
            if all(isinstance(i, dict) and key in i for i in items):
                return key
        return None
    return MERGE_KEYS.get(name)


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return None
    result = dict(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key in ("$retainKeys", "$patch"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            result[name] = [v for v in result.get(name, []) if v not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and isinstance(result.get(key), list):
            mkey = _merge_key(key, value + result[key])
            result[key] = _merge_list(result[key], value, mkey)
        else:
            merged = strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _merge_list(current: list[Any], patch: list[Any], key: str | None) -> list[Any]:
    if key is None:
        return [copy.deepcopy(v) for v in patch if not (isinstance(v, dict) and "$patch" in v)]
    out = [copy.deepcopy(v) for v in current]
    for item in patch:
        if not isinstance(item, dict):
            raise PatchError(f"list element {item!r} has no merge key {key!r}")
        index = next((i for i, v in enumerate(out)
                      if isinstance(v, dict) and v.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if index is not None:
                out.pop(index)
        elif index is None:
            out.append(strategic_merge_patch({}, item))
        else:
            out[index] = strategic_merge_patch(out[index], item)
    return out


def json_patch(target: Any, patch: Any) -> Any:
    try:
        return jsonpatch.apply_patch(target, patch)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError) as e:
        raise PatchError(f"the JSON patch does not apply: {e}") from None


def apply_patch(content_type: str, target: Any, patch: Any) -> Any:
    kind = content_type.split(";")[0].strip()
    if kind == "application/merge-patch+json":
        return merge_patch(target, patch)
    if kind == "application/strategic-merge-patch+json":
        return strategic_merge_patch(target, patch)
    if kind == "application/json-patch+json":
        return json_patch(target, patch)
    if kind == "application/apply-patch+yaml":
        # Server-side apply, lab subset: the applied configuration merged in
        # (no field managers, no conflicts).
        return strategic_merge_patch(target, patch)
    raise PatchError(f"unsupported patch type {kind!r}")
