"""The scheduler driven in-process, step by step, against the shared fake executor
(services/scheduler/sim/fake_executor.py) with every check on.

``CheckedFakeExecutor`` is the strict fake built from a scheduler's config that, on top of the
protocol and KV-content checks the fake makes itself, fails the test on any plan the fake rejects,
sends every plan through the wire codec, and compares its block tables with the scheduler's block
manager after every step. It samples ``token_fn(seq_id, position)``, so tests choose exact tokens
and a sequence recomputed on a new executor continues with the same ones.
"""
from __future__ import annotations

from typing import Callable

from services.scheduler.sim.fake_executor import FakeExecutor
from services.scheduler.step_loop import StepFailed, run_step
from shared.messages import StepPlan, StepResult, decode, encode


def default_token_fn(seq_id: int, position: int) -> int:
    return 3 + (seq_id * 7 + position * 13) % 97


class CheckedFakeExecutor(FakeExecutor):
    def __init__(self, scheduler, token_fn: Callable[[int, int], int] = default_token_fn, roundtrip: bool = True):
        bm = scheduler.block_manager
        super().__init__(block_size=scheduler.block_size, num_blocks=bm.num_blocks,
                         num_host_blocks=bm.host.num_blocks, max_model_len=scheduler.config.max_model_len,
                         sliding_window=bm.sliding_window,
                         max_num_batched_tokens=scheduler.config.max_num_batched_tokens,
                         vocab_size=1 << 20,        # the tests' prompts take distinct ids up to ~256k
                         eos_token_ids=sorted(scheduler.eos_token_ids), strict=True)
        self.scheduler, self.token_fn, self.roundtrip = scheduler, token_fn, roundtrip

    def execute(self, plan: StepPlan, masks=None) -> StepResult:
        if self.roundtrip:
            plan = decode(encode(plan))
        result = super().execute(plan, masks)
        assert isinstance(result, StepResult), f"step {plan.step_id}: {result.message}"
        self.check_tables()
        return result

    def _sample(self, sid: int, s) -> int:
        return self.token_fn(sid, s.num_tokens)

    def check_tables(self) -> None:
        """Executor tables equal the scheduler's for every sequence resident on the device, but
        for the entries the scheduler released (out of the sliding window), which the executor is
        not told about; and the scheduler never released an entry the executor may still read."""
        bm = self.scheduler.block_manager
        for sid, st in self.seqs.items():
            if sid not in self.scheduler.seqs:              # finished: dropped with the next plan
                assert sid in self.scheduler.pending_drops, f"seq {sid} is gone but never finished"
                continue
            if bm.is_swapped_out(sid):                      # its table here is stale
                continue
            table, released = bm.block_ids(sid), bm.num_released(sid)
            assert len(table) == len(st.table) and table[released:] == st.table[released:], \
                f"seq {sid}: executor table {st.table} != scheduler table {table} (from {released})"
            assert released <= st.live_from, \
                f"seq {sid}: {released} entries released, the executor still reads from {st.live_from}"


def _run_step(scheduler, executor, on_plan: Callable[[StepPlan], None] | None = None):
    """``run_step``, showing each plan to ``on_plan`` before it executes; a failed step fails the test."""
    def execute(plan: StepPlan):
        if on_plan is not None:
            on_plan(plan)
        return executor.execute(plan)

    outputs = run_step(scheduler, execute)
    assert not isinstance(outputs, StepFailed), outputs.message
    return outputs


def step(scheduler, executor) -> list:
    return _run_step(scheduler, executor) or []


def run_to_completion(scheduler, executor, max_steps: int = 10_000,
                      on_plan: Callable[[StepPlan], None] | None = None) -> dict:
    """Run until nothing is left, showing each plan to ``on_plan`` before it executes; returns
    {(request_id, index): (tokens, finish_reason)}."""
    results: dict = {}
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            return results
        outputs = _run_step(scheduler, executor, on_plan)
        assert outputs is not None, "unfinished work but nothing scheduled"
        for out in outputs:
            tokens, _ = results.get((out.request_id, out.index), ([], None))
            results[(out.request_id, out.index)] = (tokens + out.token_ids, out.finish_reason)
    raise AssertionError("did not finish")
