"""Relay pairs on the bench's lab path that are not the mesh: the native anchors.

- ``stunnel`` (C, OpenSSL; Debian's stunnel4): one mutual-TLS 1.3 connection per
  relayed TCP connection, the native TLS relay issue 14 measures HBONE against.
- ``native-hbone``: the native datapath (``meshagent-datapath``, Rust) as a standalone
  HBONE pair: relay A in node1 takes plain TCP and opens CONNECT streams on a pooled
  mTLS HTTP/2 connection to relay B in node2 (SPIFFE certificates from a bench CA),
  which dials the pod. The same byte path the tunnel would run, without the eBPF
  capture (the pods are not enrolled for these variants).

Both sit where ``tlsrelay`` sits: client pod -> node1 (10.244.1.1:port+offset) ->
underlay -> node2 -> server pod. The writers here are pure (files only); the scenario
spawns the processes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.identity.ca import init_ca
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityStore
from agent.policy.compile import compile_policy_set
from agent.policy.engine import PolicySet
from agent.tunnel.native.protocol import (
    DatapathConfig,
    InboundListener,
    OutboundListener,
    PolicySnapshot,
    Workload,
)

TRUST_DOMAIN = "cluster.local"
CLIENT_ID = SpiffeId(TRUST_DOMAIN, "default", "bench-client")
SERVER_ID = SpiffeId(TRUST_DOMAIN, "default", "bench-server")


@dataclass(frozen=True)
class PairPlan:
    """Where relay A listens (node1) and relay B listens (node2) for each port."""

    a_host: str  # node1 address the client pod reaches (its gateway)
    b_host: str  # node2 underlay address
    dst_host: str  # the server pod
    ports: Sequence[int]
    a_offset: int
    b_offset: int  # stunnel: per port; native: the one HBONE port is b_offset itself


def write_stunnel(plan: PairPlan, certs: Path, out: Path) -> tuple[Path, Path]:
    """stunnel configs for relay A (client side) and relay B; returns their paths.
    ``certs`` is a :mod:`agent.bench.tlsrelay` certs folder (ca.pem, client/server)."""
    common = ["foreground = yes", "pid =", "debug = 3",
              "socket = l:TCP_NODELAY=1", "socket = r:TCP_NODELAY=1"]
    a, b = list(common), list(common)
    for port in plan.ports:
        a += [f"[p{port}]", "client = yes",
              f"accept = {plan.a_host}:{port + plan.a_offset}",
              f"connect = {plan.b_host}:{port + plan.b_offset}",
              f"cert = {certs / 'client.pem'}", f"key = {certs / 'client.key'}",
              f"CAfile = {certs / 'ca.pem'}", "verifyChain = yes",
              "sslVersionMin = TLSv1.3"]
        b += [f"[p{port}]", f"accept = {plan.b_host}:{port + plan.b_offset}",
              f"connect = {plan.dst_host}:{port}",
              f"cert = {certs / 'server.pem'}", f"key = {certs / 'server.key'}",
              f"CAfile = {certs / 'ca.pem'}", "verifyChain = yes",
              "sslVersionMin = TLSv1.3"]
    out.mkdir(parents=True, exist_ok=True)
    pa, pb = out / "stunnel-a.conf", out / "stunnel-b.conf"
    pa.write_text("\n".join(a) + "\n")
    pb.write_text("\n".join(b) + "\n")
    return pa, pb


def write_spiffe_certs(out: Path) -> dict[str, dict[str, str]]:
    """A bench mesh CA and the two SPIFFE identities, as PEM files."""
    store = IdentityStore(init_ca(out / "ca", TRUST_DOMAIN))
    files: dict[str, dict[str, str]] = {}
    for role, spiffe_id in (("client", CLIENT_ID), ("server", SERVER_ID)):
        cert = store.get(spiffe_id)
        d = out / role
        d.mkdir(parents=True, exist_ok=True)
        (d / "cert.pem").write_bytes(cert.full_chain_pem)
        (d / "key.pem").touch(mode=0o600)
        (d / "key.pem").write_bytes(cert.key_pem)
        (d / "ca.pem").write_bytes(cert.trust_anchors_pem)
        files[role] = {k: str(d / f"{k}.pem") for k in ("cert", "key", "ca")}
    return files


def write_native(plan: PairPlan, out: Path, workers: int = 0,
                 runtime: str = "per_core") -> tuple[Path, Path, Path]:
    """Control-protocol v2 configs for relay A (outbound listeners) and B (15008-like
    inbound on ``b_host:b_offset``) and the policy message for both (the empty set: no
    policy applies, as in the Python pair); returns their paths (``--config FILE
    --policy FILE``)."""
    files = write_spiffe_certs(out / "certs")
    peer = f"{plan.b_host}:{plan.b_offset}"
    a = DatapathConfig(
        trust_domain=TRUST_DOMAIN, roots=files["client"]["ca"], workers=workers,
        runtime=runtime, outbound=[OutboundListener(
            name=f"p{port}", listen=f"{plan.a_host}:{port + plan.a_offset}", peer=peer,
            authority=f"{plan.dst_host}:{port}", cert=files["client"]["cert"],
            key=files["client"]["key"], peer_identities=(str(SERVER_ID),),
            baggage="k8s.namespace.name=default,k8s.pod.name=n1-a") for port in plan.ports])
    b = DatapathConfig(
        trust_domain=TRUST_DOMAIN, roots=files["server"]["ca"], workers=workers,
        runtime=runtime, inbound=[InboundListener(
            name="hbone", listen=peer, cert=files["server"]["cert"],
            key=files["server"]["key"], workload=Workload("default", {}),
            destinations=tuple(f"{plan.dst_host}:{port}" for port in plan.ports))])
    out.mkdir(parents=True, exist_ok=True)
    pa, pb, pp = out / "native-a.json", out / "native-b.json", out / "native-policy.json"
    pa.write_text(a.to_json())
    pb.write_text(b.to_json())
    pp.write_text(PolicySnapshot(1, compile_policy_set(PolicySet())).to_json())
    return pa, pb, pp


def read_json(path: Path) -> dict[str, object]:
    return dict(json.loads(path.read_text()))
