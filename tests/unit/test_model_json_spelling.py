"""The JSON spelling of ztunnel's local-config: what the agent writes at cluster scale.

One YAML flow mapping in JSON syntax with bare integer keys for the port maps (serde_yaml
reads a u16 only from a plain scalar). It must read as YAML reads it, give the same
model, and the same errors, as the block spelling.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.model.loader import (
    ModelLoadError,
    ModelWatcher,
    NotJsonSubset,
    ReloadOutcome,
    load_model_file,
    load_model_text,
    model_to_json_yaml,
    model_to_yaml,
    parse_json_subset,
    to_json_yaml,
)

DATA = Path(__file__).parent / "data"
GOOD = (DATA / "model" / "web.yaml").read_text()
SAMPLE = DATA / "local-config" / "two-nodes.yaml"


def as_yaml(text: str) -> Any:
    return yaml.load(text, Loader=yaml.CSafeLoader)


def messages(text: str) -> list[str]:
    with pytest.raises(ModelLoadError) as info:
        load_model_text(text, "m.yaml")
    return str(info.value).splitlines()


def outcome(text: str) -> object:
    try:
        return load_model_text(text, "m.yaml")
    except ModelLoadError as error:
        return str(error).splitlines()


@pytest.mark.parametrize("text", [GOOD, SAMPLE.read_text(), (DATA / "model" / "dns.yaml")
                                  .read_text()])
def test_both_spellings_hold_one_document_and_one_model(text: str) -> None:
    model = load_model_text(text, allow_foreign_policies=True)
    spelled = model_to_json_yaml(model)
    # What a YAML parser (ztunnel's, through serde_yaml) reads from it is what the
    # block spelling holds, port maps with integer keys included ...
    assert as_yaml(spelled) == as_yaml(model_to_yaml(model))
    # ... and what the JSON path reads is the same data, without a YAML parser.
    assert parse_json_subset(spelled) == as_yaml(spelled)
    assert load_model_text(spelled, allow_foreign_policies=True) == model
    assert not re.search(r'"[0-9]+":', spelled)  # no quoted port (ztunnel refuses one)


def test_the_json_spelling_is_written_with_bare_integer_port_keys() -> None:
    spelled = model_to_json_yaml(load_model_text(GOOD))
    assert spelled.startswith('{"workloads":[{"uid":"c1//v1/Pod/default/web-1"')
    assert '"ports":{80: 8080,443: 0}' in spelled


def _good_doc() -> dict[str, Any]:
    doc = as_yaml(GOOD)
    assert isinstance(doc, dict)
    return doc


def _set(path: tuple[Any, ...], value: Any) -> Any:
    def edit(doc: dict[str, Any]) -> None:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


def _rename_key(path: tuple[Any, ...], old: Any, new: Any) -> Any:
    def edit(doc: dict[str, Any]) -> None:
        target: Any = doc
        for key in path:
            target = target[key]
        target[new] = target.pop(old)
    return edit


@pytest.mark.parametrize("edit", [
    _set(("workloads", 0, "protocol"), "UDP"),
    _set(("services", 0, "ports", 80), 70000),
    _rename_key(("services", 0, "ports"), 80, "80"),       # a quoted port: ztunnel refuses
    _rename_key(("services", 0, "ports"), 80, 0),
    _set(("workloads", 0, "serviceAcount"), "web"),
    _set(("workloads", 1, "workloadIps"), ["10.0.2.500"]),
    _set(("workloads", 1, "uid"), "c1//v1/Pod/default/web-1"),
    _set(("workloads", 0, "capacity"), "2"),
    _set(("workloads", 0, "capacity"), 1.5),               # a float: read as YAML
    _set(("services", 0, "vips"), ["/10.96.0.0/16"]),
    _set(("services", 0, "loadBalancer", "healthPolicy"), "Sometimes"),
    _set(("workloads", 0, "namespace"), "Default_NS"),
    _set(("services",), {"a": 1}),
    _set(("policies",), [{"name": "p"}]),
], ids=lambda e: "edit")
def test_one_bad_document_gives_one_error_in_both_spellings(edit: Any) -> None:
    doc = _good_doc()
    edit(doc)
    block = yaml.safe_dump(doc, sort_keys=False)
    spelled = to_json_yaml(doc)
    assert as_yaml(spelled) == as_yaml(block) == doc
    assert messages(spelled) == messages(block)


@pytest.mark.parametrize("name", ["web\u2028one", "w\x85", "\u00e9t\u00e9", "\U0001f600",
                                  "a\\u0041", 'q"uote', "\x7f", "x\ufffe"])
def test_names_yaml_and_json_read_differently_are_written_safely(name: str) -> None:
    doc = _good_doc()
    doc["workloads"][0]["name"] = name
    spelled = to_json_yaml(doc)
    assert as_yaml(spelled) == doc
    assert outcome(spelled) == outcome(yaml.safe_dump(doc, sort_keys=False))


def test_duplicate_keys_are_refused_in_the_json_spelling_too() -> None:
    spelled = model_to_json_yaml(load_model_text(GOOD)).replace(
        '"ports":{80: 8080,', '"ports":{80: 8080,80: 9090,', 1)
    with pytest.raises(NotJsonSubset):
        parse_json_subset(spelled)
    (message,) = messages(spelled)
    assert "duplicate key 80" in message and message.startswith("m.yaml: line 1, column")


@pytest.mark.parametrize("text", [
    '{"services": [{"ports": {010: 80}}]}',        # YAML 1.1 reads 010 as octal 8
    '{"a": 1} # a comment\n',
    '{"a": bare}',
    '{"a": 1e3}',                                  # YAML 1.1 reads 1e3 as a string
    '{"a": "\\ud83d\\ude00"}',                     # libyaml refuses escaped surrogates
    '{"a": 1}\n---\n{"b": 2}\n',
    'workloads: []\n',
    '\ufeff{"a": 1}',
])
def test_documents_outside_the_json_spelling_are_read_as_yaml(text: str) -> None:
    with pytest.raises(NotJsonSubset):
        parse_json_subset(text)


def test_a_string_holding_key_like_text_is_never_changed() -> None:
    doc = {"a": "x,80: y", "b": {"c,1:": 2}, "d": ['{5: 6}'], "e": {7: 8}}
    spelled = to_json_yaml(doc)
    assert as_yaml(spelled) == doc
    with contextlib.suppress(NotJsonSubset):  # then read as YAML; never read differently
        assert parse_json_subset(spelled) == doc


_KEYS = st.one_of(st.text(max_size=6), st.integers(-3, 70000))
_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.text(max_size=8))
_DOCS = st.dictionaries(_KEYS, st.recursive(_LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(_KEYS, inner, max_size=3)), max_leaves=10),
    max_size=4)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_DOCS)
def test_the_json_path_reads_what_yaml_reads(doc: dict[Any, Any]) -> None:
    spelled = to_json_yaml(doc)
    assert as_yaml(spelled) == doc
    with contextlib.suppress(NotJsonSubset):
        assert parse_json_subset(spelled) == doc


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet='{}[]":,0123456789 -a\\\n#e.', max_size=40))
def test_any_text_the_json_path_accepts_reads_as_yaml_reads_it(text: str) -> None:
    try:
        data = parse_json_subset(text)
    except NotJsonSubset:
        return
    assert data == as_yaml(text)


def test_watcher_skips_a_rewrite_of_the_model_in_force(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    spelled = model_to_json_yaml(load_model_text(GOOD))
    path.write_text(spelled)
    watcher = ModelWatcher(str(path))
    assert watcher.poll() is ReloadOutcome.LOADED
    model = watcher.model
    path.write_text(spelled.replace('"protocol":"HBONE"', '"protocol":"UDP"', 1))
    os.utime(path, ns=(1, 1))
    assert watcher.poll() is ReloadOutcome.REJECTED and watcher.model is model
    path.write_text(spelled)  # the same text again, a new file version
    os.utime(path, ns=(2, 2))
    assert watcher.poll() is ReloadOutcome.UNCHANGED
    assert watcher.generation == 1 and watcher.model is model and watcher.error is None
    assert load_model_file(path) == model
