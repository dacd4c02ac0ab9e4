"""A request and its sequences (one per sample), as the scheduler tracks them."""
from __future__ import annotations

from typing import Optional

from shared.messages import AddRequest

WAITING, RUNNING, SWAPPED, FINISHED = "waiting", "running", "swapped", "finished"


class Request:
    """What all samples of one request share."""

    __slots__ = ("request_id", "prompt_token_ids", "sampling", "stop_ids", "seqs", "to_fork",
                 "drop_parent", "num_cached_tokens", "admitted", "cache_salt", "beam", "beams",
                 "arrival_time", "scheduled_time", "first_token_time")

    def __init__(self, add: AddRequest, eos_token_ids: frozenset[int]):
        self.request_id = add.request_id
        self.prompt_token_ids = add.prompt_token_ids
        self.sampling = add.sampling
        self.cache_salt = add.cache_salt        # enters block 0's prefix-cache digest of every sample
        stop = set(add.sampling.stop_token_ids)
        if not add.sampling.ignore_eos:
            stop |= eos_token_ids
        self.stop_ids = frozenset(stop)
        self.seqs: list[Sequence] = []
        # sample indices the fork will create (a beam search forks its beams as it goes instead)
        self.to_fork = [] if add.sampling.use_beam_search else list(range(1, add.sampling.n))
        self.drop_parent = False                # sample 0 finished before the fork: drop it after
        self.num_cached_tokens = 0              # prompt tokens served from the prefix cache
        self.admitted = False
        self.beam = None                        # beam search: its BeamSearch (beam.py)
        self.beams: list[Sequence] = []         # beam search: the running beams, in beam order
        # the scheduler's monotonic clock: added, first scheduled, first token (0.0: not yet)
        self.arrival_time = 0.0
        self.scheduled_time = 0.0
        self.first_token_time = 0.0

    @property
    def forked(self) -> bool:
        """Nothing left to fork: every remaining sample has its own sequence."""
        return not self.to_fork

    @property
    def fork_blocks(self) -> int:
        """Free blocks the request takes right after its fork: each of its (up to ``n - 1``)
        children needs its own copy of the partly filled last prompt block (or, on a block
        boundary, a fresh block), before any further growth. One per child, so it is also the
        number of sequence slots the fork will take."""
        return len(self.to_fork)


class Sequence:
    """One sample. ``token_ids`` is prompt + outputs; ``num_computed`` of them are in the cache."""

    __slots__ = ("seq_id", "request", "index", "token_ids", "num_prompt", "num_computed", "status",
                 "protected", "release_at", "matcher", "hashes", "on_executor", "beam_score", "candidates",
                 "recompute_upto", "num_preempted")

    def __init__(self, seq_id: int, request: Request, index: int, token_ids: list[int]):
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.token_ids = token_ids
        self.num_prompt = len(request.prompt_token_ids)
        self.num_computed = 0
        self.status = WAITING
        self.protected = False                  # preempted and no token since: avoid as victim
        # sliding window: num_computed from which its table has a block to release (0: ask the
        # block manager at the next update); saves a call per sequence and step
        self.release_at = 0
        self.matcher = None                     # structured output: its grammar's state (grammar.py)
        # the prefix-cache digests of its full blocks (block_hash.HashChain, salted by the
        # request); kept across preemption so a recompute hashes nothing twice
        self.hashes = None
        self.on_executor = False                # the executor holds its state (registered, not dropped)
        self.beam_score = 0.0                   # beam search: sum of its generated tokens' logprobs
        # beam search: its (token, logprob) candidates from the last step, until the request's
        # every beam has its own and the search moves on (it waits, computing nothing)
        self.candidates: Optional[list[tuple[int, float]]] = None
        # tokens below this were computed once and lost (recompute preemption, executor restart):
        # computing them again counts as recomputed
        self.recompute_upto = 0
        self.num_preempted = 0

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]
