"""Label and field selectors as the API server parses them (query ``labelSelector``,
``fieldSelector``), following k8s.io/apimachinery pkg/labels/selector.go and
pkg/fields/selector.go: ``a=b``, ``a==b``, ``a!=b``, ``a in (x,y)``, ``a notin (x)``,
``a``, ``!a``; fields support ``=``, ``==``, ``!=`` on dotted paths."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

Predicate = Callable[[Mapping[str, Any]], bool]


class SelectorError(ValueError):
    pass


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


_SET = re.compile(r"^([A-Za-z0-9_./-]+)\s+(in|notin)\s+\(([^)]*)\)$")
_EQ = re.compile(r"^([A-Za-z0-9_./-]+)\s*(==|=|!=)\s*([A-Za-z0-9_.-]*)$")
_KEY = re.compile(r"^(!?)([A-Za-z0-9_./-]+)$")


LabelTest = Callable[[Mapping[str, str]], bool]


def _term(term: str) -> LabelTest:
    if m := _SET.match(term):
        key, op = m.group(1), m.group(2)
        values = {v.strip() for v in m.group(3).split(",")}
        if op == "in":
            def in_set(labels: Mapping[str, str]) -> bool:
                return key in labels and labels[key] in values
            return in_set

        def not_in_set(labels: Mapping[str, str]) -> bool:
            return key not in labels or labels[key] not in values
        return not_in_set
    if m := _EQ.match(term):
        key, op, value = m.groups()
        if op == "!=":
            def not_equal(labels: Mapping[str, str]) -> bool:
                return labels.get(key) != value
            return not_equal

        def equal(labels: Mapping[str, str]) -> bool:
            return key in labels and labels[key] == value
        return equal
    if m := _KEY.match(term):
        neg, key = m.groups()

        def exists(labels: Mapping[str, str]) -> bool:
            return (key in labels) != bool(neg)
        return exists
    raise SelectorError(f"unable to parse requirement: {term!r}")


def label_selector(text: str | None) -> LabelTest:
    """Compile a label selector; :class:`SelectorError` on a bad one."""
    tests = [_term(t) for t in _split_top(text or "")]
    return lambda labels: all(t(labels) for t in tests)


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, Mapping):
            return ""
        cur = cur.get(part)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def field_selector(text: str | None) -> Predicate:
    tests: list[Predicate] = []
    for term in _split_top(text or ""):
        m = re.match(r"^([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*)$", term)
        if not m:
            raise SelectorError(f"invalid field selector: {term!r}")
        path, op, value = m.groups()

        def test(obj: Mapping[str, Any], path: str = path, value: str = value,
                 negate: bool = op == "!=") -> bool:
            return (_field_value(obj, path) == value) != negate
        tests.append(test)
    return lambda obj: all(t(obj) for t in tests)
