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
from .tools import ContentDelta


class _Format:
    prefix: str                           # request id prefix
    param: str                            # the request field holding the prompt
    default_max_tokens: Optional[int]     # None: fill what is left of the context

    def __init__(self, decode_token: Callable[[list[int]], str], rid: str, created: int, model: str,
                 sampling: SamplingParams, **options):
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
    """``tools``: None, or how the text becomes tool calls (tools.py: a parser for tool_choice
    auto, ConstrainedCalls for required / a named tool): ``parse(text)`` for a whole reply,
    ``stream()`` per sample for chunks. A reply with tool calls that ended normally finishes
    with "tool_calls"."""

    prefix, param, default_max_tokens = "chatcmpl", "messages", None

    def __init__(self, *args, tools=None):
        super().__init__(*args)
        self.logprobs: list[Optional[P.ChatLogprobs]] = [None] * self.n
        self.tools = tools
        self.streams = [tools.stream() for _ in range(self.n)] if tools is not None else None
        self.num_calls = [0] * self.n          # tool calls streamed per sample

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

    def finish_reason(self, reason: Optional[str], has_calls: bool) -> Optional[str]:
        return "tool_calls" if has_calls and reason == "stop" else reason

    def chunks(self, d: SampleDelta) -> Iterator[bytes]:
        lp = self.delta_logprobs(d)
        if self.streams is None:
            if d.text or lp:
                yield self.chunk([P.ChatChunkChoice(d.index, P.ChatDelta(content=d.text), lp)])
        else:
            yield from self._tool_chunks(d, lp)
        if d.finish_reason:
            reason = self.finish_reason(d.finish_reason, self.num_calls[d.index] > 0)
            yield self.chunk([P.ChatChunkChoice(d.index, P.ChatDelta(), None, reason)])

    def _tool_chunks(self, d: SampleDelta, lp: Optional[P.ChatLogprobs]) -> Iterator[bytes]:
        """Content the parser lets through as content deltas, each finished call as one tool
        call delta (id, name and whole arguments: the openai client assembles it)."""
        stream = self.streams[d.index]
        events = stream.feed(d.text) if d.text else []
        if d.finish_reason:
            events += stream.finish()
        if lp:                                  # logprobs travel with the tokens, whatever they become
            yield self.chunk([P.ChatChunkChoice(d.index, P.ChatDelta(), lp)])
        for ev in events:
            if isinstance(ev, ContentDelta):
                if ev.text:
                    yield self.chunk([P.ChatChunkChoice(d.index, P.ChatDelta(content=ev.text))])
                continue
            call = P.ToolCallDeltaOut(self.num_calls[d.index], ev.id, "function",
                                      P.FunctionDelta(ev.name, ev.arguments))
            self.num_calls[d.index] += 1
            yield self.chunk([P.ChatChunkChoice(d.index, P.ChatDelta(tool_calls=[call]))])

    def usage_chunk(self, usage: P.Usage) -> bytes:
        return self.chunk([], usage)

    def add(self, d: SampleDelta) -> None:
        super().add(d)
        lp = self.delta_logprobs(d)
        if lp is not None:
            if self.logprobs[d.index] is None:
                self.logprobs[d.index] = P.ChatLogprobs([])
            self.logprobs[d.index].content.extend(lp.content)

    def message(self, i: int) -> tuple[P.ChatMessageOut, Optional[str]]:
        text = "".join(self.texts[i])
        if self.tools is None:
            return P.ChatMessageOut("assistant", text), self.reasons[i]
        content, calls = self.tools.parse(text)
        out = [P.ToolCallOut(c.id, P.FunctionCall(c.name, c.arguments)) for c in calls]
        return P.ChatMessageOut("assistant", content, out), self.finish_reason(self.reasons[i], bool(out))

    def response(self, usage: P.Usage) -> P.ChatCompletionResponse:
        choices = []
        for i in range(self.n):
            message, reason = self.message(i)
            choices.append(P.ChatChoice(i, message, self.logprobs[i] if self.want_logprobs else None, reason))
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
