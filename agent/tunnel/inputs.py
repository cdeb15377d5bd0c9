"""What every connection handler gets: one frozen bundle, as ztunnel's ``ProxyInputs``
(``src/proxy.rs``: config, state, metrics, connection manager, socket factory,
certificate source). Handlers never see the :class:`~agent.tunnel.main.Tunnel`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.config import TunnelConfig
from agent.hbone.pool import HbonePool
from agent.identity.store import IdentityStore
from agent.telemetry.metrics import TunnelMetrics
from agent.tunnel.connection import ConnectionRecord
from agent.tunnel.dialer import Dialer
from agent.tunnel.discovery import WorkloadSource
from agent.tunnel.gate import PolicyGate
from agent.tunnel.tracker import ConnectionTracker

TLS_HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True)
class ProxyInputs:
    cfg: TunnelConfig
    workloads: WorkloadSource
    policy: PolicyGate
    tracker: ConnectionTracker
    metrics: TunnelMetrics
    dialer: Dialer
    # HBONE mode only (None in plain mode): certificates and the outbound pool.
    identities: IdentityStore | None = None
    pool: HbonePool | None = None
    tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT
    # Writes a finished connection's access-log line (tests record them).
    access_log: Callable[[ConnectionRecord], None] = ConnectionRecord.log
    # Draws a Service endpoint per connection (tests pass a seeded one).
    rng: random.Random = field(default_factory=random.Random)
    # Set when the tunnel stops: inbound HBONE connections send GOAWAY and close once
    # their streams end (agent.tunnel.drain).
    draining: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def hbone(self) -> bool:
        return self.identities is not None and self.pool is not None

    @property
    def tunnel_ports(self) -> frozenset[int]:
        """The tunnel's own listener ports, ztunnel's ``illegal_ports`` (src/config.rs:
        15008, 15006, 15001): a connection whose original destination port is one of
        them is a direct connection to the tunnel or a loop, never carried."""
        c = self.cfg
        return frozenset(p for p in (c.outbound_port, c.inbound_port, c.hbone_port) if p)
