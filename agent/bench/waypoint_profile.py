"""Profile one waypoint under the waypoint benchmark's HAProxy-comparison load.

``python -m agent.bench.waypoint_profile [--seconds 10] [--conns 16] [--qps 0]
[--py-spy DIR]``

Starts the path of :mod:`agent.bench.scenarios.waypoint` for namespace ``ns-a`` (a
Fortio echo server, ``meshagent waypoint`` with the "GET only" policy, the two tunnel
hops of :mod:`agent.bench.waypoint_hops`), loads it with Fortio (``--qps 0``: max rate)
and prints one JSON line: requests/s, latency, and CPU per 1,000 requests/s of the
waypoint process and of the hops process (``/proc/<pid>/stat``). With ``--py-spy DIR``
it also samples both processes with py-spy (the ``bench`` extra) into
``DIR/waypoint.txt`` and ``DIR/hops.txt`` (py-spy's raw collapsed stacks) and prints the
frames where the waypoint spent most of its samples. How docs/waypoint.md "Where the
time goes" was measured; compare code variants by alternating runs of this.

Side effects: loopback listeners and child processes, all stopped before it returns;
a temporary directory (CA, model, documents), removed.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from agent.bench.scenarios.common import PY
from agent.bench.scenarios.waypoint import (
    APP_PORT,
    ENTRY_PORT,
    FORTIO,
    POD_IP,
    VIP,
    WP_PORT,
    Procs,
    _cpu_seconds,
    _docs,
    _fortio,
    _model,
    _summary,
)
from agent.identity.ca import init_ca
from agent.model.loader import model_to_yaml

NS = "ns-a"


def top_frames(raw: Path, count: int = 15) -> list[tuple[float, str]]:
    """The ``count`` innermost functions with the most samples in a py-spy raw file, as
    (percent of all samples, "function (file)"). Pure but for reading the file."""
    leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        total += int(n)
        frame = stack.rsplit(";", 1)[-1]
        # "function (file.py:line)" -> "function (file.py)": one row per function.
        head, sep, where = frame.rpartition(" (")
        leaf[f"{head} ({where.rsplit(':', 1)[0].rstrip(')')})" if sep else frame] += int(n)
    return [(100.0 * n / total, frame) for frame, n in leaf.most_common(count)] if total else []


def profile(seconds: int, conns: int, qps: int, spy_dir: Path | None) -> dict[str, float]:
    if not FORTIO.exists():
        raise SystemExit("fortio missing: run scripts/setup.sh")
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if spy_dir is not None and not Path(spy).exists():
        raise SystemExit("py-spy missing: run scripts/setup.sh (the bench extra)")
    work = Path(tempfile.mkdtemp(prefix="meshagent-waypoint-profile-"))
    procs = Procs(work)
    try:
        init_ca(work / "ca", "cluster.local")
        (work / "model.yaml").write_text(model_to_yaml(_model()))
        (work / "config").mkdir()
        (work / "config" / "docs.yaml").write_text(yaml.safe_dump_all(_docs(shared=False)))
        procs.start("fortio", [str(FORTIO), "server", "-http-port",
                               f"127.0.0.1:{APP_PORT[NS]}", "-grpc-port", "disabled",
                               "-redirect-port", "disabled"])
        wp = procs.start("wp", [
            PY, "-m", "agent", "waypoint", "--name", "waypoint", "--namespace", NS,
            "--model", str(work / "model.yaml"), "--config-dir", str(work / "config"),
            "--ca-dir", str(work / "ca"), "--listen", f"127.0.0.1:{WP_PORT[NS]}",
            "--metrics-port", "0"], ready="waypoint serving")
        hops = procs.start("hops", [
            PY, "-m", "agent.bench.waypoint_hops", "--ca-dir", str(work / "ca"),
            "--dest", f"{POD_IP[NS]}={APP_PORT[NS]}={NS}/echo",
            "--entry", f"{ENTRY_PORT[NS]}={WP_PORT[NS]}={VIP[NS]}:80={NS}"], ready="ready")
        spies = []
        if spy_dir is not None:
            spy_dir.mkdir(parents=True, exist_ok=True)
            for name, proc in (("waypoint", wp), ("hops", hops)):
                spies.append(subprocess.Popen(
                    [spy, "record", "-p", str(proc.pid), "-d", str(seconds), "-r", "200",
                     "-f", "raw", "-o", str(spy_dir / f"{name}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wp0, hops0, t0 = _cpu_seconds(wp.pid), _cpu_seconds(hops.pid), time.monotonic()
        result = _summary(_fortio(f"http://127.0.0.1:{ENTRY_PORT[NS]}/echo", qps, conns,
                                  seconds, work / "load.json"))
        elapsed = time.monotonic() - t0
        krps = result["rps"] / 1000 or float("nan")
        result["waypoint_vcpu_per_krps"] = (_cpu_seconds(wp.pid) - wp0) / elapsed / krps
        result["hops_vcpu_per_krps"] = (_cpu_seconds(hops.pid) - hops0) / elapsed / krps
        for s in spies:
            s.wait(seconds + 60)
        return result
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--qps", type=int, default=0, help="0: max rate")
    ap.add_argument("--py-spy", type=Path, default=None, metavar="DIR")
    args = ap.parse_args()
    result = profile(args.seconds, args.conns, args.qps, args.py_spy)
    result["load_average"] = float(Path("/proc/loadavg").read_text().split()[0])
    print(json.dumps(result))
    if args.py_spy is not None:
        for pct, frame in top_frames(args.py_spy / "waypoint.txt"):
            print(f"{pct:5.1f}%  {frame}")


if __name__ == "__main__":
    cli()
