"""The daemon's Kubernetes glue, its pure parts: the pod_add a watched pod becomes, the
node name, the [k8s] config section, the pod_verdict request, the kube lab's objects."""

from __future__ import annotations

import pytest

from agent.config import ConfigError, from_mapping
from agent.contracts.api import ErrorCode, PodAdd, PodVerdict, RequestError, parse_request
from agent.k8s.nodeagent import node_name, pod_add_request
from agent.k8s.objects import Pod, read_pod
from agent.kubelab.resources import RESOURCES
from agent.kubelab.validate import validate
from agent.lab.kube import AMBIENT_ENV, lab_objects
from agent.lab.topology import build_plan


def api_pod(annotations: dict[str, str] | None = None) -> Pod:
    pod = read_pod({"metadata": {"name": "web-0", "namespace": "shop", "uid": "u-1",
                                 "labels": {"app": "web"}, "annotations": annotations or {}},
                    "spec": {"nodeName": "n1", "serviceAccountName": "web-sa"},
                    "status": {"phase": "Running", "podIP": "10.1.0.5"}})
    assert isinstance(pod, Pod)
    return pod


def test_a_watched_pod_becomes_a_valid_pod_add_with_its_api_identity() -> None:
    raw = pod_add_request(api_pod(), "/run/netns/p")
    req = parse_request(raw)  # the daemon's own checks accept it
    assert isinstance(req, PodAdd)
    assert (req.name, req.namespace, req.service_account, req.uid, dict(req.labels)) == (
        "web-0", "shop", "web-sa", "u-1", {"app": "web"})
    assert req.dns_capture is None and "dns_capture" not in raw  # the node decides


@pytest.mark.parametrize("value, want", [("false", False), ("true", True), ("maybe", None)])
def test_the_dns_capture_annotation_reaches_pod_add(value: str, want: bool | None) -> None:
    raw = pod_add_request(api_pod({"ambient.istio.io/dns-capture": value}), "/run/netns/p")
    req = parse_request(raw)
    assert isinstance(req, PodAdd) and req.dns_capture is want


def test_node_name_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "from-env")
    assert node_name("configured", "tunnel") == "configured"
    assert node_name("", "tunnel") == "from-env"
    monkeypatch.delenv("NODE_NAME")
    assert node_name("", "tunnel") == "tunnel"


def test_k8s_config_section() -> None:
    cfg = from_mapping({"k8s": {"enabled": True, "kubeconfig": "/k"},
                        "tunnel": {"model_file": "/m.yaml"}})
    assert cfg.k8s.enabled and cfg.k8s.kubeconfig == "/k"
    assert cfg.k8s.exclude_namespaces == ("kube-system",)
    env = {"MESHAGENT_K8S_ENABLED": "1", "MESHAGENT_K8S_MODEL": "false",
           "MESHAGENT_K8S_NODE_NAME": "node7"}
    cfg = from_mapping({}, env)
    assert cfg.k8s.enabled and not cfg.k8s.model and cfg.k8s.node_name == "node7"
    with pytest.raises(ConfigError, match=r"tunnel\.model_file"):
        from_mapping({"k8s": {"enabled": True}})
    with pytest.raises(ConfigError, match="unknown key"):
        from_mapping({"k8s": {"enable": True}})
    with pytest.raises(ConfigError, match="> 0"):
        from_mapping({"k8s": {"resync_seconds": 0}})


def test_pod_verdict_request() -> None:
    req = parse_request({"op": "pod_verdict", "namespace": "shop", "name": "web-0"})
    assert req == PodVerdict("web-0", "shop")
    with pytest.raises(RequestError, match="needs name"):
        parse_request({"op": "pod_verdict", "namespace": "shop"})
    with pytest.raises(RequestError, match="not a valid Kubernetes name"):
        parse_request({"op": "pod_verdict", "name": "Web_0"})
    assert ErrorCode.parse("kubernetes_unavailable") is ErrorCode.KUBERNETES_UNAVAILABLE
    with pytest.raises(RequestError, match="not a Kubernetes uid"):
        parse_request({"op": "pod_add", "netns": "p", "uid": "x" * 65})
    with pytest.raises(RequestError, match="not a Kubernetes uid"):
        parse_request({"op": "pod_add", "netns": "p", "uid": "a b"})


def test_the_kube_labs_objects_are_valid_kubernetes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AMBIENT_ENV, "team-b")
    objs = lab_objects(build_plan("kt1"))
    for obj in objs:
        resource = next(r for r in RESOURCES if r.kind == obj["kind"])
        validate(obj, resource.builtin)
    namespaces = {o["metadata"]["name"]: o["metadata"]["labels"] for o in objs
                  if o["kind"] == "Namespace"}
    assert namespaces == {"default": {}, "team-b": {"istio.io/dataplane-mode": "ambient"}}
    plain = next(o for o in objs if o["metadata"]["name"] == "n1-plain")
    assert plain["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"
    pod = next(o for o in objs if o["metadata"]["name"] == "n2-a")
    assert pod["spec"]["nodeName"] == "node2" and pod["status"]["podIP"] == "10.244.2.10"


def test_a_version_1_state_keeps_its_pods_dns_as_the_node_decides(tmp_path) -> None:
    """Version 1 wrote dns_capture true for "did not opt out": read as the node's
    default (None), never as an opt-in that would capture DNS the node does not."""
    import json

    from agent.state import STATE_VERSION, load_state

    pod = {"name": "a", "namespace": "default", "service_account": "default",
           "netns": "/run/netns/a", "ifname": "eth0", "host_ifindex": 5,
           "host_ifname": "va", "addresses": ["10.0.0.5"]}
    (tmp_path / "state.json").write_text(json.dumps({"version": 1, "node": {}, "pods": [
        {**pod, "dns_capture": True},
        {**pod, "name": "b", "netns": "/run/netns/b", "host_ifindex": 6,
         "addresses": ["10.0.0.6"], "dns_capture": False}]}))
    pods = {p.name: p for p in load_state(str(tmp_path)).registry}
    assert pods["a"].dns_capture is None and pods["b"].dns_capture is False
    assert STATE_VERSION == 2
