"""Compile the BPF programs with bcc, once per agent process.

All attach points (bpf/*.c, one file each) are built in one compile unit so
they share one instance of every map (bpf/lib/maps.h).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ATTACH_POINT_SOURCES = ("pod_egress.c", "pod_ingress.c", "tunnel_ingress.c")
FROM_POD = "from_pod"
TO_POD = "to_pod"
TUNNEL_DEV_INGRESS = "tunnel_dev_ingress"
FUNCTIONS = (FROM_POD, TO_POD, TUNNEL_DEV_INGRESS)
# Bump when a map's key or value layout changes: maps pinned by an older agent
# are then left for the new ones (in a new v<N> directory) and removed after
# the new programs are attached, instead of being reused with the wrong layout.
MAP_LAYOUT_VERSION = 3


class CompileError(RuntimeError):
    """bcc could not build the programs; the message says how to fix the node."""


BPF_FS_MAGIC = 0xCAFE4A11
BPFFS_ROOT = "/sys/fs/bpf"


def _fs_type(path: str) -> int | None:
    """statfs(2) f_type of ``path``, or None when it does not exist."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86-64
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.statfs(path.encode(), buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def check_bpffs(root: str = BPFFS_ROOT) -> None:
    """Raise :class:`CompileError` unless ``root`` is a bpffs mount in this mount
    namespace. Reads only.

    The usual way to get here without one: ``ip netns exec`` enters a new mount
    namespace and mounts a fresh sysfs on /sys for the netns, which hides the
    host's /sys/fs/bpf, so pinning fails with a bare ENOENT.
    """
    kind = _fs_type(root)
    if kind == BPF_FS_MAGIC:
        return
    what = "does not exist" if kind is None else "is not a bpffs mount"
    raise CompileError(
        f"{root} {what} in this mount namespace, so the maps cannot be pinned. "
        "If the agent runs under `ip netns exec`: that command remounts /sys for the netns "
        "and hides the host's bpffs; enter the node's netns with "
        "`nsenter --net=/run/netns/<node> meshagent run` instead (network namespace only), "
        f"or mount bpffs here first: `mount -t bpf bpf {root}`")


def bpf_source_dir() -> Path:
    """Where the C sources live: $MESHAGENT_BPF_DIR, else bpf/ next to the package."""
    env = os.environ.get("MESHAGENT_BPF_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "bpf"
    if not (path / "lib" / "common.h").exists():
        raise CompileError(f"BPF sources not found in {path}: set MESHAGENT_BPF_DIR")
    return path


_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def flatten_sources(src_dir: Path, names: tuple[str, ...]) -> str:
    """One translation unit of the attach points with our own headers inlined.

    bcc rewrites map syntax (``map.lookup(&k)``) and turns functions into
    programs only in the main file it is given; code in an #included header
    would keep the sugar and fail to load. Each local header is inlined once
    (its include guard would make a second copy empty anyway), and #line
    directives keep compiler diagnostics pointing at the real files.
    """
    seen: set[Path] = set()

    def inline(path: Path) -> str:
        if path in seen:
            return ""
        seen.add(path)
        out = [f'#line 1 "{path}"']
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            match = _LOCAL_INCLUDE.match(line)
            if match:
                out.append(inline(src_dir / match.group(1)))
                out.append(f'#line {lineno + 1} "{path}"')
            else:
                out.append(line)
        return "\n".join(out)

    return "\n".join(inline(src_dir / name) for name in names) + "\n"


@dataclass
class Programs:
    """A compiled and loaded set of programs; ``bpf`` owns maps and fds."""

    bpf: Any
    fds: dict[str, int]
    names: dict[str, str]

    def table(self, name: str) -> Any:
        return self.bpf[name.encode()]

    def close(self) -> None:
        self.bpf.cleanup()


def pin_path(pin_dir: str) -> Path:
    """Where this build's maps are pinned under the configured bpffs directory."""
    return Path(pin_dir) / f"v{MAP_LAYOUT_VERSION}"


def remove_stale_pins(pin_dir: str) -> list[str]:
    """Delete map pins of other layout versions; return what was removed.

    Side effects: unlinks pinned maps (the kernel frees a map once no program
    and no pin references it) and their now empty version directories.
    """
    removed: list[str] = []
    base = Path(pin_dir)
    if not base.is_dir():
        return removed
    current = pin_path(pin_dir)
    for version_dir in base.iterdir():
        if version_dir == current or not version_dir.name.startswith("v"):
            continue
        for pin in version_dir.iterdir():
            pin.unlink()
            removed.append(str(pin))
        version_dir.rmdir()
    return removed


def remove_all_pins(pin_dir: str) -> None:
    """Delete every pin meshagent made under ``pin_dir`` and the directory itself."""
    base = Path(pin_dir)
    if not base.is_dir():
        return
    for version_dir in base.iterdir():
        if version_dir.is_dir():
            for pin in version_dir.iterdir():
                pin.unlink()
            version_dir.rmdir()
        else:
            version_dir.unlink()
    base.rmdir()


def compile_programs(*, test_run: bool = False, max_pods: int | None = None,
                     pin_dir: str | None = None) -> Programs:
    """Compile every attach point and load its program into the kernel.

    Side effects: loads three SCHED_CLS programs and creates the maps, or with
    ``pin_dir`` reuses the maps pinned there by a previous run (creating and
    pinning any that are missing, in ``pin_path(pin_dir)``). Unpinned maps live
    as long as this process holds them or a tc filter references them.
    ``test_run`` builds the BPF_PROG_TEST_RUN variant (see MESHAGENT_TEST_RUN).
    """
    try:
        from bcc import BPF
    except ImportError as exc:
        raise CompileError(
            "python module bcc is not importable: run scripts/setup.sh "
            "(it installs Debian's python3-bpfcc and exposes it to the venv)") from exc
    src_dir = bpf_source_dir()
    text = flatten_sources(src_dir, ATTACH_POINT_SOURCES)
    cflags = [f"-I{src_dir}", "-Wno-macro-redefined"]
    if test_run:
        cflags.append("-DMESHAGENT_TEST_RUN")
    if max_pods:
        cflags.append(f"-DMA_MAX_PODS={int(max_pods)}")
    if pin_dir is not None:
        pins = pin_path(pin_dir)
        if not str(pins).startswith("/sys/fs/bpf/"):
            raise CompileError(f"bpf_pin_dir {pin_dir} must be under /sys/fs/bpf")
        check_bpffs()
        if '"' in str(pins):
            raise CompileError(f"bpf_pin_dir {pin_dir} must not contain quotes")
        pins.mkdir(parents=True, exist_ok=True)
        cflags.append(f'-DMA_PIN_DIR="{pins}"')
    try:
        bpf = BPF(text=text.encode(), cflags=cflags)
    except Exception as exc:
        raise CompileError(
            f"compiling {src_dir} failed: {exc}. If bcc says it cannot find kernel headers, "
            "run scripts/setup.sh, which installs and links them") from exc
    fds: dict[str, int] = {}
    names: dict[str, str] = {}
    for fn in FUNCTIONS:
        loaded = bpf.load_func(fn.encode(), BPF.SCHED_CLS)
        fds[fn] = loaded.fd
        names[fn] = fn
    return Programs(bpf=bpf, fds=fds, names=names)
