"""The executor worker: holds per-sequence state and the KV cache, runs one StepPlan at a time.

Implements the Step protocol of docs/ARCHITECTURE.md. Usable in-process (``services/offline.py``)
or behind ZMQ (``services/executor/service.py``):

    worker = Worker(engine_config)          # loads the model, allocates the cache
    worker.ready()   -> ExecutorReady
    worker.execute(plan) -> StepResult | ExecutorError

A plan is validated completely before anything is mutated, so a bad plan changes nothing.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from services.executor.attention import AttentionMetadata, get_backend
from services.executor.kv_cache import KVCache, activation_bytes, plan_num_blocks, plan_num_host_blocks
from services.executor.weights import LoadedModel, load_model
from shared.config import DEFAULT_MAX_MODEL_LEN, EngineConfig
from shared.messages import ExecutorError, ExecutorReady, SamplingParams, StepPlan, StepResult
from shared.model_path import resolve_model

try:
    from services.executor.sampler import Sampler, SamplingMetadata
except ImportError:  # pragma: no cover - the sampler ships with the executor; greedy fallback
    class SamplingMetadata:  # type: ignore[no-redef]
        @staticmethod
        def build(rows, device):
            return None

    class Sampler:  # type: ignore[no-redef]
        def __call__(self, logits, meta):
            from collections import namedtuple
            return namedtuple("SamplerOutput", "token_ids logprobs")(logits.argmax(-1), None)

log = logging.getLogger("pagedserve.executor")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PlanError(Exception):
    """The plan breaks the Step protocol; answered with ExecutorError, state unchanged."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


@dataclass
class SeqState:
    prompt: list[int]
    output: list[int]
    table: list[int]
    num_computed: int
    params: SamplingParams
    sample_index: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def tokens(self, start: int, end: int) -> list[int]:
        p = len(self.prompt)
        if end <= p:
            return self.prompt[start:end]
        if start >= p:
            return self.output[start - p:end - p]
        return self.prompt[start:] + self.output[:end - p]


@dataclass
class _Checked:
    """What validation derived from a plan, reused when applying it."""
    work: list[tuple[int, int]] = field(default_factory=list)   # (seq id, new tokens) in forward order
    num_tokens: int = 0


class Worker:
    def __init__(self, engine_config: EngineConfig, loaded: Optional[LoadedModel] = None):
        self.config = engine_config
        self.device = resolve_device(engine_config.device)
        self.dtype = resolve_dtype(engine_config.dtype, self.device)
        torch.manual_seed(engine_config.seed)
        sched = engine_config.scheduler
        max_len = sched.max_model_len or DEFAULT_MAX_MODEL_LEN
        if loaded is None:
            t0 = time.perf_counter()
            source = resolve_model(engine_config.model)
            loaded = load_model(source, dtype=self.dtype, device=self.device, seed=engine_config.seed,
                                max_seq_len=max_len)
            log.info("loaded %s in %.1fs", loaded.name, time.perf_counter() - t0)
        self.loaded = loaded
        self.model = loaded.model
        self.model_config = cfg = loaded.config
        # the limits ready() reports (the model caps the context; a whole context fits one step)
        self.max_model_len = min(max_len, self.model.max_seq_len)
        self.max_num_batched_tokens = max(sched.max_num_batched_tokens, self.max_model_len)
        self.max_num_seqs = sched.max_num_seqs
        cache = engine_config.cache
        self.block_size = cache.block_size
        num_blocks = plan_num_blocks(cfg, self.block_size, self.dtype, self.device,
                                     num_blocks=cache.num_blocks,
                                     kv_cache_memory=engine_config.kv_cache_memory,
                                     gpu_memory_utilization=engine_config.gpu_memory_utilization,
                                     max_model_len=self.max_model_len,
                                     reserve_bytes=activation_bytes(cfg, self.max_num_batched_tokens,
                                                                    self.max_num_seqs, self.dtype))
        num_host = plan_num_host_blocks(cfg, self.block_size, self.dtype, self.device, num_blocks,
                                        cache.num_host_blocks)
        self.kv = KVCache(cfg, num_blocks, self.block_size, self.dtype, self.device, num_host)
        self.backend = get_backend(engine_config.attention_backend, self.device)
        self.sampler = Sampler()
        self.seqs: dict[int, SeqState] = {}
        self._pinned: Optional[Tensor] = None       # staging buffer for step metadata (CUDA)
        self._pinned_free = None                    # CUDA event: last copy out of _pinned done

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, engine_config: EngineConfig) -> "Worker":
        """A worker around an already loaded model (tests, several cache sizes, one load)."""
        return cls(engine_config, loaded)

    # ------------------------------------------------------------------------------ handshake
    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def num_host_blocks(self) -> int:
        return self.kv.num_host_blocks

    def ready(self) -> ExecutorReady:
        return ExecutorReady(model=self.loaded.name, block_size=self.block_size,
                             num_blocks=self.num_blocks, num_host_blocks=self.num_host_blocks,
                             max_model_len=self.max_model_len,
                             vocab_size=self.model_config.vocab_size,
                             eos_token_ids=list(self.loaded.eos_token_ids), device=str(self.device),
                             max_num_batched_tokens=self.max_num_batched_tokens, max_num_seqs=self.max_num_seqs)

    # ------------------------------------------------------------------------------ one step
    def execute(self, plan: StepPlan) -> StepResult | ExecutorError:
        try:
            checked = self._validate(plan)
        except PlanError as e:
            return ExecutorError(step_id=plan.step_id, message=str(e))
        try:
            with torch.inference_mode():
                return self._apply(plan, checked)
        except Exception as e:  # noqa: BLE001 - a failing step must not kill the service
            log.exception("step %d failed", plan.step_id)
            return ExecutorError(step_id=plan.step_id, message=f"step failed: {type(e).__name__}: {e}")

    def _validate(self, plan: StepPlan) -> _Checked:
        nb, nh, bs = self.num_blocks, self.num_host_blocks, self.block_size

        def check_blocks(ids, limit: int, what: str) -> None:
            for b in ids:
                if not 0 <= b < limit:
                    raise PlanError(f"{what} block {b} outside the pool of {limit}")

        def check_unique(ids, what: str) -> None:
            seen = set()
            for i in ids:
                if i in seen:
                    raise PlanError(f"duplicate {what} {i}")
                seen.add(i)

        vocab = self.model_config.vocab_size

        def check_token_ids(ns) -> None:     # an id >= V would index out of the embedding / logits
            for what, ids in (("prompt", ns.prompt_token_ids), ("output", ns.output_token_ids),
                              ("logit_bias", ns.sampling.logit_bias)):
                if ids and max(ids) >= vocab:
                    raise PlanError(f"new seq {ns.seq_id}: {what} token id {max(ids)} outside the vocabulary of {vocab}")

        dropped = list(plan.finished) + list(plan.preempted)
        check_unique(dropped, "finished/preempted seq")
        for sid in dropped:
            if sid not in self.seqs:
                raise PlanError(f"finished/preempted: unknown seq {sid}")
        known = set(self.seqs) - set(dropped)

        check_blocks([d for d, _ in plan.swap_out], nb, "swap_out device")
        check_blocks([h for _, h in plan.swap_out], nh, "swap_out host")
        check_blocks([h for h, _ in plan.swap_in], nh, "swap_in host")
        check_blocks([d for _, d in plan.swap_in], nb, "swap_in device")
        check_unique([h for _, h in plan.swap_out], "swap_out destination")
        check_unique([d for _, d in plan.swap_in], "swap_in destination")
        check_blocks([b for pair in plan.copies for b in pair], nb, "copy")
        check_unique([d for _, d in plan.copies], "copy destination")

        # per seq: [table length, computed after the step, known tokens]
        shape: dict[int, list[int]] = {}
        checked = _Checked()
        for ns in plan.new:
            if ns.seq_id in known or ns.seq_id in shape:
                raise PlanError(f"new seq {ns.seq_id} is already known")
            check_blocks(ns.block_ids, nb, "table")
            ntok = len(ns.prompt_token_ids) + len(ns.output_token_ids)
            if ntok == 0:
                raise PlanError(f"new seq {ns.seq_id} has no tokens")
            if ns.num_computed + ns.num_new_tokens > ntok:
                raise PlanError(f"seq {ns.seq_id}: {ns.num_computed}+{ns.num_new_tokens} tokens "
                                f"> {ntok} known")
            check_token_ids(ns)
            shape[ns.seq_id] = [len(ns.block_ids), ns.num_computed + ns.num_new_tokens, ntok]
            if ns.num_new_tokens:
                checked.work.append((ns.seq_id, ns.num_new_tokens))
            elif ns.num_computed == ntok:
                raise PlanError(f"new seq {ns.seq_id} has every token computed and none to run")
        if len(plan.run_seq_ids) != len(plan.run_num_tokens):
            raise PlanError(f"run_seq_ids ({len(plan.run_seq_ids)}) and run_num_tokens "
                            f"({len(plan.run_num_tokens)}) differ in length")
        for sid, n in zip(plan.run_seq_ids, plan.run_num_tokens):
            if sid in shape:
                raise PlanError(f"seq {sid} is scheduled twice in one step")
            if sid not in known:
                raise PlanError(f"run: unknown seq {sid}")
            if n < 1:
                raise PlanError(f"run: seq {sid} with {n} tokens")
            s = self.seqs[sid]
            if s.num_computed + n > s.num_tokens:
                raise PlanError(f"seq {sid}: {s.num_computed}+{n} tokens > {s.num_tokens} known")
            shape[sid] = [len(s.table), s.num_computed + n, s.num_tokens]
            checked.work.append((sid, n))
        for tu in plan.table_updates:
            if tu.seq_id not in known and tu.seq_id not in shape:
                raise PlanError(f"table update for unknown seq {tu.seq_id}")
            check_blocks(tu.block_ids, nb, "table")
            if tu.seq_id not in shape:
                s = self.seqs[tu.seq_id]
                shape[tu.seq_id] = [len(s.table), s.num_computed, s.num_tokens]
            if tu.start > shape[tu.seq_id][0]:
                raise PlanError(f"seq {tu.seq_id}: table update at {tu.start} beyond its "
                                f"{shape[tu.seq_id][0]} blocks")
            shape[tu.seq_id][0] = tu.start + len(tu.block_ids)
        for sid, n in checked.work:
            nblocks, end, _ = shape[sid]
            if nblocks * bs < end:
                raise PlanError(f"seq {sid}: {nblocks} blocks cannot hold {end} tokens")
            if end > self.max_model_len:
                raise PlanError(f"seq {sid}: {end} tokens > max_model_len {self.max_model_len}")
        checked.num_tokens = sum(n for _, n in checked.work)
        if checked.num_tokens > self.max_num_batched_tokens:
            raise PlanError(f"{checked.num_tokens} tokens in one step > {self.max_num_batched_tokens}")
        samplers = {sid for sid, _ in checked.work if shape[sid][1] == shape[sid][2]}
        children = set()
        for f in plan.forks:
            if f.parent not in samplers:
                raise PlanError(f"fork parent {f.parent} does not sample in this step")
            if f.child in known or f.child in shape or f.child in children:
                raise PlanError(f"fork child {f.child} is already known")
            children.add(f.child)
        return checked

    def _apply(self, plan: StepPlan, checked: _Checked) -> StepResult:
        for sid in plan.finished:
            del self.seqs[sid]
        for sid in plan.preempted:
            del self.seqs[sid]
        if plan.swap_out:
            self.kv.swap_out(plan.swap_out)
        if plan.swap_in:
            self.kv.swap_in(plan.swap_in)
        if plan.copies:
            pairs = torch.tensor(plan.copies, dtype=torch.long).to(self.device)
            self.backend.copy_blocks(self.kv.device_caches, pairs)
        for ns in plan.new:
            self.seqs[ns.seq_id] = SeqState(list(ns.prompt_token_ids), list(ns.output_token_ids),
                                            list(ns.block_ids), ns.num_computed, ns.sampling,
                                            ns.sample_index)
        for tu in plan.table_updates:
            table = self.seqs[tu.seq_id].table
            del table[tu.start:]
            table.extend(tu.block_ids)

        # who samples, and from which row of the packed token axis (fork children share the
        # parent's row); known before the forward, so the row index rides in the same pack
        last_row: dict[int, int] = {}
        sampled: list[int] = []
        row = -1
        for sid, n in checked.work:
            row += n
            s = self.seqs[sid]
            if s.num_computed + n == s.num_tokens:
                last_row[sid] = row
                sampled.append(sid)
        sampled += [f.child for f in plan.forks]
        rows = [last_row[sid] for sid in sampled[:len(last_row)]] + [last_row[f.parent] for f in plan.forks]

        logits = self._forward(checked.work, rows) if checked.work else None     # [S, V] float32
        for f in plan.forks:
            p = self.seqs[f.parent]
            self.seqs[f.child] = SeqState(list(p.prompt), list(p.output), list(p.table),
                                          p.num_computed, p.params, f.sample_index)
        if not sampled:
            return StepResult(step_id=plan.step_id, seq_ids=[], token_ids=[])

        states = [self.seqs[sid] for sid in sampled]
        meta = SamplingMetadata.build([(s.params, s.prompt, s.output, s.sample_index) for s in states],
                                      self.device)
        out = self.sampler(logits, meta)
        tokens = out.token_ids.tolist()                                      # the step's one sync
        for s, t in zip(states, tokens):
            s.output.append(t)
        return StepResult(step_id=plan.step_id, seq_ids=sampled, token_ids=tokens,
                          logprobs=out.logprobs)

    # ------------------------------------------------------------------------------ forward
    def _forward(self, work: list[tuple[int, int]], sample_rows: list[int]) -> Optional[Tensor]:
        """Run the model over the step's new tokens and advance num_computed.

        Returns logits [len(sample_rows), V] float32 of the given token rows (None if empty)."""
        bs = self.block_size
        ids: list[int] = []
        starts: list[int] = []        # num_computed before the step, per seq
        q_lens: list[int] = []
        ctx_lens: list[int] = []
        tables: list[list[int]] = []
        for sid, n in work:
            s = self.seqs[sid]
            c = s.num_computed
            ids.extend(s.tokens(c, c + n))
            starts.append(c)
            q_lens.append(n)
            ctx_lens.append(c + n)
            tables.append(s.table)
        B, T, S = len(work), len(ids), len(sample_rows)
        max_blocks = max(-(-c // bs) for c in ctx_lens)
        flat_tables = [0] * (B * max_blocks)
        for b, (t, c) in enumerate(zip(tables, ctx_lens)):
            k = -(-c // bs)
            flat_tables[b * max_blocks:b * max_blocks + k] = t[:k]
        cu = [0] * (B + 1)
        for b, n in enumerate(q_lens):
            cu[b + 1] = cu[b] + n

        # one int64 pack on the host -> one copy to the device (pinned on CUDA)
        host = torch.tensor(ids + cu + ctx_lens + starts + sample_rows + flat_tables, dtype=torch.int64)
        dev = self._to_device(host)
        ids_t, cu_t, ctx_t, starts_t, rows_t, tables_t = dev.split([T, B + 1, B, B, S, B * max_blocks])
        tables_t = tables_t.view(B, max_blocks)                                              # [B, nb]
        # per-token sequence index, position and slot, vectorised
        q_lens_t = cu_t[1:] - cu_t[:-1]
        seq_of = torch.repeat_interleave(torch.arange(B, device=self.device), q_lens_t, output_size=T)
        positions = torch.arange(T, device=self.device) - cu_t[seq_of] + starts_t[seq_of]   # [T]
        slots = tables_t[seq_of, positions // bs] * bs + positions % bs                      # [T]
        meta = AttentionMetadata(
            num_seqs=B, slot_mapping=slots, cu_seqlens_q=cu_t.to(torch.int32),
            context_lens=ctx_t.to(torch.int32), block_tables=tables_t.to(torch.int32),
            max_seqlen_q=max(q_lens), max_context_len=max(ctx_lens),
            is_decode=T == B, query_lens_host=q_lens, context_lens_host=ctx_lens,
            slots_all_valid=True)
        hidden = self.model(ids_t, positions, self.kv.device_caches, meta, self.backend)    # [T, D]
        for sid, n in work:
            self.seqs[sid].num_computed += n
        return self.model.compute_logits(hidden[rows_t]) if S else None                     # [S, V]

    def _to_device(self, host: Tensor) -> Tensor:
        if self.device.type != "cuda":
            return host
        n = host.numel()
        if self._pinned is None or self._pinned.numel() < n:
            self._pinned = torch.empty(max(n, 2 * (self._pinned.numel() if self._pinned is not None else 0),
                                           4096), dtype=torch.int64, pin_memory=True)
        if self._pinned_free is not None:
            self._pinned_free.synchronize()         # the previous step's copy has left the buffer
        buf = self._pinned[:n]
        buf.copy_(host)
        out = buf.to(self.device, non_blocking=True)
        self._pinned_free = torch.cuda.Event()
        self._pinned_free.record()
        return out
