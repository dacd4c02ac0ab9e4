"""Llama-family decoder for packed variable-length batches (gpt-fast style, one file).

Every forward pass takes one flat token axis: ``input_ids [T]``, ``positions [T]`` and the step's
``AttentionMetadata``, so prefills, prefill chunks and decodes of many sequences run together
without padding. K/V go into the paged cache through the attention backend. The forward returns
hidden states; ``compute_logits`` runs the LM head only on the rows that sample.

Shapes: T tokens in the step, D hidden size, Hq / Hkv query / KV heads, Dh head dim, V vocab.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.executor.attention.base import AttentionBackend, AttentionMetadata, NormKernel


@dataclass
class ModelConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None   # {"rope_type": "llama3"|"linear", ...} or None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    bos_token_id: Optional[int] = None
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_hf(cls, hf) -> "ModelConfig":
        """From a transformers config object (or a dict of config.json)."""
        get = (lambda k, d=None: hf.get(k, d)) if isinstance(hf, dict) else (lambda k, d=None: getattr(hf, k, d))
        num_heads = get("num_attention_heads")
        head_dim = get("head_dim") or get("hidden_size") // num_heads
        # transformers 5 keeps theta and scaling in `rope_parameters`; older configs in two fields
        rope = dict(get("rope_parameters") or {})
        legacy = get("rope_scaling") or {}
        rope_theta = rope.pop("rope_theta", None) or get("rope_theta") or 10000.0
        rope.update({k: v for k, v in dict(legacy).items() if k not in rope and k != "rope_theta"})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"unsupported rope scaling {rope_type!r} (supported: default, llama3, linear)")
        if get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported activation {get('hidden_act')!r}")
        eos = get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"), num_layers=get("num_hidden_layers"),
            num_heads=num_heads, num_kv_heads=get("num_key_value_heads") or num_heads,
            head_dim=head_dim, rms_norm_eps=float(get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta),
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            max_position_embeddings=get("max_position_embeddings", 2048) or 2048,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            attention_bias=bool(get("attention_bias", False)),
            bos_token_id=get("bos_token_id"), eos_token_ids=eos,
        )

    def to_hf(self):
        """The transformers LlamaConfig of this shape (``from_hf`` inverts it): HF runs the same
        random-weight presets in the side-by-side benchmark."""
        from transformers import LlamaConfig

        rope = {"rope_type": "default", "rope_theta": self.rope_theta} | (self.rope_scaling or {})
        return LlamaConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                           num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                           head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, rope_parameters=rope,
                           max_position_embeddings=self.max_position_embeddings,
                           tie_word_embeddings=self.tie_word_embeddings, attention_bias=self.attention_bias,
                           bos_token_id=self.bos_token_id, eos_token_id=list(self.eos_token_ids))

    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name])


PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(rope_theta=100000.0, max_position_embeddings=8192,
                                bos_token_id=1, eos_token_ids=[2]),
    "llama-1b": ModelConfig(    # Llama-3.2-1B shape
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=[128001, 128008, 128009]),
    "tiny": ModelConfig(        # for fast tests
        vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=32, max_position_embeddings=4096, eos_token_ids=[0]),
}


# ------------------------------------------------------------------------------------------- RoPE

def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """[Dh/2] inverse frequencies, with llama3 / linear scaling as transformers computes them."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = cfg.rope_scaling
    if sc is None:
        return inv_freq
    if sc["rope_type"] == "linear":
        return inv_freq / sc["factor"]
    factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_len = sc["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    inv_llama = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, inv_llama)


def rope_cache(cfg: ModelConfig, max_len: int) -> Tensor:
    """[max_len, 2, Dh] float32: cos, and sin with its first half negated, per position.

    HF rotates as ``x * cos + cat(-x2, x1) * sin``; with the sign folded into the table that is
    ``x * cos + roll(x, Dh/2) * sin_signed``, one op less per layer and the same bits."""
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * rope_inv_freq(cfg)[None, :]
    sin, cos = freqs.sin(), freqs.cos()                          # [L, Dh/2]
    return torch.stack((torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)), dim=1)   # [L, 2, Dh]


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    # x [T, H, Dh]; cos, sin_signed [T, 1, Dh] (from rope_cache)
    out = x * cos
    out += x.roll(x.shape[-1] // 2, dims=-1) * sin_signed
    return out


# ------------------------------------------------------------------------------------------ layers

class Linear(nn.Module):
    """``y = x @ weight_t (+ bias)`` with the weight stored transposed, ``[in, out]`` contiguous.

    Why not ``nn.Linear``: for the few-row GEMMs of decode steps (T = batch size) MKL's NN
    kernel is ~25% faster on CPU than the TN kernel ``F.linear`` runs on an ``[out, in]`` weight
    (same results; prefill-sized GEMMs run at the same speed either way)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight_t = nn.Parameter(torch.empty(in_features, out_features))      # [in, out]
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        # x [T, in] -> [T, out]
        if self.bias is None:
            return torch.mm(x, self.weight_t)
        return torch.addmm(self.bias, x, self.weight_t)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, residual: Optional[Tensor] = None,
                kernel: Optional[NormKernel] = None) -> Tensor | tuple[Tensor, Tensor]:
        """norm(x); with ``residual``, the running sum of the layers' outputs, the pair
        ``(norm(residual + x), residual + x)``, fused by ``kernel`` where it covers the tensors."""
        if residual is None:
            return self._norm(x)
        fused = kernel.add_rms_norm(x, residual, self.weight, self.eps) if kernel is not None else None
        if fused is not None:
            return fused
        residual = residual + x
        return self._norm(residual), residual

    def _norm(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, x.shape[-1:], self.weight, eps=self.eps)     # same bits, one op
        # normalise in float32, scale in the input dtype: HF Llama's order
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.wqkv = Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.attention_bias)
        self.wo = Linear(q_size, cfg.hidden_size)
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: Tensor,
                meta: AttentionMetadata, backend: AttentionBackend) -> Tensor:
        T = x.shape[0]
        qkv = self.wqkv(x).view(T, self.n_heads + 2 * self.n_kv, self.head_dim)   # [T, Hq+2Hkv, Dh]
        qk = apply_rope(qkv[:, :self.n_heads + self.n_kv], cos, sin)             # one RoPE for q and k
        q, k = qk.split((self.n_heads, self.n_kv), dim=1)                       # [T, Hq|Hkv, Dh]
        v = qkv[:, self.n_heads + self.n_kv:]                                   # [T, Hkv, Dh]
        backend.write_kv(kv, k, v, meta)
        o = backend.attend(q, kv, meta, self.scale)                        # [T, Hq, Dh]
        return self.wo(o.reshape(T, -1))                                   # [T, D]


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.w13 = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)   # gate | up
        self.w2 = Linear(cfg.intermediate_size, cfg.hidden_size)        # down

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split(self.inter, dim=-1)          # [T, I] each
        return self.w2(F.silu(gate).mul_(up))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, residual, cos, sin, kv, meta, backend, norm_kernel):
        # x [T, D]: the previous block's MLP output (the embeddings for the first block);
        # residual [T, D]: the stream before it (None for the first block). Returns the same pair.
        if residual is None:
            h, residual = self.attention_norm(x), x
        else:
            h, residual = self.attention_norm(x, residual, norm_kernel)
        h, residual = self.ffn_norm(self.attention(h, cos, sin, kv, meta, backend), residual, norm_kernel)
        return self.feed_forward(h), residual


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, max_seq_len: Optional[int] = None):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.output = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.max_seq_len = min(max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.register_buffer("rope", rope_cache(cfg, self.max_seq_len), persistent=False)  # [L, 2, Dh]

    def forward(self, input_ids: Tensor, positions: Tensor, kv_caches: list[Tensor],
                meta: AttentionMetadata, backend: AttentionBackend) -> Tensor:
        # input_ids, positions [T] int64 -> hidden [T, D]
        x = self.tok_embeddings(input_ids)                         # [T, D]
        cs = self.rope[positions].to(x.dtype)                      # [T, 2, Dh]
        cos, sin = cs[:, 0:1], cs[:, 1:2]                          # [T, 1, Dh]; sin with its sign folded in
        norm_kernel = backend if isinstance(backend, NormKernel) else None   # the backend may provide one
        residual = None
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, cos, sin, kv, meta, backend, norm_kernel)
        return self.norm(x, residual, norm_kernel)[0]

    def compute_logits(self, hidden: Tensor) -> Tensor:
        # hidden [N, D] -> logits [N, V] float32
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(hidden, weight).float()
