"""Fill a running agent's BPF maps with extra (fake) pods, without bpftool.

The maps belong to the agent process. We find them through
``/proc/<agent pid>/fdinfo/*`` (``map_id``), open them by id
(``BPF_MAP_GET_FD_BY_ID``), read their name and sizes
(``BPF_OBJ_GET_INFO_BY_FD``) and write entries with ``BPF_MAP_UPDATE_ELEM``:
the same entries enrollment writes (``ma_pods[ifindex]`` and
``ma_pod_addrs[address] = ifindex``), for interfaces that do not exist. That is
exactly the state 10,000 enrolled pods leave in the maps the per-packet
programs read; their tc filters would sit on their own veths and cost other
pods nothing. Raw ``bpf(2)`` through ctypes; x86-64 and arm64 syscall numbers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.datapath.maps import addr_key

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_ANY = 0
FAKE_IFINDEX_BASE = 3_000_000
FAKE_NET = ipaddress.IPv4Network("10.250.0.0/16")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class _Attr(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_uint8 * 128)]


class _MapInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16), ("pad", ctypes.c_uint8 * 64)]


def _bpf(cmd: int, attr: bytes) -> int:
    buf = _Attr()
    ctypes.memmove(buf.buf, attr, len(attr))
    ret = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(buf), ctypes.sizeof(buf))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return int(ret)


def _u32(*vals: int) -> bytes:
    return b"".join(v.to_bytes(4, "little") for v in vals)


def _u64(v: int) -> bytes:
    return v.to_bytes(8, "little")


class BpfMap:
    """An fd on someone else's map plus its name and key/value sizes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        info = _MapInfo()
        _bpf(BPF_OBJ_GET_INFO_BY_FD,
             _u32(fd, ctypes.sizeof(info)) + _u64(ctypes.addressof(info)))
        self.name = info.name.decode(errors="replace")
        self.key_size = info.key_size
        self.value_size = info.value_size
        self.max_entries = info.max_entries

    def update(self, key: bytes, value: bytes) -> None:
        k = ctypes.create_string_buffer(key, self.key_size)
        v = ctypes.create_string_buffer(value, self.value_size)
        _bpf(BPF_MAP_UPDATE_ELEM, _u32(self.fd, 0) + _u64(ctypes.addressof(k))
             + _u64(ctypes.addressof(v)) + _u64(BPF_ANY))

    def delete(self, key: bytes) -> None:
        k = ctypes.create_string_buffer(key, self.key_size)
        try:
            _bpf(BPF_MAP_DELETE_ELEM, _u32(self.fd, 0) + _u64(ctypes.addressof(k)))
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != 2:
                raise

    def close(self) -> None:
        os.close(self.fd)


def map_ids(pid: int) -> set[int]:
    ids: set[int] = set()
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = info.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("map_id:"):
                ids.add(int(line.split()[1]))
    return ids


@contextmanager
def agent_maps(pid: int, names: tuple[str, ...]) -> Iterator[dict[str, BpfMap]]:
    """The agent's maps called ``names`` (bcc truncates names to 15 chars)."""
    found: dict[str, BpfMap] = {}
    try:
        for map_id in sorted(map_ids(pid)):
            try:
                m = BpfMap(_bpf(BPF_MAP_GET_FD_BY_ID, _u32(map_id, 0, 0)))
            except OSError:
                continue
            if m.name in names and m.name not in found:
                found[m.name] = m
            else:
                m.close()
        missing = set(names) - set(found)
        if missing:
            raise RuntimeError(f"agent pid {pid} has no BPF map(s) {sorted(missing)}")
        yield found
    finally:
        for m in found.values():
            m.close()


def fake_pod(i: int) -> tuple[int, str]:
    """ifindex and IPv4 address of fake pod number ``i`` (0-based)."""
    return FAKE_IFINDEX_BASE + i, str(FAKE_NET.network_address + 1 + i)


def add_fake_pods(pid: int, count: int) -> float:
    """Write ``count`` fake pods into the agent's maps; return seconds taken."""
    with agent_maps(pid, ("ma_pods", "ma_pod_addrs")) as maps:
        t0 = time.perf_counter()
        pods, addrs = maps["ma_pods"], maps["ma_pod_addrs"]
        for i in range(count):
            ifindex, ip = fake_pod(i)
            addrs.update(addr_key(ip), ifindex.to_bytes(4, "little"))
            pods.update(ifindex.to_bytes(4, "little"), b"")
        return time.perf_counter() - t0


def remove_fake_pods(pid: int, count: int) -> None:
    with agent_maps(pid, ("ma_pods", "ma_pod_addrs")) as maps:
        for i in range(count):
            ifindex, ip = fake_pod(i)
            maps["ma_pods"].delete(ifindex.to_bytes(4, "little"))
            maps["ma_pod_addrs"].delete(addr_key(ip))


def count_entries(pid: int, name: str) -> int:
    """Entries in the agent's map ``name`` (walks keys with GET_NEXT_KEY)."""
    with agent_maps(pid, (name,)) as maps:
        m = maps[name]
        key = ctypes.create_string_buffer(m.key_size)
        nxt = ctypes.create_string_buffer(m.key_size)
        n = 0
        first = True
        for _ in range(m.max_entries + 1):
            try:
                _bpf(4, _u32(m.fd, 0) + _u64(0 if first else ctypes.addressof(key))
                     + _u64(ctypes.addressof(nxt)))
            except OSError:
                break
            first = False
            ctypes.memmove(key, nxt, m.key_size)
            n += 1
        return n
