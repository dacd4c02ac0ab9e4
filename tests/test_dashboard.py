"""docs/grafana/pagedserve.json queries only what /metrics exports: every series name in every
panel and variable query is a sample name of a real scrape (a gateway's metrics over a scheduler
that ran a preempting workload), ``rate`` is taken of counters and histogram parts only, and
``_bucket`` series only feed ``histogram_quantile``."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.gateway.metrics import GatewayMetrics
from tests.test_paging_metrics import _drive

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana" / "pagedserve.json"
SERIES = re.compile(r"pagedserve:[a-zA-Z0-9_:]+")


@pytest.fixture(scope="module")
def scrape() -> dict[str, str]:
    """sample name -> its family's type, from one real render with every family populated."""
    sched, _, _ = _drive("swap", num_blocks=40, num_host_blocks=24)
    metrics = GatewayMetrics(lambda: [("0", sched.stats())], "m")
    timer = metrics.timer()
    timer.on_tokens(0, 1)
    timer.on_tokens(0, 2)
    timer.on_finish("stop")
    types = {}
    for fam in text_string_to_metric_families(metrics.render().decode()):
        for s in fam.samples:
            types[s.name] = fam.type
    return types


def _queries(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_every_series_the_dashboard_queries_is_exported(scrape):
    dash = json.loads(DASHBOARD.read_text())
    queries = _queries(dash)
    assert len(dash["panels"]) >= 10 and queries
    used = {name for q in queries for name in SERIES.findall(q)}
    missing = sorted(used - set(scrape))
    assert not missing, f"the dashboard queries series /metrics does not export: {missing}"
    # what the issue asks the dashboard to show is there
    for name in ("prefix_cache_evictions_total", "recomputed_tokens_total", "swapped_out_blocks_total",
                 "num_repeat_preemptions_total", "request_queue_time_seconds_bucket", "iteration_tokens_bucket",
                 "kv_cache_usage_perc", "time_to_first_token_seconds_bucket"):
        assert f"pagedserve:{name}" in used, name


def test_rates_are_of_counters_and_buckets_feed_quantiles(scrape):
    for q in _queries(json.loads(DASHBOARD.read_text())):
        for m in re.finditer(r"rate\((pagedserve:[a-zA-Z0-9_:]+)", q):
            assert scrape[m.group(1)] in ("counter", "histogram"), f"rate of a {scrape[m.group(1)]}: {q}"
        for name in SERIES.findall(q):
            if name.endswith("_bucket"):
                assert q.startswith("histogram_quantile(") and "by (le)" in q, q
        assert q.count("(") == q.count(")"), q


def test_the_checker_catches_a_misnamed_series(scrape):
    assert "pagedserve:prefix_cache_evictions" not in scrape        # the counter is exported with _total
    assert "pagedserve:prefix_cache_evictions_total" in scrape
