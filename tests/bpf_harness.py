"""Shared pieces of the BPF_PROG_TEST_RUN suite: the test network, and a harness
that runs the REAL programs (compiled with -DMESHAGENT_TEST_RUN) on scapy frames.

Every address and port the suite uses is a named constant here. Nothing is
ever sent: frames only go through BPF_PROG_TEST_RUN inside a private netns, and
the sockets the programs look up live in that netns too.

Test network (one netns, ``ma-bpft-<hex>``):

    lo        up; holds every pod/remote address so the kernel can bind sockets to them
    va <-> vb veth: va is POD's host-side veth (POD_IFINDEX); vb is never enrolled
    vc <-> vd veth: vc is OTHER_POD's host-side veth
    matun     the agent-owned tunnel device (tunnel_ifindex; a veth, its peer unused,
              because the test kernel may lack the dummy driver)

It lives in tests/, not tests/bpf/: mypy names tests/bpf's files ``bpf.*`` (to tell
its conftest from tests/integration's, see ``[tool.mypy]`` in pyproject.toml), and
finds this module as ``bpf_harness`` here, where pytest imports it from too.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute, netns
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from agent.datapath import testrun
from agent.datapath.drop_reasons import DropReason
from agent.datapath.maps import POD_F_BRIDGED, DatapathMaps, DatapathSettings, PodCounters
from agent.datapath.programs import FROM_POD, TO_POD, TUNNEL_DEV_INGRESS, Programs

# ---------------------------------------------------------------------------
# Addresses (test ranges only: 10.244/16 pod CIDR, fd00:10:244::/48,
# 198.18.0.0/15 benchmarking, 2001:db8::/32 documentation).
POD_V4 = "10.244.1.10"
POD_V6 = "fd00:10:244:1::a"
OTHER_POD_V4 = "10.244.2.20"
OTHER_POD_V6 = "fd00:10:244:2::14"
NODE_V4 = "198.18.0.1"
NODE_V6 = "2001:db8:18::1"
REMOTE_V4 = "198.18.0.100"
REMOTE_V6 = "2001:db8::100"
UNKNOWN_V4 = "10.244.9.99"  # a pod address no enrolled pod owns
UNKNOWN_V6 = "fd00:10:244:9::63"
EXCLUDED_CIDR_V4 = "198.18.1.0/24"
EXCLUDED_DST_V4 = "198.18.1.5"
EXCLUDED_CIDR_V6 = "2001:db8:1::/48"
EXCLUDED_DST_V6 = "2001:db8:1::5"

POD_MAC = "02:00:0a:f4:01:0a"
HOST_MAC = "02:00:c6:12:00:01"
TUNNEL_MAC = "02:00:00:00:3a:98"

# ---------------------------------------------------------------------------
# Ports.
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
HBONE_PORT = 15008
APP_PORT = 80
EXCLUDED_PORT = 15021
CLIENT_PORT = 40001  # ephemeral-looking source port of test connections

# ---------------------------------------------------------------------------
# Marks.
CAPTURE_MARK = 0x400
CAPTURE_MASK = 0xF00
REDIRECT_MARK = 0x600  # a bridged pod's captured packet on its way to the tunnel device
TUNNEL_MARK = 0x539

# Linux TCP states as reported in bpf_sock.state.
TCP_ESTABLISHED = 1
TCP_LISTEN = 10

AF_INET = 2
AF_INET6 = 10

TC_ACT_OK = testrun.TC_ACT_OK
TC_ACT_UNSPEC = testrun.TC_ACT_UNSPEC
TC_ACT_SHOT = testrun.TC_ACT_SHOT
TC_ACT_REDIRECT = testrun.TC_ACT_REDIRECT

POD_IF = "va"
POD_PEER_IF = "vb"
OTHER_POD_IF = "vc"
OTHER_POD_PEER_IF = "vd"
TUNNEL_IF = "matun"
TUNNEL_PEER_IF = "matunp"

_IFA_F_NODAD = 0x02
_LOCAL_ADDRESSES = (POD_V4, POD_V6, OTHER_POD_V4, OTHER_POD_V6, REMOTE_V4, REMOTE_V6,
                    NODE_V4, NODE_V6)


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def netns_name() -> str:
    return f"ma-bpft-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class TestNet:
    """The namespace and the ifindexes the programs see as skb->ifindex."""

    __test__ = False  # not a test class, despite the name

    netns: str
    pod_ifindex: int
    peer_ifindex: int
    other_pod_ifindex: int
    tunnel_ifindex: int


def build_testnet(name: str) -> TestNet:
    """Populate netns ``name`` (the caller has already entered it)."""
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        for address in _LOCAL_ADDRESSES:
            prefixlen = 128 if is_v6(address) else 32
            ipr.addr("add", index=lo, address=address, prefixlen=prefixlen,
                     flags=_IFA_F_NODAD)
        ipr.link("add", ifname=POD_IF, kind="veth", peer=POD_PEER_IF)
        ipr.link("add", ifname=OTHER_POD_IF, kind="veth", peer=OTHER_POD_PEER_IF)
        ipr.link("add", ifname=TUNNEL_IF, kind="veth", peer=TUNNEL_PEER_IF)
        index = {n: ipr.link_lookup(ifname=n)[0] for n in (
            POD_IF, POD_PEER_IF, OTHER_POD_IF, OTHER_POD_PEER_IF, TUNNEL_IF, TUNNEL_PEER_IF)}
        for ifindex in index.values():
            ipr.link("set", index=ifindex, state="up")
    return TestNet(netns=name, pod_ifindex=index[POD_IF], peer_ifindex=index[POD_PEER_IF],
                   other_pod_ifindex=index[OTHER_POD_IF], tunnel_ifindex=index[TUNNEL_IF])


def default_settings(net: TestNet) -> DatapathSettings:
    return DatapathSettings(
        capture_mark=CAPTURE_MARK, capture_mask=CAPTURE_MASK, tunnel_mark=TUNNEL_MARK,
        tunnel_ifindex=net.tunnel_ifindex, tunnel_mac=mac_bytes(TUNNEL_MAC),
        outbound_port=OUTBOUND_PORT, inbound_port=INBOUND_PORT, hbone_port=HBONE_PORT,
        redirect_mark=REDIRECT_MARK)


def is_v6(address: str) -> bool:
    return ":" in address


def family_of(address: str) -> int:
    return AF_INET6 if is_v6(address) else AF_INET


def ip(src: str, dst: str, **fields: Any) -> Packet:
    """An IPv4 or IPv6 header, by the family of ``src``."""
    return (IPv6 if is_v6(src) else IP)(src=src, dst=dst, **fields)


def from_pod_eth() -> Ether:
    """Layer 2 of a frame the pod sends (what from_pod sees)."""
    return Ether(src=POD_MAC, dst=HOST_MAC)


def to_pod_eth() -> Ether:
    """Layer 2 of a frame routed towards the pod (what to_pod sees)."""
    return Ether(src=HOST_MAC, dst=POD_MAC)


def tunnel_eth() -> Ether:
    """Layer 2 of a frame to_pod bounced to the tunnel device."""
    return Ether(src=HOST_MAC, dst=TUNNEL_MAC)


@dataclass(frozen=True)
class Assignment:
    """What the mocked bpf_sk_assign recorded (map ma_test_assigned)."""

    state: int
    family: int
    port: int  # the assigned socket's local port


@dataclass
class Harness:
    """One test's view of the datapath: run programs, read maps, own sockets."""

    programs: Programs
    maps: DatapathMaps
    net: TestNet
    _sockets: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    # -- maps ------------------------------------------------------------
    @property
    def pods(self) -> dict[int, tuple[str, ...]]:
        return {self.net.pod_ifindex: (POD_V4, POD_V6),
                self.net.other_pod_ifindex: (OTHER_POD_V4, OTHER_POD_V6)}

    def reset(self) -> None:
        """Empty every map the programs read or write."""
        for ifindex, addresses in self.pods.items():
            self.maps.remove_pod(ifindex, addresses)
        for name in ("ma_pods", "ma_pod_addrs", "ma_stats"):
            self.programs.table(name).clear()
        self.maps.set_node_addresses([])
        self.maps.set_exclusions([], [])
        self.maps.set_encapsulation_ports([])
        self.clear_settings()
        self.clear_assignment()

    def enroll_defaults(self) -> None:
        self.maps.set_settings(default_settings(self.net))
        for ifindex, addresses in self.pods.items():
            self.maps.add_pod(ifindex, addresses)
        self.maps.set_node_addresses([NODE_V4, NODE_V6])
        self.maps.set_exclusions([EXCLUDED_PORT], [EXCLUDED_CIDR_V4, EXCLUDED_CIDR_V6])

    def enroll_bridged(self) -> None:
        """Make POD a bridge port's pod (MA_POD_F_BRIDGED), as the agent does."""
        self.maps.add_pod(self.net.pod_ifindex, (POD_V4, POD_V6), POD_F_BRIDGED)

    def clear_settings(self) -> None:
        """Zero the config entry: what a node looks like before the agent writes it."""
        table = self.programs.table("ma_config_map")
        del table[table.Key(0)]

    def clear_assignment(self) -> None:
        table = self.programs.table("ma_test_assigned")
        del table[table.Key(0)]

    def assigned(self) -> Assignment | None:
        table = self.programs.table("ma_test_assigned")
        leaf = table[table.Key(0)]
        if not leaf.assigned:
            return None
        return Assignment(state=leaf.state, family=leaf.family, port=leaf.src_port)

    def counters(self, ifindex: int) -> PodCounters:
        return self.maps.counters().get(ifindex, PodCounters())

    def all_counters(self) -> dict[int, PodCounters]:
        return self.maps.counters()

    # -- programs --------------------------------------------------------
    def run(self, function: str, frame: Packet | bytes, *, ifindex: int,
            mark: int = 0) -> testrun.RunResult:
        return testrun.run(self.programs.fds[function], bytes(frame), ifindex=ifindex,
                           mark=mark)

    def from_pod(self, frame: Packet | bytes, *, ifindex: int | None = None,
                 mark: int = 0) -> testrun.RunResult:
        return self.run(FROM_POD, frame, mark=mark,
                        ifindex=self.net.pod_ifindex if ifindex is None else ifindex)

    def to_pod(self, frame: Packet | bytes, *, ifindex: int | None = None,
               mark: int = 0) -> testrun.RunResult:
        return self.run(TO_POD, frame, mark=mark,
                        ifindex=self.net.pod_ifindex if ifindex is None else ifindex)

    def tunnel(self, frame: Packet | bytes, *, mark: int = 0) -> testrun.RunResult:
        return self.run(TUNNEL_DEV_INGRESS, frame, ifindex=self.net.tunnel_ifindex, mark=mark)

    # -- sockets (created in the test netns, closed by close()) -----------
    def _socket(self, family: int) -> socket.socket:
        sock = self._sockets.enter_context(socket.socket(family, socket.SOCK_STREAM))
        # Close with RST: no TIME_WAIT left to collide with a later test's 4-tuple.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.settimeout(5)
        return sock

    def listen(self, address: str, port: int) -> socket.socket:
        """A listener; wildcard IPv6 listeners are V6ONLY so v4 ones can coexist."""
        family = socket.AF_INET6 if is_v6(address) else socket.AF_INET
        sock = self._socket(family)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(8)
        return sock

    def listen_all(self, port: int) -> None:
        """Wildcard listeners on ``port`` for both families (0.0.0.0 and [::])."""
        self.listen("0.0.0.0", port)
        self.listen("::", port)

    def connect(self, client: str, client_port: int, server: str,
                server_port: int) -> tuple[socket.socket, socket.socket]:
        """An established TCP connection client:client_port -> server:server_port.

        Returns (client socket, server-side accepted socket). A packet from the
        client with this exact 4-tuple is owned by the accepted socket.
        """
        family = socket.AF_INET6 if is_v6(client) else socket.AF_INET
        listener = self.listen(server, server_port)
        conn = self._socket(family)
        conn.bind((client, client_port))
        conn.connect((server, server_port))
        accepted, _ = listener.accept()
        self._sockets.enter_context(accepted)
        accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        listener.close()
        return conn, accepted

    def close(self) -> None:
        self._sockets.close()


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body inside netns ``name`` (this thread only), always coming back."""
    netns.pushns(name)
    try:
        yield
    finally:
        netns.popns()


# ---------------------------------------------------------------------------
# Assertions shared by the three program suites.

def assert_untouched(dp: Harness, result: testrun.RunResult, frame: Packet | bytes, *,
                     mark: int = 0) -> None:
    """Passed as if the program were not there: verdict (continue with the next
    filter), bytes, mark, maps."""
    assert result.retval == TC_ACT_UNSPEC
    assert result.data == bytes(frame)
    assert result.mark == mark
    assert dp.assigned() is None
    assert dp.all_counters() == {}


def assert_dropped(dp: Harness, result: testrun.RunResult, ifindex: int,
                   reason: DropReason) -> None:
    """TC_ACT_SHOT, counted once under ``reason`` for ``ifindex`` and nowhere else."""
    assert result.retval == TC_ACT_SHOT
    assert result.mark == 0
    assert dp.assigned() is None
    assert dp.all_counters() == {ifindex: PodCounters(drops={reason: 1})}


def assert_assigned(dp: Harness, result: testrun.RunResult, *, state: int, family: int,
                    port: int, mark: int = CAPTURE_MARK) -> None:
    """Handed to a socket: TC_ACT_OK, capture mark set, the socket recorded."""
    assert result.retval == TC_ACT_OK
    assert result.mark == mark
    assert dp.assigned() == Assignment(state=state, family=family, port=port)


def assert_redirected_out(dp: Harness, frame: Packet, *, mark: int = 0) -> None:
    """A bridged pod's captured packet: sent to the tunnel device's ingress (its MAC
    written, REDIRECT_MARK set under the mask, nothing assigned here), counted once."""
    result = dp.from_pod(frame, mark=mark)
    assert result.retval == TC_ACT_REDIRECT
    assert result.data[:6] == mac_bytes(TUNNEL_MAC)
    assert result.data[6:] == bytes(frame)[6:]
    assert result.mark == (mark & ~CAPTURE_MASK) | REDIRECT_MARK
    assert dp.assigned() is None  # the tunnel device assigns it
    assert dp.all_counters() == {dp.net.pod_ifindex: PodCounters(
        captured_out_packets=1, captured_out_bytes=len(frame))}
