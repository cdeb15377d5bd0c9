"""bpf/lib/drop_reasons.h and agent/datapath/drop_reasons.py must describe one table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.datapath.drop_reasons import DESCRIPTIONS, DROP_REASON_MAX, DropReason

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "lib" / "drop_reasons.h"

_ENUM = re.compile(r"enum\s+ma_drop_reason\s*\{(?P<body>.*?)\};", re.DOTALL)
_ENUMERATOR = re.compile(
    r"^\s*(?P<name>DROP_[A-Z0-9_]+)\s*=\s*(?P<value>\d+)\s*,?\s*(?:/\*\s*(?P<doc>.*?)\s*\*/)?\s*$",
    re.MULTILINE)


def parse_header(text: str) -> tuple[dict[str, int], dict[str, str]]:
    """(name -> value, name -> comment) of every enumerator of enum ma_drop_reason."""
    match = _ENUM.search(text)
    assert match, f"enum ma_drop_reason not found in {HEADER}"
    values: dict[str, int] = {}
    docs: dict[str, str] = {}
    for m in _ENUMERATOR.finditer(match.group("body")):
        assert m.group("name") not in values, f"{m.group('name')} defined twice"
        values[m.group("name")] = int(m.group("value"))
        if m.group("doc"):
            docs[m.group("name")] = m.group("doc")
    return values, docs


@pytest.fixture(scope="module")
def header() -> tuple[dict[str, int], dict[str, str]]:
    return parse_header(HEADER.read_text())


def test_parser_reads_every_enumerator_line() -> None:
    """Guard the regex itself: every DROP_ line in the enum body must be parsed."""
    text = HEADER.read_text()
    body = _ENUM.search(text)
    assert body is not None
    lines = [ln for ln in body.group("body").splitlines() if ln.strip().startswith("DROP_")]
    values, _ = parse_header(text)
    assert len(lines) == len(values)


def test_names_and_values_match(header: tuple[dict[str, int], dict[str, str]]) -> None:
    values, _ = header
    reasons = {name: v for name, v in values.items() if name != "DROP_REASON_MAX"}
    assert reasons == {f"DROP_{r.name}": int(r) for r in DropReason}


def test_reason_max_matches(header: tuple[dict[str, int], dict[str, str]]) -> None:
    values, _ = header
    assert values["DROP_REASON_MAX"] == DROP_REASON_MAX


def test_values_are_dense_from_zero() -> None:
    """They index drops[DROP_REASON_MAX] in struct ma_pod_stats: no gaps, no overflow."""
    assert sorted(int(r) for r in DropReason) == list(range(DROP_REASON_MAX))


def test_every_reason_has_a_description(header: tuple[dict[str, int], dict[str, str]]) -> None:
    _, docs = header
    assert set(DESCRIPTIONS) == set(DropReason)
    for reason in DropReason:
        assert DESCRIPTIONS[reason].strip(), reason
        assert docs.get(f"DROP_{reason.name}", "").strip(), f"DROP_{reason.name} has no comment"


def test_labels_are_lowercase_names() -> None:
    assert DropReason.NO_LISTENER.label == "no_listener"
    assert len({r.label for r in DropReason}) == len(DropReason)


def test_parser_rejects_a_mismatch() -> None:
    """A renumbered header is caught (the parser is not vacuously agreeing)."""
    text = HEADER.read_text().replace("DROP_NO_LISTENER = 1", "DROP_NO_LISTENER = 11")
    values, _ = parse_header(text)
    assert values["DROP_NO_LISTENER"] != int(DropReason.NO_LISTENER)
