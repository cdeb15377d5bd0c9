"""``policy`` click command group: check and validate policy files offline.

Standalone (works on a directory of YAML files, no agent needed)::

    python -m agent.policy.commands check --policy-dir ./policies \\
        --from spiffe://cluster.local/ns/foo/sa/sleep --from 10.0.0.5 \\
        --to 10.0.1.7:8080 --to-workload foo/httpbin --label app=httpbin

``--from`` takes a SPIFFE ID, an IP, or both (given twice). Exit status of
``check``: 0 allowed, 1 denied (by exactly the set the tunnel would enforce: documents
that fail closed are in it as their stand-ins, and are listed on stderr), 2 invalid
input. ``validate`` lists every document's outcome; exit 0 when every document is
enforced as written, with warnings, or ignored as istiod ignores it, 2 when any fails
closed. ``meshagent`` adds its own ``policy`` group with pod-name resolution on top
and the same helpers (:func:`load_report`, :func:`emit_validation`).
"""

from __future__ import annotations

import ipaddress
import json
import sys

import click

from agent.policy.explain import render, render_report
from agent.policy.loader import load_policy_report
from agent.policy.model import (
    DEFAULT_ROOT_NAMESPACE,
    SPIFFE_SCHEME,
    ConnectionRequest,
    IPAddress,
    SourceIdentity,
    WorkloadRef,
)
from agent.policy.outcomes import LoadReport

EXIT_ALLOWED = 0
EXIT_DENIED = 1
EXIT_INVALID = 2


def parse_source(values: tuple[str, ...]) -> tuple[IPAddress | None, str | None]:
    """``--from`` values -> (source IP or None, SPIFFE ID or None)."""
    address: IPAddress | None = None
    identity: str | None = None
    for value in values:
        if value.startswith(SPIFFE_SCHEME):
            if identity is not None:
                raise click.BadParameter("give at most one SPIFFE ID", param_hint="--from")
            try:
                SourceIdentity.parse(value)
            except ValueError as error:
                raise click.BadParameter(str(error), param_hint="--from") from None
            identity = value
        else:
            if address is not None:
                raise click.BadParameter("give at most one IP", param_hint="--from")
            try:
                address = ipaddress.ip_address(value)
            except ValueError:
                raise click.BadParameter(f"{value!r} is neither a SPIFFE ID nor an IP",
                                         param_hint="--from") from None
    return address, identity


def parse_destination(value: str) -> tuple[IPAddress, int]:
    """``IP:PORT`` or ``[IPv6]:PORT`` -> (IP, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise click.BadParameter(f"{value!r} is not IP:PORT", param_hint="--to")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    port = int(port_text)
    if not 0 < port <= 65535:
        raise click.BadParameter(f"port {port} out of range", param_hint="--to")
    try:
        return ipaddress.ip_address(host), port
    except ValueError:
        raise click.BadParameter(f"{host!r} is not an IP", param_hint="--to") from None


def parse_workload(value: str, labels: tuple[str, ...]) -> WorkloadRef:
    namespace, sep, name = value.partition("/")
    if not sep or not namespace or not name:
        raise click.BadParameter(f"{value!r} is not NAMESPACE/NAME", param_hint="--to-workload")
    parsed = {}
    for item in labels:
        key, eq, label = item.partition("=")
        if not eq or not key:
            raise click.BadParameter(f"{item!r} is not k=v", param_hint="--label")
        parsed[key] = label
    return WorkloadRef(name=name, namespace=namespace, labels=parsed)


def load_report(policy_dir: str, root_namespace: str) -> LoadReport:
    """Load ``policy_dir`` as the tunnel would; print documents that are not enforced as
    written to stderr (side effect)."""
    report = load_policy_report(policy_dir, root_namespace)
    if report.problems:
        click.echo("policy documents not enforced exactly as written:\n"
                   + "\n".join(str(r) for r in report.problems), err=True)
    return report


def emit_validation(report: LoadReport) -> int:
    """Print every document's outcome (stdout); the exit status for ``validate``."""
    click.echo(render_report(report))
    return EXIT_INVALID if report.failed_closed else EXIT_ALLOWED


@click.group("policy")
def policy() -> None:
    """Check connections against AuthorizationPolicy files (L4, as ztunnel enforces)."""


_policy_dir = click.option("--policy-dir", required=True,
                           type=click.Path(exists=True, file_okay=False),
                           help="Directory of AuthorizationPolicy *.yaml/*.yml files.")
_root_namespace = click.option("--root-namespace", default=DEFAULT_ROOT_NAMESPACE,
                               show_default=True,
                               help="Namespace whose policies apply mesh-wide.")


@policy.command()
@_policy_dir
@_root_namespace
@click.option("--from", "sources", multiple=True, required=True,
              help="Source SPIFFE ID and/or IP (repeat to give both).")
@click.option("--to", "destination", required=True, help="Destination IP:PORT.")
@click.option("--to-workload", "workload", required=True,
              help="Destination workload NAMESPACE/NAME.")
@click.option("--label", "labels", multiple=True, help="Destination workload label k=v.")
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
def check(policy_dir: str, root_namespace: str, sources: tuple[str, ...], destination: str,
          workload: str, labels: tuple[str, ...], as_json: bool) -> None:
    """Would a connection be allowed? Explains which policies decided and why."""
    src_ip, identity = parse_source(sources)
    dst_ip, dst_port = parse_destination(destination)
    request = ConnectionRequest(src_ip=src_ip, src_identity=identity, dst_ip=dst_ip,
                                dst_port=dst_port,
                                dst_workload=parse_workload(workload, labels))
    evaluation = load_report(policy_dir, root_namespace).policies.explain(request)
    if as_json:
        click.echo(json.dumps(evaluation.decision.to_dict(), indent=2))
    else:
        click.echo(render(evaluation))
    sys.exit(EXIT_ALLOWED if evaluation.decision.allowed else EXIT_DENIED)


@policy.command()
@_policy_dir
@_root_namespace
def validate(policy_dir: str, root_namespace: str) -> None:
    """Judge every document as the tunnel does; exit 2 if any fails closed."""
    sys.exit(emit_validation(load_policy_report(policy_dir, root_namespace)))


if __name__ == "__main__":  # pragma: no cover
    policy()
