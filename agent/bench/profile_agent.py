"""Run the agent with its request handler profiled (cProfile), for the
benchmark's "where does enrollment time go" look. Every kernel operation runs
on the agent's single executor thread, so we wrap :meth:`Agent.handle` (what
that thread runs per API request) in one shared profiler and dump the stats to
``$MESHAGENT_BENCH_PROFILE`` when the agent exits (SIGTERM).

    MESHAGENT_BENCH_PROFILE=/tmp/agent.prof python -m agent.bench.profile_agent
"""

from __future__ import annotations

import atexit
import cProfile
import os
from typing import Any

from agent import daemon
from agent.config import load as load_config


def main() -> None:
    out = os.environ.get("MESHAGENT_BENCH_PROFILE", "/tmp/meshagent-agent.prof")
    prof = cProfile.Profile()
    original = daemon.Agent.handle

    def handle(self: daemon.Agent, raw: Any) -> dict[str, Any]:
        prof.enable()
        try:
            return original(self, raw)
        finally:
            prof.disable()

    daemon.Agent.handle = handle  # type: ignore[method-assign]
    atexit.register(prof.dump_stats, out)
    daemon.run(load_config())


if __name__ == "__main__":
    main()
