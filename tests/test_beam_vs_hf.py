"""Beam search on the default model (float32) against Hugging Face ``generate(num_beams=K,
num_return_sequences=K, do_sample=False, length_penalty=L, early_stopping=E)``: every one of the
K hypotheses, in order, token for token; also on a KV pool small enough to preempt beams, with
the prompts' blocks already in the prefix cache, and with every block free afterwards."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from services.offline import LLM
from shared.config import EngineConfig, SchedulerConfig

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a prime number is."]
CASES = [(2, 1.0, False), (4, 0.7, True), (4, 1.3, False), (2, 2.0, True)]     # K, length_penalty, early_stopping
MAX_NEW = 12


@pytest.fixture(scope="module")
def prompts(hf_tokenizer):
    return [list(hf_tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)) for q in QUESTIONS]


@pytest.fixture(scope="module")
def hf_beams(hf_model):
    """HF's K beams for (prompt, eos, K, L, E), each computed once for the module."""
    @lru_cache(maxsize=None)
    def run(prompt: tuple, eos: tuple, width, length_penalty, early_stopping):
        return _hf_beams(hf_model, list(prompt), list(eos), width, length_penalty, early_stopping)
    return run


def _hf_beams(hf_model, prompt, eos, width, length_penalty, early_stopping):
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=width,
                                num_return_sequences=width, do_sample=False, max_new_tokens=MAX_NEW,
                                length_penalty=length_penalty, early_stopping=early_stopping,
                                eos_token_id=list(eos), pad_token_id=eos[0])
    beams = []
    for row in out[:, len(prompt):].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        beams.append(row[:end])
    return beams


def engine(default_worker_factory, hf_tokenizer, num_blocks):
    config = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=64))
    return LLM(config, worker=default_worker_factory(num_blocks=num_blocks, block_size=16, num_host_blocks=0),
               tokenizer=hf_tokenizer)


def check_against_hf(llm, hf_beams, prompts, width, length_penalty, early_stopping):
    eos = tuple(llm.engine.ready.eos_token_ids)
    got = llm.beam_search(prompts, width, MAX_NEW, length_penalty, early_stopping)
    for prompt, completion in zip(prompts, got):
        want = hf_beams(tuple(prompt), eos, width, length_penalty, early_stopping)
        assert [s.token_ids for s in completion.samples] == want
        assert all(s.cumulative_logprob < 0 for s in completion.samples)
    scheduler = llm.engine.scheduler
    assert not scheduler.has_unfinished() and scheduler.num_free_blocks == scheduler.block_manager.num_blocks


@pytest.mark.parametrize("width, length_penalty, early_stopping", CASES)
def test_every_beam_matches_hf(default_worker_factory, hf_tokenizer, hf_beams, prompts, width, length_penalty,
                               early_stopping):
    llm = engine(default_worker_factory, hf_tokenizer, num_blocks=256)
    check_against_hf(llm, hf_beams, prompts, width, length_penalty, early_stopping)
    check_against_hf(llm, hf_beams, prompts, width, length_penalty, early_stopping)   # now from the prefix cache
    assert llm.engine.scheduler.block_manager.prefix_hits > 0


def test_beams_match_hf_when_a_small_pool_preempts_them(default_worker_factory, hf_tokenizer, hf_beams, prompts):
    llm = engine(default_worker_factory, hf_tokenizer, num_blocks=16)
    check_against_hf(llm, hf_beams, prompts, *CASES[2])
    assert llm.engine.scheduler.num_preemptions > 0
