"""Scenario ``redirect``: how pod traffic gets into the tunnel.

One lab, tunnels in plain mode (pass-through TCP relay); client n1-a, server
n2-a on the other node. n2-a is never enrolled, so the destination side is
direct for every variant and only the capture on node1 differs. Variants,
alternated once per repetition:

- ``direct``           n1-a unenrolled, no rules: no capture, no tunnel.
- ``ebpf``             n1-a enrolled: meshagent's tc programs + bpf_sk_assign.
- ``iptables-tproxy``  n1-a unenrolled; iptables (nf_tables backend) mangle
  PREROUTING in node1: ``-m socket --transparent`` divert, then
  ``-i <veth> -s <pod ip> -p tcp -j TPROXY --on-port 15001 --tproxy-mark 1``;
  ``ip rule fwmark 1 lookup 133`` + ``local default dev lo table 133``.
- ``nftables-tproxy``  the same in nft: ``socket transparent 1`` divert, then
  ``tproxy to :15001 meta mark set 1``.

Throughput with iperf3's default 128 KiB writes and with 1 KiB writes.
"""

from __future__ import annotations

from agent.bench.labctl import BenchLab
from agent.bench.scenarios import capture
from agent.bench.scenarios.common import Context, Target, measure, start_servers

NAME = "redirect"
VARIANTS = ("direct", "ebpf", "iptables-tproxy", "nftables-tproxy")


def run(ctx: Context) -> None:
    p = ctx.params
    with BenchLab("plain", ctx.log_dir) as bench:
        ctx.labs.append(bench.prefix)
        ctx.progress(NAME, f"lab {bench.prefix} up")
        node = bench.node_ns("node1")
        client = bench.pod("n1-a")
        pods = [(client.host_ifname, client.ipv4)]
        bench.set_enrolled(("n2-a",), False)
        start_servers(bench, bench.pod("n2-a").netns)
        capture.install_policy_routing(bench, node)
        target = Target(client.netns, bench.pod("n2-a").ipv4, bench.pod("n2-a").netns)
        for rep in range(p.reps):
            for variant in VARIANTS:
                ctx.progress(NAME, f"rep {rep + 1}/{p.reps} {variant}")
                bench.set_enrolled(("n1-a",), variant == "ebpf")
                try:
                    if variant == "iptables-tproxy":
                        capture.install_iptables(bench, node, pods)
                    elif variant == "nftables-tproxy":
                        capture.install_nft(bench, node, pods)
                    measure(ctx, bench, NAME, variant, rep, target,
                            ("tput_gbps", "tput_1k_gbps", "lat", "conn_per_s"),
                            via_tunnel=variant != "direct")
                finally:
                    if variant == "iptables-tproxy":
                        capture.remove_iptables(bench, node)
                    elif variant == "nftables-tproxy":
                        capture.remove_nft(bench, node)
