"""`pagedserve serve` on the default model (default attention backend: `auto` -> the C kernels on a
CPU) checked over HTTP against independent oracles:

- logprobs (chosen token and ``top_logprobs``) equal Hugging Face's log-softmax, teacher-forced on
  the generated tokens, for chat and completions, several sequences at once, under preemption
  (the KV cache holds a fraction of the load), within ``LOGPROB_TOL``;
- ``usage.prompt_tokens_details.cached_tokens`` equals the block-rounded prefix the second of two
  identical prompts can reuse, and is 0 when their ``cache_salt`` differs;
- no user text (prompt, stop string, output, ...) appears anywhere in what the three processes
  write (stdout and stderr of gateway, scheduler and executor, every logger, tracebacks).

One server for the module (its model loads once).
"""
from __future__ import annotations

import random
import signal
import threading

import httpx
import pytest
import torch

from tests.serve_harness import start_serve, wait_healthy

NUM_BLOCKS, BLOCK_SIZE = 16, 16          # 256 tokens of KV for 8 sequences of ~70: preemption
LOGPROB_TOL = 1e-4                       # absolute, on float32 log-probabilities
MARKER = "QZXV-secret-user-text"

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def served(default_model_source, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-oracle")
    proc, base, log_path = start_serve(["--num-blocks", str(NUM_BLOCKS), "--block-size", str(BLOCK_SIZE),
                                        "--max-model-len", "256", "--max-num-seqs", "8"], tmp)
    try:
        wait_healthy(base, proc, log_path)
        yield base, log_path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except Exception:  # noqa: BLE001
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def token_strings(hf_tokenizer):
    """token string (as the gateway renders one token) -> the token ids rendering to it."""
    decode = hf_tokenizer.backend_tokenizer.decode
    by_string: dict[str, list[int]] = {}
    for i in range(len(hf_tokenizer)):
        by_string.setdefault(decode([i], skip_special_tokens=False), []).append(i)
    return by_string


def _metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def _steps_of(kind: str, choice: dict) -> list[tuple[str, float, list[tuple[str, float]]]]:
    """(token, logprob, [(top token, logprob), ...]) per generated token of one choice."""
    lp = choice["logprobs"]
    if kind == "chat":
        return [(c["token"], c["logprob"], [(t["token"], t["logprob"]) for t in c["top_logprobs"]])
                for c in lp["content"]]
    return [(t, v, list(top.items())) for t, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])]


def assert_matches_hf(hf_model, prompt_ids: list[int], steps, k: int, exact: bool, token_strings: dict) -> float:
    """Teacher-force HF on the prompt and, one at a time, the generated tokens (each recovered from
    its string: the id among those rendering so whose HF logprob is the reported one). Every
    reported logprob must be HF's within LOGPROB_TOL; returns the largest difference seen."""
    from transformers import DynamicCache

    worst = 0.0
    cache = DynamicCache()
    with torch.inference_mode():
        logits = hf_model(torch.tensor([prompt_ids]), cache=cache, use_cache=True).logits[0, -1]
        for pos, (tok, lp, top) in enumerate(steps):
            row = logits.float().log_softmax(-1)
            candidates = token_strings.get(tok, [])
            assert candidates, f"step {pos}: {tok!r} is no token"
            chosen = min(candidates, key=lambda i: abs(row[i].item() - lp))
            diff = abs(row[chosen].item() - lp)
            assert diff <= LOGPROB_TOL, f"step {pos}: logprob {lp} of {tok!r}, HF says {row[chosen].item()}"
            worst = max(worst, diff)
            kth = row.topk(k).values[-1].item() if k else None
            values = [v for _, v in top]
            assert len(top) == k if exact else 0 < len(top) <= k, top     # a dict may merge equal strings
            assert values == sorted(values, reverse=True), top
            for s, v in top:
                ids = token_strings.get(s, [])
                best = min((abs(row[i].item() - v) for i in ids), default=float("inf"))
                assert best <= LOGPROB_TOL and v >= kth - LOGPROB_TOL, f"step {pos}: top {s!r} {v}"
                worst = max(worst, best)
            logits = hf_model(torch.tensor([[chosen]]), cache=cache, use_cache=True).logits[0, -1]
    return worst


def test_logprobs_equal_hf_teacher_forced_under_preemption(served, hf_model, hf_tokenizer, token_strings):
    base, _ = served
    rng = random.Random(0)
    texts = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,",
             "List three colours: red,"]
    completions = [dict(prompt=hf_tokenizer.encode(t), max_tokens=32, temperature=0.8, seed=rng.randint(0, 999),
                        logprobs=5, ignore_eos=True) for t in texts]
    completions.append(dict(prompt=hf_tokenizer.encode("Paging lets a program"), max_tokens=32, n=2,
                            temperature=1.0, seed=7, logprobs=2, ignore_eos=True))
    chats = [dict(messages=[{"role": "user", "content": q}], max_tokens=32, temperature=0.7, seed=i,
                  logprobs=True, top_logprobs=3, ignore_eos=True)
             for i, q in enumerate(["What is paged memory?", "Name a prime number."])]
    jobs = [("completions", b) for b in completions] + [("chat", b) for b in chats]
    preempted_before = _metric(base, "pagedserve:num_preemptions_total")
    answers: dict[int, httpx.Response] = {}
    start = threading.Barrier(len(jobs))

    def send(i: int, kind: str, body: dict) -> None:
        start.wait()
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        answers[i] = httpx.post(base + path, json=body, timeout=300)

    threads = [threading.Thread(target=send, args=(i, kind, body)) for i, (kind, body) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _metric(base, "pagedserve:num_preemptions_total") > preempted_before, "no preemption happened"
    worst, checked = 0.0, 0
    for i, (kind, body) in enumerate(jobs):
        r = answers[i]
        assert r.status_code == 200, r.text
        out = r.json()
        if kind == "chat":
            text = hf_tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
            prompt_ids, k = hf_tokenizer.encode(text, add_special_tokens=False), body["top_logprobs"]
        else:
            prompt_ids, k = body["prompt"], body["logprobs"]
        assert out["usage"]["prompt_tokens"] == len(prompt_ids)
        assert len(out["choices"]) == body.get("n", 1)
        for choice in out["choices"]:
            steps = _steps_of(kind, choice)
            assert len(steps) == body["max_tokens"]
            worst = max(worst, assert_matches_hf(hf_model, prompt_ids, steps, k, kind == "chat",
                                                       token_strings))
            checked += 1
    assert checked == 8
    print(f"\nlogprobs: 8 sequences, largest |ours - HF| {worst:.2e} (tolerance {LOGPROB_TOL})")


def test_cached_tokens_report_the_reused_prefix(served):
    """The same 100-token prompt twice: the second reuses its full blocks, capped below the prompt
    length (one token is always computed): (100 - 1) // 16 * 16 = 96 cached tokens."""
    base, _ = served
    prompt = [random.Random(5).randint(1000, 40000) for _ in range(100)]
    usages = [httpx.post(f"{base}/v1/completions", json={"prompt": prompt, "max_tokens": 2}, timeout=120).json()["usage"]
              for _ in range(2)]
    assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] == (len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE == 96


def test_cached_tokens_are_shared_only_under_the_same_cache_salt(served):
    """A new 100-token prompt under salt A, then under salt B (nothing reused), then under A again
    (96 reused): the salt enters the first block's key, so tenants with different salts never hit
    each other's blocks, over the whole path (gateway -> AddRequest -> scheduler -> usage)."""
    base, _ = served
    prompt = [random.Random(6).randint(1000, 40000) for _ in range(100)]

    def cached(salt: str) -> int:
        body = {"prompt": prompt, "max_tokens": 2, "cache_salt": salt}
        return httpx.post(f"{base}/v1/completions", json=body, timeout=120).json()["usage"][
            "prompt_tokens_details"]["cached_tokens"]

    assert [cached("tenant-a"), cached("tenant-b"), cached("tenant-a"), cached("tenant-b")] == [0, 0, 96, 96]


def test_no_user_text_in_any_process_output(served):
    """Prompts, outputs, stop strings, names and bad bodies, sent to every route and error path,
    never show up in what gateway, scheduler or executor write (their shared log file: every logger,
    uvicorn's included, and any traceback)."""
    base, log_path = served
    chat = {"messages": [{"role": "user", "content": f"Repeat after me: {MARKER} {MARKER}"}],
            "stop": [MARKER], "user": MARKER, "max_tokens": 8}
    with httpx.Client(base_url=base, timeout=120) as c:
        assert c.post("/v1/chat/completions", json=chat).status_code == 200
        assert c.post("/v1/chat/completions", json={**chat, "stream": True}).status_code == 200
        done = c.post("/v1/completions", json={"prompt": f"{MARKER} says", "max_tokens": 8,
                                               "logprobs": 2})
        assert done.status_code == 200
        output = done.json()["choices"][0]["text"]
        assert c.post("/v1/completions", json={"prompt": MARKER, "model": MARKER}).status_code == 404
        assert c.post("/v1/completions", json={"prompt": MARKER, "n": MARKER}).status_code == 400
        assert c.post("/v1/completions", content=MARKER.encode()).status_code == 400
        assert c.post("/v1/completions", json={"prompt": MARKER * 200, "max_tokens": 4}).status_code == 400
        assert c.post("/v1/chat/completions", json={**chat, "chat_template_kwargs": {"chat_template": MARKER}}
                      ).status_code == 400
        with c.stream("POST", "/v1/completions", json={"prompt": MARKER, "max_tokens": 100, "stream": True}) as r:
            next(r.iter_lines())                      # leave mid-stream: the abort path logs too
    log = log_path.read_text(errors="replace")
    assert "POST /v1/chat/completions" in log, "uvicorn's access log did not reach the captured output"
    assert MARKER not in log
    generated = output.replace(MARKER, "").strip()
    if len(generated) >= 12:                          # the model's own output is user text too
        assert generated not in log
