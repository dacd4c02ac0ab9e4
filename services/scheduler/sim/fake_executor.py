"""A fake executor: follows the Step protocol exactly, computes nothing, samples deterministically.

Used by the simulator, the service's tests (behind a real ZMQ ROUTER, see ``FakeExecutorServer``)
and the scheduler's tests (``tests/scheduler_harness.py`` subclasses it to also compare its tables
with the scheduler's). Same face as the real worker: ``ready()`` and ``execute(plan)``.

Every plan is checked by the real worker's rules (``shared/step_check.py``), so a plan the worker
would refuse fails the scheduler's tests too. It keeps what the real executor keeps per seq id
(tokens, block table, computed count, sampling params) and a *shadow KV cache*: every block slot remembers which token was written into it.
With ``strict=True`` it checks, every step, what a wrong scheduler would get wrong silently on a
GPU: every cached position it reads holds that sequence's token (prefix hits, copy-on-write,
swaps), and no block referenced by two live sequences is written. A swapped-out sequence's table
does not count as a reference until its swap-in ``TableUpdate(start=0)``. The checks are
incremental (each position is re-read only after its block changed), so a strict run costs about
the same as the tokens it computes.

Sliding window (``sliding_window`` W > 0, reported in ``ready()``): a query at position ``p`` reads
keys ``p - W < k <= p`` only, so table entries whose block lies wholly before the next query's
window are never read: the scheduler frees those blocks without a ``TableUpdate``, and whatever id
such an entry holds (a stale one, or the scheduler's placeholder) is neither checked, nor counted
as an owner of that block, nor read. ``live_from`` is the first table index still readable.

Sampling: the token after position ``p`` is a hash of (last token, p, sample index) that avoids
the EOS ids; a sequence with a grammar mask takes the first allowed token from there on (EOS
included, when it is the only one allowed); when ``output_len(prompt, sample_index)`` is given, the sequence emits EOS as its
``output_len``-th token (the simulator's hidden output lengths, which the scheduler never sees).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import zmq

from shared import transport
from shared.messages import (
    ExecutorError, ExecutorHello, ExecutorReady, ProtocolError, Shutdown, StepMasks, StepPlan, StepResult,
    TokenLogprobs,
)
from shared.step_check import CheckedPlan, PlanError, SeqShape, StepLimits, check_masks_size, validate_plan


@dataclass
class _Seq:
    prompt: list[int]
    outputs: list[int]
    table: list[int]
    computed: int
    sampling: object
    sample_index: int = 0
    swapped: bool = False      # its table names device blocks it gave up (until swap-in rewrites it)
    verified: int = 0          # strict: positions [0, verified) checked since their blocks last changed
    live_from: int = 0         # table entries before it left the sliding window (not owners, not read)

    def token(self, pos: int) -> int:
        n = len(self.prompt)
        return self.prompt[pos] if pos < n else self.outputs[pos - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.outputs)

    def shape(self) -> SeqShape:
        return SeqShape(len(self.table), self.computed, self.num_tokens)


@dataclass
class FakeExecutor:
    block_size: int = 16
    num_blocks: int = 256
    num_host_blocks: int = 0
    max_model_len: int = 4096
    vocab_size: int = 32000
    eos_token_ids: list[int] = field(default_factory=lambda: [2])
    output_len: Callable[[list[int], int], int] | None = None
    strict: bool = False
    fail_steps: set[int] = field(default_factory=set)   # step ids answered with ExecutorError
    max_num_batched_tokens: int = 0     # token budget, enforced and reported; 0 = none
    max_num_seqs: int = 0
    sliding_window: int = 0             # W: a query at p reads keys p - W < k <= p; 0 = all

    def __post_init__(self):
        self.seqs: dict[int, _Seq] = {}
        self.owners: dict[int, dict[int, int]] = {}      # strict: block -> {seq id: table entries}
        self.kv: list[list[int]] = [[-1] * self.block_size for _ in range(self.num_blocks)]
        self.host_kv: list[list[int]] = [[-1] * self.block_size for _ in range(self.num_host_blocks)]
        self.num_steps = 0
        self.tokens_computed = 0
        self.positions_checked = 0      # strict: cached positions re-read (proportional, not quadratic)

    def ready(self) -> ExecutorReady:
        return ExecutorReady(model="fake", block_size=self.block_size, num_blocks=self.num_blocks,
                             num_host_blocks=self.num_host_blocks, max_model_len=self.max_model_len,
                             vocab_size=self.vocab_size, eos_token_ids=list(self.eos_token_ids),
                             max_num_batched_tokens=self.max_num_batched_tokens, max_num_seqs=self.max_num_seqs,
                             sliding_window=self.sliding_window)

    def limits(self) -> StepLimits:
        return StepLimits(block_size=self.block_size, num_blocks=self.num_blocks,
                          num_host_blocks=self.num_host_blocks, vocab_size=self.vocab_size,
                          max_model_len=self.max_model_len,
                          max_num_batched_tokens=self.max_num_batched_tokens or None)

    # ------------------------------------------------------------------------------------ step

    def execute(self, plan: StepPlan, masks: Optional[Callable[[], bytes]] = None) -> StepResult | ExecutorError:
        """``masks``: the deferred masks of a plan sent without them (as the real worker)."""
        if plan.step_id in self.fail_steps:
            return ExecutorError(step_id=plan.step_id, message="injected failure")
        try:
            checked = validate_plan(plan, self.seqs, self.limits())
            data = plan.masks
            if plan.mask_seq_ids and not data:
                if masks is None:
                    raise PlanError("the plan's masks were deferred but none came")
                data = masks()
            if plan.mask_seq_ids:
                check_masks_size(data, len(plan.mask_seq_ids), self.vocab_size)
            return self._apply(plan, checked, data)
        except PlanError as e:
            return ExecutorError(step_id=plan.step_id, message=str(e))

    def _apply(self, plan: StepPlan, checked: CheckedPlan, masks: bytes = b"") -> StepResult:
        for sid in plan.finished:
            self._drop(sid)
        for sid in plan.preempted:
            self._drop(sid)
        run_ids = set(plan.run_seq_ids)
        starts: dict[int, int] = {}
        for tu in plan.table_updates:
            starts[tu.seq_id] = min(tu.start, starts.get(tu.seq_id, tu.start))
        self._settle_swapped(run_ids, starts)
        if plan.swap_out:
            self._mark_swapped_out(plan.swap_out, run_ids, starts)
        for d, h in plan.swap_out:
            self.host_kv[h] = list(self.kv[d])
        for h, d in plan.swap_in:
            self.kv[d] = list(self.host_kv[h])
            self._overwritten(d)
        for src, dst in plan.copies:
            self.kv[dst] = list(self.kv[src])
            self._overwritten(dst)
        for ns in plan.new:
            s = _Seq(list(ns.prompt_token_ids), list(ns.output_token_ids), [], ns.num_computed, ns.sampling,
                     ns.sample_index)
            self.seqs[ns.seq_id] = s
            self._set_table(ns.seq_id, s, 0, ns.block_ids)
        for tu in plan.table_updates:
            s = self.seqs[tu.seq_id]
            self._set_table(tu.seq_id, s, tu.start, tu.block_ids)
            if tu.start == 0:
                s.swapped = False           # swap-in (or a whole new table): live again
        for sid, token in plan.appends:     # beam search: the scheduler's choice of next token
            self.seqs[sid].outputs.append(token)
        for sid, n in checked.work:   # like a real forward pass: every write of the step first,
            self._write(sid, self.seqs[sid], n)
        for sid, n in checked.work:   # then every read (a prompt may share blocks written now)
            self._read(sid, self.seqs[sid], n)
        self.tokens_computed += checked.num_tokens
        sampled = list(checked.samplers)
        for f in plan.forks:
            p = self.seqs[f.parent]
            child = _Seq(list(p.prompt), list(p.outputs), [], p.computed, p.sampling, f.sample_index)
            self.seqs[f.child] = child
            self._set_table(f.child, child, 0, p.table)
            child.verified = p.verified
            sampled.append(f.child)
        tokens = [self._sample(sid, self.seqs[sid]) for sid in sampled]
        if plan.mask_seq_ids:
            rows = np.frombuffer(masks, dtype="<i4").reshape(len(plan.mask_seq_ids), -1)
            for i, r in zip(checked.mask_rows, rows):
                tokens[i] = self._allowed_from(tokens[i], r)
        logprobs = [self._candidates(self.seqs[sid]) for sid in sampled]
        for sid, tok in zip(sampled, tokens):
            if not self.seqs[sid].sampling.use_beam_search:
                self.seqs[sid].outputs.append(tok)
        self.num_steps += 1
        return StepResult(step_id=plan.step_id, seq_ids=sampled, token_ids=tokens,
                          logprobs=logprobs if any(lp is not None for lp in logprobs) else None)

    def _candidates(self, s: _Seq) -> Optional[TokenLogprobs]:
        """Rows asking for logprobs (beam search) get ``k`` distinct tokens with decreasing
        logprobs, a pure function of the sequence's last token and length (so a recomputed or
        restarted sequence gets the same), an EOS among them now and then."""
        k = s.sampling.logprobs
        if k is None:
            return None
        last, n = s.token(s.num_tokens - 1), s.num_tokens
        base = (last * 7_919 + n * 104_729) % self.vocab_size
        tokens = [(base + j * 613) % self.vocab_size for j in range(k)]
        if (last + n) % 5 == 0:
            tokens[(last + n) % k] = self.eos_token_ids[0]
        tokens = list(dict.fromkeys(tokens))
        jitter = ((last * 31 + n) % 97) / 97.0
        return TokenLogprobs(-0.2 - jitter, tokens, [-(0.2 + jitter) * (j + 1) for j in range(len(tokens))])

    # ------------------------------------------------------------------ swapped-out sequences
    #
    # The plan names swap-out pairs ``(device, host)``, not seq ids (the real executor does not
    # need them). A swapped-out sequence keeps a stale table here until its swap-in
    # ``TableUpdate(start=0)``; it must not count as an owner of those device blocks, which the
    # scheduler has freed and may hand to others. The fake derives who was swapped out: the
    # scheduler swaps out whole tables, so every swapped-out sequence is one that neither runs
    # nor changes its table this step and whose every block is in the pairs, each pair standing
    # for one table. Candidates are matched longest table first, consuming the pairs; siblings
    # with identical tables (a fork before the children's first write) are interchangeable, and
    # if the wrong one was marked it shows up running later and the mark moves to its twin.

    def _mark_swapped_out(self, swap_out, run_ids: set[int], starts: dict[int, int]) -> None:
        left: dict[int, int] = {}
        for d, _ in swap_out:
            left[d] = left.get(d, 0) + 1
        candidates = [s for sid, s in self.seqs.items()
                      if not s.swapped and s.table[s.live_from:] and sid not in run_ids and sid not in starts
                      and all(b in left for b in s.table[s.live_from:])]
        candidates.sort(key=lambda s: -(len(s.table) - s.live_from))
        for s in candidates:
            held = s.table[s.live_from:]       # the scheduler swaps out the blocks still held
            if all(left.get(b, 0) > 0 for b in held):
                for b in held:
                    left[b] -= 1
                s.swapped = True

    def _settle_swapped(self, run_ids: set[int], starts: dict[int, int]) -> None:
        """A sequence marked swapped that runs (or grows its table) without a swap-in was the
        identical-table twin of the one really swapped out: move the mark to that twin."""
        for sid in run_ids | set(starts):
            s = self.seqs.get(sid)
            if s is None or not s.swapped or starts.get(sid) == 0:
                continue
            s.swapped = False
            for tid, t in self.seqs.items():
                if not t.swapped and t.table == s.table and tid not in run_ids and tid not in starts:
                    t.swapped = True
                    break

    # ------------------------------------------------------------------ strict bookkeeping
    #
    # Strict checking is incremental so its cost follows the work of the step, not the length of
    # every context: each sequence remembers how many leading positions were verified
    # (``verified``); a table change at index i lowers it to ``i * block_size``, and any change to
    # a block's content (copy, swap-in, another sequence's write) lowers it for the other
    # sequences whose tables name that block. ``owners`` maps block -> {seq id: count}.

    def _set_table(self, sid: int, s: _Seq, start: int, block_ids) -> None:
        if self.strict:
            self._disown(sid, s.table[max(start, s.live_from):])
            owners = self.owners
            for b in block_ids:
                o = owners.setdefault(b, {})
                o[sid] = o.get(sid, 0) + 1
            s.verified = min(s.verified, start * self.block_size)
        s.live_from = min(s.live_from, start)
        del s.table[start:]
        s.table.extend(block_ids)
        self._slide(sid, s)

    def _disown(self, sid: int, block_ids) -> None:
        owners = self.owners
        for b in block_ids:
            o = owners[b]
            o[sid] -= 1
            if not o[sid]:
                del o[sid]

    def _slide(self, sid: int, s: _Seq) -> None:
        """Entries wholly before the window of the next query (position ``computed``) are dead."""
        w = self.sliding_window
        if not w:
            return
        end = min(max((s.computed - w + 1) // self.block_size, 0), len(s.table))
        if end > s.live_from:
            if self.strict:
                self._disown(sid, s.table[s.live_from:end])
            s.live_from = end

    def forget(self) -> None:
        """Drop every sequence (what the real executor does on a hello); the KV content stays."""
        for sid in list(self.seqs):
            self._drop(sid)

    def _drop(self, sid: int) -> None:
        s = self.seqs.pop(sid)
        if self.strict:
            self._disown(sid, s.table[s.live_from:])

    def _overwritten(self, block: int, writer: int = -1) -> None:
        """Block content changed: other sequences naming it must re-verify from that block."""
        if not self.strict:
            return
        for sid in self.owners.get(block, ()):
            if sid != writer:
                s = self.seqs[sid]
                s.verified = min(s.verified, s.table.index(block, s.live_from) * self.block_size)

    def _refs(self, block: int) -> int:
        """Live (not swapped-out) sequences whose table names the block."""
        return sum(not self.seqs[sid].swapped for sid in self.owners.get(block, ()))

    def _write(self, sid: int, s: _Seq, n: int) -> None:
        """Store tokens ``[computed, computed + n)`` into their slots."""
        bs, kv, table = self.block_size, self.kv, s.table
        last, shared = -1, False
        for pos in range(s.computed, s.computed + n):
            block = table[pos // bs]
            if self.strict and block != last:
                last, shared = block, self._refs(block) > 1
                self._overwritten(block, sid)
            token = s.token(pos)
            if shared:
                self._check_shared_write(sid, block, pos % bs, token)
            kv[block][pos % bs] = token

    def _check_shared_write(self, sid: int, block: int, offset: int, token: int) -> None:
        """A write into a block other live sequences name is only right when each of them holds
        that very token there (a prompt block shared within the step); otherwise it is a missing
        copy-on-write."""
        for other in self.owners.get(block, ()):
            o = self.seqs[other]
            if other == sid or o.swapped:
                continue
            pos = o.table.index(block, o.live_from) * self.block_size + offset
            if pos >= o.num_tokens or o.token(pos) != token:
                raise PlanError(f"seq {sid}: write into block {block} shared by {self._refs(block)} "
                                f"sequences (seq {other} holds other content there)")

    def _read(self, sid: int, s: _Seq, n: int) -> None:
        """Attend: every cached position before the new tokens must hold this sequence's token."""
        if self.strict:
            bs, kv, table = self.block_size, self.kv, s.table
            lo = min(max(s.verified, s.live_from * bs), s.computed)     # the window's blocks only
            self.positions_checked += s.computed - lo
            for pos in range(lo, s.computed):
                got = kv[table[pos // bs]][pos % bs]
                if got != s.token(pos):
                    raise PlanError(f"seq {sid}: KV at position {pos} (block {table[pos // bs]}) holds "
                                    f"token {got}, expected {s.token(pos)}")
        s.computed += n
        s.verified = s.computed
        self._slide(sid, s)

    def _sample(self, sid: int, s: _Seq) -> int:
        """The token after ``s``'s last one (``sid`` is for subclasses that sample by seq id)."""
        if self.output_len is not None and len(s.outputs) + 1 >= self.output_len(s.prompt, s.sample_index):
            return self.eos_token_ids[0]
        last = s.token(s.num_tokens - 1)
        tok = (last * 1_000_003 + s.num_tokens * 7919 + s.sample_index * 104_729) % self.vocab_size
        while tok in self.eos_token_ids:
            tok = (tok + 1) % self.vocab_size
        return tok

    def _allowed_from(self, token: int, words: np.ndarray) -> int:
        """The first token at or after ``token`` (cyclic) that the mask row allows, EOS last."""
        allowed = np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")[:self.vocab_size])
        if allowed.size == 0:
            raise PlanError("a grammar mask allows no token")
        plain = allowed[~np.isin(allowed, self.eos_token_ids)]
        pool = plain if plain.size else allowed
        i = np.searchsorted(pool, token)
        return int(pool[i % pool.size])

    # ------------------------------------------------------------------------------- observers

    def tokens_stored(self) -> int:
        """Distinct KV slots that hold a computed token of a live sequence."""
        bs, fill = self.block_size, {}
        for s in self.seqs.values():
            if s.swapped:
                continue
            full = s.computed // bs
            fill.update(dict.fromkeys(s.table[s.live_from:full], bs))
            if s.computed % bs:
                b = s.table[full]
                fill[b] = max(fill.get(b, 0), s.computed % bs)
        return sum(fill.values())


class FakeExecutorServer:
    """The fake behind a ZMQ ROUTER, in a thread: answers ExecutorHello (after ``loading_hellos``
    unanswered ones, to mimic loading weights), StepPlan and Shutdown, like the real service."""

    def __init__(self, executor: FakeExecutor, ctx: zmq.Context, addr: str, loading_hellos: int = 0):
        self.executor, self.loading_hellos = executor, loading_hellos
        self.sock = transport.router(ctx, addr)
        self.stopped = threading.Event()
        self.plans: list[StepPlan] = []
        self.thread = threading.Thread(target=self._loop, daemon=True, name="fake-executor")

    def start(self) -> "FakeExecutorServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.sock.close(linger=0)

    def _recv_masks(self, plan: StepPlan) -> bytes:
        """The StepMasks frame that follows a plan sent without its masks."""
        if not self.sock.poll(10_000):
            raise PlanError(f"no masks for step {plan.step_id}")
        _, msg = transport.recv_routed(self.sock)
        if not isinstance(msg, StepMasks) or msg.step_id != plan.step_id:
            raise PlanError(f"expected the masks of step {plan.step_id}, got {type(msg).__name__}")
        return msg.masks

    def _loop(self) -> None:
        while not self.stopped.is_set():
            if not self.sock.poll(20):
                continue
            identity, msg = transport.recv_routed(self.sock)
            if isinstance(msg, ProtocolError):
                transport.send(self.sock, ExecutorError(step_id=-1, message=str(msg)), identity)
                continue
            if isinstance(msg, ExecutorHello):
                if self.loading_hellos > 0:
                    self.loading_hellos -= 1
                    continue
                if msg.block_size != self.executor.block_size:     # as the real executor answers
                    transport.send(self.sock, ExecutorError(step_id=-1, message=(
                        f"block size mismatch: scheduler {msg.block_size}, executor {self.executor.block_size}")),
                        identity)
                else:                   # the real executor forgets its sequences on every hello
                    self.executor.forget()
                    transport.send(self.sock, self.executor.ready(), identity)
            elif isinstance(msg, StepPlan):
                self.plans.append(msg)
                transport.send(self.sock, self.executor.execute(msg, lambda: self._recv_masks(msg)), identity)
            elif isinstance(msg, Shutdown):
                self.stopped.set()
