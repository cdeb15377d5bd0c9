"""Peer certificate verification, both directions, unit and over real TLS on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ssl
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from identity_certs import NOW, contexts_for, handshake, leaf, workload_cert
from istio_like_certs import istio_samples_dir

from agent.hbone.client import HboneClient
from agent.hbone.exceptions import (
    HboneConnectionLost,
    HbonePeerIdentityError,
    HboneStreamError,
)
from agent.hbone.server import HboneServerRequest, serve_hbone
from agent.identity.ca import MeshCA, import_istio_ca, init_ca
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityStore, client_context_for, server_context_for
from agent.identity.verify import (
    PeerFault,
    PeerRole,
    PeerVerificationError,
    verify_peer,
    verify_tls_peer,
)

TD = "cluster.local"
WEB = SpiffeId(TD, "default", "web")
SERVER = SpiffeId(TD, "istio-system", "ztunnel")
EVIL = "spiffe://evil.example/ns/default/sa/web"
SAMPLES = istio_samples_dir()  # generated like istio samples/certs (tests/istio_like_certs.py)
LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> MeshCA:
    return init_ca(tmp_path_factory.mktemp("ca") / "mesh-ca", TD)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _fault(der: bytes | None, role: PeerRole = PeerRole.CLIENT, **kw: Any) -> PeerFault:
    with pytest.raises(PeerVerificationError) as info:
        verify_peer(der, role=role, trust_domain=TD, **kw)
    return info.value.fault


# ---- the leaf checks, one by one ---------------------------------------------------------


def test_a_mesh_leaf_passes_both_roles(ca: MeshCA) -> None:
    der = _der(x509.load_pem_x509_certificate(ca.issue(WEB).cert_pem))
    for role in PeerRole:
        assert verify_peer(der, role=role, trust_domain=TD) == WEB
        assert verify_peer(der, role=role, trust_domain=TD, expected=WEB) == WEB


def test_trust_domain_and_expected_identity(ca: MeshCA) -> None:
    evil, _ = leaf(ca.cert, ca.key, [EVIL])
    assert _fault(_der(evil)) is PeerFault.TRUST_DOMAIN
    assert _fault(_der(evil), PeerRole.SERVER) is PeerFault.TRUST_DOMAIN
    assert verify_peer(_der(evil), role=PeerRole.CLIENT, trust_domain=None).trust_domain \
        == "evil.example"  # only with the check explicitly off
    web = _der(x509.load_pem_x509_certificate(ca.issue(WEB).cert_pem))
    assert _fault(web, PeerRole.SERVER, expected=SERVER) is PeerFault.UNEXPECTED_IDENTITY


@pytest.mark.parametrize(("uris", "fault"), [
    ([], PeerFault.URI_SAN),
    ([WEB.uri, "spiffe://cluster.local/ns/default/sa/other"], PeerFault.URI_SAN),
    ([WEB.uri, "https://example.com/"], PeerFault.URI_SAN),  # X509-SVID 5.2: exactly one
    (["spiffe://cluster.local"], PeerFault.NOT_SPIFFE),
    (["spiffe://cluster.local/payments/web"], PeerFault.NOT_SPIFFE),
    (["spiffe://Cluster.Local/ns/default/sa/web"], PeerFault.NOT_SPIFFE),
])
def test_uri_san(ca: MeshCA, uris: list[str], fault: PeerFault) -> None:
    cert, _ = leaf(ca.cert, ca.key, uris)
    assert _fault(_der(cert)) is fault


def _ku(**flags: bool) -> x509.KeyUsage:
    base = dict(digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False)
    return x509.KeyUsage(**{**base, **flags})


@pytest.mark.parametrize(("kwargs", "role", "fault"), [
    ({"is_ca": True}, PeerRole.CLIENT, PeerFault.CA_CERTIFICATE),
    ({"no_key_usage": True}, PeerRole.CLIENT, PeerFault.KEY_USAGE),
    ({"key_usage": _ku(key_encipherment=True)}, PeerRole.CLIENT, PeerFault.KEY_USAGE),
    ({"key_usage": _ku(digital_signature=True, key_cert_sign=True)}, PeerRole.CLIENT,
     PeerFault.KEY_USAGE),
    ({"key_usage": _ku(digital_signature=True, crl_sign=True)}, PeerRole.SERVER,
     PeerFault.KEY_USAGE),
    ({"eku": [ExtendedKeyUsageOID.SERVER_AUTH]}, PeerRole.CLIENT,
     PeerFault.EXTENDED_KEY_USAGE),
    ({"eku": [ExtendedKeyUsageOID.CLIENT_AUTH]}, PeerRole.SERVER,
     PeerFault.EXTENDED_KEY_USAGE),
    ({"eku": [ExtendedKeyUsageOID.CODE_SIGNING]}, PeerRole.SERVER,
     PeerFault.EXTENDED_KEY_USAGE),
    ({"not_before": NOW + datetime.timedelta(hours=1),
      "not_after": NOW + datetime.timedelta(hours=2)}, PeerRole.CLIENT,
     PeerFault.NOT_YET_VALID),
    ({"not_before": NOW - datetime.timedelta(hours=2),
      "not_after": NOW - datetime.timedelta(hours=1)}, PeerRole.SERVER, PeerFault.EXPIRED),
])
def test_leaf_profile(ca: MeshCA, kwargs: dict[str, Any], role: PeerRole,
                      fault: PeerFault) -> None:
    cert, _ = leaf(ca.cert, ca.key, [WEB.uri], **kwargs)
    assert _fault(_der(cert), role) is fault


def test_eku_may_be_absent(ca: MeshCA) -> None:
    cert, _ = leaf(ca.cert, ca.key, [WEB.uri], eku=[])
    assert verify_peer(_der(cert), role=PeerRole.SERVER, trust_domain=TD) == WEB


def test_no_or_bad_certificate() -> None:
    assert _fault(None) is PeerFault.NO_CERTIFICATE
    assert _fault(b"") is PeerFault.NO_CERTIFICATE
    assert _fault(b"not a certificate") is PeerFault.BAD_ENCODING


def test_unverified_context_is_refused(ca: MeshCA) -> None:
    client_ctx, server_ctx = contexts_for(ca, *leaf(ca.cert, ca.key, [WEB.uri]))
    client_ctx.verify_mode = ssl.CERT_NONE
    client, _server = handshake(client_ctx, server_ctx)
    with pytest.raises(PeerVerificationError) as info:
        verify_tls_peer(client, role=PeerRole.SERVER, trust_domain=TD)
    assert info.value.fault is PeerFault.UNVERIFIED_CHAIN


# ---- OpenSSL's half: chain, validity, EKU purpose, during the handshake -------------------


def test_handshake_refuses_wrong_purpose_and_expired(ca: MeshCA) -> None:
    store = IdentityStore(ca)
    cert, key = leaf(ca.cert, ca.key, [WEB.uri], eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    server_only, _ = contexts_for(ca, cert, key)  # client context with a serverAuth-only cert
    with pytest.raises(ssl.SSLError, match="unsuitable certificate purpose"):
        handshake(server_only, store.server_context(SERVER))
    cert, key = leaf(ca.cert, ca.key, [WEB.uri], not_before=NOW - datetime.timedelta(hours=2),
                     not_after=NOW - datetime.timedelta(hours=1))
    _, expired_server = contexts_for(ca, cert, key)
    with pytest.raises(ssl.SSLError, match="expired"):
        handshake(store.client_context(WEB), expired_server)


# ---- Istio-profile workload certificates (generated like istio samples/certs) -----------


def _istio_workload(name: str) -> tuple[ssl.SSLContext, x509.Certificate]:
    """A client context presenting the sample workload cert + its chain."""
    certs = x509.load_pem_x509_certificates((SAMPLES / f"workload-{name}-cert.pem").read_bytes())
    key = serialization.load_pem_private_key(
        (SAMPLES / f"workload-{name}-key.pem").read_bytes(), None)
    root = x509.load_pem_x509_certificate((SAMPLES / "root-cert.pem").read_bytes())
    return client_context_for(workload_cert(certs[0], key, certs[1:], [root])), certs[0]


def test_sample_material_has_the_istio_properties_the_tests_rely_on() -> None:
    """As in istio samples/certs: the CA has no SKI, so the leaves have no AKI, and
    cryptography's PolicyBuilder profile refuses them (why verify.py does not use it),
    while OpenSSL accepts them (the handshakes below); the chain is the CA alone."""
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    ca_cert = x509.load_pem_x509_certificate((SAMPLES / "ca-cert.pem").read_bytes())
    root = x509.load_pem_x509_certificate((SAMPLES / "root-cert.pem").read_bytes())
    assert x509.load_pem_x509_certificates((SAMPLES / "cert-chain.pem").read_bytes()) \
        == [ca_cert]
    with pytest.raises(x509.ExtensionNotFound):
        ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    for name, uri in (("foo", "spiffe://trust-domain-foo/ns/foo/sa/foo"),
                      ("bar", "spiffe://trust-domain-bar/ns/bar/sa/bar")):
        cert, chain_ca = x509.load_pem_x509_certificates(
            (SAMPLES / f"workload-{name}-cert.pem").read_bytes())
        assert chain_ca == ca_cert
        assert cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(
                x509.UniformResourceIdentifier) == [uri]
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
        verifier = PolicyBuilder().store(Store([root])).build_client_verifier()
        with pytest.raises(VerificationError, match=r"2\.5\.29\.35"):
            verifier.verify(cert, [ca_cert])


def test_istio_issued_leaf_of_our_trust_domain_accepted(tmp_path: Path) -> None:
    ca = import_istio_ca(SAMPLES, tmp_path / "ca", trust_domain="trust-domain-foo")
    store = IdentityStore(ca)
    foo_ctx, _ = _istio_workload("foo")
    me = SpiffeId("trust-domain-foo", "default", "me")
    client, server = handshake(foo_ctx, store.server_context(me))
    assert verify_tls_peer(server, role=PeerRole.CLIENT, trust_domain="trust-domain-foo") \
        == SpiffeId("trust-domain-foo", "foo", "foo")
    # and the sample workload, trusting only root-cert.pem, accepts our leaf + chain
    assert verify_tls_peer(client, role=PeerRole.SERVER, trust_domain="trust-domain-foo",
                           expected=me) == me


def test_istio_issued_leaf_of_another_trust_domain_refused(tmp_path: Path) -> None:
    # workload-bar is spiffe://trust-domain-bar/..., signed by the same Istio CA.
    ca = import_istio_ca(SAMPLES, tmp_path / "ca", trust_domain="trust-domain-foo")
    bar_ctx, _ = _istio_workload("bar")
    _client, server = handshake(bar_ctx, IdentityStore(ca).server_context(
        SpiffeId("trust-domain-foo", "default", "me")))  # the chain is fine...
    with pytest.raises(PeerVerificationError) as info:  # ...the trust domain is not
        verify_tls_peer(server, role=PeerRole.CLIENT, trust_domain="trust-domain-foo")
    assert info.value.fault is PeerFault.TRUST_DOMAIN


# ---- end to end: HBONE over a real TLS handshake on loopback -----------------------------


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


class Server:
    """An HBONE server on loopback that checks clients' trust domain as the tunnel does."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.requests: list[HboneServerRequest] = []
        self.done: list[asyncio.Task[None]] = []
        self.server: asyncio.base_events.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def on_stream(request: HboneServerRequest) -> None:
            self.requests.append(request)
            request.reject(403)

        await serve_hbone(reader, writer, on_stream=on_stream, trust_domain=TD,
                          handler_grace=1.0)

    async def __aenter__(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._handle, LOOPBACK, 0, ssl=self.ctx)
        return (LOOPBACK, self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.server.wait_closed(), 2.0)


def test_server_refuses_client_of_another_trust_domain_signed_by_mesh_ca(ca: MeshCA) -> None:
    evil_client, _ = contexts_for(ca, *leaf(ca.cert, ca.key, [EVIL]))
    store = IdentityStore(ca)
    server = Server(store.server_context(SERVER))

    async def main() -> None:
        async with server as address:
            # The client checks the server (it is a proper mesh server) and gets in at TLS...
            client = await HboneClient.connect(address, evil_client, trust_domain=TD,
                                               expected_peer=SERVER)
            try:
                # ...but the server closes before HTTP/2: the CONNECT never reaches it.
                with pytest.raises((HboneConnectionLost, HboneStreamError, OSError)):
                    await client.open_stream("10.0.0.1:80", timeout=5)
            finally:
                await client.close()
            # a mesh client of the right trust domain is served on the same listener
            good = await HboneClient.connect(address, store.client_context(WEB),
                                             trust_domain=TD, expected_peer=SERVER)
            try:
                with pytest.raises(HboneStreamError, match="403"):
                    await good.open_stream("10.0.0.1:80", timeout=5)
            finally:
                await good.close()
        assert [str(r.peer_identity) for r in server.requests] == [WEB.uri]

    run(main())


def test_client_refuses_server_of_another_trust_domain_signed_by_mesh_ca(ca: MeshCA) -> None:
    _, evil_server = contexts_for(ca, *leaf(ca.cert, ca.key, [EVIL]))
    store = IdentityStore(ca)

    async def main() -> None:
        async with Server(evil_server) as address:
            with pytest.raises(HbonePeerIdentityError, match="trust domain"):
                await HboneClient.connect(address, store.client_context(WEB), trust_domain=TD)

    run(main())


def test_server_refuses_client_cert_without_client_auth(ca: MeshCA) -> None:
    cert, key = leaf(ca.cert, ca.key, [WEB.uri], key_usage=_ku(key_encipherment=True))
    bad_ku_client, _ = contexts_for(ca, cert, key)
    server = Server(IdentityStore(ca).server_context(SERVER))

    async def main() -> None:
        async with server as address:
            client = await HboneClient.connect(address, bad_ku_client, trust_domain=TD)
            try:
                with pytest.raises((HboneConnectionLost, HboneStreamError, OSError)):
                    await client.open_stream("10.0.0.1:80", timeout=5)
            finally:
                await client.close()
        assert server.requests == []

    run(main())


def test_server_context_built_from_store_has_no_hostname_check(ca: MeshCA) -> None:
    ctx = server_context_for(IdentityStore(ca).get(SERVER))
    assert ctx.verify_mode == ssl.CERT_REQUIRED
