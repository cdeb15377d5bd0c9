"""The waypoint: the mesh's L7 proxy for the destinations bound to it.

Pure cores (no asyncio, no sockets):

* :mod:`~agent.waypoint.authz` - L7 AuthorizationPolicy (Envoy RBAC semantics).
* :mod:`~agent.waypoint.routing` - Gateway API HTTPRoute matching, retries, faults.
* :mod:`~agent.waypoint.binding` - which destinations use which waypoint (istio.io/use-waypoint).
* :mod:`~agent.waypoint.config` - the waypoint's configuration file.
* :mod:`~agent.waypoint.limits` - Envoy-default circuit breakers (503 UO/URX).

The asyncio shell: :mod:`~agent.waypoint.proxy` (HBONE in, HTTP/1.1 or h2c per
stream, HBONE out) and :mod:`~agent.waypoint.telemetry`.
"""
