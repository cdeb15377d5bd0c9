"""Connections to Service VIPs, in process on loopback (no root): the tunnel reads the
cluster model (ztunnel local-config YAML), merges this node's workloads, picks an
endpoint per connection and carries it over HBONE, same node, or directly
(agent/tunnel/{cluster,discovery,outbound}.py).

The model: the conftest pods (a1, b1 on node1; a2, b2 on node2) as HBONE workloads,
the outside address as a plaintext (TCP) workload, and services:

- ``web`` (10.96.0.10:80 -> 18080): a2 and b2 on node2, a1 on node1;
- ``sick`` (10.96.0.11:80, inline endpoints): a2 unhealthy, b2 healthy;
- ``empty`` (10.96.0.12:80): no endpoints;
- ``plain`` (10.96.0.13:80): the plaintext workload;
- ``mapped`` (10.96.0.14:8000 -> per endpoint, b2's binding says 18080).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from pathlib import Path
from typing import Any, cast

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
from conftest import (
    A1,
    A2,
    APP_PORT,
    B1,
    B2,
    EXTERNAL,
    TRUST_DOMAIN,
    echo,
    free_ports,
    ip,
    run,
    start_mesh,
    until,
)

from agent.identity.ca import MeshCA
from agent.model.loader import load_model_text
from agent.model.types import Model
from agent.tunnel.cluster import build_cluster
from agent.tunnel.discovery import FileWorkloads
from agent.tunnel.workloads import Workload

FAILED = "istio_tcp_connections_failed_total"
OPENED = "istio_tcp_connections_opened_total"
WEB = "web.default.svc.cluster.local"


def _workload(w: Workload, node: str, bindings: str = "") -> str:
    return (f"- uid: {uid(w)}\n"
            f"  name: {w.name}\n  namespace: {w.namespace}\n"
            f"  serviceAccount: {w.service_account}\n"
            f"  workloadIps: [\"{ip(w)}\"]\n  protocol: HBONE\n  node: {node}\n"
            f"  services: {{{bindings}}}\n")


def uid(w: Workload) -> str:
    return f"Kubernetes//v1/Pod/{w.namespace}/{w.name}"


def _service(name: str, vip: str, port: int = 80, target: int = APP_PORT) -> str:
    return (f"- name: {name}\n  namespace: default\n"
            f"  hostname: {name}.default.svc.cluster.local\n"
            f"  vips: [\"/{vip}\"]\n  ports: {{{port}: {target}}}\n")


def _endpoint(w: Workload, status: str) -> str:
    return (f"    {uid(w)}: {{workloadUid: {uid(w)}, port: {{80: {APP_PORT}}}, "
            f"status: {status}}}\n")


WEB_BINDING = f'"default/{WEB}": {{80: {APP_PORT}}}'
MODEL_YAML = (
    "workloads:\n"
    + _workload(A1, "node1", WEB_BINDING)
    + _workload(B1, "node1")
    + _workload(A2, "node2", WEB_BINDING)
    + _workload(B2, "node2", WEB_BINDING
                + f', "default/mapped.default.svc.cluster.local": {{8000: {APP_PORT}}}')
    + "- uid: Kubernetes//v1/Pod/default/outside\n  name: outside\n  namespace: default\n"
      f"  workloadIps: [\"{EXTERNAL}\"]\n  protocol: TCP\n"
      f"  services: {{\"default/plain.default.svc.cluster.local\": {{80: {APP_PORT}}}}}\n"
    + "services:\n"
    + _service("web", "10.96.0.10")
    + _service("sick", "10.96.0.11")
    + "  endpoints:\n" + _endpoint(A2, "Unhealthy") + _endpoint(B2, "Healthy")
    + _service("empty", "10.96.0.12")
    + _service("plain", "10.96.0.13")
    + _service("mapped", "10.96.0.14", port=8000, target=0)
)


def model() -> Model:
    return load_model_text(MODEL_YAML, "model.yaml")


def one(entries: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(entries) == 1, entries
    return entries[0]


def test_vip_goes_over_hbone_to_an_endpoint_with_its_target_port(
        tmp_path: Path, mesh_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca, model=model(), rng_seed=1) as m:
            seen: Counter[str] = Counter()
            for _ in range(24):
                peer, data = await echo(*await m.node1.capture(ip(A1), "10.96.0.10", 80))
                assert (peer, data) == (ip(A1), b"ping")
            await m.node1.drain()
            for entry in m.node1.closed(direction="outbound"):
                assert entry["service"] == WEB and entry["original_dst"] == "10.96.0.10:80"
                assert entry["result"] == "ok"
                seen[entry["dst"]] += 1
                expected_path = "hbone-local" if entry["dst"].startswith(ip(A1)) else "hbone"
                assert entry["path"] == expected_path
            # Every endpoint on both nodes takes some connections, each at the target port.
            assert set(seen) == {f"{ip(w)}:{APP_PORT}" for w in (A1, A2, B2)}, seen
            # node2's inbound got the endpoint's :authority (IP:target port) for its pods.
            await until("node2 logs", lambda: len(m.node2.closed(direction="inbound"))
                        == seen[f"{ip(A2)}:{APP_PORT}"] + seen[f"{ip(B2)}:{APP_PORT}"])
            for entry in m.node2.closed(direction="inbound"):
                assert entry["dst"] in (f"{ip(A2)}:{APP_PORT}", f"{ip(B2)}:{APP_PORT}")
                assert entry["src_identity"] == A1.identity
            # The Istio metrics name the service.
            assert m.node1.metric(OPENED, reporter="source", destination_service=WEB,
                                  destination_service_name="web",
                                  destination_service_namespace="default") == 24

    run(main())


def test_forwarded_header_names_the_service_host(tmp_path: Path, mesh_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca, model=model()) as m:
            sent: list[list[tuple[str, str]]] = []
            pool = m.node1.inputs.pool
            original = pool.open_stream

            async def spy(**kw: Any) -> Any:
                sent.append([*kw["extra_headers"], ("forwarded_for", kw["forwarded_for"])])
                assert kw["authority"] in (f"{ip(A2)}:{APP_PORT}", f"{ip(B2)}:{APP_PORT}")
                assert kw["peer"][1] == m.ports["hbone"]
                return await original(**kw)

            pool.open_stream = spy
            await echo(*await m.node1.capture(ip(B1), "10.96.0.11", 80))
            await m.node1.drain()
            headers = dict(sent[0])
            assert headers["forwarded"] == f'for="{ip(B1)}";host=sick.default.svc.cluster.local'
            assert headers["forwarded_for"] is None  # one Forwarded header, not two

    run(main())


def test_unhealthy_endpoint_is_skipped(tmp_path: Path, mesh_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca, model=model()) as m:
            for _ in range(8):
                await echo(*await m.node1.capture(ip(A1), "10.96.0.11", 80))
            await m.node1.drain()
            dsts = {e["dst"] for e in m.node1.closed(direction="outbound")}
            assert dsts == {f"{ip(B2)}:{APP_PORT}"}

    run(main())


def test_no_endpoints_resets_the_client_and_counts_uh(tmp_path: Path,
                                                        mesh_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca, model=model()) as m:
            reader, writer = await m.node1.capture(ip(A1), "10.96.0.12", 80)
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            await m.node1.drain()
            entry = one(m.node1.closed(direction="outbound"))
            assert entry["result"] == "no_healthy_upstream"
            assert entry["response_flags"] == "UH"
            assert entry["service"] == "empty.default.svc.cluster.local"
            assert "no endpoints" in entry["reason"]
            assert m.node1.metric(FAILED, response_flags="UH",
                                  destination_service_name="empty") == 1
            # A port the service does not have is no healthy upstream either.
            reader, writer = await m.node1.capture(ip(A1), "10.96.0.10", 81)
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            await m.node1.drain()
            assert "no such port" in m.node1.closed(result="no_healthy_upstream")[-1]["reason"]

    run(main())


def test_plaintext_endpoint_is_dialed_directly(tmp_path: Path, mesh_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca, model=model()) as m:
            peer, _ = await echo(*await m.node1.capture(ip(A1), "10.96.0.13", 80))
            assert peer == ip(A1)
            await m.node1.drain()
            entry = one(m.node1.closed(direction="outbound"))
            assert entry["path"] == "passthrough" and entry["dst"] == f"{EXTERNAL}:{APP_PORT}"
            assert entry["service"] == "plain.default.svc.cluster.local"

    run(main())


def test_per_endpoint_target_port(tmp_path: Path, mesh_ca: MeshCA) -> None:
    async def main() -> None:
        async with start_mesh(tmp_path, ca=mesh_ca, model=model()) as m:
            await echo(*await m.node1.capture(ip(A1), "10.96.0.14", 8000))
            await m.node1.drain()
            entry = one(m.node1.closed(direction="outbound"))
            assert entry["dst"] == f"{ip(B2)}:{APP_PORT}" and entry["path"] == "hbone"

    run(main())


def test_hostname_authority_resolves_through_the_model(tmp_path: Path) -> None:
    node2_pods = [A2, B2]
    cluster, _ = build_cluster(model(), node2_pods, node="node2", trust_domain=TRUST_DOMAIN)
    entry = cluster.service("mapped.default.svc.cluster.local", "default")
    assert entry is not None and entry.target_port(8000, ip(B2)) == APP_PORT
    assert entry.target_port(8000, ip(A2)) is None  # a2 does not back "mapped"
    web = cluster.service(WEB, "default")
    assert web is not None and web.target_port(80, ip(A2)) == APP_PORT
    # node1's pods are remote for node2, with identities from the model.
    remote = cluster.remote(ip(A1))
    assert remote is not None and remote.identity == A1.identity
    assert cluster.remote(ip(A2)) is None  # local to node2


def test_file_workloads_reads_the_model_and_keeps_the_last_good(tmp_path: Path) -> None:
    state = tmp_path / "workloads.json"
    model_file = tmp_path / "model.yaml"
    model_file.write_text(MODEL_YAML)
    source = FileWorkloads(state, model_file=model_file, node="node1",
                           trust_domain=TRUST_DOMAIN)
    source.refresh()
    cluster = source.cluster()
    assert cluster is not None and cluster.is_vip("10.96.0.10")
    assert source.is_mesh_destination("10.96.0.10")
    assert source.remote(ip(A2)) is not None
    # The model claims a1/b1 on node1, but nothing is enrolled here: they are dropped.
    assert cluster.workload_at(ip(A1)) is None
    # The agent enrolls a1 here: the merged model has it on node1, with its binding.
    state.write_text(json.dumps({"version": 1, "workloads": [{
        "name": A1.name, "namespace": A1.namespace, "service_account": A1.service_account,
        "addresses": list(A1.addresses), "labels": {}, "identity": A1.identity}]}))
    source.refresh()
    cluster = source.cluster()
    assert cluster is not None
    enrolled = cluster.workload_at(ip(A1))
    assert enrolled is not None and enrolled.node == "node1" and enrolled.services
    assert source.remote(ip(A1)) is None and source.local(ip(A1)) is not None
    model_file.write_text("workloads: [{uid: x}]\n")
    source.refresh()
    assert source.cluster() is cluster  # rejected: the last good model stays


class FakeResolver(asyncio.DatagramProtocol):
    """An upstream resolver on loopback: every A question is 192.0.2.53."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.questions: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        self.questions.append(query.question[0].name.to_text())
        reply = dns.message.make_response(query)
        reply.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A",
                                                "192.0.2.53"))
        assert self.transport is not None
        self.transport.sendto(reply.to_wire(), addr)


async def ask(name: str, port: int, source: str, *, tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, "A")
    if tcp:
        return await dns.asyncquery.tcp(query, "127.0.0.1", port=port, source=source,
                                        timeout=5)
    return await dns.asyncquery.udp(query, "127.0.0.1", port=port, source=source, timeout=5)


def addresses(reply: dns.message.Message) -> set[str]:
    return {item.address for rrset in reply.answer if rrset.rdtype == dns.rdatatype.A
            for item in rrset}


def test_tunnel_dns_answers_service_names_and_forwards_the_rest(
        tmp_path: Path, mesh_ca: MeshCA) -> None:
    async def main() -> None:
        dns_port, upstream_port = free_ports(2, ["127.0.0.1"])
        loop = asyncio.get_running_loop()
        transport, resolver = await loop.create_datagram_endpoint(
            FakeResolver, local_addr=("127.0.0.1", upstream_port))
        try:
            async with start_mesh(tmp_path, ca=mesh_ca, model=model(), dns_port=dns_port,
                                  dns_upstreams=(f"127.0.0.1:{upstream_port}",)) as m:
                assert m.node1.tunnel.dns is not None
                for tcp in (False, True):
                    reply = await ask(WEB, dns_port, ip(A1), tcp=tcp)
                    assert reply.rcode() == dns.rcode.NOERROR
                    assert addresses(reply) == {"10.96.0.10"}
                    assert reply.flags & dns.flags.AA
                # Asked again: the answer cache, with this query's id (dnspython checks it).
                dns_proxy = m.node1.tunnel.dns.proxy
                hits = dns_proxy.cache_hits
                assert addresses(await ask(WEB, dns_port, ip(A1))) == {"10.96.0.10"}
                assert dns_proxy.cache_hits == hits + 1
                # The short name from a pod in "default" (its search path).
                assert addresses(await ask("web.default", dns_port, ip(A1))) == {"10.96.0.10"}
                # Anything else goes to the upstream resolver.
                other = await ask("example.org.", dns_port, ip(A1))
                assert addresses(other) == {"192.0.2.53"}
                assert resolver.questions == ["example.org."]
                # A client that is not a pod enrolled here: SERVFAIL (ztunnel's rule).
                stranger = await ask(WEB, dns_port, EXTERNAL)
                assert stranger.rcode() == dns.rcode.SERVFAIL
        finally:
            transport.close()

    run(main())
