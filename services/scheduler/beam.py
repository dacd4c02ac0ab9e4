"""Beam search policy: one request's search, step by step, as Hugging Face ``generate`` runs it
(``num_beams=K, num_return_sequences=K, do_sample=False``, ``length_penalty``, ``early_stopping``
True or False; transformers' vectorised ``_beam_search``).

Each step takes, for every running beam, its score (the sum of its tokens' logprobs) and its
``keep`` best next tokens with their logprobs (``keep = max(2, 1 + number of EOS ids) * K``:
enough that K beams survive however many candidates end), and returns the next running beams
as (parent beam, token, score). Candidates that end (EOS, or ``max_tokens`` reached) among the
K best become finished hypotheses, scored ``sum of logprobs / generated_len ** length_penalty``;
the K best finished ones are kept. The search ends as HF's does: early_stopping=True once K
hypotheses finished, False when no running beam can beat the worst finished one at its current
length (HF's heuristic), and in any case when every candidate ended.

Arithmetic is rounded to float32 where HF computes in float32, so near-ties break the same way.
HF keeps K running beams even when fewer than K candidates go on, padding with ended ones at a
score of -1e9 that can never be chosen again; here those are simply not run. Pure Python: what
the engine does with the beams (fork, append, free) is the scheduler's.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterable

_PACK = struct.Struct("f")
NEG = -1.0e9                      # HF's "never choose this" score


def f32(x: float) -> float:
    """``x`` rounded to float32, as a torch float32 op would store it."""
    return _PACK.unpack(_PACK.pack(x))[0]


@dataclass
class Hypothesis:
    token_ids: list[int]          # generated tokens, the ending one (EOS) included
    score: float                  # length-penalised (with HF's -1e9 penalties where they apply)
    cumulative_logprob: float
    finished: bool = False        # a real hypothesis, not one of the K empty slots


@dataclass
class Beam:
    """A running beam as the search sees it."""

    score: float                              # sum of its tokens' logprobs (float32)
    token_ids: list[int]                      # its generated tokens
    candidates: list[tuple[int, float]]       # its ``keep`` best next tokens, (token, logprob)


@dataclass
class BeamSearch:
    width: int
    max_tokens: int
    eos_token_ids: frozenset
    length_penalty: float = 1.0
    early_stopping: bool = False
    num_generated: int = 0        # tokens each running beam has generated
    done: bool = False
    improvable: bool = True       # HF's is_early_stop_heuristic_unsatisfied
    finished: list[Hypothesis] = field(default_factory=list)

    def __post_init__(self):
        self.keep = max(2, 1 + len(self.eos_token_ids)) * self.width
        self.finished = [Hypothesis([], NEG, NEG) for _ in range(self.width)]

    def step(self, beams: list[Beam]) -> list[tuple[int, int, float]]:
        """One step over the running ``beams``: the next running beams as (index in ``beams``,
        token, score), best first (at most K, fewer when fewer candidates go on). Sets ``done``."""
        K, g = self.width, self.num_generated
        scored = [(f32(beam.score + lp), b, token)
                  for b, beam in enumerate(beams) for token, lp in beam.candidates]
        scored.sort(key=lambda c: -c[0])                   # stable: beam order, then rank
        top = scored[:self.keep]
        at_max = g + 1 >= self.max_tokens
        ends = [at_max or token in self.eos_token_ids for _, _, token in top]
        running = [(b, token, acc) for (acc, b, token), end in zip(top, ends) if not end][:K]
        self._update_finished(beams, top, ends)
        self.num_generated = g + 1
        self._check_improvable(running)
        all_finished = all(h.finished for h in self.finished)
        self.done = not (self.improvable and not (all_finished and self.early_stopping)
                         and not all(ends) and running)
        return running

    def _update_finished(self, beams: list[Beam], top, ends) -> None:
        """Candidates among the K best that end join the finished hypotheses if they beat them."""
        K = self.width
        length = f32((self.num_generated + 1) ** self.length_penalty)
        full = self.early_stopping and all(h.finished for h in self.finished)
        merged = list(self.finished)
        for i, ((acc, b, token), end) in enumerate(zip(top, ends)):
            score = f32(acc / length)
            just_finished = end and i < K
            if full:
                score = f32(score + NEG)
            if not self.improvable:
                score = f32(score + NEG)
            if not just_finished:
                score = f32(score + NEG)
            merged.append(Hypothesis(beams[b].token_ids + [token], score, acc, just_finished))
        merged.sort(key=lambda h: -h.score)                # stable: kept ones first on ties
        self.finished = merged[:K]

    def _check_improvable(self, running: list[tuple[int, int, float]]) -> None:
        """HF's heuristic: can the best running beam still beat the worst finished hypothesis?"""
        if not running:
            return
        best = f32(running[0][2] / f32(self.num_generated ** self.length_penalty))
        worst = min(h.score for h in self.finished) if all(h.finished for h in self.finished) else NEG
        self.improvable = self.improvable and best > worst

    def results(self) -> Iterable[Hypothesis]:
        """The K hypotheses, best first (call once ``done``)."""
        return self.finished
