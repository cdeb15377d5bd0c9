"""The agent API contract (pure): requests, responses and error codes.

The agent serves it on a root-only UNIX socket: one JSON request per
connection, one line, answered by one JSON line.

* Requests (:func:`parse_request`): ``{"op": "pod_add"|"pod_del"|"pod_list"|
  "pod_verdict"|"status", ...}``; wrong types and unknown fields are refused with a message
  that names the field, before anything touches the kernel. A request may
  carry ``"version"`` (absent means 1); a newer one than :data:`API_VERSION`
  is refused with :attr:`ErrorCode.UNSUPPORTED_VERSION`.
* Responses (:class:`Response`): ``{"version": 1, "ok": true, "result": ...}``
  or ``{"version": 1, "ok": false, "code": "<ErrorCode>", "error": "<what
  happened and what to do>"}``. Clients decide on ``code``; ``error`` is for
  people.
* Results of ``pod_add``, ``pod_del`` and the items of ``pod_list``:
  :class:`PodInfo`.
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.contracts import ContractError, UnsupportedVersion, document_version, field_of

API_VERSION = 1

# Kubernetes naming rules: namespaces and service accounts are DNS-1123
# labels, pod names DNS-1123 subdomains.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_LABEL_KEY = re.compile(r"^([a-z0-9A-Z.-]{1,253}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_IFNAME = re.compile(r"^[^/\s:]{1,15}$")
_UID = re.compile(r"^[A-Za-z0-9-]{0,64}$")  # Kubernetes metadata.uid (a UUID)


class ErrorCode(str, enum.Enum):
    """Why the agent refused a request. New codes may be added within a
    version; a client maps a code it does not know to :attr:`UNKNOWN`."""

    BAD_REQUEST = "bad_request"  # malformed request: fix the caller
    UNSUPPORTED_VERSION = "unsupported_version"  # request newer than this agent
    PERMISSION_DENIED = "permission_denied"  # the API is root-only
    REQUEST_TOO_LARGE = "request_too_large"
    POD_NETWORK = "pod_network"  # the pod's netns or interface is missing or unusable
    ALREADY_ENROLLED = "already_enrolled"  # pod_add of a pod (namespace/name) enrolled already
    NOT_ENROLLED = "not_enrolled"  # pod_del of a pod that is not enrolled
    CONFLICT = "conflict"  # its netns, veth or an address belongs to another enrolled pod
    KERNEL = "kernel"  # a kernel step failed; everything was rolled back
    INTERNAL = "internal"  # a bug in the agent: see its log
    NOT_KUBERNETES = "not_kubernetes"  # pod_verdict to an agent without [k8s] enabled
    KUBERNETES_UNAVAILABLE = "kubernetes_unavailable"  # the API server could not answer
    UNKNOWN = "unknown"  # a code this client does not know, or none (an older agent)

    @classmethod
    def parse(cls, value: Any) -> ErrorCode:
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


class RequestError(ValueError):
    """The request is malformed (or of a newer version); nothing was changed."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PodAdd:
    netns: str
    ifname: str = "eth0"
    namespace: str = "default"
    service_account: str = "default"
    name: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    # Istio's ambient.istio.io/dns-capture: None (absent) follows the node's
    # datapath.dns_capture, True captures the pod's DNS, False never does.
    dns_capture: bool | None = None
    # The Kubernetes pod's metadata.uid, when it came from the API ("" otherwise).
    uid: str = ""


@dataclass(frozen=True)
class PodDel:
    netns: str | None = None
    name: str | None = None
    namespace: str = "default"


@dataclass(frozen=True)
class PodList:
    pass


@dataclass(frozen=True)
class PodVerdict:
    """Should this node enroll the Kubernetes pod ``namespace/name`` (Istio's rules,
    answered from the agent's watch, or one fetch of the pod)? Asked by meshagent-cni."""

    name: str
    namespace: str = "default"


@dataclass(frozen=True)
class Status:
    pass


Request = PodAdd | PodDel | PodList | PodVerdict | Status

_OPS: dict[str, type] = {"pod_add": PodAdd, "pod_del": PodDel, "pod_list": PodList,
                         "pod_verdict": PodVerdict, "status": Status}
_FIELDS: dict[type, dict[str, tuple[type, ...]]] = {
    PodAdd: {"netns": (str,), "ifname": (str,), "namespace": (str,),
             "service_account": (str,), "name": (str, type(None)), "labels": (dict,),
             "dns_capture": (bool, type(None)), "uid": (str,)},
    PodDel: {"netns": (str, type(None)), "name": (str, type(None)), "namespace": (str,)},
    PodList: {},
    PodVerdict: {"name": (str,), "namespace": (str,)},
    Status: {},
}


def default_pod_name(netns_path: str) -> str:
    """The name of a pod enrolled without one: its netns file's name (``ip netns``
    names), or for anonymous paths such as ``/proc/<pid>/ns/net`` ``pod-`` and
    8 hex digits of the SHA-256 of the path, the same in every process and
    after every restart (``hash()`` is randomised per process)."""
    base = os.path.basename(netns_path.rstrip("/"))
    if base not in ("net", ""):
        return base
    return "pod-" + hashlib.sha256(netns_path.encode()).hexdigest()[:8]


def _check_name(field_name: str, value: str, pattern: re.Pattern[str]) -> None:
    if not pattern.match(value):
        raise RequestError(f"{field_name}={value!r} is not a valid Kubernetes name "
                           "(lower case letters, digits and '-')")


def parse_request(raw: Any) -> Request:
    """Turn a decoded JSON object into a typed request or raise RequestError."""
    if not isinstance(raw, Mapping):
        raise RequestError("request must be a JSON object")
    op = raw.get("op")
    if not isinstance(op, str) or op not in _OPS:
        raise RequestError(f"unknown op {op!r}; expected one of {', '.join(sorted(_OPS))}")
    try:
        document_version(raw, source="request", what=op, supported=API_VERSION)
    except UnsupportedVersion as exc:
        raise RequestError(f"{exc} (this agent speaks API version {API_VERSION})",
                           ErrorCode.UNSUPPORTED_VERSION) from None
    except ContractError as exc:
        raise RequestError(str(exc)) from None
    cls = _OPS[op]
    fields = _FIELDS[cls]
    args = {k: v for k, v in raw.items() if k not in ("op", "version")}
    unknown = set(args) - set(fields)
    if unknown:
        raise RequestError(f"unknown field(s) for {op}: {', '.join(sorted(unknown))}")
    for key, value in args.items():
        if not isinstance(value, fields[key]) or (isinstance(value, bool)
                                                  and bool not in fields[key]):
            expected = " or ".join("null" if t is type(None) else t.__name__
                                   for t in fields[key])
            raise RequestError(f"{op}.{key} must be {expected}, got {type(value).__name__}")
    if cls is PodAdd:
        if "netns" not in args or not args["netns"]:
            raise RequestError("pod_add needs netns (a name from 'ip netns list' or a path)")
        if "ifname" in args and not _IFNAME.match(args["ifname"]):
            raise RequestError(f"ifname={args['ifname']!r} is not an interface name")
        for key in ("namespace", "service_account"):
            if key in args:
                _check_name(key, args[key], _DNS_LABEL)
        if args.get("name") is not None:
            _check_name("name", args["name"], _DNS_SUBDOMAIN)
        if not _UID.match(args.get("uid", "")):
            raise RequestError(f"uid={args['uid']!r} is not a Kubernetes uid (a UUID)")
        labels = args.get("labels", {})
        for k, v in labels.items():
            if not isinstance(v, str) or not _LABEL_KEY.match(k) or not _LABEL_VALUE.match(v):
                raise RequestError(f"label {k!r}={v!r} is not a valid Kubernetes label")
    if cls is PodVerdict:
        if "name" not in args:
            raise RequestError("pod_verdict needs name (and namespace)")
        _check_name("name", args["name"], _DNS_SUBDOMAIN)
        _check_name("namespace", args.get("namespace", "default"), _DNS_LABEL)
    if cls is PodDel and not args.get("netns") and not args.get("name"):
        raise RequestError("pod_del needs netns or name")
    request: Request = cls(**args)
    return request


# -- responses -------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    """One answer of the agent: a result, or an error code and a message."""

    ok: bool
    result: Any = None
    code: ErrorCode | None = None
    error: str | None = None
    version: int = API_VERSION

    @classmethod
    def success(cls, result: Any) -> Response:
        return cls(ok=True, result=result)

    @classmethod
    def failure(cls, code: ErrorCode, message: str) -> Response:
        return cls(ok=False, code=code, error=message)

    def to_json(self) -> dict[str, Any]:
        if self.ok:
            return {"version": API_VERSION, "ok": True, "result": self.result}
        code = self.code or ErrorCode.INTERNAL
        return {"version": API_VERSION, "ok": False, "code": code.value,
                "error": self.error or code.value}

    @classmethod
    def from_json(cls, data: Any, source: str = "agent response") -> Response:
        """Parse a decoded response. Raises :class:`~agent.contracts.ContractError`
        (:class:`~agent.contracts.UnsupportedVersion` for a newer agent)."""
        version = document_version(data, source=source, what="API response",
                                   supported=API_VERSION)
        ok = field_of(data, "ok", bool, source=source, what="API response")
        if ok:
            return cls(ok=True, result=data.get("result"), version=version)
        message = field_of(data, "error", str, source=source, what="API response",
                           default="unknown error")
        return cls(ok=False, code=ErrorCode.parse(data.get("code")), error=message,
                   version=version)


# -- results -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PodInfo:
    """An enrolled pod: the result of ``pod_add`` and ``pod_del``, an item of
    ``pod_list`` (which adds ``counters``, null until the datapath counted
    anything). The keys are :meth:`agent.registry.Pod.to_json`'s."""

    name: str
    namespace: str
    service_account: str
    netns: str
    ifname: str
    host_ifindex: int
    host_ifname: str
    addresses: tuple[str, ...]
    labels: Mapping[str, str] = field(default_factory=dict)
    created_clsact: bool = False
    counters: Mapping[str, Any] | None = None
    dns_capture: bool | None = None  # None: the node's default; False: opted out
    uid: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "namespace": self.namespace,
            "service_account": self.service_account, "netns": self.netns,
            "ifname": self.ifname, "host_ifindex": self.host_ifindex,
            "host_ifname": self.host_ifname, "addresses": list(self.addresses),
            "labels": dict(self.labels), "created_clsact": self.created_clsact,
            "dns_capture": self.dns_capture, "uid": self.uid}
        if self.counters is not None:
            out["counters"] = dict(self.counters)
        return out

    @classmethod
    def from_json(cls, data: Any, source: str = "pod") -> PodInfo:
        """Raises :class:`~agent.contracts.ContractError`; unknown keys are ignored."""
        what = "pod"
        if not isinstance(data, Mapping):
            raise ContractError(f"{source}: {what} must be a JSON object")

        def text(key: str) -> str:
            value: str = field_of(data, key, str, source=source, what=what)
            return value

        addresses = field_of(data, "addresses", list, source=source, what=what, default=[])
        labels = field_of(data, "labels", dict, source=source, what=what, default={})
        if not all(isinstance(a, str) for a in addresses):
            raise ContractError(f"{source}: {what}.addresses must be a list of strings")
        return cls(name=text("name"), namespace=text("namespace"),
                   service_account=text("service_account"), netns=text("netns"),
                   ifname=text("ifname"),
                   host_ifindex=field_of(data, "host_ifindex", int, source=source, what=what),
                   host_ifname=text("host_ifname"), addresses=tuple(addresses),
                   labels=dict(labels),
                   created_clsact=field_of(data, "created_clsact", bool, source=source,
                                           what=what, default=False),
                   counters=field_of(data, "counters", (dict, type(None)), source=source,
                                     what=what, default=None),
                   dns_capture=field_of(data, "dns_capture", (bool, type(None)),
                                        source=source, what=what, default=None),
                   uid=field_of(data, "uid", str, source=source, what=what, default=""))


def pod_list(result: Any, source: str = "pod_list result") -> list[PodInfo]:
    """The pods of a ``pod_list`` result. Raises :class:`~agent.contracts.ContractError`."""
    if not isinstance(result, list):
        raise ContractError(f"{source} must be a JSON list, not {type(result).__name__}")
    return [PodInfo.from_json(p, source=f"{source}[{i}]") for i, p in enumerate(result)]
