"""The decoder for packed variable-length batches (gpt-fast style, one file, config switches).

One module tree serves every family in ``model_config.FAMILIES`` (Llama, Mistral, Qwen2/3,
Qwen3-MoE, Mixtral, Phi-3, Gemma 3): the differences are switches of ``ModelConfig`` (q/k/v
bias, q/k norm, (1+w) norms, sandwich norms, embedding scale, activation, a window and a RoPE
per layer, a dense or an MoE MLP), not a class per family.

Every forward pass takes one flat token axis: ``input_ids [T]``, ``positions [T]`` and the step's
``AttentionMetadata``, so prefills, prefill chunks and decodes of many sequences run together
without padding. K/V go into the paged cache through the attention backend. The forward returns
hidden states; ``compute_logits`` runs the LM head only on the rows that sample.

Shapes: T tokens in the step, D hidden size, Hq / Hkv query / KV heads, Dh head dim, V vocab,
E experts, K experts per token, I intermediate size.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.executor.attention.base import AttentionBackend, AttentionMetadata, NormKernel
from services.executor.model_config import (  # noqa: F401 - re-exported
    FAMILIES, HF_PRESETS, PRESETS, ModelConfig, Rope, UnsupportedModel, preset_hf_config,
)


# ------------------------------------------------------------------------------------------- RoPE

def rope_inv_freq(rope: Rope, head_dim: int) -> Tensor:
    """[Dh/2] inverse frequencies, with llama3 / linear / longrope scaling as transformers computes them."""
    dim = head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    sc = rope.scaling
    if sc is None:
        return inv_freq
    if sc["rope_type"] == "linear":
        return inv_freq / sc["factor"]
    if sc["rope_type"] == "longrope":      # the short factors: contexts up to the original length
        return 1.0 / (torch.tensor(sc["short_factor"], dtype=torch.float32) * rope.theta ** exponents)
    factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_len = sc["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    inv_llama = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, inv_llama)


def rope_cache(rope: Rope, head_dim: int, max_len: int) -> Tensor:
    """[max_len, 2, Dh] float32: cos, and sin with its first half negated, per position.

    HF rotates as ``x * cos + cat(-x2, x1) * sin``; with the sign folded into the table that is
    ``x * cos + roll(x, Dh/2) * sin_signed``, one op less per layer and the same bits."""
    sc = rope.scaling or {}
    if sc.get("rope_type") == "longrope" and max_len > sc["original_max_position_embeddings"]:
        raise UnsupportedModel(
            f"longrope past original_max_position_embeddings ({sc['original_max_position_embeddings']}) "
            f"is not implemented (its long factors); max_model_len {max_len}: pass a --max-model-len "
            "no longer than that")
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * rope_inv_freq(rope, head_dim)[None, :]
    sin, cos = freqs.sin(), freqs.cos()                          # [L, Dh/2]
    attn = sc.get("attention_factor", 1.0)
    if attn != 1.0:
        sin, cos = sin * attn, cos * attn
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
    """RMSNorm scaling by ``weight`` (Llama) or by ``1 + weight`` (``offset`` 1: Gemma)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, residual: Optional[Tensor] = None,
                kernel: Optional[NormKernel] = None) -> Tensor | tuple[Tensor, Tensor]:
        """norm(x); with ``residual``, the running sum of the layers' outputs, the pair
        ``(norm(residual + x), residual + x)``, fused by ``kernel`` where it covers the tensors."""
        if residual is None:
            return self._norm(x)
        if kernel is not None and x.dtype == torch.float32:
            fused = kernel.add_rms_norm(x, residual, self._scale(), self.eps)
            if fused is not None:
                return fused
        residual = residual + x
        return self._norm(residual), residual

    def _scale(self) -> Tensor:
        return self.weight + self.offset if self.offset else self.weight

    def _norm(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, x.shape[-1:], self._scale(), eps=self.eps)     # same bits, one op
        normed = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)
        if self.offset:     # Gemma: scale in float32, then cast
            return (normed * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)     # Llama: cast, then scale in the input dtype


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.wqkv = Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.attention_bias)
        self.wo = Linear(q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5
        self.window = cfg.window_of(layer)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: Tensor,
                meta: AttentionMetadata, backend: AttentionBackend) -> Tensor:
        T = x.shape[0]
        qkv = self.wqkv(x).view(T, self.n_heads + 2 * self.n_kv, self.head_dim)   # [T, Hq+2Hkv, Dh]
        if self.q_norm is None:
            qk = apply_rope(qkv[:, :self.n_heads + self.n_kv], cos, sin)         # one RoPE for q and k
        else:                                                                   # per-head norms first
            q, k = qkv[:, :self.n_heads + self.n_kv].split((self.n_heads, self.n_kv), dim=1)
            qk = apply_rope(torch.cat((self.q_norm(q), self.k_norm(k)), dim=1), cos, sin)
        q, k = qk.split((self.n_heads, self.n_kv), dim=1)                       # [T, Hq|Hkv, Dh]
        v = qkv[:, self.n_heads + self.n_kv:]                                   # [T, Hkv, Dh]
        backend.write_kv(kv, k, v, meta)
        o = backend.attend(q, kv, meta, self.scale, window=self.window)    # [T, Hq, Dh]
        return self.wo(o.reshape(T, -1))                                   # [T, D]


def _act(name: str):
    return F.silu if name == "silu" else (lambda g: F.gelu(g, approximate="tanh"))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.w13 = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)   # gate | up
        self.w2 = Linear(cfg.intermediate_size, cfg.hidden_size)        # down
        self.act = _act(cfg.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split(self.inter, dim=-1)          # [T, I] each
        return self.w2(self.act(gate).mul_(up))


class MoE(nn.Module):
    """Top-k routed experts (Mixtral, Qwen3-MoE), computed grouped: the (token, expert) pairs are
    sorted by expert and each expert runs one GEMM over its rows, not a loop over tokens.

    The per-expert row counts are read on the host (one sync per layer on a GPU); a grouped-GEMM
    kernel would avoid it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.inter, self.norm_topk = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.norm_topk_prob
        E, D, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.router = Linear(D, E)                                  # [D, E]
        self.w13 = nn.Parameter(torch.empty(E, D, 2 * I))           # gate | up, per expert
        self.w2 = nn.Parameter(torch.empty(E, I, D))                # down, per expert
        self.act = _act(cfg.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        # x [T, D] -> [T, D]
        T, K, E = x.shape[0], self.top_k, self.w13.shape[0]
        probs = torch.softmax(self.router(x).float(), dim=-1)        # [T, E] float32
        weights, experts = probs.topk(K, dim=-1)                     # [T, K]
        if self.norm_topk:
            weights /= weights.sum(dim=-1, keepdim=True)
        flat = experts.reshape(-1)                                   # [T*K]
        order = flat.argsort(stable=True)                            # pairs grouped by expert
        rows = order // K                                            # [T*K] token of each sorted pair
        xs = x.index_select(0, rows)                                 # [T*K, D]
        out = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(torch.bincount(flat, minlength=E).tolist()):
            if n:
                gate, up = (xs[start:start + n] @ self.w13[e]).split(self.inter, dim=-1)   # [n, I] each
                out[start:start + n] = self.act(gate).mul_(up) @ self.w2[e]
                start += n
        scaled = out * weights.reshape(-1)[order, None]              # [T*K, D] float32
        return torch.zeros(x.shape, dtype=scaled.dtype, device=x.device).index_add_(0, rows, scaled).to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        eps, off = cfg.rms_norm_eps, cfg.norm_offset
        self.attention_norm = RMSNorm(cfg.hidden_size, eps, off)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.hidden_size, eps, off)
        self.feed_forward = MoE(cfg) if cfg.is_moe_layer(layer) else FeedForward(cfg)
        # Gemma 3's sandwich: each sublayer's output is normed before it joins the residual stream
        self.post_attention_norm = RMSNorm(cfg.hidden_size, eps, off) if cfg.sandwich_norms else None
        self.post_ffn_norm = RMSNorm(cfg.hidden_size, eps, off) if cfg.sandwich_norms else None
        self.reduce = None     # tensor parallel (parallel.py): the all-reduce of each sublayer's partial sums

    def forward(self, x, residual, cos, sin, kv, meta, backend, norm_kernel):
        # x [T, D]: the previous block's MLP output (the embeddings for the first block);
        # residual [T, D]: the stream before it (None for the first block). Returns the same pair.
        if residual is None:
            h, residual = self.attention_norm(x), x
        else:
            h, residual = self.attention_norm(x, residual, norm_kernel)
        h = self.attention(h, cos, sin, kv, meta, backend)
        if self.reduce is not None:
            h = self.reduce(h)
        if self.post_attention_norm is not None:
            h = self.post_attention_norm(h)
        h, residual = self.ffn_norm(h, residual, norm_kernel)
        h = self.feed_forward(h)
        if self.reduce is not None:
            h = self.reduce(h)
        if self.post_ffn_norm is not None:
            h = self.post_ffn_norm(h)
        return h, residual


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, max_seq_len: Optional[int] = None):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        self.output = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.max_seq_len = min(max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        ropes = [cfg.rope_of(i) for i in range(cfg.num_layers)]
        self.ropes = list(dict.fromkeys(ropes))                    # the distinct RoPEs (Gemma 3: two)
        self.rope_index = [self.ropes.index(r) for r in ropes]     # layer -> its RoPE
        self.build_rope()
        self.tp = None         # tensor parallel (parallel.py): vocab-parallel embedding and head

    def build_rope(self) -> None:
        """(Re)build the RoPE tables, [R, L, 2, Dh] float32 (after loading onto meta, or a move)."""
        self.register_buffer("rope", torch.stack([rope_cache(r, self.config.head_dim, self.max_seq_len)
                                                  for r in self.ropes]), persistent=False)

    def forward(self, input_ids: Tensor, positions: Tensor, kv_caches: list[Tensor],
                meta: AttentionMetadata, backend: AttentionBackend) -> Tensor:
        # input_ids, positions [T] int64 -> hidden [T, D]
        x = self.tok_embeddings(input_ids)                         # [T, D]
        if self.config.embed_scale != 1.0:                         # Gemma; the scale rounded to the dtype, as HF
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        cs = self.rope[:, positions].to(x.dtype)                   # [R, T, 2, Dh]
        tables = [(c[:, 0:1], c[:, 1:2]) for c in cs]              # cos, sin [T, 1, Dh]; sin's sign folded in
        norm_kernel = backend if isinstance(backend, NormKernel) else None   # the backend may provide one
        residual = None
        for layer, kv, r in zip(self.layers, kv_caches, self.rope_index):
            cos, sin = tables[r]
            x, residual = layer(x, residual, cos, sin, kv, meta, backend, norm_kernel)
        return self.norm(x, residual, norm_kernel)[0]

    def compute_logits(self, hidden: Tensor) -> Tensor:
        # hidden [N, D] -> logits [N, V] float32
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        if self.tp is not None:     # this rank's vocab rows, gathered
            return self.tp.gather_vocab(F.linear(hidden, weight).float(), self.full_vocab_size)
        return F.linear(hidden, weight).float()
