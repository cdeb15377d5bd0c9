"""Write ``report.md`` and the PNG plots of a run from its raw results.

Layout per scenario (tables, row order, plot kind) lives in :data:`LAYOUT`;
the numbers come from :mod:`agent.bench.report`. Plotting uses matplotlib's
Agg backend (no display); a missing matplotlib only drops the plots.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.bench import report
from agent.bench.report import Sample, Summary

QUICK_BANNER = ("> **Smoke only, not reported**: `--quick` run (1 repetition, short "
                "durations). Do not quote these numbers.")


@dataclass(frozen=True)
class Layout:
    title: str
    metrics: tuple[str, ...]
    variants: tuple[str, ...] | None = None
    plot: str = "bars"  # bars | scale | enroll | resources


LAYOUT: dict[str, Layout] = {
    "hbone": Layout("HBONE secure overlay (cross-node n1-a → n2-a)",
                    ("tput_gbps", "tput8_gbps", "lat_p50_us", "lat_p99_us", "sp_p50_us",
                     "sp_p99_us", "conn_per_s", "vcpu_per_krps", "rss_mb", "tunnel_conns"),
                    ("direct", "stunnel", "native-hbone", "native-hbone-mt",
                     "native-hbone-1core", "tlsrelay", "ebpf+plain", "hbone")),
    "redirect": Layout("Redirect: eBPF vs iptables/nftables TPROXY (plain tunnel)",
                       ("tput_gbps", "tput_1k_gbps", "lat_p50_us", "lat_p99_us", "conn_per_s",
                        "tunnel_conns"),
                       ("direct", "ebpf", "iptables-tproxy", "nftables-tproxy")),
    "scale": Layout("Scale: 10 / 1,000 / 10,000 pods",
                    ("program_s", "tput_1k_gbps", "lat_p50_us", "lat_p99_us", "conn_per_s",
                     "tunnel_conns"),
                    None, "scale"),
    "enroll": Layout("Enrollment and agent restart",
                     ("pods", "enroll_p50_ms", "enroll_p99_ms", "enroll_total_s",
                      "restart_ready_s", "restart_restored_s", "agent_hwm_mb", "agent_rss_mb"),
                     ("api", "restart"), "enroll"),
    "services": Layout("Services: VIP vs pod IP (n1-a → n2-a, HBONE); DNS via the tunnel",
                       ("lat_p50_us", "lat_p99_us", "conn_per_s", "dns_p50_us", "dns_p99_us",
                        "ratio_conn_per_s", "ratio_lat_p50_us", "ratio_dns_p50_us",
                        "tunnel_conns"),
                       ("pod-ip", "vip", "pod-ip+vip", "dns-direct", "dns-tunnel",
                        "vip/pod-ip", "tunnel/direct")),
    "resources": Layout("HBONE tunnel resources at a fixed request rate",
                        ("rps", "p99_ms", "vcpu_per_krps_n1", "vcpu_per_krps_n2",
                         "vcpu_per_krps_sum", "rss_mb_n1", "rss_mb_n2"),
                        None, "resources"),
    "k8s": Layout("Kubernetes: kubectl label → pods enrolled in the datapath; the model at "
                  "10k pods",
                  ("datapath_label_to_enrolled_s", "anchor_100_pod_add_s",
                   "datapath_unlabel_to_unenrolled_s", "anchor_100_pod_del_s", "kubectl_s",
                   "label_to_enroll_ms", "sync_s", "model_build_s", "model_rss_mb",
                   "model_traced_mb", "model_yaml_write_s", "model_yaml_read_s"),
                  ("100 veth pods", "10k pods, 2k services", "100 pods")),
    # Its own plot (waypoint_models.png) is drawn by the scenario.
    "waypoint": Layout("Waypoints: deployment models (seed 004, scaled) and HAProxy",
                       ("rps", "avg_ms", "p50_ms", "p90_ms", "p99_ms", "error_pct",
                        "waypoint_vcpu_per_krps"), None, "own"),
}


def _samples(raw: dict[str, Any]) -> list[Sample]:
    return [Sample(**s) for s in raw.get("samples", [])]


def scenario_doc(name: str) -> str:
    try:
        mod = importlib.import_module(f"agent.bench.scenarios.{name}")
    except ImportError:
        return ""
    doc = (mod.__doc__ or "").strip()
    return "\n".join(doc.splitlines()[2:]).strip() if "\n" in doc else ""


def write_report(out: Path, raw: dict[str, Any]) -> Path:
    """Render ``report.md`` (and plots) into ``out``; returns the report path."""
    samples = _samples(raw)
    summaries = report.aggregate(samples)
    quick = bool(raw.get("params", {}).get("quick"))
    scenarios: Sequence[str] = raw.get("scenarios", [])
    lines = ["# meshagent benchmark report", ""]
    if quick:
        lines += [QUICK_BANNER, ""]
    reps = raw.get("params", {}).get("reps")
    lines += [f"Scenarios: {', '.join(scenarios)}; repetitions: {reps}; total "
              f"{raw.get('total_seconds', '?')} s. Cells are `median (min-max)` over the "
              "repetitions; variants alternate within every repetition.", "",
              "## Machine", "", report.render_facts(raw.get("facts", {})), "",
              "## Targets", "",
              report.render_targets(report.evaluate_targets(summaries, scenarios)), ""]
    for name in scenarios:
        layout = LAYOUT.get(name)
        if layout is None:
            continue
        lines += [f"## {layout.title}", ""]
        st = raw.get("status", {}).get(name, {})
        if st and not st.get("ok"):
            lines += [f"**Scenario did not complete**: {st.get('error')}", ""]
        if st:
            lines += [f"_{st.get('seconds', '?')} s; load average at its end: "
                      f"{st.get('load average at end', '?')}_", ""]
        doc = scenario_doc(name)
        if doc:
            lines += [doc, ""]
        variants = layout.variants
        if variants is not None:
            seen = {s.variant for s in summaries if s.scenario == name}
            variants = tuple(v for v in variants if v in seen)
        lines += [report.render_table(summaries, name, layout.metrics, variants), ""]
        for png in plot(out, name, layout, summaries, samples):
            lines += [f"![{name}]({png})", ""]
        notes = raw.get("notes", {}).get(name, [])
        if notes:
            lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# -- plots ---------------------------------------------------------------------


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(out: Path, name: str, layout: Layout, summaries: Sequence[Summary],
         samples: Sequence[Sample]) -> list[str]:
    """Draw the scenario's plots; return their file names (relative to ``out``)."""
    plt = _pyplot()
    mine = [s for s in summaries if s.scenario == name]
    if plt is None or not mine:
        return []
    if layout.plot == "scale":
        return [_plot_scale(plt, out, name, layout, mine)]
    if layout.plot == "enroll":
        return [p for p in (_plot_enroll(plt, out, name, samples),) if p]
    if layout.plot == "resources":
        return [_plot_resources(plt, out, name, mine)]
    if layout.plot == "own":
        return [p.name for p in sorted(out.glob(f"{name}_*.png"))]
    return [_plot_bars(plt, out, name, layout, mine)]


def _grid(plt: Any, n: int) -> tuple[Any, list[Any]]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _plot_bars(plt: Any, out: Path, name: str, layout: Layout,
               mine: Sequence[Summary]) -> str:
    metrics = [m for m in layout.metrics if any(s.metric == m for s in mine)]
    fig, axes = _grid(plt, len(metrics))
    for ax, m in zip(axes, metrics, strict=True):
        rows = [s for v in (layout.variants or ()) for s in mine
                if s.metric == m and s.variant == v] or [s for s in mine if s.metric == m]
        xs = range(len(rows))
        meds = [r.median for r in rows]
        err = [[r.median - r.min for r in rows], [r.max - r.median for r in rows]]
        ax.bar(xs, meds, yerr=err, capsize=4, color="#4878a8")
        ax.set_xticks(list(xs), [r.variant for r in rows], rotation=20, ha="right")
        meta = report.metric(m)
        ax.set_title(f"{meta.label} [{meta.unit}]", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(layout.title + " — median, whiskers min/max", fontsize=10)
    fig.tight_layout()
    fname = f"{name}.png"
    fig.savefig(out / fname, dpi=90)
    plt.close(fig)
    return fname


def _plot_scale(plt: Any, out: Path, name: str, layout: Layout,
                mine: Sequence[Summary]) -> str:
    metrics = [m for m in layout.metrics if any(s.metric == m for s in mine)]
    fig, axes = _grid(plt, len(metrics))
    kinds = list(dict.fromkeys(s.variant.split("/")[0] for s in mine))
    for ax, m in zip(axes, metrics, strict=True):
        for kind in kinds:
            pts = sorted((int(s.variant.split("/")[1]), s) for s in mine
                         if s.metric == m and s.variant.split("/")[0] == kind)
            if not pts:
                continue
            xs = [x for x, _ in pts]
            lo = [s.median - s.min for _, s in pts]
            hi = [s.max - s.median for _, s in pts]
            ax.errorbar(xs, [s.median for _, s in pts], yerr=[lo, hi], marker="o", capsize=3,
                        label=kind)
        ax.set_xscale("log")
        meta = report.metric(m)
        ax.set_title(f"{meta.label} [{meta.unit}]", fontsize=10)
        ax.set_xlabel("pods")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(layout.title, fontsize=10)
    fig.tight_layout()
    fname = f"{name}.png"
    fig.savefig(out / fname, dpi=90)
    plt.close(fig)
    return fname


def _plot_enroll(plt: Any, out: Path, name: str, samples: Sequence[Sample]) -> str | None:
    lat = [x for s in samples if s.scenario == name and s.metric == "enroll_total_s"
           for x in s.extra.get("latencies_ms", [])]
    if not lat:
        return None
    lat.sort()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))])
    ax1.set_xlabel("pod_add latency [ms]")
    ax1.set_ylabel("CDF")
    ax1.axvline(10, color="red", ls="--", lw=1, label="target p99 10 ms")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    seq = [x for s in samples if s.scenario == name and s.metric == "enroll_total_s"
           for x in s.extra.get("latencies_ms", [])]
    ax2.plot(range(1, len(seq) + 1), seq, lw=0.6)
    ax2.set_xlabel("pod number (enrollment order)")
    ax2.set_ylabel("latency [ms]")
    ax2.grid(alpha=0.3)
    fig.suptitle("Enrollment latency via the agent API", fontsize=10)
    fig.tight_layout()
    fname = f"{name}.png"
    fig.savefig(out / fname, dpi=90)
    plt.close(fig)
    return fname


def _plot_resources(plt: Any, out: Path, name: str, mine: Sequence[Summary]) -> str:
    variants = list(dict.fromkeys(s.variant for s in mine))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, metrics in zip(axes, (("vcpu_per_krps_n1", "vcpu_per_krps_n2"),
                                  ("rss_mb_n1", "rss_mb_n2"), ("rps",)), strict=True):
        width = 0.8 / len(metrics)
        for i, m in enumerate(metrics):
            vals = [report.find(mine, name, m, v) for v in variants]
            xs = [k + i * width for k in range(len(variants))]
            ax.bar(xs, [v.median if v else 0 for v in vals], width,
                   yerr=[[v.median - v.min if v else 0 for v in vals],
                         [v.max - v.median if v else 0 for v in vals]],
                   capsize=3, label=report.metric(m).label)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(variants))], variants)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].axhline(0.3, color="red", ls="--", lw=1)
    axes[0].set_title("vCPU per 1,000 RPS", fontsize=10)
    axes[1].axhline(60, color="red", ls="--", lw=1)
    axes[1].set_title("RSS [MB]", fontsize=10)
    axes[2].set_title("achieved RPS", fontsize=10)
    fig.suptitle("HBONE tunnel resources at a fixed offered rate", fontsize=10)
    fig.tight_layout()
    fname = f"{name}.png"
    fig.savefig(out / fname, dpi=90)
    plt.close(fig)
    return fname
