"""Object builders for the Kubernetes tests."""

from __future__ import annotations

import shutil
from typing import Any

KUBECTL = shutil.which("kubectl")


def pod(name: str, namespace: str = "default", node: str = "n1",
        labels: dict[str, str] | None = None, ip: str | None = None,
        **spec: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {"nodeName": node, "serviceAccountName": "default",
                 "containers": [{"name": "app", "image": "registry.local/app:1"}], **spec}}
    if ip:
        obj["status"] = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    return obj


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels or {}}}
