"""The Vagrant VM lab, checked as far as a machine that cannot boot VMs can.

* ``vagrant validate`` on ``vagrant/Vagrantfile`` (no box download, no VM);
* shellcheck on every ``vagrant/*.sh`` and ``scripts/*.sh``;
* ``systemd-analyze verify`` on the systemd units provisioning installs;
* ``vagrant/provision.sh`` itself, run with ``MESHAGENT_PROVISION_VM=0`` inside a
  network-namespace "node" made here, every path pointed into a temporary
  directory: it runs setup.sh, writes the config, creates and installs the CA,
  starts agent + tunnel as background processes and creates demo pods through
  the CNI path; the pods must then be enrolled (agent API ``pod_list``) and
  meshed (a connection between them goes through the tunnel).

Tools missing (vagrant, shellcheck, systemd-analyze) skip on a laptop and FAIL
in CI (``CI`` set), like privileged tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from labkit import REPO, program, read_line, run_in, spawned, unique_prefix, wait_until

from agent.api import client

VAGRANT_DIR = REPO / "vagrant"
VENV = Path(sys.executable).parent.parent  # the venv running the tests (not resolved)
SHELL_SCRIPTS = sorted([*VAGRANT_DIR.glob("*.sh"), *(REPO / "scripts").glob("*.sh")])
UNITS = ("meshagent.service", "meshagent-tunnel.service")
AGENT_CAPS = {"CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON", "CAP_NET_RAW",
              "CAP_SYS_RESOURCE"}
PROVISION_TIMEOUT_S = 420.0
STEP_TIMEOUT_S = 60.0


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        reason = f"{name} not installed (apt-get install -y {package})"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must have it", pytrace=False)
        pytest.skip(reason)
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without MESHAGENT_* / VAGRANT_* / CNI_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MESHAGENT_", "VAGRANT_", "CNI_"))}
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    return {**env, **extra}


# -- vagrant validate ------------------------------------------------------------


def _vagrant(args: list[str], tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run vagrant in vagrant/ with its home and dotfile dir in ``tmp`` (nothing
    lands in the repository or in ~/.vagrant.d)."""
    exe = require_tool("vagrant", "vagrant")
    return subprocess.run([exe, *args], cwd=VAGRANT_DIR, capture_output=True, text=True,
                          timeout=120, check=False,
                          env=clean_env(VAGRANT_HOME=str(tmp / "home"),
                                        VAGRANT_DOTFILE_PATH=str(tmp / "dot"),
                                        VAGRANT_CHECKPOINT_DISABLE="1", **env))


def _validate_args(tmp: Path) -> tuple[list[str], dict[str, str]]:
    """How to validate offline here.

    * With vagrant-libvirt installed, the libvirt provider counts as usable
      without a libvirt daemon, so its ``provider :libvirt`` block is validated
      too. Without it (and without VirtualBox) no provider is usable and
      ``--ignore-provider`` validates everything but the provider blocks.
    * The synced folder type is validated against the host: nfs needs an NFS
      server, 9p/virtiofs a libvirt daemon; neither exists here, so the check
      uses rsync (MESHAGENT_SYNC_TYPE), which validates everywhere.
    """
    plugins = _vagrant(["plugin", "list"], tmp)
    env = {"MESHAGENT_SYNC_TYPE": "rsync"}
    if "vagrant-libvirt" in plugins.stdout:
        return ["validate"], {**env, "VAGRANT_DEFAULT_PROVIDER": "libvirt"}
    return ["validate", "--ignore-provider"], env


@pytest.mark.parametrize("settings", [
    {},
    {"MESHAGENT_VMS": "3", "MESHAGENT_BOX": "debian/bookworm64", "MESHAGENT_VM_CPUS": "4",
     "MESHAGENT_VM_MEMORY": "4096", "MESHAGENT_VM_NET": "192.168.57"},
    # what scripts/vagrant-e2e.sh sets for QEMU without KVM (TCG)
    {"MESHAGENT_LIBVIRT_DRIVER": "qemu", "MESHAGENT_VM_CPUS": "1", "MESHAGENT_VM_MEMORY": "1536",
     "MESHAGENT_BOOT_TIMEOUT_S": "1200", "MESHAGENT_READY_WAIT_S": "900",
     "MESHAGENT_VM_CONSOLE_DIR": "/tmp/meshagent-vagrant-console"},
], ids=["defaults", "three-vms", "tcg"])
def test_vagrant_validate(settings: dict[str, str], tmp_path: Path) -> None:
    args, env = _validate_args(tmp_path)
    proc = _vagrant(args, tmp_path, **env, **settings)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "validated successfully" in proc.stdout
    assert not (VAGRANT_DIR / ".vagrant").exists(), "vagrant wrote into the repository"


@pytest.mark.parametrize("settings", [{"MESHAGENT_VMS": "0"}, {"MESHAGENT_VM_NET": "10.0"},
                                      {"MESHAGENT_LIBVIRT_DRIVER": "xen"},
                                      {"MESHAGENT_READY_WAIT_S": "0"}],
                         ids=["no-vms", "bad-net", "bad-driver", "bad-ready-wait"])
def test_vagrant_validate_rejects_bad_settings(settings: dict[str, str], tmp_path: Path) -> None:
    args, env = _validate_args(tmp_path)
    proc = _vagrant(args, tmp_path, **env, **settings)
    assert proc.returncode != 0
    assert next(iter(settings)) in proc.stdout + proc.stderr


# -- shellcheck -----------------------------------------------------------------


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck(script: Path) -> None:
    exe = require_tool("shellcheck", "shellcheck")
    proc = subprocess.run([exe, str(script)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, f"shellcheck findings in {script}:\n{proc.stdout}{proc.stderr}"


def test_scripts_found() -> None:
    names = {p.name for p in SHELL_SCRIPTS}
    assert {"provision.sh", "make-pod.sh", "setup.sh", "vagrant-check.sh",
            "vagrant-e2e.sh"} <= names


def _setup_apt_packages() -> list[str]:
    """APT_PACKAGES of scripts/setup.sh, parsed here independently of the e2e script."""
    text = (REPO / "scripts" / "setup.sh").read_text()
    start = text.index("\nAPT_PACKAGES=(") + len("\nAPT_PACKAGES=(")
    body = text[start:text.index("\n)", start)]
    return [w for line in body.splitlines() for w in line.split("#", 1)[0].split()]


def test_e2e_box_has_every_setup_package() -> None:
    """The box scripts/vagrant-e2e.sh builds carries every apt package setup.sh
    installs (so provisioning in the VM installs nothing), plus a kernel with
    its headers (bcc compiles in the VM) and what Vagrant's Debian guest support
    uses (ifupdown, openssh, sudo)."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "vagrant-e2e.sh"), "packages"],
                          capture_output=True, text=True, timeout=60, check=False,
                          env=clean_env())
    assert proc.returncode == 0, proc.stderr
    box = set(proc.stdout.split())
    wanted = _setup_apt_packages()
    assert len(wanted) > 10, wanted
    assert set(wanted) <= box, f"missing from the box: {sorted(set(wanted) - box)}"
    assert {"linux-image-amd64", "linux-headers-amd64", "systemd-sysv", "openssh-server",
            "sudo", "ifupdown", "python3-venv"} <= box


# -- systemd units --------------------------------------------------------------


def _unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_units_verify(tmp_path: Path) -> None:
    """Render the units as provision.sh does and let systemd check them offline
    (syntax, known keys, ExecStart executable); no warnings allowed."""
    exe = require_tool("systemd-analyze", "systemd")
    for unit in UNITS:
        text = (VAGRANT_DIR / "systemd" / unit).read_text()
        rendered = text.replace("@VENV@", str(VENV)).replace("@CONFIG@", "/etc/meshagent/c.toml")
        assert "@" not in rendered.replace("multi-user", ""), f"placeholder left in {unit}"
        (tmp_path / unit).write_text(rendered)
    proc = subprocess.run([exe, "verify", "--man=no", *(str(tmp_path / u) for u in UNITS)],
                          capture_output=True, text=True, timeout=60, check=False,
                          env=clean_env(SYSTEMD_LOG_COLOR="0"))
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), \
        proc.stdout + proc.stderr


def test_systemd_units_keep_bpf_and_netns_working() -> None:
    agent = _unit_settings((VAGRANT_DIR / "systemd" / "meshagent.service").read_text())
    tunnel = _unit_settings((VAGRANT_DIR / "systemd" / "meshagent-tunnel.service").read_text())
    assert set(" ".join(agent["CapabilityBoundingSet"]).split()) >= AGENT_CAPS
    assert "ProtectKernelTunables" not in agent, "the agent writes net sysctls"
    assert "ProtectKernelModules" not in agent, "bcc reads headers under /lib/modules"
    for unit in (agent, tunnel):
        assert "PrivateNetwork" not in unit
        assert unit["NoNewPrivileges"] == ["yes"]
        assert unit["Restart"] == ["on-failure"]
    assert "meshagent.service" in tunnel["After"][0]
    assert "meshagent.service" in tunnel["Wants"][0]
    assert agent["ExecStart"] == ["@VENV@/bin/meshagent run"]
    assert tunnel["ExecStart"] == ["@VENV@/bin/meshagent tunnel"]


# -- provision.sh in a netns node -------------------------------------------------


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True,
                          timeout=STEP_TIMEOUT_S, check=False)


def _in_node(node_ns: str, argv: list[str], env: Mapping[str, str],
             timeout: float = STEP_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    # nsenter --net only: `ip netns exec` would remount /sys and hide bpffs.
    return run_in(node_ns, argv, timeout=timeout, env=env, cwd="/")


def _is_meshagent(pid: int) -> bool:
    try:
        return b"meshagent" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _stop(pid_file: Path, timeout: float = 15.0) -> None:
    """SIGTERM the process (its session, started with setsid), SIGKILL if it lingers."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _is_meshagent(pid):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _is_meshagent(pid):
            time.sleep(0.1)


def _leftovers(prefix: str, pin_dir: Path) -> list[str]:
    names = [n for n in os.listdir("/run/netns") if n.startswith(f"{prefix}-")] \
        if os.path.isdir("/run/netns") else []
    return names + ([str(pin_dir)] if pin_dir.exists() else [])


@contextlib.contextmanager
def _netns_node(prefix: str) -> Iterator[str]:
    node = f"{prefix}-node"
    assert _ip("netns", "add", node).returncode == 0
    try:
        assert _ip("-n", node, "link", "set", "lo", "up").returncode == 0
        yield node
    finally:
        _ip("netns", "del", node)


@pytest.mark.privileged
@pytest.mark.timeout(PROVISION_TIMEOUT_S + 120)
def test_provision_script_in_netns_node() -> None:
    prefix = unique_prefix("v")
    pods = [f"{prefix}-a", f"{prefix}-b"]
    pin_dir = Path(f"/sys/fs/bpf/meshagent-{prefix}")
    tmp = Path(tempfile.mkdtemp(prefix=f"meshagent-{prefix}-"))
    env = clean_env(
        MESHAGENT_PROVISION_VM="0",
        MESHAGENT_VENV=str(VENV),
        MESHAGENT_DEMO_PODS=" ".join(pods),
        MESHAGENT_CONFIG=str(tmp / "etc" / "config.toml"),
        MESHAGENT_AGENT_SOCKET=str(tmp / "run" / "agent.sock"),
        MESHAGENT_AGENT_STATE_DIR=str(tmp / "state"),
        MESHAGENT_AGENT_BPF_PIN_DIR=str(pin_dir),
        MESHAGENT_TUNNEL_CA_DIR=str(tmp / "etc" / "ca"),
        MESHAGENT_TUNNEL_POLICY_DIR=str(tmp / "etc" / "policies"),
        MESHAGENT_SHARED_CA_DIR=str(tmp / "shared" / "ca"),
        MESHAGENT_CNI_CONFLIST=str(tmp / "cni" / "net.d" / "10-meshagent.conflist"),
        MESHAGENT_CNI_CACHE_DIR=str(tmp / "cni" / "cache"),
        MESHAGENT_CNI_IPAM_DIR=str(tmp / "cni" / "ipam"),
        MESHAGENT_CNI_LOG_FILE=str(tmp / "cni" / "cni.log"),
        MESHAGENT_PROVISION_RUN_DIR=str(tmp / "run"),
        COLUMNS="160",
    )
    run_dir = tmp / "run"
    try:
        with _netns_node(prefix) as node:
            try:
                provision = [str(VAGRANT_DIR / "provision.sh")]
                proc = _in_node(node, ["bash", *provision], env, PROVISION_TIMEOUT_S)
                assert proc.returncode == 0, f"provision.sh failed:\n{proc.stdout}{proc.stderr}"
                _check_provisioned(tmp, pods, env)
                _check_meshed(node, pods, run_dir)
                # Provisioning again is harmless: services restart, pods are kept.
                proc = _in_node(node, ["bash", *provision], env, PROVISION_TIMEOUT_S)
                assert proc.returncode == 0, f"second run failed:\n{proc.stdout}{proc.stderr}"
                assert proc.stdout.count("already up (CNI CHECK passed)") == len(pods)
                _check_provisioned(tmp, pods, env)
            finally:
                _teardown(node, pods, env, run_dir)
    finally:
        for pod in pods:
            _ip("netns", "del", pod)
        if pin_dir.exists():
            shutil.rmtree(pin_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    assert _leftovers(prefix, pin_dir) == []
    assert not tmp.exists()


def _check_provisioned(tmp: Path, pods: list[str], env: Mapping[str, str]) -> None:
    config = (tmp / "etc" / "config.toml").read_text()
    assert 'mesh_cidrs = ["10.244.1.0/24"]' in config
    assert f'socket = "{env["MESHAGENT_AGENT_SOCKET"]}"' in config
    ca = tmp / "etc" / "ca"
    assert ca.stat().st_mode & 0o777 == 0o700
    assert (ca / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (ca / "ca.crt").read_bytes() == (tmp / "shared" / "ca" / "ca.crt").read_bytes()
    enrolled = client.call(env["MESHAGENT_AGENT_SOCKET"], {"op": "pod_list"}, timeout=10)
    by_name = {p["name"]: p for p in enrolled}
    assert sorted(by_name) == sorted(pods), enrolled
    for pod in pods:
        assert by_name[pod]["namespace"] == "default"
        assert by_name[pod]["addresses"][0].startswith("10.244.1."), by_name[pod]
    status = client.call(env["MESHAGENT_AGENT_SOCKET"], {"op": "status"}, timeout=10)
    assert 15001 in status["listeners"]


def _check_meshed(node: str, pods: list[str], run_dir: Path) -> None:
    """A connection from pod a to pod b (same node) goes through the tunnel."""
    with spawned(pods[1], [*program("oneshot_server"), "18070", "pong:", "20"]) as server:
        assert read_line(server, 20) == "ready"
        addr = _ip("-n", pods[1], "-4", "-o", "addr", "show", "eth0").stdout.split()[3]
        reply = run_in(pods[0], [*program("send_recv_client"), addr.split("/")[0], "18070",
                                 "ping"], timeout=STEP_TIMEOUT_S)
        assert reply.stdout.strip() == "pong:ping", reply.stderr

    def hbone_local() -> bool:
        events = [json.loads(line)
                  for line in (run_dir / "tunnel.log").read_text().splitlines()
                  if line.startswith("{")]
        return any(e.get("event") == "connection closed" and e.get("path") == "hbone-local"
                   for e in events)

    wait_until("the tunnel to log an hbone-local connection between the two pods",
               hbone_local, timeout=10, interval=0.2)


def _teardown(node: str, pods: list[str], env: Mapping[str, str], run_dir: Path) -> None:
    """CNI DEL (agent still up, so it unenrolls), stop agent + tunnel, uninstall."""
    for pod in reversed(pods):
        with contextlib.suppress(subprocess.TimeoutExpired):
            _in_node(node, ["bash", str(VAGRANT_DIR / "make-pod.sh"), "del", pod], env)
    for proc in ("tunnel", "agent"):
        _stop(run_dir / f"{proc}.pid")
    with contextlib.suppress(subprocess.TimeoutExpired):
        _in_node(node, [str(VENV / "bin" / "meshagent"), "uninstall"], env)


# -- found by the first real boot (scripts/vagrant-e2e.sh) ------------------------


@pytest.mark.parametrize(("release", "reuseport"), [
    ("6.1.0-57-amd64", False),   # Debian 12's kernel, the e2e box's
    ("6.4.16", False),
    ("6.5.0", True),             # bpf_sk_assign accepts SO_REUSEPORT sockets from 6.5 on
    ("6.18.44-fc-v1272", True),
])
def test_tunnel_listener_reuseport_only_where_sk_assign_takes_it(
        release: str, reuseport: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the e2e box's 6.1 kernel, bpf_sk_assign refused the tunnel's
    SO_REUSEPORT listeners and every captured packet was dropped as
    assign_failed; the listener is a plain one on such kernels."""
    import socket

    from agent.tunnel import sockets

    real = os.uname()
    monkeypatch.setattr(os, "uname", lambda: os.uname_result(
        (real.sysname, real.nodename, release, real.version, real.machine)))
    sock = sockets.listener(socket.AF_INET, 0, mark=0)
    try:
        assert bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)) is reuseport
    finally:
        sock.close()
