"""Lab control for the benchmark: bring a lab up and always down again, run
commands and background servers inside its namespaces, switch tunnel modes,
enroll/unenroll pods, and read process CPU/RSS from /proc.

Everything runs inside the lab's namespaces (``<prefix>-*``); :meth:`BenchLab.down`
stops what we spawned, then ``netlab.down`` removes the namespaces (and any
process still inside them) and the run directory.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from agent.api import client
from agent.lab import mesh, netlab
from agent.lab.topology import LabPlan, PodPlan, build_plan

NSENTER = "nsenter"
STOP_TIMEOUT_S = 5.0
READY_TIMEOUT_S = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A benchmark step failed; the message says which and why."""


def new_prefix() -> str:
    """A fresh lab prefix: ``b`` + 4 hex digits, not used by any existing lab."""
    for _ in range(64):
        prefix = "b" + secrets.token_hex(2)
        if not netlab.lab_exists(prefix):
            return prefix
    raise BenchError("could not find a free lab prefix in 64 tries")


def ns_argv(ns: str, argv: Sequence[str]) -> list[str]:
    return [NSENTER, f"--net=/run/netns/{ns}", "--", *argv]


class BenchLab:
    """One lab of the benchmark. Use as a context manager: ``down`` always runs."""

    def __init__(self, mode: str, log_dir: Path, prefix: str | None = None) -> None:
        self.mode = mode
        self.prefix = prefix or new_prefix()
        self.log_dir = log_dir
        self.plan: LabPlan | None = None
        self.tunnel_mode = mode
        self._spawned: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
        self._owner = os.getpid()

    # -- lifecycle ---------------------------------------------------------------

    def up(self) -> BenchLab:
        plan = build_plan(self.prefix)
        self.plan = netlab.up(plan, after_topology=functools.partial(mesh.start_mesh,
                                                                     mode=self.mode))
        # Many short connections per run: let pods and nodes reuse TIME_WAIT
        # ports for new outgoing connections instead of running out.
        for ns in (*(n.netns for n in plan.nodes), *(p.netns for p in plan.pods())):
            self.run(ns, ["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1",
                          "net.ipv4.ip_local_port_range=1024 65000"], timeout=10)
        return self

    def down(self) -> None:
        if os.getpid() != self._owner:  # a forked child unwinding: not ours to clean
            os._exit(1)
        self.stop_spawned()
        with contextlib.suppress(netlab.LabError):
            netlab.down(self.prefix)
        if netlab.existing_netns(self.prefix):  # one more try: namespaces still busy
            time.sleep(1)
            netlab.down(self.prefix)
        for pin in Path("/sys/fs/bpf").glob(f"meshagent-{self.prefix}-*"):
            with contextlib.suppress(OSError):
                shutil.rmtree(pin)

    def __enter__(self) -> BenchLab:
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- names -----------------------------------------------------------------

    def _plan(self) -> LabPlan:
        if self.plan is None:
            raise BenchError("the lab is not up")
        return self.plan

    def pod(self, name: str) -> PodPlan:
        return self._plan().pod(name)

    def node_ns(self, node: str) -> str:
        return self._plan().node(node).netns

    def sock(self, node: str) -> str:
        return mesh.agent_socket(self._plan(), node)

    def pid(self, node: str, name: str) -> int:
        path = Path(self._plan().node_run_dir(node)) / f"{name}.pid"
        return int(path.read_text().strip())

    # -- commands ----------------------------------------------------------------

    def run(self, ns: str, argv: Sequence[str], timeout: float = 60.0,
            stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in netns ``ns`` to completion (bounded by ``timeout``)."""
        try:
            proc = subprocess.run(ns_argv(ns, argv), input=stdin, capture_output=True,
                                  text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"{' '.join(argv)} in {ns} did not finish in {timeout:.0f}s") \
                from exc
        if check and proc.returncode != 0:
            raise BenchError(f"{' '.join(argv)} in {ns} failed ({proc.returncode}): "
                             f"{(proc.stderr or proc.stdout).strip()[-600:]}")
        return proc

    def spawn(self, ns: str, argv: Sequence[str], name: str) -> subprocess.Popen[bytes]:
        """Start a background process in ``ns``; :meth:`stop_spawned` ends it."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{self.prefix}-{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(ns_argv(ns, argv), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self._spawned.append((proc, log))
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """End one process :meth:`spawn` started (if still running) and forget it."""
        for entry in list(self._spawned):
            if entry[0] is proc:
                self._spawned.remove(entry)
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGTERM)
                    try:
                        proc.wait(timeout=STOP_TIMEOUT_S)
                    except subprocess.TimeoutExpired:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait(timeout=STOP_TIMEOUT_S)
                entry[1].close()

    def stop_spawned(self) -> None:
        for proc, _ in self._spawned:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc, log in self._spawned:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT_S)
            log.close()
        self._spawned.clear()

    def wait_listening(self, ns: str, port: int, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until something listens on TCP ``port`` in ``ns``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run(ns, ["ss", "-Hltn", f"sport = :{port}"], timeout=10).stdout
            if out.strip():
                return
            time.sleep(0.1)
        raise BenchError(f"nothing listens on port {port} in {ns} after {timeout:.0f}s")

    # -- mesh --------------------------------------------------------------------

    def enroll(self, pod_name: str) -> None:
        pod = self.pod(pod_name)
        client.call(self.sock(pod.node), {"op": "pod_add", "netns": pod.netns, "name": pod.name,
                                          "namespace": pod.namespace,
                                          "service_account": pod.service_account})

    def unenroll(self, pod_name: str) -> None:
        pod = self.pod(pod_name)
        with contextlib.suppress(client.AgentError):  # already unenrolled
            client.call(self.sock(pod.node), {"op": "pod_del", "netns": pod.netns})

    def set_enrolled(self, pods: Sequence[str], enrolled: bool) -> None:
        for name in pods:
            current = {p["name"] for p in client.call(self.sock(self.pod(name).node),
                                                      {"op": "pod_list"})}
            if enrolled and name not in current:
                self.enroll(name)
            elif not enrolled and name in current:
                self.unenroll(name)

    def tunnel_connections(self, node: str) -> int:
        """Connections node's tunnel has logged as closed so far (all tunnel runs)."""
        path = Path(self._plan().node_run_dir(node)) / "tunnel.log"
        try:
            with open(path, "rb") as fh:
                return sum(1 for line in fh if b'"connection closed"' in line)
        except FileNotFoundError:
            return 0

    def stop_process(self, node: str, name: str) -> None:
        """SIGTERM the lab daemon ``name`` on ``node`` (we started it) and reap it."""
        pid = self.pid(node, name)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        child = netlab._CHILDREN.pop(pid, None)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and _alive(pid, child):
            time.sleep(0.02)
        if _alive(pid, child):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if child is not None:
                child.wait(timeout=STOP_TIMEOUT_S)

    def start_process(self, node: str, name: str, mode: str) -> int:
        plan = self._plan()
        argv = [sys.executable, "-m", "agent", "tunnel" if name == "tunnel" else "run"]
        return netlab.start_node_process(plan, node, name, argv,
                                         mesh.node_env(plan, plan.node(node), mode))

    def set_tunnel_mode(self, mode: str) -> None:
        """Restart every node's tunnel in ``mode`` (``plain``/``hbone``) if it differs."""
        if mode == self.tunnel_mode:
            return
        for node in self._plan().nodes:
            self.stop_process(node.name, "tunnel")
            self.start_process(node.name, "tunnel", mode)
        for node in self._plan().nodes:
            self.wait_listening(node.netns, 15001)
            self.wait_listening(node.netns, 15008)
        self.tunnel_mode = mode


def _alive(pid: int, child: subprocess.Popen[bytes] | None) -> bool:
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- /proc ---------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of ``pid`` in MB (10^6 bytes)."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024 / 1e6
    return out


@contextlib.contextmanager
def lab(mode: str, log_dir: Path) -> Iterator[BenchLab]:
    """``with lab("plain", out/"logs") as b:`` — up, yield, always down."""
    bench = BenchLab(mode, log_dir)
    with bench:
        yield bench


def describe(bench: BenchLab) -> dict[str, Any]:
    return {"prefix": bench.prefix, "mode": bench.mode}
