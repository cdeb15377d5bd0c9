"""Socket recipes of a transparent tunnel.

- Listeners set IP_TRANSPARENT so the kernel lets them accept connections
  addressed to any IP (the datapath's sk_assign delivers them); accepted
  sockets' ``getsockname()`` is the original destination.
- Every tunnel socket carries SO_MARK = ``tunnel.socket_mark``, which the
  datapath recognises and never recaptures (and which accepted sockets and
  their SYN-ACKs inherit from the listener).
- Upstream sockets may bind a non-local source (the client pod's address), so
  servers see the real client.
"""

from __future__ import annotations

import contextlib
import os
import socket

IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
SO_MARK = 36


def _transparent(sock: socket.socket, family: int, mark: int) -> None:
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    if mark:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)


def _kernel_at_least(major: int, minor: int) -> bool:
    """Whether the running kernel's release is at least ``major.minor``."""
    parts = os.uname().release.split(".", 2)
    try:
        return (int(parts[0]), int(parts[1].split("-")[0])) >= (major, minor)
    except (IndexError, ValueError):
        return True  # unparsable: assume a current kernel


def listener(family: int, port: int, *, mark: int, backlog: int = 4096,
             reuseport: bool = True) -> socket.socket:
    """A non-blocking transparent listener on the wildcard address."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # bpf_sk_assign refuses SO_REUSEPORT sockets before Linux 6.5 (commit
        # "bpf, net: Support SO_REUSEPORT sockets with bpf_sk_assign"): on such
        # a kernel (Debian 12's 6.1) every captured packet would be dropped as
        # assign_failed, so the listener is a plain one there.
        if reuseport and _kernel_at_least(6, 5):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # Separate v4 and v6 listeners: the datapath looks each up by family.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        _transparent(sock, family, mark)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        sock.listen(backlog)
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


def upstream(family: int, *, mark: int, source_ip: str | None = None,
             transparent: bool = True) -> socket.socket:
    """A non-blocking socket for dialing out, optionally from ``source_ip``.

    ``transparent`` (IP_TRANSPARENT, needs CAP_NET_ADMIN) lets ``source_ip`` be an
    address that is not local (a pod's); without it only a local address binds
    (tests on loopback).
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source_ip is not None:
            if transparent:
                _transparent(sock, family, mark)
            elif mark:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            sock.setsockopt(socket.SOL_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source_ip, 0))
        elif mark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


def abort(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), to propagate a reset."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
