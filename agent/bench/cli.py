"""Command line of the benchmark: pick scenarios, run them, write the report.

Runs as root. SIGTERM and SIGINT unwind through every scenario's ``finally``
so the labs come down; a scenario that fails is recorded in the report and
the next one still runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from agent.bench import machine, render
from agent.bench.scenarios import ORDER
from agent.bench.scenarios.common import Context, Params

ROOT = Path(__file__).resolve().parents[2]


_MAIN_PID = os.getpid()


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    # Forked helpers (pyroute2 forks to create namespaces, and kills the child
    # with SIGTERM) inherit this handler: they must die, never unwind our
    # cleanup code (which would tear down the lab under the parent's feet).
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m agent.bench",
                                 description="meshagent benchmarks (needs root)")
    ap.add_argument("--quick", action="store_true",
                    help="1 repetition, short runs: a smoke test (numbers not reported)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default bench-results/<timestamp>)")
    ap.add_argument("scenarios", nargs="*", metavar="scenario",
                    help=f"any of {', '.join(ORDER)} (default: all, in that order)")
    args = ap.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in ORDER]
    if unknown:
        ap.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(ORDER)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("the benchmark builds network namespaces: run it as root", file=sys.stderr)
        return 2
    scenarios = [s for s in ORDER if s in args.scenarios] if args.scenarios else list(ORDER)
    out = args.out or ROOT / "bench-results" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _interrupt)
    params = Params.make(args.quick)
    ctx = Context(params=params, out=out)
    facts = machine.facts()
    started = time.monotonic()
    status: dict[str, Any] = {}
    interrupted = False
    try:
        for name in scenarios:
            mod = importlib.import_module(f"agent.bench.scenarios.{name}")
            t0 = time.monotonic()
            ctx.progress(name, "start")
            try:
                mod.run(ctx)
                status[name] = {"ok": True}
            except KeyboardInterrupt:
                status[name] = {"ok": False, "error": "interrupted"}
                interrupted = True
                raise
            except Exception as exc:
                traceback.print_exc()
                status[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                ctx.note(name, f"scenario failed: {type(exc).__name__}: {exc}")
            status[name]["seconds"] = round(time.monotonic() - t0, 1)
            status[name]["load average at end"] = machine.loadavg()
            ctx.progress(name, f"done in {status[name]['seconds']} s")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        total = time.monotonic() - started
        facts["load average at end"] = machine.loadavg()
        raw = {"facts": facts, "params": params.__dict__, "scenarios": scenarios,
               "status": status, "labs": ctx.labs, "notes": ctx.notes,
               "total_seconds": round(total, 1),
               "samples": [s.to_json() for s in ctx.samples]}
        (out / "results.json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
        render.write_report(out, raw)
        print(f"report: {out / 'report.md'} ({total:.0f} s)", file=sys.stderr)
    return 130 if interrupted else (0 if all(s.get("ok") for s in status.values()) else 1)
