"""Install ``meshagent-cni`` on a node, as Istio's install-cni does for istio-cni.

Follows istio/istio ``cni/pkg/install/cniconfig.go``:

- the primary CNI's config is the first ``.conf``/``.conflist`` in the node's
  ``/etc/cni/net.d`` by name that parses and has plugins (``getConfigFilenames``;
  files that do not parse are skipped with a warning);
- our plugin entry is appended to its ``plugins`` (``insertCNIConfig``): a single
  ``.conf`` becomes a ``.conflist`` named ``k8s-pod-network`` holding the primary
  plugin then ours, and the file is renamed ``.conflist``; an existing
  ``meshagent-cni`` entry is replaced, not duplicated;
- the file is written atomically (temporary file in the same directory, fsync,
  rename) keeping its mode (``file.AtomicWrite``);
- uninstall removes exactly our entry again (``cni/pkg/install`` cleanup).

The plugin binary: ``meshagent-cni`` needs only the standard library
(:mod:`agent.cni.plugin`, :mod:`agent.cni.spec`, :mod:`agent.api.client`), so it is
installed as a zipapp with a ``python3`` shebang into the node's ``/opt/cni/bin``
(the node needs python3 >= 3.10; Istio ships a static Go binary instead).

Run in the DaemonSet's init container: ``python -m agent.k8s.cni_install install
--net-dir /host/etc/cni/net.d --bin-dir /host/opt/cni/bin``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("meshagent.cni-install")

PLUGIN_TYPE = "meshagent-cni"
DEFAULT_PLUGIN_CONFIG: dict[str, Any] = {
    "type": PLUGIN_TYPE, "name": PLUGIN_TYPE,
    # The CNI plugin asks the agent; the agent decides with Istio's rules (the
    # namespace list is for the file-based mode only).
    "meshagent": {"agent_socket": "/run/meshagent/agent.sock", "fail_open": False},
}
PLUGIN_MODULES = ("agent/__init__.py", "agent/api/__init__.py", "agent/api/client.py",
                  "agent/cni/__init__.py", "agent/cni/plugin.py", "agent/cni/spec.py")


class InstallError(RuntimeError):
    pass


def load_config(path: Path) -> dict[str, Any] | None:
    """A parsed conf/conflist with plugins, or None (unreadable or no plugins)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("skipping %s: %s", path, e)
        return None
    if not isinstance(data, dict):
        return None
    if path.suffix == ".conflist":
        plugins = data.get("plugins")
        return data if isinstance(plugins, list) and plugins else None
    return data if data.get("type") else None


def primary_config(net_dir: Path) -> Path | None:
    """``getConfigFilenames``: the first valid config by name."""
    for path in sorted(net_dir.glob("*")):
        if path.suffix in (".conf", ".conflist") and load_config(path) is not None:
            return path
    return None


def insert_plugin(existing: Mapping[str, Any], plugin: Mapping[str, Any]) -> dict[str, Any]:
    """``insertCNIConfig``: our entry last in the chain (replacing an old one)."""
    entry = {k: v for k, v in plugin.items() if k != "cniVersion"}
    if "type" in existing:  # a single .conf
        primary = {k: v for k, v in existing.items() if k != "cniVersion"}
        return {"name": "k8s-pod-network",
                "cniVersion": str(existing.get("cniVersion") or "0.3.1"),
                "plugins": [primary, entry]}
    out = dict(existing)
    plugins = [p for p in existing.get("plugins", [])
               if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)]
    out["plugins"] = [*plugins, entry]
    return out


def remove_plugin(existing: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(existing)
    if isinstance(existing.get("plugins"), list):
        out["plugins"] = [p for p in existing["plugins"]
                          if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)]
    return out


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Side effects: creates a temporary file beside ``path``, renames it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plugin_zipapp(root: Path) -> bytes:
    """The stdlib-only plugin as a runnable zipapp (shebang + zip)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for rel in PLUGIN_MODULES:
            z.write(root / rel, rel)
        z.writestr("__main__.py", "import sys\nfrom agent.cni.plugin import main\n"
                                  "sys.exit(main())\n")
    return b"#!/usr/bin/env python3\n" + buf.getvalue()


def install(net_dir: Path, bin_dir: Path, plugin: Mapping[str, Any] = DEFAULT_PLUGIN_CONFIG,
            wait_seconds: float = 0.0) -> Path:
    """Install the binary and chain the plugin into the primary config; returns the
    config path written.

    Side effects: writes ``bin_dir/meshagent-cni`` (0755) and rewrites the primary
    config in place (a ``.conf`` is replaced by a ``.conflist`` of the same stem).
    Waits up to ``wait_seconds`` for the primary CNI to write its config.
    """
    root = Path(__file__).resolve().parents[2]
    bin_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(bin_dir / PLUGIN_TYPE, plugin_zipapp(root), 0o755)
    deadline = time.monotonic() + wait_seconds
    path = primary_config(net_dir)
    while path is None and time.monotonic() < deadline:
        time.sleep(1)
        path = primary_config(net_dir)
    if path is None:
        raise InstallError(f"no CNI network config in {net_dir}: install the primary CNI "
                           "first (meshagent-cni chains after it)")
    existing = load_config(path)
    assert existing is not None
    merged = insert_plugin(existing, plugin)
    mode = path.stat().st_mode & 0o777
    target = path.with_suffix(".conflist")
    atomic_write(target, (json.dumps(merged, indent=2) + "\n").encode(), mode)
    if target != path:
        path.unlink()
    log.info("chained %s into %s", PLUGIN_TYPE, target)
    return target


def uninstall(net_dir: Path, bin_dir: Path) -> None:
    """Remove our entry from every conflist that has it, and the binary."""
    for path in sorted(net_dir.glob("*.conflist")):
        data = load_config(path)
        if data is None or not any(isinstance(p, dict) and p.get("type") == PLUGIN_TYPE
                                   for p in data.get("plugins", [])):
            continue
        atomic_write(path, (json.dumps(remove_plugin(data), indent=2) + "\n").encode(),
                     path.stat().st_mode & 0o777)
    (bin_dir / PLUGIN_TYPE).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.k8s.cni_install")
    parser.add_argument("action", choices=["install", "uninstall"])
    parser.add_argument("--net-dir", type=Path, default=Path("/host/etc/cni/net.d"))
    parser.add_argument("--bin-dir", type=Path, default=Path("/host/opt/cni/bin"))
    parser.add_argument("--wait", type=float, default=300.0,
                        help="seconds to wait for the primary CNI's config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.action == "install":
            print(install(args.net_dir, args.bin_dir, wait_seconds=args.wait))
        else:
            uninstall(args.net_dir, args.bin_dir)
    except (InstallError, OSError) as e:
        print(f"meshagent cni install: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
