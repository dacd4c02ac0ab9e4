"""Prometheus metrics (names from the handbook, §5, and docs/OPERATIONS.md), in a registry per app.

Every series carries ``model_name`` and ``engine`` (the scheduler behind it, "0".."N-1" in the
order of ``--scheduler-addr``). Gauges, counters and the scheduler's histograms mirror each
engine's ``SchedulerStats`` (its totals are the counters, its fixed-bucket histograms are exported
as they are), read by a custom collector at scrape time; TTFT, ITL and end-to-end latency as the
client sees them are observed here in the gateway.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from shared.messages import HistogramCounts, SchedulerStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LABELS = ["model_name", "engine"]

_GAUGES = {  # metric -> (stats field, help)
    "pagedserve:num_requests_running": ("num_running", "Requests in the running batch"),
    "pagedserve:num_requests_waiting": ("num_waiting", "Requests waiting to be scheduled"),
    "pagedserve:num_requests_swapped": ("num_swapped", "Requests swapped out to host memory"),
    "pagedserve:kv_cache_usage_perc": ("kv_cache_usage", "Fraction of KV cache blocks in use (0-1)"),
    "pagedserve:num_free_blocks": ("num_free_blocks", "KV cache blocks on the free list"),
    "pagedserve:num_total_blocks": ("num_blocks", "KV cache blocks in the pool"),
    "pagedserve:executor_ready": ("executor_ready", "1 while an executor is ready (0 while loading or recovering)"),
}
_COUNTERS = {  # name without the _total the client adds
    "pagedserve:prefix_cache_queries": ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache"),
    "pagedserve:prefix_cache_hits": ("prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed)"),
    "pagedserve:prefix_cache_evictions": ("prefix_cache_evictions",
                                          "Cached KV blocks taken back for new data (their prefix is lost)"),
    "pagedserve:num_preemptions": ("num_preemptions", "Preemptions of running sequences"),
    "pagedserve:num_repeat_preemptions": ("repeat_preemptions",
                                          "Preemptions of a sequence that had been preempted before"),
    "pagedserve:recomputed_tokens": ("recomputed_tokens",
                                     "Tokens computed again after a recompute preemption or an executor restart"),
    "pagedserve:swapped_out_blocks": ("swapped_out_blocks", "KV blocks copied from device to host memory"),
    "pagedserve:swapped_in_blocks": ("swapped_in_blocks", "KV blocks copied from host back to device memory"),
    "pagedserve:prompt_tokens": ("prompt_tokens", "Prompt tokens processed"),
    "pagedserve:generation_tokens": ("generation_tokens", "Tokens generated"),
}
_HISTOGRAMS = {  # counted by the scheduler on its monotonic clock
    "pagedserve:request_queue_time_seconds": ("queue_time", "Arrival at the scheduler to first scheduled"),
    "pagedserve:request_prefill_time_seconds": ("prefill_time", "First scheduled to the first token"),
    "pagedserve:request_decode_time_seconds": ("decode_time", "First token to the last sample finished"),
    "pagedserve:request_scheduler_time_seconds": ("e2e_time", "Arrival at the scheduler to the last sample finished"),
    "pagedserve:iteration_tokens": ("tokens_per_step", "Tokens computed in one step (prefill chunks and decodes)"),
}


def _buckets(h: HistogramCounts) -> list[tuple[str, float]]:
    return [(repr(float(b)), c) for b, c in zip(h.bounds, h.counts)] + [("+Inf", h.counts[-1])]


class _SchedulerCollector:
    def __init__(self, get_stats: Callable[[], list[tuple[str, SchedulerStats]]], model_name: str):
        self.get_stats, self.model_name = get_stats, model_name

    def collect(self):
        engines = self.get_stats()
        for name, (field, doc) in _GAUGES.items():
            g = GaugeMetricFamily(name, doc, labels=LABELS)
            for engine, stats in engines:
                g.add_metric([self.model_name, engine], float(getattr(stats, field)))
            yield g
        for name, (field, doc) in _COUNTERS.items():
            c = CounterMetricFamily(name, doc, labels=LABELS)
            for engine, stats in engines:
                c.add_metric([self.model_name, engine], float(getattr(stats, field)))
            yield c
        for name, (field, doc) in _HISTOGRAMS.items():
            h = HistogramMetricFamily(name, doc, labels=LABELS)
            for engine, stats in engines:
                counts: Optional[HistogramCounts] = getattr(stats, field)
                if counts is not None:      # an engine not heard from yet has none
                    h.add_metric([self.model_name, engine], _buckets(counts), sum_value=counts.sum)
            yield h


class GatewayMetrics:
    def __init__(self, get_stats: Callable[[], list[tuple[str, SchedulerStats]]], model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_SchedulerCollector(get_stats, model_name))
        kw = dict(labelnames=LABELS, registry=self.registry)
        self.ttft = Histogram(
            "pagedserve:time_to_first_token_seconds", "Time from arrival to the first generated token",
            buckets=[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                     5.0, 7.5, 10.0, 20.0, 40.0, 80.0], **kw)
        self.itl = Histogram(
            "pagedserve:inter_token_latency_seconds", "Time between consecutive tokens of a sample",
            buckets=[0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                     2.5, 5.0], **kw)
        self.e2e = Histogram(
            "pagedserve:e2e_request_latency_seconds", "Time from arrival at the gateway to the last token",
            buckets=[0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                     50.0, 60.0, 120.0, 240.0], **kw)
        self.requests = Counter("pagedserve:request_success", "Finished requests by finish reason",
                                labelnames=LABELS + ["finished_reason"], registry=self.registry)

    def timer(self) -> "RequestTimer":
        return RequestTimer(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latency bookkeeping of one request (all its samples); ``engine`` is set once it is placed."""

    def __init__(self, metrics: GatewayMetrics):
        self.m = metrics
        self.engine = ""
        self.start = time.perf_counter()
        self.first = True
        self.last: dict[int, float] = {}

    def on_tokens(self, index: int, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        now = time.perf_counter()
        labels = (self.m.model_name, self.engine)
        if self.first:
            self.m.ttft.labels(*labels).observe(now - self.start)
            self.first = False
        prev = self.last.get(index)
        if prev is not None:
            itl = self.m.itl.labels(*labels)
            for _ in range(num_tokens):          # tokens that arrived together share the gap
                itl.observe((now - prev) / num_tokens)
        self.last[index] = now

    def on_finish(self, finish_reason: str) -> None:
        self.m.e2e.labels(self.m.model_name, self.engine).observe(time.perf_counter() - self.start)
        self.m.requests.labels(self.m.model_name, self.engine, finish_reason).inc()
