"""Peer certificate verification, both directions. Pure, except :func:`verify_tls_peer`.

What is checked, and by whom:

* **Chain to the mesh trust anchors (with the intermediates the peer sends) and the
  validity window of every certificate in it**: OpenSSL, during the handshake, because
  every mesh context is ``CERT_REQUIRED`` with only the trust anchors loaded
  (:mod:`agent.identity.store`). OpenSSL also checks the EKU purpose (``ssl_client``
  for a client's certificate, ``ssl_server`` for a server's) when the EKU is present,
  which is what ztunnel's webpki verifiers do (``src/tls/workload.rs``:
  ``KeyUsage::server_auth()`` / the client verifier's ``client_auth``).
* **The leaf as an X.509-SVID** (spiffe/spiffe ``standards/X509-SVID.md`` 4.1, 4.3, 4.4,
  5.2): not a CA, key usage present with digitalSignature and without
  keyCertSign/cRLSign, EKU (if present) with the purpose of the peer's role, exactly
  one URI SAN, a SPIFFE ID in Istio's ``/ns/<ns>/sa/<sa>`` form; validity checked again.
  Done here, on the peer's leaf right after the handshake: Python's ``ssl`` has no
  verification callback, so the connection is closed before any byte of HTTP/2 is
  read or written when this fails.
* **Trust domain** equals the configured one (ztunnel ``TrustDomainVerifier`` for
  clients; a server's exact identity also pins its trust domain), and on the client
  side the server is the **expected identity** when one is known (ztunnel
  ``IdentityVerifier::verify_full_san``).

Not used: ``cryptography.x509.verification`` (``PolicyBuilder`` ->
``build_client_verifier`` / ``build_server_verifier``, cryptography >= 42/43). It needs
the peer's intermediates, and Python 3.11's ``ssl`` hands out only the leaf
(``SSLSocket.get_verified_chain`` is 3.13+); and its CA/Browser-Forum profile rejects
certificates Istio itself issues from plug-in CA material: Istio's sample
``samples/certs/workload-foo-cert.pem`` is refused with "missing required extension
2.5.29.35" (no authorityKeyIdentifier, because its CA ``ca-cert.pem`` has no subject
key identifier), so it would refuse peers ztunnel and OpenSSL accept. (The tests
reproduce that property with material generated like Istio's samples:
``tests/istio_like_certs.py``.)
"""

from __future__ import annotations

import datetime
import enum
import ssl

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.identity.ca import IdentityError, utc
from agent.identity.spiffe import SpiffeId, parse_spiffe_id


class PeerRole(enum.Enum):
    """Which end of the TLS connection the *peer* is."""

    CLIENT = "client"  # we serve (inbound 15008): the peer needs clientAuth
    SERVER = "server"  # we dial (outbound): the peer needs serverAuth

    @property
    def purpose(self) -> x509.ObjectIdentifier:
        return (ExtendedKeyUsageOID.CLIENT_AUTH if self is PeerRole.CLIENT
                else ExtendedKeyUsageOID.SERVER_AUTH)


class PeerFault(enum.Enum):
    """Why a peer certificate was refused (one value per check, for logs and counters)."""

    NO_CERTIFICATE = "no_certificate"
    UNVERIFIED_CHAIN = "unverified_chain"
    BAD_ENCODING = "bad_encoding"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"
    CA_CERTIFICATE = "ca_certificate"
    KEY_USAGE = "key_usage"
    EXTENDED_KEY_USAGE = "extended_key_usage"
    URI_SAN = "uri_san"
    NOT_SPIFFE = "not_spiffe"
    TRUST_DOMAIN = "trust_domain"
    UNEXPECTED_IDENTITY = "unexpected_identity"


class PeerVerificationError(IdentityError):
    """The peer's certificate is not an acceptable mesh identity; ``fault`` says which check."""

    def __init__(self, fault: PeerFault, message: str) -> None:
        super().__init__(message)
        self.fault = fault


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID of a leaf: its one URI SAN, in Istio's form (X509-SVID 5.2)."""
    uris = _uri_sans(cert)
    if len(uris) != 1:
        raise PeerVerificationError(
            PeerFault.URI_SAN, f"certificate must carry exactly one URI SAN (its SPIFFE ID), "
                               f"has {len(uris)}: {uris}")
    try:
        return parse_spiffe_id(uris[0])
    except ValueError as exc:
        raise PeerVerificationError(PeerFault.NOT_SPIFFE, str(exc)) from None


def _load(der: bytes | None) -> x509.Certificate:
    if not der:
        raise PeerVerificationError(PeerFault.NO_CERTIFICATE, "peer presented no certificate")
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise PeerVerificationError(PeerFault.BAD_ENCODING,
                                    f"peer certificate is not valid DER: {exc}") from None


def peer_spiffe_id(der_cert: bytes | None) -> SpiffeId:
    """The SPIFFE ID in a DER certificate's URI SAN (exactly one allowed); no other check."""
    return spiffe_id_of(_load(der_cert))


def _check_leaf(cert: x509.Certificate, role: PeerRole, now: datetime.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise PeerVerificationError(PeerFault.NOT_YET_VALID,
                                    f"peer certificate is not valid before "
                                    f"{cert.not_valid_before_utc}")
    if now >= cert.not_valid_after_utc:
        raise PeerVerificationError(PeerFault.EXPIRED,
                                    f"peer certificate expired at {cert.not_valid_after_utc}")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise PeerVerificationError(PeerFault.CA_CERTIFICATE,
                                        "peer presented a CA certificate, not a workload leaf")
    except x509.ExtensionNotFound:
        pass
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise PeerVerificationError(PeerFault.KEY_USAGE,
                                    "peer certificate has no key usage extension "
                                    "(an X.509-SVID must have one)") from None
    if not ku.digital_signature or ku.key_cert_sign or ku.crl_sign:
        raise PeerVerificationError(PeerFault.KEY_USAGE,
                                    "peer certificate key usage must include "
                                    "digitalSignature and exclude keyCertSign and cRLSign")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return  # allowed by X509-SVID 4.4 and by webpki's "required if present"
    if role.purpose not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
        raise PeerVerificationError(PeerFault.EXTENDED_KEY_USAGE,
                                    f"peer certificate EKU lacks {role.value}Auth")


def verify_peer(der: bytes | None, *, role: PeerRole, trust_domain: str | None,
                expected: SpiffeId | None = None, now: float | None = None) -> SpiffeId:
    """Check a chain-verified peer leaf (DER) as a mesh workload identity; its SpiffeId.

    ``trust_domain`` None skips the trust-domain check (only tests do that);
    ``expected`` pins the exact identity (outbound, when the destination is known).
    Raises :class:`PeerVerificationError` naming the failed check.
    """
    cert = _load(der)
    _check_leaf(cert, role, utc(now))
    peer = spiffe_id_of(cert)
    if trust_domain is not None and peer.trust_domain != trust_domain:
        raise PeerVerificationError(PeerFault.TRUST_DOMAIN,
                                    f"peer {peer} is outside trust domain {trust_domain!r}")
    if expected is not None and peer != expected:
        raise PeerVerificationError(PeerFault.UNEXPECTED_IDENTITY,
                                    f"peer is {peer}, expected {expected}")
    return peer


def verify_tls_peer(tls: ssl.SSLObject | ssl.SSLSocket, *, role: PeerRole,
                    trust_domain: str | None, expected: SpiffeId | None = None) -> SpiffeId:
    """:func:`verify_peer` on a finished handshake's peer certificate.

    Refuses a connection whose context did not verify the chain (``CERT_REQUIRED``),
    because the SPIFFE checks mean nothing on an unverified certificate.
    Side effects: none (reads the TLS object's state).
    """
    if tls.context.verify_mode != ssl.CERT_REQUIRED:
        raise PeerVerificationError(PeerFault.UNVERIFIED_CHAIN,
                                    "TLS context does not verify the peer's chain "
                                    "(verify_mode must be CERT_REQUIRED)")
    return verify_peer(tls.getpeercert(binary_form=True), role=role,
                       trust_domain=trust_domain, expected=expected)
