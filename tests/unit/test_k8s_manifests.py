"""The DaemonSet and RBAC validate offline against Kubernetes' schemas and grant no
more than the agent needs; the CNI install step chains the plugin as Istio's does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from agent.k8s import cni_install
from agent.kubelab.validate import validate

MANIFESTS = Path(__file__).resolve().parents[2] / "agent" / "k8s" / "manifests"


def documents() -> list[dict]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_validates_strictly(doc):
    kubernetes_validate.validate(doc, "1.32", strict=True)  # the package's own check
    validate(doc, builtin=True)  # and the lab server's cached one


def by_kind(kind: str) -> dict:
    return next(d for d in documents() if d["kind"] == kind)


def test_cluster_role_is_least_privilege():
    rules = by_kind("ClusterRole")["rules"]
    grants = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
              for v in rule["verbs"]}
    read = {"get", "list", "watch"}
    want = {(g, r, v) for g, r in [("", "pods"), ("", "namespaces"), ("", "services"),
                                   ("discovery.k8s.io", "endpointslices"),
                                   ("security.istio.io", "authorizationpolicies"),
                                   ("gateway.networking.k8s.io", "gateways"),
                                   ("gateway.networking.k8s.io", "gatewayclasses")]
            for v in read} | {("", "pods/status", "patch")}
    assert grants == want
    assert not any("*" in x for g in grants for x in g)


def test_daemonset_capabilities_and_host_network():
    spec = by_kind("DaemonSet")["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["serviceAccountName"] == by_kind("ServiceAccount")["metadata"]["name"]
    caps = {c["name"]: c["securityContext"]["capabilities"] for c in spec["containers"]}
    assert caps == {"agent": {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN"]},
                    "tunnel": {"drop": ["ALL"], "add": ["NET_ADMIN"]}}
    for c in spec["containers"] + spec["initContainers"]:
        assert not c["securityContext"].get("privileged")
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["initContainers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"] for c in spec["containers"] for m in c["volumeMounts"]}
    assert {"/sys/fs/bpf", "/var/run/netns", "/run/meshagent"} <= mounts
    # the pods of this DaemonSet are the node proxy's own: never enrolled (rules.py)
    assert by_kind("DaemonSet")["metadata"]["namespace"] == "istio-system"
    assert spec.get("hostPID") is not True


BRIDGE = {"cniVersion": "0.3.1", "name": "bridge", "type": "bridge", "bridge": "cni0",
          "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}}


def test_install_chains_after_a_single_conf_and_renames_it(tmp_path):
    net, bins = tmp_path / "net.d", tmp_path / "bin"
    net.mkdir()
    (net / "00-broken.conf").write_text("{not json")
    (net / "10-bridge.conf").write_text(json.dumps(BRIDGE))
    os.chmod(net / "10-bridge.conf", 0o600)
    written = cni_install.install(net, bins)
    assert written == net / "10-bridge.conflist" and not (net / "10-bridge.conf").exists()
    conf = json.loads(written.read_text())
    assert conf["name"] == "k8s-pod-network" and conf["cniVersion"] == "0.3.1"
    assert [p["type"] for p in conf["plugins"]] == ["bridge", "meshagent-cni"]
    assert "cniVersion" not in conf["plugins"][0]
    assert written.stat().st_mode & 0o777 == 0o600
    # idempotent: installing again replaces our entry, never duplicates it
    cni_install.install(net, bins)
    conf = json.loads(written.read_text())
    assert [p["type"] for p in conf["plugins"]] == ["bridge", "meshagent-cni"]
    cni_install.uninstall(net, bins)
    assert [p["type"] for p in json.loads(written.read_text())["plugins"]] == ["bridge"]
    assert not (bins / "meshagent-cni").exists()


def test_install_appends_to_a_conflist_and_fails_clearly_without_one(tmp_path):
    net, bins = tmp_path / "net.d", tmp_path / "bin"
    net.mkdir()
    with pytest.raises(cni_install.InstallError, match="install the primary CNI first"):
        cni_install.install(net, bins)
    (net / "05-x.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": "k8s", "plugins": [BRIDGE, {"type": "portmap"}]}))
    cni_install.install(net, bins)
    conf = json.loads((net / "05-x.conflist").read_text())
    assert [p["type"] for p in conf["plugins"]] == ["bridge", "portmap", "meshagent-cni"]


def test_the_installed_plugin_runs_with_the_standard_library_only(tmp_path):
    net, bins = tmp_path / "net.d", tmp_path / "bin"
    net.mkdir()
    (net / "10-bridge.conf").write_text(json.dumps(BRIDGE))
    cni_install.install(net, bins)
    plugin = bins / "meshagent-cni"
    assert os.access(plugin, os.X_OK)
    result = subprocess.run([sys.executable, "-I", str(plugin)], capture_output=True, text=True,
                            env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
                            cwd=tmp_path, timeout=30, input="{}")
    assert result.returncode == 0, result.stderr
    assert "1.0.0" in json.loads(result.stdout)["supportedVersions"]


def test_the_lab_api_server_is_never_imported_by_the_agent():
    """agent/kubelab is for the lab and tests only (its docstring and README say so):
    the lab (agent/lab/, which runs it as a process) and the bench may name it."""
    root = MANIFESTS.parents[1]
    offenders = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("kubelab/", "bench/", "lab/")):
            continue
        text = path.read_text()
        if "agent.kubelab" in text or "from agent import kubelab" in text:
            offenders.append(rel)
    assert offenders == []
