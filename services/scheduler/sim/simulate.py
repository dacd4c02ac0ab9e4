"""`pagedserve simulate`: one synthetic workload, paged vs contiguous KV memory, step by step.

The paged side is the real ``Scheduler`` driving the ``FakeExecutor`` (the Step protocol in full:
plans, forks, copy-on-write, preemption, prefix cache). The contiguous side is
``ContiguousSimulator`` on the same number of token slots (``num_blocks * block_size``), with the
same sequence cap and token budget, in two reservation policies: ``max_model_len`` per sequence
and ``prompt + max_tokens`` per sequence.

Arrivals: all requests arrive at step 0 by default (an offline batch: memory, not the arrival
rate, bounds concurrency, which is what the comparison is about); ``--arrival-rate R`` draws
Poisson arrivals with R requests per step instead. Output lengths are drawn by the workload and
known only to the fake executor, which emits EOS when a sample reaches its length; the scheduler
sees ``max_tokens`` only (a cap).

Workloads:
  mixed              prompts log-uniform 16..2048 tokens, outputs uniform 16..1024, max_tokens 1024
  shared-prefix      10 system prompts of 512 tokens; a request = one of them + 32..128 own tokens;
                     outputs 16..256
  parallel-sampling  n = 4 samples per request; prompts log-uniform 16..1024, outputs 16..512 each
  beam-search        beam width 4 per request; prompts log-uniform 16..1024, max_tokens 64..512 (the
                     fake executor's candidates decide when hypotheses end); the contiguous baselines
                     count each beam as a sequence running to max_tokens

Measures (per allocator):
  kv_waste_pct       100 * (1 - tokens stored / slots allocated), summed over steps
  peak_concurrency   most sequences holding KV memory in one step
  admission_failures, admission_failures_with_free_memory
                     failed admission attempts (one per step while the head of the queue waits), and
                     those where the free slots summed were >= the request (external fragmentation;
                     0 by construction with paging: any free block serves any request)
  prefix_hit_rate    tokens served from the prefix cache / tokens looked up, over ALL lookups: first
                     admissions and re-admissions after a recompute preemption (which look up
                     prompt + generated tokens and mostly hit the victim's own still-cached blocks),
                     as the scheduler's counters (and vLLM's) count them; so it is > 0 even when no
                     two prompts share anything (``mixed``) once there are preemptions
  prefix_hit_rate_first_admission
                     prompt tokens served from the cache when each request was first admitted /
                     prompt tokens: the sharing between requests alone
  prefix_hit_rate_of_possible
                     hits / tokens that full-block sharing with *earlier* requests makes possible
  tokens_per_step, steps, preemptions
  beam_kv (paged, beam-search only)
                     per step with beams live: KV blocks the live beams' tables name, distinct (shared:
                     beams forked from one parent hold the prompt and common prefix once), against the
                     sum over live beams of ceil(tokens / block_size) (each beam with its own copy);
                     kv_saving_pct = 100 * (1 - shared / own copies), summed over steps, and at the
                     step with the most own-copy blocks (peak). The PagedAttention paper reports
                     37.6-55.2% saved for beam search (widths 2-6, its Fig. 15)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

from services.scheduler.sim.contiguous import ContiguousSeq, ContiguousSimulator
from services.scheduler.sim.fake_executor import FakeExecutor
from services.scheduler.step_loop import StepFailed, run_step
from shared.config import CacheConfig, ConfigError, SchedulerConfig, int_at_least
from shared.messages import AddRequest, SamplingParams, StepPlan, StepResult

WORKLOADS = ("mixed", "shared-prefix", "parallel-sampling", "beam-search")
BEAM_WIDTH = 4
EOS = 2
VOCAB = 32000


@dataclass
class SimRequest:
    request_id: str
    arrival: int                   # step
    prompt: list[int]
    output_lens: list[int]         # per sample; hidden from the schedulers
    max_tokens: int
    beam: bool = False             # beam search, n = len(output_lens) beams

    @property
    def n(self) -> int:
        return len(self.output_lens)


def make_workload(kind: str, num_requests: int, max_model_len: int, seed: int,
                  arrival_rate: float = 0.0) -> list[SimRequest]:
    rng = random.Random(seed)

    def tokens(k: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(k)]

    def log_uniform(lo: int, hi: int) -> int:
        return int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))

    systems = [tokens(512) for _ in range(10)]
    step, requests = 0, []
    for i in range(num_requests):
        if arrival_rate > 0:
            step += int(rng.expovariate(arrival_rate))   # Poisson process, in whole steps
        if kind == "mixed":
            prompt, n, out_lo, out_hi = tokens(log_uniform(16, 2048)), 1, 16, 1024
        elif kind == "shared-prefix":
            prompt, n, out_lo, out_hi = rng.choice(systems) + tokens(rng.randint(32, 128)), 1, 16, 256
        elif kind in ("parallel-sampling", "beam-search"):
            prompt, n, out_lo, out_hi = tokens(log_uniform(16, 1024)), 4, 16, 512
            if kind == "beam-search":
                out_lo = out_hi = rng.randint(64, 512)    # max_tokens; beams run to it or end on EOS
        else:
            raise ValueError(f"unknown workload {kind!r}; choose from {', '.join(WORKLOADS)}")
        prompt = prompt[:max_model_len - 2]
        max_tokens = min(out_hi, max_model_len - len(prompt))
        outs = [min(rng.randint(out_lo, out_hi), max_tokens) for _ in range(n)]
        requests.append(SimRequest(f"r{i}", step, prompt, outs, max_tokens, beam=kind == "beam-search"))
    return requests


def possible_prefix_hits(requests: list[SimRequest], block_size: int) -> int:
    """Prompt tokens that full-block sharing with earlier requests (arrival order) can serve,
    with the scheduler's cap of ``len(prompt) - 1`` (one token is always computed)."""
    seen: set[tuple] = set()
    total = 0
    for r in sorted(requests, key=lambda r: r.arrival):
        full = (len(r.prompt) - 1) // block_size
        keys = [tuple(r.prompt[:(i + 1) * block_size]) for i in range(len(r.prompt) // block_size)]
        hit = 0
        while hit < full and keys[hit] in seen:
            hit += 1
        total += hit * block_size
        seen.update(keys)
    return total


@dataclass
class Trace:
    """Per-step series for one allocator."""

    used: list[int] = field(default_factory=list)      # token slots allocated / reserved
    stored: list[int] = field(default_factory=list)    # token slots holding a computed token
    seqs: list[int] = field(default_factory=list)      # sequences holding KV memory
    tokens: list[int] = field(default_factory=list)    # tokens computed this step

    def record(self, used: int, stored: int, seqs: int, tokens: int) -> None:
        self.used.append(used)
        self.stored.append(stored)
        self.seqs.append(seqs)
        self.tokens.append(tokens)

    def summary(self) -> dict:
        used = sum(self.used)
        busy = [t for t in self.tokens if t]
        return {
            "kv_waste_pct": round(100.0 * (1 - sum(self.stored) / used), 3) if used else 0.0,
            "peak_concurrency": max(self.seqs, default=0),
            "mean_concurrency": round(sum(self.seqs) / max(len(self.seqs), 1), 2),
            "peak_memory_slots": max(self.used, default=0),
            "tokens_per_step": round(sum(busy) / max(len(busy), 1), 2),
            "steps": len(self.tokens),
        }


@dataclass
class BeamKV:
    """Per step with beams live: blocks held with sharing, and with a private copy per beam."""

    shared: list[int] = field(default_factory=list)
    own: list[int] = field(default_factory=list)

    def record(self, fake: FakeExecutor) -> None:
        beams = [s for s in fake.seqs.values() if s.sampling.use_beam_search and not s.swapped]
        if beams:
            bs = fake.block_size
            self.shared.append(len({b for s in beams for b in s.table[s.live_from:]}))
            self.own.append(sum(-(-s.num_tokens // bs) for s in beams))

    def summary(self) -> dict:
        if not self.own:
            return {}
        peak = max(range(len(self.own)), key=self.own.__getitem__)
        shared, own = sum(self.shared), sum(self.own)
        return {"steps_with_beams": len(self.own),
                "mean_blocks_shared": round(shared / len(self.own), 1), "mean_blocks_own_copies": round(own / len(self.own), 1),
                "peak_blocks_shared": max(self.shared), "peak_blocks_own_copies": max(self.own),
                "kv_saving_pct": round(100.0 * (1 - shared / own), 2),
                "kv_saving_pct_at_peak": round(100.0 * (1 - self.shared[peak] / self.own[peak]), 2)}


def run_paged(requests: list[SimRequest], sched_config: SchedulerConfig, cache: CacheConfig,
              strict: bool = False) -> tuple[dict, Trace]:
    from services.scheduler.scheduler import Scheduler

    lens = {tuple(r.prompt): r.output_lens for r in requests}
    fake = FakeExecutor(block_size=cache.block_size, num_blocks=cache.num_blocks,
                        num_host_blocks=cache.num_host_blocks, max_model_len=sched_config.max_model_len,
                        vocab_size=VOCAB, eos_token_ids=[EOS], strict=strict, sliding_window=cache.sliding_window,
                        output_len=lambda prompt, index: lens[tuple(prompt)][index])
    sched = Scheduler(sched_config, cache, eos_token_ids=[EOS])
    pending = sorted(requests, key=lambda r: r.arrival)[::-1]
    trace, cached, out_tokens, finished, rejected = Trace(), {}, 0, 0, []
    beam_kv = BeamKV()
    bs, step, swapped_out = cache.block_size, 0, 0

    def execute(plan: StepPlan) -> StepResult:
        nonlocal swapped_out
        result = fake.execute(plan)
        if isinstance(result, StepResult):  # measured before update: the executor holds exactly the live seqs
            swapped_out += len(plan.swap_out)
            trace.record((cache.num_blocks - sched.num_free_blocks) * bs, fake.tokens_stored(), len(fake.seqs),
                         sum(plan.run_num_tokens) + sum(s.num_new_tokens for s in plan.new))
            beam_kv.record(fake)
        return result

    while pending or sched.has_unfinished():
        while pending and pending[-1].arrival <= step:
            r = pending.pop()
            err = sched.add_request(AddRequest(request_id=r.request_id, prompt_token_ids=r.prompt,
                                               sampling=SamplingParams(n=r.n, max_tokens=r.max_tokens,
                                                                       use_beam_search=r.beam)))
            if err is not None:
                rejected.append(f"{r.request_id}: {err.code}")
        outputs = run_step(sched, execute)
        if outputs is None:
            trace.record((cache.num_blocks - sched.num_free_blocks) * bs, fake.tokens_stored(), 0, 0)
            step += 1
            continue
        if isinstance(outputs, StepFailed):
            raise RuntimeError(f"the fake executor rejected a step: {outputs.message}")
        for out in outputs:
            cached.setdefault(out.request_id, out.num_cached_tokens)
            out_tokens += len(out.token_ids)
            finished += out.finish_reason is not None
        step += 1
    stats = sched.stats()
    possible = possible_prefix_hits([r for r in requests if r.request_id in cached], bs)
    hits = sum(cached.values())
    summary = trace.summary() | {
        "admission_failures": None,                  # the paged scheduler waits; it never fails
        "admission_failures_with_free_memory": 0,    # any free block serves any request
        "preemptions": stats.num_preemptions,
        "swapped_out_blocks": swapped_out,
        "prefix_hit_rate": round(stats.prefix_cache_hits / stats.prefix_cache_queries, 4)
        if stats.prefix_cache_queries else 0.0,
        "prefix_hit_rate_first_admission": round(hits / stats.prompt_tokens, 4) if stats.prompt_tokens else 0.0,
        "prefix_hit_rate_includes": "all lookups: first admissions + re-admissions after recompute preemption",
        "prefix_hit_tokens": hits,
        "prefix_possible_tokens": possible,
        "prefix_hit_rate_of_possible": round(hits / possible, 4) if possible else None,
        "output_tokens": out_tokens,
        "finished_sequences": finished,
        "rejected": rejected,
        "free_blocks_at_end": sched.num_free_blocks,
        "num_blocks": cache.num_blocks,
    }
    if beam_kv.own:
        summary["beam_kv"] = beam_kv.summary()
    if strict:
        summary["strict_positions_checked"] = fake.positions_checked
        summary["tokens_computed"] = fake.tokens_computed
    return summary, trace


def run_contiguous(requests: list[SimRequest], capacity: int, sched_config: SchedulerConfig,
                   reserve: str) -> tuple[dict, Trace]:
    sim = ContiguousSimulator(capacity, sched_config.max_num_seqs, sched_config.max_num_batched_tokens)
    pending = sorted(requests, key=lambda r: r.arrival)[::-1]
    trace, rejected, step = Trace(), [], 0
    while pending or sim.has_unfinished():
        while pending and pending[-1].arrival <= step:
            r = pending.pop()
            size = sched_config.max_model_len if reserve == "max_model_len" else len(r.prompt) + r.max_tokens
            if r.n * size > capacity or r.n > sched_config.max_num_seqs:     # could never be admitted
                rejected.append(f"{r.request_id}: does not fit")
                continue
            sim.add([ContiguousSeq(r.request_id, len(r.prompt), out, size) for out in r.output_lens])
        tokens = sim.step()
        trace.record(sim.slots_reserved, sim.tokens_stored(), len(sim.running), tokens)
        sim.reap()
        step += 1
    return trace.summary() | {
        "admission_failures": sim.alloc.failures,
        "admission_failures_with_free_memory": sim.alloc.failures_with_free_memory,
        "preemptions": 0,
        "prefix_hit_rate": 0.0,
        "prefix_hit_rate_first_admission": 0.0,
        "prefix_hit_rate_of_possible": 0.0,
        "rejected": rejected,
        "reservation": reserve,
    }, trace


def plot(traces: dict[str, Trace], capacity: int, title: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    colors = {"paged": "tab:blue", "contiguous": "tab:red", "contiguous_max_tokens": "tab:orange"}
    for name, t in traces.items():
        c = colors.get(name)
        top.plot([u / capacity * 100 for u in t.used], color=c, label=f"{name}: allocated")
        top.plot([s / capacity * 100 for s in t.stored], color=c, linestyle="--", label=f"{name}: tokens stored")
        bottom.plot(t.seqs, color=c, label=name)
    top.set_ylabel("KV memory (% of slots)")
    top.set_ylim(0, 105)
    top.legend(fontsize=8, loc="upper right")
    top.set_title(title)
    bottom.set_ylabel("sequences holding KV")
    bottom.set_xlabel("step")
    bottom.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def simulate(workload: str, num_requests: int, num_blocks: int, block_size: int, max_model_len: int,
             seed: int, out_dir: str | None = None, arrival_rate: float = 0.0, max_num_seqs: int = 256,
             max_num_batched_tokens: int = 2048, preemption_mode: str = "recompute", num_host_blocks: int = 0,
             strict: bool = False, sliding_window: int = 0) -> dict:
    """Run both allocators on one workload; returns the summary (and writes JSON + PNG to out_dir)."""
    sched_config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                   max_model_len=max_model_len, max_waiting=max(num_requests, 1),
                                   preemption_mode=preemption_mode).validate()
    cache = CacheConfig(block_size=block_size, num_blocks=num_blocks, num_host_blocks=num_host_blocks,
                        sliding_window=sliding_window).validate()
    capacity = num_blocks * block_size
    requests = make_workload(workload, num_requests, max_model_len, seed, arrival_rate)
    t0 = time.perf_counter()
    paged, paged_trace = run_paged(requests, sched_config, cache, strict)
    t1 = time.perf_counter()
    contig, contig_trace = run_contiguous(requests, capacity, sched_config, "max_model_len")
    contig_mt, contig_mt_trace = run_contiguous(requests, capacity, sched_config, "max_tokens")
    summary = {
        "workload": workload, "num_requests": num_requests, "num_blocks": num_blocks, "block_size": block_size,
        "kv_slots": capacity, "max_model_len": max_model_len, "seed": seed,
        "arrivals": f"poisson {arrival_rate}/step" if arrival_rate > 0 else "all at step 0",
        "paged": paged, "contiguous": contig, "contiguous_max_tokens": contig_mt,
        "peak_concurrency_ratio": round(paged["peak_concurrency"] / max(contig["peak_concurrency"], 1), 2),
        "paged_seconds": round(t1 - t0, 2),
    }
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        summary["plot"] = os.path.join(out_dir, f"simulate-{workload}.png")
        plot({"paged": paged_trace, "contiguous": contig_trace, "contiguous_max_tokens": contig_mt_trace},
             capacity, f"{workload}: {num_requests} requests, {num_blocks} blocks x {block_size} tokens",
             summary["plot"])
        with open(os.path.join(out_dir, f"simulate-{workload}.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


# ------------------------------------------------------------------------------ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", choices=WORKLOADS, default="mixed")
    p.add_argument("--num-requests", type=int_at_least(1), default=200)
    p.add_argument("--num-blocks", type=int_at_least(1), default=2048)
    p.add_argument("--block-size", type=int, default=16, choices=[1, 2, 4, 8, 16, 32, 64, 128])
    p.add_argument("--max-model-len", type=int_at_least(2), default=4096)
    p.add_argument("--max-num-seqs", type=int_at_least(1), default=256)
    p.add_argument("--max-num-batched-tokens", type=int_at_least(1), default=2048)
    p.add_argument("--preemption-mode", choices=["recompute", "swap"], default="recompute")
    p.add_argument("--num-host-blocks", type=int_at_least(0), default=0)
    p.add_argument("--arrival-rate", type=float, default=0.0,
                   help="Poisson arrivals, requests per step (0 = all at step 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sliding-window", type=int_at_least(0), default=0,
                   help="a model whose every layer attends to the last W tokens: the paged side frees older "
                        "blocks (the contiguous baselines still reserve whole sequences)")
    p.add_argument("--strict", action="store_true", help="fake executor checks the KV content every step (slow)")
    p.add_argument("--out", default="", help="directory for the JSON summary and the PNG plot")


def run(args: argparse.Namespace) -> int:
    if args.arrival_rate < 0:
        print("pagedserve simulate: error: argument --arrival-rate: must be >= 0", file=sys.stderr)
        return 2
    try:
        summary = simulate(args.workload, args.num_requests, args.num_blocks, args.block_size, args.max_model_len,
                           args.seed, args.out or None, args.arrival_rate, args.max_num_seqs,
                           args.max_num_batched_tokens, args.preemption_mode, args.num_host_blocks, args.strict,
                           args.sliding_window)
    except ConfigError as e:
        print(f"pagedserve simulate: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="python -m services.scheduler.sim.simulate")
    add_arguments(_p)
    sys.exit(run(_p.parse_args()))
