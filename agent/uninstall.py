"""``meshagent uninstall``: remove everything the agent created, and nothing else.

Works from the persisted state, with the agent stopped, in the node's netns.
"""

from __future__ import annotations

from pathlib import Path

import structlog
from pyroute2 import IPRoute

from agent.config import Config
from agent.contracts.files import WORKLOADS_FILE
from agent.datapath import attach
from agent.datapath.programs import remove_all_pins
from agent.enrollment import link_exists
from agent.netns.node import teardown_node
from agent.state import STATE_FILE, load_state

log = structlog.get_logger("agent.uninstall")
# Written by the tunnel into the agent's state dir (agent/tunnel/main.py STATUS_FILE).
TUNNEL_STATUS_FILE = "tunnel-status.json"


def uninstall(cfg: Config) -> list[str]:
    """Undo the agent's footprint on this node; return a line per action taken.

    Side effects, in order:
    1. for every pod in the state file whose veth still exists: delete our tc
       filters (priority/handle of ``agent.tc_priority``/``agent.tc_handle``) in
       both directions, then the clsact qdisc if enrolling created it and no
       other filter uses it;
    2. the node plumbing recorded in the state: routes, rules, the tunnel device
       (with its filters), sysctls restored to their prior values;
    3. the pinned maps under ``agent.bpf_pin_dir``;
    4. the state, workloads and tunnel status files, and the state dir if the
       agent created it and it is then empty.
    """
    done: list[str] = []
    state = load_state(cfg.agent.state_dir)
    prio, handle = cfg.agent.tc_priority, cfg.agent.tc_handle
    with IPRoute() as ipr:
        for pod in state.registry:
            if not link_exists(ipr, pod.host_ifindex):
                continue
            for direction in (attach.EGRESS, attach.INGRESS):
                if attach.detach(ipr, pod.host_ifindex, direction, prio, handle):
                    done.append(f"removed filter {direction} on {pod.host_ifname}")
            if pod.created_clsact and not attach.foreign_filters(ipr, pod.host_ifindex, prio,
                                                                 handle):
                attach.remove_clsact(ipr, pod.host_ifindex)
                done.append(f"removed clsact on {pod.host_ifname}")
    sysctls = dict(state.node.sysctls_changed)
    teardown_node(cfg, state.node)
    done.extend(f"restored {path} to {value}" for path, value in sysctls.items())
    done.append("removed rules, routes and tunnel device created by the agent")
    if Path(cfg.agent.bpf_pin_dir).exists():
        remove_all_pins(cfg.agent.bpf_pin_dir)
        done.append(f"removed pinned maps in {cfg.agent.bpf_pin_dir}")
    state_dir = Path(cfg.agent.state_dir)
    for name in (STATE_FILE, WORKLOADS_FILE, TUNNEL_STATUS_FILE):
        path = state_dir / name
        if path.exists():
            path.unlink()
            done.append(f"removed {path}")
    if state.node.created_state_dir and state_dir.is_dir() and not any(state_dir.iterdir()):
        state_dir.rmdir()
        done.append(f"removed {state_dir}")
    for line in done:
        log.info("uninstall", action=line)
    return done
