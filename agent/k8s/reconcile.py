"""Which pods on this node to enroll and unenroll, and the status annotations (pure).

The inputs are the watched objects as last seen (pods on this node, namespaces), the
set the agent has actually enrolled (its registry: the truth about the kernel), and
whether each watch has completed its first list. The output is a :class:`Plan`:
actions in a safe order (unenrollments first, then enrollments), each with its
reason, and the pods the plan could not judge (with why) which are left alone.

Rules (each from istio/istio cni/pkg/nodeagent/informers.go :: ``reconcilePod``
unless noted; the verdict itself is :func:`agent.k8s.rules.verdict`):

- should be enrolled and is not: enroll, once the pod has an IP ("pod update event
  skipped: no IP assigned yet");
- enrolled and should not be (labels, sidecar, hostNetwork, terminal, excluded
  namespace): unenroll;
- enrolled but the pod is gone from the API (after a complete list) or was recreated
  with another uid: unenroll (``EventDelete``);
- a pod whose namespace is not known is skipped ("failed to find namespace ...,
  skipping this event");
- a pod the agent cannot read (:class:`~agent.k8s.objects.ObjectProblem`) keeps its
  last good version upstream of here; if it was never read, it is not enrolled;
- until pods *and* namespaces have been listed once, nothing is planned at all:
  an API server that was never reached (or has gone away) changes nothing;
- the annotation ``ambient.istio.io/redirection`` follows the agent's enrolled set:
  ``enabled`` for an enrolled pod, removed for any other pod that carries it
  (``AnnotateEnrolledPod`` / ``AnnotateUnenrollPod``).

A namespace label change re-judges every pod of that namespace on this node: pass
``namespaces_changed`` to limit the work to those (``enqueueNamespace``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import Enum

from agent.k8s.objects import Namespace, Pod
from agent.k8s.rules import (
    DEFAULT_ENABLEMENT_SELECTORS,
    REDIRECTION_ANNOTATION,
    EnablementSelector,
    RedirectionStatus,
    Verdict,
    verdict,
)


@dataclass(frozen=True)
class Enrolled:
    """What the agent has enrolled, by ``namespace/name`` (uid if known)."""

    key: str
    uid: str = ""


@dataclass(frozen=True)
class Enroll:
    pod: Pod


class UnenrollReason(Enum):
    VERDICT = "its labels or spec no longer select it"
    DELETED = "the pod is gone from the API server"
    RECREATED = "the pod was recreated (another uid)"
    OTHER_NODE = "the pod is not on this node"


@dataclass(frozen=True)
class Unenroll:
    key: str
    reason: UnenrollReason
    verdict: Verdict | None = None


@dataclass(frozen=True)
class Annotate:
    namespace: str
    name: str
    status: RedirectionStatus | None


class Skip(Enum):
    NO_NAMESPACE = "its namespace is not known yet"
    NO_IP = "it has no IP yet (enrolled on its next update or by the CNI plugin)"


@dataclass(frozen=True)
class Plan:
    unenroll: tuple[Unenroll, ...] = ()
    enroll: tuple[Enroll, ...] = ()
    skipped: tuple[tuple[str, Skip], ...] = ()
    verdicts: Mapping[str, Verdict] = field(default_factory=dict)
    # False when a watch has not listed yet: the plan is empty on purpose.
    complete: bool = True

    @property
    def empty(self) -> bool:
        return not self.unenroll and not self.enroll


def plan(pods: Mapping[str, Pod], namespaces: Mapping[str, Namespace],
         enrolled: Mapping[str, Enrolled], node: str, synced: bool,
         exclude_namespaces: frozenset[str] = frozenset(),
         selectors: tuple[EnablementSelector, ...] = DEFAULT_ENABLEMENT_SELECTORS,
         namespaces_changed: Collection[str] | None = None,
         pods_changed: Collection[str] | None = None) -> Plan:
    """The actions that bring ``enrolled`` in line with the API's pods (see module doc).

    With ``namespaces_changed`` / ``pods_changed`` only those pods are judged (and
    enrolled pods missing from ``pods`` are only unenrolled in a full plan).
    """
    if not synced:
        return Plan(complete=False)
    incremental = namespaces_changed is not None or pods_changed is not None
    wanted_ns = set(namespaces_changed or ())
    wanted_pods = set(pods_changed or ())
    unenroll: list[Unenroll] = []
    enroll: list[Enroll] = []
    skipped: list[tuple[str, Skip]] = []
    verdicts: dict[str, Verdict] = {}
    for key, pod in pods.items():
        if incremental and key not in wanted_pods and pod.meta.namespace not in wanted_ns:
            continue
        current = enrolled.get(key)
        if pod.node != node:
            if current is not None:
                unenroll.append(Unenroll(key, UnenrollReason.OTHER_NODE))
            continue
        ns = namespaces.get(pod.meta.namespace)
        if ns is None:
            skipped.append((key, Skip.NO_NAMESPACE))
            continue
        v = verdict(pod.facts(), ns.labels, exclude_namespaces, selectors)
        verdicts[key] = v
        recreated = (current is not None and current.uid and pod.meta.uid
                     and current.uid != pod.meta.uid)
        if recreated:
            unenroll.append(Unenroll(key, UnenrollReason.RECREATED))
            current = None
        if current is not None and not v.enroll:
            unenroll.append(Unenroll(key, UnenrollReason.VERDICT, v))
        elif current is None and v.enroll:
            if pod.ips:
                enroll.append(Enroll(pod))
            else:
                skipped.append((key, Skip.NO_IP))
    if not incremental:
        for key in sorted(set(enrolled) - set(pods)):
            unenroll.append(Unenroll(key, UnenrollReason.DELETED))
    return Plan(tuple(unenroll), tuple(enroll), tuple(skipped), verdicts)


def annotation_patches(pods: Mapping[str, Pod], enrolled: Collection[str], node: str
                ) -> list[Annotate]:
    """The status-annotation patches that make the API agree with ``enrolled``."""
    out = []
    for key, pod in pods.items():
        if pod.node != node:
            continue
        raw = pod.meta.annotations.get(REDIRECTION_ANNOTATION)
        if key in enrolled:
            if raw != RedirectionStatus.ENABLED.value:
                out.append(Annotate(pod.meta.namespace, pod.meta.name,
                                    RedirectionStatus.ENABLED))
        elif raw is not None:
            out.append(Annotate(pod.meta.namespace, pod.meta.name, None))
    return out
