"""Istio ambient's enrollment rules, verbatim (pure).

Every rule here follows istio/istio and cites where:

- ``cni/pkg/util/enablement_selector.go`` :: ``CompiledEnablementSelectors.Matches``:
  a ``hostNetwork`` pod never matches; a pod with a sidecar (the
  ``sidecar.istio.io/status`` annotation present, any value: ``podHasSidecar`` in
  ``cni/pkg/util/podutil.go``) never matches ("the sidecar wins"); otherwise the pod
  matches when any enablement selector's pod selector matches the pod's labels *and*
  its namespace selector matches the namespace's labels.
- The default selectors are Istio's Helm default (``manifests/charts/istio-cni/
  values.yaml`` ``ambient.enablementSelectors``, also ``compileDefaultSelectors`` in
  ``cni/pkg/util/podutil_test.go``):

  1. pod ``istio.io/dataplane-mode=ambient`` (any namespace);
  2. namespace ``istio.io/dataplane-mode=ambient`` and pod ``istio.io/dataplane-mode
     NotIn [none]`` (so a pod label ``none`` opts out, and *any other* pod value --
     ``Ambient``, ``sidecar``, ``""`` -- does not).

  Label values are compared exactly (Kubernetes label selectors are case-sensitive).
- ``MatchesNamespace``: a namespace "is ambient" when a *non-empty* namespace
  selector matches it (used to log and to decide which namespace changes matter).
- ``cni/pkg/nodeagent/informers.go`` :: ``reconcilePod``: ``shouldBeEnabled =
  matches && !namespaceExcluded``; a terminated pod (``pkg/kube/util.go`` ::
  ``CheckPodTerminal``: phase ``Succeeded`` or ``Failed``) is removed and never
  added; a pod without an IP yet is skipped (retried on its next update); the
  node proxy's own pods (``IsZtunnelPod``: ``app=ztunnel`` in the system namespace;
  for us ``app=meshagent``) are never enrolled.
- The status annotation ``ambient.istio.io/redirection`` (``istio.io/api``
  ``annotation.AmbientRedirection``) is ``enabled`` once redirection is set up
  (``constants.AmbientRedirectionEnabled``), ``pending`` while partially set up
  (``AmbientRedirectionPending``) and removed (JSON merge patch ``null``) on
  unenrollment: ``AnnotateEnrolledPod`` / ``AnnotatePartiallyEnrolledPod`` /
  ``AnnotateUnenrollPod`` in ``cni/pkg/util/podutil.go`` (patched through the
  ``pods/status`` subresource, which needs less privilege).

This module never imports a Kubernetes client: it judges plain facts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
DATAPLANE_MODE_AMBIENT = "ambient"
DATAPLANE_MODE_NONE = "none"
SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"
REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
DEFAULT_SYSTEM_NAMESPACE = "istio-system"
NODE_PROXY_APP = "meshagent"


class RedirectionStatus(Enum):
    """Values of ``ambient.istio.io/redirection`` (istio pkg/config/constants)."""

    ENABLED = "enabled"
    PENDING = "pending"


class SelectorOperator(Enum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: SelectorOperator
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """k8s.io/apimachinery labels.Requirement.Matches: NotIn and DoesNotExist match
        a missing key; In and Exists need it."""
        present = self.key in labels
        if self.operator is SelectorOperator.IN:
            return present and labels[self.key] in self.values
        if self.operator is SelectorOperator.NOT_IN:
            return not present or labels[self.key] not in self.values
        if self.operator is SelectorOperator.EXISTS:
            return present
        return not present


@dataclass(frozen=True)
class LabelSelector:
    """A metav1.LabelSelector; the empty selector matches everything (as Istio compiles
    it: ``labels.Everything()``)."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def matches(self, labels: Mapping[str, str]) -> bool:
        return (all(labels.get(k) == v and k in labels for k, v in self.match_labels)
                and all(r.matches(labels) for r in self.match_expressions))


@dataclass(frozen=True)
class EnablementSelector:
    pod: LabelSelector = LabelSelector()
    namespace: LabelSelector = LabelSelector()


DEFAULT_ENABLEMENT_SELECTORS: tuple[EnablementSelector, ...] = (
    EnablementSelector(pod=LabelSelector(((DATAPLANE_MODE_LABEL, DATAPLANE_MODE_AMBIENT),))),
    EnablementSelector(
        pod=LabelSelector(match_expressions=(
            Requirement(DATAPLANE_MODE_LABEL, SelectorOperator.NOT_IN, (DATAPLANE_MODE_NONE,)),)),
        namespace=LabelSelector(((DATAPLANE_MODE_LABEL, DATAPLANE_MODE_AMBIENT),))),
)


@dataclass(frozen=True)
class PodFacts:
    """What the rules need to know about a pod (parsed by :mod:`agent.k8s.objects`)."""

    namespace: str
    name: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    host_network: bool = False
    phase: str = ""
    ips: tuple[str, ...] = ()


class Verdict(Enum):
    """Why a pod should or should not be in the mesh (one outcome, never a string)."""

    ENROLL = "enroll"
    NOT_SELECTED = "not selected (neither the pod nor its namespace is ambient)"
    OPTED_OUT = "the pod opted out (istio.io/dataplane-mode=none)"
    SIDECAR = "the pod has a sidecar (sidecar.istio.io/status): the sidecar wins"
    HOST_NETWORK = "hostNetwork pods are never captured"
    TERMINAL = "the pod has terminated (phase Succeeded or Failed)"
    NAMESPACE_EXCLUDED = "the namespace is in the agent's exclude list"
    NODE_PROXY = "the node proxy's own pod"

    @property
    def enroll(self) -> bool:
        return self is Verdict.ENROLL


def matches(pod: PodFacts, namespace_labels: Mapping[str, str],
            selectors: Sequence[EnablementSelector] = DEFAULT_ENABLEMENT_SELECTORS) -> bool:
    """``CompiledEnablementSelectors.Matches``, exactly."""
    if pod.host_network:
        return False
    if SIDECAR_STATUS_ANNOTATION in pod.annotations:
        return False
    return any(s.pod.matches(pod.labels) and s.namespace.matches(namespace_labels)
               for s in selectors)


def namespace_is_ambient(namespace_labels: Mapping[str, str],
                         selectors: Sequence[EnablementSelector] = DEFAULT_ENABLEMENT_SELECTORS
                         ) -> bool:
    """``CompiledEnablementSelectors.MatchesNamespace``: empty namespace selectors skipped."""
    return any(not s.namespace.empty and s.namespace.matches(namespace_labels)
               for s in selectors)


def is_terminal(phase: str) -> bool:
    """``pkg/kube/util.go`` :: ``CheckPodTerminal``."""
    return phase in ("Succeeded", "Failed")


def is_node_proxy_pod(pod: PodFacts, system_namespace: str = DEFAULT_SYSTEM_NAMESPACE,
                      app: str = NODE_PROXY_APP) -> bool:
    """``IsZtunnelPod``: our own DaemonSet's pods are never enrolled."""
    return pod.namespace == system_namespace and pod.labels.get("app") == app


def verdict(pod: PodFacts, namespace_labels: Mapping[str, str],
            exclude_namespaces: frozenset[str] = frozenset(),
            selectors: Sequence[EnablementSelector] = DEFAULT_ENABLEMENT_SELECTORS,
            system_namespace: str = DEFAULT_SYSTEM_NAMESPACE) -> Verdict:
    """Whether ``pod`` should be enrolled, and if not the first reason why.

    ``reconcilePod``'s ``shouldBeEnabled && !isTerminated``, with the reasons
    ``Matches`` folds together told apart (for logs and ``meshagent status``).
    """
    if is_node_proxy_pod(pod, system_namespace):
        return Verdict.NODE_PROXY
    if pod.host_network:
        return Verdict.HOST_NETWORK
    if SIDECAR_STATUS_ANNOTATION in pod.annotations:
        return Verdict.SIDECAR
    if not matches(pod, namespace_labels, selectors):
        if (pod.labels.get(DATAPLANE_MODE_LABEL) == DATAPLANE_MODE_NONE
                and namespace_is_ambient(namespace_labels, selectors)):
            return Verdict.OPTED_OUT
        return Verdict.NOT_SELECTED
    if pod.namespace in exclude_namespaces:
        return Verdict.NAMESPACE_EXCLUDED
    if is_terminal(pod.phase):
        return Verdict.TERMINAL
    return Verdict.ENROLL


def redirection_status(annotations: Mapping[str, str]) -> RedirectionStatus | None:
    """``PodFullyEnrolled`` / ``PodPartiallyEnrolled``: any other value means neither."""
    value = annotations.get(REDIRECTION_ANNOTATION)
    for status in RedirectionStatus:
        if value == status.value:
            return status
    return None


def redirection_patch(status: RedirectionStatus | None) -> dict[str, object]:
    """The JSON merge patch Istio sends (``annotationEnabledPatch`` /
    ``annotationPendingPatch`` / ``annotationRemovePatch``)."""
    value = None if status is None else status.value
    return {"metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}}


DNS_CAPTURE_ANNOTATION = "ambient.istio.io/dns-capture"
# Go's strconv.ParseBool, which istio's CheckBooleanAnnotation uses.
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def dns_capture_choice(annotations: Mapping[str, str]) -> bool | None:
    """The pod's own DNS-capture choice from ``ambient.istio.io/dns-capture``: True
    (captured even where the node does not capture by default), False (never), or None
    (absent or not a boolean: the node's default). istio cni/pkg/nodeagent/net.go
    (``PodDNSEnabled`` / ``PodDNSDisabled`` / ``PodDNSUnset``) and
    cni/pkg/util/podutil.go ``CheckBooleanAnnotation`` (a value ParseBool rejects is
    warned about and ignored)."""
    value = annotations.get(DNS_CAPTURE_ANNOTATION)
    if value in _GO_TRUE:
        return True
    if value in _GO_FALSE:
        return False
    return None
