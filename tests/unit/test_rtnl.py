"""The minimal rtnetlink reader's encoders and parsers (pure, no kernel)."""

from __future__ import annotations

import socket
import struct

from hypothesis import given
from hypothesis import strategies as st

from agent.netns import rtnl

POD_IFINDEX = 2
PEER_IFINDEX = 17
POD_V4 = "10.244.1.10"
POD_V6 = "fd00:10:244:1::10"


def rtattr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((-length) % 4)


def newlink(index: int, name: str, kind: str | None, link: int | None) -> bytes:
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 1, index, 0, 0)
    body += rtattr(rtnl.IFLA_IFNAME, name.encode() + b"\0")
    body += rtattr(rtnl.IFLA_ADDRESS, bytes.fromhex("0a1b2c3d4e5f"))
    if link is not None:
        body += rtattr(rtnl.IFLA_LINK, struct.pack("=i", link))
    if kind is not None:
        body += rtattr(rtnl.IFLA_LINKINFO, rtattr(rtnl.IFLA_INFO_KIND, kind.encode() + b"\0"))
    return body


def newaddr(index: int, address: str, scope: int = 0) -> bytes:
    packed = socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    body = struct.pack("=BBBBI", family, 32, 0, scope, index)
    return body + rtattr(rtnl.IFA_ADDRESS, packed)


def test_parse_veth_link() -> None:
    link = rtnl.parse_link(newlink(POD_IFINDEX, "eth0", "veth", PEER_IFINDEX))
    assert link == rtnl.Link(index=POD_IFINDEX, name="eth0", kind="veth", link=PEER_IFINDEX,
                             mac="0a:1b:2c:3d:4e:5f")


def test_parse_link_without_kind() -> None:
    link = rtnl.parse_link(newlink(1, "lo", None, None))
    assert link.kind is None and link.link is None


def test_parse_addresses() -> None:
    assert rtnl.parse_address(newaddr(POD_IFINDEX, POD_V4)) == (POD_IFINDEX, 0, POD_V4)
    assert rtnl.parse_address(newaddr(POD_IFINDEX, POD_V6, 253)) == (POD_IFINDEX, 253, POD_V6)


def test_requests_are_well_formed() -> None:
    req = rtnl.get_link_request(7, name="eth0")
    length, msg_type, flags, seq, _pid = struct.unpack_from("=IHHII", req)
    assert (length, msg_type, flags, seq) == (len(req), rtnl.RTM_GETLINK,
                                              rtnl.NLM_F_REQUEST | rtnl.NLM_F_ACK, 7)
    attrs = dict(rtnl.attributes(req, 16 + 16))
    assert attrs[rtnl.IFLA_IFNAME] == b"eth0\0"
    dump = rtnl.dump_addresses_request(8)
    assert struct.unpack_from("=IHH", dump)[1:] == (rtnl.RTM_GETADDR,
                                                    rtnl.NLM_F_REQUEST | rtnl.NLM_F_DUMP)


def test_messages_split_a_datagram() -> None:
    one = newlink(POD_IFINDEX, "eth0", "veth", PEER_IFINDEX)
    data = b""
    for body in (one, one):
        data += struct.pack("=IHHII", 16 + len(body), rtnl.RTM_NEWLINK, 0, 1, 0) + body
    assert [t for t, _seq, _ in rtnl.messages(data)] == [rtnl.RTM_NEWLINK, rtnl.RTM_NEWLINK]


@given(st.binary(max_size=200))
def test_attribute_walk_never_overruns(data: bytes) -> None:
    for _kind, payload in rtnl.attributes(data):
        assert len(payload) <= len(data)
    list(rtnl.messages(data))


def test_tc_requests_are_well_formed() -> None:
    req = rtnl.replace_bpf_filter_request(3, index=9, parent=0xFFFFFFF2, prio=0x3A,
                                          handle=0xA11, fd=42, name="meshagent-from_pod")
    _len, msg_type, flags, _seq, _pid = struct.unpack_from("=IHHII", req)
    assert msg_type == rtnl.RTM_NEWTFILTER
    assert flags & rtnl.NLM_F_CREATE and flags & rtnl.NLM_F_REPLACE
    assert not flags & rtnl.NLM_F_EXCL
    _family, index, handle, parent, info = struct.unpack_from("=BxxxiIII", req, 16)
    assert (index, handle, parent) == (9, 0xA11, 0xFFFFFFF2)
    assert info >> 16 == 0x3A
    attrs = dict(rtnl.attributes(req, 16 + 20))
    assert attrs[rtnl.TCA_KIND] == b"bpf\0"
    options = dict(rtnl.attributes(attrs[rtnl.TCA_OPTIONS]))
    assert struct.unpack("=I", options[rtnl.TCA_BPF_FD])[0] == 42
    assert struct.unpack("=I", options[rtnl.TCA_BPF_FLAGS])[0] == rtnl.TCA_BPF_FLAG_ACT_DIRECT
    clsact = rtnl.add_clsact_request(4, 9)
    assert struct.unpack_from("=IHH", clsact)[2] & rtnl.NLM_F_EXCL


def test_parse_link_reads_the_master() -> None:
    """A bridge port's IFLA_MASTER: the agent flags such pods (MA_POD_F_BRIDGED)."""
    body = newlink(PEER_IFINDEX, "veth1", "veth", POD_IFINDEX)
    body += rtattr(rtnl.IFLA_MASTER, struct.pack("=i", 9))
    assert rtnl.parse_link(body).master == 9
    assert rtnl.parse_link(newlink(PEER_IFINDEX, "veth1", "veth", POD_IFINDEX)).master is None


def tfilter(prio: int, handle: int, kind: str, options: bytes | None) -> bytes:
    body = struct.pack("=BxxxiIII", socket.AF_UNSPEC, PEER_IFINDEX, handle, 0xFFFFFFF2,
                       (prio << 16) | 0x0300)
    body += rtattr(rtnl.TCA_KIND, kind.encode() + b"\0")
    if options is not None:
        body += rtattr(rtnl.TCA_OPTIONS, options)
    return body


def test_parse_filter() -> None:
    da = (rtattr(rtnl.TCA_BPF_NAME, b"foreign\0")
          + rtattr(rtnl.TCA_BPF_FLAGS, struct.pack("=I", rtnl.TCA_BPF_FLAG_ACT_DIRECT)))
    assert rtnl.parse_filter(tfilter(10, 1, "bpf", da)) == rtnl.FilterInfo(
        prio=10, handle=1, kind="bpf", name="foreign", direct_action=True)
    u32 = rtnl.parse_filter(tfilter(5, 0x800, "u32", rtattr(1, b"\0" * 4)))
    assert u32 is not None and (u32.prio, u32.kind, u32.direct_action) == (5, "u32", False)
    # the per-priority chain header (handle 0, no options) is not a filter
    assert rtnl.parse_filter(tfilter(10, 0, "bpf", None)) is None
    req = rtnl.dump_filters_request(3, PEER_IFINDEX, 0xFFFFFFF2)
    assert struct.unpack_from("=IHHII", req)[1] == rtnl.RTM_GETTFILTER
