"""``ModelConfig``: the switches of the one decoder in model.py, and the registry that maps a
Hugging Face ``config.json`` onto them.

Each supported HF architecture is a ``Family``: the switches it sets (q/k/v bias, q/k norm, the
norm style, sandwich norms, embedding scale, activation, experts) and the config fields it reads.
``ModelConfig.from_hf`` refuses, with ``UnsupportedModel`` naming the field, any architecture not
in the registry and any config value that changes the math and is not implemented (a rope type,
soft-capping, an MLP bias, ...): a model is never served with a field silently ignored.
No torch here: the switches are plain data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

SLIDING, FULL = "sliding_attention", "full_attention"
ROPE_TYPES = ("default", "linear", "llama3", "longrope")


class UnsupportedModel(ValueError):
    """A checkpoint whose architecture or config is not implemented (the message names the field)."""


@dataclass(frozen=True)
class Rope:
    """One rotary embedding: base, scaling (``rope_type`` and its parameters) and head dims rotated."""
    theta: float = 10000.0
    scaling: Optional[dict[str, Any]] = None   # {"rope_type": "llama3"|"linear"|"longrope", ...}; None = default

    def __hash__(self):
        return hash((self.theta, repr(sorted((self.scaling or {}).items()))))


@dataclass
class ModelConfig:
    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None   # {"rope_type": "llama3"|"linear"|"longrope", ...} or None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    attention_bias: bool = False      # q, k, v biases (Qwen2; Llama's attention_bias also sets o_bias)
    o_bias: bool = False              # output projection bias
    qk_norm: bool = False             # per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3)
    norm_offset: float = 0.0          # RMSNorm scales by (offset + weight): Gemma's 1 + w
    sandwich_norms: bool = False      # norms after attention and around the MLP as well (Gemma 3)
    embed_scale: float = 1.0          # embeddings times this (Gemma: sqrt(hidden_size))
    attn_scale: Optional[float] = None  # softmax scale; None = head_dim ** -0.5
    hidden_act: str = "silu"          # "silu" | "gelu_tanh": the MLP's gate activation
    sliding_window: int = 0           # keys a windowed layer sees (the query's own included)
    layer_types: Optional[list[str]] = None   # per layer SLIDING | FULL; None = all SLIDING if a window, else FULL
    local_rope_theta: Optional[float] = None  # RoPE base of sliding layers when it differs (Gemma 3)
    local_rope_scaling: Optional[dict[str, Any]] = None
    num_experts: int = 0              # > 0: MoE layers (router top-k over experts)
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True       # renormalise the top-k router weights to sum 1
    dense_layers: list[int] = field(default_factory=list)   # layers with a dense MLP in an MoE model
    bos_token_id: Optional[int] = None
    eos_token_ids: list[int] = field(default_factory=list)

    # ------------------------------------------------------------------ per layer
    def layer_type(self, layer: int) -> str:
        if self.layer_types is not None:
            return self.layer_types[layer]
        return SLIDING if self.sliding_window else FULL

    def window_of(self, layer: int) -> int:
        """Keys layer ``layer`` attends to (0 = all)."""
        return self.sliding_window if self.layer_type(layer) == SLIDING else 0

    @property
    def uniform_window(self) -> int:
        """The window when every layer is windowed (the scheduler may then free blocks that left
        it); 0 when some layer attends to everything."""
        windows = {self.window_of(i) for i in range(self.num_layers)}
        return windows.pop() if len(windows) == 1 else 0

    def rope_of(self, layer: int) -> Rope:
        if self.layer_type(layer) == SLIDING and self.local_rope_theta is not None:
            return Rope(self.local_rope_theta, self.local_rope_scaling)
        return Rope(self.rope_theta, self.rope_scaling)

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_layers

    # ------------------------------------------------------------------ HF configs
    @classmethod
    def from_hf(cls, hf) -> "ModelConfig":
        """From a transformers config object (or a dict of config.json); ``UnsupportedModel`` for
        what is not implemented."""
        get = _getter(hf)
        archs = get("architectures") or [MODEL_TYPES.get(get("model_type", "llama"), str(get("model_type")))]
        arch = archs[0]                                        # (GGUF-derived configs may lack architectures)
        family = FAMILIES.get(arch)
        if family is None:
            raise UnsupportedModel(f"unsupported architecture {arch!r} (architectures in config.json); "
                                   f"supported: {', '.join(sorted(FAMILIES))}")
        _refuse_common(get, arch)
        num_heads = get("num_attention_heads")
        head_dim = get("head_dim") or get("hidden_size") // num_heads
        eos = get("eos_token_id")
        cfg = cls(
            architecture=arch,
            vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"), num_layers=get("num_hidden_layers"),
            num_heads=num_heads, num_kv_heads=get("num_key_value_heads") or num_heads,
            head_dim=head_dim, rms_norm_eps=float(get("rms_norm_eps", 1e-5)),
            max_position_embeddings=get("max_position_embeddings", 2048) or 2048,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            bos_token_id=get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )
        cfg.rope_theta, cfg.rope_scaling = _rope(get, None, arch)
        cfg = family.configure(cfg, get)
        _check_act(cfg, get, arch)
        return cfg

    def to_hf(self):
        """The transformers LlamaConfig of this shape (``from_hf`` inverts it): HF runs the same
        random-weight presets in the side-by-side benchmark. Llama presets only."""
        from transformers import LlamaConfig

        if self.architecture != "LlamaForCausalLM":
            raise ValueError(f"to_hf covers Llama shapes only, not {self.architecture}")
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
        if name in PRESETS:
            return replace(PRESETS[name])
        if name in HF_PRESETS:
            return cls.from_hf(preset_hf_config(name))
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS) + sorted(HF_PRESETS)}")


def _getter(hf) -> Callable[..., Any]:
    if isinstance(hf, dict):
        return lambda k, d=None: hf.get(k, d) if hf.get(k) is not None else d
    return lambda k, d=None: getattr(hf, k, None) if getattr(hf, k, None) is not None else d


# ------------------------------------------------------------------------------ refusals

# Config fields that change the math and are not implemented: (field, value that is fine).
_NOT_IMPLEMENTED = (
    ("mlp_bias", False), ("attn_logit_softcapping", None), ("final_logit_softcapping", None),
    ("use_bidirectional_attention", False), ("quantization_config", None), ("attention_chunk_size", None),
    ("logits_scaling", 1.0), ("embedding_multiplier", 1.0), ("residual_multiplier", 1.0),
    ("attention_multiplier", None), ("use_qk_norm", False), ("no_rope_layers", None),
    ("shared_expert_intermediate_size", 0),
)


def _refuse_common(get, arch: str) -> None:
    for name, fine in _NOT_IMPLEMENTED:
        value = get(name, fine)
        if value != fine and not (fine == 0 and not value):
            raise UnsupportedModel(f"{arch}: config field {name}={value!r} is not implemented")
    prf = get("partial_rotary_factor", 1.0)
    if prf != 1.0:
        raise UnsupportedModel(f"{arch}: config field partial_rotary_factor={prf!r} is not implemented "
                               "(RoPE over the whole head only)")


def _check_act(cfg: ModelConfig, get, arch: str) -> None:
    act = get("hidden_activation") or get("hidden_act", "silu")
    want = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}.get(act)
    if want is None or want != cfg.hidden_act:
        raise UnsupportedModel(f"{arch}: config field hidden_act={act!r} is not implemented for this family "
                               f"(expects {cfg.hidden_act!r})")


def _rope(get, layer_type: Optional[str], arch: str) -> tuple[float, Optional[dict]]:
    """(theta, scaling) of one layer type: transformers 5 keeps them in ``rope_parameters`` (per
    layer type for Gemma 3), older configs in ``rope_theta`` / ``rope_scaling``."""
    params = dict(get("rope_parameters") or {})
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    elif any(isinstance(v, dict) for v in params.values()):
        params = dict(params.get(FULL) or {})
    legacy = dict(get("rope_scaling") or {}) if layer_type is None else {}
    theta = params.pop("rope_theta", None) or get("rope_theta") or 10000.0
    params.update({k: v for k, v in legacy.items() if k not in params and k != "rope_theta"})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("su", "yarn") and arch == "Phi3ForCausalLM":
        rope_type = "longrope"      # Phi-3's old names for it (as transformers reads them)
    if rope_type not in ROPE_TYPES or (rope_type == "longrope" and arch != "Phi3ForCausalLM"):
        raise UnsupportedModel(f"{arch}: config field rope_type={rope_type!r} is not implemented "
                               f"(supported: default, linear, llama3; longrope for Phi-3)")
    params.pop("type", None)
    prf = params.pop("partial_rotary_factor", 1.0)       # transformers 5 keeps it here too
    if prf != 1.0:
        raise UnsupportedModel(f"{arch}: config field partial_rotary_factor={prf!r} (rope_parameters) is not "
                               "implemented (RoPE over the whole head only)")
    if rope_type == "default":
        return float(theta), None
    scaling = {**params, "rope_type": rope_type}
    if rope_type == "longrope":
        orig = scaling.get("original_max_position_embeddings") or get("original_max_position_embeddings")
        factor = scaling.get("factor") or get("max_position_embeddings") / orig
        attn = scaling.get("attention_factor")
        if attn is None:
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        scaling.update(original_max_position_embeddings=orig, attention_factor=attn)
    return float(theta), scaling


# ------------------------------------------------------------------------------ the registry

@dataclass(frozen=True)
class Family:
    """What one HF architecture sets beyond the Llama baseline."""
    configure: Callable[[ModelConfig, Callable], ModelConfig]


def _window(get) -> int:
    return int(get("sliding_window") or 0)


def _layer_types(cfg: ModelConfig, get, arch: str) -> Optional[list[str]]:
    types = get("layer_types")
    if types is None:
        return None
    types = list(types)
    unknown = sorted(set(types) - {SLIDING, FULL})
    if unknown or len(types) != cfg.num_layers:
        raise UnsupportedModel(f"{arch}: config field layer_types={types!r} is not implemented "
                               f"(one of {SLIDING!r} / {FULL!r} per layer)")
    return types


def _llama(cfg: ModelConfig, get) -> ModelConfig:
    bias = bool(get("attention_bias", False))
    cfg.attention_bias = cfg.o_bias = bias
    return cfg


def _mistral(cfg: ModelConfig, get) -> ModelConfig:
    cfg = _llama(cfg, get)
    cfg.sliding_window = _window(get)          # every layer (transformers' Mistral has no layer_types)
    return cfg


def _qwen_window(cfg: ModelConfig, get) -> ModelConfig:
    """Qwen2/Qwen3's optional window: with ``use_sliding_window``, the layers ``layer_types`` marks
    (older configs: those from ``max_window_layers`` on)."""
    if get("use_sliding_window", False):
        cfg.sliding_window = _window(get)
        cfg.layer_types = _layer_types(cfg, get, cfg.architecture)
        if cfg.layer_types is None:
            first = get("max_window_layers", cfg.num_layers)
            cfg.layer_types = [SLIDING if i >= first else FULL for i in range(cfg.num_layers)]
    return cfg


def _qwen2(cfg: ModelConfig, get) -> ModelConfig:
    cfg.attention_bias = True                          # q, k, v always carry biases, o never
    return _qwen_window(cfg, get)


def _qwen3(cfg: ModelConfig, get) -> ModelConfig:
    cfg = _qwen_window(_llama(cfg, get), get)
    cfg.qk_norm = True
    return cfg


def _qwen3_moe(cfg: ModelConfig, get) -> ModelConfig:
    cfg = _llama(cfg, get)
    cfg.qk_norm = True
    cfg.sliding_window = _window(get) if get("use_sliding_window", False) else 0    # every layer
    cfg.num_experts, cfg.num_experts_per_tok = get("num_experts"), get("num_experts_per_tok")
    cfg.moe_intermediate_size = get("moe_intermediate_size")
    cfg.norm_topk_prob = bool(get("norm_topk_prob", False))
    step = get("decoder_sparse_step", 1)
    only = set(get("mlp_only_layers") or [])
    cfg.dense_layers = [i for i in range(cfg.num_layers) if i in only or (i + 1) % step != 0]
    return cfg


def _mixtral(cfg: ModelConfig, get) -> ModelConfig:
    cfg = _mistral(cfg, get)
    cfg.num_experts, cfg.num_experts_per_tok = get("num_local_experts"), get("num_experts_per_tok")
    cfg.moe_intermediate_size = cfg.intermediate_size
    cfg.norm_topk_prob = True
    return cfg


def _phi3(cfg: ModelConfig, get) -> ModelConfig:
    cfg.sliding_window = _window(get)
    return cfg


def _gemma3(cfg: ModelConfig, get) -> ModelConfig:
    cfg.qk_norm, cfg.norm_offset, cfg.sandwich_norms = True, 1.0, True
    cfg.embed_scale = cfg.hidden_size ** 0.5
    cfg.attn_scale = float(get("query_pre_attn_scalar", cfg.head_dim)) ** -0.5
    cfg.hidden_act = "gelu_tanh"
    cfg.attention_bias = cfg.o_bias = bool(get("attention_bias", False))
    cfg.tie_word_embeddings = bool(get("tie_word_embeddings", True))
    cfg.sliding_window = _window(get)
    cfg.layer_types = _layer_types(cfg, get, cfg.architecture)
    cfg.rope_theta, cfg.rope_scaling = _rope(get, FULL, cfg.architecture)
    cfg.local_rope_theta, cfg.local_rope_scaling = _rope(get, SLIDING, cfg.architecture)
    if get("rope_local_base_freq") is not None and not isinstance((get("rope_parameters") or {}).get(SLIDING), dict):
        cfg.local_rope_theta = float(get("rope_local_base_freq"))
    return cfg


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(_llama),
    "MistralForCausalLM": Family(_mistral),
    "Qwen2ForCausalLM": Family(_qwen2),
    "Qwen3ForCausalLM": Family(_qwen3),
    "Qwen3MoeForCausalLM": Family(_qwen3_moe),
    "MixtralForCausalLM": Family(_mixtral),
    "Phi3ForCausalLM": Family(_phi3),
    "Gemma3ForCausalLM": Family(_gemma3),
}


MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
               "phi3": "Phi3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


# ------------------------------------------------------------------------------ presets

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

# Presets of other families, as the transformers config (model_type, fields): random ~0.5B-class
# shapes for the side-by-side CPU benchmark (docs/BENCHMARKS.md).
HF_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2-0.5b": ("qwen2", dict(       # Qwen2.5-0.5B shape
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=True,
        max_position_embeddings=32768, eos_token_id=151645, architectures=["Qwen2ForCausalLM"])),
    "gemma3-0.5b": ("gemma3_text", dict(    # Gemma-3-270M widened to ~0.5B: head_dim 256, 5 sliding : 1 global
        vocab_size=262144, hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=512, max_position_embeddings=32768, eos_token_id=1,
        architectures=["Gemma3ForCausalLM"])),
    "qwen3-moe-0.5b": ("qwen3_moe", dict(   # Qwen3-30B-A3B's shape scaled to ~0.6B: 32 experts, top 4
        vocab_size=151936, hidden_size=768, intermediate_size=2048, moe_intermediate_size=384,
        num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=4, head_dim=64,
        num_experts=32, num_experts_per_tok=4, norm_topk_prob=True, tie_word_embeddings=True,
        max_position_embeddings=32768, eos_token_id=151645, architectures=["Qwen3MoeForCausalLM"])),
}


def preset_hf_config(name: str):
    """The transformers config of a preset (HF builds the same model in the benchmark)."""
    if name in PRESETS:
        return PRESETS[name].to_hf()
    if name not in HF_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS) + sorted(HF_PRESETS)}")
    from transformers import AutoConfig

    model_type, fields = HF_PRESETS[name]
    return AutoConfig.for_model(model_type, **fields)
