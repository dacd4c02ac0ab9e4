"""What tensor parallelism costs here: the per-step plan broadcast, and decode throughput at TP=1 and TP=2.

    python -m benchmarks.tensor_parallel [--model random:qwen2-0.5b] [--iters 300]

1. Plan broadcast: two ranks over gloo on this machine; rank 0 broadcasts a decode plan of B
   sequences (its msgpack bytes, as the worker does: a length, then the bytes) and then B sampled
   token ids; the mean time per step of the two, for B = 1, 32, 256.
2. Offline decode: the same greedy requests through the offline engine at TP=1 (all cores) and
   TP=2 (cores / 2 per rank), output tokens per second; the tokens must agree.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

BATCHES = (1, 32, 256)


def broadcast_cost(rank: int, init: str, iters: int) -> dict:
    import torch

    from services.executor.parallel import TensorParallel
    from shared.messages import StepPlan, encode

    tp = TensorParallel.join(rank, 2, init, torch.device("cpu"))
    out = {}
    for B in BATCHES:
        plan = b"P" + encode(StepPlan(step_id=12345, run_seq_ids=list(range(B)), run_num_tokens=[1] * B))
        tokens = list(range(B))
        for _ in range(10):                               # warm-up
            tp.broadcast_bytes(plan if rank == 0 else None)
            tp.broadcast_ints(tokens)
        t0 = time.perf_counter()
        for _ in range(iters):
            tp.broadcast_bytes(plan if rank == 0 else None)
            tp.broadcast_ints(tokens)
        out[B] = {"plan_bytes": len(plan), "us_per_step": (time.perf_counter() - t0) / iters * 1e6}
    torch.distributed.destroy_process_group()
    return out


def decode_throughput(model: str, tp: int, prompts: int, max_tokens: int) -> tuple[float, list]:
    import torch

    from services.offline import Engine
    from shared.config import CacheConfig, EngineConfig, SchedulerConfig
    from shared.messages import AddRequest, SamplingParams

    config = EngineConfig(model=model, device="cpu", dtype="float32", tensor_parallel_size=tp,
                          cache=CacheConfig(block_size=16, num_blocks=512),
                          scheduler=SchedulerConfig(max_model_len=1024)).validate()
    engine = Engine(config)
    g = torch.Generator().manual_seed(0)
    reqs = [AddRequest(request_id=str(i), prompt_token_ids=torch.randint(3, 30000, (64,), generator=g).tolist(),
                       sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
            for i in range(prompts)]
    try:
        engine.run(reqs[:1])                              # warm-up
        t0 = time.perf_counter()
        out = engine.run([AddRequest(request_id=f"r{r.request_id}", prompt_token_ids=r.prompt_token_ids,
                                     sampling=r.sampling) for r in reqs])
        seconds = time.perf_counter() - t0
    finally:
        engine.close()
    return prompts * max_tokens / seconds, [out[f"r{i}"][0].token_ids for i in range(prompts)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:qwen2-0.5b", help="needs heads and MLP divisible by 2")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--follower", metavar="INIT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.follower:
        broadcast_cost(1, args.follower, args.iters)
        return 0
    from services.executor.parallel import free_tcp_address
    from services.launcher import cpu_cores

    init = free_tcp_address()
    follower = subprocess.Popen([sys.executable, "-m", "benchmarks.tensor_parallel", "--follower", init,
                                 "--iters", str(args.iters)])
    cost = broadcast_cost(0, init, args.iters)
    follower.wait(timeout=60)
    print(f"plan broadcast, 2 ranks over gloo, {cpu_cores()} cores:")
    for B, c in cost.items():
        print(f"  {B:>4} sequences: {c['plan_bytes']:>5} plan bytes, {c['us_per_step']:.0f} µs per step")
    rates = {}
    tokens = {}
    for tp in (1, 2):
        rates[tp], tokens[tp] = decode_throughput(args.model, tp, args.prompts, args.max_tokens)
        print(f"offline decode {args.model}, TP={tp}: {rates[tp]:.1f} output tok/s", flush=True)
    same = tokens[1] == tokens[2]
    print(f"TP=2 / TP=1: {rates[2] / rates[1]:.2f}x; greedy tokens equal: {same}")
    print(json.dumps({"broadcast": cost, "tok_per_s": rates, "tokens_equal": same, "cores": cpu_cores()}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
