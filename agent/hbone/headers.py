"""Header helpers for HBONE requests (pure): ``:authority``, RFC 7239 ``Forwarded``,
W3C ``baggage``, lookups in header lists."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

# Headers a ztunnel peer sends or reads on the CONNECT request.
FORWARDED_HEADER = "forwarded"
BAGGAGE_HEADER = "baggage"
TRACEPARENT_HEADER = "traceparent"


def parse_authority(authority: str) -> tuple[str, int]:
    """Parse an HBONE ``:authority`` ``ip:port`` / ``[ipv6]:port`` into (ip, port).

    ValueError for host names, missing or out-of-range ports, or IPv6 without brackets.
    """
    if authority.startswith("["):
        host, sep, port_text = authority[1:].partition("]:")
        if not sep:
            raise ValueError(f"authority {authority!r}: expected [ipv6]:port")
        address = ipaddress.ip_address(host)  # ValueError if not an address
        if address.version != 6:
            raise ValueError(f"authority {authority!r}: brackets are for IPv6 only")
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep or not host:
            raise ValueError(f"authority {authority!r}: expected ip:port")
        address = ipaddress.ip_address(host)
        if address.version != 4:
            raise ValueError(f"authority {authority!r}: IPv6 must be written [addr]:port")
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise ValueError(f"authority {authority!r}: port must be a decimal number")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"authority {authority!r}: port {port} out of range")
    return str(address), port


_HOSTNAME_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def parse_hbone_address(authority: str) -> tuple[str, int, bool]:
    """(host, port, is_ip): an ``ip:port`` authority, or ``hostname:port`` as ztunnel's
    ``HboneAddress::SvcHostname`` (src/proxy.rs ``TryFrom<&Uri> for HboneAddress``:
    an authority whose host is not an IP is a service hostname). ValueError otherwise.
    """
    host, sep, port_text = authority.rpartition(":")
    if authority.startswith("[") or ":" in host or not sep:
        ip, port = parse_authority(authority)
        return ip, port, True
    try:
        ip, port = parse_authority(authority)
        return ip, port, True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_HOSTNAME_LABEL.match(label) for label in labels) \
            or labels[-1].isdigit():
        raise ValueError(f"authority {authority!r}: expected ip:port or hostname:port")
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5 \
            or not 0 < int(port_text) < 65536:
        raise ValueError(f"authority {authority!r}: port must be in 1..65535")
    return host.lower(), int(port_text), False


def format_authority(ip: str, port: int) -> str:
    """``ip:port``, with IPv6 bracketed, as ztunnel writes ``:authority``."""
    address = ipaddress.ip_address(ip)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def format_forwarded_for(ip: str) -> str:
    """RFC 7239 ``Forwarded`` value ``for="<ip>"`` (IPv6 bracketed inside the quotes)."""
    address = ipaddress.ip_address(ip)
    node = f"[{address}]" if address.version == 6 else str(address)
    return f'for="{node}"'


def parse_forwarded_for(value: str | None) -> str | None:
    """The first ``for=`` address of a ``Forwarded`` header, or None if absent/unusable."""
    if not value:
        return None
    first_element = value.split(",", 1)[0]
    for pair in first_element.split(";"):
        key, sep, node = pair.strip().partition("=")
        if not sep or key.strip().lower() != "for":
            continue
        node = node.strip().strip('"')
        if node.startswith("["):
            node = node[1:].split("]", 1)[0]
        elif node.count(":") == 1:  # IPv4 with a port: 192.0.2.1:4711
            node = node.split(":", 1)[0]
        try:
            return str(ipaddress.ip_address(node))
        except ValueError:
            return None
    return None


def format_baggage(entries: Iterable[tuple[str, str]]) -> str:
    """W3C baggage ``k=v,k=v`` as ztunnel sends it (e.g. ``k8s.namespace.name=default``)."""
    parts = []
    for key, value in entries:
        if not key or any(c in key for c in ",;= ") or any(c in value for c in ",; "):
            raise ValueError(f"baggage entry {key!r}={value!r} has a reserved character")
        parts.append(f"{key}={value}")
    return ",".join(parts)


def parse_baggage(value: str | None) -> dict[str, str]:
    """Parse a ``baggage`` header into a dict (properties after ';' are dropped)."""
    result: dict[str, str] = {}
    for member in (value or "").split(","):
        key, sep, item = member.split(";", 1)[0].partition("=")
        if sep and key.strip():
            result[key.strip()] = item.strip()
    return result


def header_value(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """First value of header ``name`` (case-insensitive) in ``headers``, or None."""
    wanted = name.lower()
    for key, value in headers:
        if key.lower() == wanted:
            return value
    return None
