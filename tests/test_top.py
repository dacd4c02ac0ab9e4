"""`pagedserve top` on captured /metrics texts: the screen shows the figures the two scrapes imply;
errors and Ctrl-C end it cleanly."""
from __future__ import annotations

import argparse
import math
import urllib.error

import pytest
from rich.console import Console

from services import top
from services.gateway.metrics import GatewayMetrics
from shared.messages import HistogramCounts, SchedulerStats


def _hist(bounds, per_bucket, total_sum):
    cum, run = [], 0
    for c in per_bucket:
        run += c
        cum.append(run)
    return HistogramCounts(list(bounds), cum, total_sum)


def _stats(k: int) -> SchedulerStats:
    """Engine stats at scrape k (0 or 1): counters grow by known amounts between the scrapes."""
    return SchedulerStats(num_running=3 + k, num_waiting=2, num_swapped=1, num_blocks=100, num_free_blocks=40,
                          executor_ready=True, prefix_cache_queries=100 + 200 * k, prefix_cache_hits=10 + 50 * k,
                          prefix_cache_evictions=5 + 8 * k, recomputed_tokens=7 + 30 * k,
                          generation_tokens=1000 + 400 * k, num_preemptions=2 + 4 * k,
                          swapped_out_blocks=10 + 6 * k, swapped_in_blocks=10 + 2 * k,
                          tokens_per_step=_hist((1, 64), (0, 10 + 10 * k, 0), 500.0 + 1000 * k))


def _text(k: int, ttft_obs: list[float]) -> str:
    m = GatewayMetrics(lambda: [("0", _stats(k)), ("1", SchedulerStats(num_blocks=50, num_free_blocks=50))], "m")
    for x in ttft_obs:
        m.ttft.labels("m", "0").observe(x)
    return m.render().decode()


def _screen(prev_text, cur_text, dt=2.0) -> str:
    console = Console(record=True, width=220)
    console.print(top.render(top.Scrape.parse(prev_text, 10.0), top.Scrape.parse(cur_text, 10.0 + dt), "u"))
    return console.export_text()


def test_the_screen_shows_the_state_and_the_rates_of_the_interval():
    screen = _screen(_text(0, [0.03] * 10), _text(1, [0.03] * 10 + [0.3] * 10))
    assert "pagedserve top" in screen
    row0 = [line for line in screen.splitlines() if line.strip("│ ").startswith("0 ")]
    state, rates = row0[0], row0[1]
    assert all(x in state for x in ("4", "2", "1", "60.0%", "40", "ready"))
    # over 2 s: 400 generated tokens, 1000 computed, 30 recomputed, hits 50 of 200 queries,
    # 8 evictions, 4 preemptions, 6 blocks out and 2 in
    for figure in ("200.0", "500.0", "15.0", "25.0%", "4.00", "2.00", "3.0/1.0"):
        assert figure in rates, (figure, rates)
    all_rows = [line for line in screen.splitlines() if line.strip("│ ").startswith("all ")]
    assert all_rows and "1/2" in all_rows[0]           # one of two engines ready


def test_latency_percentiles_come_from_the_interval_then_from_the_start():
    screen = _screen(_text(0, [0.03] * 10), _text(1, [0.03] * 10 + [0.3] * 10))
    ttft = [line for line in screen.splitlines() if "TTFT" in line and line.strip("│ ").startswith("0 ")][0]
    # the interval saw only 0.3 s observations: bucket (0.25, 0.5], p50 interpolated at 375 ms
    assert "interval" in ttft and "375 ms" in ttft
    idle = _screen(_text(1, [0.03] * 10), _text(1, [0.03] * 10))
    ttft = [line for line in idle.splitlines() if "TTFT" in line and line.strip("│ ").startswith("0 ")][0]
    assert "since start" in ttft and "30 ms" in ttft      # (0.02, 0.04]: p50 at 30 ms


def test_quantile_follows_prometheus():
    assert top.quantile({0.1: 0, 0.2: 10, math.inf: 10}, 0.5) == pytest.approx(0.15)
    assert top.quantile({1.0: 5, math.inf: 10}, 0.9) == 1.0      # in +Inf: the last finite bound
    assert math.isnan(top.quantile({1.0: 0, math.inf: 0}, 0.5))


def test_a_text_without_pagedserve_metrics_is_refused():
    with pytest.raises(ValueError, match="no pagedserve: metrics"):
        top.Scrape.parse("# HELP x y\n# TYPE x counter\nx_total 1.0\n", 0.0)


def _args(**kw):
    return argparse.Namespace(**{"url": "http://h:1", "interval": 0.01, "once": False, **kw})


def test_unreachable_and_foreign_urls_are_one_line_errors(monkeypatch, capsys):
    def refuse(url, timeout=5.0):
        raise urllib.error.URLError("connection refused")
    monkeypatch.setattr(top, "fetch", refuse)
    assert top.run(_args()) == 1
    assert "cannot read http://h:1/metrics: connection refused" in capsys.readouterr().err
    monkeypatch.setattr(top, "fetch", lambda url, timeout=5.0: "<html>not metrics</html>\n")
    assert top.run(_args()) == 1
    assert "is it a pagedserve server's /metrics?" in capsys.readouterr().err


def test_ctrl_c_exits_zero(monkeypatch):
    texts = iter([_text(0, []), _text(1, [])])

    def fetch(url, timeout=5.0):
        try:
            return next(texts)
        except StopIteration:
            raise KeyboardInterrupt from None
    monkeypatch.setattr(top, "fetch", fetch)
    assert top.run(_args()) == 0


def test_once_prints_one_screen(monkeypatch, capsys):
    texts = iter([_text(0, []), _text(1, [])])
    monkeypatch.setattr(top, "fetch", lambda url, timeout=5.0: next(texts))
    assert top.run(_args(once=True)) == 0
    out = capsys.readouterr().out
    assert "over the last" in out and "latency" in out
