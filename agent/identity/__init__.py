"""Workload identity for the mesh, shared by tunnel, policy, CLI and lab.

* :mod:`agent.identity.spiffe` — SPIFFE IDs: the one parser and formatter (pure).
* :mod:`agent.identity.ca` — the mesh CA: meshagent's own or Istio plug-in CA material
  (``cacerts``), leaf issuing with chains.
* :mod:`agent.identity.store` — per-workload certificates, rotation, TLS contexts.
* :mod:`agent.identity.verify` — peer certificate verification, both directions.

Import from the modules; this package re-exports nothing.
"""
