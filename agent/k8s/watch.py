"""List and watch the API server with the official ``kubernetes`` client.

Why the official client (``kubernetes`` on PyPI) and not ``kubernetes_asyncio`` or
``lightkube``: it is the Kubernetes project's own (kubernetes-client/python), follows
every Kubernetes release, and carries the kubeconfig / in-cluster loaders, exec and
token-file credential plugins and TLS handling a DaemonSet needs; ``kubernetes_asyncio``
is a community fork that trails it, and ``lightkube`` is a small single-maintainer
project with its own models. The price is that it is synchronous, so each watch runs
in a thread of its own and hands events to the agent's asyncio loop through
``loop.call_soon_threadsafe`` (the agent's loop never blocks on the API server).

We use the client's generated list calls with ``watch=True`` and
``_preload_content=False`` and read the stream's lines ourselves
(``kubernetes.watch.watch.iter_resp_lines``) instead of ``kubernetes.watch.Watch``:
that helper, with ``deserialize=False`` (needed: building model objects for
10,000 pods costs seconds and hundreds of MB), neither tracks the resourceVersion nor
survives an ``ERROR`` event (it reads a missing ``raw_object`` key), and it retries a
410 once with the same expired version.

The protocol (client-go's reflector, k8s.io/client-go/tools/cache/reflector.go):

1. **list**, note the list's ``metadata.resourceVersion``: emit :class:`Listed` (the
   complete set: the cache replaces what it had, so deletions missed while away are
   seen);
2. **watch** from that version with ``allowWatchBookmarks=true`` and a server-side
   ``timeoutSeconds``; every event and every ``BOOKMARK`` advances the version;
3. the stream ends (timeout) or breaks (disconnect, reset, read timeout, a line
   that is not JSON): watch again **from the last version seen**, after a backoff
   if it broke: nothing is missed and nothing is relisted;
4. ``410 Gone``/``Expired`` (as an ``ERROR`` event or an HTTP status): the version
   is too old: relist at once;
5. any other error (403 missing RBAC, 404 a CRD not installed, 5xx, connection
   refused): a :class:`WatchFailed` naming what to do, then retry after a bounded
   exponential backoff with jitter (:class:`Backoff`);
6. every ``resync_period`` a full relist, even when the watch is healthy.

An unreachable server produces only :class:`WatchFailed` events: nothing the agent
holds is changed (the cache keeps the last seen objects).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

log = logging.getLogger("meshagent.k8s.watch")


class Kind(enum.Enum):
    NODE_PODS = "pods (this node)"
    PODS = "pods"
    NAMESPACES = "namespaces"
    SERVICES = "services"
    ENDPOINT_SLICES = "endpointslices"
    AUTHORIZATION_POLICIES = "authorizationpolicies"
    GATEWAYS = "gateways"
    GATEWAY_CLASSES = "gatewayclasses"


GATEWAY_API_GROUP = "gateway.networking.k8s.io"


@dataclass(frozen=True)
class Target:
    kind: Kind
    group: str
    version: str
    plural: str
    field_selector: str = ""
    # A CRD that may not be installed (Gateway API): 404 is expected, retried slowly.
    optional: bool = False

    @property
    def api_group(self) -> str:
        return self.group or "core"


def targets(node: str, model: bool = True) -> list[Target]:
    """What the agent watches: this node's pods (enrollment), namespaces, and for the
    cluster model every pod, Services, EndpointSlices, AuthorizationPolicies and the
    Gateway API objects waypoint binding reads (Gateways, GatewayClasses: their
    ``istio.io/waypoint-for`` and listeners' ``allowedRoutes``). The Gateway API is a
    CRD a cluster may not have: those watches are optional (404 retried slowly).
    HTTPRoutes are not watched: only the waypoint uses them, and it reads its own."""
    out = [Target(Kind.NODE_PODS, "", "v1", "pods", f"spec.nodeName={node}"),
           Target(Kind.NAMESPACES, "", "v1", "namespaces")]
    if model:
        out += [Target(Kind.PODS, "", "v1", "pods"),
                Target(Kind.SERVICES, "", "v1", "services"),
                Target(Kind.ENDPOINT_SLICES, "discovery.k8s.io", "v1", "endpointslices"),
                Target(Kind.AUTHORIZATION_POLICIES, "security.istio.io", "v1",
                       "authorizationpolicies"),
                Target(Kind.GATEWAYS, GATEWAY_API_GROUP, "v1", "gateways", optional=True),
                Target(Kind.GATEWAY_CLASSES, GATEWAY_API_GROUP, "v1", "gatewayclasses",
                       optional=True)]
    return out


def list_function(api: client.ApiClient, target: Target) -> Callable[..., Any]:
    """The generated client call that lists (and, with ``watch=True``, watches) it."""
    if target.group == "" and target.plural == "pods":
        return client.CoreV1Api(api).list_pod_for_all_namespaces  # type: ignore[no-any-return]
    if target.group == "" and target.plural == "namespaces":
        return client.CoreV1Api(api).list_namespace  # type: ignore[no-any-return]
    if target.group == "" and target.plural == "services":
        return client.CoreV1Api(api).list_service_for_all_namespaces  # type: ignore[no-any-return]
    if target.group == "discovery.k8s.io" and target.plural == "endpointslices":
        return client.DiscoveryV1Api(  # type: ignore[no-any-return]
            api).list_endpoint_slice_for_all_namespaces
    custom = client.CustomObjectsApi(api)

    def call(**kwargs: Any) -> Any:
        return custom.list_cluster_custom_object(target.group, target.version, target.plural,
                                                 **kwargs)
    return call


# -- events handed to the asyncio side ---------------------------------------------

@dataclass(frozen=True)
class Listed:
    kind: Kind
    items: tuple[dict[str, Any], ...]
    resource_version: str


@dataclass(frozen=True)
class Changed:
    kind: Kind
    type: str  # ADDED MODIFIED DELETED
    obj: dict[str, Any]


@dataclass(frozen=True)
class WatchFailed:
    kind: Kind
    code: int | None
    problem: str
    retry_in: float


WatchEvent = Listed | Changed | WatchFailed


class Expired(Exception):
    """410: the resourceVersion is too old; relist."""


class Backoff:
    """Bounded exponential backoff with jitter: attempt n waits a uniformly random
    time in [d/2, d] with d = min(cap, base * 2**n) (client-go's jittered backoff)."""

    def __init__(self, base: float = 0.2, cap: float = 30.0,
                 rng: random.Random | None = None) -> None:
        self.base, self.cap, self.attempt = base, cap, 0
        self.rng = rng or random.Random()

    def next(self) -> float:
        d = min(self.cap, self.base * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return d / 2 + self.rng.uniform(0, d / 2)

    def reset(self) -> None:
        self.attempt = 0


def explain(target: Target, code: int | None, reason: str) -> str:
    """An API error, with what to do next."""
    what = f"{target.plural}.{target.api_group}"
    if code == 403:
        group = target.group or '""'
        return (f"{what}: forbidden ({reason}); grant get, list and watch on "
                f"{target.plural} (apiGroup {group}) to the agent's "
                "ServiceAccount in its ClusterRole (agent/k8s/manifests/rbac.yaml)")
    if code == 401:
        return f"{what}: unauthorized ({reason}); check the kubeconfig or the token mount"
    if code == 404:
        hint = ("the CRD is not installed (optional: the model carries no waypoint "
                "bindings until it is; install the Gateway API CRDs (standard channel, "
                "v1) to use waypoints)"
                if target.optional else "the API server does not serve it: install the CRD "
                "(Istio's for security.istio.io) or upgrade the cluster")
        return f"{what}: not found; {hint}"
    if code is None:
        return f"{what}: the API server is unreachable ({reason}); retrying, nothing changes " \
               "until it answers"
    return f"{what}: HTTP {code} ({reason}); retrying"


class Watcher:
    """List+watch one target in a thread; events go to ``emit`` (thread-safe sink)."""

    def __init__(self, api: client.ApiClient, target: Target,
                 emit: Callable[[WatchEvent], None], stop: threading.Event,
                 resync_period: float = 300.0, watch_timeout: float = 60.0,
                 connect_timeout: float = 5.0, read_slack: float = 30.0,
                 backoff: Backoff | None = None) -> None:
        self.api, self.target, self.emit, self.stop_event = api, target, emit, stop
        self.call = list_function(api, target)
        self.resync_period, self.watch_timeout = resync_period, watch_timeout
        self.connect_timeout, self.read_slack = connect_timeout, read_slack
        self.backoff = backoff or Backoff()
        self.resource_version: str | None = None
        self._listed_rv: str | None = None
        self.relists = 0
        self._response: Any = None
        self._lock = threading.Lock()

    def _kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"_preload_content": False}
        if self.target.field_selector:
            kw["field_selector"] = self.target.field_selector
        return kw

    def list(self) -> str:
        response = self.call(**self._kwargs(),
                             _request_timeout=(self.connect_timeout, 60 + self.read_slack))
        try:
            body = json.loads(response.data)
        finally:
            response.release_conn()
        if not isinstance(body, dict) or not isinstance(body.get("items", []), list):
            raise ValueError("the list response is not a list object")
        rv = str((body.get("metadata") or {}).get("resourceVersion") or "")
        items = tuple(i for i in body.get("items") or [] if isinstance(i, dict))
        self.relists += 1
        self.emit(Listed(self.target.kind, items, rv))
        return rv

    def watch(self, rv: str, budget: float) -> None:
        """Stream events from ``rv``; updates :attr:`resource_version` as it goes."""
        timeout = max(1, int(min(self.watch_timeout, budget)))
        response = self.call(**self._kwargs(), watch=True, resource_version=rv,
                             allow_watch_bookmarks=True, timeout_seconds=timeout,
                             _request_timeout=(self.connect_timeout, timeout + self.read_slack))
        with self._lock:
            self._response = response
        try:
            if response.status != 200:
                raise ApiException(status=response.status, reason=response.reason)
            for line in iter_resp_lines(response):
                if not line or self.stop_event.is_set():
                    continue
                event = json.loads(line)
                self._handle(event)
                if self.stop_event.is_set():
                    return
        finally:
            with self._lock:
                self._response = None
            response.release_conn()

    def _handle(self, event: Any) -> None:
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            raise ValueError(f"a watch event that is not an object: {str(event)[:200]}")
        type_, obj = event.get("type"), event["object"]
        if type_ == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise Expired(obj.get("message", ""))
            raise ApiException(status=code, reason=f"{obj.get('reason')}: {obj.get('message')}")
        rv = (obj.get("metadata") or {}).get("resourceVersion") if isinstance(
            obj.get("metadata"), dict) else None
        if type_ == "BOOKMARK":
            if rv:
                self.resource_version = str(rv)
            return
        if type_ not in ("ADDED", "MODIFIED", "DELETED"):
            log.warning("%s: ignoring a watch event of unknown type %r", self.target.plural,
                        type_)
            return
        self.emit(Changed(self.target.kind, str(type_), obj))
        if rv:
            self.resource_version = str(rv)

    def _failed(self, code: int | None, reason: str) -> None:
        delay = self.backoff.next()
        if code == 404 and self.target.optional:
            delay = max(delay, min(self.backoff.cap, 30.0))
        message = explain(self.target, code, reason)
        log.warning("%s (retry in %.1f s)", message, delay)
        self.emit(WatchFailed(self.target.kind, code, message, delay))
        self.stop_event.wait(delay)

    def _expired(self, why: str) -> None:
        """410: relist at once; a 410 again right after a relist backs off first (a
        server that expires every watch must not be hammered with lists)."""
        log.info("%s: %s; relisting", self.target.plural, why)
        if self.resource_version is not None and self.resource_version == self._listed_rv:
            self.stop_event.wait(self.backoff.next())
        self.resource_version = None

    def run(self) -> None:
        """The loop (see the module docstring); returns when ``stop`` is set."""
        last_list = 0.0
        while not self.stop_event.is_set():
            try:
                now = time.monotonic()
                if self.resource_version is None or now - last_list >= self.resync_period:
                    self.resource_version = self.list()
                    self._listed_rv = self.resource_version
                    last_list = time.monotonic()
                budget = self.resync_period - (time.monotonic() - last_list)
                self.watch(self.resource_version, budget)
                if self.resource_version != self._listed_rv:
                    self.backoff.reset()
            except Expired as e:
                self._expired(str(e))
            except ApiException as e:
                if e.status == 410:
                    self._expired(str(e.reason))
                    continue
                self._failed(e.status, str(e.reason))
            except Exception as e:  # network errors, broken streams, bad JSON
                if self.stop_event.is_set():
                    return
                self._failed(None, f"{type(e).__name__}: {e}")

    def interrupt(self) -> None:
        """Break a blocked read (stop): shut the socket down under the response."""
        with self._lock:
            response = self._response
        sock = getattr(getattr(response, "connection", None), "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class ClusterWatch:
    """Every target's :class:`Watcher` in a thread, feeding one asyncio queue.

    Side effects: starts one daemon thread per target (``start``); ``stop`` sets the
    stop flag, breaks the blocked reads and joins the threads.
    """

    def __init__(self, api: client.ApiClient, watch_targets: Iterable[Target],
                 **watcher_options: Any) -> None:
        self.api = api
        self.targets = list(watch_targets)
        self.options = watcher_options
        self.stop_event = threading.Event()
        self.watchers: list[Watcher] = []
        self.threads: list[threading.Thread] = []
        self.queue: asyncio.Queue[WatchEvent] = asyncio.Queue()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        def emit(event: WatchEvent) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(self.queue.put_nowait, event)

        for target in self.targets:
            watcher = Watcher(self.api, target, emit, self.stop_event, **self.options)
            thread = threading.Thread(target=watcher.run, name=f"watch-{target.plural}",
                                      daemon=True)
            self.watchers.append(watcher)
            self.threads.append(thread)
            thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        for watcher in self.watchers:
            watcher.interrupt()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
