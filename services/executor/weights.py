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
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from services.executor.model import ModelConfig, Transformer
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
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        hf_config = AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file,
                                               local_files_only=True)
        with torch.device("meta"):   # only for the GGUF -> HF tensor name map
            skeleton = AutoModelForCausalLM.from_config(hf_config)
        parsed = load_gguf_checkpoint(os.path.join(source.directory, source.gguf_file),
                                      return_tensors=True, model_to_load=skeleton, torch_dtype=dtype)
        return hf_config, parsed["tensors"]

    from safetensors.torch import load_file

    hf_config = AutoConfig.from_pretrained(source.directory, local_files_only=True)
    files = sorted(glob.glob(os.path.join(source.directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {source.directory}")
    state: dict[str, Tensor] = {}
    for path in files:
        for k, v in load_file(path).items():
            state[k] = v if dtype is None else v.to(dtype)
    return hf_config, state


def _transposed(*weights: Tensor) -> Tensor:
    """HF ``[out_i, in]`` weights, fused along out -> one contiguous ``[in, sum(out_i)]``."""
    return torch.cat(weights).t().contiguous()


def convert_hf_state_dict(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """HF Llama names -> Transformer names (fusing q|k|v and gate|up; HF's ``[out, in]`` linear
    weights become ``[in, out]`` ``weight_t``)."""
    sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}
    out = {"tok_embeddings.weight": sd["embed_tokens.weight"], "norm.weight": sd["norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_layers):
        p = q = f"layers.{i}."          # HF prefix, our prefix (same after dropping "model.")
        a, m = p + "self_attn.", p + "mlp."
        out[q + "attention.wqkv.weight_t"] = _transposed(
            sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"])
        if cfg.attention_bias:
            out[q + "attention.wqkv.bias"] = torch.cat(
                [sd[a + "q_proj.bias"], sd[a + "k_proj.bias"], sd[a + "v_proj.bias"]])
        out[q + "attention.wo.weight_t"] = _transposed(sd[a + "o_proj.weight"])
        out[q + "feed_forward.w13.weight_t"] = _transposed(sd[m + "gate_proj.weight"], sd[m + "up_proj.weight"])
        out[q + "feed_forward.w2.weight_t"] = _transposed(sd[m + "down_proj.weight"])
        out[q + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    return out


# ------------------------------------------------------------------------------ model building

def build_model(cfg: ModelConfig, hf_state: dict[str, Tensor], *, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", max_seq_len: Optional[int] = None) -> Transformer:
    """A Transformer holding the weights of an HF-named state dict (no random init is spent)."""
    with torch.device("meta"):
        model = Transformer(cfg, max_seq_len)
    missing, unexpected = model.load_state_dict(convert_hf_state_dict(hf_state, cfg), strict=False,
                                                assign=True)
    if unexpected or missing:
        raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    return _finish(model, cfg, dtype, device)


def _finish(model: Transformer, cfg: ModelConfig, dtype, device) -> Transformer:
    from services.executor.model import rope_cache
    model.rope = rope_cache(cfg, model.max_seq_len)
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
    model.load_state_dict(hf_state, strict=False, assign=True)
    model.tie_weights()
    # non-persistent buffers (rotary inverse frequencies) were created on meta: rebuild them
    model.model.rotary_emb = type(model.model.rotary_emb)(hf_config)
    return model.eval().requires_grad_(False)
