"""The waypoint: the mesh's L7 proxy for the destinations bound to it.

Pure cores (no asyncio, no sockets):

* :mod:`~agent.waypoint.authz` - L7 AuthorizationPolicy (Envoy RBAC semantics).
* :mod:`~agent.waypoint.routing` - Gateway API HTTPRoute matching, retries, faults.
* :mod:`~agent.waypoint.binding` - which destinations use which waypoint (istio.io/use-waypoint).
* :mod:`~agent.waypoint.config` - the waypoint's configuration file.
* :mod:`~agent.waypoint.limits` - Envoy-default circuit breakers (503 UO/URX).

The asyncio shell: :mod:`~agent.waypoint.proxy` (HBONE in, HTTP/1.1 or h2c per
stream, policy, routing, limits, retries), :mod:`~agent.waypoint.upstream` (HTTP/1.1
and HTTP/2 to the endpoints over HBONE, pooled), :mod:`~agent.waypoint.telemetry`
(Istio metrics, access log) and :mod:`~agent.waypoint.main` (``meshagent waypoint``).
Semantics and citations: docs/waypoint.md.
"""
