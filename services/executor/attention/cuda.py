"""CUDA attention backend: the kernels in ``kernels/*.cu`` loaded through ``cupy.RawModule``.

Interface: docs/ARCHITECTURE.md, "Attention backend interface" (same as ``torch_ref.TorchBackend``).

* Kernels are compiled with NVRTC once per (file, device) and kept in a module-level cache
  (CuPy also caches the binary on disk). Local ``#include "x.cuh"`` lines are inlined here before
  compiling, so CuPy's cache key (a hash of the source) covers the headers too.
* Every launch goes on torch's current stream (``cupy.cuda.ExternalStream``); tensors are passed
  as raw device pointers (``data_ptr``), never copied; nothing here synchronises with the host
  (the plan uses only host ints already in ``AttentionMetadata``).
* CuPy is imported lazily: this module imports (and its planning helpers work) without it, which
  is what the CPU emulation test relies on.

Attention plan (``plan_attention``), shared by decode, prefill and chunked prefill; see the header
of ``kernels/paged_attention.cu`` for what a CTA does:

* ``heads_per_cta`` = min(G, 8) query heads of one KV head per CTA (G = GQA ratio); larger groups
  are split in ``ceil(G / 8)`` head chunks.
* ``q_per_cta`` = 1 for decode (every sequence has one new token), else ``8 // heads_per_cta``
  new tokens per CTA, so one CTA always serves at most 8 (token, head) rows.
* Split-K heuristic. Partitions are ``PARTITION_SIZE`` = 512 keys; ``max_parts`` =
  ceil(max_context_len / 512). Single pass when ``max_parts == 1`` or when the single-pass grid
  already has ``>= SPLIT_MIN_WAVES_CTAS * num_SMs`` CTAs (the GPU is full several times over; split
  would only add partial writes and a second launch) and no context exceeds 8 partitions (4096
  keys, beyond which the longest sequence's CTA becomes the tail of the step). Otherwise split-K,
  provided the fp32 partials fit in ``SPLIT_MAX_PARTIAL_BYTES`` (long prefills with many query
  rows keep the single pass: they have plenty of CTAs anyway). In short: small batches with long
  contexts split; large batches of short contexts do not. Same spirit as vLLM's v1/v2 choice.
  With a sliding window the partitions stay absolute (partition p holds keys [512p, 512p + 512));
  those before a row's window return at once, and the choice weighs only the keys a row walks
  (at most window + max_seqlen_q - 1).

Sliding windows (``attend(..., window=W)``): the kernels take W (0 = full attention) and each CTA
starts its key loop at its first row's window start; see the kernel header. Head dims 64, 128 and
256 (Gemma 3); fp32 at 256 has each thread make two 16-byte loads per row. Not run: no GPU at hand
when the window and head_dim 256 were added; tests/test_kernel_emulation.py checks their index
logic on the CPU and tests/test_cuda_backend.py covers them where a GPU is present.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from services.executor.attention.base import AttentionBackend, AttentionMetadata, check_window
from services.executor.attention.kernel_dir import KERNEL_DIR

# ---- constants mirrored from kernels/paged_attention.cu (tests check they agree) -------------
NUM_THREADS = 128          # PA_NUM_THREADS
MAX_ROWS = 8               # PA_MAX_ROWS: (token, head) rows per CTA
TILE = 64                  # PA_TILE: keys per online-softmax step
PARTITION_SIZE = 512       # split-K partition (keys)
SPLIT_MAX_SINGLE_PARTS = 8           # single pass allowed up to 8 partitions (4096 keys)...
SPLIT_MIN_WAVES_CTAS = 4             # ...when the grid has >= 4 CTAs per SM
SPLIT_MAX_PARTIAL_BYTES = 256 << 20  # cap on the fp32 partial buffer of split-K
COPY_THREADS = 256
GRID_YZ_MAX = 65535            # CUDA limit on gridDim.y and gridDim.z
CACHE_THREADS = 128

HEAD_DIMS = (64, 128, 256)
BLOCK_SIZES = (16, 32)
DTYPE_TAGS = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}

_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def kernel_source(name: str, kernel_dir: Path | None = None) -> str:
    """Text of ``kernels/<name>`` with local ``#include "..."`` files inlined (once each)."""
    kdir = Path(kernel_dir) if kernel_dir is not None else KERNEL_DIR
    seen: set[str] = set()

    def expand(fname: str) -> str:
        text = (kdir / fname).read_text()

        def sub(m: re.Match) -> str:
            inc = m.group(1)
            if not (kdir / inc).exists():
                return m.group(0)
            if inc in seen:
                return f"// (already included: {inc})"
            seen.add(inc)
            body = re.sub(r"^\s*#\s*pragma\s+once\s*$", "// (pragma once)", expand(inc), flags=re.M)
            return f"// ---- begin {inc}\n{body}\n// ---- end {inc}"

        return _INCLUDE_RE.sub(sub, text)

    return expand(name)


# ---- planning (pure Python: shared with the CPU emulation test) -----------------------------

@dataclass(frozen=True)
class AttnPlan:
    num_seqs: int
    num_heads: int
    num_kv_heads: int
    heads_per_cta: int      # Gc
    num_head_chunks: int    # C
    q_per_cta: int          # Tq
    num_q_tiles: int
    num_partitions: int     # P (1 for single pass)
    partition_size: int     # 0 = single pass

    @property
    def split(self) -> bool:
        return self.partition_size > 0

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.num_q_tiles * self.num_partitions,
                self.num_kv_heads * self.num_head_chunks,
                self.num_seqs)


def plan_attention(num_seqs: int, num_heads: int, num_kv_heads: int, max_seqlen_q: int,
                   max_context_len: int, num_tokens: int, head_dim: int, num_sms: int = 132,
                   force_split: bool | None = None,
                   partition_size: int = PARTITION_SIZE, window: int = 0) -> AttnPlan:
    if num_seqs > GRID_YZ_MAX or num_kv_heads * -(-num_heads // num_kv_heads) > GRID_YZ_MAX:
        raise ValueError("grid.y / grid.z limit (65535) exceeded")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}")
    group = num_heads // num_kv_heads
    gc = min(group, MAX_ROWS)
    chunks = -(-group // gc)
    q_per_cta = 1 if max_seqlen_q <= 1 else MAX_ROWS // gc
    q_tiles = max(1, -(-max_seqlen_q // q_per_cta))
    ctas = q_tiles * num_kv_heads * chunks * num_seqs
    max_parts = max(1, -(-max_context_len // partition_size))
    # keys one CTA walks: the whole context, or (sliding window) at most its rows' windows
    span = max_context_len if window <= 0 else min(max_context_len, window + max_seqlen_q - 1)
    work_parts = max(1, -(-span // partition_size))
    if force_split is None:
        partial_bytes = num_tokens * num_heads * max_parts * (head_dim + 2) * 4
        single = work_parts == 1 or (ctas >= SPLIT_MIN_WAVES_CTAS * num_sms
                                     and work_parts <= SPLIT_MAX_SINGLE_PARTS)
        split = (not single and partial_bytes <= SPLIT_MAX_PARTIAL_BYTES
                 and num_tokens <= GRID_YZ_MAX)          # the reduce's grid.y is the token count
    else:
        split = force_split
        if split and num_tokens > GRID_YZ_MAX:
            raise ValueError(f"split-K needs the reduce kernel's grid.y = {num_tokens} tokens <= {GRID_YZ_MAX}")
    return AttnPlan(num_seqs, num_heads, num_kv_heads, gc, chunks, q_per_cta, q_tiles,
                    max_parts if split else 1, partition_size if split else 0)


# ---- CuPy plumbing ------------------------------------------------------------------------------

_MODULES: dict[tuple[str, int], Any] = {}      # (file, device index) -> cupy.RawModule
_FUNCTIONS: dict[tuple[str, int, str], Any] = {}
_STREAMS: dict[int, Any] = {}                   # torch stream handle -> cupy.cuda.ExternalStream


def _cupy():
    import cupy  # noqa: PLC0415 - optional dependency (the `gpu` extra)
    return cupy


def get_function(file: str, name: str, device_index: int):
    key = (file, device_index, name)
    fn = _FUNCTIONS.get(key)
    if fn is None:
        cp = _cupy()
        mkey = (file, device_index)
        mod = _MODULES.get(mkey)
        if mod is None:
            with cp.cuda.Device(device_index):
                mod = cp.RawModule(code=kernel_source(file), options=(), backend="nvrtc")
                mod.compile()
            _MODULES[mkey] = mod
        with cp.cuda.Device(device_index):
            fn = mod.get_function(name)
        _FUNCTIONS[key] = fn
    return fn


def _ptr(t: Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


class CudaBackend(AttentionBackend):
    name = "cuda"

    def __init__(self, device: torch.device | str = "cuda"):
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError("CudaBackend needs a CUDA device")
        self.device = torch.device("cuda", device.index if device.index is not None
                                   else torch.cuda.current_device())
        self.cp = _cupy()
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self._layer_ptrs: dict[tuple[int, ...], Tensor] = {}
        # compile both modules up front (not inside the first timed step)
        get_function("paged_attention.cu", "paged_attention_f16_d128_bs16", self.device.index)
        get_function("cache_ops.cu", "copy_blocks_kernel", self.device.index)

    # ---- launch helpers
    def _stream(self):
        handle = torch.cuda.current_stream(self.device).cuda_stream
        s = _STREAMS.get(handle)
        if s is None:
            s = _STREAMS[handle] = self.cp.cuda.ExternalStream(handle, self.device.index)
        return s

    def _launch(self, file: str, name: str, grid, block, args, shared_mem: int = 0) -> None:
        fn = get_function(file, name, self.device.index)
        with self.cp.cuda.Device(self.device.index), self._stream():
            fn(tuple(int(g) for g in grid), (int(block),), args, shared_mem=int(shared_mem))

    def _empty(self, shape, dtype: torch.dtype) -> Tensor:
        """A fresh buffer a kernel fills (the host run poisons it with NaN)."""
        return torch.empty(shape, dtype=dtype, device=self.device)

    def _dev(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """t on our device, given dtype, contiguous (no-op when already so)."""
        if t.device != self.device or t.dtype != dtype:
            t = t.to(self.device, dtype, non_blocking=True)
        return t.contiguous()

    def _step_tensors(self, meta: AttentionMetadata):
        st = meta.scratch.get("cuda_idx")
        if st is None:
            st = (self._dev(meta.block_tables, torch.int32), self._dev(meta.context_lens, torch.int32),
                  self._dev(meta.cu_seqlens_q, torch.int32))
            meta.scratch["cuda_idx"] = st
        return st

    @staticmethod
    def _check_cache(kv: Tensor) -> None:
        if kv.dim() != 5 or kv.shape[0] != 2:
            raise ValueError(f"kv cache must be [2, num_blocks, Hkv, block_size, D], got {tuple(kv.shape)}")
        if not kv.is_contiguous():
            raise ValueError("kv cache must be contiguous")
        if kv.dtype not in DTYPE_TAGS:
            raise ValueError(f"unsupported kv dtype {kv.dtype}")
        if kv.data_ptr() % 16:     # every K/V row is read as 16-byte vectors (pagedserve_common.cuh)
            raise ValueError(f"kv cache base address {kv.data_ptr():#x} is not 16-byte aligned")

    @staticmethod
    def _vec_ok(t: Tensor) -> bool:
        """16-byte vector access possible: last dim contiguous, strides and base aligned."""
        vec = 16 // t.element_size()
        return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
                and all(s % vec == 0 for s in t.stride()[:-1]))

    # ---- interface
    @classmethod
    def _vectorizable(cls, t: Tensor) -> Tensor:
        """``t`` itself when 16-byte vector loads can read it, else an aligned contiguous copy
        (``.contiguous()`` alone returns a contiguous but misaligned tensor unchanged)."""
        if cls._vec_ok(t):
            return t
        t = t.contiguous()
        if not cls._vec_ok(t):
            t = torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)   # fresh: aligned
        return t

    @classmethod
    def _kv_inputs(cls, kv: Tensor, key: Tensor, value: Tensor, num_slots: int) -> tuple[Tensor, Tensor]:
        """key/value ``[T, Hkv, D]`` checked against the cache ``[2, N, Hkv, bs, D]`` and the slot
        mapping, in the cache's dtype, readable by 16-byte vectors."""
        _, _, hkv, _, d = kv.shape
        for name, t in (("key", key), ("value", value)):
            if t.dim() != 3 or tuple(t.shape[1:]) != (hkv, d):
                raise ValueError(f"{name} must be [T, {hkv}, {d}] for this cache, got {tuple(t.shape)}")
            if not (t.is_floating_point() and t.device == kv.device):
                raise ValueError(f"{name} must be a floating tensor on {kv.device}, got {t.dtype} on {t.device}")
        if key.shape[0] != value.shape[0] or key.shape[0] != num_slots:
            raise ValueError(f"key has {key.shape[0]} tokens, value {value.shape[0]}, slot mapping {num_slots}")
        return cls._vectorizable(key.to(kv.dtype)), cls._vectorizable(value.to(kv.dtype))

    def write_kv(self, kv: Tensor, key: Tensor, value: Tensor, meta: AttentionMetadata) -> None:
        self._check_cache(kv)
        key, value = self._kv_inputs(kv, key, value, meta.slot_mapping.shape[0])
        T = key.shape[0]
        if T == 0:
            return
        _, nb, hkv, bs, d = kv.shape
        slots = meta.scratch.get("cuda_slots")
        if slots is None:
            slots = meta.scratch["cuda_slots"] = self._dev(meta.slot_mapping, torch.int64)
        name = "reshape_and_cache_b32" if kv.element_size() == 4 else "reshape_and_cache_b16"
        self._launch("cache_ops.cu", name, (T,), CACHE_THREADS, (
            _ptr(key), _ptr(value),
            np.int64(key.stride(0)), np.int64(key.stride(1)),
            np.int64(value.stride(0)), np.int64(value.stride(1)),
            _ptr(kv), _ptr(slots), np.int64(nb), np.int32(hkv), np.int32(d), np.int32(bs)))

    def plan(self, meta: AttentionMetadata, num_heads: int, num_kv_heads: int, head_dim: int,
             num_tokens: int, window: int = 0) -> AttnPlan:
        key = ("cuda_plan", num_heads, num_kv_heads, head_dim, window)
        p = meta.scratch.get(key)
        if p is None:
            p = meta.scratch[key] = plan_attention(
                meta.num_seqs, num_heads, num_kv_heads, meta.max_seqlen_q, meta.max_context_len,
                num_tokens, head_dim, self.num_sms, window=window)
        return p

    def attend(self, query: Tensor, kv: Tensor, meta: AttentionMetadata, scale: float,
               window: int = 0, plan: AttnPlan | None = None) -> Tensor:
        """``plan`` (tests, benchmarks) overrides the heuristic; any plan is correct for any window."""
        self._check_cache(kv)
        T, hq, d = query.shape
        _, nb, hkv, bs, dk = kv.shape
        if d != dk or d not in HEAD_DIMS or bs not in BLOCK_SIZES:
            raise ValueError(f"unsupported head_dim {d} / block_size {bs} "
                             f"(kernels: head_dim {HEAD_DIMS}, block_size {BLOCK_SIZES})")
        window = check_window(window, meta.max_context_len)
        if T == 0 or meta.num_seqs == 0:
            return torch.empty_like(query)
        q = query.to(kv.dtype)
        if q.stride(-1) != 1:
            q = q.contiguous()
        tables, ctx, cu = self._step_tensors(meta)
        if plan is None:
            plan = self.plan(meta, hq, hkv, d, T, window)
        tag = DTYPE_TAGS[kv.dtype]
        out = self._empty((T, hq, d), kv.dtype)
        part_out = part_ml = None
        if plan.split:
            bkey = ("cuda_partials", T, hq, plan.num_partitions, d)
            bufs = meta.scratch.get(bkey)
            if bufs is None:   # one buffer per step, reused by every layer (stream-ordered)
                bufs = meta.scratch[bkey] = (self._empty((T, hq, plan.num_partitions, d), torch.float32),
                                             self._empty((T, hq, plan.num_partitions, 2), torch.float32))
            part_out, part_ml = bufs
        self._launch("paged_attention.cu", f"paged_attention_{tag}_d{d}_bs{bs}", plan.grid, NUM_THREADS, (
            _ptr(out), _ptr(part_out), _ptr(part_ml), _ptr(q),
            np.int64(q.stride(0)), np.int64(q.stride(1)), _ptr(kv), np.int64(nb),
            _ptr(tables), np.int32(tables.stride(0)), _ptr(ctx), _ptr(cu),
            np.int32(hq), np.int32(hkv), np.int32(plan.heads_per_cta), np.int32(plan.num_head_chunks),
            np.int32(plan.q_per_cta), np.int32(plan.num_partitions), np.int32(plan.partition_size),
            np.float32(scale), np.int32(window)))
        if plan.split:
            self._launch("paged_attention.cu", f"paged_attention_reduce_{tag}_d{d}", (hq, T), NUM_THREADS, (
                _ptr(out), _ptr(part_out), _ptr(part_ml), _ptr(ctx), _ptr(cu),
                np.int32(meta.num_seqs), np.int32(hq), np.int32(plan.num_partitions),
                np.int32(plan.partition_size), np.int32(window)), shared_mem=4 * plan.num_partitions)
        return out if out.dtype == query.dtype else out.to(query.dtype)

    # ---- block copies
    def _ptr_table(self, tensors: Sequence[Tensor]) -> Tensor:
        """Device int64 array of the tensors' base addresses, cached per tensor set."""
        key = tuple(t.data_ptr() for t in tensors)
        tab = self._layer_ptrs.get(key)
        if tab is None:
            tab = torch.tensor(key, dtype=torch.int64).to(self.device)
            self._layer_ptrs[key] = tab
        return tab

    def copy_blocks(self, caches: list[Tensor], pairs: Tensor) -> None:
        """One launch: for every layer, plane and pair (src, dst): cache[:, dst] = cache[:, src].
        The pairs run in parallel, so no destination may be a source or repeat: ``validate_plan``
        refuses such plans before they get here (the pairs are already on the device)."""
        if pairs is None or len(pairs) == 0 or not caches:
            return
        shape = caches[0].shape
        for t in caches:
            if t.dim() != 5 or t.shape != shape or t.dtype != caches[0].dtype or not t.is_contiguous():
                raise ValueError("all layers must be contiguous [2, N, Hkv, bs, D] caches of one shape and dtype")
        table, pairs = self._ptr_table(caches), self._dev(pairs.reshape(-1, 2), torch.int64)   # alive until the launch
        block_bytes = math.prod(shape[2:]) * caches[0].element_size()
        self._launch("cache_ops.cu", "copy_blocks_kernel", (pairs.shape[0], 2 * len(caches)), COPY_THREADS, (
            _ptr(table), _ptr(table), _ptr(pairs), np.int64(shape[1]), np.int64(shape[1]), np.int64(block_bytes)))


__all__ = ["CudaBackend", "AttnPlan", "plan_attention", "kernel_source", "get_function",
           "KERNEL_DIR", "PARTITION_SIZE", "MAX_ROWS", "TILE", "NUM_THREADS"]
