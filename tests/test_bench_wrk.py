"""How the warm-path benchmark reads wrk's report (bench/wrk.py), without running wrk."""

from __future__ import annotations

import math

import pytest

from bench.wrk import WrkError, parse_report, post_script

CLEAN = """\
Running 10s test @ http://127.0.0.1:18872/v1/functions/noop-c16/invoke
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     6.91ms    2.16ms  27.00ms   81.19%
    Req/Sec     1.17k   123.11     1.33k    55.00%
  Latency Distribution
     50%  835.00us
     75%    1.23ms
     90%    1.60ms
     99%    1.02s
  23250 requests in 10.01s, 3.22MB read
Requests/sec:   2322.68
Transfer/sec:    328.51KB
"""

WITH_ERRORS = """\
Running 1m test @ http://127.0.0.1:9000/
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   120.00us   50.00us   2.00ms   90.00%
    Req/Sec     8.00k   500.00     9.00k    70.00%
  Latency Distribution
     50%  110.00us
     75%  130.00us
     90%  150.00us
     99%  300.00us
  480000 requests in 1.00m, 52.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 1200
Requests/sec:   8000.00
Transfer/sec:    887.47KB
"""


def test_latency_distribution_is_read_in_milliseconds_whatever_the_unit() -> None:
    result = parse_report(CLEAN)
    assert result.p50_ms == pytest.approx(0.835)
    assert result.percentile_ms(75) == pytest.approx(1.23)
    assert result.p99_ms == pytest.approx(1020.0)
    assert math.isnan(result.percentile_ms(99.9))  # not printed by wrk: unknown, not zero


def test_throughput_counts_only_successful_answers() -> None:
    clean = parse_report(CLEAN)
    assert (clean.requests, clean.errors) == (23250, 0)
    assert clean.ok_rps == pytest.approx(23250 / 10.01)
    assert clean.rps == pytest.approx(2322.68)

    errors = parse_report(WITH_ERRORS)
    assert errors.duration_s == pytest.approx(60.0)
    assert errors.non_2xx == 1200
    assert errors.socket_errors == {"connect": 0, "read": 2, "write": 0, "timeout": 3}
    assert errors.errors == 1205
    assert errors.ok_rps == pytest.approx((480000 - 1200) / 60.0)  # not wrk's 8000, which counts the 1200


def test_output_without_the_figures_is_refused() -> None:
    with pytest.raises(WrkError):
        parse_report("unable to connect to 127.0.0.1:9:Connection refused\n")
    no_latency = "\n".join(line for line in CLEAN.splitlines() if "%" not in line)
    with pytest.raises(WrkError, match="--latency"):
        parse_report(no_latency)


def test_post_script_quotes_body_and_headers_for_lua() -> None:
    script = post_script('{"a": 1}', {"Content-Type": "application/json"})
    assert 'wrk.method = "POST"' in script
    assert r'wrk.body = "{\"a\": 1}"' in script
    assert 'wrk.headers["Content-Type"] = "application/json"' in script
