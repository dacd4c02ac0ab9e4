"""Offline throughput, side by side in one run: pagedserve vs Hugging Face `generate` (padded batch)
vs transformers' `generate_batch` (continuous batching, paged cache).

Same model (the bundled SmolLM2-135M-Instruct GGUF, dequantized to float32), same 32 chat prompts,
64 new tokens each, greedy, EOS ignored so every system produces the same token count.
Prints one JSON object with tok/s per system and the ratios. Usage:
    python -m benchmarks.offline_vs_hf [--num-prompts 32] [--max-tokens 64] [--skip-generate-batch]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOPICS = ["the moon", "bread", "volcanoes", "the Roman empire", "photosynthesis", "chess", "jazz", "rain",
          "bicycles", "the internet", "honey bees", "glaciers", "coffee", "black holes", "origami", "tides"]


def chat_prompts(n: int) -> list[list[dict]]:
    asks = ["Tell me three facts about {}.", "Write a short poem about {}, please, in a cheerful tone."]
    return [[{"role": "user", "content": asks[i % 2].format(TOPICS[i % len(TOPICS)])}] for i in range(n)]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--skip-generate-batch", action="store_true")
    args = ap.parse_args()

    import torch
    from transformers import GenerationConfig

    from services.executor.weights import build_hf_reference, load_hf_checkpoint

    from services.offline import LLM, load_tokenizer
    from shared.config import EngineConfig, SchedulerConfig
    from shared.messages import SamplingParams
    from shared.model_path import resolve_model

    src = resolve_model("")
    tok = load_tokenizer("")
    prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
               for m in chat_prompts(args.num_prompts)]
    prompts = [list(p) for p in prompts]
    n_out = args.num_prompts * args.max_tokens
    hf = build_hf_reference(*load_hf_checkpoint(src, dtype=torch.float32))
    results: dict[str, float] = {}

    # pagedserve (warm-up on two prompts first: first-call costs are not the steady state)
    llm = LLM(EngineConfig(scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=4096)), tokenizer=tok)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    outs, dt = timed(lambda: llm.generate(prompts, params))
    assert sum(len(c.samples[0].token_ids) for c in outs) == n_out
    results["pagedserve"] = n_out / dt

    # HF generate, left-padded batch
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
    gen = dict(max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False,
               pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        hf.generate(**{k: v[:2] for k, v in batch.items()}, max_new_tokens=4, do_sample=False,
                    pad_token_id=tok.pad_token_id)
        _, dt = timed(lambda: hf.generate(**batch, **gen))
    results["hf_generate_padded"] = n_out / dt

    # transformers continuous batching
    if not args.skip_generate_batch:
        cfg = GenerationConfig(max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False,
                               eos_token_id=-1, pad_token_id=tok.pad_token_id)
        with torch.inference_mode():
            _, dt = timed(lambda: hf.generate_batch(prompts, generation_config=cfg))
        results["hf_generate_batch"] = n_out / dt

    report = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, threads {torch.get_num_threads()}",
        "prompts": args.num_prompts, "new_tokens": args.max_tokens,
        "tok_per_s": {k: round(v, 1) for k, v in results.items()},
        "ratio_vs_hf_padded": round(results["pagedserve"] / results["hf_generate_padded"], 2),
    }
    if "hf_generate_batch" in results:
        report["ratio_vs_hf_generate_batch"] = round(results["pagedserve"] / results["hf_generate_batch"], 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
