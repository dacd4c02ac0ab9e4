"""Grammar matchers for structured outputs: compile (bounded cache), copy, mask, advance.

Matchers live in the scheduler, which sees every sampled token (as in vLLM v1). A request's spec
is compiled once into a pristine llguidance matcher, kept in an LRU of ``cache_size`` entries
(an unbounded grammar cache let any client exhaust memory: vLLM's CVE-2025-29770); each sequence
gets a ``deep_copy`` of it, a fork child a copy of its parent's. A matcher advances only in
``Scheduler.update``, with the tokens the scheduler accepted, so preemption, recompute and an
executor restart (which keep every accepted token) never leave it out of step, and a failed step
(no update) never advances it.

Masks of one step are filled in one call, in parallel Rust threads without the GIL
(``fill_next_token_bitmask_par``), into a reused buffer. Torch-free; numpy and llguidance are
imported on the first structured request only (the scheduler's core imports neither).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from copy import copy
from typing import Callable, Iterable, Optional, Union

from shared.grammar import GrammarError, to_llguidance
from shared.messages import GrammarSpec


def words_per_mask(vocab_size: int) -> int:
    """int32 words of one token mask row."""
    return (vocab_size + 31) // 32


class GrammarBackend:
    """Compiles specs for one tokenizer and fills the token masks of a step.

    ``tokenizer`` is an ``llguidance.LLTokenizer`` or a zero-argument callable returning one
    (built on the first use: loading a tokenizer takes seconds, a server without structured
    requests never pays it)."""

    def __init__(self, tokenizer: Union[object, Callable[[], object]], vocab_size: int,
                 cache_size: int = 256):
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.words = words_per_mask(vocab_size)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._buffer = None                 # numpy int32 [rows, words], grown on demand
        self._executor = None
        self.num_compiles = 0
        self.num_cache_hits = 0
        self.compile_seconds = 0.0

    @property
    def tokenizer(self):
        if callable(self._tokenizer):     # GrammarError (the tokenizer did not load) propagates
            self._tokenizer = self._tokenizer()
        return self._tokenizer

    def matcher(self, spec: GrammarSpec):
        """A fresh matcher for ``spec`` (from the cache when compiled before); GrammarError if
        the grammar does not compile."""
        from llguidance import LLMatcher

        key = (spec.kind, spec.value)
        proto = self._cache.get(key)
        if proto is not None:
            self._cache.move_to_end(key)
            self.num_cache_hits += 1
            return proto.deep_copy()
        t0 = time.perf_counter()
        proto = LLMatcher(self.tokenizer, to_llguidance(spec), log_level=0)
        self.compile_seconds += time.perf_counter() - t0
        if proto.is_error():
            raise GrammarError(proto.get_error())
        self.num_compiles += 1
        self._cache[key] = proto
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return proto.deep_copy()

    @property
    def num_cached(self) -> int:
        return len(self._cache)

    def fill_masks(self, matchers: Iterable[object]) -> bytes:
        """The masks of ``matchers``, one row each (see StepPlan.masks), as wire bytes."""
        import numpy as np
        from llguidance import LLExecutor
        from llguidance.numpy import fill_next_token_bitmask_par

        matchers = list(matchers)
        n = len(matchers)
        if n == 0:
            return b""
        held = 0 if self._buffer is None else self._buffer.shape[0]
        if held < n:
            self._buffer = np.zeros((max(n, 2 * held), self.words), dtype=np.int32)
        if self._executor is None:
            self._executor = LLExecutor()
        rows = self._buffer[:n]
        fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], rows)
        return rows.tobytes()


def llguidance_tokenizer(tokenizer, vocab_size: int, eos_token_ids: Iterable[int]):
    """An ``LLTokenizer`` over a fast HF tokenizer, with masks ``vocab_size`` wide (the model's
    logits; ids past the tokenizer's are never allowed). GrammarError if the model's vocabulary
    is smaller than the tokenizer's (a ``random:`` preset borrowing the default tokenizer)."""
    from llguidance import LLTokenizer

    if vocab_size < len(tokenizer):
        raise GrammarError(f"the model's vocabulary ({vocab_size}) is smaller than its tokenizer's "
                           f"({len(tokenizer)}): token masks cannot cover it")
    backend = copy(tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    return LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=list(eos_token_ids))


class TokenizerLoader:
    """Loads ``model``'s tokenizer in a background thread from construction on (seconds, off the
    scheduler loop); calling it waits for the load and returns the ``LLTokenizer``. A failure is
    re-raised as GrammarError on every call (each structured request is then refused with it)."""

    def __init__(self, model: str):
        self._hf = None
        self._error: Optional[Exception] = None
        self._thread = threading.Thread(target=self._load, args=(model,), name="tokenizer-load", daemon=True)
        self._thread.start()

    def _load(self, model: str) -> None:
        try:
            from shared.tokenizer import load_tokenizer

            self._hf = load_tokenizer(model)
        except Exception as e:  # noqa: BLE001 - reported to each structured request
            self._error = e

    def bind(self, vocab_size: int, eos_token_ids: Iterable[int]) -> Callable[[], object]:
        """The zero-argument tokenizer factory for a GrammarBackend of this model."""
        eos = list(eos_token_ids)

        def build():
            self._thread.join()
            if self._error is not None:
                raise GrammarError(f"the tokenizer did not load: {self._error}")
            return llguidance_tokenizer(self._hf, vocab_size, eos)
        return build


def advance(matcher, token: int) -> Optional[str]:
    """Feed one sampled token; return "stop" when the grammar is complete (nothing may follow),
    "error" when the token was not allowed (a mask the executor did not apply), else None."""
    if not matcher.consume_token(token):
        return "error"
    return "stop" if matcher.is_stopped() else None
