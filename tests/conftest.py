"""Suite-wide rules.

Tests marked ``privileged`` need root, bcc and network namespaces. On a
developer machine without them they skip; in CI (``CI`` set) they FAIL, so a
missing install step can never pass silently as a skip.
"""

from __future__ import annotations

import functools
import os

import pytest


@functools.cache
def missing_privileges() -> str | None:
    """Why privileged tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (run sudo scripts/test.sh)"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "python module bcc missing (run scripts/setup.sh)"
    if not os.path.isdir("/sys/fs/bpf"):
        return "bpffs not mounted on /sys/fs/bpf (run scripts/setup.sh)"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("privileged") is None:
        return
    reason = missing_privileges()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"privileged test cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)
