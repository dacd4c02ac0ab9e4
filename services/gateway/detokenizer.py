"""Incremental detokenization and stop strings, one instance per generated sample.

Byte-level BPE splits multi-byte UTF-8 characters across tokens (an emoji is often two or three
tokens); decoding a partial character gives U+FFFD. ``IncrementalDetokenizer`` holds such tokens
back until the character completes, so a streamed delta never contains half a character.

``StopStringMatcher`` finds stop strings in the accumulated text, even when one spans several
tokens, and holds back the tail of the text that could still become a stop string, so streamed
text never contains (a prefix of) a stop string that then matches.
"""
from __future__ import annotations

from typing import Callable, Sequence

Decode = Callable[[Sequence[int]], str]

_REPLACEMENT = "\ufffd"


def make_decode(tokenizer, skip_special_tokens: bool = True) -> Decode:
    """A fast ``ids -> str`` for a transformers tokenizer (uses the `tokenizers` backend directly)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode"):
        return lambda ids: backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas (the vLLM prefix/read-offset scheme).

    ``context`` (a few prompt tokens) lets tokenizers that strip a leading space at the start of a
    decode (SentencePiece) render the first generated token correctly; it is never emitted.
    """

    def __init__(self, decode: Decode, context: Sequence[int] = ()):
        self._decode = decode
        self.ids: list[int] = list(context)
        self._prefix_offset = 0              # start of the window re-decoded for context
        self._read_offset = len(self.ids)    # tokens before this are already emitted as text

    def push(self, token_ids: Sequence[int]) -> str:
        """Add new tokens; return the text they complete ('' while a character is incomplete)."""
        self.ids.extend(token_ids)
        prefix_text = self._decode(self.ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""  # incomplete UTF-8 sequence (or nothing visible yet): wait for more tokens
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """At the end of the sequence: whatever is still held back (possibly with U+FFFD)."""
        prefix_text = self._decode(self.ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self.ids)
        return new_text[len(prefix_text):]


class StopStringMatcher:
    """Accumulates a sample's text; reports the first stop string and what may be sent so far."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._max_len = max((len(s) for s in self.stops), default=0)
        self.text = ""        # full text, truncated before the stop string once one matched
        self.sent = 0         # characters of `text` already handed out
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Append ``delta``; return the text that is now safe to send."""
        if self.stopped or not delta:
            return ""
        start = max(0, len(self.text) - self._max_len + 1)
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self._take(len(self.text))
        return self._take(len(self.text) - self._held_back())

    def finish(self) -> str:
        """The sample ended: release the held-back tail."""
        return self._take(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for k in range(min(self._max_len - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def _take(self, upto: int) -> str:
        out, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        return out
