"""Machine facts for the top of the report: kernel, CPU, cores, Python, bcc,
key package and tool versions, date."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _tool(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    text = (proc.stdout or proc.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def _bcc() -> str:
    try:
        import bcc

        return str(getattr(bcc, "__version__", "unknown"))
    except ImportError:
        return "not importable"


def _mem_total() -> str:
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


def _git() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rev = _tool(["git", "-C", root, "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10, check=False).stdout
    return f"{rev}{' (+ uncommitted changes in the tree)' if dirty.strip() else ''}"


def loadavg() -> str:
    """1/5/15-minute load averages: other work on the machine skews every number."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def facts() -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory": _mem_total(),
        "load average at start": loadavg(),
        "python": platform.python_version(),
        "bcc": _bcc(),
        "uvloop": _version("uvloop"),
        "h2": _version("h2"),
        "cryptography": _version("cryptography"),
        "pyroute2": _version("pyroute2"),
        "openssl": __import__("ssl").OPENSSL_VERSION,
        "iperf3": _tool(["iperf3", "--version"]),
        "iptables": _tool(["iptables", "--version"]),
        "nft": _tool(["nft", "--version"]),
        "ipset": _tool(["ipset", "--version"]),
        "hey": "installed" if _tool(["which", "hey"]) != "not found" else "not found",
        "meshagent commit": _git(),
    }
