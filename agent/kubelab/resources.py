"""The resource kinds the lab API server serves (its discovery documents come from here)."""

from __future__ import annotations

from dataclasses import dataclass

VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    status: bool = False
    # Built-in kinds validate against Kubernetes' schemas; the rest (CRDs) structurally.
    builtin: bool = True

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()

    def discovery(self) -> list[dict[str, object]]:
        entries: list[dict[str, object]] = [{
            "name": self.plural, "singularName": self.singular, "namespaced": self.namespaced,
            "kind": self.kind, "verbs": VERBS, "shortNames": list(self.short_names)}]
        if self.status:
            entries.append({"name": f"{self.plural}/status", "singularName": "",
                            "namespaced": self.namespaced, "kind": self.kind,
                            "verbs": ["get", "patch", "update"]})
        return entries


RESOURCES: tuple[Resource, ...] = (
    Resource("", "v1", "namespaces", "Namespace", False, ("ns",), status=True),
    Resource("", "v1", "nodes", "Node", False, ("no",), status=True),
    Resource("", "v1", "pods", "Pod", True, ("po",), status=True),
    Resource("", "v1", "services", "Service", True, ("svc",), status=True),
    Resource("", "v1", "serviceaccounts", "ServiceAccount", True, ("sa",)),
    Resource("", "v1", "configmaps", "ConfigMap", True, ("cm",)),
    Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
    Resource("apps", "v1", "daemonsets", "DaemonSet", True, ("ds",), status=True),
    Resource("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    Resource("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding",
             False),
    Resource("security.istio.io", "v1", "authorizationpolicies", "AuthorizationPolicy", True,
             ("ap",), status=True, builtin=False),
    Resource("gateway.networking.k8s.io", "v1", "gateways", "Gateway", True, ("gtw",),
             status=True, builtin=False),
    Resource("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute", True,
             status=True, builtin=False),
    Resource("gateway.networking.k8s.io", "v1", "gatewayclasses", "GatewayClass", False,
             ("gc",), status=True, builtin=False),
)

BY_PATH: dict[tuple[str, str, str], Resource] = {
    (r.group, r.version, r.plural): r for r in RESOURCES}


def groups() -> dict[str, list[str]]:
    """group -> versions (the core group "" excluded)."""
    out: dict[str, list[str]] = {}
    for r in RESOURCES:
        if r.group and r.version not in out.setdefault(r.group, []):
            out[r.group].append(r.version)
    return out
