"""Node-level plumbing the datapath needs, created idempotently and undone exactly.

What the agent owns on the node (and nothing else):
- fwmark rules ``capture_mark/capture_mask -> route_table`` (IPv4, IPv6);
- ``local default dev lo`` routes in ``route_table`` (IPv4, IPv6);
- the tunnel device, a veth pair, that inbound traffic is redirected into;
- sysctls it had to change, with their prior values, to restore on uninstall;
- the nftables table ``inet meshagent`` whose one chain (hook prerouting,
  priority raw) exempts captured packets from conntrack, so the node's NAT
  (kube-proxy's ``KUBE-SERVICES`` DNAT of a Service VIP) never rewrites what the
  datapath handed to a tunnel socket: the tunnel resolves the VIP itself.
``NodeState`` records which of these this agent created, so uninstall removes
those and leaves whatever was already there.
"""

from __future__ import annotations

import errno
import shutil
import socket
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.config import Config

log = structlog.get_logger("agent.node")

# Early demux attaches a tunnel socket (whose local address is a pod's) to a
# reply arriving on the uplink; routing then forwards it toward the pod, and
# ip_forward drops any skb that carries a socket. With it off, the reply takes
# the pod veth -> tunnel device path where the datapath assigns the socket.
SYSCTL_EARLY_DEMUX = "net/ipv4/tcp_early_demux"
SYSCTL_RP_FILTER_ALL = "net/ipv4/conf/all/rp_filter"


class NodeSetupError(RuntimeError):
    """Node plumbing could not be set up; the message says what to do."""


@dataclass
class NodeState:
    created_rules: list[int] = field(default_factory=list)   # families
    created_routes: list[int] = field(default_factory=list)  # families
    created_tunnel_device: bool = False
    sysctls_changed: dict[str, str] = field(default_factory=dict)  # path -> prior value
    created_state_dir: bool = False  # the agent made agent.state_dir (uninstall may remove it)
    created_notrack_table: bool = False  # nftables table NOTRACK_TABLE

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NodeState:
        return cls(**data)


NOTRACK_TABLE = ("inet", "meshagent")
_NFT_TIMEOUT_S = 10


def _nft(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nft", *args], input=stdin, capture_output=True, text=True,
                          timeout=_NFT_TIMEOUT_S, check=False)


def notrack_ruleset(cfg: Config) -> str:
    """The ``nft -f`` text of the table: captured (and bridged-redirected) packets
    skip conntrack, hence every NAT rule of the node."""
    d = cfg.datapath
    marks = sorted({d.capture_mark, d.redirect_mark} - {0})
    rules = "".join(f"    meta mark & {d.capture_mask:#x} == {m:#x} notrack\n" for m in marks)
    family, name = NOTRACK_TABLE
    return (f"table {family} {name} {{\n  chain captured_notrack {{\n"
            f"    type filter hook prerouting priority raw; policy accept;\n{rules}  }}\n}}\n")


def _ensure_notrack(cfg: Config, state: NodeState) -> None:
    """Create the notrack table unless it exists. Without the ``nft`` tool the node
    runs without it (logged by the caller): captured Service traffic then meets
    the node's NAT rules, if any."""
    family, name = NOTRACK_TABLE
    if _nft(["list", "table", family, name]).returncode == 0:
        return
    out = _nft(["-f", "-"], notrack_ruleset(cfg))
    if out.returncode != 0:
        raise OSError(f"nft could not create table {family} {name}: {out.stderr.strip()}")
    state.created_notrack_table = True


@dataclass(frozen=True)
class TunnelDevice:
    ifindex: int
    mac: bytes


def read_sysctl(path: str) -> str:
    return Path("/proc/sys", path).read_text().strip()


def write_sysctl(path: str, value: str) -> None:
    Path("/proc/sys", path).write_text(value)


def _set_sysctl(state: NodeState, path: str, value: str) -> None:
    prior = read_sysctl(path)
    if prior == value:
        return
    state.sysctls_changed.setdefault(path, prior)
    write_sysctl(path, value)


def _rule_exists(ipr: IPRoute, family: int, cfg: Config) -> bool:
    d = cfg.datapath
    for rule in ipr.get_rules(family=family):
        if (rule.get_attr("FRA_TABLE") == d.route_table
                and rule.get_attr("FRA_FWMARK") == d.capture_mark
                and rule.get_attr("FRA_PRIORITY") == d.rule_priority):
            return True
    return False


def _route_exists(ipr: IPRoute, family: int, cfg: Config) -> bool:
    try:
        routes = ipr.get_routes(family=family, table=cfg.datapath.route_table)
    except NetlinkError:
        return False
    return any(r["type"] == 2 and r["dst_len"] == 0 for r in routes)  # RTN_LOCAL


def _rule(ipr: IPRoute, command: str, family: int, cfg: Config) -> None:
    d = cfg.datapath
    ipr.rule(command, family=family, table=d.route_table, priority=d.rule_priority,
             fwmark=d.capture_mark, fwmask=d.capture_mask)


def _route(ipr: IPRoute, command: str, family: int, cfg: Config) -> None:
    lo = ipr.link_lookup(ifname="lo")[0]
    dst = "0.0.0.0/0" if family == socket.AF_INET else "::/0"
    scope = {"scope": 254} if family == socket.AF_INET else {}  # RT_SCOPE_HOST, like iproute2
    ipr.route(command, dst=dst, type="local", table=cfg.datapath.route_table, oif=lo,
              family=family, **scope)


def _ensure_tunnel_device(ipr: IPRoute, cfg: Config, state: NodeState) -> TunnelDevice:
    name, peer = cfg.agent.tunnel_device, cfg.agent.tunnel_device_peer
    if not ipr.link_lookup(ifname=name):
        ipr.link("add", ifname=name, kind="veth", peer=peer)
        state.created_tunnel_device = True
    idx = ipr.link_lookup(ifname=name)[0]
    peer_idx = ipr.link_lookup(ifname=peer)
    for i in [idx, *peer_idx]:
        ipr.link("set", index=i, state="up")
    for dev in (name, peer):
        write_sysctl(f"net/ipv4/conf/{dev}/rp_filter", "0")
        write_sysctl(f"net/ipv4/conf/{dev}/accept_local", "1")
    (link,) = ipr.get_links(idx)
    mac = bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))
    return TunnelDevice(ifindex=idx, mac=mac)


def setup_node(cfg: Config, state: NodeState) -> TunnelDevice:
    """Create what the datapath needs in the calling process's netns.

    Side effects, in order (each skipped when already in place, and recorded
    in ``state`` only when this call created or changed it):
    1. ``net.ipv4.tcp_early_demux=0`` (see SYSCTL_EARLY_DEMUX).
    2. ``net.ipv4.conf.all.rp_filter`` 1 -> 2, since strict mode would drop
       redirected inbound packets arriving on the tunnel device.
    3. the tunnel device veth pair, up, rp_filter 0, accept_local 1.
    4. fwmark rules and local default routes, IPv4 and IPv6.
    5. the nftables notrack table (skipped when ``nft`` is not installed).
    On failure everything this call created is undone before raising.
    """
    before = NodeState.from_json(state.to_json())
    try:
        _set_sysctl(state, SYSCTL_EARLY_DEMUX, "0")
        if read_sysctl(SYSCTL_RP_FILTER_ALL) == "1":
            _set_sysctl(state, SYSCTL_RP_FILTER_ALL, "2")
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            device = _ensure_tunnel_device(ipr, cfg, state)
            for family in (socket.AF_INET, socket.AF_INET6):
                if not _rule_exists(ipr, family, cfg):
                    _rule(ipr, "add", family, cfg)
                    state.created_rules.append(int(family))
                if not _route_exists(ipr, family, cfg):
                    _route(ipr, "add", family, cfg)
                    state.created_routes.append(int(family))
        if shutil.which("nft"):
            _ensure_notrack(cfg, state)
        else:
            log.warning("nft not installed: captured packets are not exempt from conntrack, "
                        "so a node's Service NAT (kube-proxy) can rewrite them; install "
                        "nftables")
        return device
    except (OSError, NetlinkError, subprocess.TimeoutExpired) as exc:
        _undo(cfg, state, keep=before)
        raise NodeSetupError(f"setting up node networking failed: {exc}") from exc


def _undo(cfg: Config, state: NodeState, keep: NodeState) -> None:
    """Remove what ``state`` has beyond ``keep`` (used for rollback and teardown)."""
    with IPRoute() as ipr:
        for family in [f for f in state.created_routes if f not in keep.created_routes]:
            try:
                _route(ipr, "del", family, cfg)
            except NetlinkError as exc:
                if exc.code not in (errno.ESRCH, errno.ENOENT):
                    raise
            state.created_routes.remove(family)
        for family in [f for f in state.created_rules if f not in keep.created_rules]:
            try:
                _rule(ipr, "del", family, cfg)
            except NetlinkError as exc:
                if exc.code not in (errno.ESRCH, errno.ENOENT):
                    raise
            state.created_rules.remove(family)
        if state.created_tunnel_device and not keep.created_tunnel_device:
            for idx in ipr.link_lookup(ifname=cfg.agent.tunnel_device):
                ipr.link("del", index=idx)
            state.created_tunnel_device = False
    if state.created_notrack_table and not keep.created_notrack_table:
        table_family, table_name = NOTRACK_TABLE
        out = _nft(["delete", "table", table_family, table_name])
        if out.returncode != 0 and "No such file" not in out.stderr:
            raise OSError(f"nft could not delete table {table_family} {table_name}: "
                          f"{out.stderr.strip()}")
        state.created_notrack_table = False
    for path in [p for p in state.sysctls_changed if p not in keep.sysctls_changed]:
        write_sysctl(path, state.sysctls_changed.pop(path))


def teardown_node(cfg: Config, state: NodeState) -> None:
    """Undo everything ``state`` says this agent created or changed.

    Side effects: deletes our routes, rules and tunnel device; restores sysctls
    to their prior values. Objects we did not create are left alone.
    """
    _undo(cfg, state, keep=NodeState())


def verify_node(cfg: Config) -> dict[str, bool]:
    """What of the node plumbing is in place right now (for status and tests)."""
    with IPRoute() as ipr:
        return {
            "rule_v4": _rule_exists(ipr, socket.AF_INET, cfg),
            "rule_v6": _rule_exists(ipr, socket.AF_INET6, cfg),
            "route_v4": _route_exists(ipr, socket.AF_INET, cfg),
            "route_v6": _route_exists(ipr, socket.AF_INET6, cfg),
            "tunnel_device": bool(ipr.link_lookup(ifname=cfg.agent.tunnel_device)),
            "early_demux_off": read_sysctl(SYSCTL_EARLY_DEMUX) == "0",
        }
