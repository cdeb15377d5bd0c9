"""A tiny CNI runtime: run a conflist's plugins the way libcni does (pure logic).

For ADD the plugins run in list order, each receiving the previous one's
result as ``prevResult``; the last result is the network's result, which the
caller caches (libcni keeps it under /var/lib/cni/results) because DEL and
CHECK need it. DEL runs the plugins in reverse order with the cached result as
``prevResult``; CHECK runs them in order with it.

Each plugin's stdin is its own entry of ``plugins`` plus the list's
``cniVersion`` and ``name`` (libcni's ``buildOneConfig``). Executing the
plugin binary is injected as an :data:`Executor`, so this module performs no
I/O; the lab supplies one that runs the binary under ``nsenter`` in the node's
network namespace.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.cni.spec import SUPPORTED_VERSIONS


class ConfListError(ValueError):
    """The conflist is unusable; the message names the field."""


class PluginFailed(RuntimeError):
    """A plugin exited non-zero; ``code``/``msg``/``details`` are its CNI error."""

    def __init__(self, plugin: str, command: str, code: int | None, msg: str,
                 details: str = "", exit_code: int = 1, stderr: str = "") -> None:
        text = f"{command} {plugin} failed (CNI code {code}, exit {exit_code}): {msg}"
        if details:
            text += f" ({details})"
        if stderr:
            text += f"; stderr: {stderr[-500:]}"
        super().__init__(text)
        self.plugin = plugin
        self.command = command
        self.code = code
        self.msg = msg
        self.details = details
        self.exit_code = exit_code


@dataclass(frozen=True)
class Invocation:
    """Everything needed to execute one plugin once."""

    plugin: str  # the "type", e.g. "ptp"
    env: Mapping[str, str]  # the CNI_* variables only
    stdin: bytes


@dataclass(frozen=True)
class PluginOutput:
    exit_code: int
    stdout: bytes
    stderr: bytes = b""


Executor = Callable[[Invocation], PluginOutput]


@dataclass(frozen=True)
class ConfList:
    cni_version: str
    name: str
    plugins: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class RuntimeConf:
    """Per-attachment values (libcni's ``RuntimeConf``)."""

    container_id: str
    netns: str
    ifname: str = "eth0"
    args: Sequence[tuple[str, str]] = field(default_factory=tuple)
    cni_path: Sequence[str] = field(default_factory=tuple)


def parse_conflist(data: Mapping[str, Any] | str | bytes) -> ConfList:
    """Validate a network configuration list (``.conflist``)."""
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except ValueError as exc:
            raise ConfListError(f"conflist is not JSON: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfListError("conflist must be a JSON object")
    version, name, plugins = data.get("cniVersion"), data.get("name"), data.get("plugins")
    if version not in SUPPORTED_VERSIONS:
        raise ConfListError(f"conflist cniVersion {version!r} is not one of "
                            f"{', '.join(SUPPORTED_VERSIONS)}")
    if not isinstance(name, str) or not name:
        raise ConfListError("conflist needs a non-empty \"name\"")
    if not isinstance(plugins, list) or not plugins:
        raise ConfListError("conflist needs a non-empty \"plugins\" list")
    for i, plugin in enumerate(plugins):
        if not isinstance(plugin, Mapping) or not isinstance(plugin.get("type"), str) \
                or not plugin["type"] or "/" in plugin["type"]:
            raise ConfListError(f"plugins[{i}] needs a \"type\" naming a plugin binary")
    return ConfList(cni_version=str(version), name=name, plugins=tuple(plugins))


def plugin_stdin(conflist: ConfList, plugin: Mapping[str, Any],
                 prev_result: Mapping[str, Any] | None) -> bytes:
    """One plugin's network configuration (libcni ``buildOneConfig``)."""
    conf = {**plugin, "cniVersion": conflist.cni_version, "name": conflist.name}
    if prev_result is not None:
        conf["prevResult"] = dict(prev_result)
    return json.dumps(conf).encode()


def plugin_env(command: str, rt: RuntimeConf) -> dict[str, str]:
    """The CNI_* environment of one invocation."""
    return {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": rt.container_id,
        "CNI_NETNS": rt.netns,
        "CNI_IFNAME": rt.ifname,
        "CNI_ARGS": ";".join(f"{k}={v}" for k, v in rt.args),
        "CNI_PATH": ":".join(rt.cni_path),
    }


def _run(execute: Executor, command: str, conflist: ConfList, plugin: Mapping[str, Any],
         rt: RuntimeConf, prev: Mapping[str, Any] | None) -> bytes:
    inv = Invocation(plugin=str(plugin["type"]), env=plugin_env(command, rt),
                     stdin=plugin_stdin(conflist, plugin, prev))
    out = execute(inv)
    if out.exit_code != 0:
        code: int | None = None
        msg, details = out.stdout.decode(errors="replace").strip() or "no output", ""
        try:
            err = json.loads(out.stdout)
            if isinstance(err, dict):
                code = err.get("code") if isinstance(err.get("code"), int) else None
                msg, details = str(err.get("msg", msg)), str(err.get("details", ""))
        except ValueError:
            pass
        raise PluginFailed(inv.plugin, command, code, msg, details, out.exit_code,
                           out.stderr.decode(errors="replace").strip())
    return out.stdout


def add(conflist: ConfList, rt: RuntimeConf, execute: Executor) -> dict[str, Any]:
    """ADD through every plugin in order; return the final result (cache it for DEL).

    Raises :class:`PluginFailed` at the first failing plugin (like libcni, it
    does not undo the plugins before it: the caller runs :func:`delete`).
    """
    result: dict[str, Any] | None = None
    for plugin in conflist.plugins:
        out = _run(execute, "ADD", conflist, plugin, rt, result)
        try:
            parsed = json.loads(out)
        except ValueError as exc:
            raise PluginFailed(str(plugin["type"]), "ADD", None,
                               f"result is not JSON: {exc}") from exc
        if not isinstance(parsed, dict):
            raise PluginFailed(str(plugin["type"]), "ADD", None, "result is not a JSON object")
        result = parsed
    assert result is not None
    return result


def check(conflist: ConfList, rt: RuntimeConf, cached: Mapping[str, Any],
          execute: Executor) -> None:
    """CHECK through every plugin in order with the cached ADD result."""
    for plugin in conflist.plugins:
        _run(execute, "CHECK", conflist, plugin, rt, cached)


def delete(conflist: ConfList, rt: RuntimeConf, cached: Mapping[str, Any] | None,
           execute: Executor) -> list[PluginFailed]:
    """DEL through every plugin in reverse order; return the failures.

    Unlike ADD it goes on past a failing plugin, so one broken plugin does not
    leave the others' resources behind; the caller decides whether the list of
    failures is fatal (libcni stops at the first).
    """
    failures: list[PluginFailed] = []
    for plugin in reversed(conflist.plugins):
        try:
            _run(execute, "DEL", conflist, plugin, rt, cached)
        except PluginFailed as exc:
            failures.append(exc)
    return failures
