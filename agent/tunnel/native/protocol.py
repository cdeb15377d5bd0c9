"""The control protocol between Python and ``meshagent-datapath``, version 1 (pure).

Python writes one configuration object (one JSON line) to the process's stdin and keeps
stdin open: EOF tells the process its driver is gone and it exits (fail closed). The
process writes one JSON event per line to stdout, each with ``"v": 1``: ``ready`` (the
bound listeners), ``connection`` (one per tunnelled connection, at its end, with exact
byte counts), ``hbone_connection_closed`` (an HBONE connection ended for a reason worth
telling: TLS refused, GOAWAY ENHANCE_YOUR_CALM, ...), ``error``.
The Rust side of this contract is ``src/config.rs`` and ``src/control.rs``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """The datapath sent something this driver cannot read (version or shape)."""


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
        """The configuration message: one line, no newline inside."""
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
                         "transparent": i.transparent} for i in self.inbound],
            "outbound": [{"name": o.name, "listen": o.listen, "peer": o.peer,
                          "authority": o.authority, "cert": o.cert, "key": o.key,
                          "peer_identities": list(o.peer_identities),
                          "baggage": o.baggage, "forwarded_for": o.forwarded_for,
                          "pool_idle_ms": o.pool_idle_ms, "keepalive_ms": o.keepalive_ms,
                          "transparent": o.transparent}
                         for o in self.outbound],
        }, separators=(",", ":"))


class Outcome(Enum):
    CLOSED = "closed"
    SOCKET_RESET = "socket_reset"
    STREAM_RESET = "stream_reset"
    REJECTED = "rejected"
    DIAL_FAILED = "dial_failed"
    CANCELLED = "cancelled"
    CONNECT_FAILED = "connect_failed"


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


Event = Ready | ConnectionRecord | HboneConnectionClosed | DatapathError


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
                reason=obj.get("reason"))
        if kind == "hbone_connection_closed":
            return HboneConnectionClosed(listener=obj["listener"], peer=obj["peer"],
                                         reason=obj["reason"])
        if kind == "error":
            return DatapathError(message=obj["message"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"datapath event {kind!r} is malformed: {exc}") from exc
    raise ProtocolError(f"unknown datapath event {kind!r}")
