"""Plug-in CA material generated like istio ``samples/certs``, once per test session.

Nothing here is copied from Istio: the material is generated at test time with
``cryptography``, with the same file layout and the properties the tests rely on that
Istio's sample ``samples/certs`` directory has:

- ``root-cert.pem``: a self-signed RSA 2048 root (basicConstraints CA:TRUE, not
  critical; subject and authority key identifiers; no key usage extension);
- ``ca-cert.pem``, ``ca-key.pem``: the intermediate that signs, issued by the root (RSA
  2048, PKCS#1 key; keyUsage keyCertSign and basicConstraints CA:TRUE, both not
  critical; a DNS SAN, no SPIFFE URI SAN; **no subject key identifier**, so the leaves
  it signs have no authority key identifier: OpenSSL and meshagent's verifier accept
  them, cryptography's ``PolicyBuilder`` profile would not);
- ``cert-chain.pem``: the intermediate's chain, which for this layout is the
  intermediate alone (as in Istio's samples: ``import_istio_ca`` gets an empty chain
  and a peer sends leaf + intermediate, never the root);
- ``workload-foo-cert.pem`` (leaf, then the intermediate) + ``workload-foo-key.pem``
  (PKCS#1): a leaf for ``spiffe://trust-domain-foo/ns/foo/sa/foo``;
- ``workload-bar-cert.pem`` + ``workload-bar-key.pem``: a leaf for
  ``spiffe://trust-domain-bar/ns/bar/sa/bar``, another trust domain under the same CA.

Leaves are Istio workload profile: empty subject, critical URI SAN, critical keyUsage
digitalSignature + keyEncipherment, EKU serverAuth + clientAuth, critical
basicConstraints CA:FALSE, no key identifiers. Validity: from an hour ago, CAs for 20
years, leaves for 10.

``istio_samples_dir()`` writes the directory on first call (a temporary directory
removed when the test process exits) and returns the same path afterwards; it is a
plain function, not a fixture, because ``tests/integration`` needs the path at import
time (``LabSpec(ca_from=...)``). Callers must not modify the files (copy them first).
"""

from __future__ import annotations

import atexit
import datetime
import functools
import shutil
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

FOO_URI = "spiffe://trust-domain-foo/ns/foo/sa/foo"
BAR_URI = "spiffe://trust-domain-bar/ns/bar/sa/bar"
FILES = ("root-cert.pem", "ca-cert.pem", "ca-key.pem", "cert-chain.pem",
         "workload-foo-cert.pem", "workload-foo-key.pem",
         "workload-bar-cert.pem", "workload-bar-key.pem")


def _name(org_unit: str | None, common_name: str) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
             x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshagent tests")]
    if org_unit:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, org_unit))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _pkcs1(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _leaf(uri: str, ca: x509.Certificate, ca_key: rsa.RSAPrivateKey,
          start: datetime.datetime) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(65537, 2048)
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=3650))
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=True, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                       critical=True)
        # no authority key identifier: the CA has no subject key identifier
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def write_istio_like_certs(directory: Path) -> Path:
    """Generate the material described in the module docstring into ``directory``."""
    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)
    ca_days = datetime.timedelta(days=20 * 365)
    root_key = rsa.generate_private_key(65537, 2048)
    root_name = _name("Test", "Root CA")
    root = (
        x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
        .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + ca_days)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            root_key.public_key()), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    ca_key = rsa.generate_private_key(65537, 2048)
    ca = (
        x509.CertificateBuilder().subject_name(_name(None, "Istio-like CA"))
        .issuer_name(root.subject).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + ca_days)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True,
                                     crl_sign=False, encipher_only=False,
                                     decipher_only=False), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("ca.mesh.test")]),
                       critical=False)
        # deliberately no subject (nor authority) key identifier, see the docstring
        .sign(root_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    files = {"root-cert.pem": _pem(root), "ca-cert.pem": _pem(ca),
             "ca-key.pem": _pkcs1(ca_key), "cert-chain.pem": _pem(ca)}
    for name, uri in (("foo", FOO_URI), ("bar", BAR_URI)):
        cert, key = _leaf(uri, ca, ca_key, start)
        files[f"workload-{name}-cert.pem"] = _pem(cert, ca)
        files[f"workload-{name}-key.pem"] = _pkcs1(key)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    (directory / "ca-key.pem").chmod(0o600)
    return directory


@functools.cache
def istio_samples_dir() -> Path:
    """The session's generated material (made on the first call; removed at exit)."""
    base = Path(tempfile.mkdtemp(prefix="istio-like-certs-"))
    atexit.register(shutil.rmtree, base, True)
    return write_istio_like_certs(base / "certs")
