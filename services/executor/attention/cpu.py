"""CPU attention backend: the torch reference, with decode rows attended by a C kernel (and the
model's residual add + RMSNorm fused by another).

``kernels/cpu_kernels.c`` (``pagedserve_decode_f32``) reads each sequence's K/V rows in place from
the paged cache; the reference gathers them into a padded copy first and runs SDPA over the copy
(the gather and the SDPA were 15% of a 32-row decode step, see docs/BENCHMARKS.md). Prefills, cache
writes and block copies stay the reference's. The kernel covers float32 caches (the CPU default);
other dtypes, and shapes past the kernel's stack buffers, take the reference path. A sliding window
is honoured on both paths (the kernel skips the keys before a row's window, the reference masks
them). How the kernel is built and loaded: ``cpu_kernels.py`` beside this file.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from services.executor.attention.base import AttentionMetadata, NormKernel
from services.executor.attention.cpu_kernels import CpuKernels, load_kernels
from services.executor.attention.torch_ref import TorchBackend, _DecodePlan


class CpuBackend(TorchBackend, NormKernel):
    name = "cpu"

    def __init__(self, kernels: Optional[CpuKernels] = None):
        self.kernel = kernels or load_kernels()

    def _attend_decode(self, q: Tensor, kv: Tensor, meta: AttentionMetadata, dec: _DecodePlan,
                       scale: float, window: int = 0) -> Tensor:
        if q.dtype != torch.float32 or not self.kernel.supports(kv, q.shape[1]):
            return super()._attend_decode(q, kv, meta, dec, scale, window)     # honours the window too
        return self.kernel.decode(q, kv, dec.tables, dec.ctx, scale, window)

    def add_rms_norm(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float
                     ) -> Optional[tuple[Tensor, Tensor]]:
        if not (x.dtype == residual.dtype == weight.dtype == torch.float32) or x.device.type != "cpu":
            return None
        return self.kernel.add_rms_norm(x, residual, weight, eps)
