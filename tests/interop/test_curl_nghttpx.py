"""Interop with HTTP/2 stacks we did not write, over mutual TLS on 127.0.0.1:

* libcurl (8.x, from the pycurl wheel) as the HBONE *client*: an HTTPS proxy spoken
  over HTTP/2 (CURLPROXY_HTTPS2, curl's ``--proxy-http2``), CONNECT tunnel, client
  certificate, through our HBONE server to an HTTP backend;
* nghttpx (nghttp2's proxy, Debian's nghttp2-proxy) as the remote HBONE *server* for
  our client: its HTTP/2 forward-proxy mode (``--http2-proxy``) takes our CONNECT with
  client-certificate verification and hands it to an HTTP/1.1 CONNECT backend.

Both are hard requirements (scripts/setup.sh installs them): missing means failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import socket
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import pytest
from hbone_peers import LOOPBACK, echo_backend, hbone_server

from agent.hbone.client import HboneClient
from agent.hbone.exceptions import HboneRejected
from agent.identity.ca import WorkloadCert, init_ca, load_ca
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityStore

TRUST_DOMAIN = "cluster.local"
SERVER = SpiffeId(TRUST_DOMAIN, "istio-system", "ztunnel")
CURL_CLIENT = SpiffeId(TRUST_DOMAIN, "default", "curl")
CLIENT = SpiffeId(TRUST_DOMAIN, "default", "client")
# CURLPROXY_HTTPS2 from curl.h (libcurl >= 8.1); pycurl has no name for it yet.
CURLPROXY_HTTPS2 = 3
BODY = b"hello from the backend\n" * 100


def run(coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def write_pems(directory: Path, cert: WorkloadCert) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"cert": directory / "cert.pem", "key": directory / "key.pem",
             "ca": directory / "ca.pem"}
    paths["cert"].write_bytes(cert.cert_pem)
    paths["key"].touch(mode=0o600)
    paths["key"].write_bytes(cert.key_pem)
    paths["ca"].write_bytes(cert.trust_anchors_pem)
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture()
def ca_dir(tmp_path: Path) -> Path:
    init_ca(tmp_path / "ca", TRUST_DOMAIN)
    return tmp_path / "ca"


@contextlib.asynccontextmanager
async def http_backend() -> AsyncIterator[int]:
    """A minimal HTTP/1.1 server on 127.0.0.1 answering every request with BODY."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % len(BODY) + BODY)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, LOOPBACK, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def curl_get(url: str, proxy_port: int,
             pems: dict[str, str] | None) -> tuple[int, bytes, str]:
    """libcurl GET of ``url`` through an HTTP/2 HTTPS proxy (our HBONE server):
    (HTTP status, body, error)."""
    import pycurl

    body = io.BytesIO()
    curl = pycurl.Curl()
    try:
        curl.setopt(pycurl.URL, url)
        curl.setopt(pycurl.PROXY, f"https://127.0.0.1:{proxy_port}")
        curl.setopt(pycurl.PROXYTYPE, CURLPROXY_HTTPS2)
        curl.setopt(pycurl.HTTPPROXYTUNNEL, 1)
        curl.setopt(pycurl.NOPROXY, "")
        if pems is not None:
            curl.setopt(pycurl.PROXY_SSLCERT, pems["cert"])
            curl.setopt(pycurl.PROXY_SSLKEY, pems["key"])
            curl.setopt(pycurl.PROXY_CAINFO, pems["ca"])
        # The server's name is its SPIFFE URI SAN, not 127.0.0.1: check the chain only.
        curl.setopt(pycurl.PROXY_SSL_VERIFYHOST, 0)
        curl.setopt(pycurl.CONNECTTIMEOUT, 10)
        curl.setopt(pycurl.TIMEOUT, 20)
        curl.setopt(pycurl.WRITEDATA, body)
        try:
            curl.perform()
        except pycurl.error as exc:
            return 0, b"", str(exc)
        return int(curl.getinfo(pycurl.RESPONSE_CODE)), body.getvalue(), ""
    finally:
        curl.close()


def test_libcurl_is_an_hbone_client_of_our_server(ca_dir: Path, tmp_path: Path) -> None:
    import pycurl

    assert "nghttp2" in pycurl.version, pycurl.version  # libcurl built with HTTP/2
    store = IdentityStore(load_ca(ca_dir))
    pems = write_pems(tmp_path / "curl", store.get(CURL_CLIENT))

    async def main() -> tuple[tuple[int, bytes, str], tuple[int, bytes, str],
                              dict[str, int]]:
        async with http_backend() as backend, hbone_server(ca_dir, str(SERVER)) as server:
            url = f"http://127.0.0.1:{backend}/through-hbone"
            ok = await asyncio.to_thread(curl_get, url, server.port, pems)
            # Without a client certificate the TLS handshake is refused.
            refused = await asyncio.to_thread(curl_get, url, server.port, None)
            return ok, refused, await server.stats()

    (status, body, error), (refused_status, _, refused_error), stats = run(main())
    assert (status, error) == (200, "") and body == BODY
    assert refused_status == 0 and refused_error
    # Our server only speaks HTTP/2 (ALPN h2), so the tunnel was an HTTP/2 CONNECT.
    assert stats["dials"] == 1 and stats["requests"] == 1, stats


def test_libcurl_connect_to_a_non_loopback_target_is_refused(ca_dir: Path,
                                                             tmp_path: Path) -> None:
    """A CONNECT the server refuses (400 here) is a clean error for libcurl."""
    store = IdentityStore(load_ca(ca_dir))
    pems = write_pems(tmp_path / "curl", store.get(CURL_CLIENT))

    async def main() -> tuple[tuple[int, bytes, str], dict[str, int]]:
        async with hbone_server(ca_dir, str(SERVER)) as server:
            # 192.0.2.1 (TEST-NET-1) is never dialed: the test server refuses it (400).
            result = await asyncio.to_thread(curl_get, "http://192.0.2.1:80/", server.port,
                                             pems)
            return result, await server.stats()

    (status, _, error), stats = run(main())
    # libcurl reports a refused tunnel as CURLE_COULDNT_CONNECT (7).
    assert status == 0 and error.startswith("(7,"), (status, error)
    assert stats["requests"] == 1 and stats["dials"] == 0, stats


# ---- nghttpx as the remote peer -----------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def connect_proxy() -> AsyncIterator[int]:
    """An HTTP/1.1 CONNECT proxy on 127.0.0.1 (nghttpx's backend); loopback only."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, target, _ = head.split(b"\r\n", 1)[0].split(b" ", 2)
            host, _, port = target.decode().rpartition(":")
            if method != b"CONNECT" or host not in ("127.0.0.1", "[127.0.0.1]"):
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            up_reader, up_writer = await asyncio.open_connection(LOOPBACK, int(port))
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        writer.close()
        up_writer.close()

    server = await asyncio.start_server(handle, LOOPBACK, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@contextlib.asynccontextmanager
async def nghttpx(pems: dict[str, str], backend_port: int,
                  workdir: Path) -> AsyncIterator[int]:
    binary = shutil.which("nghttpx") or "/usr/sbin/nghttpx"
    if not Path(binary).exists():
        pytest.fail("nghttpx not found: run scripts/setup.sh (Debian package nghttp2-proxy)")
    port = free_port()
    log = workdir / "nghttpx.log"
    proc = await asyncio.create_subprocess_exec(
        binary, "--conf=/dev/null", "--http2-proxy", "--single-process", "--workers=1",
        f"--frontend=127.0.0.1,{port}", f"--backend=127.0.0.1,{backend_port}",
        "--verify-client", f"--verify-client-cacert={pems['ca']}", "--no-ocsp",
        f"--errorlog-file={log}", "--accesslog-file=/dev/null", pems["key"], pems["cert"],
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(100):  # bounded wait for the listener
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection(LOOPBACK, port)
                writer.close()
                break
            if proc.returncode is not None:
                pytest.fail(f"nghttpx exited: {log.read_text() if log.exists() else ''}")
            await asyncio.sleep(0.1)
        yield port
    finally:
        if proc.returncode is None:
            proc.terminate()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 10)
        if proc.returncode is None:
            proc.kill()


def test_our_hbone_client_through_nghttpx(ca_dir: Path, tmp_path: Path) -> None:
    store = IdentityStore(load_ca(ca_dir))
    pems = write_pems(tmp_path / "nghttpx", store.get(SERVER))
    payload = bytes(range(256)) * 4096  # 1 MiB, more than one stream window slice

    async def main() -> None:
        async with echo_backend() as echo, connect_proxy() as proxy, \
                nghttpx(pems, proxy, tmp_path) as port:
            client = await HboneClient.connect((LOOPBACK, port), store.client_context(CLIENT),
                                               trust_domain=TRUST_DOMAIN, expected_peer=SERVER)
            try:
                assert client.peer_identity == SERVER

                async def echo_once(n: int) -> None:
                    stream = await client.open_stream(f"127.0.0.1:{echo}",
                                                      forwarded_for="10.0.0.9", timeout=15)
                    data = payload[n:]
                    await stream.write(data)
                    await stream.close_write()
                    # nghttpx does not turn our END_STREAM into a half-close of its
                    # HTTP/1.1 CONNECT backend connection, so the echo never sees EOF:
                    # read what we sent, then reset (our client's half-close is covered
                    # against Node/nghttp2 in test_node_http2.py).
                    received = bytearray()
                    while len(received) < len(data):
                        chunk = await asyncio.wait_for(stream.read(), 15)
                        assert chunk, "stream ended early"
                        received += chunk
                    assert bytes(received) == data
                    stream.abort()

                await asyncio.gather(*(echo_once(n) for n in range(4)))  # multiplexed
                # The CONNECT backend refuses a non-loopback target; nghttpx relays its
                # 403 and our client reports a clean reject.
                with pytest.raises(HboneRejected) as rejected:
                    await client.open_stream("192.0.2.1:80", timeout=15)
                assert rejected.value.status == 403
                assert client.is_usable  # the connection is still good
            finally:
                await client.close()

    run(main())
