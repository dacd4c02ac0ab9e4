"""Structured outputs in the scheduler: matchers, masks in the plan, grammar completion, and the
matcher state through forks, preemption, an executor restart and deferred masks. Driven against
the strict fake executor, which samples only tokens the plan's masks allow; the tokenizer is the
default model's, so the outputs are decoded and checked as JSON."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from services.scheduler.grammar import GrammarBackend, llguidance_tokenizer
from services.scheduler.scheduler import Scheduler
from shared.config import CacheConfig, SchedulerConfig
from shared.messages import AddRequest, GrammarSpec, SamplingParams, StepPlan, decode, encode
from shared.tokenizer import load_tokenizer
from tests.scheduler_harness import CheckedFakeExecutor, run_to_completion

EOS = 2
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                  "minItems": 1, "maxItems": 3}}}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("")


@pytest.fixture(scope="module")
def ll_tokenizer(tok):
    return llguidance_tokenizer(tok, len(tok), [EOS])


def make(ll_tokenizer, tok, num_blocks=256, cache_size=8, **cache):
    vocab = len(tok)
    backend = GrammarBackend(ll_tokenizer, vocab, cache_size)
    s = Scheduler(SchedulerConfig(max_model_len=512, max_num_batched_tokens=256).validate(),
                  CacheConfig(block_size=4, num_blocks=num_blocks, **cache).validate(),
                  eos_token_ids=[EOS], grammars=backend)
    ex = CheckedFakeExecutor(s)
    ex.vocab_size = vocab                     # masks are as wide as the model's vocabulary
    return s, ex


def add(s, rid, grammar, prompt=(5, 6, 7, 8, 9), **params):
    params.setdefault("max_tokens", 200)
    return s.add_request(AddRequest(request_id=rid, prompt_token_ids=list(prompt),
                                    sampling=SamplingParams(**params), grammar=grammar))


def schema(obj) -> GrammarSpec:
    return GrammarSpec("json_schema", json.dumps(obj))


def texts(results, tok):
    return {key: (tok.decode([t for t in toks if t != EOS]), reason)
            for key, (toks, reason) in results.items()}


def test_schema_outputs_parse_and_validate_and_blocks_are_freed(ll_tokenizer, tok):
    s, ex = make(ll_tokenizer, tok)
    for i in range(4):
        assert add(s, f"r{i}", schema(PERSON), prompt=range(10 + i, 20 + i)) is None
    out = texts(run_to_completion(s, ex), tok)
    assert len(out) == 4
    for text, reason in out.values():
        assert reason == "stop"
        jsonschema.validate(json.loads(text), PERSON)
    assert s.num_free_blocks == s.block_manager.num_blocks and s.num_constrained == 0
    assert s.grammars.num_compiles == 1 and s.grammars.num_cache_hits == 3


def test_unconstrained_requests_carry_no_masks(ll_tokenizer, tok):
    s, ex = make(ll_tokenizer, tok)
    s.add_request(AddRequest(request_id="plain", prompt_token_ids=[5, 6, 7],
                             sampling=SamplingParams(max_tokens=4)))
    add(s, "json", GrammarSpec("json_object"))
    plans: list[StepPlan] = []
    run_to_completion(s, ex, on_plan=plans.append)
    plain_id, json_id = 0, 1
    assert all(plain_id not in p.mask_seq_ids for p in plans)
    assert any(json_id in p.mask_seq_ids for p in plans)
    for p in plans:
        assert len(p.masks) == len(p.mask_seq_ids) * ((len(tok) + 31) // 32) * 4


@pytest.mark.parametrize("spec, check", [
    (GrammarSpec("regex", r"[a-z]{3,6}-\d{2}"), lambda t: re.fullmatch(r"[a-z]{3,6}-\d{2}", t)),
    (GrammarSpec("choice", json.dumps(["red", "green", "blue"])), lambda t: t in ("red", "green", "blue")),
    (GrammarSpec("lark", 'start: "yes" | "no" | "maybe"'), lambda t: t in ("yes", "no", "maybe")),
    (GrammarSpec("json_object"), lambda t: isinstance(json.loads(t), dict)),
])
def test_each_grammar_kind_is_obeyed(ll_tokenizer, tok, spec, check):
    s, ex = make(ll_tokenizer, tok)
    add(s, "r", spec, max_tokens=64)
    ((text, reason),) = texts(run_to_completion(s, ex), tok).values()
    assert check(text), text
    assert reason == "stop"


def test_forked_samples_each_follow_the_grammar(ll_tokenizer, tok):
    s, ex = make(ll_tokenizer, tok)
    add(s, "r", schema(PERSON), n=3)
    out = texts(run_to_completion(s, ex), tok)
    assert s.num_constrained == 0
    assert sorted(k[1] for k in out) == [0, 1, 2]
    for text, reason in out.values():
        jsonschema.validate(json.loads(text), PERSON)
    assert len({t for t, _ in out.values()}) == 3          # the fake samples differ per sample


def test_grammar_that_cannot_finish_ends_with_length(ll_tokenizer, tok):
    s, ex = make(ll_tokenizer, tok)
    add(s, "r", GrammarSpec("regex", r"\d{40}"), max_tokens=5)    # digits are single tokens
    ((toks, reason),) = run_to_completion(s, ex).values()
    assert reason == "length" and len(toks) == 5
    assert s.num_free_blocks == s.block_manager.num_blocks


def test_preemption_keeps_the_matcher_in_step(ll_tokenizer, tok):
    """A pool too small for all of them at once: sequences are preempted (recompute) and come
    back; their matchers never see a token twice, so every output still validates."""
    s, ex = make(ll_tokenizer, tok, num_blocks=24)
    for i in range(6):
        add(s, f"r{i}", schema(PERSON), prompt=range(30 * i + 10, 30 * i + 22))
    out = texts(run_to_completion(s, ex), tok)
    assert s.num_preemptions > 0
    for text, reason in out.values():
        assert reason == "stop"
        jsonschema.validate(json.loads(text), PERSON)
    assert s.num_free_blocks == s.block_manager.num_blocks


def test_executor_restart_keeps_the_matcher_in_step(ll_tokenizer, tok):
    s, ex = make(ll_tokenizer, tok)
    add(s, "r", schema(PERSON))
    results = {}
    for _ in range(6):                                   # part of the object, then the executor dies
        plan = s.schedule()
        for o in s.update(plan, ex.execute(plan)):
            results.setdefault(o.index, []).extend(o.token_ids)
    s.reset_for_new_executor()
    ex = CheckedFakeExecutor(s)
    ex.vocab_size = len(tok)
    for (_, i), (toks, reason) in run_to_completion(s, ex).items():
        results[i].extend(toks)
    text = tok.decode([t for t in results[0] if t != EOS])
    jsonschema.validate(json.loads(text), PERSON)


def test_deferred_masks_equal_inline_ones(ll_tokenizer, tok):
    runs = []
    for defer in (False, True):
        s, ex = make(ll_tokenizer, tok)
        add(s, "r", schema(PERSON), n=2)
        masks = []
        while s.has_unfinished():
            plan = s.schedule(defer_masks=defer)
            if defer:
                assert plan.masks == b""
                frame = decode(encode(s.step_masks(plan)))
                masks.append(frame.masks)
                result = ex.execute(plan, lambda: frame.masks)
            else:
                masks.append(plan.masks)
                result = ex.execute(plan)
            s.update(plan, result)
        runs.append(masks)
    assert runs[0] == runs[1]


def test_step_masks_only_for_the_plan_in_flight(ll_tokenizer, tok):
    s, ex = make(ll_tokenizer, tok)
    add(s, "r", GrammarSpec("json_object"))
    plan = s.schedule(defer_masks=True)
    s.update(plan, ex.execute(plan, lambda: s.step_masks(plan).masks))
    with pytest.raises(ValueError, match="in flight"):
        s.step_masks(plan)


def test_a_grammar_that_does_not_compile_is_refused(ll_tokenizer, tok):
    s, _ = make(ll_tokenizer, tok)
    error = add(s, "r", GrammarSpec("lark", "start: missing_rule"))
    assert error is not None and error.code == "invalid" and "missing_rule" in error.message
    assert not s.has_unfinished()


def test_no_backend_refuses_structured_requests():
    s = Scheduler(SchedulerConfig(max_model_len=64).validate(), CacheConfig(block_size=4, num_blocks=16))
    error = add(s, "r", GrammarSpec("json_object"))
    assert error is not None and error.code == "invalid" and "structured outputs" in error.message


def test_grammar_cache_is_bounded(ll_tokenizer, tok):
    s, ex = make(ll_tokenizer, tok, cache_size=2)
    for i in range(5):
        add(s, f"r{i}", GrammarSpec("regex", f"x{{{i + 1}}}"), max_tokens=8)
    add(s, "again", GrammarSpec("regex", "x{5}"), max_tokens=8)       # the newest: still cached
    assert s.grammars.num_cached == 2
    assert s.grammars.num_compiles == 5 and s.grammars.num_cache_hits == 1
    out = texts(run_to_completion(s, ex), tok)
    assert out[("r2", 0)][0] == "xxx" and out[("again", 0)][0] == "xxxxx"


def test_a_smaller_model_vocabulary_than_the_tokenizer_is_refused(tok):
    from shared.grammar import GrammarError

    with pytest.raises(GrammarError, match="smaller"):
        llguidance_tokenizer(tok, 256, [EOS])
