"""Paged KV cache tensors and the host swap pool.

Per layer one device tensor ``kv[2, num_blocks, num_kv_heads, block_size, head_dim]`` (K at 0,
V at 1) and, when swapping is enabled, a host tensor of the same layout with ``num_host_blocks``
blocks (pinned memory on CUDA).

Sizing (``plan_num_blocks``), first match wins:
  1. ``num_blocks`` given (``--num-blocks``) -> that many;
  2. ``kv_cache_memory`` bytes given (``--kv-cache-memory``) -> as many blocks as fit;
  3. CUDA -> ``gpu_memory_utilization * total - memory in use after loading the weights``
     ``- reserve_bytes`` (the worker's estimate of one step's activations and logits);
  4. CPU -> ``CPU_DEFAULT_BYTES`` (1 GiB), capped at 64 and raised to at least 4 full-length
     (``max_model_len``) sequences' worth.
Host pool (``plan_num_host_blocks``): ``num_host_blocks`` if given, else a quarter of the device
blocks, capped at ``HOST_POOL_MAX_BYTES`` (4 GiB) of pinned memory on CUDA.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from services.executor.model import ModelConfig

CPU_DEFAULT_BYTES = 1 << 30
HOST_POOL_MAX_BYTES = 4 << 30


def block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers (K and V)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return cfg.num_layers * 2 * cfg.num_kv_heads * block_size * cfg.head_dim * elem


def plan_num_blocks(cfg: ModelConfig, block_size: int, dtype: torch.dtype, device: torch.device, *,
                    num_blocks: int = 0, kv_cache_memory: int = 0,
                    gpu_memory_utilization: float = 0.9, max_model_len: int = 2048,
                    reserve_bytes: int = 0) -> int:
    per_block = block_bytes(cfg, block_size, dtype)
    if num_blocks > 0:
        return num_blocks
    if kv_cache_memory > 0:
        budget = kv_cache_memory
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(gpu_memory_utilization * total) - (total - free) - reserve_bytes
    else:
        seq_blocks = -(-max_model_len // block_size)
        budget = max(min(CPU_DEFAULT_BYTES, 64 * seq_blocks * per_block), 4 * seq_blocks * per_block)
    n = budget // per_block
    if n < 1:
        raise MemoryError(f"no room for the KV cache: budget {budget} bytes < one block ({per_block} bytes)")
    return int(n)


def activation_bytes(cfg: ModelConfig, max_tokens: int, max_seqs: int, dtype: torch.dtype) -> int:
    """Rough peak of one forward + sampling step: a few [T, width] activations (x2 for temporaries)
    and float32 logits [S, V] with the sampler's copies."""
    elem = torch.empty((), dtype=dtype).element_size()
    width = 4 * cfg.hidden_size + 3 * cfg.intermediate_size + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    return 2 * max_tokens * width * elem + 4 * max_seqs * cfg.vocab_size * 4


def plan_num_host_blocks(cfg: ModelConfig, block_size: int, dtype: torch.dtype, device: torch.device,
                         num_blocks: int, num_host_blocks: int = 0) -> int:
    if num_host_blocks > 0:
        return num_host_blocks
    n = num_blocks // 4
    if device.type == "cuda":
        n = min(n, HOST_POOL_MAX_BYTES // block_bytes(cfg, block_size, dtype))
    return n


class KVCache:
    """Device caches (one tensor per layer) and the host swap pool."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, num_host_blocks: int = 0):
        self.num_blocks, self.num_host_blocks, self.block_size = num_blocks, num_host_blocks, block_size
        shape = (2, num_blocks, cfg.num_kv_heads, block_size, cfg.head_dim)
        # zeros, not empty: masked-out padding of a gathered block must never hold NaN
        self.device_caches: list[Tensor] = [torch.zeros(shape, dtype=dtype, device=device)
                                            for _ in range(cfg.num_layers)]
        host_shape = (2, num_host_blocks, cfg.num_kv_heads, block_size, cfg.head_dim)
        pin = device.type == "cuda"
        self.host_caches: list[Tensor] = [torch.zeros(host_shape, dtype=dtype, pin_memory=pin)
                                          for _ in range(cfg.num_layers)] if num_host_blocks else []

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """(device block, host block) pairs: device -> host."""
        if not pairs:
            return
        dev = torch.tensor([p[0] for p in pairs], dtype=torch.long)
        host = torch.tensor([p[1] for p in pairs], dtype=torch.long)
        dev_idx = dev.to(self.device_caches[0].device)
        for d, h in zip(self.device_caches, self.host_caches):
            h[:, host] = d[:, dev_idx].to("cpu")

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """(host block, device block) pairs: host -> device."""
        if not pairs:
            return
        host = torch.tensor([p[0] for p in pairs], dtype=torch.long)
        dev = torch.tensor([p[1] for p in pairs], dtype=torch.long)
        cuda = self.device_caches[0].device.type == "cuda"
        dev_idx = dev.to(self.device_caches[0].device)
        for d, h in zip(self.device_caches, self.host_caches):
            staged = h[:, host]                                   # [2, P, Hkv, bs, Dh] on the host
            if cuda:
                staged = staged.pin_memory()
            d[:, dev_idx] = staged.to(d.device, non_blocking=cuda)
