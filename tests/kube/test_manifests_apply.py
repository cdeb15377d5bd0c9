"""kubectl applies the deployment manifests to the lab API server (server-side
validation against Kubernetes' schemas) and reads them back."""

from __future__ import annotations

from pathlib import Path

from kube_helpers import namespace

MANIFESTS = Path(__file__).resolve().parents[2] / "agent" / "k8s" / "manifests"


def test_kubectl_apply_manifests(kubelab, kubectl):
    kubelab.apply(namespace("istio-system"))
    out = kubectl("apply", "-f", str(MANIFESTS)).stdout
    for what in ("daemonset.apps/meshagent", "serviceaccount/meshagent",
                 "clusterrole.rbac.authorization.k8s.io/meshagent",
                 "clusterrolebinding.rbac.authorization.k8s.io/meshagent"):
        assert f"{what} created" in out
    again = kubectl("apply", "-f", str(MANIFESTS)).stdout
    assert "daemonset.apps/meshagent unchanged" in again
    assert kubectl("get", "ds", "-n", "istio-system", "-o", "name").stdout.strip() == \
        "daemonset.apps/meshagent"
