"""A fixed-bucket histogram kept as plain ints, for the scheduler's per-request and per-step
observations (shipped in ``SchedulerStats``, exported by the gateway as a Prometheus histogram).

``observe`` is one ``bisect`` and two additions; the cumulative form is built only when stats are
asked for.
"""
from __future__ import annotations

from bisect import bisect_left

from shared.messages import HistogramCounts

# upper bounds (le), seconds: request phases span milliseconds (a cache hit) to minutes (a queue)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                   80.0, 160.0, 320.0)
# tokens in one step: one decode token up to a full max_num_batched_tokens prefill
TOKENS_PER_STEP_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class FixedHistogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)      # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1     # le: a value on a bound counts in it
        self.sum += value

    def snapshot(self) -> HistogramCounts:
        cumulative, total = [], 0
        for c in self.counts:
            total += c
            cumulative.append(total)
        return HistogramCounts(list(self.bounds), cumulative, self.sum)
