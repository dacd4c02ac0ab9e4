"""The attention backend interface (docs/ARCHITECTURE.md, "Attention backend interface").

``AttentionMetadata`` is built once per step by the worker and shared by every layer. Besides the
device tensors of the contract it carries optional *host* copies of the per-sequence lengths (so a
backend can plan its work without a device sync) and a ``scratch`` dict in which a backend may cache
per-step derived tensors (built on the first layer, reused by the others).

``NormKernel`` is a separate, optional interface: a backend whose device has a fused residual add
+ RMSNorm provides it as well, and the model uses it where the backend does.
"""
from __future__ import annotations

import abc
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor


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


def check_window(window: int, max_context_len: int) -> int:
    """The window a backend attends with: ``window`` checked, and 0 (full causal attention, the
    fast path) where every key of the step is inside it (a query at p <= max_context_len - 1 sees
    keys k > p - window, i.e. all of 0 .. p, once window >= max_context_len)."""
    try:
        w = operator.index(window)
    except TypeError:
        w = -1
    if isinstance(window, bool) or w < 0:
        raise ValueError(f"window must be an int >= 0 (0 = full attention), got {window!r}")
    return 0 if w >= max_context_len else w


class AttentionBackend(abc.ABC):
    name: str = "?"

    @abc.abstractmethod
    def write_kv(self, kv: Tensor, key: Tensor, value: Tensor, meta: AttentionMetadata) -> None:
        """key, value [T, Hkv, D] into kv[0] / kv[1] at meta.slot_mapping (slot -1 = skip)."""

    @abc.abstractmethod
    def attend(self, query: Tensor, kv: Tensor, meta: AttentionMetadata, scale: float,
               window: int = 0) -> Tensor:
        """query [T, Hq, D] -> [T, Hq, D]; causal within the new tokens, full over the cached prefix.

        ``window`` > 0: sliding-window attention, a query at position p sees only the keys at
        positions k with p - window < k <= p (transformers' ``sliding_window``); 0: full causal.
        Layers of one step may pass different windows with the same ``meta``."""

    @abc.abstractmethod
    def copy_blocks(self, caches: list[Tensor], pairs: Tensor) -> None:
        """pairs [P, 2] int64 (src, dst): every cache[:, dst] = cache[:, src]."""


class NormKernel(abc.ABC):
    @abc.abstractmethod
    def add_rms_norm(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float
                     ) -> Optional[tuple[Tensor, Tensor]]:
        """Fused residual add + RMSNorm (x, residual [T, D]): ``(rms_norm(residual + x) * weight,
        residual + x)``, possibly updating ``residual`` in place; None where the kernel does not
        cover these tensors (dtype, device), and the model's torch ops run instead."""
