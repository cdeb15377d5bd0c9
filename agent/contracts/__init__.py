"""The contracts between meshagent's processes (pure): versioned documents both
sides import, so a writer and a reader cannot drift apart silently.

* :mod:`agent.contracts.files` - what the agent and the tunnel exchange through
  the state directory: ``workloads.json`` (agent -> tunnel) and
  ``tunnel-status.json`` (tunnel -> agent).
* :mod:`agent.contracts.api` - the agent API: requests, the response envelope,
  the result of ``pod_add``/``pod_del``/``pod_list``, and error codes
  (:class:`~agent.contracts.api.ErrorCode`) that clients such as the CNI plugin
  switch on instead of reading English messages.

Every document carries an integer ``version``. A reader accepts every version
up to the one it was built for (a document without ``version`` predates
versioning and is version 1) and refuses a newer one with
:class:`UnsupportedVersion`, whose message names the document, both versions
and what to do. Within one version, fields are only ever added: readers ignore
keys they do not know.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

UPGRADE_HINT = "upgrade meshagent on this node so that every part of it runs the same release"


class ContractError(ValueError):
    """A document does not follow its contract. The message names the document
    (a file path, or what was read) and what is wrong."""


class UnsupportedVersion(ContractError):
    """A document is of a version this reader does not know (a newer writer)."""

    def __init__(self, source: str, what: str, version: int, supported: int) -> None:
        super().__init__(
            f"{source}: {what} version {version} is newer than this meshagent understands "
            f"(up to {supported}); {UPGRADE_HINT}")
        self.source = source
        self.version = version
        self.supported = supported


def document_version(data: Any, *, source: str, what: str, supported: int) -> int:
    """The ``version`` of document ``data`` (read from ``source``, a ``what``),
    checked against ``supported``, the newest version this reader knows.

    Raises :class:`ContractError` if ``data`` is not a JSON object or its
    version is not a positive integer, :class:`UnsupportedVersion` if it is
    newer than ``supported``.
    """
    if not isinstance(data, Mapping):
        raise ContractError(f"{source}: {what} must be a JSON object, not {type(data).__name__}")
    version = data.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ContractError(f"{source}: {what} version {version!r} is not a positive integer; "
                            "the file is damaged: remove it and let its writer recreate it")
    if version > supported:
        raise UnsupportedVersion(source, what, version, supported)
    return version


def field_of(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], *, source: str,
             what: str, default: Any = ...) -> Any:
    """``data[key]`` checked to be of ``kind`` (bool is never an int here);
    ``default`` when the key is absent, if one is given."""
    if key not in data:
        if default is ...:
            raise ContractError(f"{source}: {what} has no {key!r}")
        return default
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise ContractError(f"{source}: {what}.{key} must be {names}, "
                            f"not {type(value).__name__}")
    return value
