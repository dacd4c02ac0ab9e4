"""One rule per row, run against both executors: the real worker (random ``tiny`` weights) and the
fake one check plans with ``shared/step_check.py``, so they reject the same bad plans, leave their
state unchanged, and accept the same good ones."""
from __future__ import annotations

import copy

import pytest

from services.executor.worker import Worker
from services.scheduler.sim.fake_executor import FakeExecutor
from shared.config import CacheConfig, EngineConfig, SchedulerConfig
from shared.messages import ExecutorError, Fork, NewSeq, SamplingParams, StepPlan, StepResult, TableUpdate

GREEDY = SamplingParams(temperature=0.0)
BS, NUM_BLOCKS, NUM_HOST, MAX_LEN, VOCAB = 4, 16, 4, 64, 512      # random:tiny has 512 tokens
PROMPT = [5, 6, 7, 8, 9, 10]
FAKE = dict(block_size=BS, num_blocks=NUM_BLOCKS, num_host_blocks=NUM_HOST, max_model_len=MAX_LEN,
            max_num_batched_tokens=MAX_LEN, vocab_size=VOCAB, eos_token_ids=[0], strict=True)


@pytest.fixture(scope="module")
def tiny_worker():
    cfg = EngineConfig(model="random:tiny", device="cpu", dtype="float32", attention_backend="torch",
                       cache=CacheConfig(block_size=BS, num_blocks=NUM_BLOCKS, num_host_blocks=NUM_HOST),
                       scheduler=SchedulerConfig(max_model_len=MAX_LEN, max_num_batched_tokens=MAX_LEN)).validate()
    w = Worker(cfg)
    assert w.limits() == FakeExecutor(**FAKE).limits()
    return w


@pytest.fixture(params=["worker", "fake"])
def executor(request, tiny_worker):
    """Seq 1 (6 prompt tokens, 2 blocks) has run its prefill and sampled one token."""
    if request.param == "worker":
        ex = Worker.from_loaded(tiny_worker.loaded, tiny_worker.config)
    else:
        ex = FakeExecutor(**FAKE)
    r = ex.execute(StepPlan(step_id=0, new=[NewSeq(1, PROMPT, [], [0, 1], 0, 6, GREEDY)]))
    assert isinstance(r, StepResult) and r.seq_ids == [1]
    return ex


def snapshot(ex):
    if isinstance(ex, Worker):
        return copy.deepcopy(ex.seqs), [c.tolist() for c in ex.kv.device_caches + ex.kv.host_caches]
    return copy.deepcopy((ex.seqs, ex.kv, ex.host_kv, ex.owners))


def new(sid, prompt, blocks, computed=0, num_new=None, output=(), sampling=GREEDY):
    n = len(prompt) + len(output) - computed if num_new is None else num_new
    return NewSeq(sid, list(prompt), list(output), list(blocks), computed, n, sampling)


def plan(**kw) -> StepPlan:
    return StepPlan(step_id=1, **kw)


DECODE = dict(run_seq_ids=[1], run_num_tokens=[1])

BAD_PLANS = {
    # finished / preempted
    "finished unknown": (plan(finished=[3]), "unknown seq 3"),
    "finished twice": (plan(finished=[1], preempted=[1]), "duplicate finished/preempted seq 1"),
    "run after finish": (plan(finished=[1], **DECODE), "unknown seq 1"),
    # block ids and destinations
    "copy outside pool": (plan(copies=[(0, 16)]), "copy block 16 outside"),
    "copy duplicate destination": (plan(copies=[(0, 5), (1, 5)]), "duplicate copy destination 5"),
    "copy chain": (plan(copies=[(3, 5), (5, 6)]), "block(s) [5] are both a copy source and a destination"),
    "copy swap": (plan(copies=[(3, 5), (5, 3)]), "block(s) [3, 5] are both"),
    "swap out to host outside pool": (plan(swap_out=[(0, 4)]), "swap_out host block 4"),
    "swap out duplicate destination": (plan(swap_out=[(0, 2), (1, 2)]), "duplicate swap_out destination 2"),
    "swap in from device outside pool": (plan(swap_in=[(0, 20)]), "swap_in device block 20"),
    "swap in duplicate destination": (plan(swap_in=[(0, 7), (1, 7)]), "duplicate swap_in destination 7"),
    # new sequences
    "new seq already known": (plan(new=[new(1, [1, 2], [2])]), "new seq 1 is already known"),
    "new seq duplicated": (plan(new=[new(2, [1], [2]), new(2, [1], [3])]), "new seq 2 is already known"),
    "new seq block outside pool": (plan(new=[new(2, [1, 2], [16])], **DECODE), "table block 16 outside"),
    "new seq computes more than it has": (plan(new=[new(2, [1, 2], [2], 1, 2)]), "1+2 tokens > 2 known"),
    "new seq computes nothing": (plan(new=[new(2, [1, 2], [2], 1, 0)]), "new seq 2 computes no token"),
    "new seq fully cached": (plan(new=[new(2, PROMPT, [0, 1], 6, 0)]), "new seq 2 computes no token"),
    "prompt token outside the vocabulary": (plan(new=[new(2, [1, VOCAB], [2])]), "prompt token id 512 outside"),
    "output token outside the vocabulary": (plan(new=[new(2, [1], [2], output=[10**6])]), "output token id"),
    "logit_bias token outside the vocabulary": (
        plan(new=[new(2, [1, 2], [2], sampling=SamplingParams(temperature=0.0, logit_bias={10**6: 1.0}))]),
        "logit_bias token id"),
    # running sequences
    "run unknown seq": (plan(run_seq_ids=[1, 9], run_num_tokens=[1, 1]), "run: unknown seq 9"),
    "run lengths differ": (plan(run_seq_ids=[1], run_num_tokens=[]), "differ in length"),
    "run twice": (plan(run_seq_ids=[1, 1], run_num_tokens=[1, 1]), "seq 1 is scheduled twice"),
    "new and run": (plan(new=[new(2, [1], [2])], run_seq_ids=[2], run_num_tokens=[1]), "seq 2 is scheduled twice"),
    "too many tokens for seq": (plan(run_seq_ids=[1], run_num_tokens=[2]), "6+2 tokens > 7 known"),
    "zero tokens": (plan(run_seq_ids=[1], run_num_tokens=[0]), "seq 1 with 0 tokens"),
    # tables, context and step limits
    "table update block outside pool": (plan(**DECODE, table_updates=[TableUpdate(1, 2, [99])]), "block 99 outside"),
    "table update unknown seq": (plan(table_updates=[TableUpdate(7, 0, [3])]), "unknown seq 7"),
    "table update beyond end": (plan(table_updates=[TableUpdate(1, 3, [3])]), "at 3 beyond its 2 blocks"),
    "not enough blocks": (plan(**DECODE, table_updates=[TableUpdate(1, 1, [])]), "1 blocks cannot hold 7"),
    "table shrinks under computed tokens": (plan(table_updates=[TableUpdate(1, 1, [])]), "cannot hold 6"),
    "beyond max_model_len": (plan(new=[new(2, range(65), [*range(2, 16), 0, 1, 2])]), "65 tokens > max_model_len 64"),
    "over the token budget": (
        plan(new=[new(2, range(40), range(2, 12)), new(3, range(30), range(2, 10))]), "70 tokens in one step > 64"),
    # forks
    "fork parent not sampling": (plan(forks=[Fork(1, 2, 1)]), "fork parent 1 does not sample"),
    "fork parent mid-prefill": (
        plan(new=[new(2, [1, 2, 3, 4, 5], [2, 3], num_new=4)], forks=[Fork(2, 3, 1)]), "fork parent 2 does not"),
    "fork child known": (plan(**DECODE, forks=[Fork(1, 1, 1)]), "fork child 1 is already known"),
    "fork child twice": (plan(**DECODE, forks=[Fork(1, 2, 1), Fork(1, 2, 2)]), "fork child 2 is already known"),
}


@pytest.mark.parametrize("name", sorted(BAD_PLANS))
def test_bad_plan_is_rejected_and_changes_nothing(executor, name):
    bad, needle = BAD_PLANS[name]
    before = snapshot(executor)
    result = executor.execute(bad)
    assert isinstance(result, ExecutorError), result
    assert result.step_id == bad.step_id and needle in result.message
    assert snapshot(executor) == before
    good = executor.execute(StepPlan(step_id=2, **DECODE))     # still usable
    assert isinstance(good, StepResult) and good.seq_ids == [1]


GOOD_PLANS = {
    "decode": (plan(**DECODE), [1]),
    "decode into a new block": (plan(**DECODE, table_updates=[TableUpdate(1, 2, [2])]), [1]),
    "prefix hit": (plan(new=[new(2, [5, 6, 7, 8, 1], [0, 2], computed=4)]), [2]),
    "prefill chunk does not sample": (plan(new=[new(2, [1, 2, 3, 4, 5], [2, 3], num_new=4)], **DECODE), [1]),
    "fork when the prompt completes": (plan(new=[new(2, [1, 2, 3], [2])], forks=[Fork(2, 3, 1)]), [2, 3]),
    "copy-on-write of the last block": (
        plan(**DECODE, copies=[(1, 4)], table_updates=[TableUpdate(1, 1, [4])]), [1]),
    "finish and reuse the id": (plan(finished=[1], new=[new(1, [3, 4], [5])]), [1]),
    "preempt": (plan(preempted=[1]), []),
}


@pytest.mark.parametrize("name", sorted(GOOD_PLANS))
def test_good_plan_is_accepted(executor, name):
    good, sampled = GOOD_PLANS[name]
    result = executor.execute(good)
    assert isinstance(result, StepResult), result
    assert result.seq_ids == sampled


def test_placeholder_entries_of_blocks_out_of_the_window_pass_the_rules(tiny_worker):
    """A table whose released leading entries are the placeholder block 0 (the scheduler's
    NULL_BLOCK, also a block another sequence holds) is a valid table; the worker runs it."""
    from services.scheduler.block_manager import NULL_BLOCK
    from shared.step_check import validate_plan
    assert NULL_BLOCK == 0
    placeholder = plan(new=[new(2, range(1, 11), [NULL_BLOCK, NULL_BLOCK, 3], computed=8)], **DECODE,
                       table_updates=[TableUpdate(1, 0, [NULL_BLOCK, 1])])
    worker = Worker.from_loaded(tiny_worker.loaded, tiny_worker.config)
    assert isinstance(worker.execute(StepPlan(step_id=0, new=[new(1, PROMPT, [0, 1])])), StepResult)
    checked = validate_plan(placeholder, worker.seqs, worker.limits())
    assert checked.work == [(2, 2), (1, 1)]
    result = worker.execute(placeholder)
    assert isinstance(result, StepResult) and result.seq_ids == [2, 1]
