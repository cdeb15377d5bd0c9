"""Pod registry: conflicts, JSON round trip, workload view."""

from __future__ import annotations

import pytest

from agent.registry import Pod, Registry, RegistryError


def pod(name: str = "web", *, netns: str = "/run/netns/web", ifindex: int = 5,
        addresses: tuple[str, ...] = ("10.244.1.10", "fd00::a")) -> Pod:
    return Pod(name=name, namespace="default", service_account="sa", netns=netns,
               ifname="eth0", host_ifindex=ifindex, host_ifname=f"veth{ifindex}",
               addresses=addresses, labels={"app": name})


def test_add_find_remove() -> None:
    reg = Registry()
    reg.add(pod())
    assert reg.get("default/web") is not None
    assert reg.find(netns="/run/netns/web") == pod()
    assert reg.find(name="web", namespace="default") == pod()
    assert reg.remove("default/web") == pod()
    assert len(reg) == 0


@pytest.mark.parametrize(("other", "message"), [
    (pod(), "already enrolled"),
    (pod("b", ifindex=6, addresses=("10.244.1.11",)), "netns"),
    (pod("b", netns="/run/netns/b", addresses=("10.244.1.11",)), "veth"),
    (pod("b", netns="/run/netns/b", ifindex=6, addresses=("fd00:0::a",)), "address"),
])
def test_conflicts(other: Pod, message: str) -> None:
    reg = Registry([pod()])
    with pytest.raises(RegistryError, match=message):
        reg.add(other)
    assert len(reg) == 1


def test_json_round_trip_and_workload() -> None:
    reg = Registry([pod(), pod("b", netns="/run/netns/b", ifindex=6, addresses=("10.0.0.1",))])
    again = Registry.from_json(reg.to_json())
    assert [p.key for p in again] == ["default/b", "default/web"]
    assert again.get("default/web") == pod()
    assert pod().workload("cluster.local")["identity"] == \
        "spiffe://cluster.local/ns/default/sa/sa"


def test_to_json_has_every_field() -> None:
    from dataclasses import fields

    assert set(pod().to_json()) == {f.name for f in fields(Pod)}
