"""Validation of API requests (pure): wrong types and unknown fields are refused
with a message that names the field, before anything touches the kernel."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Kubernetes naming rules: namespaces and service accounts are DNS-1123
# labels, pod names DNS-1123 subdomains.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_LABEL_KEY = re.compile(r"^([a-z0-9A-Z.-]{1,253}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_IFNAME = re.compile(r"^[^/\s:]{1,15}$")


class RequestError(ValueError):
    """The request is malformed; nothing was changed."""


@dataclass(frozen=True)
class PodAdd:
    netns: str
    ifname: str = "eth0"
    namespace: str = "default"
    service_account: str = "default"
    name: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PodDel:
    netns: str | None = None
    name: str | None = None
    namespace: str = "default"


@dataclass(frozen=True)
class PodList:
    pass


@dataclass(frozen=True)
class Status:
    pass


Request = PodAdd | PodDel | PodList | Status

_OPS: dict[str, type] = {"pod_add": PodAdd, "pod_del": PodDel, "pod_list": PodList,
                         "status": Status}
_FIELDS: dict[type, dict[str, tuple[type, ...]]] = {
    PodAdd: {"netns": (str,), "ifname": (str,), "namespace": (str,),
             "service_account": (str,), "name": (str, type(None)), "labels": (dict,)},
    PodDel: {"netns": (str, type(None)), "name": (str, type(None)), "namespace": (str,)},
    PodList: {},
    Status: {},
}


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
    cls = _OPS[op]
    fields = _FIELDS[cls]
    args = {k: v for k, v in raw.items() if k != "op"}
    unknown = set(args) - set(fields)
    if unknown:
        raise RequestError(f"unknown field(s) for {op}: {', '.join(sorted(unknown))}")
    for key, value in args.items():
        if not isinstance(value, fields[key]) or isinstance(value, bool):
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
        labels = args.get("labels", {})
        for k, v in labels.items():
            if not isinstance(v, str) or not _LABEL_KEY.match(k) or not _LABEL_VALUE.match(v):
                raise RequestError(f"label {k!r}={v!r} is not a valid Kubernetes label")
    if cls is PodDel and not args.get("netns") and not args.get("name"):
        raise RequestError("pod_del needs netns or name")
    return cls(**args)
