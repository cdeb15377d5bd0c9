"""The lab driver of the integration tests (root): one copy of everything the
netns suites share.

* building a lab and tearing it down whatever happened, then asserting that
  nothing of it is left (:func:`lab_up`, :func:`owned_prefix`);
* processes: commands in a namespace, background servers, the ``meshagent``
  CLI, the in-pod programs of ``programs/`` (:func:`program`);
* bounded polling (:func:`wait_until`, :func:`until`);
* the tunnels' JSON logs (marks, events, ``connection closed`` records);
* tc, links and sysctls of a node;
* :class:`Capture`: tcpdump on a node's underlay interface.

Every wait is bounded in count and time; every process started here is
reaped. The fixtures in ``conftest.py`` are built on this module; suites use
both (see ``tests/README.md``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import netns as pyroute2_netns

from agent.api import client
from agent.identity.ca import DEFAULT_TRUST_DOMAIN, import_istio_ca
from agent.lab import mesh, netlab
from agent.lab.topology import CNI_POD_NETWORKS, LabPlan, NodePlan, PodPlan, build_plan, run_dir

REPO = Path(__file__).resolve().parents[2]
PROGRAMS = Path(__file__).resolve().parent / "programs"
AGENT_ARGV = [sys.executable, "-m", "agent"]
T = TypeVar("T")

WAIT_S = 15.0  # default upper bound of every wait
POLL_S = 0.1
# What a check polled by until() may raise while the thing it waits for is not there yet.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, client.AgentUnavailable, client.AgentError,
)

# Our tc filters: priority 0x3a, handle 0xa11 (config agent.tc_priority / tc_handle).
TC_PREF = "pref 58 "
TC_HANDLE = "handle 0xa11 "

# Pod networks a lab can be built with: agent.lab.topology.POD_NETWORKS;
# conftest's ``pod_network`` fixture parametrises suites over the ones they declare.
POD_NETWORKS_ENV = "MESHAGENT_TEST_POD_NETWORKS"  # e.g. "veth,cni": restrict every suite


# -- polling ------------------------------------------------------------------------


def wait_until(
    what: str,
    check: Callable[[], T | None],
    timeout: float = 10.0,
    interval: float = 0.05,
    tolerate: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``check`` until it returns something truthy and return that.

    At most ``timeout`` seconds and ``timeout / interval + 1`` calls. An
    exception in ``tolerate`` counts as "not yet". Raises AssertionError
    naming ``what`` and the last value (or exception) seen.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    for _ in range(int(timeout / interval) + 1):
        try:
            last = check()
        except tolerate as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} "
                         f"(last value: {last!r})")


def until(what: str, check: Callable[[], T | None], timeout: float = WAIT_S) -> T:
    """:func:`wait_until` for checks that talk to daemons: API and OS errors
    mean "not yet"; polls every ``POLL_S``."""
    return wait_until(what, check, timeout=timeout, interval=POLL_S, tolerate=TRANSIENT_ERRORS)


# -- prefixes, commands, processes --------------------------------------------------


def unique_prefix(letter: str, nbytes: int = 2) -> str:
    """``letter`` + ``2 * nbytes`` hex digits: unique per run, valid as a lab prefix."""
    return letter + secrets.token_hex(nbytes)


def program(name: str) -> list[str]:
    """The command line running ``programs/<name>.py`` with the tests' interpreter."""
    path = PROGRAMS / f"{name}.py"
    assert path.is_file(), f"no in-pod program {path}"
    return [sys.executable, str(path)]


def run_in(
    ns: str,
    argv: Sequence[str],
    timeout: float = 30,
    input_text: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in netns ``ns`` (nsenter, mounts untouched) and capture its
    output; never raises on the exit status. ``env`` replaces the environment."""
    return subprocess.run(
        netlab.nsenter_argv(ns, argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input_text,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        check=False,
    )


def run_program(ns: str, name: str, *args: str, timeout: float = 60) -> Any:
    """Run in-pod program ``name`` in ``ns``; it must exit 0 and print one JSON value."""
    out = run_in(ns, [*program(name), *args], timeout=timeout)
    assert out.returncode == 0, f"{name} in {ns} failed ({out.returncode}): {out.stderr}"
    return json.loads(out.stdout)


def meshagent_cli(
    args: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``meshagent ARGS`` (as ``python -m agent``) and capture its output."""
    return subprocess.run(
        [*AGENT_ARGV, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        check=False,
    )


def running(pid: int) -> bool:
    """Whether ``pid`` runs (zombies count as gone; reaps it if it is our child)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> None:
    """Signal ``proc`` (if still running) and reap it, bounded."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
    try:
        proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)


@contextlib.contextmanager
def spawned(ns: str, argv: Sequence[str]) -> Iterator[subprocess.Popen[str]]:
    """``argv`` running in ``ns`` for the block (stdout and stderr piped); killed after."""
    proc = subprocess.Popen(netlab.nsenter_argv(ns, argv), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)


def read_line(proc: subprocess.Popen[str], timeout: float = 10) -> str:
    """The next line ``proc`` prints on stdout (stripped), or "" after ``timeout``."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


def listening(ns: str, ports: Sequence[int]) -> bool:
    """Whether something listens on every TCP port of ``ports`` in ``ns``."""
    out = run_in(ns, ["ss", "-Hltn"], timeout=10).stdout
    local = {line.split()[3].rsplit(":", 1)[-1] for line in out.splitlines() if line.strip()}
    return all(str(p) in local for p in ports)


@dataclass
class Background:
    """Long-running processes started in lab namespaces; killed by ``stop_all``
    (the lab fixtures call it before the lab goes down)."""

    logdir: Path
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def start(
        self, ns: str, name: str, argv: Sequence[str], ready_line: str | None = None,
        timeout: float = 10,
    ) -> subprocess.Popen[str]:
        """Start ``argv`` in ``ns`` (stderr, and stdout unless ``ready_line``,
        to ``<logdir>/<name>.log``); if ``ready_line`` is given, wait (bounded)
        until it prints that line on stdout."""
        self.logdir.mkdir(parents=True, exist_ok=True)
        log_path = self.logdir / f"{name}.log"
        log = open(log_path, "w")  # noqa: SIM115 - owned by the child
        try:
            proc = subprocess.Popen(
                netlab.nsenter_argv(ns, argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if ready_line is not None else log,
                stderr=log,
                text=True,
                start_new_session=True,
            )
        finally:
            log.close()
        self.procs.append(proc)
        if ready_line is not None:
            line = read_line(proc, timeout)
            assert line == ready_line, (
                f"{name} in {ns} did not become ready within {timeout}s (said {line!r}); "
                f"stderr: {log_path.read_text()[-2000:]}"
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


# -- building and removing labs -----------------------------------------------------


def leftovers(prefix: str) -> list[str]:
    """Namespaces, run dir and BPF pin dirs of lab ``prefix`` that still exist."""
    left = list(netlab.existing_netns(prefix))
    if os.path.lexists(run_dir(prefix)):
        left.append(run_dir(prefix))
    with contextlib.suppress(OSError):
        left += [
            f"/sys/fs/bpf/{d}"
            for d in os.listdir("/sys/fs/bpf")
            if d.startswith(f"meshagent-{prefix}-") or d.startswith(f"{prefix}-")
        ]
    return left


def save_logs(prefix: str, dest: Path) -> None:
    """Copy the lab's logs and agent state (not sockets) to ``dest``, for post-mortems."""
    with contextlib.suppress(OSError):
        shutil.copytree(run_dir(prefix), dest, ignore=shutil.ignore_patterns("*.sock"),
                        dirs_exist_ok=True)


def destroy_lab(prefix: str) -> tuple[list[str], str]:
    """Remove lab ``prefix`` whatever state it is in.

    Returns (what could not be removed, the error ``lab down`` raised or "").
    Whatever ``lab down`` left is removed as a last resort (it should never
    have to be), so one broken test does not leak into the next.
    """
    problem = ""
    try:
        netlab.down(prefix)
    except Exception as exc:  # reported by the caller, cleanup goes on
        problem = f"{type(exc).__name__}: {exc}"
    left = leftovers(prefix)
    for path in left:  # last resort
        if path.startswith("/"):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                pyroute2_netns.remove(path)
    return left, problem


@contextlib.contextmanager
def owned_prefix(letter: str) -> Iterator[str]:
    """A fresh lab prefix; everything under it is removed afterwards, and the
    block fails if ``lab down`` could not remove it all by itself."""
    prefix = unique_prefix(letter)
    try:
        yield prefix
    finally:
        left, problem = destroy_lab(prefix)
        assert not left and not problem, (
            f"lab {prefix} left {left} behind ({problem or 'lab down said nothing'})")
        assert leftovers(prefix) == []


@dataclass(frozen=True)
class LabSpec:
    """How a suite wants its lab (a module sets ``LAB = LabSpec(...)``).

    ``mode`` is the tunnel mode (hbone, plain) or None for the topology only
    (no agents, no tunnels); ``pod_networks`` the pod networks the suite
    supports (conftest runs it once per network); ``letter`` starts every
    prefix, so a leftover says which suite made it; ``ca_from`` an Istio
    ``cacerts`` directory the lab's CA is imported from (default: a fresh
    meshagent CA).
    """

    letter: str = "t"
    mode: str | None = "hbone"
    nodes: int = 2
    pods_per_node: int = 2
    pod_networks: tuple[str, ...] = ("veth",)
    ca_from: str | None = None


@dataclass(frozen=True)
class Lab:
    """A running lab: its plan, the test's background processes, and shortcuts."""

    plan: LabPlan
    background: Background
    mode: str | None = None
    # Pods as the kernel has them (CNI labs: the addresses and host veths the
    # plugins made); filled by lab_up. Use lab.pod(name), not lab.plan.pod(name).
    pods: Mapping[str, PodPlan] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return self.plan.prefix

    @property
    def run_dir(self) -> str:
        return self.plan.run_dir

    def pod(self, name: str) -> PodPlan:
        """Pod ``name`` with its real addresses and host veth (see ``pods``)."""
        return self.pods.get(name) or self.plan.pod(name)

    def node(self, name: str) -> NodePlan:
        return self.plan.node(name)

    def ns(self, pod_or_node: str) -> str:
        """The netns of a pod (``n1-a``) or node (``node1``)."""
        if pod_or_node.startswith("node"):
            return self.plan.node(pod_or_node).netns
        return self.plan.pod(pod_or_node).netns

    def node_dir(self, node: str) -> Path:
        return Path(self.plan.node_run_dir(node))

    def socket(self, node: str) -> str:
        return mesh.agent_socket(self.plan, node)

    def api(self, node: str, request: dict[str, Any], timeout: float = 30) -> Any:
        return client.call(self.socket(node), request, timeout=timeout)

    def tunnel_status(self, node: str) -> dict[str, Any]:
        """What ``meshagent status --json`` shows under ``tunnel`` (same API call)."""
        tunnel: dict[str, Any] = self.api(node, {"op": "status"}, timeout=5).get("tunnel") or {}
        return tunnel

    def pod_counters(self, node: str, pod: str) -> dict[str, Any]:
        for p in self.api(node, {"op": "pod_list"}):
            if p["name"] == pod:
                return p["counters"] or {}
        raise AssertionError(f"{pod} is not enrolled on {node}")

    def policy_dir(self, node: str) -> Path:
        return self.node_dir(node) / "policies"

    def cli_env(self, node: str) -> dict[str, str]:
        """What ``meshagent`` needs to talk to ``node``'s agent."""
        return {
            "MESHAGENT_AGENT_SOCKET": self.socket(node),
            "MESHAGENT_CONFIG": str(Path(self.plan.run_dir) / "config.toml"),
            "MESHAGENT_TUNNEL_POLICY_DIR": str(self.policy_dir(node)),
        }

    def node_env(self, node: str, mode: str | None = None) -> dict[str, str]:
        """The environment the lab gives ``node``'s agent and tunnel."""
        return mesh.node_env(self.plan, self.plan.node(node), mode or self.mode or "hbone")

    def pid(self, node: str, name: str) -> int:
        return int((self.node_dir(node) / f"{name}.pid").read_text().strip())

    def tunnel_pid(self, node: str) -> int:
        return self.pid(node, "tunnel")

    def tunnel_log(self, node: str) -> Path:
        return Path(netlab.process_log_path(self.plan, node, "tunnel"))

    def start_daemon(self, node: str, name: str, mode: str | None = None,
                     extra_env: Mapping[str, str] | None = None) -> int:
        """(Re)start the agent (``name="agent"``) or the tunnel on ``node`` like the lab does."""
        command = "run" if name == "agent" else "tunnel"
        env = {**self.node_env(node, mode), **(extra_env or {})}
        return netlab.start_node_process(self.plan, node, name, [*AGENT_ARGV, command], env)


def _import_ca_then(ca_from: str, start: Callable[[LabPlan], None], plan: LabPlan) -> None:
    """Install Istio CA material as the lab's CA (start_mesh then loads it), then start."""
    import_istio_ca(ca_from, Path(plan.run_dir) / "ca", DEFAULT_TRUST_DOMAIN)
    start(plan)


LabFactory = Callable[..., contextlib.AbstractContextManager[Lab]]
"""conftest's ``lab_factory``: ``with lab_factory(**LabSpec overrides) as lab:``."""


@contextlib.contextmanager
def lab_up(
    spec: LabSpec, logdir: Path, pod_network: str | None = None
) -> Iterator[Lab]:
    """Build a lab as ``spec`` says (pods on ``pod_network``, default the
    spec's first), yield it, then always: stop the background processes, save
    the lab's logs to ``<logdir>/run``, remove the lab and assert nothing of it
    is left (namespaces, run dir, BPF pins) and ``lab down`` reported no error.
    """
    network = pod_network or spec.pod_networks[0]
    plan = build_plan(unique_prefix(spec.letter), nodes=spec.nodes,
                      pods_per_node=spec.pods_per_node, pod_network=network)
    background = Background(logdir)
    hook = functools.partial(mesh.start_mesh, mode=spec.mode) if spec.mode else None
    if hook is not None and spec.ca_from is not None:
        hook = functools.partial(_import_ca_then, spec.ca_from, hook)
    if hook is None and network in CNI_POD_NETWORKS:
        hook = functools.partial(mesh.start_mesh, mode="none")  # CNI ADD without agents
    try:
        netlab.up(plan, after_topology=hook)
        real = netlab.load_plan(plan.prefix)  # the lab may record what CNI plugins chose
        yield Lab(real, background, spec.mode, _pods_as_built(real))
    finally:
        background.stop_all()
        save_logs(plan.prefix, logdir / "run")
        left, problem = destroy_lab(plan.prefix)
        assert not left and not problem, (
            f"lab {plan.prefix} left {left} behind ({problem or 'lab down said nothing'}); "
            f"its logs are in {logdir / 'run'}")


@contextlib.contextmanager
def kube_lab_up(spec: LabSpec, logdir: Path) -> Iterator[Lab]:
    """:func:`lab_up` with ``--kube`` (the lab API server; the agents watch it); the
    caller's environment is restored before the lab is used."""
    from agent.lab import kube

    old = os.environ.get(kube.KUBE_ENV)
    os.environ[kube.KUBE_ENV] = "1"
    try:
        with lab_up(spec, logdir) as lab:
            os.environ.pop(kube.KUBE_ENV)
            yield lab
    finally:
        os.environ.pop(kube.KUBE_ENV, None)
        if old is not None:
            os.environ[kube.KUBE_ENV] = old


def _pods_as_built(plan: LabPlan) -> dict[str, PodPlan]:
    """Every pod of ``plan`` with the addresses and host veth the kernel has
    (they differ from the plan where CNI plugins chose them)."""
    listed = {p["name"]: p for n in netlab.list_lab(plan.prefix)["nodes"] for p in n["pods"]}
    out: dict[str, PodPlan] = {}
    for pod in plan.pods():
        seen = listed.get(pod.name, {})
        out[pod.name] = dataclasses.replace(
            pod, ipv4=seen.get("ipv4") or pod.ipv4, ipv6=seen.get("ipv6") or pod.ipv6,
            host_ifname=seen.get("host_ifname") or pod.host_ifname)
    return out


# -- addresses ----------------------------------------------------------------------


def addr(ip: str, port: int) -> str:
    """The tunnel's access-log spelling of an address: ``ip:port`` or ``[v6]:port``."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def split_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def lab_address(plan: LabPlan) -> Callable[[str], bool]:
    """Whether an address belongs to a lab node (underlay) or a lab pod CIDR."""
    nodes = {
        ipaddress.ip_address(a) for n in plan.nodes for a in (n.underlay_ipv4, n.underlay_ipv6)
    }
    cidrs = [ipaddress.ip_network(c) for n in plan.nodes for c in n.pod_cidrs]

    def check(text: str) -> bool:
        ip = ipaddress.ip_address(text)
        return ip in nodes or any(ip.version == c.version and ip in c for c in cidrs)

    return check


# -- the daemons' JSON logs -------------------------------------------------------------

LabLike = Lab | LabPlan
Mark = dict[str, int]  # node -> byte offset in its tunnel log


def _plan(lab: LabLike) -> LabPlan:
    return lab.plan if isinstance(lab, Lab) else lab


def log_path(lab: LabLike, node: str, name: str = "tunnel") -> Path:
    return Path(netlab.process_log_path(_plan(lab), node, name))


def log_mark(lab: LabLike, node: str, name: str = "tunnel") -> int:
    """The current size of ``node``'s ``name`` log: read only what comes after it."""
    try:
        return log_path(lab, node, name).stat().st_size
    except FileNotFoundError:
        return 0


def mark(lab: LabLike) -> Mark:
    """Where every node's tunnel log ends now."""
    return {n.name: log_mark(lab, n.name) for n in _plan(lab).nodes}


def log_events(lab: LabLike, node: str, since: int = 0, name: str = "tunnel"
               ) -> list[dict[str, Any]]:
    """Every JSON object logged by ``node``'s ``name`` after byte ``since``
    (a line being written right now, or a non-JSON line, is skipped)."""
    try:
        with open(log_path(lab, node, name), "rb") as handle:
            handle.seek(since)
            text = handle.read().decode(errors="replace")
    except FileNotFoundError:
        return []
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                out.append(event)
    return out


def _offset(since: int | Mark, node: str) -> int:
    return since[node] if isinstance(since, dict) else since


def closed_records(lab: LabLike, node: str, since: int | Mark = 0, **match: Any
                   ) -> list[dict[str, Any]]:
    """``connection closed`` records of ``node``'s tunnel after ``since``
    whose fields equal ``match``, oldest first."""
    return [
        e for e in log_events(lab, node, _offset(since, node))
        if e.get("event") == "connection closed" and all(e.get(k) == v for k, v in match.items())
    ]


def diagnose(lab: LabLike, lines: int = 6) -> str:
    """For failure messages: whether each node's daemons run, and their last log lines."""
    plan = _plan(lab)
    parts: list[str] = []
    for node in plan.nodes:
        for name in ("agent", "tunnel"):
            pid_file = Path(plan.node_run_dir(node.name)) / f"{name}.pid"
            try:
                pid: int | None = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                pid = None
            state = "running" if pid is not None and running(pid) else "NOT running"
            try:
                text = log_path(plan, node.name, name).read_text(errors="replace")
            except OSError as exc:
                text = f"(no log: {exc})"
            tail = "\n    ".join(text.splitlines()[-lines:])
            parts.append(f"{node.name} {name} pid {pid} {state}; log tail:\n    {tail}")
    return "\n".join(parts)


def wait_record(
    lab: LabLike, node: str, since: int | Mark, pred: Callable[[dict[str, Any]], bool],
    what: str, timeout: float = WAIT_S,
) -> dict[str, Any]:
    """The first record logged on ``node`` after ``since`` that matches ``pred``
    (records are written when a connection closes, so this polls, bounded)."""

    def find() -> dict[str, Any] | None:
        return next((r for r in closed_records(lab, node, since) if pred(r)), None)

    try:
        return wait_until(f"{what} in {node}'s tunnel log", find, timeout=timeout,
                          interval=POLL_S)
    except AssertionError as exc:
        recent = json.dumps(closed_records(lab, node, since), indent=1)[-3000:]
        raise AssertionError(f"{exc}; new records on {node}: {recent}\n{diagnose(lab)}"
                             ) from None


def wait_entry(lab: LabLike, node: str, since: int | Mark, what: str, **want: Any
               ) -> dict[str, Any]:
    """The first record on ``node`` after ``since`` whose fields equal ``want``."""
    return wait_record(lab, node, since, lambda r: all(r.get(k) == v for k, v in want.items()),
                       f"{what} (matching {want})")


def flush_tunnel_logs(lab: Lab, http_port: int) -> None:
    """Make a marker connection n1-a -> n2-a (captured on both nodes; n2-a
    serves HTTP on ``http_port``) and wait until both tunnels logged it.
    Anything a tunnel handled before the marker was made is in its log by
    then; a negative "no record" check after this is meaningful, not a race."""
    since = mark(lab)
    a, b = lab.pod("n1-a"), lab.pod("n2-a")
    res = curl(lab.ns("n1-a"), str(b.ipv4), http_port)
    assert (res.rc, res.status) == (0, 200), f"marker connection failed: {res}"
    wait_record(lab, "node1", since, lambda r: r["src"] == addr(str(a.ipv4), res.local_port),
                "the marker's outbound record")
    wait_record(lab, "node2", since,
                lambda r: r["direction"] == "inbound"
                and split_addr(r["src"])[0] == str(a.ipv4)
                and r["dst"] == addr(str(b.ipv4), http_port),
                "the marker's inbound record")


# -- traffic ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CurlResult:
    rc: int
    status: int
    local_ip: str
    local_port: int
    body: str
    stderr: str

    def server_view(self) -> dict[str, str]:
        """The ``key=value`` words of the body (what datapath_server.py saw)."""
        return dict(w.split("=", 1) for w in self.body.split() if "=" in w)


def curl(ns: str, host: str, port: int, timeout: float = 5, method: str = "GET"
         ) -> CurlResult:
    """Real ``curl`` ``method`` (default GET) http://host:port/ from netns ``ns``."""
    h = f"[{host}]" if ":" in host else host
    out = run_in(
        ns,
        [
            "curl", "-sS", "-g", "-m", str(timeout), "-X", method, "-o", "-",
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


# -- tc, links, sysctls -------------------------------------------------------------------


def tc_filters(ns: str, dev: str, direction: str) -> list[str]:
    """Lines of ``tc filter show dev DEV DIRECTION`` in ``ns`` ([] without clsact)."""
    out = subprocess.run(["tc", "-n", ns, "filter", "show", "dev", dev, direction],
                         capture_output=True, text=True, timeout=10, check=False)
    return out.stdout.splitlines()


def our_filters(ns: str, dev: str, direction: str) -> list[str]:
    """Our filters (pref 58 + handle 0xa11, or named meshagent-*) on one direction."""
    return [ln for ln in tc_filters(ns, dev, direction)
            if (TC_PREF in ln and TC_HANDLE in ln) or "meshagent" in ln]


def qdiscs(ns: str, dev: str) -> str:
    return subprocess.run(["tc", "-n", ns, "qdisc", "show", "dev", dev], capture_output=True,
                          text=True, timeout=10, check=True).stdout


def links(ns: str) -> list[str]:
    out = subprocess.run(["ip", "-n", ns, "-o", "link", "show"], capture_output=True,
                         text=True, timeout=10, check=True).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


def sysctl(ns: str, path: str) -> str:
    out = run_in(ns, ["cat", f"/proc/sys/{path}"])
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# -- capture ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Packet:
    src: str
    dst: str
    proto: str  # "tcp" | "udp" | "other"
    sport: int
    dport: int
    payload: bytes


class Capture:
    """tcpdump on a node's underlay interface (``ul0``) while it lives.

    With ``pcap`` it writes the packets there (read them with
    :meth:`packets`); without, it prints one line per packet, collected in
    :attr:`lines` as they come (:meth:`wait_line`). ``-U --immediate-mode``
    hands every packet over at once, so after :meth:`stop` (SIGINT: tcpdump
    flushes and closes) everything seen is there; without them a short
    capture can end with "N received by filter, 0 captured". Use it as a
    context manager or call :meth:`stop`; afterwards :attr:`returncode` and
    :attr:`stderr` (tcpdump's statistics) are set.
    """

    def __init__(self, ns: str, bpf_filter: str = "", pcap: Path | None = None,
                 ifname: str = "ul0") -> None:
        self.pcap = pcap
        self.lines: list[str] = []
        self.errors: list[str] = []
        self.returncode: int | None = None
        self.stderr = ""
        out = ["-w", str(pcap)] if pcap is not None else ["-l"]
        argv = ["tcpdump", "-i", ifname, "-n", "-U", "--immediate-mode", "-Z", "root", *out,
                *bpf_filter.split()]
        self.proc = subprocess.Popen(
            netlab.nsenter_argv(ns, argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        self._readers = [threading.Thread(target=self._read, args=(stream, sink), daemon=True)
                         for stream, sink in ((self.proc.stdout, self.lines),
                                              (self.proc.stderr, self.errors))]
        for reader in self._readers:
            reader.start()
        try:
            wait_until("tcpdump to start capturing",
                       lambda: any("listening on" in ln for ln in self.errors)
                       or self.proc.poll() is not None, timeout=15)
            assert self.proc.poll() is None, f"tcpdump exited: {self.errors}"
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _read(stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_line(self, what: str, pattern: str) -> str:
        regex = re.compile(pattern)
        return wait_until(f"tcpdump to show {what}",
                          lambda: next((ln for ln in self.lines if regex.search(ln)), None),
                          timeout=10)

    def stop(self) -> list[str]:
        """Stop tcpdump (idempotent); returns the lines it printed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        for reader in self._readers:
            reader.join(timeout=5)
        self.returncode = self.proc.returncode
        self.stderr = "\n".join(self.errors)
        return self.lines

    def packets(self) -> list[Packet]:
        """The captured packets (``pcap`` mode), parsed with scapy."""
        from scapy.layers.inet import IP, TCP, UDP  # slow import, only here
        from scapy.layers.inet6 import IPv6
        from scapy.packet import Raw
        from scapy.utils import rdpcap

        assert self.pcap is not None, "Capture(pcap=...) writes packets; this one printed lines"
        out: list[Packet] = []
        for pkt in rdpcap(str(self.pcap)):
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
