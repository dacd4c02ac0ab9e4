"""``ModelConfig.from_hf``: each registered architecture sets its switches, and what is not
implemented is refused naming the field (unit tier: config dicts, no weights)."""
from __future__ import annotations

import pytest

from services.executor.model_config import FAMILIES, FULL, SLIDING, ModelConfig, UnsupportedModel

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512)


def cfg(arch: str, **fields) -> ModelConfig:
    return ModelConfig.from_hf({**BASE, "architectures": [arch], **fields})


def test_llama_is_the_baseline():
    c = cfg("LlamaForCausalLM")
    assert (c.attention_bias, c.o_bias, c.qk_norm, c.norm_offset, c.sandwich_norms, c.num_experts) == \
        (False, False, False, 0.0, False, 0)
    assert [c.window_of(i) for i in range(4)] == [0] * 4 and c.uniform_window == 0
    assert cfg("LlamaForCausalLM", attention_bias=True).o_bias


def test_qwen2_biases_and_its_optional_window():
    c = cfg("Qwen2ForCausalLM", tie_word_embeddings=True)
    assert c.attention_bias and not c.o_bias and c.tie_word_embeddings and c.uniform_window == 0
    w = cfg("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=32, max_window_layers=2)
    assert [w.window_of(i) for i in range(4)] == [0, 0, 32, 32] and w.uniform_window == 0
    assert cfg("Qwen2ForCausalLM", sliding_window=32).window_of(3) == 0     # use_sliding_window off


def test_qwen3_qk_norm_and_decoupled_head_dim():
    c = cfg("Qwen3ForCausalLM", head_dim=32)
    assert c.qk_norm and not c.attention_bias and c.head_dim == 32


def test_mistral_window_covers_every_layer():
    c = cfg("MistralForCausalLM", sliding_window=24)
    assert c.uniform_window == 24
    assert cfg("MistralForCausalLM", sliding_window=None).uniform_window == 0


def test_gemma3_switches():
    c = cfg("Gemma3ForCausalLM", head_dim=32, query_pre_attn_scalar=24, sliding_window=16,
            hidden_activation="gelu_pytorch_tanh",
            layer_types=[SLIDING, SLIDING, SLIDING, FULL],
            rope_parameters={SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
                             FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}})
    assert c.qk_norm and c.norm_offset == 1.0 and c.sandwich_norms and c.hidden_act == "gelu_tanh"
    assert c.embed_scale == pytest.approx(8.0) and c.attn_scale == pytest.approx(24 ** -0.5)
    assert [c.window_of(i) for i in range(4)] == [16, 16, 16, 0] and c.uniform_window == 0
    assert c.rope_of(0).theta == 10000.0 and c.rope_of(0).scaling is None
    assert c.rope_of(3).theta == 1e6 and c.rope_of(3).scaling["factor"] == 8.0


def test_moe_families():
    m = cfg("MixtralForCausalLM", num_local_experts=8, num_experts_per_tok=2)
    assert (m.num_experts, m.num_experts_per_tok, m.moe_intermediate_size, m.norm_topk_prob) == (8, 2, 96, True)
    assert all(m.is_moe_layer(i) for i in range(4))
    q = cfg("Qwen3MoeForCausalLM", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            norm_topk_prob=False, mlp_only_layers=[0], decoder_sparse_step=1)
    assert q.qk_norm and not q.norm_topk_prob and q.dense_layers == [0]
    assert [q.is_moe_layer(i) for i in range(4)] == [False, True, True, True]


def test_phi3_window_and_longrope_short_factors():
    c = cfg("Phi3ForCausalLM", sliding_window=2047, original_max_position_embeddings=256,
            rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8})
    assert c.uniform_window == 2047 and c.rope_scaling["rope_type"] == "longrope"
    assert c.rope_scaling["attention_factor"] > 1.0          # max 512 / original 256


@pytest.mark.parametrize("arch, fields, named", [
    ("GPT2LMHeadModel", {}, "GPT2LMHeadModel"),
    ("FalconForCausalLM", {}, "FalconForCausalLM"),
    ("LlamaForCausalLM", {"mlp_bias": True}, "mlp_bias"),
    ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
    ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type"),
    ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0]}}, "rope_type"),
    ("LlamaForCausalLM", {"hidden_act": "gelu"}, "hidden_act"),
    ("LlamaForCausalLM", {"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
    ("Gemma3ForCausalLM", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ("Gemma3ForCausalLM", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ("Gemma3ForCausalLM", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("Gemma3ForCausalLM", {"hidden_activation": "gelu_pytorch_tanh", "layer_types": ["chunked_attention"] * 4},
     "layer_types"),
    ("Phi3ForCausalLM", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("Qwen3MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
                             "shared_expert_intermediate_size": 64}, "shared_expert_intermediate_size"),
])
def test_what_is_not_implemented_is_refused_by_name(arch, fields, named):
    with pytest.raises(UnsupportedModel, match=named):
        cfg(arch, **fields)


def test_every_family_parses():
    extra = {"MixtralForCausalLM": dict(num_local_experts=4, num_experts_per_tok=2),
             "Qwen3MoeForCausalLM": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8),
             "Gemma3ForCausalLM": dict(hidden_activation="gelu_pytorch_tanh")}
    for arch in FAMILIES:
        assert cfg(arch, **extra.get(arch, {})).architecture == arch


def test_a_config_without_architectures_is_read_by_its_model_type():
    c = ModelConfig.from_hf({**BASE, "model_type": "qwen2"})
    assert c.architecture == "Qwen2ForCausalLM" and c.attention_bias
    with pytest.raises(UnsupportedModel, match="falcon"):
        ModelConfig.from_hf({**BASE, "model_type": "falcon"})


def test_partial_rotary_factor_inside_rope_parameters_is_refused():
    with pytest.raises(UnsupportedModel, match="partial_rotary_factor"):
        cfg("Phi3ForCausalLM", rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.5})
