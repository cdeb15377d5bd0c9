"""meshagent-cni without a kernel: the CNI env/config parsing, the decisions of
ADD/DEL/CHECK against a fake agent, the conflist runtime, and hypothesis
fuzzing that arbitrary input only ever yields a CNI error."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.api import client
from agent.cni import plugin, runtime, spec
from agent.cni.spec import CniError
from agent.contracts.api import ErrorCode

NETNS = "/run/netns/pod-x"
PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "veth1", "mac": "aa:bb:cc:dd:ee:ff"},
                   {"name": "eth0", "mac": "aa:bb:cc:dd:ee:00", "sandbox": NETNS}],
    "ips": [{"interface": 1, "address": "10.244.1.10/24", "gateway": "10.244.1.1"}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}


def env(command: str = "ADD", **overrides: str) -> dict[str, str]:
    base = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "abc123",
        "CNI_NETNS": NETNS,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0",
        "CNI_PATH": "/opt/cni/bin:/usr/lib/cni",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def conf(version: str = "1.0.0", prev: Any = PREV, **section: Any) -> bytes:
    data: dict[str, Any] = {"cniVersion": version, "name": "k8s", "type": "meshagent-cni",
                            "meshagent": {"agent_socket": "/run/test.sock", **section}}
    if prev is not None:
        data["prevResult"] = prev
    return json.dumps(data).encode()


def code_of(fn: Any, *args: Any) -> int:
    with pytest.raises(CniError) as info:
        fn(*args)
    return info.value.code


# -- environment ----------------------------------------------------------------


def test_cni_args_parsing() -> None:
    assert spec.parse_cni_args("") == {}
    assert spec.parse_cni_args("A=1; B = x=y ;;") == {"A": "1", "B": "x=y"}
    assert spec.parse_cni_args("K8S_POD_NAME=") == {"K8S_POD_NAME": ""}
    assert code_of(spec.parse_cni_args, "novalue") == spec.ERR_INVALID_ENV
    assert code_of(spec.parse_cni_args, "=x") == spec.ERR_INVALID_ENV


def test_env_add_complete() -> None:
    e = spec.parse_env(env())
    assert (e.command, e.container_id, e.netns, e.ifname) == ("ADD", "abc123", NETNS, "eth0")
    assert e.pod_identity() == ("shop", "web-0")
    assert e.path == ("/opt/cni/bin", "/usr/lib/cni")


@pytest.mark.parametrize("missing", ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS",
                                     "CNI_IFNAME", "CNI_ARGS"])
def test_env_add_missing_variable_is_code_4(missing: str) -> None:
    e = env()
    del e[missing]
    assert code_of(spec.parse_env, e) == spec.ERR_INVALID_ENV


@pytest.mark.parametrize("key,value", [
    ("CNI_COMMAND", "REMOVE"), ("CNI_CONTAINERID", "-bad"), ("CNI_CONTAINERID", "a/b"),
    ("CNI_IFNAME", "a" * 16), ("CNI_IFNAME", "eth/0"), ("CNI_NETNS", "relative/ns"),
    ("CNI_ARGS", "K8S_POD_NAMESPACE=Shop;K8S_POD_NAME=web"),
    ("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=Web_0"),
    ("CNI_ARGS", "K8S_POD_NAMESPACE=shop"), ("CNI_ARGS", "garbage"),
])
def test_env_invalid_values_are_code_4(key: str, value: str) -> None:
    assert code_of(spec.parse_env, env(**{key: value})) == spec.ERR_INVALID_ENV


def test_env_del_is_lenient_about_netns_and_pod() -> None:
    e = spec.parse_env(env("DEL", CNI_NETNS="", CNI_ARGS=""))
    assert e.netns == "" and e.pod_identity() is None
    e = spec.parse_env(env("DEL", CNI_ARGS="K8S_POD_NAMESPACE=Bad;K8S_POD_NAME=x"))
    assert e.pod_identity() is None  # nothing with such a name can be enrolled
    assert code_of(spec.parse_env, env("DEL", CNI_CONTAINERID="")) == spec.ERR_INVALID_ENV


def test_env_version_needs_nothing() -> None:
    assert spec.parse_env({"CNI_COMMAND": "VERSION"}).command == "VERSION"


# -- configuration --------------------------------------------------------------


def test_config_defaults() -> None:
    c = spec.parse_config(b'{"cniVersion": "0.4.0", "name": "n", "type": "meshagent-cni"}')
    assert c.cni_version == "0.4.0" and c.prev_result is None
    assert c.plugin == spec.PluginConfig()
    assert c.plugin.agent_socket == "/run/meshagent/agent.sock"
    assert c.plugin.enrolls("anything") and not c.plugin.fail_open
    assert c.plugin.service_account_for("x") == "default"


def test_config_plugin_section() -> None:
    c = spec.parse_config(conf(enrolled_namespaces=["shop", "web"], fail_open=True,
                               timeout_seconds=2, service_account="fallback",
                               log_file="/tmp/x.log",
                               service_account_patterns=[
                                   {"pod_name_pattern": "web-*", "service_account": "web"},
                                   {"pod_name_pattern": "*", "service_account": "catch"}]))
    p = c.plugin
    assert p.enrolls("shop") and p.enrolls("web") and not p.enrolls("kube-system")
    assert p.fail_open and p.timeout_seconds == 2.0 and p.log_file == "/tmp/x.log"
    assert p.service_account_for("web-0") == "web"  # first match wins
    assert p.service_account_for("db-0") == "catch"
    assert spec.parse_config(conf(service_account_patterns=[])).plugin \
        .service_account_for("web-0") == "default"
    assert not spec.parse_config(conf(enrolled_namespaces=[])).plugin.enrolls("default")


@pytest.mark.parametrize("data", [b"", b"{", b"\xff\xfe", b"[]", b"42", b"null", b'"s"',
                                  b"[" * 100000])
def test_undecodable_stdin_is_code_6(data: bytes) -> None:
    assert code_of(spec.parse_config, data) == spec.ERR_DECODE


@pytest.mark.parametrize("raw,code", [
    ({"name": "n"}, spec.ERR_INVALID_CONFIG),
    ({"cniVersion": 1, "name": "n"}, spec.ERR_INVALID_CONFIG),
    ({"cniVersion": "0.2.0", "name": "n"}, spec.ERR_INCOMPATIBLE_VERSION),
    ({"cniVersion": "9.9.9", "name": "n"}, spec.ERR_INCOMPATIBLE_VERSION),
    ({"cniVersion": "1.0.0"}, spec.ERR_INVALID_CONFIG),
    ({"cniVersion": "1.0.0", "name": "n", "type": 3}, spec.ERR_INVALID_CONFIG),
    ({"cniVersion": "1.0.0", "name": "n", "prevResult": []}, spec.ERR_INVALID_CONFIG),
    ({"cniVersion": "1.0.0", "name": "n", "meshagent": []}, spec.ERR_INVALID_CONFIG),
])
def test_invalid_config(raw: dict[str, Any], code: int) -> None:
    assert code_of(spec.parse_config, json.dumps(raw)) == code


@pytest.mark.parametrize("section", [
    {"unknown_key": 1}, {"agent_socket": "relative.sock"}, {"agent_socket": 5},
    {"enrolled_namespaces": "default"}, {"enrolled_namespaces": ["Bad_NS"]},
    {"enrolled_namespaces": [1]}, {"service_account": "UPPER"},
    {"service_account_patterns": {}}, {"service_account_patterns": [{"pod_name_pattern": "x"}]},
    {"service_account_patterns": [{"pod_name_pattern": "", "service_account": "a"}]},
    {"service_account_patterns": [{"pod_name_pattern": "x", "service_account": "A"}]},
    {"fail_open": "yes"}, {"fail_open": 1}, {"timeout_seconds": 0}, {"timeout_seconds": -1},
    {"timeout_seconds": True}, {"timeout_seconds": "5"}, {"timeout_seconds": 1e9},
    {"log_file": "relative.log"},
])
def test_invalid_plugin_section_is_code_7(section: dict[str, Any]) -> None:
    with pytest.raises(CniError) as info:
        spec.parse_config(conf(**section))
    err = info.value
    assert err.code == spec.ERR_INVALID_CONFIG
    assert "meshagent" in err.msg  # names the section/key


def test_nan_timeout_rejected() -> None:
    raw = b'{"cniVersion":"1.0.0","name":"n","meshagent":{"timeout_seconds":NaN}}'
    assert code_of(spec.parse_config, raw) == spec.ERR_INVALID_CONFIG


# -- results --------------------------------------------------------------------


def test_add_result_passes_prev_result_through_with_config_version() -> None:
    prev = {**PREV, "cniVersion": "0.4.0"}
    out = spec.add_result(spec.parse_config(conf("1.0.0", prev=prev)))
    assert out == {**PREV, "cniVersion": "1.0.0"}
    assert code_of(spec.add_result, spec.parse_config(conf(prev=None))) == \
        spec.ERR_INVALID_CONFIG


def test_check_needs_04() -> None:
    c = spec.parse_config(conf("0.3.1"))
    assert code_of(spec.check_command_version, c, "CHECK") == spec.ERR_INCOMPATIBLE_VERSION
    spec.check_command_version(c, "ADD")
    spec.check_command_version(spec.parse_config(conf("0.4.0")), "CHECK")


def test_version_and_error_json() -> None:
    assert spec.version_result() == {"cniVersion": "1.0.0",
                                     "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]}
    err = CniError(11, "try later", "start the agent")
    assert err.to_json("0.4.0") == {"cniVersion": "0.4.0", "code": 11, "msg": "try later",
                                    "details": "start the agent"}
    assert "details" not in CniError(7, "bad").to_json()


def test_pod_add_request() -> None:
    p = spec.parse_config(conf(enrolled_namespaces=["shop"], service_account_patterns=[
        {"pod_name_pattern": "web-*", "service_account": "web"}])).plugin
    assert spec.pod_add_request(spec.parse_env(env()), p) == {
        "op": "pod_add", "netns": NETNS, "ifname": "eth0", "name": "web-0",
        "namespace": "shop", "service_account": "web"}
    other = env(CNI_ARGS="K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns")
    assert spec.pod_add_request(spec.parse_env(other), p) is None


# -- the plugin against a fake agent ----------------------------------------------


def full_pod(pod: dict[str, Any]) -> dict[str, Any]:
    """``pod`` with the keys of an agent's pod (agent.contracts.api.PodInfo) it lacks."""
    return {"service_account": "default", "ifname": "eth0", "host_ifindex": 7,
            "host_ifname": "veth1", "addresses": ["10.244.1.10"], "labels": {},
            "created_clsact": True, **pod}


class FakeAgent:
    """Records requests; answers like agent/daemon.py (error codes included)."""

    def __init__(self, pods: list[dict[str, Any]] | None = None, down: bool = False,
                 refuse: str | None = None) -> None:
        self.pods = [full_pod(p) for p in pods] if pods is not None else []
        self.down = down
        self.refuse = refuse
        self.requests: list[dict[str, Any]] = []

    def __call__(self, sock: str, request: dict[str, Any], timeout: float) -> Any:
        assert sock == "/run/test.sock" and timeout > 0
        self.requests.append(request)
        if self.down:
            raise client.AgentUnavailable("the agent is not running (no listener)")
        op = request["op"]
        if op == "pod_list":
            return list(self.pods)
        if op == "pod_add":
            if self.refuse:
                raise client.AgentError(self.refuse, ErrorCode.CONFLICT)
            for p in self.pods:
                if (p["namespace"], p["name"]) == (request["namespace"], request["name"]):
                    raise client.AgentError(f"pod {p['namespace']}/{p['name']} is already "
                                            "enrolled; run 'meshagent pod del' first",
                                            ErrorCode.ALREADY_ENROLLED)
            pod = full_pod({k: request[k] for k in ("name", "namespace", "netns",
                                                    "service_account")})
            self.pods.append(pod)
            return pod
        if op == "pod_del":
            for p in self.pods:
                if (p["namespace"], p["name"]) == (request["namespace"], request["name"]):
                    self.pods.remove(p)
                    return p
            raise client.AgentError("no such enrolled pod; 'meshagent pod list' shows them",
                                    ErrorCode.NOT_ENROLLED)
        raise AssertionError(op)

    def ops(self) -> list[str]:
        return [r["op"] for r in self.requests]


def run(e: dict[str, str], stdin: bytes, agent: FakeAgent) -> plugin.Outcome:
    out = plugin.execute(e, stdin, agent)
    assert out.stdout == "" or out.stdout.endswith("\n")
    return out


def test_plugin_add_enrolls_and_passes_through() -> None:
    agent = FakeAgent()
    out = run(env(), conf(enrolled_namespaces=["shop"]), agent)
    assert out.exit_code == 0 and json.loads(out.stdout) == PREV
    assert agent.ops() == ["pod_add"]
    assert agent.requests[0]["name"] == "web-0" and agent.requests[0]["netns"] == NETNS
    assert any(r["event"] == "pod enrolled" for r in out.log)
    assert out.log_file == spec.DEFAULT_LOG_FILE


def test_plugin_add_other_namespace_is_not_enrolled() -> None:
    agent = FakeAgent()
    out = run(env(), conf(enrolled_namespaces=["default"]), agent)
    assert out.exit_code == 0 and json.loads(out.stdout) == PREV and agent.requests == []


def test_plugin_add_agent_down_fails_closed_or_open() -> None:
    out = run(env(), conf(), FakeAgent(down=True))
    err = json.loads(out.stdout)
    assert out.exit_code == 1 and err["code"] == spec.ERR_TRY_AGAIN_LATER
    assert "fail_open" in err["details"] and err["cniVersion"] == "1.0.0"
    out = run(env(), conf(fail_open=True), FakeAgent(down=True))
    assert out.exit_code == 0 and json.loads(out.stdout) == PREV
    assert any("UNENROLLED" in r["event"] for r in out.log)


def test_plugin_add_refused_is_plugin_code() -> None:
    out = run(env(), conf(fail_open=True), FakeAgent(refuse="address already enrolled"))
    assert out.exit_code == 1 and json.loads(out.stdout)["code"] == spec.ERR_AGENT_REFUSED


def test_plugin_add_repeated_is_idempotent() -> None:
    agent = FakeAgent()
    assert run(env(), conf(), agent).exit_code == 0
    out = run(env(), conf(), agent)
    assert out.exit_code == 0 and agent.ops() == ["pod_add", "pod_add", "pod_list"]


def test_plugin_add_replaces_stale_sandbox() -> None:
    stale = {"name": "web-0", "namespace": "shop", "netns": "/run/netns/gone-for-good"}
    agent = FakeAgent(pods=[stale])
    out = run(env(), conf(), agent)
    assert out.exit_code == 0, out.stdout
    assert agent.ops() == ["pod_add", "pod_list", "pod_del", "pod_add"]


def test_plugin_add_without_prev_result_touches_nothing() -> None:
    agent = FakeAgent()
    out = run(env(), conf(prev=None), agent)
    assert json.loads(out.stdout)["code"] == spec.ERR_INVALID_CONFIG and agent.requests == []


def test_plugin_del() -> None:
    agent = FakeAgent()
    run(env(), conf(), agent)
    out = run(env("DEL"), conf(), agent)
    assert (out.exit_code, out.stdout) == (0, "") and agent.pods == []
    assert agent.ops()[-2:] == ["pod_list", "pod_del"]
    out = run(env("DEL"), conf(), agent)  # again: nothing to do
    assert (out.exit_code, out.stdout) == (0, "") and agent.ops()[-1] == "pod_list"
    for e in (env("DEL", CNI_ARGS=""), env("DEL", CNI_NETNS="")):
        assert run(e, conf(), agent).exit_code == 0
    assert run(env("DEL"), conf(), FakeAgent(down=True)).exit_code == 0


def test_plugin_del_keeps_newer_sandbox(tmp_path: Any) -> None:
    newer = tmp_path / "newer-netns"
    newer.write_text("")
    agent = FakeAgent(pods=[{"name": "web-0", "namespace": "shop", "netns": str(newer)}])
    assert run(env("DEL"), conf(), agent).exit_code == 0
    assert agent.ops() == ["pod_list"] and len(agent.pods) == 1


def test_plugin_del_race_no_such_pod_is_success() -> None:
    class Racy(FakeAgent):
        def __call__(self, sock: str, request: dict[str, Any], timeout: float) -> Any:
            if request["op"] == "pod_del":
                self.pods.clear()
            return super().__call__(sock, request, timeout)

    agent = Racy(pods=[{"name": "web-0", "namespace": "shop", "netns": NETNS}])
    assert run(env("DEL"), conf(), agent).exit_code == 0


def test_plugin_check() -> None:
    agent = FakeAgent()
    out = run(env("CHECK"), conf(), agent)
    assert out.exit_code == 1 and json.loads(out.stdout)["code"] == spec.ERR_NOT_ENROLLED
    run(env(), conf(), agent)
    out = run(env("CHECK"), conf(), agent)
    assert (out.exit_code, out.stdout) == (0, "")
    out = run(env("CHECK", CNI_NETNS="/run/netns/other"), conf(), agent)
    assert json.loads(out.stdout)["code"] == spec.ERR_NOT_ENROLLED
    assert run(env("CHECK"), conf(enrolled_namespaces=["x"]), FakeAgent()).exit_code == 0
    out = run(env("CHECK"), conf("0.3.1"), agent)
    assert json.loads(out.stdout)["code"] == spec.ERR_INCOMPATIBLE_VERSION
    out = run(env("CHECK"), conf(), FakeAgent(down=True))
    assert json.loads(out.stdout)["code"] == spec.ERR_TRY_AGAIN_LATER


def test_plugin_version() -> None:
    out = run({"CNI_COMMAND": "VERSION"}, b"", FakeAgent())
    assert out.exit_code == 0 and json.loads(out.stdout) == spec.version_result()


def test_plugin_errors_touch_nothing_and_use_the_config_version() -> None:
    agent = FakeAgent()
    out = run(env(), b"{not json", agent)
    assert json.loads(out.stdout) == {**json.loads(out.stdout), "code": 6, "cniVersion": "1.0.0"}
    out = run({k: v for k, v in env().items() if k != "CNI_NETNS"}, conf("0.4.0"), agent)
    assert json.loads(out.stdout)["code"] == 4 and json.loads(out.stdout)["cniVersion"] == "0.4.0"
    assert agent.requests == [] and out.exit_code == 1


# -- the runtime ----------------------------------------------------------------


def test_runtime_add_chains_prev_result_and_del_reverses() -> None:
    conflist = runtime.parse_conflist({"cniVersion": "1.0.0", "name": "net", "plugins": [
        {"type": "ptp", "ipam": {"type": "host-local"}}, {"type": "meshagent-cni"}]})
    rt = runtime.RuntimeConf("cid", "/run/netns/p", "eth0", (("K8S_POD_NAME", "a"),), ("/bin",))
    calls: list[tuple[str, str, dict[str, Any]]] = []

    def execute(inv: runtime.Invocation) -> runtime.PluginOutput:
        stdin = json.loads(inv.stdin)
        calls.append((inv.plugin, inv.env["CNI_COMMAND"], stdin))
        assert inv.env["CNI_ARGS"] == "K8S_POD_NAME=a" and inv.env["CNI_PATH"] == "/bin"
        assert stdin["name"] == "net" and stdin["cniVersion"] == "1.0.0"
        if inv.env["CNI_COMMAND"] == "ADD":
            return runtime.PluginOutput(0, json.dumps({"by": inv.plugin}).encode())
        return runtime.PluginOutput(0, b"")

    assert runtime.add(conflist, rt, execute) == {"by": "meshagent-cni"}
    assert [c[0] for c in calls] == ["ptp", "meshagent-cni"]
    assert "prevResult" not in calls[0][2] and calls[1][2]["prevResult"] == {"by": "ptp"}
    calls.clear()
    assert runtime.delete(conflist, rt, {"by": "x"}, execute) == []
    assert [c[0] for c in calls] == ["meshagent-cni", "ptp"]
    assert all(c[2]["prevResult"] == {"by": "x"} for c in calls)


def test_runtime_failure_carries_the_cni_error() -> None:
    conflist = runtime.parse_conflist(
        {"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "a"}, {"type": "b"}]})
    rt = runtime.RuntimeConf("cid", "/x")

    def fail(inv: runtime.Invocation) -> runtime.PluginOutput:
        return runtime.PluginOutput(1, b'{"code": 11, "msg": "later", "details": "d"}')

    with pytest.raises(runtime.PluginFailed) as info:
        runtime.add(conflist, rt, fail)
    assert (info.value.plugin, info.value.code, info.value.msg) == ("a", 11, "later")
    assert len(runtime.delete(conflist, rt, None, fail)) == 2  # DEL goes on past failures


@pytest.mark.parametrize("bad", [
    "[]", {"cniVersion": "1.0.0", "name": "n", "plugins": []},
    {"cniVersion": "0.1.0", "name": "n", "plugins": [{"type": "a"}]},
    {"cniVersion": "1.0.0", "plugins": [{"type": "a"}]},
    {"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "../evil"}]},
])
def test_runtime_rejects_bad_conflists(bad: Any) -> None:
    with pytest.raises(runtime.ConfListError):
        runtime.parse_conflist(bad)


# -- fuzzing ----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=20,
)
plugin_keys = st.sampled_from(["agent_socket", "enrolled_namespaces", "service_account",
                               "service_account_patterns", "fail_open", "timeout_seconds",
                               "log_file", "other"])
configs = st.fixed_dictionaries(
    {"cniVersion": st.sampled_from([*spec.SUPPORTED_VERSIONS, "0.1.0", "x"]) | json_values},
    optional={"name": json_values | st.text(min_size=1), "type": json_values,
              "prevResult": json_values,
              "meshagent": st.dictionaries(plugin_keys, json_values, max_size=5) | json_values},
)
cni_values = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["ADD", "DEL", "CHECK", "VERSION", "abc", NETNS, "eth0",
                     "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0", ";=;", "a=b;c"]),
)
envs = st.dictionaries(
    st.sampled_from(["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS",
                     "CNI_PATH", "OTHER"]), cni_values, max_size=7)


@given(st.binary(max_size=300))
def test_fuzz_config_bytes_only_raise_cni_error(data: bytes) -> None:
    try:
        spec.parse_config(data)
    except CniError as exc:
        assert exc.code in (1, 6, 7)


@given(configs)
def test_fuzz_config_json_only_raise_cni_error(raw: dict[str, Any]) -> None:
    try:
        c = spec.parse_config(json.dumps(raw))
    except CniError as exc:
        assert exc.code in (1, 6, 7)
    else:
        assert c.cni_version in spec.SUPPORTED_VERSIONS


@given(envs)
def test_fuzz_env_only_raises_cni_error(e: dict[str, str]) -> None:
    try:
        spec.parse_env(e)
    except CniError as exc:
        assert exc.code == spec.ERR_INVALID_ENV


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=200)
@given(envs, configs | json_values)
def test_fuzz_plugin_always_answers_in_protocol(e: dict[str, str], raw: Any) -> None:
    agent = FakeAgent(down=True)
    out = plugin.execute(e, json.dumps(raw).encode(), agent)
    assert out.exit_code in (0, 1)
    if out.exit_code:
        err = json.loads(out.stdout)
        assert isinstance(err["code"], int) and err["code"] != spec.ERR_INTERNAL, err
    elif out.stdout:
        json.loads(out.stdout)


def test_plugin_decides_on_the_agents_code_not_its_words() -> None:
    """A refusal that *says* "is already enrolled" but is a conflict is refused;
    an ALREADY_ENROLLED answer in other words is a repeated ADD."""
    agent = FakeAgent(refuse="address 10.244.1.10 is already enrolled for pod shop/other")
    out = run(env(), conf(), agent)
    assert out.exit_code == 1 and json.loads(out.stdout)["code"] == spec.ERR_AGENT_REFUSED
    assert agent.ops() == ["pod_add"]

    class Reworded(FakeAgent):
        def __call__(self, sock: str, request: dict[str, Any], timeout: float) -> Any:
            try:
                return super().__call__(sock, request, timeout)
            except client.AgentError as exc:
                raise client.AgentError("déjà inscrit", exc.code) from None

    agent = Reworded(pods=[{"name": "web-0", "namespace": "shop", "netns": NETNS}])
    out = run(env(), conf(), agent)
    assert out.exit_code == 0 and agent.ops() == ["pod_add", "pod_list"]

    class RacyReworded(Reworded):  # the pod goes between pod_list and pod_del
        def __call__(self, sock: str, request: dict[str, Any], timeout: float) -> Any:
            if request["op"] == "pod_del":
                self.pods.clear()
            return super().__call__(sock, request, timeout)

    agent = RacyReworded(pods=[{"name": "web-0", "namespace": "shop", "netns": NETNS}])
    out = run(env("DEL"), conf(), agent)
    assert out.exit_code == 0 and agent.ops() == ["pod_list", "pod_del"]


def test_plugin_refuses_a_pod_list_that_breaks_the_contract() -> None:
    class Broken(FakeAgent):
        def __call__(self, sock: str, request: dict[str, Any], timeout: float) -> Any:
            return [{"name": "web-0"}] if request["op"] == "pod_list" else None

    out = run(env("CHECK"), conf(), Broken())
    err = json.loads(out.stdout)
    assert out.exit_code == 1 and err["code"] == spec.ERR_AGENT_REFUSED
    assert "same release" in err["details"]


# -- "kubernetes": true: the agent judges the pod by Istio's labels ------------------


class KubeAgent(FakeAgent):
    """A fake agent that also answers pod_verdict (as agent/daemon.py's _pod_verdict)."""

    def __init__(self, verdict: dict[str, Any] | None = None,
                 verdict_error: ErrorCode | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.verdict, self.verdict_error = verdict, verdict_error

    def __call__(self, sock: str, request: dict[str, Any], timeout: float) -> Any:
        if request["op"] == "pod_verdict":
            self.requests.append(request)
            if self.verdict_error is not None:
                raise client.AgentError("the API server is unreachable", self.verdict_error)
            return self.verdict
        return super().__call__(sock, request, timeout)


ENROLL = {"enroll": True, "verdict": "enroll", "service_account": "web-sa", "uid": "u-1",
          "labels": {"app": "web"}, "dns_capture": False}


def test_plugin_kubernetes_add_enrolls_what_the_agent_says_with_the_apis_identity() -> None:
    agent = KubeAgent(ENROLL)
    out = run(env(), conf(kubernetes=True), agent)
    assert out.exit_code == 0 and json.loads(out.stdout) == PREV
    assert agent.ops() == ["pod_verdict", "pod_add"]
    assert agent.requests[0] == {"op": "pod_verdict", "namespace": "shop", "name": "web-0"}
    add = agent.requests[1]
    assert (add["service_account"], add["uid"], add["labels"], add["dns_capture"]) == (
        "web-sa", "u-1", {"app": "web"}, False)
    assert add["netns"] == NETNS


def test_plugin_kubernetes_add_passes_through_what_istios_rules_leave_out() -> None:
    agent = KubeAgent({**ENROLL, "enroll": False, "verdict": "the pod opted out"})
    out = run(env(), conf(kubernetes=True, enrolled_namespaces=["shop"]), agent)
    assert out.exit_code == 0 and json.loads(out.stdout) == PREV
    assert agent.ops() == ["pod_verdict"]  # enrolled_namespaces is not used
    assert any("Istio" in r["event"] for r in out.log)


def test_plugin_kubernetes_api_unreachable_fails_closed_or_open() -> None:
    agent = KubeAgent(verdict_error=ErrorCode.KUBERNETES_UNAVAILABLE)
    out = run(env(), conf(kubernetes=True), agent)
    assert out.exit_code == 1 and json.loads(out.stdout)["code"] == spec.ERR_TRY_AGAIN_LATER
    assert agent.ops() == ["pod_verdict"]
    out = run(env(), conf(kubernetes=True, fail_open=True), agent)
    assert out.exit_code == 0 and json.loads(out.stdout) == PREV


def test_plugin_kubernetes_agent_without_k8s_is_refused() -> None:
    out = run(env(), conf(kubernetes=True), KubeAgent(verdict_error=ErrorCode.NOT_KUBERNETES))
    assert out.exit_code == 1 and json.loads(out.stdout)["code"] == spec.ERR_AGENT_REFUSED


def test_plugin_kubernetes_check_asks_the_agent() -> None:
    agent = KubeAgent({**ENROLL, "enroll": False})
    out = run(env("CHECK"), conf(kubernetes=True), agent)
    assert out.exit_code == 0 and agent.ops() == ["pod_verdict"]
    agent = KubeAgent(ENROLL)
    out = run(env("CHECK"), conf(kubernetes=True), agent)
    assert out.exit_code == 1 and json.loads(out.stdout)["code"] == spec.ERR_NOT_ENROLLED


def test_plugin_kubernetes_flag_must_be_a_boolean() -> None:
    out = run(env(), conf(kubernetes="yes"), KubeAgent(ENROLL))
    assert out.exit_code == 1 and json.loads(out.stdout)["code"] == spec.ERR_INVALID_CONFIG
