"""Beam search throughput, pagedserve (``LLM.beam_search``) vs Hugging Face ``generate``.

Same process, same weights (the bundled SmolLM2-135M, float32, CPU): 16 chat prompts, beam width
K=4, max_new_tokens 32, length_penalty 1, early_stopping False. pagedserve runs all 16 searches at
once (64 beams sharing their prompt's blocks); HF runs ``generate(num_beams=4,
num_return_sequences=4, do_sample=False)`` one prompt at a time (no padding), and once more with
all prompts in one left-padded batch (HF's own batching; padding may change a near-tie). The throughput unit
is hypotheses per second and beam tokens per second (the K returned hypotheses' generated tokens
summed, EOS included); both systems return the same hypotheses up to float ties (checked: the
fraction of identical hypotheses is reported).

    python -m benchmarks.beam_vs_hf [--num-prompts 16] [--width 4] [--max-tokens 32] [--rounds 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def until_eos(rows: list[list[int]], eos: list[int]) -> list[list[int]]:
    """HF's padded output rows cut after their first EOS (kept, as pagedserve returns it)."""
    return [row[:next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in rows]


def hf_search(model, prompt: list[int], width: int, max_new: int, eos: list[int]) -> list[list[int]]:
    import torch

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=width, num_return_sequences=width,
                             do_sample=False, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=eos[0])
    return until_eos(out[:, len(prompt):].tolist(), eos)


def hf_batch_search(model, prompts: list[list[int]], width: int, max_new: int, eos: list[int]) -> list[list[list[int]]]:
    """All prompts in one left-padded ``generate`` call (HF's own batching of beam searches)."""
    import torch

    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[eos[0]] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, num_beams=width, num_return_sequences=width,
                             do_sample=False, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=eos[0])
    beams = until_eos(out[:, longest:].tolist(), eos)
    return [beams[i * width:(i + 1) * width] for i in range(len(prompts))]


def main() -> None:
    import torch

    from services.bench.compare import chat_prompts
    from services.executor.weights import build_hf_reference, load_hf_checkpoint
    from services.offline import LLM, load_tokenizer
    from shared.config import EngineConfig, SchedulerConfig
    from shared.model_path import resolve_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()

    tokenizer = load_tokenizer("")
    llm = LLM(EngineConfig(dtype="float32", scheduler=SchedulerConfig(max_num_seqs=256)), tokenizer=tokenizer)
    hf = build_hf_reference(*load_hf_checkpoint(resolve_model(""), dtype=torch.float32))
    eos = list(llm.engine.ready.eos_token_ids)
    prompts = [llm.encode_chat(m) for m in chat_prompts(args.num_prompts)]
    k, new = args.width, args.max_tokens

    llm.beam_search(prompts[:2], k, 4)                    # warm-up (kernels, allocator)
    hf_search(hf, prompts[0], k, 4, eos)
    ours_s, hf_s, padded_s = [], [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        ours = [[s.token_ids for s in c.samples] for c in llm.beam_search(prompts, k, new)]
        ours_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        theirs = [hf_search(hf, p, k, new, eos) for p in prompts]
        hf_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        padded = hf_batch_search(hf, prompts, k, new, eos)
        padded_s.append(time.perf_counter() - t0)
    same_padded = sum(a == b for x, y in zip(ours, padded) for a, b in zip(x, y)) / (len(prompts) * k)
    padded_tokens = sum(len(h) for x in padded for h in x)
    pb = statistics.median(padded_s)
    same = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y)) / (len(prompts) * k)
    ours_tokens = sum(len(h) for x in ours for h in x)
    hf_tokens = sum(len(h) for x in theirs for h in x)
    o, h = statistics.median(ours_s), statistics.median(hf_s)
    print(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "prompts": len(prompts), "beam_width": k, "max_new_tokens": new, "rounds": args.rounds,
        "pagedserve_s": [round(t, 2) for t in ours_s], "hf_one_prompt_at_a_time_s": [round(t, 2) for t in hf_s],
        "pagedserve_hypotheses_per_s": round(len(prompts) * k / o, 2),
        "hf_hypotheses_per_s": round(len(prompts) * k / h, 2),
        "pagedserve_beam_tok_per_s": round(ours_tokens / o, 1), "hf_beam_tok_per_s": round(hf_tokens / h, 1),
        "ratio": round(h / o, 2), "identical_hypotheses": round(same, 3),
        "hf_padded_batch_s": [round(t, 2) for t in padded_s],
        "hf_padded_hypotheses_per_s": round(len(prompts) * k / pb, 2),
        "hf_padded_beam_tok_per_s": round(padded_tokens / pb, 1), "ratio_vs_padded": round(pb / o, 2),
        "identical_hypotheses_padded": round(same_padded, 3),
        "load_average": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
