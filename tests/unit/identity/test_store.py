"""Per-workload certificates, rotation, and the TLS contexts built from them."""

from __future__ import annotations

import ssl
import tempfile
import time
from pathlib import Path

import pytest
from identity_certs import handshake

from agent.identity.ca import init_ca, load_ca
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityStore
from agent.identity.verify import peer_spiffe_id

WEB = SpiffeId("cluster.local", "default", "web")


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ca") / "mesh-ca"
    init_ca(directory)
    return directory


def test_rotation_at_half_life(ca_dir: Path) -> None:
    clock = [time.time()]
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


def test_forget_drops_certificate(ca_dir: Path) -> None:
    store = IdentityStore(load_ca(ca_dir))
    store.server_context(WEB)
    assert store.identities() == [WEB]
    store.forget(WEB)
    assert store.identities() == []


def test_contexts_mutual_tls_tls13_h2(ca_dir: Path) -> None:
    store = IdentityStore(load_ca(ca_dir))
    server_id = SpiffeId("cluster.local", "istio-system", "ztunnel")
    client, server = handshake(store.client_context(WEB), store.server_context(server_id))
    assert client.version() == "TLSv1.3"
    assert client.selected_alpn_protocol() == "h2"
    assert peer_spiffe_id(client.getpeercert(binary_form=True)) == server_id
    assert peer_spiffe_id(server.getpeercert(binary_form=True)) == WEB


def test_server_context_refuses_foreign_client(ca_dir: Path, tmp_path: Path) -> None:
    store = IdentityStore(load_ca(ca_dir))
    foreign = IdentityStore(init_ca(tmp_path / "foreign"))
    with pytest.raises(ssl.SSLError):
        handshake(foreign.client_context(WEB), store.server_context(WEB))


def test_client_context_refuses_expired_server(ca_dir: Path) -> None:
    ca = load_ca(ca_dir)
    store = IdentityStore(ca)
    past = time.time() - 7200
    expired_store = IdentityStore(ca, ttl_seconds=600, clock=lambda: past)
    with pytest.raises(ssl.SSLError, match="expired"):
        handshake(store.client_context(WEB), expired_store.server_context(WEB))


def test_context_build_leaves_no_key_on_disk(ca_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    IdentityStore(load_ca(ca_dir)).server_context(WEB)
    assert list(tmp_path.iterdir()) == []
