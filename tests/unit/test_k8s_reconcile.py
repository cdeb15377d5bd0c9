"""The enrollment reconciler's pure core: plans from watched objects (informers.go)."""

from __future__ import annotations

from agent.k8s.objects import Namespace, Pod, read_pod
from agent.k8s.reconcile import (
    Enrolled,
    Skip,
    UnenrollReason,
    annotation_patches,
    plan,
)
from agent.k8s.rules import RedirectionStatus, Verdict

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def mkpod(name, ns="apps", node="n1", labels=None, ip="10.0.0.1", uid="", annotations=None,
          phase="Running", host_network=False) -> Pod:
    obj = {"metadata": {"name": name, "namespace": ns, "uid": uid or f"uid-{name}",
                        "labels": labels or {}, "annotations": annotations or {}},
           "spec": {"nodeName": node, "hostNetwork": host_network},
           "status": {"phase": phase, **({"podIP": ip} if ip else {})}}
    pod = read_pod(obj)
    assert isinstance(pod, Pod)
    return pod


def pods(*ps: Pod) -> dict[str, Pod]:
    return {p.key: p for p in ps}


def nss(**labels) -> dict[str, Namespace]:
    return {name: Namespace(name, lab) for name, lab in labels.items()}


def test_nothing_is_planned_before_the_first_list():
    p = plan(pods(mkpod("a")), nss(apps=AMBIENT), {"apps/x": Enrolled("apps/x")}, "n1",
             synced=False)
    assert p.empty and not p.complete


def test_namespace_label_enrolls_every_pod_of_it_on_this_node():
    ps = pods(*(mkpod(f"p{i}") for i in range(5)), mkpod("far", node="n2"),
              mkpod("other", ns="web"))
    p = plan(ps, nss(apps=AMBIENT, web={}), {}, "n1", synced=True)
    assert sorted(e.pod.key for e in p.enroll) == [f"apps/p{i}" for i in range(5)]
    # incremental: only the changed namespace is judged
    p2 = plan(ps, nss(apps=AMBIENT, web={}), {}, "n1", synced=True, namespaces_changed={"apps"})
    assert len(p2.enroll) == 5


def test_label_removed_unenrolls_and_none_opts_out():
    ps = pods(mkpod("a"), mkpod("b", labels={"istio.io/dataplane-mode": "none"}))
    enrolled = {"apps/a": Enrolled("apps/a", "uid-a"), "apps/b": Enrolled("apps/b", "uid-b")}
    p = plan(ps, nss(apps={}), enrolled, "n1", synced=True)
    assert {u.key for u in p.unenroll} == {"apps/a", "apps/b"}
    p = plan(ps, nss(apps=AMBIENT), enrolled, "n1", synced=True)
    assert [(u.key, u.verdict) for u in p.unenroll] == [("apps/b", Verdict.OPTED_OUT)]


def test_deleted_recreated_other_node_and_no_ip():
    enrolled = {"apps/gone": Enrolled("apps/gone"), "apps/re": Enrolled("apps/re", "old"),
                "apps/moved": Enrolled("apps/moved")}
    ps = pods(mkpod("re", uid="new"), mkpod("moved", node="n2"), mkpod("noip", ip=None))
    p = plan(ps, nss(apps=AMBIENT), enrolled, "n1", synced=True)
    reasons = {u.key: u.reason for u in p.unenroll}
    assert reasons == {"apps/gone": UnenrollReason.DELETED,
                       "apps/re": UnenrollReason.RECREATED,
                       "apps/moved": UnenrollReason.OTHER_NODE}
    assert [e.pod.key for e in p.enroll] == ["apps/re"]
    assert ("apps/noip", Skip.NO_IP) in p.skipped


def test_unknown_namespace_leaves_the_pod_alone():
    p = plan(pods(mkpod("a")), {}, {"apps/a": Enrolled("apps/a")}, "n1", synced=True)
    assert p.empty and p.skipped == (("apps/a", Skip.NO_NAMESPACE),)


def test_terminal_and_sidecar_pods_are_unenrolled():
    ps = pods(mkpod("job", phase="Succeeded"),
              mkpod("sc", annotations={"sidecar.istio.io/status": "{}"}))
    enrolled = {k: Enrolled(k) for k in ps}
    p = plan(ps, nss(apps=AMBIENT), enrolled, "n1", synced=True)
    assert {u.key: u.verdict for u in p.unenroll} == {"apps/job": Verdict.TERMINAL,
                                                       "apps/sc": Verdict.SIDECAR}


def test_annotations_follow_the_enrolled_set():
    ps = pods(mkpod("a"), mkpod("b", annotations={"ambient.istio.io/redirection": "enabled"}),
              mkpod("c", annotations={"ambient.istio.io/redirection": "enabled"}),
              mkpod("d", annotations={"ambient.istio.io/redirection": "weird"}),
              mkpod("far", node="n2", annotations={"ambient.istio.io/redirection": "enabled"}))
    got = {(a.name, a.status) for a in annotation_patches(ps, {"apps/a", "apps/c"}, "n1")}
    assert got == {("a", RedirectionStatus.ENABLED), ("b", None), ("d", None)}
