"""`meshagent model check FILE`."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from agent.cli import main

DATA = Path(__file__).parent / "data"
GOOD = (DATA / "model" / "web.yaml").read_text()
LOCAL_CONFIG_SAMPLE = DATA / "local-config" / "two-nodes.yaml"


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["model", "check", *args])
    return result.exit_code, result.stdout, result.stderr


def test_check_prints_what_the_file_holds(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(GOOD)
    code, out, _ = run(str(path))
    assert code == 0, out
    assert f"{path}: valid: 2 workloads, 1 services" in out
    assert "default/web  web.default.svc.cluster.local  vips=/10.96.0.10,/fd00:96::10" in out
    assert "ports=80->8080, 443->per-endpoint  lb=Failover(Network,Region,Zone)" in out
    assert "endpoint c1//v1/Pod/default/web-1  10.0.1.5,fd00::1:5  node=node1  HBONE  " \
           "healthy" in out
    assert "endpoint c1//v1/Pod/default/web-2  10.0.2.5  node=node2  TCP  UNHEALTHY" in out


def test_check_json(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(GOOD)
    code, out, _ = run(str(path), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["valid"] and data["schema"] == "meshagent.model-check/v1"
    (svc,) = data["services"]
    assert svc["vips"] == ["/10.96.0.10", "/fd00:96::10"]
    assert [e["healthy"] for e in svc["endpoints"]] == [True, False]


def test_check_bad_file_exits_2_with_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD.replace("protocol: HBONE", "protocol: UDP").replace(
        "/10.96.0.10", "/10.0.1.5"))
    code, _, err = run(str(path))
    assert code == 2
    assert f"{path}: workloads[0].protocol (workload c1//v1/Pod/default/web-1)" in err
    assert "invalid (1 problems)" in err or "invalid (2 problems)" in err
    code, out, _ = run(str(path), "--json")
    assert code == 2 and not json.loads(out)["valid"]


def test_check_refuses_ztunnel_policies_and_missing_files(tmp_path: Path) -> None:
    code, _, err = run(str(LOCAL_CONFIG_SAMPLE))
    assert code == 2 and "ztunnel-format authorization policies" in err
    code, _, err = run(str(tmp_path / "nope.yaml"))
    assert code == 2 and "cannot read the file" in err


def test_check_warns_about_dangling_references(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(GOOD.replace('"default/web.default.svc.cluster.local": {80: 8080}\n- uid',
                                 '"default/nope.default.svc.cluster.local": {80: 8080}\n- uid'))
    code, out, _ = run(str(path))
    assert code == 0
    assert "warning: workload c1//v1/Pod/default/web-1 backs " \
           "default/nope.default.svc.cluster.local, which the file does not define" in out
