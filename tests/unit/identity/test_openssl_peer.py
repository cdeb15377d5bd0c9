"""The identity layer against an independent TLS implementation: the openssl CLI.

``openssl s_client`` / ``s_server`` trust only ``root-cert.pem`` of material generated
like Istio's ``samples/certs`` (``tests/istio_like_certs.py``, same layout: root,
intermediate, chain), so each handshake that verifies shows the other side sent its
chain; the certificates meshagent verifies are leaves issued as Istio issues them
(``workload-foo``, signed by the plug-in CA), or ours issued from that plug-in CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
from pathlib import Path

import pytest
from istio_like_certs import istio_samples_dir

from agent.hbone.client import HboneClient
from agent.hbone.exceptions import HbonePeerIdentityError
from agent.identity.ca import MeshCA, import_istio_ca
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityStore
from agent.identity.verify import PeerRole, verify_tls_peer

SAMPLES = istio_samples_dir()  # generated like istio samples/certs (tests/istio_like_certs.py)
TD = "trust-domain-foo"
FOO = SpiffeId(TD, "foo", "foo")  # the sample workload-foo-cert.pem
ME = SpiffeId(TD, "default", "me")
OPENSSL = shutil.which("openssl")
LOOPBACK = "127.0.0.1"



def _leaf_only(name: str, tmp_path: Path) -> Path:
    """The first certificate of the sample ``workload-<name>-cert.pem`` (leaf + CA)."""
    text = (SAMPLES / f"workload-{name}-cert.pem").read_bytes()
    path = tmp_path / f"{name}-leaf.pem"
    path.write_bytes(text.split(b"-----END CERTIFICATE-----")[0]
                     + b"-----END CERTIFICATE-----\n")
    return path


@pytest.fixture
def ca(tmp_path: Path) -> MeshCA:
    assert OPENSSL, "openssl not found: run scripts/setup.sh"
    return import_istio_ca(SAMPLES, tmp_path / "ca", trust_domain=TD)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def test_openssl_client_verifies_our_chain_and_we_verify_its(ca: MeshCA, tmp_path: Path
                                                              ) -> None:
    """s_client presents the sample workload-foo (leaf + intermediate) to our server."""
    store = IdentityStore(ca)
    seen: list[SpiffeId] = []
    leaf = _leaf_only("foo", tmp_path)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = writer.get_extra_info("ssl_object")
        seen.append(verify_tls_peer(tls, role=PeerRole.CLIENT, trust_domain=TD))
        writer.close()

    async def main() -> str:
        server = await asyncio.start_server(handle, LOOPBACK, 0,
                                            ssl=store.server_context(ME))
        port = server.sockets[0].getsockname()[1]
        try:
            proc = await asyncio.create_subprocess_exec(
                str(OPENSSL), "s_client", "-connect", f"{LOOPBACK}:{port}", "-tls1_3",
                "-alpn", "h2", "-showcerts", "-verify_return_error",
                "-CAfile", str(SAMPLES / "root-cert.pem"),
                "-cert", str(leaf),
                "-cert_chain", str(SAMPLES / "cert-chain.pem"),
                "-key", str(SAMPLES / "workload-foo-key.pem"),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(proc.communicate(), 20)
            return out.decode(errors="replace")
        finally:
            server.close()
            await server.wait_closed()

    out = asyncio.run(main())
    assert "Verify return code: 0 (ok)" in out, out
    assert " 1 s:" in out and " 2 s:" not in out, out  # leaf + intermediate, no root
    assert "ALPN protocol: h2" in out, out
    assert seen == [FOO]


def test_we_verify_openssl_server_and_it_verifies_our_chain(ca: MeshCA, tmp_path: Path
                                                             ) -> None:
    """s_server presents the sample workload-foo and requires our client cert + chain."""
    store = IdentityStore(ca)
    port = _free_port()
    leaf = _leaf_only("foo", tmp_path)

    async def main() -> tuple[SpiffeId | None, str]:
        proc = await asyncio.create_subprocess_exec(
            str(OPENSSL), "s_server", "-accept", f"{LOOPBACK}:{port}", "-naccept", "1",
            "-tls1_3", "-alpn", "h2", "-Verify", "3", "-verify_return_error",
            "-CAfile", str(SAMPLES / "root-cert.pem"),
            "-cert", str(leaf), "-cert_chain", str(SAMPLES / "cert-chain.pem"),
            "-key", str(SAMPLES / "workload-foo-key.pem"),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        try:
            client = None
            for _ in range(100):  # bounded: until s_server listens (at most ~10 s)
                with contextlib.suppress(ConnectionRefusedError):
                    client = await HboneClient.connect(
                        (LOOPBACK, port), store.client_context(ME), trust_domain=TD,
                        expected_peer=FOO, connect_timeout=5)
                    break
                await asyncio.sleep(0.1)
            assert client is not None, "s_server did not come up"
            identity = client.peer_identity
            await client.close()
            assert proc.stdin is not None
            proc.stdin.close()
            out, _ = await asyncio.wait_for(proc.communicate(), 20)
            return identity, out.decode(errors="replace")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    identity, out = asyncio.run(main())
    assert identity == FOO
    assert "verify error" not in out.lower(), out
    assert "CONNECTION ESTABLISHED" in out or "ACCEPT" in out, out


def test_openssl_server_of_another_trust_domain_refused(ca: MeshCA, tmp_path: Path) -> None:
    """The sample workload-bar (trust-domain-bar, same CA) as a server: refused."""
    store = IdentityStore(ca)
    port = _free_port()

    async def main() -> None:
        proc = await asyncio.create_subprocess_exec(
            str(OPENSSL), "s_server", "-accept", f"{LOOPBACK}:{port}", "-naccept", "1",
            "-tls1_3", "-alpn", "h2", "-CAfile", str(SAMPLES / "root-cert.pem"),
            "-cert", str(_leaf_only("bar", tmp_path)),
            "-cert_chain", str(SAMPLES / "cert-chain.pem"),
            "-key", str(SAMPLES / "workload-bar-key.pem"),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        try:
            refused: Exception | None = None
            for _ in range(100):  # bounded: until s_server listens
                try:
                    client = await HboneClient.connect(
                        (LOOPBACK, port), store.client_context(ME), trust_domain=TD,
                        connect_timeout=5)
                except ConnectionRefusedError:
                    await asyncio.sleep(0.1)
                    continue
                except (HbonePeerIdentityError, ssl.SSLError) as exc:
                    refused = exc
                    break
                await client.close()
                break
            assert isinstance(refused, HbonePeerIdentityError), refused  # the chain was fine
            assert "outside trust domain 'trust-domain-foo'" in str(refused), refused
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()

    asyncio.run(main())
