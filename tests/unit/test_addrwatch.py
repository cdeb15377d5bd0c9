"""agent/netns/addrwatch.py: what an address event means for the node-address map.

``classify`` is pure and tested on hand-built rtnetlink messages; the
privileged test subscribes for real inside a private netns.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from agent.netns import addrwatch, rtnl

IFA_ADDRESS = 1
IFA_LOCAL = 2
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253


def address_message(msg_type: int, address: str, *, index: int = 2,
                    scope: int = RT_SCOPE_UNIVERSE) -> bytes:
    ip = ipaddress.ip_address(address)
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    body = struct.pack("=BBBBI", family, ip.max_prefixlen, 0, scope, index)
    attr = ip.packed
    attr_kind = IFA_LOCAL if ip.version == 4 else IFA_ADDRESS
    body += struct.pack("=HH", 4 + len(attr), attr_kind) + attr
    body += b"\0" * (-len(body) % 4)
    return struct.pack("=IHHII", 16 + len(body), msg_type, 0, 0, 0) + body


def test_a_new_address_is_added() -> None:
    changes = addrwatch.classify([address_message(rtnl.RTM_NEWADDR, "198.51.100.7")])
    assert changes.added == {"198.51.100.7"} and not changes.resync


def test_several_messages_in_one_datagram_are_all_read() -> None:
    data = (address_message(rtnl.RTM_NEWADDR, "198.51.100.7")
            + address_message(rtnl.RTM_NEWADDR, "2001:db8::7"))
    assert addrwatch.classify([data]).added == {"198.51.100.7", "2001:db8::7"}


def test_a_removed_address_asks_for_a_full_reread() -> None:
    """The same address may sit on another link (ptp's gateway on every veth)."""
    changes = addrwatch.classify([address_message(addrwatch.RTM_DELADDR, "10.244.1.1")])
    assert changes.resync and not changes.added


@pytest.mark.parametrize("address", ["127.0.0.2", "::1", "fe80::1"])
def test_addresses_that_are_never_probe_sources_are_ignored(address: str) -> None:
    scope = RT_SCOPE_LINK if address.startswith("fe80") else RT_SCOPE_UNIVERSE
    for kind in (rtnl.RTM_NEWADDR, addrwatch.RTM_DELADDR):
        assert not addrwatch.classify([address_message(kind, address, scope=scope)])


def test_other_messages_and_garbage_change_nothing() -> None:
    assert not addrwatch.classify([b"", b"\x01\x02", struct.pack("=IHHII", 16, 16, 0, 0, 0)])


def test_a_truncated_address_message_asks_for_a_full_reread() -> None:
    msg = struct.pack("=IHHII", 20, rtnl.RTM_NEWADDR, 0, 0, 0) + b"\x02\x20\x00\x00"
    assert addrwatch.classify([msg]).resync


# -- for real, in a private netns ------------------------------------------------

@contextlib.contextmanager
def private_netns() -> Iterator[str]:
    from pyroute2 import netns

    name = f"ma-aw-{secrets.token_hex(3)}"
    netns.create(name)
    try:
        netns.pushns(name)
        try:
            yield name
        finally:
            netns.popns()
    finally:
        with contextlib.suppress(FileNotFoundError):
            netns.remove(name)


def _read_until(watch: addrwatch.AddressWatch, want: str) -> addrwatch.AddressChanges:
    seen = addrwatch.AddressChanges()
    deadline = time.monotonic() + 5
    for _ in range(100):
        got = watch.read()
        seen.added |= got.added
        seen.resync = seen.resync or got.resync
        if (want == "resync" and seen.resync) or want in seen.added:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return seen


@pytest.mark.privileged
def test_watch_sees_addresses_come_and_go_in_its_netns() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    from pyroute2 import IPRoute

    with private_netns():
        watch = addrwatch.AddressWatch()
        try:
            with IPRoute() as ipr:
                lo = ipr.link_lookup(ifname="lo")[0]
                ipr.link("set", index=lo, state="up")
                ipr.addr("add", index=lo, address="198.51.100.7", prefixlen=32)
                assert "198.51.100.7" in _read_until(watch, "198.51.100.7").added
                ipr.addr("add", index=lo, address="2001:db8::7", prefixlen=128, flags=0x02)
                assert "2001:db8::7" in _read_until(watch, "2001:db8::7").added
                ipr.addr("del", index=lo, address="198.51.100.7", prefixlen=32)
                assert _read_until(watch, "resync").resync
        finally:
            watch.close()


def link_message(index: int, master: int | None) -> bytes:
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 1, index, 0, 0)
    name = b"veth9\0"
    body += struct.pack("=HH", 4 + len(name), rtnl.IFLA_IFNAME) + name + b"\0" * (-len(name) % 4)
    if master is not None:
        body += struct.pack("=HHi", 8, rtnl.IFLA_MASTER, master)
    return struct.pack("=IHHII", 16 + len(body), rtnl.RTM_NEWLINK, 0, 0, 0) + body


def test_link_messages_report_each_links_master() -> None:
    changes = addrwatch.classify([link_message(7, 3) + link_message(8, None)])
    assert changes.links == {7: 3, 8: None} and changes and not changes.added


@pytest.mark.privileged
def test_watch_sees_a_veth_join_and_leave_a_bridge() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    from pyroute2 import IPRoute

    with private_netns():
        watch = addrwatch.AddressWatch()
        try:
            with IPRoute() as ipr:
                ipr.link("add", ifname="br9", kind="bridge")
                ipr.link("add", ifname="v9a", kind="veth", peer="v9b")
                br, veth = ipr.link_lookup(ifname="br9")[0], ipr.link_lookup(ifname="v9a")[0]

                def master_seen(want: int | None) -> bool:
                    deadline = time.monotonic() + 5
                    for _ in range(100):
                        links = watch.read().links
                        if veth in links and links[veth] == want:
                            return True
                        if time.monotonic() > deadline:
                            return False
                        time.sleep(0.02)
                    return False

                ipr.link("set", index=veth, master=br)
                assert master_seen(br)
                ipr.link("set", index=veth, master=0)
                assert master_seen(None)
        finally:
            watch.close()
