"""The mesh CA: meshagent's own, and Istio plug-in CA material (cacerts)."""

from __future__ import annotations

import datetime
import os
import shutil
import stat
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from identity_certs import (
    NOW,
    ca_cert,
    handshake,
    istio_hierarchy,
    key_pem,
    leaf,
    new_key,
    pem,
)
from istio_like_certs import istio_samples_dir

from agent.cli import main as cli
from agent.identity.ca import (
    ISTIO_FILES,
    CaLayout,
    IdentityError,
    import_istio_ca,
    init_ca,
    layout_of,
    load_ca,
)
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityStore
from agent.identity.verify import PeerRole, peer_spiffe_id, verify_tls_peer

WEB = SpiffeId("cluster.local", "default", "web")
SAMPLES = istio_samples_dir()  # generated like istio samples/certs (tests/istio_like_certs.py)
FOO = SpiffeId("trust-domain-foo", "foo", "foo")


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ca") / "mesh-ca"
    init_ca(directory)
    return directory


# ---- meshagent's own CA ------------------------------------------------------------------


def test_init_ca_permissions_and_idempotence(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    first = init_ca(directory, "example.org")
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(directory / "ca.key").st_mode) == 0o600
    second = init_ca(directory, "example.org")
    assert second.cert_pem == first.cert_pem
    assert load_ca(directory).trust_domain == "example.org"
    assert layout_of(directory) is CaLayout.MESHAGENT
    assert first.chain_pem == b""  # a self-signed root sends no chain
    assert first.trust_anchors_pem == first.cert_pem


def test_init_ca_refuses_other_trust_domain(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca", "cluster.local")
    with pytest.raises(IdentityError, match=r"trust domain 'cluster\.local'"):
        init_ca(tmp_path / "ca", "other.example")
    with pytest.raises(IdentityError, match=r"trust domain 'cluster\.local'"):
        load_ca(tmp_path / "ca", "other.example")


def test_load_ca_reports_half_a_ca(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    (tmp_path / "ca" / "ca.crt").unlink()
    with pytest.raises(IdentityError, match=r"missing ca\.crt"):
        load_ca(tmp_path / "ca")


def test_issued_leaf_profile(ca_dir: Path) -> None:
    ca = load_ca(ca_dir)
    now = time.time()
    cert = ca.issue(WEB, ttl_seconds=3600, now=now)
    leaf_cert = x509.load_pem_x509_certificate(cert.cert_pem)
    san = leaf_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # the subject is empty
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [WEB.uri]
    usage = leaf_cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    eku = leaf_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not leaf_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_after == pytest.approx(now + 3600, abs=1)
    leaf_cert.verify_directly_issued_by(ca.cert)
    assert peer_spiffe_id(leaf_cert.public_bytes(serialization.Encoding.DER)) == WEB


def test_ca_refuses_foreign_trust_domain(ca_dir: Path) -> None:
    with pytest.raises(IdentityError, match="other trust domain"):
        load_ca(ca_dir).issue(SpiffeId("evil.example", "default", "web"))


# ---- Istio plug-in CA material ----------------------------------------------------------


def _mutual_tls(store: IdentityStore, trust_domain: str) -> None:
    """Two workloads of ``store`` handshake, each verifying the other as a mesh peer."""
    a = SpiffeId(trust_domain, "default", "a")
    b = SpiffeId(trust_domain, "default", "b")
    client, server = handshake(store.client_context(a), store.server_context(b))
    assert verify_tls_peer(client, role=PeerRole.SERVER, trust_domain=trust_domain,
                           expected=b) == b
    assert verify_tls_peer(server, role=PeerRole.CLIENT, trust_domain=trust_domain) == a


def test_istio_sample_cacerts_load_and_sign(tmp_path: Path) -> None:
    ca = import_istio_ca(SAMPLES, tmp_path / "ca", trust_domain="trust-domain-foo")
    assert layout_of(tmp_path / "ca") is CaLayout.ISTIO_CACERTS
    assert isinstance(ca.key, type(serialization.load_pem_private_key(
        (SAMPLES / "ca-key.pem").read_bytes(), None)))  # RSA, PKCS#1 PEM
    assert ca.chain == ()  # cert-chain.pem holds only ca-cert.pem itself
    samples_root = x509.load_pem_x509_certificate((SAMPLES / "root-cert.pem").read_bytes())
    assert ca.roots == (samples_root,)
    issued = ca.issue(FOO)
    assert x509.load_pem_x509_certificates(issued.chain_pem) == [ca.cert]
    assert x509.load_pem_x509_certificates(issued.full_chain_pem)[1:] == [ca.cert]
    reloaded = load_ca(tmp_path / "ca", "trust-domain-foo")
    assert reloaded.cert == ca.cert
    _mutual_tls(IdentityStore(reloaded), "trust-domain-foo")
    for name in ISTIO_FILES:
        mode = stat.S_IMODE(os.stat(tmp_path / "ca" / name).st_mode)
        assert mode == (0o600 if name == "ca-key.pem" else 0o644), name


def test_istio_material_needs_a_configured_trust_domain(tmp_path: Path) -> None:
    import_istio_ca(SAMPLES, tmp_path / "ca", trust_domain="cluster.local")
    with pytest.raises(IdentityError, match="names no trust domain"):
        load_ca(tmp_path / "ca")


@pytest.mark.parametrize("kind", ["rsa", "ec"])
@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("chain_has_root", [True, False])
def test_generated_istio_hierarchy(tmp_path: Path, kind: str, levels: int,
                                   chain_has_root: bool) -> None:
    h = istio_hierarchy(kind, levels)
    source = h.write_cacerts(tmp_path / "cacerts", chain_has_root=chain_has_root)
    ca = import_istio_ca(source, tmp_path / "ca", trust_domain="cluster.local")
    assert ca.cert == h.signing and ca.roots == (h.root,)
    assert list(ca.chain) == list(reversed(h.intermediates))[1:]
    issued = ca.issue(WEB)
    sent = x509.load_pem_x509_certificates(issued.full_chain_pem)
    # leaf, the signing intermediate, the intermediates above it; never the root
    assert sent[1:] == list(reversed(h.intermediates))
    assert h.root not in sent
    # Peers trust only the root: the handshake works only because the chain is sent.
    _mutual_tls(IdentityStore(load_ca(tmp_path / "ca", "cluster.local")), "cluster.local")


def test_root_bundle_with_two_roots(tmp_path: Path) -> None:
    # As istio's root-cert-combined.pem during a root rotation: peers under either root
    # are trusted, the signing CA chains to one of them.
    old, new = istio_hierarchy("ec"), istio_hierarchy("rsa")
    source = new.write_cacerts(tmp_path / "cacerts")
    (source / "root-cert.pem").write_bytes(pem(old.root, new.root))
    ca = import_istio_ca(source, tmp_path / "ca", "cluster.local")
    assert ca.roots == (old.root, new.root)
    old_source = old.write_cacerts(tmp_path / "old")
    (old_source / "root-cert.pem").write_bytes(pem(old.root, new.root))
    old_ca = import_istio_ca(old_source, tmp_path / "old-ca", "cluster.local")
    client, server = handshake(IdentityStore(old_ca).client_context(WEB),
                              IdentityStore(ca).server_context(WEB))
    assert verify_tls_peer(server, role=PeerRole.CLIENT, trust_domain="cluster.local") == WEB
    assert verify_tls_peer(client, role=PeerRole.SERVER, trust_domain="cluster.local") == WEB


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_kubernetes_tls_secret_layout(tmp_path: Path, kind: str) -> None:
    # tls.crt = signing CA + its chain, tls.key, ca.crt = roots (cert-manager's CA issuer
    # writes this; istiod's detectSigningCABundleAndCRL prefers it).
    h = istio_hierarchy(kind, levels=2)
    source = tmp_path / "tls"
    source.mkdir()
    (source / "tls.crt").write_bytes(pem(*reversed(h.intermediates)))
    (source / "tls.key").write_bytes(key_pem(h.signing_key))
    (source / "ca.crt").write_bytes(pem(h.root))
    ca = import_istio_ca(source, tmp_path / "ca", "cluster.local")
    assert layout_of(tmp_path / "ca") is CaLayout.KUBERNETES_TLS
    assert ca.cert == h.signing and list(ca.chain) == [h.intermediates[0]]
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == ["ca.crt", "tls.crt",
                                                                   "tls.key"]
    _mutual_tls(IdentityStore(load_ca(tmp_path / "ca", "cluster.local")), "cluster.local")
    (source / "ca.crt").unlink()
    with pytest.raises(IdentityError, match=r"missing ca\.crt"):
        import_istio_ca(source, tmp_path / "ca2", "cluster.local")


def test_leaf_validity_clamped_to_signing_chain(tmp_path: Path) -> None:
    root_key, key = new_key("ec"), new_key("ec")
    root = ca_cert("Root CA", root_key)
    inter = ca_cert("Short CA", key, (root, root_key), days=1)
    d = tmp_path / "cacerts"
    d.mkdir()
    (d / "ca-cert.pem").write_bytes(pem(inter))
    (d / "ca-key.pem").write_bytes(key_pem(key))
    (d / "cert-chain.pem").write_bytes(pem(inter, root))
    (d / "root-cert.pem").write_bytes(pem(root))
    ca = import_istio_ca(d, tmp_path / "ca", "cluster.local")
    issued = ca.issue(WEB, ttl_seconds=30 * 86400)
    assert issued.not_after == inter.not_valid_after_utc.timestamp()
    with pytest.raises(IdentityError, match="expired"):
        ca.issue(WEB, now=time.time() + 2 * 86400)


# ---- bad material: the error names the file and the fault, nothing is written -----------


def _cacerts(tmp_path: Path, kind: str = "rsa") -> Path:
    return istio_hierarchy(kind).write_cacerts(tmp_path / "cacerts")


def _refused(source: Path, target: Path, match: str) -> None:
    with pytest.raises(IdentityError, match=match):
        import_istio_ca(source, target, "cluster.local")
    assert not target.exists() or not any(target.iterdir())


def test_missing_file_is_named(tmp_path: Path) -> None:
    source = _cacerts(tmp_path)
    (source / "root-cert.pem").unlink()
    _refused(source, tmp_path / "ca", r"missing root-cert\.pem")


def test_key_of_another_certificate(tmp_path: Path) -> None:
    source = _cacerts(tmp_path)
    (source / "ca-key.pem").write_bytes(key_pem(new_key("rsa")))
    _refused(source, tmp_path / "ca", r"ca-key\.pem does not belong to .*ca-cert\.pem")


def test_signing_cert_that_is_not_a_ca(tmp_path: Path) -> None:
    h = istio_hierarchy("ec")
    source = h.write_cacerts(tmp_path / "cacerts")
    cert, key = leaf(h.signing, h.signing_key, [WEB.uri])
    (source / "ca-cert.pem").write_bytes(pem(cert))
    (source / "ca-key.pem").write_bytes(key_pem(key))
    _refused(source, tmp_path / "ca", r"ca-cert\.pem: not a CA certificate")


def test_chain_that_does_not_reach_the_root(tmp_path: Path) -> None:
    source = _cacerts(tmp_path)
    other = istio_hierarchy("rsa")
    (source / "root-cert.pem").write_bytes(pem(other.root))
    _refused(source, tmp_path / "ca", r"does not chain to a root in .*root-cert\.pem")


def test_missing_middle_intermediate(tmp_path: Path) -> None:
    h = istio_hierarchy("ec", levels=2)
    source = h.write_cacerts(tmp_path / "cacerts")
    (source / "cert-chain.pem").write_bytes(pem(h.signing, h.root))  # top one left out
    _refused(source, tmp_path / "ca", r"cert-chain\.pem")


@pytest.mark.parametrize("fmt", [serialization.PrivateFormat.PKCS8,
                                 serialization.PrivateFormat.TraditionalOpenSSL])
def test_key_formats(tmp_path: Path, fmt: serialization.PrivateFormat) -> None:
    h = istio_hierarchy("ec")
    source = h.write_cacerts(tmp_path / "cacerts")
    (source / "ca-key.pem").write_bytes(key_pem(h.signing_key, fmt))  # SEC1 / PKCS#8
    import_istio_ca(source, tmp_path / "ca", "cluster.local")


def test_small_rsa_key(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    root_key = new_key("rsa")
    key = rsa.generate_private_key(65537, 1024)
    root = ca_cert("Root CA", root_key)
    d = tmp_path / "cacerts"
    d.mkdir()
    (d / "ca-cert.pem").write_bytes(pem(ca_cert("Weak CA", key, (root, root_key))))
    (d / "ca-key.pem").write_bytes(key_pem(key))
    (d / "cert-chain.pem").write_bytes(b"")
    (d / "root-cert.pem").write_bytes(pem(root))
    _refused(d, tmp_path / "ca", r"ca-key\.pem: RSA key of 1024 bits")


def test_encrypted_key(tmp_path: Path) -> None:
    h = istio_hierarchy("rsa")
    source = h.write_cacerts(tmp_path / "cacerts")
    (source / "ca-key.pem").write_bytes(key_pem(h.signing_key, password=b"secret"))
    _refused(source, tmp_path / "ca", r"ca-key\.pem: the private key is encrypted")


def test_garbage_files(tmp_path: Path) -> None:
    source = _cacerts(tmp_path)
    (source / "ca-cert.pem").write_bytes(b"hello")
    _refused(source, tmp_path / "ca", r"ca-cert\.pem: .*certificate")
    source = _cacerts(tmp_path / "2")
    (source / "ca-key.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n")
    _refused(source, tmp_path / "ca", r"ca-key\.pem: not a PEM private key")


def test_expired_intermediate(tmp_path: Path) -> None:
    root_key, key = new_key("ec"), new_key("ec")
    root = ca_cert("Root CA", root_key)
    old = ca_cert("Old CA", key, (root, root_key), days=1,
                  not_before=NOW - datetime.timedelta(days=3))
    d = tmp_path / "cacerts"
    d.mkdir()
    (d / "ca-cert.pem").write_bytes(pem(old))
    (d / "ca-key.pem").write_bytes(key_pem(key))
    (d / "cert-chain.pem").write_bytes(pem(old))
    (d / "root-cert.pem").write_bytes(pem(root))
    _refused(d, tmp_path / "ca", r"ca-cert\.pem: .*Old CA.* expired")


def test_import_refuses_to_replace_a_ca(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    before = sorted(p.name for p in (tmp_path / "ca").iterdir())
    with pytest.raises(IdentityError, match="already holds a CA"):
        import_istio_ca(_cacerts(tmp_path), tmp_path / "ca", "cluster.local")
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == before


def test_cli_ca_import_and_init(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHAGENT_TUNNEL_TRUST_DOMAIN", "trust-domain-foo")
    monkeypatch.setenv("MESHAGENT_TUNNEL_CA_DIR", str(tmp_path / "ca"))
    config = tmp_path / "config.toml"
    config.write_text("")
    source = tmp_path / "samples"
    shutil.copytree(SAMPLES, source)
    runner = CliRunner()
    result = runner.invoke(cli, ["--config", str(config), "ca", "import", "--from",
                                 str(source)])
    assert result.exit_code == 0, result.output
    assert "trust domain 'trust-domain-foo'" in result.output
    # ca init on the imported CA loads and checks it, does not overwrite it
    result = runner.invoke(cli, ["--config", str(config), "ca", "init"])
    assert result.exit_code == 0, result.output
    assert layout_of(tmp_path / "ca") is CaLayout.ISTIO_CACERTS
    (source / "ca-key.pem").write_bytes(b"junk")
    result = runner.invoke(cli, ["--config", str(config), "ca", "import", "--from",
                                 str(source), "--dir", str(tmp_path / "other")])
    assert result.exit_code != 0 and "ca-key.pem: not a PEM private key" in result.output
