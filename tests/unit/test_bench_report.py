"""Unit tests of the benchmark's pure side: statistics, tables, targets."""

from __future__ import annotations

import pytest

from agent.bench import report
from agent.bench.report import Sample, aggregate, evaluate_targets, percentile, render_table


def test_percentile_matches_linear_interpolation() -> None:
    data = [1.0, 2.0, 3.0, 4.0]
    assert percentile(data, 0) == 1.0
    assert percentile(data, 100) == 4.0
    assert percentile(data, 50) == 2.5
    assert percentile(data, 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input


@pytest.mark.parametrize("bad", [-1, 101])
def test_percentile_rejects_out_of_range(bad: float) -> None:
    with pytest.raises(ValueError):
        percentile([1.0], bad)


def test_percentile_rejects_empty() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)


def _samples(scenario: str, metric: str, variant: str, values: list[float]) -> list[Sample]:
    return [Sample(scenario, metric, variant, i, v) for i, v in enumerate(values)]


def test_aggregate_median_min_max_per_group() -> None:
    s = (_samples("hbone", "tput_gbps", "direct", [3.0, 1.0, 2.0])
         + _samples("hbone", "tput_gbps", "hbone", [0.5]))
    out = aggregate(s)
    assert [(x.variant, x.n, x.median, x.min, x.max) for x in out] == [
        ("direct", 3, 2.0, 1.0, 3.0), ("hbone", 1, 0.5, 0.5, 0.5)]


def test_render_table_rows_columns_and_missing_cells() -> None:
    s = (_samples("redirect", "tput_gbps", "direct", [10.0, 12.0, 11.0])
         + _samples("redirect", "lat_p50_us", "ebpf", [50.0]))
    table = render_table(aggregate(s), "redirect", ["tput_gbps", "lat_p50_us"],
                         ["direct", "ebpf"])
    lines = table.splitlines()
    assert lines[0] == "| variant | throughput [Gbit/s] | RTT p50 [µs] |"
    assert lines[1] == "|---|---:|---:|"
    assert lines[2] == "| direct | 11.00 (10.00-12.00) | - |"
    assert lines[3] == "| ebpf | - | 50 |"


def _redirect(ebpf: dict[str, float], ipt: dict[str, float]) -> list[Sample]:
    out: list[Sample] = []
    for variant, vals in (("ebpf", ebpf), ("iptables-tproxy", ipt)):
        for m, v in vals.items():
            out += _samples("redirect", m, variant, [v])
    return out


def test_redirect_targets_direction_aware() -> None:
    s = _redirect({"tput_gbps": 10, "lat_p50_us": 50, "conn_per_s": 1100},
                  {"tput_gbps": 9, "lat_p50_us": 60, "conn_per_s": 1000})
    res = {r.target: r for r in evaluate_targets(aggregate(s), ["redirect"])}
    tput = res["eBPF vs iptables TPROXY throughput ≥1.0x"]
    assert tput.met is True and tput.measured == "1.11x"
    lat = res["eBPF vs iptables TPROXY RTT p50 ≥1.0x"]
    assert lat.met is True and lat.measured == "1.20x"  # lower latency is better
    conn = res["eBPF vs iptables TPROXY connections/s ≥1.2x"]
    assert conn.met is False and conn.verdict == "**missed**"
    assert res["eBPF vs iptables TPROXY RTT p99 ≥1.0x"].met is None  # not measured


def test_scale_within_three_percent() -> None:
    s = (_samples("scale", "conn_per_s", "ebpf/10", [1000.0])
         + _samples("scale", "conn_per_s", "ebpf/10000", [980.0])
         + _samples("scale", "lat_p50_us", "ebpf/10", [100.0])
         + _samples("scale", "lat_p50_us", "ebpf/10000", [104.0]))
    res = {r.target: r for r in evaluate_targets(aggregate(s), ["scale"])}
    assert res["eBPF 10,000 pods vs 10: connections/s within 3%"].met is True
    assert res["eBPF 10,000 pods vs 10: RTT p50 within 3%"].met is False


def test_hbone_added_latency_and_relay_ratio() -> None:
    s = (_samples("hbone", "lat_p50_us", "direct", [20.0])
         + _samples("hbone", "lat_p50_us", "hbone", [160.0])
         + _samples("hbone", "tput_gbps", "hbone", [0.9])
         + _samples("hbone", "tput_gbps", "tlsrelay", [1.0]))
    res = {r.target: r for r in evaluate_targets(aggregate(s), ["hbone"])}
    assert res["HBONE added p50 ≤150 µs over direct"].met is True
    assert res["HBONE added p50 ≤150 µs over direct"].measured == "140 µs"
    assert res["HBONE throughput ≥0.8x plain Python TLS relay pair"].met is True


def test_enroll_total_scaled_to_thousand_pods() -> None:
    s = (_samples("enroll", "pods", "api", [100.0])
         + _samples("enroll", "enroll_total_s", "api", [0.4])
         + _samples("enroll", "enroll_p99_ms", "api", [12.0]))
    res = evaluate_targets(aggregate(s), ["enroll"])
    assert res[0].met is False  # p99 12 ms > 10 ms
    assert res[1].target.endswith("(scaled from 100)")
    assert res[1].measured == "4.00 s" and res[1].met is True


def test_resources_targets_per_connection_count() -> None:
    s = (_samples("resources", "vcpu_per_krps", "c=1", [0.2])
         + _samples("resources", "rss_mb", "c=1", [70.0]))
    res = evaluate_targets(aggregate(s), ["resources"])
    assert [r.met for r in res] == [True, False]


def test_unmeasured_scenarios_say_so() -> None:
    res = evaluate_targets([], ["resources", "hbone"])
    assert all(r.met is None for r in res)
    assert "not measured" in report.render_targets(res)


def test_services_targets_use_paired_ratios() -> None:
    """The VIP and DNS targets are judged on the median of per-repetition ratios, not on
    the ratio of each variant's median; the spread is reported."""
    s = []
    for rep, (pod_ip, vip) in enumerate([(100, 104), (200, 190), (150, 150)]):
        s += [Sample("services", "conn_per_s", "pod-ip", rep, pod_ip),
              Sample("services", "conn_per_s", "vip", rep, vip),
              Sample("services", "ratio_conn_per_s", "vip/pod-ip", rep, vip / pod_ip)]
    for rep, ratio in enumerate([1.02, 1.10, 0.98]):
        s.append(Sample("services", "ratio_lat_p50_us", "vip/pod-ip", rep, ratio))
    for rep, ratio in enumerate([1.4, 1.6, 1.7]):
        s.append(Sample("services", "ratio_dns_p50_us", "tunnel/direct", rep, ratio))
    res = {r.target: r for r in evaluate_targets(aggregate(s), ["services"])}
    conn = res["VIP vs pod IP: connections/s within 5%"]
    assert conn.met is True
    assert conn.measured == "0.0% better (paired median of 3, range -3.8%..+5.3%)"
    lat = res["VIP vs pod IP: RTT p50 within 5%"]
    assert lat.met is True and lat.measured.startswith("+2.0% worse (paired median of 3")
    dns = res["DNS through the tunnel ≤1.5x direct at p50"]
    assert dns.met is False and dns.measured == "1.60x (paired median of 3, range 1.40-1.70x)"
