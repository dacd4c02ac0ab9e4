"""The step under construction: what ``Scheduler.schedule`` decides phase by phase (running,
swapped, waiting), and the diff it turns into (``StepPlan``).

One draft per step. The draft of the plan sent stays in flight until ``Scheduler.update``: its
scheduled sequences are the ones the result accounts for, its samplers the ones that must have a
token in it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING, Iterator

from shared.messages import Fork, NewSeq, StepPlan, TableUpdate

if TYPE_CHECKING:
    from services.scheduler.block_manager import BlockManager
    from services.scheduler.sequence import Sequence


@dataclass(slots=True)
class StepDraft:
    budget: int                           # tokens left under max_num_batched_tokens
    # (seq, tokens to compute): running, swapped-in and admitted sequences, in that order
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    # forked this step (in the plan as ``forks``); they sample from their parent's logits row
    children: list[tuple[Sequence, int]] = field(default_factory=list)
    samplers: list[int] = field(default_factory=list)          # seq ids that sample this step
    new: list[NewSeq] = field(default_factory=list)            # admitted from the waiting queue
    changed: dict[int, int] = field(default_factory=dict)      # seq id -> first table index changed
    copies: list[tuple[int, int]] = field(default_factory=list)     # copy-on-write (src, dst)
    swap_out: list[tuple[int, int]] = field(default_factory=list)   # (device, host)
    swap_in: list[tuple[int, int]] = field(default_factory=list)    # (host, device)
    preempted: list[int] = field(default_factory=list)         # recompute victims
    forks: list[Fork] = field(default_factory=list)
    # structured outputs: the samplers with a grammar and their matchers (kept here, since a
    # parent dropped after its fork leaves ``Scheduler.seqs`` before deferred masks are filled)
    mask_seq_ids: list[int] = field(default_factory=list)
    matchers: list = field(default_factory=list)

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.scheduled.append((seq, num_tokens))
        self.budget -= num_tokens

    @property
    def preempted_any(self) -> bool:
        """A sequence was preempted (either way): no one is admitted in this step."""
        return bool(self.preempted or self.swap_out)

    def sequences(self) -> Iterator[tuple[Sequence, int]]:
        """Every sequence the step computes for, the forked children last."""
        return chain(self.scheduled, self.children)

    def to_plan(self, step_id: int, block_manager: BlockManager, finished: list[int]) -> StepPlan:
        """The diff for the executor: new sequences in full, the others as (id, tokens) and the
        tail of each table that changed."""
        new_ids = {s.seq_id for s in self.new}
        run = [(s, k) for s, k in self.scheduled if s.seq_id not in new_ids] if new_ids else self.scheduled
        return StepPlan(
            step_id=step_id, new=self.new,
            run_seq_ids=[s.seq_id for s, _ in run], run_num_tokens=[k for _, k in run],
            table_updates=[TableUpdate(sid, start, block_manager.block_ids(sid, start))
                           for sid, start in self.changed.items() if sid not in new_ids],
            forks=self.forks, copies=self.copies, swap_out=self.swap_out, swap_in=self.swap_in,
            finished=finished, preempted=self.preempted, mask_seq_ids=self.mask_seq_ids)
