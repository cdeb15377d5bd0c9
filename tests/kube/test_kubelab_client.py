"""The lab API server held to the official Python client: list, watch from a
resourceVersion with bookmarks, selectors, 410 Expired and relist, status patch."""

from __future__ import annotations

import pytest
from kube_helpers import namespace, pod
from kubernetes import client, config, watch


@pytest.fixture
def core(kubeconfig):
    api = config.new_client_from_config(str(kubeconfig))
    try:
        yield client.CoreV1Api(api)
    finally:
        api.close()


def test_list_and_watch_with_bookmarks(kubelab, core):
    kubelab.apply(pod("a", ip="10.1.0.1"))
    listed = core.list_pod_for_all_namespaces(field_selector="spec.nodeName=n1")
    assert [p.metadata.name for p in listed.items] == ["a"]
    rv = listed.metadata.resource_version
    kubelab.apply(pod("b", node="n2"))
    kubelab.apply(pod("c"))
    w = watch.Watch()
    seen, bookmarks = [], 0
    for event in w.stream(core.list_pod_for_all_namespaces, field_selector="spec.nodeName=n1",
                          resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=2):
        if event["type"] == "BOOKMARK":
            bookmarks += 1
            w.stop()
        else:
            seen.append((event["type"], event["object"].metadata.name))
    assert seen == [("ADDED", "c")]  # b is on another node: filtered out
    assert bookmarks == 1
    assert int(w.resource_version) >= int(rv)


def test_label_selector_watch_turns_a_relabel_into_added_and_deleted(kubelab, core):
    kubelab.apply(pod("a", labels={"tier": "x"}))
    rv = core.list_namespaced_pod("default", label_selector="tier=x").metadata.resource_version
    core.patch_namespaced_pod("a", "default", {"metadata": {"labels": {"tier": "y"}}})
    events = [(e["type"], e["object"].metadata.name) for e in watch.Watch().stream(
        core.list_namespaced_pod, "default", label_selector="tier=x", resource_version=rv,
        timeout_seconds=1)]
    assert events == [("DELETED", "a")]


def test_too_old_resource_version_is_410_then_relist_works(kubelab, core):
    kubelab.apply(pod("a"))
    rv = core.list_namespaced_pod("default").metadata.resource_version
    kubelab.apply(pod("b"))
    kubelab.call(kubelab.store.compact)
    with pytest.raises(client.exceptions.ApiException) as info:
        for _ in watch.Watch().stream(core.list_namespaced_pod, "default", resource_version=rv,
                                      timeout_seconds=1):
            pass
    assert info.value.status == 410
    relisted = core.list_namespaced_pod("default")
    assert sorted(p.metadata.name for p in relisted.items) == ["a", "b"]
    events = list(watch.Watch().stream(core.list_namespaced_pod, "default",
                                       resource_version=relisted.metadata.resource_version,
                                       timeout_seconds=1))
    assert events == []


def test_history_bound_expires_old_versions(tmp_path):
    from agent.kubelab import LabApiServer
    with LabApiServer(history=5) as server:
        server.apply(namespace("default"))
        for i in range(10):
            server.apply(pod(f"p{i}"))
        with pytest.raises(Exception, match="too old"):
            server.call(server.store.events_since, 2)
        assert len(server.call(server.store.events_since, server.store.rv - 3)) == 3


def test_status_subresource_patch_changes_metadata_and_status_not_spec(kubelab, core):
    kubelab.apply(pod("a", ip="10.1.0.1"))
    core.patch_namespaced_pod_status(
        "a", "default", {"metadata": {"annotations": {"ambient.istio.io/redirection": "enabled"}},
                         "spec": {"nodeName": "elsewhere"}},
        _content_type="application/merge-patch+json")
    got = core.read_namespaced_pod("a", "default")
    assert got.metadata.annotations == {"ambient.istio.io/redirection": "enabled"}
    assert got.spec.node_name == "n1"
    # and the main resource keeps status
    core.patch_namespaced_pod("a", "default", {"status": {"podIP": "10.9.9.9"}},
                              _content_type="application/merge-patch+json")
    assert core.read_namespaced_pod("a", "default").status.pod_ip == "10.1.0.1"


def test_json_patch_conflict_and_errors(kubelab, core):
    kubelab.apply(pod("a"))
    core.patch_namespaced_pod("a", "default", [
        {"op": "add", "path": "/metadata/labels/k", "value": "v"}],
        _content_type="application/json-patch+json")
    assert core.read_namespaced_pod("a", "default").metadata.labels == {"k": "v"}
    current = core.read_namespaced_pod("a", "default")
    current.metadata.resource_version = "1"
    with pytest.raises(client.exceptions.ApiException) as info:
        core.replace_namespaced_pod("a", "default", current)
    assert info.value.status == 409
    with pytest.raises(client.exceptions.ApiException) as info:
        core.read_namespaced_pod("nope", "default")
    assert info.value.status == 404
    with pytest.raises(client.exceptions.ApiException) as info:
        core.create_namespaced_pod("default", {"apiVersion": "v1", "kind": "Pod",
                                               "metadata": {"name": "Bad_Name"},
                                               "spec": {"containers": []}})
    assert info.value.status == 422


def test_namespace_delete_removes_its_objects(kubelab, core):
    kubelab.apply(namespace("tmp"))
    kubelab.apply(pod("a", namespace="tmp"))
    core.delete_namespace("tmp")
    assert core.list_namespaced_pod("tmp").items == []
