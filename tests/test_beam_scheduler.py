"""Beam search in the scheduler, against the strict fake executor (whose candidates are a pure
function of each sequence's tokens): the search forks, appends and frees beams over shared
blocks, returns n hypotheses best first, frees every block, and gives the same hypotheses on a
pool small enough to preempt beams, in swap mode, and across an executor restart. The search
policy itself (services/scheduler/beam.py) is checked against a direct transcription of HF's."""
from __future__ import annotations

import pytest

from services.scheduler.beam import Beam, BeamSearch
from services.scheduler.scheduler import Scheduler
from shared.config import CacheConfig, SchedulerConfig
from shared.messages import AddRequest, SamplingParams, StepPlan
from tests.scheduler_harness import CheckedFakeExecutor, run_to_completion

EOS = 2


class BeamFake(CheckedFakeExecutor):
    """The harness's fake with its own candidates (not the harness's token_fn sampling)."""

    def _sample(self, sid, s):
        return 3


def make(num_blocks=256, block_size=4, num_host_blocks=0, mode="recompute", **sched):
    sched.setdefault("max_model_len", 512)
    sched.setdefault("max_num_batched_tokens", 256)
    s = Scheduler(SchedulerConfig(preemption_mode=mode, **sched).validate(),
                  CacheConfig(block_size=block_size, num_blocks=num_blocks, num_host_blocks=num_host_blocks).validate(),
                  eos_token_ids=[EOS])
    return s, BeamFake(s)


def beam_request(rid, prompt, width, max_tokens, **kw):
    kw.setdefault("temperature", 0.0)
    return AddRequest(request_id=rid, prompt_token_ids=list(prompt),
                      sampling=SamplingParams(n=width, max_tokens=max_tokens, use_beam_search=True, **kw))


def run(s, ex, requests, on_plan=None):
    for r in requests:
        assert s.add_request(r) is None
    results = run_to_completion(s, ex, on_plan=on_plan)
    assert not s.has_unfinished() and s.num_free_blocks == s.block_manager.num_blocks
    return results


REQUESTS = [beam_request("a", range(5, 19), 4, 12), beam_request("b", range(40, 47), 2, 9, length_penalty=0.5),
            beam_request("c", range(60, 81), 3, 10, early_stopping=True)]


def test_beams_fork_append_and_free_over_shared_blocks():
    s, ex = make()
    plans: list[StepPlan] = []
    results = run(s, ex, REQUESTS, on_plan=plans.append)
    assert sorted(results) == [("a", i) for i in range(4)] + [("b", 0), ("b", 1)] + [("c", i) for i in range(3)]
    assert any(p.appends for p in plans)                           # beams went on
    assert any(p.copies for p in plans)                            # forked beams copied the partial block
    assert sum(len(p.new) for p in plans) > 3                      # ...and were registered as new seqs
    assert any(p.finished for p in plans)                          # dropped beams


def test_a_small_pool_swap_mode_and_a_restart_give_the_same_hypotheses():
    want = run(*make(), REQUESTS)
    s, ex = make(num_blocks=22)
    assert run(s, ex, REQUESTS) == want and s.num_preemptions > 0
    s, ex = make(num_blocks=22, num_host_blocks=64, mode="swap")
    assert run(s, ex, REQUESTS) == want and s.num_preemptions > 0
    s, ex = make()
    for r in REQUESTS:
        s.add_request(r)
    for _ in range(7):
        plan = s.schedule()
        s.update(plan, ex.execute(plan))
    s.reset_for_new_executor()
    assert run_to_completion(s, BeamFake(s)) == want
    assert s.num_free_blocks == s.block_manager.num_blocks


@pytest.mark.parametrize("rid, field", [("t", {"temperature": 0.7}), ("p", {"top_p": 0.5}),
                                         ("l", {"logprobs": 2}), ("s", {"seed": 1}), ("i", {"ignore_eos": True})])
def test_sampling_options_are_refused_with_beams(rid, field):
    s, _ = make()
    error = s.add_request(beam_request(rid, [5, 6, 7], 2, 4, **field))
    assert error is not None and error.code == "invalid" and next(iter(field)) in error.message


def test_too_many_beams_for_the_candidates_or_the_pool_are_refused():
    s, _ = make()
    assert "at most 20" in s.add_request(beam_request("w", [5, 6], 11, 4)).message
    s, _ = make(num_blocks=16)
    error = s.add_request(beam_request("big", range(5, 20), 4, 40))
    assert error.code == "too_long"
    s, _ = make(max_model_len=32)
    error = s.add_request(beam_request("long", range(5, 20), 2, 20))
    assert error.code == "too_long" and "context" in error.message


# ------------------------------------------------------------------------------ the policy vs HF

def hf_reference(step_logprobs, width, max_tokens, eos, length_penalty, early_stopping):
    """HF's ``_beam_search`` loop for one prompt, transcribed with torch on a table of next-token
    logprobs: ``step_logprobs(tokens) -> [V] tensor`` for a beam's generated tokens."""
    import torch

    from transformers.generation.utils import GenerationMixin as G

    V = step_logprobs([]).shape[0]
    keep = max(2, 1 + len(eos)) * width
    eos_t = torch.tensor(sorted(eos))
    running = torch.zeros(1, width, max_tokens, dtype=torch.long)
    seqs = running.clone()
    running_scores = torch.zeros(1, width)
    running_scores[:, 1:] = -1e9
    beam_scores = torch.full((1, width), -1e9)
    finished = torch.zeros(1, width, dtype=torch.bool)
    unsatisfied = torch.ones(1, 1, dtype=torch.bool)
    rbi = torch.full((1, width, max_tokens), -1, dtype=torch.int32)
    bi = rbi.clone()
    top_mask = torch.cat((torch.ones(width, dtype=torch.bool), torch.zeros(keep - width, dtype=torch.bool)))
    for cur in range(max_tokens):
        lp = torch.stack([step_logprobs(running[0, b, :cur].tolist()) for b in range(width)])[None]
        acc = (lp + running_scores[:, :, None]).reshape(1, -1)
        topk_lp, topk_idx = torch.topk(acc, k=keep)
        beam_idx, tok = topk_idx // V, topk_idx % V
        topk_seqs = running[0][beam_idx[0]][None].clone()
        topk_seqs[:, :, cur] = tok
        topk_bi = rbi[0][beam_idx[0]][None].clone()
        hits = torch.isin(tok, eos_t) | (cur + 1 >= max_tokens)
        running, running_scores, rbi = G._get_running_beams_for_next_iteration(
            G, topk_lp, topk_seqs, topk_bi, hits, width)
        seqs, beam_scores, bi, finished = G._update_finished_beams(
            G, seqs, topk_seqs, beam_scores, topk_lp, bi, topk_bi, unsatisfied, finished, hits, top_mask,
            width, cur, 0, length_penalty, early_stopping)
        unsatisfied = G._check_early_stop_heuristic(unsatisfied, running_scores, beam_scores, finished, cur + 1,
                                                    max_tokens, 0, early_stopping, length_penalty)
        if not G._beam_search_has_unfinished_sequences(unsatisfied, finished, hits, early_stopping):
            break
    out = []
    for b in range(width):
        row = seqs[0, b].tolist()
        n = next((i + 1 for i, t in enumerate(row) if t in eos), cur + 1)
        out.append((row[:n], round(float(beam_scores[0, b]), 4)))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("width, length_penalty, early_stopping", [
    (2, 1.0, False), (4, 1.0, True), (3, 0.6, False), (4, 2.0, False), (2, -0.5, True), (4, 1.5, True)])
def test_the_policy_matches_hf_beam_search_on_a_random_table(width, length_penalty, early_stopping, seed):
    import torch

    V, max_tokens, eos = 12, 7, {2}
    table: dict = {}

    def step_logprobs(tokens):
        key = tuple(tokens)
        if key not in table:
            g = torch.Generator().manual_seed(hash((seed, *key)) % (2 ** 31))
            table[key] = torch.log_softmax(torch.randn(V, generator=g) * 2, -1)
        return table[key]

    want = hf_reference(step_logprobs, width, max_tokens, eos, length_penalty, early_stopping)
    search = BeamSearch(width, max_tokens, frozenset(eos), length_penalty, early_stopping)
    beams = [Beam(0.0, [], None)]
    while True:
        for b in beams:
            lp = step_logprobs(b.token_ids)
            vals, ids = torch.topk(lp, search.keep)
            b.candidates = list(zip(ids.tolist(), vals.tolist()))
        chosen = search.step(beams)
        if search.done:
            break
        beams = [Beam(score, beams[i].token_ids + [t], None) for i, t, score in chosen]
    got = [(h.token_ids, round(h.score, 4)) for h in search.results()]
    assert got == want
