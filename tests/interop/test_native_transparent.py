"""The native datapath's transparent sockets in real namespaces (issue 14, integration
step 1): a client pod connects to an arbitrary IP:port, nftables TPROXY delivers the
connection to the node's IP_TRANSPARENT 15001, the datapath tunnels it over HBONE from
the client's own address to the peer node's 15008, which dials the destination pod
from the client's address again. Every socket the datapaths open carries the
configured SO_MARK (the nodes drop unmarked traffic to 15008 and to the pod, so
nothing passes without it). Pooled HBONE connections are keyed by source address.

Topology (all namespaces created here, removed at the end even on failure)::

    client 10.77.0.2, .3 --- node 10.77.0.1 | 10.77.1.1
        --- peer 10.77.1.2 | 10.99.0.1 --- pod 10.99.0.5:8080

On node and peer, replies to the transparent sockets (addressed to the client's
address) are marked by ``socket transparent`` and delivered locally by an fwmark rule
and a ``local`` route, the recipe of /work/shared/DATAPATH-NOTES.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
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
POD = "10.99.0.5"
POD_PORT = 8080

# Reads what the client sent, answers "<peer ip>:<port> <local ip>:<port> <data>".
BACKEND = f"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{POD}", {POD_PORT})); s.listen(8); print("ready", flush=True)
for _ in range(3):
    c, peer = s.accept()
    data = b""
    while chunk := c.recv(65536):
        data += chunk
    local = c.getsockname()
    c.sendall(f"{{peer[0]}}:{{peer[1]}} {{local[0]}}:{{local[1]}} ".encode() + data)
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
table ip {table} {{
  chain pre {{
    type filter hook prerouting priority mangle; policy accept;
    iifname "{from_client}" meta l4proto tcp ip daddr != 10.77.0.1 \\
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
table ip {table} {{
  chain pre {{
    type filter hook prerouting priority mangle; policy accept;
    iifname "{from_pod}" meta l4proto tcp socket transparent 1 meta mark set 0x1 accept
  }}
  chain out {{
    type filter hook output priority mangle; policy accept;
    ip daddr {pod} tcp dport {port} meta mark != {mark} counter drop
  }}
}}
"""


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Four namespaces (client, node, peer, pod), veths, routes, nftables and fwmark
    rules. Side effects: creates them; removes every namespace it made on exit."""
    tag = f"nt{os.getpid() % 100000}"
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
        addrs = [(c, f"{tag}ca", "10.77.0.2/24"), (n, f"{tag}cb", "10.77.0.1/24"),
                 (n, f"{tag}pa", "10.77.1.1/24"), (p, f"{tag}pb", "10.77.1.2/24"),
                 (p, f"{tag}ba", "10.99.0.1/24"), (b, f"{tag}bb", f"{POD}/24")]
        for name, dev, addr in addrs:
            in_ns(name, "ip", "addr", "add", addr, "dev", dev)
            in_ns(name, "ip", "link", "set", dev, "up")
        in_ns(c, "ip", "addr", "add", "10.77.0.3/24", "dev", f"{tag}ca")
        for name in ns.values():
            in_ns(name, "ip", "link", "set", "lo", "up")
        in_ns(c, "ip", "route", "add", "default", "via", "10.77.0.1")
        in_ns(b, "ip", "route", "add", "default", "via", "10.99.0.1")
        in_ns(p, "ip", "route", "add", "10.77.0.0/24", "via", "10.77.1.1")
        for name in (n, p):
            for key in ("all", "default"):
                in_ns(name, "sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=0")
            in_ns(name, "ip", "rule", "add", "fwmark", "0x1/0x1", "lookup", "100")
            in_ns(name, "ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo",
                  "table", "100")
        rules = {n: NFT_NODE.format(table=tag, from_client=f"{tag}cb", from_peer=f"{tag}pa",
                                    mark=MARK),
                 p: NFT_PEER.format(table=tag, from_pod=f"{tag}ba", pod=POD, port=POD_PORT,
                                    mark=MARK)}
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


def test_transparent_outbound_and_inbound(topology: dict[str, str], tmp_path: Path) -> None:
    store = IdentityStore(init_ca(tmp_path / "ca", TRUST_DOMAIN))
    client_files = write_pems(tmp_path / "client", store.get(CLIENT))
    server_files = write_pems(tmp_path / "server", store.get(SERVER))
    node_cfg = DatapathConfig(
        trust_domain=TRUST_DOMAIN, roots=client_files["ca"], workers=1, mark=MARK,
        outbound=(OutboundListener("out", "0.0.0.0:15001", "10.77.1.2:15008", None,
                                   client_files["cert"], client_files["key"],
                                   peer_identities=(str(SERVER),), transparent=True),))
    peer_cfg = DatapathConfig(
        trust_domain=TRUST_DOMAIN, roots=server_files["ca"], workers=1, mark=MARK,
        inbound=(InboundListener("hbone", "0.0.0.0:15008", server_files["cert"],
                                 server_files["key"], destinations=(f"{POD}:{POD_PORT}",),
                                 transparent=True),))

    async def main() -> tuple[list[str], list[ConnectionRecord], list[ConnectionRecord]]:
        backend = await ns_process(topology["pod"], BACKEND)
        try:
            assert backend.stdout is not None
            assert await asyncio.wait_for(backend.stdout.readline(), 20) == b"ready\n"
            async with NativeDatapath(node_cfg, netns=topology["node"]) as node, \
                    NativeDatapath(peer_cfg, netns=topology["peer"]) as peer:
                outputs = []
                for source, text in (("10.77.0.2", "one"), ("10.77.0.2", "two"),
                                     ("10.77.0.3", "three")):
                    proc = await ns_process(topology["client"], CLIENT_SCRIPT, POD,
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
    for out, (source, text) in zip(outputs, (("10.77.0.2", "one"), ("10.77.0.2", "two"),
                                             ("10.77.0.3", "three")), strict=True):
        peer_addr, local, data = out.split(" ")
        assert peer_addr.startswith(f"{source}:"), out
        assert local == f"{POD}:{POD_PORT}" and data == text, out
    # The node took the original destination as :authority.
    assert [(r.src.rpartition(":")[0], r.dst, r.status) for r in node_records] == [
        ("10.77.0.2", f"{POD}:{POD_PORT}", 200), ("10.77.0.2", f"{POD}:{POD_PORT}", 200),
        ("10.77.0.3", f"{POD}:{POD_PORT}", 200)]
    # The peer saw the HBONE connection come from the client's address; the two streams
    # from 10.77.0.2 shared one pooled connection, 10.77.0.3 got its own.
    hbone_peers = [r.src for r in peer_records]
    assert [p.rpartition(":")[0] for p in hbone_peers] == ["10.77.0.2", "10.77.0.2",
                                                          "10.77.0.3"], peer_records
    assert hbone_peers[0] == hbone_peers[1]
    assert all(r.dst == f"{POD}:{POD_PORT}" and r.status == 200 for r in peer_records)
    assert json.dumps([r.peer_identity for r in peer_records]).count(str(CLIENT)) == 3
