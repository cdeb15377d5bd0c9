"""An in-process two-node mesh on loopback, for tunnel tests without root.

Two real :class:`~agent.tunnel.main.Tunnel` objects run in the test's event loop
with a test CA, :class:`StaticWorkloads`, a non-transparent dialer and listeners
bound to loopback addresses (every 127.0.0.0/8 address is local, so binding a
"pod" address needs no privilege):

    node1: a1 127.0.1.1 (default/sa-a), b1 127.0.1.2 (team-b/sa-b), node 127.0.1.254
    node2: a2 127.0.2.1 (default/sa-a2), b2 127.0.2.2 (team-b/sa-b), node 127.0.2.254
    outside the mesh: 127.0.3.1

Each tunnel listens on its pods' and its node's addresses on the same three
ports, so a connection to ``127.0.2.1:<hbone port>`` reaches node2's 15008
listener with the original destination as its local address, as the datapath's
sk_assign delivers it. What the datapath does on the way out (hand a pod's
connection to 15001 with the original destination as the local address) is
:meth:`Node.capture`. Pods' servers are asyncio servers on the pod addresses.
Access-log lines are recorded per node from the pipeline's own ``fields()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agent.config import Config, TunnelConfig
from agent.identity.ca import MeshCA, init_ca
from agent.identity.store import IdentityStore
from agent.model.types import Model
from agent.policy.loader import load_policy_dir
from agent.tunnel import inbound as inbound_plain
from agent.tunnel import outbound
from agent.tunnel.connection import ConnectionRecord
from agent.tunnel.dialer import TransparentDialer
from agent.tunnel.discovery import StaticWorkloads
from agent.tunnel.main import Tunnel
from agent.tunnel.workloads import ServiceEntry, Workload

TRUST_DOMAIN = "cluster.local"
APP_PORT = 18080


def identity(namespace: str, sa: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{sa}"


A1 = Workload("a1", "default", "sa-a", ("127.0.1.1",), identity("default", "sa-a"),
              {"app": "web", "version": "v1"})
B1 = Workload("b1", "team-b", "sa-b", ("127.0.1.2",), identity("team-b", "sa-b"))
A2 = Workload("a2", "default", "sa-a2", ("127.0.2.1",), identity("default", "sa-a2"),
              {"app": "api"})
B2 = Workload("b2", "team-b", "sa-b", ("127.0.2.2",), identity("team-b", "sa-b"))
NODE_IPS = {"node1": "127.0.1.254", "node2": "127.0.2.254"}
EXTERNAL = "127.0.3.1"
PODS = {"node1": (A1, B1), "node2": (A2, B2)}


def ip(w: Workload) -> str:
    return w.addresses[0]


def free_ports(count: int, addresses: list[str]) -> list[int]:
    """``count`` ports free on every one of ``addresses``, below the ephemeral range
    (so no outgoing connection of another test can take one before we bind it)."""
    rng = random.Random()
    ports: list[int] = []
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        if port in ports:
            continue
        socks = []
        try:
            for address in addresses:
                s = socket.socket()
                socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((address, port))
            ports.append(port)
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        if len(ports) == count:
            return ports
    raise RuntimeError(f"no {count} free ports on {addresses}")


def run(coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
    """Run ``coro`` on a fresh loop, failing (not hanging) after ``timeout`` seconds."""
    with asyncio.Runner() as runner:
        return runner.run(asyncio.wait_for(coro, timeout))


async def until(what: str, check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Poll ``check`` (bounded) until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.01)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[str, bytes]:
    """One exchange with a :class:`PeerEcho` server: (the client address it saw, what
    came back for ``ping`` and a FIN)."""
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.write(b"ping")
    writer.write_eof()
    rest = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return line.decode().strip().removeprefix("peer "), rest


def policy_yaml(name: str, action: str, rules: list[dict[str, Any]],
                namespace: str = "default") -> str:
    return json.dumps({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                       "metadata": {"name": name, "namespace": namespace},
                       "spec": {"action": action, "rules": rules}})


class PeerEcho:
    """A pod's server: sends ``peer <client ip>\\n``, then echoes until the client's FIN."""

    def __init__(self) -> None:
        self.servers: list[asyncio.Server] = []
        self.peers: list[str] = []

    async def start(self, address: str, port: int = APP_PORT) -> None:
        self.servers.append(await asyncio.start_server(self._serve, address, port))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        self.peers.append(peer)
        try:
            writer.write(f"peer {peer}\n".encode())
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    def close(self) -> None:
        for server in self.servers:
            server.close()


@dataclass
class Node:
    name: str
    tunnel: Tunnel = field(init=False)
    log: list[dict[str, Any]] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # Set to stop this node's tunnel (it drains, then Tunnel.run returns).
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    running: asyncio.Task[None] | None = None

    def record(self, rec: ConnectionRecord) -> None:
        """The node's access log: the pipeline's own fields, then the real log line."""
        self.log.append(rec.fields())
        rec.log()

    @property
    def inputs(self) -> Any:
        return self.tunnel.inputs

    @property
    def ip(self) -> str:
        return NODE_IPS[self.name]

    async def _handover(self, handler: Any, src_ip: str, dst: tuple[str, int]
                        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """What the datapath does: the client's connection, accepted by the tunnel
        with the original destination as its local address."""
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        lsock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            client = socket.socket()
            client.setblocking(False)
            client.bind((src_ip, 0))
            connecting = loop.create_task(loop.sock_connect(client, lsock.getsockname()))
            conn, peer = await loop.sock_accept(lsock)
            await connecting
        finally:
            lsock.close()
        conn.setblocking(False)
        task = loop.create_task(handler(self.inputs, conn, (peer[0], peer[1]), dst))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return await asyncio.open_connection(sock=client)

    async def capture(self, src_ip: str, dst_ip: str, dst_port: int = APP_PORT
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A pod's connection to ``dst``, captured into this node's 15001."""
        return await self._handover(outbound.handle, src_ip, (dst_ip, dst_port))

    async def plaintext_in(self, src_ip: str, dst_ip: str, dst_port: int = APP_PORT
                           ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A plaintext connection into a pod here, captured into this node's 15006."""
        return await self._handover(inbound_plain.handle, src_ip, (dst_ip, dst_port))

    def write_policy(self, name: str, text: str | None) -> None:
        directory = Path(self.tunnel.cfg.tunnel.policy_dir)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{name}.yaml"
        if text is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(text)
        # What the watcher does on its next poll, without waiting for it.
        self.inputs.policy.apply(load_policy_dir(directory, self.tunnel.cfg.tunnel.root_namespace))

    def closed(self, **match: Any) -> list[dict[str, Any]]:
        return [e for e in self.log if all(e.get(k) == v for k, v in match.items())]

    def metric(self, name: str, **labels: str) -> float:
        """Sum of ``name`` over every series whose labels include ``labels``."""
        total = 0.0
        for family in self.tunnel.collectors.collect():
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    total += sample.value
        return total

    async def drain(self) -> None:
        """Wait (bounded) until every connection handed to this node has finished."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=5)


@dataclass
class Mesh:
    ca: MeshCA
    node1: Node
    node2: Node
    ports: dict[str, int]
    servers: PeerEcho

    def node(self, name: str) -> Node:
        return self.node1 if name == "node1" else self.node2


def _listen_on(addresses: list[str]) -> Callable[[int], list[socket.socket]]:
    def listen(port: int) -> list[socket.socket]:
        out = []
        for address in addresses:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(64)
            sock.setblocking(False)
            out.append(sock)
        return out
    return listen


@contextlib.asynccontextmanager
async def start_mesh(tmp_path: Path, *, ca: MeshCA, inbound_mode: str = "permissive",
                     services: tuple[ServiceEntry, ...] = (),
                     extra_remote: tuple[Workload, ...] = (),
                     dialers: dict[str, Any] | None = None, mode: str = "hbone",
                     model: Model | None = None, rng_seed: int | None = None,
                     dns_port: int = 0, dns_upstreams: tuple[str, ...] = (),
                     extra_local: dict[str, tuple[Workload, ...]] | None = None,
                     drain_seconds: float = 5.0) -> AsyncIterator[Mesh]:
    """``extra_local``: more workloads enrolled per node (beyond PODS; no server)."""
    extra = extra_local or {}
    every_address = ([ip(w) for pods in PODS.values() for w in pods]
                     + [ip(w) for ws in extra.values() for w in ws] + list(NODE_IPS.values()))
    outbound_port, inbound_port, hbone_port = free_ports(3, every_address)
    ports = {"outbound": outbound_port, "inbound": inbound_port, "hbone": hbone_port}
    servers = PeerEcho()
    for pods in PODS.values():
        for w in pods:
            await servers.start(ip(w))
    await servers.start(EXTERNAL)
    nodes: dict[str, Node] = {}
    runs: list[asyncio.Task[None]] = []
    try:
        for name, base_pods in PODS.items():
            pods = (*base_pods, *extra.get(name, ()))
            others = tuple(w for n, ws in PODS.items() if n != name for w in ws)
            cfg = Config(tunnel=replace(
                TunnelConfig(), outbound_port=outbound_port, inbound_port=inbound_port,
                hbone_port=hbone_port, metrics_port=0, socket_mark=0, mode=mode,
                inbound_mode=inbound_mode, trust_domain=TRUST_DOMAIN,
                ca_dir=str(tmp_path / "ca"), connect_timeout_seconds=2.0,
                drain_seconds=drain_seconds,
                policy_dir=str(tmp_path / name / "policies"),
                dns_port=dns_port if name == "node1" else 0, dns_upstreams=dns_upstreams))
            cfg = replace(cfg, agent=replace(cfg.agent, state_dir=str(tmp_path / name)))
            (tmp_path / name).mkdir(parents=True, exist_ok=True)
            dialer = (dialers or {}).get(name) or TransparentDialer(0, 2.0, transparent=False)
            node = Node(name)
            tunnel = Tunnel(
                cfg, workloads=StaticWorkloads(
                    pods, () if model is not None else others + extra_remote, services,
                    model=model, node=name, trust_domain=TRUST_DOMAIN),
                dialer=dialer,
                listen=_listen_on([ip(w) for w in pods] + [NODE_IPS[name]]),
                identities=IdentityStore(ca) if mode == "hbone" else None,
                collectors=CollectorRegistry(), access_log=node.record,
                dns_hosts=("127.0.0.1",), dns_transparent=False)
            node.tunnel = tunnel
            if rng_seed is not None:
                tunnel.inputs.rng.seed(rng_seed)
            nodes[name] = node
            ready = asyncio.Event()
            running = asyncio.create_task(tunnel.run(node.stop, ready))
            node.running = running
            runs.append(running)
            waiting = asyncio.ensure_future(ready.wait())
            await asyncio.wait({waiting, running}, timeout=5,
                               return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            if running.done():
                running.result()  # raises why the tunnel could not start
            assert ready.is_set(), f"{name}'s tunnel did not start within 5 s"
        yield Mesh(ca, nodes["node1"], nodes["node2"], ports, servers)
    finally:
        for node in nodes.values():
            await node.drain()
        for node in nodes.values():
            node.stop.set()
        _, hung = await asyncio.wait(runs, timeout=10)
        assert not hung, "a tunnel did not stop within 10 s"
        servers.close()


@pytest.fixture(scope="session")
def mesh_ca(tmp_path_factory: pytest.TempPathFactory) -> MeshCA:
    return init_ca(tmp_path_factory.mktemp("mesh") / "ca", TRUST_DOMAIN)


@pytest.fixture(scope="session")
def foreign_ca(tmp_path_factory: pytest.TempPathFactory) -> MeshCA:
    return init_ca(tmp_path_factory.mktemp("foreign") / "ca", TRUST_DOMAIN)
