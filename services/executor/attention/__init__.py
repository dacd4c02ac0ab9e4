"""Attention backends behind one interface (docs/ARCHITECTURE.md, "Attention backend interface").

``AttentionMetadata`` is built once per step by the worker and shared by every layer. Besides the
device tensors of the contract it carries optional *host* copies of the per-sequence lengths (so a
backend can plan its work without a device sync) and a ``scratch`` dict in which a backend may cache
per-step derived tensors (built on the first layer, reused by the others).
"""
from __future__ import annotations

import abc
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from shared.config import ATTENTION_BACKENDS


def find_kernel_dir(repo: Path = Path(__file__).resolve().parents[3], prefix: str = sys.prefix) -> Path:
    """kernels/ (the CUDA .cu files and the CPU .c file): $PAGEDSERVE_KERNEL_DIR, else the
    repository's (source checkout, editable install, Docker), else the copy a wheel installs."""
    if os.environ.get("PAGEDSERVE_KERNEL_DIR"):
        return Path(os.environ["PAGEDSERVE_KERNEL_DIR"])
    installed = Path(prefix) / "share" / "pagedserve" / "kernels"
    return repo / "kernels" if (repo / "kernels").is_dir() or not installed.is_dir() else installed


KERNEL_DIR = find_kernel_dir()


@dataclass
class AttentionMetadata:
    num_seqs: int
    slot_mapping: Tensor          # [T] int64, slot of each new token (-1 = skip)
    cu_seqlens_q: Tensor          # [B+1] int32, new tokens of seq b are rows cu[b]:cu[b+1]
    context_lens: Tensor          # [B] int32, tokens in cache for seq b after this step's write
    block_tables: Tensor          # [B, max_blocks] int32, padded with 0
    max_seqlen_q: int
    max_context_len: int
    is_decode: bool               # every seq has exactly one new token
    # ---- optional extras (additive to the contract) ----
    query_lens_host: Optional[list[int]] = None     # [B] new tokens per seq, on the host
    context_lens_host: Optional[list[int]] = None   # [B] context_lens, on the host
    slots_all_valid: bool = False                   # True: no -1 in slot_mapping (skip the filter)
    scratch: dict[str, Any] = field(default_factory=dict)   # per-step cache for backends

    def host_lens(self) -> tuple[list[int], list[int]]:
        """(query lens, context lens) as Python lists; syncs only when the host copies are absent."""
        if self.query_lens_host is None:
            cu = self.cu_seqlens_q.tolist()
            self.query_lens_host = [cu[i + 1] - cu[i] for i in range(self.num_seqs)]
        if self.context_lens_host is None:
            self.context_lens_host = self.context_lens.tolist()
        return self.query_lens_host, self.context_lens_host


class AttentionBackend(abc.ABC):
    name: str = "?"

    @abc.abstractmethod
    def write_kv(self, kv: Tensor, key: Tensor, value: Tensor, meta: AttentionMetadata) -> None:
        """key, value [T, Hkv, D] into kv[0] / kv[1] at meta.slot_mapping (slot -1 = skip)."""

    @abc.abstractmethod
    def attend(self, query: Tensor, kv: Tensor, meta: AttentionMetadata, scale: float) -> Tensor:
        """query [T, Hq, D] -> [T, Hq, D]; causal within the new tokens, full over the cached prefix."""

    @abc.abstractmethod
    def copy_blocks(self, caches: list[Tensor], pairs: Tensor) -> None:
        """pairs [P, 2] int64 (src, dst): every cache[:, dst] = cache[:, src]."""

    def add_rms_norm(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float
                     ) -> Optional[tuple[Tensor, Tensor]]:
        """Optional fused residual add + RMSNorm on this device (x, residual [T, D]): returns
        ``(rms_norm(residual + x) * weight, residual + x)`` and may update ``residual`` in place,
        or None for the model's torch ops. The backend is what the model reaches in every layer,
        so the device's other fused kernels ride on it."""
        return None


def get_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """'torch' -> reference; 'cpu' -> reference + C decode kernel; 'cuda' -> CuPy kernels;
    'auto' -> 'cuda' on a CUDA device, else 'cpu'. A kernel backend that cannot load falls back
    to the reference with a warning."""
    device = torch.device(device)
    if name == "auto":
        name = "cuda" if device.type == "cuda" else "cpu"
    if name in ("cuda", "cpu") and device.type != name:
        warnings.warn(f"attention backend {name!r} needs a {name.upper()} device; using the torch reference")
        name = "torch"
    if name == "cuda":
        try:
            from services.executor.attention.cuda import CudaBackend
            return CudaBackend(device)
        except Exception as e:  # noqa: BLE001 - any import/init failure falls back
            warnings.warn(f"CUDA attention backend unavailable ({type(e).__name__}: {e}); "
                          "using the torch reference")
        name = "torch"
    if name == "cpu":
        from services.executor.attention.cpu import CpuBackend
        from services.executor.cpu_kernels import CpuKernelUnavailable
        try:
            return CpuBackend()
        except CpuKernelUnavailable as e:
            warnings.warn(f"CPU attention kernel unavailable ({e}); using the torch reference")
        name = "torch"
    if name == "torch":
        from services.executor.attention.torch_ref import TorchBackend
        return TorchBackend()
    raise ValueError(f"unknown attention backend {name!r} (choose one of {', '.join(ATTENTION_BACKENDS)})")


__all__ = ["AttentionMetadata", "AttentionBackend", "KERNEL_DIR", "get_backend"]
