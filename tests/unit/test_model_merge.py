"""Merging this node's enrolled workloads into the model: the enrollment wins."""

from __future__ import annotations

import ipaddress

import pytest

from agent.model.merge import ConflictKind, merge_local_workloads, workload_from_enrollment
from agent.model.types import (
    InboundProtocol,
    Locality,
    Model,
    ModelInvalid,
    NamespacedHostname,
    NetworkAddress,
    Service,
    ServiceBinding,
    Workload,
    port_map,
)

WEB = NamespacedHostname("default", "web.default.svc.cluster.local")
SERVICE = Service("web", "default", WEB.hostname,
                  vips=(NetworkAddress.parse("/10.96.0.10"),), ports=port_map({80: 8080}))


def model_wl(name: str, addr: str, node: str, **kw: object) -> Workload:
    return Workload(uid=f"Kubernetes//v1/Pod/default/{name}", name=name, namespace="default",
                    workload_ips=(ipaddress.ip_address(addr),), node=node,
                    protocol=InboundProtocol.TCP,
                    services=(ServiceBinding(WEB, port_map({80: 8080})),), **kw)  # type: ignore[arg-type]


def enrolled(name: str, addr: str, **kw: object) -> Workload:
    return workload_from_enrollment(name=name, namespace="default", service_account="web",
                                    addresses=[addr], node="node1", **kw)  # type: ignore[arg-type]


def test_workload_from_enrollment() -> None:
    w = enrolled("web-1", "10.0.1.5", labels={"app": "web", "version": "v2"})
    assert w.uid == "Kubernetes//v1/Pod/default/web-1"
    assert w.protocol is InboundProtocol.HBONE and w.node == "node1"
    assert (w.canonical_name, w.canonical_revision) == ("web", "v2")
    assert w.identity() == "spiffe://cluster.local/ns/default/sa/web"
    bare = enrolled("web-2", "10.0.1.6")
    assert (bare.canonical_name, bare.canonical_revision) == ("web-2", "latest")
    istio = enrolled("x", "10.0.1.7", labels={"app": "a", "service.istio.io/canonical-name": "c"})
    assert istio.canonical_name == "c"


def test_local_replaces_by_uid_and_keeps_service_bindings() -> None:
    base = Model.build([model_wl("web-1", "10.0.1.5", "node1",
                                 locality=Locality("r", "z", ""), canonical_name="web")],
                       [SERVICE])
    merged, conflicts = merge_local_workloads(base, [enrolled("web-1", "10.0.1.5")], "node1")
    (w,) = merged.workloads
    assert w.protocol is InboundProtocol.HBONE and w.service_account == "web"
    assert w.services == base.workloads[0].services
    assert w.locality == Locality("r", "z", "")
    assert [c.kind for c in conflicts] == [ConflictKind.REPLACED]
    assert [e.workload_uid for e in merged.endpoints(SERVICE)] == [w.uid]


def test_local_replaces_by_address_when_uids_differ() -> None:
    base = Model.build([model_wl("web-1", "10.0.1.5", "node1")], [SERVICE])
    local = enrolled("web-1", "10.0.1.5", uid="node1/web-1")
    merged, conflicts = merge_local_workloads(base, [local], "node1")
    assert [w.uid for w in merged.workloads] == ["node1/web-1"]
    assert merged.workloads[0].services == base.workloads[0].services
    assert conflicts[0].kind is ConflictKind.REPLACED


def test_other_holders_of_a_local_address_and_stale_entries_are_dropped() -> None:
    base = Model.build([
        model_wl("web-1", "10.0.1.5", "node1"),
        model_wl("gone", "10.0.1.6", "node1"),      # claims node1, not enrolled
        model_wl("remote", "10.0.2.5", "node2"),    # another node: kept
    ], [SERVICE])
    local = [enrolled("web-1", "10.0.1.5"), enrolled("new", "10.0.1.7")]
    merged, conflicts = merge_local_workloads(base, local, "node1")
    assert sorted(w.name for w in merged.workloads) == ["new", "remote", "web-1"]
    kinds = {c.model_uid.rsplit("/", 1)[1]: c.kind for c in conflicts}
    assert kinds == {"web-1": ConflictKind.REPLACED, "gone": ConflictKind.NOT_ENROLLED}
    assert "claims this node" in str(conflicts[-1])


def test_address_reused_by_a_pod_elsewhere_in_the_model() -> None:
    # The model still says node2's pod has 10.0.1.5, but the kernel gave it to our pod
    # with another uid, whose own entry the model also has: the stale holder goes.
    base = Model.build([model_wl("old", "10.0.1.5", "node2"),
                        model_wl("web-1", "10.0.1.99", "node1")], [SERVICE])
    merged, conflicts = merge_local_workloads(base, [enrolled("web-1", "10.0.1.5")], "node1")
    assert [w.name for w in merged.workloads] == ["web-1"]
    assert merged.workload_by_address(NetworkAddress.parse("/10.0.1.5")).name == "web-1"
    assert {c.kind for c in conflicts} == {ConflictKind.REPLACED, ConflictKind.ADDRESS_TAKEN}


def test_contradictory_local_workloads_raise() -> None:
    base = Model.build([], [SERVICE])
    with pytest.raises(ModelInvalid, match="already"):
        merge_local_workloads(base, [enrolled("a", "10.0.1.5"), enrolled("b", "10.0.1.5")],
                              "node1")
