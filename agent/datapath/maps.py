"""The datapath's maps: byte layouts (pure) and a thin writer over bcc tables.

Layouts mirror bpf/lib/common.h; every encoder here is pure so unit tests can
check them without a kernel. ``DatapathMaps`` is the only code that touches
the bcc table objects.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.datapath.drop_reasons import DROP_REASON_MAX, DropReason

AF_INET = 2
AF_INET6 = 10
# struct ma_config: four u32, three u16 ports, a 6-byte MAC, the DNS port, the redirect mark.
_CONFIG = struct.Struct("<IIIIHHH6sH2xI")
_POD_INFO = struct.Struct("<II")
# struct ma_pod_info flags (bpf/lib/common.h).
POD_F_BRIDGED = 0x1
POD_F_DNS = 0x2  # the pod's DNS (UDP/TCP to 53) goes to the tunnel's DNS proxy
_STATS = struct.Struct(f"<4Q{DROP_REASON_MAX}Q")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_NODE_ADDRS = 1024  # MA_MAX_NODE_ADDRS in bpf/lib/common.h
log = structlog.get_logger("agent.datapath")


def _family(addr: IPAddress) -> int:
    return AF_INET if addr.version == 4 else AF_INET6


def addr_key(address: str | IPAddress) -> bytes:
    """struct ma_addr_key for one address (IPv4 in the first 4 bytes)."""
    addr = ipaddress.ip_address(address)
    return struct.pack("<I", _family(addr)) + addr.packed.ljust(16, b"\0")


def lpm_key(cidr: str) -> bytes:
    """struct ma_lpm_key: the family byte is part of the prefix, so v4 and v6 never mix."""
    net = ipaddress.ip_network(cidr, strict=False)
    family = AF_INET if net.version == 4 else AF_INET6
    return (struct.pack("<IB", 8 + net.prefixlen, family)
            + net.network_address.packed.ljust(16, b"\0"))


@dataclass(frozen=True)
class DatapathSettings:
    capture_mark: int
    capture_mask: int
    tunnel_mark: int
    tunnel_ifindex: int
    tunnel_mac: bytes
    outbound_port: int
    inbound_port: int
    hbone_port: int
    redirect_mark: int = 0  # 0: bridged pods' captured packets cannot be redirected
    dns_port: int = 0  # the tunnel's DNS proxy; 0: no pod's DNS is captured

    def encode(self) -> bytes:
        if len(self.tunnel_mac) != 6:
            raise ValueError(f"tunnel_mac must be 6 bytes, got {self.tunnel_mac!r}")
        return _CONFIG.pack(self.capture_mark, self.capture_mask, self.tunnel_mark,
                            self.tunnel_ifindex, self.outbound_port, self.inbound_port,
                            self.hbone_port, self.tunnel_mac, self.dns_port,
                            self.redirect_mark)


@dataclass
class PodCounters:
    captured_out_packets: int = 0
    captured_out_bytes: int = 0
    captured_in_packets: int = 0
    captured_in_bytes: int = 0
    drops: dict[DropReason, int] = field(default_factory=dict)

    def add(self, raw: bytes) -> None:
        """Accumulate one CPU's struct ma_pod_stats."""
        values = _STATS.unpack_from(raw)
        self.captured_out_packets += values[0]
        self.captured_out_bytes += values[1]
        self.captured_in_packets += values[2]
        self.captured_in_bytes += values[3]
        for reason in DropReason:
            count = values[4 + reason]
            if count:
                self.drops[reason] = self.drops.get(reason, 0) + count

    def as_dict(self) -> dict[str, Any]:
        return {
            "captured_out_packets": self.captured_out_packets,
            "captured_out_bytes": self.captured_out_bytes,
            "captured_in_packets": self.captured_in_packets,
            "captured_in_bytes": self.captured_in_bytes,
            "drops": {r.label: n for r, n in sorted(self.drops.items())},
        }


def _key(table: Any, raw: bytes) -> Any:
    return table.Key.from_buffer_copy(raw)


class DatapathMaps:
    """Writes the agent's desired state into the programs' maps."""

    def __init__(self, programs: Any) -> None:
        self._t = {name: programs.table(name) for name in (
            "ma_pods", "ma_pod_addrs", "ma_node_addrs", "ma_excluded_ports",
            "ma_excluded_cidrs", "ma_config_map", "ma_stats", "ma_encap_udp_ports")}

    def set_settings(self, settings: DatapathSettings) -> None:
        table = self._t["ma_config_map"]
        table[table.Key(0)] = table.Leaf.from_buffer_copy(settings.encode())

    def add_pod(self, ifindex: int, addresses: Iterable[str], flags: int = 0) -> None:
        """Enroll: addresses first, so the pod is never enrolled without them.

        ``flags``: ``POD_F_BRIDGED`` when the host veth is a bridge port."""
        addrs = self._t["ma_pod_addrs"]
        for address in addresses:
            addrs[_key(addrs, addr_key(address))] = addrs.Leaf(ifindex)
        pods = self._t["ma_pods"]
        pods[pods.Key(ifindex)] = pods.Leaf.from_buffer_copy(_POD_INFO.pack(flags, 0))

    def pod_flags(self, ifindex: int) -> int | None:
        """The enrolled pod's flags, or None when ``ifindex`` is not enrolled."""
        pods = self._t["ma_pods"]
        try:
            leaf = pods[pods.Key(ifindex)]
        except KeyError:
            return None
        return int(_POD_INFO.unpack(bytes(leaf))[0])

    def set_pod_flags(self, ifindex: int, flags: int) -> bool:
        """Rewrite an enrolled pod's flags; False when it is not enrolled."""
        if self.pod_flags(ifindex) is None:
            return False
        pods = self._t["ma_pods"]
        pods[pods.Key(ifindex)] = pods.Leaf.from_buffer_copy(_POD_INFO.pack(flags, 0))
        return True

    def remove_pod(self, ifindex: int, addresses: Iterable[str]) -> None:
        """Unenroll: the pod entry first, so no packet sees a half-removed pod."""
        for name in ("ma_pods", "ma_stats"):
            table = self._t[name]
            k = table.Key(ifindex)
            if k in table:
                del table[k]
        addrs = self._t["ma_pod_addrs"]
        for address in addresses:
            k = _key(addrs, addr_key(address))
            if k in addrs and addrs[k].value == ifindex:
                del addrs[k]

    def pod_ifindexes(self) -> set[int]:
        return {k.value for k in self._t["ma_pods"]}

    def prune(self, pods: dict[int, Iterable[str]]) -> int:
        """Remove entries of pods not in ``pods`` (ifindex -> addresses); return how many.

        Pinned maps outlive the agent: this drops what belonged to pods that
        went away while it was down.
        """
        wanted_addrs = {addr_key(a) for addrs in pods.values() for a in addrs}
        removed = 0
        for name in ("ma_pods", "ma_stats"):
            table = self._t[name]
            for k in list(table.keys()):
                if k.value not in pods:
                    del table[k]
                    removed += name == "ma_pods"
        addrs = self._t["ma_pod_addrs"]
        for k in list(addrs.keys()):
            if bytes(k) not in wanted_addrs:
                del addrs[k]
        return removed

    def set_node_addresses(self, addresses: Iterable[str]) -> None:
        wanted = sorted({addr_key(a) for a in addresses})
        if len(wanted) > MAX_NODE_ADDRS:
            # Never fail an enrollment over this: probes from the addresses
            # left out are captured like any other client instead.
            log.warning("too many node addresses for the datapath; keeping the first ones",
                        count=len(wanted), kept=MAX_NODE_ADDRS)
            wanted = wanted[:MAX_NODE_ADDRS]
        self._replace_set("ma_node_addrs", set(wanted))

    def add_node_addresses(self, addresses: Iterable[str]) -> list[str]:
        """Add to the node-address set without rewriting it (enrollment's hot path);
        return the addresses that were not there before."""
        table = self._t["ma_node_addrs"]
        added = []
        for address in addresses:
            key = _key(table, addr_key(address))
            if key in table:
                continue
            try:
                table[key] = table.Leaf(1)
            except Exception as exc:  # bcc raises a bare Exception when the map is full
                log.warning("node address not added to the datapath", address=address,
                            error=str(exc))
                continue
            added.append(address)
        return added

    def remove_node_addresses(self, addresses: Iterable[str]) -> None:
        table = self._t["ma_node_addrs"]
        for address in addresses:
            key = _key(table, addr_key(address))
            if key in table:
                del table[key]

    def set_exclusions(self, ports: Iterable[int], cidrs: Iterable[str]) -> None:
        self._replace_set("ma_excluded_ports", {struct.pack("<H", p) for p in ports})
        self._replace_set("ma_excluded_cidrs", {lpm_key(c) for c in cidrs})

    def set_encapsulation_ports(self, ports: Iterable[int]) -> None:
        """UDP ports of the node's own tunnels: the datapath drops pods' UDP to them."""
        self._replace_set("ma_encap_udp_ports", {struct.pack("<H", p) for p in ports})

    def _replace_set(self, name: str, wanted: set[bytes]) -> None:
        table = self._t[name]
        for k in list(table.keys()):
            if bytes(k) not in wanted:
                del table[k]
        for raw in wanted:
            table[_key(table, raw)] = table.Leaf(1)

    def counters(self) -> dict[int, PodCounters]:
        """Per-pod counters summed over CPUs, keyed by host-side veth ifindex."""
        out: dict[int, PodCounters] = {}
        for key, per_cpu in self._t["ma_stats"].items():
            counters = out.setdefault(key.value, PodCounters())
            for leaf in per_cpu:
                counters.add(bytes(leaf))
        return out
