"""Policy in the running native datapath (control protocol v2): the compiled rule set
(``agent.policy.compile``) sent as versioned snapshots, each new inbound HBONE
connection decided before the pod is dialed (denied: 401, as the Python tunnel), live
connections revoked by a new snapshot (RST_STREAM CANCEL to the client, RST to the
destination, byte counts kept), a snapshot the datapath cannot read refused with the
previous one kept, and no snapshot at all = deny (fail closed).

Real peers on 127.0.0.1: the Python HBONE client (agent/hbone) against
``meshagent-datapath``, a TCP destination that records how each connection ended.
No root needed; every process and server is stopped by its context manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hbone_peers import WORKLOAD
from test_native_hbone import CLIENT, LOOPBACK, SERVER, TRUST_DOMAIN, config, inbound, pems, run

from agent.hbone.client import HboneClient
from agent.hbone.exceptions import HboneRejected, HboneStreamError
from agent.identity.ca import init_ca
from agent.identity.store import IdentityStore
from agent.policy.compile import compile_policy_set
from agent.policy.engine import PolicySet
from agent.policy.loader import parse_policy
from agent.tunnel.native.driver import NativeDatapath, PolicyRefused
from agent.tunnel.native.protocol import ConnectionRecord, Outcome, PolicySnapshot

CANCEL = 0x8
CLIENT_PRINCIPAL = f"{TRUST_DOMAIN}/ns/{CLIENT.namespace}/sa/{CLIENT.service_account}"


def document(name: str, action: str, principals: list[str]) -> dict[str, Any]:
    """An AuthorizationPolicy for the test workload (namespace and labels of WORKLOAD)."""
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": WORKLOAD.namespace},
            "spec": {"action": action, "selector": {"matchLabels": dict(WORKLOAD.labels)},
                     "rules": [{"from": [{"source": {"principals": principals}}]}]}}


def snapshot(version: int, *documents: dict[str, Any]) -> PolicySnapshot:
    return PolicySnapshot(version, compile_policy_set(
        PolicySet([parse_policy(d) for d in documents])))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> IdentityStore:
    return IdentityStore(init_ca(tmp_path_factory.mktemp("ca") / "ca", TRUST_DOMAIN))


ALLOW_CLIENT = document("allow-client", "ALLOW", [CLIENT_PRINCIPAL])
DENY_CLIENT = document("deny-client", "DENY", [CLIENT_PRINCIPAL])


@dataclasses.dataclass
class Destination:
    """An echo server that records how each connection ended: ``eof`` or ``reset``."""

    address: str = ""
    ends: list[str] = dataclasses.field(default_factory=list)
    received: int = 0


@contextlib.asynccontextmanager
async def destination() -> AsyncIterator[Destination]:
    dest = Destination()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                dest.received += len(data)
                writer.write(data)
                await writer.drain()
            dest.ends.append("eof")
        except ConnectionResetError:
            dest.ends.append("reset")
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, LOOPBACK, 0)
    host, port = server.sockets[0].getsockname()[:2]
    dest.address = f"{host}:{port}"
    try:
        yield dest
    finally:
        server.close()


@contextlib.asynccontextmanager
async def setup(store: IdentityStore, tmp: Path, policy: PolicySnapshot | None
                ) -> AsyncIterator[tuple[NativeDatapath, HboneClient, Destination]]:
    files = pems(tmp, store.get(SERVER), "server")
    async with destination() as dest:
        cfg = config(files, inbound_=(inbound(files, dest.address),))
        async with NativeDatapath(cfg, policy=policy) as dp:
            client = await HboneClient.connect(dp.address("hbone"),
                                               store.client_context(CLIENT),
                                               trust_domain=TRUST_DOMAIN, expected_peer=SERVER)
            try:
                yield dp, client, dest
            finally:
                await client.close()


async def exchange(client: HboneClient, dest: Destination, payload: bytes) -> bytes:
    stream = await client.open_stream(dest.address)
    await stream.write(payload)
    await stream.close_write()
    received = bytearray()
    while data := await stream.read():
        received += data
    return bytes(received)


async def denied(client: HboneClient, dest: Destination) -> None:
    with pytest.raises(HboneRejected) as rejected:
        await client.open_stream(dest.address)
    assert rejected.value.status == 401


def test_allow_then_deny_names_the_deciding_policy(store: IdentityStore,
                                                   tmp_path: Path) -> None:
    async def main() -> list[ConnectionRecord]:
        async with setup(store, tmp_path, snapshot(1, ALLOW_CLIENT)) as (dp, client, dest):
            assert await exchange(client, dest, b"allowed") == b"allowed"
            applied = await dp.apply_policy(snapshot(2, ALLOW_CLIENT, DENY_CLIENT))
            assert (applied.version, applied.policies, applied.revoked) == (2, 2, 0)
            await denied(client, dest)
            records = await dp.connection_records(2)
            assert dest.ends == ["eof"]  # the denied stream dialed nothing
            return records

    allowed, refused = run(main())
    assert allowed.outcome is Outcome.CLOSED and allowed.status == 200
    assert allowed.policy == "default/allow-client"
    assert refused.outcome is Outcome.DENIED and refused.status == 401
    assert refused.policy == "default/deny-client"
    assert refused.reason == "denied by DENY policy default/deny-client rule 0"
    assert refused.peer_identity == str(CLIENT)
    assert refused.bytes_to_destination == refused.bytes_from_destination == 0


def test_no_snapshot_denies_everything(store: IdentityStore, tmp_path: Path) -> None:
    async def main() -> ConnectionRecord:
        async with setup(store, tmp_path, None) as (dp, client, dest):
            await denied(client, dest)
            (record,) = await dp.connection_records(1)
            assert dest.ends == []
            # The first snapshot opens it.
            await dp.apply_policy(snapshot(1))
            assert await exchange(client, dest, b"now") == b"now"
            return record

    record = run(main())
    assert record.outcome is Outcome.DENIED and record.status == 401
    assert record.policy is None
    assert record.reason == "denied: no policy snapshot received yet (fail closed)"


def test_new_snapshot_revokes_live_connection(store: IdentityStore, tmp_path: Path) -> None:
    payload = b"x" * 100_000

    async def main() -> tuple[ConnectionRecord, int, Destination]:
        async with setup(store, tmp_path, snapshot(1, ALLOW_CLIENT)) as (dp, client, dest):
            kept = await client.open_stream(dest.address)
            await kept.write(payload)
            echoed = bytearray()
            while len(echoed) < len(payload):
                data = await kept.read()
                assert data, "echo ended early"
                echoed += data
            applied = await dp.apply_policy(snapshot(2, DENY_CLIENT))
            assert applied.revoked == 1
            with pytest.raises(HboneStreamError) as reset:
                while await kept.read():
                    pass
            (record,) = await dp.connection_records(1)
            for _ in range(100):  # the destination's reader sees the RST
                if dest.ends:
                    break
                await asyncio.sleep(0.05)
            return record, getattr(reset.value, "error_code", -1), dest

    record, code, dest = run(main())
    assert code == CANCEL
    assert dest.ends == ["reset"]
    assert record.outcome is Outcome.DENIED and record.status == 200
    assert record.policy == "default/deny-client"
    assert record.reason == "denied by DENY policy default/deny-client rule 0"
    assert record.bytes_to_destination == len(payload) == dest.received
    assert record.bytes_from_destination == len(payload)


@pytest.mark.parametrize("bad", [
    # a rule set with a field the evaluator does not know
    '{"message":"policy","version":2,"rules":{"format":"meshagent.policy.compiled",'
    '"version":1,"policies":[],"allow_all":true}}',
    # a newer compiled-form version
    '{"message":"policy","version":2,"rules":{"format":"meshagent.policy.compiled",'
    '"version":9,"policies":[]}}',
    # not newer than the applied snapshot
    '{"message":"policy","version":1,"rules":{"format":"meshagent.policy.compiled",'
    '"version":1,"policies":[]}}',
    # an unknown field in the message, an unknown message
    '{"message":"policy","version":2,"rules":{},"force":true}',
    '{"message":"drain"}',
    "not json",
])
def test_unreadable_snapshot_refused_previous_kept(store: IdentityStore, tmp_path: Path,
                                                   bad: str) -> None:
    class Raw(PolicySnapshot):
        def to_json(self) -> str:
            return bad

    async def main() -> tuple[str, list[ConnectionRecord]]:
        async with setup(store, tmp_path, snapshot(1, DENY_CLIENT)) as (dp, client, dest):
            with pytest.raises(PolicyRefused) as refused:
                await dp.apply_policy(Raw(0, {}))
            await denied(client, dest)  # the DENY of snapshot 1 still holds
            applied = await dp.apply_policy(snapshot(3, ALLOW_CLIENT))
            assert applied.version == 3
            assert await exchange(client, dest, b"ok") == b"ok"
            return str(refused.value), await dp.connection_records(2)

    message, (still_denied, allowed) = run(main())
    assert "refused" in message
    assert still_denied.outcome is Outcome.DENIED
    assert still_denied.policy == "default/deny-client"
    assert allowed.policy == "default/allow-client"
