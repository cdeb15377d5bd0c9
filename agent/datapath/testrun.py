"""Run a loaded BPF program on one packet with BPF_PROG_TEST_RUN.

bcc 0.26 has no wrapper for it, so this calls libbpf's
``bpf_prog_test_run_opts`` through ctypes. The packet runs in the network
namespace of the calling thread; ``ifindex`` selects the device the program
sees as ``skb->ifindex`` (it must exist in that namespace).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

TC_ACT_OK = 0
# TC_ACT_UNSPEC (-1) as the u32 the kernel reports in retval.
TC_ACT_UNSPEC = 0xFFFFFFFF
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7


class _TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class SkBuffCtx(ctypes.Structure):
    """struct __sk_buff (uapi), as far as hwtstamp; only settable fields are used."""

    _fields_ = [
        ("len", ctypes.c_uint32), ("pkt_type", ctypes.c_uint32), ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32), ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32), ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32), ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32), ("ifindex", ctypes.c_uint32),
        ("tc_index", ctypes.c_uint32), ("cb", ctypes.c_uint32 * 5), ("hash", ctypes.c_uint32),
        ("tc_classid", ctypes.c_uint32), ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32), ("napi_id", ctypes.c_uint32),
        ("family", ctypes.c_uint32), ("remote_ip4", ctypes.c_uint32),
        ("local_ip4", ctypes.c_uint32), ("remote_ip6", ctypes.c_uint32 * 4),
        ("local_ip6", ctypes.c_uint32 * 4), ("remote_port", ctypes.c_uint32),
        ("local_port", ctypes.c_uint32), ("data_meta", ctypes.c_uint32),
        ("flow_keys", ctypes.c_uint64), ("tstamp", ctypes.c_uint64),
        ("wire_len", ctypes.c_uint32), ("gso_segs", ctypes.c_uint32),
        ("sk", ctypes.c_uint64), ("gso_size", ctypes.c_uint32),
        ("tstamp_type", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3),
        ("hwtstamp", ctypes.c_uint64),
    ]


@dataclass(frozen=True)
class RunResult:
    retval: int
    data: bytes
    mark: int


_libbpf: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libbpf
    if _libbpf is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        lib = ctypes.CDLL(name, use_errno=True)
        lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.POINTER(_TestRunOpts)]
        lib.bpf_prog_test_run_opts.restype = ctypes.c_int
        _libbpf = lib
    return _libbpf


def run(prog_fd: int, packet: bytes, *, ifindex: int = 0, mark: int = 0) -> RunResult:
    """Run the program once on ``packet`` (an Ethernet frame) and return its verdict."""
    data_in = ctypes.create_string_buffer(packet, len(packet))
    out_size = max(len(packet) + 256, 2048)
    data_out = ctypes.create_string_buffer(out_size)
    ctx_in = SkBuffCtx(mark=mark, ifindex=ifindex)
    ctx_out = SkBuffCtx()
    opts = _TestRunOpts(
        sz=ctypes.sizeof(_TestRunOpts),
        data_in=ctypes.cast(data_in, ctypes.c_void_p),
        data_out=ctypes.cast(data_out, ctypes.c_void_p),
        data_size_in=len(packet), data_size_out=out_size,
        ctx_in=ctypes.cast(ctypes.pointer(ctx_in), ctypes.c_void_p),
        ctx_out=ctypes.cast(ctypes.pointer(ctx_out), ctypes.c_void_p),
        ctx_size_in=ctypes.sizeof(SkBuffCtx), ctx_size_out=ctypes.sizeof(SkBuffCtx),
        repeat=1,
    )
    rc = _lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    if rc != 0:
        err = ctypes.get_errno() or -rc
        raise OSError(err, f"BPF_PROG_TEST_RUN failed: {os.strerror(err)}")
    return RunResult(retval=opts.retval, data=data_out.raw[: opts.data_size_out],
                     mark=ctx_out.mark)
