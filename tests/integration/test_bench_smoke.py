"""CI smoke test of the benchmark: ``python -m agent.bench --quick hbone`` into
a temporary directory must produce the report, the plot and the table rows,
within 3 minutes, and leave no lab behind (also when it fails)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from labkit import REPO, destroy_lab, leftovers

from agent.lab import netlab

pytestmark = pytest.mark.privileged

TIMEOUT_S = 170


def test_bench_quick_hbone(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.Popen([sys.executable, "-m", "agent.bench", "--quick", "--out", str(out),
                             "hbone"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the benchmark tears its lab down on SIGTERM
        log, _ = proc.communicate(timeout=60)
        pytest.fail(f"benchmark took longer than {TIMEOUT_S}s:\n{log[-3000:]}")
    finally:
        labs: list[str] = []
        results = out / "results.json"
        if results.exists():
            labs = json.loads(results.read_text()).get("labs", [])
        left: dict[str, tuple[list[str], str]] = {}
        for prefix in labs:  # last resort; the benchmark removes them itself
            if netlab.lab_exists(prefix) or leftovers(prefix):
                left[prefix] = destroy_lab(prefix)
    assert proc.returncode == 0, log[-3000:]
    assert not left, f"the benchmark left labs behind: {left}"
    report = (out / "report.md").read_text()
    assert (out / "hbone.png").stat().st_size > 0
    assert "Smoke only, not reported" in report
    for variant in ("direct", "stunnel", "native-hbone", "native-hbone-mt",
                    "native-hbone-1core", "tlsrelay", "ebpf+plain", "hbone"):
        assert f"\n| {variant} | " in report, variant
    assert "HBONE added p50" in report
    assert "native HBONE throughput" in report
    raw = json.loads((out / "results.json").read_text())
    assert raw["labs"] and not any(netlab.lab_exists(p) for p in raw["labs"])
    assert "PATH CHECK FAILED" not in report
