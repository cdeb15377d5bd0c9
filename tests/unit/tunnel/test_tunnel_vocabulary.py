"""The tunnel's pure pieces: outcomes and their response flags, headers, tracker,
start-up errors (agent/tunnel/{outcome,headers,tracker,main}.py)."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import ip_address
from pathlib import Path

from click.testing import CliRunner

from agent.cli import main as cli
from agent.policy import ConnectionRequest, Decision, WorkloadRef
from agent.telemetry.metrics import RESPONSE_FLAGS
from agent.tunnel.headers import TraceParent, baggage_entries
from agent.tunnel.outcome import Outcome
from agent.tunnel.outcome import Path as TunnelPath
from agent.tunnel.tracker import ConnectionTracker
from agent.tunnel.workloads import Workload


def test_every_outcome_carries_a_ztunnel_flag() -> None:
    assert {o.response_flag for o in Outcome} <= RESPONSE_FLAGS
    assert Outcome.TLS_FAILED.response_flag == "TLS_FAILURE"
    assert Outcome.DENIED.response_flag == "DENY"
    assert Outcome.CONNECT_FAILED.response_flag == "CONNECT"
    # every outcome of a connection that never opened has a flag (metrics need one)
    assert all(o.response_flag != "-" for o in Outcome if not o.opened)
    assert [o for o in Outcome if o.opened] == [Outcome.OK, Outcome.RESET]
    assert {o for o in Outcome if o.policy_decision == "deny"} == {
        Outcome.DENIED, Outcome.REFUSED, Outcome.IDENTITY_ERROR, Outcome.TLS_FAILED,
        Outcome.NO_WAYPOINT, Outcome.WAYPOINT_LOOP, Outcome.WAYPOINT_UNRESOLVED}
    assert [p.value for p in TunnelPath if p.mtls] == ["hbone", "hbone-local", "waypoint"]


def test_traceparent_round_trip() -> None:
    trace = TraceParent.new()
    header = trace.header()
    assert len(header) == 55 and header.startswith("00-") and header.endswith("-00")
    assert TraceParent.parse(header) == trace
    assert TraceParent.parse("00-zz") is None and TraceParent.parse(None) is None
    assert TraceParent.from_header("garbage") != TraceParent.from_header("garbage")


def test_baggage_names_the_canonical_service_not_the_service_account() -> None:
    w = Workload("web-1", "shop", "web-sa", ("10.0.0.1",), "spiffe://td/ns/shop/sa/web-sa",
                 {"service.istio.io/canonical-name": "web", "app": "other",
                  "service.istio.io/canonical-revision": "v2"})
    assert baggage_entries(w) == [("k8s.namespace.name", "shop"), ("k8s.pod.name", "web-1"),
                                  ("service.name", "web"), ("service.version", "v2")]
    bare = Workload("db-0", "shop", "db", ("10.0.0.2",), "spiffe://td/ns/shop/sa/db")
    assert dict(baggage_entries(bare, cluster="c1")) == {
        "k8s.cluster.name": "c1", "k8s.namespace.name": "shop", "k8s.pod.name": "db-0",
        "service.name": "db-0", "service.version": "latest"}


def test_tracker_revokes_only_denied() -> None:
    tracker = ConnectionTracker()
    cancelled: list[str] = []
    req = {name: ConnectionRequest(src_ip=ip_address(f"10.0.0.{i}"), src_identity=None,
                                   dst_ip=ip_address("10.0.1.1"),
                                   dst_port=80, dst_workload=WorkloadRef("w", "ns", {}))
           for i, name in enumerate(("keep", "drop"))}
    def canceller(name: str) -> Callable[[], None]:
        return lambda: cancelled.append(name)

    entries = {name: tracker.track(r, canceller(name)) for name, r in req.items()}

    def evaluate(r: ConnectionRequest) -> Decision:
        return Decision(str(r.src_ip) != "10.0.0.1", "ns/p", None, "test")

    assert tracker.revoke(evaluate) == 1
    assert cancelled == ["drop"] and entries["drop"].revoked is not None
    assert entries["keep"].revoked is None and len(tracker) == 1
    tracker.release(entries["keep"])
    assert len(tracker) == 0


def test_tunnel_without_a_ca_says_what_to_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["tunnel"], env={
        "MESHAGENT_TUNNEL_CA_DIR": str(tmp_path / "no-ca"),
        "MESHAGENT_AGENT_STATE_DIR": str(tmp_path)})
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "meshagent ca init" in lines[0], result.output
    assert "Traceback" not in result.output
