"""The waypoint in process on loopback, with real clients (curl, h2load, grpcio) and
real servers (stdlib HTTP/1.1, grpcio), HBONE on both sides under a test CA."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import struct
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import pytest
from waypoint_lab import (
    DB_VIP,
    FRONT_ID,
    GRPC_VIP,
    OPT_VIP,
    OTHER_ID,
    TD,
    WAYPOINT_ID,
    WEB_PODS,
    WEB_VIP,
    Lab,
    body_of,
    echo_say,
    http1,
    lab_model,
    start_lab,
    status_of,
    with_docs,
)

from agent.hbone.exceptions import HboneRejected
from agent.identity.ca import init_ca
from agent.identity.store import IdentityStore
from agent.waypoint.config import build_state
from agent.waypoint.limits import Budgets, Thresholds
from agent.waypoint.proxy import WaypointSettings

WEB = f"{WEB_VIP}:80"
TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
GET = b"GET /hello HTTP/1.1\r\nHost: web.apps.svc.cluster.local\r\n\r\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> IdentityStore:
    return IdentityStore(init_ca(tmp_path_factory.mktemp("ca") / "ca", TD))


def run_lab(store: IdentityStore, body: Callable[[Lab], Awaitable[Any]],
            timeout: float = 60.0, loop: str = "asyncio", **kwargs: Any) -> Any:
    async def main() -> Any:
        lab = await start_lab(store, **kwargs)
        try:
            return await asyncio.wait_for(body(lab), timeout)
        finally:
            await lab.close()
    return _run(main(), loop)


def _run(coro: Coroutine[Any, Any, Any], loop: str) -> Any:
    """``loop``: "asyncio" or "uvloop" (the waypoint process runs on uvloop)."""
    factory = None
    if loop == "uvloop":
        import uvloop
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


async def sh(*argv: str, stdin: bytes | None = None, timeout: float = 30) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace")


def policy(spec: dict[str, Any], name: str = "p") -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "apps"},
            "spec": {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                                     "name": "waypoint"}], **spec}}


def samples(lab: Lab, name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for m in lab.inputs.metrics.registry.collect()
            for s in m.samples if s.name == name]


# ---- HTTP/1.1 -----------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("curl") is None, reason="curl (Debian) is installed by setup.sh")
def test_http1_with_curl_keepalive_chunked_and_upstream_hbone(store: IdentityStore) -> None:
    async def body(lab: Lab) -> None:
        port = await lab.shim(WEB)
        base = f"http://127.0.0.1:{port}"
        # Two URLs in one curl run: one keep-alive connection through the waypoint.
        rc, out = await sh("curl", "-sS", "-H", f"traceparent: {TRACE}", f"{base}/a",
                           f"{base}/b")
        assert rc == 0, out
        first, second = (json.loads(x) for x in out.replace("}{", "}\n{").splitlines())
        assert (first["path"], second["path"]) == ("/a", "/b")
        assert first["headers"]["traceparent"].startswith("00-0af7651916cd43dd")
        # A chunked upload from curl, a POST with a body.
        rc, out = await sh("curl", "-sS", "-H", "Transfer-Encoding: chunked",
                           "--data-binary", "@-", f"{base}/up", stdin=b"x" * 100_000)
        assert rc == 0 and json.loads(out)["body"] == "x" * 100_000
        rc, out = await sh("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                           "-X", "DELETE", f"{base}/d")
        assert out == "200"
        h1_connects = len(lab.connects)
        # curl --http2 on http:// asks to upgrade to h2c: served as HTTP/1.1.
        rc, out = await sh("curl", "-sS", "--http2", "-w", " %{http_version}", f"{base}/u")
        assert rc == 0 and out.endswith(" 1.1") and json.loads(out[:-4])["path"] == "/u"
        # With prior knowledge it is h2c; the app speaks HTTP/1.1 only and the waypoint
        # keeps the client's protocol upstream (Envoy's USE_DOWNSTREAM_PROTOCOL): a clean
        # 503 after the retries.
        rc, out = await sh("curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null",
                           "-w", "%{http_code} %{http_version}", f"{base}/p")
        assert out == "503 2", out
        # Upstream: HBONE under the waypoint's identity, :authority podIP:targetPort,
        # the request's traceparent and the tunnel's baggage carried on the CONNECT.
        assert lab.connects, "no upstream CONNECT"
        for seen in lab.connects:
            assert seen.authority in {f"{ip}:8080" for ip in WEB_PODS}
        traced = [s for s in lab.connects if "traceparent" in s.headers]
        assert traced and traced[0].headers["traceparent"].startswith("00-0af7651916cd43dd")
        # The app saw requests, and the pooled upstream connection was reused.
        assert len(lab.http_apps["web"].seen) == 5
        assert h1_connects < 4
    run_lab(store, body)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_upstream_identity_is_the_waypoints(store: IdentityStore, loop: str) -> None:
    async def body(lab: Lab) -> None:
        stream = await lab.open(WEB)
        assert status_of(await http1(stream, GET)) == 200
        # The destination tunnel verified the waypoint's certificate.
        conn = lab.inputs.pool.connections()[0]
        assert conn.peer_identity is not None
        assert lab.connects[0].headers.get("forwarded") == 'for="10.20.0.5"'
        assert lab.connects[0].headers.get("baggage") == "k8s.namespace.name=front"
        assert lab.connects[0].peer == WAYPOINT_ID
    run_lab(store, body, loop=loop)


def test_only_bound_destinations_are_accepted(store: IdentityStore) -> None:
    async def body(lab: Lab) -> None:
        # Opted out with istio.io/use-waypoint: none -> not ours.
        with pytest.raises(HboneRejected) as info:
            await lab.open(f"{OPT_VIP}:80")
        assert info.value.status == 403
        # Not in the model at all.
        with pytest.raises(HboneRejected):
            await lab.open("10.99.9.9:80")
        # A bound service on a port it does not have.
        with pytest.raises(HboneRejected):
            await lab.open(f"{WEB_VIP}:81")
        # The waypoint still serves.
        assert status_of(await http1(await lab.open(WEB), GET)) == 200
    run_lab(store, body)


def test_binding_from_another_namespace_needs_allowed_routes(store: IdentityStore) -> None:
    docs = with_docs()
    docs[0] = {"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "apps", "labels": {
                   "istio.io/use-waypoint": "waypoint",
                   "istio.io/use-waypoint-namespace": "infra"}}}
    docs[1] = {**docs[1], "metadata": {"name": "waypoint", "namespace": "infra"}}
    same = build_state(lab_model(), docs, ("infra", "waypoint"))
    assert not same.destinations  # Same (the default) refuses apps' services
    docs[1]["spec"] = {"listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE",
                                      "allowedRoutes": {"namespaces": {"from": "All"}}}]}
    shared = build_state(lab_model(), docs, ("infra", "waypoint"))
    assert (WEB_VIP, 80) in shared.destinations


def test_policy_get_only_from_one_namespace(store: IdentityStore) -> None:
    docs = with_docs(policy({"rules": [{"from": [{"source": {"namespaces": ["front"]}}],
                                        "to": [{"operation": {"methods": ["GET"]}}]}]}))

    async def body(lab: Lab) -> None:
        ok = await http1(await lab.open(WEB, FRONT_ID), GET)
        assert status_of(ok) == 200
        post = await http1(await lab.open(WEB, FRONT_ID),
                           b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 2\r\n\r\nhi")
        assert status_of(post) == 403 and body_of(post) == b"RBAC: access denied"
        assert post.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        assert ok.startswith(b"HTTP/1.1 200 OK\r\n")
        other = await http1(await lab.open(WEB, OTHER_ID), GET)
        assert status_of(other) == 403
        head = await lab.open(WEB, FRONT_ID)
        await head.write(b"HEAD / HTTP/1.1\r\nHost: web\r\n\r\n")
        answer = await asyncio.wait_for(head.read(), 10)
        assert status_of(answer) == 403 and answer.endswith(b"\r\n\r\n")
        # Denied requests never reached the app.
        assert [s[0] for s in lab.http_apps["web"].seen] == ["GET"]
    run_lab(store, body, docs=docs)


def test_a_broken_policy_fails_closed(store: IdentityStore) -> None:
    docs = with_docs(policy({"rules": [{"to": [{"operation": {"verbs": ["GET"]}}]}]}))

    async def body(lab: Lab) -> None:
        assert status_of(await http1(await lab.open(WEB), GET)) == 403
    run_lab(store, body, docs=docs)


def test_routes_404_modifier_and_weights(store: IdentityStore) -> None:
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
             "metadata": {"name": "web", "namespace": "apps"},
             "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                      "rules": [
                          {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                           "filters": [{"type": "RequestHeaderModifier",
                                        "requestHeaderModifier": {
                                            "set": [{"name": "x-route", "value": "api"}],
                                            "remove": ["x-secret"]}}],
                           "backendRefs": [{"name": "web", "port": 80}]},
                          {"matches": [{"headers": [{"name": "x-canary", "value": "1"}]}],
                           "backendRefs": [{"name": "canary", "port": 80}]}]}}

    async def body(lab: Lab) -> None:
        api = await http1(await lab.open(WEB), b"GET /api/x HTTP/1.1\r\nHost: web\r\n"
                          b"x-secret: s\r\n\r\n")
        seen = json.loads(body_of(api))
        assert seen["server"] == "web" and seen["headers"]["x-route"] == "api"
        assert "x-secret" not in seen["headers"]
        canary = await http1(await lab.open(WEB), b"GET /other HTTP/1.1\r\nHost: web\r\n"
                             b"x-canary: 1\r\n\r\n")
        assert json.loads(body_of(canary))["server"] == "canary"
        missing = await http1(await lab.open(WEB), b"GET /nothing HTTP/1.1\r\nHost: web\r\n\r\n")
        assert status_of(missing) == 404
        flags = {s[0]["response_flags"] for s in samples(lab, "istio_requests_total")}
        assert "NR" in flags
    run_lab(store, body, docs=with_docs(route))


def test_default_retries_then_urx(store: IdentityStore) -> None:
    async def body(lab: Lab) -> None:
        out = await http1(await lab.open(WEB), b"GET /status/503 HTTP/1.1\r\nHost: w\r\n\r\n")
        assert status_of(out) == 503
        # The first try and Istio's 2 default retries, on another host first.
        tries = [s for s in lab.http_apps["web"].seen if s[1] == "/status/503"]
        assert len(tries) == 3
        hosts = [c.authority for c in lab.connects]
        assert len(set(hosts)) == 2
        flags = [s[0]["response_flags"] for s in samples(lab, "istio_requests_total")]
        assert flags == ["URX"]
        # The retried 503s' upstream streams were closed, budgets returned: only the
        # pooled idle connection is still open.
        await asyncio.sleep(0.2)
        open_streams = sum(c.active_streams for c in lab.inputs.pool.connections())
        assert open_streams == lab.inputs.idle.count() <= 1
        assert all(b.requests == 0 and b.pending == 0 and b.retries == 0
                   for _, b in lab.inputs.budgets)
        # Connect failures are retried on another endpoint too.
        lab.down_pods.add(WEB_PODS[0])
        lab.inputs.idle.close()
        for _ in range(4):
            assert status_of(await http1(await lab.open(WEB), GET)) == 200
        # Every endpoint refusing: 503 once the retries are spent, flagged UF and URX.
        lab.down_pods.add(WEB_PODS[1])
        lab.inputs.idle.close()
        out = await http1(await lab.open(WEB), GET)
        assert status_of(out) == 503 and b"connection failure" in body_of(out)
        flags = [s[0]["response_flags"] for s in samples(lab, "istio_requests_total")]
        assert "URX,UF" in flags
    run_lab(store, body)


def test_limits_answer_503_uo(store: IdentityStore) -> None:
    budgets = Budgets(Thresholds(max_requests=1))

    async def body(lab: Lab) -> None:
        slow = asyncio.ensure_future(http1(await lab.open(WEB),
                                           b"GET /slow HTTP/1.1\r\nHost: w\r\n\r\n"))
        for _ in range(200):  # until the app holds the slow request (bounded)
            if lab.http_apps["web"].seen:
                break
            await asyncio.sleep(0.05)
        over = await http1(await lab.open(WEB), GET)
        assert status_of(over) == 503
        assert b"overflow" in body_of(over)
        assert status_of(await slow) == 200
        flags = sorted(s[0]["response_flags"] for s in samples(lab, "istio_requests_total"))
        assert flags == ["-", "UO"]
        assert status_of(await http1(await lab.open(WEB), GET)) == 200  # budget returned
    run_lab(store, body, budgets=budgets)


def test_bad_input_gets_a_clear_answer_and_others_are_served(store: IdentityStore) -> None:
    settings = WaypointSettings(header_timeout=0.5, max_header_bytes=8 * 1024)

    async def body(lab: Lab) -> None:
        cases = [
            (b"GARBAGE\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: w\r\nContent-Length: 3\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: w\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
            (b"GET / HTTP/1.1\r\nHost: w\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
            (b"GET / HTTP/1.1\r\nHost: w\r\nX: " + b"a" * 20000, 431),
        ]
        for raw, expected in cases:
            out = await http1(await lab.open(WEB), raw, expect_close=True)
            assert status_of(out) == expected, (raw[:60], out[:100])
        # Slowloris: half a head, then silence -> 408 after header_timeout.
        slow = await lab.open(WEB)
        out = await http1(slow, b"GET / HTTP/1.1\r\nHost: w\r\n", expect_close=True)
        assert status_of(out) == 408
        # Everyone else is still served; the app never saw any of the bad requests.
        assert status_of(await http1(await lab.open(WEB), GET)) == 200
        assert len(lab.http_apps["web"].seen) == 1
        # Each bad request is counted (and logged) with its answer, flagged DPE.
        counted = sorted((s[0]["response_code"], s[0]["response_flags"])
                         for s in samples(lab, "istio_requests_total") for _ in range(int(s[1])))
        assert counted == sorted([(str(c), "DPE") for _, c in cases]
                                 + [("408", "DPE"), ("200", "-")])
    run_lab(store, body, settings=settings)


def test_websocket_upgrade_is_passed_through(store: IdentityStore) -> None:
    async def body(lab: Lab) -> None:
        stream = await lab.open("10.96.0.14:80")
        await stream.write(b"GET /chat HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\n"
                           b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.read()
        assert status_of(head) == 101
        await stream.write(b"frame-1")
        echoed = head.partition(b"\r\n\r\n")[2]
        while len(echoed) < 7:
            echoed += await stream.read()
        assert echoed == b"frame-1"
        await stream.close_write()
    run_lab(store, body)


def test_tcp_port_passes_through_with_l4_policy(store: IdentityStore) -> None:
    deny_other = policy({"action": "DENY", "rules": [{"from": [{"source": {
        "namespaces": ["other"]}}]}]})

    async def body(lab: Lab) -> None:
        stream = await lab.open(f"{DB_VIP}:5432")
        await stream.write(b"select 1")
        assert await stream.read() == b"db:select 1"
        await stream.close_write()
        denied = await lab.open(f"{DB_VIP}:5432", OTHER_ID)
        with pytest.raises(Exception):  # noqa: B017 - reset or EOF, either is a refusal
            await denied.write(b"select 1")
            data = await denied.read()
            if not data:
                raise ConnectionResetError
        assert lab.connects[-1].authority == "10.10.2.1:5432"
    run_lab(store, body, docs=with_docs(deny_other))


class AccessLog:
    """Stands in for the access logger (structlog may be configured, and its loggers
    cached, by whichever test ran first)."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append({"event": event, **fields})


def test_access_log_off_counts_metrics_and_logs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.waypoint.telemetry as telemetry
    recorder = AccessLog()
    monkeypatch.setattr(telemetry, "access_log", recorder)
    metrics = telemetry.WaypointMetrics(access_log=False)
    record = telemetry.RequestRecord()
    record.status = 200
    metrics.record(record)
    assert recorder.lines == []
    assert [s.value for m in metrics.registry.collect() for s in m.samples
            if s.name == "istio_requests_total"] == [1.0]
    telemetry.WaypointMetrics().record(record)
    assert [e["event"] for e in recorder.lines] == ["request"]


def test_metrics_and_one_access_log_line_per_request(store: IdentityStore,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.waypoint.telemetry as telemetry
    recorder = AccessLog()
    monkeypatch.setattr(telemetry, "access_log", recorder)
    audit = policy({"action": "AUDIT", "rules": [{"to": [{"operation": {"paths": ["/m2"]}}]}]},
                   name="audit-m2")

    async def body(lab: Lab) -> None:
        for path in (b"/m1", b"/m2"):
            out = await http1(await lab.open(WEB), b"GET " + path + b" HTTP/1.1\r\n"
                              b"Host: web\r\n\r\n")
            assert status_of(out) == 200
        lines = [e for e in recorder.lines if e.get("event") == "request"]
        assert [e["path"] for e in lines] == ["/m1", "/m2"]
        assert lines[0]["response_code"] == 200 and lines[0]["upstream_host"].endswith(":8080")
        assert lines[0]["source_principal"] == f"spiffe://{FRONT_ID.principal}"
        assert [e["audited"] for e in lines] == ["-", "apps/audit-m2"]
        totals = samples(lab, "istio_requests_total")
        assert sum(v for _, v in totals) == 2
        labels = totals[0][0]
        assert labels["reporter"] == "waypoint"
        assert labels["response_code"] == "200"
        assert labels["destination_service"] == "web.apps.svc.cluster.local"
        assert labels["destination_service_name"] == "web"
        assert labels["source_principal"] == f"spiffe://{FRONT_ID.principal}"
        assert labels["request_protocol"] == "http"
        for name in ("istio_request_duration_milliseconds_count", "istio_request_bytes_count",
                     "istio_response_bytes_count"):
            assert sum(v for _, v in samples(lab, name)) == 2, name
    run_lab(store, body, docs=with_docs(audit))


# ---- h2c and gRPC ---------------------------------------------------------------------------

def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(message)) + message


def test_grpc_client_through_h2c(store: IdentityStore) -> None:
    async def body(lab: Lab) -> None:
        port = await lab.shim(f"{GRPC_VIP}:50051")

        def call() -> tuple[bytes, grpc.StatusCode]:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                say = echo_say(channel)
                ok = say(b"hi", timeout=10)
                try:
                    say(b"fail", timeout=10)
                except grpc.RpcError as exc:
                    return ok, exc.code()
                return ok, grpc.StatusCode.OK

        ok, failed = await asyncio.to_thread(call)
        assert ok == b"echo:hi"
        assert failed is grpc.StatusCode.INVALID_ARGUMENT
        totals = samples(lab, "istio_requests_total")
        statuses = sorted(s[0]["grpc_response_status"] for s in totals)
        assert statuses == ["0", "3"]
        assert {s[0]["request_protocol"] for s in totals} == {"grpc"}
        assert lab.connects[0].authority == "10.10.1.1:50051"
    run_lab(store, body)


def test_grpc_messages_beyond_the_retry_buffer_stream_through_h2c(store: IdentityStore) -> None:
    """h2c bodies over ``max_body_bytes`` stream too (flow control bounds what waits:
    200 KB through a 1,000-byte buffer needs the window reopened as the upstream
    takes it); a denied one is answered and only its stream stopped."""
    deny = policy({"action": "DENY", "rules": [{"when": [
        {"key": "request.headers[x-deny]", "values": ["yes"]}]}]})
    settings = WaypointSettings(max_body_bytes=1000)

    async def body(lab: Lab) -> None:
        port = await lab.shim(f"{GRPC_VIP}:50051")
        message = bytes(range(256)) * 800  # 200 KB

        def call() -> tuple[bytes, grpc.StatusCode, bytes]:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                say = echo_say(channel)
                # Over the buffer, yet all here (with its END_STREAM) at once.
                assert say(b"m" * 3000, timeout=20) == b"echo:" + b"m" * 3000
                ok = say(message, timeout=20)
                try:
                    say(message, timeout=20, metadata=(("x-deny", "yes"),))
                    denied = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    denied = exc.code()
                for _ in range(3):  # what the denied ones left unread is given back
                    with contextlib.suppress(grpc.RpcError):
                        say(message, timeout=20, metadata=(("x-deny", "yes"),))
                return ok, denied, say(message, timeout=20)  # same connection

        ok, denied, after = await asyncio.to_thread(call)
        assert ok == b"echo:" + message
        assert denied is grpc.StatusCode.PERMISSION_DENIED
        assert after == b"echo:" + message
        assert lab.inputs.bodies.used == 0
        sizes = sorted(v for labels, v in samples(lab, "istio_request_bytes_sum")
                       if labels["response_code"] == "200")
        assert sizes and sizes[-1] >= len(message)
    run_lab(store, body, docs=with_docs(deny), settings=settings)


def test_a_denied_h2c_upload_gives_its_unread_window_back(store: IdentityStore) -> None:
    """What a streamed upload had queued when it was answered (403) and stopped is
    acknowledged: the client's connection window comes back, so the connection
    does not stall for its other streams."""
    import h2.config
    import h2.connection
    import h2.errors
    import h2.events

    deny = policy({"action": "DENY", "rules": [{"when": [
        {"key": "request.headers[x-deny]", "values": ["yes"]}]}]})

    async def body(lab: Lab) -> None:
        stream = await lab.open(f"{GRPC_VIP}:50051")
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "POST"), (":scheme", "http"),
                              (":authority", "grpc"), (":path", "/echo.Echo/Say"),
                              ("content-type", "application/grpc"), ("x-deny", "yes")])
        for _ in range(4):  # 60,000 of the 65,535 bytes of window, in one write
            conn.send_data(1, b"u" * 15_000)
        await stream.write(conn.data_to_send())
        events: list[Any] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while conn.outbound_flow_control_window < 60_000 and loop.time() < deadline:
            with contextlib.suppress(asyncio.TimeoutError):
                chunk = await asyncio.wait_for(stream.read(), 1)
                if not chunk:
                    break
                events += conn.receive_data(chunk)
                await stream.write(conn.data_to_send())
        statuses = [dict(e.headers).get(b":status") for e in events
                    if isinstance(e, h2.events.ResponseReceived)]
        assert statuses == [b"403"], events
        assert any(isinstance(e, h2.events.StreamReset) and e.stream_id == 1
                   and e.error_code == h2.errors.ErrorCodes.NO_ERROR for e in events)
        assert conn.outbound_flow_control_window >= 60_000, events
        assert len(lab.connects) == 0
    run_lab(store, body, docs=with_docs(deny), settings=WaypointSettings(max_body_bytes=1000))


def test_grpc_denied_by_policy(store: IdentityStore) -> None:
    docs = with_docs(policy({"action": "DENY", "rules": [{"to": [{"operation": {
        "paths": ["/echo.Echo/*"]}}]}]}))

    async def body(lab: Lab) -> None:
        port = await lab.shim(f"{GRPC_VIP}:50051")

        def call() -> grpc.StatusCode:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                try:
                    echo_say(channel)(b"hi", timeout=10)
                except grpc.RpcError as exc:
                    return exc.code()
            return grpc.StatusCode.OK

        # Envoy's 403 to a gRPC client maps to PERMISSION_DENIED.
        assert await asyncio.to_thread(call) is grpc.StatusCode.PERMISSION_DENIED
    run_lab(store, body, docs=docs)


@pytest.mark.skipif(shutil.which("h2load") is None,
                    reason="h2load (Debian nghttp2-client) is installed by setup.sh")
def test_h2load_h2c_through_the_waypoint(store: IdentityStore, tmp_path: Path) -> None:
    payload = tmp_path / "req.bin"
    payload.write_bytes(grpc_frame(b"load"))

    async def body(lab: Lab) -> None:
        port = await lab.shim(f"{GRPC_VIP}:50051")
        rc, out = await sh("h2load", "-n", "200", "-c", "2", "-m", "10",
                           "-H", "content-type: application/grpc", "-H", "te: trailers",
                           "-d", str(payload), f"http://127.0.0.1:{port}/echo.Echo/Say")
        assert rc == 0, out
        assert "200 succeeded, 0 failed, 0 errored" in out, out
        assert "status codes: 200 2xx" in out, out
        assert sum(v for _, v in samples(lab, "istio_requests_total")) == 200
        # The 200 requests shared a few multiplexed upstream h2 connections.
        assert 1 <= len(lab.connects) <= 8, len(lab.connects)
    run_lab(store, body, timeout=120)


def test_workload_addressed_traffic_needs_a_workload_waypoint(store: IdentityStore) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "web-1", "namespace": "apps", "labels": {"istio.io/use-waypoint": "waypoint"}}}
    docs = with_docs(pod)
    # waypoint-for defaults to service: a pod asking for it directly is refused.
    assert (WEB_PODS[0], 8080) not in build_state(lab_model(), docs,
                                                  ("apps", "waypoint")).destinations
    docs[1] = {**docs[1], "metadata": {"name": "waypoint", "namespace": "apps",
                                       "labels": {"istio.io/waypoint-for": "all"}}}

    async def body(lab: Lab) -> None:
        out = await http1(await lab.open(f"{WEB_PODS[0]}:8080"), GET)
        assert status_of(out) == 200
        assert lab.connects[-1].authority == f"{WEB_PODS[0]}:8080"
        # web-2 has no label of its own: it inherits the namespace's, and an "all"
        # waypoint takes workload traffic too.
        assert status_of(await http1(await lab.open(f"{WEB_PODS[1]}:8080"), GET)) == 200
        # opt-1's service opted out, but the pod inherits the namespace binding.
        assert status_of(await http1(await lab.open("10.10.4.1:8080"), GET)) == 200
        # A port of a bound workload that no Service declares is ours too, as TCP.
        undeclared = lab.inputs.state.destination("10.10.2.1", 9999)
        assert undeclared is not None and undeclared.protocol.value == "tcp"
    run_lab(store, body, docs=docs)


def test_fault_abort_and_route_timeout(store: IdentityStore) -> None:
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
             "metadata": {"name": "web", "namespace": "apps"},
             "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                      "rules": [
                          {"matches": [{"path": {"type": "Exact", "value": "/teapot"}}],
                           "fault": {"abort": {"percentage": {"value": 100},
                                               "httpStatus": 418}}},
                          {"matches": [{"path": {"type": "PathPrefix", "value": "/slow"}}],
                           "timeouts": {"request": "300ms"}},
                          {"backendRefs": [{"name": "web", "port": 80}]}]}}

    async def body(lab: Lab) -> None:
        teapot = await http1(await lab.open(WEB), b"GET /teapot HTTP/1.1\r\nHost: w\r\n\r\n")
        assert status_of(teapot) == 418
        slow = await http1(await lab.open(WEB), b"GET /slow HTTP/1.1\r\nHost: w\r\n\r\n")
        assert status_of(slow) == 504
        assert status_of(await http1(await lab.open(WEB), GET)) == 200
        flags = sorted(s[0]["response_flags"] for s in samples(lab, "istio_requests_total"))
        assert flags == ["-", "FI", "UT"]
    run_lab(store, body, docs=with_docs(route))


def test_dot_segments_do_not_bypass_a_path_policy(store: IdentityStore) -> None:
    docs = with_docs(policy({"action": "DENY", "rules": [{"to": [{"operation": {
        "paths": ["/admin", "/admin/*"]}}]}]}))

    async def body(lab: Lab) -> None:
        for target in (b"/admin", b"/x/../admin", b"/./admin/", b"/a/b/../../admin/x"):
            out = await http1(await lab.open(WEB), b"GET " + target + b" HTTP/1.1\r\n"
                              b"Host: w\r\n\r\n")
            assert status_of(out) == 403, target
        out = await http1(await lab.open(WEB), b"GET /x/../ok HTTP/1.1\r\nHost: w\r\n\r\n")
        assert json.loads(body_of(out))["path"] == "/ok"  # forwarded normalized
        dup = await http1(await lab.open(WEB), b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                          expect_close=True)
        assert status_of(dup) == 400
    run_lab(store, body, docs=docs)


def test_broken_h2_gets_goaway_and_others_are_served(store: IdentityStore) -> None:
    import h2.config
    import h2.connection
    import h2.errors
    import h2.events

    async def body(lab: Lab) -> None:
        stream = await lab.open(f"{GRPC_VIP}:50051")
        # The preface, then a frame of an unknown length that is far too big.
        await stream.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                           + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # empty SETTINGS
                           + b"\xff\xff\xff\x01\x00\x00\x00\x01" + b"x" * 64)
        received = b""
        with contextlib.suppress(Exception):
            while chunk := await asyncio.wait_for(stream.read(), 10):
                received += chunk
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        events = conn.receive_data(received)
        goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
        assert goaway and goaway[0].error_code == h2.errors.ErrorCodes.FRAME_SIZE_ERROR, events
        # A well-behaved gRPC client on another connection is served.
        port = await lab.shim(f"{GRPC_VIP}:50051")

        def call() -> bytes:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                return bytes(echo_say(channel)(b"ok", timeout=10))

        assert await asyncio.to_thread(call) == b"echo:ok"
    run_lab(store, body)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl (Debian) is installed by setup.sh")
def test_uploads_beyond_the_retry_buffer_stream_through_with_curl(store: IdentityStore) -> None:
    """Bodies over ``max_body_bytes`` are streamed to the app, not refused (413) nor
    held whole: a 2 MiB upload through a 64 KiB buffer, with Content-Length and chunked;
    the buffered bytes are given back, the request's bytes counted."""
    settings = WaypointSettings(max_body_bytes=64 * 1024)

    async def body(lab: Lab) -> None:
        port = await lab.shim(WEB)
        payload = bytes(range(256)) * 8192  # 2 MiB: curl sends "Expect: 100-continue"
        for extra in ([], ["-H", "Transfer-Encoding: chunked"]):
            rc, out = await sh("curl", "-sS", *extra, "--data-binary", "@-",
                               f"http://127.0.0.1:{port}/up", stdin=payload)
            assert rc == 0, out
            assert json.loads(out)["body"].encode("latin-1") == payload
        assert lab.inputs.bodies.used == 0
        sizes = [v for labels, v in samples(lab, "istio_request_bytes_sum")
                 if labels["response_code"] == "200"]
        assert sizes == [2.0 * len(payload)]
        # The connection stays usable after a streamed upload (keep-alive).
        stream = await lab.open(WEB)
        reply = await http1(stream, b"POST /a HTTP/1.1\r\nHost: w\r\nContent-Length: 100000\r\n"
                            b"\r\n" + b"z" * 100_000)
        assert status_of(reply) == 200 and json.loads(body_of(reply))["body"] == "z" * 100_000
        assert status_of(await http1(stream, GET)) == 200
    run_lab(store, body, settings=settings)


def test_a_streamed_body_is_not_retried_a_buffered_one_is(store: IdentityStore) -> None:
    """Istio's default retries replay a buffered body; a body beyond the buffer went to
    the app as it arrived and cannot be replayed: one try, its 503 answered."""
    settings = WaypointSettings(max_body_bytes=1000)

    async def body(lab: Lab) -> None:
        seen = lab.http_apps["web"].seen
        small = await http1(await lab.open(WEB), b"POST /status/503 HTTP/1.1\r\nHost: w\r\n"
                            b"Content-Length: 10\r\n\r\n" + b"s" * 10)
        assert status_of(small) == 503
        assert len([s for s in seen if s[1] == "/status/503"]) == 3
        big = await http1(await lab.open(WEB), b"POST /status/503 HTTP/1.1\r\nHost: w\r\n"
                          b"Content-Length: 5000\r\n\r\n" + b"b" * 5000)
        assert status_of(big) == 503
        assert len([s for s in seen if s[1] == "/status/503"]) == 4
        assert all(b.requests == 0 and b.pending == 0 and b.retries == 0
                   for _, b in lab.inputs.budgets)
    run_lab(store, body, settings=settings)


def test_a_denied_streamed_upload_gets_403_and_the_connection_closes(store: IdentityStore) -> None:
    deny_post = policy({"action": "DENY", "rules": [{"to": [{"operation": {
        "methods": ["POST"]}}]}]})
    settings = WaypointSettings(max_body_bytes=1000)

    async def body(lab: Lab) -> None:
        before = len(lab.http_apps["web"].seen)
        out = await http1(await lab.open(WEB), b"POST /x HTTP/1.1\r\nHost: w\r\n"
                          b"Content-Length: 50000\r\n\r\n" + b"d" * 50_000, expect_close=True)
        assert status_of(out) == 403 and body_of(out) == b"RBAC: access denied"
        assert len(lab.http_apps["web"].seen) == before  # nothing reached the app
        assert lab.inputs.bodies.used == 0
    run_lab(store, body, docs=with_docs(deny_post), settings=settings)


def test_a_malformed_streamed_body_gets_400_and_others_are_served(store: IdentityStore) -> None:
    settings = WaypointSettings(max_body_bytes=1000)

    async def body(lab: Lab) -> None:
        out = await http1(await lab.open(WEB), b"POST /x HTTP/1.1\r\nHost: w\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n7d0\r\n" + b"c" * 2000
                          + b"\r\nzz\r\n", expect_close=True)
        assert status_of(out) == 400
        flags = [s[0]["response_flags"] for s in samples(lab, "istio_requests_total")]
        assert flags == ["DPE"]
        assert status_of(await http1(await lab.open(WEB), GET)) == 200
        assert lab.inputs.bodies.used == 0
    run_lab(store, body, settings=settings)


def test_buffered_bodies_are_bounded_process_wide(store: IdentityStore) -> None:
    from agent.waypoint.limits import BodyBudget

    async def body(lab: Lab) -> None:
        lab.inputs.bodies = BodyBudget(limit=1000)
        big = await http1(await lab.open(WEB), b"POST / HTTP/1.1\r\nHost: w\r\n"
                          b"Content-Length: 2000\r\n\r\n" + b"x" * 2000, expect_close=True)
        assert status_of(big) == 503 and b"overloaded" in body_of(big)
        small = await http1(await lab.open(WEB), b"POST / HTTP/1.1\r\nHost: w\r\n"
                            b"Content-Length: 500\r\n\r\n" + b"y" * 500)
        assert status_of(small) == 200
        assert lab.inputs.bodies.used == 0 and lab.inputs.bodies.refused == 1
        port = await lab.shim(f"{GRPC_VIP}:50051")

        def call() -> bytes:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                return bytes(echo_say(channel)(b"z" * 100, timeout=10))

        assert await asyncio.to_thread(call) == b"echo:" + b"z" * 100
        assert lab.inputs.bodies.used == 0
    run_lab(store, body)


def test_h2c_rapid_reset_dials_nothing_and_ends_in_enhance_your_calm(store: IdentityStore) -> None:
    import h2.config
    import h2.connection
    import h2.errors
    import h2.events

    async def body(lab: Lab) -> None:
        stream = await lab.open(f"{GRPC_VIP}:50051")
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        for i in range(1100):
            sid = 1 + 2 * i
            conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"),
                                    (":authority", "grpc"), (":path", "/echo.Echo/Say"),
                                    ("content-type", "application/grpc")], end_stream=True)
            conn.reset_stream(sid)
            if i % 50 == 49:
                await stream.write(conn.data_to_send())
        await stream.write(conn.data_to_send())
        events: list[Any] = []
        with contextlib.suppress(Exception):
            while chunk := await asyncio.wait_for(stream.read(), 10):
                events += conn.receive_data(chunk)
        goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
        assert goaway and goaway[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        assert len(lab.connects) == 0  # no request was sent upstream
    run_lab(store, body)


def test_a_bug_is_a_500_for_that_request_only(store: IdentityStore,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.waypoint.proxy as proxy
    real = proxy.process

    async def buggy(inputs: Any, info: Any, req: Any, record: Any) -> Any:
        if req.target == "/bug":
            raise RuntimeError("a bug")
        return await real(inputs, info, req, record)

    monkeypatch.setattr(proxy, "process", buggy)

    async def body(lab: Lab) -> None:
        stream = await lab.open(WEB)
        bug = await http1(stream, b"GET /bug HTTP/1.1\r\nHost: w\r\n\r\n")
        assert status_of(bug) == 500
        # The same keep-alive connection still serves the next request.
        assert status_of(await http1(stream, GET)) == 200
    run_lab(store, body)


def test_libcurl_as_the_node_tunnel(store: IdentityStore, tmp_path: Path) -> None:
    """libcurl (pycurl wheel, HTTP/2 HTTPS proxy with a client certificate) opens the
    HBONE CONNECT itself and speaks HTTP/1.1 inside: no client code of ours."""
    import io

    import pycurl

    cert = store.get(FRONT_ID)
    pems = {"cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem", "ca": tmp_path / "ca.pem"}
    pems["cert"].write_bytes(cert.cert_pem)
    pems["key"].touch(mode=0o600)
    pems["key"].write_bytes(cert.key_pem)
    pems["ca"].write_bytes(cert.trust_anchors_pem)
    docs = with_docs(policy({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}))

    def fetch(port: int, url: str, method: str = "GET") -> tuple[int, bytes, str]:
        body = io.BytesIO()
        curl = pycurl.Curl()
        try:
            curl.setopt(pycurl.URL, url)
            curl.setopt(pycurl.CUSTOMREQUEST, method)
            curl.setopt(pycurl.PROXY, f"https://127.0.0.1:{port}")
            curl.setopt(pycurl.PROXYTYPE, 3)  # CURLPROXY_HTTPS2 (libcurl >= 8.1)
            curl.setopt(pycurl.HTTPPROXYTUNNEL, 1)
            curl.setopt(pycurl.NOPROXY, "")
            curl.setopt(pycurl.PROXY_SSLCERT, str(pems["cert"]))
            curl.setopt(pycurl.PROXY_SSLKEY, str(pems["key"]))
            curl.setopt(pycurl.PROXY_CAINFO, str(pems["ca"]))
            curl.setopt(pycurl.PROXY_SSL_VERIFYHOST, 0)  # SPIFFE URI SAN, no DNS name
            curl.setopt(pycurl.TIMEOUT, 20)
            curl.setopt(pycurl.WRITEDATA, body)
            try:
                curl.perform()
            except pycurl.error as exc:
                return 0, b"", str(exc)
            return int(curl.getinfo(pycurl.RESPONSE_CODE)), body.getvalue(), ""
        finally:
            curl.close()

    async def body(lab: Lab) -> None:
        port = lab.waypoint_port
        status, data, err = await asyncio.to_thread(fetch, port, f"http://{WEB_VIP}/via-curl")
        assert status == 200, err
        assert json.loads(data)["path"] == "/via-curl"
        status, data, _ = await asyncio.to_thread(fetch, port, f"http://{WEB_VIP}/x", "POST")
        assert (status, data) == (403, b"RBAC: access denied")
        # A destination not bound to this waypoint: the CONNECT itself is refused.
        status, _, err = await asyncio.to_thread(fetch, port, f"http://{OPT_VIP}/")
        assert status != 200 and err
        assert lab.connects[0].peer == WAYPOINT_ID
    run_lab(store, body, docs=docs)


def test_the_destination_must_present_the_workloads_identity(store: IdentityStore) -> None:
    async def body(lab: Lab) -> None:
        # The lab's destination node presents spiffe://cluster.local/ns/apps/sa/node,
        # not web-1's or web-2's identity: refused (503 UF after the retries).
        out = await http1(await lab.open(WEB), GET)
        assert status_of(out) == 503 and b"connection failure" in body_of(out)
        assert not lab.http_apps["web"].seen
    run_lab(store, body, verify_upstream=True)
