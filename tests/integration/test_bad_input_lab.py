"""The datapath against adversarial frames and node-local traffic, on real CNI pods.

One HBONE lab per pod network (ptp and bridge with br_netfilter on, both made
by Debian's CNI plugins with meshagent-cni chained), removed at the end of the
module whatever happened.

The corpus (issue 10, "Bad input"): malformed and evasive frames (VLAN tags,
stacked and QinQ tags, priority tags, GRE/IPIP/VXLAN/Geneve/IP-in-IPv6,
fragments first/later/overlapping, IP options, IPv6 extension header chains
long and short, truncations at every layer, bad checksums), each carrying a
unique marker, written raw onto the enrolled pod n1-a's eth0 towards the
enrolled pod n2-a on the other node. For every frame the pod's datapath
counters must show it either dropped (and counted) or captured into the
tunnel, as the corpus entry expects; a capture of node1's underlay port taken
during the whole corpus must hold none of the markers, no VLAN tag and no TCP
except HBONE (15008): nothing left the node in clear.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from labkit import (
    Lab,
    LabSpec,
    addr,
    closed_records,
    curl,
    mark,
    program,
    run_in,
    wait_record,
    wait_until,
)
from scapy.contrib.geneve import GENEVE
from scapy.contrib.mpls import MPLS
from scapy.layers.inet import GRE, IP, TCP, UDP, IPOption
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    PadN,
)
from scapy.layers.l2 import LLC, SNAP, Dot1AD, Dot1Q, Ether
from scapy.layers.ppp import PPP, PPPoE
from scapy.layers.vxlan import VXLAN
from scapy.packet import Packet, Raw
from scapy.utils import rdpcap

from agent.lab import netlab

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(300)]

HTTP_PORT = 8080
NODE_PORT = 8081  # a TCP service in node1's own netns (hostNetwork-style)
HBONE_PORT = 15008
LATE_NODE_ADDR = "198.51.100.20"  # an address node1 gains after its agent started
COUNTER_WAIT_S = 3.0

# Pods made by Debian's CNI plugins: ptp, and bridge with br_netfilter on.
LAB = LabSpec(letter="b", mode="hbone", pod_networks=("cni", "cni-bridge"))


@dataclass
class BadLab:
    lab: Lab
    pod_network: str
    sender: subprocess.Popen[str]  # raw frames out of n1-a (enrolled)
    plain_sender: subprocess.Popen[str]  # raw frames out of n1-plain (not enrolled)

    def send(self, frame: bytes, sender: subprocess.Popen[str] | None = None) -> None:
        proc = sender or self.sender
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(frame.hex() + "\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "sent"


def _link_mac(ns: str, dev: str) -> str:
    out = run_in(ns, ["ip", "-o", "link", "show", "dev", dev], timeout=10)
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    return words[words.index("link/ether") + 1]


def _sender(lab: Lab, pod: str) -> subprocess.Popen[str]:
    """raw_frame_sender on the pod's eth0; the lab's background list kills it."""
    proc = subprocess.Popen(netlab.nsenter_argv(lab.ns(pod), [*program("raw_frame_sender"),
                                                               "eth0"]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    lab.background.procs.append(proc)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


@pytest.fixture(scope="module")
def bad(mesh_lab: Lab, pod_network: str) -> BadLab:
    """The module's HBONE lab (conftest's ``mesh_lab``) with servers and raw senders."""
    lab = mesh_lab
    for pod in ("n2-a", "n1-b", "n1-plain"):
        lab.background.start(lab.ns(pod), f"server-{pod}",
                             [*program("datapath_server"), pod, str(HTTP_PORT), "9000",
                              "9001", "16"], ready_line="ready")
    lab.background.start(lab.ns("node1"), "server-node1",
                         [*program("datapath_server"), "node1", str(NODE_PORT), "9010",
                          "9011", "16"], ready_line="ready")
    return BadLab(lab=lab, pod_network=pod_network, sender=_sender(lab, "n1-a"),
                  plain_sender=_sender(lab, "n1-plain"))


# -- the corpus ------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Ether, str, str, str, str, bytes], Packet | bytes]
    expect: str  # "dropped" or "captured"


def _syn(payload: bytes) -> Packet:
    return TCP(sport=40999, dport=HTTP_PORT, flags="S") / Raw(payload)


CORPUS: list[Case] = [
    # tags
    Case("priority-tag", lambda e, s4, d4, s6, d6, m: e / Dot1Q(vlan=0) / IP(src=s4, dst=d4)
         / _syn(m), "dropped"),
    Case("two-priority-tags", lambda e, s4, d4, s6, d6, m: e / Dot1Q(vlan=0) / Dot1Q(vlan=0)
         / IP(src=s4, dst=d4) / _syn(m), "dropped"),
    Case("three-priority-tags", lambda e, s4, d4, s6, d6, m: e / Dot1Q(vlan=0) / Dot1Q(vlan=0)
         / Dot1Q(vlan=0) / IP(src=s4, dst=d4) / _syn(m), "dropped"),
    Case("802.1ad-priority-outer", lambda e, s4, d4, s6, d6, m: e / Dot1AD(vlan=0)
         / Dot1Q(vlan=0) / IP(src=s4, dst=d4) / _syn(m), "dropped"),
    Case("vlan-100", lambda e, s4, d4, s6, d6, m: e / Dot1Q(vlan=100) / IP(src=s4, dst=d4)
         / _syn(m), "dropped"),
    Case("qinq", lambda e, s4, d4, s6, d6, m: e / Dot1AD(vlan=200) / Dot1Q(vlan=100)
         / IP(src=s4, dst=d4) / _syn(m), "dropped"),
    Case("priority-tag-v6", lambda e, s4, d4, s6, d6, m: e / Dot1Q(vlan=0)
         / IPv6(src=s6, dst=d6) / _syn(m), "dropped"),
    Case("priority-tags-spoofed", lambda e, s4, d4, s6, d6, m: e / Dot1Q(vlan=0) / Dot1Q(vlan=0)
         / IP(src="203.0.113.9", dst=d4) / _syn(m), "dropped"),
    # encapsulations
    Case("ipip", lambda e, s4, d4, s6, d6, m: e / IP(src=s4, dst=d4)
         / IP(src="203.0.113.9", dst=d4) / _syn(m), "dropped"),
    Case("gre", lambda e, s4, d4, s6, d6, m: e / IP(src=s4, dst=d4) / GRE()
         / IP(src="203.0.113.9", dst=d4) / _syn(m), "dropped"),
    Case("vxlan", lambda e, s4, d4, s6, d6, m: e / IP(src=s4, dst=d4) / UDP(dport=4789)
         / VXLAN() / Ether() / IP(src="203.0.113.9", dst=d4) / _syn(m), "dropped"),
    Case("vxlan-8472", lambda e, s4, d4, s6, d6, m: e / IP(src=s4, dst=d4) / UDP(dport=8472)
         / VXLAN() / Ether() / IP(src="203.0.113.9", dst=d4) / _syn(m), "dropped"),
    Case("geneve", lambda e, s4, d4, s6, d6, m: e / IP(src=s4, dst=d4) / UDP(dport=6081)
         / GENEVE() / Ether() / IP(src="203.0.113.9", dst=d4) / _syn(m), "dropped"),
    Case("ip6ip6", lambda e, s4, d4, s6, d6, m: e / IPv6(src=s6, dst=d6)
         / IPv6(src="2001:db8:99::9", dst=d6) / _syn(m), "dropped"),
    Case("ipip-in-ipv6", lambda e, s4, d4, s6, d6, m: e / IPv6(src=s6, dst=d6)
         / IP(src="203.0.113.9", dst=d4) / _syn(m), "dropped"),
    Case("sit-6in4", lambda e, s4, d4, s6, d6, m: e / IP(src=s4, dst=d4)
         / IPv6(src="2001:db8:99::9", dst=d6) / _syn(m), "dropped"),
    Case("mpls-ethertype", lambda e, s4, d4, s6, d6, m: e / MPLS() / IP(src=s4, dst=d4)
         / _syn(m), "dropped"),
    Case("pppoe-session", lambda e, s4, d4, s6, d6, m: e / PPPoE() / PPP()
         / IP(src=s4, dst=d4) / _syn(m), "dropped"),
    Case("llc-snap-ip", lambda e, s4, d4, s6, d6, m: Ether(src=e.src, dst=e.dst) / LLC()
         / SNAP(code=0x0800) / IP(src=s4, dst=d4) / _syn(m), "dropped"),
    # fragments
    Case("v4-first-fragment", lambda e, s4, d4, s6, d6, m: e / IP(src=s4, dst=d4, flags="MF")
         / _syn(m), "dropped"),
    Case("v4-later-fragment", lambda e, s4, d4, s6, d6, m: e / IP(src=s4, dst=d4, frag=3,
                                                                 proto=6) / Raw(m), "dropped"),
    Case("v4-overlapping-fragment", lambda e, s4, d4, s6, d6, m: e
         / IP(src=s4, dst=d4, frag=1, flags="MF", proto=6, id=7) / Raw(bytes(_syn(m))[8:]),
         "dropped"),
    Case("v6-atomic-fragment", lambda e, s4, d4, s6, d6, m: e / IPv6(src=s6, dst=d6)
         / IPv6ExtHdrFragment() / _syn(m), "dropped"),
    Case("v6-first-fragment", lambda e, s4, d4, s6, d6, m: e / IPv6(src=s6, dst=d6)
         / IPv6ExtHdrFragment(m=1) / _syn(m), "dropped"),
    Case("v6-later-fragment", lambda e, s4, d4, s6, d6, m: e / IPv6(src=s6, dst=d6)
         / IPv6ExtHdrFragment(offset=2, nh=6) / Raw(m), "dropped"),
    Case("v6-later-fragment-behind-dstopts", lambda e, s4, d4, s6, d6, m: e
         / IPv6(src=s6, dst=d6) / IPv6ExtHdrFragment(offset=2, nh=60) / Raw(m), "dropped"),
    Case("v6-fragment-then-dstopts-then-tcp", lambda e, s4, d4, s6, d6, m: e
         / IPv6(src=s6, dst=d6) / IPv6ExtHdrFragment(m=1) / IPv6ExtHdrDestOpt() / _syn(m),
         "dropped"),
    # options and extension headers
    Case("v4-options", lambda e, s4, d4, s6, d6, m: e / IP(src=s4, dst=d4, options=[
        IPOption(b"\x01\x01\x01\x00"), IPOption(b"\x07\x07\x04\x00\x00\x00\x00\x00")])
         / _syn(m), "captured"),
    Case("v4-loose-source-route", lambda e, s4, d4, s6, d6, m: e / IP(src=s4, dst=d4, options=[
        IPOption(b"\x83\x07\x04\xc6\x12\x00\x02\x00")]) / _syn(m), "captured"),
    Case("v6-hop-dst-routing", lambda e, s4, d4, s6, d6, m: e / IPv6(src=s6, dst=d6)
         / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting() / _syn(m),
         "captured"),
    Case("v6-long-dstopts", lambda e, s4, d4, s6, d6, m: e / IPv6(src=s6, dst=d6)
         / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\0" * 250)] * 4) / _syn(m), "captured"),
    Case("v6-seven-exthdrs", lambda e, s4, d4, s6, d6, m: e / IPv6(src=s6, dst=d6)
         / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
         / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
         / IPv6ExtHdrDestOpt() / _syn(m), "dropped"),
    # truncations and invalid headers
    Case("ether-only", lambda e, s4, d4, s6, d6, m: bytes(e)[:12] + b"\x08\x00" + m[:2],
         "dropped"),
    Case("v4-header-cut", lambda e, s4, d4, s6, d6, m: bytes(e / IP(src=s4, dst=d4)
                                                          / _syn(m))[:14 + 12], "dropped"),
    Case("v4-options-past-end", lambda e, s4, d4, s6, d6, m: e / IP(src=s4, dst=d4, ihl=15,
                                                                     proto=6)
         / Raw(bytes(_syn(m))[:1]), "dropped"),
    Case("tcp-header-cut", lambda e, s4, d4, s6, d6, m: bytes(e / IP(src=s4, dst=d4)
                                                           / _syn(m))[:14 + 20 + 10],
         "dropped"),
    Case("v6-header-cut", lambda e, s4, d4, s6, d6, m: bytes(e / IPv6(src=s6, dst=d6)
                                                          / _syn(m))[:14 + 30], "dropped"),
    Case("v6-exthdr-cut", lambda e, s4, d4, s6, d6, m: bytes(e / IPv6(src=s6, dst=d6, nh=60))
         + b"\x06", "dropped"),
    Case("tcp-doff-4", lambda e, s4, d4, s6, d6, m: e / IP(src=s4, dst=d4)
         / TCP(sport=40999, dport=HTTP_PORT, flags="S", dataofs=4) / Raw(m), "dropped"),
    Case("v4-ihl-4", lambda e, s4, d4, s6, d6, m: e / IP(src=s4, dst=d4, ihl=4) / _syn(m),
         "dropped"),
    Case("v4-ethertype-version-6", lambda e, s4, d4, s6, d6, m: e / IP(src=s4, dst=d4,
                                                                      version=6) / _syn(m),
         "dropped"),
    Case("spoofed-source", lambda e, s4, d4, s6, d6, m: e / IP(src="203.0.113.9", dst=d4)
         / _syn(m), "dropped"),
    # bad checksums: captured (the tunnel's own stack then drops them); never forwarded
    Case("bad-ip-checksum", lambda e, s4, d4, s6, d6, m: e / IP(src=s4, dst=d4, chksum=0x1234)
         / _syn(m), "captured"),
    Case("bad-tcp-checksum", lambda e, s4, d4, s6, d6, m: e / IP(src=s4, dst=d4)
         / TCP(sport=40999, dport=HTTP_PORT, flags="S", chksum=0x1234) / Raw(m), "captured"),
    Case("v4-total-length-too-long", lambda e, s4, d4, s6, d6, m: e / IP(src=s4, dst=d4,
                                                                        len=1400) / _syn(m),
         "captured"),
]


def _totals(lab: Lab) -> tuple[int, int]:
    c = lab.pod_counters("node1", "n1-a")
    return int(c.get("captured_out_packets", 0)), sum((c.get("drops") or {}).values())


@contextlib.contextmanager
def underlay_capture(lab: Lab, path: Path) -> Iterator[None]:
    """tcpdump on node1's underlay port, for the body's duration."""
    dev = lab.plan.node("node1").underlay_peer_ifname
    proc = subprocess.Popen(netlab.nsenter_argv(lab.plan.underlay.netns, [
        "tcpdump", "-i", dev, "-U", "-n", "-w", str(path)]),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # "listening on ..." once it captures
        assert "listening on" in line, line
        yield
        time.sleep(0.5)  # let the last frames through
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)


def test_bad_input_corpus_is_dropped_or_captured_and_nothing_leaves_in_clear(
        bad: BadLab, tmp_path: Path) -> None:
    lab = bad.lab
    src, dst = lab.plan.pod("n1-a"), lab.plan.pod("n2-a")
    gateway_dev = "cni0" if bad.pod_network == "cni-bridge" else src.host_ifname
    eth = Ether(src=_link_mac(lab.ns("n1-a"), "eth0"),
                dst=_link_mac(lab.ns("node1"), gateway_dev))
    markers = {case.name: f"MACORPUS-{i:03d}-".encode() + b"x" * 8
               for i, case in enumerate(CORPUS)}
    outcomes: dict[str, str] = {}
    pcap = tmp_path / "underlay.pcap"
    with underlay_capture(lab, pcap):
        for case in CORPUS:
            frame = case.build(eth, str(src.ipv4), str(dst.ipv4), str(src.ipv6),
                               str(dst.ipv6), markers[case.name])
            before = _totals(lab)
            bad.send(bytes(frame))
            deadline = time.monotonic() + COUNTER_WAIT_S
            after = before
            for _ in range(100):
                after = _totals(lab)
                if after != before or time.monotonic() > deadline:
                    break
                time.sleep(0.03)
            dropped, captured = after[1] > before[1], after[0] > before[0]
            outcomes[case.name] = ("dropped" if dropped and not captured else
                                   "captured" if captured and not dropped else
                                   f"neither/both (captured {captured}, dropped {dropped})")
    wrong = {c.name: outcomes[c.name] for c in CORPUS if outcomes[c.name] != c.expect}
    assert wrong == {}, f"expected per case: {[(c.name, c.expect) for c in CORPUS]}"

    leaked = []
    for pkt in rdpcap(str(pcap)):
        raw = bytes(pkt)
        if Dot1Q in pkt or Dot1AD in pkt:
            leaked.append(f"tagged frame: {pkt.summary()}")
        if TCP in pkt and HBONE_PORT not in (pkt[TCP].sport, pkt[TCP].dport):
            leaked.append(f"TCP in clear: {pkt.summary()}")
        leaked += [f"{name} in clear: {pkt.summary()}" for name, m in markers.items()
                   if m in raw]
    assert leaked == []


INBOUND_TAGGED = [
    pytest.param(lambda e, s, d: e / Dot1Q(vlan=0) / IP(src=s, dst=d) / _syn(b"in-1"),
                 id="priority-tag"),
    pytest.param(lambda e, s, d: e / Dot1Q(vlan=0) / Dot1Q(vlan=0) / IP(src=s, dst=d)
                 / _syn(b"in-2"), id="two-priority-tags"),
    pytest.param(lambda e, s, d: e / Dot1AD(vlan=0) / Dot1Q(vlan=0) / IP(src=s, dst=d)
                 / _syn(b"in-3"), id="802.1ad-priority-outer"),
]


@pytest.mark.parametrize("build", INBOUND_TAGGED)
def test_tagged_syn_from_a_plain_pod_never_reaches_an_enrolled_pod_uncaptured(
        bad: BadLab, build: Callable[[Ether, str, str], Packet]) -> None:
    """Inbound evasion: on a bridge the frame is forwarded by MAC with its tags to
    the enrolled pod, whose kernel would strip them and accept plaintext around
    the tunnel (and its policy). It must be dropped at the pod's veth (bridge) or
    arrive untagged and be captured (ptp: the node routes it)."""
    lab = bad.lab
    plain, b = lab.plan.pod("n1-plain"), lab.plan.pod("n1-b")
    if bad.pod_network == "cni-bridge":  # same L2: straight to n1-b's MAC
        dst_mac = run_in(lab.ns("n1-b"), ["ip", "-o", "link", "show", "dev", "eth0"])
        words = dst_mac.stdout.split()
        mac = words[words.index("link/ether") + 1]
    else:
        mac = _link_mac(lab.ns("node1"), plain.host_ifname)
    eth = Ether(src=_link_mac(lab.ns("n1-plain"), "eth0"), dst=mac)

    def totals() -> tuple[int, int]:
        c = lab.pod_counters("node1", "n1-b")
        return int(c.get("captured_in_packets", 0)), sum((c.get("drops") or {}).values())

    before = totals()
    bad.send(bytes(build(eth, str(plain.ipv4), str(b.ipv4))), bad.plain_sender)
    def moved() -> tuple[int, int] | None:
        now = totals()
        return now if now != before else None

    after = wait_until("n1-b's counters to move", moved, timeout=3)
    if bad.pod_network == "cni-bridge":
        assert after[1] > before[1] and after[0] == before[0], (before, after)
        drops = lab.pod_counters("node1", "n1-b")["drops"]
        assert drops.get("vlan_tagged", 0) > 0, drops
    else:
        assert after[0] > before[0], (before, after)


# -- same node, node-local services, node addresses ---------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_same_node_enrolled_pods_take_hbone_local_with_identities(bad: BadLab,
                                                                  family: int) -> None:
    """Regression (issue 10): on a bridge this was `inbound plain`, no identity."""
    lab = bad.lab
    a, b = lab.plan.pod("n1-a"), lab.plan.pod("n1-b")
    cip, sip = (str(a.ipv4), str(b.ipv4)) if family == 4 else (str(a.ipv6), str(b.ipv6))
    since = mark(lab)
    res = curl(lab.ns("n1-a"), sip, HTTP_PORT)
    assert (res.rc, res.status) == (0, 200), res
    assert res.server_view()["peer"] == cip
    rec = wait_record(lab, "node1", since,
                      lambda r: r["src"] == addr(cip, res.local_port),
                      "the same-node connection's record")
    assert (rec["direction"], rec["path"], rec["result"]) == ("outbound", "hbone-local", "ok")
    assert rec["src_identity"] == f"spiffe://cluster.local/ns/{a.namespace}/sa/{a.service_account}"
    assert rec["dst_identity"] == f"spiffe://cluster.local/ns/{b.namespace}/sa/{b.service_account}"
    assert not [r for r in closed_records(lab, "node1", since)
                if r["direction"] == "inbound" and r.get("path") == "plain"]


@pytest.mark.parametrize("family", [4, 6])
def test_enrolled_pod_reaches_a_plain_pod_on_its_node_and_the_reply_finds_the_tunnel(
        bad: BadLab, family: int) -> None:
    """On a bridge the plain pod answers the tunnel's connection (made from n1-a's
    address) straight to n1-a's MAC; to_pod must hand it to the tunnel socket."""
    lab = bad.lab
    a, p = lab.plan.pod("n1-a"), lab.plan.pod("n1-plain")
    cip, sip = (str(a.ipv4), str(p.ipv4)) if family == 4 else (str(a.ipv6), str(p.ipv6))
    since = mark(lab)
    res = curl(lab.ns("n1-a"), sip, HTTP_PORT)
    assert (res.rc, res.status) == (0, 200), res
    assert res.server_view()["peer"] == cip
    rec = wait_record(lab, "node1", since, lambda r: r["src"] == addr(cip, res.local_port),
                      "the connection's outbound record")
    assert (rec["direction"], rec["path"], rec["result"]) == ("outbound", "passthrough", "ok")


@pytest.mark.parametrize("target", ["underlay-v4", "underlay-v6", "gateway-v4"])
def test_enrolled_pod_reaches_a_node_local_service_through_the_tunnel(bad: BadLab,
                                                                      target: str) -> None:
    """As Istio ambient: all of the pod's TCP but loopback is captured (istio/istio
    cni/pkg/iptables/iptables.go, ISTIO_OUTPUT `! -d 127.0.0.1/32 ... REDIRECT 15001`),
    the node's addresses included; the tunnel passes it through to the service,
    which sees the pod's address. It used to be reset."""
    lab = bad.lab
    node, a = lab.plan.node("node1"), lab.plan.pod("n1-a")
    host = {"underlay-v4": node.underlay_ipv4, "underlay-v6": node.underlay_ipv6,
            "gateway-v4": a.gateway_ipv4}[target]
    since = mark(lab)
    res = curl(lab.ns("n1-a"), str(host), NODE_PORT)
    assert (res.rc, res.status) == (0, 200), res
    seen = res.server_view()
    assert seen["server"] == "node1" and seen["peer"] == res.local_ip
    rec = wait_record(lab, "node1", since,
                      lambda r: r["src"] == addr(res.local_ip, res.local_port),
                      "the tunnel's record of the node-local connection")
    assert (rec["direction"], rec["dst"], rec["result"]) == (
        "outbound", addr(str(host), NODE_PORT), "ok")


def test_a_node_address_added_later_reaches_pods_directly(bad: BadLab) -> None:
    """The node-address map follows the node (rtnetlink watch): a probe from an
    address that appeared after the agent started is not captured."""
    lab = bad.lab
    node_ns, b = lab.ns("node1"), lab.plan.pod("n1-b")
    add = run_in(node_ns, ["ip", "addr", "add", f"{LATE_NODE_ADDR}/32", "dev", "lo"])
    assert add.returncode == 0, add.stderr
    since = mark(lab)
    agent_log = Path(lab.plan.node_run_dir("node1")) / "agent.log"
    try:
        # The watch applies it within moments; the agent logs when it did.
        wait_until("node1's agent to add the new address to the datapath",
                   lambda: LATE_NODE_ADDR in agent_log.read_text(), timeout=5)

        def probe() -> tuple[int, str] | None:
            out = run_in(node_ns, ["curl", "-sS", "-m", "3", "--interface", LATE_NODE_ADDR,
                                     "-w", "\n%{local_port}", f"http://{b.ipv4}:{HTTP_PORT}/"],
                           timeout=15)
            if out.returncode != 0:
                return None
            body, _, port = out.stdout.rpartition("\n")
            return int(port), body.strip()

        port, body = wait_until("a probe from the new address", probe, timeout=4,
                                interval=0.2)
        # the server saw the probe's own socket: nothing proxied it
        assert body == f"server=n1-b peer={LATE_NODE_ADDR} port={port}"
    finally:
        run_in(node_ns, ["ip", "addr", "del", f"{LATE_NODE_ADDR}/32", "dev", "lo"])
    # A marker connection through node1's tunnel, closed after the probe: once its
    # record is written, a record of the probe would have been written too.
    a = lab.plan.pod("n1-a")
    res = curl(lab.ns("n1-a"), str(b.ipv4), HTTP_PORT)
    assert (res.rc, res.status) == (0, 200), res
    wait_record(lab, "node1", since, lambda r: r["src"] == addr(str(a.ipv4), res.local_port),
                "the marker connection's record")
    assert not [r for r in closed_records(lab, "node1", since)
                if r["src"].startswith((LATE_NODE_ADDR, f"[{LATE_NODE_ADDR}]"))]
