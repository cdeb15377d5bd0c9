"""The native datapath's transparent sockets in real namespaces (issue 14, integration
step 1): a client pod connects to an arbitrary IP:port, nftables TPROXY delivers the
connection to the node's IP_TRANSPARENT 15001, the datapath tunnels it over HBONE from
the client's own address to the peer node's 15008, which dials the destination pod
from the client's address again. Every socket the datapaths open carries the
configured SO_MARK (the nodes drop unmarked traffic to 15008 and to the pod, so
nothing passes without it). Pooled HBONE connections are keyed by source address.

Runs over IPv4 and IPv6. Topology (IPv4 addresses shown; all namespaces created
here, removed at the end even on failure)::

    client 10.77.0.2, .3 --- node 10.77.0.1 | 10.77.1.1
        --- peer 10.77.1.2 | 10.99.0.1 --- pod 10.99.0.5:8080

On node and peer, replies to the transparent sockets (addressed to the client's
address) are marked by ``socket transparent`` and delivered locally by an fwmark rule
and a ``local`` route, the recipe of /work/shared/DATAPATH-NOTES.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hbone_peers import ALLOW_ALL, WORKLOAD
from test_native_hbone import CLIENT, SERVER, TRUST_DOMAIN, write_pems

from agent.identity.ca import init_ca
from agent.identity.store import IdentityStore
from agent.tunnel.native.driver import NativeDatapath
from agent.tunnel.native.protocol import (
    ConnectionRecord,
    DatapathConfig,
    InboundListener,
    OutboundListener,
)

pytestmark = pytest.mark.privileged

MARK = 0x538  # the datapath's SO_MARK; bit 0 stays clear for the TPROXY mark
POD_PORT = 8080


@dataclasses.dataclass(frozen=True)
class Family:
    """The addresses of the topology in one IP family."""

    name: str
    client: str
    client2: str
    node_c: str
    node_p: str
    peer_n: str
    peer_b: str
    pod: str
    plen: int
    table: str  # nftables family
    any: str  # the wildcard address of a listener

    def hostport(self, ip: str, port: int) -> str:
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

    def host_of(self, hostport: str) -> str:
        return hostport.rpartition(":")[0].strip("[]")


V4 = Family("v4", "10.77.0.2", "10.77.0.3", "10.77.0.1", "10.77.1.1", "10.77.1.2",
            "10.99.0.1", "10.99.0.5", 24, "ip", "0.0.0.0")
V6 = Family("v6", "fd77::2", "fd77::3", "fd77::1", "fd77:1::1", "fd77:1::2",
            "fd99::1", "fd99::5", 64, "ip6", "::")

# Reads what the client sent, answers "<peer ip>:<port> <local ip>:<port> <data>".
BACKEND = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8); print("ready", flush=True)
for _ in range(3):
    c, peer = s.accept()
    data = b""
    while chunk := c.recv(65536):
        data += chunk
    local = c.getsockname()
    c.sendall(f"{peer[0]}:{peer[1]} {local[0]}:{local[1]} ".encode() + data)
    c.close()
"""

CLIENT_SCRIPT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20,
                             source_address=(sys.argv[3], 0))
s.sendall(sys.argv[4].encode()); s.shutdown(socket.SHUT_WR)
out = b""
while chunk := s.recv(65536):
    out += chunk
print(out.decode())
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


def in_ns(ns: str, *args: str) -> None:
    sh("ip", "netns", "exec", ns, *args)


NFT_NODE = """
table {family} {table} {{
  chain pre {{
    type filter hook prerouting priority mangle; policy accept;
    iifname "{from_client}" meta l4proto tcp {family} daddr != {node} \\
      tproxy to :15001 meta mark set 0x1 accept
    iifname "{from_peer}" meta l4proto tcp socket transparent 1 meta mark set 0x1 accept
  }}
  chain out {{
    type filter hook output priority mangle; policy accept;
    tcp dport 15008 meta mark != {mark} counter drop
  }}
}}
"""

NFT_PEER = """
table {family} {table} {{
  chain pre {{
    type filter hook prerouting priority mangle; policy accept;
    iifname "{from_pod}" meta l4proto tcp socket transparent 1 meta mark set 0x1 accept
  }}
  chain out {{
    type filter hook output priority mangle; policy accept;
    {family} daddr {pod} tcp dport {port} meta mark != {mark} counter drop
  }}
}}
"""


@pytest.fixture(params=[V4, V6], ids=["v4", "v6"])
def family(request: pytest.FixtureRequest) -> Family:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def topology(family: Family, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Four namespaces (client, node, peer, pod), veths, routes, nftables and fwmark
    rules. Side effects: creates them; removes every namespace it made on exit."""
    f = family
    tag = f"nt{os.getpid() % 10000}{f.name}"
    ns = {k: f"{tag}-{k}" for k in ("client", "node", "peer", "pod")}
    made: list[str] = []
    try:
        for name in ns.values():
            sh("ip", "netns", "add", name)
            made.append(name)
        links = [("client", "node", "c"), ("node", "peer", "p"), ("peer", "pod", "b")]
        for a, b, short in links:
            left, right = f"{tag}{short}a", f"{tag}{short}b"
            sh("ip", "link", "add", left, "netns", ns[a], "type", "veth", "peer", right,
               "netns", ns[b])
        c, n, p, b = ns["client"], ns["node"], ns["peer"], ns["pod"]
        ipf = "-6" if f.name == "v6" else "-4"
        nodad = ("nodad",) if f.name == "v6" else ()
        addrs = [(c, f"{tag}ca", f.client), (c, f"{tag}ca", f.client2),
                 (n, f"{tag}cb", f.node_c), (n, f"{tag}pa", f.node_p),
                 (p, f"{tag}pb", f.peer_n), (p, f"{tag}ba", f.peer_b), (b, f"{tag}bb", f.pod)]
        for name, dev, addr in addrs:
            in_ns(name, "ip", ipf, "addr", "add", f"{addr}/{f.plen}", "dev", dev, *nodad)
            in_ns(name, "ip", "link", "set", dev, "up")
        for name in ns.values():
            in_ns(name, "ip", "link", "set", "lo", "up")
        client_net = str(ipaddress.ip_interface(f"{f.client}/{f.plen}").network)
        in_ns(c, "ip", ipf, "route", "add", "default", "via", f.node_c)
        in_ns(b, "ip", ipf, "route", "add", "default", "via", f.peer_b)
        in_ns(p, "ip", ipf, "route", "add", client_net, "via", f.node_p)
        for name in (n, p):
            for key in ("all", "default"):
                in_ns(name, "sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=0")
            in_ns(name, "ip", ipf, "rule", "add", "fwmark", "0x1/0x1", "lookup", "100")
            in_ns(name, "ip", ipf, "route", "add", "local", "::/0" if f.name == "v6"
                  else "0.0.0.0/0", "dev", "lo", "table", "100")
        rules = {n: NFT_NODE.format(family=f.table, table=tag, from_client=f"{tag}cb",
                                    from_peer=f"{tag}pa", node=f.node_c, mark=MARK),
                 p: NFT_PEER.format(family=f.table, table=tag, from_pod=f"{tag}ba",
                                    pod=f.pod, port=POD_PORT, mark=MARK)}
        for name, text in rules.items():
            path = tmp_path / f"{name}.nft"
            path.write_text(text)
            in_ns(name, "nft", "-f", str(path))
        yield ns
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


async def ns_process(ns: str, script: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, sys.executable, "-c", script, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


def test_transparent_outbound_and_inbound(family: Family, topology: dict[str, str],
                                          tmp_path: Path) -> None:
    f = family
    pod = f.hostport(f.pod, POD_PORT)
    store = IdentityStore(init_ca(tmp_path / "ca", TRUST_DOMAIN))
    client_files = write_pems(tmp_path / "client", store.get(CLIENT))
    server_files = write_pems(tmp_path / "server", store.get(SERVER))
    node_cfg = DatapathConfig(
        trust_domain=TRUST_DOMAIN, roots=client_files["ca"], workers=1, mark=MARK,
        outbound=(OutboundListener("out", f.hostport(f.any, 15001),
                                   f.hostport(f.peer_n, 15008), None,
                                   client_files["cert"], client_files["key"],
                                   peer_identities=(str(SERVER),), transparent=True),))
    peer_cfg = DatapathConfig(
        trust_domain=TRUST_DOMAIN, roots=server_files["ca"], workers=1, mark=MARK,
        inbound=(InboundListener("hbone", f.hostport(f.any, 15008), server_files["cert"],
                                 server_files["key"], destinations=(pod,),
                                 transparent=True, workload=WORKLOAD),))

    sends = ((f.client, "one"), (f.client, "two"), (f.client2, "three"))

    async def main() -> tuple[list[str], list[ConnectionRecord], list[ConnectionRecord]]:
        backend = await ns_process(topology["pod"], BACKEND, f.pod, str(POD_PORT))
        try:
            assert backend.stdout is not None
            assert await asyncio.wait_for(backend.stdout.readline(), 20) == b"ready\n"
            async with NativeDatapath(node_cfg, policy=ALLOW_ALL, netns=topology["node"]) as node, \
                    NativeDatapath(peer_cfg, policy=ALLOW_ALL, netns=topology["peer"]) as peer:
                outputs = []
                for source, text in sends:
                    proc = await ns_process(topology["client"], CLIENT_SCRIPT, f.pod,
                                            str(POD_PORT), source, text)
                    out, err = await asyncio.wait_for(proc.communicate(), 30)
                    assert proc.returncode == 0, err.decode()
                    outputs.append(out.decode().strip())
                return (outputs, await node.connection_records(3, 20),
                        await peer.connection_records(3, 20))
        finally:
            with contextlib.suppress(ProcessLookupError):
                backend.kill()
            await backend.wait()

    outputs, node_records, peer_records = asyncio.run(asyncio.wait_for(main(), 120))
    # The pod sees the client's own address, on the address the client dialed.
    for out, (source, text) in zip(outputs, sends, strict=True):
        peer_addr, local, data = out.split(" ")
        assert peer_addr.rpartition(":")[0] == source, out
        assert local == f"{f.pod}:{POD_PORT}" and data == text, out
    # The node took the original destination as :authority.
    assert [(f.host_of(r.src), r.dst, r.status) for r in node_records] == [
        (f.client, pod, 200), (f.client, pod, 200), (f.client2, pod, 200)], node_records
    # The peer saw the HBONE connection come from the client's address; the two streams
    # from the first address shared one pooled connection, the second got its own.
    hbone_peers = [r.src for r in peer_records]
    assert [f.host_of(p) for p in hbone_peers] == [f.client, f.client, f.client2]
    assert hbone_peers[0] == hbone_peers[1]
    assert all(r.dst == pod and r.status == 200 for r in peer_records), peer_records
    assert json.dumps([r.peer_identity for r in peer_records]).count(str(CLIENT)) == 3
