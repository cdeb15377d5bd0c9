"""The mesh CA: meshagent's own (``ca init``) or Istio plug-in CA material (``ca import``).

Two directory layouts are understood by :func:`load_ca`:

* meshagent's own CA, made by :func:`init_ca`: ``ca.crt`` (a self-signed ECDSA P-256
  root whose URI SAN ``spiffe://<trust domain>`` records the trust domain) and
  ``ca.key``. The root signs the leaves and is the only trust anchor.
* Istio's plug-in CA layout, the ``cacerts`` secret istiod reads (istio
  ``security/pkg/pki/ca/ca.go``: ``CACertFile``, ``CAPrivateKeyFile``, ``CertChainFile``,
  ``RootCertFile``; samples in ``samples/certs/``): ``ca-cert.pem`` (the signing CA,
  usually an intermediate), ``ca-key.pem`` (its key, RSA or EC, PKCS#1, SEC1 or PKCS#8),
  ``cert-chain.pem`` (the signing CA's chain, possibly ending with the root) and
  ``root-cert.pem`` (the trust anchors, one or more roots). Such a CA records no trust
  domain; it is the configured one. :func:`import_istio_ca` checks the files as istiod
  does (``util.Verify`` in ``security/pkg/pki/util/keycertbundle.go``: the signing cert
  verifies from the roots through the chain, the key matches; ``ca.go``
  ``NewPluggedCertIstioCAOptions``: the signing cert is a CA) and copies them in.

Leaves are issued as Istio issues them (``genCertTemplateFromCSR`` in
``security/pkg/pki/util/generate_cert.go``): empty subject, critical URI SAN, key usage
digitalSignature (+ keyEncipherment), EKU serverAuth + clientAuth, notBefore moved back
for clock skew, notAfter clamped to the signing chain's expiry; they are sent with
their chain (leaf, signing CA, intermediates: ``signWithCertChain``), never the root.

Pure: :meth:`MeshCA.issue`. Side effects (files) are listed on each function.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.identity.spiffe import SCHEME, SpiffeId, check_trust_domain, parse_spiffe_uri

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_CERT_TTL_SECONDS = 24 * 3600
CA_VALIDITY_DAYS = 10 * 365
# Leaf certificates start a little in the past so that a peer whose clock runs
# slightly behind ours does not reject a certificate issued a moment ago.
CLOCK_SKEW_ALLOWANCE = datetime.timedelta(minutes=1)

# meshagent's own layout
CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
# Istio's plug-in CA layout (the ``cacerts`` secret)
ISTIO_CA_CERT_FILE = "ca-cert.pem"
ISTIO_CA_KEY_FILE = "ca-key.pem"
ISTIO_CERT_CHAIN_FILE = "cert-chain.pem"
ISTIO_ROOT_CERT_FILE = "root-cert.pem"
ISTIO_FILES = (ISTIO_CA_CERT_FILE, ISTIO_CA_KEY_FILE, ISTIO_CERT_CHAIN_FILE,
               ISTIO_ROOT_CERT_FILE)

MIN_RSA_BITS = 2048
_EC_CURVES: dict[str, hashes.SHA256 | hashes.SHA384 | hashes.SHA512] = {
    "secp256r1": hashes.SHA256(), "secp384r1": hashes.SHA384(), "secp521r1": hashes.SHA512(),
}

CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class IdentityError(ValueError):
    """A certificate or CA is unusable; the message says why and what to do."""


def utc(now: float | None = None) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(time.time() if now is None else now,
                                           tz=datetime.timezone.utc)


def pem_of(certs: tuple[x509.Certificate, ...] | list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass(frozen=True)
class WorkloadCert:
    """A workload's leaf (PEM), its chain to send, its key, and the mesh trust anchors."""

    spiffe_id: SpiffeId
    cert_pem: bytes
    key_pem: bytes
    chain_pem: bytes  # intermediates sent after the leaf (empty for a self-signed CA)
    trust_anchors_pem: bytes  # the roots peers' chains must lead to
    not_before: float  # POSIX seconds
    not_after: float
    serial: int

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def full_chain_pem(self) -> bytes:
        """Leaf then intermediates: what a TLS endpoint presents."""
        return self.cert_pem + self.chain_pem


def _signature_hash(key: CAKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    if isinstance(key, rsa.RSAPrivateKey):
        return hashes.SHA256()
    return _EC_CURVES[key.curve.name]


@dataclass
class MeshCA:
    """The signing CA. Holds the private key in memory; :meth:`issue` is pure.

    ``chain``: the certificates between ``cert`` and a root (sent with every leaf);
    ``roots``: the trust anchors (``(cert,)`` for a self-signed CA).
    """

    trust_domain: str
    cert: x509.Certificate
    key: CAKey
    chain: tuple[x509.Certificate, ...] = ()
    roots: tuple[x509.Certificate, ...] = ()
    cert_pem: bytes = field(init=False)
    chain_pem: bytes = field(init=False)
    trust_anchors_pem: bytes = field(init=False)

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        if not self.roots:
            self.roots = (self.cert,)
        self.cert_pem = pem_of([self.cert])
        sent = [] if self.cert in self.roots else [self.cert]
        self.chain_pem = pem_of(sent + [c for c in self.chain if c not in self.roots])
        self.trust_anchors_pem = pem_of(self.roots)

    @property
    def expires(self) -> datetime.datetime:
        """When the first certificate of the signing chain expires."""
        return min(c.not_valid_after_utc for c in (self.cert, *self.chain))

    def issue(self, spiffe_id: SpiffeId, ttl_seconds: int = DEFAULT_CERT_TTL_SECONDS,
              now: float | None = None) -> WorkloadCert:
        """Sign a fresh ECDSA P-256 leaf for ``spiffe_id`` valid ``ttl_seconds`` from ``now``.

        ``now`` (POSIX seconds) lets tests mint already-expired certificates. The
        validity is clamped to the signing chain's expiry (Istio does the same);
        IdentityError if the chain has expired.
        """
        if spiffe_id.trust_domain != self.trust_domain:
            raise IdentityError(f"CA for trust domain {self.trust_domain!r} will not sign "
                                f"{spiffe_id} (other trust domain)")
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
        issued_at = utc(now)
        if issued_at >= self.expires:
            raise IdentityError(f"the CA's signing chain expired at {self.expires}; "
                                "import fresh CA material (meshagent ca import)")
        not_before = issued_at - CLOCK_SKEW_ALLOWANCE
        not_after = min(issued_at + datetime.timedelta(seconds=ttl_seconds), self.expires)
        key = ec.generate_private_key(ec.SECP256R1())
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            # Istio leaves the subject empty; the identity lives in the SAN only, which
            # is then critical (RFC 5280 4.2.1.6; istio util/san.go BuildSANExtension).
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
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
        )
        with contextlib.suppress(x509.ExtensionNotFound):
            # As Go's x509 does: the AKI is the issuer's SKI, left out when it has none
            # (Istio's sample ca-cert.pem has none).
            ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value),
                critical=False)
        cert = builder.sign(self.key, _signature_hash(self.key))
        return WorkloadCert(
            spiffe_id=spiffe_id,
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()),
            chain_pem=self.chain_pem,
            trust_anchors_pem=self.trust_anchors_pem,
            not_before=not_before.timestamp(),
            not_after=not_after.timestamp(),
            serial=serial,
        )


def _new_ca(trust_domain: str, now: float | None = None) -> MeshCA:
    key = ec.generate_private_key(ec.SECP256R1())
    start = utc(now) - CLOCK_SKEW_ALLOWANCE
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
            [x509.UniformResourceIdentifier(SCHEME + trust_domain)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return MeshCA(trust_domain=trust_domain, cert=cert, key=key)


def write_private(path: Path, data: bytes, mode: int) -> None:
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


def _private_dir(ca_dir: str | os.PathLike[str]) -> Path:
    """Side effects: creates ``ca_dir`` 0700 (and tightens an existing one to 0700)."""
    directory = Path(ca_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    return directory


def _holds_a_ca(directory: Path) -> list[str]:
    return [n for n in (CA_CERT_FILE, CA_KEY_FILE, *ISTIO_FILES) if (directory / n).exists()]


def init_ca(ca_dir: str | os.PathLike[str],
            trust_domain: str = DEFAULT_TRUST_DOMAIN) -> MeshCA:
    """Create the mesh CA in ``ca_dir`` or load the one already there.

    Side effects: creates ``ca_dir`` (mode 0700, and tightens an existing one to 0700),
    writes ``ca.key`` (0600) and ``ca.crt`` (0644) if the directory holds no CA.
    Raises IdentityError if the directory holds a CA for another trust domain, or half
    a CA (one file without the other).
    """
    check_trust_domain(trust_domain)
    directory = _private_dir(ca_dir)
    if _holds_a_ca(directory):
        return load_ca(directory, trust_domain)
    ca = _new_ca(trust_domain)
    # Key first: a crash in between leaves a key without a cert, which load_ca reports.
    write_private(directory / CA_KEY_FILE, _key_pem(ca.key), 0o600)
    write_private(directory / CA_CERT_FILE, ca.cert_pem, 0o644)
    return ca


def _key_pem(key: CAKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# --- reading files ----------------------------------------------------------------------

def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"{path}: missing") from None
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read it ({exc.strerror})") from None


def _certs(path: Path, *, at_least_one: bool = True) -> list[x509.Certificate]:
    data = _read(path)
    try:
        certs = x509.load_pem_x509_certificates(data) if data.strip() else []
    except ValueError as exc:
        raise IdentityError(f"{path}: not PEM certificates ({exc})") from None
    if at_least_one and not certs:
        raise IdentityError(f"{path}: holds no certificate")
    return certs


def _key(path: Path) -> CAKey:
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except TypeError:
        raise IdentityError(f"{path}: the private key is encrypted; give it unencrypted "
                            "(as istiod reads the cacerts secret)") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise IdentityError(f"{path}: not a PEM private key ({exc})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise IdentityError(f"{path}: RSA key of {key.key_size} bits; use at least "
                                f"{MIN_RSA_BITS}")
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in _EC_CURVES:
            raise IdentityError(f"{path}: EC curve {key.curve.name} is not supported; use "
                                "P-256, P-384 or P-521")
        return key
    raise IdentityError(f"{path}: a {type(key).__name__} key; the CA key must be RSA or EC")


def _check_signing_cert(path: Path, cert: x509.Certificate, key: CAKey, key_path: Path,
                        now: datetime.datetime) -> None:
    if key.public_key().public_bytes(serialization.Encoding.DER,
                                     serialization.PublicFormat.SubjectPublicKeyInfo) != \
            cert.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo):
        raise IdentityError(f"{key_path} does not belong to {path} (the public keys differ)")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise IdentityError(f"{path}: not a CA certificate (basicConstraints CA:TRUE is "
                            "required to sign workload certificates)")
    if bc.path_length is not None and bc.path_length < 0:
        raise IdentityError(f"{path}: invalid pathLenConstraint")
    with contextlib.suppress(x509.ExtensionNotFound):
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            raise IdentityError(f"{path}: key usage lacks keyCertSign, so it may not sign")
    _check_window(path, cert, now)


def _check_window(path: Path, cert: x509.Certificate, now: datetime.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise IdentityError(f"{path}: {cert.subject.rfc4514_string()!r} is not valid before "
                            f"{cert.not_valid_before_utc} (check the clock)")
    if now >= cert.not_valid_after_utc:
        raise IdentityError(f"{path}: {cert.subject.rfc4514_string()!r} expired at "
                            f"{cert.not_valid_after_utc}")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _path_to_root(signing: x509.Certificate, chain: list[x509.Certificate],
                  roots: list[x509.Certificate]) -> list[x509.Certificate] | None:
    """The intermediates from ``signing``'s issuer up to a root, or None if none leads there."""
    path: list[x509.Certificate] = []
    current = signing
    for _ in range(len(chain) + 1):  # bounded: each step uses a chain cert at most once
        if any(_issued_by(current, r) for r in roots):
            return path
        step = next((c for c in chain if c not in path and c != current
                     and _issued_by(current, c)), None)
        if step is None:
            return None
        path.append(step)
        current = step
    return None


def _ca_from_parts(trust_domain: str, cert_path: Path, key_path: Path,
                   chain_path: Path | None, roots_path: Path | None,
                   now: float | None = None) -> MeshCA:
    at = utc(now)
    signing = _certs(cert_path)
    cert = signing[0]
    key = _key(key_path)
    _check_signing_cert(cert_path, cert, key, key_path, at)
    extra = signing[1:] + (_certs(chain_path, at_least_one=False) if chain_path else [])
    roots = _certs(roots_path) if roots_path else [cert]
    for root in roots:
        _check_window(roots_path or cert_path, root, at)
    chain = [c for c in extra if c != cert and c not in roots]
    if cert in roots:
        path: list[x509.Certificate] | None = []
    else:
        path = _path_to_root(cert, chain, roots)
    if path is None:
        raise IdentityError(
            f"{cert_path} does not chain to a root in {roots_path} through "
            f"{chain_path}: every issuer between the signing CA and a root must be in "
            f"{chain_path.name if chain_path else ISTIO_CERT_CHAIN_FILE}")
    for link in path:
        _check_window(chain_path or cert_path, link, at)
    return MeshCA(trust_domain=trust_domain, cert=cert, key=key, chain=tuple(path),
                  roots=tuple(roots))


def _recorded_trust_domain(cert: x509.Certificate) -> str | None:
    """The trust domain a meshagent CA records in its URI SAN ``spiffe://<td>``, if any."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        with contextlib.suppress(ValueError):
            parsed = parse_spiffe_uri(uri)
            if not parsed.path:
                return parsed.trust_domain
    return None


def layout_of(ca_dir: str | os.PathLike[str]) -> str | None:
    """``"meshagent"``, ``"istio"`` or None (no CA there). Side effects: stats files."""
    directory = Path(ca_dir)
    if any((directory / n).exists() for n in ISTIO_FILES):
        return "istio"
    if any((directory / n).exists() for n in (CA_CERT_FILE, CA_KEY_FILE)):
        return "meshagent"
    return None


def load_ca(ca_dir: str | os.PathLike[str], trust_domain: str | None = None) -> MeshCA:
    """Load the CA in ``ca_dir`` (either layout); side effects: reads its files.

    ``trust_domain``: the configured one. A meshagent CA must record the same (None:
    take the recorded one); Istio material records none and needs it.
    """
    directory = Path(ca_dir)
    layout = layout_of(directory)
    if layout == "istio":
        if trust_domain is None:
            raise IdentityError(f"{directory} holds Istio CA material, which names no trust "
                                "domain: give one (tunnel.trust_domain)")
        missing = [n for n in ISTIO_FILES if not (directory / n).exists()
                   and n != ISTIO_CERT_CHAIN_FILE]
        if missing:
            raise IdentityError(f"Istio CA directory {directory} is missing "
                                f"{', '.join(missing)}; it needs {', '.join(ISTIO_FILES)}")
        chain = directory / ISTIO_CERT_CHAIN_FILE
        return _ca_from_parts(check_trust_domain(trust_domain), directory / ISTIO_CA_CERT_FILE,
                              directory / ISTIO_CA_KEY_FILE,
                              chain if chain.exists() else None,
                              directory / ISTIO_ROOT_CERT_FILE)
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    missing = [p.name for p in (cert_path, key_path) if not p.exists()]
    if missing:
        raise IdentityError(f"CA directory {directory} is missing {', '.join(missing)}; "
                            "run 'meshagent ca init' (or remove the directory to start over)")
    cert = _certs(cert_path)[0]
    recorded = _recorded_trust_domain(cert)
    if recorded is None:
        raise IdentityError(f"{cert_path} does not record a SPIFFE trust domain")
    if trust_domain is not None and recorded != trust_domain:
        raise IdentityError(
            f"{directory} holds a CA for trust domain {recorded!r}, not {trust_domain!r}; "
            "use another ca_dir or remove it deliberately")
    return _ca_from_parts(recorded, cert_path, key_path, None, None)


def import_istio_ca(source_dir: str | os.PathLike[str], ca_dir: str | os.PathLike[str],
                    trust_domain: str, now: float | None = None) -> MeshCA:
    """Check Istio plug-in CA files in ``source_dir`` and install them in ``ca_dir``.

    Side effects: creates ``ca_dir`` (0700) and writes the four files there (the key
    0600, certificates 0644), each atomically, after every check passed; nothing is
    written on error. IdentityError (naming the file and the fault) if the material is
    unusable or ``ca_dir`` already holds a CA (remove it deliberately first).
    """
    check_trust_domain(trust_domain)
    source = Path(source_dir)
    if not source.is_dir():
        raise IdentityError(f"{source}: not a directory (give the directory holding "
                            f"{', '.join(ISTIO_FILES)})")
    missing = [n for n in ISTIO_FILES if not (source / n).exists()]
    if missing:
        raise IdentityError(f"{source} is missing {', '.join(missing)}; Istio's cacerts "
                            f"layout has {', '.join(ISTIO_FILES)}")
    ca = _ca_from_parts(trust_domain, source / ISTIO_CA_CERT_FILE, source / ISTIO_CA_KEY_FILE,
                        source / ISTIO_CERT_CHAIN_FILE, source / ISTIO_ROOT_CERT_FILE, now)
    target = Path(ca_dir)
    if target.exists() and _holds_a_ca(target):
        if target.resolve() == source.resolve():
            return ca
        raise IdentityError(f"{target} already holds a CA ({', '.join(_holds_a_ca(target))}); "
                            "remove it deliberately before importing another")
    directory = _private_dir(target)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=directory))
    try:
        for name in ISTIO_FILES:
            mode = 0o600 if name == ISTIO_CA_KEY_FILE else 0o644
            write_private(staging / name, _read(source / name), mode)
        # Key last on the way in: load_ca never sees a key without its certificate.
        installed: list[Path] = []
        try:
            for name in (*[n for n in ISTIO_FILES if n != ISTIO_CA_KEY_FILE],
                         ISTIO_CA_KEY_FILE):
                os.replace(staging / name, directory / name)
                installed.append(directory / name)
        except BaseException:
            for path in installed:  # only what this call put there
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ca
