"""Follow the node's addresses over rtnetlink, so the node-address map follows the node.

The datapath lets traffic from the node's own addresses reach pods directly
(kubelet probes). An address or bridge that appears after the agent started
(a CNI creating its bridge with the first pod, a new uplink address) must be
in that set at once, or a probe from it is captured and, in strict mode,
refused. ``AddressWatch`` subscribes to RTNLGRP_IPV4_IFADDR and
RTNLGRP_IPV6_IFADDR; :func:`classify` (pure) turns what it read into the
change to apply:

- a new probe-source address (not loopback, not IPv6 link-local: see
  :func:`agent.netns.veth.node_addresses`) is added to the map right away;
- a removed one needs a full re-read (``resync``): the same address can sit
  on several links (ptp puts the pod gateway on every host veth), so one
  RTM_DELADDR does not mean the node lost it;
- a lost event (ENOBUFS: the socket overflowed) also means ``resync``.

The same socket follows links (RTNLGRP_LINK): ``links`` maps an ifindex to
its master (or None) for every RTM_NEWLINK, so the agent can re-flag an
enrolled pod whose host veth joined or left a bridge after enrollment
(``MA_POD_F_BRIDGED``, bpf/lib/common.h).

The socket is opened before the agent reads the addresses the first time, so
nothing that changes in between is missed.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.netns import rtnl

RTM_DELADDR = 21
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
RECV_BUFFER = 1 << 20
MAX_DATAGRAMS_PER_READ = 256  # one read drains at most this many, then yields


@dataclass
class AddressChanges:
    added: set[str] = field(default_factory=set)
    resync: bool = False
    links: dict[int, int | None] = field(default_factory=dict)  # ifindex -> master

    def __bool__(self) -> bool:
        return bool(self.added) or self.resync or bool(self.links)


def is_probe_source(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not ip.is_loopback and not (ip.version == 6 and ip.is_link_local)


def classify(datagrams: Iterable[bytes]) -> AddressChanges:
    """What to do about the address events in ``datagrams`` (pure)."""
    changes = AddressChanges()
    for data in datagrams:
        for msg_type, _seq, payload in rtnl.messages(data):
            if msg_type == rtnl.RTM_NEWLINK:
                try:
                    link = rtnl.parse_link(payload)
                except (struct.error, ValueError, IndexError):
                    continue
                changes.links[link.index] = link.master
                continue
            if msg_type not in (rtnl.RTM_NEWADDR, RTM_DELADDR):
                continue
            try:
                parsed = rtnl.parse_address(payload)
            except (struct.error, ValueError, IndexError):
                changes.resync = True  # cannot tell: read the truth
                continue
            if parsed is None or not is_probe_source(parsed[2]):
                continue
            if msg_type == rtnl.RTM_NEWADDR:
                changes.added.add(parsed[2])
            else:
                changes.resync = True
    return changes


class AddressWatch:
    """A non-blocking rtnetlink socket subscribed to address changes of the
    calling thread's netns. Side effects: opens one netlink socket."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   rtnl.NETLINK_ROUTE)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
            self._sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            self._sock.setblocking(False)
        except OSError:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> AddressChanges:
        """Drain what is queued (bounded) and classify it; never blocks."""
        datagrams: list[bytes] = []
        overflow = False
        for _ in range(MAX_DATAGRAMS_PER_READ):
            try:
                datagrams.append(self._sock.recv(65536))
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                overflow = True  # events were lost: re-read everything
        changes = classify(datagrams)
        changes.resync = changes.resync or overflow
        return changes

    def close(self) -> None:
        self._sock.close()
