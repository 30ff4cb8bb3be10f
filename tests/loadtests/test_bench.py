"""Parsing of wrk's report in the benchmark (loadtests/bench.py)."""

import math

from loadtests.bench import parse_wrk

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
