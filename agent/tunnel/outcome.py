"""The tunnel's vocabulary for a proxied connection (pure): direction, path, outcome.

Every connection the tunnel handles ends with exactly one :class:`Outcome`; the
outcome carries the Istio ``response_flags`` value it is reported with. The flag
names are ztunnel's (``src/proxy/metrics.rs``, ``enum ResponseFlags`` and its
``EncodeLabelValue``: ``-``, ``DENY``, ``CONNECT``, ``TLS_FAILURE``,
``H2_HANDSHAKE_FAILURE``, ``NETWORK_POLICY``, ``IDENTITY_ERROR``, ``CERT_REVOKED``),
plus Envoy's ``UH`` for a Service with no healthy endpoint.
"""

from __future__ import annotations

from enum import Enum

from agent.telemetry.metrics import RESPONSE_FLAG_NONE, RESPONSE_FLAGS


class Direction(Enum):
    """Which side of the mesh this tunnel is for the connection."""

    OUTBOUND = "outbound"  # the client pod is enrolled here (reporter "source")
    INBOUND = "inbound"    # the server pod is enrolled here (reporter "destination")


class Path(Enum):
    """How the tunnel carried the connection (the access log's ``path``)."""

    PLAIN = "plain"              # plain mode, or plaintext inbound on 15006
    PASSTHROUGH = "passthrough"  # HBONE mode, destination outside the mesh
    HBONE = "hbone"              # mTLS HTTP/2 CONNECT between nodes
    HBONE_LOCAL = "hbone-local"  # both pods on this node: handed over in process
    WAYPOINT = "waypoint"        # HBONE to the destination's waypoint (not to it)

    @property
    def mtls(self) -> bool:
        """Whether the connection is reported as ``connection_security_policy=mutual_tls``."""
        return self in (Path.HBONE, Path.HBONE_LOCAL, Path.WAYPOINT)


class Outcome(Enum):
    """How a connection ended: the access log's ``result`` and its response flag.

    ``opened`` outcomes (OK, RESET) are counted as opened and closed connections;
    every other outcome is a connection that never reached its destination and is
    counted in ``istio_tcp_connections_failed_total`` with its flag.
    """

    OK = ("ok", RESPONSE_FLAG_NONE)
    RESET = ("reset", RESPONSE_FLAG_NONE)
    # Authorization policy (ztunnel AuthorizationPolicyDenied, also used for a
    # connection closed later because a policy change no longer allows it).
    DENIED = ("denied", "DENY")
    # Refused before policy: not enrolled here, strict mode, a CONNECT for another
    # destination, a direct connection to a tunnel port.
    REFUSED = ("refused", "DENY")
    CONNECT_FAILED = ("connect_failed", "CONNECT")
    TLS_FAILED = ("tls_failed", "TLS_FAILURE")
    # The peer's certificate and its address disagree (a workload at that address
    # has another identity), or the source has no identity to present.
    IDENTITY_ERROR = ("identity_error", "IDENTITY_ERROR")
    # The client went away before the connection was established. ztunnel records an
    # error without a specific flag as a connection failure (metrics.rs
    # ConnectionResult::record -> extract_failure_reason defaults to ConnectionFailure).
    CANCELLED = ("cancelled", "CONNECT")
    # A Service VIP with no healthy endpoint for the port: the client is reset at once
    # (ztunnel Error::NoHealthyUpstream; the flag is Envoy's UH, see metrics.py).
    NO_HEALTHY_UPSTREAM = ("no_healthy_upstream", "UH")
    # The destination is bound to a waypoint that names nothing (ztunnel
    # Error::UnknownWaypoint, reported as a connection failure), or to one that would
    # send it to a waypoint again: refused, never sent direct (fail closed).
    NO_WAYPOINT = ("no_waypoint", "CONNECT")
    WAYPOINT_LOOP = ("waypoint_loop", "CONNECT")
    # The destination's waypoint binding could not be worked out (a binding document
    # could not be read, agent/model/types.py UnresolvedBinding): refused, never sent
    # direct. The flag is the one ztunnel gives the unknown waypoint it would see.
    WAYPOINT_UNRESOLVED = ("waypoint_unresolved", "CONNECT")

    def __init__(self, result: str, response_flag: str) -> None:
        if response_flag not in RESPONSE_FLAGS:
            raise ValueError(f"{result}: unknown response flag {response_flag!r}")
        self.result = result
        self.response_flag = response_flag

    @property
    def opened(self) -> bool:
        """True for outcomes of a connection that reached its destination."""
        return self in (Outcome.OK, Outcome.RESET)

    @property
    def policy_decision(self) -> str:
        """The access log's ``policy_decision``: ``deny`` for every connection the tunnel
        refused to carry (policy, a refusal before policy, a bad peer identity or
        certificate), ``allow`` for the rest."""
        return "deny" if self in _REFUSALS else "allow"


_REFUSALS = frozenset({Outcome.DENIED, Outcome.REFUSED, Outcome.IDENTITY_ERROR,
                       Outcome.TLS_FAILED, Outcome.NO_WAYPOINT, Outcome.WAYPOINT_LOOP,
                       Outcome.WAYPOINT_UNRESOLVED})
