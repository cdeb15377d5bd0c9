"""meshagent configuration: one TOML file, every key with a default.

The file is ``/etc/meshagent/config.toml`` unless ``MESHAGENT_CONFIG`` names
another. Any key can be overridden from the environment as
``MESHAGENT_<SECTION>_<KEY>`` (upper case), which is how the lab gives each of
its nodes its own socket, state directory and pin directory.

Pure logic: no I/O besides reading the file and the environment.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

DEFAULT_CONFIG_PATH = Path("/etc/meshagent/config.toml")
ENV_CONFIG_PATH = "MESHAGENT_CONFIG"
ENV_PREFIX = "MESHAGENT_"
# The tunnel's drain on stop must end well inside the units' TimeoutStopSec=30s.
MAX_DRAIN_SECONDS = 20.0


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and what to do."""


@dataclass(frozen=True)
class AgentConfig:
    socket: str = "/run/meshagent/agent.sock"
    state_dir: str = "/var/lib/meshagent"
    bpf_pin_dir: str = "/sys/fs/bpf/meshagent"
    # The agent-owned veth pair that inbound traffic is redirected into.
    tunnel_device: str = "meshtun0"
    tunnel_device_peer: str = "meshtun1"
    # tc filter priority and handle that identify our filters among others'.
    tc_priority: int = 0x3A
    tc_handle: int = 0xA11
    # Prometheus metrics of the agent (0 disables).
    metrics_port: int = 15021


@dataclass(frozen=True)
class DatapathConfig:
    # skb->mark set on captured packets so the fwmark rule delivers them locally.
    capture_mark: int = 0x5A0000
    capture_mask: int = 0xFF0000
    # skb->mark (under capture_mask) of a bridged pod's captured packet on its
    # way to the tunnel device, which assigns it there (bpf/lib/common.h).
    redirect_mark: int = 0x5C0000
    route_table: int = 15000
    rule_priority: int = 15000
    excluded_ports: tuple[int, ...] = ()
    # UDP ports of this node's tunnels beyond VXLAN 4789/4790/8472 and Geneve 6081
    # (a custom VXLAN dstport, FOU/GUE): an enrolled pod's UDP to them is dropped,
    # as the node would decapsulate it around capture (README "Datapath rules").
    encapsulation_udp_ports: tuple[int, ...] = ()
    excluded_cidrs: tuple[str, ...] = ()
    # Capture enrolled pods' DNS (UDP and TCP to port 53) into the tunnel's DNS
    # proxy (tunnel.dns_port); a pod opts out with `pod add --no-dns-capture`
    # (Istio: annotation ambient.istio.io/dns-capture: "false"). On by default,
    # as in Istio ambient since 1.25 (values cni.ambient.dnsCapture).
    dns_capture: bool = True


@dataclass(frozen=True)
class TunnelConfig:
    outbound_port: int = 15001
    inbound_port: int = 15006
    hbone_port: int = 15008
    metrics_port: int = 15020
    # SO_MARK on every tunnel socket: the datapath never recaptures these.
    socket_mark: int = 0x5B0000
    # "permissive" forwards plaintext inbound to enrolled pods, "strict" refuses it.
    inbound_mode: str = "permissive"
    # Destinations sent over HBONE: known workloads (this node's and those in
    # peer_workloads, workloads.json files of other nodes, standing in for a
    # control plane's workload discovery), plus anything in mesh_cidrs.
    mesh_cidrs: tuple[str, ...] = ()
    peer_workloads: tuple[str, ...] = ()
    trust_domain: str = "cluster.local"
    ca_dir: str = "/etc/meshagent/ca"
    cert_ttl_seconds: int = 24 * 3600
    # "hbone" carries mesh traffic over mTLS HTTP/2; "plain" forwards TCP as is.
    mode: str = "hbone"
    connect_timeout_seconds: float = 5.0
    # On SIGTERM, how long connections in flight may run before they are cut (see
    # agent.tunnel.drain); below the units' TimeoutStopSec=30s.
    drain_seconds: float = 5.0
    # AuthorizationPolicy YAML files, reloaded on change.
    policy_dir: str = "/etc/meshagent/policies"
    root_namespace: str = "istio-system"
    metrics_host: str = "0.0.0.0"
    # The cluster model (ztunnel local-config YAML, its LOCAL_XDS_PATH format):
    # services, VIPs, endpoints, other nodes' workloads; reloaded on change and
    # merged with this node's workloads.json. Empty: no model (peer_workloads and
    # mesh_cidrs only).
    model_file: str = ""
    # This node's name as the model's workloads give it ("" = the host name).
    node_name: str = ""
    cluster_id: str = "Kubernetes"
    # The DNS proxy's port (UDP and TCP, IP_TRANSPARENT; istio-cni's DNSCapturePort);
    # 0: no DNS proxy.
    dns_port: int = 15053
    # Resolvers to try after a captured query's own (original) destination.
    dns_upstreams: tuple[str, ...] = ()


@dataclass(frozen=True)
class K8sConfig:
    """Kubernetes (``[k8s]``): enroll this node's pods by Istio's labels and build the
    cluster model from the API server (agent.k8s; README "Kubernetes")."""

    enabled: bool = False
    # A kubeconfig file; "" = in-cluster credentials (the DaemonSet's service account).
    kubeconfig: str = ""
    # This node's name as the API server knows it ("" = $NODE_NAME, else the host name).
    node_name: str = ""
    # Namespaces whose pods are never enrolled (Istio CNI's excludeNamespaces).
    exclude_namespaces: tuple[str, ...] = ("kube-system",)
    # Build the whole cluster's model (workloads, Services, AuthorizationPolicies) from
    # the API and write it to tunnel.model_file and tunnel.policy_dir.
    model: bool = True
    # A full relist of every watch this often, even when the watches are healthy.
    resync_seconds: float = 300.0
    # A full enrollment pass (plan from the cache against the registry) this often.
    reconcile_seconds: float = 30.0


@dataclass(frozen=True)
class Config:
    agent: AgentConfig = field(default_factory=AgentConfig)
    datapath: DatapathConfig = field(default_factory=DatapathConfig)
    tunnel: TunnelConfig = field(default_factory=TunnelConfig)
    k8s: K8sConfig = field(default_factory=K8sConfig)

    def validate(self) -> Config:
        """Raise ConfigError for values that would break the node; return self."""
        t, d = self.tunnel, self.datapath
        ports = {"outbound_port": t.outbound_port, "inbound_port": t.inbound_port,
                 "hbone_port": t.hbone_port, "metrics_port": t.metrics_port}
        if t.dns_port:
            ports["dns_port"] = t.dns_port
        if d.dns_capture and not t.dns_port:
            raise ConfigError("datapath.dns_capture needs tunnel.dns_port (the tunnel's DNS "
                              "proxy, e.g. 15053); to run without the DNS proxy, set "
                              "datapath.dns_capture = false as well")
        for upstream in t.dns_upstreams:
            resolver_address(upstream)
        for name, port in ports.items():
            if not 1 <= port <= 65535:
                raise ConfigError(f"tunnel.{name}={port}: a port must be in 1..65535")
        if len(set(ports.values())) != len(ports):
            raise ConfigError(f"tunnel ports must all differ, got {ports}")
        for port in d.excluded_ports:
            if not 1 <= port <= 65535:
                raise ConfigError(f"datapath.excluded_ports: {port} is not a port in 1..65535")
        for port in d.encapsulation_udp_ports:
            if not 1 <= port <= 65535:
                raise ConfigError(
                    f"datapath.encapsulation_udp_ports: {port} is not a port in 1..65535")
        if len(d.encapsulation_udp_ports) > 64:
            raise ConfigError("datapath.encapsulation_udp_ports: at most 64 ports")
        for cidr in (*d.excluded_cidrs, *t.mesh_cidrs):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ConfigError(f"{cidr!r} is not a CIDR (example: 10.0.0.0/8): {exc}") from exc
        if d.capture_mark & ~d.capture_mask:
            raise ConfigError("datapath.capture_mark has bits outside datapath.capture_mask")
        if t.socket_mark & d.capture_mask == d.capture_mark:
            raise ConfigError("tunnel.socket_mark must not match datapath.capture_mark/mask")
        if d.redirect_mark & ~d.capture_mask or not d.redirect_mark & d.capture_mask:
            raise ConfigError("datapath.redirect_mark must be nonzero and inside "
                              "datapath.capture_mask")
        if d.redirect_mark in (d.capture_mark, t.socket_mark & d.capture_mask):
            raise ConfigError("datapath.redirect_mark must differ from datapath.capture_mark "
                              "and tunnel.socket_mark")
        if t.inbound_mode not in ("permissive", "strict"):
            raise ConfigError(
                f"tunnel.inbound_mode={t.inbound_mode!r}: use 'permissive' or 'strict'")
        if not 0 <= t.drain_seconds <= MAX_DRAIN_SECONDS:
            raise ConfigError(f"tunnel.drain_seconds={t.drain_seconds}: use 0..{MAX_DRAIN_SECONDS} "
                              "(it must end well before the unit's TimeoutStopSec=30s)")
        if t.mode not in ("hbone", "plain"):
            raise ConfigError(f"tunnel.mode={t.mode!r}: use 'hbone' or 'plain'")
        k = self.k8s
        if k.enabled and k.model and not t.model_file:
            raise ConfigError("k8s.model needs tunnel.model_file (where the agent writes the "
                              "cluster model for the tunnel), or set k8s.model = false")
        if k.resync_seconds <= 0 or k.reconcile_seconds <= 0:
            raise ConfigError("k8s.resync_seconds and k8s.reconcile_seconds must be > 0")
        return self


def resolver_address(text: str) -> tuple[str, int]:
    """A resolver of ``tunnel.dns_upstreams``: ``IP`` (port 53), ``IPv4:port`` or
    ``[IPv6]:port``; raises ConfigError."""
    host, port = text, 53
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            host = ""
        elif rest:
            port = int(rest[1:]) if rest[1:].isdigit() else 0
    elif text.count(":") == 1:
        host, _, rest = text.partition(":")
        port = int(rest) if rest.isdigit() else 0
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"tunnel.dns_upstreams: {text!r} is not a resolver address "
                          "(write IP, IPv4:port or [IPv6]:port)") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"tunnel.dns_upstreams: {text!r}: the port must be in 1..65535")
    return host, port


_SECTIONS: dict[str, type] = {"agent": AgentConfig, "datapath": DatapathConfig,
                              "tunnel": TunnelConfig, "k8s": K8sConfig}


def _coerce(section: str, key: str, declared: Any, value: Any) -> Any:
    """Convert a TOML or environment value to the declared field type."""
    where = f"{section}.{key}"
    default = declared
    if isinstance(default, bool):
        if isinstance(value, str):
            return value.lower() in ("1", "true", "yes", "on")
        return bool(value)
    if isinstance(default, int):
        if isinstance(value, str):
            try:
                return int(value, 0)
            except ValueError as exc:
                raise ConfigError(f"{where}: {value!r} is not an integer") from exc
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {value!r} is not a number") from exc
    if isinstance(default, tuple):
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if key.endswith("ports"):
            return tuple(_coerce(section, key, 0, v) for v in items)
        return tuple(str(v).strip() for v in items)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_mapping(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Build a validated Config from parsed TOML and environment overrides."""
    sections: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        raw = data.get(section, {})
        if not isinstance(raw, Mapping):
            raise ConfigError(f"[{section}] must be a table")
        defaults = cls()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(
                f"unknown key(s) in [{section}]: {', '.join(sorted(unknown))}; "
                f"known keys: {', '.join(sorted(known))}")
        values = {k: _coerce(section, k, getattr(defaults, k), v) for k, v in raw.items()}
        for name in known:
            env_key = f"{ENV_PREFIX}{section}_{name}".upper()
            if env and env_key in env:
                values[name] = _coerce(section, name, getattr(defaults, name), env[env_key])
        sections[section] = cls(**values)
    unknown_sections = set(data) - set(_SECTIONS)
    if unknown_sections:
        raise ConfigError(f"unknown section(s): {', '.join(sorted(unknown_sections))}")
    return Config(**sections).validate()


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load the config file (missing file means all defaults) plus env overrides."""
    env = os.environ if env is None else env
    explicit = path is not None or ENV_CONFIG_PATH in env
    cfg_path = Path(path or env.get(ENV_CONFIG_PATH) or DEFAULT_CONFIG_PATH)
    data: dict[str, Any] = {}
    if cfg_path.exists():
        try:
            data = tomllib.loads(cfg_path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{cfg_path}: not valid TOML: {exc}") from exc
    elif explicit:
        raise ConfigError(f"config file {cfg_path} does not exist")
    try:
        return from_mapping(data, env)
    except ConfigError as exc:
        raise ConfigError(f"{cfg_path}: {exc}") from exc
