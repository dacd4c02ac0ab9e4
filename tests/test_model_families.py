"""Every supported HF architecture (issue #15) generates what Hugging Face generates, token for token.

The checkpoints are tiny random ones of each family (tests/model_families.py), built once per
session; the oracle is transformers' greedy ``generate`` on the same folder in float32, one
unpadded prompt at a time, EOS not stopping it (``ignore_eos`` on our side) except in the EOS test.

Paths, per family:
- the offline engine (``services.offline.Engine`` on ``--model DIR``): a short prompt, a prompt
  several sliding windows long (Mistral and Gemma 3 have a 12-token window), the long prompt again
  and an extension of it (prefix-cache hits, counted on the request), greedy forks (n=2: both
  equal the oracle), and a KV pool too small for the batch (preemption, counted by the scheduler);
- ``pagedserve generate --model DIR`` (the real CLI parser and command, in process), with a chat
  message through the folder's chat template;
- ``pagedserve serve DIR`` over HTTP for three families only (a server costs ~10 s of start-up on
  two cores; Gemma 3, Qwen3-MoE and Qwen2 are the ones furthest from Llama: sliding + global
  layers, experts, tied embeddings with biases), completions and chat with the tokens read back
  from ``logprobs``;
- a sharded checkpoint (index file) and bfloat16 / float16 checkpoints, run in float32 and compared
  with HF in float32 on the same (rounded) weights; a bfloat16 run is only checked to generate;
- refusals: an unsupported architecture and each unimplemented math-changing field raise
  ``UnsupportedModel`` naming it at load, and ``pagedserve generate`` exits non-zero naming it.

Planted faults these tests caught (each monkeypatched onto ``ModelConfig.from_hf`` in a throwaway
run, nothing edited; only the family's engine / CLI tests were run): Gemma 3's attention scale
1/sqrt(head_dim) instead of query_pre_attn_scalar (engine, preemption x3, CLI); Mistral's window
dropped (engine, preemption x3); Gemma 3's local RoPE base set to the global one, Qwen3-MoE's
norm_topk_prob flipped, Qwen3's q/k norm off (each: the prefix/fork engine test).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import httpx
import pytest
import torch

from tests import model_families as mf
from tests.serve_harness import start_serve, wait_healthy

pytestmark = pytest.mark.timeout(600)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW = 20
BLOCK_SIZE = 8              # not a divisor of the window: windows end mid-block
MAX_MODEL_LEN = 256

SHORT = "The paged cache keeps"
LONG = ("Once upon a time there was a little paging system that kept its blocks in order, "
        "and the blocks were shared")          # 83 tokens: about seven 12-token windows
EXTENDED = LONG + " between the requests that"
CHAT = [{"role": "user", "content": "Tell me about the sliding window."}]
TINY = "Pages"                  # grows from one block: under a window the footprint still grows at first
TEXTS = {"tiny": TINY, "short": SHORT, "long": LONG, "extended": EXTENDED}

SERVED_FAMILIES = ("gemma3", "qwen3_moe", "qwen2")


# ------------------------------------------------------------------------------------ fixtures

class Family:
    """One built checkpoint and its oracle: ``prompts[name]`` token ids, ``expected[name]`` HF's tokens."""

    def __init__(self, name: str, path: str, prompts: dict[str, list[int]], expected: dict[str, list[int]],
                 seed: int, margin: float):
        self.name, self.path, self.prompts, self.expected, self.seed, self.margin = \
            name, path, prompts, expected, seed, margin


def _oracle(path: str, prompts: dict[str, list[int]], dtype=torch.float32) -> tuple[dict[str, list[int]], float]:
    model = mf.load_hf(path, dtype)
    expected, margin = {}, float("inf")
    for name, ids in prompts.items():
        expected[name], m = mf.hf_greedy(model, ids, MAX_NEW, use_eos=False)
        margin = min(margin, m)
    return expected, margin


def _build(family: str, directory, **kw) -> Family:
    """The first seed whose greedy margins are clear at every step of every prompt and whose
    continuations are not one token repeated (that would hide position and cache errors)."""
    tok = mf.build_tokenizer()
    prompts = {k: tok.encode(v) for k, v in TEXTS.items()}
    prompts["chat"] = list(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False))
    for seed in range(8):
        path = mf.make_checkpoint(family, os.path.join(str(directory), f"{family}-{seed}"), seed=seed, **kw)
        expected, margin = _oracle(path, prompts)
        if margin >= mf.MIN_MARGIN and all(len(set(t)) >= 3 for t in expected.values()):
            return Family(family, path, prompts, expected, seed, margin)
        shutil.rmtree(path)
    raise AssertionError(f"{family}: no seed in 0..7 gives greedy margins >= {mf.MIN_MARGIN} and varied tokens")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Family]:
    root = tmp_path_factory.mktemp("families")
    return {f: _build(f, root) for f in mf.FAMILIES}


@pytest.fixture(params=mf.FAMILIES)
def family(request, checkpoints) -> Family:
    return checkpoints[request.param]


def test_the_fixtures_are_what_they_claim(checkpoints):
    """Sliding-window prompts are longer than the window, the oracle is not degenerate, and the
    families really differ where they should (biases, q/k norms, layer types, experts)."""
    from transformers import AutoConfig
    for f in checkpoints.values():
        assert len(f.prompts["long"]) > 4 * mf.SLIDING_WINDOW
        assert f.prompts["extended"][:len(f.prompts["long"])] == f.prompts["long"]
        for name, toks in f.expected.items():
            assert len(toks) == MAX_NEW and len(set(toks)) >= 3, (f.name, name, toks)
        cfg = AutoConfig.from_pretrained(f.path)
        assert cfg.vocab_size == len(mf.build_tokenizer())
    g = AutoConfig.from_pretrained(checkpoints["gemma3"].path)
    assert set(g.layer_types) == {"sliding_attention", "full_attention"}
    assert g.query_pre_attn_scalar != g.head_dim and g.head_dim * g.num_attention_heads != g.hidden_size
    assert AutoConfig.from_pretrained(checkpoints["mistral"].path).sliding_window == mf.SLIDING_WINDOW
    from safetensors import safe_open
    with safe_open(os.path.join(checkpoints["qwen2"].path, "model.safetensors"), "pt") as st:
        assert st.get_tensor("model.layers.0.self_attn.q_proj.bias").abs().min() > 0
        assert "lm_head.weight" not in st.keys()                        # tied
    with safe_open(os.path.join(checkpoints["qwen3"].path, "model.safetensors"), "pt") as st:
        assert (st.get_tensor("model.layers.0.self_attn.q_norm.weight") - 1).abs().max() > 0.1


@pytest.mark.parametrize("name, wrong", [
    ("mistral", {"sliding_window": 4096}),                 # the window ignored
    ("gemma3", {"sliding_window": 4096}),
    ("gemma3", {"query_pre_attn_scalar": 24}),             # scale 1/sqrt(head_dim) instead
    ("gemma3", {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}}),
])
def test_the_oracle_sees_the_family_details(name, wrong, checkpoints):
    """HF with one family detail dropped generates something else for the long prompt: the
    comparisons above can fail on that detail."""
    from transformers import AutoModelForCausalLM
    f = checkpoints[name]
    model = AutoModelForCausalLM.from_pretrained(f.path, dtype=torch.float32, local_files_only=True, **wrong).eval()
    got, _ = mf.hf_greedy(model, f.prompts["long"], MAX_NEW, use_eos=False)
    assert got != f.expected["long"]


# ---------------------------------------------------------------------------------------- engine

def _engine(path: str, num_blocks: int = 0, dtype: str = "float32", backend: str = "auto",
            prefix_caching: bool = True, num_host_blocks: int = 0, tensor_parallel_size: int = 1, **sched):
    from services.offline import Engine
    from shared.config import CacheConfig, EngineConfig, SchedulerConfig

    config = EngineConfig(model=path, dtype=dtype, device="cuda" if backend == "cuda" else "cpu",
                          attention_backend=backend, tensor_parallel_size=tensor_parallel_size,
                          cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks,
                                            num_host_blocks=num_host_blocks, enable_prefix_caching=prefix_caching),
                          scheduler=SchedulerConfig(**{"max_model_len": MAX_MODEL_LEN, **sched}))
    return Engine(config.validate())


def _run(engine, jobs: list[tuple[str, list[int], int]], *, ignore_eos: bool = True):
    """Run (request id, prompt ids, n) to completion on ``engine``; returns {id: ([tokens per sample],
    cached prompt tokens, [finish reasons])}; ``engine.max_swapped``: the most sequences swapped out at once."""
    from shared.messages import AddRequest, SamplingParams

    got = {rid: ([[] for _ in range(n)], 0, [None] * n) for rid, _, n in jobs}
    for rid, ids, n in jobs:
        engine.add(AddRequest(request_id=rid, prompt_token_ids=list(ids),
                              sampling=SamplingParams(n=n, max_tokens=MAX_NEW, temperature=0.0,
                                                      ignore_eos=ignore_eos)))
    steps, engine.max_swapped = 0, 0
    while engine.scheduler.has_unfinished():
        engine.max_swapped = max(engine.max_swapped, len(engine.scheduler.swapped))
        steps += 1
        assert steps < 10_000, "the engine does not finish"
        for out in engine.step():
            samples, cached, reasons = got[out.request_id]
            samples[out.index].extend(out.token_ids)
            if out.finish_reason is not None:
                reasons[out.index] = out.finish_reason
            got[out.request_id] = (samples, max(cached, out.num_cached_tokens), reasons)
    return got


def _first_difference(got: list[int], want: list[int]) -> str:
    i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return f"first differing token index {i}: got {got[i:i + 4]}, HF {want[i:i + 4]} (got {got}, HF {want})"


def assert_tokens(family: str, path: str, prompt: str, got: list[int], want: list[int]) -> None:
    assert got == want, f"{family} via {path}, prompt {prompt!r}: {_first_difference(got, want)}"


@pytest.mark.parametrize("backend", ["auto", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_engine_equals_hf_with_prefix_hits_and_forks(family, backend):
    """Short and long prompts, then the long one again and an extension of it (their prompt blocks
    come from the prefix cache), then greedy forks: every sample equals HF. ``auto`` is the C
    kernels on a CPU (``cuda``: float32 on the GPU where there is one); the sliding-window families
    run on the torch reference backend too (below)."""
    check_prefix_hits_and_forks(family, _engine(family.path, num_blocks=256, backend=backend))


def check_prefix_hits_and_forks(f: Family, engine) -> None:
    first = _run(engine, [("short", f.prompts["short"], 1), ("long", f.prompts["long"], 1)])
    for name in ("short", "long"):
        assert_tokens(f.name, "engine", name, first[name][0][0], f.expected[name])
    hits_before = engine.scheduler.stats().prefix_cache_hits
    second = _run(engine, [("long-again", f.prompts["long"], 1), ("extended", f.prompts["extended"], 1)])
    assert_tokens(f.name, "engine (prefix hit)", "long", second["long-again"][0][0], f.expected["long"])
    assert_tokens(f.name, "engine (prefix hit)", "extended", second["extended"][0][0], f.expected["extended"])
    full_blocks = (len(f.prompts["long"]) - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert second["long-again"][1] >= full_blocks > 0, second["long-again"][1]
    assert second["extended"][1] >= full_blocks, second["extended"][1]
    assert engine.scheduler.stats().prefix_cache_hits > hits_before
    forks = _run(engine, [("fork", f.prompts["extended"], 2), ("chat", f.prompts["chat"], 3)])
    for i, sample in enumerate(forks["fork"][0]):
        assert_tokens(f.name, f"engine (fork {i} of 2)", "extended", sample, f.expected["extended"])
    for i, sample in enumerate(forks["chat"][0]):
        assert_tokens(f.name, f"engine (fork {i} of 3)", "chat", sample, f.expected["chat"])
    assert engine.scheduler.num_free_blocks == engine.ready.num_blocks      # every block came back


@pytest.mark.parametrize("name", ["mistral", "gemma3"])
def test_sliding_window_families_on_the_torch_backend(name, checkpoints):
    """The windowed families on the torch attention backend as well (prefix hits and forks included)."""
    test_engine_equals_hf_with_prefix_hits_and_forks(checkpoints[name], "torch")


PRESSURE = {
    # setting: scheduler options of the small-pool engine
    "recompute": dict(preemption_mode="recompute"),
    "swap": dict(preemption_mode="swap"),
    # 16-token prefill chunks: chunk boundaries fall inside windows and blocks
    "chunked-prefill": dict(preemption_mode="recompute", max_num_batched_tokens=16),
}


@pytest.mark.parametrize("setting", PRESSURE)
def test_engine_equals_hf_under_preemption(family, setting):
    """Fourteen sequences (six of 41-122 tokens with output, eight that start in one block) on a pool of 20
    blocks of 8, prefix caching off so they cannot share: sequences are preempted (recomputed, or
    swapped to host blocks) and resumed; each still equals HF. The tiny prompts are what forces it
    under a sliding window too: there a long sequence's footprint stays at the window, but a new one
    grows until it covers the window."""
    check_preemption(family, setting, _engine(family.path, num_blocks=20, prefix_caching=False, num_host_blocks=64,
                                              max_num_seqs=12, **PRESSURE[setting]))


def check_preemption(f: Family, setting: str, engine) -> None:
    jobs = [(f"{name}-{i}", f.prompts[name], 1) for i in range(2) for name in ("long", "extended", "short")]
    jobs += [(f"tiny-{i}", f.prompts["tiny"], 1) for i in range(8)]
    got = _run(engine, jobs)
    assert engine.scheduler.num_preemptions > 0, "the small pool did not force a preemption"
    if setting == "swap":
        assert engine.max_swapped > 0, "no sequence was swapped out"
    for rid, _, _ in jobs:
        name = rid.rsplit("-", 1)[0]
        assert_tokens(f.name, f"engine (preemption, {setting})", name, got[rid][0][0], f.expected[name])
    assert engine.scheduler.num_free_blocks == engine.ready.num_blocks


# ----------------------------------------------------------------------------- tensor parallel

DENSE_FAMILIES = [f for f in mf.FAMILIES if f not in ("mixtral", "qwen3_moe")]


@pytest.mark.parametrize("name", DENSE_FAMILIES)
def test_tensor_parallel_equals_hf_with_prefix_hits_and_forks(name, checkpoints):
    """Two ranks over gloo (this process is rank 0, one follower process): heads, MLP and vocab
    split (each family's tokenizer vocabulary is odd-sized: the last rank's rows are padding), q/k/v
    biases, q/k norms, sandwich norms, windows; every sample equals HF, as with one rank."""
    engine = _engine(checkpoints[name].path, num_blocks=256, tensor_parallel_size=2)
    try:
        check_prefix_hits_and_forks(checkpoints[name], engine)
    finally:
        engine.close()


@pytest.mark.parametrize("name,setting", [("llama", "swap"), ("gemma3", "recompute")])
def test_tensor_parallel_equals_hf_under_preemption(name, setting, checkpoints):
    engine = _engine(checkpoints[name].path, num_blocks=20, prefix_caching=False, num_host_blocks=64,
                     max_num_seqs=12, tensor_parallel_size=2, **PRESSURE[setting])
    try:
        check_preemption(checkpoints[name], setting, engine)
    finally:
        engine.close()


def test_four_ranks_replicate_the_kv_heads(checkpoints):
    """Four ranks over two KV heads: each rank holds one query head and the KV head it reads
    (each KV head on two ranks)."""
    engine = _engine(checkpoints["llama"].path, num_blocks=256, tensor_parallel_size=4)
    try:
        assert engine.worker.kv.device_caches[0].shape[2] == 1          # [2, blocks, Hkv local, bs, Dh]
        check_prefix_hits_and_forks(checkpoints["llama"], engine)
    finally:
        engine.close()


def test_tensor_parallel_grammar_masks_and_beam_search_equal_one_rank(checkpoints):
    """The sampler paths only rank 0 runs, at TP=2: structured outputs (a regex, a choice; the
    masks reach rank 0's sampler alone) and beam search (its candidates' logprobs): the same
    outputs as one rank."""
    from services.offline import LLM
    from shared.config import CacheConfig, EngineConfig, SchedulerConfig
    from shared.messages import GrammarSpec, SamplingParams

    words = "[a-z]+( [a-z]+)*"
    outs = {}
    for tp in (1, 2):
        llm = LLM(EngineConfig(model=checkpoints["llama"].path, device="cpu", dtype="float32",
                               tensor_parallel_size=tp, cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=256),
                               scheduler=SchedulerConfig(max_model_len=MAX_MODEL_LEN)))
        try:
            regex = llm.generate(["the cat", "a dog and"], SamplingParams(max_tokens=12, temperature=0.0),
                                 grammar=GrammarSpec("regex", words))
            choice = llm.generate(["is it?"], SamplingParams(max_tokens=8, temperature=0.0),
                                  grammar=GrammarSpec("choice", '["yes", "no"]'))
            beams = llm.beam_search(["the cat"], beam_width=3, max_tokens=8)
        finally:
            llm.engine.close()
        outs[tp] = ([s.token_ids for c in regex + choice for s in c.samples],
                    [s.token_ids for s in beams[0].samples], [s.cumulative_logprob for s in beams[0].samples],
                    [s.text for c in regex + choice for s in c.samples])
    assert outs[2][:2] == outs[1][:2]
    assert outs[2][2] == pytest.approx(outs[1][2], abs=1e-3)
    texts = outs[2][3]
    assert all(re.fullmatch(words, t) for t in texts[:2]) and texts[2] in ("yes", "no"), texts


@pytest.mark.parametrize("name,size,refused", [
    ("mixtral", 2, "tensor parallel for MoE models"),
    ("llama", 3, "tensor parallel size 3 does not divide the model's num_attention_heads (4)"),
])
def test_a_model_tensor_parallel_cannot_split_is_refused(name, size, refused, checkpoints):
    from services.cli import main
    with pytest.raises(SystemExit, match=re.escape(refused)):
        main(["generate", "--model", checkpoints[name].path, "--tensor-parallel-size", str(size),
              "--prompt", "hi", "--max-tokens", "2"])


# ------------------------------------------------------------------------------------------- CLI

def _cli_generate(capsys, *argv: str) -> list[dict]:
    from services.cli import main
    assert main(["generate", *argv]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_cli_generate_equals_hf(family, tmp_path, capsys):
    """`pagedserve generate --model DIR --input FILE --json`: a text prompt longer than any window
    and a chat message (the folder's chat template), tokenized by the folder's tokenizer."""
    f = family
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": LONG}) + "\n" + json.dumps({"messages": CHAT}) + "\n")
    rows = _cli_generate(capsys, "--model", f.path, "--input", str(path), "--json", "--max-tokens", str(MAX_NEW),
                         "--ignore-eos", "--dtype", "float32", "--device", "cpu", "--block-size", str(BLOCK_SIZE),
                         "--num-blocks", "64")
    assert len(rows) == 2
    assert_tokens(f.name, "pagedserve generate", "long", rows[0]["token_ids"], f.expected["long"])
    assert_tokens(f.name, "pagedserve generate", "chat", rows[1]["token_ids"], f.expected["chat"])
    tok = mf.build_tokenizer()
    assert rows[0]["text"] == tok.decode(f.expected["long"], skip_special_tokens=True)


# ----------------------------------------------------------------------------------------- serve

def _token_ids(strings: list[str]) -> list[int]:
    """Token strings (as the gateway renders one token) back to ids: every token of the test
    tokenizer renders to a different string."""
    tok = mf.build_tokenizer()
    by_string = {tok.decode([i], skip_special_tokens=False): i for i in range(len(tok))}
    assert len(by_string) == len(tok)
    return [by_string[s] for s in strings]


@pytest.mark.parametrize("name", SERVED_FAMILIES)
def test_serve_equals_hf(name, checkpoints, tmp_path):
    """`pagedserve serve DIR`: completions (token ids and text prompts, n=2) and chat at
    temperature 0 equal HF; the repeated long prompt reports cached tokens."""
    f = checkpoints[name]
    proc, base, log_path = start_serve([f.path, "--dtype", "float32", "--device", "cpu",
                                        "--block-size", str(BLOCK_SIZE), "--num-blocks", "128",
                                        "--max-model-len", str(MAX_MODEL_LEN)], tmp_path)
    try:
        wait_healthy(base, proc, log_path)
        model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        common = dict(model=model, max_tokens=MAX_NEW, temperature=0, ignore_eos=True)

        def complete(prompt, **kw):
            r = httpx.post(f"{base}/v1/completions", json=dict(common, prompt=prompt, logprobs=0, **kw), timeout=120)
            assert r.status_code == 200, r.text
            return r.json()

        out = complete(f.prompts["long"])
        assert_tokens(name, "serve /v1/completions", "long", _token_ids(out["choices"][0]["logprobs"]["tokens"]),
                      f.expected["long"])
        again = complete(LONG, n=2)                          # text prompt: the gateway's tokenizer
        assert again["usage"]["prompt_tokens"] == len(f.prompts["long"])
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        for choice in again["choices"]:
            assert_tokens(name, f"serve /v1/completions (n=2, sample {choice['index']})", "long",
                          _token_ids(choice["logprobs"]["tokens"]), f.expected["long"])
        r = httpx.post(f"{base}/v1/chat/completions", timeout=120,
                       json=dict(common, messages=CHAT, logprobs=True))
        assert r.status_code == 200, r.text
        chat = r.json()
        assert chat["usage"]["prompt_tokens"] == len(f.prompts["chat"])
        assert_tokens(name, "serve /v1/chat/completions", "chat",
                      _token_ids([c["token"] for c in chat["choices"][0]["logprobs"]["content"]]), f.expected["chat"])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------- checkpoint formats

def test_sharded_checkpoint_equals_the_single_file_one(checkpoints, tmp_path):
    """The same Qwen3-MoE weights saved in shards (model.safetensors.index.json) generate the same."""
    f = checkpoints["qwen3_moe"]
    path = mf.make_checkpoint("qwen3_moe", tmp_path / "sharded", seed=f.seed, sharded=True)
    shards = [n for n in os.listdir(path) if n.endswith(".safetensors")]
    assert len(shards) > 1 and os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    got = _run(_engine(path, num_blocks=64), [("long", f.prompts["long"], 1)])
    assert_tokens("qwen3_moe (sharded)", "engine", "long", got["long"][0][0], f.expected["long"])


@pytest.mark.parametrize("name, dtype", [("gemma3", torch.bfloat16), ("qwen2", torch.float16)])
def test_half_precision_checkpoint_loads(name, dtype, tmp_path):
    """A checkpoint stored in bfloat16 / float16, run in float32, equals HF in float32 on the same
    stored weights (exact: the upcast is lossless); run in its own dtype it loads and generates
    (no token comparison: half-precision arithmetic differs from HF's op for op)."""
    f = _build(name, tmp_path, dtype=dtype)
    from safetensors import safe_open
    with safe_open(os.path.join(f.path, "model.safetensors"), "pt") as st:
        assert {st.get_tensor(k).dtype for k in st.keys()} == {dtype}
    got = _run(_engine(f.path, num_blocks=64), [("long", f.prompts["long"], 1), ("chat", f.prompts["chat"], 1)])
    for prompt in ("long", "chat"):
        assert_tokens(f"{name} ({dtype})", "engine float32", prompt, got[prompt][0][0], f.expected[prompt])
    from shared.config import DTYPES
    native = str(dtype).removeprefix("torch.")
    assert native in DTYPES
    engine = _engine(f.path, num_blocks=64, dtype=native)
    assert all(c.dtype == dtype for c in engine.worker.kv.device_caches)
    got = _run(engine, [("long", f.prompts["long"], 1)])
    assert len(got["long"][0][0]) == MAX_NEW


WINDOWED_VARIANTS = {
    # variant: (family, config overrides) -- windows the default test checkpoints do not have
    "qwen2-partial-window": ("qwen2", dict(use_sliding_window=True, sliding_window=mf.SLIDING_WINDOW,
                                           max_window_layers=1)),       # layer 0 full, layer 1 windowed
    "qwen3-window": ("qwen3", dict(use_sliding_window=True, sliding_window=mf.SLIDING_WINDOW, max_window_layers=0)),
    "mixtral-window": ("mixtral", dict(sliding_window=mf.SLIDING_WINDOW)),
    "phi3-window": ("phi3", dict(sliding_window=mf.SLIDING_WINDOW)),
}


@pytest.mark.parametrize("variant", WINDOWED_VARIANTS)
def test_windowed_variants_equal_hf(variant, tmp_path):
    """Sliding windows on families whose test checkpoints have none (Qwen2's max_window_layers
    split, Qwen3, Mixtral, Phi-3): the window changes HF's output, and ours follows it."""
    name, overrides = WINDOWED_VARIANTS[variant]
    f = _build(name, tmp_path, **overrides)
    unwindowed = mf.load_hf(mf.make_checkpoint(name, tmp_path / "no-window", seed=f.seed))   # same weights
    assert mf.hf_greedy(unwindowed, f.prompts["long"], MAX_NEW, use_eos=False)[0] != f.expected["long"]
    got = _run(_engine(f.path, num_blocks=64), [("long", f.prompts["long"], 1), ("extended", f.prompts["extended"], 1)])
    for prompt in ("long", "extended"):
        assert_tokens(variant, "engine", prompt, got[prompt][0][0], f.expected[prompt])


CONFIG_VARIANTS = {
    # variant: (family, config overrides): switches real checkpoints set that the defaults do not
    "llama-attention-bias": ("llama", dict(attention_bias=True)),             # q, k, v and o biases
    "llama-mqa": ("llama", dict(num_key_value_heads=1)),
    "qwen2-untied": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen3_moe-mlp-only-layer": ("qwen3_moe", dict(mlp_only_layers=[0])),     # layer 0 dense
    "qwen3_moe-sparse-step-2": ("qwen3_moe", dict(decoder_sparse_step=2)),    # layer 0 dense, 1 sparse
    "qwen3_moe-unnormalised-topk": ("qwen3_moe", dict(norm_topk_prob=False)),
    "mixtral-top1": ("mixtral", dict(num_experts_per_tok=1)),
}


@pytest.mark.parametrize("variant", CONFIG_VARIANTS)
def test_config_variants_equal_hf(variant, tmp_path):
    name, overrides = CONFIG_VARIANTS[variant]
    f = _build(name, tmp_path, **overrides)
    got = _run(_engine(f.path, num_blocks=64), [(k, f.prompts[k], 1) for k in ("short", "long", "chat")])
    for prompt in ("short", "long", "chat"):
        assert_tokens(variant, "engine", prompt, got[prompt][0][0], f.expected[prompt])


_HALF = 8    # head_dim 16 / 2 rotary frequencies (llama, phi3)
ROPE_VARIANTS = {
    # variant: (family, config overrides, raw config.json fields): RoPE the default checkpoints lack
    "llama-llama3-rope": ("llama", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}), {}),
    "llama-linear-rope": ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                         "factor": 4.0}), {}),
    # longrope: the short factors within original_max_position_embeddings (the engine refuses a longer
    # context: test_longrope_past_its_original_context_is_refused), so the short prompt only
    "phi3-longrope": ("phi3", dict(original_max_position_embeddings=64, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
        "short_factor": [1.0 + 0.25 * i for i in range(_HALF)], "long_factor": [1.0 + 2.0 * i for i in range(_HALF)],
        "original_max_position_embeddings": 64}), {}),
    # Gemma 3 as its published config.json has it: two top-level bases, no rope_parameters
    "gemma3-legacy-rope-fields": ("gemma3", {}, {"rope_parameters": None, "rope_theta": 1000000.0,
                                                 "rope_local_base_freq": 10000.0, "rope_scaling": None}),
}


@pytest.mark.parametrize("variant", ROPE_VARIANTS)
def test_rope_variants_equal_hf(variant, checkpoints, tmp_path):
    """RoPE scaling types (llama3, linear, Phi-3 longrope) and Gemma 3's legacy rope fields: ours
    equals HF (which reads the same config.json), for a prompt that stays short and long ones."""
    name, overrides, raw = ROPE_VARIANTS[variant]
    tok = mf.build_tokenizer()
    prompts = {k: tok.encode(v) for k, v in TEXTS.items()}
    sched = {}
    if variant == "phi3-longrope":
        prompts, sched = {"short": prompts["short"]}, {"max_model_len": 64}
        assert len(prompts["short"]) + MAX_NEW <= 64
    path = mf.make_checkpoint(name, tmp_path / variant, seed=checkpoints[name].seed, config_json=raw, **overrides)
    if raw:
        with open(os.path.join(path, "config.json")) as fh:
            written = json.load(fh)
        assert {k: written.get(k) for k in raw} == raw
    expected, margin = _oracle(path, prompts)
    assert margin >= mf.MIN_MARGIN / 5, f"{variant}: greedy margin {margin} too small to compare"
    if variant == "gemma3-legacy-rope-fields":
        assert expected == {k: checkpoints[name].expected[k] for k in prompts}     # the same model, old fields
    else:
        changed = [k for k in prompts if expected[k] != checkpoints[name].expected[k]]
        assert changed, "the scaling does not change HF's output"
    got = _run(_engine(path, num_blocks=64, **sched), [(k, ids, 1) for k, ids in prompts.items()])
    for prompt in prompts:
        assert_tokens(variant, "engine", prompt, got[prompt][0][0], expected[prompt])


def test_longrope_past_its_original_context_is_refused(checkpoints, tmp_path):
    """Phi-3 longrope with a context past original_max_position_embeddings (its long factors, not
    implemented) is refused at load, naming longrope, instead of served with the short factors."""
    from services.executor.model import UnsupportedModel
    name, overrides, _ = ROPE_VARIANTS["phi3-longrope"]
    path = mf.make_checkpoint(name, tmp_path / "longrope", seed=checkpoints[name].seed, **overrides)
    with pytest.raises(UnsupportedModel, match="longrope"):
        _engine(path, num_blocks=64)


def test_generation_config_eos_ids_stop_generation(checkpoints, tmp_path):
    """generation_config.json's EOS ids (not config.json's) stop a request where HF stops."""
    f = checkpoints["llama"]
    want = f.expected["long"]
    k = next(i for i in range(3, MAX_NEW) if want[i] not in want[:i])
    path = str(tmp_path / "llama-eos")
    shutil.copytree(f.path, path)
    gen_path = os.path.join(path, "generation_config.json")
    gen = json.load(open(gen_path))
    gen["eos_token_id"] = [mf.EOS_ID, want[k]]
    json.dump(gen, open(gen_path, "w"))
    hf, _ = mf.hf_greedy(mf.load_hf(path), f.prompts["long"], MAX_NEW, use_eos=True)
    assert hf == want[:k + 1]
    got = _run(_engine(path, num_blocks=64), [("long", f.prompts["long"], 1)], ignore_eos=False)
    tokens, _, reasons = got["long"]
    assert_tokens("llama", "engine (generation_config EOS)", "long", tokens[0], hf)
    assert reasons == ["stop"]


# -------------------------------------------------------------------------------------- refusals

def _gpt2(directory) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(vocab_size=mf.vocab_size(), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    model.save_pretrained(str(directory))
    mf.build_tokenizer().save_pretrained(str(directory))
    return str(directory)


REFUSALS = {
    # kind: (builder(directory) -> path, the name the error must contain)
    "architecture": (_gpt2, "GPT2LMHeadModel"),
    "mlp_bias": (lambda d: mf.make_checkpoint("llama", d, mlp_bias=True), "mlp_bias"),
    "attn_logit_softcapping": (lambda d: mf.make_checkpoint("gemma3", d, attn_logit_softcapping=50.0),
                               "attn_logit_softcapping"),
    "final_logit_softcapping": (lambda d: mf.make_checkpoint("gemma3", d, final_logit_softcapping=30.0),
                                "final_logit_softcapping"),
    "rope_type": (lambda d: mf.make_checkpoint("llama", d, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128}),
        "rope_type"),
    # transformers 5 keeps it in rope_parameters (HF then rotates half of each head)
    "partial_rotary_factor": (lambda d: mf.make_checkpoint("phi3", d, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
    # ... and moves a top-level one there (Phi-4-mini's config.json has it at the top level)
    "partial_rotary_factor_top_level": (lambda d: mf.make_checkpoint("phi3", d, config_json={
        "partial_rotary_factor": 0.75}), "partial_rotary_factor"),
}


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("refused")
    return {kind: build(root / kind) for kind, (build, _) in REFUSALS.items()}


@pytest.mark.parametrize("kind", REFUSALS)
def test_unsupported_checkpoint_is_refused_at_load(kind, refused):
    from services.executor.model import UnsupportedModel
    from services.executor.weights import load_model
    from shared.model_path import resolve_model

    with pytest.raises(UnsupportedModel, match=REFUSALS[kind][1]):
        load_model(resolve_model(refused[kind]), dtype=torch.float32)


CLI_REFUSALS = ("architecture", "final_logit_softcapping")   # a process each costs ~8 s on two cores


def test_unsupported_checkpoint_is_a_cli_error(refused):
    """`pagedserve generate --model DIR` exits non-zero with the architecture / field on stderr in a
    one-line error (two
    kinds, one process each, started together; every kind is checked at load above)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    procs = {kind: subprocess.Popen([sys.executable, "-m", "services.cli", "generate", "--model", path,
                                     "--prompt", "hi", "--max-tokens", "2", "--device", "cpu"],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for kind, path in refused.items() if kind in CLI_REFUSALS}
    failures = []
    for kind, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        name = REFUSALS[kind][1]
        if proc.returncode == 0 or name not in err or "Traceback" in err:     # one line, not a traceback
            failures.append(f"{kind}: exit {proc.returncode}, stderr tail {err[-600:]!r}")
    assert not failures, "\n".join(failures)


def test_unsupported_checkpoint_stops_serve_with_the_field_in_its_log(refused, tmp_path):
    """`pagedserve serve DIR` on a refused checkpoint exits non-zero during start-up, the field named
    in its output (the executor's error), instead of serving."""
    proc, _, log_path = start_serve([refused["attn_logit_softcapping"], "--device", "cpu"], tmp_path)
    try:
        rc = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert rc != 0 and "attn_logit_softcapping" in log, log[-3000:]
