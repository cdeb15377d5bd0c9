"""Services in the namespace lab (root): both nodes' tunnels read the lab's model
(agent/lab/services.py: ``web`` at 10.96.0.10 / fd00:96::10 port 80 -> 8080 with
endpoints n1-b and n2-b, ``web-empty`` with none), real pods, real kernel.

* an enrolled pod reaches the VIP over IPv4 and IPv6; connections spread over the
  endpoints on both nodes (HBONE to n2-b, hbone-local to n1-b), the access log names
  the service, node2's inbound sees the endpoint's own address and target port;
* a VIP with no endpoints resets the client at once, logged ``no_healthy_upstream`` UH;
* with kube-proxy's iptables NAT rules in both node netns, the same holds for enrolled
  pods, and a non-enrolled pod reaches the service through kube-proxy's DNAT.

Behaviour only, never timings; every wait is bounded; the lab is removed afterwards.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from labkit import Lab, LabSpec, closed_records, curl, diagnose, log_events, mark, program, until

from agent.lab.services import (
    EMPTY_HOSTNAME,
    EMPTY_VIPS,
    TARGET_PORT,
    WEB_HOSTNAME,
    WEB_VIPS,
    apply_kube_proxy_rules,
    lab_model,
    remove_kube_proxy_rules,
)

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(300)]

LAB = LabSpec(letter="s", mode="hbone")
ENDPOINTS = ("n1-b", "n2-b")
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
def kube_proxy(lab: Lab) -> Iterator[None]:
    model = lab_model(lab.plan)
    applied: list[str] = []
    try:
        for node in ("node1", "node2"):
            applied.append(lab.ns(node))
            apply_kube_proxy_rules(lab.ns(node), model)
        yield
    finally:
        for ns in applied:
            remove_kube_proxy_rules(ns, model)


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


def test_vip_without_endpoints_resets_at_once(lab: Lab) -> None:
    since = mark(lab)
    res = curl(lab.ns("n1-a"), EMPTY_VIPS[0], 80)
    assert res.rc != 0 and res.status == 0, res
    record = until("the refusal is logged",
                   lambda: next(iter(_service_records(lab, since, EMPTY_HOSTNAME)), None))
    assert record["result"] == "no_healthy_upstream" and record["response_flags"] == "UH"


@pytest.mark.parametrize("vip", WEB_VIPS, ids=["v4", "v6"])
def test_with_kube_proxy_rules(lab: Lab, vip: str) -> None:
    with kube_proxy(lab):
        _check_vip(lab, vip)
        # A pod outside the mesh goes through kube-proxy's DNAT to both endpoints.
        seen = _servers(lab, "n1-plain", vip)
        assert set(seen) == set(ENDPOINTS), seen
