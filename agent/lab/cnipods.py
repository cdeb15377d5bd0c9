"""Lab pods through the real CNI path, like a container runtime creates them.

Selected with ``meshagent lab up --pods cni`` (ptp) or ``--pods cni-bridge``
(bridge), or ``MESHAGENT_LAB_PODS``; the plan's ``pod_network`` says which.
``lab up`` creates each pod's netns empty; once the agents run,
:func:`add_pods` runs CNI ADD for each pod with a per-node conflist:

1. ``ptp`` (point-to-point veth, /32 and /128 routes) or ``bridge`` (every
   pod's veth a port of bridge ``cni0``, the gateway addresses on the bridge,
   ``isGateway``; the node has br_netfilter on, see netlab), with
   ``host-local`` IPAM (the node's /24 and /64, state under
   ``/run/meshagent-lab/<prefix>/<node>/ipam``; each pod asks for its planned
   addresses through the ``args.cni.ips`` convention), executed with the
   node's netns as its current netns (``nsenter --net=/run/netns/<node-ns>``)
   and ``CNI_NETNS=/run/netns/<pod-ns>``: it creates the veth pair and addresses;
2. ``meshagent-cni`` chained after it, with ``enrolled_namespaces`` = the
   namespaces of the pods marked ``enroll`` (the plain pod is in ``unmeshed``)
   and the node agent's socket: it enrolls the pod.

Each conflist is kept at ``<run dir>/cni/<node>.conflist`` and each ADD result
at ``<run dir>/cni/results/<container id>-<ifname>.json`` (like libcni's
cache) for ``lab down``, which runs :func:`del_pods` (plugins in reverse)
before it stops the agents and deletes the namespaces.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.cni import runtime
from agent.lab import netlab
from agent.lab.topology import LabPlan, NodePlan, PodPlan, netns_path

LAB_PODS_ENV = "MESHAGENT_LAB_PODS"  # veth (default) | cni | cni-bridge
SYSTEM_CNI_DIR = "/usr/lib/cni"
PLUGIN_NAME = "meshagent-cni"
PLUGIN_TIMEOUT_S = 30.0
NETWORK_NAME = "meshlab"
BRIDGE_NAME = "cni0"  # the bridge plugin's default name, one per node netns


def cni_bin_dirs() -> list[str]:
    """CNI_PATH: the system plugins, then the directory holding ``meshagent-cni``
    (the running interpreter's bin dir, e.g. the venv's, else from PATH)."""
    dirs = [SYSTEM_CNI_DIR]
    here = Path(sys.executable).parent
    if (here / PLUGIN_NAME).exists():
        dirs.append(str(here))
    else:
        found = shutil.which(PLUGIN_NAME)
        if found:
            dirs.append(str(Path(found).parent))
    return dirs


def container_id(plan: LabPlan, pod: PodPlan) -> str:
    return f"meshlab-{plan.prefix}-{pod.name}"


def cni_dir(plan: LabPlan) -> Path:
    return Path(plan.run_dir) / "cni"


def conflist_path(plan: LabPlan, node: str) -> Path:
    return cni_dir(plan) / f"{node}.conflist"


def result_path(plan: LabPlan, pod: PodPlan) -> Path:
    return cni_dir(plan) / "results" / f"{container_id(plan, pod)}-{pod.ifname}.json"


def plugin_log_path(plan: LabPlan, node: str) -> str:
    return f"{plan.node_run_dir(node)}/cni.log"


def build_conflist(plan: LabPlan, node: NodePlan, agent_socket: str | None) -> dict[str, Any]:
    """The node's conflist (pure). Without ``agent_socket`` only the primary
    plugin (ptp or bridge) runs."""
    ranges = []
    for cidr in node.pod_cidrs:
        net = ipaddress.ip_network(cidr)
        ranges.append([{
            "subnet": cidr,
            "rangeStart": str(net.network_address + 10),
            "rangeEnd": str(net.network_address + (250 if net.version == 4 else 0xFFFF)),
            "gateway": str(net.network_address + 1),
        }])
    primary: dict[str, Any] = {"type": "ptp", "ipMasq": False}
    if plan.pod_network == "cni-bridge":
        primary = {"type": "bridge", "bridge": BRIDGE_NAME, "isGateway": True,
                   "ipMasq": False, "hairpinMode": False}
    primary["ipam"] = {
        "type": "host-local",
        "ranges": ranges,
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
        "dataDir": f"{plan.node_run_dir(node.name)}/ipam",
    }
    plugins: list[dict[str, Any]] = [primary]
    if agent_socket is not None:
        from agent.lab.kube import kube_enabled

        patterns = [{"pod_name_pattern": p.name, "service_account": p.service_account}
                    for p in node.pods]
        section: dict[str, Any] = {
            "agent_socket": agent_socket,
            "enrolled_namespaces": sorted({p.namespace for p in plan.pods() if p.enroll}),
            "service_account_patterns": patterns,
            "fail_open": False,
            "timeout_seconds": 20,
            "log_file": plugin_log_path(plan, node.name),
        }
        if kube_enabled():  # lab up --kube: the agent judges each pod by Istio's labels
            section = {k: section[k] for k in ("agent_socket", "fail_open",
                                               "timeout_seconds", "log_file")}
            section["kubernetes"] = True
        plugins.append({"type": PLUGIN_NAME, "meshagent": section})
    return {"cniVersion": "1.0.0", "name": NETWORK_NAME, "plugins": plugins}


def pod_conflist(conf: Mapping[str, Any], pod: PodPlan) -> dict[str, Any]:
    """``conf`` with the primary plugin asking host-local for ``pod``'s planned
    addresses (``args.cni.ips``, the convention host-local reads), pure."""
    plugins = [dict(p) for p in conf["plugins"]]
    plugins[0]["args"] = {"cni": {"ips": [pod.ipv4, pod.ipv6]}}
    return {**conf, "plugins": plugins}


def host_ifname_of(result: Mapping[str, Any]) -> str | None:
    """The host side of the pod's veth in a CNI result: the interface with no
    ``sandbox`` that is not the bridge (pure)."""
    for iface in result.get("interfaces") or []:
        if isinstance(iface, Mapping) and not iface.get("sandbox") \
                and iface.get("name") not in (None, BRIDGE_NAME):
            return str(iface["name"])
    return None


def plan_with_results(plan: LabPlan, results: Mapping[str, Mapping[str, Any]]) -> LabPlan:
    """``plan`` with each pod's ``host_ifname`` the one its plugin made (pure)."""
    nodes = []
    for node in plan.nodes:
        pods = []
        for pod in node.pods:
            name = host_ifname_of(results.get(pod.name, {}))
            pods.append(dataclasses.replace(pod, host_ifname=name) if name else pod)
        nodes.append(dataclasses.replace(node, pods=tuple(pods)))
    return dataclasses.replace(plan, nodes=tuple(nodes))


def runtime_conf(plan: LabPlan, pod: PodPlan, cni_path: Sequence[str]) -> runtime.RuntimeConf:
    return runtime.RuntimeConf(
        container_id=container_id(plan, pod),
        netns=netns_path(pod.netns),
        ifname=pod.ifname,
        args=(("IgnoreUnknown", "1"), ("K8S_POD_NAMESPACE", pod.namespace),
              ("K8S_POD_NAME", pod.name)),
        cni_path=tuple(cni_path),
    )


def node_executor(node_netns: str, cni_path: Sequence[str]) -> runtime.Executor:
    """Run each plugin binary (found in ``cni_path``) inside ``node_netns``.

    Side effects of the returned function: one ``nsenter --net=<node netns> --
    <plugin>`` process, our environment plus the CNI_* variables, stdin the
    plugin's config; killed after ``PLUGIN_TIMEOUT_S``.
    """

    def execute(inv: runtime.Invocation) -> runtime.PluginOutput:
        binary = shutil.which(inv.plugin, path=os.pathsep.join(cni_path))
        if binary is None:
            return runtime.PluginOutput(1, json.dumps({
                "code": 5, "msg": f"plugin {inv.plugin!r} not found in {list(cni_path)}",
                "details": "apt-get install containernetworking-plugins; pip install -e ."
            }).encode())
        try:
            proc = subprocess.run(netlab.nsenter_argv(node_netns, [binary]), input=inv.stdin,
                                  env={**os.environ, **inv.env}, capture_output=True,
                                  timeout=PLUGIN_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            return runtime.PluginOutput(1, json.dumps({
                "code": 11, "msg": f"{inv.plugin} did not finish within {PLUGIN_TIMEOUT_S}s"
            }).encode())
        return runtime.PluginOutput(proc.returncode, proc.stdout, proc.stderr)

    return execute


def add_pods(plan: LabPlan, agent_sockets: Mapping[str, str] | None,
             progress: netlab.Progress | None = None) -> dict[str, dict[str, Any]]:
    """CNI ADD every pod of ``plan``; return pod name -> CNI result.

    ``agent_sockets`` maps node name -> agent socket; None leaves meshagent-cni
    out of the chain (lab mode ``none``: no agents). Side effects: writes the
    conflists and cached results under ``<run dir>/cni``, and per pod runs ptp
    (veth pair, addresses, routes; host-local state under ``<node>/ipam``) and
    meshagent-cni (enrollment through the node's agent). Raises
    :class:`netlab.LabError` naming the pod and plugin at the first failure
    (``lab up`` then tears everything down, running CNI DEL).
    """
    path = cni_bin_dirs()
    if not any(Path(d, PLUGIN_NAME).exists() for d in path) and agent_sockets is not None:
        raise netlab.LabError(f"{PLUGIN_NAME} not found next to {sys.executable} or in PATH; "
                              "run `pip install -e .` in the project's venv")
    (cni_dir(plan) / "results").mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for node in plan.nodes:
        sock = agent_sockets[node.name] if agent_sockets is not None else None
        conf = build_conflist(plan, node, sock)
        _write(conflist_path(plan, node.name), json.dumps(conf, indent=2) + "\n")
        runtime.parse_conflist(conf)  # the cached one must be usable by DEL
        execute = node_executor(node.netns, path)
        for pod in node.pods:
            if progress:
                progress(f"CNI ADD {pod.name} ({' + '.join(p['type'] for p in conf['plugins'])})")
            try:
                result = runtime.add(runtime.parse_conflist(pod_conflist(conf, pod)),
                                     runtime_conf(plan, pod, path), execute)
            except runtime.PluginFailed as exc:
                raise netlab.LabError(f"CNI ADD of pod {pod.name} on {node.name}: {exc}; "
                                      f"plugin log: {plugin_log_path(plan, node.name)}") from exc
            _write(result_path(plan, pod), json.dumps(result, indent=2) + "\n")
            results[pod.name] = result
    return results


def del_pods(plan: LabPlan, progress: netlab.Progress | None = None) -> list[str]:
    """CNI DEL every pod (reverse order, plugins reversed); return the failures.

    Best effort and idempotent: pods whose node netns or conflist is gone are
    skipped. Side effects: ptp removes the veth pair and frees the address in
    host-local; meshagent-cni unenrolls the pod if its agent still runs; the
    cached results are deleted.
    """
    path = cni_bin_dirs()
    problems: list[str] = []
    for node in reversed(plan.nodes):
        try:
            conflist = runtime.parse_conflist(conflist_path(plan, node.name).read_text())
        except (OSError, runtime.ConfListError):
            continue
        if not os.path.exists(netns_path(node.netns)):
            continue
        execute = node_executor(node.netns, path)
        for pod in reversed(node.pods):
            cached = _read_json(result_path(plan, pod))
            if progress:
                progress(f"CNI DEL {pod.name}")
            failures = runtime.delete(conflist, runtime_conf(plan, pod, path), cached, execute)
            problems += [f"{pod.name}: {f}" for f in failures]
            if not failures:
                result_path(plan, pod).unlink(missing_ok=True)
    return problems


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
