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
* the outer HBONE connection leaves from the client pod's own address (IP_TRANSPARENT
  bind), and its replies find their way back to the tunnel socket through the
  pod's veth, meshtun0 and the established-socket assign;
* the 15008 listener refuses a client certificate from a foreign CA (and records a
  ``tls_failed`` connection), accepts the mesh CA's.

The :authority, status-code, identity-vs-address, traceparent and baggage rules
need no kernel: tests/unit/tunnel/test_tunnel_hbone.py.
* strict inbound mode refuses plaintext from outside the mesh (runs last and
  restores permissive mode).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from labkit import (
    Capture,
    Lab,
    LabSpec,
    closed_records,
    diagnose,
    listening,
    log_events,
    mark,
    program,
    run_in,
    running,
    until,
    wait_entry,
)
from labkit import addr as _fmt
from labkit import lab_address as _lab_address

from agent.identity.ca import WorkloadCert, init_ca, load_ca
from agent.identity.spiffe import SpiffeId

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(240)]

LAB = LabSpec(letter="h", mode="hbone", pod_networks=("veth", "cni", "cni-bridge"))
TRUST_DOMAIN = "cluster.local"
SA_A = "spiffe://cluster.local/ns/default/sa/sa-a"
ECHO_PORT = 18080  # programs/peer_echo_server.py in n2-a, n2-b, n1-b
HTTP_PORT = 8080
IPERF_PORT = 5201
HBONE_PORT = 15008
INBOUND_PORT = 15006


# -- access log -----------------------------------------------------------------------


def _identity(lab: Lab, pod: str) -> str:
    p = lab.pod(pod)
    return SpiffeId(TRUST_DOMAIN, p.namespace, p.service_account).uri


# -- traffic --------------------------------------------------------------------------


def _echo(lab: Lab, pod: str, host: str, payload: str = "ping") -> dict[str, Any]:
    out = run_in(lab.ns(pod), [*program("echo_client"), host, str(ECHO_PORT), payload])
    assert out.returncode == 0, f"{pod} -> {host}: {out.stderr}"
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _echo_ok(lab: Lab, pod: str, host: str, payload: str = "ping") -> str:
    """Round trip through the echo server; returns the client address the server saw."""
    result = _echo(lab, pod, host, payload)
    assert result["error"] is None and result["echo_ok"], (
        f"{pod} -> {host}: {result}\n{diagnose(lab)}"
    )
    return str(result["peer"])


def _curl(lab: Lab, pod: str, url: str) -> str:
    out = run_in(
        lab.ns(pod),
        ["curl", "-sS", "-g", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", url],
    )
    assert out.returncode == 0, f"curl {url} from {pod}: {out.stderr}\n{diagnose(lab)}"
    return out.stdout.strip()


# -- the lab --------------------------------------------------------------------------


def _wait_mesh_ready(lab: Lab) -> None:
    """Both tunnels know their own and the other node's enrolled pods."""
    plan = lab.plan
    for node in plan.nodes:
        mine = sum(p.enroll for p in node.pods)
        peers = sum(p.enroll for n in plan.nodes if n.name != node.name for p in n.pods)

        def loaded(node: str = node.name, mine: int = mine, peers: int = peers) -> bool:
            counts: dict[str, int] = {}
            for e in log_events(lab, node):
                if e.get("event") in ("workloads loaded", "peer workloads loaded"):
                    counts[e["event"]] = e.get("count", 0)
            return (
                counts.get("workloads loaded") == mine
                and counts.get("peer workloads loaded") == peers
            )

        until(f"tunnel on {node.name} loaded its workloads", loaded)


@pytest.fixture(scope="module")
def lab(mesh_lab: Lab) -> Lab:
    """The HBONE lab with servers in n2-a (echo, HTTP, iperf3), n2-b and n1-b (echo)."""
    lab = mesh_lab
    for pod in ("n2-a", "n2-b", "n1-b"):
        lab.background.start(lab.ns(pod), f"echo-{pod}",
                             [*program("peer_echo_server"), str(ECHO_PORT)], ready_line="ready")
    http = [sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", "::"]
    lab.background.start(lab.ns("n2-a"), "http-n2-a", http)
    lab.background.start(lab.ns("n2-a"), "iperf3-n2-a", ["iperf3", "-s", "-p", str(IPERF_PORT)])
    until(
        "HTTP and iperf3 servers listen in n2-a",
        lambda: listening(lab.ns("n2-a"), [HTTP_PORT, IPERF_PORT]),
    )
    _wait_mesh_ready(lab)
    return lab


# -- 1: cross-node traffic over HBONE -------------------------------------------------


def test_cross_node_curl_and_iperf3_go_over_hbone(lab: Lab) -> None:
    a1, a2 = lab.pod("n1-a"), lab.pod("n2-a")
    assert _identity(lab, "n1-a") == SA_A
    since = mark(lab)

    assert _curl(lab, "n1-a", f"http://{a2.ipv4}:{HTTP_PORT}/") == "200"
    assert _curl(lab, "n1-a", f"http://[{a2.ipv6}]:{HTTP_PORT}/") == "200"
    iperf = run_in(
        a1.netns, ["iperf3", "-c", a2.ipv4, "-p", str(IPERF_PORT), "-t", "2", "-J"], timeout=60
    )
    assert iperf.returncode == 0, iperf.stdout[-2000:] + iperf.stderr
    report = json.loads(iperf.stdout)
    assert "error" not in report, report["error"]
    assert report["end"]["sum_received"]["bytes"] > 0

    for ip, peer in ((a2.ipv4, a1.ipv4), (a2.ipv6, a1.ipv6)):
        dst = _fmt(ip, HTTP_PORT)
        out = wait_entry(
            lab, "node1", since["node1"], f"outbound curl to {dst}", direction="outbound", dst=dst
        )
        assert out["path"] == "hbone", out
        assert out["src"].rsplit(":", 1)[0].strip("[]") == peer, out
        assert out["src_identity"] == SA_A, out
        assert out["dst_identity"] == _identity(lab, "n2-a"), out
        assert out["result"] == "ok", out
        assert out["bytes_received"] > 0, out
        inb = wait_entry(
            lab, "node2", since["node2"], f"inbound curl to {dst}", direction="inbound", dst=dst
        )
        assert inb["path"] == "hbone", inb
        assert inb["src"] == peer, inb  # the outer connection's TCP peer: the pod itself
        assert inb["src_identity"] == SA_A, inb
        assert inb["dst_identity"] == _identity(lab, "n2-a"), inb
        assert inb["result"] == "ok", inb

    # iperf3: a control and a data connection, both tunnelled
    dst = _fmt(a2.ipv4, IPERF_PORT)
    out = wait_entry(lab, "node1", since["node1"], "outbound iperf3", dst=dst)
    assert (out["path"], out["src_identity"], out["dst_identity"]) == (
        "hbone",
        SA_A,
        _identity(lab, "n2-a"),
    )
    inb = wait_entry(lab, "node2", since["node2"], "inbound iperf3", dst=dst)
    assert (inb["path"], inb["src_identity"]) == ("hbone", SA_A)
    sent = sum(e["bytes_sent"] for e in closed_records(lab, "node2", since["node2"])
               if e["dst"] == dst)
    assert sent >= report["end"]["sum_received"]["bytes"]
    # nothing of this went the plaintext way
    assert not [e for e in closed_records(lab, "node2", since["node2"]) if e["path"] != "hbone"]


# -- 2: the underlay carries only mTLS ------------------------------------------------


def test_underlay_carries_only_mtls_on_15008(lab: Lab, tmp_path: Path) -> None:
    a2 = lab.pod("n2-a")
    marker = secrets.token_hex(16)
    payload = marker * 64
    pcap = tmp_path / "underlay.pcap"
    with Capture(lab.ns("node1"), pcap=pcap) as cap:
        for host in (a2.ipv4, a2.ipv6):
            assert _echo_ok(lab, "n1-a", host, payload)
    assert cap.returncode == 0, cap.stderr
    assert "0 packets dropped by kernel" in cap.stderr.splitlines(), cap.stderr

    assert marker.encode() not in pcap.read_bytes(), "the payload crossed the underlay in clear"
    packets = cap.packets()
    in_lab = _lab_address(lab.plan)
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
    # both families reached n2-a's HBONE port, from n1-a's own address (not node1's)
    a1 = lab.pod("n1-a")
    for ip, src in ((a2.ipv4, a1.ipv4), (a2.ipv6, a1.ipv6)):
        assert any(p.dst == ip and p.dport == HBONE_PORT and p.payload for p in tcp), ip
        assert any(p.src == ip and p.sport == HBONE_PORT and p.payload for p in tcp), ip
        outer = {p.src for p in tcp if p.dst == ip and p.dport == HBONE_PORT}
        assert outer == {src}, outer


# -- 3: the server sees the client pod's address ---------------------------------------


def test_server_sees_the_client_pod_address(lab: Lab) -> None:
    a1, b1, a2 = lab.pod("n1-a"), lab.pod("n1-b"), lab.pod("n2-a")
    since = mark(lab)
    cases = [
        (a2.ipv4, a1.ipv4, "hbone"),
        (a2.ipv6, a1.ipv6, "hbone"),
        (b1.ipv4, a1.ipv4, "hbone-local"),
        (b1.ipv6, a1.ipv6, "hbone-local"),
    ]
    for host, client_ip, path in cases:
        assert _echo_ok(lab, "n1-a", host) == client_ip, (host, path)
        entry = wait_entry(
            lab,
            "node1",
            since["node1"],
            f"outbound to {host}",
            direction="outbound",
            dst=_fmt(host, ECHO_PORT),
        )
        assert entry["path"] == path, entry
    # and on node2's side too: n2-b -> n2-a is same-node there
    assert _echo_ok(lab, "n2-b", a2.ipv4) == lab.pod("n2-b").ipv4


# -- 4: same node never touches the underlay -------------------------------------------


def test_same_node_is_hbone_local_and_stays_off_the_underlay(lab: Lab, tmp_path: Path) -> None:
    a1, b1, a2 = lab.pod("n1-a"), lab.pod("n1-b"), lab.pod("n2-a")
    marker = secrets.token_hex(16)
    pcap = tmp_path / "same-node.pcap"
    since = mark(lab)
    with Capture(lab.ns("node1"), pcap=pcap) as cap:
        for host, peer in ((b1.ipv4, a1.ipv4), (b1.ipv6, a1.ipv6)):
            assert _echo_ok(lab, "n1-a", host, marker * 16) == peer
        # a cross-node probe proves the capture was live
        assert _echo_ok(lab, "n1-a", a2.ipv4) == a1.ipv4
    assert cap.returncode == 0, cap.stderr

    for host in (b1.ipv4, b1.ipv6):
        entry = wait_entry(
            lab,
            "node1",
            since["node1"],
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
        for e in closed_records(lab, "node2", since["node2"])
        if e["dst"].startswith((b1.ipv4, f"[{b1.ipv6}]"))
    ]

    packets = cap.packets()
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
    lab: Lab, files: dict[str, str], host: str, authority: str, send: str = "hello"
) -> dict[str, Any]:
    """One HBONE CONNECT from node1's netns (not a pod: the datapath does not
    capture it there; node2's datapath hands it to node2's 15008 listener)."""
    cfg = {
        **files,
        "trust": str(Path(lab.run_dir) / "ca" / "ca.crt"),
        "host": host,
        "port": HBONE_PORT,
        "authority": authority,
        "send": send,
    }
    out = run_in(lab.ns("node1"), [*program("h2_connect_client"), json.dumps(cfg)])
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_foreign_ca_is_refused_and_the_mesh_ca_accepted(lab: Lab, tmp_path: Path) -> None:
    a2 = lab.pod("n2-a")
    node1_ip = lab.node("node1").underlay_ipv4
    who = SpiffeId(TRUST_DOMAIN, "default", "sa-a")  # impersonates n1-a's identity
    foreign = _write_cert(
        tmp_path, "foreign", init_ca(tmp_path / "foreign-ca", TRUST_DOMAIN).issue(who)
    )
    real = _write_cert(tmp_path, "real", load_ca(Path(lab.run_dir) / "ca").issue(who))
    authority = _fmt(a2.ipv4, ECHO_PORT)

    since = mark(lab)
    refused = _h2_connect(lab, foreign, a2.ipv4, authority)
    assert refused["status"] is None, refused
    assert refused["error"] is not None, refused
    assert refused["data"] == "", refused
    failed = until(
        "node2 logs the failed handshake",
        lambda: [
            e
            for e in log_events(lab, "node2", since["node2"])
            if e.get("event") == "HBONE TLS handshake failed"
        ],
    )
    assert failed[0]["dst"] == a2.ipv4 and failed[0]["peer"] == node1_ip, failed
    assert "certificate" in failed[0]["reason"].lower(), failed
    # ... and it is a connection like any other: one access-log line, TLS_FAILURE
    entry = wait_entry(lab, "node2", since["node2"], "tls_failed record", src=node1_ip)
    assert (entry["result"], entry["response_flags"]) == ("tls_failed", "TLS_FAILURE"), entry

    # counter-check: the same request with the mesh CA's certificate goes through
    since = mark(lab)
    ok = _h2_connect(lab, real, a2.ipv4, authority, send="hello")
    assert ok["handshake"] and ok["alpn"] == "h2", ok
    assert ok["status"] == 200, ok
    assert ok["error"] is None, ok
    assert ok["data"].startswith("peer ") and ok["data"].endswith("\nhello"), ok
    entry = wait_entry(
        lab, "node2", since["node2"], "accepted CONNECT", direction="inbound", dst=authority
    )
    assert (entry["path"], entry["result"], entry["src_identity"]) == ("hbone", "ok", SA_A)
    assert entry["dst_identity"] == _identity(lab, "n2-a"), entry


# -- 7: strict inbound mode (last: it restarts node2's tunnel) -------------------------


def _restart_tunnel(lab: Lab, node: str, extra_env: dict[str, str]) -> None:
    """Stop ``node``'s tunnel (bounded) and start it again with ``extra_env``."""
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        pid = lab.tunnel_pid(node)
        os.kill(pid, signal.SIGTERM)
        until(f"old tunnel on {node} exits", lambda: not running(pid))
    lab.start_daemon(node, "tunnel", extra_env=extra_env)
    # The tunnel loads its workloads before it opens its listeners, so once
    # they listen it knows every pod.
    ports = {HBONE_PORT, INBOUND_PORT, 15001}
    until(
        f"new tunnel on {node} listens",
        lambda: ports <= set(lab.api(node, {"op": "status"}, timeout=5)["listeners"]),
    )


def test_strict_mode_refuses_plaintext_but_not_hbone(lab: Lab) -> None:
    a1, plain1, a2 = lab.pod("n1-a"), lab.pod("n1-plain"), lab.pod("n2-a")
    try:
        _restart_tunnel(lab, "node2", {"MESHAGENT_TUNNEL_INBOUND_MODE": "strict"})
        since = mark(lab)
        refused = _echo(lab, "n1-plain", a2.ipv4)
        assert refused["error"] is not None and refused["peer"] is None, refused
        entry = wait_entry(
            lab, "node2", since["node2"], "strict refusal", direction="inbound", path="plain"
        )
        assert entry["result"] == "refused" and "strict" in entry["reason"], entry
        assert entry["src"].startswith(plain1.ipv4 + ":"), entry

        assert _echo_ok(lab, "n1-a", a2.ipv4) == a1.ipv4
        entry = wait_entry(
            lab,
            "node2",
            since["node2"],
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
