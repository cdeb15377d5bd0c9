"""Process and polling helpers shared by the lab test modules.

Every wait is bounded in count and time; every process is reaped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.api import client
from agent.lab import netlab
from agent.lab.topology import run_dir

WAIT_S = 15.0  # upper bound of every "until" loop
POLL_S = 0.1


def run_in(ns: str, argv: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in netns ``ns`` (nsenter, mounts untouched); never raises on exit status."""
    return subprocess.run(
        netlab.nsenter_argv(ns, argv), capture_output=True, text=True, timeout=timeout, check=False
    )


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


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def until(what: str, check: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    for _ in range(int(timeout / POLL_S) + 1):
        try:
            last = check()
        except (OSError, ValueError, client.AgentUnavailable, client.AgentError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    pytest.fail(f"{what}: not within {timeout:.0f}s (last: {last!r})")


def listening(ns: str, ports: Sequence[int]) -> bool:
    out = run_in(ns, ["ss", "-Hltn"], timeout=10).stdout
    local = {line.split()[3].rsplit(":", 1)[-1] for line in out.splitlines() if line.strip()}
    return all(str(p) in local for p in ports)


def leftovers(prefix: str) -> list[str]:
    """Namespaces and the run dir of lab ``prefix`` that still exist."""
    left = (
        [n for n in os.listdir("/run/netns") if n.startswith(f"{prefix}-")]
        if os.path.isdir("/run/netns")
        else []
    )
    if os.path.exists(run_dir(prefix)):
        left.append(run_dir(prefix))
    return left
