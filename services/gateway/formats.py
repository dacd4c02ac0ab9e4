"""The two OpenAI response shapes of a generation: chat and completion.

A format turns ``SampleDelta``s into stream chunks (``head``, ``chunks``, ``usage_chunk``) or,
collected with ``add``, into one response (``response``). Everything else about a request (checks,
submission, streaming, disconnects) is the one generation path in handlers.py.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

from shared.messages import SamplingParams

from . import protocol as P
from .generation import SampleDelta
from .sse import sse


class _Format:
    prefix: str                           # request id prefix
    param: str                            # the request field holding the prompt
    default_max_tokens: Optional[int]     # None: fill what is left of the context

    def __init__(self, decode_token: Callable[[list[int]], str], rid: str, created: int, model: str,
                 sampling: SamplingParams):
        self.decode_token, self.rid, self.created, self.model = decode_token, rid, created, model
        self.n, self.want_logprobs = sampling.n, sampling.logprobs is not None
        self.texts: list[list[str]] = [[] for _ in range(self.n)]
        self.reasons: list[Optional[str]] = [None] * self.n

    def token(self, token_id: int) -> str:
        return self.decode_token([token_id])

    def head(self) -> Iterator[bytes]:
        return iter(())

    def add(self, d: SampleDelta) -> None:
        self.texts[d.index].append(d.text)
        self.reasons[d.index] = d.finish_reason or self.reasons[d.index]


class ChatFormat(_Format):
    prefix, param, default_max_tokens = "chatcmpl", "messages", None

    def __init__(self, *args):
        super().__init__(*args)
        self.logprobs: list[Optional[P.ChatLogprobs]] = [None] * self.n

    def chunk(self, choices, usage=None) -> bytes:
        return sse(P.ChatCompletionChunk(self.rid, self.created, self.model, choices, usage))

    def head(self) -> Iterator[bytes]:
        return (self.chunk([P.ChatChunkChoice(i, P.ChatDelta(role="assistant", content=""))]) for i in range(self.n))

    def delta_logprobs(self, d: SampleDelta) -> Optional[P.ChatLogprobs]:
        if not d.logprobs:
            return None
        content = []
        for tid, lp in zip(d.token_ids, d.logprobs):
            tok = self.token(tid)
            top = [P.TopLogprob(t, v, list(t.encode())) for t, v in
                   ((self.token(i), v) for i, v in zip(lp.top_token_ids, lp.top_logprobs))]
            content.append(P.ChatTokenLogprob(tok, lp.logprob, list(tok.encode()), top))
        return P.ChatLogprobs(content)

    def chunks(self, d: SampleDelta) -> Iterator[bytes]:
        lp = self.delta_logprobs(d)
        if d.text or lp:
            yield self.chunk([P.ChatChunkChoice(d.index, P.ChatDelta(content=d.text), lp)])
        if d.finish_reason:
            yield self.chunk([P.ChatChunkChoice(d.index, P.ChatDelta(), None, d.finish_reason)])

    def usage_chunk(self, usage: P.Usage) -> bytes:
        return self.chunk([], usage)

    def add(self, d: SampleDelta) -> None:
        super().add(d)
        lp = self.delta_logprobs(d)
        if lp is not None:
            if self.logprobs[d.index] is None:
                self.logprobs[d.index] = P.ChatLogprobs([])
            self.logprobs[d.index].content.extend(lp.content)

    def response(self, usage: P.Usage) -> P.ChatCompletionResponse:
        choices = [P.ChatChoice(i, P.ChatMessageOut("assistant", "".join(self.texts[i])),
                                self.logprobs[i] if self.want_logprobs else None, self.reasons[i])
                   for i in range(self.n)]
        return P.ChatCompletionResponse(self.rid, self.created, self.model, choices, usage)


class CompletionFormat(_Format):
    prefix, param, default_max_tokens = "cmpl", "prompt", 16

    def __init__(self, *args):
        super().__init__(*args)
        self.offsets = [0] * self.n           # text offset of each sample's next token
        self.logprobs = [P.CompletionLogprobs([], [], [], []) if self.want_logprobs else None
                         for _ in range(self.n)]

    def chunk(self, choices, usage=None) -> bytes:
        return sse(P.CompletionResponse(self.rid, self.created, self.model, choices, usage))

    def delta_logprobs(self, d: SampleDelta) -> Optional[P.CompletionLogprobs]:
        """Also advances the sample's text offset past ``d``."""
        offset = self.offsets[d.index]
        self.offsets[d.index] += len(d.text)
        if not d.logprobs:
            return None
        out = P.CompletionLogprobs([], [], [], [])
        for tid, lp in zip(d.token_ids, d.logprobs):
            tok = self.token(tid)
            out.tokens.append(tok)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self.token(i): v for i, v in zip(lp.top_token_ids, lp.top_logprobs)})
            out.text_offset.append(offset)
            offset += len(tok)
        return out

    def chunks(self, d: SampleDelta) -> Iterator[bytes]:
        lp = self.delta_logprobs(d)
        if d.text or lp or d.finish_reason:
            yield self.chunk([P.CompletionChoice(d.index, d.text, lp, d.finish_reason)])

    def usage_chunk(self, usage: P.Usage) -> bytes:
        return self.chunk([], usage)

    def add(self, d: SampleDelta) -> None:
        super().add(d)
        lp, acc = self.delta_logprobs(d), self.logprobs[d.index]
        if lp is not None and acc is not None:
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(acc, name).extend(getattr(lp, name))

    def response(self, usage: P.Usage) -> P.CompletionResponse:
        choices = [P.CompletionChoice(i, "".join(self.texts[i]), self.logprobs[i], self.reasons[i])
                   for i in range(self.n)]
        return P.CompletionResponse(self.rid, self.created, self.model, choices, usage)
