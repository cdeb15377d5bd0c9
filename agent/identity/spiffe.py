"""SPIFFE IDs: the one place that parses and formats them. Pure.

A SPIFFE ID is ``spiffe://<trust domain>/<path>`` (SPIFFE-ID.md, spiffe/spiffe
``standards/SPIFFE-ID.md`` sections 2.1-2.4):

* scheme ``spiffe``; no userinfo, port, query, fragment or percent-encoding;
* trust domain: non-empty, lowercase ``[a-z0-9._-]``, at most 255 bytes;
* path: segments of ``[A-Za-z0-9._-]``, none empty, ``.`` or ``..``, no trailing ``/``;
* the whole URI at most 2048 bytes.

Scheme and trust domain are case-insensitive by the spec; we accept only the
lowercase form, as ztunnel does (``src/identity/manager.rs``: ``Identity::from_str``
matches the literal prefix ``spiffe://``), so one identity has one spelling.

Workload identities in the mesh are Istio's form ``/ns/<namespace>/sa/<service
account>`` (:class:`SpiffeId`, ztunnel's ``Identity::Spiffe``). Other SPIFFE paths are
valid SPIFFE IDs (:class:`SpiffeUri`) but name no workload: policy can still compare
them as principals.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "spiffe://"
MAX_URI_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255
_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]+$")
_PATH_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def check_trust_domain(trust_domain: str) -> str:
    """``trust_domain`` if it is a valid SPIFFE trust domain name; ValueError otherwise."""
    if not isinstance(trust_domain, str) or not _TRUST_DOMAIN_RE.match(trust_domain) \
            or len(trust_domain) > MAX_TRUST_DOMAIN_BYTES:
        raise ValueError(
            f"invalid SPIFFE trust domain {trust_domain!r}: use 1-{MAX_TRUST_DOMAIN_BYTES} "
            "lowercase letters, digits, '.', '-' or '_'"
        )
    return trust_domain


def _check_segment(label: str, value: str) -> None:
    if not isinstance(value, str) or not _PATH_SEGMENT_RE.match(value) or value in (".", ".."):
        raise ValueError(
            f"invalid SPIFFE {label} {value!r}: use letters, digits, '.', '-' or '_' "
            "(not empty, '.' or '..')"
        )


@dataclass(frozen=True, order=True)
class SpiffeUri:
    """Any valid SPIFFE ID: a trust domain and a (possibly empty) path."""

    trust_domain: str
    path: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        for segment in self.path:
            _check_segment("path segment", segment)
        if len(self.uri) > MAX_URI_BYTES:
            raise ValueError(f"SPIFFE ID longer than {MAX_URI_BYTES} bytes")

    @property
    def uri(self) -> str:
        return SCHEME + self.trust_domain + "".join("/" + s for s in self.path)

    @property
    def principal(self) -> str:
        """The ID without ``spiffe://``: the form Istio's ``principals`` are written in."""
        return self.uri[len(SCHEME):]

    def workload(self) -> SpiffeId | None:
        """The Istio workload identity this names, or None if the path is not ns/sa."""
        p = self.path
        if len(p) == 4 and p[0] == "ns" and p[2] == "sa":
            return SpiffeId(self.trust_domain, p[1], p[3])
        return None

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True, order=True)
class SpiffeId:
    """A workload identity in Istio's SPIFFE form; ``str()`` gives the URI."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        _check_segment("namespace", self.namespace)
        _check_segment("service account", self.service_account)

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """The ID without ``spiffe://`` (``td/ns/<ns>/sa/<sa>``), as Istio principals."""
        return self.uri[len(SCHEME):]

    def __str__(self) -> str:
        return self.uri


def parse_spiffe_uri(uri: str) -> SpiffeUri:
    """Parse any SPIFFE ID strictly (spec sections 2.1-2.3); ValueError names the problem."""
    if not isinstance(uri, str):
        raise ValueError(f"SPIFFE ID must be a string, got {type(uri).__name__}")
    if not uri.startswith(SCHEME):
        raise ValueError(f"not a SPIFFE ID (must start with {SCHEME!r}): {uri!r}")
    if len(uri.encode("utf-8", "surrogatepass")) > MAX_URI_BYTES:
        raise ValueError(f"SPIFFE ID longer than {MAX_URI_BYTES} bytes")
    rest = uri[len(SCHEME):]
    if any(c in rest for c in "?#@%:"):
        raise ValueError("SPIFFE ID must not contain a query, fragment, userinfo, port or "
                         f"percent-encoding: {uri!r}")
    trust_domain, _, path = rest.partition("/")
    segments = tuple(path.split("/")) if path or rest.endswith("/") else ()
    try:
        return SpiffeUri(trust_domain, segments)
    except ValueError as exc:
        raise ValueError(f"{exc} in {uri!r}") from None


def parse_spiffe_id(uri: str) -> SpiffeId:
    """Parse ``spiffe://<td>/ns/<ns>/sa/<sa>`` strictly; ValueError names the problem."""
    parsed = parse_spiffe_uri(uri)
    workload = parsed.workload()
    if workload is None:
        raise ValueError(
            f"SPIFFE ID must look like spiffe://<trust-domain>/ns/<namespace>/sa/"
            f"<service-account>: {uri!r}"
        )
    return workload


def trust_domain_uri(trust_domain: str) -> str:
    """``spiffe://<trust domain>``: the SPIFFE ID of the trust domain itself."""
    return SCHEME + check_trust_domain(trust_domain)
