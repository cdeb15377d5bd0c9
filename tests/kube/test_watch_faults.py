"""The watch loop against the lab API server with injected faults: disconnects
mid-stream, 410 Expired, delays, 403 (missing RBAC), an unavailable server, bad
objects. Each test proves the cache ends up exactly as the server (nothing missed)
and that failures change nothing."""

from __future__ import annotations

import copy
import random
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from kube_helpers import namespace, pod
from kubernetes import config

from agent.k8s.cache import ClusterCache
from agent.k8s.watch import Backoff, Kind, Target, Watcher, WatchFailed

PODS = Target(Kind.NODE_PODS, "", "v1", "pods", "spec.nodeName=n1")
NAMESPACES = Target(Kind.NAMESPACES, "", "v1", "namespaces")


class Running:
    def __init__(self, watcher: Watcher, cache: ClusterCache, failures: list[WatchFailed],
                 lock: threading.Lock) -> None:
        self.watcher, self.cache, self.failures, self.lock = watcher, cache, failures, lock

    def until(self, check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if check():
                    return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; cache has "
                             f"{sorted(self.cache.raw[self.watcher.target.kind])}, failures "
                             f"{[f.problem for f in self.failures[-3:]]}")


@pytest.fixture
def run_watcher(kubelab, kubeconfig) -> Iterator[Callable[..., Running]]:
    started: list[tuple[threading.Event, Watcher, threading.Thread, object]] = []

    def start(target: Target = PODS, **options) -> Running:
        api = config.new_client_from_config(str(kubeconfig))
        cache, failures, lock = ClusterCache(), [], threading.Lock()

        def emit(event) -> None:
            with lock:
                if isinstance(event, WatchFailed):
                    failures.append(event)
                cache.apply(event)
        stop = threading.Event()
        options.setdefault("watch_timeout", 5)
        options.setdefault("backoff", Backoff(base=0.05, cap=0.3, rng=random.Random(1)))
        watcher = Watcher(api, target, emit, stop, **options)
        thread = threading.Thread(target=watcher.run, daemon=True)
        thread.start()
        started.append((stop, watcher, thread, api))
        return Running(watcher, cache, failures, lock)

    yield start
    for stop, watcher, thread, api in started:
        stop.set()
        watcher.interrupt()
        thread.join(15)
        api.close()  # type: ignore[attr-defined]


def server_pods(kubelab, node: str = "n1") -> dict[str, str]:
    res = kubelab.resource("pods")
    return kubelab.call(lambda: {
        f"{o['metadata']['namespace']}/{o['metadata']['name']}": o["metadata"]["resourceVersion"]
        for o in kubelab.store.items(res) if o["spec"].get("nodeName") == node})


def cache_pods(running: Running) -> dict[str, str]:
    raw = running.cache.raw[Kind.NODE_PODS]
    return {k: v["metadata"]["resourceVersion"] for k, v in raw.items()}


def test_disconnects_mid_stream_resume_without_relisting_and_miss_nothing(kubelab, run_watcher):
    kubelab.apply(pod("p0"))
    running = run_watcher()
    running.until(lambda: "default/p0" in running.cache.node_pods, "the first list")
    kubelab.faults.drop_watch_after = 2  # every stream breaks after two events
    for i in range(1, 16):
        kubelab.apply(pod(f"p{i}", node="n1" if i % 3 else "n2"))
    pods_res = kubelab.resource("pods")
    kubelab.call(kubelab.store.patch, pods_res, "default", "p1", "application/merge-patch+json",
                 {"metadata": {"labels": {"v": "2"}}})
    kubelab.call(kubelab.store.delete, pods_res, "default", "p2")
    running.until(lambda: cache_pods(running) == server_pods(kubelab), "the cache to catch up")
    assert running.cache.node_pods["default/p1"].meta.labels == {"v": "2"}
    assert running.watcher.relists == 1  # resumed from its resourceVersion each time
    assert kubelab.faults.watches > 3


def test_410_relists_and_sees_what_happened_meanwhile(kubelab, run_watcher):
    for i in range(3):
        kubelab.apply(pod(f"p{i}"))
    running = run_watcher(watch_timeout=1)
    running.until(lambda: len(running.cache.node_pods) == 3, "the first list")
    kubelab.faults.unavailable = True
    kubelab.faults.drop_watch_after = 0  # the agent is cut off
    running.until(lambda: bool(running.failures), "the cut")
    pods_res = kubelab.resource("pods")
    kubelab.call(kubelab.store.delete, pods_res, "default", "p0")
    kubelab.call(kubelab.store.compact)  # the deletion event is gone from the history
    kubelab.apply(pod("p9"))
    kubelab.faults.unavailable = False
    kubelab.faults.drop_watch_after = None
    running.until(lambda: cache_pods(running) == server_pods(kubelab), "relist after 410")
    assert running.watcher.relists == 2
    assert "default/p0" not in running.cache.node_pods


def test_an_error_410_event_relists(kubelab, run_watcher):
    kubelab.apply(pod("a"))
    kubelab.faults.expire_watches = 1  # the first watch answers ERROR 410
    running = run_watcher()
    running.until(lambda: running.watcher.relists == 2, "the relist")
    kubelab.apply(pod("b"))
    running.until(lambda: cache_pods(running) == server_pods(kubelab), "the watch after it")
    assert not running.failures  # 410 is routine, not a failure


def test_a_slow_server_still_converges(kubelab, run_watcher):
    kubelab.faults.delay = 0.3
    running = run_watcher()
    kubelab.apply(pod("slow"))
    running.until(lambda: "default/slow" in running.cache.node_pods, "the slow server")


def test_missing_rbac_is_reported_with_what_to_do_and_changes_nothing(kubelab, run_watcher):
    kubelab.faults.forbidden = {"pods"}
    kubelab.apply(pod("a"))
    running = run_watcher()
    running.until(lambda: len(running.failures) >= 2, "403 failures")
    assert not running.cache.is_synced(Kind.NODE_PODS)
    assert running.failures[0].code == 403
    assert "ClusterRole" in running.failures[0].problem
    assert running.failures[1].retry_in <= 0.3  # bounded
    kubelab.faults.forbidden = set()
    running.until(lambda: "default/a" in running.cache.node_pods, "sync once granted")


def test_unavailable_server_keeps_last_seen_state_then_catches_up(kubelab, run_watcher):
    kubelab.apply(pod("a"))
    kubelab.apply(pod("b"))
    running = run_watcher(watch_timeout=1)
    running.until(lambda: len(running.cache.node_pods) == 2, "the first list")
    kubelab.faults.unavailable = True
    kubelab.faults.drop_watch_after = 0  # break the open stream now
    running.until(lambda: any(f.code == 503 for f in running.failures), "503 failures")
    kubelab.apply(pod("c"))  # while the agent cannot see the server
    running.until(lambda: sum(f.code == 503 for f in running.failures) >= 3, "more failures")
    assert set(running.cache.node_pods) == {"default/a", "default/b"}  # nothing changed
    kubelab.faults.unavailable = False
    kubelab.faults.drop_watch_after = None
    running.until(lambda: cache_pods(running) == server_pods(kubelab), "catching up")


def test_bad_objects_are_logged_and_the_last_good_version_kept(kubelab, run_watcher):
    kubelab.apply(pod("a", labels={"istio.io/dataplane-mode": "ambient"}))
    running = run_watcher()
    running.until(lambda: "default/a" in running.cache.node_pods, "the first list")
    pods_res = kubelab.resource("pods")
    bad = copy.deepcopy(kubelab.call(kubelab.store.get, pods_res, "default", "a"))
    bad["metadata"]["labels"] = {"istio.io/dataplane-mode": 7}
    kubelab.call(kubelab.store.inject_unvalidated, pods_res, bad)
    nameless = {"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "default"},
                "spec": {"nodeName": "n1"}}
    kubelab.call(kubelab.store.inject_unvalidated, pods_res, nameless)
    kubelab.apply(pod("after"))
    running.until(lambda: "default/after" in running.cache.node_pods, "events after bad ones")
    assert running.cache.node_pods["default/a"].meta.labels == {
        "istio.io/dataplane-mode": "ambient"}
    problems = list(running.cache.problems)
    assert any("metadata.labels['istio.io/dataplane-mode']" in p for p in problems)
    assert any("metadata.name" in p for p in problems)
    assert all("last good version kept" in p for p in problems)


def test_namespaces_watch_and_optional_crd_missing(kubelab, run_watcher):
    running = run_watcher(NAMESPACES)
    kubelab.apply(namespace("apps", {"istio.io/dataplane-mode": "ambient"}))
    running.until(lambda: "apps" in running.cache.namespaces, "namespace")
    missing = Target(Kind.GATEWAYS, "gateway.networking.k8s.io", "v1", "notinstalled",
                     optional=True)
    absent = run_watcher(missing)
    absent.until(lambda: bool(absent.failures), "404 failure")
    assert absent.failures[0].code == 404 and "optional" in absent.failures[0].problem


def test_backoff_is_bounded_and_jittered():
    b = Backoff(base=0.2, cap=5.0, rng=random.Random(7))
    delays = [b.next() for _ in range(20)]
    assert all(0.1 <= d <= 5.0 for d in delays)
    assert delays[-1] >= 2.5  # at the cap, within [cap/2, cap]
    assert len(set(delays)) == len(delays)
    b.reset()
    assert b.next() <= 0.2


def test_a_server_expiring_every_watch_is_relisted_with_backoff_and_converges(kubelab,
                                                                             run_watcher):
    kubelab.apply(pod("a"))
    kubelab.faults.expire_watches = 4
    running = run_watcher()
    running.until(lambda: kubelab.faults.expire_watches == 0 and running.watcher.relists == 5,
                  "four 410s, five lists")
    assert running.watcher.backoff.attempt >= 3  # backed off between the relists
    kubelab.apply(pod("b"))
    running.until(lambda: cache_pods(running) == server_pods(kubelab), "the watch after them")
