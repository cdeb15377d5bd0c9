"""Workload identity for the HBONE tunnel: SPIFFE IDs, the mesh CA, and mTLS contexts.

The node agent runs its own small certificate authority (ECDSA P-256) kept in a
root-only directory. Every workload gets a short-lived leaf certificate whose only
URI SAN is its SPIFFE ID ``spiffe://<trust domain>/ns/<namespace>/sa/<service account>``,
exactly like Istio's certificates, so the peer's identity is read from the certificate
and never from a hostname.

Pure parts (no I/O): :class:`SpiffeId`, :func:`parse_spiffe_id`, :func:`peer_spiffe_id`,
:meth:`MeshCA.issue`, :meth:`IdentityStore.needs_rotation`.
Parts with side effects (files, ``ssl``): :func:`init_ca`, :func:`load_ca`, and the
``*_context`` methods of :class:`IdentityStore` (a private temp file per context build,
because :meth:`ssl.SSLContext.load_cert_chain` only reads files).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_CERT_TTL_SECONDS = 24 * 3600
CA_VALIDITY_DAYS = 10 * 365
# Leaf certificates start a little in the past so that a peer whose clock runs
# slightly behind ours does not reject a certificate issued a moment ago.
CLOCK_SKEW_ALLOWANCE = datetime.timedelta(minutes=1)

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"

_SPIFFE_SCHEME = "spiffe://"
# SPIFFE spec: trust domain is lowercase letters, digits, '.', '-', '_'.
_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]+$")
# SPIFFE spec: path segments are letters, digits, '.', '-', '_' (and not '.' or '..').
_PATH_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")


class IdentityError(ValueError):
    """A certificate or CA is unusable; the message says why and what to do."""


@dataclass(frozen=True, order=True)
class SpiffeId:
    """A workload identity in Istio's SPIFFE form; ``str()`` gives the URI."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        if not _TRUST_DOMAIN_RE.match(self.trust_domain):
            raise ValueError(
                f"invalid SPIFFE trust domain {self.trust_domain!r}: "
                "use lowercase letters, digits, '.', '-' or '_'"
            )
        for label, value in (("namespace", self.namespace),
                             ("service account", self.service_account)):
            if not _PATH_SEGMENT_RE.match(value) or value in (".", ".."):
                raise ValueError(
                    f"invalid SPIFFE {label} {value!r}: "
                    "use letters, digits, '.', '-' or '_' (not '.' or '..')"
                )

    @property
    def uri(self) -> str:
        return (f"{_SPIFFE_SCHEME}{self.trust_domain}"
                f"/ns/{self.namespace}/sa/{self.service_account}")

    def __str__(self) -> str:
        return self.uri


def parse_spiffe_id(uri: str) -> SpiffeId:
    """Parse ``spiffe://<td>/ns/<ns>/sa/<sa>`` strictly; ValueError names the problem."""
    if not isinstance(uri, str):
        raise ValueError(f"SPIFFE ID must be a string, got {type(uri).__name__}")
    if not uri.startswith(_SPIFFE_SCHEME):
        raise ValueError(f"not a SPIFFE ID (must start with {_SPIFFE_SCHEME!r}): {uri!r}")
    rest = uri[len(_SPIFFE_SCHEME):]
    if any(c in rest for c in "?#@%"):
        raise ValueError(f"SPIFFE ID must not contain query, fragment, userinfo or "
                         f"percent-encoding: {uri!r}")
    parts = rest.split("/")
    if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
        raise ValueError(
            f"SPIFFE ID must look like spiffe://<trust-domain>/ns/<namespace>/sa/"
            f"<service-account>: {uri!r}"
        )
    return SpiffeId(trust_domain=parts[0], namespace=parts[2], service_account=parts[4])


def peer_spiffe_id(der_cert: bytes) -> SpiffeId:
    """The SPIFFE ID in a DER certificate's URI SAN (exactly one allowed)."""
    if not der_cert:
        raise IdentityError("peer presented no certificate")
    try:
        cert = x509.load_der_x509_certificate(der_cert)
    except ValueError as exc:
        raise IdentityError(f"peer certificate is not valid DER: {exc}") from exc
    return _spiffe_id_of(cert)


def _spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise IdentityError("certificate has no subjectAltName, so no SPIFFE ID") from exc
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith(_SPIFFE_SCHEME)]
    if len(uris) != 1:
        raise IdentityError(f"certificate must carry exactly one SPIFFE URI SAN, has {uris}")
    try:
        return parse_spiffe_id(uris[0])
    except ValueError as exc:
        raise IdentityError(str(exc)) from exc


def _utcnow(now: float | None) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(time.time() if now is None else now,
                                           tz=datetime.timezone.utc)


@dataclass(frozen=True)
class WorkloadCert:
    """A workload's leaf certificate and private key (PEM), plus the CA that signed it."""

    spiffe_id: SpiffeId
    cert_pem: bytes
    key_pem: bytes
    ca_cert_pem: bytes
    not_before: float  # POSIX seconds
    not_after: float
    serial: int

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


@dataclass
class MeshCA:
    """The node's signing CA. Holds the private key in memory; issue() is pure."""

    trust_domain: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_pem: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, spiffe_id: SpiffeId, ttl_seconds: int = DEFAULT_CERT_TTL_SECONDS,
              now: float | None = None) -> WorkloadCert:
        """Sign a fresh ECDSA P-256 leaf for ``spiffe_id`` valid ``ttl_seconds`` from ``now``.

        ``now`` (POSIX seconds) lets tests mint already-expired certificates.
        """
        if spiffe_id.trust_domain != self.trust_domain:
            raise IdentityError(f"CA for trust domain {self.trust_domain!r} will not sign "
                                f"{spiffe_id} (other trust domain)")
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
        issued_at = _utcnow(now)
        not_before = issued_at - CLOCK_SKEW_ALLOWANCE
        not_after = issued_at + datetime.timedelta(seconds=ttl_seconds)
        key = ec.generate_private_key(ec.SECP256R1())
        serial = x509.random_serial_number()
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            x509.CertificateBuilder()
            # Istio leaves the subject empty; the identity lives in the SAN only.
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(spiffe_id.uri)]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_ski), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return WorkloadCert(
            spiffe_id=spiffe_id,
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()),
            ca_cert_pem=self.cert_pem,
            not_before=not_before.timestamp(),
            not_after=not_after.timestamp(),
            serial=serial,
        )


def _new_ca(trust_domain: str, now: float | None = None) -> MeshCA:
    key = ec.generate_private_key(ec.SECP256R1())
    start = _utcnow(now) - CLOCK_SKEW_ALLOWANCE
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
        x509.NameAttribute(NameOID.COMMON_NAME, f"meshagent CA {trust_domain}"),
    ])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        # The trust domain is recorded as a SPIFFE URI so load_ca() can check it.
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"{_SPIFFE_SCHEME}{trust_domain}")]),
            critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return MeshCA(trust_domain=trust_domain, cert=cert, key=key)


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically with ``mode`` from creation (no umask window).

    Side effects: creates a temp file next to ``path`` and renames it over ``path``.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # left over from a crashed run with a recycled pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def init_ca(ca_dir: str | os.PathLike[str],
            trust_domain: str = DEFAULT_TRUST_DOMAIN) -> MeshCA:
    """Create the mesh CA in ``ca_dir`` or load the one already there.

    Side effects: creates ``ca_dir`` (mode 0700, and tightens an existing one to 0700),
    writes ``ca.key`` (0600) and ``ca.crt`` (0644) if they do not exist.
    Raises IdentityError if the directory holds a CA for another trust domain, or half
    a CA (one file without the other).
    """
    SpiffeId(trust_domain, "default", "default")  # validates the trust domain
    directory = Path(ca_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    if cert_path.exists() or key_path.exists():
        ca = load_ca(directory)
        if ca.trust_domain != trust_domain:
            raise IdentityError(
                f"{directory} holds a CA for trust domain {ca.trust_domain!r}, not "
                f"{trust_domain!r}; use another ca_dir or remove it deliberately"
            )
        return ca
    ca = _new_ca(trust_domain)
    # Key first: a crash in between leaves a key without a cert, which load_ca reports.
    _write_private(key_path, ca.key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()), 0o600)
    _write_private(cert_path, ca.cert_pem, 0o644)
    return ca


def load_ca(ca_dir: str | os.PathLike[str]) -> MeshCA:
    """Load the CA written by :func:`init_ca`. Side effects: reads two files."""
    directory = Path(ca_dir)
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    missing = [p.name for p in (cert_path, key_path) if not p.exists()]
    if missing:
        raise IdentityError(f"CA directory {directory} is missing {', '.join(missing)}; "
                            "run init_ca() (or remove the directory to start over)")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{key_path} is not an EC private key")
    cert_key = cert.public_key()
    if (not isinstance(cert_key, ec.EllipticCurvePublicKey)
            or key.public_key().public_numbers() != cert_key.public_numbers()):
        raise IdentityError(f"{key_path} does not belong to {cert_path}")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        trust_domain = next(u[len(_SPIFFE_SCHEME):] for u in uris
                            if u.startswith(_SPIFFE_SCHEME))
    except (x509.ExtensionNotFound, StopIteration) as exc:
        raise IdentityError(f"{cert_path} does not record a SPIFFE trust domain") from exc
    return MeshCA(trust_domain=trust_domain, cert=cert, key=key)


def _tls13_context(purpose: ssl.Purpose) -> ssl.SSLContext:
    protocol = ssl.PROTOCOL_TLS_SERVER if purpose == ssl.Purpose.CLIENT_AUTH else \
        ssl.PROTOCOL_TLS_CLIENT
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _load_workload_cert(ctx: ssl.SSLContext, cert: WorkloadCert) -> None:
    """Load the leaf and key into ``ctx``.

    Side effects: writes the PEMs into a fresh 0700 temp dir and deletes it right after,
    because ssl has no in-memory API for the certificate chain.
    """
    tmpdir = tempfile.mkdtemp(prefix="meshagent-cert-")
    try:
        os.chmod(tmpdir, 0o700)
        cert_path = os.path.join(tmpdir, "cert.pem")
        key_path = os.path.join(tmpdir, "key.pem")
        _write_private(Path(cert_path), cert.cert_pem, 0o600)
        _write_private(Path(key_path), cert.key_pem, 0o600)
        ctx.load_cert_chain(cert_path, key_path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def server_context_for(cert: WorkloadCert) -> ssl.SSLContext:
    """A TLS 1.3 server context presenting ``cert`` and requiring a mesh client cert."""
    ctx = _tls13_context(ssl.Purpose.CLIENT_AUTH)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=cert.ca_cert_pem.decode())
    _load_workload_cert(ctx, cert)
    return ctx


def client_context_for(cert: WorkloadCert) -> ssl.SSLContext:
    """A TLS 1.3 client context presenting ``cert`` and verifying the server chain.

    Hostname checking is off: the caller checks the peer's SPIFFE ID instead
    (:func:`peer_spiffe_id`), as ztunnel does.
    """
    ctx = _tls13_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=cert.ca_cert_pem.decode())
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
