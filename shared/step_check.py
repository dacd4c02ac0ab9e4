"""The Step protocol's rules (docs/ARCHITECTURE.md), checked once for both executors.

The real worker (services/executor/worker.py) and the fake one (services/scheduler/sim/fake_executor.py)
validate every plan here, completely, before they apply anything: a bad plan changes nothing, and
the scheduler's tests against the fake catch any plan the real worker would refuse. Torch-free,
since the fake lives with the CPU-only scheduler.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Protocol

from shared.messages import NewSeq, StepPlan


class PlanError(Exception):
    """The plan breaks the Step protocol; the executor answers ExecutorError, state unchanged."""


@dataclass(frozen=True)
class StepLimits:
    """What an executor enforces on every plan."""

    block_size: int
    num_blocks: int
    num_host_blocks: int
    vocab_size: int
    max_model_len: int
    max_num_batched_tokens: Optional[int] = None     # None: no token budget


@dataclass(slots=True)
class SeqShape:
    """One sequence as the step leaves it: what the checks need, nothing else."""

    num_blocks: int       # block table length
    num_computed: int     # tokens in the cache once the step has run
    num_tokens: int       # tokens known (prompt + outputs)


class KnownSeq(Protocol):
    """An executor's per-sequence state, seen by the checks through its current shape."""

    def shape(self) -> SeqShape: ...


@dataclass
class CheckedPlan:
    """What validation derived from a plan, reused when applying it."""

    work: list[tuple[int, int]]     # (seq id, new tokens) in forward order: ``new``, then ``run``
    num_tokens: int                 # tokens of the forward pass
    samplers: list[int]             # seq ids of ``work`` whose every token is computed after the step
    mask_rows: list[int] = field(default_factory=list)   # per mask_seq_ids entry: its index in the
                                                         # step's sampled rows (samplers, then fork children)


def validate_plan(plan: StepPlan, seqs: Mapping[int, KnownSeq], limits: StepLimits) -> CheckedPlan:
    """Every rule of the protocol, in the plan's order of application; raises PlanError."""
    gone = _check_dropped(plan, seqs)
    known = {sid for sid in seqs if sid not in gone}
    _check_block_moves(plan, limits)
    after: dict[int, SeqShape] = {}          # every sequence the plan touches, as the step leaves it
    appended = _check_appends(plan, seqs, known, limits.vocab_size)
    work = _check_new(plan, known, after, limits) + _check_runs(plan, seqs, known, after, appended)
    _check_table_updates(plan, seqs, known, after, limits, appended)
    num_tokens = _check_capacity(work, after, limits)
    samplers = [sid for sid, _ in work if after[sid].num_computed == after[sid].num_tokens]
    _check_forks(plan, known, after, samplers)
    mask_rows = _check_masks(plan, samplers + [f.child for f in plan.forks], limits.vocab_size)
    return CheckedPlan(work, num_tokens, samplers, mask_rows)


def _check_dropped(plan: StepPlan, seqs: Mapping[int, KnownSeq]) -> set[int]:
    dropped = [*plan.finished, *plan.preempted]
    _unique(dropped, "finished/preempted seq")
    for sid in dropped:
        if sid not in seqs:
            raise PlanError(f"finished/preempted: unknown seq {sid}")
    return set(dropped)


def _check_block_moves(plan: StepPlan, limits: StepLimits) -> None:
    nb, nh = limits.num_blocks, limits.num_host_blocks
    _in_pool((d for d, _ in plan.swap_out), nb, "swap_out device")
    _in_pool((h for _, h in plan.swap_out), nh, "swap_out host")
    _in_pool((h for h, _ in plan.swap_in), nh, "swap_in host")
    _in_pool((d for _, d in plan.swap_in), nb, "swap_in device")
    _in_pool((b for pair in plan.copies for b in pair), nb, "copy")
    _unique((h for _, h in plan.swap_out), "swap_out destination")
    _unique((d for _, d in plan.swap_in), "swap_in destination")
    _unique((d for _, d in plan.copies), "copy destination")
    # the copies run as one launch, pairs in parallel: a block written by one pair and read by
    # another (A->B with B->C) would be read before or after its write, as the GPU happens to run
    chained = {d for _, d in plan.copies} & {s for s, _ in plan.copies}
    if chained:
        raise PlanError(f"copies: block(s) {sorted(chained)[:8]} are both a copy source and a destination")


def _check_new(plan: StepPlan, known: set[int], after: dict[int, SeqShape],
               limits: StepLimits) -> list[tuple[int, int]]:
    work = []
    for ns in plan.new:
        sid = ns.seq_id
        if sid in known or sid in after:
            raise PlanError(f"new seq {sid} is already known")
        _in_pool(ns.block_ids, limits.num_blocks, "table")
        _in_vocab(ns, limits.vocab_size)
        ntok = len(ns.prompt_token_ids) + len(ns.output_token_ids)
        if ns.num_new_tokens < 1:     # a prefix hit is capped so that one token is computed
            raise PlanError(f"new seq {sid} computes no token")
        if ns.num_computed + ns.num_new_tokens > ntok:
            raise PlanError(f"seq {sid}: {ns.num_computed}+{ns.num_new_tokens} tokens > {ntok} known")
        after[sid] = SeqShape(len(ns.block_ids), ns.num_computed + ns.num_new_tokens, ntok)
        work.append((sid, ns.num_new_tokens))
    return work


def _check_appends(plan: StepPlan, seqs: Mapping[int, KnownSeq], known: set[int], vocab: int) -> set[int]:
    """Beam search: one token appended to each of some known sequences, before the forward."""
    ids = [sid for sid, _ in plan.appends]
    _unique(ids, "append seq")
    for sid, token in plan.appends:
        if sid not in known:
            raise PlanError(f"append to unknown seq {sid}")
        if token >= vocab:
            raise PlanError(f"append: token id {token} outside the vocabulary of {vocab}")
    return set(ids)


def _check_runs(plan: StepPlan, seqs: Mapping[int, KnownSeq], known: set[int],
                after: dict[int, SeqShape], appended: set[int]) -> list[tuple[int, int]]:
    if len(plan.run_seq_ids) != len(plan.run_num_tokens):
        raise PlanError(f"run_seq_ids ({len(plan.run_seq_ids)}) and run_num_tokens "
                        f"({len(plan.run_num_tokens)}) differ in length")
    work = []
    for sid, n in zip(plan.run_seq_ids, plan.run_num_tokens):
        if sid in after:
            raise PlanError(f"seq {sid} is scheduled twice in one step")
        if sid not in known:
            raise PlanError(f"run: unknown seq {sid}")
        if n < 1:
            raise PlanError(f"run: seq {sid} with {n} tokens")
        s = after[sid] = seqs[sid].shape()
        s.num_tokens += sid in appended
        if s.num_computed + n > s.num_tokens:
            raise PlanError(f"seq {sid}: {s.num_computed}+{n} tokens > {s.num_tokens} known")
        s.num_computed += n
        work.append((sid, n))
    return work


def _check_table_updates(plan: StepPlan, seqs: Mapping[int, KnownSeq], known: set[int],
                         after: dict[int, SeqShape], limits: StepLimits, appended: set[int]) -> None:
    for tu in plan.table_updates:
        if tu.seq_id not in after:
            if tu.seq_id not in known:
                raise PlanError(f"table update for unknown seq {tu.seq_id}")
            after[tu.seq_id] = seqs[tu.seq_id].shape()
            after[tu.seq_id].num_tokens += tu.seq_id in appended
        s = after[tu.seq_id]
        _in_pool(tu.block_ids, limits.num_blocks, "table")
        if tu.start > s.num_blocks:
            raise PlanError(f"seq {tu.seq_id}: table update at {tu.start} beyond its {s.num_blocks} blocks")
        s.num_blocks = tu.start + len(tu.block_ids)


def _check_capacity(work: list[tuple[int, int]], after: dict[int, SeqShape], limits: StepLimits) -> int:
    """Tables hold what is computed, within max_model_len, and the step fits its token budget."""
    for sid, s in after.items():
        if s.num_blocks * limits.block_size < s.num_computed:
            raise PlanError(f"seq {sid}: {s.num_blocks} blocks cannot hold {s.num_computed} tokens")
        if s.num_computed > limits.max_model_len:
            raise PlanError(f"seq {sid}: {s.num_computed} tokens > max_model_len {limits.max_model_len}")
    num_tokens = sum(n for _, n in work)
    if limits.max_num_batched_tokens is not None and num_tokens > limits.max_num_batched_tokens:
        raise PlanError(f"{num_tokens} tokens in one step > {limits.max_num_batched_tokens}")
    return num_tokens


def _check_forks(plan: StepPlan, known: set[int], after: dict[int, SeqShape], samplers: list[int]) -> None:
    parents, children = set(samplers), set()
    for f in plan.forks:       # the scheduler forks in the step that computes the parent's prompt
        if f.parent not in parents:
            raise PlanError(f"fork parent {f.parent} does not sample in this step")
        if f.child in known or f.child in after or f.child in children:
            raise PlanError(f"fork child {f.child} is already known")
        children.add(f.child)


def mask_bytes(num_rows: int, vocab_size: int) -> int:
    """Bytes of ``num_rows`` token masks (StepPlan.masks)."""
    return num_rows * ((vocab_size + 31) // 32) * 4


def check_masks_size(masks: bytes, num_rows: int, vocab_size: int) -> None:
    """Masks sent with the plan or in a StepMasks frame: one row per constrained sampler."""
    want = mask_bytes(num_rows, vocab_size)
    if len(masks) != want:
        raise PlanError(f"masks: {len(masks)} bytes, {num_rows} rows of a {vocab_size}-token "
                        f"vocabulary take {want}")


def _check_masks(plan: StepPlan, sampled: list[int], vocab_size: int) -> list[int]:
    """Masked seqs sample in this step, once each; inline masks have one row per seq."""
    _unique(plan.mask_seq_ids, "mask seq")
    row_of = {sid: i for i, sid in enumerate(sampled)}
    rows = []
    for sid in plan.mask_seq_ids:
        if sid not in row_of:
            raise PlanError(f"mask for seq {sid}, which does not sample in this step")
        rows.append(row_of[sid])
    if plan.masks:
        check_masks_size(plan.masks, len(rows), vocab_size)
    return rows


def _in_pool(ids: Iterable[int], limit: int, what: str) -> None:
    for b in ids:
        if not 0 <= b < limit:
            raise PlanError(f"{what} block {b} outside the pool of {limit}")


def _unique(ids: Iterable[int], what: str) -> None:
    seen: set[int] = set()
    for i in ids:
        if i in seen:
            raise PlanError(f"duplicate {what} {i}")
        seen.add(i)


def _in_vocab(ns: NewSeq, vocab: int) -> None:
    """An id >= vocab would index out of the embedding or the logits."""
    for what, ids in (("prompt", ns.prompt_token_ids), ("output", ns.output_token_ids),
                      ("logit_bias", ns.sampling.logit_bias)):
        if ids and max(ids) >= vocab:
            raise PlanError(f"new seq {ns.seq_id}: {what} token id {max(ids)} outside the vocabulary of {vocab}")
