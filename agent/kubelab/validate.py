"""Every object the lab API server stores is checked against Kubernetes' schemas.

Built-in kinds: the JSON schemas (derived from Kubernetes' OpenAPI) that the PyPI
package ``kubernetes-validate`` ships, in their *strict* form (unknown fields are
errors, as ``kubectl --validate=strict``/``fieldValidation=Strict``). We load each
kind's schema once and keep the compiled validator (``kubernetes_validate.validate``
re-reads the large definitions file on every call, far too slow for 10,000 pods).
CRD kinds (Istio, Gateway API) have no schema there: they get the structural checks
every object gets (apiVersion, kind, metadata.name as a DNS label/subdomain, spec an
object).
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
        return
    validator = _validator(str(obj.get("kind")), str(obj.get("apiVersion")))
    if validator is None:
        raise Invalid("kind", f"no schema for {obj.get('apiVersion')}/{obj.get('kind')}")
    error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "(root)"
        raise Invalid(where, error.message)
