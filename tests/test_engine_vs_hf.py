"""Greedy output of the whole engine (real scheduler + worker, in one process) is token-for-token
equal to Hugging Face `generate` on the same float32 weights: all prompts scheduled together, and
again after prefix-cache hits, with n = 2 forks, under preemption, and with chunked prefill; n = 4
samples larger than the cache together; and a batch's logprobs equal HF's log-softmax. Each test
runs on every attention backend the machine has (tests/conftest.py ``backend_worker_factory``)."""
from __future__ import annotations

import pytest
import torch

from services.offline import Engine
from shared.config import CacheConfig, EngineConfig, SchedulerConfig
from shared.messages import AddRequest, SamplingParams

NEW_TOKENS = 32
PARAGRAPH = ("The history of paged memory begins with the Atlas computer, which let programs use more "
             "memory than the machine had by moving fixed-size pages between drum and core. ")
PROMPTS = [
    "Hello",
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "List three colours: red,",
    PARAGRAPH,
    PARAGRAPH * 2 + "In summary,",
    PARAGRAPH * 4 + "The key idea is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]
SYSTEM = PARAGRAPH * 2 + "Answer the question that follows.\n"


@pytest.fixture(scope="module")
def hf_greedy(hf_model, hf_tokenizer):
    """prompt token ids -> HF generate's new tokens (computed once per prompt)."""
    cache: dict[tuple[int, ...], list[int]] = {}

    def run(ids: list[int]) -> list[int]:
        key = tuple(ids)
        if key not in cache:
            with torch.inference_mode():
                out = hf_model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                        attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            cache[key] = out[0, len(ids):].tolist()
        return cache[key]

    return run


def make_engine(worker_factory, num_blocks=512, max_batched=2048, max_seqs=64, mode="recompute", host_blocks=64):
    config = EngineConfig(device="cpu", dtype="float32",
                          cache=CacheConfig(num_blocks=num_blocks, num_host_blocks=host_blocks),
                          scheduler=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max_batched,
                                                    max_model_len=2048, preemption_mode=mode))
    return Engine(config, worker_factory(num_blocks=num_blocks, num_host_blocks=host_blocks))


def requests(id_lists, n=1):
    return [AddRequest(request_id=f"r{i}", prompt_token_ids=ids,
                       sampling=SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, n=n))
            for i, ids in enumerate(id_lists)]


def assert_equal_hf(engine, id_lists, hf_greedy, n=1):
    reqs = requests(id_lists, n)
    got = engine.run(reqs)
    for r, ids in zip(reqs, id_lists):
        expected = hf_greedy(ids)
        for sample in got[r.request_id]:
            assert sample.token_ids == expected[: len(sample.token_ids)], f"prompt of {len(ids)} tokens"
            assert len(sample.token_ids) == len(expected) or sample.finish_reason == "stop"
    assert engine.scheduler.block_manager.num_free_blocks == engine.ready.num_blocks


@pytest.fixture(scope="module")
def prompt_ids(hf_tokenizer):
    return [hf_tokenizer.encode(p) for p in PROMPTS]


def test_batch_of_prompts_matches_hf(backend_worker_factory, prompt_ids, hf_greedy):
    assert len({len(p) for p in prompt_ids}) == len(prompt_ids)
    assert_equal_hf(make_engine(backend_worker_factory), prompt_ids, hf_greedy)


def test_prefix_cache_hits_match_hf(backend_worker_factory, hf_tokenizer, hf_greedy):
    ids = [hf_tokenizer.encode(SYSTEM + q) for q in ("What is paging?", "Who built Atlas?", "Why pages?")]
    engine = make_engine(backend_worker_factory)
    assert_equal_hf(engine, ids[:1], hf_greedy)       # fills the cache with the system prompt
    assert_equal_hf(engine, ids[1:], hf_greedy)       # later prompts hit it
    stats = engine.scheduler.stats()
    assert stats.prefix_cache_hits >= 2 * (len(hf_tokenizer.encode(SYSTEM)) // 16 - 1) * 16


def test_prompts_sharing_blocks_within_one_step_match_hf(backend_worker_factory, hf_tokenizer, hf_greedy):
    ids = [hf_tokenizer.encode(SYSTEM + q) for q in ("What is paging?", "Who built Atlas?", "Why pages?")]
    engine = make_engine(backend_worker_factory)
    assert_equal_hf(engine, ids, hf_greedy)           # one step: the last two read the first's blocks
    shared = len(hf_tokenizer.encode(SYSTEM)) // 16 - 1
    assert engine.scheduler.stats().prefix_cache_hits >= 2 * shared * 16


def test_parallel_greedy_forks_match_hf(backend_worker_factory, prompt_ids, hf_greedy):
    assert_equal_hf(make_engine(backend_worker_factory), prompt_ids[:4], hf_greedy, n=2)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_matches_hf(backend_worker_factory, prompt_ids, hf_greedy, mode):
    engine = make_engine(backend_worker_factory, num_blocks=20, mode=mode, host_blocks=64)
    assert_equal_hf(engine, prompt_ids, hf_greedy)
    assert engine.scheduler.stats().num_preemptions > 0


def test_chunked_prefill_matches_hf(backend_worker_factory, prompt_ids, hf_greedy):
    assert_equal_hf(make_engine(backend_worker_factory, max_batched=48), prompt_ids, hf_greedy)


def test_n4_samples_larger_than_the_cache_together_finish_by_preempting_siblings(backend_worker_factory, hf_tokenizer,
                                                                                  hf_greedy):
    """docs/RELIABILITY.md: a request whose n samples fit the KV cache one at a time, not together,
    completes (siblings preempted by recompute): n=4 greedy samples of 24 tokens in 8 blocks of 4
    tokens. Every sample still equals HF's greedy continuation."""
    ids = hf_tokenizer.encode("The capital of France is")
    assert len(ids) + 24 <= 8 * 4 < 4 * (len(ids) + 24)
    config = EngineConfig(device="cpu", dtype="float32", cache=CacheConfig(block_size=4, num_blocks=8),
                          scheduler=SchedulerConfig(max_num_seqs=8, max_model_len=32, preemption_mode="recompute"))
    engine = Engine(config, backend_worker_factory(num_blocks=8, block_size=4))
    got = engine.run([AddRequest(request_id="n4", prompt_token_ids=ids,
                                 sampling=SamplingParams(temperature=0.0, max_tokens=24, n=4))])
    expected = hf_greedy(ids)[:24]
    assert len(expected) == 24                           # HF does not stop early on this prompt
    assert [s.token_ids for s in got["n4"]] == [expected] * 4
    assert [s.finish_reason for s in got["n4"]] == ["length"] * 4
    assert engine.scheduler.stats().num_preemptions > 0
    assert engine.scheduler.block_manager.num_free_blocks == 8


LOGPROB_TOL = 1e-4      # absolute, float32


def test_batch_logprobs_equal_hf_log_softmax(backend_worker_factory, hf_model, prompt_ids):
    """Several sequences of different lengths in one batch, sampled (temperature 1) under
    preemption: each token's logprob and top-3 equal HF's log-softmax teacher-forced on the
    prompt + the generated tokens (one HF forward per sequence), within LOGPROB_TOL."""
    engine = make_engine(backend_worker_factory, num_blocks=20)
    reqs = [AddRequest(request_id=f"r{i}", prompt_token_ids=ids,
                       sampling=SamplingParams(temperature=1.0, seed=i, max_tokens=16, logprobs=3, ignore_eos=True))
            for i, ids in enumerate(prompt_ids)]
    got = engine.run(reqs)
    assert engine.scheduler.stats().num_preemptions > 0
    for r in reqs:
        sample = got[r.request_id][0]
        ids = r.prompt_token_ids + sample.token_ids
        with torch.inference_mode():
            rows = hf_model(torch.tensor([ids])).logits[0, len(r.prompt_token_ids) - 1:-1].float().log_softmax(-1)
        assert len(sample.logprobs) == len(sample.token_ids) == 16
        for pos, (tok, lp) in enumerate(zip(sample.token_ids, sample.logprobs)):
            assert abs(lp.logprob - rows[pos, tok].item()) <= LOGPROB_TOL, (r.request_id, pos)
            third = rows[pos].topk(3).values[-1].item()      # ids may swap only within a near tie
            assert len(lp.top_token_ids) == 3 and lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
            for i, v in zip(lp.top_token_ids, lp.top_logprobs):
                assert abs(v - rows[pos, i].item()) <= LOGPROB_TOL and v >= third - LOGPROB_TOL, (r.request_id, pos)
