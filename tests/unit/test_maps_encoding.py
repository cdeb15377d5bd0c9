"""Byte layouts of the map keys and values (bpf/lib/common.h), without a kernel."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.datapath.drop_reasons import DROP_REASON_MAX, DropReason
from agent.datapath.maps import (
    AF_INET,
    AF_INET6,
    DatapathSettings,
    PodCounters,
    addr_key,
    lpm_key,
)

POD_V4 = "10.244.1.10"
POD_V6 = "fd00:10:244:1::a"
POD_CIDR_V4 = "10.244.1.0/24"
POD_CIDR_V6 = "fd00:10:244:1::/64"
TUNNEL_MAC = bytes.fromhex("02000000 3a98")
CAPTURE_MARK = 0x400
CAPTURE_MASK = 0xF00
TUNNEL_MARK = 0x539
TUNNEL_IFINDEX = 42
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
HBONE_PORT = 15008

ADDR_KEY_SIZE = 20  # struct ma_addr_key
LPM_KEY_SIZE = 21  # struct ma_lpm_key (packed)
CONFIG_SIZE = 36  # struct ma_config
STATS_SIZE = 8 * (4 + DROP_REASON_MAX)  # struct ma_pod_stats


def settings(**overrides: object) -> DatapathSettings:
    fields: dict[str, object] = {
        "capture_mark": CAPTURE_MARK, "capture_mask": CAPTURE_MASK, "tunnel_mark": TUNNEL_MARK,
        "tunnel_ifindex": TUNNEL_IFINDEX, "tunnel_mac": TUNNEL_MAC,
        "outbound_port": OUTBOUND_PORT, "inbound_port": INBOUND_PORT,
        "hbone_port": HBONE_PORT}
    fields.update(overrides)
    return DatapathSettings(**fields)  # type: ignore[arg-type]


def stats(out_p: int = 0, out_b: int = 0, in_p: int = 0, in_b: int = 0,
          drops: dict[DropReason, int] | None = None) -> bytes:
    d = [0] * DROP_REASON_MAX
    for reason, n in (drops or {}).items():
        d[reason] = n
    return struct.pack(f"<{4 + DROP_REASON_MAX}Q", out_p, out_b, in_p, in_b, *d)


# -- addr_key ------------------------------------------------------------------

def test_addr_key_v4_layout() -> None:
    key = addr_key(POD_V4)
    assert len(key) == ADDR_KEY_SIZE
    assert key[:4] == struct.pack("<I", AF_INET)
    assert key[4:8] == bytes([10, 244, 1, 10])
    assert key[8:] == bytes(12)


def test_addr_key_v6_layout() -> None:
    key = addr_key(POD_V6)
    assert len(key) == ADDR_KEY_SIZE
    assert key[:4] == struct.pack("<I", AF_INET6)
    assert key[4:] == ipaddress.IPv6Address(POD_V6).packed


def test_addr_key_accepts_address_objects() -> None:
    assert addr_key(ipaddress.ip_address(POD_V4)) == addr_key(POD_V4)
    assert addr_key(ipaddress.ip_address(POD_V6)) == addr_key(POD_V6)


def test_addr_key_families_never_collide() -> None:
    """::a00:0 and 10.0.0.0 share address bytes only if the family is ignored."""
    assert addr_key("10.0.0.0") != addr_key("::a00:0")


def test_addr_key_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        addr_key("10.244.1.300")


@given(st.ip_addresses())
def test_addr_key_round_trips(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    key = addr_key(address)
    family = struct.unpack_from("<I", key)[0]
    size = 4 if family == AF_INET else 16
    assert family == (AF_INET if address.version == 4 else AF_INET6)
    assert ipaddress.ip_address(key[4:4 + size]) == address


# -- lpm_key -------------------------------------------------------------------

def test_lpm_key_v4_layout() -> None:
    key = lpm_key(POD_CIDR_V4)
    assert len(key) == LPM_KEY_SIZE
    assert struct.unpack_from("<I", key)[0] == 8 + 24
    assert key[4] == AF_INET
    assert key[5:9] == bytes([10, 244, 1, 0])
    assert key[9:] == bytes(12)


def test_lpm_key_v6_layout() -> None:
    key = lpm_key(POD_CIDR_V6)
    assert len(key) == LPM_KEY_SIZE
    assert struct.unpack_from("<I", key)[0] == 8 + 64
    assert key[4] == AF_INET6
    assert key[5:] == ipaddress.IPv6Network(POD_CIDR_V6).network_address.packed


def test_lpm_key_masks_host_bits() -> None:
    assert lpm_key("10.244.1.77/24") == lpm_key(POD_CIDR_V4)


def test_lpm_key_host_routes() -> None:
    assert struct.unpack_from("<I", lpm_key(POD_V4))[0] == 8 + 32
    assert struct.unpack_from("<I", lpm_key(POD_V6))[0] == 8 + 128


def test_lpm_key_default_routes_keep_the_family_bits() -> None:
    """0.0.0.0/0 matches only IPv4: the family byte is always inside the prefix."""
    v4, v6 = lpm_key("0.0.0.0/0"), lpm_key("::/0")
    assert struct.unpack_from("<I", v4)[0] == struct.unpack_from("<I", v6)[0] == 8
    assert (v4[4], v6[4]) == (AF_INET, AF_INET6)


# -- DatapathSettings.encode ---------------------------------------------------

def test_settings_layout() -> None:
    raw = settings().encode()
    assert len(raw) == CONFIG_SIZE
    assert struct.unpack_from("<IIII", raw, 0) == (
        CAPTURE_MARK, CAPTURE_MASK, TUNNEL_MARK, TUNNEL_IFINDEX)
    assert struct.unpack_from("<HHH", raw, 16) == (OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT)
    assert raw[22:28] == TUNNEL_MAC
    assert raw[28:32] == bytes(4)  # __u16 pad, then alignment padding to 32
    assert struct.unpack_from("<I", raw, 32) == (0,)  # redirect_mark defaults to off


def test_settings_redirect_mark_follows_the_padding() -> None:
    raw = settings(redirect_mark=0x5C0000).encode()
    assert struct.unpack_from("<I", raw, 32) == (0x5C0000,)


def test_settings_ports_are_host_order() -> None:
    """The C compares them against bpf_ntohs(port): little-endian host order here."""
    raw = settings(outbound_port=0x0102).encode()
    assert raw[16:18] == b"\x02\x01"


@pytest.mark.parametrize("mac", [b"", b"\x02\x00\x00\x00\x3a", TUNNEL_MAC + b"\x00"])
def test_settings_reject_a_mac_that_is_not_6_bytes(mac: bytes) -> None:
    with pytest.raises(ValueError, match="6 bytes"):
        settings(tunnel_mac=mac).encode()


# -- PodCounters.add -----------------------------------------------------------

def test_counters_sum_over_cpus() -> None:
    c = PodCounters()
    c.add(stats(1, 60, 2, 120, {DropReason.NO_LISTENER: 3}))
    c.add(stats(4, 240, 0, 0, {DropReason.NO_LISTENER: 1, DropReason.FRAGMENT: 2}))
    assert c == PodCounters(captured_out_packets=5, captured_out_bytes=300,
                            captured_in_packets=2, captured_in_bytes=120,
                            drops={DropReason.NO_LISTENER: 4, DropReason.FRAGMENT: 2})


def test_counters_leave_zero_drops_out() -> None:
    c = PodCounters()
    c.add(stats())
    assert c == PodCounters()
    assert c.drops == {}


def test_counters_read_every_drop_slot() -> None:
    c = PodCounters()
    c.add(stats(drops={r: int(r) + 1 for r in DropReason}))
    assert c.drops == {r: int(r) + 1 for r in DropReason}


def test_counters_accept_exactly_the_struct_size() -> None:
    assert len(stats()) == STATS_SIZE
    with pytest.raises(struct.error):
        PodCounters().add(bytes(STATS_SIZE - 8))


def test_counters_as_dict_uses_labels() -> None:
    c = PodCounters()
    c.add(stats(1, 2, 3, 4, {DropReason.SPOOFED_SOURCE: 5}))
    assert c.as_dict() == {
        "captured_out_packets": 1, "captured_out_bytes": 2,
        "captured_in_packets": 3, "captured_in_bytes": 4,
        "drops": {"spoofed_source": 5}}


@given(st.lists(st.lists(st.integers(0, 2**40), min_size=4 + DROP_REASON_MAX,
                         max_size=4 + DROP_REASON_MAX), max_size=8))
def test_counters_add_is_a_sum(per_cpu: list[list[int]]) -> None:
    c = PodCounters()
    for values in per_cpu:
        c.add(struct.pack(f"<{4 + DROP_REASON_MAX}Q", *values))
    totals = [sum(col) for col in zip(*per_cpu, strict=True)] if per_cpu else [0] * (
        4 + DROP_REASON_MAX)
    assert [c.captured_out_packets, c.captured_out_bytes, c.captured_in_packets,
            c.captured_in_bytes] == totals[:4]
    assert c.drops == {r: totals[4 + r] for r in DropReason if totals[4 + r]}


def test_node_address_limit_mirrors_the_c_header() -> None:
    import re
    from pathlib import Path

    from agent.datapath.maps import MAX_NODE_ADDRS

    header = (Path(__file__).resolve().parents[2] / "bpf" / "lib" / "common.h").read_text()
    match = re.search(r"#define MA_MAX_NODE_ADDRS (\d+)", header)
    assert match is not None
    assert int(match.group(1)) == MAX_NODE_ADDRS
