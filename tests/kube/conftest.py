"""Fixtures: the lab API server on loopback, a kubeconfig for it, kubectl."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kube_helpers import KUBECTL

from agent.kubelab import LabApiServer


@pytest.fixture
def kubelab(tmp_path: Path) -> Iterator[LabApiServer]:
    server = LabApiServer(bookmark_interval=0.2).start()
    try:
        server.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})
        yield server
    finally:
        server.stop()


@pytest.fixture
def kubeconfig(kubelab: LabApiServer, tmp_path: Path) -> Path:
    return kubelab.kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def kubectl(kubeconfig: Path, tmp_path: Path) -> Any:
    if KUBECTL is None:
        pytest.fail("kubectl is not installed: run scripts/setup.sh")

    def run(*args: str, stdin: str | None = None, check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [KUBECTL, "--kubeconfig", str(kubeconfig), "--cache-dir", str(tmp_path / "kc"),
             *args], input=stdin, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result
    return run
