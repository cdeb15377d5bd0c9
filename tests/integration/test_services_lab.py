"""Services in the namespace lab (root): both nodes' tunnels read the lab's model
(agent/lab/services.py: ``web`` at 10.96.0.10 / fd00:96::10 port 80 -> 8080 with
endpoints n1-b and n2-b and an unhealthy n2-a, ``web-empty`` with none), real pods,
real kernel.

* an enrolled pod reaches the VIP over IPv4 and IPv6; connections spread over the
  endpoints on both nodes (HBONE to n2-b, hbone-local to n1-b), the access log names
  the service, node2's inbound sees the endpoint's own address and target port (the
  service port 80 mapped to 8080); the unhealthy endpoint (n2-a, which serves nothing
  on 8080) is never chosen;
* a VIP with no endpoints resets the client at once, logged ``no_healthy_upstream`` UH;
* with kube-proxy's NAT rules in both node netns (its iptables mode, and its nftables
  mode), the same holds for enrolled pods, and a non-enrolled pod reaches the service
  through kube-proxy's DNAT;
* DNS, with dnsmasq as the pods' resolver and the lab's defaults (DNS capture on):
  the datapath captures an enrolled pod's queries (UDP and TCP) and the tunnel answers
  service names, forwarding the rest to that resolver; also with the resolver on the
  pod's own subnet (a bridge CNI would switch the query straight to it); a pod opted
  out, or outside the mesh, asks the resolver itself; while the tunnel restarts UDP
  fails open and TCP closed.

Every test runs on ptp pods (``cni``) and bridge pods (``cni-bridge``, br_netfilter on:
bridged pods' captured DNS takes the redirect to the tunnel device).

Behaviour only, never timings; every wait is bounded; the lab is removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from labkit import (
    Lab,
    LabSpec,
    closed_records,
    curl,
    diagnose,
    log_events,
    mark,
    program,
    run_in,
    run_program,
    running,
    until,
)

from agent.lab.services import (
    EMPTY_HOSTNAME,
    EMPTY_VIPS,
    TARGET_PORT,
    WEB_HOSTNAME,
    WEB_VIPS,
    apply_kube_proxy_nft_rules,
    apply_kube_proxy_rules,
    lab_model,
    remove_kube_proxy_nft_rules,
    remove_kube_proxy_rules,
)

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(300)]

LAB = LabSpec(letter="s", mode="hbone", pod_networks=("cni", "cni-bridge"))
ENDPOINTS = ("n1-b", "n2-b")
CURL_TIMED_OUT = 28
CONNECTIONS = 16  # per family: P(one endpoint never chosen) = 2 * 0.5**16


@pytest.fixture(scope="module")
def lab(mesh_lab: Lab) -> Lab:
    for pod in ENDPOINTS:
        mesh_lab.background.start(
            mesh_lab.ns(pod), f"http-{pod}",
            [*program("datapath_server"), pod, str(TARGET_PORT), "8081", "8082", "16"],
            ready_line="ready")
    for node in ("node1", "node2"):
        def loaded(node: str = node) -> bool:
            return any(e.get("event") == "model loaded" for e in log_events(mesh_lab, node))

        until(f"{node}'s tunnel loaded the model", loaded)
    return mesh_lab


def _servers(lab: Lab, client: str, vip: str, count: int = CONNECTIONS) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(count):
        res = curl(lab.ns(client), vip, 80)
        assert (res.rc, res.status) == (0, 200), f"{client} -> {vip}: {res}\n{diagnose(lab)}"
        seen[res.server_view()["server"]] += 1
    return seen


def _service_records(lab: Lab, since: Any, hostname: str) -> list[dict[str, Any]]:
    return [r for r in closed_records(lab, "node1", since, direction="outbound")
            if r.get("service") == hostname]


@contextlib.contextmanager
def kube_proxy(lab: Lab, mode: str) -> Iterator[None]:
    """kube-proxy's NAT rules for the lab's model in both node netns (``iptables`` or
    ``nftables`` mode), removed afterwards."""
    model = lab_model(lab.plan)
    applied: list[str] = []
    try:
        for node in ("node1", "node2"):
            applied.append(lab.ns(node))
            if mode == "iptables":
                apply_kube_proxy_rules(lab.ns(node), model)
            else:
                apply_kube_proxy_nft_rules(lab.ns(node), model)
        yield
    finally:
        for ns in applied:
            if mode == "iptables":
                remove_kube_proxy_rules(ns, model)
            else:
                remove_kube_proxy_nft_rules(ns)


def _check_vip(lab: Lab, vip: str) -> None:
    since = mark(lab)
    seen = _servers(lab, "n1-a", vip)
    assert set(seen) == set(ENDPOINTS), seen
    def logged() -> list[dict[str, Any]] | None:
        found = _service_records(lab, since, WEB_HOSTNAME)
        return found if len(found) >= CONNECTIONS else None

    records = until("node1 logged every connection", logged)
    paths = Counter(r["path"] for r in records)
    assert set(paths) == {"hbone", "hbone-local"}, paths
    assert all(r["result"] == "ok" and r["original_dst"].endswith(":80") for r in records)
    n2b = lab.pod("n2-b")
    n2b_ip = n2b.ipv6 if ":" in vip else n2b.ipv4
    inbound = [r for r in closed_records(lab, "node2", since, direction="inbound")
               if r["dst"].startswith(f"[{n2b_ip}]" if ":" in vip else f"{n2b_ip}:")]
    assert inbound and all(r["dst"].endswith(f":{TARGET_PORT}") for r in inbound)


@pytest.mark.parametrize("vip", WEB_VIPS, ids=["v4", "v6"])
def test_enrolled_pod_reaches_the_vip_over_hbone(lab: Lab, vip: str) -> None:
    _check_vip(lab, vip)


@pytest.mark.parametrize("vip", EMPTY_VIPS, ids=["v4", "v6"])
def test_vip_without_endpoints_resets_at_once(lab: Lab, vip: str) -> None:
    since = mark(lab)
    res = curl(lab.ns("n1-a"), vip, 80)
    # Reset, not left to curl's own timeout (exit code 28): the client never hangs.
    assert res.rc not in (0, CURL_TIMED_OUT) and res.status == 0, res
    record = until("the refusal is logged",
                   lambda: next(iter(_service_records(lab, since, EMPTY_HOSTNAME)), None))
    assert record["result"] == "no_healthy_upstream" and record["response_flags"] == "UH"


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
@pytest.mark.parametrize("vip", WEB_VIPS, ids=["v4", "v6"])
def test_with_kube_proxy_rules(lab: Lab, vip: str, mode: str) -> None:
    with kube_proxy(lab, mode):
        _check_vip(lab, vip)
        # A pod outside the mesh goes through kube-proxy's DNAT to both endpoints.
        seen = _servers(lab, "n1-plain", vip)
        assert set(seen) == set(ENDPOINTS), seen


# -- DNS: the tunnel's proxy on captured queries ----------------------------------------

DNSMASQ_DECOY = "10.99.99.99"  # what the lab's resolver says for the service name
EXTERNAL_NAME = "external.test"
EXTERNAL_ADDR = "192.0.2.7"


@pytest.fixture(scope="module")
def dns_lab(lab: Lab) -> Lab:
    """dnsmasq in node2's netns on its underlay address, the pods' resolver. The lab
    runs with the defaults: datapath.dns_capture on, the tunnels' DNS proxy on 15053."""
    resolver = lab.node("node2").underlay_ipv4
    _start_dnsmasq(lab, lab.ns("node2"), "dnsmasq", resolver)
    until("dnsmasq answers", lambda: _dig(lab, "n2-plain", EXTERNAL_NAME) == [EXTERNAL_ADDR])
    return lab


def _start_dnsmasq(lab: Lab, ns: str, name: str, *addresses: str) -> None:
    lab.background.start(ns, name, [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
        "--bind-interfaces", *(f"--listen-address={a}" for a in addresses), "--port=53",
        "--pid-file=",
        "--log-facility=-", "--cache-size=0", "--user=root",
        f"--host-record={WEB_HOSTNAME},{DNSMASQ_DECOY}",
        f"--address=/{EXTERNAL_NAME}/{EXTERNAL_ADDR}"])


def _dig(lab: Lab, pod: str, name: str, *, tcp: bool = False,
         resolver: str | None = None) -> list[str] | None:
    server = resolver or lab.node("node2").underlay_ipv4
    out = run_in(lab.ns(pod), ["dig", f"@{server}", name, "A", "+short", "+time=2",
                               "+tries=2", *(["+tcp"] if tcp else [])], timeout=20)
    if out.returncode != 0:
        return None
    return [line for line in out.stdout.split() if line]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_dns_service_names_answered_by_the_tunnel(dns_lab: Lab, tcp: bool) -> None:
    before = _captured_and_dropped(dns_lab, "n1-a")
    assert _dig(dns_lab, "n1-a", WEB_HOSTNAME, tcp=tcp) == [WEB_VIPS[0]]
    # Other names: forwarded to the pod's own resolver (dnsmasq).
    assert _dig(dns_lab, "n1-a", EXTERNAL_NAME, tcp=tcp) == [EXTERNAL_ADDR]
    # A pod outside the mesh asks dnsmasq itself.
    assert _dig(dns_lab, "n1-plain", WEB_HOSTNAME, tcp=tcp) == [DNSMASQ_DECOY]
    after = _captured_and_dropped(dns_lab, "n1-a")
    assert after[0] > before[0] and after[1] == before[1], (before, after)


def _captured_and_dropped(lab: Lab, pod: str) -> tuple[int, int]:
    c = lab.pod_counters("node1", pod)
    return int(c.get("captured_out_packets", 0)), sum((c.get("drops") or {}).values())


def test_dns_resolver_on_the_pods_own_subnet(dns_lab: Lab) -> None:
    """The resolver is a pod on the same node, on IPv4 and IPv6 (on a bridge CNI: the same
    bridge, so the query would be switched straight to it): the tunnel still answers
    service names, its replies come from the resolver's address, other names reach
    that resolver."""
    lab = dns_lab
    n1b = lab.pod("n1-b")
    _start_dnsmasq(lab, lab.ns("n1-b"), "dnsmasq-n1-b", n1b.ipv4, n1b.ipv6)
    for resolver in (n1b.ipv4, n1b.ipv6):
        def answers(r: str = resolver) -> bool:
            return _dig(lab, "n1-plain", EXTERNAL_NAME, resolver=r) == [EXTERNAL_ADDR]

        until(f"n1-b's dnsmasq answers on {resolver}", answers)
        for tcp in (False, True):
            assert _dig(lab, "n1-a", WEB_HOSTNAME, tcp=tcp, resolver=resolver) == [WEB_VIPS[0]]
            assert _dig(lab, "n1-a", EXTERNAL_NAME, tcp=tcp,
                        resolver=resolver) == [EXTERNAL_ADDR]
        assert _dig(lab, "n1-plain", WEB_HOSTNAME, resolver=resolver) == [DNSMASQ_DECOY]
def test_dns_garbage_from_a_pod_never_stops_the_tunnel(dns_lab: Lab) -> None:
    """Malformed and oversized queries (UDP and TCP, captured into node1's tunnel) are
    dropped or refused one by one: the tunnel keeps running and answering."""
    lab = dns_lab
    pid = lab.tunnel_pid("node1")
    sent = run_program(lab.ns("n1-a"), "dns_garbage", lab.node("node2").underlay_ipv4)
    assert sent == {"udp_sent": 7, "tcp_frames": 3}
    for tcp in (False, True):
        assert _dig(lab, "n1-a", WEB_HOSTNAME, tcp=tcp) == [WEB_VIPS[0]]
        assert _dig(lab, "n1-a", EXTERNAL_NAME, tcp=tcp) == [EXTERNAL_ADDR]
    assert running(pid) and lab.tunnel_pid("node1") == pid


def test_dns_opted_out_pod_asks_its_resolver(dns_lab: Lab) -> None:
    lab = dns_lab
    pod = lab.pod("n1-a")
    lab.api("node1", {"op": "pod_del", "name": pod.name, "namespace": pod.namespace})
    try:
        lab.api("node1", {"op": "pod_add", "netns": pod.netns, "name": pod.name,
                          "namespace": pod.namespace, "service_account": pod.service_account,
                          "dns_capture": False})
        assert _dig(lab, "n1-a", WEB_HOSTNAME) == [DNSMASQ_DECOY]
    finally:
        lab.api("node1", {"op": "pod_del", "name": pod.name, "namespace": pod.namespace})
        lab.api("node1", {"op": "pod_add", "netns": pod.netns, "name": pod.name,
                          "namespace": pod.namespace, "service_account": pod.service_account})
    assert _dig(lab, "n1-a", WEB_HOSTNAME) == [WEB_VIPS[0]]


def test_dns_while_the_tunnel_restarts(dns_lab: Lab) -> None:
    """UDP fails open: with no tunnel the pod's queries reach its resolver; TCP fails
    closed (the datapath drops the SYN: no listener). Once the tunnel is back it
    answers service names again, over both."""
    lab = dns_lab
    pid = lab.tunnel_pid("node1")
    os.kill(pid, signal.SIGTERM)
    until("node1's tunnel to exit", lambda: not running(pid))
    try:
        assert _dig(lab, "n1-a", EXTERNAL_NAME) == [EXTERNAL_ADDR]
        assert _dig(lab, "n1-a", WEB_HOSTNAME) == [DNSMASQ_DECOY]
        assert _dig(lab, "n1-a", EXTERNAL_NAME, tcp=True) is None
    finally:
        lab.start_daemon("node1", "tunnel")
    until("the tunnel answers service names again",
          lambda: _dig(lab, "n1-a", WEB_HOSTNAME) == [WEB_VIPS[0]])
    assert _dig(lab, "n1-a", EXTERNAL_NAME) == [EXTERNAL_ADDR]
    assert _dig(lab, "n1-a", WEB_HOSTNAME, tcp=True) == [WEB_VIPS[0]]
