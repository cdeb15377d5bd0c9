"""The whole loop against the lab API server: kubectl labels a namespace, the
controller (real watches, real client) enrolls its pods on this node through a
stand-in backend and annotates them in the API; opt-out, unlabel, deletion; the
cluster model is published from the API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping

from kube_helpers import namespace, pod, until
from kubernetes import config

from agent.k8s.controller import ApiAnnotator, NodeController
from agent.k8s.objects import Pod
from agent.k8s.reconcile import Enrolled
from agent.k8s.watch import ClusterWatch, targets


class FakeBackend:
    """The daemon's enrollment, in memory; can be told to fail once per pod."""

    def __init__(self) -> None:
        self.pods: dict[str, Enrolled] = {}
        self.fail_once: set[str] = set()
        self.calls: list[tuple[str, str]] = []

    async def enrolled(self) -> Mapping[str, Enrolled]:
        return dict(self.pods)

    async def enroll(self, p: Pod) -> None:
        self.calls.append(("enroll", p.key))
        if p.key in self.fail_once:
            self.fail_once.discard(p.key)
            raise RuntimeError("netns not ready (injected)")
        self.pods[p.key] = Enrolled(p.key, p.meta.uid)

    async def unenroll(self, key: str) -> None:
        self.calls.append(("unenroll", key))
        self.pods.pop(key, None)


def annotation(kubectl, name: str, ns: str = "apps") -> str | None:
    got = json.loads(kubectl("get", "pod", name, "-n", ns, "-o", "json").stdout)
    return (got["metadata"].get("annotations") or {}).get("ambient.istio.io/redirection")


def test_label_namespace_enrolls_then_opt_out_and_unlabel(kubelab, kubeconfig, kubectl):
    kubelab.apply(namespace("apps"))
    for i in range(5):
        kubelab.apply(pod(f"web-{i}", namespace="apps", ip=f"10.1.0.{i + 1}"))
    kubelab.apply(pod("far", namespace="apps", node="n2", ip="10.2.0.1"))
    kubelab.apply(pod("sidecar", namespace="apps", ip="10.1.0.50"))
    kubectl("annotate", "pod", "sidecar", "-n", "apps", "sidecar.istio.io/status={}")
    models = []

    async def scenario() -> None:
        api = config.new_client_from_config(str(kubeconfig))
        backend = FakeBackend()
        backend.fail_once.add("apps/web-3")
        controller = NodeController("n1", backend, ApiAnnotator(api),
                                    on_model=lambda m, p: models.append((m, p)))
        watch = ClusterWatch(api, targets("n1"), watch_timeout=5)
        watch.start(asyncio.get_running_loop())
        stop = asyncio.Event()
        task = asyncio.create_task(controller.run(watch, full_every=0.5, model_every=0.2,
                                                  stop=stop))
        try:
            await until(lambda: controller.cache.is_synced(*[t.kind for t in watch.targets]),
                        "every watch listed")
            assert backend.pods == {}
            await asyncio.to_thread(kubectl, "label", "namespace", "apps",
                                    "istio.io/dataplane-mode=ambient")
            want = {f"apps/web-{i}" for i in range(5)}
            # web-3 fails once and is retried by the next pass
            await until(lambda: set(backend.pods) == want, "the namespace's pods enrolled")
            await until(lambda: all(annotation(kubectl, f"web-{i}") == "enabled"
                                    for i in range(5)), "the status annotations")
            assert annotation(kubectl, "far") is None and annotation(kubectl, "sidecar") is None
            # opt one pod out
            await asyncio.to_thread(kubectl, "label", "pod", "web-0", "-n", "apps",
                                    "istio.io/dataplane-mode=none")
            await until(lambda: "apps/web-0" not in backend.pods, "web-0 opted out")
            await until(lambda: annotation(kubectl, "web-0") is None, "web-0's annotation gone")
            # delete one
            await asyncio.to_thread(kubectl, "delete", "pod", "web-1", "-n", "apps")
            await until(lambda: "apps/web-1" not in backend.pods, "deleted pod unenrolled")
            # the model comes from the whole cluster (far is on another node)
            await until(lambda: bool(models) and models[-1][0].model.workload_by_uid(
                "Kubernetes//v1/Pod/apps/far") is not None, "the cluster model")
            # unlabel the namespace: every pod out
            await asyncio.to_thread(kubectl, "label", "namespace", "apps",
                                    "istio.io/dataplane-mode-")
            await until(lambda: backend.pods == {}, "all unenrolled")
            assert ("enroll", "apps/sidecar") not in backend.calls
            assert ("enroll", "apps/far") not in backend.calls
        finally:
            stop.set()
            await task
            await asyncio.to_thread(watch.stop)
            api.close()

    asyncio.run(scenario())


def test_server_gone_changes_nothing(kubelab, kubeconfig):
    kubelab.apply(namespace("apps", {"istio.io/dataplane-mode": "ambient"}))
    kubelab.apply(pod("a", namespace="apps", ip="10.1.0.1"))

    async def scenario() -> None:
        api = config.new_client_from_config(str(kubeconfig))
        backend = FakeBackend()
        controller = NodeController("n1", backend, ApiAnnotator(api))
        watch = ClusterWatch(api, targets("n1", model=False), watch_timeout=1)
        watch.start(asyncio.get_running_loop())
        stop = asyncio.Event()
        task = asyncio.create_task(controller.run(watch, full_every=0.2, stop=stop))
        try:
            await until(lambda: "apps/a" in backend.pods, "enrolled")
            kubelab.faults.unavailable = True
            kubelab.faults.drop_watch_after = 0
            await until(lambda: len(controller.cache.failures) == 2, "both watches failing")
            await asyncio.sleep(0.5)  # several full passes while the server is gone
            assert "apps/a" in backend.pods
            assert ("unenroll", "apps/a") not in backend.calls
        finally:
            stop.set()
            await task
            await asyncio.to_thread(watch.stop)
            api.close()

    asyncio.run(scenario())


class CountingAnnotator(ApiAnnotator):
    def __init__(self, api) -> None:
        super().__init__(api)
        self.patches: list[str] = []

    async def annotate(self, action) -> None:
        self.patches.append(f"{action.namespace}/{action.name}")
        await super().annotate(action)


def test_each_pod_is_annotated_once_not_once_per_event(kubelab, kubeconfig, kubectl):
    """Every pod's annotation event runs a pass; a patch already sent for the version
    the cache holds is not sent again (it once was: O(pods²) patches, seconds per label)."""
    kubelab.apply(namespace("many"))
    count = 30
    for i in range(count):
        kubelab.apply(pod(f"p-{i}", namespace="many", ip=f"10.3.0.{i + 1}"))

    async def scenario() -> list[str]:
        api = config.new_client_from_config(str(kubeconfig))
        backend = FakeBackend()
        annotator = CountingAnnotator(api)
        controller = NodeController("n1", backend, annotator)
        watch = ClusterWatch(api, targets("n1", model=False), watch_timeout=5)
        watch.start(asyncio.get_running_loop())
        stop = asyncio.Event()
        task = asyncio.create_task(controller.run(watch, full_every=60, stop=stop))
        try:
            await until(lambda: controller.cache.is_synced(*[t.kind for t in watch.targets]),
                        "synced")
            await asyncio.to_thread(kubectl, "label", "namespace", "many",
                                    "istio.io/dataplane-mode=ambient")
            await until(lambda: all(
                p.meta.annotations.get("ambient.istio.io/redirection") == "enabled"
                for p in controller.cache.node_pods.values()), "all annotated")
            await asyncio.sleep(0.5)  # the last events' passes
            return list(annotator.patches)
        finally:
            stop.set()
            await task
            await asyncio.to_thread(watch.stop)
            api.close()

    patches = asyncio.run(scenario())
    assert sorted(patches) == sorted(f"many/p-{i}" for i in range(count))
