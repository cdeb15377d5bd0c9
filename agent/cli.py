"""The ``meshagent`` command line."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from agent import config as config_mod
from agent import logs
from agent.api import client


def _load_config(path: str | None) -> config_mod.Config:
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _call(ctx: click.Context, request: dict[str, Any]) -> Any:
    cfg: config_mod.Config = ctx.obj["config"]
    try:
        return client.call(cfg.agent.socket, request)
    except (client.AgentUnavailable, client.AgentError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
@click.option("--config", "config_path", envvar="MESHAGENT_CONFIG", default=None,
              help="Config file (default /etc/meshagent/config.toml).")
@click.option("--log-level", default="info", show_default=True)
@click.pass_context
def main(ctx: click.Context, config_path: str | None, log_level: str) -> None:
    """meshagent: eBPF traffic redirection node agent for an ambient service mesh."""
    json_logs = True if os.environ.get("MESHAGENT_LOG_JSON") else None
    logs.configure(log_level, json=json_logs)
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path
    if ctx.invoked_subcommand not in ("lab", "model", "waypoint"):
        ctx.obj["config"] = _load_config(config_path)


@main.command()
@click.pass_context
def run(ctx: click.Context) -> None:
    """Run the node agent (root daemon)."""
    from agent.daemon import run as run_agent

    try:
        run_agent(ctx.obj["config"])
    except Exception as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.pass_context
def tunnel(ctx: click.Context) -> None:
    """Run the node's tunnel (outbound 15001, inbound 15006, HBONE 15008)."""
    from agent.tunnel.main import TunnelStartError
    from agent.tunnel.main import run as run_tunnel

    try:
        run_tunnel(ctx.obj["config"])
    except TunnelStartError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("--name", required=True, help="The waypoint's Gateway name.")
@click.option("--namespace", required=True, help="The waypoint's Gateway namespace.")
@click.option("--service-account", default=None, help="Default: the Gateway name.")
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False),
              help="Cluster model file (ztunnel local-config YAML).")
@click.option("--config-dir", required=True, type=click.Path(file_okay=False),
              help="Namespace/Service/Pod/Gateway/HTTPRoute/AuthorizationPolicy YAML.")
@click.option("--ca-dir", required=True, type=click.Path(file_okay=False))
@click.option("--listen", default="0.0.0.0:15008", show_default=True)
@click.option("--metrics-port", default=15020, show_default=True, type=int)
@click.option("--check", is_flag=True,
              help="Print what the files bind and every problem, then exit (2 if any "
                   "policy fails closed); serve nothing.")
@click.option("--access-log/--no-access-log", default=True, show_default=True,
              help="One log line per request (Istio's default install has it off).")
def waypoint(name: str, namespace: str, service_account: str | None, model_path: str,
             config_dir: str, ca_dir: str, listen: str, metrics_port: int,
             check: bool, access_log: bool) -> None:
    """Run one waypoint (L7 proxy for the destinations bound to it)."""
    from pathlib import Path

    from agent.waypoint.main import WaypointOptions, check_report
    from agent.waypoint.main import run as run_waypoint

    host, _, port = listen.rpartition(":")
    if check:
        text, code = check_report(namespace, name, Path(model_path), Path(config_dir))
        click.echo(text)
        raise SystemExit(code)
    run_waypoint(WaypointOptions(name, namespace, service_account or name, Path(model_path),
                                 Path(config_dir), Path(ca_dir), host.strip("[]") or "0.0.0.0",
                                 int(port), metrics_port, access_log=access_log))


@main.group()
def pod() -> None:
    """Enroll, remove and list pods (talks to the running agent)."""


def _parse_labels(values: tuple[str, ...]) -> dict[str, str]:
    labels = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not k=v", param_hint="--label")
        labels[key] = value
    return labels


@pod.command("add")
@click.option("--netns", required=True, help="Pod netns: a name from 'ip netns list' or a path.")
@click.option("--ifname", default="eth0", show_default=True, help="Pod-side interface.")
@click.option("--namespace", default="default", show_default=True)
@click.option("--service-account", default="default", show_default=True)
@click.option("--name", default=None, help="Pod name (default: the netns name).")
@click.option("--label", "labels", multiple=True, help="Pod label k=v (repeatable).")
@click.option("--dns-capture/--no-dns-capture", default=None,
              help="Send the pod's DNS to the tunnel's DNS proxy, or never (default: as "
                   "the node's datapath.dns_capture; Istio: annotation "
                   "ambient.istio.io/dns-capture).")
@click.pass_context
def pod_add(ctx: click.Context, netns: str, ifname: str, namespace: str,
            service_account: str, name: str | None, labels: tuple[str, ...],
            dns_capture: bool | None) -> None:
    """Enroll a pod: its TCP traffic is captured into the tunnel."""
    request: dict[str, Any] = {
        "op": "pod_add", "netns": netns, "ifname": ifname, "namespace": namespace,
        "service_account": service_account, "name": name, "labels": _parse_labels(labels)}
    if dns_capture is not None:
        request["dns_capture"] = dns_capture
    pod_json = _call(ctx, request)
    click.echo(f"enrolled {pod_json['namespace']}/{pod_json['name']} "
               f"(veth {pod_json['host_ifname']}, {', '.join(pod_json['addresses'])})")


@pod.command("del")
@click.option("--netns", default=None)
@click.option("--name", default=None)
@click.option("--namespace", default="default", show_default=True)
@click.pass_context
def pod_del(ctx: click.Context, netns: str | None, name: str | None, namespace: str) -> None:
    """Remove a pod from the mesh (its traffic goes direct again)."""
    if not netns and not name:
        raise click.UsageError("give --netns or --name")
    pod_json = _call(ctx, {"op": "pod_del", "netns": netns, "name": name,
                           "namespace": namespace})
    click.echo(f"removed {pod_json['namespace']}/{pod_json['name']}")


@pod.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def pod_list(ctx: click.Context, as_json: bool) -> None:
    """List enrolled pods with their datapath counters."""
    pods = _call(ctx, {"op": "pod_list"})
    if as_json:
        click.echo(json.dumps(pods, indent=2))
        return
    from agent.status_view import pods_table

    pods_table(pods)


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the agent's pods, counters, listeners and node plumbing."""
    data = _call(ctx, {"op": "status"})
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    from agent.status_view import status_view

    status_view(data)


@main.command()
@click.pass_context
def uninstall(ctx: click.Context) -> None:
    """Remove every object the agent created on this node (stop the agent first)."""
    from agent.uninstall import uninstall as do_uninstall

    cfg: config_mod.Config = ctx.obj["config"]
    try:
        client.call(cfg.agent.socket, {"op": "status"}, timeout=2)
    except client.AgentUnavailable:
        pass
    else:
        raise click.ClickException(
            "the agent is running: stop it first (systemctl stop meshagent, or kill it); "
            "uninstalling under a running agent would race with it")
    for line in do_uninstall(cfg):
        click.echo(line)


@main.group()
def ca() -> None:
    """The mesh certificate authority."""


@ca.command("init")
@click.option("--dir", "ca_dir", default=None, help="CA directory (default: tunnel.ca_dir).")
@click.option("--trust-domain", default=None, help="Default: tunnel.trust_domain.")
@click.pass_context
def ca_init(ctx: click.Context, ca_dir: str | None, trust_domain: str | None) -> None:
    """Create the mesh CA (ECDSA P-256) in a root-only directory; idempotent.

    A directory that already holds a CA (this one or imported Istio material) is
    loaded and checked against the trust domain instead.
    """
    from agent.identity.ca import IdentityError, init_ca

    cfg: config_mod.Config = ctx.obj["config"]
    directory = ca_dir or cfg.tunnel.ca_dir
    domain = trust_domain or cfg.tunnel.trust_domain
    try:
        init_ca(directory, trust_domain=domain)
    except (IdentityError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"mesh CA for trust domain {domain!r} ready in {directory}")


@ca.command("import")
@click.option("--from", "source", required=True,
              type=click.Path(file_okay=False, exists=True),
              help="Directory with Istio's cacerts files (ca-cert.pem, ca-key.pem, "
                   "cert-chain.pem, root-cert.pem) or a kubernetes.io/tls secret's "
                   "(tls.crt, tls.key, ca.crt).")
@click.option("--dir", "ca_dir", default=None, help="CA directory (default: tunnel.ca_dir).")
@click.option("--trust-domain", default=None, help="Default: tunnel.trust_domain.")
@click.pass_context
def ca_import(ctx: click.Context, source: str, ca_dir: str | None,
              trust_domain: str | None) -> None:
    """Use Istio plug-in CA material (RSA or EC, with intermediates) as the mesh CA.

    Checks the files as istiod does (the signing CA chains to a root, the key matches)
    and copies them into the CA directory; nothing is written if a check fails.
    The tunnel then signs with ca-cert.pem, sends leaf + chain, trusts root-cert.pem.
    """
    from agent.identity.ca import IdentityError, import_istio_ca

    cfg: config_mod.Config = ctx.obj["config"]
    directory = ca_dir or cfg.tunnel.ca_dir
    domain = trust_domain or cfg.tunnel.trust_domain
    if domain != cfg.tunnel.trust_domain:
        click.echo(f"note: tunnel.trust_domain is {cfg.tunnel.trust_domain!r}; the tunnel "
                   f"loads this CA only with trust_domain = {domain!r}", err=True)
    try:
        ca = import_istio_ca(source, directory, trust_domain=domain)
    except (IdentityError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Istio CA {ca.cert.subject.rfc4514_string()} for trust domain {domain!r} "
               f"({len(ca.chain)} intermediate(s) above it, {len(ca.roots)} root(s)) "
               f"installed in {directory}")


@main.group()
def policy() -> None:
    """L4 authorization policies (Istio AuthorizationPolicy, as ztunnel enforces them)."""


def _find_pod(pods: list[dict[str, Any]], ref: str) -> dict[str, Any] | None:
    namespace, _, name = ref.rpartition("/")
    for pod_json in pods:
        if pod_json["name"] == name and (not namespace or pod_json["namespace"] == namespace):
            return pod_json
    return None


@policy.command("check")
@click.option("--from", "source", required=True,
              help="Source: an enrolled pod ([ns/]name), a SPIFFE ID, or an IP.")
@click.option("--to", "destination", required=True,
              help="Destination: [ns/]pod:port of an enrolled pod on this node.")
@click.option("--policy-dir", default=None, help="Default: tunnel.policy_dir.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def policy_check(ctx: click.Context, source: str, destination: str, policy_dir: str | None,
                 as_json: bool) -> None:
    """Explain whether a connection would be allowed, and which policy decides."""
    from agent.addr import is_ip
    from agent.identity.spiffe import SCHEME, SpiffeId
    from agent.policy import ConnectionRequest, WorkloadRef
    from agent.policy.commands import EXIT_ALLOWED, EXIT_DENIED, load_report, parse_source
    from agent.policy.explain import render

    cfg: config_mod.Config = ctx.obj["config"]
    target, _, port_text = destination.rpartition(":")
    if not target or not port_text.isdigit():
        raise click.BadParameter(f"{destination!r} is not POD:PORT", param_hint="--to")
    pods = _call(ctx, {"op": "pod_list"})
    dst = _find_pod(pods, target)
    if dst is None:
        raise click.BadParameter(f"no enrolled pod {target!r} on this node "
                                 "('meshagent pod list' shows them)", param_hint="--to")
    if source.startswith(SCHEME) or is_ip(source):
        src_ip, identity = parse_source((source,))
    else:
        src = _find_pod(pods, source)
        if src is None:
            raise click.BadParameter(f"no enrolled pod {source!r} on this node; give a "
                                     "SPIFFE ID or an IP instead", param_hint="--from")
        identity = SpiffeId(cfg.tunnel.trust_domain, src["namespace"],
                            src["service_account"]).uri
        src_ip, _ = parse_source((src["addresses"][0],))
    request = ConnectionRequest(
        src_ip=src_ip, src_identity=identity, dst_ip=dst["addresses"][0], dst_port=int(port_text),
        dst_workload=WorkloadRef(dst["name"], dst["namespace"], dst.get("labels", {})))
    evaluation = load_report(policy_dir or cfg.tunnel.policy_dir,
                             cfg.tunnel.root_namespace).policies.explain(request)
    if as_json:
        click.echo(json.dumps(evaluation.decision.to_dict(), indent=2))
    else:
        click.echo(render(evaluation))
    sys.exit(EXIT_ALLOWED if evaluation.decision.allowed else EXIT_DENIED)


@policy.command("validate")
@click.option("--policy-dir", default=None, help="Default: tunnel.policy_dir.")
@click.pass_context
def policy_validate(ctx: click.Context, policy_dir: str | None) -> None:
    """Judge every policy document as the tunnel does; exit 2 if any fails closed."""
    from agent.policy.commands import emit_validation
    from agent.policy.loader import load_policy_report

    cfg: config_mod.Config = ctx.obj["config"]
    sys.exit(emit_validation(load_policy_report(policy_dir or cfg.tunnel.policy_dir,
                                                cfg.tunnel.root_namespace)))


def _add_model() -> None:
    from agent.model.commands import model_group

    main.add_command(model_group)


_add_model()


def _add_lab() -> None:
    from agent.lab.commands import build_lab_group
    from agent.lab.mesh import start_mesh

    main.add_command(build_lab_group(after_topology=start_mesh))


_add_lab()

if __name__ == "__main__":
    sys.exit(main())
