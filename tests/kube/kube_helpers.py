"""Object builders for the Kubernetes tests."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
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


async def until(check: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    """Poll ``check`` on the running loop until true; at most ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
