"""Workload identity: SPIFFE ID parsing, the mesh CA on disk, leaf certificates,
rotation, and the TLS contexts (exercised with an in-memory TLS handshake)."""

from __future__ import annotations

import os
import ssl
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.identity.ca import IdentityError, init_ca, load_ca
from agent.identity.spiffe import SpiffeId, parse_spiffe_id
from agent.identity.store import IdentityStore
from agent.identity.verify import peer_spiffe_id

WEB = SpiffeId("cluster.local", "default", "web")


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ca") / "mesh-ca"
    init_ca(directory)
    return directory


def test_spiffe_id_round_trip() -> None:
    uri = "spiffe://cluster.local/ns/default/sa/web"
    parsed = parse_spiffe_id(uri)
    assert parsed == WEB
    assert str(parsed) == uri


@pytest.mark.parametrize("uri", [
    "",
    "http://cluster.local/ns/default/sa/web",
    "spiffe://cluster.local/ns/default",
    "spiffe://cluster.local/ns/default/sa/",
    "spiffe://cluster.local/ns//sa/web",
    "spiffe://cluster.local/namespace/default/sa/web",
    "spiffe://cluster.local/ns/default/sa/web/extra",
    "spiffe://Cluster.Local/ns/default/sa/web",
    "spiffe://cluster.local/ns/default/sa/web?x=1",
    "spiffe://cluster.local/ns/../sa/web",
    "spiffe:///ns/default/sa/web",
])
def test_parse_spiffe_id_rejects_malformed(uri: str) -> None:
    with pytest.raises(ValueError, match="SPIFFE"):
        parse_spiffe_id(uri)


def test_init_ca_permissions_and_idempotence(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    first = init_ca(directory, "example.org")
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(directory / "ca.key").st_mode) == 0o600
    second = init_ca(directory, "example.org")
    assert second.cert_pem == first.cert_pem
    assert load_ca(directory).trust_domain == "example.org"


def test_init_ca_refuses_other_trust_domain(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca", "cluster.local")
    with pytest.raises(IdentityError, match=r"trust domain 'cluster\.local'"):
        init_ca(tmp_path / "ca", "other.example")


def test_load_ca_reports_half_a_ca(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    (tmp_path / "ca" / "ca.crt").unlink()
    with pytest.raises(IdentityError, match=r"missing ca\.crt"):
        load_ca(tmp_path / "ca")


def test_issued_leaf_profile(ca_dir: Path) -> None:
    ca = load_ca(ca_dir)
    now = time.time()
    cert = ca.issue(WEB, ttl_seconds=3600, now=now)
    leaf = x509.load_pem_x509_certificate(cert.cert_pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [WEB.uri]
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_after == pytest.approx(now + 3600, abs=1)
    leaf.verify_directly_issued_by(ca.cert)
    der = leaf.public_bytes(serialization.Encoding.DER)
    assert peer_spiffe_id(der) == WEB


def test_ca_refuses_foreign_trust_domain(ca_dir: Path) -> None:
    with pytest.raises(IdentityError, match="other trust domain"):
        load_ca(ca_dir).issue(SpiffeId("evil.example", "default", "web"))


def test_peer_spiffe_id_requires_a_spiffe_san(ca_dir: Path) -> None:
    ca = load_ca(ca_dir)
    ca_der = ca.cert.public_bytes(serialization.Encoding.DER)
    with pytest.raises(IdentityError):
        peer_spiffe_id(ca_der)  # "spiffe://cluster.local" has no /ns/../sa/..
    with pytest.raises(IdentityError):
        peer_spiffe_id(b"")
    with pytest.raises(IdentityError):
        peer_spiffe_id(b"not a certificate")


def test_rotation_at_half_life(ca_dir: Path) -> None:
    clock = [1_000_000.0]
    store = IdentityStore(load_ca(ca_dir), ttl_seconds=1000, clock=lambda: clock[0])
    first = store.get(WEB)
    assert store.get(WEB) is first
    assert not IdentityStore.needs_rotation(first, clock[0] + 400)
    # not_before is backdated one minute for clock skew, so half life is at +470 s.
    assert IdentityStore.needs_rotation(first, clock[0] + 471)
    assert store.rotate_due(clock[0] + 100) == []
    client_ctx = store.client_context(WEB)
    assert store.client_context(WEB) is client_ctx  # cached while the cert is current
    clock[0] += 600
    assert store.rotate_due() == [WEB]
    second = store.get(WEB)
    assert second.serial != first.serial
    assert store.client_context(WEB) is not client_ctx  # new connections, new cert


def _handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> tuple[
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


def test_contexts_mutual_tls_tls13_h2(ca_dir: Path) -> None:
    store = IdentityStore(load_ca(ca_dir))
    server_id = SpiffeId("cluster.local", "istio-system", "ztunnel")
    client, server = _handshake(store.client_context(WEB), store.server_context(server_id))
    assert client.version() == "TLSv1.3"
    assert client.selected_alpn_protocol() == "h2"
    assert peer_spiffe_id(client.getpeercert(binary_form=True)) == server_id
    assert peer_spiffe_id(server.getpeercert(binary_form=True)) == WEB


def test_server_context_refuses_foreign_client(ca_dir: Path, tmp_path: Path) -> None:
    store = IdentityStore(load_ca(ca_dir))
    foreign = IdentityStore(init_ca(tmp_path / "foreign"))
    with pytest.raises(ssl.SSLError):
        _handshake(foreign.client_context(WEB), store.server_context(WEB))


def test_client_context_refuses_expired_server(ca_dir: Path) -> None:
    ca = load_ca(ca_dir)
    store = IdentityStore(ca)
    past = time.time() - 7200
    expired_store = IdentityStore(ca, ttl_seconds=600, clock=lambda: past)
    with pytest.raises(ssl.SSLError, match="expired"):
        _handshake(store.client_context(WEB), expired_store.server_context(WEB))


def test_context_build_leaves_no_key_on_disk(ca_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    IdentityStore(load_ca(ca_dir)).server_context(WEB)
    assert list(tmp_path.iterdir()) == []
