"""Parsing of wrk's report, and the targets table, in the benchmark (loadtests/bench.py)."""

import math

from loadtests.bench import Report, Sample, paired_ratios, parse_wrk, summarise

# wrk 4.x --latency output; both "+/- Stdev" figures end in 50% / 99% on purpose.
REPORT = """Running 10s test @ http://127.0.0.1:8000/v2/models/tabular/infer
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    10.56ms    5.64ms  93.25ms   84.50%
    Req/Sec     6.13k   431.25     6.99k    72.99%
  Latency Distribution
     50%  912.00us
     75%   12.00ms
     90%   15.60ms
     99%    1.20s
  61023 requests in 10.00s, 12.34MB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 4
Requests/sec:   6101.52
Transfer/sec:      1.23MB
"""


def test_parse_wrk_reads_the_latency_distribution_not_the_stdev_column() -> None:
    rps, p50, p99, total, errors = parse_wrk(REPORT)
    assert rps == 6101.52
    assert math.isclose(p50, 0.912)
    assert p99 == 1200.0
    assert total == 61023
    assert errors == 9


def _sample(config: str, round_: int, cpu: float, rps: float) -> Sample:
    return Sample(config, "tabular_b1", 64, round_, rps, 5.0, 10.0, 1000, 0, cpu)


# The floor's rounds drift (100, 200, 150 µs); the appliance costs 1.05x in two rounds and 1.6x
# in one. Medians per configuration would give 210 / 150 = 1.4x: the drift, not the appliance.
SAMPLES = [
    _sample("floor-model", 0, 100.0, 9000.0),
    _sample("appliance", 0, 105.0, 8000.0),
    _sample("floor-model", 1, 200.0, 5000.0),
    _sample("appliance", 1, 210.0, 4000.0),
    _sample("floor-model", 2, 150.0, 6000.0),
    _sample("appliance", 2, 240.0, 6000.0),
    _sample("appliance", 3, 90.0, 9000.0),  # a round without the floor pairs with nothing
]


def test_paired_ratios_pair_configurations_within_each_round() -> None:
    ratios = paired_ratios(
        SAMPLES, "tabular_b1", 64, "appliance", "floor-model", "cpu_us_per_request"
    )
    assert [round(r, 6) for r in ratios] == [1.05, 1.05, 1.6]
    assert paired_ratios(SAMPLES, "mlp_b1", 64, "appliance", "floor-model", "rps") == []


def test_summary_states_each_target_from_paired_ratios() -> None:
    report = Report("now", {"cores": 2}, {"duration_s": 1, "rounds": 4}, samples=SAMPLES)
    markdown, summary = summarise(report)
    assert "| tabular_b1 | CPU/req x floor-model | ≤ 1.1 | 1.05 (1.05-1.60) met |" in markdown
    # req/s: 8000/9000, 4000/5000, 6000/6000 -> median 0.89, under the 0.9 target.
    assert "| tabular_b1 | req/s x floor-model | ≥ 0.9 | 0.89 (0.80-1.00) missed |" in markdown
    targets = markdown.split("## Targets")[1].split("\n## ")[0]
    assert "x FastAPI" not in targets  # no FastAPI runs, so no such row
    cpu = next(t for t in summary["targets"] if t["measure"] == "CPU/req x floor-model")
    assert cpu["config"] == "appliance"
    assert cpu["met"] is True
    assert math.isclose(cpu["median"], 1.05)
