"""``meshagent model check FILE``: validate a model file and show what it holds.

Exit status: 0 the file is valid, 2 it is not (every problem printed, with file,
field path and entry). Offline: needs no agent and no config. ``--json`` prints a
machine-readable summary (schema ``meshagent.model-check/v1``).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from agent.model.loader import ModelLoadError, load_model_file
from agent.model.types import HealthStatus, Model, Service, UnresolvedBinding

EXIT_VALID = 0
EXIT_INVALID = 2
CHECK_SCHEMA = "meshagent.model-check/v1"


def _ports_text(ports: tuple[tuple[int, int], ...]) -> str:
    return ", ".join(f"{p}->{t if t else 'per-endpoint'}" for p, t in ports) or "-"


def _endpoint_rows(model: Model, service: Service) -> list[dict[str, Any]]:
    rows = []
    for ep in model.endpoints(service):
        wl = model.workload_by_uid(ep.workload_uid)
        healthy = ep.status is HealthStatus.HEALTHY and (
            wl is None or wl.status is HealthStatus.HEALTHY)
        rows.append({
            "uid": ep.workload_uid,
            "known": wl is not None,
            "addresses": [str(a) for a in wl.workload_ips] if wl else [],
            "node": wl.node if wl else "",
            "protocol": wl.protocol.value if wl else "",
            "healthy": healthy,
            "ports": {str(p): t for p, t in ep.ports},
        })
    return rows


def summary(model: Model) -> dict[str, Any]:
    """What the model holds, as plain data."""
    return {
        "schema": CHECK_SCHEMA,
        "workloads": [{
            "uid": w.uid, "name": w.name, "namespace": w.namespace,
            "addresses": [str(a) for a in w.workload_ips], "node": w.node,
            "network": w.network, "protocol": w.protocol.value, "status": w.status.value,
            "identity": w.identity(),
            "services": [str(b.service) for b in w.services],
            "waypoint": str(w.waypoint) if w.waypoint else None,
        } for w in model.workloads],
        "services": [{
            "name": s.name, "namespace": s.namespace, "hostname": s.hostname,
            "vips": [str(v) for v in s.vips],
            "ports": {str(p): t for p, t in s.ports},
            "waypoint": str(s.waypoint) if s.waypoint else None,
            "load_balancer": None if s.load_balancer is None else {
                "mode": s.load_balancer.mode.value,
                "routing_preferences": [p.value for p in s.load_balancer.routing_preferences],
                "health_policy": s.load_balancer.health_policy.value},
            "endpoints": _endpoint_rows(model, s),
        } for s in model.services],
        "warnings": warnings(model),
    }


def warnings(model: Model) -> list[str]:
    out = [f"workload {w.uid} backs {b.service}, which the file does not define"
           for w, b in model.unbound_bindings()]
    out += [f"service {s.key()} lists endpoint {ep.workload_uid}, which is not a workload "
            "in the file (never selected)" for s, ep in model.dangling_endpoints()]
    out += [f"service {s.key()} has no endpoints: connections to its VIPs are reset"
            for s in model.services if not model.endpoints(s)]
    bound = [*((f"service {s.key()}", s.waypoint) for s in model.services),
             *((f"workload {w.uid}", w.waypoint) for w in model.workloads)]
    for what, g in bound:
        fault = UnresolvedBinding.of(g)
        if fault is not None:
            out.append(f"{what} has an unresolved waypoint binding ({fault} could not be "
                       "read): its connections are refused (fail closed)")
        elif g is not None and not model.waypoint_instances(g):
            out.append(f"{what} uses waypoint {g}, which names no workload: its "
                       "connections are refused (fail closed)")
    return out


def render(model: Model, path: str) -> str:
    lines = [f"{path}: valid: {len(model.workloads)} workloads, {len(model.services)} services"]
    if model.workloads:
        lines.append("workloads:")
    for w in model.workloads:
        lines.append(f"  {w.namespace}/{w.name or '-'}  uid={w.uid}  "
                     f"{','.join(str(a) for a in w.workload_ips)}  node={w.node or '-'}  "
                     f"{w.protocol.value}  {w.status.value}  {w.identity()}"
                     + (f"  waypoint={w.waypoint}" if w.waypoint else ""))
    if model.services:
        lines.append("services:")
    for s in model.services:
        lb = "" if s.load_balancer is None else (
            f"  lb={s.load_balancer.mode.value}("
            f"{','.join(p.value for p in s.load_balancer.routing_preferences)})")
        lines.append(f"  {s.namespace}/{s.name}  {s.hostname}  "
                     f"vips={','.join(str(v) for v in s.vips) or '-'}  "
                     f"ports={_ports_text(s.ports)}{lb}"
                     + (f"  waypoint={s.waypoint}" if s.waypoint else ""))
        for row in _endpoint_rows(model, s):
            state = "healthy" if row["healthy"] else "UNHEALTHY"
            if not row["known"]:
                state = "UNKNOWN WORKLOAD"
            lines.append(f"    endpoint {row['uid']}  {','.join(row['addresses']) or '-'}  "
                         f"node={row['node'] or '-'}  {row['protocol'] or '-'}  {state}")
    for warning in warnings(model):
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


@click.group("model")
def model_group() -> None:
    """The cluster model file (ztunnel's local-config YAML)."""


@model_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def check(file: str, as_json: bool) -> None:
    """Validate a model FILE and print its workloads, services, VIPs and endpoints."""
    try:
        model = load_model_file(file)
    except ModelLoadError as error:
        if as_json:
            click.echo(json.dumps({"schema": CHECK_SCHEMA, "valid": False,
                                   "errors": [f"{error.file}: {i}" for i in error.issues]},
                                  indent=2))
        else:
            click.echo(str(error), err=True)
            click.echo(f"{file}: invalid ({len(error.issues)} problems); the tunnel would "
                       "keep its last good model", err=True)
        sys.exit(EXIT_INVALID)
    if as_json:
        click.echo(json.dumps({"valid": True, **summary(model)}, indent=2))
    else:
        click.echo(render(model, file))
    sys.exit(EXIT_VALID)
