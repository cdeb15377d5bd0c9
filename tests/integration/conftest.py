"""Fixtures of the netns integration suites (root); the driver is ``labkit.py``.

* ``pod_network`` (module scope): the pod network of the module's lab. A
  module lists the networks it supports in ``LAB = LabSpec(pod_networks=...)``
  and runs once per network; ``MESHAGENT_TEST_POD_NETWORKS=veth,cni`` narrows
  every module to those (a module supporting none of them is skipped).
* ``mesh_lab`` (module scope): the lab ``LAB`` describes, up for the whole
  module; removed afterwards whatever happened, with its background
  processes, and the module fails if anything of it is left.
* ``lab_prefix`` (per test): a fresh prefix whose lab, if the test makes one,
  is removed and checked afterwards.
* ``lab_factory`` (per test): ``with lab_factory(mode="hbone") as lab:`` for
  tests that build (several) labs of their own.

Modules add their servers by wrapping ``mesh_lab`` in a ``lab`` fixture that
starts them with ``mesh_lab.background.start(...)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from labkit import (
    POD_NETWORKS,
    POD_NETWORKS_ENV,
    Lab,
    LabFactory,
    LabSpec,
    lab_up,
    owned_prefix,
)


def _spec(module: Any) -> LabSpec:
    spec = getattr(module, "LAB", LabSpec())
    assert isinstance(spec, LabSpec), f"{module.__name__}.LAB must be a labkit.LabSpec"
    return spec


def _selected_networks(spec: LabSpec) -> list[str]:
    wanted = os.environ.get(POD_NETWORKS_ENV, "")
    networks = list(spec.pod_networks)
    if wanted.strip():
        chosen = [w.strip() for w in wanted.split(",") if w.strip()]
        unknown = [w for w in chosen if w not in POD_NETWORKS]
        assert not unknown, f"{POD_NETWORKS_ENV}: unknown pod networks {unknown}"
        networks = [n for n in networks if n in chosen]
    return networks


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "pod_network" not in metafunc.fixturenames:
        return
    spec = _spec(metafunc.module)
    networks = _selected_networks(spec)
    if networks == [spec.pod_networks[0]]:
        return  # the default: no parametrisation, test ids stay as they are
    if not networks:
        metafunc.parametrize("pod_network", [pytest.param(
            "none", marks=pytest.mark.skip(reason=f"{POD_NETWORKS_ENV} excludes this suite's "
                                           "pod networks"))], scope="module")
        return
    metafunc.parametrize("pod_network", networks, scope="module", indirect=True)


@pytest.fixture(scope="module")
def pod_network(request: pytest.FixtureRequest) -> str:
    """The pod network this module's lab is built with (see the module doc)."""
    return str(getattr(request, "param", _spec(request.module).pod_networks[0]))


@pytest.fixture(scope="module")
def mesh_lab(request: pytest.FixtureRequest, pod_network: str,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The module's lab (``LAB``), up for the whole module; always removed."""
    spec = _spec(request.module)
    logdir = tmp_path_factory.mktemp(f"lab-{spec.letter}-{pod_network}")
    with lab_up(spec, logdir, pod_network) as lab:
        yield lab


@pytest.fixture
def lab_prefix(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh prefix (the module's ``LAB.letter`` + 4 hex digits); whatever
    exists under it is removed afterwards, and the test fails if ``lab down``
    did not remove it all by itself."""
    with owned_prefix(_spec(request.module).letter) as prefix:
        yield prefix


@pytest.fixture
def lab_factory(request: pytest.FixtureRequest, tmp_path: Path) -> LabFactory:
    """``lab_factory(**overrides)``: a context manager building a lab from the
    module's ``LAB`` with ``overrides`` (e.g. ``mode=None``), removed and
    checked when the block ends; logs are kept under the test's tmp_path."""
    spec = _spec(request.module)
    count = 0

    def make(**overrides: Any) -> contextlib.AbstractContextManager[Lab]:
        nonlocal count
        count += 1
        return lab_up(dataclasses.replace(spec, **overrides), tmp_path / f"lab{count}")

    return make
