"""Turn a lab topology into a mesh: per node, start the agent and the tunnel,
then enroll the node's pods through the agent's API.

Used as the ``after_topology`` hook of ``lab up``; ``lab down`` stops the
processes (they are started with :func:`netlab.start_node_process`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from agent.api import client
from agent.lab import netlab
from agent.lab.services import MODEL_FILENAME, lab_model
from agent.lab.topology import LabPlan, NodePlan
from agent.model.loader import model_to_yaml

READY_TIMEOUT_S = 60.0
POLL_S = 0.1
LAB_MODE_ENV = "MESHAGENT_LAB_MODE"  # hbone (default) | plain | none


def lab_mode(mode: str | None = None) -> str:
    """``mode`` if given, else $MESHAGENT_LAB_MODE, else hbone; checked."""
    mode = mode or os.environ.get(LAB_MODE_ENV, "hbone")
    if mode not in ("hbone", "plain", "none"):
        raise ValueError(f"{LAB_MODE_ENV}={mode!r}: use hbone, plain or none")
    return mode


def node_env(plan: LabPlan, node: NodePlan, mode: str) -> dict[str, str]:
    """Environment overrides that give each lab node its own agent and tunnel."""
    run = Path(plan.node_run_dir(node.name))
    # Stand-in for a control plane's workload discovery: each tunnel reads the
    # other nodes' workloads.json, so it knows which destinations are in the mesh.
    peers = ",".join(str(Path(plan.node_run_dir(n.name)) / "state" / "workloads.json")
                     for n in plan.nodes if n.name != node.name)
    return {
        "MESHAGENT_CONFIG": str(Path(plan.run_dir) / "config.toml"),
        "MESHAGENT_AGENT_SOCKET": str(run / "agent.sock"),
        "MESHAGENT_AGENT_STATE_DIR": str(run / "state"),
        "MESHAGENT_AGENT_BPF_PIN_DIR": f"/sys/fs/bpf/meshagent-{plan.prefix}-{node.name}",
        "MESHAGENT_TUNNEL_MODE": mode,
        "MESHAGENT_TUNNEL_PEER_WORKLOADS": peers,
        "MESHAGENT_TUNNEL_CA_DIR": str(Path(plan.run_dir) / "ca"),
        # AuthorizationPolicy files for this node's tunnel (reloaded on change).
        "MESHAGENT_TUNNEL_POLICY_DIR": str(run / "policies"),
        # The lab's Services (agent.lab.services), one file every node's tunnel reads.
        "MESHAGENT_TUNNEL_MODEL_FILE": str(Path(plan.run_dir) / MODEL_FILENAME),
        "MESHAGENT_TUNNEL_NODE_NAME": node.name,
        "MESHAGENT_LOG_JSON": "1",
        "PYTHONUNBUFFERED": "1",
    }


def agent_socket(plan: LabPlan, node: str) -> str:
    return str(Path(plan.node_run_dir(node)) / "agent.sock")


def _wait(what: str, check: Any, log_path: str) -> Any:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (client.AgentUnavailable, client.AgentError, OSError) as exc:
            last = exc
        time.sleep(POLL_S)
    tail = ""
    with contextlib.suppress(OSError):
        tail = "".join(Path(log_path).read_text().splitlines(keepends=True)[-15:])
    raise netlab.LabError(f"{what} not ready within {READY_TIMEOUT_S:.0f}s ({last}); "
                          f"log {log_path}:\n{tail}")


def start_mesh(plan: LabPlan, mode: str | None = None) -> None:
    """Start agent + tunnel on every node, then enroll the pods marked ``enroll``.

    ``mode`` (hbone, plain, none) defaults to $MESHAGENT_LAB_MODE; callers in
    Python pass it, e.g. ``functools.partial(start_mesh, mode="plain")``.

    Side effects: writes the lab config file and model file, creates the lab's mesh CA (HBONE
    mode), starts two processes per node, and enrolls pods (attaching tc
    filters in node namespaces). ``lab down`` undoes all of it.

    With $MESHAGENT_LAB_KUBE=1 (``lab up --kube``): first the lab API server
    (:mod:`agent.lab.kube`), then the agents watch it; pods are enrolled by their
    namespace's labels (none at first), not by the lab, and each node's model comes
    from the API server instead of the lab's model file and the peers' files.
    """
    mode = lab_mode(mode)
    from agent.lab import kube

    kubernetes = kube.kube_enabled()
    if mode == "none":
        if plan.uses_cni:
            _cni_pods_up(plan, agent_sockets=None)
        return
    Path(plan.run_dir, "config.toml").write_text("# meshagent lab: all defaults, env overrides\n")
    if not kubernetes:  # in a kube lab each node's model comes from the API server
        Path(plan.run_dir, MODEL_FILENAME).write_text(model_to_yaml(lab_model(plan)))
    if mode == "hbone":
        from agent.identity.ca import init_ca

        init_ca(str(Path(plan.run_dir) / "ca"))
    exe = [sys.executable, "-m", "agent"]
    if kubernetes:
        kube.start_api_server(plan)
    for node in plan.nodes:
        env = node_env(plan, node, mode)
        if kubernetes:
            env.update(kube.node_env(plan, node.name))
        netlab.start_node_process(plan, node, "agent", [*exe, "run"], env)
        netlab.start_node_process(plan, node, "tunnel", [*exe, "tunnel"], env)
    for node in plan.nodes:
        sock = agent_socket(plan, node.name)
        agent_log = netlab.process_log_path(plan, node.name, "agent")
        _wait(f"agent on {node.name}",
              lambda s=sock: client.call(s, {"op": "status"}, timeout=5), agent_log)
        tunnel_log = netlab.process_log_path(plan, node.name, "tunnel")
        _wait(f"tunnel on {node.name}",
              lambda s=sock: 15001 in client.call(s, {"op": "status"}, timeout=5)["listeners"],
              tunnel_log)
        if plan.uses_cni or kubernetes:
            continue  # meshagent-cni (_cni_pods_up below) or the agent's watch enrolls them
        for pod in node.pods:
            if pod.enroll:
                client.call(sock, {"op": "pod_add", "netns": pod.netns, "name": pod.name,
                                   "namespace": pod.namespace,
                                   "service_account": pod.service_account})
    if plan.uses_cni:
        _cni_pods_up(plan, {n.name: agent_socket(plan, n.name) for n in plan.nodes})


def _cni_pods_up(plan: LabPlan, agent_sockets: dict[str, str] | None) -> None:
    """CNI labs (``lab up --pods cni``): create every pod's network through
    ptp + host-local and enroll it through meshagent-cni, like a container
    runtime (see :mod:`agent.lab.cnipods`); ``lab down`` runs CNI DEL."""
    from agent.lab import cnipods

    results = cnipods.add_pods(plan, agent_sockets)
    # The plugins named the host veths: record them in lab.json for the tests and tools.
    updated = cnipods.plan_with_results(plan, results)
    tmp = Path(plan.plan_path + ".tmp")
    tmp.write_text(updated.to_json())
    os.replace(tmp, plan.plan_path)
