"""Benchmark scenarios. Each module has ``NAME``, ``DESCRIPTION`` and
``run(ctx) -> None`` that appends :class:`agent.bench.report.Sample` records
to ``ctx.samples`` (and notes to ``ctx.notes``), and brings down every lab it
brought up before returning or raising."""

from __future__ import annotations

ORDER = ("hbone", "redirect", "scale", "enroll", "resources", "services", "waypoint", "k8s")
