"""`pagedserve generate` in-process: argument parsing by the real CLI parser, the offline engine on
the session's loaded model (no second load), JSON output in input order, and clear error exits
for bad input (checked before any model is loaded)."""
from __future__ import annotations

import json

import pytest
import torch

from services import offline
from services.cli import build_parser, main

MAX_TOKENS = 8


def _record_llms(monkeypatch) -> list:
    """Make `offline.LLM` remember every instance it creates (in the returned list)."""
    made = []

    class RecordingLLM(offline.LLM):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(offline, "LLM", RecordingLLM)
    return made


@pytest.fixture
def generate(default_worker_factory, hf_tokenizer, capsys, monkeypatch):
    """Run `pagedserve generate ARGV...` on a fresh worker around the session model; returns
    (exit status, stdout lines, the LLM it used) so tests can check that every block came back."""
    made = _record_llms(monkeypatch)

    def run(*argv: str):
        full = ["generate", *argv]
        parser, module = build_parser(full)
        assert module is offline
        status = offline.run(parser.parse_args(full), worker=default_worker_factory(), tokenizer=hf_tokenizer)
        lines = capsys.readouterr().out.splitlines()
        return status, lines, made[-1]
    return run


def _drained(llm) -> bool:
    """Every request finished and every KV block back in the pool."""
    sched = llm.engine.scheduler
    return not sched.has_unfinished() and sched.num_free_blocks == llm.engine.ready.num_blocks


def _hf_greedy(hf_model, hf_tokenizer, prompt: str, max_new: int) -> list[int]:
    """Hugging Face greedy continuation of ``prompt``, EOS not stopping it (the oracle)."""
    ids = torch.tensor([hf_tokenizer.encode(prompt)])
    with torch.inference_mode():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                                eos_token_id=[], pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture
def generate_loading(default_loaded_model, hf_tokenizer, capsys, monkeypatch):
    """Run `pagedserve generate ARGV...` the way the command does, the worker built from the
    EngineConfig the CLI made (around the session's weights instead of a second load); returns
    (exit status, stdout lines, the LLM, the EngineConfig the worker got)."""
    from services.executor import worker as worker_module

    real_worker, configs = worker_module.Worker, []

    def build(config):
        configs.append(config)
        return real_worker.from_loaded(default_loaded_model, config)

    monkeypatch.setattr(worker_module, "Worker", build)
    made = _record_llms(monkeypatch)

    def run(*argv: str):
        full = ["generate", *argv]
        parser, _ = build_parser(full)
        status = offline.run(parser.parse_args(full), tokenizer=hf_tokenizer)
        return status, capsys.readouterr().out.splitlines(), made[-1], configs[-1]
    return run


def test_two_prompts_json_match_hf_and_the_engine_options_arrive(generate_loading, hf_model, hf_tokenizer):
    """Token ids equal HF greedy; --dtype/--device/--block-size/--num-blocks reach the worker."""
    prompts = ["The capital of France is", "One, two, three,"]
    status, lines, llm, config = generate_loading(
        "--prompt", prompts[0], "--prompt", prompts[1], "--json", "--max-tokens", str(MAX_TOKENS), "--ignore-eos",
        "--dtype", "float32", "--device", "cpu", "--block-size", "8", "--num-blocks", "40")
    assert status == 0 and _drained(llm)
    assert (config.dtype, config.device, config.cache.block_size, config.cache.num_blocks) == ("float32", "cpu", 8, 40)
    worker = llm.engine.worker
    assert (llm.engine.ready.block_size, llm.engine.ready.num_blocks) == (8, 40)
    assert all(c.dtype == torch.float32 and c.device.type == "cpu" and c.shape[1] == 40 and c.shape[3] == 8
               for c in worker.kv.device_caches)       # kv[2, num_blocks, kv_heads, block_size, head_dim]
    rows = [json.loads(line) for line in lines]
    assert [r["prompt"] for r in rows] == prompts
    for prompt, r in zip(prompts, rows):
        expected = _hf_greedy(hf_model, hf_tokenizer, prompt, MAX_TOKENS)
        assert r["token_ids"] == expected
        assert r["text"] == hf_tokenizer.decode(expected, skip_special_tokens=True)
        assert r["finish_reason"] == "length"


def test_input_file_prompt_and_messages_n2(generate, tmp_path):
    items = [{"prompt": "Once upon a time"},
             {"messages": [{"role": "user", "content": "Name a colour."}]},
             {"prompt": "def add(a, b):"}]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(i) for i in items) + "\n\n", encoding="utf-8")   # blank line skipped
    status, lines, llm = generate("--input", str(path), "--json", "--n", "2", "--temperature", "0.8",
                                     "--seed", "7", "--max-tokens", str(MAX_TOKENS), "--ignore-eos")
    assert status == 0 and _drained(llm)
    rows = [json.loads(line) for line in lines]
    assert len(rows) == len(items)
    for item, r in zip(items, rows):
        assert {k: r[k] for k in item} == item                      # echoed input, same order
        assert isinstance(r["text"], list) and len(r["text"]) == 2
        assert len(r["token_ids"]) == 2 and all(len(ids) == MAX_TOKENS for ids in r["token_ids"])
        assert r["finish_reason"] == ["length", "length"]


def test_plain_text_output(generate):
    status, lines, llm = generate("--prompt", "Hello", "--max-tokens", "4", "--ignore-eos")
    assert status == 0 and _drained(llm)
    assert lines[-1] == "-" * 40


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),                                        # no such file
    ('{"prompt": "ok"}\n{"prompt": \n', "in.jsonl:2: not JSON"),
    ('{"prompt": "ok", "temperature": 1}\n', "unknown key(s) 'temperature'"),
    ('{"prompt": "a", "messages": []}\n', "expected one of"),
    ('["a prompt"]\n', "expected a JSON object"),
    ('{"prompt": 3}\n', "prompt must be a string"),
    ('{"messages": [{"role": "user"}]}\n', "messages must be a non-empty list"),
    ("\n\n", "no inputs"),
])
def test_bad_input_file_is_a_clear_error_exit(tmp_path, content, message, monkeypatch):
    def no_model(*a, **kw):
        raise AssertionError("the model must not load for bad input")
    monkeypatch.setattr(offline, "LLM", no_model)
    path = tmp_path / "in.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--input", str(path)])
    text = str(exc.value.code)
    assert text.startswith("pagedserve generate: ") and message in text
    assert "Traceback" not in text


def test_bad_sampling_option_is_a_clear_error_exit(monkeypatch):
    monkeypatch.setattr(offline, "LLM", lambda *a, **kw: pytest.fail("the model must not load"))
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "hi", "--n", "0"])
    assert str(exc.value.code).startswith("pagedserve generate: ")


def test_json_schema_constrains_every_output(generate, tmp_path):
    schema = {"type": "object", "required": ["colour"], "additionalProperties": False,
              "properties": {"colour": {"enum": ["red", "green", "blue"]}}}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema), encoding="utf-8")
    status, lines, llm = generate("--prompt", "Pick a colour:", "--prompt", "Another one:", "--json",
                                     "--json-schema", str(path), "--max-tokens", "32",
                                     "--temperature", "1.0", "--seed", "3")
    assert status == 0 and _drained(llm)
    for line in lines:
        row = json.loads(line)
        assert row["finish_reason"] == "stop" and json.loads(row["text"])["colour"] in schema["properties"]["colour"]["enum"]


@pytest.mark.parametrize("argv, message", [
    (["--regex", "[a-"], "--regex: "),
    (["--json-schema", "/nonexistent/schema.json"], "cannot read"),
    (["--regex", "a", "--grammar", "g.lark"], "not allowed with"),
])
def test_a_bad_constraint_is_a_clear_error_exit_before_loading(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(offline, "LLM", lambda *a, **kw: pytest.fail("the model must not load"))
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "hi", *argv])
    text = str(exc.value.code) + capsys.readouterr().err
    assert message in text and "Traceback" not in text


def test_beam_width_json_lists_the_hypotheses_best_first(generate):
    """--beam-width 2: text, token_ids, finish_reason and cumulative_logprob are lists of the 2
    hypotheses, equal to LLM.beam_search's on the same engine."""
    prompts = ["The capital of France is", "One, two, three,"]
    status, lines, llm = generate("--prompt", prompts[0], "--prompt", prompts[1], "--json", "--beam-width", "2",
                                  "--length-penalty", "0.8", "--max-tokens", str(MAX_TOKENS))
    assert status == 0 and _drained(llm)
    rows = [json.loads(line) for line in lines]
    want = llm.beam_search(prompts, 2, MAX_TOKENS, length_penalty=0.8)
    for prompt, r, c in zip(prompts, rows, want):
        assert r["prompt"] == prompt
        assert r["token_ids"] == [s.token_ids for s in c.samples]
        assert r["text"] == [s.text for s in c.samples]
        assert r["finish_reason"] == [s.finish_reason for s in c.samples]
        assert r["cumulative_logprob"] == [s.cumulative_logprob for s in c.samples]
        assert len(r["text"]) == 2 and all(lp < 0 for lp in r["cumulative_logprob"])


@pytest.mark.parametrize("argv, message", [
    (["--beam-width", "2", "--temperature", "0.7"], "--temperature"),
    (["--beam-width", "2", "--n", "3"], "--n"),
    (["--beam-width", "2", "--top-p", "0.9"], "--top-p"),
    (["--beam-width", "2", "--top-k", "5"], "--top-k"),
    (["--beam-width", "2", "--seed", "1"], "--seed"),
    (["--beam-width", "2", "--regex", "a+"], "--regex"),
    (["--beam-width", "2", "--json-schema", "/nonexistent/schema.json"], "--json-schema"),
    (["--beam-width", "0"], "--beam-width must be at least 1"),
    (["--length-penalty", "1.2"], "--length-penalty: beam search options, given without --beam-width"),
    (["--early-stopping"], "--early-stopping: beam search options, given without --beam-width"),
])
def test_bad_beam_options_are_a_clear_error_exit_before_loading(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(offline, "LLM", lambda *a, **kw: pytest.fail("the model must not load"))
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "hi", *argv])
    text = str(exc.value.code)
    assert text.startswith("pagedserve generate: ") and message in text and "\n" not in text
