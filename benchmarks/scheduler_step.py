"""Scheduler hot loop: schedule() + update() for N running decode sequences, without an executor.

    python -m benchmarks.scheduler_step [--seqs 256] [--steps 2000] [--sliding-window W]

Prints one JSON line: median / p90 / mean microseconds per step, the encoded plan size in bytes,
and the prefix-cache key cost: microseconds per full block of ``BlockManager.block_hash`` chained
over 4096 blocks, at block sizes 16 and 32. With ``--salted`` every request has its own
``cache_salt``. (All sequences cross a block boundary in the same step, so the blocks they fill are
hashed in one step of every ``block_size``: the mean shows that cost, the median hardly.)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from services.scheduler.block_manager import BlockManager
from services.scheduler.scheduler import Scheduler
from shared.config import CacheConfig, SchedulerConfig
from shared.messages import AddRequest, SamplingParams, StepResult, encode


def hash_us_per_block(block_size: int, num_blocks: int = 4096, repeats: int = 5) -> float:
    """Best of ``repeats``: microseconds to key one full block, chained (its parent's key in)."""
    bm = BlockManager(1, block_size)
    tokens = [(j * 7919) % 150000 for j in range(block_size * num_blocks)]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        parent = None
        for i in range(num_blocks):
            parent = bm.block_hash(parent, tokens[i * block_size:(i + 1) * block_size])
        best = min(best, time.perf_counter() - t0)
    return best / num_blocks * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--sliding-window", type=int, default=0, help="W: blocks that leave it are freed")
    ap.add_argument("--salted", action="store_true", help="a cache_salt per request")
    args = ap.parse_args()

    max_len = args.prompt_len + args.steps + 64
    blocks_per_seq = -(-max_len // args.block_size)
    sched = Scheduler(SchedulerConfig(max_num_seqs=args.seqs, max_num_batched_tokens=8192, max_model_len=max_len),
                      CacheConfig(block_size=args.block_size, num_blocks=args.seqs * blocks_per_seq + 16,
                                  sliding_window=args.sliding_window))
    params = SamplingParams(max_tokens=args.steps + 32, ignore_eos=True)
    for i in range(args.seqs):
        prompt = [(i * 31 + j) % 30000 + 1 for j in range(args.prompt_len)]
        salt = {"cache_salt": f"tenant-{i}"} if args.salted else {}
        assert sched.add_request(AddRequest(request_id=f"r{i}", prompt_token_ids=prompt, sampling=params,
                                            **salt)) is None

    def result_for(plan):
        ids = [s.seq_id for s in plan.new] + plan.run_seq_ids
        return StepResult(step_id=plan.step_id, seq_ids=ids, token_ids=[7] * len(ids))

    while sched.num_waiting:                       # prefill everything first
        plan = sched.schedule()
        sched.update(plan, result_for(plan))

    times, sizes = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        plan = sched.schedule()
        t1 = time.perf_counter()                   # building the fake result is not counted
        result = StepResult(step_id=plan.step_id, seq_ids=plan.run_seq_ids, token_ids=[7] * len(plan.run_seq_ids))
        t2 = time.perf_counter()
        outputs = sched.update(plan, result)
        t3 = time.perf_counter()
        assert len(outputs) == args.seqs and not plan.new
        times.append((t1 - t0 + t3 - t2) * 1e6)
        sizes.append(len(encode(plan)))
    times.sort()
    print(json.dumps({
        "bench": "scheduler_step", "running_seqs": args.seqs, "steps": args.steps,
        "sliding_window": args.sliding_window,
        "us_per_step_median": round(statistics.median(times), 1),
        "us_per_step_p90": round(times[int(0.9 * len(times))], 1),
        "us_per_step_mean": round(statistics.fmean(times), 1),
        "plan_bytes_median": int(statistics.median(sizes)), "plan_bytes_max": max(sizes),
        "hash_us_per_block_bs16": round(hash_us_per_block(16), 2),
        "hash_us_per_block_bs32": round(hash_us_per_block(32), 2),
    }))


if __name__ == "__main__":
    main()
