"""Reading API objects tolerantly: every bad field named, never an exception."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.k8s.objects import (
    ObjectProblem,
    Pod,
    read_endpoint_slice,
    read_namespace,
    read_pod,
    read_service,
)

GOOD = {"metadata": {"name": "a", "namespace": "n", "labels": {"x": "y"}},
        "spec": {"nodeName": "n1"},
        "status": {"podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}], "podIP": "10.0.0.1",
                   "conditions": [{"type": "Ready", "status": "True"}]}}


def test_good_pod():
    pod = read_pod(GOOD)
    assert isinstance(pod, Pod)
    assert pod.ips == ("10.0.0.1", "fd00::1") and pod.ready and pod.service_account == "default"


@pytest.mark.parametrize(("obj", "field"), [
    ({"metadata": {"name": "a", "namespace": "n", "labels": {"x": 1}}}, "metadata.labels['x']"),
    ({"metadata": {"name": "a", "namespace": "n", "labels": ["x"]}}, "metadata.labels"),
    ({"metadata": {"namespace": "n"}}, "metadata.name"),
    ({"metadata": {"name": "a"}}, "metadata.namespace"),
    ({"metadata": {"name": "a", "namespace": "n"}, "status": {"podIP": "10.0.0.300"}},
     "status.podIP"),
    ({"metadata": {"name": "a", "namespace": "n"}, "spec": {"hostNetwork": "yes"}},
     "spec.hostNetwork"),
    ({"metadata": {"name": "a", "namespace": "n"}, "spec": []}, "spec"),
    ("not an object", ""),
])
def test_bad_pods_name_the_field(obj, field):
    problem = read_pod(obj)
    assert isinstance(problem, ObjectProblem) and problem.field == field
    assert "last good version kept" in str(problem)


def test_bad_service_and_slice():
    svc = read_service({"metadata": {"name": "s", "namespace": "n"},
                        "spec": {"ports": [{"port": "80"}]}})
    assert isinstance(svc, ObjectProblem) and svc.field == "spec.ports[0].port"
    sl = read_endpoint_slice({"metadata": {"name": "s", "namespace": "n"},
                              "endpoints": [{"addresses": ["x"]}]})
    assert isinstance(sl, ObjectProblem) and sl.field == "endpoints[0].addresses[0]"
    assert isinstance(read_namespace({"metadata": {}}), ObjectProblem)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["metadata", "spec", "status", "ports", "endpoints"]),
                       json_values, max_size=5))
def test_readers_never_raise(obj):
    for reader in (read_pod, read_namespace, read_service, read_endpoint_slice):
        reader(obj)
