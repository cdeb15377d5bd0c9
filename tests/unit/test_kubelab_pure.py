"""The lab API server's pure parts: selectors (apimachinery's grammar) and patches."""

from __future__ import annotations

import pytest

from agent.kubelab.patch import PatchError, apply_patch, merge_patch, strategic_merge_patch
from agent.kubelab.selectors import SelectorError, field_selector, label_selector


@pytest.mark.parametrize(("selector", "labels", "want"), [
    ("a=b", {"a": "b"}, True), ("a==b", {"a": "b"}, True), ("a=b", {"a": "c"}, False),
    ("a!=b", {}, True), ("a!=b", {"a": "b"}, False), ("a", {"a": ""}, True),
    ("!a", {"a": "x"}, False), ("!a", {}, True), ("a in (x, y)", {"a": "y"}, True),
    ("a in (x)", {}, False), ("a notin (x)", {}, True), ("a notin (x)", {"a": "x"}, False),
    ("a=b,c in (d)", {"a": "b", "c": "d"}, True), ("a=b,c in (d)", {"a": "b"}, False),
    ("istio.io/dataplane-mode=ambient", {"istio.io/dataplane-mode": "ambient"}, True),
    ("", {"x": "y"}, True),
])
def test_label_selectors(selector, labels, want):
    assert label_selector(selector)(labels) is want


def test_bad_selectors_are_errors():
    with pytest.raises(SelectorError):
        label_selector("a in x")
    with pytest.raises(SelectorError):
        field_selector("spec.nodeName")


def test_field_selectors():
    pod = {"metadata": {"name": "a"}, "spec": {"nodeName": "n1", "hostNetwork": True}}
    assert field_selector("spec.nodeName=n1")(pod)
    assert not field_selector("spec.nodeName!=n1")(pod)
    assert field_selector("spec.hostNetwork=true,metadata.name=a")(pod)
    assert field_selector("status.phase=")(pod)


def test_merge_patch_rfc7386():
    assert merge_patch({"a": {"b": 1, "c": 2}}, {"a": {"b": None, "d": 3}}) == {
        "a": {"c": 2, "d": 3}}
    assert merge_patch({"l": [1, 2]}, {"l": [3]}) == {"l": [3]}


def test_strategic_merge_by_key_and_directives():
    target = {"spec": {"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "1"}],
                       "ports": [{"port": 80, "name": "http"}]}}
    patch = {"spec": {"containers": [{"name": "b", "image": "2"}, {"name": "c", "image": "3"},
                                     {"name": "a", "$patch": "delete"}],
                      "$setElementOrder/containers": [{"name": "b"}, {"name": "c"}],
                      "ports": [{"port": 80, "targetPort": 8080}]}}
    got = strategic_merge_patch(target, patch)
    assert got["spec"]["containers"] == [{"name": "b", "image": "2"}, {"name": "c", "image": "3"}]
    assert got["spec"]["ports"] == [{"port": 80, "name": "http", "targetPort": 8080}]


def test_json_patch_and_unknown_types():
    assert apply_patch("application/json-patch+json", {"a": 1},
                       [{"op": "replace", "path": "/a", "value": 2}]) == {"a": 2}
    with pytest.raises(PatchError):
        apply_patch("application/json-patch+json", {"a": 1}, [{"op": "remove", "path": "/b"}])
    with pytest.raises(PatchError):
        apply_patch("text/plain", {}, {})
