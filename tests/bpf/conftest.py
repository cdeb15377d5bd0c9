"""Fixtures for the BPF_PROG_TEST_RUN suite.

``bpf_env`` (session): one private netns and one compile of the real programs
with -DMESHAGENT_TEST_RUN (compiling takes seconds; every module shares it).
The netns is removed in a ``finally`` whatever happens.

``dp`` (per test): enters that netns for the test's duration (sockets the test
opens, and the programs' socket lookups, live there), resets every map, then
writes the default settings and enrolls POD and OTHER_POD. Sockets are closed
and maps emptied afterwards, pass or fail.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from bpf_harness import Harness, TestNet, build_testnet, entered, netns_name

from agent.datapath.maps import DatapathMaps
from agent.datapath.programs import Programs


@dataclass(frozen=True)
class BpfEnv:
    net: TestNet
    programs: Programs
    maps: DatapathMaps


@pytest.fixture(scope="session")
def bpf_env() -> Iterator[BpfEnv]:
    # Privileged tests only: tests/conftest.py has skipped (or failed, in CI)
    # before this runs when root, bcc or bpffs is missing.
    from pyroute2 import netns

    from agent.datapath.programs import compile_programs

    name = netns_name()
    netns.create(name)
    programs: Programs | None = None
    try:
        with entered(name):
            net = build_testnet(name)
            programs = compile_programs(test_run=True)
        yield BpfEnv(net=net, programs=programs, maps=DatapathMaps(programs))
    finally:
        if programs is not None:
            programs.close()
        with contextlib.suppress(FileNotFoundError):
            netns.remove(name)


@pytest.fixture
def dp(bpf_env: BpfEnv) -> Iterator[Harness]:
    harness = Harness(programs=bpf_env.programs, maps=bpf_env.maps, net=bpf_env.net)
    with entered(bpf_env.net.netns):
        try:
            harness.reset()
            harness.enroll_defaults()
            yield harness
        finally:
            harness.close()
            harness.reset()
