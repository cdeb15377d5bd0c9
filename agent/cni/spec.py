"""The CNI protocol as ``meshagent-cni`` speaks it (pure logic).

Parses and validates the CNI environment (``CNI_COMMAND``, ``CNI_CONTAINERID``,
``CNI_NETNS``, ``CNI_IFNAME``, ``CNI_ARGS``, ``CNI_PATH``) and the network
configuration read from stdin, decides what the plugin should ask the agent,
and builds the JSON the plugin prints: results, version info and errors.

Nothing here performs I/O; every failure is a :class:`CniError` carrying one of
the CNI spec's error codes, so the plugin can always answer with a well-formed
error on stdout. The plugin configuration lives in the network configuration
under the key ``"meshagent"``::

    {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "meshagent-cni",
     "meshagent": {"agent_socket": "/run/meshagent/agent.sock",
                   "enrolled_namespaces": ["default", "shop"],
                   "service_account": "default",
                   "service_account_patterns": [
                       {"pod_name_pattern": "web-*", "service_account": "web"}],
                   "fail_open": false, "timeout_seconds": 10,
                   "log_file": "/var/log/meshagent-cni.log"},
     "prevResult": {...}}
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.contracts import ContractError
from agent.contracts.api import PodInfo, pod_list

SPEC_VERSION = "1.0.0"
SUPPORTED_VERSIONS: tuple[str, ...] = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
PLUGIN_SECTION = "meshagent"
DEFAULT_SOCKET = "/run/meshagent/agent.sock"
DEFAULT_LOG_FILE = "/var/log/meshagent-cni.log"
DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 300.0
COMMANDS: tuple[str, ...] = ("ADD", "DEL", "CHECK", "VERSION")

# Well-known error codes of the CNI spec (1.0.0, "Error" section).
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
# Plugin-specific codes (100 and up).
ERR_AGENT_REFUSED = 100
ERR_NOT_ENROLLED = 101
ERR_INTERNAL = 199

_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_IFNAME = re.compile(r"^[^/\s:]{1,15}$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_VERSION = re.compile(r"^(\d{1,4})\.(\d{1,4})\.(\d{1,4})$")


class CniError(Exception):
    """A CNI error result: ``code`` from the spec, ``msg`` short, ``details`` the next step."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(f"{msg}: {details}" if details else msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str = SPEC_VERSION) -> dict[str, Any]:
        """The error object printed on stdout (spec "Error" section)."""
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


# -- environment -----------------------------------------------------------------


@dataclass(frozen=True)
class CniEnv:
    """The validated CNI environment of one invocation."""

    command: str
    container_id: str = ""
    netns: str = ""  # path, "" if the runtime gave none (allowed for DEL)
    ifname: str = ""
    args: Mapping[str, str] = field(default_factory=dict)
    path: tuple[str, ...] = ()

    @property
    def pod_namespace(self) -> str | None:
        return self.args.get("K8S_POD_NAMESPACE") or None

    @property
    def pod_name(self) -> str | None:
        return self.args.get("K8S_POD_NAME") or None

    def pod_identity(self) -> tuple[str, str] | None:
        """(namespace, name) if CNI_ARGS names a valid Kubernetes pod, else None."""
        ns, name = self.pod_namespace, self.pod_name
        if ns is None or name is None:
            return None
        if not _DNS_LABEL.match(ns) or not _DNS_SUBDOMAIN.match(name):
            return None
        return ns, name


def parse_cni_args(raw: str) -> dict[str, str]:
    """``K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web-0`` -> dict (empty items are skipped).

    Raises :class:`CniError` (code 4) for an item without ``=`` or with an
    empty key.
    """
    out: dict[str, str] = {}
    for item in raw.split(";"):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CniError(ERR_INVALID_ENV, "invalid CNI_ARGS",
                           f"item {item!r} is not KEY=VALUE; CNI_ARGS is "
                           "'K8S_POD_NAMESPACE=<ns>;K8S_POD_NAME=<pod>;...'")
        out[key] = value.strip()
    return out


def _env_error(name: str, problem: str) -> CniError:
    return CniError(ERR_INVALID_ENV, f"invalid environment variable {name}",
                    f"{problem}; the container runtime must set it (see the CNI spec)")


def parse_env(env: Mapping[str, str]) -> CniEnv:
    """Validate the CNI variables of ``env`` for the command in ``CNI_COMMAND``.

    ADD and CHECK need ``CNI_CONTAINERID``, ``CNI_NETNS``, ``CNI_IFNAME`` and a
    pod in ``CNI_ARGS`` (``K8S_POD_NAMESPACE``, ``K8S_POD_NAME``). DEL needs
    ``CNI_CONTAINERID`` and ``CNI_IFNAME``; the netns may be missing and the
    pod may be absent (DEL then has nothing to do). VERSION needs nothing.
    Raises :class:`CniError` with code 4 otherwise.
    """
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise _env_error("CNI_COMMAND",
                         f"got {command!r}, expected one of {', '.join(COMMANDS)}")
    if command == "VERSION":
        return CniEnv(command=command)
    container_id = env.get("CNI_CONTAINERID", "")
    if not container_id:
        raise _env_error("CNI_CONTAINERID", "it is missing or empty")
    if not _CONTAINER_ID.match(container_id):
        raise _env_error("CNI_CONTAINERID",
                         f"{container_id!r} has characters outside [A-Za-z0-9_.-]")
    ifname = env.get("CNI_IFNAME", "")
    if not _IFNAME.match(ifname):
        raise _env_error("CNI_IFNAME", f"{ifname!r} is not an interface name (1-15 characters, "
                         "no '/', ':' or whitespace)")
    netns = env.get("CNI_NETNS", "")
    if command != "DEL" and not netns:
        raise _env_error("CNI_NETNS", f"it is missing; {command} needs the pod's netns path")
    if netns and (not netns.startswith("/") or "\x00" in netns):
        raise _env_error("CNI_NETNS", f"{netns!r} is not an absolute path")
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    path = tuple(p for p in env.get("CNI_PATH", "").split(":") if p)
    cni_env = CniEnv(command=command, container_id=container_id, netns=netns, ifname=ifname,
                     args=args, path=path)
    if command != "DEL":
        ns, name = cni_env.pod_namespace, cni_env.pod_name
        if ns is None or name is None:
            raise _env_error("CNI_ARGS", "K8S_POD_NAMESPACE and K8S_POD_NAME are required "
                             f"for {command}")
        if not _DNS_LABEL.match(ns):
            raise _env_error("CNI_ARGS", f"K8S_POD_NAMESPACE={ns!r} is not a Kubernetes "
                             "namespace name")
        if not _DNS_SUBDOMAIN.match(name):
            raise _env_error("CNI_ARGS", f"K8S_POD_NAME={name!r} is not a Kubernetes pod name")
    return cni_env


# -- network configuration -------------------------------------------------------


@dataclass(frozen=True)
class SaPattern:
    """Pods whose name matches the glob ``pod_name_pattern`` get ``service_account``."""

    pod_name_pattern: str
    service_account: str


@dataclass(frozen=True)
class PluginConfig:
    """The ``"meshagent"`` section of the network configuration."""

    agent_socket: str = DEFAULT_SOCKET
    enrolled_namespaces: tuple[str, ...] = ("*",)
    service_account: str = "default"
    service_account_patterns: tuple[SaPattern, ...] = ()
    fail_open: bool = False
    timeout_seconds: float = DEFAULT_TIMEOUT_S
    log_file: str = DEFAULT_LOG_FILE
    # True: the agent watches Kubernetes and judges each pod by Istio's labels
    # (``pod_verdict``); enrolled_namespaces and service_account* are not used.
    kubernetes: bool = False

    def enrolls(self, namespace: str) -> bool:
        """Whether pods in Kubernetes ``namespace`` join the mesh."""
        return "*" in self.enrolled_namespaces or namespace in self.enrolled_namespaces

    def service_account_for(self, pod_name: str) -> str:
        """The first pattern matching ``pod_name`` wins, else ``service_account``."""
        for pattern in self.service_account_patterns:
            if fnmatch.fnmatchcase(pod_name, pattern.pod_name_pattern):
                return pattern.service_account
        return self.service_account


@dataclass(frozen=True)
class NetConf:
    """A decoded network configuration (one plugin's view of the conflist)."""

    cni_version: str
    name: str
    type: str
    plugin: PluginConfig
    prev_result: Mapping[str, Any] | None
    raw: Mapping[str, Any]


def version_tuple(version: str) -> tuple[int, int, int]:
    """``"0.4.0"`` -> ``(0, 4, 0)``; :class:`CniError` (code 1) if not ``X.Y.Z``."""
    m = _VERSION.match(version)
    if not m:
        raise CniError(ERR_INCOMPATIBLE_VERSION, f"invalid cniVersion {version!r}",
                       f"use one of {', '.join(SUPPORTED_VERSIONS)}")
    return int(m[1]), int(m[2]), int(m[3])


def _config_error(msg: str, details: str = "") -> CniError:
    return CniError(ERR_INVALID_CONFIG, msg, details)


def decode_json(data: bytes | str) -> Any:
    """Decode stdin; :class:`CniError` code 6 if it is not UTF-8 JSON."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CniError(ERR_DECODE, "failed to decode the network configuration",
                       f"stdin must be a JSON object: {exc}") from None


def peek_version(data: bytes | str) -> str:
    """The supported cniVersion of ``data`` if there is one, else ``SPEC_VERSION``.

    Used to label errors found before the configuration is fully validated.
    """
    try:
        raw = decode_json(data)
    except CniError:
        return SPEC_VERSION
    version = raw.get("cniVersion") if isinstance(raw, dict) else None
    return version if version in SUPPORTED_VERSIONS else SPEC_VERSION


def _str_field(section: Mapping[str, Any], key: str, default: str, where: str) -> str:
    value = section.get(key, default)
    if not isinstance(value, str):
        raise _config_error(f"{where}.{key} must be a string, got {type(value).__name__}")
    return value


def _dns_label(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _DNS_LABEL.match(value):
        raise _config_error(f"{where}={value!r} is not a valid Kubernetes name",
                            "use lower-case letters, digits and '-' (at most 63)")
    return value


def parse_plugin_config(section: Any) -> PluginConfig:
    """Validate the ``"meshagent"`` section; :class:`CniError` code 7 names the key."""
    where = PLUGIN_SECTION
    if section is None:
        return PluginConfig()
    if not isinstance(section, dict):
        raise _config_error(f"{where} must be a JSON object, got {type(section).__name__}")
    known = {f for f in PluginConfig.__dataclass_fields__}
    unknown = sorted(str(k) for k in section if k not in known)
    if unknown:
        raise _config_error(f"unknown key(s) in {where}: {', '.join(unknown)}",
                            f"known keys: {', '.join(sorted(known))}")
    socket_path = _str_field(section, "agent_socket", DEFAULT_SOCKET, where)
    if not socket_path.startswith("/") or "\x00" in socket_path:
        raise _config_error(f"{where}.agent_socket={socket_path!r} must be an absolute path")
    log_file = _str_field(section, "log_file", DEFAULT_LOG_FILE, where)
    if log_file and (not log_file.startswith("/") or "\x00" in log_file):
        raise _config_error(f"{where}.log_file={log_file!r} must be an absolute path",
                            "or \"\" to log to stderr only")
    namespaces = section.get("enrolled_namespaces", ["*"])
    if not isinstance(namespaces, list):
        raise _config_error(f"{where}.enrolled_namespaces must be a list of namespace names "
                            "(or [\"*\"] for all)")
    enrolled = tuple(ns if ns == "*" else _dns_label(ns, f"{where}.enrolled_namespaces[]")
                     for ns in namespaces)
    sa = _dns_label(section.get("service_account", "default"), f"{where}.service_account")
    raw_patterns = section.get("service_account_patterns", [])
    if not isinstance(raw_patterns, list):
        raise _config_error(f"{where}.service_account_patterns must be a list of "
                            '{"pod_name_pattern": glob, "service_account": name}')
    patterns = []
    for i, item in enumerate(raw_patterns):
        pwhere = f"{where}.service_account_patterns[{i}]"
        if not isinstance(item, dict) or set(item) != {"pod_name_pattern", "service_account"}:
            raise _config_error(f"{pwhere} must be an object with exactly pod_name_pattern "
                                "and service_account")
        glob = item["pod_name_pattern"]
        if not isinstance(glob, str) or not glob:
            raise _config_error(f"{pwhere}.pod_name_pattern must be a non-empty glob string")
        patterns.append(SaPattern(glob, _dns_label(item["service_account"],
                                                   f"{pwhere}.service_account")))
    fail_open = section.get("fail_open", False)
    if not isinstance(fail_open, bool):
        raise _config_error(f"{where}.fail_open must be true or false")
    timeout = section.get("timeout_seconds", DEFAULT_TIMEOUT_S)
    if (isinstance(timeout, bool) or not isinstance(timeout, int | float)
            or not math.isfinite(timeout) or not 0 < timeout <= MAX_TIMEOUT_S):
        raise _config_error(f"{where}.timeout_seconds={timeout!r} must be a number in "
                            f"(0, {MAX_TIMEOUT_S:.0f}]")
    kubernetes = section.get("kubernetes", False)
    if not isinstance(kubernetes, bool):
        raise _config_error(f"{where}.kubernetes must be true or false")
    return PluginConfig(agent_socket=socket_path, enrolled_namespaces=enrolled,
                        service_account=sa, service_account_patterns=tuple(patterns),
                        fail_open=fail_open, timeout_seconds=float(timeout), log_file=log_file,
                        kubernetes=kubernetes)


def parse_config(data: bytes | str) -> NetConf:
    """Decode and validate the network configuration read from stdin.

    Errors: code 6 if stdin is not a JSON object, 1 if ``cniVersion`` is not
    supported, 7 for any other invalid field.
    """
    raw = decode_json(data)
    if not isinstance(raw, dict):
        raise CniError(ERR_DECODE, "failed to decode the network configuration",
                       f"stdin must be a JSON object, got {type(raw).__name__}")
    version = raw.get("cniVersion")
    if not isinstance(version, str):
        raise _config_error("cniVersion is missing from the network configuration",
                            f"set it to one of {', '.join(SUPPORTED_VERSIONS)}")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(ERR_INCOMPATIBLE_VERSION, f"incompatible CNI version {version!r}",
                       f"meshagent-cni supports {', '.join(SUPPORTED_VERSIONS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise _config_error("name is missing from the network configuration",
                            "the conflist's \"name\" is copied into each plugin's config")
    plugin_type = raw.get("type", "")
    if not isinstance(plugin_type, str):
        raise _config_error("type must be a string")
    prev = raw.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise _config_error("prevResult must be a JSON object (the previous plugin's result)")
    return NetConf(cni_version=version, name=name, type=plugin_type,
                   plugin=parse_plugin_config(raw.get(PLUGIN_SECTION)),
                   prev_result=prev, raw=raw)


# -- decisions and results -------------------------------------------------------


def require_prev_result(conf: NetConf, command: str) -> Mapping[str, Any]:
    """The previous plugin's result; :class:`CniError` code 7 if there is none."""
    if conf.prev_result is None:
        raise _config_error(
            f"{command}: no prevResult in the network configuration",
            "meshagent-cni is a chained plugin: list it after an interface plugin "
            "(ptp, bridge, ...) in the conflist")
    return conf.prev_result


def check_command_version(conf: NetConf, command: str) -> None:
    """CHECK exists from spec 0.4.0 on; older configurations must not use it."""
    if command == "CHECK" and version_tuple(conf.cni_version) < (0, 4, 0):
        raise CniError(ERR_INCOMPATIBLE_VERSION,
                       f"cniVersion {conf.cni_version} does not support CHECK",
                       "use cniVersion 0.4.0 or later in the conflist")


def add_result(conf: NetConf) -> dict[str, Any]:
    """ADD's output: prevResult unchanged, labelled with the config's cniVersion."""
    return {**require_prev_result(conf, "ADD"), "cniVersion": conf.cni_version}


def pod_add_request(env: CniEnv, plugin: PluginConfig) -> dict[str, Any] | None:
    """The agent API request enrolling ``env``'s pod, or None to pass it through."""
    identity = env.pod_identity()
    if identity is None:
        raise _env_error("CNI_ARGS", "K8S_POD_NAMESPACE and K8S_POD_NAME are required")
    namespace, name = identity
    if not plugin.enrolls(namespace):
        return None
    return {"op": "pod_add", "netns": env.netns, "ifname": env.ifname, "name": name,
            "namespace": namespace, "service_account": plugin.service_account_for(name)}


def pod_verdict_request(namespace: str, name: str) -> dict[str, Any]:
    return {"op": "pod_verdict", "namespace": namespace, "name": name}


def kubernetes_pod_add_request(env: CniEnv, verdict: Mapping[str, Any]) -> dict[str, Any]:
    """The ``pod_add`` for a pod the agent's ``pod_verdict`` said to enroll: identity,
    labels, uid and DNS choice as the API server has them."""
    identity = env.pod_identity()
    assert identity is not None
    namespace, name = identity
    request: dict[str, Any] = {
        "op": "pod_add", "netns": env.netns, "ifname": env.ifname, "name": name,
        "namespace": namespace, "service_account": verdict["service_account"],
        "labels": dict(verdict["labels"]), "uid": verdict["uid"]}
    if verdict.get("dns_capture") is not None:
        request["dns_capture"] = verdict["dns_capture"]
    return request


def pod_del_request(namespace: str, name: str) -> dict[str, Any]:
    return {"op": "pod_del", "name": name, "namespace": namespace}


def find_enrolled(pods: Any, namespace: str, name: str) -> PodInfo | None:
    """The entry of ``pod_list``'s result for ``namespace/name``, if enrolled.

    Raises CniError (code ERR_AGENT_REFUSED) if the result does not follow the
    API contract (:func:`agent.contracts.api.pod_list`)."""
    try:
        listed = pod_list(pods)
    except ContractError as exc:
        raise CniError(ERR_AGENT_REFUSED, "meshagent agent sent an invalid pod list",
                       f"{exc}; the agent and meshagent-cni must be the same release") from exc
    return next((p for p in listed if (p.namespace, p.name) == (namespace, name)), None)


def version_result() -> dict[str, Any]:
    """VERSION's output."""
    return {"cniVersion": SPEC_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


def dumps(obj: Mapping[str, Any]) -> str:
    """How every result and error is printed (one JSON document and a newline)."""
    return json.dumps(obj, sort_keys=False) + "\n"
