"""The native datapath with HTTP/2 stacks we did not write, over mutual TLS on
127.0.0.1 (h3-hbone's peers and helpers, tests/interop/test_curl_nghttpx.py):

* libcurl 8.x (pycurl wheel, ``--proxy-http2``, client certificate) as the HBONE
  client of the native server;
* nghttpx (``--http2-proxy`` with client-certificate verification) as the remote
  HBONE server of the native client.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

import pytest
from hbone_peers import ALLOW_ALL, LOOPBACK, WORKLOAD, echo_backend
from test_curl_nghttpx import (
    BODY,
    CLIENT,
    CURL_CLIENT,
    SERVER,
    TRUST_DOMAIN,
    connect_proxy,
    curl_get,
    http_backend,
    nghttpx,
    run,
    write_pems,
)

from agent.identity.ca import init_ca
from agent.identity.store import IdentityStore
from agent.tunnel.native.driver import NativeDatapath
from agent.tunnel.native.protocol import (
    DatapathConfig,
    InboundListener,
    OutboundListener,
    Outcome,
)


def store_for(tmp_path: Path) -> IdentityStore:
    return IdentityStore(init_ca(tmp_path / "ca", TRUST_DOMAIN))


def full_chain(_directory: Path, files: dict[str, str], chain: bytes) -> dict[str, str]:
    """write_pems writes the leaf only; the native side presents leaf + chain."""
    Path(files["cert"]).write_bytes(chain)
    return files


def test_libcurl_is_an_hbone_client_of_the_native_server(tmp_path: Path) -> None:
    store = store_for(tmp_path)
    server = store.get(SERVER)
    server_pems = full_chain(tmp_path, write_pems(tmp_path / "server", server),
                             server.full_chain_pem)
    curl_pems = write_pems(tmp_path / "curl", store.get(CURL_CLIENT))

    async def main() -> None:
        async with http_backend() as backend:
            cfg = DatapathConfig(TRUST_DOMAIN, server_pems["ca"], inbound=(InboundListener(
                "hbone", f"{LOOPBACK}:0", server_pems["cert"], server_pems["key"],
                destinations=(f"{LOOPBACK}:{backend}",), workload=WORKLOAD),), workers=1)
            async with NativeDatapath(cfg, policy=ALLOW_ALL) as dp:
                port = dp.address("hbone")[1]
                url = f"http://127.0.0.1:{backend}/through-native-hbone"
                status, body, error = await asyncio.to_thread(curl_get, url, port, curl_pems)
                refused = await asyncio.to_thread(curl_get, url, port, None)
                [record] = await dp.connection_records(1)
        assert (status, error) == (200, "") and body == BODY
        assert refused[0] == 0 and refused[2]  # no client certificate: no TLS
        # curl ends the tunnel with RST_STREAM once it has its (Connection: close) answer.
        assert record.outcome in (Outcome.CLOSED, Outcome.STREAM_RESET)
        assert record.status == 200
        assert record.peer_identity == str(CURL_CLIENT)
        assert record.bytes_from_destination > len(BODY)  # the response, with its head

    run(main())


def test_native_client_through_nghttpx(tmp_path: Path) -> None:
    store = store_for(tmp_path)
    pems = write_pems(tmp_path / "nghttpx", store.get(SERVER))
    client = store.get(CLIENT)
    client_pems = full_chain(tmp_path, write_pems(tmp_path / "client", client),
                             client.full_chain_pem)
    payload = bytes(range(256)) * 4096  # 1 MiB

    async def exchange(port: int, n: int) -> bytes:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        data = payload[n:]
        writer.write(data)
        await writer.drain()
        # nghttpx does not half-close its HTTP/1.1 CONNECT backend on END_STREAM (see
        # test_curl_nghttpx.py), so a FIN would never be answered: read what we sent,
        # then reset (the native side resets the stream: socket_reset).
        received = await asyncio.wait_for(reader.readexactly(len(data)), 15)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        return received

    async def main() -> None:
        async with echo_backend() as echo, connect_proxy() as proxy, \
                nghttpx(pems, proxy, tmp_path) as port:
            peer = f"{LOOPBACK}:{port}"
            cfg = DatapathConfig(TRUST_DOMAIN, client_pems["ca"], outbound=(
                OutboundListener("out", f"{LOOPBACK}:0", peer, f"127.0.0.1:{echo}",
                                 client_pems["cert"], client_pems["key"],
                                 peer_identities=(str(SERVER),)),
                OutboundListener("far", f"{LOOPBACK}:0", peer, "192.0.2.1:80",
                                 client_pems["cert"], client_pems["key"],
                                 peer_identities=(str(SERVER),))), workers=1)
            async with NativeDatapath(cfg, policy=ALLOW_ALL) as dp:
                out = dp.address("out")[1]
                replies = await asyncio.gather(*(exchange(out, n) for n in range(4)))
                assert all(r == payload[n:] for n, r in enumerate(replies))
                records = await dp.connection_records(4)
                # nghttpx's backend refuses a non-loopback target with 403: the native
                # client reports a clean reject and resets the client's connection.
                reader, writer = await asyncio.open_connection(*dp.address("far"))
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                    await asyncio.wait_for(reader.readexactly(1), 15)
                writer.close()
                [rejected] = await dp.connection_records(1)
        sent = sorted(len(payload) - n for n in range(4))
        assert sorted(r.bytes_to_destination for r in records) == sent
        assert sorted(r.bytes_from_destination for r in records) == sent
        assert all(r.status == 200 and r.outcome is Outcome.SOCKET_RESET for r in records)
        assert rejected.outcome is Outcome.REJECTED and rejected.status == 403

    run(main())
