"""Scheduler policy against the fake executor (tests/scheduler_harness.py checks the protocol)."""
import subprocess
import sys

import pytest

from services.scheduler.scheduler import Scheduler, victim_index
from shared.config import CacheConfig, SchedulerConfig
from services.scheduler.sim.fake_executor import FakeExecutor
from shared.messages import AddRequest, ExecutorError, NewSeq, SamplingParams, StepPlan, StepResult, encode
from tests.scheduler_harness import CheckedFakeExecutor, run_to_completion, step


def make(num_blocks=64, block_size=4, num_host_blocks=0, watermark=0.0, eos=(), caching=True, **sched):
    sched.setdefault("max_model_len", 256)
    sched.setdefault("max_num_batched_tokens", 64)
    s = Scheduler(SchedulerConfig(**sched).validate(),
                  CacheConfig(block_size=block_size, num_blocks=num_blocks, num_host_blocks=num_host_blocks,
                              watermark=watermark, enable_prefix_caching=caching).validate(),
                  eos_token_ids=eos)
    return s, CheckedFakeExecutor(s)


def add(s, rid, prompt, **params):
    return s.add_request(AddRequest(request_id=rid, prompt_token_ids=list(prompt), sampling=SamplingParams(**params)))


def prompt_of(length, start=1):
    return list(range(start, start + length))


def assert_drained(s):
    assert not s.has_unfinished()
    assert s.num_free_blocks == s.block_manager.num_blocks
    assert s.block_manager.host.num_free == s.block_manager.host.num_blocks
    assert s.block_manager.num_seqs == 0 and not s.seqs and not s.requests
    s.block_manager.check_invariants()


# ------------------------------------------------------------------------------------ basics

def test_single_request_runs_to_max_tokens():
    s, ex = make()
    assert add(s, "a", prompt_of(10), max_tokens=5) is None
    plan = s.schedule()
    assert [n.seq_id for n in plan.new] == [0] and plan.new[0].num_new_tokens == 10
    assert plan.new[0].block_ids == s.block_manager.block_ids(0) and len(plan.new[0].block_ids) == 3
    outs = s.update(plan, ex.execute(plan))
    assert len(outs) == 1 and outs[0].num_prompt_tokens == 10 and outs[0].finish_reason is None
    res = run_to_completion(s, ex)
    tokens, reason = res[("a", 0)]
    assert len(tokens) == 4 and reason == "length"
    assert ex.seqs == {0: ex.seqs[0]}                 # finished id not sent yet: rides the next plan
    add(s, "b", prompt_of(3, 500), max_tokens=1)
    assert s.schedule().finished == [0]
    st = s.stats()
    assert st.prompt_tokens == 13 and st.generation_tokens == 5


def test_finished_blocks_are_freed_immediately():
    s, ex = make(num_blocks=8)
    add(s, "a", prompt_of(6), max_tokens=1)
    plan = s.schedule()
    outs = s.update(plan, ex.execute(plan))
    assert outs[0].finish_reason == "length"
    assert s.num_free_blocks == 8 and not s.has_unfinished()
    assert s.schedule() is None


def test_decode_plan_is_a_small_diff():
    s, ex = make(num_blocks=256 * 4, block_size=16, max_num_seqs=256, max_num_batched_tokens=8192)
    for i in range(256):
        add(s, f"r{i}", prompt_of(20, 1000 * i + 1), max_tokens=50)
    step(s, ex)
    plan = s.schedule()
    assert not plan.new and len(plan.run_seq_ids) == 256 and set(plan.run_num_tokens) == {1}
    assert len(plan.table_updates) == 0                # 21st token still fits the second block
    assert len(encode(plan)) < 2048


def test_table_update_only_when_a_block_is_appended():
    s, ex = make(block_size=4)
    add(s, "a", prompt_of(7), max_tokens=10)
    step(s, ex)                                        # 7 computed, 8th token sampled
    plan = s.schedule()                                # computes token 8: fits block 1
    assert plan.table_updates == []
    s.update(plan, ex.execute(plan))
    plan = s.schedule()                                # token 9 needs a third block
    assert [(u.seq_id, u.start) for u in plan.table_updates] == [(0, 2)]
    s.update(plan, ex.execute(plan))


# ------------------------------------------------------------------------------------ prefix cache

def test_prefix_hit_capped_at_len_minus_one_and_rounded_to_blocks():
    s, ex = make(block_size=4)
    add(s, "a", prompt_of(8), max_tokens=2)
    run_to_completion(s, ex)
    add(s, "b", prompt_of(8), max_tokens=2)            # same 8 tokens: only 1 block (cap 7 -> 4)
    plan = s.schedule()
    assert plan.new[0].num_computed == 4 and plan.new[0].num_new_tokens == 4
    outs = s.update(plan, ex.execute(plan))
    assert outs[0].num_cached_tokens == 4
    run_to_completion(s, ex)
    add(s, "c", prompt_of(9), max_tokens=1)            # 9 tokens: both full blocks hit
    plan = s.schedule()
    assert plan.new[0].num_computed == 8 and plan.new[0].num_new_tokens == 1
    s.update(plan, ex.execute(plan))
    st = s.stats()
    assert (st.prefix_cache_queries, st.prefix_cache_hits) == (8 + 8 + 9, 4 + 8)


def test_generated_tokens_are_cached_too():
    s, ex = make(block_size=4)
    add(s, "a", prompt_of(5), max_tokens=8)
    tokens, _ = run_to_completion(s, ex)[("a", 0)]
    follow_up = prompt_of(5) + tokens + [1]            # a chat turn that continues the answer
    add(s, "b", follow_up, max_tokens=1)
    plan = s.schedule()
    assert plan.new[0].num_computed == 12              # 12 of a's 13 tokens were computed = 3 blocks
    s.update(plan, ex.execute(plan))


# ------------------------------------------------------------------------------------ cache_salt

def add_salted(s, rid, prompt, salt, **params):
    return s.add_request(AddRequest(request_id=rid, prompt_token_ids=list(prompt), cache_salt=salt,
                                    sampling=SamplingParams(**params)))


@pytest.mark.parametrize("first, second, cached", [("a", "b", 0), ("a", "a", 8), (None, "a", 0),
                                                   ("a", None, 0), (None, None, 8)])
def test_only_requests_with_the_same_salt_share_prefix_blocks(first, second, cached):
    s, ex = make(block_size=4)
    add_salted(s, "a", prompt_of(9), first, max_tokens=2)
    run_to_completion(s, ex)
    add_salted(s, "b", prompt_of(9), second, max_tokens=2)
    plan = s.schedule()
    assert plan.new[0].num_computed == cached
    assert s.update(plan, ex.execute(plan))[0].num_cached_tokens == cached
    run_to_completion(s, ex)
    assert_drained(s)


def salted_digests(tokens, salt, bs=4):
    from services.scheduler.block_hash import HashChain
    chain = HashChain(bs, salt)
    return {chain.digest(i, tokens) for i in range(len(tokens) // bs)}


@pytest.mark.parametrize("scenario", ["recompute", "swap", "fork", "new_executor"])
def test_the_salt_survives_preemption_forks_and_a_new_executor(scenario):
    """Every block a salted request publishes, also after recompute, swap-in, a fork or a new
    executor, is keyed by its salted chain; outputs are those of an unsalted run."""
    prompts = {f"r{i}": prompt_of(6, 100 * i + 1) for i in range(3)}
    params = dict(max_tokens=12, n=3 if scenario == "fork" else 1)
    config = dict(num_blocks=12 if scenario == "fork" else 8, block_size=4)
    if scenario == "swap":
        config.update(num_host_blocks=16, preemption_mode="swap")
    s, ex = make(**config)
    for rid, p in prompts.items():
        add_salted(s, rid, p, f"tenant-{rid}", **params)
    plans, seen = [], set()

    def collect(plan):
        plans.append(plan)
        seen.update(s.block_manager.cached_block_ids())

    early = {}
    if scenario == "new_executor":
        for _ in range(4):
            for o in step(s, ex):
                early[(o.request_id, o.index)] = early.get((o.request_id, o.index), []) + o.token_ids
        s.reset_for_new_executor()
        ex = CheckedFakeExecutor(s)
    results = {k: (early.get(k, []) + tokens, reason)
               for k, (tokens, reason) in run_to_completion(s, ex, on_plan=collect).items()}
    assert results == reference_outputs(prompts, **params)
    if scenario in ("recompute", "swap", "new_executor"):
        assert s.stats().num_preemptions > 0
    allowed = set()
    for (rid, _), (tokens, _) in results.items():
        allowed |= salted_digests(prompts[rid] + tokens, f"tenant-{rid}")
    assert seen and seen <= allowed
    add(s, "unsalted", prompts["r0"] + results[("r0", 0)][0], max_tokens=1)
    plan = s.schedule()
    assert plan.new[0].num_computed == 0
    s.update(plan, ex.execute(plan))
    assert_drained(s)


def test_each_full_block_is_hashed_once_per_sequence(monkeypatch):
    from services.scheduler import block_hash
    calls = []
    real = block_hash.chain_digest
    monkeypatch.setattr(block_hash, "chain_digest", lambda *a: calls.append(1) or real(*a))
    s, ex = make(num_blocks=8, block_size=4)
    for rid, p in CROWDED.items():                          # preempted and recomputed
        add(s, rid, p, max_tokens=12)
    results = run_to_completion(s, ex)
    assert s.stats().num_preemptions > 0
    # 6 prompt + 12 generated tokens, 17 of them computed: 4 full blocks per request
    assert len(calls) == sum((6 + len(tokens) - 1) // 4 for tokens, _ in results.values()) == 12


def test_prompts_admitted_in_one_step_share_the_blocks_the_first_computes():
    s, ex = make(block_size=4)
    add(s, "a", prompt_of(10), max_tokens=3)
    add(s, "b", prompt_of(8) + [90, 91], max_tokens=3)    # a's first 2 blocks
    add(s, "c", prompt_of(4) + [92] * 5, max_tokens=3)    # a's first block
    add(s, "d", [93] + prompt_of(9), max_tokens=3)        # nothing
    plan = s.schedule()
    assert [(n.num_computed, n.num_new_tokens) for n in plan.new] == [(0, 10), (8, 2), (4, 5), (0, 10)]
    ta, tb, tc, td = (n.block_ids for n in plan.new)
    assert tb[:2] == ta[:2] and tc[:1] == ta[:1] and not set(td) & set(ta)
    outs = s.update(plan, ex.execute(plan))              # the strict fake checks every KV read
    assert sorted((o.request_id, o.num_cached_tokens) for o in outs) == [("a", 0), ("b", 8), ("c", 4), ("d", 0)]
    assert s.stats().prefix_cache_hits == 12
    run_to_completion(s, ex)
    assert_drained(s)


def test_a_running_prompt_chunk_is_shared_with_a_prompt_admitted_in_the_same_step():
    s, ex = make(block_size=4, max_num_batched_tokens=8)
    add(s, "a", prompt_of(12), max_tokens=2)
    step(s, ex)                                           # a computes its first chunk of 8
    add(s, "b", prompt_of(12) + [90], max_tokens=2)
    plan = s.schedule()                                   # a's last 4 tokens, then b
    assert plan.run_num_tokens == [4] and plan.new[0].num_computed == 12
    s.update(plan, ex.execute(plan))
    run_to_completion(s, ex)
    assert_drained(s)


def test_a_step_that_never_ran_unpublishes_its_blocks():
    s, ex = make(block_size=4)
    add(s, "a", prompt_of(9), max_tokens=2)
    s.schedule()                                          # publishes a's 2 full blocks...
    assert len(s.block_manager.cached_block_ids()) == 2
    s.step_failed()                                       # ...which the failed plan never filled
    s.abort_request("a")
    assert not s.block_manager.cached_block_ids()
    add(s, "b", prompt_of(9), max_tokens=2)
    plan = s.schedule()
    assert plan.new[0].num_computed == 0


def test_fake_executor_accepts_a_shared_write_of_the_same_tokens_and_rejects_other_content():
    ex = FakeExecutor(block_size=4, num_blocks=4, strict=True)
    same = [NewSeq(0, [1, 2, 3, 4, 5], [], [0, 1], 0, 5, SamplingParams()),
            NewSeq(1, [1, 2, 3, 4, 6], [], [0, 2], 4, 1, SamplingParams())]      # reads block 0, written now
    assert isinstance(ex.execute(StepPlan(step_id=0, new=same)), StepResult)
    other = NewSeq(2, [7, 8, 9], [], [0], 0, 3, SamplingParams())                 # overwrites block 0
    err = ex.execute(StepPlan(step_id=1, new=[other]))
    assert isinstance(err, ExecutorError) and "shared by" in err.message


def test_prefix_caching_disabled():
    s, ex = make(caching=False)
    add(s, "a", prompt_of(9), max_tokens=1)
    run_to_completion(s, ex)
    add(s, "b", prompt_of(9), max_tokens=1)
    plan = s.schedule()
    assert plan.new[0].num_computed == 0
    s.update(plan, ex.execute(plan))
    assert s.stats().prefix_cache_queries == 0


# ------------------------------------------------------------------------------------ n > 1, CoW

def test_n_samples_fork_then_copy_on_write():
    s, ex = make(block_size=4)
    add(s, "a", prompt_of(6), n=3, max_tokens=4)
    plan = s.schedule()
    assert len(plan.new) == 1
    assert [(f.parent, f.sample_index) for f in plan.forks] == [(0, 1), (0, 2)]
    children = [f.child for f in plan.forks]
    outs = s.update(plan, ex.execute(plan))
    assert sorted(o.index for o in outs) == [0, 1, 2]
    bm = s.block_manager
    assert all(bm.block_ids(c) == bm.block_ids(0) for c in children)
    shared_last = bm.block_ids(0)[1]
    assert bm.ref_count(shared_last) == 3
    plan = s.schedule()                                # each writes token 7 into the shared block 1
    assert len(plan.copies) == 2 and all(src == shared_last for src, _ in plan.copies)
    assert sorted((u.start, len(u.block_ids)) for u in plan.table_updates) == [(1, 1), (1, 1)]
    s.update(plan, ex.execute(plan))
    assert bm.ref_count(bm.block_ids(0)[0]) == 3                                    # full block shared
    res = run_to_completion(s, ex)
    assert len({tuple(res[("a", i)][0]) for i in range(3)}) == 3
    assert_drained(s)


def test_n_samples_prompt_ending_on_block_boundary_needs_no_copy():
    s, ex = make(block_size=4)
    add(s, "a", prompt_of(8), n=2, max_tokens=3)
    step(s, ex)
    plan = s.schedule()
    assert plan.copies == [] and len(plan.table_updates) == 2
    s.update(plan, ex.execute(plan))
    run_to_completion(s, ex)
    assert_drained(s)


def test_fork_happens_on_last_chunk_of_chunked_prompt():
    s, ex = make(block_size=4, max_num_batched_tokens=8)
    add(s, "a", prompt_of(13), n=2, max_tokens=2)
    p1 = s.schedule()
    assert p1.forks == [] and s.update(p1, ex.execute(p1)) == []
    p2 = s.schedule()
    assert p2.run_num_tokens == [5] and len(p2.forks) == 1
    assert len(s.update(p2, ex.execute(p2))) == 2
    run_to_completion(s, ex)
    assert_drained(s)


# ------------------------------------------------------------------------------------ batching

def test_chunked_prefill_respects_token_budget():
    s, ex = make(max_num_batched_tokens=8)
    add(s, "a", prompt_of(20), max_tokens=2)
    plan = s.schedule()
    assert plan.new[0].num_new_tokens == 8 and s.update(plan, ex.execute(plan)) == []
    plan = s.schedule()
    assert plan.run_num_tokens == [8] and s.update(plan, ex.execute(plan)) == []
    plan = s.schedule()
    assert plan.run_num_tokens == [4] and len(s.update(plan, ex.execute(plan))) == 1


def test_decodes_go_first_then_prefill_chunks():
    s, ex = make(max_num_batched_tokens=8)
    add(s, "a", prompt_of(4), max_tokens=10)
    add(s, "b", prompt_of(4, 100), max_tokens=10)
    step(s, ex)
    add(s, "c", prompt_of(30, 200), max_tokens=2)
    plan = s.schedule()
    assert plan.run_seq_ids == [0, 1] and plan.run_num_tokens == [1, 1]
    assert plan.new[0].num_new_tokens == 6             # the rest of the budget
    s.update(plan, ex.execute(plan))
    plan = s.schedule()                                # c's next chunk comes after the decodes
    assert plan.run_seq_ids == [0, 1, 2] and plan.run_num_tokens == [1, 1, 6]
    s.update(plan, ex.execute(plan))


def test_max_num_seqs_counts_future_children():
    s, ex = make(max_num_seqs=3)
    add(s, "a", prompt_of(4), n=2, max_tokens=5)
    add(s, "b", prompt_of(4, 50), n=2, max_tokens=5)
    plan = s.schedule()
    assert [n.seq_id for n in plan.new] == [0]         # b's two samples would make 4
    s.update(plan, ex.execute(plan))
    assert s.num_running == 2 and s.num_waiting == 1
    run_to_completion(s, ex)
    assert_drained(s)


def test_watermark_holds_back_admission():
    s, ex = make(num_blocks=10, block_size=4, watermark=0.5, max_num_batched_tokens=64)
    add(s, "a", prompt_of(8), max_tokens=4)            # 2 blocks + growth
    add(s, "b", prompt_of(16, 100), max_tokens=4)      # 4 blocks: 10 - 2 - 4 < 5
    plan = s.schedule()
    assert [n.seq_id for n in plan.new] == [0]         # a admitted alone (nothing running)
    s.update(plan, ex.execute(plan))
    plan = s.schedule()
    assert plan.new == []
    s.update(plan, ex.execute(plan))
    run_to_completion(s, ex)
    assert_drained(s)


def test_admission_reserves_the_blocks_of_future_forks():
    s, ex = make(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    add(s, "a", prompt_of(12), max_tokens=3)            # 3 blocks, a 4th for its 2nd token
    step(s, ex)
    # "b" needs 2 blocks now and, right after its fork, a copy of its partly filled last block
    # per child: 2 + 2 > 3 free. Admitted on 2 blocks, its forks would preempt someone.
    add(s, "b", prompt_of(6, 100), n=3, max_tokens=2)
    plan = s.schedule()
    assert plan.new == [] and plan.run_seq_ids == [0]
    s.update(plan, ex.execute(plan))
    run_to_completion(s, ex)
    assert s.stats().num_preemptions == 0
    assert_drained(s)


def test_n_samples_admitted_with_room_to_fork_are_not_preempted():
    s, ex = make(num_blocks=11, block_size=4, max_num_batched_tokens=64)
    add(s, "a", prompt_of(6), n=3, max_tokens=2)        # 2 blocks + 2 copies after the fork
    add(s, "b", prompt_of(6, 100), n=3, max_tokens=2)   # 4 more: 8 of 11, then "c" would take 2+2
    add(s, "c", prompt_of(6, 200), n=3, max_tokens=2)
    plan = s.schedule()
    assert [n.seq_id for n in plan.new] == [0, 1]       # "c" waits: its forks would not fit
    s.update(plan, ex.execute(plan))
    run_to_completion(s, ex)
    assert s.stats().num_preemptions == 0
    assert_drained(s)


# ------------------------------------------------------------------------------------ preemption

# three 6-token prompts that grow to 18 tokens each: more than 8 blocks of 4 hold
CROWDED = {f"r{i}": prompt_of(6, 100 * i + 1) for i in range(3)}


def crowded(**config):
    """A scheduler on 8 blocks of 4 with the CROWDED requests (12 tokens each) added."""
    s, ex = make(num_blocks=8, block_size=4, **config)
    for rid, p in CROWDED.items():
        add(s, rid, p, max_tokens=12)
    return s, ex


def reference_outputs(prompts, **params):
    s, ex = make(num_blocks=256)
    for rid, p in prompts.items():
        add(s, rid, p, **params)
    return run_to_completion(s, ex)


def test_preemption_by_recompute_resumes_and_completes():
    s, ex = crowded()
    plans = []
    results = run_to_completion(s, ex, on_plan=plans.append)
    assert any(p.preempted for p in plans) and any(n.output_token_ids for p in plans for n in p.new)
    assert s.stats().num_preemptions > 0
    assert results == reference_outputs(CROWDED, max_tokens=12)
    assert_drained(s)


def test_preemption_by_swap_resumes_and_completes():
    s, ex = crowded(num_host_blocks=16, preemption_mode="swap")
    seen = {"swap_out": False, "swap_in": False, "preempted": False}

    def watch(plan):
        seen["swap_out"] |= bool(plan.swap_out)
        seen["preempted"] |= bool(plan.preempted)
        if plan.swap_in:
            seen["swap_in"] = True
            whole_tables = {b for u in plan.table_updates if u.start == 0 for b in u.block_ids}
            assert {d for _, d in plan.swap_in} <= whole_tables
        st = s.stats()
        assert (st.num_running, st.num_waiting, st.num_swapped) == (s.num_running, s.num_waiting, s.num_swapped)
        if s.num_swapped:
            assert s.block_manager.host.num_free < 16

    results = run_to_completion(s, ex, on_plan=watch)
    assert seen == {"swap_out": True, "swap_in": True, "preempted": False}
    assert results == reference_outputs(CROWDED, max_tokens=12)
    assert_drained(s)


def test_swapped_sequences_come_back_before_any_waiting_one_is_admitted():
    s, ex = crowded(num_host_blocks=16, preemption_mode="swap")
    swapped_while_waiting = admitted = 0
    for i in range(200):
        if i < 12:
            add(s, f"late{i}", prompt_of(5, 1000 + 10 * i), max_tokens=3)
        if not s.has_unfinished():
            break
        swapped_while_waiting += bool(s.num_swapped and s.num_waiting)
        plan = s.schedule()
        if plan.new:
            admitted += 1
            assert s.num_swapped == 0 and not plan.swap_out and not plan.preempted
        s.update(plan, ex.execute(plan))
    assert swapped_while_waiting and admitted and not s.has_unfinished()
    assert_drained(s)


def test_swap_falls_back_to_recompute_when_host_pool_is_full():
    s, ex = crowded(num_host_blocks=1, preemption_mode="swap")
    plans = []
    run_to_completion(s, ex, on_plan=plans.append)
    assert any(p.preempted for p in plans)
    assert_drained(s)


def test_preemption_victim_is_most_recent_and_spares_protected():
    s, ex = make(num_blocks=64)
    for i in range(4):
        add(s, f"r{i}", prompt_of(4, 10 * i + 1), max_tokens=20)
    step(s, ex)
    running = s.running
    assert victim_index(running, 0) == 3               # most recently admitted
    running[3].protected = True                        # preempted, no token since
    assert victim_index(running, 0) == 2
    running[1].protected = running[2].protected = True
    assert victim_index(running, 0) == 0               # only protected ones behind: the grower itself
    running[0].protected = True
    assert victim_index(running, 0) == 3               # everyone protected: the most recent


def test_protected_sequence_becomes_preemptible_after_a_token():
    s, ex = make(num_blocks=8, block_size=4)
    add(s, "a", prompt_of(6), max_tokens=12)
    add(s, "b", prompt_of(6, 50), max_tokens=12)
    while not s.stats().num_preemptions:
        step(s, ex)
    victim = s.seqs[s.waiting[0].seq_id]
    num_tokens = len(victim.token_ids)
    assert victim.protected
    while victim.protected:
        step(s, ex)
    assert len(victim.token_ids) == num_tokens + 1     # protection lasts until the next token
    run_to_completion(s, ex)
    assert_drained(s)


# ------------------------------------------------------------------------------------ abort

def test_abort_waiting():
    s, ex = make()
    add(s, "a", prompt_of(4), max_tokens=3)
    s.abort_request("a")
    assert s.schedule() is None
    assert_drained(s)


def test_abort_running_tells_executor():
    s, ex = make()
    add(s, "a", prompt_of(4), n=2, max_tokens=30)
    add(s, "b", prompt_of(4, 50), max_tokens=3)
    step(s, ex)
    step(s, ex)
    ids = sorted(seq.seq_id for seq in s.requests["a"].seqs)
    (b_id,) = [seq.seq_id for seq in s.requests["b"].seqs]
    assert len(ids) == 2
    s.abort_request("a")
    plan = s.schedule()
    assert sorted(plan.finished) == ids
    s.update(plan, ex.execute(plan))
    assert set(ex.seqs) == {b_id}
    run_to_completion(s, ex)
    assert_drained(s)


def test_abort_mid_prefill_and_while_step_in_flight():
    s, ex = make(max_num_batched_tokens=8)
    add(s, "a", prompt_of(30), n=2, max_tokens=3)
    step(s, ex)                                        # a is mid-prefill
    s.abort_request("a")
    assert s.num_free_blocks == 64
    plan = s.schedule()
    assert plan is None                                # nothing to run; the finished id waits
    add(s, "b", prompt_of(4, 100), max_tokens=3)
    plan = s.schedule()
    assert plan.finished == [0]
    result = ex.execute(plan)
    s.abort_request("b")                               # while b's first step is in flight
    assert s.update(plan, result) == []
    plan = s.schedule()
    assert plan is None
    assert_drained(s)


def test_abort_swapped_frees_host_blocks():
    s, ex = crowded(num_host_blocks=16, preemption_mode="swap")
    while not s.num_swapped:
        step(s, ex)
    victim = s.swapped[0]
    s.abort_request(victim.request.request_id)
    assert s.block_manager.host.num_free == 16
    plan = s.schedule()
    assert victim.seq_id in plan.finished
    s.update(plan, ex.execute(plan))
    run_to_completion(s, ex)
    assert_drained(s)


def test_stats_count_the_queues_and_the_blocks_in_use():
    s, ex = make(num_blocks=16, block_size=4, max_num_seqs=1)
    add(s, "a", prompt_of(6), max_tokens=4)
    add(s, "b", prompt_of(6, 100), max_tokens=4)
    step(s, ex)                                       # a runs (2 blocks), b waits for a sequence slot
    st = s.stats()
    assert (st.num_running, st.num_waiting, st.num_swapped) == (1, 1, 0)
    assert (st.num_blocks, st.num_free_blocks, st.kv_cache_usage) == (16, 14, 2 / 16)
    assert (st.prompt_tokens, st.generation_tokens, st.num_preemptions) == (6, 1, 0)


def test_abort_unknown_is_a_no_op():
    """Aborting an id that is not there (never added, or finished) changes nothing: the running
    request keeps its blocks and finishes with the tokens it gets without the abort."""
    def run(abort_ids):
        s, ex = make()
        add(s, "a", prompt_of(10), max_tokens=6)
        step(s, ex)
        before = (s.stats(), s.block_manager.block_ids(0))
        for rid in abort_ids:
            s.abort_request(rid)
        assert (s.stats(), s.block_manager.block_ids(0)) == before and s.has_request("a")
        result = run_to_completion(s, ex)
        s.abort_request("a")                          # finished already: still nothing to do
        assert_drained(s)
        return result

    assert run(["nope", "", "a0"]) == run([])


# ------------------------------------------------------------------------------------ one sample

def used_blocks(s) -> int:
    return s.block_manager.num_blocks - s.num_free_blocks


def test_finish_sample_running_frees_its_own_blocks_and_siblings_go_on():
    s, ex = make(block_size=4)
    add(s, "a", prompt_of(6), n=3, max_tokens=10)
    for _ in range(4):
        step(s, ex)                                    # forked; each sample wrote into its own blocks
    (victim,) = [q for q in s.requests["a"].seqs if q.index == 1]
    bm = s.block_manager
    table = bm.block_ids(victim.seq_id)
    own = [b for b in table if bm.ref_count(b) == 1]
    shared = [b for b in table if bm.ref_count(b) > 1]
    assert own and shared                              # the first prompt block is shared by all three
    refs = {b: bm.ref_count(b) for b in shared}
    before = used_blocks(s)
    out = s.finish_sample("a", 1)
    assert (out.request_id, out.index, out.token_ids, out.finish_reason) == ("a", 1, [], "abort")
    assert out.num_prompt_tokens == 6
    assert used_blocks(s) == before - len(own)
    assert all(bm.ref_count(b) == refs[b] - 1 for b in shared)
    assert s.finish_sample("a", 1) is None             # already finished
    assert s.has_request("a")
    plan = s.schedule()
    assert plan.finished == [victim.seq_id] and victim.seq_id not in plan.run_seq_ids
    s.update(plan, ex.execute(plan))
    assert victim.seq_id not in ex.seqs
    res = run_to_completion(s, ex)
    assert set(res) == {("a", 0), ("a", 2)}
    assert all(len(res[k][0]) == 10 - 5 and res[k][1] == "length" for k in res)   # 5 streamed before
    assert_drained(s)


def test_finish_sample_before_the_fork_strikes_it_from_the_fork():
    s, ex = make(block_size=4, max_num_batched_tokens=8)
    add(s, "a", prompt_of(13), n=3, max_tokens=3)
    assert s.finish_sample("a", 2).finish_reason == "abort"        # still waiting
    step(s, ex)                                                     # mid-prefill
    assert s.finish_sample("a", 2) is None
    plans = []
    res = run_to_completion(s, ex, on_plan=plans.append)
    assert [(f.parent, f.sample_index) for p in plans for f in p.forks] == [(0, 1)]
    assert set(res) == {("a", 0), ("a", 1)}
    assert_drained(s)


def test_finish_every_sample_but_the_parent_before_the_fork_leaves_a_single_sample():
    s, ex = make()
    add(s, "a", prompt_of(6), n=2, max_tokens=3)
    s.finish_sample("a", 1)
    plans = []
    res = run_to_completion(s, ex, on_plan=plans.append)
    assert not any(p.forks for p in plans) and set(res) == {("a", 0)}
    assert_drained(s)


def test_finish_sample_zero_before_the_fork_keeps_the_others_exact():
    """The parent still computes the prompt and the siblings fork from it; it is dropped after
    that step, and the other samples get exactly the tokens they get without the abort."""
    reference = reference_outputs({"a": prompt_of(6)}, n=3, max_tokens=4)
    s, ex = make(num_blocks=256)
    add(s, "a", prompt_of(6), n=3, max_tokens=4)
    assert s.finish_sample("a", 0).index == 0
    assert s.finish_sample("a", 0) is None
    plan = s.schedule()
    assert [(f.parent, f.sample_index) for f in plan.forks] == [(0, 1), (0, 2)]
    outs = s.update(plan, ex.execute(plan))
    assert sorted(o.index for o in outs) == [1, 2]
    plan = s.schedule()
    assert plan.finished == [0] and 0 not in plan.run_seq_ids
    s.update(plan, ex.execute(plan))
    res = run_to_completion(s, ex)
    for i in (1, 2):
        assert reference[("a", i)][0][2:] == res[("a", i)][0] and res[("a", i)][1] == "length"
    assert ("a", 0) not in res
    assert_drained(s)


def test_finish_every_sample_before_the_fork_ends_the_request():
    s, ex = make()
    add(s, "a", prompt_of(6), n=3, max_tokens=3)
    assert [s.finish_sample("a", i).index for i in (2, 0, 1)] == [2, 0, 1]
    assert not s.has_request("a") and s.schedule() is None
    assert_drained(s)


def test_struck_samples_free_their_admission_slots_and_fork_blocks():
    s, ex = make(max_num_seqs=3)
    add(s, "a", prompt_of(6), n=3, max_tokens=3)
    add(s, "b", prompt_of(6, 100), max_tokens=3)
    assert s.requests["a"].fork_blocks == 2
    s.finish_sample("a", 1)
    assert s.requests["a"].fork_blocks == 1
    plan = s.schedule()                                # a takes two slots now, so b fits too
    assert [n.seq_id for n in plan.new] == [0, 1]
    s.update(plan, ex.execute(plan))
    res = run_to_completion(s, ex)
    assert set(res) == {("a", 0), ("a", 2), ("b", 0)}
    assert_drained(s)


@pytest.mark.parametrize("index", [0, 1])
def test_finish_sample_while_its_step_is_in_flight(index):
    s, ex = make()
    add(s, "a", prompt_of(6), n=2, max_tokens=5)
    step(s, ex)
    plan = s.schedule()
    result = ex.execute(plan)
    (victim,) = [q for q in s.requests["a"].seqs if q.index == index]
    assert s.finish_sample("a", index) is not None
    outs = s.update(plan, result)
    assert [o.index for o in outs] == [1 - index]      # its sampled token is dropped
    plan = s.schedule()
    assert plan.finished == [victim.seq_id]
    s.update(plan, ex.execute(plan))
    res = run_to_completion(s, ex)
    assert set(res) == {("a", 1 - index)} and res[("a", 1 - index)][1] == "length"
    assert_drained(s)


def test_finish_sample_zero_while_the_forking_step_is_in_flight():
    s, ex = make()
    add(s, "a", prompt_of(6), n=3, max_tokens=3)
    plan = s.schedule()
    assert len(plan.forks) == 2
    result = ex.execute(plan)
    s.finish_sample("a", 0)
    assert sorted(o.index for o in s.update(plan, result)) == [1, 2]
    res = run_to_completion(s, ex)
    assert set(res) == {("a", 1), ("a", 2)}
    assert_drained(s)


def test_finish_sample_swapped_frees_its_host_blocks():
    s, ex = make(num_blocks=8, block_size=4, num_host_blocks=16, preemption_mode="swap")
    add(s, "a", prompt_of(6), n=3, max_tokens=12)
    while not s.num_swapped:
        step(s, ex)
    victim = s.swapped[0]
    host_used = 16 - s.block_manager.host.num_free
    assert s.finish_sample("a", victim.index).finish_reason == "abort"
    assert 16 - s.block_manager.host.num_free == host_used - len(ex.seqs[victim.seq_id].table)
    plan = s.schedule()
    assert victim.seq_id in plan.finished
    s.update(plan, ex.execute(plan))
    res = run_to_completion(s, ex)
    assert ("a", victim.index) not in res and len(res) == 2
    assert_drained(s)


def test_finish_sample_preempted_by_recompute_needs_no_executor_drop():
    s, ex = make(num_blocks=8, block_size=4)
    add(s, "a", prompt_of(6), n=3, max_tokens=12)
    while not s.stats().num_preemptions:
        step(s, ex)
    victim = s.waiting[0]
    assert victim.output_token_ids and victim.seq_id not in ex.seqs
    s.finish_sample("a", victim.index)
    assert not s.num_waiting
    plan = s.schedule()
    assert victim.seq_id not in plan.finished
    s.update(plan, ex.execute(plan))
    run_to_completion(s, ex)
    assert_drained(s)


def test_finish_sample_output_carries_the_prompt_and_its_cached_tokens():
    s, ex = make(block_size=4)
    add(s, "a", prompt_of(9), max_tokens=2)
    run_to_completion(s, ex)
    add(s, "b", prompt_of(9), max_tokens=4, n=2)        # 8 of its 9 prompt tokens hit the cache
    step(s, ex)
    out = s.finish_sample("b", 1)
    assert (out.index, out.finish_reason, out.num_prompt_tokens, out.num_cached_tokens) == (1, "abort", 9, 8)


def test_finish_sample_bad_index_unknown_request_and_finished_sample():
    s, ex = make()
    add(s, "a", prompt_of(6), n=2, max_tokens=1)
    with pytest.raises(ValueError, match="sample index 2 is out of range"):
        s.finish_sample("a", 2)
    with pytest.raises(ValueError):
        s.finish_sample("a", -1)
    assert s.finish_sample("nope", 0) is None
    step(s, ex)                                        # both samples finish ("length")
    assert s.finish_sample("a", 0) is None and s.finish_sample("a", 1) is None
    assert_drained(s)


# ------------------------------------------------------------------------------------ admission

def test_request_ids_of_and_has_request():
    s, ex = make()
    add(s, "a", prompt_of(6), n=2, max_tokens=3)
    add(s, "b", prompt_of(6, 100), max_tokens=1)
    step(s, ex)                                        # a forks seq 2; b finishes
    assert s.request_ids_of([0, 2]) == {"a"} and s.request_ids_of([1, 99]) == set()
    assert s.has_request("a") and not s.has_request("b") and not s.has_request("zzz")
    s.abort_request("a")
    assert s.request_ids_of([0, 2]) == set() and not s.has_request("a")


def test_queue_full():
    s, _ = make(max_waiting=2)
    assert add(s, "a", [1]) is None and add(s, "b", [1]) is None
    err = add(s, "c", [1])
    assert err.code == "queue_full" and err.request_id == "c"


def test_too_long_names_limit_and_length():
    s, _ = make(max_model_len=32)
    err = add(s, "a", prompt_of(32))
    assert err.code == "too_long" and "32" in err.message and "max_model_len" in err.message
    assert add(s, "b", prompt_of(31)) is None


def test_too_long_for_kv_capacity():
    s, _ = make(num_blocks=4, block_size=4, max_model_len=256)
    err = add(s, "a", prompt_of(16))
    assert err.code == "too_long" and "16" in err.message


@pytest.mark.parametrize("prompt,params", [([], {}), ([1], {"n": 0}), ([1], {"n": 999}), ([1], {"max_tokens": 0})])
def test_invalid_requests(prompt, params):
    s, _ = make(max_num_seqs=8)
    assert add(s, "a", prompt, **params).code == "invalid"


def test_duplicate_request_id_is_invalid():
    s, _ = make()
    add(s, "a", [1, 2])
    assert add(s, "a", [1, 2]).code == "invalid"


# ------------------------------------------------------------------------------------ stop conditions

def run_one(token_fn, eos=(), **params):
    s, ex = make(eos=eos)
    ex.token_fn = token_fn
    add(s, "a", prompt_of(4), **params)
    return run_to_completion(s, ex)[("a", 0)]


def test_eos_stops():
    assert run_one(lambda sid, pos: 2 if pos == 6 else 9, eos=[2], max_tokens=10) == ([9, 9, 2], "stop")


def test_ignore_eos():
    assert run_one(lambda sid, pos: 2, eos=[2], max_tokens=3, ignore_eos=True) == ([2, 2, 2], "length")


def test_min_tokens_defers_eos():
    tokens, reason = run_one(lambda sid, pos: 2, eos=[2], max_tokens=10, min_tokens=3)
    assert tokens == [2, 2, 2] and reason == "stop"


def test_stop_token_ids():
    assert run_one(lambda sid, pos: 5 if pos >= 5 else 9, max_tokens=10, stop_token_ids=[5]) == ([9, 5], "stop")


def test_max_model_len_is_length():
    s, ex = make(max_model_len=8)
    add(s, "a", prompt_of(5), max_tokens=100)
    tokens, reason = run_to_completion(s, ex)[("a", 0)]
    assert len(tokens) == 3 and reason == "length"


# ------------------------------------------------------------------------------------ protocol

def test_update_rejects_mismatched_results():
    s, ex = make()
    add(s, "a", prompt_of(4))
    plan = s.schedule()
    with pytest.raises(ValueError):
        s.update(plan, StepResult(step_id=plan.step_id + 1, seq_ids=[0], token_ids=[1]))
    with pytest.raises(ValueError):
        s.update(plan, StepResult(step_id=plan.step_id, seq_ids=[], token_ids=[]))
    assert len(s.update(plan, ex.execute(plan))) == 1


@pytest.mark.parametrize("bad, message", [
    ({"run_seq_ids": [0, 0], "run_num_tokens": [1, 1]}, "scheduled twice"),
    ({"run_seq_ids": [0], "run_num_tokens": [0]}, "with 0 tokens"),
    ({"new": [NewSeq(1, [4, 5], [], [2], 0, 0, SamplingParams())]}, "computes no token"),
])
def test_fake_executor_rejects_plans_that_run_a_sequence_twice_or_for_nothing(bad, message):
    ex = FakeExecutor(block_size=4, num_blocks=4, strict=True)
    assert isinstance(ex.execute(StepPlan(step_id=0, new=[NewSeq(0, [1, 2, 3], [], [0], 0, 3, SamplingParams())])),
                      StepResult)
    err = ex.execute(StepPlan(step_id=1, **bad))
    assert isinstance(err, ExecutorError) and message in err.message
    assert list(ex.seqs) == [0] and ex.seqs[0].computed == 3          # a rejected plan changes nothing


def test_logprobs_travel_to_outputs():
    from shared.messages import TokenLogprobs
    s, ex = make()
    add(s, "a", prompt_of(4), logprobs=1)
    plan = s.schedule()
    lp = TokenLogprobs(-0.5, [3], [-0.5])
    out = s.update(plan, StepResult(step_id=plan.step_id, seq_ids=[0], token_ids=[3], logprobs=[lp]))
    assert out[0].logprobs == [lp]


@pytest.mark.integration   # a fresh interpreter
def test_scheduler_imports_no_torch_or_numpy():
    code = ("import sys, services.scheduler.scheduler, services.scheduler.block_manager; "
            "print([m for m in ('torch', 'cupy', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------ lost executor

@pytest.mark.parametrize("lose_after, in_flight", [(0, True), (3, False), (5, True), (9, False)])
def test_reset_for_new_executor_requeues_and_outputs_continue_exactly(lose_after, in_flight):
    """The executor dies after some steps (maybe with one step sent and never answered); a new
    one with a smaller pool takes over. Outputs match a run without the loss: nothing repeated,
    nothing skipped (the fake samples from (seq id, position), so recompute is exact)."""
    prompts = {f"r{i}": prompt_of(5 + i, 50 * i + 1) for i in range(4)}
    s, ex = make(num_blocks=12, block_size=4, num_host_blocks=6, preemption_mode="swap")
    for rid, p in prompts.items():
        add(s, rid, p, max_tokens=10)
    results = {}

    def take(outs):
        for o in outs:
            results.setdefault((o.request_id, o.index), []).extend(o.token_ids)

    for _ in range(lose_after):
        take(step(s, ex))
    if in_flight:
        assert s.schedule() is not None                # sent, never answered
    live = s.num_running + s.num_swapped
    before = s.stats().num_preemptions
    errors = s.reset_for_new_executor(cache_config=CacheConfig(block_size=4, num_blocks=10).validate())
    assert errors == [] and s.num_running == s.num_swapped == 0 and s.num_waiting == len(s.seqs)
    assert s.num_free_blocks == 10 and s.stats().num_preemptions == before + live
    plan = s.schedule()
    assert not plan.finished and not plan.preempted and not plan.run_seq_ids   # a clean slate
    ex = CheckedFakeExecutor(s)
    take(s.update(plan, ex.execute(plan)))
    for key, (tokens, _) in run_to_completion(s, ex).items():
        results.setdefault(key, []).extend(tokens)
    ref = reference_outputs(prompts, max_tokens=10)
    assert results == {k: v[0] for k, v in ref.items()}
    assert_drained(s)


@pytest.mark.parametrize("prompt_len", [13, 14])    # 16 (the new limit, no room to sample) or 17 tokens
def test_reset_for_new_executor_drops_what_no_longer_fits(prompt_len):
    s, ex = make(num_blocks=64, block_size=4)
    add(s, "long", prompt_of(prompt_len), max_tokens=8)
    add(s, "short", prompt_of(3, 100), max_tokens=4, n=2)
    for _ in range(3):
        step(s, ex)
    errors = s.reset_for_new_executor(cache_config=CacheConfig(block_size=4, num_blocks=4).validate())
    assert [(e.request_id, e.code) for e in errors] == [("long", "executor_error")]
    assert "at most 16 tokens" in errors[0].message and f"already has {prompt_len + 3}" in errors[0].message
    assert not s.has_request("long") and s.has_request("short")
    results = run_to_completion(s, CheckedFakeExecutor(s))
    assert {k: len(v[0]) for k, v in results.items()} == {("short", 0): 1, ("short", 1): 1}
    assert_drained(s)


def test_reset_for_new_executor_rejects_another_block_size():
    s, _ = make(block_size=4)
    with pytest.raises(ValueError, match="block size 8"):
        s.reset_for_new_executor(cache_config=CacheConfig(block_size=8, num_blocks=4).validate())


# ------------------------------------------------------------------------------------ real engine

def test_real_engine_siblings_of_a_finished_sample_keep_their_exact_tokens(default_worker_factory):
    """With the real worker (seeded sampling, real paged KV): stopping sample 1 mid-way and
    sample 0 of another request before its fork, on a pool so tight that the freed blocks are
    reused, leaves every other sample token-for-token as in a run without the aborts."""
    from services.offline import Engine
    from shared.config import EngineConfig

    def engine(num_blocks):
        config = EngineConfig(device="cpu", dtype="float32",
                              cache=CacheConfig(block_size=4, num_blocks=num_blocks, num_host_blocks=0,
                                                watermark=0.0),
                              scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256,
                                                        max_model_len=128))
        return Engine(config, default_worker_factory(num_blocks=num_blocks, block_size=4, num_host_blocks=0))

    params = SamplingParams(n=3, max_tokens=10, temperature=0.8, seed=7, ignore_eos=True)
    reqs = [AddRequest(request_id=rid, prompt_token_ids=prompt_of(9, start), sampling=params)
            for rid, start in (("a", 300), ("b", 700))]
    late = AddRequest(request_id="late", prompt_token_ids=prompt_of(13, 900),
                      sampling=SamplingParams(max_tokens=10, temperature=0.0))
    reference = engine(64).run(reqs + [late])
    assert len({tuple(smp.token_ids) for smp in reference["a"]}) == 3       # the samples differ

    e = engine(22)                          # the peak need: a[1]'s blocks must be reused
    got = {(r.request_id, i): [] for r in reqs + [late] for i in range(r.sampling.n)}
    for r in reqs:
        e.add(r)
    assert e.scheduler.finish_sample("b", 0).finish_reason == "abort"       # before b's fork
    for _ in range(7):
        for out in e.step():
            got[(out.request_id, out.index)] += out.token_ids
    bm = e.scheduler.block_manager
    (a1,) = [q.seq_id for q in e.scheduler.requests["a"].seqs if q.index == 1]
    own = {b for b in bm.block_ids(a1) if bm.ref_count(b) == 1}
    free = e.scheduler.num_free_blocks
    assert e.scheduler.finish_sample("a", 1) is not None
    assert e.scheduler.num_free_blocks == free + len(own) > free             # its own blocks came back
    e.add(late)
    reused = set()
    while e.scheduler.has_unfinished():
        for out in e.step():
            got[(out.request_id, out.index)] += out.token_ids
        bm.check_invariants()                          # a block's ref count is its table entries
        reused |= {b for b in own if bm.ref_count(b) > 0}
    assert reused and e.scheduler.num_preemptions == 0
    assert got[("a", 1)] == reference["a"][1].token_ids[:7] and got[("b", 0)] == []
    for key in (("a", 0), ("a", 2), ("b", 1), ("b", 2), ("late", 0)):
        assert got[key] == reference[key[0]][key[1]].token_ids, key
    assert e.scheduler.num_free_blocks == 22 and not e.scheduler.seqs


# ------------------------------------------------------------------------------ sliding window
# W = 8 over blocks of 4: a query at q reads keys q-7..q, so block i (positions 4i..4i+3) is never
# read again once q >= 4i + 11; between steps a sequence holds at most ceil(7 / 4) + 1 = 3 blocks.

from services.scheduler.block_manager import NULL_BLOCK, BlockManager  # noqa: E402


def windowed(window=8, num_blocks=64, block_size=4, num_host_blocks=0, caching=True, **sched):
    sched.setdefault("max_model_len", 256)
    sched.setdefault("max_num_batched_tokens", 64)
    s = Scheduler(SchedulerConfig(**sched).validate(),
                  CacheConfig(block_size=block_size, num_blocks=num_blocks, num_host_blocks=num_host_blocks,
                              watermark=0.0, enable_prefix_caching=caching, sliding_window=window).validate())
    return s, CheckedFakeExecutor(s)


def check_window(s):
    """Every resident sequence released exactly the blocks out of its window, and holds the rest."""
    bm, w, bs = s.block_manager, s.block_manager.sliding_window, s.block_size
    bm.check_invariants()
    for sid, seq in s.seqs.items():
        if seq.status == "running":
            dead = max((seq.num_computed - w + 1) // bs, 0)
            assert bm.num_released(sid) == dead, (sid, seq.num_computed, bm.num_released(sid))
            assert bm.block_ids(sid)[:dead] == [NULL_BLOCK] * dead
            assert bm.num_held(sid) <= -(-(w - 1) // bs) + 1


def test_window_frees_each_block_once_it_left_and_keeps_table_positions():
    s, ex = windowed(num_blocks=16)
    add(s, "a", prompt_of(6), max_tokens=20)
    bm, released = s.block_manager, {}
    while s.has_unfinished():
        step(s, ex)
        check_window(s)
        for sid, seq in s.seqs.items():
            released[seq.num_computed] = bm.num_released(sid)
            assert len(bm.block_ids(sid)) == -(-seq.num_computed // 4)       # positions unchanged
            assert s.num_free_blocks == 16 - bm.num_held(sid)
    assert (released[10], released[11], released[14], released[15], released[24]) == (0, 1, 1, 2, 4)
    assert_drained(s)


def test_window_zero_frees_nothing():
    s, ex = windowed(window=0, num_blocks=16)
    add(s, "a", prompt_of(6), max_tokens=20)
    for _ in range(15):
        step(s, ex)
    ((sid, seq),) = s.seqs.items()
    assert s.block_manager.num_released(sid) == 0 and seq.num_computed == 20 and s.num_free_blocks == 16 - 5


def test_window_release_of_a_shared_block_waits_for_its_last_holder():
    bm = BlockManager(8, 4, sliding_window=8)
    bm.allocate(0, 12)
    assert bm.append_slots(0, 0, 12, []) == 0
    bm.cache_full_blocks(0, prompt_of(12), 12)
    bm.fork(0, 1)
    bm.release_out_of_window(0, 11)                    # block 0 of seq 0 left its window
    first = bm.block_ids(1)[0]
    assert bm.num_released(0) == 1 and bm.ref_count(first) == 1 and bm.num_free_blocks == 5
    bm.fork(0, 2)                                      # a fork after a release shares what is held
    assert bm.num_released(2) == 1 and bm.ref_count(first) == 1
    bm.release_out_of_window(1, 11)
    assert bm.ref_count(first) == 0 and bm.num_free_blocks == 6
    assert first in bm.cached_block_ids().values()     # full and hashed: an evictable cached block
    bm.check_invariants()
    for sid in (0, 1, 2):
        bm.free(sid)
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_window_swap_moves_only_held_blocks_and_restores_positions():
    bm = BlockManager(8, 4, num_host_blocks=4, sliding_window=8)
    bm.allocate(0, 16)
    bm.append_slots(0, 0, 16, [])
    bm.cache_full_blocks(0, prompt_of(16), 16)
    bm.release_out_of_window(0, 16)                    # q = 16: blocks 0 and 1 are dead
    held = bm.block_ids(0, 2)
    assert bm.can_swap_out(0) and len(bm.swap_out(0)) == 2 and bm.num_free_blocks == 8
    assert bm.blocks_to_swap_in(0, 16) == 2 and bm.blocks_to_swap_in(0, 17) == 3
    pairs = bm.swap_in(0)
    table = bm.block_ids(0)
    assert len(pairs) == 2 and len(table) == 4 and table[:2] == [NULL_BLOCK] * 2 and bm.num_released(0) == 2
    assert bm.num_free_blocks == 6 and held                    # 2 held again, positions unchanged
    bm.check_invariants()
    bm.free(0)
    assert bm.num_free_blocks == 8 and bm.host.num_free == 4


def test_window_prefix_hit_holds_only_the_window_of_the_cached_prefix():
    s, ex = windowed(num_blocks=16)
    add(s, "a", prompt_of(20), max_tokens=1)
    run_to_completion(s, ex)                           # a's 5 full blocks stay cached, all free
    bm = s.block_manager
    assert len(bm.cached_block_ids()) == 5 and s.num_free_blocks == 16
    prefix = bm.match_prefix(prompt_of(24))
    assert prefix.num_tokens == 20 and len(prefix.blocks) == 5
    assert prefix.num_free == 2                        # q = 20 reads 13..20: blocks 3, 4 only
    add(s, "b", prompt_of(24), max_tokens=3)
    plan = s.schedule()
    (new,) = plan.new
    assert new.num_computed == 20 and new.block_ids[:3] == [NULL_BLOCK] * 3
    assert new.block_ids[3:5] == [b.block_id for b in prefix.blocks[3:]]
    assert s.num_free_blocks == 16 - 3                 # hits 3, 4 and one new block for 20..23
    s.update(plan, ex.execute(plan))
    check_window(s)
    run_to_completion(s, ex)
    assert_drained(s)


def test_window_prefix_whose_head_was_evicted_is_no_hit():
    s, ex = windowed(num_blocks=8)
    add(s, "a", prompt_of(20), max_tokens=1)
    run_to_completion(s, ex)
    add(s, "x", prompt_of(24, 500), max_tokens=1)      # takes a's head blocks off the free list
    run_to_completion(s, ex)
    assert s.block_manager.match_prefix(prompt_of(24)).num_tokens == 0
    add(s, "b", prompt_of(24), max_tokens=2)
    results = run_to_completion(s, ex)
    assert len(results[("b", 0)][0]) == 2
    assert_drained(s)


def windowed_crowd(mode, num_host_blocks=0, **kw):
    """4 sequences that each need 3 blocks to decode, on 10 blocks: someone is always preempted."""
    s, ex = windowed(num_blocks=10, num_host_blocks=num_host_blocks, preemption_mode=mode, **kw)
    prompts = {f"r{i}": prompt_of(6, 100 * i + 1) for i in range(4)}
    for rid, p in prompts.items():
        add(s, rid, p, max_tokens=30)
    return s, ex, prompts


@pytest.mark.parametrize("mode, host", [("recompute", 0), ("swap", 16)])
def test_window_preemption_resumes_and_completes(mode, host):
    s, ex, prompts = windowed_crowd(mode, host)
    plans, got = [], {}
    while s.has_unfinished():
        plans.append(s.schedule())
        for out in s.update(plans[-1], ex.execute(plans[-1])):
            got[(out.request_id, out.index)] = got.get((out.request_id, out.index), []) + out.token_ids
        check_window(s)
    assert s.num_preemptions > 0
    if mode == "swap":
        assert any(p.swap_out for p in plans) and all(len(p.swap_out) <= 3 for p in plans)
    s2, ex2 = windowed(num_blocks=64)                  # no memory pressure: the same tokens
    for rid, p in prompts.items():
        add(s2, rid, p, max_tokens=30)
    reference = run_to_completion(s2, ex2)
    assert got == {k: tokens for k, (tokens, _) in reference.items()} and len(got[("r0", 0)]) == 30
    assert_drained(s)


def test_window_forks_after_a_chunked_prompt_share_only_held_blocks():
    s, ex = windowed(window=16, num_blocks=32, max_num_batched_tokens=8)
    add(s, "a", prompt_of(30), n=3, max_tokens=40)
    add(s, "b", prompt_of(30, 700), max_tokens=40)
    plans = []
    while s.has_unfinished():
        plans.append(s.schedule())
        s.update(plans[-1], ex.execute(plans[-1]))
        check_window(s)
    assert any(p.forks for p in plans) and any(p.copies for p in plans)
    assert_drained(s)
