"""``meshagent waypoint`` as a real process (uvloop): files in, HBONE in and out on
loopback, Prometheus metrics scraped over HTTP, policy reload from the directory."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from waypoint_lab import TD, EchoServer, base_docs, body_of, http1, status_of

from agent.hbone.client import HboneClient
from agent.hbone.server import HboneServerRequest, serve_hbone
from agent.identity.ca import init_ca
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityStore
from agent.model.loader import model_to_yaml
from agent.model.types import (
    InboundProtocol,
    Model,
    NamespacedHostname,
    NetworkAddress,
    Service,
    ServiceBinding,
    Workload,
    port_map,
)

POD = "127.0.9.1"  # a loopback "pod" address: its node tunnel listens on POD:15008
VIP = "10.96.9.9"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model() -> Model:
    host = "web.apps.svc.cluster.local"
    return Model.build(
        [Workload(uid="c1//v1/Pod/apps/web-1", name="web-1", namespace="apps",
                  workload_ips=(ipaddress.ip_address(POD),), service_account="web",
                  protocol=InboundProtocol.HBONE,
                  services=(ServiceBinding(NamespacedHostname("apps", host),
                                           port_map({80: 8080})),))],
        [Service("web", "apps", host, vips=(NetworkAddress("", ipaddress.ip_address(VIP)),),
                 ports=port_map({80: 8080}))])


def test_the_waypoint_process(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    store = IdentityStore(init_ca(ca_dir, TD))
    (tmp_path / "model.yaml").write_text(model_to_yaml(model()))
    config = tmp_path / "config"
    config.mkdir()
    docs: list[dict[str, Any]] = [d for d in base_docs()
                                  if d["kind"] in ("Namespace", "Gateway")
                                  or d["metadata"]["name"] == "web"]
    (config / "cluster.yaml").write_text(yaml.safe_dump_all(docs))
    port, metrics = free_port(), free_port()
    app = EchoServer("web")
    log = (tmp_path / "waypoint.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "waypoint", "--name", "waypoint", "--namespace",
         "apps", "--model", str(tmp_path / "model.yaml"), "--config-dir", str(config),
         "--ca-dir", str(ca_dir), "--listen", f"127.0.0.1:{port}", "--metrics-port",
         str(metrics)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while b"waypoint serving" not in (tmp_path / "waypoint.log").read_bytes():
            assert proc.poll() is None, (tmp_path / "waypoint.log").read_text()
            assert time.monotonic() < deadline, "the waypoint did not start"
            time.sleep(0.1)
        asyncio.run(asyncio.wait_for(_exercise(store, port, app, config), 60))
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics",
                                         timeout=10).read().decode()
        lines = [line for line in scraped.splitlines()
                 if line.startswith("istio_requests_total{")]
        assert any('reporter="waypoint"' in line and 'response_code="200"' in line
                   for line in lines), lines
        assert any('response_code="403"' in line for line in lines), lines
        text = (tmp_path / "waypoint.log").read_text()
        access = [line for line in text.splitlines() if "path=/p" in line
                  or '"path": "/p"' in line]
        assert access and len(access) >= 2, text  # one line per request (200s, then 403s)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        app.stop()


async def _exercise(store: IdentityStore, port: int, app: EchoServer, config: Path) -> None:
    async def on_stream(request: HboneServerRequest) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
        stream = request.accept()

        async def up() -> None:
            while data := await stream.read():
                writer.write(data)
                await writer.drain()
            writer.write_eof()

        async def down() -> None:
            while data := await reader.read(65536):
                await stream.write(data)
            await stream.close_write()

        with contextlib.suppress(Exception):
            await asyncio.gather(up(), down())
        writer.close()

    node = await asyncio.start_server(
        lambda r, w: serve_hbone(r, w, on_stream=on_stream, trust_domain=TD), POD, 15008,
        ssl=store.server_context(SpiffeId(TD, "apps", "web")))
    client = await HboneClient.connect(
        ("127.0.0.1", port), store.client_context(SpiffeId(TD, "front", "alice")),
        trust_domain=TD, expected_peer=SpiffeId(TD, "apps", "waypoint"))
    get = b"GET /p HTTP/1.1\r\nHost: web\r\n\r\n"
    try:
        out = await http1(await client.open_stream(f"{VIP}:80", forwarded_for="10.1.1.1"), get)
        assert status_of(out) == 200, out
        assert b'"path": "/p"' in body_of(out)
        # A DENY policy dropped into the directory is picked up without a restart.
        (config / "deny.yaml").write_text(yaml.safe_dump({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny", "namespace": "apps"},
            "spec": {"targetRefs": [{"kind": "Service", "group": "", "name": "web"}],
                     "action": "DENY", "rules": [{}]}}))
        status = 200
        for _ in range(100):
            out = await http1(await client.open_stream(f"{VIP}:80",
                                                       forwarded_for="10.1.1.1"), get)
            status = status_of(out)
            if status == 403:
                break
            await asyncio.sleep(0.1)
        assert status == 403
    finally:
        await client.close()
        node.close()


def test_check_prints_bindings_and_fails_on_a_fail_closed_policy(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from agent.cli import main

    (tmp_path / "model.yaml").write_text(model_to_yaml(model()))
    config = tmp_path / "config"
    config.mkdir()
    docs = [d for d in base_docs() if d["kind"] in ("Namespace", "Gateway")
            or d["metadata"]["name"] == "web"]
    (config / "cluster.yaml").write_text(yaml.safe_dump_all(docs))
    args = ["waypoint", "--check", "--name", "waypoint", "--namespace", "apps", "--model",
            str(tmp_path / "model.yaml"), "--config-dir", str(config), "--ca-dir",
            str(tmp_path / "ca")]
    ok = CliRunner().invoke(main, args)
    assert ok.exit_code == 0, ok.output
    assert f"{VIP}:80  http  service apps/web" in ok.output
    (config / "bad.yaml").write_text(yaml.safe_dump({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "bad", "namespace": "apps"},
        "spec": {"targetRefs": [{"kind": "Service", "group": "", "name": "web"}],
                 "action": "CUSTOM", "rules": [{}]}}))
    bad = CliRunner().invoke(main, args)
    assert bad.exit_code == 2
    assert "policy apps/bad: fail_closed" in bad.output
