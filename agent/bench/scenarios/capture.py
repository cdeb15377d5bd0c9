"""Netfilter capture recipes the eBPF datapath is compared with, installed
inside a lab node's netns only (``lab down`` removes them with the netns).

All variants deliver captured pod TCP to the tunnel's IP_TRANSPARENT listener
on port 15001, like the eBPF datapath's sk_assign does:

- a fwmark rule ``fwmark MARK/MARK lookup TABLE`` and ``local default dev lo``
  in TABLE deliver marked packets locally;
- ``-m socket --transparent`` (nft: ``socket transparent 1``) marks packets of
  connections a transparent socket already owns: established captured flows
  and the replies to the tunnel's upstream connections, which it dials from
  the pod's own address, so they skip the per-pod rules (the usual TPROXY
  "divert" chain);
- per-pod TPROXY rules (or one rule matching an ipset) capture new connections.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from agent.bench.labctl import BenchLab

MARK = 0x1
TABLE = 133
RULE_PRIORITY = 1000
TPROXY_PORT = 15001
NFT_TABLE = "mbtproxy"
IPSET = "mbpods"


def install_policy_routing(bench: BenchLab, ns: str) -> None:
    bench.run(ns, ["ip", "rule", "add", "fwmark", f"{MARK:#x}/{MARK:#x}", "lookup", str(TABLE),
                   "priority", str(RULE_PRIORITY)])
    bench.run(ns, ["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", str(TABLE)])


def _tproxy(match: str) -> str:
    return (f"-A MB_TPROXY {match} -p tcp -j TPROXY --on-port {TPROXY_PORT} "
            f"--tproxy-mark {MARK:#x}/{MARK:#x}")


def iptables_rules(pods: Sequence[tuple[str, str]], use_ipset: bool) -> str:
    """iptables-restore input: ``pods`` are (veth, ip); the measured pod goes last.

    One rule per pod (``-i veth -s ip``), or with ``use_ipset`` a single rule
    matching the source address against the ipset.
    """
    lines = ["*mangle", ":MB_DIVERT - [0:0]", ":MB_TPROXY - [0:0]",
             "-A PREROUTING -p tcp -m socket --transparent -j MB_DIVERT",
             "-A PREROUTING -p tcp -j MB_TPROXY",
             f"-A MB_DIVERT -j MARK --set-xmark {MARK:#x}/{MARK:#x}",
             "-A MB_DIVERT -j ACCEPT"]
    if use_ipset:
        lines.append(_tproxy(f"-m set --match-set {IPSET} src"))
    else:
        lines += [_tproxy(f"-i {veth} -s {ip}/32") for veth, ip in pods]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def install_iptables(bench: BenchLab, ns: str, pods: Sequence[tuple[str, str]],
                     use_ipset: bool = False) -> float:
    """Install the TPROXY rules (and the ipset); return seconds it took."""
    t0 = time.perf_counter()
    if use_ipset:
        body = "".join(f"add {IPSET} {ip}\n" for _, ip in pods)
        bench.run(ns, ["ipset", "restore"], stdin=(
            f"create {IPSET} hash:ip family inet hashsize 16384 maxelem 131072\n" + body),
            timeout=120)
    bench.run(ns, ["iptables-restore", "--noflush"], stdin=iptables_rules(pods, use_ipset),
              timeout=300)
    return time.perf_counter() - t0


def remove_iptables(bench: BenchLab, ns: str, use_ipset: bool = False) -> None:
    bench.run(ns, ["iptables-restore"], stdin="*mangle\nCOMMIT\n", timeout=300)
    if use_ipset:
        bench.run(ns, ["ipset", "destroy", IPSET], check=False)


def nft_ruleset(pods: Sequence[tuple[str, str]]) -> str:
    rules = "\n".join(
        f'    iifname "{veth}" ip saddr {ip} meta l4proto tcp '
        f"tproxy to :{TPROXY_PORT} meta mark set {MARK:#x} accept" for veth, ip in pods)
    return (f"table ip {NFT_TABLE} {{\n  chain prerouting {{\n"
            "    type filter hook prerouting priority mangle; policy accept;\n"
            f"    meta l4proto tcp socket transparent 1 meta mark set {MARK:#x} accept\n"
            f"{rules}\n  }}\n}}\n")


def install_nft(bench: BenchLab, ns: str, pods: Sequence[tuple[str, str]]) -> float:
    t0 = time.perf_counter()
    bench.run(ns, ["nft", "-f", "-"], stdin=nft_ruleset(pods), timeout=300)
    return time.perf_counter() - t0


def remove_nft(bench: BenchLab, ns: str) -> None:
    bench.run(ns, ["nft", "delete", "table", "ip", NFT_TABLE], check=False)
