"""One spec for both policy engines: the fixtures the native evaluator runs.

``policy_fixtures.py`` exports the policy tables (and seeded random sets) with the
rule set ``agent.policy.compile`` makes of them and the Python engine's decisions;
``agent/tunnel/native/tests/policy_tables.rs`` runs the same files against
``src/policy.rs``. Here: the committed files are exactly what the tables generate, and
their cases still decide so in the Python loader and engine. Also the compiled form's
own rules (versioned, nothing empty, never wider than the engine).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import policy_fixtures as fixtures
import pytest

from agent.policy import PolicySet
from agent.policy.compile import FORMAT, VERSION, compile_policy_set, to_json

REGENERATE = "regenerate with: .venv/bin/python tests/unit/policy_fixtures.py --write"


def committed(path: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize(("path", "generate"), [(fixtures.TABLES, fixtures.tables_text),
                                                 (fixtures.RANDOM, fixtures.random_text)],
                         ids=["tables", "random"])
def test_committed_fixtures_are_what_the_tables_generate(path: Any, generate: Any) -> None:
    assert path.read_text(encoding="utf-8") == generate(), f"{path.name} is stale: {REGENERATE}"


def test_the_tables_are_all_there() -> None:
    suites: dict[str, int] = {}
    for case in committed(fixtures.TABLES):
        suites[case["suite"]] = suites.get(case["suite"], 0) + 1
    assert set(suites) == {"semantics", "engine", "loader", "native"}
    assert suites["native"] == len(fixtures.NATIVE_CASES) + 1


@pytest.mark.parametrize("path", [fixtures.TABLES, fixtures.RANDOM], ids=["tables", "random"])
def test_fixture_cases_decide_so_in_the_python_engine(path: Any) -> None:
    """Each committed case, read back: the loader's set compiles to the committed rule
    set and the engine gives the committed decision for every connection."""
    for case in committed(path):
        policies = fixtures.case_policies(case)
        assert compile_policy_set(policies) == case["compiled"], case["name"]
        assert fixtures.decide(policies, case["connections"]) == case["decisions"], case["name"]


# ------------------------------------------------------------ the compiled form

def walk_lists(value: Any) -> list[Any]:
    """``value`` and every list and dict inside it."""
    found = []
    if isinstance(value, dict):
        found.append(value)
        for item in value.values():
            found.extend(walk_lists(item))
    elif isinstance(value, list):
        found.append(value)
        for item in value:
            found.extend(walk_lists(item))
    return found


def test_compiled_set_is_versioned_and_canonical() -> None:
    compiled = compile_policy_set(PolicySet.fail_closed("not read yet"))
    assert (compiled["format"], compiled["version"]) == (FORMAT, VERSION) == (
        "meshagent.policy.compiled", 1)
    # Nothing read yet: one mesh-wide DENY whose one rule has no clauses (deny-all).
    [policy] = compiled["policies"]
    assert (policy["action"], policy["mesh_wide"], policy["rules"]) == (
        "DENY", True, [{"clauses": []}])
    assert policy["fail_closed"] == "not read yet"
    assert to_json(compiled) == to_json(json.loads(to_json(compiled)))
    assert " " not in to_json(compile_policy_set(PolicySet.empty()))


def test_compiled_rules_hold_nothing_empty() -> None:
    """Entries istiod leaves empty (skipped by ztunnel) are left out or make the rule
    unmatchable: the only empty list is a rule's clause list (match everything)."""
    for case in committed(fixtures.TABLES) + committed(fixtures.RANDOM):
        for policy in case["compiled"]["policies"]:
            for rule in policy["rules"]:
                assert set(rule) in ({"clauses"}, {"unmatchable"}), rule
                for clause in rule.get("clauses", []):
                    assert clause and all(match for match in clause), case["name"]
                    for found in walk_lists(clause):
                        assert found, (case["name"], clause)


def test_unmatchable_rules_keep_their_index() -> None:
    [case] = [c for c in committed(fixtures.TABLES)
              if c["name"] == "ALLOW: only the HTTP rule is omitted"]
    [policy] = case["compiled"]["policies"]
    assert [set(rule) for rule in policy["rules"]] == [{"unmatchable"}, {"clauses"}]
    assert case["decisions"][0]["rule_index"] == 1


NATIVE = Path(__file__).resolve().parents[2] / "agent" / "tunnel" / "native"
EVALUATOR = NATIVE / "target" / "release" / "examples" / "policy_eval"
EVALUATOR_SOURCES = ("src/policy.rs", "src/spiffe.rs", "examples/policy_eval.rs")
FRESH_SETS = 150


def native_evaluator() -> Path:
    """The JSON-lines harness over ``src/policy.rs`` (built by ``cargo test``)."""
    build = "run `cargo test --release --locked` in agent/tunnel/native (scripts/test.sh does)"
    if not EVALUATOR.is_file():
        pytest.fail(f"{EVALUATOR} is missing: {build}")
    built = EVALUATOR.stat().st_mtime
    stale = [s for s in EVALUATOR_SOURCES if (NATIVE / s).stat().st_mtime > built]
    if stale:
        pytest.fail(f"{EVALUATOR} is older than {', '.join(stale)}: {build}")
    return EVALUATOR


def test_fresh_random_sets_decide_the_same_natively() -> None:
    """The differential property on inputs no one has seen: a new seed every run (named
    on failure), 150 random sets of 8 connections, decided by the Python engine and by
    the native evaluator, must agree field for field."""
    seed = int.from_bytes(os.urandom(4), "big")
    cases = fixtures.random_sets(seed=seed, count=FRESH_SETS)
    for case in cases:
        for policy in case["compiled"]["policies"]:
            for rule in policy["rules"]:
                for clause in rule.get("clauses", []):
                    assert clause and all(walk_lists(clause)), (seed, case["name"])
    lines = "".join(json.dumps({"compiled": c["compiled"], "connections": c["connections"]})
                    + "\n" for c in cases)
    result = subprocess.run([str(native_evaluator())], input=lines, capture_output=True,
                            text=True, timeout=120, check=True)
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(answers) == len(cases), result.stderr
    for case, answer in zip(cases, answers, strict=True):
        assert answer == {"decisions": case["decisions"]}, (
            f"seed {seed}, {case['name']}: native {answer} != python {case['decisions']} "
            f"for {case['documents']}")
