"""Config: defaults, TOML, environment overrides, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import Config, ConfigError, from_mapping, load


def test_defaults_are_valid() -> None:
    cfg = Config().validate()
    assert cfg.tunnel.outbound_port == 15001
    assert cfg.tunnel.inbound_port == 15006
    assert cfg.tunnel.hbone_port == 15008
    assert cfg.agent.socket == "/run/meshagent/agent.sock"


def test_missing_default_file_means_defaults(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.setattr("agent.config.DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    assert load(env={}) == Config()


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "absent.toml", env={})


def test_toml_and_env_override(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[tunnel]\ninbound_mode = "strict"\n[datapath]\nexcluded_ports = [22, 53]\n')
    cfg = load(path, env={"MESHAGENT_AGENT_SOCKET": "/tmp/a.sock",
                          "MESHAGENT_DATAPATH_EXCLUDED_CIDRS": "10.0.0.0/8, fd00::/8",
                          "MESHAGENT_DATAPATH_CAPTURE_MARK": "0x120000"})
    assert cfg.tunnel.inbound_mode == "strict"
    assert cfg.datapath.excluded_ports == (22, 53)
    assert cfg.agent.socket == "/tmp/a.sock"
    assert cfg.datapath.excluded_cidrs == ("10.0.0.0/8", "fd00::/8")
    assert cfg.datapath.capture_mark == 0x120000


@pytest.mark.parametrize(("data", "message"), [
    ({"tunnel": {"outbound_port": 0}}, "outbound_port=0"),
    ({"tunnel": {"inbound_port": 15001}}, "must all differ"),
    ({"tunnel": {"inbound_mode": "open"}}, "permissive"),
    ({"tunnel": {"mode": "vpn"}}, "hbone"),
    ({"datapath": {"excluded_cidrs": ["10.0.0.300/8"]}}, "not a CIDR"),
    ({"datapath": {"excluded_ports": [70000]}}, "not a port"),
    ({"datapath": {"capture_mark": 0x1, "capture_mask": 0xFF00}}, "outside"),
    ({"agent": {"sockett": "/x"}}, "unknown key"),
    ({"agentt": {}}, "unknown section"),
    ({"tunnel": {"outbound_port": "x"}}, "not an integer"),
    ({"tunnel": {"connect_timeout_seconds": "soon"}}, "not a number"),
    ({"tunnel": {"drain_seconds": -1}}, r"drain_seconds=-1.*TimeoutStopSec"),
    ({"tunnel": {"drain_seconds": 60}}, r"drain_seconds=60.*use 0\.\.20"),
])
def test_bad_values_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_mapping(data, env={})


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[tunnel\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load(path, env={})
