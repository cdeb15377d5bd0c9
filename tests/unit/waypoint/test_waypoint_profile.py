"""The profile tool's summary of py-spy's raw (collapsed-stack) output: pure."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.bench.waypoint_profile import top_frames


def test_top_frames_counts_innermost_functions_by_samples_over_all_lines(tmp_path: Path) -> None:
    raw = tmp_path / "waypoint.txt"
    raw.write_text("main (a.py:1);serve (b.py:2);write (c.py:3) 6\n"
                   "main (a.py:1);serve (b.py:2) 1\n"
                   "main (a.py:1);parse (d.py:4) 2\n"
                   "main (a.py:1);write (c.py:9) 1\n"
                   "\n")
    assert top_frames(raw) == [(70.0, "write (c.py)"), (20.0, "parse (d.py)"),
                               (10.0, "serve (b.py)")]
    assert top_frames(raw, count=1) == [(70.0, "write (c.py)")]


def test_top_frames_of_an_empty_profile_is_empty(tmp_path: Path) -> None:
    raw = tmp_path / "empty.txt"
    raw.write_text("")
    assert top_frames(raw) == []


@pytest.mark.parametrize("line", ["no-count-here", "frame (x.py:1) abc"])
def test_top_frames_skips_lines_that_are_not_stacks(tmp_path: Path, line: str) -> None:
    raw = tmp_path / "odd.txt"
    raw.write_text(f"{line}\nmain (a.py:1) 4\n")
    assert top_frames(raw) == [(100.0, "main (a.py)")]
