"""The control protocol between Python and ``meshagent-datapath``, version 2 (pure).

Python writes one configuration object (one JSON line) to the process's stdin, then
one control message per line: a :class:`PolicySnapshot` (the compiled rule set of
``agent.policy.compile``, with a version that grows), at start and on every change,
and a :class:`CertificatesUpdate` per local identity on rotation.
It keeps stdin open: EOF tells the process its driver is gone and it exits (fail
closed). Until a snapshot is applied every inbound connection is denied; a snapshot the
datapath cannot read is refused with an ``error`` event and the previous one stays.

The process writes one JSON event per line to stdout, each with ``"v": 2``: ``ready``
(the bound listeners), ``connection`` (one per tunnelled connection, at its end, with
exact byte counts and the deciding policy), ``hbone_connection_closed`` (an HBONE
connection ended for a reason worth telling: TLS refused, GOAWAY ENHANCE_YOUR_CALM,
...), ``policy_applied`` (a snapshot is current; how many live connections it revoked),
``certificates_applied``, ``error`` (also: a control message refused, nothing
changed). The Rust side of this contract is ``src/config.rs``, ``src/enforce.rs``,
``src/tls.rs`` (rotation) and
``src/control.rs``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

PROTOCOL_VERSION = 2


class ProtocolError(ValueError):
    """The datapath sent something this driver cannot read (version or shape)."""


@dataclass(frozen=True)
class Workload:
    """The destination workload behind an inbound listener, as policy scopes see it."""

    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class InboundListener:
    """An HBONE server: mTLS with a client certificate required, CONNECT only."""

    name: str
    listen: str  # "ip:port"; port 0 picks one (reported in the ready event)
    cert: str
    key: str
    destinations: Sequence[str] = ()  # empty: only the connection's own address
    allowed_peers: Sequence[str] = ()  # SPIFFE URIs; empty: the whole trust domain
    # IP_TRANSPARENT listener; each destination dialed from the client's address.
    transparent: bool = False
    # Required (to_json refuses None): the namespace and labels policy decides on.
    workload: Workload | None = None


@dataclass(frozen=True)
class OutboundListener:
    """Plain TCP in, a CONNECT stream to ``authority`` via the HBONE ``peer`` out.

    ``transparent``: an IP_TRANSPARENT listener for redirected traffic (15001); then
    ``authority`` is None and each connection's original destination is used, and the
    HBONE connection is made from the client's own address."""

    name: str
    listen: str
    peer: str
    authority: str | None
    cert: str
    key: str
    peer_identities: Sequence[str] = ()
    baggage: str | None = None
    forwarded_for: bool = True
    pool_idle_ms: int | None = None  # None: 60 s, as the Python pool
    keepalive_ms: int | None = None  # None: PING every 30 s, answered within 10 s
    transparent: bool = False


@dataclass(frozen=True)
class DatapathConfig:
    trust_domain: str
    roots: str
    inbound: Sequence[InboundListener] = ()
    outbound: Sequence[OutboundListener] = ()
    workers: int = 0  # 0: one runtime worker per CPU
    # "per_core": a single-threaded runtime per worker, SO_REUSEPORT listeners and a pool
    # each (a connection stays on one thread); "multi_thread": one work-stealing runtime.
    runtime: str = "per_core"
    mark: int | None = None  # SO_MARK on every socket the datapath opens

    def to_json(self) -> str:
        """The configuration message: one line, no newline inside. ValueError for an
        inbound listener without its workload."""
        for i in self.inbound:
            if i.workload is None:
                raise ValueError(f"inbound listener {i.name}: give its workload (namespace, "
                                 "labels): policy decides on them")
        return json.dumps({
            "version": PROTOCOL_VERSION,
            "trust_domain": self.trust_domain,
            "roots": self.roots,
            "workers": self.workers,
            "runtime": self.runtime,
            "mark": self.mark,
            "inbound": [{"name": i.name, "listen": i.listen, "cert": i.cert, "key": i.key,
                         "destinations": list(i.destinations),
                         "allowed_peers": list(i.allowed_peers),
                         "transparent": i.transparent,
                         "workload": {"namespace": i.workload.namespace,
                                      "labels": dict(i.workload.labels)}}
                        for i in self.inbound if i.workload is not None],
            "outbound": [{"name": o.name, "listen": o.listen, "peer": o.peer,
                          "authority": o.authority, "cert": o.cert, "key": o.key,
                          "peer_identities": list(o.peer_identities),
                          "baggage": o.baggage, "forwarded_for": o.forwarded_for,
                          "pool_idle_ms": o.pool_idle_ms, "keepalive_ms": o.keepalive_ms,
                          "transparent": o.transparent}
                         for o in self.outbound],
        }, separators=(",", ":"))


@dataclass(frozen=True)
class PolicySnapshot:
    """A compiled rule set (``agent.policy.compile.compile_policy_set``) to make current.
    ``version`` must be greater than the last applied one's."""

    version: int
    rules: Mapping[str, object]

    def to_json(self) -> str:
        """The control message: one line, no newline inside."""
        return json.dumps({"message": "policy", "version": self.version,
                           "rules": self.rules}, separators=(",", ":"))


@dataclass(frozen=True)
class CertificatesUpdate:
    """A new certificate chain and key (PEM files) for a local identity (SPIFFE URI):
    every listener presenting that identity uses them for new handshakes; live
    connections keep the certificate they started with (rotation)."""

    identity: str
    cert: str
    key: str

    def to_json(self) -> str:
        """The control message: one line, no newline inside."""
        return json.dumps({"message": "certificates", "identity": self.identity,
                           "cert": self.cert, "key": self.key}, separators=(",", ":"))


ControlMessage = PolicySnapshot | CertificatesUpdate


class Outcome(Enum):
    CLOSED = "closed"
    SOCKET_RESET = "socket_reset"
    STREAM_RESET = "stream_reset"
    REJECTED = "rejected"
    DIAL_FAILED = "dial_failed"
    CANCELLED = "cancelled"
    CONNECT_FAILED = "connect_failed"
    DENIED = "denied"  # policy: 401 before any dial, or revoked live (RST both sides)


@dataclass(frozen=True)
class ConnectionRecord:
    """One tunnelled connection, reported at its end."""

    direction: str  # "inbound" | "outbound"
    listener: str
    src: str
    dst: str
    peer_identity: str | None
    outcome: Outcome
    status: int
    bytes_to_destination: int
    bytes_from_destination: int
    duration_us: int
    forwarded: str | None = None
    baggage: str | None = None
    traceparent: str | None = None
    reason: str | None = None
    policy: str | None = None  # the policy that decided (namespace/name), if one did


@dataclass(frozen=True)
class Ready:
    listeners: dict[str, str]
    workers: int


@dataclass(frozen=True)
class HboneConnectionClosed:
    listener: str
    peer: str
    reason: str


@dataclass(frozen=True)
class DatapathError:
    message: str


@dataclass(frozen=True)
class PolicyApplied:
    """A snapshot is current; ``revoked`` live connections it denies were ended."""

    version: int
    policies: int
    revoked: int


@dataclass(frozen=True)
class CertificatesApplied:
    """``listeners`` now present the new certificate of ``identity``."""

    identity: str
    listeners: int


Event = (Ready | ConnectionRecord | HboneConnectionClosed | DatapathError | PolicyApplied
         | CertificatesApplied)


def parse_event(line: bytes | str) -> Event:
    """Decode one stdout line. ProtocolError for another version or an unknown shape."""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise ProtocolError(f"datapath wrote a line that is not JSON: {line!r}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"datapath event is not an object: {line!r}")
    if obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"datapath speaks protocol {obj.get('v')!r}, this driver "
                            f"{PROTOCOL_VERSION}: rebuild it (scripts/setup.sh)")
    kind = obj.get("event")
    try:
        if kind == "ready":
            return Ready(listeners=dict(obj["listeners"]), workers=int(obj["workers"]))
        if kind == "connection":
            return ConnectionRecord(
                direction=obj["direction"], listener=obj["listener"], src=obj["src"],
                dst=obj["dst"], peer_identity=obj.get("peer_identity"),
                outcome=Outcome(obj["outcome"]), status=int(obj["status"]),
                bytes_to_destination=int(obj["bytes_to_destination"]),
                bytes_from_destination=int(obj["bytes_from_destination"]),
                duration_us=int(obj["duration_us"]), forwarded=obj.get("forwarded"),
                baggage=obj.get("baggage"), traceparent=obj.get("traceparent"),
                reason=obj.get("reason"), policy=obj.get("policy"))
        if kind == "hbone_connection_closed":
            return HboneConnectionClosed(listener=obj["listener"], peer=obj["peer"],
                                         reason=obj["reason"])
        if kind == "error":
            return DatapathError(message=obj["message"])
        if kind == "certificates_applied":
            return CertificatesApplied(identity=str(obj["identity"]),
                                       listeners=int(obj["listeners"]))
        if kind == "policy_applied":
            return PolicyApplied(version=int(obj["version"]), policies=int(obj["policies"]),
                                 revoked=int(obj["revoked"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"datapath event {kind!r} is malformed: {exc}") from exc
    raise ProtocolError(f"unknown datapath event {kind!r}")
