"""Scenario ``scale``: does capture get slower with 10, 1,000, 10,000 pods?

One lab, tunnels in plain mode, client n1-a -> server n2-a (n2-a not
enrolled, as in ``redirect``). For each size N, variants alternate once per
repetition:

- ``ebpf/N``      n1-a enrolled through the API, plus N minus the pods already
  enrolled on node1 fake pods written straight into the agent's BPF maps
  (``agent.bench.bpfmaps``: the ``ma_pods`` and ``ma_pod_addrs`` entries
  enrollment writes, for interfaces that do not exist). Time to program =
  writing those entries (raw map updates; the API's own enrollment cost is
  the ``enroll`` scenario).
- ``iptables/N``  n1-a unenrolled; N per-pod TPROXY rules
  (``-i <veth> -s <ip>``) in one chain, the measured pod's rule LAST (worst
  case, linear rule evaluation for its new connections), behind the usual
  ``-m socket --transparent`` divert rule. Time to program =
  ``iptables-restore --noflush`` of the whole chain.
- ``ipset/N``     the same with one rule matching an ``hash:ip`` ipset of N
  addresses. Time to program = ``ipset restore`` + ``iptables-restore``.

Each variant's state is installed before and removed after its measurement,
so the others never see it. Measured: throughput with 1 KiB writes, RTT, and
connections/s (the metric where per-packet rule walks show: every SYN of a
new connection walks the chain; established flows hit the divert rule first).
"""

from __future__ import annotations

from agent.api import client
from agent.bench import bpfmaps
from agent.bench.labctl import BenchLab
from agent.bench.scenarios import capture
from agent.bench.scenarios.common import Context, Target, measure, start_servers

NAME = "scale"
KINDS = ("ebpf", "iptables", "ipset")


def _fake_rules(n: int) -> list[tuple[str, str]]:
    out = []
    for i in range(n):
        _, ip = bpfmaps.fake_pod(i)
        out.append((f"fk{i}", ip))
    return out


def run(ctx: Context) -> None:
    p = ctx.params
    with BenchLab("plain", ctx.log_dir) as bench:
        ctx.labs.append(bench.prefix)
        ctx.progress(NAME, f"lab {bench.prefix} up")
        node = bench.node_ns("node1")
        client_pod = bench.pod("n1-a")
        bench.set_enrolled(("n2-a",), False)
        bench.set_enrolled(("n1-a",), True)
        enrolled = len(client.call(bench.sock("node1"), {"op": "pod_list"}))
        start_servers(bench, bench.pod("n2-a").netns)
        capture.install_policy_routing(bench, node)
        target = Target(client_pod.netns, bench.pod("n2-a").ipv4, bench.pod("n2-a").netns)
        real = (client_pod.host_ifname, client_pod.ipv4)
        for size in p.scale_sizes:
            fake = max(0, size - enrolled)
            rules = [*_fake_rules(size - 1), real]
            for rep in range(p.reps):
                for kind in KINDS:
                    variant = f"{kind}/{size}"
                    ctx.progress(NAME, f"size {size} rep {rep + 1}/{p.reps} {kind}")
                    bench.set_enrolled(("n1-a",), kind == "ebpf")
                    agent_pid = bench.pid("node1", "agent")
                    try:
                        if kind == "ebpf":
                            secs = bpfmaps.add_fake_pods(agent_pid, fake)
                            entries = bpfmaps.count_entries(agent_pid, "ma_pods")
                            ctx.add(NAME, "program_s", variant, rep, secs, map_entries=entries)
                            if entries < size:
                                ctx.note(NAME, f"{variant}: only {entries} ma_pods entries")
                        else:
                            secs = capture.install_iptables(bench, node, rules,
                                                            use_ipset=kind == "ipset")
                            ctx.add(NAME, "program_s", variant, rep, secs)
                        measure(ctx, bench, NAME, variant, rep, target,
                                ("tput_1k_gbps", "lat", "conn_per_s"),
                                tput_seconds=p.scale_tput_seconds, via_tunnel=True)
                    finally:
                        if kind == "ebpf":
                            bpfmaps.remove_fake_pods(agent_pid, fake)
                        else:
                            capture.remove_iptables(bench, node, use_ipset=kind == "ipset")
