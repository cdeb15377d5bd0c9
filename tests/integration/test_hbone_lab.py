"""HBONE end to end in the namespace lab (root): real pods, real tunnels, real kernel.

One lab per module (prefix ``h`` + 4 hex digits), built with the mesh in HBONE
mode, with servers in the pods; everything (servers, captures, tunnels, netns)
is stopped and removed afterwards whatever happened. Every wait is bounded.
The tests check behaviour only, never timings:

* cross-node traffic (curl v4/v6, iperf3) goes over HBONE with the right
  identities in both tunnels' access logs;
* on the underlay only mTLS on port 15008 is seen, never the payload;
* the server pod sees the client pod's own address (cross-node and same-node);
* same-node traffic takes the in-process ``hbone-local`` path and never
  touches the underlay;
* the 15008 listener refuses a client certificate from a foreign CA, accepts
  the mesh CA's, and refuses a CONNECT whose ``:authority`` names another pod;
* strict inbound mode refuses plaintext from outside the mesh (runs last and
  restores permissive mode).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lab_procs import leftovers as _leftovers
from lab_procs import listening as _listening
from lab_procs import run_in as _run_in
from lab_procs import running as _running
from lab_procs import stop as _stop
from lab_procs import until as _until
from pyroute2 import netns

from agent.api import client
from agent.identity.ca import WorkloadCert, init_ca, load_ca
from agent.identity.spiffe import SpiffeId
from agent.lab import mesh, netlab
from agent.lab.topology import LabPlan, build_plan, run_dir

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(240)]

TRUST_DOMAIN = "cluster.local"
SA_A = "spiffe://cluster.local/ns/default/sa/sa-a"
ECHO_PORT = 18080
HTTP_PORT = 8080
IPERF_PORT = 5201
HBONE_PORT = 15008
INBOUND_PORT = 15006
WAIT_S = 15.0  # upper bound of every "until" loop
POLL_S = 0.1

# Runs in a pod: on each connection, first sends "peer <getpeername() ip>\n",
# then echoes everything until the client half-closes. Both families on PORT.
# Prints "ready" once listening; exits by itself after 10 minutes (orphan guard).
PEER_ECHO_SERVER = r"""
import select, socket, sys, threading, time
port = int(sys.argv[1])
socks = []
for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port)); s.listen(64); socks.append(s)

def serve(c):
    try:
        c.settimeout(20)
        c.sendall(f"peer {c.getpeername()[0]}\n".encode())
        while True:
            data = c.recv(65536)
            if not data:
                break
            c.sendall(data)
    except OSError:
        pass
    finally:
        c.close()

print("ready", flush=True)
deadline = time.monotonic() + 600
while time.monotonic() < deadline:
    for s in select.select(socks, [], [], 0.5)[0]:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# Runs in a pod: connect, read the "peer" line, send the payload, half-close,
# read the echo. Always prints one JSON object (errors included) and exits 0.
ECHO_CLIENT = r"""
import json, socket, sys
host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
out = {"peer": None, "echo_ok": False, "error": None}
try:
    with socket.create_connection((host, port), timeout=10) as c:
        buf = b""
        while b"\n" not in buf:
            chunk = c.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed before the peer line (got {buf!r})")
            buf += chunk
        line, rest = buf.split(b"\n", 1)
        out["peer"] = line.decode().removeprefix("peer ")
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        while True:
            chunk = c.recv(65536)
            if not chunk:
                break
            rest += chunk
        out["echo_ok"] = rest == payload
except OSError as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""

# Runs in node1's netns: a TLS 1.3 + ALPN h2 client presenting a given
# certificate (verifying the server against a given CA), sending one HBONE
# CONNECT for ``authority``; on 200 sends ``send`` and reads the stream to its
# end. Prints one JSON object: handshake, alpn, status, data, error.
H2_CONNECT_CLIENT = r"""
import json, socket, ssl, sys, time
import h2.config, h2.connection, h2.events
cfg = json.loads(sys.argv[1])
out = {"handshake": False, "alpn": None, "status": None, "data": "", "error": None}

def finish():
    print(json.dumps(out))
    sys.exit(0)

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
ctx.set_alpn_protocols(["h2"])
ctx.check_hostname = False  # the mesh checks SPIFFE IDs, not host names
ctx.load_verify_locations(cfg["trust"])
ctx.load_cert_chain(cfg["cert"], cfg["key"])
try:
    raw = socket.create_connection((cfg["host"], cfg["port"]), timeout=5)
    tls = ctx.wrap_socket(raw)
except (OSError, ssl.SSLError) as exc:
    out["error"] = f"handshake: {type(exc).__name__}: {exc}"
    finish()
out["handshake"] = True
out["alpn"] = tls.selected_alpn_protocol()
conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
conn.initiate_connection()
conn.send_headers(1, [(":method", "CONNECT"), (":authority", cfg["authority"])])
deadline = time.monotonic() + 10
try:
    tls.sendall(conn.data_to_send())
    while time.monotonic() < deadline:
        data = tls.recv(65536)
        if not data:
            out["error"] = "connection closed by the server"
            finish()
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                out["status"] = int(dict(ev.headers)[b":status"])
                if out["status"] == 200:
                    conn.send_data(1, cfg["send"].encode(), end_stream=True)
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, 1)
                out["data"] += ev.data.decode()
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                finish()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                out["error"] = f"GOAWAY {ev.error_code}"
                finish()
        tls.sendall(conn.data_to_send())
        if out["status"] is not None and out["status"] != 200:
            finish()
    out["error"] = "timeout"
except (OSError, ssl.SSLError) as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
finish()
"""


# -- processes ------------------------------------------------------------------------






def _start_echo_server(plan: LabPlan, pod: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        netlab.nsenter_argv(
            plan.pod(pod).netns, [sys.executable, "-c", PEER_ECHO_SERVER, str(ECHO_PORT)]
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    line = proc.stdout.readline().strip() if ready else ""
    if line != "ready":
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"echo server in {pod} did not start: {line!r}; stderr: {err}")
    return proc


def _start_quiet(plan: LabPlan, pod: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        netlab.nsenter_argv(plan.pod(pod).netns, argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )



# -- access log -----------------------------------------------------------------------


def _log_path(plan: LabPlan, node: str) -> Path:
    return Path(netlab.process_log_path(plan, node, "tunnel"))


def _log_marks(plan: LabPlan) -> dict[str, int]:
    """Current size of every node's tunnel log: read only what comes after it."""
    return {n.name: _log_path(plan, n.name).stat().st_size for n in plan.nodes}


def _events(plan: LabPlan, node: str, since: int = 0) -> list[dict[str, Any]]:
    with open(_log_path(plan, node), "rb") as handle:
        handle.seek(since)
        text = handle.read().decode(errors="replace")
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                out.append(event)
    return out


def _closed(plan: LabPlan, node: str, since: int) -> list[dict[str, Any]]:
    return [e for e in _events(plan, node, since) if e.get("event") == "connection closed"]


def _wait_entry(plan: LabPlan, node: str, since: int, what: str, **want: str) -> dict[str, Any]:
    """The first access-log entry of ``node`` after ``since`` whose fields match ``want``."""

    def find() -> dict[str, Any] | None:
        for entry in _closed(plan, node, since):
            if all(entry.get(k) == v for k, v in want.items()):
                return entry
        return None

    deadline = time.monotonic() + WAIT_S
    for _ in range(int(WAIT_S / POLL_S) + 1):
        found = find()
        if found is not None:
            return found
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    seen = json.dumps(_closed(plan, node, since), indent=1)[-3000:]
    pytest.fail(
        f"{node} access log: no {what} entry matching {want}; entries since:\n{seen}\n{_diag(plan)}"
    )


def _diag(plan: LabPlan) -> str:
    """For failure messages: whether each node's daemons run, and their last log lines."""
    parts: list[str] = []
    for node in plan.nodes:
        for name in ("agent", "tunnel"):
            pid_file = Path(plan.node_run_dir(node.name)) / f"{name}.pid"
            try:
                pid: int | None = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                pid = None
            state = "running" if pid is not None and _running(pid) else "NOT running"
            try:
                lines = Path(netlab.process_log_path(plan, node.name, name)).read_text(
                    errors="replace"
                )
            except OSError as exc:
                lines = f"(no log: {exc})"
            tail = "\n    ".join(lines.splitlines()[-6:])
            parts.append(f"{node.name} {name} pid {pid} {state}; log tail:\n    {tail}")
    return "\n".join(parts)


def _identity(plan: LabPlan, pod: str) -> str:
    p = plan.pod(pod)
    return SpiffeId(TRUST_DOMAIN, p.namespace, p.service_account).uri


# -- traffic --------------------------------------------------------------------------


def _echo(plan: LabPlan, pod: str, host: str, payload: str = "ping") -> dict[str, Any]:
    out = _run_in(
        plan.pod(pod).netns, [sys.executable, "-c", ECHO_CLIENT, host, str(ECHO_PORT), payload]
    )
    assert out.returncode == 0, f"{pod} -> {host}: {out.stderr}"
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _echo_ok(plan: LabPlan, pod: str, host: str, payload: str = "ping") -> str:
    """Round trip through the echo server; returns the client address the server saw."""
    result = _echo(plan, pod, host, payload)
    assert result["error"] is None and result["echo_ok"], (
        f"{pod} -> {host}: {result}\n{_diag(plan)}"
    )
    return str(result["peer"])


def _curl(plan: LabPlan, pod: str, url: str) -> str:
    out = _run_in(
        plan.pod(pod).netns,
        ["curl", "-sS", "-g", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", url],
    )
    assert out.returncode == 0, f"curl {url} from {pod}: {out.stderr}\n{_diag(plan)}"
    return out.stdout.strip()


def _fmt(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


# -- capture --------------------------------------------------------------------------


@dataclass
class Capture:
    pcap: Path
    returncode: int | None = None
    stderr: str = ""


@contextlib.contextmanager
def _capture(plan: LabPlan, node: str, pcap: Path) -> Iterator[Capture]:
    """tcpdump on ``node``'s underlay interface for the duration of the block.

    ``--immediate-mode`` hands every packet to tcpdump at once and ``-U`` writes
    it at once, so after SIGINT the file holds everything seen (without them a
    short capture can end with "N received by filter, 0 captured").
    """
    ul = plan.node(node)
    proc = subprocess.Popen(
        netlab.nsenter_argv(
            ul.netns,
            [
                "tcpdump",
                "-i",
                ul.underlay_ifname,
                "-n",
                "-U",
                "--immediate-mode",
                "-Z",
                "root",
                "-w",
                str(pcap),
            ],
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    cap = Capture(pcap)
    try:
        assert proc.stderr is not None
        said: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("listening on" in s for s in said):
            if not select.select([proc.stderr], [], [], 0.5)[0]:
                continue
            line = proc.stderr.readline()
            if not line:
                break
            said.append(line)
        assert any("listening on" in s for s in said), f"tcpdump did not start: {said}"
        yield cap
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # tcpdump flushes and closes the file
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=10)
        cap.returncode, cap.stderr = proc.returncode, err or ""


@dataclass(frozen=True)
class Packet:
    src: str
    dst: str
    proto: str  # "tcp" | "udp" | "other"
    sport: int
    dport: int
    payload: bytes


def _packets(pcap: Path) -> list[Packet]:
    from scapy.layers.inet import IP, TCP, UDP  # slow import, only here
    from scapy.layers.inet6 import IPv6
    from scapy.packet import Raw
    from scapy.utils import rdpcap

    out: list[Packet] = []
    for pkt in rdpcap(str(pcap)):
        ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
        if ip is None:
            continue
        layer = pkt.getlayer(TCP) or pkt.getlayer(UDP)
        payload = bytes(pkt[Raw].load) if pkt.haslayer(Raw) else b""
        if layer is None:
            out.append(Packet(ip.src, ip.dst, "other", 0, 0, payload))
        else:
            proto = "tcp" if pkt.haslayer(TCP) else "udp"
            out.append(Packet(ip.src, ip.dst, proto, layer.sport, layer.dport, payload))
    return out


def _lab_address(plan: LabPlan) -> Callable[[str], bool]:
    """Whether an address belongs to a lab node (underlay) or a lab pod CIDR."""
    nodes = {
        ipaddress.ip_address(a) for n in plan.nodes for a in (n.underlay_ipv4, n.underlay_ipv6)
    }
    cidrs = [ipaddress.ip_network(c) for n in plan.nodes for c in n.pod_cidrs]

    def check(addr: str) -> bool:
        ip = ipaddress.ip_address(addr)
        return ip in nodes or any(ip.version == c.version and ip in c for c in cidrs)

    return check


# -- the lab --------------------------------------------------------------------------



def _wait_mesh_ready(plan: LabPlan) -> None:
    """Both tunnels know their own and the other node's enrolled pods."""
    for node in plan.nodes:
        mine = sum(p.enroll for p in node.pods)
        peers = sum(p.enroll for n in plan.nodes if n.name != node.name for p in n.pods)

        def loaded(node: str = node.name, mine: int = mine, peers: int = peers) -> bool:
            counts: dict[str, int] = {}
            for e in _events(plan, node):
                if e.get("event") in ("workloads loaded", "peer workloads loaded"):
                    counts[e["event"]] = e.get("count", 0)
            return (
                counts.get("workloads loaded") == mine
                and counts.get("peer workloads loaded") == peers
            )

        _until(f"tunnel on {node.name} loaded its workloads", loaded)


@pytest.fixture(scope="module")
def lab() -> Iterator[LabPlan]:
    """A two-node HBONE lab with servers in n2-a (echo, HTTP, iperf3) and n1-b (echo)."""
    prefix = "h" + secrets.token_hex(2)
    servers: list[subprocess.Popen[Any]] = []
    try:
        plan = netlab.up(build_plan(prefix),
                         after_topology=functools.partial(mesh.start_mesh, mode="hbone"))
        for pod in ("n2-a", "n2-b", "n1-b"):
            servers.append(_start_echo_server(plan, pod))
        http = [sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", "::"]
        servers.append(_start_quiet(plan, "n2-a", http))
        servers.append(_start_quiet(plan, "n2-a", ["iperf3", "-s", "-p", str(IPERF_PORT)]))
        _until(
            "HTTP and iperf3 servers listen in n2-a",
            lambda: _listening(plan.pod("n2-a").netns, [HTTP_PORT, IPERF_PORT]),
        )
        _wait_mesh_ready(plan)
        yield plan
    finally:
        for proc in servers:
            _stop(proc)
        with contextlib.suppress(Exception):
            netlab.down(prefix)
        if _leftovers(prefix):  # last resort, should never be needed
            for ns in netlab.existing_netns(prefix):
                with contextlib.suppress(OSError):
                    netns.remove(ns)
            shutil.rmtree(run_dir(prefix), ignore_errors=True)
        assert _leftovers(prefix) == []


# -- 1: cross-node traffic over HBONE -------------------------------------------------


def test_cross_node_curl_and_iperf3_go_over_hbone(lab: LabPlan) -> None:
    a1, a2 = lab.pod("n1-a"), lab.pod("n2-a")
    assert _identity(lab, "n1-a") == SA_A
    mark = _log_marks(lab)

    assert _curl(lab, "n1-a", f"http://{a2.ipv4}:{HTTP_PORT}/") == "200"
    assert _curl(lab, "n1-a", f"http://[{a2.ipv6}]:{HTTP_PORT}/") == "200"
    iperf = _run_in(
        a1.netns, ["iperf3", "-c", a2.ipv4, "-p", str(IPERF_PORT), "-t", "2", "-J"], timeout=60
    )
    assert iperf.returncode == 0, iperf.stdout[-2000:] + iperf.stderr
    report = json.loads(iperf.stdout)
    assert "error" not in report, report["error"]
    assert report["end"]["sum_received"]["bytes"] > 0

    for ip, peer in ((a2.ipv4, a1.ipv4), (a2.ipv6, a1.ipv6)):
        dst = _fmt(ip, HTTP_PORT)
        out = _wait_entry(
            lab, "node1", mark["node1"], f"outbound curl to {dst}", direction="outbound", dst=dst
        )
        assert out["path"] == "hbone", out
        assert out["src"].rsplit(":", 1)[0].strip("[]") == peer, out
        assert out["src_identity"] == SA_A, out
        assert out["dst_identity"] == _identity(lab, "n2-a"), out
        assert out["result"] == "ok", out
        assert out["bytes_received"] > 0, out
        inb = _wait_entry(
            lab, "node2", mark["node2"], f"inbound curl to {dst}", direction="inbound", dst=dst
        )
        assert inb["path"] == "hbone", inb
        assert inb["src"] == peer, inb  # the client pod's own address, from Forwarded
        assert inb["src_identity"] == SA_A, inb
        assert inb["dst_identity"] == _identity(lab, "n2-a"), inb
        assert inb["result"] == "ok", inb

    # iperf3: a control and a data connection, both tunnelled
    dst = _fmt(a2.ipv4, IPERF_PORT)
    out = _wait_entry(lab, "node1", mark["node1"], "outbound iperf3", dst=dst)
    assert (out["path"], out["src_identity"], out["dst_identity"]) == (
        "hbone",
        SA_A,
        _identity(lab, "n2-a"),
    )
    inb = _wait_entry(lab, "node2", mark["node2"], "inbound iperf3", dst=dst)
    assert (inb["path"], inb["src_identity"]) == ("hbone", SA_A)
    sent = sum(e["bytes_sent"] for e in _closed(lab, "node2", mark["node2"]) if e["dst"] == dst)
    assert sent >= report["end"]["sum_received"]["bytes"]
    # nothing of this went the plaintext way
    assert not [e for e in _closed(lab, "node2", mark["node2"]) if e["path"] != "hbone"]


# -- 2: the underlay carries only mTLS ------------------------------------------------


def test_underlay_carries_only_mtls_on_15008(lab: LabPlan, tmp_path: Path) -> None:
    a2 = lab.pod("n2-a")
    marker = secrets.token_hex(16)
    payload = marker * 64
    pcap = tmp_path / "underlay.pcap"
    with _capture(lab, "node1", pcap) as cap:
        for host in (a2.ipv4, a2.ipv6):
            assert _echo_ok(lab, "n1-a", host, payload)
    assert cap.returncode == 0, cap.stderr
    assert "0 packets dropped by kernel" in cap.stderr.splitlines(), cap.stderr

    assert marker.encode() not in pcap.read_bytes(), "the payload crossed the underlay in clear"
    packets = _packets(pcap)
    in_lab = _lab_address(lab)
    between = [p for p in packets if in_lab(p.src) and in_lab(p.dst)]
    assert between, f"the capture saw no lab traffic at all ({len(packets)} packets)"
    clear = [
        p
        for p in between
        if p.proto == "udp" or (p.proto == "tcp" and HBONE_PORT not in (p.sport, p.dport))
    ]
    assert not clear, f"traffic outside HBONE on the underlay: {clear[:5]}"
    tcp = [p for p in between if p.proto == "tcp"]
    assert all(marker.encode() not in p.payload for p in packets)
    # TLS records (handshake 0x16 or application data 0x17, version 0x03xx)
    records = [p for p in tcp if p.payload[:2] in (b"\x16\x03", b"\x17\x03")]
    assert records, "no TLS records on port 15008"
    # both families reached n2-a's HBONE port
    for ip in (a2.ipv4, a2.ipv6):
        assert any(p.dst == ip and p.dport == HBONE_PORT and p.payload for p in tcp), ip
        assert any(p.src == ip and p.sport == HBONE_PORT and p.payload for p in tcp), ip


# -- 3: the server sees the client pod's address ---------------------------------------


def test_server_sees_the_client_pod_address(lab: LabPlan) -> None:
    a1, b1, a2 = lab.pod("n1-a"), lab.pod("n1-b"), lab.pod("n2-a")
    mark = _log_marks(lab)
    cases = [
        (a2.ipv4, a1.ipv4, "hbone"),
        (a2.ipv6, a1.ipv6, "hbone"),
        (b1.ipv4, a1.ipv4, "hbone-local"),
        (b1.ipv6, a1.ipv6, "hbone-local"),
    ]
    for host, client_ip, path in cases:
        assert _echo_ok(lab, "n1-a", host) == client_ip, (host, path)
        entry = _wait_entry(
            lab,
            "node1",
            mark["node1"],
            f"outbound to {host}",
            direction="outbound",
            dst=_fmt(host, ECHO_PORT),
        )
        assert entry["path"] == path, entry
    # and on node2's side too: n2-b -> n2-a is same-node there
    assert _echo_ok(lab, "n2-b", a2.ipv4) == lab.pod("n2-b").ipv4


# -- 4: same node never touches the underlay -------------------------------------------


def test_same_node_is_hbone_local_and_stays_off_the_underlay(lab: LabPlan, tmp_path: Path) -> None:
    a1, b1, a2 = lab.pod("n1-a"), lab.pod("n1-b"), lab.pod("n2-a")
    marker = secrets.token_hex(16)
    pcap = tmp_path / "same-node.pcap"
    mark = _log_marks(lab)
    with _capture(lab, "node1", pcap) as cap:
        for host, peer in ((b1.ipv4, a1.ipv4), (b1.ipv6, a1.ipv6)):
            assert _echo_ok(lab, "n1-a", host, marker * 16) == peer
        # a cross-node probe proves the capture was live
        assert _echo_ok(lab, "n1-a", a2.ipv4) == a1.ipv4
    assert cap.returncode == 0, cap.stderr

    for host in (b1.ipv4, b1.ipv6):
        entry = _wait_entry(
            lab,
            "node1",
            mark["node1"],
            f"same-node to {host}",
            direction="outbound",
            dst=_fmt(host, ECHO_PORT),
        )
        assert entry["path"] == "hbone-local", entry
        assert entry["src_identity"] == SA_A, entry
        assert entry["dst_identity"] == _identity(lab, "n1-b"), entry
        assert entry["result"] == "ok", entry
        assert entry["bytes_sent"] == len(marker) * 16, entry
    # node2 never heard of it
    assert not [
        e
        for e in _closed(lab, "node2", mark["node2"])
        if e["dst"].startswith((b1.ipv4, f"[{b1.ipv6}]"))
    ]

    packets = _packets(pcap)
    assert any(p.dst == a2.ipv4 and p.dport == HBONE_PORT for p in packets), (
        "the capture missed the cross-node probe, so it proves nothing"
    )
    assert marker.encode() not in pcap.read_bytes()
    leaked = [p for p in packets if b1.ipv4 in (p.src, p.dst) or b1.ipv6 in (p.src, p.dst)]
    assert not leaked, leaked[:5]


# -- 5: the HBONE listener only trusts the mesh CA -------------------------------------


def _write_cert(directory: Path, name: str, cert: WorkloadCert) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    crt, key = directory / f"{name}.crt", directory / f"{name}.key"
    crt.write_bytes(cert.cert_pem)
    key.write_bytes(cert.key_pem)
    key.chmod(0o600)
    return {"cert": str(crt), "key": str(key)}


def _h2_connect(
    plan: LabPlan, files: dict[str, str], host: str, authority: str, send: str = "hello"
) -> dict[str, Any]:
    """One HBONE CONNECT from node1's netns (not a pod: the datapath does not
    capture it there; node2's datapath hands it to node2's 15008 listener)."""
    cfg = {
        **files,
        "trust": str(Path(plan.run_dir) / "ca" / "ca.crt"),
        "host": host,
        "port": HBONE_PORT,
        "authority": authority,
        "send": send,
    }
    out = _run_in(
        plan.node("node1").netns, [sys.executable, "-c", H2_CONNECT_CLIENT, json.dumps(cfg)]
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_foreign_ca_is_refused_and_the_mesh_ca_accepted(lab: LabPlan, tmp_path: Path) -> None:
    a2 = lab.pod("n2-a")
    node1_ip = lab.node("node1").underlay_ipv4
    who = SpiffeId(TRUST_DOMAIN, "default", "sa-a")  # impersonates n1-a's identity
    foreign = _write_cert(
        tmp_path, "foreign", init_ca(tmp_path / "foreign-ca", TRUST_DOMAIN).issue(who)
    )
    real = _write_cert(tmp_path, "real", load_ca(Path(lab.run_dir) / "ca").issue(who))
    authority = _fmt(a2.ipv4, ECHO_PORT)

    mark = _log_marks(lab)
    refused = _h2_connect(lab, foreign, a2.ipv4, authority)
    assert refused["status"] is None, refused
    assert refused["error"] is not None, refused
    assert refused["data"] == "", refused
    failed = _until(
        "node2 logs the failed handshake",
        lambda: [
            e
            for e in _events(lab, "node2", mark["node2"])
            if e.get("event") == "HBONE TLS handshake failed"
        ],
    )
    assert failed[0]["dst"] == a2.ipv4 and failed[0]["peer"] == node1_ip, failed
    assert "certificate" in failed[0]["reason"].lower(), failed
    assert not [e for e in _closed(lab, "node2", mark["node2"]) if e["src"] == node1_ip]

    # counter-check: the same request with the mesh CA's certificate goes through
    mark = _log_marks(lab)
    ok = _h2_connect(lab, real, a2.ipv4, authority, send="hello")
    assert ok["handshake"] and ok["alpn"] == "h2", ok
    assert ok["status"] == 200, ok
    assert ok["error"] is None, ok
    assert ok["data"].startswith("peer ") and ok["data"].endswith("\nhello"), ok
    entry = _wait_entry(
        lab, "node2", mark["node2"], "accepted CONNECT", direction="inbound", dst=authority
    )
    assert (entry["path"], entry["result"], entry["src_identity"]) == ("hbone", "ok", SA_A)
    assert entry["dst_identity"] == _identity(lab, "n2-a"), entry


# -- 6: :authority must name the connection's own destination -------------------------


def test_authority_of_another_pod_is_rejected(lab: LabPlan, tmp_path: Path) -> None:
    a2, b2 = lab.pod("n2-a"), lab.pod("n2-b")
    who = SpiffeId(TRUST_DOMAIN, "default", "sa-a")
    real = _write_cert(tmp_path, "real", load_ca(Path(lab.run_dir) / "ca").issue(who))
    mark = _log_marks(lab)
    wrong = _fmt(b2.ipv4, ECHO_PORT)
    result = _h2_connect(lab, real, a2.ipv4, wrong)
    assert result["handshake"], result
    assert result["status"] == 400, result
    assert result["data"] == "", result
    entry = _wait_entry(
        lab, "node2", mark["node2"], "refused CONNECT", direction="inbound", dst=wrong
    )
    assert entry["result"] == "refused" and ":authority" in entry["reason"], entry
    assert (entry["bytes_sent"], entry["bytes_received"]) == (0, 0), entry


# -- 7: strict inbound mode (last: it restarts node2's tunnel) -------------------------


def _restart_tunnel(plan: LabPlan, node: str, extra_env: dict[str, str]) -> None:
    """Stop ``node``'s tunnel (bounded) and start it again with ``extra_env``."""
    pid_file = Path(plan.node_run_dir(node)) / "tunnel.pid"
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGTERM)
        _until(f"old tunnel on {node} exits", lambda: not _running(pid))
    env = {**mesh.node_env(plan, plan.node(node), "hbone"), **extra_env}
    netlab.start_node_process(plan, node, "tunnel", [sys.executable, "-m", "agent", "tunnel"], env)
    # The tunnel loads its workloads before it opens its listeners, so once
    # they listen it knows every pod.
    sock = mesh.agent_socket(plan, node)
    ports = {HBONE_PORT, INBOUND_PORT, 15001}
    _until(
        f"new tunnel on {node} listens",
        lambda: ports <= set(client.call(sock, {"op": "status"}, timeout=5)["listeners"]),
    )


def test_strict_mode_refuses_plaintext_but_not_hbone(lab: LabPlan) -> None:
    a1, plain1, a2 = lab.pod("n1-a"), lab.pod("n1-plain"), lab.pod("n2-a")
    try:
        _restart_tunnel(lab, "node2", {"MESHAGENT_TUNNEL_INBOUND_MODE": "strict"})
        mark = _log_marks(lab)
        refused = _echo(lab, "n1-plain", a2.ipv4)
        assert refused["error"] is not None and refused["peer"] is None, refused
        entry = _wait_entry(
            lab, "node2", mark["node2"], "strict refusal", direction="inbound", path="plain"
        )
        assert entry["result"] == "refused" and "strict" in entry["reason"], entry
        assert entry["src"].startswith(plain1.ipv4 + ":"), entry

        assert _echo_ok(lab, "n1-a", a2.ipv4) == a1.ipv4
        entry = _wait_entry(
            lab,
            "node2",
            mark["node2"],
            "HBONE in strict mode",
            direction="inbound",
            path="hbone",
            src=a1.ipv4,
        )
        assert (entry["result"], entry["src_identity"]) == ("ok", SA_A), entry
    finally:
        _restart_tunnel(lab, "node2", {})
    # permissive again: plaintext from outside the mesh is served
    assert _echo_ok(lab, "n1-plain", a2.ipv4) == plain1.ipv4
