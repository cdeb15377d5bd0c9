"""Pure side of the benchmark: statistics, aggregation, markdown tables and
target evaluation. Nothing here touches the kernel, processes or files.

A run produces :class:`Sample` records (one value of one metric for one
variant in one repetition). :func:`aggregate` groups them into
:class:`Summary` rows (median, min, max over repetitions);
:func:`render_table` turns summaries into a markdown table and
:func:`evaluate_targets` checks the project's performance targets against them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile (numpy's default) of ``values``; 0 <= pct <= 100."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile {pct} outside 0..100")
    data = sorted(values)
    if len(data) == 1:
        return float(data[0])
    rank = (len(data) - 1) * pct / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(data) - 1)
    frac = rank - lo
    return float(data[lo] + (data[hi] - data[lo]) * frac)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


@dataclass(frozen=True)
class Metric:
    """What a number means: its unit and which direction is better."""

    name: str
    label: str
    unit: str
    higher_is_better: bool
    fmt: str = "{:.1f}"


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("tput_gbps", "throughput", "Gbit/s", True, "{:.2f}"),
    Metric("tput_1k_gbps", "throughput 1 KiB writes", "Gbit/s", True, "{:.3f}"),
    Metric("tput8_gbps", "throughput, 8 streams", "Gbit/s", True, "{:.2f}"),
    Metric("sp_p50_us", "sockperf one-way p50", "µs", False, "{:.1f}"),
    Metric("sp_p99_us", "sockperf one-way p99", "µs", False, "{:.1f}"),
    Metric("lat_p50_us", "RTT p50", "µs", False, "{:.0f}"),
    Metric("lat_p99_us", "RTT p99", "µs", False, "{:.0f}"),
    Metric("conn_per_s", "connections/s", "conn/s", True, "{:.0f}"),
    Metric("program_s", "time to program", "s", False, "{:.3f}"),
    Metric("enroll_p50_ms", "enroll p50", "ms", False, "{:.2f}"),
    Metric("enroll_p99_ms", "enroll p99", "ms", False, "{:.2f}"),
    Metric("enroll_total_s", "enroll all", "s", False, "{:.2f}"),
    Metric("restart_ready_s", "restart: API answers", "s", False, "{:.2f}"),
    Metric("restart_restored_s", "restart: all pods restored", "s", False, "{:.2f}"),
    Metric("agent_hwm_mb", "agent peak RSS", "MB", False, "{:.1f}"),
    Metric("agent_rss_mb", "agent steady RSS", "MB", False, "{:.1f}"),
    Metric("rps", "achieved RPS", "req/s", True, "{:.0f}"),
    Metric("vcpu_per_krps", "max tunnel vCPU per 1k RPS", "vCPU", False, "{:.3f}"),
    Metric("vcpu_per_krps_n1", "node1 tunnel vCPU per 1k RPS", "vCPU", False, "{:.3f}"),
    Metric("vcpu_per_krps_n2", "node2 tunnel vCPU per 1k RPS", "vCPU", False, "{:.3f}"),
    Metric("vcpu_per_krps_sum", "both tunnels vCPU per 1k RPS", "vCPU", False, "{:.3f}"),
    Metric("rss_mb", "max tunnel RSS", "MB", False, "{:.1f}"),
    Metric("rss_mb_n1", "node1 tunnel RSS", "MB", False, "{:.1f}"),
    Metric("rss_mb_n2", "node2 tunnel RSS", "MB", False, "{:.1f}"),
    Metric("pods", "pods", "", True, "{:.0f}"),
    Metric("tunnel_conns", "conns seen by node1 tunnel", "", True, "{:.0f}"),
    Metric("p99_ms", "HTTP p99", "ms", False, "{:.2f}"),
    Metric("avg_ms", "HTTP average", "ms", False, "{:.2f}"),
    Metric("p50_ms", "HTTP p50", "ms", False, "{:.2f}"),
    Metric("p90_ms", "HTTP p90", "ms", False, "{:.2f}"),
    Metric("error_pct", "errors", "%", False, "{:.2f}"),
    Metric("waypoint_vcpu_per_krps", "waypoint vCPU per 1k RPS", "vCPU", False, "{:.3f}"),
    Metric("dns_p50_us", "DNS query p50", "µs", False, "{:.0f}"),
    Metric("dns_p99_us", "DNS query p99", "µs", False, "{:.0f}"),
    # services: one repetition's variant / baseline, measured back to back (paired).
    Metric("ratio_conn_per_s", "connections/s ratio, paired", "x", True, "{:.3f}"),
    Metric("ratio_lat_p50_us", "RTT p50 ratio, paired", "x", False, "{:.3f}"),
    Metric("ratio_dns_p50_us", "DNS p50 ratio, paired", "x", False, "{:.3f}"),
)}


def metric(name: str) -> Metric:
    return METRICS.get(name) or Metric(name, name, "", True)


@dataclass(frozen=True)
class Sample:
    """One measured value: ``scenario``/``metric``/``variant`` in repetition ``rep``."""

    scenario: str
    metric: str
    variant: str
    rep: int
    value: float
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Summary:
    scenario: str
    metric: str
    variant: str
    n: int
    median: float
    min: float
    max: float

    def cell(self) -> str:
        f = metric(self.metric).fmt
        if self.n == 1 or self.min == self.max:
            return f.format(self.median)
        return f"{f.format(self.median)} ({f.format(self.min)}-{f.format(self.max)})"


def aggregate(samples: Iterable[Sample]) -> list[Summary]:
    """Median/min/max per (scenario, metric, variant), in first-seen order."""
    groups: dict[tuple[str, str, str], list[float]] = {}
    for s in samples:
        if s.value is None or (isinstance(s.value, float) and math.isnan(s.value)):
            continue
        groups.setdefault((s.scenario, s.metric, s.variant), []).append(float(s.value))
    return [Summary(sc, m, v, len(vals), median(vals), min(vals), max(vals))
            for (sc, m, v), vals in groups.items()]


def find(summaries: Iterable[Summary], scenario: str, metric_name: str,
         variant: str) -> Summary | None:
    for s in summaries:
        if (s.scenario, s.metric, s.variant) == (scenario, metric_name, variant):
            return s
    return None


def render_table(summaries: Sequence[Summary], scenario: str, metrics: Sequence[str],
                 variants: Sequence[str] | None = None, first_column: str = "variant") -> str:
    """Markdown table: one row per variant, one column per metric.

    Cells read ``median (min-max)``; a dash marks a value that was not measured.
    ``variants`` fixes the row order (default: first-seen order).
    """
    mine = [s for s in summaries if s.scenario == scenario]
    if variants is None:
        variants = list(dict.fromkeys(s.variant for s in mine))
    header = [first_column] + [f"{metric(m).label} [{metric(m).unit}]" for m in metrics]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * len(metrics)) + "|"]
    for v in variants:
        cells = [v]
        for m in metrics:
            s = find(mine, scenario, m, v)
            cells.append(s.cell() if s else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- targets -------------------------------------------------------------------


@dataclass(frozen=True)
class TargetResult:
    target: str
    measured: str
    met: bool | None  # None: not measured

    @property
    def verdict(self) -> str:
        return {True: "met", False: "**missed**", None: "not measured"}[self.met]


def _val(summaries: Sequence[Summary], scenario: str, m: str, variant: str) -> float | None:
    s = find(summaries, scenario, m, variant)
    return s.median if s else None


def speedup(summaries: Sequence[Summary], scenario: str, m: str, variant: str,
            baseline: str) -> float | None:
    """How many times better ``variant`` is than ``baseline`` (>1 = better), by medians."""
    a, b = _val(summaries, scenario, m, variant), _val(summaries, scenario, m, baseline)
    if a is None or b is None or a <= 0 or b <= 0:
        return None
    return a / b if metric(m).higher_is_better else b / a


def _ratio_target(summaries: Sequence[Summary], label: str, scenario: str, m: str,
                  variant: str, baseline: str, minimum: float) -> TargetResult:
    r = speedup(summaries, scenario, m, variant, baseline)
    if r is None:
        return TargetResult(label, "not measured", None)
    return TargetResult(label, f"{r:.2f}x", r >= minimum)


def _within_target(summaries: Sequence[Summary], label: str, scenario: str, m: str,
                   variant: str, baseline: str, tolerance: float) -> TargetResult:
    """``variant`` is at most ``tolerance`` (fraction) worse than ``baseline``."""
    r = speedup(summaries, scenario, m, variant, baseline)
    if r is None:
        return TargetResult(label, "not measured", None)
    worse = 1.0 / r - 1.0  # fraction by which variant is worse (negative: better)
    return TargetResult(label, f"{worse * 100:+.1f}% worse" if worse > 0
                        else f"{-worse * 100:.1f}% better", worse <= tolerance)


def _max_target(summaries: Sequence[Summary], label: str, value: float | None, limit: float,
                unit: str, fmt: str = "{:.2f}") -> TargetResult:
    if value is None:
        return TargetResult(label, "not measured", None)
    return TargetResult(label, f"{fmt.format(value)} {unit}", value <= limit)


TargetRule = Callable[[Sequence[Summary]], list[TargetResult]]


def _redirect_targets(s: Sequence[Summary]) -> list[TargetResult]:
    out = []
    for m, minimum in (("tput_gbps", 1.0), ("tput_1k_gbps", 1.0), ("lat_p50_us", 1.0),
                       ("lat_p99_us", 1.0), ("conn_per_s", 1.2)):
        label = f"eBPF vs iptables TPROXY {metric(m).label} ≥{minimum:.1f}x"
        out.append(_ratio_target(s, label, "redirect", m, "ebpf", "iptables-tproxy", minimum))
    return out


def _scale_targets(s: Sequence[Summary]) -> list[TargetResult]:
    out = []
    for m in ("tput_1k_gbps", "lat_p50_us", "conn_per_s"):
        out.append(_within_target(s, f"eBPF 10,000 pods vs 10: {metric(m).label} within 3%",
                                  "scale", m, "ebpf/10000", "ebpf/10", 0.03))
    return out


def _enroll_targets(s: Sequence[Summary]) -> list[TargetResult]:
    p99 = _val(s, "enroll", "enroll_p99_ms", "api")
    total = _val(s, "enroll", "enroll_total_s", "api")
    pods = _val(s, "enroll", "pods", "api")
    label_total = "1,000 pods enrolled ≤5 s"
    if pods is not None and int(pods) != 1000 and total is not None:
        total = total * 1000 / pods  # scaled to 1,000 (quick runs use fewer)
        label_total += f" (scaled from {int(pods)})"
    return [_max_target(s, "enrollment p99 ≤10 ms via API", p99, 10.0, "ms"),
            _max_target(s, label_total, total, 5.0, "s")]


def _hbone_targets(s: Sequence[Summary]) -> list[TargetResult]:
    h, d = _val(s, "hbone", "lat_p50_us", "hbone"), _val(s, "hbone", "lat_p50_us", "direct")
    added = None if h is None or d is None else h - d
    return [_max_target(s, "HBONE added p50 ≤150 µs over direct", added, 150.0, "µs", "{:.0f}"),
            _ratio_target(s, "HBONE throughput ≥0.8x plain Python TLS relay pair", "hbone",
                          "tput_gbps", "hbone", "tlsrelay", 0.8),
            *_native_targets(s)]


def _native_targets(s: Sequence[Summary]) -> list[TargetResult]:
    """Issue 14's targets for the native HBONE pair, as ratios within one run."""
    out = [_ratio_target(s, "native HBONE throughput ≥0.9x stunnel pair", "hbone",
                         "tput_gbps", "native-hbone", "stunnel", 0.9)]
    for m, label in (("sp_p50_us", "p50"), ("sp_p99_us", "p99")):
        d = _val(s, "hbone", m, "direct")
        n, st = _val(s, "hbone", m, "native-hbone"), _val(s, "hbone", m, "stunnel")
        target = f"native HBONE added one-way {label} ≤1.5x stunnel's (sockperf)"
        if d is None or n is None or st is None or st - d <= 0:
            out.append(TargetResult(target, "not measured", None))
        else:
            ratio = (n - d) / (st - d)
            out.append(TargetResult(target, f"{ratio:.2f}x (+{n - d:.0f} vs +{st - d:.0f} µs)",
                                    ratio <= 1.5))
    out.append(_ratio_target(s, "native HBONE connections/s ≥0.3x direct", "hbone",
                             "conn_per_s", "native-hbone", "direct", 0.3))
    cpu = _val(s, "hbone", "vcpu_per_krps", "native-hbone")
    rss = _val(s, "hbone", "rss_mb", "native-hbone")
    out.append(_max_target(s, "native HBONE ≤0.1 vCPU per 1,000 RPS (per relay)", cpu, 0.1,
                           "vCPU", "{:.3f}"))
    out.append(_max_target(s, "native HBONE ≤40 MB RSS per relay at 1,000 RPS", rss, 40.0,
                           "MB", "{:.1f}"))
    return out


def _resource_targets(s: Sequence[Summary]) -> list[TargetResult]:
    out = []
    variants = [x.variant for x in s if x.scenario == "resources" and x.metric == "vcpu_per_krps"]
    for v in dict.fromkeys(variants):
        cpu = _val(s, "resources", "vcpu_per_krps", v)
        rss = _val(s, "resources", "rss_mb", v)
        out.append(_max_target(s, f"≤0.3 vCPU per 1,000 RPS ({v})", cpu, 0.3, "vCPU", "{:.3f}"))
        out.append(_max_target(s, f"≤60 MB RSS per tunnel at ~1,000 RPS ({v})", rss, 60.0, "MB",
                               "{:.1f}"))
    if not out:
        out = [TargetResult("≤0.3 vCPU and ≤60 MB RSS per 1,000 RPS", "not measured", None)]
    return out


def _paired(s: Sequence[Summary], m: str, variant: str) -> Summary | None:
    return find(s, "services", m, variant)


def _worse(ratio: float, higher_is_better: bool) -> float:
    """The fraction by which a variant is worse than its baseline, from variant/baseline."""
    return (1.0 / ratio - 1.0) if higher_is_better else (ratio - 1.0)


def _services_targets(s: Sequence[Summary]) -> list[TargetResult]:
    """Judged on the median of per-repetition paired ratios (both variants measured back
    to back), with their min-max; by medians of each variant when no pairs exist."""
    out = []
    for m, ratio_name in (("conn_per_s", "ratio_conn_per_s"), ("lat_p50_us", "ratio_lat_p50_us")):
        label = f"VIP vs pod IP: {metric(m).label} within 5%"
        pair = _paired(s, ratio_name, "vip/pod-ip")
        if pair is None:
            out.append(_within_target(s, label, "services", m, "vip", "pod-ip", 0.05))
            continue
        higher = metric(m).higher_is_better
        w = _worse(pair.median, higher)
        lo, hi = sorted((_worse(pair.min, higher), _worse(pair.max, higher)))
        text = f"{w * 100:+.1f}% worse" if w > 0 else f"{abs(w) * 100:.1f}% better"
        out.append(TargetResult(label, f"{text} (paired median of {pair.n}, "
                                       f"range {lo * 100:+.1f}%..{hi * 100:+.1f}%)", w <= 0.05))
    label = "DNS through the tunnel ≤1.5x direct at p50"
    pair = _paired(s, "ratio_dns_p50_us", "tunnel/direct")
    if pair is not None:
        out.append(TargetResult(label, f"{pair.median:.2f}x (paired median of {pair.n}, "
                                       f"range {pair.min:.2f}-{pair.max:.2f}x)",
                                pair.median <= 1.5))
        return out
    tunnel = _val(s, "services", "dns_p50_us", "dns-tunnel")
    direct = _val(s, "services", "dns_p50_us", "dns-direct")
    ratio = None if tunnel is None or direct is None or direct <= 0 else tunnel / direct
    out.append(TargetResult(label, "not measured", None) if ratio is None
               else TargetResult(label, f"{ratio:.2f}x", ratio <= 1.5))
    return out


TARGET_RULES: dict[str, TargetRule] = {
    "hbone": _hbone_targets,
    "redirect": _redirect_targets,
    "scale": _scale_targets,
    "enroll": _enroll_targets,
    "resources": _resource_targets,
    "services": _services_targets,
}


def evaluate_targets(summaries: Sequence[Summary],
                     scenarios: Iterable[str] | None = None) -> list[TargetResult]:
    """Every target of the given scenarios (default: all), met/missed/not measured."""
    out: list[TargetResult] = []
    for name in scenarios if scenarios is not None else TARGET_RULES:
        rule = TARGET_RULES.get(name)
        if rule is not None:
            out.extend(rule(summaries))
    return out


def render_targets(results: Sequence[TargetResult]) -> str:
    lines = ["| target | measured | verdict |", "|---|---:|---|"]
    lines += [f"| {r.target} | {r.measured} | {r.verdict} |" for r in results]
    return "\n".join(lines)


def render_facts(facts: dict[str, Any]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in facts.items()]
    return "\n".join(lines)
