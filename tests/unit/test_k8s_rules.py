"""Istio's ambient enrollment rules as a table, each row citing its source.

Rows marked ``podutil_test`` are the cases of istio/istio
cni/pkg/util/podutil_test.go :: TestEnablementSelectorMatches (same names, same
answers); the rest cite the function of informers.go / podutil.go they follow.
"""

from __future__ import annotations

import pytest

from agent.k8s.rules import (
    DEFAULT_ENABLEMENT_SELECTORS,
    REDIRECTION_ANNOTATION,
    LabelSelector,
    PodFacts,
    RedirectionStatus,
    Requirement,
    SelectorOperator,
    Verdict,
    matches,
    namespace_is_ambient,
    redirection_patch,
    redirection_status,
    verdict,
)

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
NONE = {"istio.io/dataplane-mode": "none"}
SIDECAR = {"sidecar.istio.io/status": "test"}


def pod(labels=None, annotations=None, host_network=False, phase="Running",
        namespace="test", name="test") -> PodFacts:
    return PodFacts(namespace, name, labels or {}, annotations or {}, host_network, phase,
                    ("10.0.0.1",))


# (source, pod, namespace labels, Matches(), verdict)
TABLE = [
    ("podutil_test: ambient mode enabled for namespace", pod(), AMBIENT, True, Verdict.ENROLL),
    ("podutil_test: ambient mode enabled for pod", pod(AMBIENT), {}, True, Verdict.ENROLL),
    ("podutil_test: ambient mode enabled for both namespace and pod", pod(AMBIENT), AMBIENT,
     True, Verdict.ENROLL),
    ("podutil_test: ambient mode enabled for neither namespace nor pod", pod(), {}, False,
     Verdict.NOT_SELECTED),
    ("podutil_test: pod has sidecar and namespace has ambient enabled",
     pod(annotations=SIDECAR), AMBIENT, False, Verdict.SIDECAR),
    ("podutil_test: pod has label to disable ambient redirection", pod(NONE), AMBIENT, False,
     Verdict.OPTED_OUT),
    ("podutil_test: pod has sidecar, pod has ambient mode label",
     pod(AMBIENT, SIDECAR), {}, False, Verdict.SIDECAR),
    ("podutil_test: hostNetwork pod in ambient-enabled namespace", pod(host_network=True),
     AMBIENT, False, Verdict.HOST_NETWORK),
    ("podutil_test: hostNetwork pod with ambient mode label",
     pod(AMBIENT, host_network=True), {}, False, Verdict.HOST_NETWORK),
    # podHasSidecar: presence of the annotation is what counts, even an empty value.
    ("podutil.go podHasSidecar: empty sidecar status still a sidecar",
     pod(AMBIENT, {"sidecar.istio.io/status": ""}), AMBIENT, False, Verdict.SIDECAR),
    # Default selector 1 has no namespace selector: pod label wins over namespace none.
    ("values.yaml selector 1: pod ambient in a namespace labelled none",
     pod(AMBIENT), NONE, True, Verdict.ENROLL),
    ("values.yaml selector 2: pod none in a namespace not ambient", pod(NONE), {}, False,
     Verdict.NOT_SELECTED),
    # Selector 2 is NotIn [none]: any other pod value keeps the pod in.
    ("values.yaml selector 2 NotIn [none]: pod value 'sidecar' stays in",
     pod({"istio.io/dataplane-mode": "sidecar"}), AMBIENT, True, Verdict.ENROLL),
    ("values.yaml selector 2 NotIn [none]: empty pod value stays in",
     pod({"istio.io/dataplane-mode": ""}), AMBIENT, True, Verdict.ENROLL),
    # Label selectors are exact and case-sensitive.
    ("labels.Selector: namespace 'Ambient' is not ambient", pod(),
     {"istio.io/dataplane-mode": "Ambient"}, False, Verdict.NOT_SELECTED),
    ("labels.Selector: pod 'NONE' is not none", pod({"istio.io/dataplane-mode": "NONE"}),
     AMBIENT, True, Verdict.ENROLL),
    ("labels.Selector: namespace ' ambient' is not ambient", pod(),
     {"istio.io/dataplane-mode": " ambient"}, False, Verdict.NOT_SELECTED),
    # informers.go reconcilePod: terminal pods are removed, never added.
    ("pkg/kube CheckPodTerminal: Succeeded", pod(phase="Succeeded"), AMBIENT, True,
     Verdict.TERMINAL),
    ("pkg/kube CheckPodTerminal: Failed", pod(phase="Failed"), AMBIENT, True, Verdict.TERMINAL),
    ("pkg/kube CheckPodTerminal: Pending is not terminal", pod(phase="Pending"), AMBIENT, True,
     Verdict.ENROLL),
    # informers.go IsZtunnelPod: the node proxy's own pods.
    ("podutil.go IsZtunnelPod: our DaemonSet pod",
     pod({"app": "meshagent"}, namespace="istio-system"), AMBIENT, True, Verdict.NODE_PROXY),
    ("podutil.go IsZtunnelPod: app=meshagent elsewhere is an ordinary pod",
     pod({"app": "meshagent"}, namespace="apps"), AMBIENT, True, Verdict.ENROLL),
]


@pytest.mark.parametrize(("source", "facts", "ns_labels", "want_match", "want"), TABLE,
                         ids=[row[0] for row in TABLE])
def test_enrollment_table(source, facts, ns_labels, want_match, want):
    assert matches(facts, ns_labels) is want_match
    assert verdict(facts, ns_labels) is want
    assert verdict(facts, ns_labels).enroll is (want is Verdict.ENROLL)


def test_excluded_namespace_never_enrolls():
    # informers.go reconcilePod: shouldBeEnabled := matchesSelector && !namespaceExcluded
    assert verdict(pod(), AMBIENT, frozenset({"test"})) is Verdict.NAMESPACE_EXCLUDED
    assert verdict(pod(), AMBIENT, frozenset({"other"})) is Verdict.ENROLL


def test_namespace_is_ambient_matches_only_non_empty_namespace_selectors():
    # enablement_selector.go MatchesNamespace skips empty namespace selectors (selector 1)
    assert namespace_is_ambient(AMBIENT)
    assert not namespace_is_ambient({})
    assert not namespace_is_ambient(NONE)


def test_selector_operators_follow_apimachinery():
    labels = {"a": "1"}
    assert Requirement("a", SelectorOperator.IN, ("1", "2")).matches(labels)
    assert not Requirement("b", SelectorOperator.IN, ("1",)).matches(labels)
    assert Requirement("b", SelectorOperator.NOT_IN, ("1",)).matches(labels)
    assert not Requirement("a", SelectorOperator.NOT_IN, ("1",)).matches(labels)
    assert Requirement("a", SelectorOperator.EXISTS).matches(labels)
    assert Requirement("b", SelectorOperator.DOES_NOT_EXIST).matches(labels)
    assert LabelSelector().matches({}) and LabelSelector().empty
    assert len(DEFAULT_ENABLEMENT_SELECTORS) == 2


def test_redirection_annotation_values_and_patches():
    # constants.go AmbientRedirectionEnabled / Pending; podutil.go annotation patches
    assert redirection_status({REDIRECTION_ANNOTATION: "enabled"}) is RedirectionStatus.ENABLED
    assert redirection_status({REDIRECTION_ANNOTATION: "pending"}) is RedirectionStatus.PENDING
    assert redirection_status({REDIRECTION_ANNOTATION: "Enabled"}) is None
    assert redirection_status({}) is None
    assert redirection_patch(RedirectionStatus.ENABLED) == {
        "metadata": {"annotations": {"ambient.istio.io/redirection": "enabled"}}}
    assert redirection_patch(None) == {
        "metadata": {"annotations": {"ambient.istio.io/redirection": None}}}


# istio cni/pkg/nodeagent/net_test.go (overrideTests): "true" -> PodDNSEnabled, absent ->
# PodDNSUnset, "false" -> PodDNSDisabled, "tweedledum" -> PodDNSUnset; the other spellings
# are what Go's strconv.ParseBool (CheckBooleanAnnotation) accepts or rejects.
@pytest.mark.parametrize("annotations, want", [
    ({"ambient.istio.io/dns-capture": "true"}, True),
    ({}, None),
    ({"ambient.istio.io/dns-capture": "false"}, False),
    ({"ambient.istio.io/dns-capture": "tweedledum"}, None),
    ({"ambient.istio.io/dns-capture": "1"}, True),
    ({"ambient.istio.io/dns-capture": "F"}, False),
    ({"ambient.istio.io/dns-capture": "TRUE"}, True),
    ({"ambient.istio.io/dns-capture": "yes"}, None),
    ({"ambient.istio.io/dns-capture": " true"}, None),
    ({"ambient.istio.io/dns-capture": ""}, None),
    ({"ambient.istio.io/dns-capture": "tRUE"}, None),
])
def test_dns_capture_annotation_follows_istio(annotations, want):
    from agent.k8s.rules import dns_capture_choice

    assert dns_capture_choice(annotations) is want


@pytest.mark.parametrize("node, pod, want", [
    (False, None, False), (True, None, True), (False, True, True), (True, False, False),
    (True, True, True), (False, False, False)])
def test_a_pods_dns_choice_wins_over_the_node_default(node, pod, want):
    from agent.enrollment import captures_dns

    assert captures_dns(node, pod) is want
