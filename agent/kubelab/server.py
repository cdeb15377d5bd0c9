"""The lab API server's HTTP shell (aiohttp): discovery, CRUD, list, watch, faults.

Plain HTTP on loopback (the lab and tests only; no TLS, no authentication: every
request is admitted unless a fault says otherwise). Run it in a thread with
:class:`LabApiServer` (tests) or ``python -m agent.kubelab`` (the lab).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from agent.kubelab.resources import BY_PATH, RESOURCES, Resource, groups
from agent.kubelab.selectors import SelectorError, field_selector, label_selector
from agent.kubelab.store import ApiError, Event, Store

SERVER_VERSION = {"major": "1", "minor": "32", "gitVersion": "v1.32.0-meshagent-lab",
                  "platform": "linux/amd64"}


@dataclass
class Faults:
    """Faults a test injects (read on every request)."""

    # plural -> 403 Forbidden for every verb (RBAC missing)
    forbidden: set[str] = field(default_factory=set)
    # seconds before every answer
    delay: float = 0.0
    # close every watch stream after this many events (disconnect mid-stream)
    drop_watch_after: int | None = None
    # the next N watch requests get an ERROR 410 Expired event
    expire_watches: int = 0
    # every request gets 503 (a flapping server)
    unavailable: bool = False
    # API groups whose CRDs are "not installed": left out of discovery, every path 404
    missing_groups: set[str] = field(default_factory=set)
    # counters for tests
    watches: int = 0
    lists: int = 0


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json")


def _error(e: ApiError) -> web.Response:
    return _json(e.status(), e.code)


class Api:
    def __init__(self, store: Store, faults: Faults, bookmark_interval: float = 1.0) -> None:
        self.store, self.faults, self.bookmark_interval = store, faults, bookmark_interval
        self.address = "127.0.0.1:0"

    # -- discovery --------------------------------------------------------------

    def discovery(self, path: list[str]) -> web.Response | None:
        if path == ["version"]:
            return _json(SERVER_VERSION)
        if path in (["healthz"], ["readyz"], ["livez"]):
            return web.Response(text="ok")
        if path == ["api"]:
            return _json({"kind": "APIVersions", "versions": ["v1"],
                          "serverAddressByClientCIDRs": [
                              {"clientCIDR": "0.0.0.0/0", "serverAddress": self.address}]})
        if path == ["apis"]:
            return _json({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}
                                         for v in vs],
                 "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
                for g, vs in groups().items() if g not in self.faults.missing_groups]})
        if path == ["api", "v1"] or (len(path) == 3 and path[0] == "apis"):
            group, version = ("", "v1") if path[0] == "api" else (path[1], path[2])
            gv = f"{group}/{version}" if group else version
            resources = [e for r in RESOURCES if (r.group, r.version) == (group, version)
                         for e in r.discovery()]
            if not resources:
                return None
            return _json({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                          "resources": resources})
        if len(path) == 2 and path[0] == "apis" and path[1] in groups():
            vs = groups()[path[1]]
            return _json({"kind": "APIGroup", "apiVersion": "v1", "name": path[1],
                          "versions": [{"groupVersion": f"{path[1]}/{v}", "version": v}
                                       for v in vs],
                          "preferredVersion": {"groupVersion": f"{path[1]}/{vs[0]}",
                                               "version": vs[0]}})
        return None

    # -- routing ------------------------------------------------------------------

    def route(self, path: list[str]) -> tuple[Resource, str | None, str | None, str]:
        """path -> (resource, namespace, name, subresource); ApiError 404 if none."""
        if path[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", path[2:]
        elif len(path) >= 3 and path[0] == "apis":
            group, version, rest = path[1], path[2], path[3:]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        namespace: str | None = None
        if (len(rest) >= 3 and rest[0] == "namespaces"
                and (group, version, rest[2]) in BY_PATH):
            namespace, rest = rest[1], rest[2:]
        if not rest or (group, version, rest[0]) not in BY_PATH:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        resource = BY_PATH[(group, version, rest[0])]
        if namespace is not None and not resource.namespaced:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else ""
        if len(rest) > 3 or (sub and not (sub == "status" and resource.status)):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return resource, namespace, name, sub

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.faults.delay:
            await asyncio.sleep(self.faults.delay)
        if self.faults.unavailable:
            return _error(ApiError(503, "ServiceUnavailable", "the lab server is unavailable "
                                   "(injected fault)"))
        path = [p for p in request.path.split("/") if p]
        if len(path) >= 2 and path[0] == "apis" and path[1] in self.faults.missing_groups:
            return _error(ApiError(404, "NotFound", "the server could not find the requested "
                                   "resource (injected fault: CRD not installed)"))
        found = self.discovery(path) if request.method == "GET" else None
        if found is not None:
            return found
        if path[:2] == ["openapi", "v3"] and request.method == "GET":
            doc = openapi_v3(path[2:])
            if doc is not None:
                return _json(doc)
        if path and path[0] == "openapi":
            return _error(ApiError(404, "NotFound", "the lab server serves no OpenAPI v2 "
                                   "document (objects are validated server-side)"))
        try:
            resource, namespace, name, sub = self.route(path)
            if resource.plural in self.faults.forbidden:
                verb = request.method.lower()
                raise ApiError(403, "Forbidden",
                               f'{resource.plural} is forbidden: User "lab" cannot {verb} '
                               f'resource "{resource.plural}" in API group "{resource.group}"'
                               " (injected fault: grant it in the ClusterRole)")
            return await self.dispatch(request, resource, namespace, name, sub)
        except ApiError as e:
            return _error(e)

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            if "yaml" in (request.content_type or ""):
                return yaml.safe_load(raw)
            return json.loads(raw or b"null")
        except (ValueError, yaml.YAMLError) as e:
            raise ApiError(400, "BadRequest", f"the body is not valid JSON: {e}") from None

    async def dispatch(self, request: web.Request, resource: Resource, namespace: str | None,
                       name: str | None, sub: str) -> web.StreamResponse:
        q = request.query
        dry_run = q.get("dryRun") == "All"
        ns = namespace or ""
        if request.method == "GET" and name is None:
            if q.get("watch") in ("true", "1"):
                return await self.watch(request, resource, namespace)
            return self.list_objects(request, resource, namespace)
        if name is None:
            if request.method == "POST":
                body = await self._body(request)
                return _json(self.store.create(resource, ns, body, dry_run), 201)
            raise ApiError(405, "MethodNotAllowed", f"{request.method} on a collection")
        if request.method == "GET":
            return _json(self.store.get(resource, ns if resource.namespaced else "", name))
        if request.method == "PUT":
            body = await self._body(request)
            return _json(self.store.update(resource, ns, name, body, sub, dry_run))
        if request.method == "PATCH":
            body = await self._body(request)
            ctype = request.headers.get("Content-Type", "")
            return _json(self.store.patch(resource, ns, name, ctype, body, sub, dry_run))
        if request.method == "DELETE":
            return _json(self.store.delete(resource, ns, name, dry_run))
        raise ApiError(405, "MethodNotAllowed", request.method)

    def _matcher(self, request: web.Request, namespace: str | None) -> Any:
        try:
            labels = label_selector(request.query.get("labelSelector"))
            fields = field_selector(request.query.get("fieldSelector"))
        except SelectorError as e:
            raise ApiError(400, "BadRequest", str(e)) from None

        def matches(obj: dict[str, Any]) -> bool:
            meta = obj.get("metadata", {})
            return ((namespace is None or meta.get("namespace") == namespace)
                    and labels(meta.get("labels") or {}) and fields(obj))
        return matches

    def list_objects(self, request: web.Request, resource: Resource,
             namespace: str | None) -> web.Response:
        self.faults.lists += 1
        matches = self._matcher(request, namespace)
        items = [o for o in self.store.items(resource, namespace) if matches(o)]
        return _json({"kind": f"{resource.kind}List", "apiVersion": resource.group_version,
                      "metadata": {"resourceVersion": str(self.store.rv)}, "items": items})

    async def watch(self, request: web.Request, resource: Resource,
                    namespace: str | None) -> web.StreamResponse:
        self.faults.watches += 1
        matches = self._matcher(request, namespace)
        q = request.query
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
        timeout = min(float(q.get("timeoutSeconds", "1800")), 3600.0)
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def subscriber(e: Event) -> None:
            if e.resource is resource:
                queue.put_nowait(e)

        rv = q.get("resourceVersion", "")
        backlog: list[tuple[str, dict[str, Any]]] = []
        error: ApiError | None = None
        if self.faults.expire_watches:
            self.faults.expire_watches -= 1
            error = ApiError(410, "Expired", f"too old resource version: {rv} (injected fault)")
        elif rv in ("", "0"):
            backlog = [("ADDED", o) for o in self.store.items(resource, namespace)
                       if matches(o)]
        else:
            try:
                since = int(rv)
            except ValueError:
                raise ApiError(400, "BadRequest", f"invalid resourceVersion {rv!r}") from None
            try:
                backlog = [x for e in self.store.events_since(since)
                           if e.resource is resource
                           for x in self._filtered(e, matches)]
            except ApiError as e:
                error = e
        self.store.subscribers.append(subscriber)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        sent = 0

        async def send(type_: str, obj: dict[str, Any]) -> bool:
            nonlocal sent
            await response.write(json.dumps({"type": type_, "object": obj}).encode() + b"\n")
            sent += 1
            limit = self.faults.drop_watch_after
            return limit is None or sent < limit

        try:
            if error is not None:
                await send("ERROR", error.status())
                return response
            for type_, obj in backlog:
                if not await send(type_, obj):
                    return self._abort(request, response)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while (left := deadline - loop.time()) > 0:
                try:
                    event = await asyncio.wait_for(queue.get(),
                                                   min(left, self.bookmark_interval))
                except TimeoutError:
                    if bookmarks:
                        await send("BOOKMARK", {"kind": resource.kind,
                                                "apiVersion": resource.group_version,
                                                "metadata": {"resourceVersion":
                                                             str(self.store.rv)}})
                    continue
                for type_, obj in self._filtered(event, matches):
                    if not await send(type_, obj):
                        return self._abort(request, response)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(ValueError):
                self.store.subscribers.remove(subscriber)
        return response

    @staticmethod
    def _abort(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        """Break the stream mid-way (no chunked terminator): a disconnect."""
        if request.transport is not None:
            request.transport.abort()
        return response

    @staticmethod
    def _filtered(event: Event, matches: Any) -> list[tuple[str, dict[str, Any]]]:
        now = matches(event.obj)
        before = event.old is not None and matches(event.old)
        if event.type == "DELETED":
            return [("DELETED", event.obj)] if before else []
        if now and before:
            return [("MODIFIED", event.obj)]
        if now:
            return [("ADDED", event.obj)]
        if before:  # it no longer matches the selector: gone for this watcher
            return [("DELETED", event.obj)]
        return []


def _gv_path(r: Resource) -> str:
    return f"apis/{r.group}/{r.version}" if r.group else "api/v1"


def openapi_v3(rest: list[str]) -> dict[str, Any] | None:
    """The OpenAPI v3 documents kubectl reads, reduced to what it looks at.

    kubectl (1.27+) decides to validate server-side when the group-version's
    document has a PATCH operation for the kind, tagged with
    ``x-kubernetes-group-version-kind``, taking the ``fieldValidation`` query
    parameter (k8s.io/cli-runtime resource/query_param_verifier_v3.go); it then
    sends ``fieldValidation=Strict`` and this server validates every object anyway.
    No schemas are served: kubectl apply falls back to its compiled-in types for
    strategic merge patches and to JSON merge patches for CRDs.
    """
    if not rest:
        return {"paths": {_gv_path(r): {"serverRelativeURL": f"/openapi/v3/{_gv_path(r)}"}
                          for r in RESOURCES}}
    want = "/".join(rest)
    paths: dict[str, Any] = {}
    for r in RESOURCES:
        if _gv_path(r) != want:
            continue
        gvk = {"group": r.group, "version": r.version, "kind": r.kind}
        prefix = f"/{want}/namespaces/{{namespace}}" if r.namespaced else f"/{want}"
        param = [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}]
        op = {"parameters": param, "x-kubernetes-group-version-kind": gvk,
              "responses": {"200": {"description": "OK"}}}
        paths[f"{prefix}/{r.plural}/{{name}}"] = {"patch": op, "put": op}
        paths[f"{prefix}/{r.plural}"] = {"post": op}
    if not paths:
        return None
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes (meshagent lab)",
                                         "version": SERVER_VERSION["gitVersion"]},
            "paths": paths, "components": {"schemas": {}}}


def make_app(store: Store, faults: Faults, bookmark_interval: float = 1.0) -> tuple[
        web.Application, Api]:
    api = Api(store, faults, bookmark_interval)
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", api.handle)
    return app, api


class LabApiServer:
    """The lab API server (on 127.0.0.1 unless ``host`` says otherwise) in a thread of
    its own (tests, the bench, ``python -m agent.kubelab``).

    ``with LabApiServer() as server: server.url`` ...; ``server.call(fn, *args)`` runs
    ``fn`` on the server's loop (store access is single-threaded there).
    """

    def __init__(self, port: int = 0, history: int = 1000,
                 bookmark_interval: float = 1.0, host: str = "127.0.0.1") -> None:
        self.host = host
        self.store = Store(history)
        self.faults = Faults()
        self.port = port
        self.bookmark_interval = bookmark_interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> LabApiServer:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                loop.run_until_complete(self._start())
            except BaseException as e:  # surfaced to the caller below
                errors.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._stop())
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=run, name="kubelab", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the lab API server did not start within 10 s")
        if errors:
            raise errors[0]
        return self

    async def _start(self) -> None:
        app, api = make_app(self.store, self.faults, self.bookmark_interval)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        api.address = f"{self.host}:{self.port}"

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args)`` on the server's loop and return its result (or raise)."""
        assert self._loop is not None

        async def run() -> Any:
            return fn(*args, **kwargs)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(30)

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create ``obj`` (test helper; goes through validation like any request)."""
        resource = next(r for r in RESOURCES
                        if r.kind == obj["kind"] and r.group_version == obj["apiVersion"])
        ns = obj.get("metadata", {}).get("namespace", "default") if resource.namespaced else ""
        result: dict[str, Any] = self.call(self.store.create, resource, ns, obj)
        return result

    def restore(self, objects: list[dict[str, Any]]) -> None:
        """Put back objects saved with ``store.dump`` (see :meth:`Store.restore`)."""
        def run() -> None:
            for obj in objects:
                resource = next(r for r in RESOURCES if r.kind == obj["kind"]
                                and r.group_version == obj["apiVersion"])
                self.store.restore(resource, obj)
            self.store.compact()
        self.call(run)

    def resource(self, plural: str) -> Resource:
        return next(r for r in RESOURCES if r.plural == plural)

    def kubeconfig(self, path: Path) -> Path:
        """Write a kubeconfig for this server (plain http on loopback, no credentials)."""
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "lab",
            "clusters": [{"name": "lab", "cluster": {"server": self.url}}],
            "users": [{"name": "lab", "user": {}}],
            "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "lab"}}]}))
        return path

    def __enter__(self) -> LabApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
