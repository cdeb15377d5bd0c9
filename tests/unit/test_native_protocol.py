"""The Python side of the native datapath's control protocol v2 (pure), and the build
stamp the driver checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.tunnel.native import driver
from agent.tunnel.native.protocol import (
    PROTOCOL_VERSION,
    CertificatesApplied,
    CertificatesUpdate,
    ConnectionRecord,
    DatapathConfig,
    HboneConnectionClosed,
    InboundListener,
    OutboundListener,
    Outcome,
    PolicyApplied,
    PolicySnapshot,
    ProtocolError,
    Ready,
    Workload,
    parse_event,
)


def test_config_message_is_one_versioned_line() -> None:
    cfg = DatapathConfig(
        trust_domain="cluster.local", roots="/ca.pem",
        inbound=(InboundListener("hbone", "0.0.0.0:15008", "/c", "/k",
                                 destinations=("10.0.0.1:80",),
                                 workload=Workload("ns", {"app": "a"})),),
        outbound=(OutboundListener("out", "127.0.0.1:0", "10.0.0.2:15008", "10.0.0.2:80",
                                   "/c", "/k", peer_identities=("spiffe://cluster.local/ns/a/sa/b",)),))
    text = cfg.to_json()
    assert "\n" not in text
    obj = json.loads(text)
    assert obj["version"] == PROTOCOL_VERSION
    assert obj["inbound"][0]["destinations"] == ["10.0.0.1:80"]
    assert obj["outbound"][0]["forwarded_for"] is True
    assert obj["outbound"][0]["baggage"] is None
    assert obj["inbound"][0]["workload"] == {"namespace": "ns", "labels": {"app": "a"}}


def test_inbound_listener_without_workload_is_refused() -> None:
    cfg = DatapathConfig("cluster.local", "/ca.pem",
                         inbound=(InboundListener("hbone", "0.0.0.0:15008", "/c", "/k"),))
    with pytest.raises(ValueError, match="workload"):
        cfg.to_json()


def test_policy_snapshot_message_and_its_acknowledgement() -> None:
    rules = {"format": "meshagent.policy.compiled", "version": 1, "policies": []}
    text = PolicySnapshot(3, rules).to_json()
    assert "\n" not in text
    assert json.loads(text) == {"message": "policy", "version": 3, "rules": rules}
    assert parse_event('{"v":2,"event":"policy_applied","version":3,"policies":0,'
                       '"revoked":1}') == PolicyApplied(3, 0, 1)


def test_certificates_message_and_its_acknowledgement() -> None:
    update = CertificatesUpdate("spiffe://cluster.local/ns/a/sa/b", "/c.pem", "/k.pem")
    assert json.loads(update.to_json()) == {
        "message": "certificates", "identity": "spiffe://cluster.local/ns/a/sa/b",
        "cert": "/c.pem", "key": "/k.pem"}
    assert parse_event('{"v":2,"event":"certificates_applied","identity":"spiffe://x",'
                       '"listeners":2}') == CertificatesApplied("spiffe://x", 2)


def test_parse_events() -> None:
    assert parse_event('{"v":2,"event":"ready","listeners":{"hbone":"127.0.0.1:1"},'
                       '"workers":2}') == Ready({"hbone": "127.0.0.1:1"}, 2)
    record = parse_event(json.dumps({
        "v": 2, "event": "connection", "direction": "inbound", "listener": "hbone",
        "src": "10.0.0.1:5", "dst": "10.0.0.2:80", "peer_identity": None,
        "outcome": "socket_reset", "status": 200, "bytes_to_destination": 5,
        "bytes_from_destination": 0, "duration_us": 12}))
    assert isinstance(record, ConnectionRecord)
    assert record.outcome is Outcome.SOCKET_RESET
    assert parse_event('{"v":2,"event":"hbone_connection_closed","listener":"h",'
                       '"peer":"p","reason":"r"}') == HboneConnectionClosed("h", "p", "r")


@pytest.mark.parametrize("line", [
    "not json", "[]", '{"v":1,"event":"ready","listeners":{},"workers":1}',
    '{"v":2,"event":"policy_applied","version":1}',
    '{"v":2,"event":"what"}', '{"v":2,"event":"connection","direction":"inbound"}',
    '{"v":2,"event":"connection","direction":"in","listener":"h","src":"","dst":"",'
    '"outcome":"exploded","status":0,"bytes_to_destination":0,'
    '"bytes_from_destination":0,"duration_us":0}',
])
def test_unreadable_events_are_protocol_errors(line: str) -> None:
    with pytest.raises(ProtocolError):
        parse_event(line)


def test_stale_or_missing_build_is_an_error_not_a_fallback(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.delenv(driver.BINARY_ENV, raising=False)
    crate = tmp_path / "native"
    (crate / "src").mkdir(parents=True)
    (crate / "Cargo.toml").write_text("[package]\n")
    (crate / "Cargo.lock").write_text("")
    (crate / "src" / "main.rs").write_text("fn main() {}\n")
    with pytest.raises(driver.NativeDatapathError, match="not built"):
        driver.binary_path(crate)
    binary = crate / "target" / "release" / "meshagent-datapath"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    (crate / "target" / driver.STAMP_NAME).write_text(driver.source_digest(crate) + "\n")
    assert driver.binary_path(crate) == binary
    (crate / "src" / "main.rs").write_text("fn main() { changed() }\n")
    with pytest.raises(driver.NativeDatapathError, match="older than its sources"):
        driver.binary_path(crate)


def test_checked_in_build_matches_sources() -> None:
    """scripts/setup.sh built the datapath from exactly these sources (same digest)."""
    assert driver.binary_path().exists()
