"""Prometheus metrics (names from the handbook, §5), in a registry per app.

Gauges and counters mirror the scheduler's ``SchedulerStats`` (its totals are the counters), read
by a custom collector at scrape time; latency histograms are observed here in the gateway.
"""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from shared.messages import SchedulerStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_GAUGES = {  # metric -> (stats field, help)
    "pagedserve:num_requests_running": ("num_running", "Requests in the running batch"),
    "pagedserve:num_requests_waiting": ("num_waiting", "Requests waiting to be scheduled"),
    "pagedserve:num_requests_swapped": ("num_swapped", "Requests swapped out to host memory"),
    "pagedserve:kv_cache_usage_perc": ("kv_cache_usage", "Fraction of KV cache blocks in use (0-1)"),
    "pagedserve:num_free_blocks": ("num_free_blocks", "KV cache blocks on the free list"),
    "pagedserve:num_total_blocks": ("num_blocks", "KV cache blocks in the pool"),
    "pagedserve:executor_ready": ("executor_ready", "1 while an executor is ready (0 while loading or recovering)"),
}
_COUNTERS = {
    "pagedserve:prefix_cache_queries_total": ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache"),
    "pagedserve:prefix_cache_hits_total": ("prefix_cache_hits", "Prompt tokens found in the prefix cache"),
    "pagedserve:num_preemptions_total": ("num_preemptions", "Preemptions of running sequences"),
    "pagedserve:prompt_tokens_total": ("prompt_tokens", "Prompt tokens processed"),
    "pagedserve:generation_tokens_total": ("generation_tokens", "Tokens generated"),
}


class _SchedulerCollector:
    def __init__(self, get_stats: Callable[[], SchedulerStats], model_name: str):
        self.get_stats, self.model_name = get_stats, model_name

    def collect(self):
        stats = self.get_stats()
        for name, (field, doc) in _GAUGES.items():
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self.model_name], float(getattr(stats, field)))
            yield g
        for name, (field, doc) in _COUNTERS.items():
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric([self.model_name], float(getattr(stats, field)))
            yield c


class GatewayMetrics:
    def __init__(self, get_stats: Callable[[], SchedulerStats], model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_SchedulerCollector(get_stats, model_name))
        kw = dict(labelnames=["model_name"], registry=self.registry)
        self.ttft = Histogram(
            "pagedserve:time_to_first_token_seconds", "Time from arrival to the first generated token",
            buckets=[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                     5.0, 7.5, 10.0, 20.0, 40.0, 80.0], **kw).labels(model_name)
        self.itl = Histogram(
            "pagedserve:inter_token_latency_seconds", "Time between consecutive tokens of a sample",
            buckets=[0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                     2.5, 5.0], **kw).labels(model_name)
        self.e2e = Histogram(
            "pagedserve:e2e_request_latency_seconds", "Time from arrival to the last token",
            buckets=[0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                     50.0, 60.0, 120.0, 240.0], **kw).labels(model_name)
        self.requests = Counter("pagedserve:request_success", "Finished requests by finish reason",
                                labelnames=["model_name", "finished_reason"], registry=self.registry)

    def timer(self) -> "RequestTimer":
        return RequestTimer(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latency bookkeeping of one request (all its samples)."""

    def __init__(self, metrics: GatewayMetrics):
        self.m = metrics
        self.start = time.perf_counter()
        self.first = True
        self.last: dict[int, float] = {}

    def on_tokens(self, index: int, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        now = time.perf_counter()
        if self.first:
            self.m.ttft.observe(now - self.start)
            self.first = False
        prev = self.last.get(index)
        if prev is not None:
            for _ in range(num_tokens):          # tokens that arrived together share the gap
                self.m.itl.observe((now - prev) / num_tokens)
        self.last[index] = now

    def on_finish(self, finish_reason: str) -> None:
        self.m.e2e.observe(time.perf_counter() - self.start)
        self.m.requests.labels(self.m.model_name, finish_reason).inc()
