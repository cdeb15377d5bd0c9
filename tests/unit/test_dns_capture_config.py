"""DNS capture settings: the pod_add opt-out field, the config keys and resolvers."""

from __future__ import annotations

import pytest

from agent.config import ConfigError, from_mapping, resolver_address
from agent.contracts.api import PodAdd, RequestError, parse_request
from agent.dns.captured import (
    IP_ORIGDSTADDR,
    IPV6_ORIGDSTADDR,
    SOL_IP,
    SOL_IPV6,
    original_destination,
)


def test_pod_add_dns_capture_opt_out() -> None:
    req = parse_request({"op": "pod_add", "netns": "p1", "dns_capture": False})
    assert isinstance(req, PodAdd) and req.dns_capture is False
    assert parse_request({"op": "pod_add", "netns": "p1"}).dns_capture is None  # type: ignore[union-attr]
    with pytest.raises(RequestError, match="dns_capture must be bool"):
        parse_request({"op": "pod_add", "netns": "p1", "dns_capture": "false"})
    with pytest.raises(RequestError, match="labels must be dict"):  # bools stay refused elsewhere
        parse_request({"op": "pod_add", "netns": "p1", "labels": True})


def test_dns_config() -> None:
    cfg = from_mapping({"datapath": {"dns_capture": True},
                        "tunnel": {"dns_upstreams": ["10.96.0.10", "[fd00::a]:5353"]}})
    assert cfg.tunnel.dns_port == 15053 and cfg.datapath.dns_capture
    with pytest.raises(ConfigError, match=r"needs tunnel\.dns_port"):
        from_mapping({"datapath": {"dns_capture": True}, "tunnel": {"dns_port": 0}})
    with pytest.raises(ConfigError, match="must all differ"):
        from_mapping({"tunnel": {"dns_port": 15001}})
    with pytest.raises(ConfigError, match="not a resolver address"):
        from_mapping({"tunnel": {"dns_upstreams": ["dns.example"]}})


@pytest.mark.parametrize(("text", "expected"), [
    ("10.0.0.10", ("10.0.0.10", 53)), ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("fd00::10", ("fd00::10", 53)), ("[fd00::10]:54", ("fd00::10", 54))])
def test_resolver_address(text: str, expected: tuple[str, int]) -> None:
    assert resolver_address(text) == expected


@pytest.mark.parametrize("text", ["", "[fd00::1", "1.2.3.4:0", "1.2.3.4:x", "[::1]x"])
def test_bad_resolver_address(text: str) -> None:
    with pytest.raises(ConfigError):
        resolver_address(text)


def test_original_destination_from_ancillary_data() -> None:
    v4 = b"\x02\x00" + (53).to_bytes(2, "big") + bytes([10, 96, 0, 10]) + b"\0" * 8
    assert original_destination([(SOL_IP, IP_ORIGDSTADDR, v4)]) == ("10.96.0.10", 53)
    v6 = (b"\x0a\x00" + (53).to_bytes(2, "big") + b"\0" * 4
          + bytes.fromhex("fd000000000000000000000000000010") + b"\0" * 4)
    assert original_destination([(SOL_IPV6, IPV6_ORIGDSTADDR, v6)]) == ("fd00::10", 53)
    assert original_destination([(SOL_IP, IP_ORIGDSTADDR, b"\x02")]) is None
    assert original_destination([]) is None
