"""Waypoints in the namespace lab (root): real curl from enrolled pods through the
node tunnel, a waypoint pod (``meshagent waypoint``: own netns, own identity, not
enrolled), the destination's node tunnel, to the server; on both nodes. The
scenario is agent/lab/waypoints.py's (three pods per node: ``-a`` default, ``-b``
team-b, ``-c`` team-c):

* namespace waypoint ``team-b/waypoint`` (node1) with the L7 policy "GET only, from
  namespace default": GET 200, POST 403 ``RBAC: access denied``, other namespace 403;
* ``team-b/db`` (``use-waypoint: none``) skips it: POST 200, straight to the pod;
* per-service waypoint ``team-b/hot-waypoint`` (node2) for Service ``hot`` and, by
  n2-b's own label beating the namespace's, for traffic to n2-b's address (n1-b's
  address goes to the namespace waypoint);
* shared ``infra/shared`` (node2, ``allowedRoutes: All``) for team-c through
  ``use-waypoint-namespace``, from both nodes;
* ``ghost`` bound to a waypoint nobody runs: refused, logged, counted, never sent;
* a waypoint pod labelled to use a waypoint (a loop): refused;
* the destination's tunnel sees the waypoint's identity as the source, its L4
  policy applies to it, and the waypoint's own upstream is never captured back;
* the waypoint's metrics with ``reporter="waypoint"``.

Behaviour only, never timings; every wait is bounded; the lab is removed afterwards.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from labkit import (
    Lab,
    LabSpec,
    closed_records,
    diagnose,
    log_events,
    mark,
    program,
    run_in,
    until,
)
from prometheus_client.parser import text_string_to_metric_families

from agent.lab import waypoints
from agent.lab.waypoints import POD_LABELS, waypoint_pod
from agent.waypoint.binding import USE_WAYPOINT

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(420)]

LAB = LabSpec(letter="w", mode="hbone", pods_per_node=waypoints.PODS_PER_NODE)
SERVERS = ("n1-b", "n2-b", "n1-c", "n2-c")
ECHO_B, DB, HOT, GHOST, ECHO_C = "10.96.1.10", "10.96.1.11", "10.96.1.12", "10.96.1.13", \
    "10.96.1.20"
TD = "spiffe://cluster.local"
WAYPOINT_ID = f"{TD}/ns/team-b/sa/waypoint"
HOT_ID = f"{TD}/ns/team-b/sa/hot-waypoint"
SHARED_ID = f"{TD}/ns/infra/sa/shared"
NS_WAYPOINT = "team-b/waypoint.team-b.svc.cluster.local"
HOT_WAYPOINT = "team-b/hot-waypoint.team-b.svc.cluster.local"
SHARED = "infra/shared.infra.svc.cluster.local"
METRICS_PORT = 15020


@pytest.fixture(scope="module")
def lab(mesh_lab: Lab) -> Lab:
    for pod in SERVERS:
        mesh_lab.background.start(
            mesh_lab.ns(pod), f"http-{pod}",
            [*program("datapath_server"), pod, "8080", "8081", "8082", "16"],
            ready_line="ready")
    since = mark(mesh_lab)
    waypoints.start_waypoints(mesh_lab.plan)
    model, _ = waypoints.waypoint_model(mesh_lab.plan)
    for node in ("node1", "node2"):
        def loaded(node: str = node) -> bool:
            return any(e.get("event") == "model loaded"
                       and e.get("services") == len(model.services)
                       for e in _events(mesh_lab, node, since))

        until(f"{node}'s tunnel loaded the waypoint model", loaded)
    return mesh_lab


def _events(lab: Lab, node: str, since: dict[str, int]) -> list[dict[str, Any]]:
    return log_events(lab, node, since[node])


def _ip(lab: Lab, index: int) -> str:
    wp = waypoints.SCENARIO[index]
    return waypoint_pod(lab.plan, wp, index).ipv4


def http(lab: Lab, pod: str, url: str, method: str = "GET") -> tuple[int, str]:
    """Real curl in ``pod``: (status, body); status 0 when the connection failed."""
    out = run_in(lab.ns(pod), ["curl", "-sS", "-m", "5", "-X", method, "-o", "-",
                               "-w", "\n%{http_code}", url], timeout=20)
    body, _, code = out.stdout.rpartition("\n")
    return (int(code) if code.isdigit() else 0), body


def _peer(body: str) -> str:
    """The client address datapath_server.py saw."""
    return dict(w.split("=", 1) for w in body.split() if "=" in w).get("peer", "")


def _outbound(lab: Lab, node: str, since: dict[str, int], original: str
              ) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        found = [r for r in closed_records(lab, node, since, direction="outbound")
                 if r.get("original_dst") == original]
        return found[-1] if found else None

    return until(f"{node}'s record of the connection to {original}", find)


def _scrape(lab: Lab, ns: str) -> list[tuple[str, dict[str, str], float]]:
    res = run_in(ns, ["curl", "-s", "-m", "5", f"http://127.0.0.1:{METRICS_PORT}/metrics"])
    assert res.returncode == 0, f"metrics in {ns}: {res.stderr}"
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(res.stdout)
            for s in f.samples]


def _value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str
           ) -> float:
    return sum(v for n, lbl, v in samples
               if n == name and all(lbl.get(k) == x for k, x in labels.items()))


def test_namespace_waypoint_enforces_the_l7_policy_from_both_nodes(lab: Lab) -> None:
    since = mark(lab)
    for client in ("n1-a", "n2-a"):
        status, body = http(lab, client, f"http://{ECHO_B}/")
        assert status == 200, f"{client}: {status} {body}\n{diagnose(lab)}"
        assert _peer(body) == _ip(lab, 0)  # the server was reached from the waypoint
        status, body = http(lab, client, f"http://{ECHO_B}/", "POST")
        assert (status, body.strip()) == (403, "RBAC: access denied")
    status, body = http(lab, "n1-c", f"http://{ECHO_B}/")
    assert (status, body.strip()) == (403, "RBAC: access denied")
    for node in ("node1", "node2"):
        record = _outbound(lab, node, since, f"{ECHO_B}:80")
        assert record["path"] == "waypoint" and record["waypoint"] == NS_WAYPOINT
        assert record["dst"] == f"{_ip(lab, 0)}:15008"
        assert record["dst_identity"] == WAYPOINT_ID
        assert record["service"] == "echo.team-b.svc.cluster.local"
    samples = _scrape(lab, waypoint_pod(lab.plan, waypoints.SCENARIO[0], 0).netns)
    for code in ("200", "403"):
        assert _value(samples, "istio_requests_total", reporter="waypoint",
                      response_code=code,
                      destination_service="echo.team-b.svc.cluster.local") >= 2, code
    assert _value(samples, "istio_requests_total", reporter="waypoint", response_code="403",
                  source_principal=f"{TD}/ns/team-c/sa/sa-c") >= 1


def test_an_l4_only_service_skips_the_waypoint(lab: Lab) -> None:
    since = mark(lab)
    status, body = http(lab, "n1-a", f"http://{DB}/", "POST")
    assert status == 200, f"{status} {body}\n{diagnose(lab)}"
    assert _peer(body) == lab.pod("n1-a").ipv4
    record = _outbound(lab, "node1", since, f"{DB}:80")
    assert record["path"] == "hbone" and "waypoint" not in record


def test_service_and_pod_labels_choose_the_per_service_waypoint(lab: Lab) -> None:
    since = mark(lab)
    status, body = http(lab, "n1-a", f"http://{HOT}/")
    assert status == 200 and _peer(body) == _ip(lab, 1), f"{status} {body}"
    # n2-b's own label beats its namespace's: its address goes to hot-waypoint too.
    n2b = lab.pod("n2-b").ipv4
    status, body = http(lab, "n1-a", f"http://{n2b}:8080/")
    assert status == 200 and _peer(body) == _ip(lab, 1), f"{status} {body}"
    assert _outbound(lab, "node1", since, f"{n2b}:8080")["waypoint"] == HOT_WAYPOINT
    assert _outbound(lab, "node1", since, f"{HOT}:80")["dst_identity"] == HOT_ID
    # n1-b inherits the namespace's: the namespace waypoint and its L7 policy.
    n1b = lab.pod("n1-b").ipv4
    status, body = http(lab, "n1-a", f"http://{n1b}:8080/")
    assert status == 200 and _peer(body) == _ip(lab, 0), f"{status} {body}"
    assert http(lab, "n1-a", f"http://{n1b}:8080/", "POST")[0] == 403
    assert _outbound(lab, "node1", since, f"{n1b}:8080")["waypoint"] == NS_WAYPOINT
    # The destination's tunnel sees the waypoint's identity, from its address; the
    # waypoint's upstream is its own (never captured back into a waypoint).
    def inbound() -> list[dict[str, Any]]:
        return [r for r in closed_records(lab, "node2", since, direction="inbound")
                if r["dst"] == f"{n2b}:8080"]

    def two() -> list[dict[str, Any]] | None:
        found = inbound()
        return found if len(found) >= 2 else None

    records = until("node2's inbound records for n2-b", two)
    assert {(r["src"], r["src_identity"]) for r in records} == {(_ip(lab, 1), HOT_ID)}
    for node in ("node1", "node2"):
        assert not [r for r in closed_records(lab, node, since, direction="outbound")
                    if r["src"].startswith(f"{_ip(lab, 1)}:")]


def test_a_shared_waypoint_in_another_namespace(lab: Lab) -> None:
    since = mark(lab)
    for client in ("n1-a", "n2-a"):
        status, body = http(lab, client, f"http://{ECHO_C}/", "POST")
        assert status == 200 and _peer(body) == _ip(lab, 2), f"{client}: {status} {body}"
    for node in ("node1", "node2"):
        record = _outbound(lab, node, since, f"{ECHO_C}:80")
        assert record["waypoint"] == SHARED and record["dst_identity"] == SHARED_ID


def test_a_missing_waypoint_fails_closed_and_is_counted(lab: Lab) -> None:
    since = mark(lab)
    before = _value(_scrape(lab, lab.ns("node1")), "istio_tcp_connections_failed_total",
                    destination_service="ghost.team-b.svc.cluster.local")
    status, _ = http(lab, "n1-a", f"http://{GHOST}/")
    assert status == 0
    record = _outbound(lab, "node1", since, f"{GHOST}:80")
    assert record["result"] == "no_waypoint" and record["response_flags"] == "CONNECT"
    assert "not found" in record["reason"]
    after = _value(_scrape(lab, lab.ns("node1")), "istio_tcp_connections_failed_total",
                   destination_service="ghost.team-b.svc.cluster.local",
                   response_flags="CONNECT")
    assert after == before + 1
    assert closed_records(lab, "node2", since, direction="inbound") == []  # never sent


def test_the_destination_l4_policy_applies_to_the_waypoint(lab: Lab) -> None:
    policy = lab.policy_dir("node2") / "no-hot-waypoint.yaml"
    policy.parent.mkdir(parents=True, exist_ok=True)
    policy.write_text(json.dumps({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-hot-waypoint", "namespace": "team-b"},
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {
            "principals": ["cluster.local/ns/team-b/sa/hot-waypoint"]}}]}]}}))
    try:
        since = mark(lab)
        until("node2 denies the hot waypoint",
              lambda: http(lab, "n1-a", f"http://{HOT}/")[0] == 503)
        denied = [r for r in closed_records(lab, "node2", since, direction="inbound")
                  if r["result"] == "denied"]
        assert denied and all(r["src_identity"] == HOT_ID for r in denied)
        # The same pod straight from n1-a (db: no waypoint) is not that identity.
        assert http(lab, "n1-a", f"http://{DB}/")[0] == 200
    finally:
        policy.unlink()
    until("the hot waypoint is allowed again", lambda: http(lab, "n1-a", f"http://{HOT}/")[0]
          == 200)


def test_a_waypoint_bound_to_a_waypoint_is_a_loop_and_refused(lab: Lab) -> None:
    loop_pod = waypoint_pod(lab.plan, waypoints.SCENARIO[1], 1).name
    waypoints.write_files(lab.plan, pod_labels={**POD_LABELS,
                                                loop_pod: {USE_WAYPOINT: "hot-waypoint"}})
    try:
        since = mark(lab)

        def refused() -> dict[str, Any] | None:
            if http(lab, "n1-a", f"http://{HOT}/")[0] != 0:
                return None
            found = [r for r in closed_records(lab, "node1", since, direction="outbound")
                     if r.get("result") == "waypoint_loop"]
            return found[-1] if found else None

        record = until("node1 refuses the loop", refused)
        assert record["waypoint"] == HOT_WAYPOINT and "waypoint again" in record["reason"]
    finally:
        waypoints.write_files(lab.plan)
    until("hot works again", lambda: http(lab, "n1-a", f"http://{HOT}/")[0] == 200)
