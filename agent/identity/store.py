"""Workload certificates and their TLS contexts, issued on demand and rotated.

The store asks the mesh CA (:class:`~agent.identity.ca.MeshCA`) for a leaf per workload
identity and renews it at half-life (ztunnel ``src/identity/manager.rs`` refreshes the
same way). Contexts are TLS 1.3 only with ALPN ``h2``, present the leaf *with its
chain* and trust only the mesh trust anchors. ``ssl`` checks the chain, validity and
EKU purpose during the handshake; the SPIFFE checks (one URI SAN, trust domain,
expected identity, leaf key usage) run on the peer certificate right after it, in
:mod:`agent.identity.verify`.

Pure: :meth:`IdentityStore.needs_rotation`. Side effects: the ``*_context`` functions
write the PEMs to a private temp dir for the moment of loading them (``ssl`` only
reads certificate chains from files).
"""

from __future__ import annotations

import os
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.identity.ca import DEFAULT_CERT_TTL_SECONDS, MeshCA, WorkloadCert, write_private
from agent.identity.spiffe import SpiffeId


def _tls13_context(server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _load_workload_cert(ctx: ssl.SSLContext, cert: WorkloadCert) -> None:
    """Load the leaf, its chain and key into ``ctx``.

    Side effects: writes the PEMs into a fresh 0700 temp dir and deletes it right after,
    because ssl has no in-memory API for the certificate chain.
    """
    tmpdir = tempfile.mkdtemp(prefix="meshagent-cert-")
    try:
        os.chmod(tmpdir, 0o700)
        cert_path = Path(tmpdir, "cert.pem")
        key_path = Path(tmpdir, "key.pem")
        write_private(cert_path, cert.full_chain_pem, 0o600)
        write_private(key_path, cert.key_pem, 0o600)
        ctx.load_cert_chain(str(cert_path), str(key_path))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def server_context_for(cert: WorkloadCert) -> ssl.SSLContext:
    """A TLS 1.3 server context presenting ``cert`` and requiring a mesh client cert."""
    ctx = _tls13_context(server=True)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=cert.trust_anchors_pem.decode())
    _load_workload_cert(ctx, cert)
    return ctx


def client_context_for(cert: WorkloadCert) -> ssl.SSLContext:
    """A TLS 1.3 client context presenting ``cert`` and verifying the server chain.

    Hostname checking is off: the caller checks the peer's SPIFFE ID instead
    (:func:`agent.identity.verify.verify_peer`), as ztunnel does.
    """
    ctx = _tls13_context(server=False)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=cert.trust_anchors_pem.decode())
    _load_workload_cert(ctx, cert)
    return ctx


class IdentityStore:
    """Certificates and SSL contexts per workload identity, issued on demand.

    Rotation replaces the certificate and drops the cached contexts, so only new
    connections use the new certificate; connections already established keep the
    SSLContext (and SSLObject) they were made with. Thread-safe.
    """

    def __init__(self, ca: MeshCA, ttl_seconds: int = DEFAULT_CERT_TTL_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        self._ca = ca
        self._ttl_seconds = ttl_seconds
        self._clock = clock
        self._certs: dict[SpiffeId, WorkloadCert] = {}
        self._contexts: dict[tuple[SpiffeId, str], tuple[int, ssl.SSLContext]] = {}
        self._lock = threading.Lock()

    @property
    def ca(self) -> MeshCA:
        return self._ca

    @property
    def trust_domain(self) -> str:
        return self._ca.trust_domain

    @staticmethod
    def needs_rotation(cert: WorkloadCert, now: float) -> bool:
        """True once half the certificate's lifetime has passed (ztunnel's rule). Pure."""
        half_life = (cert.not_after - cert.not_before) / 2
        return now >= cert.not_before + half_life

    def get(self, spiffe_id: SpiffeId) -> WorkloadCert:
        """The current certificate for ``spiffe_id``; issues (or renews) it when needed."""
        now = self._clock()
        with self._lock:
            cert = self._certs.get(spiffe_id)
            if cert is None or self.needs_rotation(cert, now):
                cert = self._ca.issue(spiffe_id, self._ttl_seconds, now=now)
                self._certs[spiffe_id] = cert
            return cert

    def identities(self) -> list[SpiffeId]:
        with self._lock:
            return sorted(self._certs)

    def forget(self, spiffe_id: SpiffeId) -> None:
        """Drop a workload's certificate and contexts (e.g. its pod left the node)."""
        with self._lock:
            self._certs.pop(spiffe_id, None)
            for role in ("server", "client"):
                self._contexts.pop((spiffe_id, role), None)

    def rotate_due(self, now: float | None = None) -> list[SpiffeId]:
        """Renew every certificate past half life; returns the identities renewed."""
        now = self._clock() if now is None else now
        renewed: list[SpiffeId] = []
        with self._lock:
            for spiffe_id, cert in list(self._certs.items()):
                if self.needs_rotation(cert, now):
                    self._certs[spiffe_id] = self._ca.issue(spiffe_id, self._ttl_seconds,
                                                            now=now)
                    renewed.append(spiffe_id)
        return renewed

    def server_context(self, spiffe_id: SpiffeId) -> ssl.SSLContext:
        """Server-side context for the current cert of ``spiffe_id`` (cached per cert)."""
        return self._context(spiffe_id, "server", server_context_for)

    def client_context(self, spiffe_id: SpiffeId) -> ssl.SSLContext:
        """Client-side context for the current cert of ``spiffe_id`` (cached per cert)."""
        return self._context(spiffe_id, "client", client_context_for)

    def _context(self, spiffe_id: SpiffeId, role: str,
                 build: Callable[[WorkloadCert], ssl.SSLContext]) -> ssl.SSLContext:
        cert = self.get(spiffe_id)
        with self._lock:
            cached = self._contexts.get((spiffe_id, role))
            if cached is not None and cached[0] == cert.serial:
                return cached[1]
        ctx = build(cert)
        with self._lock:
            self._contexts[(spiffe_id, role)] = (cert.serial, ctx)
        return ctx
