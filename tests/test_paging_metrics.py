"""The paging counters (#21): on a small pool with many distinct prefixes and long outputs,
evictions, recomputed tokens, swaps and preemptions rise, and what /metrics exports equals what the
test counts itself from the step plans; on a pool large enough, none of them move. The scheduler
runs in process against the strict fake executor (tests/scheduler_harness.py)."""
from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.gateway.metrics import GatewayMetrics
from shared.messages import StepPlan
from tests.scheduler_harness import run_to_completion
from tests.test_scheduler import add, assert_drained, make


class PlanCounter:
    """Counts from the plans alone what the scheduler should report: swapped blocks, recompute
    preemptions, and recomputed tokens (positions of a sequence computed a second time)."""

    def __init__(self):
        self.swapped_out = self.swapped_in = self.recompute_preemptions = self.recomputed = 0
        self.computed: dict[int, int] = {}     # seq id -> tokens in its cache now
        self.high: dict[int, int] = {}         # seq id -> most tokens it ever had computed
        self.steps = self.total = 0            # plans; tokens computed over all plans

    def _compute(self, sid: int, start: int, n: int) -> None:
        self.total += n
        self.recomputed += max(0, min(start + n, self.high.get(sid, 0)) - start)
        self.computed[sid] = start + n
        self.high[sid] = max(self.high.get(sid, 0), start + n)

    def __call__(self, plan: StepPlan) -> None:
        self.steps += 1
        self.swapped_out += len(plan.swap_out)
        self.swapped_in += len(plan.swap_in)
        self.recompute_preemptions += len(plan.preempted)
        for sid in plan.preempted:
            self.computed.pop(sid, None)
        for fork in plan.forks:
            self.computed[fork.child] = self.computed[fork.parent]
            self.high[fork.child] = self.high[fork.parent]
        for new in plan.new:
            self._compute(new.seq_id, new.num_computed, new.num_new_tokens)
        for sid, n in zip(plan.run_seq_ids, plan.run_num_tokens):
            self._compute(sid, self.computed[sid], n)


def exported(scheduler) -> dict[str, float]:
    """name -> value of every unlabelled-by-reason sample /metrics would show for this scheduler."""
    text = GatewayMetrics(lambda: [("0", scheduler.stats())], "m").render().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.labels.get("engine") == "0" and "le" not in s.labels}


def _drive(mode: str, num_blocks: int, num_host_blocks: int):
    s, ex = make(num_blocks=num_blocks, block_size=4, num_host_blocks=num_host_blocks,
                 max_num_batched_tokens=32, preemption_mode=mode)
    for i in range(24):                        # distinct prompts of 12 tokens, 40 tokens out each
        assert add(s, f"r{i}", range(1000 * i + 1, 1000 * i + 13), max_tokens=40, ignore_eos=True) is None
    plans = PlanCounter()
    results = run_to_completion(s, ex, on_plan=plans)
    assert len(results) == 24 and all(len(t) == 40 for t, _ in results.values())
    assert_drained(s)
    return s, plans, exported(s)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_a_small_pool_makes_every_paging_counter_rise_and_agree(mode):
    s, plans, m = _drive(mode, num_blocks=40, num_host_blocks=24)
    assert m["pagedserve:num_preemptions_total"] == s.num_preemptions > 0
    assert m["pagedserve:num_repeat_preemptions_total"] == s.num_repeat_preemptions > 0
    assert m["pagedserve:swapped_out_blocks_total"] == plans.swapped_out
    assert m["pagedserve:swapped_in_blocks_total"] == plans.swapped_in == plans.swapped_out
    assert m["pagedserve:recomputed_tokens_total"] == plans.recomputed
    assert m["pagedserve:prefix_cache_evictions_total"] == s.block_manager.pool.num_evictions > 0
    if mode == "swap":
        assert plans.swapped_out > 0
    else:
        assert plans.swapped_out == 0 and plans.recomputed > 0
        assert plans.recompute_preemptions == s.num_preemptions
    # every request went through every phase once; one step observed per plan
    for phase in ("queue", "prefill", "decode", "scheduler"):
        assert m[f"pagedserve:request_{phase}_time_seconds_count"] == 24
    assert m["pagedserve:iteration_tokens_count"] == plans.steps
    assert m["pagedserve:iteration_tokens_sum"] == plans.total


def test_a_large_pool_moves_none_of_them():
    s, plans, m = _drive("swap", num_blocks=24 * 13 + 8, num_host_blocks=24)
    for name in ("num_preemptions", "num_repeat_preemptions", "swapped_out_blocks", "swapped_in_blocks",
                 "recomputed_tokens", "prefix_cache_evictions"):
        assert m[f"pagedserve:{name}_total"] == 0, name
    assert plans.swapped_out == plans.recomputed == 0


def test_an_executor_restart_counts_what_it_computes_again():
    from tests.scheduler_harness import CheckedFakeExecutor, step
    s, ex = make(num_blocks=200, block_size=4, max_num_batched_tokens=64)
    for i in range(4):
        add(s, f"r{i}", range(100 * i + 1, 100 * i + 11), max_tokens=12, ignore_eos=True)
    for _ in range(5):
        step(s, ex)
    computed_before = sum(seq.num_computed for seq in s.seqs.values())
    assert s.reset_for_new_executor() == []
    results = run_to_completion(s, CheckedFakeExecutor(s))      # a new executor, holding nothing
    assert len(results) == 4
    assert_drained(s)
    m = exported(s)
    assert m["pagedserve:recomputed_tokens_total"] == computed_before > 0
    assert m["pagedserve:num_preemptions_total"] == 4
