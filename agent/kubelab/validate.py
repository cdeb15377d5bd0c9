"""Every object the lab API server stores is checked against Kubernetes' schemas.

Built-in kinds: the JSON schemas (derived from Kubernetes' OpenAPI) that the PyPI
package ``kubernetes-validate`` ships, in their *strict* form (unknown fields are
errors, as ``kubectl --validate=strict``/``fieldValidation=Strict``). We load each
kind's schema once and keep the compiled validator (``kubernetes_validate.validate``
re-reads the large definitions file on every call, far too slow for 10,000 pods).
CRD kinds (Istio, Gateway API) have no schema there: they get the structural checks
every object gets (apiVersion, kind, metadata.name as a DNS label/subdomain, spec an
object). Gateway API kinds (``gateway.networking.k8s.io/v1``) also get a small
structural check of the fields the Gateway API's CRD marks required and that waypoint
binding reads (:func:`gateway_api_problem`); it is not the CRD's OpenAPI schema (no
copy of it is shipped), so it accepts some objects a real server would refuse.
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from typing import Any

import jsonschema
import referencing
import referencing.jsonschema

SCHEMA_VERSION = "1.32.0"
GATEWAY_API_GROUP = "gateway.networking.k8s.io"
_FROM = ("All", "Same", "Selector")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class Invalid(ValueError):
    """The object does not validate; ``field`` is the path, ``problem`` what is wrong."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


def _schema_dir() -> Any:
    return (resources.files("kubernetes_validate") / "kubernetes-json-schema"
            / f"v{SCHEMA_VERSION}-local-strict")


@functools.cache
def _registry() -> referencing.Registry:
    defs = json.loads((_schema_dir() / "_definitions.json").read_text())
    return referencing.Resource.from_contents(
        defs, default_specification=referencing.jsonschema.DRAFT202012) @ referencing.Registry()


@functools.cache
def _validator(kind: str, api_version: str) -> jsonschema.protocols.Validator | None:
    group_tag = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    path = _schema_dir() / f"{kind.lower()}-{group_tag}.json"
    try:
        schema = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    resource = referencing.Resource.from_contents(
        schema, default_specification=referencing.jsonschema.DRAFT202012)
    registry = resource @ _registry()
    return jsonschema.Draft202012Validator(schema, registry=registry)  # type: ignore[no-any-return]


def validate(obj: dict[str, Any], builtin: bool) -> None:
    """Raise :class:`Invalid` unless ``obj`` is a valid object of its kind."""
    if not isinstance(obj.get("metadata"), dict):
        raise Invalid("metadata", "Required value")
    name = obj["metadata"].get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise Invalid("metadata.name", f"Invalid value: {name!r}: a lowercase RFC 1123 "
                      "subdomain must consist of lower case alphanumeric characters, '-' "
                      "or '.'")
    if "spec" in obj and not isinstance(obj["spec"], dict):
        raise Invalid("spec", "Invalid value: must be an object")
    if not builtin:
        if str(obj.get("apiVersion", "")).startswith(GATEWAY_API_GROUP + "/"):
            problem = gateway_api_problem(obj)
            if problem is not None:
                raise Invalid(*problem)
        return
    validator = _validator(str(obj.get("kind")), str(obj.get("apiVersion")))
    if validator is None:
        raise Invalid("kind", f"no schema for {obj.get('apiVersion')}/{obj.get('kind')}")
    error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "(root)"
        raise Invalid(where, error.message)


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _listener_problem(i: int, listener: Any) -> tuple[str, str] | None:
    where = f"spec.listeners[{i}]"
    if not isinstance(listener, dict):
        return where, "must be an object"
    if not _nonempty_str(listener.get("name")):
        return f"{where}.name", "Required value"
    port = listener.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        return f"{where}.port", f"Invalid value: {port!r}: must be an integer in 1..65535"
    if not _nonempty_str(listener.get("protocol")):
        return f"{where}.protocol", "Required value"
    routes = listener.get("allowedRoutes", {})
    namespaces = routes.get("namespaces", {}) if isinstance(routes, dict) else None
    if not isinstance(namespaces, dict):
        return f"{where}.allowedRoutes.namespaces", "must be an object"
    if namespaces.get("from", "Same") not in _FROM:
        return (f"{where}.allowedRoutes.namespaces.from",
                f"Unsupported value: {namespaces.get('from')!r}: supported values: "
                + ", ".join(f'"{v}"' for v in _FROM))
    if not isinstance(namespaces.get("selector", {}), dict):
        return f"{where}.allowedRoutes.namespaces.selector", "must be an object"
    return None


def gateway_api_problem(obj: dict[str, Any]) -> tuple[str, str] | None:
    """(field, problem) for a Gateway, GatewayClass or HTTPRoute missing what the
    Gateway API v1 CRDs require (gatewayClassName and 1..64 listeners with name, port
    and protocol; controllerName; parentRefs' names), or None."""
    kind, spec = obj.get("kind"), obj.get("spec")
    if kind not in ("Gateway", "GatewayClass", "HTTPRoute"):
        return "kind", f"Invalid value: {kind!r}: not a Gateway API v1 kind served here"
    if not isinstance(spec, dict):
        return "spec", "Required value"
    if kind == "GatewayClass":
        if not _nonempty_str(spec.get("controllerName")):
            return "spec.controllerName", "Required value"
        return None
    if kind == "HTTPRoute":
        refs = spec.get("parentRefs", [])
        if not isinstance(refs, list) or not all(
                isinstance(r, dict) and _nonempty_str(r.get("name")) for r in refs):
            return "spec.parentRefs", "each needs a name"
        if not isinstance(spec.get("rules", []), list):
            return "spec.rules", "must be a list"
        return None
    if not _nonempty_str(spec.get("gatewayClassName")):
        return "spec.gatewayClassName", "Required value"
    listeners = spec.get("listeners")
    if not isinstance(listeners, list) or not 1 <= len(listeners) <= 64:
        return "spec.listeners", "Required value: 1 to 64 listeners"
    for i, listener in enumerate(listeners):
        problem = _listener_problem(i, listener)
        if problem is not None:
            return problem
    return None
