"""Structured outputs: what a JSON Schema costs, in one run on this machine.

1. Throughput: 32 concurrent chat requests (the 20 schemas of benchmarks/structured_cases.py,
   cycled), greedy, through the offline engine on the bundled SmolLM2-135M (float32), each
   constrained by its schema; then the same prompts unconstrained with each request's
   ``max_tokens`` set to the length its constrained run produced and EOS ignored, so both runs
   generate exactly the same number of tokens and the ratio is the per-token cost of the masks.
   The two alternate for ``--rounds`` rounds; medians are reported.
2. Compile: for each schema, a cold compile (a fresh grammar backend, nothing cached) against a
   cached one (the LRU hit: a copy of the compiled matcher), and the time to fill 32 masks.

    python -m benchmarks.structured_outputs [--rounds 3] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NUM_REQUESTS = 32


def build(num_blocks: int):
    from services.offline import LLM, load_tokenizer
    from shared.config import CacheConfig, EngineConfig, SchedulerConfig

    config = EngineConfig(dtype="float32", cache=CacheConfig(num_blocks=num_blocks),
                          scheduler=SchedulerConfig(max_num_seqs=NUM_REQUESTS))
    return LLM(config, tokenizer=load_tokenizer(""))


def workload(llm):
    from benchmarks.structured_cases import SCHEMAS, prompt_for
    from shared.messages import GrammarSpec

    cases = [SCHEMAS[i % len(SCHEMAS)] for i in range(NUM_REQUESTS)]
    prompts = [llm.encode_chat(prompt_for(d)) for d, _ in cases]
    grammars = [GrammarSpec("json_schema", json.dumps(s)) for _, s in cases]
    return prompts, grammars


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def throughput(llm, prompts, grammars, rounds: int) -> dict:
    from shared.messages import SamplingParams

    constrained = SamplingParams(max_tokens=200, temperature=0.0)
    llm.generate(prompts[:4], constrained, grammar=grammars[:4])            # warm-up (and compile)
    json_s, plain_s, tokens = [], [], 0
    for _ in range(rounds):
        done, t = timed(lambda: llm.generate(prompts, constrained, grammar=grammars))
        lengths = [len(c.samples[0].token_ids) for c in done]
        tokens = sum(lengths)
        json_s.append(t)
        same = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
        _, t = timed(lambda: llm.generate(prompts, same))
        plain_s.append(t)
    j, p = statistics.median(json_s), statistics.median(plain_s)
    return {"requests": NUM_REQUESTS, "output_tokens": tokens, "rounds": rounds,
            "json_schema_s": json_s, "unconstrained_s": plain_s,
            "json_schema_tok_s": tokens / j, "unconstrained_tok_s": tokens / p, "ratio": p / j}


def compile_times(llm, grammars) -> dict:
    from services.scheduler.grammar import GrammarBackend

    backend = llm.engine.scheduler.grammars
    tokenizer, vocab = backend.tokenizer, backend.vocab_size
    distinct = list({(g.kind, g.value): g for g in grammars}.values())
    cold, cached = [], []
    for g in distinct:
        fresh = GrammarBackend(tokenizer, vocab)
        _, t = timed(lambda: fresh.matcher(g))
        cold.append(t)
        _, t = timed(lambda: fresh.matcher(g))
        cached.append(t)
    matchers = [backend.matcher(g) for g in grammars]
    backend.fill_masks(matchers)
    fills = [timed(lambda: backend.fill_masks(matchers))[1] for _ in range(20)]
    ms = lambda xs: [round(x * 1e3, 3) for x in xs]                        # noqa: E731
    return {"schemas": len(distinct), "cold_ms": ms(cold), "cached_ms": ms(cached),
            "cold_median_ms": statistics.median(cold) * 1e3, "cold_max_ms": max(cold) * 1e3,
            "cached_median_ms": statistics.median(cached) * 1e3,
            "fill_32_masks_median_ms": statistics.median(fills) * 1e3}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-blocks", type=int, default=1024)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    import torch

    llm = build(args.num_blocks)
    prompts, grammars = workload(llm)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads",
              "throughput": throughput(llm, prompts, grammars, args.rounds),
              "compile": compile_times(llm, grammars)}
    tp, c = result["throughput"], result["compile"]
    print(f"{tp['requests']} requests, {tp['output_tokens']} output tokens each run ({result['machine']})")
    print(f"  json_schema    {tp['json_schema_tok_s']:8.1f} tok/s")
    print(f"  unconstrained  {tp['unconstrained_tok_s']:8.1f} tok/s")
    print(f"  ratio          {tp['ratio']:8.3f}x (json_schema / unconstrained)")
    print(f"compile ({c['schemas']} schemas): cold median {c['cold_median_ms']:.2f} ms, max "
          f"{c['cold_max_ms']:.2f} ms; cached median {c['cached_median_ms']:.3f} ms; "
          f"32 masks filled in {c['fill_32_masks_median_ms']:.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
