"""The Kubernetes model hand-over at cluster scale: agent writes, tunnel reloads.

The cluster of the ``k8s`` scenario (10,000 pods on 100 nodes, 2,000 Services, one
EndpointSlice of 5 pods each) converted to the cluster model as the agent does
(:func:`agent.k8s.convert.convert`, no API server: that part is the ``k8s``
scenario's), then, for each spelling of ztunnel local-config -- ``yaml`` (block YAML,
the anchor) and ``json`` (the JSON spelling the agent writes) -- in the same run:

- ``write_s``: rendering the model to text (what the agent does on a change);
- ``reload_s``: what a tunnel does on a change of the file, in a fresh process:
  :class:`agent.model.loader.ModelWatcher` reading and checking it, then
  :func:`agent.tunnel.cluster.build_cluster` merging this node's 100 enrolled pods
  and indexing; ``reload_parse_s`` is the first part alone;
- ``reload_peak_rss_mb``: that process's peak RSS (VmHWM), and ``idle_rss_mb``
  the same process before reading the file (the interpreter and imports);
- ``unchanged_s``: the watcher's poll after the file was rewritten with the same text.

Run: ``.venv/bin/python -m agent.bench.model_handoff [--reps N] [--spellings yaml,json]``
(prints JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

NODE = "node-0"
SPELLINGS = ("yaml", "json")


def _status_mb(field: str) -> float:
    """VmRSS or VmHWM (peak) of this process (ru_maxrss would carry the parent's peak
    across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _cluster_model() -> Any:
    from agent.bench.scenarios.k8s import cluster_objects
    from agent.k8s.convert import convert

    objs = cluster_objects()
    by_kind: dict[str, list[Any]] = {}
    for obj in objs:
        by_kind.setdefault(obj["kind"], []).append(obj)
    return convert(by_kind["Pod"], by_kind["Service"], by_kind["EndpointSlice"]).model


def _render(model: Any, spelling: str) -> str:
    from agent.model import loader

    return (loader.model_to_json_yaml(model) if spelling == "json"
            else loader.model_to_yaml(model))


def reload_child(path: str) -> dict[str, float]:
    """In this (fresh) process: what the tunnel does when the model file changes."""
    from agent.model.loader import ModelWatcher, ReloadOutcome
    from agent.tunnel.cluster import build_cluster
    from agent.tunnel.workloads import Workload

    idle = _status_mb("VmRSS")
    watcher = ModelWatcher(path)
    t0 = time.perf_counter()
    if watcher.poll() is not ReloadOutcome.LOADED:
        raise RuntimeError(f"the model did not load: {watcher.error}")
    parsed = time.perf_counter()
    # this node's pods as the agent's workloads.json lists them
    local = [Workload(w.name, w.namespace, w.service_account,
                      tuple(str(ip) for ip in w.workload_ips), w.identity())
             for w in watcher.model.workloads if w.node == NODE]
    t1 = time.perf_counter()
    build_cluster(watcher.model, local, node=NODE, trust_domain="cluster.local")
    done = time.perf_counter()
    text = Path(path).read_text()
    tmp = Path(path).with_suffix(".again")
    tmp.write_text(text)
    os.replace(tmp, path)
    t2 = time.perf_counter()
    outcome = watcher.poll()
    unchanged = time.perf_counter() - t2
    return {"reload_parse_s": parsed - t0, "reload_s": (parsed - t0) + (done - t1),
            "reload_peak_rss_mb": _status_mb("VmHWM"),
            "idle_rss_mb": idle,
            "unchanged_s": unchanged if outcome is ReloadOutcome.UNCHANGED else float("nan")}


def measure(reps: int = 3, spellings: tuple[str, ...] = SPELLINGS) -> dict[str, Any]:
    model = _cluster_model()
    out: dict[str, Any] = {"workloads": len(model.workloads), "services": len(model.services),
                           "load": os.getloadavg()}
    samples: dict[str, dict[str, list[float]]] = {s: {} for s in spellings}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(reps):
            for spelling in spellings:  # interleaved: both see the same machine load
                t0 = time.perf_counter()
                text = _render(model, spelling)
                row = {"write_s": time.perf_counter() - t0, "file_mb": len(text) / 2**20}
                path = Path(tmp) / f"model.{spelling}"
                path.write_text(text)
                child = subprocess.run(
                    [sys.executable, "-m", "agent.bench.model_handoff", "--child", str(path)],
                    check=True, capture_output=True, text=True, timeout=600)
                row.update(json.loads(child.stdout))
                for key, value in row.items():
                    samples[spelling].setdefault(key, []).append(value)
    for spelling, rows in samples.items():
        out[spelling] = {k: statistics.median(v) for k, v in rows.items()}
    if set(spellings) == set(SPELLINGS):
        out["ratio_write"] = out["yaml"]["write_s"] / out["json"]["write_s"]
        out["ratio_reload"] = out["yaml"]["reload_s"] / out["json"]["reload_s"]
    out["reps"] = reps
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--spellings", default=",".join(SPELLINGS),
                        help="comma-separated, of: yaml, json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(reload_child(args.child)))
        return 0
    print(json.dumps(measure(args.reps, tuple(args.spellings.split(","))), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
