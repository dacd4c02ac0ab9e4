"""Offline throughput, pagedserve vs Hugging Face `generate` (padded batch) vs transformers'
`generate_batch`: a thin shim over `pagedserve bench compare` (services/bench/compare.py), kept for
its command line and its one-line JSON output. Each system runs in its own process, in turn.
Usage:
    python -m benchmarks.offline_vs_hf [--num-prompts 32] [--max-tokens 64] [--skip-generate-batch]
"""
from __future__ import annotations

import argparse
import json

from services.bench.compare import TOPICS, CompareOptions, chat_prompts, run_compare  # noqa: F401 (re-exported)

LEGACY_NAMES = {"pagedserve": "pagedserve", "hf-padded": "hf_generate_padded", "hf-generate-batch": "hf_generate_batch"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--skip-generate-batch", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; tok/s and ratios are medians")
    args = ap.parse_args()
    systems = ["pagedserve", "hf-padded"] + ([] if args.skip_generate_batch else ["hf-generate-batch"])
    report = run_compare(systems, CompareOptions(num_prompts=args.num_prompts, max_tokens=args.max_tokens),
                         repeat=args.repeat)
    out = {"machine": report["machine"], "prompts": args.num_prompts, "new_tokens": args.max_tokens,
           "tok_per_s": {LEGACY_NAMES[k]: round(r["tok_per_s"], 1) for k, r in report["systems"].items()
                         if "tok_per_s" in r}}
    errors = {LEGACY_NAMES[k]: r["error"] for k, r in report["systems"].items() if "error" in r}
    if errors:
        out["errors"] = errors
    for system, key in (("hf-padded", "ratio_vs_hf_padded"), ("hf-generate-batch", "ratio_vs_hf_generate_batch")):
        ratio = report["ratio_of_pagedserve_to"].get(system)
        if ratio is not None:
            out[key] = round(ratio["median"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
