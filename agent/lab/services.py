"""The lab's Services: one cluster model for every node's tunnel, and the NAT rules
kube-proxy would write for it.

:func:`lab_model` (pure) is the model of a lab plan: every pod as a workload
(``Kubernetes//v1/Pod/<ns>/<name>``, its node, HBONE when enrolled, TCP when not)
and two services in ``default``:

- ``web`` (VIPs ``10.96.0.10`` and ``fd00:96::10``, port 80 -> 8080) whose
  endpoints are the ``b`` pod of every node, plus ``n2-a`` listed inline as
  ``Unhealthy`` (it serves nothing on 8080: choosing it would fail);
- ``web-empty`` (``10.96.0.11``, ``fd00:96::11``, port 80 -> 8080) with none;
- ``rr`` (``10.96.0.12``, ``fd00:96::12``, port 7000 -> 7000) backed by ``n2-a``
  alone (the benchmark compares it with n2-a's own address).

``lab up`` writes it to ``<run dir>/model.yaml`` (ztunnel local-config YAML) and
every node's tunnel reads it (``tunnel.model_file``).

:func:`kube_proxy_rules` (pure) renders the model's services as kube-proxy's
iptables mode writes them (``iptables-save`` format: ``KUBE-SERVICES`` from
``PREROUTING`` and ``OUTPUT``, a ``KUBE-SVC-*`` chain per service port spreading
with ``-m statistic --mode random --probability 1/n``, ``KUBE-SEP-*`` chains that
DNAT to ``endpointIP:targetPort``; kubernetes pkg/proxy/iptables/proxier.go);
:func:`apply_kube_proxy_rules` loads them in a node netns (``iptables-restore
--noflush``), :func:`remove_kube_proxy_rules` removes exactly those chains.
:func:`kube_proxy_nft_rules` renders kube-proxy's nftables mode (tables ``ip`` /
``ip6 kube-proxy``), loaded and removed by :func:`apply_kube_proxy_nft_rules` /
:func:`remove_kube_proxy_nft_rules`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import subprocess

from agent.lab.topology import LabPlan
from agent.model.merge import pod_uid
from agent.model.types import (
    Endpoint,
    HealthStatus,
    InboundProtocol,
    Model,
    NetworkAddress,
    Service,
    ServiceBinding,
    Workload,
    lookup_port,
)

CLUSTER_ID = "Kubernetes"
MODEL_FILENAME = "model.yaml"
WEB_HOSTNAME = "web.default.svc.cluster.local"
WEB_VIPS = ("10.96.0.10", "fd00:96::10")
EMPTY_HOSTNAME = "web-empty.default.svc.cluster.local"
EMPTY_VIPS = ("10.96.0.11", "fd00:96::11")
SERVICE_PORT = 80
TARGET_PORT = 8080
ENDPOINT_LETTER = "b"  # the pod of each node that backs "web"
UNHEALTHY_ENDPOINT = "n2-a"  # listed in "web" as Unhealthy
RR_HOSTNAME = "rr.default.svc.cluster.local"
RR_VIPS = ("10.96.0.12", "fd00:96::12")
RR_PORT = 7000  # agent.bench.scenarios.common.RR_PORT
RR_ENDPOINT = "n2-a"


def _service(name: str, hostname: str, vips: tuple[str, ...],
             port: int = SERVICE_PORT, target: int = TARGET_PORT) -> Service:
    return Service(name=name, namespace="default", hostname=hostname,
                   vips=tuple(NetworkAddress("", ipaddress.ip_address(v)) for v in vips),
                   ports=((port, target),))


def lab_model(plan: LabPlan) -> Model:
    """The plan's cluster model (see the module docstring)."""
    web = dataclasses.replace(
        _service("web", WEB_HOSTNAME, WEB_VIPS),
        endpoints=tuple(Endpoint(pod_uid(CLUSTER_ID, p.namespace, p.name),
                                 ((SERVICE_PORT, TARGET_PORT),), HealthStatus.UNHEALTHY)
                        for n in plan.nodes for p in n.pods if p.name == UNHEALTHY_ENDPOINT))
    rr = _service("rr", RR_HOSTNAME, RR_VIPS, RR_PORT, RR_PORT)
    workloads = []
    for node in plan.nodes:
        for pod in node.pods:
            bindings: list[ServiceBinding] = []
            if pod.name.endswith(f"-{ENDPOINT_LETTER}"):
                bindings.append(ServiceBinding(web.key(), ((SERVICE_PORT, TARGET_PORT),)))
            if pod.name == RR_ENDPOINT:
                bindings.append(ServiceBinding(rr.key(), ((RR_PORT, RR_PORT),)))
            workloads.append(Workload(
                uid=pod_uid(CLUSTER_ID, pod.namespace, pod.name), name=pod.name,
                namespace=pod.namespace,
                workload_ips=(ipaddress.ip_address(pod.ipv4), ipaddress.ip_address(pod.ipv6)),
                service_account=pod.service_account,
                protocol=InboundProtocol.HBONE if pod.enroll else InboundProtocol.TCP,
                node=node.name, canonical_name=pod.name, workload_name=pod.name,
                workload_type="pod", cluster_id=CLUSTER_ID,
                services=tuple(bindings)))
    return Model.build(workloads, (web, _service("web-empty", EMPTY_HOSTNAME, EMPTY_VIPS), rr))


def _chain(kind: str, *parts: str) -> str:
    """kube-proxy's chain names: a prefix and 16 base32-ish characters of a hash."""
    digest = hashlib.sha256("/".join(parts).encode()).hexdigest().upper()[:16]
    return f"KUBE-{kind}-{digest}"


def kube_proxy_rules(model: Model, family: int) -> str:
    """The nat table of ``iptables-restore --noflush`` (``ip6tables-restore`` for
    family 6) for every service VIP of that family; endpoints of that family only."""
    chains: list[str] = ["KUBE-SERVICES"]
    rules: list[str] = [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    ]
    for svc in model.services:
        vips = [v.address for v in svc.vips if v.address.version == family]
        for port, target in svc.ports:
            endpoints: list[tuple[str, int]] = []
            for ep in model.endpoints(svc):
                w = model.workload_by_uid(ep.workload_uid)
                if w is None or not _ready(svc, ep, w):
                    continue
                to = lookup_port(ep.ports, port) or target
                endpoints.extend((str(a), to) for a in w.workload_ips if a.version == family)
            svc_chain = _chain("SVC", svc.namespace, svc.name, str(port), str(family))
            comment = f"{svc.namespace}/{svc.name}:{port}"
            if not endpoints:
                continue  # kube-proxy REJECTs these in the filter table; nothing to NAT
            chains.append(svc_chain)
            suffix = "/128" if family == 6 else "/32"
            for vip in vips:
                rules.append(f'-A KUBE-SERVICES -d {vip}{suffix} -p tcp -m comment --comment '
                             f'"{comment} cluster IP" -m tcp --dport {port} -j {svc_chain}')
            for i, (ip, to) in enumerate(endpoints):
                sep = _chain("SEP", svc.namespace, svc.name, str(port), ip, str(to))
                chains.append(sep)
                left = len(endpoints) - i
                jump = f"-A {svc_chain} -m comment --comment \"{comment} -> {ip}\""
                if left > 1:
                    jump += f" -m statistic --mode random --probability {1 / left:.11f}"
                rules.append(f"{jump} -j {sep}")
                dst = f"[{ip}]:{to}" if family == 6 else f"{ip}:{to}"
                rules.append(f'-A {sep} -p tcp -m comment --comment "{comment}" -m tcp '
                             f"-j DNAT --to-destination {dst}")
    return "*nat\n" + "".join(f":{c} - [0:0]\n" for c in chains) + "\n".join(rules) \
        + "\nCOMMIT\n"


def _endpoints(model: Model, svc: Service, port: int, target: int,
               family: int) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for ep in model.endpoints(svc):
        w = model.workload_by_uid(ep.workload_uid)
        if w is None or not _ready(svc, ep, w):
            continue
        to = lookup_port(ep.ports, port) or target
        out.extend((str(a), to) for a in w.workload_ips if a.version == family)
    return out


def kube_proxy_nft_rules(model: Model, family: int) -> str:
    """kube-proxy's nftables mode for ``model`` (an ``nft -f`` file): table ``ip`` /
    ``ip6 kube-proxy`` with a ``service-ips`` verdict map from ``daddr . proto . port``
    to a chain per service port, which picks an endpoint chain with ``numgen random``
    and DNATs there (kubernetes pkg/proxy/nftables/proxier.go, simplified: no
    masquerade, firewall or node-port chains)."""
    table = "ip6" if family == 6 else "ip"
    elements: list[str] = []
    chains: list[str] = []
    for svc in model.services:
        vips = [v.address for v in svc.vips if v.address.version == family]
        for port, target in svc.ports:
            endpoints = _endpoints(model, svc, port, target, family)
            if not endpoints or not vips:
                continue
            svc_chain = f"service-{svc.namespace}-{svc.name}-tcp-{port}"
            picks = []
            for i, (ip, to) in enumerate(endpoints):
                ep_chain = f"endpoint-{svc.namespace}-{svc.name}-{i}"
                dst = f"[{ip}]:{to}" if family == 6 else f"{ip}:{to}"
                chains.append(f"  chain {ep_chain} {{\n    meta l4proto tcp dnat to {dst}\n  }}\n")
                picks.append(f"{i} : goto {ep_chain}")
            chains.append(f"  chain {svc_chain} {{\n    numgen random mod {len(endpoints)} vmap "
                          f"{{ {', '.join(picks)} }}\n  }}\n")
            elements.extend(f"{vip} . tcp . {port} : goto {svc_chain}" for vip in vips)
    addr_type = "ipv6_addr" if family == 6 else "ipv4_addr"
    daddr = "ip6 daddr" if family == 6 else "ip daddr"
    elems = f"    elements = {{ {', '.join(elements)} }}\n" if elements else ""
    return (f"table {table} kube-proxy {{\n"
            f"  map service-ips {{\n    type {addr_type} . inet_proto . inet_service : verdict\n"
            f"{elems}  }}\n"
            + "".join(chains)
            + "  chain services {\n"
            f"    {daddr} . meta l4proto . th dport vmap @service-ips\n  }}\n"
            "  chain nat-prerouting {\n"
            "    type nat hook prerouting priority dstnat; policy accept;\n"
            "    jump services\n  }\n"
            "  chain nat-output {\n"
            "    type nat hook output priority -100; policy accept;\n"
            "    jump services\n  }\n}\n")


def apply_kube_proxy_nft_rules(netns: str, model: Model) -> None:
    """Load kube-proxy's nftables-mode tables in ``netns`` (both families). Side
    effects: creates tables ``ip``/``ip6 kube-proxy``; on failure removes them."""
    try:
        for family in (4, 6):
            out = subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"],
                                 input=kube_proxy_nft_rules(model, family), capture_output=True,
                                 text=True, timeout=30, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"nft in {netns} failed: {out.stderr.strip()}")
    except BaseException:
        remove_kube_proxy_nft_rules(netns)
        raise


def remove_kube_proxy_nft_rules(netns: str) -> None:
    """Delete the two ``kube-proxy`` tables (missing ones are skipped)."""
    for table in ("ip", "ip6"):
        subprocess.run(["ip", "netns", "exec", netns, "nft", "delete", "table", table,
                        "kube-proxy"], capture_output=True, timeout=30, check=False)


def _ready(svc: Service, ep: Endpoint, w: Workload) -> bool:
    return svc.includes(ep.status) and svc.includes(w.status)


def _restore(netns: str, family: int, text: str) -> None:
    tool = "ip6tables-restore" if family == 6 else "iptables-restore"
    out = subprocess.run(["ip", "netns", "exec", netns, tool, "--noflush"], input=text,
                         capture_output=True, text=True, timeout=30, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{tool} in {netns} failed: {out.stderr.strip()}")


def apply_kube_proxy_rules(netns: str, model: Model) -> None:
    """Load kube-proxy's nat rules for ``model`` in ``netns`` (IPv4 and IPv6). Side
    effects: creates the KUBE-* chains and two jumps per family; on failure, removes
    what this call added."""
    try:
        for family in (4, 6):
            _restore(netns, family, kube_proxy_rules(model, family))
    except BaseException:
        remove_kube_proxy_rules(netns, model)
        raise


def remove_kube_proxy_rules(netns: str, model: Model) -> None:
    """Remove the jumps and KUBE-* chains :func:`apply_kube_proxy_rules` made (only
    those). Side effects: iptables/ip6tables in ``netns``; missing ones are skipped."""
    for family in (4, 6):
        tool = "ip6tables" if family == 6 else "iptables"
        text = kube_proxy_rules(model, family)
        chains = [line[1:].split()[0] for line in text.splitlines() if line.startswith(":")]
        for hook in ("PREROUTING", "OUTPUT"):
            subprocess.run(["ip", "netns", "exec", netns, tool, "-t", "nat", "-D", hook,
                            "-m", "comment", "--comment", "kubernetes service portals",
                            "-j", "KUBE-SERVICES"], capture_output=True, timeout=30, check=False)
        for verb in ("-F", "-X"):
            for chain in chains:
                subprocess.run(["ip", "netns", "exec", netns, tool, "-t", "nat", verb, chain],
                               capture_output=True, timeout=30, check=False)
