"""A fake executor for scheduler tests: it mirrors executor state from step plans exactly as
docs/ARCHITECTURE.md ("Step protocol") describes, keeps a simulated KV cache that stores the token
id written at every slot, and checks protocol invariants on every step:

- every seq id and block id a plan names is known / in range;
- tables match the scheduler's block manager (for sequences not swapped out);
- no write lands in a block whose ref count is > 1;
- the cached context a sequence attends over holds exactly its tokens (prefix hits, copy-on-write
  and swaps moved the right data).

Sampled tokens are deterministic: ``token_fn(seq_id, position)``.
"""
from __future__ import annotations

from shared.messages import StepPlan, StepResult, decode, encode


def default_token_fn(seq_id: int, position: int) -> int:
    return 3 + (seq_id * 7 + position * 13) % 97


class SeqState:
    __slots__ = ("prompt", "outputs", "table", "num_computed", "sampling")

    def __init__(self, prompt, outputs, table, num_computed, sampling):
        self.prompt, self.outputs, self.table = list(prompt), list(outputs), list(table)
        self.num_computed, self.sampling = num_computed, sampling

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.outputs


class FakeExecutor:
    def __init__(self, scheduler, token_fn=default_token_fn, roundtrip: bool = True):
        self.scheduler = scheduler
        self.bm = scheduler.block_manager
        self.block_size = scheduler.block_size
        self.token_fn = token_fn
        self.roundtrip = roundtrip
        self.seqs: dict[int, SeqState] = {}
        self.kv: list[list] = [[None] * self.block_size for _ in range(self.bm.num_blocks)]
        self.host_kv: list[list] = [[None] * self.block_size for _ in range(max(self.bm.host.num_blocks, 1))]
        self.steps = 0

    # ------------------------------------------------------------------------------------------
    def execute(self, plan: StepPlan) -> StepResult:
        if self.roundtrip:
            plan = decode(encode(plan))
        bs, nb = self.block_size, self.bm.num_blocks
        for sid in plan.finished + plan.preempted:
            assert sid in self.seqs, f"finished/preempted unknown seq {sid}"
            del self.seqs[sid]
        for dev, host in plan.swap_out:
            assert 0 <= dev < nb
            self.host_kv[host] = list(self.kv[dev])
        for host, dev in plan.swap_in:
            assert 0 <= dev < nb
            self.kv[dev] = list(self.host_kv[host])
        for src, dst in plan.copies:
            assert 0 <= src < nb and 0 <= dst < nb and src != dst
            self.kv[dst] = list(self.kv[src])
        work: list[tuple[int, int]] = []
        for ns in plan.new:
            assert ns.seq_id not in self.seqs, f"new seq {ns.seq_id} is already known"
            self.seqs[ns.seq_id] = SeqState(ns.prompt_token_ids, ns.output_token_ids, ns.block_ids,
                                            ns.num_computed, ns.sampling)
            work.append((ns.seq_id, ns.num_new_tokens))
        for tu in plan.table_updates:
            st = self.seqs[tu.seq_id]
            assert tu.start <= len(st.table), "table update leaves a hole"
            st.table[tu.start:] = tu.block_ids
        assert len(plan.run_seq_ids) == len(plan.run_num_tokens)
        for sid, k in zip(plan.run_seq_ids, plan.run_num_tokens):
            assert sid in self.seqs, f"run names unknown seq {sid}"
            work.append((sid, k))
        assert len({sid for sid, _ in work}) == len(work), "a sequence runs twice in one step"
        self.check_tables()

        # Forward pass: check the context, then write the new tokens' slots.
        # A parent that forks this step shares its blocks with its children only after the
        # forward pass, but the scheduler has already raised their ref counts.
        forks_of: dict[int, int] = {}
        for fork in plan.forks:
            forks_of[fork.parent] = forks_of.get(fork.parent, 0) + 1
        writes = []
        for sid, k in work:
            st = self.seqs[sid]
            tokens = st.tokens
            assert k >= 1 and st.num_computed + k <= len(tokens), (sid, k, st.num_computed, len(tokens))
            assert len(st.table) * bs >= st.num_computed + k, f"seq {sid}: table too short"
            for pos in range(st.num_computed):
                block = st.table[pos // bs]
                assert self.kv[block][pos % bs] == (pos, tokens[pos]), \
                    f"seq {sid}: cached context wrong at position {pos} (block {block})"
            for pos in range(st.num_computed, st.num_computed + k):
                block = st.table[pos // bs]
                assert self.bm.pool.blocks[block].ref_cnt == 1 + forks_of.get(sid, 0), \
                    f"seq {sid} writes position {pos} into shared block {block}"
                writes.append((block, pos % bs, (pos, tokens[pos])))
        assert len({(b, o) for b, o, _ in writes}) == len(writes), "two writes to one slot"
        for block, off, val in writes:
            self.kv[block][off] = val
        for sid, k in work:
            self.seqs[sid].num_computed += k

        for fork in plan.forks:
            p = self.seqs[fork.parent]
            assert fork.child not in self.seqs
            self.seqs[fork.child] = SeqState(p.prompt, p.outputs, p.table, p.num_computed, p.sampling)
            work.append((fork.child, 0))

        seq_ids, token_ids = [], []
        for sid, _ in work:
            st = self.seqs[sid]
            if st.num_computed == len(st.prompt) + len(st.outputs):
                token = self.token_fn(sid, st.num_computed)
                st.outputs.append(token)
                seq_ids.append(sid)
                token_ids.append(token)
        self.steps += 1
        return StepResult(step_id=plan.step_id, seq_ids=seq_ids, token_ids=token_ids)

    def check_tables(self) -> None:
        """Executor tables equal the scheduler's for every sequence resident on the device."""
        for sid, st in self.seqs.items():
            if sid not in self.scheduler.seqs:              # finished: dropped with the next plan
                assert sid in self.scheduler._finished_ids, f"seq {sid} is gone but never finished"
                continue
            if sid in self.bm.host_tables:
                continue
            assert self.bm.tables.get(sid) == st.table, f"seq {sid}: executor table {st.table} != " \
                                                        f"scheduler table {self.bm.tables.get(sid)}"


def step(scheduler, executor) -> list:
    plan = scheduler.schedule()
    if plan is None:
        return []
    return scheduler.update(plan, executor.execute(plan))


def run_to_completion(scheduler, executor, max_steps: int = 10_000) -> dict:
    """Run until nothing is left; returns {(request_id, index): (tokens, finish_reason)}."""
    results: dict = {}
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            return results
        plan = scheduler.schedule()
        assert plan is not None, "unfinished work but nothing scheduled"
        for out in scheduler.update(plan, executor.execute(plan)):
            tokens, _ = results.get((out.request_id, out.index), ([], None))
            results[(out.request_id, out.index)] = (tokens + out.token_ids, out.finish_reason)
    raise AssertionError("did not finish")
