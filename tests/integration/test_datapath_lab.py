"""The datapath and the plain tunnel against the real kernel, in one lab (root).

One module-scoped lab (prefix ``d`` + 4 hex digits, plain tunnel mode) with
small servers in the pods; every test sends real traffic and checks what the
endpoints saw and what the tunnels logged. The lab is removed at the end of
the module whatever happened, servers included.

How "went direct" is told apart from "went through a tunnel": the tunnel dials
the destination from the client's IP but a new source port, so a server that
sees the client's own (ip, port) got a direct connection; and a tunnel's
access log has one ``connection closed`` record per proxied connection. Checks
that a tunnel logged *nothing* first push a marker connection through both
tunnels and wait for its records (``flush_tunnel_logs``), so they never race.

The last test stops node1's tunnel (fail closed), so it must stay last.
"""

from __future__ import annotations

import functools
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from labkit import (
    Lab,
    LabSpec,
    addr,
    closed_records,
    curl,
    diagnose,
    flush_tunnel_logs,
    mark,
    meshagent_cli,
    our_filters,
    program,
    qdiscs,
    run_in,
    run_program,
    split_addr,
    wait_record,
    wait_until,
)

from agent.api import client
from agent.lab.topology import PodPlan
from agent.tunnel.relay import BUFFER_SIZE as RELAY_BUFFER

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(240)]

# Pods made by Debian's CNI plugins: ptp, and bridge with br_netfilter on.
LAB = LabSpec(letter="d", mode="plain", pod_networks=("cni", "cni-bridge"))
HTTP_PORT = 8080   # datapath_server.py: replies "server=<name> peer=<ip> port=<port>"
HALF_PORT = 9000   # reads to EOF, then replies (half-close)
UDP_PORT = 9001    # UDP echo: replies "<peer ip> <peer port> <data>"
IPERF_PORT = 5201
IPERF_COOKIE = 37  # iperf3 opens each data stream with a cookie of this size
REPLY_BYTES = 300_000  # what the half-close server sends after the client's EOF
SERVER_PODS = ("n2-a", "n1-b", "n2-plain")


def _ip(pod: PodPlan, family: int) -> str:
    return str(pod.ipv4 if family == 4 else pod.ipv6)


def _listening(lab: Lab, pod: str, port: int) -> bool:
    out = run_in(lab.ns(pod), ["ss", "-Hltn", f"sport = :{port}"], timeout=10)
    return out.returncode == 0 and bool(out.stdout.strip())


def _is_marker(lab: Lab, rec: dict[str, Any]) -> bool:
    """A record of :func:`flush_tunnel_logs`' marker connection n1-a -> n2-a."""
    return (split_addr(rec["src"])[0] == str(lab.plan.pod("n1-a").ipv4)
            and rec["dst"] == addr(str(lab.plan.pod("n2-a").ipv4), HTTP_PORT))


def _unexplained(lab: Lab, since: dict[str, int], node: str,
                 expected: tuple[dict[str, Any], ...] = ()) -> list[dict[str, Any]]:
    """New records on ``node`` other than the marker's and ``expected``."""
    return [r for r in closed_records(lab, node, since)
            if not _is_marker(lab, r) and r not in expected]


def _tunnel_listening(lab: Lab, node: str) -> bool:
    return 15001 in lab.api(node, {"op": "status"})["listeners"]


@pytest.fixture(scope="module")
def lab(mesh_lab: Lab) -> Lab:
    """The plain-mode lab (conftest's ``mesh_lab``) with servers running."""
    lab = mesh_lab
    for pod in SERVER_PODS:
        lab.background.start(
            lab.ns(pod), f"server-{pod}",
            [*program("datapath_server"), pod, str(HTTP_PORT), str(HALF_PORT),
             str(UDP_PORT), str(REPLY_BYTES)],
            ready_line="ready")
    lab.background.start(lab.ns("n2-a"), "iperf3-n2-a", ["iperf3", "-s", "-p", str(IPERF_PORT)])
    wait_until("iperf3 listening in n2-a", lambda: _listening(lab, "n2-a", IPERF_PORT),
               interval=0.1)
    # the tunnels know the enrolled workloads (inbound refuses unknown destinations)
    for node in ("node1", "node2"):
        wait_until(f"{node}'s tunnel ready", functools.partial(_tunnel_listening, lab, node))
    return lab


# -- 1. curl through the tunnels ------------------------------------------------------


@pytest.mark.parametrize(
    ("client_pod", "server_pod", "family"),
    [("n1-a", "n2-a", 4), ("n1-a", "n2-a", 6), ("n1-a", "n1-b", 4), ("n1-a", "n1-b", 6)],
    ids=["cross-node-v4", "cross-node-v6", "same-node-v4", "same-node-v6"],
)
def test_curl_between_enrolled_pods_goes_through_the_tunnels(
    lab: Lab, client_pod: str, server_pod: str, family: int
) -> None:
    c, s = lab.plan.pod(client_pod), lab.plan.pod(server_pod)
    cip, sip = _ip(c, family), _ip(s, family)
    since = mark(lab)

    res = curl(lab.ns(client_pod), sip, HTTP_PORT)

    assert (res.rc, res.status) == (0, 200), res
    assert res.local_ip == cip
    seen = res.server_view()
    assert seen["server"] == server_pod
    assert seen["peer"] == cip, "the server must see the client pod's own address (no NAT)"
    out = wait_record(lab, c.node, since,
                      lambda r: r["direction"] == "outbound"
                      and r["src"] == addr(cip, res.local_port),
                      f"outbound record of {cip}:{res.local_port}")
    assert out["dst"] == addr(sip, HTTP_PORT), "the original destination, exactly"
    assert (out["path"], out["result"]) == ("plain", "ok")
    assert out["bytes_sent"] > 0 and out["bytes_received"] > 0
    if s.node != c.node:
        inb = wait_record(lab, s.node, since,
                          lambda r: r["direction"] == "inbound"
                          and r["dst"] == addr(sip, HTTP_PORT)
                          and split_addr(r["src"])[0] == cip,
                          f"inbound record from {cip} to {sip}")
        assert (inb["path"], inb["result"]) == ("plain", "ok")
        assert inb["bytes_received"] == out["bytes_received"]
        assert inb["bytes_sent"] == out["bytes_sent"]


# -- 2. half-close ----------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_half_close_carries_bytes_both_ways(lab: Lab, family: int) -> None:
    c, s = lab.plan.pod("n1-a"), lab.plan.pod("n2-a")
    size = 1_000_003  # several relay buffers, not a round number
    since = mark(lab)

    r = run_program(lab.ns("n1-a"), "half_close_client", _ip(s, family), str(HALF_PORT), str(size),
                  str(REPLY_BYTES))

    # the server read everything up to the client's EOF, then still replied
    assert r["head"] == f"{size} {r['sha']} {_ip(c, family)}"
    assert r["reply_ok"], "the reply sent after the client's shutdown(SHUT_WR) arrived intact"
    out = wait_record(lab, "node1", since,
                      lambda rec: rec["src"] == addr(r["local_ip"], r["local_port"]),
                      "the half-close connection's outbound record")
    assert out["dst"] == addr(_ip(s, family), HALF_PORT)
    assert (out["bytes_sent"], out["bytes_received"], out["result"]) == (size, r["total"], "ok")
    inb = wait_record(lab, "node2", since,
                      lambda rec: rec["direction"] == "inbound"
                      and rec["dst"] == addr(_ip(s, family), HALF_PORT),
                      "the half-close connection's inbound record")
    assert (inb["bytes_sent"], inb["bytes_received"], inb["result"]) == (size, r["total"], "ok")


# -- 3. iperf3 ----------------------------------------------------------------------------


def test_iperf3_cross_node_is_fully_accounted_by_the_tunnels(lab: Lab) -> None:
    s = lab.plan.pod("n2-a")
    since = mark(lab)
    out = run_in(lab.ns("n1-a"),
                   ["iperf3", "-c", str(s.ipv4), "-p", str(IPERF_PORT), "-t", "2", "-J"],
                   timeout=60)
    assert out.returncode == 0, f"iperf3 failed: {out.stdout[-2000:]} {out.stderr}"
    end = json.loads(out.stdout)["end"]
    sent, received = end["sum_sent"]["bytes"], end["sum_received"]["bytes"]
    assert received > 0

    dst = addr(str(s.ipv4), IPERF_PORT)
    # iperf3 opens a control and a data connection; the data one carries the
    # bulk. Wait for both records on both nodes (the control connection may
    # close a little after iperf3 exits), so none lands in a later test's window.
    conns: dict[str, list[dict[str, Any]]] = {}
    for node, direction in (("node1", "outbound"), ("node2", "inbound")):

        def both(n: str = node, d: str = direction) -> list[dict[str, Any]] | None:
            rs = [r for r in closed_records(lab, n, since)
                  if r["dst"] == dst and r["direction"] == d]
            return rs if len(rs) >= 2 else None

        conns[node] = wait_until(f"{node}'s two records to {dst}", both, timeout=10)
        assert len(conns[node]) == 2, conns[node]
    out1 = max(conns["node1"], key=lambda r: r["bytes_sent"])
    in2 = max(conns["node2"], key=lambda r: r["bytes_sent"])

    def slack(rec: dict[str, Any]) -> int:
        # Known product bug (agent/tunnel/relay.py, _copy): bytes are counted
        # only after a whole sock_sendall() succeeds, so when the peer resets
        # mid-send the part of that buffer already written is not counted: a
        # "reset" record may under-report by up to one relay buffer.
        return RELAY_BUFFER if rec["result"] == "reset" else 0

    # Every byte the server read passed both tunnels, and no tunnel forwarded
    # more than it was given: received <= node2 <= node1 <= sent, where the data
    # connection also carries iperf3's 37-byte cookie, which iperf3 does not
    # count. node1 is often below `sent`: iperf3's server closes its data socket
    # when the control connection says the test is over, which resets the data
    # connection while the client's last bytes are still in the relays (any
    # buffering L4 proxy does this), so "bytes_sent >= iperf3's sent" cannot hold.
    assert received + IPERF_COOKIE <= in2["bytes_sent"] + slack(in2), (received, in2)
    assert in2["bytes_sent"] <= out1["bytes_sent"] + slack(out1), (in2, out1)
    assert out1["bytes_sent"] <= sent + IPERF_COOKIE, (out1, sent)


# -- 4. the non-enrolled pod -------------------------------------------------------------


def test_non_enrolled_pod_is_untouched_and_reaches_enrolled_pods_via_inbound(lab: Lab) -> None:
    p1, p2, a2 = lab.plan.pod("n1-plain"), lab.plan.pod("n2-plain"), lab.plan.pod("n2-a")
    since = mark(lab)

    for family in (4, 6):
        res = curl(lab.ns("n1-plain"), _ip(p2, family), HTTP_PORT)
        assert (res.rc, res.status) == (0, 200), res
        seen = res.server_view()
        # the server saw the client's own socket: nothing proxied it
        assert (seen["peer"], int(seen["port"])) == (_ip(p1, family), res.local_port)

    res = curl(lab.ns("n1-plain"), str(a2.ipv4), HTTP_PORT)
    assert (res.rc, res.status) == (0, 200), res
    assert res.server_view()["peer"] == str(p1.ipv4)
    inb = wait_record(lab, "node2", since,
                      lambda r: r["src"] == addr(str(p1.ipv4), res.local_port),
                      "node2's inbound record of n1-plain -> n2-a")
    assert (inb["direction"], inb["dst"], inb["result"]) == (
        "inbound", addr(str(a2.ipv4), HTTP_PORT), "ok")

    flush_tunnel_logs(lab, HTTP_PORT)
    assert _unexplained(lab, since, "node1") == []
    assert _unexplained(lab, since, "node2", expected=(inb,)) == []


# -- 5. ICMP and UDP ------------------------------------------------------------------------


def test_icmp_and_udp_from_an_enrolled_pod_are_not_captured(lab: Lab) -> None:
    a2, b1 = lab.plan.pod("n2-a"), lab.plan.pod("n1-b")
    targets = [str(a2.ipv4), str(a2.ipv6), str(b1.ipv4), str(b1.ipv6)]
    since = mark(lab)

    for target in targets:
        ping = run_in(lab.ns("n1-a"), ["ping", "-c", "2", "-W", "2", target], timeout=20)
        assert ping.returncode == 0, f"ping {target}: {ping.stdout} {ping.stderr}"
    for target in targets:
        r = run_program(lab.ns("n1-a"), "udp_client", target, str(UDP_PORT), timeout=30)
        assert r["reply"] is not None, f"no UDP echo from {target}"
        # the echo server saw the pod's own socket
        assert r["reply"].startswith(f"{r['local_ip']} {r['local_port']} hello-"), r

    flush_tunnel_logs(lab, HTTP_PORT)
    assert _unexplained(lab, since, "node1") == []
    assert _unexplained(lab, since, "node2") == []


# -- 6. node-address traffic ------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_node_to_pod_traffic_is_not_captured(lab: Lab, family: int) -> None:
    since = mark(lab)

    res = curl(lab.ns("node2"), _ip(lab.plan.pod("n2-a"), family), HTTP_PORT)

    assert (res.rc, res.status) == (0, 200), res
    seen = res.server_view()
    assert (seen["peer"], int(seen["port"])) == (res.local_ip, res.local_port)
    flush_tunnel_logs(lab, HTTP_PORT)
    assert _unexplained(lab, since, "node2") == []
    assert _unexplained(lab, since, "node1") == []


# -- 7. pod del / re-enroll ---------------------------------------------------------------------


def test_pod_del_restores_the_direct_path_and_reenrolling_is_exact(lab: Lab) -> None:
    listed = meshagent_cli(["lab", "list", "--prefix", lab.prefix, "--json"])
    assert listed.returncode == 0, listed.stderr
    entry = next(p for n in json.loads(listed.stdout)["nodes"] for p in n["pods"]
                 if p["name"] == "n1-b")
    add_req = {"op": "pod_add", "netns": entry["netns"], "name": entry["name"],
               "namespace": entry["namespace"], "service_account": entry["service_account"]}
    del_req = {"op": "pod_del", "name": entry["name"], "namespace": entry["namespace"]}
    node_ns, dev = lab.ns("node1"), entry["host_ifname"]
    b1, p2 = lab.plan.pod("n1-b"), lab.plan.pod("n2-plain")

    def filters() -> tuple[int, int]:
        return (len(our_filters(node_ns, dev, "ingress")),
                len(our_filters(node_ns, dev, "egress")))

    def enrolled() -> list[str]:
        return [p["name"] for p in lab.api("node1", {"op": "pod_list"})]

    def assert_nothing_of_ours() -> None:
        assert filters() == (0, 0)
        assert "clsact" not in qdiscs(node_ns, dev), "enrollment created clsact, del removes it"

    assert filters() == (1, 1)
    try:
        removed = lab.api("node1", del_req)
        assert (removed["name"], removed["host_ifname"]) == ("n1-b", dev)
        assert "n1-b" not in enrolled()
        assert_nothing_of_ours()

        # direct again: the server sees n1-b's own socket, node1's tunnel saw nothing
        since = mark(lab)
        res = curl(lab.ns("n1-b"), str(p2.ipv4), HTTP_PORT)
        assert (res.rc, res.status) == (0, 200), res
        seen = res.server_view()
        assert (seen["peer"], int(seen["port"])) == (str(b1.ipv4), res.local_port)
        flush_tunnel_logs(lab, HTTP_PORT)
        assert _unexplained(lab, since, "node1") == []

        added = lab.api("node1", add_req)
        assert (added["name"], added["host_ifname"]) == ("n1-b", dev)
        assert enrolled().count("n1-b") == 1
        assert filters() == (1, 1)
        with pytest.raises(client.AgentError, match="already enrolled"):
            lab.api("node1", add_req)
        assert filters() == (1, 1)
        assert enrolled().count("n1-b") == 1

        lab.api("node1", del_req)
        assert_nothing_of_ours()
        with pytest.raises(client.AgentError, match="no such enrolled pod"):
            lab.api("node1", del_req)
        assert_nothing_of_ours()

        lab.api("node1", add_req)
        assert filters() == (1, 1)
        since = mark(lab)
        res = curl(lab.ns("n1-b"), str(p2.ipv4), HTTP_PORT)
        assert (res.rc, res.status) == (0, 200), res
        assert res.server_view()["peer"] == str(b1.ipv4)
        rec = wait_record(lab, "node1", since,
                          lambda r: r["src"] == addr(str(b1.ipv4), res.local_port),
                          "n1-b's outbound record after re-enrolling")
        assert (rec["direction"], rec["dst"]) == ("outbound", addr(str(p2.ipv4), HTTP_PORT))
    finally:  # leave n1-b enrolled, as the lab made it
        if "n1-b" not in enrolled():
            lab.api("node1", add_req)


# -- 9. bad input -----------------------------------------------------------------------------


def test_bad_input_is_refused_clearly_and_changes_nothing(lab: Lab, tmp_path: Path) -> None:
    plain = lab.plan.pod("n1-plain")
    node_ns = lab.ns("node1")

    def state() -> list[tuple[str, int]]:
        return [(p["name"], p["host_ifindex"]) for p in lab.api("node1", {"op": "pod_list"})]

    before = state()
    missing = f"{lab.prefix}-nope"
    with pytest.raises(client.AgentError, match=rf"netns '{missing}' not found.*ip netns list"):
        lab.api("node1", {"op": "pod_add", "netns": missing, "name": "nope"})
    assert state() == before
    with pytest.raises(client.AgentError,
                       match=r"no interface 'eth9' .*\(it has: eth0, lo\).*--ifname"):
        lab.api("node1", {"op": "pod_add", "netns": plain.netns, "ifname": "eth9"})
    assert state() == before
    assert our_filters(node_ns, plain.host_ifname, "ingress") == []
    assert "clsact" not in qdiscs(node_ns, plain.host_ifname)

    env = lab.cli_env("node1")
    res = meshagent_cli(["pod", "add", "--netns", missing], env=env)
    assert res.returncode == 1 and f"netns '{missing}' not found" in res.stderr, res.stderr
    res = meshagent_cli(["pod", "add", "--netns", plain.netns, "--ifname", "eth9"], env=env)
    assert res.returncode == 1 and "(it has: eth0, lo)" in res.stderr, res.stderr
    absent = str(tmp_path / "agent.sock")
    res = meshagent_cli(["pod", "add", "--netns", plain.netns],
                        env={**env, "MESHAGENT_AGENT_SOCKET": absent})
    assert res.returncode == 1 and "agent is not running" in res.stderr, res.stderr
    assert absent in res.stderr
    with pytest.raises(client.AgentUnavailable, match="agent is not running"):
        client.call(absent, {"op": "status"}, timeout=5)
    assert state() == before


# -- 8. fail closed (disturbs the lab: keep it last) ---------------------------------------------


def test_fail_closed_without_the_tunnel_then_recovers(lab: Lab) -> None:
    a2 = lab.plan.pod("n2-a")
    pid = int((Path(lab.plan.node_run_dir("node1")) / "tunnel.pid").read_text())
    drops_before = lab.pod_counters("node1", "n1-a").get("drops", {}).get("no_listener", 0)
    os.kill(pid, signal.SIGTERM)
    wait_until("node1's tunnel to stop listening", lambda: not _tunnel_listening(lab, "node1"))

    res = curl(lab.ns("n1-a"), str(a2.ipv4), HTTP_PORT, timeout=3)
    assert res.rc != 0 and res.status != 200, f"connected without a tunnel: {res}"
    drops = lab.pod_counters("node1", "n1-a")["drops"]
    assert drops.get("no_listener", 0) > drops_before, drops

    lab.start_daemon("node1", "tunnel")
    wait_until("node1's tunnel to listen on 15001",
               lambda: _tunnel_listening(lab, "node1"), interval=0.1,
               timeout=30)
    since = mark(lab)
    res = curl(lab.ns("n1-a"), str(a2.ipv4), HTTP_PORT)
    assert (res.rc, res.status) == (0, 200), f"{res}\n{diagnose(lab)}"
    wait_record(lab, "node1", since,
                lambda r: r["src"] == addr(str(lab.plan.pod("n1-a").ipv4), res.local_port),
                "the outbound record after the restart")
