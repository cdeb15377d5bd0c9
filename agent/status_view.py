"""Readable tables for ``meshagent status`` and ``pod list`` (rich)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from rich.console import Console
from rich.table import Table


def pods_table(pods: list[dict[str, Any]], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"enrolled pods ({len(pods)})")
    for col in ("pod", "veth", "addresses", "out pkts", "out bytes", "in pkts", "in bytes",
                "drops"):
        table.add_column(col)
    for pod in pods:
        c = pod.get("counters") or {}
        drops = ", ".join(f"{k}={v}" for k, v in (c.get("drops") or {}).items()) or "-"
        table.add_row(f"{pod['namespace']}/{pod['name']}", pod["host_ifname"],
                      " ".join(pod["addresses"]), str(c.get("captured_out_packets", 0)),
                      str(c.get("captured_out_bytes", 0)), str(c.get("captured_in_packets", 0)),
                      str(c.get("captured_in_bytes", 0)), drops)
    console.print(table)


def status_view(data: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"meshagent {data['version']}, up {data['uptime_seconds']}s")
    node = ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in data["node"].items())
    console.print(f"node: {node}")
    ports = data["tunnel_ports"]
    listening = set(data.get("listeners", []))
    console.print("tunnel listeners: " + ", ".join(
        f"{name} {port} {'up' if port in listening else 'DOWN'}" for name, port in ports.items()))
    tunnel = data.get("tunnel")
    if tunnel:
        console.print(f"tunnel: mode {tunnel['mode']}, {tunnel['workloads']} local workloads, "
                      f"{tunnel['peer_workloads']} peer workloads, {tunnel['policies']} policies"
                      + (f" (policy error: {tunnel['policy_error']})"
                         if tunnel.get("policy_error") else ""))
        for cert in tunnel.get("certificates", []):
            expires = datetime.fromtimestamp(cert["not_after"], tz=timezone.utc)
            console.print(f"  certificate {cert['identity']} expires {expires:%Y-%m-%d %H:%M}Z")
    elif data.get("tunnel_error"):
        console.print(f"tunnel: status unusable: {data['tunnel_error']}")
    else:
        console.print("tunnel: no status yet (is 'meshagent tunnel' running?)")
    pods_table(data["pods"], console)
    kube = data.get("kubernetes")
    if kube:
        kubernetes_view(kube, console)
    for pod in data["pods"]:
        for f in pod.get("shadowed_by") or []:
            if "error" in f:
                console.print(f"[yellow]{pod['host_ifname']}: cannot list its filters: "
                              f"{f['error']}[/yellow]")
                continue
            what = f"{f['kind'] or '?'}" + (f" {f['name']}" if f.get("name") else "")
            console.print(
                f"[red]WARNING[/red] {pod['namespace']}/{pod['name']}: a foreign {f['direction']} "
                f"filter ({what}, prio {f['prio']}) runs before ours (prio "
                f"{data.get('tc_priority', '?')}): a final verdict there (TC_ACT_OK, "
                "action ok/drop) skips our program and this pod's traffic is not captured. "
                "Give it a higher priority number, or have it return TC_ACT_UNSPEC for "
                "traffic it does not own.")


def kubernetes_view(kube: dict[str, Any], console: Console) -> None:
    """The ``kubernetes`` block: the API server, each watch, and this node's pods with
    Istio's verdict on each."""
    console.print(f"kubernetes: node {kube['node']} on {kube['server']}, "
                  f"{'synced' if kube['synced'] else 'NOT synced (nothing is changed)'}, "
                  f"{kube['models_written']} models written")
    for kind, facts in kube["watches"].items():
        if facts["failure"]:
            console.print(f"  [yellow]watch {kind}: {facts['failure']}[/yellow]")
    table = Table(title=f"kubernetes pods on this node ({len(kube['pods'])})")
    for col in ("pod", "ips", "enrolled", "verdict"):
        table.add_column(col)
    for pod in kube["pods"]:
        table.add_row(pod["pod"], " ".join(pod["ips"]), "yes" if pod["enrolled"] else "no",
                      pod["verdict"] or "-")
    console.print(table)
    for failure in kube["last_failures"]:
        console.print(f"  [yellow]{failure}[/yellow]")
