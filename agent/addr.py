"""IP address helpers: the one place addresses are parsed and normalised. Pure.

Canonical form follows ztunnel's ``socket::to_canonical`` (``src/socket.rs``, used on
every accepted and original-destination address in ``src/proxy/{inbound,outbound}.rs``):
an IPv4-mapped IPv6 address (``::ffff:10.0.0.1``) is the IPv4 address, so dual-stack
sockets, workload lookups and ``ipBlocks`` agree on one spelling.
"""

from __future__ import annotations

import ipaddress
import socket

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ip(value: str | IPAddress) -> IPAddress:
    """Parse an address into its canonical form; ValueError for anything else."""
    address = ipaddress.ip_address(value) if isinstance(value, str) else value
    if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
        raise ValueError(f"not an IP address: {value!r}")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def normalize_ip(value: str | IPAddress) -> str:
    """Canonical text form of an IP; raises ValueError for anything else."""
    return str(parse_ip(value))


def is_ip(value: str) -> bool:
    """True if ``value`` is an IPv4 or IPv6 address (no port, no brackets)."""
    try:
        parse_ip(value)
    except ValueError:
        return False
    return True


def family_of(ip: str | IPAddress) -> int:
    """``AF_INET`` or ``AF_INET6`` for an address (canonical: mapped IPv4 is AF_INET)."""
    return socket.AF_INET if parse_ip(ip).version == 4 else socket.AF_INET6


def parse_cidr(text: str) -> IPNetwork:
    """A policy CIDR as istiod reads it (``netip.ParsePrefix``: host bits may be set, a
    bare address is a /32 or /128). Otherwise ValueError whose message completes a
    sentence that starts with the text (``'<text>' is not a CIDR``), saying what to
    write instead.

    An IPv4-mapped IPv6 block (``::ffff:10.0.0.0/104``) is refused: addresses are
    compared in canonical form (IPv4 as IPv4, above), so it could never match, and a
    DENY written that way would deny nothing."""
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError("is not a CIDR") from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and \
            net.network_address.ipv4_mapped is not None:
        v4 = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
        raise ValueError("is an IPv4-mapped IPv6 CIDR, which never matches "
                         f"(IPv4 sources are compared as IPv4); write {v4}")
    return net
