"""One API request's generation: engine outputs -> per-sample text deltas.

``Generation`` submits the request through the engine client, detokenizes each sample
incrementally, applies stop strings (a sample that hits one is stopped at the scheduler at once,
so it frees its KV blocks while its siblings go on; the last one aborts the request), keeps token
counts for usage and feeds the latency metrics. It yields ``SampleDelta``s;
formats.py shapes them as chat or completion chunks. If the consumer stops early (client
disconnect, cancellation), the request is aborted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Optional, Sequence

from shared.messages import GrammarSpec, RequestOutput, SamplingParams, TokenLogprobs

from .detokenizer import Decode, IncrementalDetokenizer, StopStringMatcher
from .engine_client import EngineClient
from .metrics import RequestTimer

_CONTEXT_TOKENS = 5   # prompt tokens given to the detokenizer as context


@dataclass
class SampleDelta:
    index: int
    text: str                                  # new text, safe to send
    token_ids: list[int]                       # new tokens behind it
    logprobs: Optional[list[TokenLogprobs]]    # for token_ids, when requested
    finish_reason: Optional[str] = None        # stop / length / abort


class _Sample:
    def __init__(self, decode: Decode, context: Sequence[int], stops: Sequence[str]):
        self.detok = IncrementalDetokenizer(decode, context)
        self.stops = StopStringMatcher(stops)
        self.num_tokens = 0
        self.finish_reason: Optional[str] = None


class Generation:
    def __init__(self, engine: EngineClient, decode: Decode, request_id: str, prompt_ids: list[int],
                 sampling: SamplingParams, stops: Sequence[str], timer: Optional[RequestTimer] = None,
                 grammar: Optional[GrammarSpec] = None, cache_salt: Optional[str] = None):
        self.engine, self.request_id = engine, request_id
        self.grammar = grammar
        self.cache_salt = cache_salt
        self.prompt_ids, self.sampling = prompt_ids, sampling
        self.timer = timer
        ctx = prompt_ids[-_CONTEXT_TOKENS:]
        self.samples = [_Sample(decode, ctx, stops) for _ in range(sampling.n)]
        self.num_prompt_tokens = len(prompt_ids)
        self.num_cached_tokens = 0
        self._outputs: Optional[AsyncIterator[RequestOutput]] = None

    @property
    def num_generated_tokens(self) -> int:
        return sum(s.num_tokens for s in self.samples)

    @property
    def done(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)

    async def start(self) -> None:
        """Submit; raises ``EngineError`` if the scheduler refuses (before any response is sent)."""
        self._outputs = await self.engine.add(self.request_id, self.prompt_ids, self.sampling, self.grammar,
                                              cache_salt=self.cache_salt)
        if self.timer is not None:
            self.timer.engine = self.engine.engine_of(self.request_id)

    async def deltas(self) -> AsyncIterator[SampleDelta]:
        assert self._outputs is not None, "call start() first"
        try:
            async for out in self._outputs:
                delta = self._apply(out)
                if delta is not None:
                    yield delta
                if self.done:
                    break
        finally:
            if not self.done:
                self.engine.abort_nowait(self.request_id)
            elif self.timer is not None:
                reasons = {s.finish_reason for s in self.samples}
                self.timer.on_finish("stop" if "stop" in reasons else reasons.pop())
            await self._outputs.aclose()     # aborts at the scheduler if outputs are still due

    def _apply(self, out: RequestOutput) -> Optional[SampleDelta]:
        if not 0 <= out.index < len(self.samples):
            return None
        s = self.samples[out.index]
        if s.finish_reason is not None:
            return None      # already stopped here by a stop string; late tokens are dropped
        if out.num_prompt_tokens:
            self.num_prompt_tokens = out.num_prompt_tokens
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        s.num_tokens += len(out.token_ids)
        if self.timer is not None:
            self.timer.on_tokens(out.index, len(out.token_ids))
        text = s.detok.push(out.token_ids)
        if out.finish_reason is not None:
            text += s.detok.flush()
        safe = s.stops.feed(text)
        if s.stops.stopped:
            s.finish_reason = "stop"
            if out.finish_reason is None and not self.done:     # its siblings go on without it
                self.engine.abort_nowait(self.request_id, sample_index=out.index)
        elif out.finish_reason is not None:
            safe += s.stops.finish()
            s.finish_reason = out.finish_reason
        if not safe and s.finish_reason is None and not out.logprobs:
            return None
        return SampleDelta(out.index, safe, list(out.token_ids), out.logprobs, s.finish_reason)
