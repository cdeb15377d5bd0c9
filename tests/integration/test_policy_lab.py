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
2. an ALLOW for port 80 only lets port 80 through and denies 8080;
3. a policy edit applies without restarting the tunnel: a running allowed
   iperf3 stream survives a DENY for another source, a DENY matching a running
   connection closes it;
4. an invalid policy document fails closed for its own scope only (a DENY-all
   stand-in); the other documents of its file stay in force;
5. Istio TCP metrics count exactly the connections and bytes sent, and a
   denied attempt as failed with ``response_flags="DENY"``;
6. the access log has exactly one line per connection;
7. ``meshagent policy check`` explains decisions with the deciding policy;
8. a dry-run DENY is reported in the log but not enforced.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
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
from prometheus_client.parser import text_string_to_metric_families
from pyroute2 import netns

from agent.api import client
from agent.lab import mesh, netlab
from agent.lab.topology import LabPlan, build_plan, run_dir

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
N1A, N1B, N2A = "10.244.1.10", "10.244.1.11", "10.244.2.10"
SA_A = "spiffe://cluster.local/ns/default/sa/sa-a"
HTTP_PORTS = (80, 8080)
ECHO_PORT = 9090
IPERF_PORT = 5201
METRICS_PORT = 15020
WAIT_S = 15.0  # upper bound of every "until" loop
POLICY_WAIT_S = 5.0  # a policy write must be in force within this
POLL_S = 0.1

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

# Runs in n2-a: HTTP (fixed RESPONSE, whatever the request) on each port of
# argv[2] (comma separated), echo on argv[3]. Reads the request up to its blank
# line, answers, half-closes, drains until the client's FIN (so nothing unread
# turns the close into a reset). Prints "ready"; exits by itself after 10
# minutes (orphan guard).
SERVER = r"""
import select, socket, sys, threading, time
response = bytes.fromhex(sys.argv[1])
http_ports = [int(p) for p in sys.argv[2].split(",")]
echo_port = int(sys.argv[3])

def listen(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(64)
    return s

def http(c):
    try:
        c.settimeout(20)
        buf = b""
        while b"\r\n\r\n" not in buf and len(buf) < 65536:
            data = c.recv(65536)
            if not data:
                break
            buf += data
        c.sendall(response)
        c.shutdown(socket.SHUT_WR)
        while c.recv(65536):
            pass
    except OSError:
        pass
    finally:
        c.close()

def echo(c):
    try:
        c.settimeout(120)
        while True:
            data = c.recv(65536)
            if not data:
                break
            c.sendall(data)
    except OSError:
        pass
    finally:
        c.close()

handlers = {listen(p): http for p in http_ports}
handlers[listen(echo_port)] = echo
print("ready", flush=True)
deadline = time.monotonic() + 600
while time.monotonic() < deadline:
    for s in select.select(list(handlers), [], [], 0.5)[0]:
        c, _ = s.accept()
        threading.Thread(target=handlers[s], args=(c,), daemon=True).start()
"""

# Runs in a client pod: ``count`` connections one after the other, each sends
# the request, half-closes and reads to EOF. Prints one JSON list of
# {"port": local port, "received": bytes, "error": str|None}.
RAW_CLIENT = r"""
import json, socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
request = bytes.fromhex(sys.argv[4])
out = []
for _ in range(count):
    item = {"port": None, "received": 0, "error": None}
    try:
        with socket.create_connection((host, port), timeout=10) as c:
            item["port"] = c.getsockname()[1]
            c.sendall(request)
            c.shutdown(socket.SHUT_WR)
            while True:
                data = c.recv(65536)
                if not data:
                    break
                item["received"] += len(data)
    except OSError as exc:
        item["error"] = f"{type(exc).__name__}: {exc}"
    out.append(item)
print(json.dumps(out))
"""

# Runs in a client pod: one long-lived echo exchange. Prints "connected" after
# the first round trip, then keeps exchanging until the connection ends and
# prints how: "closed" (EOF), "reset: ..." (error) or "timeout" (still alive
# after argv[3] seconds).
LONG_CLIENT = r"""
import socket, sys, time
host, port, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
c = socket.create_connection((host, port), timeout=5)
c.sendall(b"ping\n")
if c.recv(64) != b"ping\n":
    print("bad echo", flush=True); sys.exit(1)
print("connected", flush=True)
deadline = time.monotonic() + limit
try:
    while time.monotonic() < deadline:
        c.sendall(b"ping\n")
        if not c.recv(64):
            print("closed", flush=True); sys.exit(0)
        time.sleep(0.1)
except OSError as exc:
    print(f"reset: {type(exc).__name__}: {exc}", flush=True); sys.exit(0)
print("timeout", flush=True)
"""


@dataclass(frozen=True)
class Lab:
    plan: LabPlan

    @property
    def prefix(self) -> str:
        return self.plan.prefix

    def node_dir(self, node: str) -> Path:
        return Path(self.plan.node_run_dir(node))

    @property
    def policy_dir(self) -> Path:
        return self.node_dir("node2") / "policies"

    def log_path(self, node: str) -> Path:
        return Path(netlab.process_log_path(self.plan, node, "tunnel"))

    def netns(self, pod_or_node: str) -> str:
        if pod_or_node.startswith("node"):
            return self.plan.node(pod_or_node).netns
        return self.plan.pod(pod_or_node).netns

    def cli_env(self, node: str) -> dict[str, str]:
        """What ``meshagent`` needs to talk to ``node``'s agent (as in the brief)."""
        return {
            "MESHAGENT_AGENT_SOCKET": mesh.agent_socket(self.plan, node),
            "MESHAGENT_CONFIG": str(Path(self.plan.run_dir) / "config.toml"),
            "MESHAGENT_TUNNEL_POLICY_DIR": str(self.node_dir(node) / "policies"),
        }

    def tunnel_pid(self, node: str) -> int:
        return int((self.node_dir(node) / "tunnel.pid").read_text().strip())


# -- processes ------------------------------------------------------------------------







def _meshagent(args: Sequence[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, **env},
        check=False,
    )



# -- traffic --------------------------------------------------------------------------


def _curl(lab: Lab, pod: str, port: int, host: str = N2A) -> subprocess.CompletedProcess[str]:
    """curl from ``pod``; returncode 0 and stdout "200" when it worked."""
    return _run_in(
        lab.netns(pod),
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
    res = _run_in(
        lab.netns(pod),
        [sys.executable, "-c", RAW_CLIENT, N2A, str(port), str(count), REQUEST.hex()],
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    items: list[dict[str, Any]] = json.loads(res.stdout)
    return items


# -- access log -----------------------------------------------------------------------


def _log_mark(lab: Lab, node: str) -> int:
    return lab.log_path(node).stat().st_size


def _events(lab: Lab, node: str, since: int = 0) -> list[dict[str, Any]]:
    with open(lab.log_path(node), "rb") as handle:
        handle.seek(since)
        text = handle.read().decode(errors="replace")
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                out.append(event)
    return out


def _closed(lab: Lab, node: str, since: int, **match: str) -> list[dict[str, Any]]:
    """``connection closed`` lines after ``since`` whose fields equal ``match``."""
    return [
        e
        for e in _events(lab, node, since)
        if e.get("event") == "connection closed" and all(e.get(k) == v for k, v in match.items())
    ]


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


def _tunnel_status(lab: Lab, node: str = "node2") -> dict[str, Any]:
    """What ``meshagent status --json`` shows under ``tunnel`` (same API call)."""
    status = client.call(mesh.agent_socket(lab.plan, node), {"op": "status"}, timeout=5)
    tunnel: dict[str, Any] = status.get("tunnel") or {}
    return tunnel


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # not *.yaml: the tunnel ignores it
    tmp.write_text(text)
    os.replace(tmp, path)


def _loads(lab: Lab, since: int) -> list[dict[str, Any]]:
    return [e for e in _events(lab, "node2", since) if e.get("event") == "policies loaded"]


def _apply(lab: Lab, files: Mapping[str, str | None], expect: int) -> list[dict[str, Any]]:
    """Write (text) or remove (None) policy files in node2's directory atomically,
    then wait until the tunnel has loaded a set of ``expect`` policies. Returns the
    ``policies loaded`` log lines this change produced."""
    mark = _log_mark(lab, "node2")
    lab.policy_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = lab.policy_dir / name
        if text is None:
            path.unlink(missing_ok=True)
        else:
            _write_atomic(path, text)

    def loaded() -> list[dict[str, Any]] | None:
        lines = _loads(lab, mark)
        status = _tunnel_status(lab)
        if (
            lines
            and lines[-1].get("count") == expect
            and status.get("policies") == expect
            and status.get("policy_error") is None
        ):
            return lines
        return None

    result: list[dict[str, Any]] = _until(
        f"node2 tunnel loads {expect} policies", loaded, timeout=POLICY_WAIT_S
    )
    return result


def _clear_policies(lab: Lab) -> None:
    files = {p.name: None for p in lab.policy_dir.glob("*")} if lab.policy_dir.is_dir() else {}
    status = _tunnel_status(lab)
    if not files and status.get("policies") == 0 and status.get("policy_error") is None:
        return
    for name in files:
        (lab.policy_dir / name).unlink(missing_ok=True)

    def cleared() -> bool:
        status = _tunnel_status(lab)
        return status.get("policies") == 0 and status.get("policy_error") is None

    _until("node2 tunnel drops every policy", cleared, timeout=POLICY_WAIT_S)


# -- metrics --------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(lab: Lab, node: str) -> Samples:
    res = _run_in(
        lab.netns(node), ["curl", "-s", "-m", "5", f"http://127.0.0.1:{METRICS_PORT}/metrics"]
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
def lab() -> Iterator[Lab]:
    """A two-node HBONE lab with HTTP (80, 8080), echo (9090) and iperf3 in n2-a."""
    prefix = "p" + secrets.token_hex(2)
    servers: list[subprocess.Popen[Any]] = []
    try:
        plan = netlab.up(build_plan(prefix),
                         after_topology=functools.partial(mesh.start_mesh, mode="hbone"))
        the_lab = Lab(plan)
        ns = the_lab.netns("n2-a")
        server = subprocess.Popen(
            [
                "nsenter",
                f"--net=/run/netns/{ns}",
                "--",
                sys.executable,
                "-c",
                SERVER,
                RESPONSE.hex(),
                ",".join(map(str, HTTP_PORTS)),
                str(ECHO_PORT),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        servers.append(server)
        assert server.stdout is not None
        ready, _, _ = select.select([server.stdout], [], [], 10)
        line = server.stdout.readline().strip() if ready else ""
        assert line == "ready", f"server in n2-a did not start: {line!r}"
        servers.append(
            subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{ns}", "--", "iperf3", "-s", "-p", str(IPERF_PORT)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        _until(
            "servers listen in n2-a", lambda: _listening(ns, [*HTTP_PORTS, ECHO_PORT, IPERF_PORT])
        )
        _until(
            "node2 tunnel knows its pods and node1's",
            lambda: (
                (s := _tunnel_status(the_lab)).get("workloads") == 2
                and s.get("peer_workloads") == 2
            ),
        )
        _until(
            "node1 tunnel knows its pods and node2's",
            lambda: (
                (s := _tunnel_status(the_lab, "node1")).get("workloads") == 2
                and s.get("peer_workloads") == 2
            ),
        )
        yield the_lab
    finally:
        for proc in servers:
            _stop(proc)
        with contextlib.suppress(Exception):
            netlab.down(prefix)
        if _leftovers(prefix):  # last resort, should never be needed
            for name in netlab.existing_netns(prefix):
                with contextlib.suppress(OSError):
                    netns.remove(name)
            shutil.rmtree(run_dir(prefix), ignore_errors=True)
        assert _leftovers(prefix) == []


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
    mark = _log_mark(lab, "node2")
    _assert_fails(lab, "n1-b", 80)
    _assert_ok(lab, "n1-a", 80)
    denied = _until(
        "node2 logs the denied attempt",
        lambda: _closed(lab, "node2", mark, src=N1B, dst=f"{N2A}:80"),
    )
    assert len(denied) == 1, denied
    entry = denied[0]
    assert entry["result"] == "denied" and entry["policy_decision"] == "deny", entry
    assert entry["policy"] == "default/deny-team-b", entry
    assert "deny-team-b" in entry["reason"], entry
    assert entry["src_identity"] == "spiffe://cluster.local/ns/team-b/sa/sa-b"
    allowed = _until(
        "node2 logs the allowed connection",
        lambda: _closed(lab, "node2", mark, src=N1A, dst=f"{N2A}:80"),
    )
    assert [e["result"] for e in allowed] == ["ok"], allowed


# -- 2: ALLOW on one port --------------------------------------------------------------


def test_allow_port_80_only(clean: Lab) -> None:
    lab = clean
    allow = _policy("allow-80", "ALLOW", [{"to": [{"operation": {"ports": ["80"]}}]}])
    _apply(lab, {"allow-80.yaml": allow}, expect=1)
    mark = _log_mark(lab, "node2")
    _assert_ok(lab, "n1-a", 80)
    _assert_fails(lab, "n1-a", 8080)
    _assert_ok(lab, "n1-b", 80)  # the ALLOW names no source: any source on port 80
    denied = _until(
        "node2 logs the denied 8080 attempt",
        lambda: _closed(lab, "node2", mark, src=N1A, dst=f"{N2A}:8080"),
    )
    assert [e["result"] for e in denied] == ["denied"], denied
    # with no ALLOW matching, the reason is the allow-list, not a named DENY
    assert "allow" in denied[0]["reason"].lower(), denied[0]


# -- 3: live policy edits --------------------------------------------------------------


def test_policy_edit_applies_live(clean: Lab) -> None:
    lab = clean
    pid = lab.tunnel_pid("node2")
    iperf = subprocess.Popen(
        [
            "nsenter",
            f"--net=/run/netns/{lab.netns('n1-a')}",
            "--",
            "iperf3",
            "-c",
            N2A,
            "-p",
            str(IPERF_PORT),
            "-t",
            "6",
            "-J",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        # control + data connection are both up and authorized on node2
        _until(
            "iperf3 connections are active on node2",
            lambda: _tunnel_status(lab).get("active_inbound", 0) >= 2,
        )
        _apply(lab, {"deny-team-b.yaml": DENY_TEAM_B}, expect=1)
        assert iperf.poll() is None, "iperf3 ended before the policy was in force"
        _assert_fails(lab, "n1-b", IPERF_PORT)
        _assert_fails(lab, "n1-b", 80)
        out, err = iperf.communicate(timeout=30)
    finally:
        _stop(iperf)
    assert iperf.returncode == 0, f"iperf3 failed: {err}\n{out[-2000:]}"
    report = json.loads(out)
    assert "error" not in report, report.get("error")
    assert report["end"]["sum_received"]["bytes"] > 0
    assert lab.tunnel_pid("node2") == pid and _running(pid), "the tunnel was restarted"

    # A DENY that matches a running connection closes it.
    mark = _log_mark(lab, "node2")
    longc = subprocess.Popen(
        [
            "nsenter",
            f"--net=/run/netns/{lab.netns('n1-a')}",
            "--",
            sys.executable,
            "-c",
            LONG_CLIENT,
            N2A,
            str(ECHO_PORT),
            "60",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert longc.stdout is not None
        ready, _, _ = select.select([longc.stdout], [], [], 10)
        line = longc.stdout.readline().strip() if ready else ""
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
        ready, _, _ = select.select([longc.stdout], [], [], 10)
        assert ready, "the denied connection is still open 10 s after the policy change"
        ended = longc.stdout.readline().strip()
        assert ended == "closed" or ended.startswith("reset"), ended
        longc.wait(timeout=10)
    finally:
        _stop(longc)
    closed = _until(
        "node2 logs the closed echo connection",
        lambda: _closed(lab, "node2", mark, src=N1A, dst=f"{N2A}:{ECHO_PORT}"),
    )
    assert len(closed) == 1, closed
    assert closed[0]["result"] == "denied", closed[0]
    assert closed[0]["policy"] == "default/deny-a-echo", closed[0]
    # what it carried before it was closed is still accounted for (>= 2 pings each way)
    assert closed[0]["bytes_sent"] >= 10 and closed[0]["bytes_received"] >= 10, closed[0]
    assert lab.tunnel_pid("node2") == pid and _running(pid)


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
    stand_in = f"{namespace}/meshagent-fail-closed[mixed.yaml#2]"

    def ready() -> dict[str, Any] | None:
        loads = _loads(lab, since)
        status = _tunnel_status(lab)
        error = status.get("policy_error") or ""
        if loads and loads[-1].get("count") == 2 and status.get("policies") == 2 and (
                "mixed.yaml: document 2" in error):
            return status
        return None

    status: dict[str, Any] = _until(f"node2 tunnel fails closed for {stand_in}", ready,
                                    timeout=POLICY_WAIT_S)
    return status


def test_invalid_policy_document_fails_closed_for_its_scope(clean: Lab) -> None:
    lab = clean
    mark = _log_mark(lab, "node2")
    lab.policy_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(lab.policy_dir / "mixed.yaml", DENY_TEAM_B + "\n---\n" + _bad_cidr("default"))
    _wait_fail_closed(lab, mark, "default")
    cli = _meshagent(["status", "--json"], lab.cli_env("node2"))
    assert cli.returncode == 0, cli.stderr
    tunnel = json.loads(cli.stdout)["tunnel"]
    assert tunnel["policies"] == 2, tunnel
    error = tunnel["policy_error"]
    assert "mixed.yaml: document 2" in error and "ipBlocks[1]" in error, error
    assert "10.0.0.300/8" in error, error
    logged = [e for e in _events(lab, "node2", mark)
              if e.get("event") == "policy document not enforced as written"]
    assert len(logged) == 1, logged
    assert (logged[0]["file"], logged[0]["document"], logged[0]["outcome"]) == (
        "mixed.yaml", 2, "fail_closed"), logged
    # The bad DENY was for namespace default: everything to n2-a is denied now.
    _assert_fails(lab, "n1-a", 80)
    _assert_fails(lab, "n1-b", 80)

    # Moved to a namespace with no pods: only that scope fails closed, and document 1
    # of the same file (deny team-b) is enforced as written.
    mark = _log_mark(lab, "node2")
    _write_atomic(lab.policy_dir / "mixed.yaml",
                  DENY_TEAM_B + "\n---\n" + _bad_cidr("elsewhere"))
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
        after = _until(f"{node} counts {K} closed connections", lambda n=node: closed_counted(n))
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

        after = _until(f"{node} counts the denied attempt", failed_counted)
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


def test_access_log_one_line_per_connection(clean: Lab) -> None:
    lab = clean
    marks = {node: _log_mark(lab, node) for node in ("node1", "node2")}
    results = _raw_requests(lab, "n1-a", 80, K)
    assert [r["error"] for r in results] == [None] * K, results
    ports = [r["port"] for r in results]
    assert len(set(ports)) == K, ports
    # node1 (client side) logs the client's port: exactly one line per connection
    for port in ports:
        lines = _until(
            f"node1 logs the connection from port {port}",
            lambda p=port: _closed(lab, "node1", marks["node1"], src=f"{N1A}:{p}"),
        )
        assert len(lines) == 1, lines
        entry = lines[0]
        assert (entry["direction"], entry["path"], entry["dst"]) == (
            "outbound",
            "hbone",
            f"{N2A}:80",
        ), entry
        assert (entry["bytes_sent"], entry["bytes_received"]) == (len(REQUEST), len(RESPONSE))
        assert entry["result"] == "ok" and entry["dst_identity"] == SA_A, entry
    # node2 (server side) logs the client's address without a port: K lines in all

    def all_logged() -> list[dict[str, Any]] | None:
        lines = _closed(lab, "node2", marks["node2"], src=N1A)
        return lines if len(lines) >= K else None

    inbound = _until(f"node2 logs {K} connections", all_logged)
    assert len(inbound) == K, inbound
    for entry in inbound:
        assert (entry["direction"], entry["path"], entry["dst"], entry["result"]) == (
            "inbound",
            "hbone",
            f"{N2A}:80",
            "ok",
        ), entry
        assert (entry["bytes_sent"], entry["bytes_received"]) == (len(REQUEST), len(RESPONSE))
        assert entry["src_identity"] == SA_A, entry
    # and no other connection was logged meanwhile
    assert len(_closed(lab, "node1", marks["node1"])) == K
    assert len(_closed(lab, "node2", marks["node2"])) == K


# -- 7: policy check -------------------------------------------------------------------


def test_policy_check_explains(clean: Lab) -> None:
    lab = clean
    _apply(lab, {"deny-team-b.yaml": DENY_TEAM_B}, expect=1)
    env = lab.cli_env("node2")
    denied = _meshagent(["policy", "check", "--from", "n2-b", "--to", "n2-a:80"], env)
    assert denied.returncode == 1, denied.stdout + denied.stderr
    assert "default/deny-team-b" in denied.stdout, denied.stdout
    assert "DENY" in denied.stdout, denied.stdout
    allowed = _meshagent(["policy", "check", "--from", "n2-a", "--to", "n2-a:80"], env)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "ALLOW" in allowed.stdout, allowed.stdout
    by_id = _meshagent(
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


def test_dry_run_deny_is_reported_not_enforced(clean: Lab) -> None:
    lab = clean
    dry = _policy(
        "audit-a",
        "DENY",
        [{"from": [{"source": {"principals": [SA_A.removeprefix("spiffe://")]}}]}],
        annotations={"istio.io/dry-run": "true"},
    )
    _apply(lab, {"audit-a.yaml": dry}, expect=1)
    mark = _log_mark(lab, "node2")
    _assert_ok(lab, "n1-a", 80)
    matched = _until(
        "node2 logs the dry-run match",
        lambda: [
            e for e in _events(lab, "node2", mark) if e.get("event") == "dry-run policy matched"
        ],
    )
    assert len(matched) == 1, matched
    assert matched[0]["src"] == N1A and matched[0]["dst"] == f"{N2A}:80", matched[0]
    assert "default/audit-a DENY" in matched[0]["matches"], matched[0]
    assert matched[0]["would_allow"] is False, matched[0]
    entry = _until(
        "node2 logs the connection", lambda: _closed(lab, "node2", mark, src=N1A, dst=f"{N2A}:80")
    )
    assert [e["result"] for e in entry] == ["ok"], entry
    # n1-b is not matched by it: no dry-run line for its connection
    mark = _log_mark(lab, "node2")
    _assert_ok(lab, "n1-b", 80)
    _until(
        "node2 logs n1-b's connection",
        lambda: _closed(lab, "node2", mark, src=N1B, dst=f"{N2A}:80"),
    )
    assert not [
        e for e in _events(lab, "node2", mark) if e.get("event") == "dry-run policy matched"
    ]
