"""The executor worker: holds per-sequence state and the KV cache, runs one StepPlan at a time.

Implements the Step protocol of docs/ARCHITECTURE.md. Usable in-process (``services/offline.py``)
or behind ZMQ (``services/executor/service.py``):

    worker = Worker(engine_config)          # loads the model, allocates the cache
    worker.ready()   -> ExecutorReady
    worker.execute(plan, masks=None) -> StepResult | ExecutorError

A plan is validated completely (shared/step_check.py) before anything is mutated, so a bad plan
changes nothing.

Tensor parallel (``tp``, services/executor/parallel.py): every rank holds a Worker over its
shard. Rank 0's ``execute`` first broadcasts the plan; every rank validates and runs it alike;
rank 0 samples and broadcasts the tokens, which every rank appends. Past the broadcast, an
exception on rank 0 ends the process (the ranks would disagree on what ran): the scheduler's
recovery starts a new group.

Structured outputs: the plan's ``mask_seq_ids`` sample only what their token masks allow. The
masks come inline (``plan.masks``) or, when the scheduler computes them while the forward pass
runs, from ``masks()``, called once after the forward and before sampling (the service receives
the StepMasks frame there). A plan that defers its masks without a ``masks`` source is refused
like a bad plan; deferred masks of the wrong size fail the step with the forward already run
(see ``_masks``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from services.executor.attention import AttentionMetadata, get_backend
from services.executor.kv_cache import KVCache, activation_bytes, plan_num_blocks, plan_num_host_blocks
from services.executor.parallel import NO_PARALLEL, Group, TensorParallel, shard_model, start_group
from services.executor.sampler import Sampler, SamplingMetadata
from services.executor.weights import LoadedModel, load_model
from shared.config import DEFAULT_MAX_MODEL_LEN, Config, EngineConfig
from shared.messages import ExecutorError, ExecutorReady, SamplingParams, StepPlan, StepResult, encode
from shared.model_path import resolve_model
from shared.step_check import CheckedPlan, PlanError, SeqShape, StepLimits, check_masks_size, validate_plan

log = logging.getLogger("pagedserve.executor")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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

    def shape(self) -> SeqShape:
        return SeqShape(len(self.table), self.num_computed, self.num_tokens)


class Worker:
    def __init__(self, engine_config: EngineConfig, loaded: Optional[LoadedModel] = None,
                 tp: TensorParallel = NO_PARALLEL):
        self.config, self.tp = engine_config, tp
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
        self.model_config = cfg = kv_cfg = loaded.config
        if tp.enabled:          # this rank's shard; the full weights go
            model, kv_cfg = shard_model(loaded.model, cfg, tp)
            loaded = LoadedModel(loaded.name, cfg, model, loaded.eos_token_ids)
        self.loaded = loaded
        self.model = loaded.model
        # the limits ready() reports (the model caps the context; a whole context fits one step)
        self.max_model_len = min(max_len, self.model.max_seq_len)
        self.max_num_batched_tokens = max(sched.max_num_batched_tokens, self.max_model_len)
        self.max_num_seqs = sched.max_num_seqs
        cache = engine_config.cache
        self.block_size = cache.block_size
        num_blocks = plan_num_blocks(kv_cfg, self.block_size, self.dtype, self.device,
                                     num_blocks=cache.num_blocks,
                                     kv_cache_memory=engine_config.kv_cache_memory,
                                     gpu_memory_utilization=engine_config.gpu_memory_utilization,
                                     max_model_len=self.max_model_len,
                                     reserve_bytes=activation_bytes(kv_cfg, self.max_num_batched_tokens,
                                                                    self.max_num_seqs, self.dtype))
        num_host = plan_num_host_blocks(kv_cfg, self.block_size, self.dtype, self.device, num_blocks,
                                        cache.num_host_blocks)
        if tp.enabled:          # every rank's pools are rank 0's size (memory may differ a little)
            num_blocks, num_host = tp.broadcast_ints([num_blocks, num_host])
        self.kv = KVCache(kv_cfg, num_blocks, self.block_size, self.dtype, self.device, num_host)
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
                             max_num_batched_tokens=self.max_num_batched_tokens, max_num_seqs=self.max_num_seqs,
                             # W if every layer is windowed, else 0: the scheduler frees what left it
                             sliding_window=self.model_config.uniform_window)

    def limits(self) -> StepLimits:
        return StepLimits(block_size=self.block_size, num_blocks=self.num_blocks,
                          num_host_blocks=self.num_host_blocks, vocab_size=self.model_config.vocab_size,
                          max_model_len=self.max_model_len,
                          max_num_batched_tokens=self.max_num_batched_tokens)

    def forget(self) -> None:
        """Drop every sequence's state (a new scheduler conversation), on every rank."""
        if self.tp.enabled and self.tp.rank == 0:
            self.tp.broadcast_bytes(b"F")
        self.seqs.clear()

    # ------------------------------------------------------------------------------ one step
    def execute(self, plan: StepPlan, masks: Optional[Callable[[], bytes]] = None) -> StepResult | ExecutorError:
        """Run one plan. ``masks``: returns the step's token masks when the plan names
        ``mask_seq_ids`` without carrying them (a StepMasks frame); called after the forward."""
        if self.tp.enabled and self.tp.rank == 0:
            self.tp.broadcast_bytes(b"P" + encode(plan))
        try:
            checked = validate_plan(plan, self.seqs, self.limits())
            if plan.mask_seq_ids and not plan.masks and masks is None and self.tp.rank == 0:
                raise PlanError(f"step {plan.step_id}: the masks of {len(plan.mask_seq_ids)} seqs are deferred "
                                f"to a StepMasks frame, but no source of masks was given")
        except PlanError as e:
            return ExecutorError(step_id=plan.step_id, message=str(e))
        try:
            with torch.inference_mode():
                return self._apply(plan, checked, masks)
        except PlanError as e:          # deferred masks of the wrong size (_masks), after the forward
            if self.tp.enabled:
                raise SystemExit(f"step {plan.step_id}: {e}; ending the tensor-parallel group") from None
            return ExecutorError(step_id=plan.step_id, message=str(e))
        except Exception as e:  # noqa: BLE001 - a failing step must not kill the service
            log.exception("step %d failed", plan.step_id)
            if self.tp.enabled:      # the ranks may disagree on what ran: the group ends
                raise SystemExit(f"rank {self.tp.rank}: step {plan.step_id} failed ({e}); ending the group")
            return ExecutorError(step_id=plan.step_id, message=f"step failed: {type(e).__name__}: {e}")

    def _apply(self, plan: StepPlan, checked: CheckedPlan,
               masks: Optional[Callable[[], bytes]] = None) -> StepResult:
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
        for sid, token in plan.appends:          # beam search: the token the scheduler chose
            self.seqs[sid].output.append(token)

        # who samples, and from which row of the packed token axis (fork children share the
        # parent's row); known before the forward, so the row index rides in the same pack
        last_row: dict[int, int] = {}
        row = -1
        for sid, n in checked.work:
            row += n
            last_row[sid] = row
        sampled = checked.samplers + [f.child for f in plan.forks]
        rows = [last_row[sid] for sid in checked.samplers] + [last_row[f.parent] for f in plan.forks]

        logits = self._forward(checked.work, rows) if checked.work else None     # [S, V] float32
        for f in plan.forks:
            p = self.seqs[f.parent]
            self.seqs[f.child] = SeqState(list(p.prompt), list(p.output), list(p.table),
                                          p.num_computed, p.params, f.sample_index)
        if not sampled:
            return StepResult(step_id=plan.step_id, seq_ids=[], token_ids=[])

        states = [self.seqs[sid] for sid in sampled]
        logprobs = None
        if self.tp.rank > 0:            # rank 0 samples; the tokens come from it
            tokens = self.tp.broadcast_ints([0] * len(states))
        else:
            meta = SamplingMetadata.build([(s.params, s.prompt, s.output, s.sample_index) for s in states],
                                          self.device, self._masks(plan, checked, masks))
            out = self.sampler(logits, meta)
            tokens, logprobs = out.token_ids.tolist(), out.logprobs          # the step's one sync
            if self.tp.enabled:
                self.tp.broadcast_ints(tokens)
        for s, t in zip(states, tokens):
            if not s.params.use_beam_search:     # a beam's next token comes in the plan (appends)
                s.output.append(t)
        return StepResult(step_id=plan.step_id, seq_ids=sampled, token_ids=tokens, logprobs=logprobs)

    def _masks(self, plan: StepPlan, checked: CheckedPlan,
               masks: Optional[Callable[[], bytes]]) -> Optional[tuple[list[int], bytes]]:
        """(sampled row of each mask_seq_ids entry, the mask rows) for the sampler, or None.

        Deferred masks arrive after the forward pass has run (KV written, num_computed advanced,
        forks made), so a wrong size (or whatever ``masks()`` raises) cannot leave the state
        unchanged as a validation error does: the step answers ExecutorError, and the scheduler
        fails the step like any other executor error."""
        if not plan.mask_seq_ids:
            return None
        data = plan.masks                       # inline: its size was checked with the plan
        if not data:
            data = masks()                      # execute checked that there is a source
            try:
                check_masks_size(data, len(checked.mask_rows), self.model_config.vocab_size)
            except PlanError as e:
                raise PlanError(f"step {plan.step_id}: deferred {e}") from None
        return checked.mask_rows, data

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


def start_worker(config: Config) -> tuple[Worker, Group]:
    """This process's rank of the tensor-parallel group (``parallel.start_group``) and its Worker
    over its shard; the group ends if the worker cannot be built."""
    group = start_group(config)
    try:
        return Worker(group.engine, tp=group.tp), group
    except BaseException:
        group.close(timeout=5)
        raise
