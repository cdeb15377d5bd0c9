"""The lab plan: which namespaces, interfaces and addresses a lab consists of.

Pure logic. Nothing here touches the kernel, spawns processes or reads files;
:mod:`agent.lab.netlab` turns a :class:`LabPlan` into namespaces and back.

Naming scheme (``P`` is the prefix, at most 6 characters; ``N`` the node
number; ``x`` a pod letter ``a``..``o`` or ``p`` for the non-enrolled pod)::

    netns  P-ul                  underlay, holds bridge ``Pbr`` and ports ``PuN``
    netns  P-nodeN               node N; its underlay veth is ``ul0``
    netns  P-nN-x / P-nN-plain   pods; the pod side of their veth is ``eth0``
    link   PnNx                  host side of a pod veth, in the node netns

Every interface name is checked against the kernel's 15-character limit.

Addresses: node N is 198.18.0.N/24 and fd00:198:18::N/64 on the underlay and
owns 10.244.N.0/24 and fd00:10:244:N::/64. Pod letter k (a=0) gets host number
10+k, the non-enrolled pod gets 100; the pod's gateway is .1 / ::1.

Pod network (``LabPlan.pod_network``): ``"veth"`` (default) has the lab wire
each pod itself with the addresses above; ``"cni"`` (ptp) and ``"cni-bridge"``
(bridge, br_netfilter on) leave the pod netns empty for a CNI runtime
(:mod:`agent.lab.cnipods`: ptp or bridge + host-local + meshagent-cni), which
asks host-local for the planned addresses; the host veth name is whatever the
plugin chose, and the lab rewrites ``lab.json`` with it once the pods exist.
The non-enrolled pod lives in Kubernetes namespace ``unmeshed`` so the
plugin's ``enrolled_namespaces`` can leave it out.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_PREFIX = "malab"
MAX_PREFIX_LEN = 6
IFNAMSIZ_MAX = 15  # IFNAMSIZ (16) minus the terminating NUL
MAX_NODES = 16
MAX_PODS_PER_NODE = 15  # pod letters a..o; "p" is reserved for the plain pod
RUN_ROOT = "/run/meshagent-lab"
NETNS_RUN_DIR = "/run/netns"
PLAN_FILENAME = "lab.json"
SCHEMA_VERSION = 1

UNDERLAY_V4_NET = ipaddress.IPv4Network("198.18.0.0/24")
UNDERLAY_V6_NET = ipaddress.IPv6Network("fd00:198:18::/64")
POD_IFNAME = "eth0"
NODE_UNDERLAY_IFNAME = "ul0"
PLAIN_POD_HOST = 100
FIRST_POD_HOST = 10
POD_NETWORKS = ("veth", "cni", "cni-bridge")
CNI_POD_NETWORKS = ("cni", "cni-bridge")  # pods made by CNI plugins
CNI_PLAIN_NAMESPACE = "unmeshed"  # namespace of the non-enrolled pod in CNI labs

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]*$")
_PROCESS_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PlanError(ValueError):
    """The requested plan is invalid; the message says which value and why."""


@dataclass(frozen=True)
class PodPlan:
    """One pod: a netns with ``eth0`` and a host-side veth in its node's netns."""

    name: str  # short pod name, e.g. "n1-a"
    node: str  # node name, e.g. "node1"
    netns: str  # e.g. "malab-n1-a"
    ipv4: str  # e.g. "10.244.1.10" (configured as /32)
    ipv6: str  # e.g. "fd00:10:244:1::10" (configured as /128)
    host_ifname: str  # host-side veth in the node netns, e.g. "malabn1a"
    gateway_ipv4: str  # e.g. "10.244.1.1" (on host_ifname, /32)
    gateway_ipv6: str  # e.g. "fd00:10:244:1::1" (on host_ifname, /128)
    namespace: str  # Kubernetes namespace, for identities
    service_account: str  # Kubernetes service account, for identities
    enroll: bool  # whether the mesh should capture this pod's traffic
    ifname: str = POD_IFNAME


@dataclass(frozen=True)
class NodePlan:
    """One node: a netns with ``ul0`` on the underlay and one veth per pod."""

    name: str  # e.g. "node1"
    index: int  # N, 1-based
    netns: str  # e.g. "malab-node1"
    underlay_ifname: str  # "ul0"
    underlay_peer_ifname: str  # bridge port in the underlay netns, e.g. "malabu1"
    underlay_ipv4: str  # e.g. "198.18.0.1" (configured as /24)
    underlay_ipv6: str  # e.g. "fd00:198:18::1" (configured as /64)
    pod_cidrs: tuple[str, ...]  # ("10.244.N.0/24", "fd00:10:244:N::/64")
    pods: tuple[PodPlan, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class UnderlayPlan:
    """The shared L2 segment: a netns holding one bridge."""

    netns: str  # e.g. "malab-ul"
    bridge: str  # e.g. "malabbr"
    ipv4_cidr: str
    ipv6_cidr: str


@dataclass(frozen=True)
class LabPlan:
    """A whole lab. Build with :func:`build_plan`; persist with :meth:`to_json`."""

    prefix: str
    underlay: UnderlayPlan
    nodes: tuple[NodePlan, ...]
    pod_network: str = "veth"  # "veth" (the lab wires pods), "cni", "cni-bridge" (module doc)

    @property
    def uses_cni(self) -> bool:
        """Pods are made by CNI plugins (``cni`` or ``cni-bridge``)."""
        return self.pod_network in CNI_POD_NETWORKS

    # -- lookup -------------------------------------------------------------

    def node(self, name: str) -> NodePlan:
        """The node called ``name``; :class:`PlanError` names the valid ones."""
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.nodes)
        raise PlanError(f"no node {name!r} in lab {self.prefix!r}; nodes are: {known}")

    def pod(self, name: str) -> PodPlan:
        """The pod called ``name`` (short name, e.g. ``n1-a``)."""
        for pod in self.pods():
            if pod.name == name:
                return pod
        known = ", ".join(p.name for p in self.pods())
        raise PlanError(f"no pod {name!r} in lab {self.prefix!r}; pods are: {known}")

    def pods(self) -> tuple[PodPlan, ...]:
        """All pods of all nodes, node by node."""
        return tuple(p for n in self.nodes for p in n.pods)

    def all_netns(self) -> tuple[str, ...]:
        """Every namespace name, in teardown order: pods, nodes, underlay."""
        return (
            *(p.netns for p in self.pods()),
            *(n.netns for n in self.nodes),
            self.underlay.netns,
        )

    # -- paths (strings only, nothing is created here) -----------------------

    @property
    def run_dir(self) -> str:
        return run_dir(self.prefix)

    @property
    def plan_path(self) -> str:
        return f"{run_dir(self.prefix)}/{PLAN_FILENAME}"

    def node_run_dir(self, node: str) -> str:
        return f"{run_dir(self.prefix)}/{self.node(node).name}"

    # -- (de)serialisation ---------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["schema"] = SCHEMA_VERSION
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabPlan:
        """Inverse of :meth:`to_dict`; :class:`PlanError` if it does not fit."""
        try:
            if data.get("schema") != SCHEMA_VERSION:
                raise PlanError(
                    f"lab plan schema {data.get('schema')!r} is not {SCHEMA_VERSION}; "
                    "it was written by another meshagent version: run `lab down` and `lab up`"
                )
            nodes = tuple(
                NodePlan(
                    **{k: v for k, v in n.items() if k not in ("pods", "pod_cidrs")},
                    pod_cidrs=tuple(n["pod_cidrs"]),
                    pods=tuple(PodPlan(**p) for p in n["pods"]),
                )
                for n in data["nodes"]
            )
            plan = cls(
                prefix=data["prefix"],
                underlay=UnderlayPlan(**data["underlay"]),
                nodes=nodes,
                pod_network=data.get("pod_network", "veth"),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise PlanError(f"malformed lab plan: {exc!r}") from exc
        validate_plan(plan)
        return plan

    @classmethod
    def from_json(cls, text: str) -> LabPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"lab plan is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise PlanError("lab plan must be a JSON object")
        return cls.from_dict(data)


# -- construction ----------------------------------------------------------


def run_dir(prefix: str) -> str:
    """Directory holding the plan, logs and pid files of lab ``prefix``."""
    return f"{RUN_ROOT}/{prefix}"


def netns_path(name: str) -> str:
    return f"{NETNS_RUN_DIR}/{name}"


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if usable, else raise :class:`PlanError`.

    Lower-case letters and digits only, starting with a letter, at most
    ``MAX_PREFIX_LEN`` characters: no ``-`` so that ``<prefix>-`` unambiguously
    identifies the lab's namespaces (``malab-`` never matches ``malab2-...``).
    """
    if not prefix or len(prefix) > MAX_PREFIX_LEN or not _PREFIX_RE.match(prefix):
        raise PlanError(
            f"invalid lab prefix {prefix!r}: use 1-{MAX_PREFIX_LEN} lower-case letters "
            "or digits, starting with a letter (e.g. 'malab'), so interface names fit "
            f"{IFNAMSIZ_MAX} characters"
        )
    return prefix


def validate_process_name(name: str) -> str:
    """A daemon name usable as a file name (``<name>.log``, ``<name>.pid``)."""
    if not _PROCESS_NAME_RE.match(name) or len(name) > 64:
        raise PlanError(
            f"invalid process name {name!r}: use letters, digits, '_', '.', '-' "
            "(at most 64, not starting with '.' or '-')"
        )
    return name


def _pod_letter(k: int) -> str:
    return chr(ord("a") + k)


def _namespace_for(letter: str) -> str:
    return "default" if letter == "a" else f"team-{letter}"


def build_plan(
    prefix: str = DEFAULT_PREFIX, nodes: int = 2, pods_per_node: int = 2, pod_network: str = "veth"
) -> LabPlan:
    """The plan for ``nodes`` nodes with ``pods_per_node`` enrolled pods each.

    Every node also gets one pod ``nN-plain`` with ``enroll=False``. Pod ``-a``
    lives in Kubernetes namespace ``default``, pod ``-b`` in ``team-b`` and so
    on; the service account is ``sa-<letter>`` (``sa-plain``). The plain pod is
    in ``default`` too, or in ``unmeshed`` when the pods are made by CNI.
    """
    validate_prefix(prefix)
    if pod_network not in POD_NETWORKS:
        raise PlanError(f"pod network {pod_network!r}: use one of {', '.join(POD_NETWORKS)}")
    plain_namespace = CNI_PLAIN_NAMESPACE if pod_network in CNI_POD_NETWORKS else "default"
    if not 1 <= nodes <= MAX_NODES:
        raise PlanError(f"--nodes must be between 1 and {MAX_NODES}, got {nodes}")
    if not 1 <= pods_per_node <= MAX_PODS_PER_NODE:
        raise PlanError(
            f"--pods-per-node must be between 1 and {MAX_PODS_PER_NODE}, got {pods_per_node}"
        )
    node_plans = []
    for n in range(1, nodes + 1):
        v4_cidr = ipaddress.IPv4Network(f"10.244.{n}.0/24")
        v6_cidr = ipaddress.IPv6Network(f"fd00:10:244:{n}::/64")
        gw4 = str(v4_cidr.network_address + 1)
        gw6 = str(v6_cidr.network_address + 1)
        specs: list[tuple[str, str, int, str, str, bool]] = [
            (
                _pod_letter(k),
                _pod_letter(k),
                FIRST_POD_HOST + k,
                _namespace_for(_pod_letter(k)),
                f"sa-{_pod_letter(k)}",
                True,
            )
            for k in range(pods_per_node)
        ]
        specs.append(("plain", "p", PLAIN_POD_HOST, plain_namespace, "sa-plain", False))
        pods = tuple(
            PodPlan(
                name=f"n{n}-{suffix}",
                node=f"node{n}",
                netns=f"{prefix}-n{n}-{suffix}",
                # Written in the same digits for v4 and v6 so they read alike.
                ipv4=str(v4_cidr.network_address + host),
                ipv6=str(ipaddress.IPv6Address(f"fd00:10:244:{n}::{host}")),
                host_ifname=f"{prefix}n{n}{short}",
                gateway_ipv4=gw4,
                gateway_ipv6=gw6,
                namespace=namespace,
                service_account=sa,
                enroll=enroll,
            )
            for suffix, short, host, namespace, sa, enroll in specs
        )
        node_plans.append(
            NodePlan(
                name=f"node{n}",
                index=n,
                netns=f"{prefix}-node{n}",
                underlay_ifname=NODE_UNDERLAY_IFNAME,
                underlay_peer_ifname=f"{prefix}u{n}",
                underlay_ipv4=str(UNDERLAY_V4_NET.network_address + n),
                underlay_ipv6=str(UNDERLAY_V6_NET.network_address + n),
                pod_cidrs=(str(v4_cidr), str(v6_cidr)),
                pods=pods,
            )
        )
    plan = LabPlan(
        prefix=prefix,
        underlay=UnderlayPlan(
            netns=f"{prefix}-ul",
            bridge=f"{prefix}br",
            ipv4_cidr=str(UNDERLAY_V4_NET),
            ipv6_cidr=str(UNDERLAY_V6_NET),
        ),
        nodes=tuple(node_plans),
        pod_network=pod_network,
    )
    validate_plan(plan)
    return plan


def _check_ifname(name: str, what: str) -> None:
    if not name or len(name) > IFNAMSIZ_MAX or "/" in name or name.strip() != name:
        raise PlanError(
            f"interface name {name!r} for {what} is invalid: at most {IFNAMSIZ_MAX} "
            "characters, no '/' or spaces (choose a shorter --prefix)"
        )


def validate_plan(plan: LabPlan) -> None:
    """Raise :class:`PlanError` unless names fit and nothing is used twice."""
    validate_prefix(plan.prefix)
    if plan.pod_network not in POD_NETWORKS:
        raise PlanError(f"pod network {plan.pod_network!r}: use one of {', '.join(POD_NETWORKS)}")
    _check_ifname(plan.underlay.bridge, "the underlay bridge")
    netns_names: list[str] = [plan.underlay.netns]
    ul_ifnames: list[str] = [plan.underlay.bridge]
    addrs: list[str] = []
    for node in plan.nodes:
        netns_names.append(node.netns)
        _check_ifname(node.underlay_ifname, f"{node.name} underlay")
        _check_ifname(node.underlay_peer_ifname, f"{node.name} bridge port")
        ul_ifnames.append(node.underlay_peer_ifname)
        addrs += [node.underlay_ipv4, node.underlay_ipv6]
        node_ifnames = [node.underlay_ifname]
        cidrs = [ipaddress.ip_network(c) for c in node.pod_cidrs]
        for pod in node.pods:
            if pod.node != node.name:
                raise PlanError(f"pod {pod.name} lists node {pod.node}, but is under {node.name}")
            netns_names.append(pod.netns)
            _check_ifname(pod.ifname, f"pod {pod.name}")
            _check_ifname(pod.host_ifname, f"pod {pod.name} host side")
            node_ifnames.append(pod.host_ifname)
            addrs += [pod.ipv4, pod.ipv6]
            for addr in (pod.ipv4, pod.ipv6, pod.gateway_ipv4, pod.gateway_ipv6):
                ip = ipaddress.ip_address(addr)
                if not any(ip.version == c.version and ip in c for c in cidrs):
                    raise PlanError(f"{addr} of pod {pod.name} is outside {node.pod_cidrs}")
        _no_duplicates(node_ifnames, f"interface names in {node.netns}")
    for name in netns_names:
        if not name.startswith(f"{plan.prefix}-"):
            raise PlanError(f"namespace {name!r} does not start with {plan.prefix}-")
    _no_duplicates(netns_names, "namespace names")
    _no_duplicates(ul_ifnames, f"interface names in {plan.underlay.netns}")
    _no_duplicates([str(ipaddress.ip_address(a)) for a in addrs], "addresses")
    _no_duplicates([c for n in plan.nodes for c in n.pod_cidrs], "pod CIDRs")


def _no_duplicates(items: list[str], what: str) -> None:
    dups = sorted(item for item, count in Counter(items).items() if count > 1)
    if dups:
        raise PlanError(f"duplicate {what}: {', '.join(dups)}")
