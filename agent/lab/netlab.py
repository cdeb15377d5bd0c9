"""Kernel side of the lab: build, inspect and tear down a :class:`LabPlan`.

Everything the lab creates lives *inside* network namespaces whose names start
with ``<prefix>-`` (veth pairs are created directly between two lab namespaces,
never in the caller's namespace), plus one run directory
``/run/meshagent-lab/<prefix>``. So :func:`down` can always find and remove a
lab by its prefix alone, even after a crash that lost the run directory.

Processes are run in a namespace with ``nsenter --net=/run/netns/<ns> --``
rather than ``ip netns exec``, because the latter remounts /sys and would hide
/sys/fs/bpf from the node daemons.

Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pyroute2 import IPRoute, netns
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD
from pyroute2.netlink.rtnl.rtmsg import RTNH_F_ONLINK

from agent.datapath.programs import remove_all_pins
from agent.lab.topology import (
    NETNS_RUN_DIR,
    LabPlan,
    NodePlan,
    PlanError,
    PodPlan,
    netns_path,
    run_dir,
    validate_plan,
    validate_prefix,
    validate_process_name,
)

AfterTopology = Callable[[LabPlan], None]
Progress = Callable[[str], None]

RT_SCOPE_LINK = 253
TERM_TIMEOUT_S = 5.0
KILL_TIMEOUT_S = 2.0
POLL_INTERVAL_S = 0.05
SUBPROCESS_TIMEOUT_S = 15.0
MAX_PROC_SCAN = 1_000_000  # upper bound on /proc entries inspected per scan

# Popen objects of processes we started, so they can be reaped (no zombies, no
# ResourceWarning) when stop_node_processes ends them.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class LabError(RuntimeError):
    """A lab operation failed; the message says what failed and what to do."""


@dataclass
class DownResult:
    """What :func:`down` removed."""

    prefix: str
    stopped_pids: list[int] = field(default_factory=list)
    removed_netns: list[str] = field(default_factory=list)
    removed_run_dir: bool = False


def _noop(_: str) -> None:
    return None


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (it creates network namespaces); rerun with sudo")


def _require_nsenter() -> str:
    path = shutil.which("nsenter")
    if path is None:
        raise LabError("nsenter not found in PATH; install util-linux (apt-get install util-linux)")
    return path


# -- discovery ------------------------------------------------------------------


def existing_netns(prefix: str) -> list[str]:
    """Names in /run/netns that belong to lab ``prefix``, in teardown order.

    Order: pods first, then nodes, then the underlay (``<prefix>-ul``), so a
    namespace is never removed before the ones plugged into it.
    """
    validate_prefix(prefix)
    try:
        names = sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []
    mine = [n for n in names if n.startswith(f"{prefix}-")]
    node_re = re.compile(rf"^{re.escape(prefix)}-node\d+$")

    def rank(name: str) -> int:
        if name == f"{prefix}-ul":
            return 2
        return 1 if node_re.match(name) else 0

    return sorted(mine, key=lambda n: (rank(n), n))


def lab_exists(prefix: str) -> bool:
    """True if any namespace or the run directory of lab ``prefix`` exists."""
    return bool(existing_netns(prefix)) or os.path.exists(run_dir(prefix))


def load_plan(prefix: str) -> LabPlan:
    """Read the plan that :func:`up` persisted in ``<run dir>/lab.json``."""
    validate_prefix(prefix)
    path = Path(run_dir(prefix)) / "lab.json"
    try:
        text = path.read_text()
    except FileNotFoundError:
        if existing_netns(prefix):
            raise LabError(
                f"lab {prefix!r} has namespaces but no plan at {path} (a crashed `lab up`?); "
                f"run `meshagent lab down --prefix {prefix}` and then `lab up` again"
            ) from None
        raise LabError(
            f"no lab with prefix {prefix!r}; create it with `meshagent lab up --prefix {prefix}`"
        ) from None
    try:
        return LabPlan.from_json(text)
    except PlanError as exc:
        raise LabError(
            f"{path}: {exc}; run `meshagent lab down --prefix {prefix}` and `lab up` again"
        ) from exc


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- up -------------------------------------------------------------------------


class _Steps:
    """Remembers the step in progress so a failure can name it."""

    def __init__(self, progress: Progress) -> None:
        self.current = "starting"
        self._progress = progress

    @contextlib.contextmanager
    def __call__(self, description: str) -> Iterator[None]:
        self.current = description
        self._progress(description)
        yield


def _sysctl(ns: str, settings: Mapping[str, str]) -> None:
    """Write ``settings`` (``/proc/sys`` relative path -> value) inside netns ``ns``.

    Side effects: runs one ``nsenter --net=/run/netns/<ns> -- sh -ec ...`` that
    writes each value; /proc/sys/net resolves against the writer's netns.
    """
    script = "; ".join(
        f"echo {value} > /proc/sys/{key.replace('.', '/')}" for key, value in settings.items()
    )
    argv = [_require_nsenter(), f"--net={netns_path(ns)}", "--", "sh", "-ec", script]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False
    )
    if proc.returncode != 0:
        raise LabError(f"setting sysctls in {ns} failed: {proc.stderr.strip() or proc.returncode}")


_COMMON_SYSCTLS = {
    # No DAD anywhere: addresses (and link-locals) are usable immediately.
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
}
_NODE_SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
}
# Bridge-CNI nodes: bridged traffic goes through iptables/ip6tables, as on a
# Kubernetes node (kubeadm requires it; it is also the default in a new netns
# on kernels with br_netfilter built in). Written explicitly, so the lab is a
# bridge-with-br_netfilter node whatever the kernel's default.
_BRIDGE_NODE_SYSCTLS = {
    "net.bridge.bridge-nf-call-iptables": "1",
    "net.bridge.bridge-nf-call-ip6tables": "1",
}


def _ifindex(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LabError(f"interface {ifname} not found right after creating it")
    return int(found[0])


def _add_addr(ipr: IPRoute, index: int, cidr: str) -> None:
    iface = ipaddress.ip_interface(cidr)
    kwargs: dict[str, Any] = {}
    if iface.version == 6:
        kwargs["flags"] = IFA_F_NODAD
    ipr.addr(
        "add",
        index=index,
        address=str(iface.ip),
        prefixlen=iface.network.prefixlen,
        **kwargs,
    )


def _build_underlay(plan: LabPlan, steps: _Steps) -> None:
    ul = plan.underlay
    with steps(f"create bridge {ul.bridge} in {ul.netns}"), IPRoute(netns=ul.netns, flags=0) as ipr:
        ipr.link("set", index=_ifindex(ipr, "lo"), state="up")
        ipr.link("add", ifname=ul.bridge, kind="bridge")
        ipr.link("set", index=_ifindex(ipr, ul.bridge), state="up")


def _build_node(plan: LabPlan, node: NodePlan, steps: _Steps) -> None:
    ul = plan.underlay
    with steps(f"connect {node.netns} to the underlay"), IPRoute(netns=node.netns, flags=0) as ipr:
        ipr.link("set", index=_ifindex(ipr, "lo"), state="up")
        ipr.link(
            "add",
            ifname=node.underlay_ifname,
            kind="veth",
            peer={"ifname": node.underlay_peer_ifname, "net_ns_fd": ul.netns},
        )
        idx = _ifindex(ipr, node.underlay_ifname)
        v4_len = ipaddress.ip_network(ul.ipv4_cidr).prefixlen
        v6_len = ipaddress.ip_network(ul.ipv6_cidr).prefixlen
        _add_addr(ipr, idx, f"{node.underlay_ipv4}/{v4_len}")
        _add_addr(ipr, idx, f"{node.underlay_ipv6}/{v6_len}")
        ipr.link("set", index=idx, state="up")
    with (
        steps(f"plug {node.underlay_peer_ifname} into {ul.bridge}"),
        IPRoute(netns=ul.netns, flags=0) as ipr,
    ):
        port = _ifindex(ipr, node.underlay_peer_ifname)
        ipr.link("set", index=port, master=_ifindex(ipr, ul.bridge))
        ipr.link("set", index=port, state="up")


def _build_pod(node: NodePlan, pod: PodPlan, steps: _Steps) -> None:
    with (
        steps(f"create veth {pod.host_ifname} <-> {pod.netns}:{pod.ifname}"),
        IPRoute(netns=node.netns, flags=0) as ipr,
    ):
        ipr.link(
            "add",
            ifname=pod.host_ifname,
            kind="veth",
            peer={"ifname": pod.ifname, "net_ns_fd": pod.netns},
        )
        idx = _ifindex(ipr, pod.host_ifname)
        _add_addr(ipr, idx, f"{pod.gateway_ipv4}/32")
        _add_addr(ipr, idx, f"{pod.gateway_ipv6}/128")
        ipr.link("set", index=idx, state="up")
        ipr.route("add", dst=f"{pod.ipv4}/32", oif=idx, scope=RT_SCOPE_LINK)
        ipr.route("add", family=socket.AF_INET6, dst=f"{pod.ipv6}/128", oif=idx)
    with steps(f"configure {pod.ifname} in {pod.netns}"), IPRoute(netns=pod.netns, flags=0) as ipr:
        ipr.link("set", index=_ifindex(ipr, "lo"), state="up")
        idx = _ifindex(ipr, pod.ifname)
        _add_addr(ipr, idx, f"{pod.ipv4}/32")
        _add_addr(ipr, idx, f"{pod.ipv6}/128")
        ipr.link("set", index=idx, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=pod.gateway_ipv4, oif=idx, flags=RTNH_F_ONLINK)
        ipr.route(
            "add",
            family=socket.AF_INET6,
            dst="::/0",
            gateway=pod.gateway_ipv6,
            oif=idx,
            flags=RTNH_F_ONLINK,
        )


def _build_cni_pod_netns(pod: PodPlan, steps: _Steps) -> None:
    """CNI pods: only loopback up; ``eth0`` comes from the CNI plugins later
    (:mod:`agent.lab.cnipods`, run by the mesh hook once the agents are up)."""
    with (
        steps(f"bring up lo in {pod.netns} (eth0 via CNI)"),
        IPRoute(netns=pod.netns, flags=0) as ipr,
    ):
        ipr.link("set", index=_ifindex(ipr, "lo"), state="up")


def _build_cross_node_routes(plan: LabPlan, node: NodePlan, steps: _Steps) -> None:
    with (
        steps(f"route other nodes' pod CIDRs in {node.netns}"),
        IPRoute(netns=node.netns, flags=0) as ipr,
    ):
        for other in plan.nodes:
            if other.name == node.name:
                continue
            for cidr in other.pod_cidrs:
                net = ipaddress.ip_network(cidr)
                via = other.underlay_ipv4 if net.version == 4 else other.underlay_ipv6
                family = socket.AF_INET if net.version == 4 else socket.AF_INET6
                ipr.route("add", family=family, dst=cidr, gateway=via)


def _build(plan: LabPlan, steps: _Steps) -> None:
    with steps(f"create run directory {plan.run_dir}"):
        os.makedirs(run_dir(plan.prefix), mode=0o755)
        for node in plan.nodes:
            os.makedirs(plan.node_run_dir(node.name), mode=0o755, exist_ok=True)
        _write_atomic(Path(plan.plan_path), plan.to_json())
    for ns in reversed(plan.all_netns()):  # underlay, nodes, pods
        with steps(f"create netns {ns}"):
            netns.create(ns)
            if not os.path.exists(netns_path(ns)):
                raise LabError(f"netns {ns} was not created at {netns_path(ns)}")
    with steps(f"set sysctls in {plan.underlay.netns}"):
        _sysctl(plan.underlay.netns, _COMMON_SYSCTLS)
    for node in plan.nodes:
        with steps(f"set sysctls in {node.netns}"):
            _sysctl(node.netns, {**_COMMON_SYSCTLS, **_NODE_SYSCTLS,
                                 **(_BRIDGE_NODE_SYSCTLS if plan.pod_network == "cni-bridge"
                                    else {})})
        for pod in node.pods:
            with steps(f"set sysctls in {pod.netns}"):
                _sysctl(pod.netns, _COMMON_SYSCTLS)
    _build_underlay(plan, steps)
    for node in plan.nodes:
        _build_node(plan, node, steps)
        for pod in node.pods:
            if plan.uses_cni:
                _build_cni_pod_netns(pod, steps)
            else:
                _build_pod(node, pod, steps)
    for node in plan.nodes:
        _build_cross_node_routes(plan, node, steps)


def up(
    plan: LabPlan,
    after_topology: AfterTopology | None = None,
    progress: Progress | None = None,
) -> LabPlan:
    """Create the lab described by ``plan``; all or nothing.

    Side effects, in order:

    1. ``/run/meshagent-lab/<prefix>/`` with ``lab.json`` (the plan) and one
       sub-directory per node (for daemon logs and pid files).
    2. Namespaces ``<prefix>-ul``, ``<prefix>-nodeN``, ``<prefix>-nN-*`` in
       /run/netns (visible to ``ip netns list``).
    3. Sysctls: IPv6 DAD off and rp_filter 0 everywhere; on nodes
       ``net.ipv4.ip_forward=1`` and ``net.ipv6.conf.all.forwarding=1``.
    4. In the underlay netns: loopback up, bridge ``<prefix>br`` up.
    5. Per node: veth ``ul0`` <-> bridge port ``<prefix>uN`` with the node's
       underlay addresses (v6 nodad); loopback up.
    6. Per pod: veth (host side ``<prefix>nNx`` in the node netns with the
       gateway .1/32 and ::1/128 and /32, /128 scope-link routes to the pod;
       pod side ``eth0`` with the pod's /32 and /128 and on-link default
       routes via the gateway); loopback up.
    7. Per node: routes to every other node's pod CIDRs via its underlay IP.
    8. ``after_topology(plan)`` if given (e.g. start daemons, enroll pods).

    If any step (including ``after_topology``) fails or is interrupted, every
    process started and everything created is removed via :func:`down`, and a
    :class:`LabError` names the failed step. Refuses (without touching
    anything) if a lab with the same prefix exists.
    """
    validate_plan(plan)
    _require_root()
    _require_nsenter()
    say = progress or _noop
    prefix = plan.prefix
    if lab_exists(prefix):
        found = existing_netns(prefix) or [run_dir(prefix)]
        raise LabError(
            f"a lab with prefix {prefix!r} already exists ({', '.join(found)}); "
            f"run `meshagent lab down --prefix {prefix}` first or pick another --prefix"
        )
    steps = _Steps(say)
    try:
        _build(plan, steps)
        if after_topology is not None:
            with steps("run after_topology hook"):
                after_topology(plan)
    except BaseException as exc:
        failed = steps.current
        say(f"failed at: {failed}; removing everything created so far")
        try:
            down(prefix)
        except Exception as cleanup_exc:
            raise LabError(
                f"lab up failed at step {failed!r}: {exc!r}; cleanup ALSO failed: "
                f"{cleanup_exc}. Run `meshagent lab down --prefix {prefix}` to finish it"
            ) from exc
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit
            raise
        raise LabError(
            f"lab up failed at step {failed!r}: {exc}. Everything it created was removed; "
            "fix the cause and run `meshagent lab up` again"
        ) from exc
    return plan


# -- down -----------------------------------------------------------------------


def down(prefix: str, progress: Progress | None = None) -> DownResult:
    """Remove every trace of lab ``prefix``; idempotent, fine if nothing exists.

    Side effects, in order:

    0. CNI labs (``pod_network`` ``cni`` or ``cni-bridge``): CNI DEL for every pod through the
       lab's conflists while the agents still run (best effort, only reported;
       :func:`agent.lab.cnipods.del_pods`).
    1. :func:`stop_node_processes` (daemons from pid files, then anything still
       running in one of the lab's namespaces).
    2. Unmount and delete the namespaces ``<prefix>-*`` found in /run/netns:
       pods, then nodes, then the underlay. Deleting a namespace destroys the
       interfaces, addresses and routes in it (veth peers go with it).
    3. Delete ``/run/meshagent-lab/<prefix>`` (plan, logs, pid files).
    4. Delete the agents' pinned maps, ``/sys/fs/bpf/meshagent-<prefix>-*``.

    Continues past individual failures and raises one :class:`LabError` listing
    them at the end.
    """
    validate_prefix(prefix)
    _require_root()
    say = progress or _noop
    result = DownResult(prefix=prefix)
    errors: list[str] = []
    _cni_del_pods(prefix, say)
    try:
        result.stopped_pids = stop_node_processes(prefix)
        if result.stopped_pids:
            say(f"stopped processes {result.stopped_pids}")
    except LabError as exc:
        errors.append(str(exc))
    for ns in existing_netns(prefix):
        try:
            netns.remove(ns)
        except OSError as exc:
            errors.append(f"removing netns {ns}: {exc}")
            continue
        result.removed_netns.append(ns)
        say(f"removed netns {ns}")
    rdir = run_dir(prefix)
    if os.path.lexists(rdir):
        try:
            shutil.rmtree(rdir)
            result.removed_run_dir = True
            say(f"removed {rdir}")
        except OSError as exc:
            errors.append(f"removing {rdir}: {exc}")
    for pins in sorted(Path("/sys/fs/bpf").glob(f"meshagent-{prefix}-*")):
        # The lab's agents pin their maps here (agent.bpf_pin_dir per node).
        try:
            remove_all_pins(str(pins))
            say(f"removed pinned maps {pins}")
        except OSError as exc:
            errors.append(f"removing {pins}: {exc}")
    if errors:
        raise LabError(
            f"lab down --prefix {prefix} left things behind: "
            + "; ".join(errors)
            + ". Check `ip netns list` and `ls /run/meshagent-lab`, fix, and run it again"
        )
    return result


def _cni_del_pods(prefix: str, say: Progress) -> None:
    """CNI labs: CNI DEL for every pod while the agents still run (best effort:
    failures are only reported, deleting the namespaces removes the rest)."""
    try:
        plan = load_plan(prefix)
    except (LabError, PlanError):
        return
    if not plan.uses_cni:
        return
    from agent.lab import cnipods  # here, not at the top: cnipods imports netlab

    for problem in cnipods.del_pods(plan, progress=say):
        say(f"CNI DEL (best effort) failed: {problem}")


# -- processes ------------------------------------------------------------------


def _netns_ids(names: Sequence[str]) -> dict[tuple[int, int], str]:
    """(st_dev, st_ino) of each named namespace -> its name."""
    ids: dict[tuple[int, int], str] = {}
    for name in names:
        try:
            st = os.stat(netns_path(name))
        except OSError:
            continue
        ids[(st.st_dev, st.st_ino)] = name
    return ids


def _proc_netns_id(pid: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _proc_stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def _alive(pid: int) -> bool:
    """True if ``pid`` runs; zombies count as gone.

    Only children started by :func:`start_node_process` are reaped here; other
    children of the caller are left for the caller's own ``wait``.
    """
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(pid, None)
        return False
    fields = _proc_stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _start_walltime(pid: int) -> float | None:
    """Wall-clock start time of ``pid`` (from /proc/<pid>/stat and btime)."""
    fields = _proc_stat_fields(pid)
    if fields is None:
        return None
    try:
        btime = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        ticks = int(fields[19])  # field 22: starttime, in clock ticks since boot
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def _pid_files(prefix: str) -> list[Path]:
    root = Path(run_dir(prefix))
    if not root.is_dir():
        return []
    return sorted(root.glob("*/*.pid"))


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 1 else None


def _signal(pid: int, sig: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group and os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    """Poll until none of ``pids`` is alive or ``timeout`` passes; return survivors."""
    deadline = time.monotonic() + timeout
    remaining = set(pids)
    for _ in range(int(timeout / POLL_INTERVAL_S) + 2):
        remaining = {p for p in remaining if _alive(p)}
        if not remaining or time.monotonic() >= deadline:
            break
        time.sleep(POLL_INTERVAL_S)
    return remaining


def processes_in_netns(names: Sequence[str]) -> dict[int, str]:
    """Live processes whose network namespace is one of ``names`` -> that name."""
    ids = _netns_ids(names)
    if not ids:
        return {}
    found: dict[int, str] = {}
    me = os.getpid()
    with os.scandir("/proc") as entries:
        for count, entry in enumerate(entries):
            if count >= MAX_PROC_SCAN:
                break
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid in (1, me):
                continue
            ns_id = _proc_netns_id(pid)
            if ns_id in ids and _alive(pid):
                found[pid] = ids[ns_id]
    return found


def stop_node_processes(prefix: str, timeout: float = TERM_TIMEOUT_S) -> list[int]:
    """Stop every process belonging to lab ``prefix``; return their pids.

    Side effects, in order:

    1. For each ``/run/meshagent-lab/<prefix>/<node>/<name>.pid``: if that pid
       is still the process we started (it lives in a lab namespace, or it
       started no later than the pid file was written - guards against pid
       reuse), SIGTERM its process group (it is a session leader).
    2. SIGTERM every other process whose ``/proc/<pid>/ns/net`` is one of the
       lab's namespaces (e.g. left over from ``lab exec``).
    3. Wait up to ``timeout`` seconds, SIGKILL survivors, wait up to
       ``KILL_TIMEOUT_S`` more.
    4. Delete the pid files.

    Raises :class:`LabError` if something survives SIGKILL.
    """
    validate_prefix(prefix)
    lab_ns = existing_netns(prefix)
    lab_ids = _netns_ids(lab_ns)
    targets: dict[int, bool] = {}  # pid -> signal its process group
    pid_files = _pid_files(prefix)
    for pid_file in pid_files:
        pid = _read_pid(pid_file)
        if pid is None or pid == os.getpid() or not _alive(pid):
            continue
        in_lab = _proc_netns_id(pid) in lab_ids
        started = _start_walltime(pid)
        try:
            written = pid_file.stat().st_mtime
        except OSError:
            continue
        if in_lab or (started is not None and started <= written + 1.0):
            targets[pid] = True
    for pid in processes_in_netns(lab_ns):
        targets.setdefault(pid, False)
    for pid, group in targets.items():
        _signal(pid, signal.SIGTERM, group)
    survivors = _wait_gone(set(targets), timeout)
    for pid in survivors:
        _signal(pid, signal.SIGKILL, targets[pid])
    survivors = _wait_gone(survivors, KILL_TIMEOUT_S)
    for pid_file in pid_files:
        with contextlib.suppress(OSError):
            pid_file.unlink()
    if survivors:
        raise LabError(
            f"processes {sorted(survivors)} of lab {prefix!r} survived SIGKILL "
            "(stuck in the kernel?); inspect with `ps -o pid,stat,wchan,cmd -p PID`"
        )
    return sorted(targets)


def nsenter_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """The command line running ``argv`` in netns ``ns`` (mounts untouched)."""
    return [_require_nsenter(), f"--net={netns_path(ns)}", "--", *argv]


def start_node_process(
    lab: LabPlan,
    node: str | NodePlan,
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    in_netns: str | None = None,
) -> int:
    """Start ``argv`` detached inside ``node``'s netns (or ``in_netns``, e.g. a pod's of
    that node: its files stay in the node's run directory); return its pid.

    Side effects, in order:

    1. Create ``/run/meshagent-lab/<prefix>/<node>/`` if missing.
    2. Spawn ``nsenter --net=/run/netns/<node-ns> -- argv...`` in a new session
       (its own process group), cwd ``/``, stdin from /dev/null, stdout and
       stderr appended to ``<node>/<name>.log``; environment = ours updated
       with ``env``. nsenter execs ``argv`` in place, so the pid is argv's.
    3. Write the pid to ``<node>/<name>.pid`` (used by
       :func:`stop_node_processes` and ``lab down``).
    4. Wait (at most 5 s) until the process is inside the node's netns, so the
       caller may rely on that; if it exits non-zero first, raise with the
       tail of its log.

    Raises :class:`LabError` if the node netns is missing, ``argv[0]`` cannot
    be found, or a process of that name is still running.
    """
    node_plan = lab.node(node if isinstance(node, str) else node.name)
    target_netns = in_netns or node_plan.netns
    validate_process_name(name)
    if not argv:
        raise LabError(f"start_node_process({name!r}): argv is empty")
    if not os.path.exists(netns_path(target_netns)):
        raise LabError(
            f"netns {target_netns} does not exist; run `meshagent lab up --prefix {lab.prefix}`"
        )
    full_env = {**os.environ, **(env or {})}
    if shutil.which(argv[0], path=full_env.get("PATH")) is None:
        raise LabError(f"cannot start {name} on {node_plan.name}: {argv[0]!r} not found")
    ndir = Path(lab.node_run_dir(node_plan.name))
    ndir.mkdir(parents=True, exist_ok=True)
    pid_path = ndir / f"{name}.pid"
    old = _read_pid(pid_path)
    if old is not None and _alive(old) and _proc_netns_id(old) in _netns_ids([target_netns]):
        raise LabError(
            f"{name} already runs on {node_plan.name} (pid {old}); stop it first "
            f"(`meshagent lab down --prefix {lab.prefix}` stops everything)"
        )
    log_path = ndir / f"{name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            nsenter_argv(target_netns, argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            cwd="/",
            env=full_env,
        )
    _CHILDREN[proc.pid] = proc
    _write_atomic(pid_path, f"{proc.pid}\n")
    _wait_entered(proc, target_netns, name, log_path)
    return proc.pid


def _wait_entered(
    proc: subprocess.Popen[bytes], ns: str, name: str, log_path: Path, timeout: float = 5.0
) -> None:
    """Return once ``proc`` lives in netns ``ns`` (or exited with status 0)."""
    want = _netns_ids([ns])
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / POLL_INTERVAL_S) + 2):
        rc = proc.poll()
        if rc is not None:
            _CHILDREN.pop(proc.pid, None)
            if rc == 0:
                return
            tail = log_path.read_text(errors="replace")[-500:].strip()
            raise LabError(f"{name} exited at once with status {rc}; {log_path} says: {tail}")
        if _proc_netns_id(proc.pid) in want:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_INTERVAL_S / 5)
    proc.kill()
    proc.wait(timeout=KILL_TIMEOUT_S)
    _CHILDREN.pop(proc.pid, None)
    raise LabError(f"{name} did not enter netns {ns} within {timeout}s; it was killed")


def process_log_path(lab: LabPlan, node: str, name: str) -> str:
    """Where :func:`start_node_process` sends ``name``'s output on ``node``."""
    return f"{lab.node_run_dir(node)}/{validate_process_name(name)}.log"


# -- exec -----------------------------------------------------------------------


def resolve_netns(prefix: str, target: str) -> str:
    """Netns of pod ``target`` (short name, e.g. ``n1-a``) or node (``node1``)."""
    plan = load_plan(prefix)
    for node in plan.nodes:
        if node.name == target:
            return node.netns
    try:
        return plan.pod(target).netns
    except PlanError as exc:
        raise LabError(f"{exc} (or a node: {', '.join(n.name for n in plan.nodes)})") from exc


def exec_in_pod(
    prefix: str,
    pod: str,
    argv: Sequence[str],
    *,
    stdin: int | IO[Any] | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    timeout: float | None = None,
) -> int:
    """Run ``argv`` in pod (or node) ``pod``'s netns; return its exit status.

    Side effects: spawns ``nsenter --net=/run/netns/<ns> -- argv`` with the
    given (default: inherited) stdio and waits for it. A command killed by a
    signal returns 128 + the signal number, like a shell.
    """
    if not argv:
        raise LabError("nothing to run: give a command after `--`")
    ns = resolve_netns(prefix, pod)
    if not os.path.exists(netns_path(ns)):
        raise LabError(
            f"netns {ns} is missing; run `meshagent lab down --prefix {prefix}` and `lab up`"
        )
    try:
        proc = subprocess.run(
            nsenter_argv(ns, argv),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{list(argv)} in {ns} did not finish within {timeout}s") from exc
    rc = proc.returncode
    return 128 - rc if rc < 0 else rc


# -- list -----------------------------------------------------------------------


def _global_addrs(ipr: IPRoute, ifname: str) -> tuple[list[str], list[str]] | None:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        return None
    v4: list[str] = []
    v6: list[str] = []
    for msg in ipr.get_addr(index=found[0]):
        addr = msg.get("IFA_ADDRESS")
        if addr is None or ipaddress.ip_address(addr).is_link_local:
            continue
        (v4 if msg["family"] == socket.AF_INET else v6).append(str(ipaddress.ip_address(addr)))
    return v4, v6


def _link_names(ipr: IPRoute) -> set[str]:
    return {str(link.get("IFLA_IFNAME")) for link in ipr.get_links()}


@contextlib.contextmanager
def _open_ns(ns: str, problems: list[str]) -> Iterator[IPRoute | None]:
    if not os.path.exists(netns_path(ns)):
        problems.append(f"netns {ns} is missing")
        yield None
        return
    try:
        ipr = IPRoute(netns=ns, flags=0)
    except OSError as exc:
        problems.append(f"cannot open netns {ns}: {exc}")
        yield None
        return
    try:
        yield ipr
    finally:
        ipr.close()


def _first(addrs: tuple[list[str], list[str]] | None, v6: bool) -> str | None:
    if addrs is None:
        return None
    values = addrs[1] if v6 else addrs[0]
    return values[0] if values else None


def list_lab(prefix: str) -> dict[str, Any]:
    """The lab as the kernel sees it, shaped like the plan.

    Addresses are read back from the interfaces (``None`` if absent); any
    difference from the plan is listed in ``problems`` and ``healthy`` is False.
    Read-only.
    """
    plan = load_plan(prefix)
    problems: list[str] = []
    ul = plan.underlay
    ports: list[str] = []
    with _open_ns(ul.netns, problems) as ipr:
        if ipr is not None:
            bridge = ipr.link_lookup(ifname=ul.bridge)
            if not bridge:
                problems.append(f"bridge {ul.bridge} missing in {ul.netns}")
            else:
                ports = sorted(
                    str(link.get("IFLA_IFNAME"))
                    for link in ipr.get_links()
                    if link.get("IFLA_MASTER") == bridge[0]
                )
    nodes_out: list[dict[str, Any]] = []
    for node in plan.nodes:
        node_addrs = None
        links: set[str] = set()
        links_by_index: dict[int, str] = {}
        with _open_ns(node.netns, problems) as ipr:
            if ipr is not None:
                node_addrs = _global_addrs(ipr, node.underlay_ifname)
                links = _link_names(ipr)
                links_by_index = {
                    int(link["index"]): str(link.get("IFLA_IFNAME")) for link in ipr.get_links()
                }
        pods_out: list[dict[str, Any]] = []
        for pod in node.pods:
            pod_addrs = None
            peer_index: int | None = None
            with _open_ns(pod.netns, problems) as ipr:
                if ipr is not None:
                    pod_addrs = _global_addrs(ipr, pod.ifname)
                    peer_index = _veth_peer_index(ipr, pod.ifname)
            if plan.uses_cni:
                host_ifname = links_by_index.get(peer_index) if peer_index else None
            else:
                host_ifname = pod.host_ifname if pod.host_ifname in links else None
            entry = {
                "name": pod.name,
                "netns": pod.netns,
                "ipv4": _first(pod_addrs, v6=False),
                "ipv6": _first(pod_addrs, v6=True),
                "host_ifname": host_ifname,
                "namespace": pod.namespace,
                "service_account": pod.service_account,
                "enroll": pod.enroll,
            }
            if plan.uses_cni:
                _compare_cni(problems, pod.name, entry, node.pod_cidrs)
            else:
                _compare(problems, pod.name, entry, pod.ipv4, pod.ipv6, pod.host_ifname)
            pods_out.append(entry)
        node_entry = {
            "name": node.name,
            "netns": node.netns,
            "underlay_ipv4": _first(node_addrs, v6=False),
            "underlay_ipv6": _first(node_addrs, v6=True),
            "pod_cidrs": list(node.pod_cidrs),
            "pods": pods_out,
        }
        if node_entry["underlay_ipv4"] != node.underlay_ipv4:
            problems.append(f"{node.name} underlay IPv4 is {node_entry['underlay_ipv4']}")
        if node_entry["underlay_ipv6"] != node.underlay_ipv6:
            problems.append(f"{node.name} underlay IPv6 is {node_entry['underlay_ipv6']}")
        if node.underlay_peer_ifname not in ports:
            problems.append(f"{node.underlay_peer_ifname} is not a port of {ul.bridge}")
        nodes_out.append(node_entry)
    return {
        "prefix": plan.prefix,
        "run_dir": plan.run_dir,
        "pod_network": plan.pod_network,
        "underlay": {
            "netns": ul.netns,
            "bridge": ul.bridge,
            "ipv4_cidr": ul.ipv4_cidr,
            "ipv6_cidr": ul.ipv6_cidr,
            "ports": ports,
        },
        "nodes": nodes_out,
        "healthy": not problems,
        "problems": problems,
    }


def _compare(
    problems: list[str], name: str, entry: Mapping[str, Any], v4: str, v6: str, host: str
) -> None:
    if entry["ipv4"] != v4:
        problems.append(f"pod {name} IPv4 is {entry['ipv4']}, plan says {v4}")
    if entry["ipv6"] != v6:
        problems.append(f"pod {name} IPv6 is {entry['ipv6']}, plan says {v6}")
    if entry["host_ifname"] is None:
        problems.append(f"pod {name} host interface {host} is missing")


def _veth_peer_index(ipr: IPRoute, ifname: str) -> int | None:
    """Ifindex (in the peer's netns) of the other end of veth ``ifname``."""
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        return None
    (link,) = ipr.get_links(found[0])
    peer = link.get("IFLA_LINK")
    return int(peer) if peer else None


def _compare_cni(
    problems: list[str], name: str, entry: Mapping[str, Any], cidrs: Sequence[str]
) -> None:
    """CNI pods: addresses come from host-local, so only check they are in the
    node's pod CIDRs (one per family) and that the host veth exists."""
    for family, key in ((4, "ipv4"), (6, "ipv6")):
        nets = [ipaddress.ip_network(c) for c in cidrs if ipaddress.ip_network(c).version == family]
        addr = entry[key]
        if not nets:
            continue
        if addr is None:
            problems.append(f"pod {name} has no IPv{family} address (CNI ADD not run or failed)")
        elif not any(ipaddress.ip_address(addr) in n for n in nets):
            problems.append(f"pod {name} {key} {addr} is outside {', '.join(map(str, nets))}")
    if entry["host_ifname"] is None:
        problems.append(f"pod {name} has no host-side veth in its node netns")


def add_extra_pod(plan: LabPlan, node: NodePlan, pod: PodPlan) -> None:
    """One more pod, wired like the plan's veth pods but not in ``lab.json`` (e.g. a
    waypoint pod, :mod:`agent.lab.waypoints`); ``lab down`` removes it with every
    ``<prefix>-*`` namespace.

    Side effects: creates netns ``pod.netns``, a veth pair (host side in the node's
    netns), addresses and routes; on failure removes the netns again (its veth goes
    with it).
    """
    validate_prefix(plan.prefix)
    if not pod.netns.startswith(f"{plan.prefix}-"):
        raise LabError(f"pod netns {pod.netns} is not under the lab's prefix {plan.prefix}-")
    steps = _Steps(_noop)
    netns.create(pod.netns)
    try:
        _build_pod(node, pod, steps)
    except Exception as exc:
        with contextlib.suppress(OSError):
            netns.remove(pod.netns)
        raise LabError(f"adding pod {pod.name} failed at {steps.current!r}: {exc}") from exc


def process_alive(pid: int) -> bool:
    """Whether a process :func:`start_node_process` started still runs (a zombie has
    exited; it is reaped here)."""
    return _alive(pid)
