"""Engine configuration shared by the services. Plain dataclasses: no torch, no I/O."""
from __future__ import annotations

from dataclasses import dataclass, field


ATTENTION_BACKENDS = ("auto", "torch", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field."""


@dataclass
class CacheConfig:
    """Paged KV memory, as the scheduler sees it: block ids only, never tensors."""

    block_size: int = 16
    num_blocks: int = 0            # 0 = take the executor's count from its handshake
    num_host_blocks: int = 0       # CPU swap pool; 0 disables swap preemption
    watermark: float = 0.01        # fraction of blocks kept free at admission for running seqs to grow
    enable_prefix_caching: bool = True

    def validate(self) -> "CacheConfig":
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ConfigError(f"block_size must be a power of two in 1..128, got {self.block_size}")
        if self.num_blocks < 0 or self.num_host_blocks < 0:
            raise ConfigError("num_blocks and num_host_blocks must be >= 0")
        if not 0.0 <= self.watermark < 1.0:
            raise ConfigError(f"watermark must be in [0, 1), got {self.watermark}")
        return self


@dataclass
class SchedulerConfig:
    """Batching and admission policy."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    max_waiting: int = 1024              # bound on the waiting queue; beyond it requests get "queue_full"
    preemption_mode: str = "recompute"   # "recompute" or "swap"
    enable_chunked_prefill: bool = True

    def validate(self) -> "SchedulerConfig":
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "max_waiting"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ConfigError(f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError("without chunked prefill, max_num_batched_tokens must be >= max_model_len")
        return self


@dataclass
class EngineConfig:
    """Everything one engine (scheduler + executor) needs; the CLI builds it."""

    model: str = ""                      # HF folder, .gguf file, "random:<preset>", or "" for the bundled default
    dtype: str = "auto"                  # auto = bfloat16 on CUDA, float32 on CPU
    device: str = "auto"                 # auto = cuda if available else cpu
    attention_backend: str = "auto"      # one of ATTENTION_BACKENDS; auto = cuda on a GPU, else cpu
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int = 0             # bytes for KV cache; 0 = derive
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def validate(self) -> "EngineConfig":
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ConfigError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                              f"got {self.attention_backend!r}")
        self.cache.validate()
        self.scheduler.validate()
        return self
