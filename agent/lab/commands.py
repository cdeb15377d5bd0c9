"""``meshagent lab``: build a two-node mesh lab in network namespaces.

The main CLI adds the group with ``main.add_command(lab)``. To have ``lab up``
also start daemons / enroll pods, build the group with a hook instead::

    main.add_command(build_lab_group(after_topology=start_everything))

where ``start_everything(plan: LabPlan) -> None`` typically calls
:func:`agent.lab.netlab.start_node_process` per node. If the hook raises, the
whole lab (including processes it started) is torn down again.

Try it without the main CLI: ``python -m agent.lab.commands up``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from agent.lab import netlab
from agent.lab.topology import (
    CNI_POD_NETWORKS,
    DEFAULT_PREFIX,
    POD_NETWORKS,
    PlanError,
    build_plan,
)

_prefix_option = click.option(
    "--prefix",
    default=DEFAULT_PREFIX,
    show_default=True,
    help="Name prefix of every namespace/interface of the lab (1-6 chars, [a-z0-9]).",
)


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


def _progress(message: str) -> None:
    click.echo(f"  {message}", err=True)


def build_lab_group(after_topology: netlab.AfterTopology | None = None) -> click.Group:
    """The ``lab`` click group; ``after_topology`` runs at the end of ``lab up``."""

    @click.group("lab")
    def lab() -> None:
        """A two-node mesh lab in network namespaces (needs root)."""

    @lab.command("up")
    @_prefix_option
    @click.option("--nodes", default=2, show_default=True, help="Number of nodes.")
    @click.option(
        "--pods-per-node",
        default=2,
        show_default=True,
        help="Enrolled pods per node (each node also gets one non-enrolled pod).",
    )
    @click.option(
        "--pods",
        "pod_network",
        type=click.Choice(list(POD_NETWORKS)),
        envvar="MESHAGENT_LAB_PODS",
        default="veth",
        show_default=True,
        help="veth: the lab wires pods itself; cni: through ptp + host-local + "
        "meshagent-cni like a container runtime; cni-bridge: the same with the bridge "
        "plugin and br_netfilter on (env MESHAGENT_LAB_PODS).",
    )
    @click.option(
        "--kube",
        is_flag=True,
        envvar="MESHAGENT_LAB_KUBE",
        help="Start the lab's Kubernetes API server with the lab's nodes and pods; the "
        "agents watch it and enroll pods by Istio's labels (env MESHAGENT_LAB_KUBE=1).",
    )
    @click.option("-v", "--verbose", is_flag=True, help="Print every step.")
    def up_cmd(
        prefix: str, nodes: int, pods_per_node: int, pod_network: str, kube: bool,
        verbose: bool
    ) -> None:
        """Create the lab (fails if one with PREFIX exists; all or nothing)."""
        if kube:
            from agent.lab.kube import KUBE_ENV

            os.environ[KUBE_ENV] = "1"  # read by the mesh hook (agent.lab.mesh)
        if pod_network in CNI_POD_NETWORKS and after_topology is None:
            raise click.UsageError(
                f"--pods {pod_network} needs the mesh hook that runs the CNI plugins: "
                "use `meshagent lab up`"
            )
        try:
            plan = build_plan(
                prefix, nodes=nodes, pods_per_node=pods_per_node, pod_network=pod_network
            )
            netlab.up(
                plan,
                after_topology=after_topology,
                progress=_progress if verbose else None,
            )
        except (netlab.LabError, PlanError) as exc:
            raise _fail(exc) from exc
        pods = len(plan.pods())
        click.echo(
            f"lab {prefix!r} is up: {len(plan.nodes)} nodes, {pods} pods "
            f"(see `lab list --prefix {prefix}`; remove with `lab down --prefix {prefix}`)"
        )

    @lab.command("down")
    @_prefix_option
    @click.option("-v", "--verbose", is_flag=True, help="Print every step.")
    def down_cmd(prefix: str, verbose: bool) -> None:
        """Stop the lab's processes and remove its namespaces (idempotent)."""
        try:
            result = netlab.down(prefix, progress=_progress if verbose else None)
        except (netlab.LabError, PlanError) as exc:
            raise _fail(exc) from exc
        if not (result.removed_netns or result.removed_run_dir or result.stopped_pids):
            click.echo(f"no lab {prefix!r} found; nothing to do")
            return
        click.echo(
            f"lab {prefix!r} is down: stopped {len(result.stopped_pids)} processes, "
            f"removed {len(result.removed_netns)} namespaces"
        )

    @lab.command(
        "exec",
        context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    )
    @_prefix_option
    @click.argument("pod")
    @click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
    def exec_cmd(prefix: str, pod: str, command: tuple[str, ...]) -> None:
        """Run COMMAND in POD's network namespace (POD: e.g. n1-a, or node1).

        Example: meshagent lab exec n1-a -- curl -s http://10.244.2.10:8080/
        """
        argv = list(command)
        if argv and argv[0] == "--":
            argv = argv[1:]
        try:
            rc = netlab.exec_in_pod(prefix, pod, argv)
        except (netlab.LabError, PlanError) as exc:
            raise _fail(exc) from exc
        sys.exit(rc)

    @lab.command("list")
    @_prefix_option
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    def list_cmd(prefix: str, as_json: bool) -> None:
        """Show the lab's nodes and pods as read back from the kernel.

        Exits 1 (after printing) if the kernel differs from the plan.
        """
        try:
            info = netlab.list_lab(prefix)
        except (netlab.LabError, PlanError) as exc:
            raise _fail(exc) from exc
        if as_json:
            click.echo(json.dumps(info, indent=2))
        else:
            click.echo(format_table(info))
        if not info["healthy"]:
            sys.exit(1)

    @lab.command("waypoints")
    @_prefix_option
    def waypoints_cmd(prefix: str) -> None:
        """Start the waypoint scenario (agent/lab/waypoints.py: per-namespace,
        per-service and shared waypoints as pods) in a lab that is up in HBONE mode
        with three pods per node."""
        from agent.lab import waypoints

        try:
            plan = netlab.load_plan(prefix)
            started = waypoints.start_waypoints(plan)
        except (netlab.LabError, PlanError) as exc:
            raise _fail(exc) from exc
        for wp, pod in started:
            click.echo(f"waypoint {wp.key:16} {wp.traffic:8} routes from {wp.allowed_from:5} "
                       f"pod {pod.name} on {pod.node} {pod.ipv4} {pod.ipv6}")

    return lab


def format_table(info: dict[str, Any]) -> str:
    """A human-readable rendering of :func:`agent.lab.netlab.list_lab` output."""
    ul = info["underlay"]
    lines = [
        f"lab {info['prefix']}  underlay {ul['netns']} bridge {ul['bridge']} "
        f"({ul['ipv4_cidr']}, {ul['ipv6_cidr']})",
    ]
    header = ("POD", "NETNS", "IPV4", "IPV6", "HOST IF", "NAMESPACE", "SA", "ENROLL")
    for node in info["nodes"]:
        lines.append("")
        lines.append(
            f"{node['name']}  netns {node['netns']}  underlay {node['underlay_ipv4']} "
            f"{node['underlay_ipv6']}  pod CIDRs {' '.join(node['pod_cidrs'])}"
        )
        rows = [header] + [
            (
                p["name"],
                p["netns"],
                str(p["ipv4"]),
                str(p["ipv6"]),
                str(p["host_ifname"]),
                p["namespace"],
                p["service_account"],
                "yes" if p["enroll"] else "no",
            )
            for p in node["pods"]
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines += [
            "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows
        ]
    if info["problems"]:
        lines.append("")
        lines.append("PROBLEMS (run `lab down` and `lab up` to rebuild):")
        lines += [f"  - {p}" for p in info["problems"]]
    return "\n".join(lines)


lab = build_lab_group()

if __name__ == "__main__":
    lab()
