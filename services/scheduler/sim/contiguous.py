"""Contiguous KV baseline: what serving looked like before paging.

Every sequence reserves the most tokens it may ever hold at admission, as one run of one address
range (first fit), and gives them back when it finishes. Its output length is unknown, so the
reservation is ``max_model_len`` (the classic policy) or, when the client gives a cap,
``prompt + max_tokens`` (variable sizes: this is where external fragmentation shows). Nothing is
shared: a request with ``n`` samples reserves ``n`` runs. The allocator counts what the paged
design is about:

* waste = 1 - tokens stored / slots reserved (internal + reservation waste);
* admission failures, and among them those where the free slots summed were enough for the
  request (external fragmentation: the memory is there, just not in one piece).

Pure Python, no torch. ``ContiguousAllocator`` is the mechanism; ``ContiguousSimulator`` is a
minimal FCFS batching policy over it for the simulator's side-by-side numbers.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass


class ContiguousAllocator:
    """First-fit over ``[0, capacity)`` token slots; free runs kept sorted and coalesced."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.starts: list[int] = [0]          # free runs, sorted by start
        self.lengths: list[int] = [capacity]
        self.used: dict[int, int] = {}        # start -> length of each reservation
        self.num_free = capacity
        self.failures = 0
        self.failures_with_free_memory = 0    # free in total >= request, but no run long enough

    def allocate(self, size: int) -> int | None:
        """Start of a run of ``size`` slots, or None (and the failure is counted)."""
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        for i, length in enumerate(self.lengths):
            if length >= size:
                start = self.starts[i]
                if length == size:
                    del self.starts[i], self.lengths[i]
                else:
                    self.starts[i] += size
                    self.lengths[i] -= size
                self.used[start] = size
                self.num_free -= size
                return start
        self.failures += 1
        if self.num_free >= size:
            self.failures_with_free_memory += 1
        return None

    def free(self, start: int) -> None:
        size = self.used.pop(start)     # KeyError: not a reservation (double free)
        self.num_free += size
        i = bisect.bisect_left(self.starts, start)
        self.starts.insert(i, start)
        self.lengths.insert(i, size)
        if i + 1 < len(self.starts) and start + size == self.starts[i + 1]:       # merge right
            self.lengths[i] += self.lengths.pop(i + 1)
            self.starts.pop(i + 1)
        if i > 0 and self.starts[i - 1] + self.lengths[i - 1] == start:           # merge left
            self.lengths[i - 1] += self.lengths.pop(i)
            self.starts.pop(i)

    @property
    def largest_free_run(self) -> int:
        return max(self.lengths, default=0)

    def check(self) -> None:
        """Invariant: free runs and reservations tile ``[0, capacity)`` exactly, runs coalesced."""
        spans = sorted([(s, l, "free") for s, l in zip(self.starts, self.lengths)] +
                       [(s, l, "used") for s, l in self.used.items()])
        pos = 0
        for (s, l, kind), nxt in zip(spans, spans[1:] + [None]):
            assert s == pos and l > 0, f"gap or overlap at {pos}"
            assert not (nxt and kind == nxt[2] == "free"), "adjacent free runs not merged"
            pos += l
        assert pos == self.capacity and self.num_free == sum(self.lengths)


@dataclass
class ContiguousSeq:
    request_id: str
    prompt_len: int
    output_len: int           # the workload's hidden length; the allocator never sees it
    reserve: int              # slots reserved at admission
    start: int = -1
    generated: int = 0


class ContiguousSimulator:
    """FCFS continuous batching over a ContiguousAllocator, one step at a time.

    A step decodes one token for every running sequence, then admits waiting requests in order
    while their whole prompt fits the token budget, the sequence cap allows, and first fit finds
    a run of ``reserve`` slots for each of their ``n`` samples (a failure blocks the queue: FCFS).
    A request that finishes frees its reservation at the end of the step.
    """

    def __init__(self, capacity: int, max_num_seqs: int, max_num_batched_tokens: int):
        self.alloc = ContiguousAllocator(capacity)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[list[ContiguousSeq]] = []    # one entry per request: its n sequences
        self.running: list[ContiguousSeq] = []
        self.num_steps = 0
        self.num_tokens = 0
        self.finished_requests = 0

    def add(self, seqs: list[ContiguousSeq]) -> None:
        self.waiting.append(seqs)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def tokens_stored(self) -> int:
        """KV slots holding a token: prompt + outputs, minus the newest (sampled, not yet cached)."""
        return sum(s.prompt_len + max(s.generated - 1, 0) for s in self.running)

    @property
    def slots_reserved(self) -> int:
        return self.alloc.capacity - self.alloc.num_free

    def step(self) -> int:
        """Run one step; returns the number of tokens computed."""
        tokens = len(self.running)
        for s in self.running:
            s.generated += 1
        budget = self.max_num_batched_tokens - tokens
        while self.waiting:
            group = self.waiting[0]
            prompt = group[0].prompt_len
            if len(self.running) + len(group) > self.max_num_seqs:
                break
            if prompt > budget and tokens > 0:
                break
            starts = []
            for s in group:
                start = self.alloc.allocate(s.reserve)
                if start is None:
                    break
                starts.append(start)
            if len(starts) < len(group):      # all or nothing
                for start in starts:
                    self.alloc.free(start)
                break
            self.waiting.pop(0)
            for s, start in zip(group, starts):
                s.start, s.generated = start, 1       # prefill samples the first token
                self.running.append(s)
            tokens += prompt
            budget -= prompt
        self.num_steps += 1
        self.num_tokens += tokens
        return tokens

    def reap(self) -> int:
        """Free the sequences that reached their output length; returns how many finished."""
        done = [s for s in self.running
                if s.generated >= s.output_len or s.prompt_len + s.generated >= s.reserve]
        for s in done:
            self.alloc.free(s.start)
            self.running.remove(s)
        return len(done)
