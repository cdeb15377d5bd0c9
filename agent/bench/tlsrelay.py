"""A plain Python TLS relay pair: the reference the HBONE tunnel is compared with.

Two asyncio processes (uvloop when installed, like the tunnel)::

    client --TCP--> relay A ==TLS 1.3, mutual auth==> relay B --TCP--> server

``python -m agent.bench.tlsrelay client --route LPORT=HOST:PORT ...`` accepts
plain TCP on each ``LPORT`` and forwards it over TLS to relay B at
``HOST:PORT``; ``python -m agent.bench.tlsrelay server --route LPORT=HOST:PORT``
accepts TLS on ``LPORT`` and forwards plain TCP to ``HOST:PORT``. One TLS
connection per relayed TCP connection (no multiplexing, no HTTP/2 framing):
the cheapest secure relay Python offers, i.e. an upper bound for HBONE.

``certs DIR`` writes a throwaway CA plus a client and a server certificate
(ECDSA P-256, like the mesh's) that both sides use for mutual TLS 1.3.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ssl
import sys
from pathlib import Path

BUFFER_SIZE = 256 * 1024
CONNECT_TIMEOUT_S = 5.0


def write_certs(out_dir: str) -> None:
    """CA, server and client key pairs for the relay pair's mutual TLS."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("bench-ca")).issuer_name(name("bench-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (out / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(f"relay-{role}"))
                .issuer_name(ca.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("relay-server")]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        (out / f"{role}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (out / f"{role}.key").write_bytes(pem_key(key))


def _context(cert_dir: str, server: bool) -> ssl.SSLContext:
    d = Path(cert_dir)
    role = "server" if server else "client"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(d / f"{role}.pem"), str(d / f"{role}.key"))
    ctx.load_verify_locations(str(d / "ca.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not server:
        ctx.check_hostname = True
    return ctx


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(BUFFER_SIZE)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError, ssl.SSLError):
        pass


async def _relay(in_r: asyncio.StreamReader, in_w: asyncio.StreamWriter, host: str, port: int,
                 ssl_ctx: ssl.SSLContext | None) -> None:
    try:
        out_r, out_w = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl_ctx,
                                    server_hostname="relay-server" if ssl_ctx else None,
                                    limit=BUFFER_SIZE),
            CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ssl.SSLError):
        in_w.close()
        return
    try:
        await asyncio.gather(_pipe(in_r, out_w), _pipe(out_r, in_w))
    finally:
        for w in (in_w, out_w):
            with contextlib.suppress(Exception):
                w.close()


def _parse_route(text: str) -> tuple[int, str, int]:
    lport, _, target = text.partition("=")
    host, _, port = target.rpartition(":")
    if not lport or not host or not port:
        raise argparse.ArgumentTypeError(f"route {text!r}: use LPORT=HOST:PORT")
    return int(lport), host, int(port)


async def _main(role: str, routes: list[tuple[int, str, int]], cert_dir: str) -> None:
    listen_ctx = _context(cert_dir, server=True) if role == "server" else None
    dial_ctx = _context(cert_dir, server=False) if role == "client" else None
    servers = []
    for lport, host, port in routes:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter,
                         host: str = host, port: int = port) -> None:
            sock = w.get_extra_info("socket")
            if sock is not None:
                import socket

                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await _relay(r, w, host, port, dial_ctx)

        servers.append(await asyncio.start_server(handle, host="0.0.0.0", port=lport,
                                                  ssl=listen_ctx, backlog=4096,
                                                  reuse_address=True, limit=BUFFER_SIZE))
    print(f"tlsrelay {role} ready: {routes}", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.bench.tlsrelay", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="role", required=True)
    c = sub.add_parser("certs")
    c.add_argument("dir")
    for role in ("client", "server"):
        p = sub.add_parser(role)
        p.add_argument("--route", action="append", type=_parse_route, required=True)
        p.add_argument("--certs", required=True)
    args = ap.parse_args(argv)
    if args.role == "certs":
        write_certs(args.dir)
        return 0
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args.role, args.route, args.certs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
