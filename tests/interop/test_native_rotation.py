"""Certificate rotation in the running native datapath (control protocol v2,
``certificates`` message): new handshakes present the new certificate, a live HBONE
connection keeps the one it started with and keeps carrying its stream, and a
certificate the datapath must not take (another identity's, a key that does not match,
an identity no listener presents) is refused with nothing changed.

Real peers on 127.0.0.1: Python's ssl and the Python HBONE client (agent/hbone) against
``meshagent-datapath``. No root needed; everything is stopped by its context manager.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from hbone_peers import ALLOW_ALL
from test_native_hbone import (
    CLIENT,
    LOOPBACK,
    SERVER,
    TRUST_DOMAIN,
    config,
    inbound,
    run,
    target,
    write_pems,
)

from agent.hbone.client import HboneClient
from agent.identity.ca import init_ca
from agent.identity.store import IdentityStore, client_context_for
from agent.tunnel.native.driver import NativeDatapath, PolicyRefused
from agent.tunnel.native.protocol import CertificatesUpdate, Outcome


async def presented_serial(port: int, context: ssl.SSLContext) -> int:
    """The serial of the certificate a new TLS handshake with the datapath gets."""
    _, writer = await asyncio.open_connection(LOOPBACK, port, ssl=context)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return int(x509.load_der_x509_certificate(der).serial_number)
    finally:
        writer.close()


def test_rotation_new_handshakes_new_cert_live_connection_kept(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca", TRUST_DOMAIN)
    store = IdentityStore(ca)
    first, second = store.get(SERVER), ca.issue(SERVER)
    assert first.serial != second.serial
    old_files = write_pems(tmp_path / "old", first)
    new_files = write_pems(tmp_path / "new", second)
    foreign = write_pems(tmp_path / "client", store.get(CLIENT))
    context = client_context_for(store.get(CLIENT))
    context.set_alpn_protocols(["h2"])

    async def main() -> None:
        async with target() as dest:
            cfg = config(old_files, inbound_=(inbound(old_files, dest.address),))
            async with NativeDatapath(cfg, policy=ALLOW_ALL) as dp:
                port = dp.address("hbone")[1]
                assert await presented_serial(port, context) == first.serial
                client = await HboneClient.connect(dp.address("hbone"),
                                                   store.client_context(CLIENT),
                                                   trust_domain=TRUST_DOMAIN,
                                                   expected_peer=SERVER)
                try:
                    live = await client.open_stream(dest.address)
                    await live.write(b"before")
                    assert await live.read() == b"before"

                    refusals = [
                        CertificatesUpdate(str(SERVER), foreign["cert"], foreign["key"]),
                        CertificatesUpdate(str(SERVER), new_files["cert"], old_files["key"]),
                        CertificatesUpdate(str(CLIENT), foreign["cert"], foreign["key"]),
                        CertificatesUpdate(str(SERVER), str(tmp_path / "absent.pem"),
                                           new_files["key"]),
                    ]
                    for bad in refusals:
                        with pytest.raises(PolicyRefused, match="refused"):
                            await dp.rotate_certificates(bad)
                        assert await presented_serial(port, context) == first.serial

                    applied = await dp.rotate_certificates(
                        CertificatesUpdate(str(SERVER), new_files["cert"], new_files["key"]))
                    assert (applied.identity, applied.listeners) == (str(SERVER), 1)
                    assert await presented_serial(port, context) == second.serial

                    # The live HBONE connection (old certificate) still carries its stream.
                    await live.write(b"after")
                    assert await live.read() == b"after"
                    await live.close_write()
                    assert await live.read() == b""
                finally:
                    await client.close()
                (record,) = await dp.connection_records(1)
                assert record.outcome is Outcome.CLOSED
                assert record.bytes_to_destination == len(b"beforeafter")

    run(main())
