"""Synthetic benchmark prompts, built by token count, seeded, with no download.

A prompt of N tokens is N words drawn from a pool of words that each encode to exactly one token
with their leading space (" the", " river", ...). Byte-level BPE tokenizers split text at spaces
before merging, so the concatenation encodes to exactly N tokens, and two prompts that share their
first k words share their first k tokens (which is what the prefix cache keys on).

Datasets:
  random             input lengths uniform in [L*(1-r), L*(1+r)], same for outputs (vLLM's `random`)
  sharegpt-like      input and output lengths from log-normal distributions shaped like ShareGPT
                     conversations (long tail), clipped to a maximum; generated locally
  prefix-repetition  k shared prefixes of L tokens; request i = prefix (i mod k) + its own suffix,
                     in shuffled order
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

DATASETS = ("random", "sharegpt-like", "prefix-repetition")
_WORD = re.compile(r"^[a-z]{3,10}$")
_SPACE_MARKERS = ("Ġ", "▁")        # byte-level BPE / sentencepiece marks for a leading space


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    prompt_len: int        # tokens, as the tokenizer encodes `prompt` (no special tokens)
    output_len: int        # max_tokens to ask for


class WordPool:
    """Words that encode to one token each with a leading space; prompts are built from them."""

    def __init__(self, tokenizer):
        candidates = sorted({tok[1:] for tok in tokenizer.get_vocab()
                             if tok[:1] in _SPACE_MARKERS and _WORD.match(tok[1:])})
        encoded = tokenizer([" " + w for w in candidates], add_special_tokens=False)["input_ids"]
        self.words = np.array([w for w, ids in zip(candidates, encoded) if len(ids) == 1])
        if len(self.words) < 100:
            raise ValueError(f"the tokenizer has only {len(self.words)} single-token words; "
                             "cannot build prompts by token count")
        self.tokenizer = tokenizer

    def text(self, rng: np.random.Generator, num_tokens: int) -> str:
        """A string of ``num_tokens`` random words (one token each)."""
        return "".join(" " + w for w in rng.choice(self.words, size=num_tokens))

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))


def _uniform_lengths(rng: np.random.Generator, mean: int, range_ratio: float, n: int, low: int) -> np.ndarray:
    lo = max(low, int(mean * (1 - range_ratio)))
    hi = max(lo, int(mean * (1 + range_ratio)))
    return rng.integers(lo, hi + 1, size=n)


def random_dataset(pool: WordPool, num_prompts: int, input_len: int, output_len: int,
                   range_ratio: float = 0.0, seed: int = 0) -> list[BenchRequest]:
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    rng = np.random.default_rng(seed)
    ins = _uniform_lengths(rng, input_len, range_ratio, num_prompts, 1)
    outs = _uniform_lengths(rng, output_len, range_ratio, num_prompts, 1)
    return [BenchRequest(pool.text(rng, int(i)), int(i), int(o)) for i, o in zip(ins, outs)]


# ShareGPT (vicuna-cleaned) conversations, first turn, Llama tokenizer: prompt median ~ 80 tokens
# with a long tail to thousands; replies median ~ 150. Log-normal fits both shapes reasonably.
SHAREGPT_INPUT = (80.0, 1.2)      # (median tokens, sigma of log)
SHAREGPT_OUTPUT = (150.0, 0.9)


def sharegpt_like_dataset(pool: WordPool, num_prompts: int, max_input_len: int = 1024,
                          max_output_len: int = 512, seed: int = 0) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)

    def draw(median_sigma: tuple[float, float], cap: int) -> np.ndarray:
        median, sigma = median_sigma
        return np.clip(rng.lognormal(np.log(median), sigma, size=num_prompts), 4, cap).astype(int)

    ins, outs = draw(SHAREGPT_INPUT, max_input_len), draw(SHAREGPT_OUTPUT, max_output_len)
    return [BenchRequest(pool.text(rng, int(i)), int(i), int(o)) for i, o in zip(ins, outs)]


def prefix_repetition_dataset(pool: WordPool, num_prompts: int, num_prefixes: int = 10, prefix_len: int = 512,
                              suffix_len: int = 32, output_len: int = 32, seed: int = 0) -> list[BenchRequest]:
    if num_prefixes < 1 or prefix_len < 1 or suffix_len < 1:
        raise ValueError("num_prefixes, prefix_len and suffix_len must be >= 1")
    rng = np.random.default_rng(seed)
    prefixes = [pool.text(rng, prefix_len) for _ in range(num_prefixes)]
    requests = [BenchRequest(prefixes[i % num_prefixes] + pool.text(rng, suffix_len), prefix_len + suffix_len,
                             output_len) for i in range(num_prompts)]
    order = rng.permutation(num_prompts)
    return [requests[i] for i in order]


def add_dataset_arguments(p) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", choices=DATASETS, default="random")
    g.add_argument("--num-prompts", type=int, default=100)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--random-input-len", type=int, default=256)
    g.add_argument("--random-output-len", type=int, default=64)
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)]")
    g.add_argument("--sharegpt-max-input-len", type=int, default=1024)
    g.add_argument("--sharegpt-max-output-len", type=int, default=512)
    g.add_argument("--prefix-num-prefixes", type=int, default=10)
    g.add_argument("--prefix-len", type=int, default=512, help="tokens per shared prefix")
    g.add_argument("--prefix-suffix-len", type=int, default=32, help="own tokens after the prefix")
    g.add_argument("--prefix-output-len", type=int, default=32)


def build_dataset(args, pool: WordPool) -> list[BenchRequest]:
    """The requests the dataset arguments of ``add_dataset_arguments`` describe."""
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.dataset == "random":
        return random_dataset(pool, args.num_prompts, args.random_input_len, args.random_output_len,
                              args.random_range_ratio, args.seed)
    if args.dataset == "sharegpt-like":
        return sharegpt_like_dataset(pool, args.num_prompts, args.sharegpt_max_input_len,
                                     args.sharegpt_max_output_len, args.seed)
    if args.dataset == "prefix-repetition":
        return prefix_repetition_dataset(pool, args.num_prompts, args.prefix_num_prefixes, args.prefix_len,
                                         args.prefix_suffix_len, args.prefix_output_len, args.seed)
    raise ValueError(f"unknown dataset {args.dataset!r}; choose from {', '.join(DATASETS)}")
