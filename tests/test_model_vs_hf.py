"""The worker, driven by hand-written StepPlans, is token-for-token equal to transformers'
greedy ``generate`` on the same float32 weights: batched, chunked prefill, prefix reuse, forks,
copy-on-write copies and swap out / in."""
from __future__ import annotations

import pytest
import torch

from shared.messages import Fork, NewSeq, SamplingParams, StepPlan, StepResult, TableUpdate

MAX_NEW = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)

TEXTS = [
    "Hi",
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "List three colors:",
    "Translate to French: I like apples and oranges, but I do not like bananas very much.",
    "In machine learning, attention is a mechanism that lets a model weigh different parts of its "
    "input when producing each part of its output. It was popularised by",
    "1, 2, 3, 4, 5,",
]


@pytest.fixture(scope="module")
def prompts(hf_tokenizer):
    out = [hf_tokenizer(t)["input_ids"] for t in TEXTS]
    assert len({len(p) for p in out}) >= 6            # different lengths
    return out


@pytest.fixture(scope="module")
def hf_greedy(hf_model, prompts):
    """HF greedy continuations, one prompt at a time (no padding), EOS not stopping."""
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                                    min_new_tokens=0, do_sample=False, eos_token_id=[],
                                    pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    assert all(len(o) == MAX_NEW for o in outs)
    return outs


class MiniScheduler:
    """A tiny sequential block allocator + plan builder, enough to drive the worker by hand.

    Block ref counts give copy-on-write for forks; ``chunk`` caps new tokens per seq per step."""

    def __init__(self, worker, chunk: int | None = None, first_block: int = 0):
        self.worker, self.bs, self.chunk = worker, worker.block_size, chunk
        self.next_block = first_block
        self.refs: dict[int, int] = {}
        self.seqs: dict[int, dict] = {}
        self.pending_new: list[int] = []
        self.pending_forks: list[Fork] = []
        self.finished: list[int] = []
        self.step_id = 0

    def alloc(self) -> int:
        b = self.next_block
        self.next_block += 1
        assert b < self.worker.num_blocks, "test allocator ran out of blocks"
        self.refs[b] = 1
        return b

    def add(self, sid, prompt, max_new=MAX_NEW, shared_blocks=(), num_computed=0, n=1):
        for b in shared_blocks:
            self.refs[b] += 1
        self.seqs[sid] = dict(tokens=list(prompt), prompt=list(prompt), out=[], table=list(shared_blocks),
                              computed=num_computed, max_new=max_new, n=n, known=False)
        self.pending_new.append(sid)

    def plan(self, **extra) -> StepPlan:
        new, run_ids, run_n, updates, copies, forks = [], [], [], [], [], []
        for sid, s in self.seqs.items():
            if s.get("done") or s.get("paused"):
                continue
            n = len(s["tokens"]) - s["computed"]
            if self.chunk:
                n = min(n, self.chunk)
            end = s["computed"] + n
            start_len = len(s["table"])
            # copy-on-write: the block we write first is shared
            first = s["computed"] // self.bs
            if s["known"] and first < len(s["table"]) and self.refs[s["table"][first]] > 1:
                old = s["table"][first]
                self.refs[old] -= 1
                new_b = self.alloc()
                copies.append((old, new_b))
                s["table"][first] = new_b
                start_len = first
            while len(s["table"]) * self.bs < end:
                s["table"].append(self.alloc())
            if not s["known"]:
                new.append(NewSeq(sid, s["prompt"], [], list(s["table"]), s["computed"], n, GREEDY))
                s["known"] = True
            else:
                run_ids.append(sid)
                run_n.append(n)
                if len(s["table"]) > start_len:
                    updates.append(TableUpdate(sid, start_len, s["table"][start_len:]))
            s["computed"] = end
            if s["n"] > 1 and end == len(s["prompt"]):      # prompt finishes: fork the siblings
                for i in range(1, s["n"]):
                    child = sid * 100 + i
                    forks.append(Fork(sid, child, i))
        plan = StepPlan(step_id=self.step_id, new=new, run_seq_ids=run_ids, run_num_tokens=run_n,
                        table_updates=extra.pop("table_updates", []) + updates, copies=copies, forks=forks, finished=self.finished,
                        **extra)
        self.finished = []
        self.step_id += 1
        return plan

    def update(self, plan: StepPlan, result) -> None:
        assert isinstance(result, StepResult), result
        for f in plan.forks:
            p = self.seqs[f.parent]
            for b in p["table"]:
                self.refs[b] += 1
            self.seqs[f.child] = dict(tokens=list(p["tokens"]), prompt=p["prompt"], out=list(p["out"]),
                                      table=list(p["table"]), computed=p["computed"], max_new=p["max_new"],
                                      n=1, known=True)
        for sid, tok in zip(result.seq_ids, result.token_ids):
            s = self.seqs[sid]
            s["tokens"].append(tok)
            s["out"].append(tok)
            if len(s["out"]) == s["max_new"]:
                s["done"] = True
                self.finished.append(sid)

    def step(self, **extra):
        plan = self.plan(**extra)
        result = self.worker.execute(plan)
        self.update(plan, result)
        return plan, result

    def run(self):
        while any(not s.get("done") for s in self.seqs.values()):
            self.step()
        self.step()     # deliver the last `finished`
        assert not self.worker.seqs
        return {sid: s["out"] for sid, s in self.seqs.items()}


def test_batched_greedy_equals_hf(backend_worker_factory, prompts, hf_greedy):
    sched = MiniScheduler(backend_worker_factory())
    for i, p in enumerate(prompts):
        sched.add(i, p)
    out = sched.run()
    assert [out[i] for i in range(len(prompts))] == hf_greedy


def test_chunked_prefill_equals_hf(backend_worker_factory, prompts, hf_greedy):
    sched = MiniScheduler(backend_worker_factory(), chunk=5)   # long prompts take several steps
    for i, p in enumerate(prompts):
        sched.add(i, p)
    plan, result = sched.step()
    short = [i for i, p in enumerate(prompts) if len(p) <= 5]
    assert result.seq_ids == short                             # chunks ending mid-prompt don't sample
    out = sched.run()
    assert [out[i] for i in range(len(prompts))] == hf_greedy


def test_prefix_reuse_equals_hf(backend_worker_factory, prompts, hf_greedy):
    worker = backend_worker_factory(block_size=8)
    sched = MiniScheduler(worker)
    long = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    sched.add(0, prompts[long])
    sched.step()                                               # seq 0's prompt is in the cache
    full = len(prompts[long]) // 8                             # its full blocks can be shared
    assert full >= 2
    shared = sched.seqs[0]["table"][:full]
    sched.add(1, prompts[long], shared_blocks=shared, num_computed=full * 8)
    plan, _ = sched.step()
    assert plan.new[0].num_computed == full * 8 and plan.new[0].num_new_tokens == len(prompts[long]) - full * 8
    out = sched.run()
    assert out[0] == hf_greedy[long]
    assert out[1] == hf_greedy[long]


def test_fork_n2_both_equal_hf(backend_worker_factory, prompts, hf_greedy):
    sched = MiniScheduler(backend_worker_factory())
    sched.add(1, prompts[3], n=2)                              # 17 tokens: last block shared, CoW
    sched.add(2, prompts[1], n=2)
    plan, result = sched.step()
    assert [(f.parent, f.child) for f in plan.forks] == [(1, 101), (2, 201)]
    assert sorted(result.seq_ids) == [1, 2, 101, 201]
    plan, _ = sched.step()
    assert plan.copies                                         # children copied the shared last block
    out = sched.run()
    assert out[1] == out[101] == hf_greedy[3]
    assert out[2] == out[201] == hf_greedy[1]


def test_copy_and_swap_round_trip(backend_worker_factory, prompts, hf_greedy):
    worker = backend_worker_factory(num_blocks=64, num_host_blocks=16)
    sched = MiniScheduler(worker)
    sched.add(0, prompts[6])
    sched.add(1, prompts[4])
    for _ in range(4):
        sched.step()
    caches = worker.kv.device_caches
    # swap seq 0 out, wipe its device blocks, swap it into fresh blocks
    s0 = sched.seqs[0]
    old = list(s0["table"])
    s0["paused"] = True
    sched.step(swap_out=[(b, h) for h, b in enumerate(old)])
    for c in caches:
        c[:, old] = 0
    new_blocks = [sched.alloc() for _ in old]
    s0["table"] = new_blocks
    del s0["paused"]
    sched.step(swap_in=[(h, b) for h, b in enumerate(new_blocks)],
               table_updates=[TableUpdate(0, 0, new_blocks)])
    # copy seq 1's blocks to fresh ones, point its table at the copies, wipe the originals
    s1 = sched.seqs[1]
    old1 = list(s1["table"])
    copies = [(b, sched.alloc()) for b in old1]
    s1["table"] = [d for _, d in copies]
    plan = sched.plan()
    plan.copies = copies
    plan.table_updates = [TableUpdate(1, 0, list(s1["table"]))] + [
        u for u in plan.table_updates if u.seq_id != 1]
    sched.update(plan, worker.execute(plan))
    for c in caches:
        c[:, old1] = 0
    out = sched.run()
    assert out[0] == hf_greedy[6]
    assert out[1] == hf_greedy[4]
