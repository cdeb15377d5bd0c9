"""API request validation: wrong types and unknown fields are refused up front."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.contracts.api import PodAdd, PodDel, PodList, RequestError, Status, parse_request


def test_pod_add_defaults() -> None:
    req = parse_request({"op": "pod_add", "netns": "pod1"})
    assert req == PodAdd(netns="pod1")


def test_all_ops() -> None:
    assert isinstance(parse_request({"op": "pod_list"}), PodList)
    assert isinstance(parse_request({"op": "status"}), Status)
    assert parse_request({"op": "pod_del", "name": "web", "namespace": "x"}) == PodDel(
        name="web", namespace="x")


@pytest.mark.parametrize(("raw", "message"), [
    ([], "JSON object"),
    ({"op": "nope"}, "unknown op"),
    ({"op": "pod_add"}, "needs netns"),
    ({"op": "pod_add", "netns": ""}, "needs netns"),
    ({"op": "pod_add", "netns": 3}, "must be str"),
    ({"op": "pod_add", "netns": "a", "extra": 1}, "unknown field"),
    ({"op": "pod_add", "netns": "a", "namespace": "Bad_NS"}, "Kubernetes name"),
    ({"op": "pod_add", "netns": "a", "service_account": "-x"}, "Kubernetes name"),
    ({"op": "pod_add", "netns": "a", "ifname": "a/b"}, "interface name"),
    ({"op": "pod_add", "netns": "a", "ifname": "x" * 16}, "interface name"),
    ({"op": "pod_add", "netns": "a", "labels": {"app": "bad value!"}}, "label"),
    ({"op": "pod_add", "netns": "a", "labels": {"app": 1}}, "label"),
    ({"op": "pod_add", "netns": "a", "name": True}, "must be str"),
    ({"op": "pod_del"}, "netns or name"),
])
def test_rejects_bad_requests(raw: Any, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        parse_request(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)


@given(st.dictionaries(st.sampled_from(["op", "netns", "ifname", "namespace", "name",
                                        "service_account", "labels", "zzz"]),
                       json_values, max_size=6)
       | json_values)
def test_fuzz_only_request_errors(raw: Any) -> None:
    with contextlib.suppress(RequestError):
        parse_request(raw)
