"""The thin asyncio shell: watch events -> cache -> enrollment plan -> actions.

:class:`NodeController` consumes a :class:`~agent.k8s.watch.ClusterWatch`'s queue,
keeps the :class:`~agent.k8s.cache.ClusterCache`, and after each change runs the
pure :func:`agent.k8s.reconcile.plan` for the pods it touched (a namespace label
change: every pod of that namespace on this node), then a full plan periodically.
It enrolls and unenrolls through an :class:`EnrollmentBackend` (the daemon's
enrollment transaction: :class:`agent.k8s.nodeagent.DaemonBackend`), then
patches ``ambient.istio.io/redirection`` through an :class:`Annotator`. The cluster
model and policy set are rebuilt (debounced) when a model kind changes and handed to
``on_model``, with every Service's and Workload's waypoint set by
:func:`agent.waypoint.config.assign_waypoints` over the API's Namespaces, Services,
Pods, Gateways and GatewayClasses (the lab's feed calls the same function). Where the
Gateway API CRDs are not installed (404) the model is published without waypoint
bindings (the watch says what to do and retries); until the Gateways are listed or
known absent it is not published at all (a model without the bindings would send
traffic around its waypoint's L7 policy).

Side effects: only through the backend, the annotator and ``on_model``. A failed
action is logged and retried on the next pass (the plan is recomputed from the
cache and the backend's enrolled set, so nothing is half-applied or forgotten).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kubernetes import client

from agent.k8s.cache import ClusterCache, Delta
from agent.k8s.convert import Converted, convert, convert_policies
from agent.k8s.objects import Pod
from agent.k8s.reconcile import Annotate, Enrolled, Plan, annotation_patches, plan
from agent.k8s.rules import redirection_patch
from agent.k8s.watch import ClusterWatch, Kind, WatchEvent
from agent.policy.engine import PolicySet
from agent.waypoint.config import assign_waypoints

log = logging.getLogger("meshagent.k8s")

MODEL_KINDS = frozenset({Kind.PODS, Kind.SERVICES, Kind.ENDPOINT_SLICES,
                         Kind.AUTHORIZATION_POLICIES})
# Optional (a CRD): the model waits for them to be listed or known absent (404).
GATEWAY_KINDS = frozenset({Kind.GATEWAYS, Kind.GATEWAY_CLASSES})
# What waypoint binding reads, as the document kind assign_waypoints expects
# (list responses carry no kind on their items).
BINDING_KINDS = {Kind.NAMESPACES: "Namespace", Kind.SERVICES: "Service", Kind.PODS: "Pod",
                 Kind.GATEWAYS: "Gateway", Kind.GATEWAY_CLASSES: "GatewayClass"}


class EnrollmentBackend(Protocol):
    async def enrolled(self) -> Mapping[str, Enrolled]: ...

    async def enroll(self, pod: Pod) -> None: ...

    async def unenroll(self, key: str) -> None: ...


class Annotator(Protocol):
    async def annotate(self, action: Annotate) -> None: ...


class ApiAnnotator:
    """Patches the redirection annotation through ``pods/status`` with a JSON merge
    patch, as Istio does (``AnnotateEnrolledPod``); a pod already gone is fine."""

    def __init__(self, api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api)

    async def annotate(self, action: Annotate) -> None:
        def call() -> None:
            try:
                self.core.patch_namespaced_pod_status(
                    action.name, action.namespace, redirection_patch(action.status),
                    _content_type="application/merge-patch+json", _request_timeout=(5, 15))
            except client.exceptions.ApiException as e:
                if e.status != 404:
                    raise
        await asyncio.get_running_loop().run_in_executor(None, call)


@dataclass
class PassResult:
    plan: Plan
    failures: list[str]


class NodeController:
    def __init__(self, node: str, backend: EnrollmentBackend, annotator: Annotator | None,
                 cache: ClusterCache | None = None,
                 exclude_namespaces: frozenset[str] = frozenset(),
                 on_model: Callable[[Converted, PolicySet], Awaitable[None] | None] | None = None,
                 ) -> None:
        self.node, self.backend, self.annotator = node, backend, annotator
        self.cache = cache or ClusterCache()
        self.exclude = exclude_namespaces
        self.on_model = on_model
        self.model_dirty = False
        self.last: PassResult | None = None
        # pod key -> (status patched, the pod's resourceVersion it was patched from):
        # until the watch brings a newer version, that patch is on its way and is not
        # sent again (every pod's event would otherwise re-send every pending patch).
        self.annotating: dict[str, tuple[Any, str]] = {}
        self.publishing: asyncio.Task[None] | None = None
        self.publish_seconds = 0.0  # how long the last model took to build and hand over

    async def handle(self, event: WatchEvent) -> PassResult | None:
        delta = self.cache.apply(event)
        for problem in delta.problems:
            log.warning("%s", problem)
        if delta.kind in (MODEL_KINDS | GATEWAY_KINDS) and not delta.empty:
            self.model_dirty = True
        if delta.kind is Kind.NAMESPACES and delta.namespaces:
            self.model_dirty = True  # istio.io/use-waypoint on a namespace
        if delta.kind in GATEWAY_KINDS and self.gateway_api_absent(delta.kind):
            self.model_dirty = True  # publish without waypoint bindings
        if delta.kind not in (Kind.NODE_PODS, Kind.NAMESPACES) or delta.empty:
            return None
        return await self.reconcile(delta)

    async def reconcile(self, delta: Delta | None = None) -> PassResult:
        """One pass: plan (for ``delta``'s pods, or all), act, annotate."""
        enrolled = await self.backend.enrolled()
        synced = self.cache.is_synced(Kind.NODE_PODS, Kind.NAMESPACES)
        if delta is None or delta.relisted:
            p = plan(self.cache.node_pods, self.cache.namespaces, enrolled, self.node, synced,
                     self.exclude)
        else:
            pods_changed = delta.keys if delta.kind is Kind.NODE_PODS else set()
            p = plan(self.cache.node_pods, self.cache.namespaces, enrolled, self.node, synced,
                     self.exclude, namespaces_changed=delta.namespaces,
                     pods_changed=pods_changed)
            if delta.kind is Kind.NODE_PODS:
                # a pod deleted from the API: unenroll it (EventDelete)
                gone = [k for k in pods_changed if k in enrolled
                        and k not in self.cache.node_pods]
                if gone and synced:
                    p = plan(self.cache.node_pods, self.cache.namespaces, enrolled, self.node,
                             synced, self.exclude)
        failures: list[str] = []
        for action in p.unenroll:
            try:
                await self.backend.unenroll(action.key)
                log.info("unenrolled %s: %s", action.key,
                         action.verdict.value if action.verdict else action.reason.value)
            except Exception as e:
                failures.append(f"unenroll {action.key}: {e}")
        for wanted in p.enroll:
            try:
                await self.backend.enroll(wanted.pod)
                log.info("enrolled %s", wanted.pod.key)
            except Exception as e:
                failures.append(f"enroll {wanted.pod.key}: {e}")
        for key, why in p.skipped:
            log.debug("left %s alone: %s", key, why.value)
        if self.annotator is not None and synced:
            now = await self.backend.enrolled()
            pods = self.cache.node_pods
            self.annotating = {k: v for k, v in self.annotating.items() if k in pods}
            for a in annotation_patches(pods, set(now), self.node):
                key = f"{a.namespace}/{a.name}"
                sent = (a.status, pods[key].meta.resource_version)
                if self.annotating.get(key) == sent:
                    continue
                try:
                    await self.annotator.annotate(a)
                    self.annotating[key] = sent
                except Exception as e:
                    self.annotating.pop(key, None)
                    failures.append(f"annotate {a.namespace}/{a.name}: {e}")
        for failure in failures:
            log.warning("%s; retried on the next pass", failure)
        self.last = PassResult(p, failures)
        return self.last

    def gateway_api_absent(self, kind: Kind) -> bool:
        """Never listed, and the server said 404: the CRD is not installed."""
        failure = self.cache.failures.get(kind)
        return kind not in self.cache.synced and failure is not None and failure.code == 404

    def model_ready(self) -> bool:
        """Every model kind listed, and each Gateway API kind listed or absent."""
        return self.cache.is_synced(*MODEL_KINDS) and all(
            self.cache.is_synced(k) or self.gateway_api_absent(k) for k in GATEWAY_KINDS)

    def build_model(self) -> tuple[Converted, PolicySet]:
        return self._build(*self._snapshot())

    def _snapshot(self) -> tuple[list[Any], list[Any], list[Any], list[Any],
                                 list[dict[str, Any]] | None]:
        """The model kinds' objects as lists (taken on the loop: the cache is not
        changed while they are copied; the objects themselves are never mutated), and
        the binding documents (None: no Gateway API, no waypoint bindings)."""
        raw = self.cache.raw
        docs = None
        if self.cache.is_synced(Kind.GATEWAYS):
            docs = [{**obj, "kind": kind} for k, kind in BINDING_KINDS.items()
                    for obj in raw[k].values()]
        return (list(raw[Kind.PODS].values()), list(raw[Kind.SERVICES].values()),
                list(raw[Kind.ENDPOINT_SLICES].values()),
                list(raw[Kind.AUTHORIZATION_POLICIES].values()), docs)

    @staticmethod
    def _build(pods: list[Any], services: list[Any], slices: list[Any],
               authz: list[Any], binding_docs: list[dict[str, Any]] | None
               ) -> tuple[Converted, PolicySet]:
        converted = convert(pods, services, slices)
        if binding_docs is not None:
            model, issues = assign_waypoints(converted.model, binding_docs)
            converted = Converted(model, (*converted.problems,
                                          *(f"waypoint binding: {i}" for i in issues)))
        policies, results = convert_policies(authz)
        for r in results:
            if r.issues:
                log.warning("%s", r)
        for problem in converted.problems:
            log.warning("%s", problem)
        return converted, policies

    async def _publish_model(self) -> None:
        """Start building and handing over the model, in the background: with 10,000
        pods that takes seconds, and enrollment must not wait for it. One at a time;
        changes meanwhile leave the model dirty for the next tick."""
        if not self.model_dirty or self.on_model is None:
            return
        if not self.model_ready():
            return  # a model from a partial list would drop workloads or bindings: wait
        if self.publishing is not None and not self.publishing.done():
            return
        self.model_dirty = False
        self.publishing = asyncio.create_task(self._publish(self._snapshot()))

    async def _publish(self, snapshot: tuple[Any, ...]) -> None:
        assert self.on_model is not None
        started = time.monotonic()
        try:
            converted, policies = await asyncio.to_thread(self._build, *snapshot)
            result = self.on_model(converted, policies)
            if asyncio.iscoroutine(result):
                await result
            self.publish_seconds = time.monotonic() - started
        except Exception:
            log.exception("publishing the cluster model failed; retried on the next change")
            self.model_dirty = True

    async def run(self, watch: ClusterWatch, full_every: float = 30.0,
                  model_every: float = 1.0, stop: asyncio.Event | None = None) -> None:
        """Consume ``watch`` until ``stop``; a full pass every ``full_every`` seconds."""
        loop = asyncio.get_running_loop()
        next_full = loop.time() + full_every
        next_model = loop.time()
        stop = stop or asyncio.Event()
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                wait = max(0.0, min(next_full, next_model) - loop.time())
                getter = asyncio.ensure_future(watch.queue.get())
                done, _ = await asyncio.wait({getter, stopped}, timeout=wait,
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await getter
                if not getter.cancelled():  # never drop an event taken off the queue
                    await self.handle(getter.result())
                if stop.is_set():
                    break
                if loop.time() >= next_full:
                    await self.reconcile()
                    next_full = loop.time() + full_every
                if loop.time() >= next_model:
                    await self._publish_model()
                    # never more than half the time publishing: with 10,000 pods one
                    # model costs seconds of CPU (and the GIL) that enrollment shares
                    next_model = loop.time() + max(model_every, 2 * self.publish_seconds)
        finally:
            stopped.cancel()
            if self.publishing is not None:  # a hand-over under way finishes
                with contextlib.suppress(Exception):
                    await self.publishing


def node_facts(cache: ClusterCache) -> dict[str, Any]:
    """For ``meshagent status``: sync state and last failures per kind."""
    return {k.value: {"synced": k in cache.synced, "objects": len(cache.raw[k]),
                      "failure": cache.failures[k].problem if k in cache.failures else None}
            for k in Kind}
