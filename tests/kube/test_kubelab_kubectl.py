"""The lab API server held to kubectl (the real client): get, watch, label,
annotate, apply (client-side, server-side, dry-run), delete, validation errors."""

from __future__ import annotations

import json
import subprocess
import time

from kube_helpers import KUBECTL, pod

SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
"""


def test_get_label_annotate(kubelab, kubectl):
    kubelab.apply(pod("web-1", labels={"app": "web"}, ip="10.1.0.5"))
    out = kubectl("get", "pods", "-o", "json").stdout
    assert [p["metadata"]["name"] for p in json.loads(out)["items"]] == ["web-1"]
    assert "web-1" in kubectl("get", "pods").stdout
    kubectl("label", "namespace", "default", "istio.io/dataplane-mode=ambient")
    ns = json.loads(kubectl("get", "ns", "default", "-o", "json").stdout)
    assert ns["metadata"]["labels"]["istio.io/dataplane-mode"] == "ambient"
    kubectl("annotate", "pod", "web-1", "ambient.istio.io/redirection=enabled")
    got = kubectl("get", "pod", "web-1", "-o",
                  "jsonpath={.metadata.annotations.ambient\\.istio\\.io/redirection}").stdout
    assert got == "enabled"
    kubectl("label", "namespace", "default", "istio.io/dataplane-mode-")
    ns = json.loads(kubectl("get", "ns", "default", "-o", "json").stdout)
    assert "istio.io/dataplane-mode" not in ns["metadata"]["labels"]
    # label selectors and field selectors as kubectl sends them
    kubelab.apply(pod("db-1", labels={"app": "db"}, node="n2"))
    assert kubectl("get", "pods", "-l", "app=db", "-o", "name").stdout.split() == ["pod/db-1"]
    assert kubectl("get", "pods", "-l", "app in (web)", "-o", "name").stdout.split() == [
        "pod/web-1"]
    assert kubectl("get", "pods", "--field-selector", "spec.nodeName=n2", "-o",
                   "name").stdout.split() == ["pod/db-1"]


def test_apply_create_configure_and_dry_run(kubelab, kubectl):
    assert "created" in kubectl("apply", "-f", "-", stdin=SERVICE).stdout
    changed = SERVICE.replace("targetPort: 8080", "targetPort: 9090")
    assert "configured" in kubectl("apply", "-f", "-", stdin=changed).stdout
    svc = json.loads(kubectl("get", "svc", "web", "-o", "json").stdout)
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": 9090}]
    assert "unchanged" in kubectl("apply", "-f", "-", stdin=changed).stdout
    # server-side dry run stores nothing
    other = changed.replace("name: web\n", "name: other\n", 1)
    assert "server dry run" in kubectl("apply", "--dry-run=server", "-f", "-",
                                        stdin=other).stdout
    assert kubectl("get", "svc", "other", check=False).returncode != 0
    # server-side apply
    assert kubectl("apply", "--server-side", "-f", "-", stdin=other).returncode == 0
    assert kubectl("get", "svc", "other", "-o", "name").stdout.strip() == "service/other"
    kubectl("delete", "svc", "other")
    assert kubectl("get", "svc", "other", check=False).returncode != 0


def test_apply_crd_kind(kubelab, kubectl):
    policy = ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n"
              "  name: deny-all\n  namespace: default\nspec:\n  action: DENY\n  rules: [{}]\n")
    assert "created" in kubectl("apply", "-f", "-", stdin=policy).stdout
    got = json.loads(kubectl("get", "authorizationpolicies", "-A", "-o", "json").stdout)
    assert got["items"][0]["spec"]["action"] == "DENY"


def test_invalid_objects_are_rejected_with_the_field(kubelab, kubectl):
    bad = SERVICE.replace("port: 80,", "port: eighty,")
    result = kubectl("apply", "-f", "-", stdin=bad, check=False)
    assert result.returncode != 0 and "port" in result.stderr
    unknown = SERVICE.replace("spec:\n", "spec:\n  bogusField: 1\n")
    result = kubectl("apply", "-f", "-", stdin=unknown, check=False)
    assert result.returncode != 0 and "bogusField" in result.stderr
    nons = SERVICE.replace("namespace: default", "namespace: nowhere")
    result = kubectl("apply", "-f", "-", stdin=nons, check=False)
    assert result.returncode != 0 and "nowhere" in result.stderr


def test_watch_sees_changes(kubelab, kubeconfig, tmp_path):
    kubelab.apply(pod("web-1"))
    proc = subprocess.Popen(
        [KUBECTL, "--kubeconfig", str(kubeconfig), "--cache-dir", str(tmp_path / "kc"),
         "get", "pods", "-w", "-o", "name", "--request-timeout=20s"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "pod/web-1"
        time.sleep(0.3)  # let kubectl's watch start (it lists first)
        kubelab.apply(pod("web-2"))
        assert proc.stdout.readline().strip() == "pod/web-2"
    finally:
        proc.kill()
        proc.wait(10)
