"""The model loader: ztunnel's local-config YAML in and out, strict validation, watcher."""

from __future__ import annotations

import ipaddress
import os
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.model import loader
from agent.model.loader import (
    ModelLoadError,
    ModelWatcher,
    ReloadOutcome,
    load_model_file,
    load_model_text,
    model_to_yaml,
)
from agent.model.types import (
    HealthStatus,
    InboundProtocol,
    LoadBalancerMode,
    LoadBalancerScope,
    NamespacedHostname,
    NetworkAddress,
)

# Our own sample in ztunnel's local-config format (see data/local-config/README.md).
LOCAL_CONFIG_SAMPLE = Path(__file__).parent / "data" / "local-config" / "two-nodes.yaml"

# Two workloads (dual-stack HBONE on node1, unhealthy TCP on node2) behind one service.
GOOD = (Path(__file__).parent / "data" / "model" / "web.yaml").read_text()


def errors_of(text: str, **kw: bool) -> list[str]:
    with pytest.raises(ModelLoadError) as info:
        load_model_text(text, "m.yaml", **kw)
    return [f"m.yaml: {i}" for i in info.value.issues]


def test_local_config_sample_loads_and_round_trips() -> None:
    model = load_model_file(LOCAL_CONFIG_SAMPLE, allow_foreign_policies=True)
    assert [w.uid for w in model.workloads] == ["lab-east//v1/Pod/shop/cart-7f9c-a",
                                                "lab-east//v1/Pod/shop/cart-7f9c-b",
                                                "lab-east//v1/Pod/shop/ledger-0"]
    cart_a, cart_b, ledger = model.workloads
    assert cart_a.protocol is InboundProtocol.HBONE and cart_b.protocol is InboundProtocol.HBONE
    assert ledger.protocol is InboundProtocol.TCP
    assert {w.node for w in model.workloads} == {"node-alpha", "node-beta"}
    assert cart_a.workload_ips == (ipaddress.ip_address("10.44.1.11"),
                                   ipaddress.ip_address("fd10:44:1::11"))
    assert cart_a.identity() == "spiffe://lab.example/ns/shop/sa/cart"
    assert (cart_a.canonical_name, cart_a.canonical_revision) == ("cart", "v2")
    assert cart_b.capacity == 2
    cart = model.service(NamespacedHostname("shop", "cart.shop.svc.cluster.local"))
    assert cart is not None and cart.vips == (NetworkAddress.parse("/10.96.44.20"),
                                              NetworkAddress.parse("/fd10:96::44:20"))
    assert cart.ports == ((8000, 9000), (8443, 0))
    assert cart.subject_alt_names == ("spiffe://lab.example/ns/shop/sa/cart",)
    assert cart.canonical
    assert cart.load_balancer is not None and cart.load_balancer.mode is LoadBalancerMode.FAILOVER
    # All three workloads back the service; ledger maps 8000 to its own 9100.
    assert sorted(e.workload_uid for e in model.endpoints(cart)) == sorted(
        w.uid for w in model.workloads)
    assert {e.workload_uid: e.ports for e in model.endpoints(cart)}[ledger.uid] == \
        ((8000, 9100),)
    assert len(model.foreign_policies) == 1
    written = model_to_yaml(model)
    again = load_model_text(written, "written", allow_foreign_policies=True)
    assert again == model
    # The document we write has the same entries the sample has, key for key (the
    # sample leaves out every field whose value is ztunnel's default).
    original = yaml.safe_load(LOCAL_CONFIG_SAMPLE.read_text())
    ours = yaml.safe_load(written)
    assert ours == original


def test_written_file_uses_only_ztunnel_field_names() -> None:
    """Every key we write is one ztunnel's serde structs know, and every field ztunnel
    requires is written (src/xds.rs LocalConfig/LocalWorkload, src/state/*.rs)."""
    doc = yaml.safe_load(model_to_yaml(load_model_text(GOOD)))
    assert set(doc) <= set(loader.TOP_FIELDS)
    for w in doc["workloads"]:
        assert set(w) <= set(loader.WORKLOAD_FIELDS)
        assert set(loader.WORKLOAD_REQUIRED) <= set(w)
    for s in doc["services"]:
        assert set(s) <= set(loader.SERVICE_FIELDS)
        assert set(loader.SERVICE_REQUIRED) <= set(s)
        assert set(s["loadBalancer"]) == set(loader.LOAD_BALANCER_FIELDS)


def test_good_model_contents() -> None:
    model = load_model_text(GOOD)
    web = model.services[0]
    assert web.ports == ((80, 8080), (443, 0))
    assert web.load_balancer is not None and web.load_balancer.mode is LoadBalancerMode.FAILOVER
    assert web.load_balancer.routing_preferences[0] is LoadBalancerScope.NETWORK
    assert model.service_by_vip(NetworkAddress.parse("/fd00:96::10"), "default") is web
    w2 = model.workload_by_uid("c1//v1/Pod/default/web-2")
    assert w2 is not None and w2.status is HealthStatus.UNHEALTHY
    assert model.workload_by_address(NetworkAddress.parse("/fd00::1:5")).name == "web-1"
    assert model_to_yaml(load_model_text(model_to_yaml(model))) == model_to_yaml(model)


def test_ztunnel_policies_are_refused_by_default() -> None:
    (msg,) = errors_of(LOCAL_CONFIG_SAMPLE.read_text())
    assert msg.startswith("m.yaml: policies: 1 ztunnel-format authorization policies")
    assert "tunnel.policy_dir" in msg


@pytest.mark.parametrize(("edit", "expected"), [
    (("protocol: HBONE", "protocol: UDP"),
     "m.yaml: workloads[0].protocol (workload c1//v1/Pod/default/web-1): 'UDP' is not one "
     "of TCP, HBONE"),
    (("  ports: {80: 8080, 443: 0}", "  ports: {80: 70000}"),
     "m.yaml: services[0].ports.80 (service default/web.default.svc.cluster.local): "
     "target port 70000 is not in 0..65535"),
    (("  ports: {80: 8080, 443: 0}", "  ports: {0: 8080}"),
     "services[0].ports.0 (service default/web.default.svc.cluster.local): service port 0 "
     "is not in 1..65535"),
    (("  ports: {80: 8080, 443: 0}", "  ports: {'80': 8080}"),
     "service port must be an integer, not a string '80'"),
    (('"default/web.default.svc.cluster.local": {80: 8080}\n- uid',
      '"default/web.default.svc.cluster.local": {80: 0}\n- uid'),
     "workloads[0].services.default/web.default.svc.cluster.local.80 (workload "
     "c1//v1/Pod/default/web-1): target port 0 is not in 1..65535"),
    (("serviceAccount: web", "serviceAcount: web"),
     "workloads[0].serviceAcount (workload c1//v1/Pod/default/web-1): unknown field"),
    (("  canonical: true", "  canonical: true\n  colour: blue"),
     "services[0].colour (service default/web.default.svc.cluster.local): unknown field"),
    (('["10.0.2.5"]', '["10.0.2.500"]'),
     "workloads[1].workloadIps[0] (workload c1//v1/Pod/default/web-2): '10.0.2.500' is not "
     "an IP address"),
    (('"/10.96.0.10"', '"10.96.0.10"'),
     "services[0].vips[0] (service default/web.default.svc.cluster.local): '10.96.0.10' is "
     "not network/IP"),
    (('"/10.96.0.10"', '"/10.96.0.0/16"'), "'10.96.0.0/16' in '/10.96.0.0/16' is not an IP"),
    (("uid: c1//v1/Pod/default/web-2", "uid: c1//v1/Pod/default/web-1"),
     "workloads[1].uid (workload c1//v1/Pod/default/web-1): uid 'c1//v1/Pod/default/web-1' "
     "is already used by workloads[0]"),
    (('["10.0.2.5"]', '["10.0.1.5"]'),
     "workloads[1].workloadIps[0] (workload c1//v1/Pod/default/web-2): address 10.0.1.5 "
     "(network '') is already workloads[0] (c1//v1/Pod/default/web-1)'s"),
    (('"/10.96.0.10"', '"/10.0.1.5"'),
     "services[0].vips[0] (service default/web.default.svc.cluster.local): VIP /10.0.1.5 is "
     "also the address of workloads[0]"),
    (("  services:\n    \"default/web.default.svc.cluster.local\": {80: 8080}\n"
      "- uid: c1//v1/Pod/default/web-2",
      "- uid: c1//v1/Pod/default/web-2"),
     "workloads[0].services (workload c1//v1/Pod/default/web-1): required field is missing"),
    (("locality: {region: r1, zone: z1, subzone: \"\"}", "locality: {zone: z1}"),
     "workloads[0].locality.region (workload c1//v1/Pod/default/web-1): required field"),
    (("  canonical: true", "  canonical: true\n  weightedWaypoints: [{weight: 1}]"),
     "services[0].weightedWaypoints (service default/web.default.svc.cluster.local): weighted "
     "waypoints are not supported (use waypoint) by meshagent"),
    (("  namespace: default\n  serviceAccount: web", "  namespace: Default_NS\n"
                                                     "  serviceAccount: web"),
     "workloads[0].namespace (workload c1//v1/Pod/default/web-1): 'Default_NS' is not a "
     "namespace"),
    (("hostname: web.default.svc.cluster.local", "hostname: 'web..svc'"),
     "services[0].hostname (service default/web..svc): 'web..svc' is not a hostname"),
    (("healthPolicy: OnlyHealthy", "healthPolicy: Sometimes"),
     "services[0].loadBalancer.healthPolicy (service default/web.default.svc.cluster.local):"
     " 'Sometimes' is not one of OnlyHealthy, AllowAll"),
    (("  ports: {80: 8080, 443: 0}", "  ports: {80: 8080, 80: 9090}"),
     "duplicate key 80"),
    (("workloads:\n", "workloads:\n  - [\n"), "not valid YAML"),
])
def test_bad_input_names_file_entry_and_field(edit: tuple[str, str], expected: str) -> None:
    old, new = edit
    assert old in GOOD, old
    messages = errors_of(GOOD.replace(old, new, 1))
    assert any(expected in m for m in messages), messages
    assert all(m.startswith("m.yaml: ") for m in messages)


def test_duplicate_vips_across_services() -> None:
    text = GOOD + textwrap.dedent("""\
        - name: web2
          namespace: other
          hostname: web2.other.svc.cluster.local
          vips: ["/10.96.0.10"]
          ports: {80: 80}
        """)
    (msg,) = errors_of(text)
    assert msg == ("m.yaml: services[1].vips[0] (service other/web2.other.svc.cluster.local): "
                   "VIP /10.96.0.10 is already used by services[0] "
                   "(default/web.default.svc.cluster.local)")


def test_every_problem_is_reported() -> None:
    text = GOOD.replace("protocol: HBONE", "protocol: UDP").replace(
        "ipFamilies: Dual", "ipFamilies: IPv5")
    messages = errors_of(text)
    assert len(messages) == 2


@pytest.mark.parametrize("text", ["", "workloads: []\n", "services:\n"])
def test_empty_models(text: str) -> None:
    model = load_model_text(text)
    assert model.workloads == () and model.services == ()


@pytest.mark.parametrize("text", ["- 1\n", "workloads: 3\n", "workloads: [3]\n",
                                  "services: [{}]\n", "foo: 1\n", "'a'\n"])
def test_wrong_shapes_are_errors(text: str) -> None:
    assert errors_of(text)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot read the file"):
        load_model_file(tmp_path / "absent.yaml")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ModelLoadError, match="cannot read the file"):
        load_model_file(binary)


def test_watcher_keeps_the_last_good_model(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    watcher = ModelWatcher(str(path))
    assert watcher.poll() is ReloadOutcome.MISSING and watcher.model.services == ()
    path.write_text(GOOD)
    assert watcher.poll() is ReloadOutcome.LOADED
    good = watcher.model
    assert watcher.generation == 1 and len(good.services) == 1
    assert watcher.poll() is ReloadOutcome.UNCHANGED
    path.write_text(GOOD.replace("protocol: HBONE", "protocol: UDP"))
    os.utime(path, ns=(1, 1))
    assert watcher.poll() is ReloadOutcome.REJECTED
    assert watcher.model is good and watcher.error is not None
    assert "workloads[0].protocol" in str(watcher.error)
    path.unlink()
    assert watcher.poll() is ReloadOutcome.MISSING and watcher.model is good
    path.write_text(GOOD.replace("web-2", "web-3"))
    assert watcher.poll() is ReloadOutcome.LOADED
    assert watcher.generation == 2 and watcher.error is None
    assert watcher.model.workload_by_uid("c1//v1/Pod/default/web-3") is not None


# -- fuzzing: any text is a model or a ModelLoadError, never a crash ---------------


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=12),
                     st.sampled_from(["HBONE", "TCP", "/10.0.0.1", "default/a.b", "Healthy",
                                      "Failover", "Network", "::1", "10.0.0.300"]))
_KEYS = st.sampled_from([*loader.WORKLOAD_FIELDS, *loader.SERVICE_FIELDS, "x", 80, 0])
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(_KEYS, inner, max_size=4)), max_leaves=8)


def _loads_or_rejects(text: str) -> None:
    try:
        load_model_text(text, "f.yaml")
    except ModelLoadError as error:
        assert error.issues and all(str(i) for i in error.issues)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["workloads", "services", "policies", "x"]),
                       st.lists(st.dictionaries(_KEYS, _VALUES, max_size=8), max_size=3),
                       max_size=3))
def test_fuzz_structures(doc: dict[str, object]) -> None:
    _loads_or_rejects(yaml.safe_dump(doc))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.sampled_from(
    ["", "x", ":", "-", "\n", "{", "[", "0", "'", " ", "*", "&a", "!!python/object:os.system"])),
    min_size=1, max_size=5))
def test_fuzz_mutated_text(edits: list[tuple[int, str]]) -> None:
    text = GOOD
    for pos, insert in edits:
        text = text[:pos] + insert + text[pos + 1:]
    _loads_or_rejects(text)
