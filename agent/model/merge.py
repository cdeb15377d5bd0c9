"""Merge this node's enrolled workloads into the cluster model (pure).

The model file describes the cluster (other nodes' workloads, services, which pods
back them); the agent knows, from the kernel, which pods are enrolled on *this* node,
with their addresses and identities. :func:`merge_local_workloads` joins the two.

The rule: **this node's enrollment is the truth about this node's pods.**

- A local workload replaces the model entry with the same uid, or else the model
  entry holding one of its addresses (same network): addresses, identity, node,
  protocol (``HBONE``: enrolled pods take mesh traffic) come from the enrollment. What
  the enrollment does not know is kept from the replaced entry: its ``services``
  bindings, canonical name/revision, locality, cluster, when the local workload leaves
  them empty (and its ``waypoint``).
- Any other model entry holding a local workload's address is dropped (a pod that
  moved or an address reused: the kernel says who has it now), as is a model entry
  that claims to be on this node but is not enrolled (a pod that is gone), unless
  a waypoint address names it: waypoint pods are never enrolled (Istio labels them
  ``istio.io/dataplane-mode: none``) and are still the mesh's to reach.
- Services are untouched. Each displacement is reported as a :class:`MergeConflict`
  so the caller can log it.

:func:`workload_from_enrollment` builds the ztunnel-shaped workload of an enrolled pod.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import Enum

from agent.model.types import (
    DEFAULT_TRUST_DOMAIN,
    InboundProtocol,
    Locality,
    Model,
    NetworkAddress,
    Workload,
)

# Istio's label precedence for the canonical service name and revision
# (istio/istio pkg/kube/labels/labels.go :: CanonicalService: the first label present;
# the name defaults to the workload name, the revision to "latest").
CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
CANONICAL_REVISION_LABELS = ("service.istio.io/canonical-revision",
                             "app.kubernetes.io/version", "version")


class ConflictKind(Enum):
    REPLACED = "replaced by the enrolled workload"
    ADDRESS_TAKEN = "dropped: the address belongs to an enrolled workload"
    NOT_ENROLLED = "dropped: claims this node but is not enrolled here"


@dataclass(frozen=True)
class MergeConflict:
    kind: ConflictKind
    model_uid: str
    local_uid: str = ""

    def __str__(self) -> str:
        tail = f" ({self.local_uid})" if self.local_uid else ""
        return f"model workload {self.model_uid}: {self.kind.value}{tail}"


def pod_uid(cluster_id: str, namespace: str, name: str) -> str:
    """ztunnel's uid form for a pod: ``<cluster>//v1/Pod/<namespace>/<name>``."""
    return f"{cluster_id}//v1/Pod/{namespace}/{name}"


def _first_label(labels: Mapping[str, str], keys: Iterable[str]) -> str | None:
    for key in keys:
        if key in labels:
            return labels[key]
    return None


def workload_from_enrollment(*, name: str, namespace: str, service_account: str,
                             addresses: Iterable[str], node: str,
                             labels: Mapping[str, str] | None = None,
                             cluster_id: str = "Kubernetes",
                             trust_domain: str = DEFAULT_TRUST_DOMAIN,
                             network: str = "", locality: Locality | None = None,
                             uid: str | None = None) -> Workload:
    """The workload an enrolled pod contributes (``protocol: HBONE``)."""
    labels = labels or {}
    return Workload(
        uid=uid or pod_uid(cluster_id, namespace, name),
        name=name, namespace=namespace,
        workload_ips=tuple(ipaddress.ip_address(a) for a in addresses),
        service_account=service_account,
        trust_domain=trust_domain if trust_domain != DEFAULT_TRUST_DOMAIN else "",
        network=network, protocol=InboundProtocol.HBONE, node=node,
        canonical_name=_first_label(labels, CANONICAL_NAME_LABELS) or name,
        canonical_revision=_first_label(labels, CANONICAL_REVISION_LABELS) or "latest",
        workload_name=name, workload_type="pod", cluster_id=cluster_id,
        locality=locality or Locality())


def _fill_from(local: Workload, model_entry: Workload) -> Workload:
    """The local workload, with what only the model knows filled in where it is empty."""
    return replace(
        local,
        services=local.services or model_entry.services,
        canonical_name=local.canonical_name or model_entry.canonical_name,
        canonical_revision=local.canonical_revision or model_entry.canonical_revision,
        locality=local.locality if local.locality != Locality() else model_entry.locality,
        cluster_id=local.cluster_id or model_entry.cluster_id,
        authorization_policies=local.authorization_policies
        or model_entry.authorization_policies,
        waypoint=local.waypoint or model_entry.waypoint)


def merge_local_workloads(model: Model, local: Iterable[Workload],
                          node: str) -> tuple[Model, tuple[MergeConflict, ...]]:
    """Model + this node's enrolled workloads -> merged model and the displacements.

    Raises :class:`agent.model.types.ModelInvalid` only if the local workloads
    contradict each other (two with one uid or one address).
    """
    local = tuple(local)
    by_uid = {w.uid: w for w in model.workloads}
    conflicts: list[MergeConflict] = []
    consumed: set[str] = set()
    merged_local: list[Workload] = []
    for lw in local:
        match = by_uid.get(lw.uid)
        if match is None:
            for na in lw.network_addresses():
                holder = model.workload_by_address(na)
                if holder is not None and holder.uid not in consumed:
                    match = holder
                    break
        if match is not None and match.uid not in consumed:
            consumed.add(match.uid)
            if match != lw:
                conflicts.append(MergeConflict(ConflictKind.REPLACED, match.uid, lw.uid))
            merged_local.append(_fill_from(lw, match))
        else:
            merged_local.append(lw)
    local_addrs = {na: lw.uid for lw in merged_local for na in lw.network_addresses()}
    local_uids = {lw.uid for lw in merged_local}
    waypoints = model.waypoint_uids()
    kept: list[Workload] = []
    for w in model.workloads:
        if w.uid in consumed or w.uid in local_uids:
            continue
        taken = [local_addrs[na] for na in w.network_addresses() if na in local_addrs]
        if taken:
            conflicts.append(MergeConflict(ConflictKind.ADDRESS_TAKEN, w.uid, taken[0]))
            continue
        if node and w.node == node and w.uid not in waypoints:
            conflicts.append(MergeConflict(ConflictKind.NOT_ENROLLED, w.uid))
            continue
        kept.append(w)
    merged = Model.build((*kept, *merged_local), model.services, model.foreign_policies)
    return merged, tuple(conflicts)


def local_addresses(workloads: Iterable[Workload]) -> set[NetworkAddress]:
    return {na for w in workloads for na in w.network_addresses()}
