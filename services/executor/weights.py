"""Weights from a Hugging Face folder (safetensors), a GGUF file, or random from a preset.

Everything is read from local files: nothing here touches the network. Checkpoints are first read
as an HF-named state dict (``load_hf_checkpoint``), then mapped onto ``model.Transformer`` names
(``convert_hf_state_dict``: q/k/v fused into ``wqkv``, gate/up into ``w13``, linear weights
transposed to the ``[in, out]`` layout of ``model.Linear``).
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from services.executor.model import ModelConfig, Transformer, UnsupportedModel
from shared.model_path import ModelSource

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    model: Transformer
    eos_token_ids: list[int]


# ------------------------------------------------------------------------------ HF checkpoints

def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _generation_eos(directory: str) -> list[int]:
    path = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(path):
        return []
    eos = _read_json(path).get("eos_token_id")
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def load_hf_checkpoint(source: ModelSource, dtype: Optional[torch.dtype] = None):
    """(transformers config, HF-named state dict) from a GGUF file or a safetensors folder."""
    from transformers import AutoConfig

    if source.directory is None:
        raise ValueError(f"{source.name!r} has no files to load")
    if source.gguf_file:
        from services.executor import gguf_cache
        path = os.path.join(source.directory, source.gguf_file)
        hf_config, state = gguf_cache.load_or_convert(path, lambda: _convert_gguf(source.directory, source.gguf_file))
        return hf_config, state if dtype is None else {k: v.to(dtype) for k, v in state.items()}

    from safetensors.torch import load_file

    hf_config = AutoConfig.from_pretrained(source.directory, local_files_only=True)
    index = os.path.join(source.directory, "model.safetensors.index.json")
    if os.path.isfile(index):       # sharded: the files the index names, no stray ones
        files = sorted({os.path.join(source.directory, f) for f in _read_json(index)["weight_map"].values()})
    else:
        files = sorted(glob.glob(os.path.join(source.directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {source.directory}")
    state: dict[str, Tensor] = {}
    for path in files:
        for k, v in load_file(path).items():
            state[k] = v if dtype is None else v.to(dtype)
    return hf_config, state


def _convert_gguf(directory: str, gguf_file: str):
    """transformers' GGUF reader: (config, HF-named tensors as dequantized, before any dtype cast)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf_config = AutoConfig.from_pretrained(directory, gguf_file=gguf_file, local_files_only=True)
    with torch.device("meta"):   # only for the GGUF -> HF tensor name map
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    parsed = load_gguf_checkpoint(os.path.join(directory, gguf_file), return_tensors=True, model_to_load=skeleton)
    return hf_config, parsed["tensors"]


def _transposed(*weights: Tensor) -> Tensor:
    """HF ``[out_i, in]`` weights, fused along out -> one contiguous ``[in, sum(out_i)]``."""
    return torch.cat(weights).t().contiguous()


_EXPERT = re.compile(r"^(layers\.\d+\.)(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_EXPERT_NAMES = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def _without_model_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}


def fuse_experts(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-expert checkpoint tensors (``experts.N.gate_proj`` / Mixtral's ``block_sparse_moe.
    experts.N.w1``) -> transformers' fused layout: ``mlp.experts.gate_up_proj [E, 2I, D]``,
    ``mlp.experts.down_proj [E, D, I]``, ``mlp.gate.weight [E, D]``. Names without "model."."""
    out, experts = {}, {}
    for k, v in sd.items():
        m = _EXPERT.match(k)
        if m is None:
            out[k.replace(".block_sparse_moe.", ".mlp.")] = v
        elif m.group(3) not in _EXPERT_NAMES:
            raise UnsupportedModel(f"unknown expert weight {k!r}")
        else:
            experts.setdefault(m.group(1), {}).setdefault(_EXPERT_NAMES[m.group(3)], {})[int(m.group(2))] = v
    for prefix, parts in experts.items():
        n = len(parts["gate"])
        stack = [torch.stack([parts[p][e] for e in range(n)]) for p in ("gate", "up", "down")]
        out[prefix + "mlp.experts.gate_up_proj"] = torch.cat(stack[:2], dim=1)     # [E, 2I, D]
        out[prefix + "mlp.experts.down_proj"] = stack[2]                          # [E, D, I]
    return out


def convert_hf_state_dict(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """HF names -> Transformer names (fusing q|k|v and gate|up; HF's ``[out, in]`` linear weights
    become ``[in, out]`` ``weight_t``; experts become ``[E, in, out]``). Phi-3's checkpoints come
    with q|k|v and gate|up fused already, MoE ones per expert or fused."""
    sd = fuse_experts(_without_model_prefix(sd))
    out = {"tok_embeddings.weight": sd.pop("embed_tokens.weight"), "norm.weight": sd.pop("norm.weight")}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    else:
        out["output.weight"] = sd.pop("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"layers.{i}."          # the HF prefix and ours (the same after dropping "model.")
        a, m, q = p + "self_attn.", p + "mlp.", p + "attention."
        if a + "qkv_proj.weight" in sd:
            out[q + "wqkv.weight_t"] = _transposed(sd.pop(a + "qkv_proj.weight"))
        else:
            out[q + "wqkv.weight_t"] = _transposed(*(sd.pop(a + f"{x}_proj.weight") for x in "qkv"))
        if cfg.attention_bias:
            out[q + "wqkv.bias"] = torch.cat([sd.pop(a + f"{x}_proj.bias") for x in "qkv"])
        out[q + "wo.weight_t"] = _transposed(sd.pop(a + "o_proj.weight"))
        if cfg.o_bias:
            out[q + "wo.bias"] = sd.pop(a + "o_proj.bias")
        if cfg.qk_norm:
            out[q + "q_norm.weight"], out[q + "k_norm.weight"] = sd.pop(a + "q_norm.weight"), sd.pop(a + "k_norm.weight")
        f = p + "feed_forward."
        if cfg.is_moe_layer(i):
            out[f + "router.weight_t"] = _transposed(sd.pop(m + "gate.weight"))
            out[f + "w13"] = sd.pop(m + "experts.gate_up_proj").transpose(1, 2).contiguous()   # [E, D, 2I]
            out[f + "w2"] = sd.pop(m + "experts.down_proj").transpose(1, 2).contiguous()       # [E, I, D]
        elif m + "gate_up_proj.weight" in sd:
            out[f + "w13.weight_t"] = _transposed(sd.pop(m + "gate_up_proj.weight"))
            out[f + "w2.weight_t"] = _transposed(sd.pop(m + "down_proj.weight"))
        else:
            out[f + "w13.weight_t"] = _transposed(sd.pop(m + "gate_proj.weight"), sd.pop(m + "up_proj.weight"))
            out[f + "w2.weight_t"] = _transposed(sd.pop(m + "down_proj.weight"))
        out[p + "attention_norm.weight"] = sd.pop(p + "input_layernorm.weight")
        if cfg.sandwich_norms:      # Gemma 3: post_attention_layernorm norms the attention output
            out[p + "post_attention_norm.weight"] = sd.pop(p + "post_attention_layernorm.weight")
            out[p + "ffn_norm.weight"] = sd.pop(p + "pre_feedforward_layernorm.weight")
            out[p + "post_ffn_norm.weight"] = sd.pop(p + "post_feedforward_layernorm.weight")
        else:
            out[p + "ffn_norm.weight"] = sd.pop(p + "post_attention_layernorm.weight")
    leftover = sorted(k for k in sd if not k.endswith("rotary_emb.inv_freq"))
    if leftover:      # a weight the model would not use: some part of the math is not implemented
        raise UnsupportedModel(f"{cfg.architecture}: checkpoint tensors not used by the model: "
                               f"{leftover[:8]}{' ...' if len(leftover) > 8 else ''}")
    return out


# ------------------------------------------------------------------------------ model building

def build_model(cfg: ModelConfig, hf_state: dict[str, Tensor], *, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", max_seq_len: Optional[int] = None) -> Transformer:
    """A Transformer holding the weights of an HF-named state dict (no random init is spent)."""
    with torch.device("meta"):
        model = Transformer(cfg, max_seq_len)
    try:
        state = convert_hf_state_dict(hf_state, cfg)
    except KeyError as e:
        raise ValueError(f"checkpoint does not match {cfg.architecture}: no tensor {e.args[0]!r}") from None
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or missing:
        raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    return _finish(model, cfg, dtype, device)


def _finish(model: Transformer, cfg: ModelConfig, dtype, device) -> Transformer:
    model.build_rope()          # built on meta with the rest
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def random_model(cfg: ModelConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", max_seq_len: Optional[int] = None) -> Transformer:
    """Seeded random weights (normal, std 0.02; norms at 1) for benchmarks and tests."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(cfg, max_seq_len)
    state = {}
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(p.shape)
        elif name.endswith(".bias"):
            state[name] = torch.zeros(p.shape)
        else:
            state[name] = torch.randn(p.shape, generator=gen) * 0.02
    model.load_state_dict(state, assign=True)
    return _finish(model, cfg, dtype, device)


def load_model_config(source: ModelSource) -> ModelConfig:
    """The model's ``ModelConfig`` without its weights (a config file or a GGUF's metadata)."""
    from transformers import AutoConfig

    if source.random_preset is not None:
        return ModelConfig.from_preset(source.random_preset)
    if source.directory is None:
        raise ValueError(f"{source.name!r} has no files to load")
    if source.gguf_file:                  # the converted cache's config.json, else the GGUF's metadata
        from services.executor import gguf_cache
        cached = gguf_cache.cached_config(os.path.join(source.directory, source.gguf_file))
        if cached is not None:
            return ModelConfig.from_hf(cached)
    return ModelConfig.from_hf(AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file,
                                                          local_files_only=True))


def load_model(source: ModelSource, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", seed: int = 0,
               max_seq_len: Optional[int] = None) -> LoadedModel:
    """Resolve a ModelSource into a ready Transformer (eval mode, no grads)."""
    if source.random_preset is not None:
        cfg = ModelConfig.from_preset(source.random_preset)
        model = random_model(cfg, seed=seed, dtype=dtype, device=device, max_seq_len=max_seq_len)
        return LoadedModel(source.name, cfg, model, list(cfg.eos_token_ids))
    hf_config, state = load_hf_checkpoint(source, dtype=dtype)
    cfg = ModelConfig.from_hf(hf_config)
    model = build_model(cfg, state, dtype=dtype, device=device, max_seq_len=max_seq_len)
    eos = list(cfg.eos_token_ids)
    if source.gguf_file is None:
        eos += [e for e in _generation_eos(source.directory) if e not in eos]
    return LoadedModel(source.name, cfg, model, eos)


def build_hf_reference(hf_config, hf_state: dict[str, Tensor]):
    """The transformers model on the same weights (the oracle for tests and the peer in benchmarks).
    Built on meta and filled in place, because transformers' own GGUF path needs `accelerate`."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    state = {k if k.startswith("lm_head.") else "model." + k: v
             for k, v in fuse_experts(_without_model_prefix(hf_state)).items()}
    missing, _ = model.load_state_dict(state, strict=False, assign=True)
    if [k for k in missing if k != "lm_head.weight"]:
        raise ValueError(f"the HF reference lacks weights: {missing[:8]}")
    model.tie_weights()
    # non-persistent buffers were created on meta: rebuild them (rotary inverse frequencies, Gemma's
    # embedding scale)
    model.model.rotary_emb = type(model.model.rotary_emb)(hf_config)
    embed = model.model.embed_tokens
    if hasattr(embed, "scalar_embed_scale"):
        embed.embed_scale = torch.tensor(embed.scalar_embed_scale)
    return model.eval().requires_grad_(False)
