"""Certificate factories for the identity tests.

``istio_hierarchy`` makes CA material the way istio ``tools/certs`` does
(``common.mk``: root ``basicConstraints critical CA:true``, ``keyUsage critical
digitalSignature, nonRepudiation, keyEncipherment, keyCertSign``; intermediate the same
with ``pathlen:0`` and a DNS SAN ``istiod.istio-system.svc``; ``Makefile.selfsigned.mk``:
``cert-chain.pem`` = ``ca-cert.pem`` + ``root-cert.pem``), as RSA or EC.
``leaf`` signs arbitrary (also bad) leaves with any CA key, for the refusal tests.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.identity.ca import MeshCA, WorkloadCert
from agent.identity.spiffe import SpiffeId
from agent.identity.store import client_context_for, server_context_for

Key = Any  # rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
NOW = datetime.datetime.now(datetime.timezone.utc)


def new_key(kind: str) -> Key:
    return rsa.generate_private_key(65537, 2048) if kind == "rsa" else \
        ec.generate_private_key(ec.SECP256R1())


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: Key, fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
            password: bytes | None = None) -> bytes:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, fmt, enc)


def _ku(*, sign: bool, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=sign, content_commitment=cert_sign,
                         key_encipherment=cert_sign, data_encipherment=False,
                         key_agreement=False, key_cert_sign=cert_sign, crl_sign=False,
                         encipher_only=False, decipher_only=False)


def ca_cert(name: str, key: Key, issuer: tuple[x509.Certificate, Key] | None = None, *,
            path_length: int | None = None, days: int = 3650,
            not_before: datetime.datetime | None = None) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Istio"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    start = not_before or NOW - datetime.timedelta(hours=1)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.BasicConstraints(ca=True, path_length=path_length),
                              critical=True)
               .add_extension(_ku(sign=True, cert_sign=True), critical=True))
    if issuer:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("istiod.istio-system.svc")]),
            critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class Hierarchy:
    root: x509.Certificate
    root_key: Key
    intermediates: list[x509.Certificate]  # top (under the root) first
    signing_key: Key

    @property
    def signing(self) -> x509.Certificate:
        return self.intermediates[-1]

    def write_cacerts(self, directory: Path, *, chain_has_root: bool = True) -> Path:
        """The four files of Istio's ``cacerts`` secret."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "ca-cert.pem").write_bytes(pem(self.signing))
        (directory / "ca-key.pem").write_bytes(key_pem(self.signing_key))
        chain = [*reversed(self.intermediates)] + ([self.root] if chain_has_root else [])
        (directory / "cert-chain.pem").write_bytes(pem(*chain))
        (directory / "root-cert.pem").write_bytes(pem(self.root))
        return directory


def istio_hierarchy(kind: str = "rsa", levels: int = 1) -> Hierarchy:
    """root -> ``levels`` intermediates; the last one signs workloads."""
    root_key = new_key(kind)
    root = ca_cert("Root CA", root_key)
    intermediates: list[x509.Certificate] = []
    issuer: tuple[x509.Certificate, Key] = (root, root_key)
    key = root_key
    for level in range(levels):
        key = new_key(kind)
        cert = ca_cert(f"Intermediate CA {level}", key, issuer,
                       path_length=levels - level - 1)
        intermediates.append(cert)
        issuer = (cert, key)
    return Hierarchy(root, root_key, intermediates, key)


def leaf(issuer: x509.Certificate, issuer_key: Key, uris: list[str], *,
         is_ca: bool = False, key_usage: x509.KeyUsage | None = None,
         no_key_usage: bool = False,
         eku: list[x509.ObjectIdentifier] | None = None,
         not_before: datetime.datetime | None = None,
         not_after: datetime.datetime | None = None) -> tuple[x509.Certificate, Key]:
    """A leaf with exactly the given properties (defaults: Istio's workload profile)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(x509.Name([]))
               .issuer_name(issuer.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before or NOW - datetime.timedelta(minutes=5))
               .not_valid_after(not_after or NOW + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None),
                              critical=True))
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=True)
    if not no_key_usage:
        builder = builder.add_extension(key_usage or _ku(sign=True, cert_sign=False),
                                        critical=True)
    eku = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] \
        if eku is None else eku
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def workload_cert(cert: x509.Certificate, key: Key, chain: list[x509.Certificate],
                  anchors: list[x509.Certificate]) -> WorkloadCert:
    """Wrap arbitrary PEMs as a WorkloadCert so the production context builders load it."""
    return WorkloadCert(spiffe_id=SpiffeId("cluster.local", "x", "x"), cert_pem=pem(cert),
                        key_pem=key_pem(key), chain_pem=pem(*chain),
                        trust_anchors_pem=pem(*anchors), not_before=0.0, not_after=0.0,
                        serial=cert.serial_number)


def contexts_for(ca: MeshCA, cert: x509.Certificate, key: Key) -> tuple[ssl.SSLContext,
                                                                         ssl.SSLContext]:
    """(client, server) contexts presenting ``cert`` (with ``ca``'s chain), trusting ``ca``."""
    wc = workload_cert(cert, key, [], list(ca.roots))
    wc = WorkloadCert(**{**wc.__dict__, "chain_pem": ca.chain_pem})
    return client_context_for(wc), server_context_for(wc)


def handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> tuple[
        ssl.SSLObject, ssl.SSLObject]:
    """Run a TLS handshake entirely in memory; raises ssl.SSLError on failure."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):  # a TLS 1.3 handshake needs a handful of flights
        for name, obj in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server checks the client cert after the client is "done";
            # push one record through so a rejection surfaces on the client.
            server.write(b"x")
            c_in.write(s_out.read())
            client.read(1)
            return client, server
    raise AssertionError("handshake did not finish")
