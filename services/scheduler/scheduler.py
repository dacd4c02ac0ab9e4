"""The scheduling policy: who runs each step, with how many tokens, and who gets preempted.

Each step packs, under the token budget (``max_num_batched_tokens``) and ``max_num_seqs``:
  1. running sequences that decode (one token each), preempting the most recently admitted
     running sequence when one cannot get a block;
  2. running sequences in the middle of a chunked prefill (next chunk);
  3. swapped sequences, back in FIFO order when their blocks fit (no step that preempted);
  4. waiting sequences, FCFS, when their first chunk fits above the watermark (same).
3 and 4 are one admission path; its reserve kept free is the watermark plus, for every admitted
n > 1 request not forked yet (and the candidate itself), the ``n - 1`` blocks its children take
right after the fork. The step under construction is a ``StepDraft`` passed through the phases;
it becomes the plan and, until ``update``, the step in flight.

A request with ``n`` samples is one sequence until its prompt is computed; the step that computes
the last prompt chunk forks ``n - 1`` children that share the parent's blocks. Afterwards every
sample is an independent sequence: it is scheduled, preempted (one sequence at a time, victims
from the tail of the running list) and finished on its own. Beam search would fork the same way,
from any sequence at any step.

One sample can be finished early (``finish_sample``: the gateway saw a stop string in it). After
the fork that drops its sequence like an abort; before it, the sample is struck from the fork
(sample 0, the parent, still computes the prompt for its siblings and is dropped right after the
forking step, so every sample keeps its index and seeded stream).

With a sliding window (every layer windowed, ``cache_config.sliding_window`` W > 0, the model's),
``update`` frees, for every sequence the step computed, the blocks that left its window
(block_manager.py: their table entries become ``NULL_BLOCK``), so a long generation holds at most
``ceil((W - 1) / block_size) + 1`` blocks between steps, plus what its next chunk grows into.

Structured outputs (``AddRequest.grammar``, with a ``GrammarBackend``): each sequence holds a
grammar matcher (grammar.py). Every plan lists the sampling sequences with one in
``mask_seq_ids`` and carries their token masks, or, with ``schedule(defer_masks=True)`` (the
service), leaves them to ``step_masks`` so they are computed while the executor runs the forward
pass. ``update`` feeds each sampled token to its matcher; a complete grammar finishes the sample
with "stop" (even before ``min_tokens``: nothing may follow it).

Beam search (``use_beam_search``, n beams; beam.py decides, as HF ``generate`` does): a request
starts as one sequence; each step every running beam's executor row returns its best next
tokens (as logprobs: the executor never appends to a beam), and once the request's every beam
has them the search picks the next beams. A beam picked once goes on (its token travels in the
next plan's ``appends``); picked again, it forks a child that shares its blocks (copy-on-write of
the partial last block, at the child's first step), registered on the executor by a ``NewSeq``;
picked by none, it is freed. Beams are preempted one at a time like any sequence; the others wait
(computing nothing) until it is back, and if waiting beams alone hold the blocks a queued one
needs, they are preempted too. The n outputs, best first, come when the search ends.

Preempted sequences are protected until they produce a token again, so the victim is another
sequence whenever one is unprotected (anti-thrash). Plans are diffs: decodes are two int lists,
and only tables that changed travel as ``TableUpdate``.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Iterable, Optional

import msgspec

from services.scheduler.beam import Beam, BeamSearch
from services.scheduler.block_manager import BlockManager
from services.scheduler.grammar import GrammarBackend, advance
from services.scheduler.histogram import LATENCY_BUCKETS, TOKENS_PER_STEP_BUCKETS, FixedHistogram
from services.scheduler.sequence import FINISHED, RUNNING, SWAPPED, WAITING, Request, Sequence
from services.scheduler.step_draft import StepDraft
from shared.config import CacheConfig, SchedulerConfig
from shared.grammar import GrammarError
from shared.messages import (AddRequest, FinishReason, Fork, NewSeq, RequestError, RequestOutput,
                             SamplingParams, SchedulerStats, StepMasks, StepPlan, StepResult)


def victim_index(running: list[Sequence], i: int) -> int:
    """Index in ``running`` of the sequence to preempt so ``running[i]`` can grow: the most
    recently admitted unprotected one behind it, else ``i`` itself if unprotected, else the most
    recent one behind it, else ``i``."""
    for j in range(len(running) - 1, i, -1):
        if not running[j].protected:
            return j
    if not running[i].protected or len(running) == i + 1:
        return i
    return len(running) - 1


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 eos_token_ids: Iterable[int] = (), grammars: Optional[GrammarBackend] = None):
        if cache_config.num_blocks < 1:
            raise ValueError("cache_config.num_blocks must be set (> 0) before building the scheduler")
        self.block_size = cache_config.block_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.grammars = grammars
        self.num_constrained = 0                     # live sequences with a grammar matcher
        self._retired_pool_counts = [0, 0, 0]        # queries, hits, evictions of replaced pools
        self._set_pool(scheduler_config, cache_config)
        self.requests: dict[str, Request] = {}
        self.seqs: dict[int, Sequence] = {}          # live sequences by id
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []            # admission order: the tail is preempted first
        self.swapped: deque[Sequence] = deque()
        self._next_seq_id = 0
        self._step_id = 0
        self._finished_ids: list[int] = []           # for the next plan
        self._appends: list[tuple[int, int]] = []    # beam search: (seq id, token) for the next plan
        self._in_flight = StepDraft(0)               # the draft of the plan sent, until its update
        self._in_flight_step = -1
        self._running_dirty = False
        self.num_preemptions = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        # paging counters (docs/OPERATIONS.md), counted where the event happens
        self.num_repeat_preemptions = 0              # preemptions of a sequence preempted before
        self.num_recomputed_tokens = 0
        self.num_swapped_out_blocks = 0
        self.num_swapped_in_blocks = 0
        self.e2e_time = FixedHistogram(LATENCY_BUCKETS)
        self.queue_time = FixedHistogram(LATENCY_BUCKETS)
        self.prefill_time = FixedHistogram(LATENCY_BUCKETS)
        self.decode_time = FixedHistogram(LATENCY_BUCKETS)
        self.tokens_per_step = FixedHistogram(TOKENS_PER_STEP_BUCKETS)

    def _set_pool(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig) -> None:
        """A new, empty block pool (and prefix cache) for these configs."""
        self.config = scheduler_config
        self.cache_config = cache_config
        old = getattr(self, "block_manager", None)
        if old is not None:                          # its counts stay in the totals
            for i, n in enumerate(self._pool_counts(old)):
                self._retired_pool_counts[i] += n
        self.block_manager = BlockManager(cache_config.num_blocks, cache_config.block_size,
                                          cache_config.num_host_blocks, cache_config.enable_prefix_caching,
                                          cache_config.sliding_window)
        self.watermark_blocks = int(cache_config.watermark * cache_config.num_blocks)
        # A sequence may never hold more tokens than the model allows or the pool can store.
        self.max_len = min(scheduler_config.max_model_len, cache_config.num_blocks * cache_config.block_size)

    # ------------------------------------------------------------------------------- public API

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def num_running(self) -> int:
        return sum(s.status == RUNNING for s in self.running) if self._running_dirty else len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_swapped(self) -> int:
        return len(self.swapped)

    def has_unfinished(self) -> bool:
        return bool(self.num_running or self.waiting or self.swapped)

    @property
    def pending_drops(self) -> tuple[int, ...]:
        """Seq ids that finished since the last plan: the next plan tells the executor to drop them."""
        return tuple(self._finished_ids)

    def has_request(self, request_id: str) -> bool:
        """Whether the request is known and not done: added, not aborted, some sample unfinished."""
        return request_id in self.requests

    def request_ids_of(self, seq_ids: Iterable[int]) -> set[str]:
        """The request ids of the live sequences among ``seq_ids`` (seq ids that finished, were
        aborted or never existed are skipped). The service uses it to find the requests an
        executor error touches."""
        seqs = self.seqs
        return {seqs[sid].request.request_id for sid in seq_ids if sid in seqs}

    def add_request(self, add: AddRequest) -> Optional[RequestError]:
        def error(code: str, message: str) -> RequestError:
            return RequestError(request_id=add.request_id, code=code, message=message)

        n, prompt = add.sampling.n, add.prompt_token_ids
        if add.request_id in self.requests:
            return error("invalid", f"request id {add.request_id!r} is already in use")
        if not prompt:
            return error("invalid", "the prompt is empty")
        if not 1 <= n <= self.config.max_num_seqs:
            return error("invalid", f"n must be in 1..{self.config.max_num_seqs} (max_num_seqs), got {n}")
        if add.sampling.max_tokens < 1:
            return error("invalid", f"max_tokens must be >= 1, got {add.sampling.max_tokens}")
        if len(prompt) >= self.max_len:
            limit = ("max_model_len" if self.max_len == self.config.max_model_len
                     else "the KV cache capacity")
            return error("too_long", f"prompt has {len(prompt)} tokens; {limit} is {self.max_len} tokens, "
                                     f"so at most {self.max_len - 1} prompt tokens fit")
        if len(self.waiting) >= self.config.max_waiting:
            return error("queue_full", f"the waiting queue is full ({self.config.max_waiting} requests)")
        beam = None
        if add.sampling.use_beam_search:
            problem = self._beam_problem(add)
            if problem is not None:
                return error(*problem)
            sampling = add.sampling
            beam = BeamSearch(sampling.n, sampling.max_tokens, frozenset(self.eos_token_ids),
                              sampling.length_penalty, sampling.early_stopping)
        matcher = None
        if add.grammar is not None:
            if self.grammars is None:
                return error("invalid", "structured outputs are not available on this engine "
                                        "(no grammar backend: the scheduler has no tokenizer)")
            try:
                matcher = self.grammars.matcher(add.grammar)
            except GrammarError as e:
                return error("invalid", f"the {add.grammar.kind} constraint does not compile: {e}")
        request = Request(add, self.eos_token_ids)
        request.arrival_time = time.monotonic()
        if beam is not None:                # each beam's row returns its `keep` best next tokens
            request.beam = beam
            request.sampling = msgspec.structs.replace(add.sampling, logprobs=beam.keep, temperature=0.0)
        seq = self._new_seq(request, 0, list(prompt))
        request.beams = [seq] if beam is not None else []
        if matcher is not None:
            seq.matcher = matcher
            self.num_constrained += 1
        self.requests[add.request_id] = request
        self.waiting.append(seq)
        return None

    def _beam_problem(self, add: AddRequest) -> Optional[tuple[str, str]]:
        """Why a beam search request cannot run as asked, or None."""
        p, default = add.sampling, SamplingParams()
        width = p.n
        keep = max(2, 1 + len(self.eos_token_ids)) * width
        if keep > 20:                       # the executor returns at most 20 logprobs per row
            return "invalid", (f"beam search keeps {keep} candidates per beam with {width} beams and "
                               f"{len(self.eos_token_ids)} EOS ids; at most 20 fit (fewer beams)")
        changed = [name for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                     "presence_penalty", "frequency_penalty", "seed", "logprobs",
                                     "logit_bias", "min_tokens", "ignore_eos", "stop_token_ids")
                   if getattr(p, name) != getattr(default, name) and not (name == "temperature" and p.temperature == 0)]
        if changed:
            return "invalid", f"beam search does not take {', '.join(changed)} (it is greedy over beams)"
        if add.grammar is not None:
            return "invalid", "beam search does not take a structured-output constraint"
        if len(add.prompt_token_ids) + p.max_tokens > self.max_len:     # beams do not stop at the context
            return "too_long", (f"a beam search of {p.max_tokens} tokens after a {len(add.prompt_token_ids)}-token "
                                f"prompt exceeds the {self.max_len}-token context")
        bs = self.block_size
        need = -(-len(add.prompt_token_ids) // bs) + width * (-(-p.max_tokens // bs) + 1)
        if need > self.block_manager.num_blocks:
            return "too_long", (f"{width} beams of up to {p.max_tokens} tokens after a {len(add.prompt_token_ids)}-token "
                                f"prompt may need {need} KV blocks; the pool has {self.block_manager.num_blocks}")
        return None

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            self._drop(seq)

    def finish_sample(self, request_id: str, index: int,
                      reason: FinishReason = "abort") -> Optional[RequestOutput]:
        """Finish sample ``index`` of a request now, in whatever state it is (waiting, before or
        after the fork, running, swapped, in the step in flight): its blocks are released (shared
        ones only lose a reference), its siblings go on, and the request ends with its last sample.

        Returns the sample's last output (no tokens, ``reason``) for the stream, or None when the
        request is unknown or the sample already finished. ValueError for an index not in 0..n-1.
        """
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request.beam is not None:        # beams are not samples: the search stops as a whole
            raise ValueError(f"request {request_id!r} is a beam search: it can only be aborted whole")
        if not 0 <= index < request.sampling.n:
            raise ValueError(f"sample index {index} is out of range: request {request_id!r} "
                             f"has n={request.sampling.n}")
        if request.forked:                          # every sample left has its own sequence
            seq = next((s for s in request.seqs if s.index == index), None)
            if seq is None or seq.status == FINISHED:
                return None                         # finished, or struck from the fork earlier
            self._drop(seq)
        else:                                       # not forked yet: only the parent exists
            if index == 0 and not request.drop_parent:
                request.drop_parent = True
            elif index in request.to_fork:
                request.to_fork.remove(index)
            else:
                return None
            if not request.to_fork and request.drop_parent:
                self.abort_request(request_id)      # no sample left
        return RequestOutput(request_id, index, [], reason, len(request.prompt_token_ids),
                             request.num_cached_tokens)

    def reset_for_new_executor(self, scheduler_config: Optional[SchedulerConfig] = None,
                               cache_config: Optional[CacheConfig] = None) -> list[RequestError]:
        """The executor was lost with every KV block it held; a new one is ready (its pool may
        differ: pass its configs, same block size). Every running and swapped sequence is
        preempted by recompute (prompt + generated tokens are recomputed, sampling resumes after
        the last emitted token, so no output is sent twice), the block pool and prefix cache
        start empty, and all sequences wait again: running ones first (oldest admitted first),
        then swapped, then the waiting queue. A step in flight is forgotten. Requests that no
        longer fit the new pool or context are dropped; their errors are returned."""
        cache_config = cache_config or self.cache_config
        if cache_config.block_size != self.block_size:
            raise ValueError(f"block size {cache_config.block_size} differs from {self.block_size}")
        self._set_pool(scheduler_config or self.config, cache_config)
        live = [s for s in self.running if s.status == RUNNING] + list(self.swapped) + list(self.waiting)
        self.running, self.swapped, self.waiting = [], deque(), deque()
        self._finished_ids, self._in_flight, self._appends = [], StepDraft(0), []
        self._in_flight_step, self._running_dirty = -1, False
        too_long: dict[str, int] = {}
        for seq in live:
            if seq.status != WAITING:
                self._count_preemption(seq)
            seq.recompute_upto = max(seq.recompute_upto, seq.num_computed)
            seq.status, seq.num_computed, seq.protected = WAITING, 0, False
            seq.on_executor = False
            self.waiting.append(seq)
            if len(seq.token_ids) >= self.max_len:
                too_long[seq.request.request_id] = max(too_long.get(seq.request.request_id, 0),
                                                       len(seq.token_ids))
        errors = []
        for rid, num_tokens in too_long.items():
            self.abort_request(rid)
            errors.append(RequestError(
                request_id=rid, code="executor_error",
                message=f"the restarted executor holds at most {self.max_len} tokens per sequence; "
                        f"this request already has {num_tokens}"))
        return errors

    @staticmethod
    def _pool_counts(bm: BlockManager) -> tuple[int, int, int]:
        return bm.prefix_queries, bm.prefix_hits, bm.pool.num_evictions

    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        queries, hits, evictions = (a + b for a, b in zip(self._retired_pool_counts, self._pool_counts(bm)))
        return SchedulerStats(
            num_running=self.num_running, num_waiting=len(self.waiting), num_swapped=len(self.swapped),
            num_blocks=bm.num_blocks, num_free_blocks=bm.num_free_blocks,
            kv_cache_usage=1.0 - bm.num_free_blocks / bm.num_blocks,
            prefix_cache_queries=queries, prefix_cache_hits=hits,
            num_preemptions=self.num_preemptions, prompt_tokens=self.num_prompt_tokens,
            generation_tokens=self.num_generation_tokens,
            prefix_cache_evictions=evictions, recomputed_tokens=self.num_recomputed_tokens,
            swapped_out_blocks=self.num_swapped_out_blocks, swapped_in_blocks=self.num_swapped_in_blocks,
            repeat_preemptions=self.num_repeat_preemptions,
            e2e_time=self.e2e_time.snapshot(), queue_time=self.queue_time.snapshot(),
            prefill_time=self.prefill_time.snapshot(), decode_time=self.decode_time.snapshot(),
            tokens_per_step=self.tokens_per_step.snapshot())

    # ------------------------------------------------------------------------------- schedule

    def schedule(self, defer_masks: bool = False) -> Optional[StepPlan]:
        """The next step's plan, or None when there is nothing to run. With ``defer_masks`` the
        plan names its constrained samplers but leaves their masks to ``step_masks``."""
        if self._running_dirty:
            self.running = [s for s in self.running if s.status == RUNNING]
            self._running_dirty = False
        draft = self._in_flight = StepDraft(self.config.max_num_batched_tokens)
        self.block_manager.begin_step()
        prefilling = self._schedule_decodes(draft)
        self._schedule_prefills(draft, prefilling)
        for seq, num_tokens in draft.scheduled:  # no more preemption this step: publish their blocks
            self._publish(seq, num_tokens)
        if not draft.preempted_any:
            self._admit_queued(draft)
            if not draft.scheduled and (self.waiting or self.swapped):
                self._preempt_waiting_beams(draft)
        if not draft.scheduled and not draft.preempted_any:
            self.block_manager.end_step()
            return None
        dropped_parents = self._sample_and_fork(draft)
        if self.num_constrained:                    # no per-sequence look when none is constrained
            for sid in draft.samplers:
                matcher = self.seqs[sid].matcher
                if matcher is not None:
                    draft.mask_seq_ids.append(sid)
                    draft.matchers.append(matcher)
        plan = draft.to_plan(self._step_id, self.block_manager, self._finished_ids)
        self.block_manager.end_step()
        if self._appends:                  # beams whose state the executor still holds
            seqs = self.seqs
            plan.appends = [(sid, t) for sid, t in self._appends if sid in seqs and seqs[sid].on_executor]
            self._appends = []
        if draft.matchers and not defer_masks:
            plan.masks = self.grammars.fill_masks(draft.matchers)
        self._finished_ids = []
        for parent in dropped_parents:     # its siblings sample from its logits in this plan
            self._drop(parent)             # after which the executor drops it (next plan)
        self._in_flight_step = self._step_id
        self._step_id += 1
        if draft.scheduled:
            self.tokens_per_step.observe(self.config.max_num_batched_tokens - draft.budget)
        return plan

    def step_masks(self, plan: StepPlan) -> StepMasks:
        """The token masks of the plan in flight, sent without them (``defer_masks``)."""
        if plan.step_id != self._in_flight_step:
            raise ValueError(f"masks for step {plan.step_id}, but step {self._in_flight_step} is in flight")
        matchers = self._in_flight.matchers
        return StepMasks(step_id=plan.step_id, masks=self.grammars.fill_masks(matchers) if matchers else b"")

    def _schedule_decodes(self, draft: StepDraft) -> list[Sequence]:
        """One token for every running sequence that decodes, preempting from the tail when blocks
        run out; returns the running sequences that are in the middle of their prompt instead."""
        bm, running, scheduled, copies, changed = (self.block_manager, self.running, draft.scheduled,
                                                   draft.copies, draft.changed)
        budget = draft.budget
        prefilling: list[Sequence] = []
        i = 0
        while i < len(running):
            seq = running[i]
            remaining = len(seq.token_ids) - seq.num_computed
            if remaining != 1:
                if remaining:
                    prefilling.append(seq)
                i += 1                                     # 0: a beam waiting for its siblings
                continue
            if budget == 0:
                break
            start = bm.append_slots(seq.seq_id, seq.num_computed, 1, copies)
            while start is None:                           # out of blocks: preempt someone
                victim = running.pop(victim_index(running, i))
                self._preempt(victim, draft)
                if victim is seq:
                    break
                start = bm.append_slots(seq.seq_id, seq.num_computed, 1, copies)
            if start is None:
                continue                                   # seq itself was preempted
            if start >= 0:
                changed.setdefault(seq.seq_id, start)
            if not seq.on_executor:                        # a beam forked at the last update
                self._register(seq, 1, draft)
            scheduled.append((seq, 1))
            budget -= 1
            i += 1
        draft.budget = budget
        return prefilling

    def _schedule_prefills(self, draft: StepDraft, prefilling: list[Sequence]) -> None:
        """The next prompt chunk of each running sequence in ``prefilling``; later ones are
        preempted to make room for earlier ones, then the chunk shrinks to the free blocks."""
        bm, running = self.block_manager, self.running
        for j, seq in enumerate(prefilling):
            if seq.status != RUNNING:
                continue                                   # preempted by an earlier prefill
            remaining = len(seq.token_ids) - seq.num_computed
            num_new = self._chunk_size(remaining, draft.budget)
            if num_new == 0:
                continue
            start = bm.append_slots(seq.seq_id, seq.num_computed, num_new, draft.copies)
            for victim in reversed(prefilling[j + 1:]):
                if start is not None:
                    break
                if victim.status == RUNNING and not victim.protected:
                    running.remove(victim)
                    self._preempt(victim, draft)
                    start = bm.append_slots(seq.seq_id, seq.num_computed, num_new, draft.copies)
            if start is None:                              # shrink the chunk to the free blocks
                room = bm.free_slots(seq.seq_id, seq.num_computed)
                num_new = self._chunk_size(remaining, draft.budget, room)
                if num_new > 0:
                    start = bm.append_slots(seq.seq_id, seq.num_computed, num_new, draft.copies)
            if start is None:
                continue
            if start >= 0:
                draft.changed.setdefault(seq.seq_id, start)
            self._count_recomputed(seq, num_new)
            draft.add(seq, num_new)

    def _chunk_size(self, remaining: int, budget: int, room: Optional[int] = None) -> int:
        """The one chunk rule: how many of a sequence's ``remaining`` tokens to compute this step.
        All of them when they fit the token budget (and ``room``, the token slots its KV memory
        may take, when given); else, with chunked prefill, as many as fit; else 0: it waits."""
        num_new = min(remaining, budget) if room is None else min(remaining, budget, room)
        if num_new < remaining and not self.config.enable_chunked_prefill:
            return 0
        return max(num_new, 0)

    def _preempt(self, seq: Sequence, draft: StepDraft) -> None:
        """Swap the sequence out when the host pool has room (swap mode), else recompute later."""
        bm = self.block_manager
        self._count_preemption(seq)
        seq.protected = True
        idle = len(seq.token_ids) == seq.num_computed      # a beam waiting: no chunk to swap back in for
        if self.config.preemption_mode == "swap" and seq.on_executor and not idle and bm.can_swap_out(seq.seq_id):
            pairs = bm.swap_out(seq.seq_id)
            self.num_swapped_out_blocks += len(pairs)
            draft.swap_out.extend(pairs)
            seq.status = SWAPPED
            self.swapped.appendleft(seq)
        else:
            bm.free(seq.seq_id)
            seq.recompute_upto = max(seq.recompute_upto, seq.num_computed)
            seq.num_computed = 0
            seq.status = WAITING
            self.waiting.appendleft(seq)
            if seq.on_executor:
                draft.preempted.append(seq.seq_id)
            seq.on_executor = False
        draft.changed.pop(seq.seq_id, None)

    def _count_preemption(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        if seq.num_preempted:
            self.num_repeat_preemptions += 1
        seq.num_preempted += 1

    def _count_recomputed(self, seq: Sequence, num_new: int) -> None:
        """The part of a chunk (admission or prefill) below the sequence's recompute mark is
        computed again. A one-token decode step never is: its token was never computed."""
        if seq.recompute_upto > seq.num_computed:
            self.num_recomputed_tokens += min(num_new, seq.recompute_upto - seq.num_computed)

    def _observe_request(self, request: Request) -> None:
        """Phase histograms of a request that ended in the scheduler (after its first token)."""
        if not request.first_token_time:
            return
        now = time.monotonic()
        self.e2e_time.observe(now - request.arrival_time)
        self.queue_time.observe(request.scheduled_time - request.arrival_time)
        self.prefill_time.observe(request.first_token_time - request.scheduled_time)
        self.decode_time.observe(now - request.first_token_time)

    def _pending_fork_blocks(self) -> int:
        """Fork blocks of running sequences whose request has not forked yet (admitted, prompt
        still computing): admission keeps them free on top of the watermark."""
        return sum(s.request.fork_blocks for s in self.running if s.request.to_fork)

    def _admit_queued(self, draft: StepDraft) -> None:
        """Admission, one path for both queues: swapped sequences come back first (FIFO), waiting
        ones (FCFS) only once none is left swapped, and it stops at the first that does not fit.

        A sequence takes ``1 + fork_blocks`` of the ``max_num_seqs`` slots (its future fork
        children count; a beam search takes n at its first beam's admission, none for the
        others) and must fit in the free blocks less a reserve: the watermark, kept for running
        sequences to grow, plus the fork blocks of the admitted n > 1 requests not forked yet
        and of this one. Alone (nothing running), it is admitted without a reserve."""
        if not (self.swapped or self.waiting):
            return
        pending = self._pending_fork_blocks()
        beam_searches = self._beam_slots_held()
        num_seqs = len(self.running) + pending + sum(beam_searches.values())
        for queue, admit in ((self.swapped, self._swap_in), (self.waiting, self._admit_waiting)):
            while queue and draft.budget > 0:
                seq = queue[0]
                request, fork_blocks = seq.request, seq.request.fork_blocks
                if request.beam is None:
                    slots = 1 + fork_blocks
                else:                              # a beam search holds n slots from its first admission
                    slots = 0 if request.request_id in beam_searches else request.sampling.n
                if num_seqs + slots > self.config.max_num_seqs:
                    return
                reserve = self.watermark_blocks + pending + fork_blocks if self.running else 0
                if not admit(seq, draft, self.block_manager.num_free_blocks - reserve):
                    return
                queue.popleft()
                if request.beam is not None:
                    beam_searches.setdefault(request.request_id, 0)
                num_seqs += slots
                pending += fork_blocks

    def _beam_slots_held(self) -> dict[str, int]:
        """Per beam search with a running beam: the ``max_num_seqs`` slots it holds beyond its
        running beams (``n`` in all: its search may fork up to n beams at any step, without
        admission; its preempted beams come back into those slots)."""
        running: dict[str, int] = {}
        for s in self.running:
            if s.request.beam is not None and s.status == RUNNING:
                running[s.request.request_id] = running.get(s.request.request_id, 0) + 1
        return {rid: self.requests[rid].sampling.n - k for rid, k in running.items() if rid in self.requests}

    def _swap_in(self, seq: Sequence, draft: StepDraft, free_blocks: int) -> bool:
        """Bring a swapped sequence back if all its blocks and its next chunk fit in ``free_blocks``."""
        bm = self.block_manager
        num_new = self._chunk_size(len(seq.token_ids) - seq.num_computed, draft.budget)
        if num_new == 0 or bm.blocks_to_swap_in(seq.seq_id, seq.num_computed + num_new) > free_blocks:
            return False
        pairs = bm.swap_in(seq.seq_id)
        self.num_swapped_in_blocks += len(pairs)
        draft.swap_in.extend(pairs)
        self._start_running(seq, num_new, draft)
        draft.changed[seq.seq_id] = 0                      # a whole new table
        return True

    def _admit_waiting(self, seq: Sequence, draft: StepDraft, free_blocks: int) -> bool:
        """Admit a waiting sequence, after its prefix-cache hit, if its first chunk fits in
        ``free_blocks``; alone, the chunk shrinks to the pool."""
        bm, request = self.block_manager, seq.request
        prefix = bm.match_prefix(seq.token_ids, seq.hashes)
        room = None if self.running else (bm.num_free_blocks - prefix.num_free) * self.block_size
        num_new = self._chunk_size(len(seq.token_ids) - prefix.num_tokens, draft.budget, room)
        if num_new == 0 or bm.blocks_to_admit(prefix, prefix.num_tokens + num_new) > free_blocks:
            return False
        seq.num_computed = bm.allocate(seq.seq_id, len(seq.token_ids), prefix, seq.hashes)
        seq.release_at = 0                     # a new table (first time, or after a recompute)
        if not request.admitted:
            request.admitted = True
            request.scheduled_time = time.monotonic()
            request.num_cached_tokens = seq.num_computed
            self.num_prompt_tokens += len(request.prompt_token_ids)
        self._start_running(seq, num_new, draft)
        self._register(seq, num_new, draft)
        return True

    def _register(self, seq: Sequence, num_new: int, draft: StepDraft) -> None:
        """The executor learns the sequence with this plan (``new``), ``num_new`` tokens to compute."""
        draft.new.append(NewSeq(seq.seq_id, seq.request.prompt_token_ids, seq.output_token_ids,
                                self.block_manager.block_ids(seq.seq_id), seq.num_computed, num_new,
                                seq.request.sampling, seq.index))
        seq.on_executor = True

    def _start_running(self, seq: Sequence, num_new: int, draft: StepDraft) -> None:
        """An admitted sequence joins the running list with ``num_new`` tokens in this step."""
        self.block_manager.append_slots(seq.seq_id, seq.num_computed, num_new, draft.copies)
        self._count_recomputed(seq, num_new)
        self._publish(seq, num_new)            # the next waiting prompt may share these blocks
        seq.status = RUNNING
        self.running.append(seq)
        draft.add(seq, num_new)

    def _sample_and_fork(self, draft: StepDraft) -> list[Sequence]:
        """Every sequence whose last token is computed this step samples; a parent finishing its
        prompt forks its siblings. Returns the parents to drop once the plan is built (sample 0
        finished before the fork)."""
        dropped_parents = []
        for seq, num_tokens in draft.scheduled:
            if seq.num_computed + num_tokens == len(seq.token_ids):
                draft.samplers.append(seq.seq_id)
                if seq.request.to_fork:
                    self._fork(seq, num_tokens, draft)
                    if seq.request.drop_parent:
                        dropped_parents.append(seq)
        return dropped_parents

    def _fork(self, parent: Sequence, num_tokens: int, draft: StepDraft) -> None:
        """The step computing the parent's last prompt chunk forks the other n - 1 samples: they
        share the parent's blocks and sample from its logits row after the forward pass."""
        request = parent.request
        for index in request.to_fork:
            child = self._new_seq(request, index, list(parent.token_ids), parent.hashes.copy())
            child.num_computed = parent.num_computed
            child.status = RUNNING
            if parent.matcher is not None:
                child.matcher = parent.matcher.deep_copy()
                self.num_constrained += 1
            self.block_manager.fork(parent.seq_id, child.seq_id, child.hashes)
            self.running.append(child)
            child.on_executor = True                   # the plan's Fork registers it
            draft.forks.append(Fork(parent.seq_id, child.seq_id, index))
            draft.children.append((child, num_tokens))
            draft.samplers.append(child.seq_id)
        request.to_fork = []

    # ------------------------------------------------------------------------------- update

    def update(self, plan: StepPlan, result: StepResult) -> list[RequestOutput]:
        """Account the computed tokens, append sampled ones, judge stop conditions."""
        if plan.step_id != self._in_flight_step or result.step_id != plan.step_id:
            raise ValueError(f"update for step {plan.step_id} (result {result.step_id}), "
                             f"but step {self._in_flight_step} is in flight")
        sampled = dict(zip(result.seq_ids, result.token_ids))
        missing = [sid for sid in self._in_flight.samplers if sid not in sampled]
        if missing or len(result.seq_ids) != len(result.token_ids):
            raise ValueError(f"step {plan.step_id}: result lacks tokens for seqs {missing[:8]}")
        logprobs = dict(zip(result.seq_ids, result.logprobs)) if result.logprobs else None
        self._in_flight_step = -1
        now = time.monotonic()                             # a request's first token arrives now
        outputs = []
        beam_requests: dict[str, Request] = {}
        bm = self.block_manager
        window = bm.sliding_window
        for seq, num_tokens in self._in_flight.sequences():
            if seq.status != RUNNING:
                continue                                   # aborted while the step ran
            seq.num_computed += num_tokens
            if window and seq.num_computed >= seq.release_at:     # blocks no later query reads
                seq.release_at = bm.release_out_of_window(seq.seq_id, seq.num_computed)
            token_ids = seq.token_ids
            if seq.num_computed < len(token_ids):
                continue                                   # mid-prompt chunk: no sample
            seq.protected = False
            request = seq.request
            if not request.first_token_time:
                request.first_token_time = now
            if request.beam is not None:                   # the search picks the token (below)
                lp = logprobs.get(seq.seq_id) if logprobs else None
                if lp is None:
                    raise ValueError(f"step {plan.step_id}: beam seq {seq.seq_id} came without its candidates")
                seq.candidates = list(zip(lp.top_token_ids, lp.top_logprobs))
                beam_requests[request.request_id] = request
                continue
            token = sampled[seq.seq_id]
            token_ids.append(token)
            num_out = len(token_ids) - seq.num_prompt
            reason = None
            if seq.matcher is not None and (done := advance(seq.matcher, token)) is not None:
                reason = "stop" if done == "stop" else "abort"     # "error": a mask was not applied
            elif token in request.stop_ids and num_out >= request.sampling.min_tokens:
                reason = "stop"
            elif num_out >= request.sampling.max_tokens or len(token_ids) >= self.max_len:
                reason = "length"
            lp = logprobs.get(seq.seq_id) if logprobs else None
            outputs.append(RequestOutput(request.request_id, seq.index, [token], reason,
                                         seq.num_prompt, request.num_cached_tokens,
                                         [lp] if lp is not None else None))
            if reason is not None:
                self._finished_ids.append(seq.seq_id)
                seq.on_executor = False
                self._finish(seq)
        self.num_generation_tokens += len(outputs)
        for request in beam_requests.values():
            if all(b.candidates is not None for b in request.beams):
                outputs += self._beam_step(request)
        return outputs

    # ------------------------------------------------------------------------------- helpers

    def _publish(self, seq: Sequence, num_new: int) -> None:
        """Publish the blocks this step fills for ``seq`` (see block_manager: at schedule time)."""
        if self.cache_config.enable_prefix_caching:
            self.block_manager.cache_full_blocks(seq.seq_id, seq.token_ids, seq.num_computed + num_new)

    def step_failed(self) -> None:
        """The last plan never ran: unpublish the blocks it was to fill. (The caller then fails
        the requests that were in it, which frees their blocks.)"""
        self.block_manager.unpublish_step()

    def _new_seq(self, request: Request, index: int, token_ids: list[int], hashes=None) -> Sequence:
        seq = Sequence(self._next_seq_id, request, index, token_ids)
        seq.hashes = hashes or self.block_manager.hash_chain(request.cache_salt)
        self._next_seq_id += 1
        request.seqs.append(seq)
        self.seqs[seq.seq_id] = seq
        return seq

    def _beam_step(self, request: Request) -> list[RequestOutput]:
        """Every beam of ``request`` has its candidates: the search moves on. Returns its n
        outputs once it has ended."""
        search, beams = request.beam, request.beams
        chosen = search.step([Beam(b.beam_score, b.output_token_ids, b.candidates) for b in beams])
        self.num_generation_tokens += len(chosen)
        if search.done:
            eos, outputs = self.eos_token_ids, []
            for rank, h in enumerate(search.results()):
                reason = "stop" if h.token_ids and h.token_ids[-1] in eos else "length"
                outputs.append(RequestOutput(request.request_id, rank, h.token_ids, reason,
                                             len(request.prompt_token_ids), request.num_cached_tokens,
                                             cumulative_logprob=h.cumulative_logprob))
            for b in beams:
                self._drop(b)
            self.requests.pop(request.request_id, None)
            self._observe_request(request)
            return outputs
        picked: dict[int, tuple[int, float]] = {}
        next_beams = []
        for b, token, score in chosen:
            parent = beams[b]
            if b not in picked:                            # the beam itself goes on (appended below)
                picked[b] = (token, score)
                next_beams.append(parent)
                continue
            # the parent's digests cover its full blocks only, which the child shares
            child = self._new_seq(request, 0, parent.token_ids + [token], parent.hashes.copy())
            child.beam_score = score
            if parent.status == RUNNING:                   # shares the parent's blocks
                child.num_computed = parent.num_computed
                child.status = RUNNING
                self.block_manager.fork(parent.seq_id, child.seq_id, child.hashes)
                self.running.append(child)
            else:                                          # the parent was preempted: recompute
                self.waiting.appendleft(child)
            next_beams.append(child)
        for b, (token, score) in picked.items():
            beam = beams[b]
            beam.token_ids.append(token)
            beam.beam_score, beam.candidates = score, None
            if beam.on_executor:
                self._appends.append((beam.seq_id, token))
        for b, beam in enumerate(beams):
            if b not in picked:
                self._drop(beam)
        request.beams = next_beams
        return []

    def _preempt_waiting_beams(self, draft: StepDraft) -> None:
        """Nothing runs and the queue's head does not fit. If beams waiting for their siblings
        hold the blocks (a beam search preempted in part), preempt those of the other requests
        and queue them last, so the head's search gets all of its beams back and moves on."""
        head = (self.swapped or self.waiting)[0].request
        idle = [s for s in self.running
                if s.request is not head and len(s.token_ids) == s.num_computed]
        for seq in reversed(idle):
            self.running.remove(seq)
            self._preempt(seq, draft)                     # idle: always by recompute
            self.waiting.remove(seq)
            self.waiting.append(seq)

    def _drop(self, seq: Sequence) -> None:
        """Finish a sequence in any state (abort); the executor is told if it holds its state."""
        if seq.status == WAITING:
            self.waiting.remove(seq)
        elif seq.status == SWAPPED:
            self.swapped.remove(seq)
        if seq.status in (RUNNING, SWAPPED) and seq.on_executor:
            self._finished_ids.append(seq.seq_id)
        if seq.status != FINISHED:
            self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        """Free the sequence's blocks now; its id reaches the executor with the next plan."""
        if seq.status == RUNNING:
            self._running_dirty = True
        seq.status = FINISHED
        seq.on_executor = False
        if seq.matcher is not None:
            seq.matcher = None
            self.num_constrained -= 1
        self.block_manager.free(seq.seq_id)
        del self.seqs[seq.seq_id]
        request = seq.request
        if request.forked and all(s.status == FINISHED for s in request.seqs):
            if self.requests.pop(request.request_id, None) is not None:     # not aborted whole
                self._observe_request(request)
