"""A minimal rtnetlink reader for the enrollment hot path.

Enrolling a pod needs four facts: the pod interface's ifindex, that it is a
veth, its peer's ifindex, and its addresses (plus the peer's name and MAC on
the node side). pyroute2 decodes every attribute of every message in Python,
which made these reads most of an enrollment's latency. This module asks the
kernel for exactly one link (by name or index) or one dump of addresses, and
picks the few attributes it needs out of the bytes with ``struct``.

The encoders and parsers are pure functions over bytes; ``RtnlSocket`` is the
only part that does I/O.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_ROUTE = 0
RECV_TIMEOUT_S = 5.0
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_ECHO = 0x8
NLM_F_DUMP = 0x300
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_GETADDR = 22
RTM_NEWQDISC = 36
RTM_DELQDISC = 37
RTM_GETQDISC = 38
RTM_NEWTFILTER = 44
RTM_DELTFILTER = 45
RTM_GETTFILTER = 46
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
TCA_KIND = 1
TCA_OPTIONS = 2
TCA_BPF_CLASSID = 3
TCA_BPF_FD = 6
TCA_BPF_NAME = 7
TCA_BPF_FLAGS = 8
TCA_BPF_FLAG_ACT_DIRECT = 1
TC_H_CLSACT = 0xFFFFFFF1
CLSACT_HANDLE = 0xFFFF0000
ETH_P_ALL = 0x0003
NETLINK_GET_STRICT_CHK = 12
SOL_NETLINK = 270

IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_LINK = 5
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1
IFA_ADDRESS = 1
IFA_LOCAL = 2

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_TCMSG = struct.Struct("=BxxxiIII")
_RTATTR = struct.Struct("=HH")
_ERRNO = struct.Struct("=i")


class RtnlError(OSError):
    """The kernel answered a request with an error."""


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str | None
    link: int | None  # IFLA_LINK: for a veth, the peer's ifindex (in the peer's netns)
    mac: str | None
    master: int | None = None  # IFLA_MASTER: the bridge (or bond, ...) it is a port of


def _align(n: int) -> int:
    return (n + 3) & ~3


def attributes(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each rtattr in ``data[offset:]``; malformed tails end the walk."""
    end = len(data)
    while offset + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > end:
            return
        yield kind & 0x3FFF, data[offset + _RTATTR.size: offset + length]
        offset += _align(length)


def _attr(kind: int, payload: bytes) -> bytes:
    length = _RTATTR.size + len(payload)
    return _RTATTR.pack(length, kind) + payload + b"\0" * (_align(length) - length)


def _message(msg_type: int, flags: int, seq: int, body: bytes) -> bytes:
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


def get_link_request(seq: int, *, index: int = 0, name: str | None = None) -> bytes:
    """RTM_GETLINK for one link, by index or (index 0) by name."""
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)
    if name is not None:
        body += _attr(IFLA_IFNAME, name.encode() + b"\0")
    return _message(RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK, seq, body)


def dump_addresses_request(seq: int, index: int = 0) -> bytes:
    body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, index)
    return _message(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, body)


def add_clsact_request(seq: int, index: int) -> bytes:
    """RTM_NEWQDISC clsact, failing with EEXIST rather than replacing anything."""
    body = _TCMSG.pack(socket.AF_UNSPEC, index, CLSACT_HANDLE, TC_H_CLSACT, 0)
    body += _attr(TCA_KIND, b"clsact\0")
    return _message(RTM_NEWQDISC, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                    seq, body)


def _filter_info(prio: int) -> int:
    return (prio << 16) | socket.htons(ETH_P_ALL)


def replace_bpf_filter_request(seq: int, *, index: int, parent: int, prio: int, handle: int,
                               fd: int, name: str) -> bytes:
    """RTM_NEWTFILTER for a direct-action cls_bpf filter, created or replaced in place
    (``tc filter replace ... bpf da fd FD``): the kernel swaps the program atomically."""
    options = (_attr(TCA_BPF_FD, struct.pack("=I", fd))
               + _attr(TCA_BPF_NAME, name.encode() + b"\0")
               + _attr(TCA_BPF_FLAGS, struct.pack("=I", TCA_BPF_FLAG_ACT_DIRECT))
               + _attr(TCA_BPF_CLASSID, struct.pack("=I", 1)))
    body = _TCMSG.pack(socket.AF_UNSPEC, index, handle, parent, _filter_info(prio))
    body += _attr(TCA_KIND, b"bpf\0") + _attr(TCA_OPTIONS, options)
    return _message(RTM_NEWTFILTER, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
                    seq, body)


def dump_filters_request(seq: int, index: int, parent: int) -> bytes:
    """RTM_GETTFILTER dump of the filters on one device's clsact slot ``parent``."""
    body = _TCMSG.pack(socket.AF_UNSPEC, index, 0, parent, 0)
    return _message(RTM_GETTFILTER, NLM_F_REQUEST | NLM_F_DUMP, seq, body)


@dataclass(frozen=True)
class FilterInfo:
    prio: int
    handle: int
    kind: str | None
    name: str  # TCA_BPF_NAME for cls_bpf, else ""
    direct_action: bool  # cls_bpf in direct-action mode: the program's verdict is final


def parse_filter(payload: bytes) -> FilterInfo | None:
    """One RTM_NEWTFILTER answer; None for the per-priority chain header."""
    _family, _index, handle, _parent, info = _TCMSG.unpack_from(payload)
    kind, name, flags, has_options = None, "", 0, False
    for kind_id, value in attributes(payload, _TCMSG.size):
        if kind_id == TCA_KIND:
            kind = value.rstrip(b"\0").decode(errors="replace")
        elif kind_id == TCA_OPTIONS:
            has_options = True
            for opt_id, opt in attributes(value):
                if opt_id == TCA_BPF_NAME:
                    name = opt.rstrip(b"\0").decode(errors="replace")
                elif opt_id == TCA_BPF_FLAGS and len(opt) >= 4:
                    flags = struct.unpack_from("=I", opt)[0]
    if handle == 0 and not has_options:
        return None
    return FilterInfo(prio=(info >> 16) & 0xFFFF, handle=handle, kind=kind, name=name,
                      direct_action=kind == "bpf" and bool(flags & TCA_BPF_FLAG_ACT_DIRECT))


def get_ingress_qdisc_request(seq: int, index: int) -> bytes:
    """RTM_GETQDISC for the one qdisc in a device's ingress slot (clsact or ingress)."""
    body = _TCMSG.pack(socket.AF_UNSPEC, index, 0, TC_H_CLSACT, 0)
    # tc answers a GET as a notification: without ECHO it goes only to the
    # multicast group, never back to the asking socket.
    # ACK too: for an empty slot the kernel answers nothing else at all.
    return _message(RTM_GETQDISC, NLM_F_REQUEST | NLM_F_ECHO | NLM_F_ACK, seq, body)


def dump_qdiscs_request(seq: int, index: int) -> bytes:
    body = _TCMSG.pack(socket.AF_UNSPEC, index, 0, 0, 0)
    return _message(RTM_GETQDISC, NLM_F_REQUEST | NLM_F_DUMP, seq, body)


def parse_qdisc(payload: bytes) -> tuple[int, str | None]:
    """(ifindex, kind) of an RTM_NEWQDISC payload."""
    _family, index, _handle, _parent, _info = _TCMSG.unpack_from(payload)
    for kind_id, value in attributes(payload, _TCMSG.size):
        if kind_id == TCA_KIND:
            return index, value.rstrip(b"\0").decode(errors="replace")
    return index, None


def messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, sequence number, payload) of each netlink message in one datagram."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            return
        yield msg_type, seq, data[offset + _NLMSGHDR.size: offset + length]
        offset += _align(length)


def parse_link(payload: bytes) -> Link:
    _family, _type, index, _flags, _change = _IFINFOMSG.unpack_from(payload)
    name, kind, link, mac, master = "", None, None, None, None
    for kind_id, value in attributes(payload, _IFINFOMSG.size):
        if kind_id == IFLA_IFNAME:
            name = value.rstrip(b"\0").decode(errors="replace")
        elif kind_id == IFLA_LINK and len(value) >= 4:
            link = struct.unpack_from("=i", value)[0]
        elif kind_id == IFLA_ADDRESS:
            mac = ":".join(f"{b:02x}" for b in value)
        elif kind_id == IFLA_MASTER and len(value) >= 4:
            master = struct.unpack_from("=i", value)[0] or None
        elif kind_id == IFLA_LINKINFO:
            for info_id, info in attributes(value):
                if info_id == IFLA_INFO_KIND:
                    kind = info.rstrip(b"\0").decode(errors="replace")
    return Link(index=index, name=name, kind=kind, link=link, mac=mac, master=master)


def parse_address(payload: bytes) -> tuple[int, int, str] | None:
    """(ifindex, scope, address) of an RTM_NEWADDR payload; IFA_LOCAL wins over IFA_ADDRESS."""
    family, _prefixlen, _flags, scope, index = _IFADDRMSG.unpack_from(payload)
    found: dict[int, bytes] = {}
    for kind_id, value in attributes(payload, _IFADDRMSG.size):
        if kind_id in (IFA_ADDRESS, IFA_LOCAL):
            found[kind_id] = value
    raw = found.get(IFA_LOCAL) or found.get(IFA_ADDRESS)
    if raw is None or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return index, scope, str(ipaddress.ip_address(raw))


class RtnlSocket:
    """One rtnetlink socket, bound to the netns of the thread that opened it."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   NETLINK_ROUTE)
        self._sock.bind((0, 0))
        # Dumps honour the ifindex in the request instead of listing every
        # interface's objects (kernel >= 4.20).
        self._sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        # A request the kernel never answers must fail, not hang the agent.
        self._sock.settimeout(RECV_TIMEOUT_S)
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RtnlSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, build: bytes) -> Iterator[tuple[int, bytes]]:
        """Send one request and yield its answers until DONE or ACK.

        Consume the generator fully (or use ``_collect``): leaving early would
        leave the rest of the answer queued on the socket. Messages of other
        sequence numbers (late answers to an abandoned request) are skipped.
        """
        seq = _NLMSGHDR.unpack_from(build)[3]
        self._sock.send(build)
        while True:
            data = self._sock.recv(1 << 16)
            for msg_type, msg_seq, payload in messages(data):
                if msg_seq != seq:
                    continue
                if msg_type == NLMSG_DONE:
                    return
                if msg_type == NLMSG_ERROR:
                    code = -_ERRNO.unpack_from(payload)[0]
                    if code:
                        raise RtnlError(code, os.strerror(code))
                    return
                yield msg_type, payload

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _collect(self, build: bytes) -> list[tuple[int, bytes]]:
        return list(self._request(build))

    def link(self, *, index: int = 0, name: str | None = None) -> Link | None:
        """One link by index or name, or None if there is no such link."""
        request = get_link_request(self._next_seq(), index=index, name=name)
        try:
            answers = self._collect(request)
        except RtnlError as exc:
            if exc.errno in (errno.ENODEV, errno.EINVAL):
                return None
            raise
        for msg_type, payload in answers:
            if msg_type == RTM_NEWLINK:
                return parse_link(payload)
        return None

    def addresses(self, index: int | None = None) -> list[tuple[int, int, str]]:
        """(ifindex, scope, address) of every address, or of one link's."""
        out = []
        for msg_type, payload in self._request(
                dump_addresses_request(self._next_seq(), index or 0)):
            if msg_type != RTM_NEWADDR:
                continue
            parsed = parse_address(payload)
            if parsed is not None and (index is None or parsed[0] == index):
                out.append(parsed)
        return out

    def ingress_qdisc_kind(self, index: int) -> str | None:
        """Kind of the qdisc in the device's ingress slot ("clsact", "ingress"), or None.

        One request, not a dump: the kernel does not filter qdisc dumps by
        device, so a dump costs as much as the node has interfaces.
        """
        try:
            answers = self._collect(get_ingress_qdisc_request(self._next_seq(), index))
        except RtnlError as exc:
            if exc.errno in (errno.ENOENT, errno.EINVAL):
                return None
            raise
        for msg_type, payload in answers:
            if msg_type == RTM_NEWQDISC:
                return parse_qdisc(payload)[1]
        return None

    def qdisc_kinds(self, index: int) -> set[str]:
        """Kinds of the qdiscs on one device (e.g. {"noqueue", "clsact"})."""
        kinds = set()
        for msg_type, payload in self._request(dump_qdiscs_request(self._next_seq(), index)):
            if msg_type == RTM_NEWQDISC:
                qdisc_index, kind = parse_qdisc(payload)
                if qdisc_index == index and kind:
                    kinds.add(kind)
        return kinds

    def filters(self, index: int, parent: int) -> list[FilterInfo]:
        """The filters in one clsact slot of a device (empty when it has no clsact)."""
        try:
            answers = self._collect(dump_filters_request(self._next_seq(), index, parent))
        except RtnlError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
                return []
            raise
        out = []
        for msg_type, payload in answers:
            if msg_type == RTM_NEWTFILTER:
                parsed = parse_filter(payload)
                if parsed is not None:
                    out.append(parsed)
        return out

    def _ack(self, request: bytes) -> None:
        for _ in self._request(request):
            pass

    def add_clsact(self, index: int) -> bool:
        """Add a clsact qdisc; False if one (or an ingress qdisc) is already there."""
        try:
            self._ack(add_clsact_request(self._next_seq(), index))
        except RtnlError as exc:
            if exc.errno == errno.EEXIST:
                return False
            raise
        return True

    def replace_bpf_filter(self, *, index: int, parent: int, prio: int, handle: int, fd: int,
                           name: str) -> None:
        """Install or atomically replace a direct-action cls_bpf filter."""
        self._ack(replace_bpf_filter_request(self._next_seq(), index=index, parent=parent,
                                             prio=prio, handle=handle, fd=fd, name=name))
