"""Helpers for tests that drive traffic through a running mesh lab (root only).

Everything here is bounded: commands have timeouts, waits poll a fixed number
of times with a deadline. Nothing here creates lab resources; the fixture that
builds the lab owns its teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import netns as pyroute2_netns

from agent.api import client
from agent.lab import mesh, netlab
from agent.lab.topology import LabPlan, run_dir

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")

# Our tc filters: priority 0x3a, handle 0xa11 (config agent.tc_priority / tc_handle).
TC_PREF = "pref 58 "
TC_HANDLE = "handle 0xa11 "


# -- prefixes, processes, cleanup -------------------------------------------------

# The pod networks a lab suite runs on (``meshagent lab up --pods``): pods made by
# Debian's CNI plugins, ptp and bridge (br_netfilter on), with meshagent-cni
# chained. A module fixture takes them as ``params=CNI_POD_NETWORKS`` and
# passes ``request.param`` to :func:`lab_up_args`.
CNI_POD_NETWORKS = ("cni", "cni-bridge")


def lab_up_args(prefix: str, pod_network: str = "veth") -> list[str]:
    """``meshagent lab up`` arguments for lab ``prefix`` on ``pod_network``."""
    return ["lab", "up", "--prefix", prefix, "--pods", pod_network]


def unique_prefix(letter: str) -> str:
    """``letter`` + 4 hex digits: unique per run, valid as a lab prefix."""
    return letter + secrets.token_hex(2)


def meshagent_cli(
    args: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``meshagent ARGS`` (as ``python -m agent``) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        check=False,
    )


def leftovers(prefix: str) -> list[str]:
    """Namespaces, run dir and BPF pin dirs of lab ``prefix`` that still exist."""
    left = list(netlab.existing_netns(prefix))
    if os.path.lexists(run_dir(prefix)):
        left.append(run_dir(prefix))
    with contextlib.suppress(OSError):
        left += [
            f"/sys/fs/bpf/{d}"
            for d in os.listdir("/sys/fs/bpf")
            if d.startswith(f"meshagent-{prefix}-")
        ]
    return left


def save_logs(prefix: str, dest: Path) -> None:
    """Copy the lab's logs and agent state (not sockets) to ``dest``, for post-mortems."""
    with contextlib.suppress(OSError):
        shutil.copytree(run_dir(prefix), dest, ignore=shutil.ignore_patterns("*.sock"),
                        dirs_exist_ok=True)


def destroy_lab(prefix: str) -> list[str]:
    """Remove lab ``prefix`` whatever state it is in; return what could not be removed."""
    with contextlib.suppress(Exception):
        netlab.down(prefix)
    for path in leftovers(prefix):  # last resort, should never be needed
        if path.startswith("/"):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                pyroute2_netns.remove(path)
    return leftovers(prefix)


def wait_until(
    what: str, check: Callable[[], T | None], attempts: int = 100, interval: float = 0.05,
    timeout: float = 10.0,
) -> T:
    """Poll ``check`` until it returns something truthy: at most ``attempts``
    times and ``timeout`` seconds. Raises AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    for _ in range(attempts):
        last = check()
        if last:
            return last
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last value: {last!r})")


def in_netns(
    ns: str, argv: Sequence[str], timeout: float = 30, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in network namespace ``ns`` and capture its output."""
    return subprocess.run(
        netlab.nsenter_argv(ns, argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input_text,
        check=False,
    )


@dataclass
class Background:
    """Long-running processes started in lab namespaces; killed by ``stop_all``."""

    logdir: Path
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def start(
        self, ns: str, name: str, argv: Sequence[str], ready_line: str | None = None,
        timeout: float = 10,
    ) -> subprocess.Popen[str]:
        """Start ``argv`` in ``ns``; if ``ready_line`` is given, wait (bounded)
        until it prints that line on stdout."""
        log = open(self.logdir / f"{name}.log", "w")  # noqa: SIM115 - owned by the child
        try:
            proc = subprocess.Popen(
                netlab.nsenter_argv(ns, argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        finally:
            log.close()
        self.procs.append(proc)
        if ready_line is not None:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], timeout)
            line = proc.stdout.readline().strip() if ready else ""
            assert line == ready_line, (
                f"{name} in {ns} did not become ready within {timeout}s (said {line!r}); "
                f"stderr: {(self.logdir / f'{name}.log').read_text()[-2000:]}"
            )
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError):
                proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                proc.communicate(timeout=10)
        self.procs.clear()


# -- the lab -----------------------------------------------------------------------


@dataclass(frozen=True)
class Lab:
    plan: LabPlan
    background: Background

    @property
    def prefix(self) -> str:
        return self.plan.prefix

    def ns(self, pod_or_node: str) -> str:
        """The netns of a pod (``n1-a``) or node (``node1``)."""
        if pod_or_node.startswith("node"):
            return self.plan.node(pod_or_node).netns
        return self.plan.pod(pod_or_node).netns

    def socket(self, node: str) -> str:
        return mesh.agent_socket(self.plan, node)

    def api(self, node: str, request: dict[str, Any]) -> Any:
        return client.call(self.socket(node), request, timeout=30)

    def pod_counters(self, node: str, pod: str) -> dict[str, Any]:
        for p in self.api(node, {"op": "pod_list"}):
            if p["name"] == pod:
                return p["counters"] or {}
        raise AssertionError(f"{pod} is not enrolled on {node}")

    def cli_env(self, node: str) -> dict[str, str]:
        return {
            "MESHAGENT_AGENT_SOCKET": self.socket(node),
            "MESHAGENT_CONFIG": str(Path(self.plan.run_dir) / "config.toml"),
        }

    def tunnel_log(self, node: str) -> Path:
        return Path(self.plan.node_run_dir(node)) / "tunnel.log"


# -- traffic -----------------------------------------------------------------------


@dataclass(frozen=True)
class CurlResult:
    rc: int
    status: int
    local_ip: str
    local_port: int
    body: str
    stderr: str

    def server_view(self) -> dict[str, str]:
        """The ``key=value`` words of the body of our HTTP server's reply."""
        return dict(w.split("=", 1) for w in self.body.split() if "=" in w)


def curl(ns: str, host: str, port: int, timeout: float = 5) -> CurlResult:
    """Real ``curl`` GET http://host:port/ from netns ``ns``."""
    h = f"[{host}]" if ":" in host else host
    out = in_netns(
        ns,
        [
            "curl", "-sS", "-g", "-m", str(timeout), "-o", "-",
            "-w", "\n%{http_code} %{local_ip} %{local_port}", f"http://{h}:{port}/",
        ],
        timeout=timeout + 10,
    )
    body, _, trailer = out.stdout.rpartition("\n")
    words = trailer.split()
    status = int(words[0]) if words and words[0].isdigit() else 0
    local_ip = words[1] if len(words) > 1 else ""
    local_port = int(words[2]) if len(words) > 2 and words[2].isdigit() else 0
    return CurlResult(out.returncode, status, local_ip, local_port, body, out.stderr)


def python_in(ns: str, script: str, *args: str, timeout: float = 60) -> dict[str, Any]:
    """Run a Python ``script`` in ``ns``; it must print one JSON object."""
    out = in_netns(ns, [sys.executable, "-c", script, *args], timeout=timeout)
    assert out.returncode == 0, f"script in {ns} failed ({out.returncode}): {out.stderr}"
    return dict(json.loads(out.stdout))


def addr(ip: str, port: int) -> str:
    """The tunnel's access-log spelling of an address: ``ip:port`` or ``[v6]:port``."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def split_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


# -- the tunnels' access logs ---------------------------------------------------------


def tunnel_records(lab: Lab, node: str) -> list[dict[str, Any]]:
    """Every ``connection closed`` record of ``node``'s tunnel, oldest first."""
    out = []
    try:
        text = lab.tunnel_log(node).read_text()
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line being written right now, or a non-JSON line
        if isinstance(entry, dict) and entry.get("event") == "connection closed":
            out.append(entry)
    return out


Mark = dict[str, int]


def log_tails(lab: Lab, lines: int = 6) -> str:
    """The last lines of every daemon log of the lab, for assertion messages."""
    out = []
    for node in lab.plan.nodes:
        for name in ("tunnel", "agent"):
            path = Path(lab.plan.node_run_dir(node.name)) / f"{name}.log"
            with contextlib.suppress(OSError):
                tail = path.read_text().splitlines()[-lines:]
                out.append(f"--- {path}\n" + "\n".join(tail))
    return "\n".join(out)


def mark(lab: Lab) -> Mark:
    """How many records each node's tunnel has logged so far."""
    return {n.name: len(tunnel_records(lab, n.name)) for n in lab.plan.nodes}


def new_records(lab: Lab, since: Mark, node: str) -> list[dict[str, Any]]:
    return tunnel_records(lab, node)[since[node]:]


def wait_record(
    lab: Lab, node: str, since: Mark, pred: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """The first record logged on ``node`` after ``since`` that matches ``pred``
    (records are written when a connection closes, so this polls, bounded)."""

    def find() -> dict[str, Any] | None:
        return next((r for r in new_records(lab, since, node) if pred(r)), None)

    try:
        return wait_until(f"{what} in {node}'s tunnel log", find, attempts=100, timeout=10)
    except AssertionError as exc:
        recent = json.dumps(new_records(lab, since, node), indent=1)[-3000:]
        raise AssertionError(f"{exc}; new records on {node}: {recent}") from None


def flush_tunnel_logs(lab: Lab, http_port: int) -> None:
    """Make a marker connection n1-a -> n2-a (captured on both nodes) and wait
    until both tunnels logged it. Anything a tunnel handled before the marker
    was made is in its log by then; a negative "no record" check after this is
    meaningful rather than a race."""
    since = mark(lab)
    a, b = lab.plan.pod("n1-a"), lab.plan.pod("n2-a")
    res = curl(lab.ns("n1-a"), str(b.ipv4), http_port)
    assert (res.rc, res.status) == (0, 200), f"marker connection failed: {res}"
    wait_record(lab, "node1", since, lambda r: r["src"] == addr(str(a.ipv4), res.local_port),
                "the marker's outbound record")
    wait_record(lab, "node2", since,
                lambda r: r["direction"] == "inbound"
                and split_addr(r["src"])[0] == str(a.ipv4)
                and r["dst"] == addr(str(b.ipv4), http_port),
                "the marker's inbound record")


# -- tc ------------------------------------------------------------------------------


def our_filters(ns: str, dev: str, direction: str) -> list[str]:
    """Lines of ``tc filter show`` for our filters (pref 58, handle 0xa11) on
    ``direction`` (ingress|egress); [] when the device has no clsact."""
    out = subprocess.run(
        ["tc", "-n", ns, "filter", "show", "dev", dev, direction],
        capture_output=True, text=True, timeout=10, check=False,
    )
    return [
        line for line in out.stdout.splitlines()
        if TC_PREF in line and (TC_HANDLE in line or "meshagent" in line)
    ]


def qdiscs(ns: str, dev: str) -> str:
    return subprocess.run(
        ["tc", "-n", ns, "qdisc", "show", "dev", dev],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout

