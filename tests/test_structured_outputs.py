"""Structured outputs on the default model, in process (offline engine, the real executor): every
output of twenty JSON Schemas, greedy and sampled with three seeds, parses and validates; any JSON
object parses whenever it ends, regular expressions and choices always match; the grammar state
survives preemption."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from services.offline import LLM
from shared.config import EngineConfig, SchedulerConfig
from shared.messages import GrammarSpec, SamplingParams
from benchmarks.structured_cases import SCHEMAS, prompt_for

SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def llm(default_worker_factory, hf_tokenizer):
    config = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=128, max_waiting=4096))
    return LLM(config, worker=default_worker_factory(num_blocks=1024), tokenizer=hf_tokenizer)


def run_all(llm, requests: list[tuple[list[int], SamplingParams, GrammarSpec]]):
    """Every request in one batch; (text, finish reason) each, and every block free after."""
    prompts, params, grammars = (list(x) for x in zip(*requests))
    completions = llm.generate(prompts, params, grammar=grammars)
    scheduler = llm.engine.scheduler
    assert scheduler.num_free_blocks == scheduler.block_manager.num_blocks
    return [(c.samples[0].text, c.samples[0].finish_reason) for c in completions]


def test_twenty_schemas_greedy_and_sampled_always_validate(llm):
    requests, schemas = [], []
    for description, schema in SCHEMAS:
        prompt = llm.encode_chat(prompt_for(description))
        grammar = GrammarSpec("json_schema", json.dumps(schema))
        for temperature, seed in [(0.0, None)] + [(1.0, s) for s in SEEDS]:
            requests.append((prompt, SamplingParams(max_tokens=160, temperature=temperature, seed=seed), grammar))
            schemas.append(schema)
    outputs = run_all(llm, requests)
    for (text, reason), schema in zip(outputs, schemas):
        assert reason == "stop", (reason, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_output_is_an_object_whenever_it_ends(llm):
    """Any JSON object: nothing bounds its length, and the small model sometimes writes one key
    or string without end (greedy too), so an output either ends ("stop") and parses as an
    object, or is cut at max_tokens ("length"). On these prompts most end."""
    prompts = [llm.encode_chat([{"role": "user", "content": text}]) for text in (
        "Describe a cat as a JSON object with two keys.", "Give me a JSON object with your name.",
        "When is the meeting?")]
    requests = [(p, SamplingParams(max_tokens=96, temperature=t, seed=s), GrammarSpec("json_object"))
                for p in prompts for t, s in [(0.0, None)] + [(1.0, s) for s in SEEDS]]
    ended = 0
    for (text, reason), (prompt, params, _) in zip(run_all(llm, requests), requests):
        if reason == "stop":
            assert isinstance(json.loads(text), dict), text
            ended += 1
        else:
            assert reason == "length" and text.startswith("{"), (reason, text)
    assert ended >= len(requests) // 2, f"only {ended} of {len(requests)} objects ended"


@pytest.mark.parametrize("grammar, matches", [
    (GrammarSpec("regex", r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun) [0-2][0-9]:[0-5][0-9]"),
     lambda t: re.fullmatch(r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun) [0-2][0-9]:[0-5][0-9]", t)),
    (GrammarSpec("choice", json.dumps(["positive", "negative", "neutral"])),
     lambda t: t in ("positive", "negative", "neutral")),
])
def test_regex_and_choice_always_match(llm, grammar, matches):
    prompts = [llm.encode_chat([{"role": "user", "content": text}]) for text in (
        "Describe a cat.", "When is the meeting?", "How was the film? Great fun!")]
    requests = [(p, SamplingParams(max_tokens=64, temperature=t, seed=s), grammar)
                for p in prompts for t, s in [(0.0, None)] + [(1.0, s) for s in SEEDS]]
    for text, reason in run_all(llm, requests):
        assert reason == "stop" and matches(text), (reason, text)


def test_grammar_survives_preemption_on_a_small_pool(default_worker_factory, hf_tokenizer):
    """Eight sampled requests on 16 blocks of 16: they preempt each other (recompute) and still
    validate, with every block free at the end."""
    config = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=8))
    llm = LLM(config, worker=default_worker_factory(num_blocks=16, num_host_blocks=0), tokenizer=hf_tokenizer)
    description, schema = SCHEMAS[19]
    prompt = llm.encode_chat(prompt_for(description))
    grammar = GrammarSpec("json_schema", json.dumps(schema))
    outputs = run_all(llm, [(prompt, SamplingParams(max_tokens=160, temperature=1.0, seed=s), grammar)
                            for s in range(8)])
    assert llm.engine.scheduler.num_preemptions > 0
    for text, reason in outputs:
        assert reason == "stop"
        jsonschema.validate(json.loads(text), schema)


def test_a_grammar_longer_than_max_tokens_ends_with_length(llm):
    prompt = llm.encode_chat([{"role": "user", "content": "Count."}])
    (c,) = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0),
                        grammar=GrammarSpec("regex", r"[0-9]{30}"))
    assert c.samples[0].finish_reason == "length" and len(c.samples[0].token_ids) == 4


def test_offline_generate_refuses_a_bad_schema(llm):
    with pytest.raises(ValueError, match="minimum"):
        llm.generate([[1, 2, 3]], grammar=GrammarSpec("json_schema", '{"type": "integer", "minimum": "x"}'))
