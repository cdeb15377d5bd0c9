"""L4 AuthorizationPolicy enforcement end to end in the namespace lab (root).

One HBONE lab per module (prefix ``p`` + 4 hex digits) with servers in n2-a:
a fixed-size HTTP responder on ports 80 and 8080, an echo server on 9090 and
``iperf3 -s`` on 5201. Policies are written atomically (temporary file +
rename) into node2's policy directory, which its tunnel polls; after every
write the test waits, bounded, until the tunnel reports the new set (a new
``policies loaded`` log line and ``status --json`` -> ``tunnel.policies``),
never sleeping blindly. Every test starts and ends with no policy. Everything
(servers, clients, the lab) is stopped and removed afterwards whatever
happened. The tests check behaviour only, never timings:

1. a DENY for a source namespace denies it (and logs the policy), others pass;
2. a policy edit applies without restarting the tunnel: a running allowed
   iperf3 stream survives a DENY for another source, a DENY matching a running
   connection closes it;
3. an invalid policy document fails closed for its own scope only (a DENY-all
   stand-in); the other documents of its file stay in force;
4. Istio TCP metrics, scraped from the real ``:15020/metrics``, count exactly the
   connections and bytes sent, and a denied attempt as failed with
   ``response_flags="DENY"``;
5. ``meshagent policy check`` explains decisions with the deciding policy.

What needs no kernel (decisions by port, ipBlocks, same-node, revocation of
exactly the denied connections, dry-run, one access-log line per connection,
exact counts) is tested in process in tests/unit/tunnel/test_tunnel_policy.py.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from labkit import (
    Lab,
    LabSpec,
    closed_records,
    listening,
    log_events,
    log_mark,
    meshagent_cli,
    program,
    read_line,
    run_in,
    running,
    spawned,
    until,
)
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(300)]

LAB = LabSpec(letter="p", mode="hbone", pod_networks=("cni", "cni-bridge"))
N1A, N1B, N2A = "10.244.1.10", "10.244.1.11", "10.244.2.10"
SA_A = "spiffe://cluster.local/ns/default/sa/sa-a"
HTTP_PORTS = (80, 8080)  # programs/policy_server.py in n2-a
ECHO_PORT = 9090
IPERF_PORT = 5201
METRICS_PORT = 15020
POLICY_WAIT_S = 5.0  # a policy write must be in force within this

# The fixed response of the HTTP servers: its exact size is what the tunnels
# must count as sent (server -> client) bytes.
BODY = b"x" * 1000
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    + f"Content-Length: {len(BODY)}\r\n\r\n".encode()
    + BODY
)
# The fixed request of the raw clients: exactly what must be counted as received.
REQUEST = b"GET /fixed HTTP/1.1\r\nHost: n2-a\r\nX-Pad: " + b"p" * 200 + b"\r\n\r\n"

# -- traffic --------------------------------------------------------------------------


def _curl(lab: Lab, pod: str, port: int, host: str = N2A) -> subprocess.CompletedProcess[str]:
    """curl from ``pod``; returncode 0 and stdout "200" when it worked."""
    return run_in(
        lab.ns(pod),
        [
            "curl",
            "-s",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            f"http://{host}:{port}/",
        ],
    )


def _assert_ok(lab: Lab, pod: str, port: int) -> None:
    res = _curl(lab, pod, port)
    assert (res.returncode, res.stdout) == (0, "200"), (
        f"{pod} -> n2-a:{port}: curl exit {res.returncode}, http {res.stdout!r}"
    )


def _assert_fails(lab: Lab, pod: str, port: int) -> None:
    res = _curl(lab, pod, port)
    # The tunnel resets a denied connection: no HTTP status, curl fails
    # (56 recv failure / 52 empty reply / 7 refused), never a timeout (28).
    assert res.returncode not in (0, 28) and res.stdout == "000", (
        f"{pod} -> n2-a:{port} should fail fast: curl exit {res.returncode}, http {res.stdout!r}"
    )


def _raw_requests(lab: Lab, pod: str, port: int, count: int) -> list[dict[str, Any]]:
    res = run_in(
        lab.ns(pod),
        [*program("raw_client"), N2A, str(port), str(count), REQUEST.hex()],
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    items: list[dict[str, Any]] = json.loads(res.stdout)
    return items


# -- access log -----------------------------------------------------------------------



# -- policies -------------------------------------------------------------------------


def _policy(
    name: str,
    action: str,
    rules: list[dict[str, Any]],
    namespace: str = "default",
    annotations: Mapping[str, str] | None = None,
) -> str:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations:
        metadata["annotations"] = dict(annotations)
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": metadata,
        "spec": {"action": action, "rules": rules},
    }
    return json.dumps(doc, indent=2)  # JSON is YAML


DENY_TEAM_B = _policy("deny-team-b", "DENY", [{"from": [{"source": {"namespaces": ["team-b"]}}]}])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # not *.yaml: the tunnel ignores it
    tmp.write_text(text)
    os.replace(tmp, path)


def _loads(lab: Lab, since: int) -> list[dict[str, Any]]:
    return [e for e in log_events(lab, "node2", since) if e.get("event") == "policies loaded"]


def _apply(lab: Lab, files: Mapping[str, str | None], expect: int) -> list[dict[str, Any]]:
    """Write (text) or remove (None) policy files in node2's directory atomically,
    then wait until the tunnel has loaded a set of ``expect`` policies. Returns the
    ``policies loaded`` log lines this change produced."""
    mark = log_mark(lab, "node2")
    lab.policy_dir("node2").mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = lab.policy_dir("node2") / name
        if text is None:
            path.unlink(missing_ok=True)
        else:
            _write_atomic(path, text)

    def loaded() -> list[dict[str, Any]] | None:
        lines = _loads(lab, mark)
        status = lab.tunnel_status("node2")
        if (
            lines
            and lines[-1].get("count") == expect
            and status.get("policies") == expect
            and status.get("policy_error") is None
        ):
            return lines
        return None

    result: list[dict[str, Any]] = until(
        f"node2 tunnel loads {expect} policies", loaded, timeout=POLICY_WAIT_S
    )
    return result


def _clear_policies(lab: Lab) -> None:
    pdir = lab.policy_dir("node2")
    files = {p.name: None for p in pdir.glob("*")} if pdir.is_dir() else {}
    status = lab.tunnel_status("node2")
    if not files and status.get("policies") == 0 and status.get("policy_error") is None:
        return
    for name in files:
        (lab.policy_dir("node2") / name).unlink(missing_ok=True)

    def cleared() -> bool:
        status = lab.tunnel_status("node2")
        return status.get("policies") == 0 and status.get("policy_error") is None

    until("node2 tunnel drops every policy", cleared, timeout=POLICY_WAIT_S)


# -- metrics --------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(lab: Lab, node: str) -> Samples:
    res = run_in(
        lab.ns(node), ["curl", "-s", "-m", "5", f"http://127.0.0.1:{METRICS_PORT}/metrics"]
    )
    assert res.returncode == 0, f"metrics of {node}: curl exit {res.returncode} {res.stderr}"
    out: Samples = {}
    for family in text_string_to_metric_families(res.stdout):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def _value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name`` over every series whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= lbl)


def _delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(mesh_lab: Lab) -> Lab:
    """The HBONE lab with HTTP (80, 8080), echo (9090) and iperf3 in n2-a."""
    lab = mesh_lab
    ns = lab.ns("n2-a")
    lab.background.start(
        ns, "server-n2-a",
        [*program("policy_server"), RESPONSE.hex(), ",".join(map(str, HTTP_PORTS)),
         str(ECHO_PORT)],
        ready_line="ready")
    lab.background.start(ns, "iperf3-n2-a", ["iperf3", "-s", "-p", str(IPERF_PORT)])
    until("servers listen in n2-a", lambda: listening(ns, [*HTTP_PORTS, ECHO_PORT, IPERF_PORT]))
    until(
        "node2 tunnel knows its pods and node1's",
        lambda: (
            (s := lab.tunnel_status("node2")).get("workloads") == 2
            and s.get("peer_workloads") == 2
        ),
    )
    until(
        "node1 tunnel knows its pods and node2's",
        lambda: (
            (s := lab.tunnel_status("node1")).get("workloads") == 2
            and s.get("peer_workloads") == 2
        ),
    )
    return lab


@pytest.fixture
def clean(lab: Lab) -> Iterator[Lab]:
    """The lab with no policy in force before and after the test."""
    _clear_policies(lab)
    try:
        yield lab
    finally:
        _clear_policies(lab)


# -- 1: DENY by source namespace -------------------------------------------------------


def test_deny_source_namespace(clean: Lab) -> None:
    lab = clean
    _assert_ok(lab, "n1-b", 80)  # allowed before the policy
    _apply(lab, {"deny-team-b.yaml": DENY_TEAM_B}, expect=1)
    mark = log_mark(lab, "node2")
    _assert_fails(lab, "n1-b", 80)
    _assert_ok(lab, "n1-a", 80)
    denied = until(
        "node2 logs the denied attempt",
        lambda: closed_records(lab, "node2", mark, src=N1B, dst=f"{N2A}:80"),
    )
    assert len(denied) == 1, denied
    entry = denied[0]
    assert entry["result"] == "denied" and entry["policy_decision"] == "deny", entry
    assert entry["policy"] == "default/deny-team-b", entry
    assert "deny-team-b" in entry["reason"], entry
    assert entry["src_identity"] == "spiffe://cluster.local/ns/team-b/sa/sa-b"
    allowed = until(
        "node2 logs the allowed connection",
        lambda: closed_records(lab, "node2", mark, src=N1A, dst=f"{N2A}:80"),
    )
    assert [e["result"] for e in allowed] == ["ok"], allowed


# -- 2: ALLOW on one port --------------------------------------------------------------


# -- 3: live policy edits --------------------------------------------------------------


def test_policy_edit_applies_live(clean: Lab) -> None:
    lab = clean
    pid = lab.tunnel_pid("node2")
    iperf_argv = ["iperf3", "-c", N2A, "-p", str(IPERF_PORT), "-t", "6", "-J"]
    with spawned(lab.ns("n1-a"), iperf_argv) as iperf:
        # control + data connection are both up and authorized on node2
        until(
            "iperf3 connections are active on node2",
            lambda: lab.tunnel_status("node2").get("active_inbound", 0) >= 2,
        )
        _apply(lab, {"deny-team-b.yaml": DENY_TEAM_B}, expect=1)
        assert iperf.poll() is None, "iperf3 ended before the policy was in force"
        _assert_fails(lab, "n1-b", IPERF_PORT)
        _assert_fails(lab, "n1-b", 80)
        out, err = iperf.communicate(timeout=30)
    assert iperf.returncode == 0, f"iperf3 failed: {err}\n{out[-2000:]}"
    report = json.loads(out)
    assert "error" not in report, report.get("error")
    assert report["end"]["sum_received"]["bytes"] > 0
    assert lab.tunnel_pid("node2") == pid and running(pid), "the tunnel was restarted"

    # A DENY that matches a running connection closes it.
    mark = log_mark(lab, "node2")
    with spawned(lab.ns("n1-a"), [*program("long_client"), N2A, str(ECHO_PORT), "60"]) as longc:
        line = read_line(longc, 10)
        assert line == "connected", f"long client: {line!r}"
        deny_a = _policy(
            "deny-a-echo",
            "DENY",
            [
                {
                    "from": [{"source": {"principals": [SA_A.removeprefix("spiffe://")]}}],
                    "to": [{"operation": {"ports": [str(ECHO_PORT)]}}],
                }
            ],
        )
        loads = _apply(lab, {"deny-a-echo.yaml": deny_a}, expect=2)
        assert loads[-1].get("connections_closed") == 1, loads
        ended = read_line(longc, 10)
        assert ended, "the denied connection is still open 10 s after the policy change"
        assert ended == "closed" or ended.startswith("reset"), ended
        longc.wait(timeout=10)
    closed = until(
        "node2 logs the closed echo connection",
        lambda: closed_records(lab, "node2", mark, src=N1A, dst=f"{N2A}:{ECHO_PORT}"),
    )
    assert len(closed) == 1, closed
    assert closed[0]["result"] == "denied", closed[0]
    assert closed[0]["policy"] == "default/deny-a-echo", closed[0]
    # what it carried before it was closed is still accounted for (>= 2 pings each way)
    assert closed[0]["bytes_sent"] >= 10 and closed[0]["bytes_received"] >= 10, closed[0]
    assert lab.tunnel_pid("node2") == pid and running(pid)


# -- 4: an invalid document fails closed for its scope, the others stay -------------------


def _bad_cidr(namespace: str) -> str:
    return _policy(
        "bad-cidr",
        "DENY",
        [{"from": [{"source": {"ipBlocks": ["10.244.1.0/24", "10.0.0.300/8"]}}]}],
        namespace=namespace,
    )


def _wait_fail_closed(lab: Lab, since: int, namespace: str) -> dict[str, Any]:
    """Wait until node2's tunnel runs the set with mixed.yaml's document 2 failed closed
    (a stand-in for ``namespace``) next to DENY_TEAM_B; returns the tunnel status."""

    def ready() -> dict[str, Any] | None:
        loads = _loads(lab, since)
        status = lab.tunnel_status("node2")
        error = status.get("policy_error") or ""
        if loads and loads[-1].get("count") == 2 and status.get("policies") == 2 and (
                "mixed.yaml: document 2" in error):
            return status
        return None

    status: dict[str, Any] = until(f"node2 tunnel fails closed for namespace {namespace}",
                                   ready, timeout=POLICY_WAIT_S)
    return status


def test_invalid_policy_document_fails_closed_for_its_scope(clean: Lab) -> None:
    lab = clean
    mark = log_mark(lab, "node2")
    pdir = lab.policy_dir("node2")
    pdir.mkdir(parents=True, exist_ok=True)
    _write_atomic(pdir / "mixed.yaml", DENY_TEAM_B + "\n---\n" + _bad_cidr("default"))
    _wait_fail_closed(lab, mark, "default")
    cli = meshagent_cli(["status", "--json"], lab.cli_env("node2"))
    assert cli.returncode == 0, cli.stderr
    tunnel = json.loads(cli.stdout)["tunnel"]
    assert tunnel["policies"] == 2, tunnel
    error = tunnel["policy_error"]
    assert "mixed.yaml: document 2" in error and "ipBlocks[1]" in error, error
    assert "10.0.0.300/8" in error, error
    logged = [e for e in log_events(lab, "node2", mark)
              if e.get("event") == "policy document not enforced as written"]
    assert len(logged) == 1, logged
    assert (logged[0]["file"], logged[0]["document"], logged[0]["outcome"]) == (
        "mixed.yaml", 2, "fail_closed"), logged
    # The bad DENY was for namespace default: everything to n2-a is denied now.
    _assert_fails(lab, "n1-a", 80)
    _assert_fails(lab, "n1-b", 80)

    # Moved to a namespace with no pods: only that scope fails closed, and document 1
    # of the same file (deny team-b) is enforced as written.
    mark = log_mark(lab, "node2")
    _write_atomic(pdir / "mixed.yaml", DENY_TEAM_B + "\n---\n" + _bad_cidr("elsewhere"))
    _wait_fail_closed(lab, mark, "elsewhere")
    _assert_ok(lab, "n1-a", 80)
    _assert_fails(lab, "n1-b", 80)


# -- 5 and 6: exact metrics and one access-log line per connection -----------------------

K = 3
METRIC_LABELS = {
    "source_workload": "n1-a",
    "destination_workload": "n2-a",
    "connection_security_policy": "mutual_tls",
}


def test_metrics_count_connections_and_bytes_exactly(clean: Lab) -> None:
    lab = clean
    before = {node: _scrape(lab, node) for node in ("node1", "node2")}
    results = _raw_requests(lab, "n1-a", 80, K)
    assert [r["error"] for r in results] == [None] * K, results
    assert [r["received"] for r in results] == [len(RESPONSE)] * K, results
    reporters = {"node1": "source", "node2": "destination"}

    def closed_counted(node: str) -> Samples | None:
        after = _scrape(lab, node)
        done = _delta(
            before[node],
            after,
            "istio_tcp_connections_closed_total",
            reporter=reporters[node],
            **METRIC_LABELS,
        )
        return after if done >= K else None

    for node, reporter in reporters.items():
        after = until(f"{node} counts {K} closed connections",
                      functools.partial(closed_counted, node))
        labels = {"reporter": reporter, **METRIC_LABELS}
        for name in ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total"):
            assert _delta(before[node], after, name, **labels) == K, (node, name)
        assert _delta(before[node], after, "istio_tcp_received_bytes_total", **labels) == K * len(
            REQUEST
        ), node
        assert _delta(before[node], after, "istio_tcp_sent_bytes_total", **labels) == K * len(
            RESPONSE
        ), node
        # and nothing of it was counted as plaintext or failed
        plain = {**labels, "connection_security_policy": "none"}
        assert _delta(before[node], after, "istio_tcp_connections_opened_total", **plain) == 0
        assert _delta(before[node], after, "istio_tcp_connections_failed_total", **labels) == 0
        principals = {
            dict(lbl).get("source_principal")
            for (n, lbl), _ in after.items()
            if n == "istio_tcp_connections_opened_total"
            and {("reporter", reporter), ("source_workload", "n1-a")} <= lbl
        }
        assert principals == {SA_A}, principals

    # A denied attempt is a failed connection with response_flags DENY, on both ends.
    _apply(lab, {"deny-team-b.yaml": DENY_TEAM_B}, expect=1)
    before = {node: _scrape(lab, node) for node in ("node1", "node2")}
    _assert_fails(lab, "n1-b", 80)
    for node, reporter in reporters.items():
        labels = {"reporter": reporter, "source_workload": "n1-b", "destination_workload": "n2-a"}

        def failed_counted(node: str = node, labels: dict[str, str] = labels) -> Samples | None:
            after = _scrape(lab, node)
            failed = _delta(before[node], after, "istio_tcp_connections_failed_total", **labels)
            return after if failed >= 1 else None

        after = until(f"{node} counts the denied attempt", failed_counted)
        assert (
            _delta(
                before[node],
                after,
                "istio_tcp_connections_failed_total",
                response_flags="DENY",
                **labels,
            )
            == 1
        ), node
        assert _delta(before[node], after, "istio_tcp_connections_failed_total", **labels) == 1
        assert _delta(before[node], after, "istio_tcp_connections_opened_total", **labels) == 0


# -- 7: policy check -------------------------------------------------------------------


def test_policy_check_explains(clean: Lab) -> None:
    lab = clean
    _apply(lab, {"deny-team-b.yaml": DENY_TEAM_B}, expect=1)
    env = lab.cli_env("node2")
    denied = meshagent_cli(["policy", "check", "--from", "n2-b", "--to", "n2-a:80"], env)
    assert denied.returncode == 1, denied.stdout + denied.stderr
    assert "default/deny-team-b" in denied.stdout, denied.stdout
    assert "DENY" in denied.stdout, denied.stdout
    allowed = meshagent_cli(["policy", "check", "--from", "n2-a", "--to", "n2-a:80"], env)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "ALLOW" in allowed.stdout, allowed.stdout
    by_id = meshagent_cli(
        [
            "policy",
            "check",
            "--from",
            "spiffe://cluster.local/ns/team-b/sa/sa-b",
            "--to",
            "n2-a:80",
        ],
        env,
    )
    assert by_id.returncode == 1 and "default/deny-team-b" in by_id.stdout, by_id.stdout


# -- 8: dry-run --------------------------------------------------------------------------


